//! Build logs are stored zlib-compressed (Go build logs shrink ~10x); this file does both ways.
//!
//! Large logs are (de)compressed on the blocking pool so a multi-megabyte log does not stall
//! the async workers.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

use crate::error::StoreError;

/// The `encoding` column value for logs written by this version.
pub(crate) const ENCODING_ZLIB: &str = "zlib";

/// Below this size the work is cheaper than a hop to the blocking pool.
const INLINE_LIMIT: usize = 64 * 1024;

fn compress_sync(log: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = ZlibEncoder::new(Vec::with_capacity(log.len() / 4), Compression::default());
    encoder.write_all(log)?;
    encoder.finish()
}

fn decompress_sync(data: &[u8], size_hint: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(size_hint);
    ZlibDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

fn log_error(action: &'static str, id: &str, source: std::io::Error) -> StoreError {
    StoreError::Log {
        action,
        id: id.to_owned(),
        source,
    }
}

fn join_error(e: tokio::task::JoinError) -> std::io::Error {
    std::io::Error::other(format!("log codec task failed: {e}"))
}

pub(crate) async fn compress(id: &str, log: &[u8]) -> Result<Vec<u8>, StoreError> {
    let result = if log.len() <= INLINE_LIMIT {
        compress_sync(log)
    } else {
        let owned = log.to_vec();
        tokio::task::spawn_blocking(move || compress_sync(&owned))
            .await
            .unwrap_or_else(|e| Err(join_error(e)))
    };
    result.map_err(|e| log_error("compress", id, e))
}

pub(crate) async fn decompress(
    id: &str,
    encoding: &str,
    data: Vec<u8>,
    size: i64,
) -> Result<Vec<u8>, StoreError> {
    if encoding != ENCODING_ZLIB {
        return Err(StoreError::Corrupt {
            operation: "get_log",
            id: Some(id.to_owned()),
            reason: format!("unknown log encoding {encoding:?}"),
        });
    }
    // The size is only a capacity hint; cap it so a bad row cannot make us allocate wildly.
    let hint = usize::try_from(size).unwrap_or(0).min(256 << 20);
    let result = if data.len() <= INLINE_LIMIT / 8 {
        decompress_sync(&data, hint)
    } else {
        tokio::task::spawn_blocking(move || decompress_sync(&data, hint))
            .await
            .unwrap_or_else(|e| Err(join_error(e)))
    };
    result.map_err(|e| log_error("decompress", id, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_small_and_large() {
        for len in [0usize, 10, 200_000] {
            let log: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let packed = compress("b", &log).await.unwrap();
            let unpacked = decompress("b", ENCODING_ZLIB, packed, len as i64)
                .await
                .unwrap();
            assert_eq!(unpacked, log);
        }
    }

    #[tokio::test]
    async fn garbage_is_an_error_with_the_build_id() {
        let err = decompress("b9", ENCODING_ZLIB, b"not zlib".to_vec(), 8)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "cannot decompress log of build b9");
        let err = decompress("b9", "brotli", vec![], 0).await.unwrap_err();
        assert!(err.to_string().contains("unknown log encoding"), "{err}");
    }
}
