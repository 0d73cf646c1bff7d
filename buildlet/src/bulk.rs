//! Bulk transfers (GetTar, PutTar) on a data connection: a raw TLS stream a reverse
//! buildlet dials back for one transfer (`revdial::DataStream`), so the tarball moves
//! at TLS speed instead of through HTTP/2 on the tunnel. The wire format is in
//! `buildlet.proto` (`BulkRequest`, `BulkResult`): u32 big-endian length-prefixed
//! frames, one request, chunk frames ended by an empty one, one result.
//!
//! The buildlet side is [`serve`], over any [`BulkTarget`]; the coordinator's side is
//! [`get_tar`] and [`put_tar`], which [`crate::client::BuildletClient`] uses when it
//! has a way to open data connections. The coordinator's own port speaks the same
//! protocol for gomote transfers ([`serve_with`] picks the instance's target), so a
//! `gomote put` moves as chunk frames on both legs.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use buildfarm_proto::buildlet as pb;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::{Code, Status};

/// Largest request or result frame.
const MAX_MESSAGE: usize = 64 << 10;
/// Largest chunk frame either side accepts.
pub const MAX_CHUNK: usize = 4 << 20;
/// How long a data connection may take to say what it wants (the far end writes its
/// request at once; an unauthenticated listen-mode peer holds its slot no longer).
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// After a put_tar failed early, how long the rest of the upload is read and dropped
/// so the result reaches the sender before the connection closes.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// The same for an upload refused before it started (an unauthorized caller): shorter.
const REFUSED_DRAIN: Duration = Duration::from_secs(2);

/// Who a bulk request is for: the credential a listen-mode buildlet or the coordinator
/// checks (`Bearer ...`; empty where the connection itself is trusted) and, to the
/// coordinator, the gomote instance (empty for a buildlet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addressee {
    pub authorization: String,
    pub instance: String,
}

impl Addressee {
    pub fn bearer(authorization: impl Into<String>) -> Self {
        Addressee {
            authorization: authorization.into(),
            instance: String::new(),
        }
    }

    fn request(&self, op: pb::bulk_request::Op) -> pb::BulkRequest {
        pb::BulkRequest {
            op: Some(op),
            authorization: self.authorization.clone(),
            instance: self.instance.clone(),
        }
    }
}

/// What the transfers of a data connection act on: the buildlet's workdir (and, in
/// the benches, a synthetic source and sink).
#[tonic::async_trait]
pub trait BulkTarget: Send + Sync + 'static {
    /// The tarball of `dir`, in chunks; an error item ends it.
    async fn get_tar(
        &self,
        dir: String,
    ) -> Result<BoxStream<'static, Result<Bytes, Status>>, Status>;

    /// Extracts the tarball in `data` into `dir`; an error item means the upload broke.
    async fn put_tar(
        &self,
        dir: String,
        data: BoxStream<'static, io::Result<Bytes>>,
    ) -> Result<pb::PutTarResponse, Status>;
}

async fn write_message<W, M>(w: &mut W, msg: &M) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).map_err(io::Error::other)?;
    w.write_all(&buf).await?;
    w.flush().await
}

async fn read_message<R, M>(r: &mut R, what: &str) -> io::Result<M>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    let len = r.read_u32().await? as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} frame of {len} bytes (at most {MAX_MESSAGE})"),
        ));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    M::decode(body.as_slice())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")))
}

/// One chunk frame; an empty `data` ends the chunks. Header and data go out in one
/// vectored write, so a chunk costs what writing it raw would.
async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, data: Bytes) -> io::Result<()> {
    let header = (data.len() as u32).to_be_bytes();
    let mut frame = Buf::chain(&header[..], data);
    while frame.has_remaining() {
        w.write_buf(&mut frame).await?;
    }
    Ok(())
}

/// The length of the next chunk frame; 0 ends the chunks.
async fn read_chunk_len<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<usize> {
    let len = r.read_u32().await? as usize;
    if len > MAX_CHUNK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("chunk frame of {len} bytes (at most {MAX_CHUNK})"),
        ));
    }
    Ok(len)
}

/// The next chunk as its own buffer; `None` after the empty frame.
async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Bytes>> {
    let len = read_chunk_len(r).await?;
    if len == 0 {
        return Ok(None);
    }
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        if r.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(buf.freeze()))
}

fn result_of(outcome: Result<Option<pb::PutTarResponse>, Status>) -> pb::BulkResult {
    match outcome {
        Ok(put_tar) => pb::BulkResult {
            code: Code::Ok as i32,
            message: String::new(),
            put_tar,
        },
        Err(s) => pb::BulkResult {
            code: s.code() as i32,
            message: s.message().to_owned(),
            put_tar: None,
        },
    }
}

fn status_of(result: pb::BulkResult) -> Result<Option<pb::PutTarResponse>, Status> {
    match Code::from(result.code) {
        Code::Ok => Ok(result.put_tar),
        code => Err(Status::new(code, result.message)),
    }
}

/// The dialer's handler of data connections: each one is served by [`serve`] on
/// `target`.
pub fn handler<T: BulkTarget>(target: Arc<T>) -> revdial::DataHandler {
    Arc::new(move |io| Box::pin(serve(target.clone(), io)))
}

/// Serves the one transfer a data connection carries, then closes it. Failures of the
/// connection itself end it quietly (the coordinator sees them on its side).
pub async fn serve<T, S>(target: Arc<T>, io: S)
where
    T: BulkTarget + ?Sized,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_authorized(target, io, |_| Ok(())).await
}

/// [`serve`], once `authorize` accepts the request's `authorization` (listen mode:
/// the same check as the gRPC port's); a refusal is the result, and nothing is read
/// or sent past it.
pub async fn serve_authorized<T, S>(
    target: Arc<T>,
    io: S,
    authorize: impl FnOnce(&str) -> Result<(), Status>,
) where
    T: BulkTarget + ?Sized,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_with(io, move |to| {
        let target = authorize(&to.authorization).map(|()| target);
        std::future::ready(target)
    })
    .await
}

/// Serves the one transfer a connection carries on the target `resolve` finds for the
/// request's addressee (the coordinator: the caller's token and instance); a refusal
/// is the result, and nothing is read or sent past it.
pub async fn serve_with<T, S, R, F>(io: S, resolve: R)
where
    T: BulkTarget + ?Sized,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    R: FnOnce(Addressee) -> F,
    F: Future<Output = Result<Arc<T>, Status>>,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut req: pb::BulkRequest =
        match tokio::time::timeout(REQUEST_WAIT, read_message(&mut rd, "bulk request")).await {
            Ok(Ok(req)) => req,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "data connection: no request");
                return;
            }
            Err(_) => {
                tracing::debug!("data connection: no request in time");
                return;
            }
        };
    let to = Addressee {
        authorization: std::mem::take(&mut req.authorization),
        instance: std::mem::take(&mut req.instance),
    };
    let target = match resolve(to).await {
        Ok(target) => target,
        Err(refused) => {
            // Where the result would come: after an empty chunk list for a download; for
            // an upload, read and dropped a short while so the sender reads the refusal
            // rather than a reset connection.
            let download = matches!(req.op, Some(pb::bulk_request::Op::GetTar(_)));
            if download {
                let _ = write_chunk(&mut wr, Bytes::new()).await;
            }
            let _ = write_message(&mut wr, &result_of(Err(refused))).await;
            if !download {
                let mut sink = tokio::io::sink();
                let drain = tokio::io::copy(&mut rd, &mut sink);
                let _ = tokio::time::timeout(REFUSED_DRAIN, drain).await;
            }
            let _ = wr.shutdown().await;
            return;
        }
    };
    let done = match req.op {
        Some(pb::bulk_request::Op::GetTar(r)) => send_tar(&*target, r.dir, &mut wr).await,
        Some(pb::bulk_request::Op::PutTar(h)) => receive_tar(&*target, h.dir, rd, &mut wr).await,
        None => {
            let refused = Status::invalid_argument("a bulk request names no operation");
            write_message(&mut wr, &result_of(Err(refused))).await
        }
    };
    match done {
        Ok(()) => {
            let _ = wr.shutdown().await;
        }
        Err(e) => tracing::debug!(error = %e, "data connection lost"),
    }
}

/// GetTar: the chunks, the empty frame, the result.
async fn send_tar<T, W>(target: &T, dir: String, wr: &mut W) -> io::Result<()>
where
    T: BulkTarget + ?Sized,
    W: AsyncWrite + Unpin,
{
    let outcome = match target.get_tar(dir).await {
        Err(s) => Err(s),
        Ok(mut chunks) => loop {
            match chunks.next().await {
                None => break Ok(None),
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => write_chunk(wr, data).await?,
                Some(Err(s)) => break Err(s),
            }
        },
    };
    write_chunk(wr, Bytes::new()).await?;
    write_message(wr, &result_of(outcome)).await
}

/// Where a put_tar's upload stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// More chunks may follow.
    Open,
    /// The empty frame came.
    Ended,
    /// The connection failed or sent a bad frame: nothing more to read.
    Broken,
}

/// The read half of a put_tar's connection, shared between the upload stream handed
/// to the target and the drain after it.
type SharedReader<R> = Arc<tokio::sync::Mutex<(R, Upload)>>;

/// The upload's chunks as a stream; it ends at the empty frame, and an early end of the connection is an error, never a clean end, so a
/// cut upload cannot pass for a whole tarball.
fn upload_stream<R>(reader: SharedReader<R>) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    R: AsyncRead + Unpin + Send + 'static,
{
    futures::stream::unfold(Some(reader), |state| async move {
        let reader = state?;
        let next = {
            let mut guard = reader.lock().await;
            let (r, upload) = &mut *guard;
            match read_chunk(r).await {
                Ok(Some(data)) => Ok(data),
                Ok(None) => {
                    *upload = Upload::Ended;
                    return None;
                }
                Err(e) => {
                    *upload = Upload::Broken;
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upload ended before its last chunk",
                        ))
                    } else {
                        Err(e)
                    }
                }
            }
        };
        match next {
            Ok(data) => Some((Ok(data), Some(reader))),
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// PutTar: read chunks into the target until the empty frame, then the result. If the
/// target stopped early (a hostile or broken tarball), the rest of the upload is read
/// and dropped first, so the sender is not reset before it reads why.
async fn receive_tar<T, R, W>(target: &T, dir: String, rd: R, wr: &mut W) -> io::Result<()>
where
    T: BulkTarget + ?Sized,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let reader: SharedReader<R> = Arc::new(tokio::sync::Mutex::new((rd, Upload::Open)));
    let outcome = target
        .put_tar(dir, upload_stream(reader.clone()).boxed())
        .await
        .map(Some);
    let drain = async {
        let mut guard = reader.lock().await;
        let (r, upload) = &mut *guard;
        let mut sink = vec![0u8; 64 << 10];
        while *upload == Upload::Open {
            let mut left = read_chunk_len(r).await?;
            if left == 0 {
                *upload = Upload::Ended;
            }
            while left > 0 {
                let n = left.min(sink.len());
                r.read_exact(&mut sink[..n]).await?;
                left -= n;
            }
        }
        io::Result::Ok(())
    };
    if outcome.is_err() {
        let _ = tokio::time::timeout(DRAIN_WAIT, drain).await;
    }
    write_message(wr, &result_of(outcome)).await
}

/// Why a client-side transfer failed: the connection (the caller may say the host is
/// unavailable) or the far end's status.
#[derive(Debug)]
pub enum BulkError {
    Io(io::Error),
    /// Reading the local input of a put_tar (the upload was abandoned, not ended).
    Input(io::Error),
    /// Writing the local output of a get_tar.
    Output(io::Error),
    Status(Status),
}

impl From<io::Error> for BulkError {
    fn from(e: io::Error) -> Self {
        BulkError::Io(e)
    }
}

/// The chunks of a download, as they come; a failure part way is the last item.
pub type Chunks = BoxStream<'static, Result<Bytes, BulkError>>;

/// Asks for `dir` as tar.gz over `io`. A failure before the first chunk (no such
/// directory, a refused caller) is the call's error, as a gRPC call's would be; one
/// after it ends the chunks with an error item.
pub async fn get_tar_stream<S>(io: S, to: &Addressee, dir: &str) -> Result<Chunks, BulkError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut io = io;
    let req = to.request(pb::bulk_request::Op::GetTar(pb::GetTarRequest {
        dir: dir.to_owned(),
    }));
    write_message(&mut io, &req).await?;
    let Some(first) = read_chunk(&mut io).await? else {
        status_of(read_message(&mut io, "bulk result").await?).map_err(BulkError::Status)?;
        return Ok(futures::stream::empty().boxed());
    };
    let rest = futures::stream::unfold(Some(io), |io| async move {
        let mut io = io?;
        let failed = |e: BulkError| Some((Err(e), None));
        match read_chunk(&mut io).await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(io))),
            Ok(None) => match read_message(&mut io, "bulk result").await {
                Ok(result) => status_of(result)
                    .err()
                    .and_then(|s| failed(BulkError::Status(s))),
                Err(e) => failed(e.into()),
            },
            Err(e) => failed(e.into()),
        }
    });
    Ok(futures::stream::once(std::future::ready(Ok(first)))
        .chain(rest)
        .boxed())
}

/// Downloads `dir` as tar.gz over `io` into `writer`; returns the bytes written.
pub async fn get_tar<S, W>(
    io: S,
    to: &Addressee,
    dir: &str,
    writer: &mut W,
    mut progress: Option<&mut (dyn FnMut(u64) + Send)>,
) -> Result<u64, BulkError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut chunks = get_tar_stream(io, to, dir).await?;
    let mut total = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        writer.write_all(&chunk).await.map_err(BulkError::Output)?;
        total += chunk.len() as u64;
        if let Some(p) = progress.as_mut() {
            p(total);
        }
    }
    writer.flush().await.map_err(BulkError::Output)?;
    Ok(total)
}

/// Uploads the tar.gz chunks of `data` over `io` for extraction into `dir`. An error
/// item in `data` abandons the upload (the far end sees a cut upload, never a whole
/// one).
pub async fn put_tar<S, D>(
    io: S,
    to: &Addressee,
    dir: &str,
    data: D,
) -> Result<pb::PutTarResponse, BulkError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
    D: Stream<Item = io::Result<Bytes>> + Send,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let req = to.request(pb::bulk_request::Op::PutTar(pb::PutTarHeader {
        dir: dir.to_owned(),
    }));
    write_message(&mut wr, &req).await?;
    let send = async {
        let mut data = std::pin::pin!(data);
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(BulkError::Input)?;
            // A chunk over the frame limit goes out in pieces.
            let mut rest = chunk;
            while !rest.is_empty() {
                let piece = rest.split_to(rest.len().min(MAX_CHUNK));
                write_chunk(&mut wr, piece).await?;
            }
        }
        write_chunk(&mut wr, Bytes::new()).await?;
        wr.flush().await?;
        Ok::<_, BulkError>(())
    };
    let result = read_message::<_, pb::BulkResult>(&mut rd, "bulk result");
    tokio::pin!(result);
    // The result may come early (the buildlet refused the tarball part way): it wins.
    let result = tokio::select! {
        r = &mut result => r?,
        sent = send => match sent {
            Ok(()) => result.await?,
            Err(BulkError::Input(e)) => return Err(BulkError::Input(e)),
            // The connection broke under the upload; the buildlet may have said why.
            Err(e) => match tokio::time::timeout(Duration::from_secs(5), result).await {
                Ok(Ok(r)) => r,
                _ => return Err(e),
            },
        },
    };
    match status_of(result).map_err(BulkError::Status)? {
        Some(stats) => Ok(stats),
        None => Err(BulkError::Status(Status::internal(
            "put_tar over a data connection ended without its statistics",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A target holding one "tarball" (any bytes) and recording what it is sent;
    /// `fail_after` makes put_tar refuse after that many bytes.
    #[derive(Default)]
    struct Memory {
        get: Vec<u8>,
        got: Mutex<Vec<u8>>,
        fail_after: Option<usize>,
    }

    #[tonic::async_trait]
    impl BulkTarget for Memory {
        async fn get_tar(
            &self,
            dir: String,
        ) -> Result<BoxStream<'static, Result<Bytes, Status>>, Status> {
            if dir == "missing" {
                return Err(Status::not_found("\"missing\" does not exist"));
            }
            let data = Bytes::from(self.get.clone());
            let chunks: Vec<Result<Bytes, Status>> = data
                .chunks(7000)
                .map(|c| Ok(data.slice_ref(c)))
                .chain((dir == "breaks").then(|| Err(Status::internal("disk went away"))))
                .collect();
            Ok(futures::stream::iter(chunks).boxed())
        }

        async fn put_tar(
            &self,
            _dir: String,
            mut data: BoxStream<'static, io::Result<Bytes>>,
        ) -> Result<pb::PutTarResponse, Status> {
            let mut n = 0usize;
            while let Some(chunk) = data.next().await {
                let chunk = chunk.map_err(|e| Status::cancelled(e.to_string()))?;
                n += chunk.len();
                self.got
                    .lock()
                    .map_err(|_| Status::internal("poisoned"))?
                    .extend_from_slice(&chunk);
                if self.fail_after.is_some_and(|f| n > f) {
                    return Err(Status::invalid_argument("entry escapes the directory"));
                }
            }
            Ok(pb::PutTarResponse {
                entries: 1,
                bytes: n as u64,
            })
        }
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Runs `serve` on one end of an in-memory pipe; returns the other end.
    fn connected(target: Arc<Memory>) -> tokio::io::DuplexStream {
        let (a, b) = tokio::io::duplex(32 << 10);
        tokio::spawn(serve(target, b));
        a
    }

    #[tokio::test]
    async fn get_tar_delivers_every_byte_and_reports_errors() {
        for n in [0, 1, 6999, 7000, 7001, 300_000] {
            let target = Arc::new(Memory {
                get: bytes(n),
                ..Memory::default()
            });
            let mut out = Vec::new();
            let got = get_tar(
                connected(target.clone()),
                &Addressee::default(),
                "d",
                &mut out,
                None,
            )
            .await
            .unwrap();
            assert_eq!(got as usize, n);
            assert_eq!(out, target.get, "{n} bytes");
        }
        let target = Arc::new(Memory {
            get: bytes(20_000),
            ..Memory::default()
        });
        let mut out = Vec::new();
        match get_tar(
            connected(target.clone()),
            &Addressee::default(),
            "missing",
            &mut out,
            None,
        )
        .await
        {
            Err(BulkError::Status(s)) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
            other => panic!("expected not found, got {other:?}"),
        }
        match get_tar(
            connected(target),
            &Addressee::default(),
            "breaks",
            &mut out,
            None,
        )
        .await
        {
            Err(BulkError::Status(s)) => {
                assert_eq!(s.code(), Code::Internal, "{s:?}");
                assert!(s.message().contains("disk went away"), "{s:?}");
            }
            other => panic!("a tarball that broke part way must fail, got {other:?}"),
        }
    }

    fn chunks_of(data: &[u8], size: usize) -> Vec<io::Result<Bytes>> {
        data.chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    }

    #[tokio::test]
    async fn put_tar_delivers_every_byte_and_reports_a_refusal_sent_early() {
        for n in [0, 1, 65_536, 65_537, 1_000_003] {
            let target = Arc::new(Memory::default());
            let data = bytes(n);
            let stats = put_tar(
                connected(target.clone()),
                &Addressee::default(),
                "d",
                futures::stream::iter(chunks_of(&data, 65_536)),
            )
            .await
            .unwrap();
            assert_eq!(stats.bytes as usize, n);
            assert_eq!(*target.got.lock().unwrap(), data, "{n} bytes");
        }
        // The target refuses after 100 KB of 3 MB: the sender gets the refusal, not a
        // reset connection.
        let target = Arc::new(Memory {
            fail_after: Some(100_000),
            ..Memory::default()
        });
        let data = bytes(3_000_000);
        match put_tar(
            connected(target),
            &Addressee::default(),
            "d",
            futures::stream::iter(chunks_of(&data, 65_536)),
        )
        .await
        {
            Err(BulkError::Status(s)) => {
                assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
                assert!(s.message().contains("escapes"), "{s:?}");
            }
            other => panic!("expected the refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_cut_upload_is_never_a_whole_one() {
        let target = Arc::new(Memory::default());
        let data = bytes(200_000);
        let mut items = chunks_of(&data, 65_536);
        items.push(Err(io::Error::other("local disk error")));
        match put_tar(
            connected(target.clone()),
            &Addressee::default(),
            "d",
            futures::stream::iter(items),
        )
        .await
        {
            Err(BulkError::Input(e)) => assert!(e.to_string().contains("local disk"), "{e}"),
            other => panic!("expected the input error, got {other:?}"),
        }

        // A sender that stops without the empty frame: the target sees an error.
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(serve(target.clone(), b));
        let req = pb::BulkRequest {
            op: Some(pb::bulk_request::Op::PutTar(pb::PutTarHeader {
                dir: "d".into(),
            })),
            ..Default::default()
        };
        write_message(&mut a, &req).await.unwrap();
        write_chunk(&mut a, Bytes::from_static(b"half a tarball"))
            .await
            .unwrap();
        a.shutdown().await.unwrap();
        let result: pb::BulkResult = read_message(&mut a, "result").await.unwrap();
        assert_eq!(Code::from(result.code), Code::Cancelled, "{result:?}");
        assert!(
            result.message.contains("before its last chunk"),
            "{result:?}"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_authorization_ends_the_connection_with_the_refusal() {
        let target = Arc::new(Memory {
            get: bytes(10),
            ..Memory::default()
        });
        let (a, b) = tokio::io::duplex(1 << 10);
        tokio::spawn(serve_authorized(target.clone(), b, |auth| {
            if auth == "Bearer right" {
                Ok(())
            } else {
                Err(Status::permission_denied("bearer key rejected"))
            }
        }));
        match get_tar(
            a,
            &Addressee::bearer("Bearer wrong"),
            "d",
            &mut Vec::new(),
            None,
        )
        .await
        {
            Err(BulkError::Status(s)) => assert_eq!(s.code(), Code::PermissionDenied, "{s:?}"),
            other => panic!("expected the refusal, got {other:?}"),
        }
        let (a, b) = tokio::io::duplex(1 << 10);
        tokio::spawn(serve_authorized(target, b, |auth| {
            (auth == "Bearer right")
                .then_some(())
                .ok_or_else(|| Status::permission_denied("bearer key rejected"))
        }));
        let mut out = Vec::new();
        let n = get_tar(a, &Addressee::bearer("Bearer right"), "d", &mut out, None)
            .await
            .unwrap();
        assert_eq!((n, out), (10, bytes(10)));
    }

    #[tokio::test]
    async fn hostile_frames_are_refused_without_reading_them() {
        let target = Arc::new(Memory::default());
        // A request frame claiming 4 GiB.
        let (mut a, b) = tokio::io::duplex(1 << 10);
        let server = tokio::spawn(serve(target.clone(), b));
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        server.await.unwrap();
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing answers a bad request: {rest:?}");

        // A chunk over the limit in an upload.
        let (mut a, b) = tokio::io::duplex(1 << 10);
        tokio::spawn(serve(target.clone(), b));
        let req = pb::BulkRequest {
            op: Some(pb::bulk_request::Op::PutTar(pb::PutTarHeader {
                dir: "d".into(),
            })),
            ..Default::default()
        };
        write_message(&mut a, &req).await.unwrap();
        a.write_all(&((MAX_CHUNK + 1) as u32).to_be_bytes())
            .await
            .unwrap();
        let result: pb::BulkResult = read_message(&mut a, "result").await.unwrap();
        assert_ne!(Code::from(result.code), Code::Ok, "{result:?}");
        assert!(result.message.contains("chunk frame"), "{result:?}");

        // An empty request.
        let (mut a, b) = tokio::io::duplex(1 << 10);
        tokio::spawn(serve(target, b));
        write_message(&mut a, &pb::BulkRequest::default())
            .await
            .unwrap();
        let result: pb::BulkResult = read_message(&mut a, "result").await.unwrap();
        assert_eq!(Code::from(result.code), Code::InvalidArgument, "{result:?}");
    }
}
