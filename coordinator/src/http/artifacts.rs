//! Artifacts over HTTP.
//!
//! - `POST /artifacts/{repo}/{GOOS}/{GOARCH}/{version}` (user token): queues the build, or
//!   shares the one already asked for; answers with its state as JSON.
//! - `GET` on the same URL: `202` with progress while it builds, then the file (with
//!   `Content-Disposition`, `X-Checksum-Sha256`, `Repr-Digest`, `ETag` and range
//!   requests); `409` with the summary when the build failed; `300` listing the files
//!   when the build made several (pick one with `?file=NAME`); `410` once retention
//!   removed them.
//! - `GET .../log`: the build's log (live while it runs).
//! - `GET /build/{id}/artifacts/{name}`: a file a post-submit or try build kept.
//!
//! A version is resolved to a commit (branches and tags) before anything else, so the
//! answer names the commit and identical requests share a build.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use buildfarm_store::{Artifact, Build, BuildState, StoreError};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tracing::warn;

use super::{AppState, url_component};
use crate::artifacts::Target;
use crate::artifacts::plan::download_name;
use crate::farm::ArtifactError;

/// The checksum header: lowercase hex SHA-256 of the whole file.
pub const SHA256_HEADER: &str = "x-checksum-sha256";

#[derive(Debug, Deserialize)]
pub struct ArtifactPath {
    repo: String,
    goos: String,
    goarch: String,
    version: String,
}

#[derive(Debug, Deserialize, Default)]
pub struct FileQuery {
    file: Option<String>,
}

/// What POST answers, and GET while the build is not done.
#[derive(Debug, Serialize)]
pub struct ArtifactStatus {
    pub build_id: String,
    pub repo: String,
    /// The commit the version resolved to.
    pub commit: String,
    pub target: String,
    pub state: String,
    pub attempts: u32,
    pub summary: Option<String>,
    /// True when this POST queued the build (false: it shares one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    /// The last line the build printed so far, for progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_line: Option<String>,
    /// Where to GET the artifact (by commit: stable however branches move).
    pub url: String,
    pub log_url: String,
    pub build_url: String,
    /// Files the build kept (once it is done).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileView>,
}

#[derive(Debug, Serialize)]
pub struct FileView {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub url: String,
}

fn error(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    (code, format!("{msg}\n")).into_response()
}

fn artifact_error(e: ArtifactError) -> Response {
    let code = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    if code.is_server_error() {
        warn!(error = %e, "artifact request failed");
    }
    error(code, e)
}

fn base_path(repo: &str, target: &Target, version: &str) -> String {
    format!(
        "/artifacts/{}/{}/{}/{}",
        url_component(repo),
        target.goos,
        target.goarch,
        url_component(version)
    )
}

fn status_view(
    state: &AppState,
    build: &Build,
    target: &Target,
    files: &[Artifact],
) -> ArtifactStatus {
    let url = base_path(&build.repo, target, &build.rev);
    let last_line = state.farm.logs().get(&build.id).and_then(|live| {
        let text = live.contents();
        String::from_utf8_lossy(&text)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.chars().take(300).collect())
    });
    ArtifactStatus {
        build_id: build.id.clone(),
        repo: build.repo.clone(),
        commit: build.rev.clone(),
        target: target.name(),
        state: build.state.as_str().to_owned(),
        attempts: build.attempts,
        summary: build.summary.clone(),
        created: None,
        last_line,
        log_url: format!("{url}/log"),
        build_url: format!("/build/{}", build.id),
        files: files
            .iter()
            .map(|a| FileView {
                name: a.name.clone(),
                size: a.size,
                sha256: a.sha256.clone(),
                url: format!("{url}?file={}", url_component(&a.name)),
            })
            .collect(),
        url,
    }
}

/// `POST /artifacts/{repo}/{goos}/{goarch}/{version}`.
pub async fn request(
    State(state): State<AppState>,
    Path(p): Path<ArtifactPath>,
    principal: Option<axum::Extension<crate::access::Principal>>,
) -> Response {
    // The access layer lets only developers (and up) post; it hands over who they are.
    let Some(axum::Extension(principal)) = principal else {
        return error(StatusCode::UNAUTHORIZED, "a user token is required");
    };
    let user = principal.user;
    let req = match state
        .farm
        .request_artifact(&p.repo, &p.goos, &p.goarch, &p.version)
        .await
    {
        Ok(r) => r,
        Err(e) => return artifact_error(e),
    };
    tracing::info!(user, repo = %p.repo, version = %p.version, target = %req.target.name(), build_id = %req.build.id, created = req.created, "artifact requested");
    let files = if req.build.state == BuildState::Ok {
        state
            .farm
            .store()
            .list_artifacts(&req.build.id)
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut view = status_view(&state, &req.build, &req.target, &files);
    view.created = Some(req.created);
    let code = if req.build.state == BuildState::Ok {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (code, axum::Json(view)).into_response()
}

/// The build of a GET, or the answer when there is none.
async fn find(state: &AppState, p: &ArtifactPath) -> Result<(Target, Build), Response> {
    match state
        .farm
        .find_artifact(&p.repo, &p.goos, &p.goarch, &p.version)
        .await
    {
        Ok((target, Some(b))) => Ok((target, b)),
        Ok((target, None)) => Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "no build of {} {} for {} was asked for: POST to this URL to start one",
                p.repo,
                p.version,
                target.name()
            ),
        )),
        Err(e) => Err(artifact_error(e)),
    }
}

/// `GET /artifacts/{repo}/{goos}/{goarch}/{version}`.
pub async fn download(
    State(state): State<AppState>,
    Path(p): Path<ArtifactPath>,
    Query(q): Query<FileQuery>,
    req: Request,
) -> Response {
    let (target, build) = match find(&state, &p).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    match build.state {
        BuildState::Queued | BuildState::Running => {
            return (
                StatusCode::ACCEPTED,
                [(header::RETRY_AFTER, "2")],
                axum::Json(status_view(&state, &build, &target, &[])),
            )
                .into_response();
        }
        BuildState::Ok => {}
        _ => {
            return (
                StatusCode::CONFLICT,
                axum::Json(status_view(&state, &build, &target, &[])),
            )
                .into_response();
        }
    }
    let files = match state.farm.store().list_artifacts(&build.id).await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let chosen = match (&q.file, files.as_slice()) {
        (_, []) => {
            return error(
                StatusCode::GONE,
                format!(
                    "the files of build {} were removed by the retention policy: POST to this URL to build again",
                    build.id
                ),
            );
        }
        (Some(name), _) => match files.iter().find(|a| &a.name == name) {
            Some(a) => a,
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("build {} kept no file {name:?}", build.id),
                );
            }
        },
        (None, [only]) => only,
        (None, _) => {
            return (
                StatusCode::MULTIPLE_CHOICES,
                axum::Json(status_view(&state, &build, &target, &files)),
            )
                .into_response();
        }
    };
    let name = download_name(&p.version, &target, &chosen.name, files.len() == 1);
    serve(&state, chosen, &name, req).await
}

/// `GET /artifacts/{repo}/{goos}/{goarch}/{version}/log`.
pub async fn log(State(state): State<AppState>, Path(p): Path<ArtifactPath>) -> Response {
    match find(&state, &p).await {
        Ok((_, build)) => super::logs::build_log(State(state), Path(build.id)).await,
        Err(r) => r,
    }
}

/// `GET /build/{id}/artifacts/{*name}`: a file a build kept.
pub async fn build_file(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let files = match state.farm.store().list_artifacts(&id).await {
        Ok(f) => f,
        Err(StoreError::NotFound { .. }) => {
            return error(StatusCode::NOT_FOUND, format!("no build {id}"));
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let Some(a) = files.iter().find(|a| a.name == name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("build {id} has no artifact {name:?} (or retention removed it)"),
        );
    };
    let file_name = name
        .rsplit('/')
        .next()
        .unwrap_or(&name)
        .replace(|c: char| c == '"' || c == '\\' || c.is_control(), "_");
    serve(&state, a, &file_name, req).await
}

/// Sends one stored file: ranges through `tower_http`'s `ServeFile`, our own digest
/// headers and `If-None-Match` on the content's digest.
async fn serve(state: &AppState, a: &Artifact, file_name: &str, req: Request) -> Response {
    let etag = format!("\"{}\"", a.sha256);
    let Some(path) = state.farm.artifacts().content_path(&a.sha256) else {
        return error(
            StatusCode::GONE,
            format!("the content of {} is gone (retention)", a.name),
        );
    };
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let digest_b64 = hex::decode(&a.sha256)
        .map(|d| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, d))
        .unwrap_or_default();
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        match tower_http::services::ServeFile::new(&path)
            .oneshot(req)
            .await
        {
            Ok(r) => r.map(Body::new),
            Err(never) => match never {},
        }
    };
    let headers = [
        (header::ETAG, etag),
        (HeaderName::from_static(SHA256_HEADER), a.sha256.clone()),
        (
            HeaderName::from_static("repr-digest"),
            format!("sha-256=:{digest_b64}:"),
        ),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{file_name}\""),
        ),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
    ];
    for (name, value) in headers {
        match HeaderValue::from_str(&value) {
            Ok(v) => {
                resp.headers_mut().insert(name, v);
            }
            Err(e) => warn!(header = %name, error = %e, "artifact header not sent"),
        }
    }
    if resp.status().is_success() {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    resp
}

/// Links to a build's artifacts for its page.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactLink {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub url: String,
}

/// The build page's artifact links (`/build/{id}/artifacts/{name}`).
pub fn links(build_id: &str, files: &[Artifact]) -> Vec<ArtifactLink> {
    files
        .iter()
        .map(|a| ArtifactLink {
            name: a.name.clone(),
            size: a.size,
            sha256: a.sha256.clone(),
            url: format!(
                "/build/{build_id}/artifacts/{}",
                a.name
                    .split('/')
                    .map(url_component)
                    .collect::<Vec<_>>()
                    .join("/")
            ),
        })
        .collect()
}
