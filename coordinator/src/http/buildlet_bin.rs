//! `GET /buildlet/{os}-{arch}`: the buildlet binaries machines fetch at boot (see
//! `pool::bootstrap`). The body is streamed from disk; `x-buildlet-sha256` (and the
//! `ETag`) carry the file's SHA-256. The binary is no secret, so no credentials are
//! asked; the machine's trust comes from the digest baked into its bootstrap script.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_util::io::ReaderStream;
use tracing::warn;

use super::AppState;
use super::not_found::not_found;
use crate::pool::bootstrap::{BootstrapError, SHA256_HEADER};

pub async fn serve(State(state): State<AppState>, Path(platform): Path<String>) -> Response {
    let path = format!("/buildlet/{platform}");
    let Some(binaries) = state.web.binaries.as_ref() else {
        return not_found(&path, "this coordinator serves no buildlet binaries", false);
    };
    let info = match binaries.get(&platform).await {
        Ok(i) => i,
        Err(e @ (BootstrapError::BadPlatform(_) | BootstrapError::NoBinary(_))) => {
            return not_found(&path, &e.to_string(), false);
        }
        Err(error) => {
            warn!(%platform, %error, "serving a buildlet binary");
            // Names no server path.
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the buildlet binary for {platform} cannot be read\n"),
            )
                .into_response();
        }
    };
    let file = match tokio::fs::File::open(&info.path).await {
        Ok(f) => f,
        Err(error) => {
            warn!(%platform, path = %info.path.display(), %error, "opening a buildlet binary");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the buildlet binary for {platform} cannot be read\n"),
            )
                .into_response();
        }
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, info.len.to_string()),
            (header::ETAG, format!("\"{}\"", info.sha256)),
            (header::HeaderName::from_static(SHA256_HEADER), info.sha256),
        ],
        Body::from_stream(ReaderStream::new(file)),
    )
        .into_response()
}
