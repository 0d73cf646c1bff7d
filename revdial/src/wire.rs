//! Reading and writing handshake frames on a stream. Reads exactly one frame and no
//! more, so the bytes that follow (HTTP/2) stay in the stream for hyper.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::handshake::{FrameError, HEADER_LEN, decode_body, encode_frame, frame_len};

#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("writing {what}: {source}")]
    Write {
        what: &'static str,
        source: std::io::Error,
    },
}

pub(crate) async fn read_frame<M, S>(io: &mut S, what: &'static str) -> Result<M, WireError>
where
    M: Message + Default,
    S: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_LEN];
    io.read_exact(&mut header)
        .await
        .map_err(|source| WireError::Read { what, source })?;
    let len = frame_len(header)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body)
        .await
        .map_err(|source| WireError::Read { what, source })?;
    Ok(decode_body(what, &body)?)
}

pub(crate) async fn write_frame<M, S>(
    io: &mut S,
    what: &'static str,
    msg: &M,
) -> Result<(), WireError>
where
    M: Message,
    S: AsyncWrite + Unpin,
{
    let buf = encode_frame(msg);
    io.write_all(&buf)
        .await
        .map_err(|source| WireError::Write { what, source })?;
    io.flush()
        .await
        .map_err(|source| WireError::Write { what, source })
}
