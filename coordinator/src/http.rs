//! The coordinator's HTTP side: status page, build logs (live while running), JSON
//! for scripts, the push webhook, and the public gRPC API merged into one router.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use buildfarm_proto::coordinator::coordinator_server::CoordinatorServer;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::api::Api;
use crate::farm::{ActiveBuild, Farm, now_ms, short};
use crate::pool::PoolStatus;

#[derive(Clone)]
pub struct AppState {
    pub farm: Arc<Farm>,
    pub api: Api,
    pub poll_kick: Arc<Notify>,
}

pub fn router(state: AppState) -> Router {
    let grpc = tonic::service::Routes::new(CoordinatorServer::new(state.api.clone())).into_axum_router();
    let pages = Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/log/{id}", get(build_log))
        .route("/api/status", get(status_json))
        .route("/api/builds", get(builds_json))
        .route("/api/builds/{id}", get(build_json))
        .route("/webhook/{repo}", post(webhook))
        .with_state(state);
    pages.merge(grpc)
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub uptime_secs: u64,
    pub pools: Vec<PoolStatus>,
    pub queue: Vec<QueueView>,
    pub active: Vec<ActiveBuild>,
    pub recent: Vec<BuildView>,
    pub reverse_hosts: Vec<ReverseHostView>,
    pub gomote_instances: usize,
}

#[derive(Debug, Serialize)]
pub struct QueueView {
    pub host_type: String,
    pub class: String,
    pub len: usize,
    pub oldest_wait_secs: u64,
}

#[derive(Debug, Serialize)]
pub struct BuildView {
    pub id: String,
    pub kind: String,
    pub repo: String,
    pub rev: String,
    pub builder: String,
    pub state: String,
    pub attempts: u32,
    pub summary: Option<String>,
    pub finished_unix_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct ReverseHostView {
    pub hostname: String,
    pub host_type: String,
    pub version: String,
    pub connected_secs: u64,
    pub ping_rtt_ms: Option<f64>,
}

impl From<&buildfarm_store::Build> for BuildView {
    fn from(b: &buildfarm_store::Build) -> Self {
        BuildView {
            id: b.id.clone(),
            kind: b.kind.as_str().to_owned(),
            repo: b.repo.clone(),
            rev: b.rev.clone(),
            builder: b.builder.clone(),
            state: b.state.as_str().to_owned(),
            attempts: b.attempts,
            summary: b.summary.clone(),
            finished_unix_ms: b.finished_at,
        }
    }
}

pub async fn status_view(state: &AppState) -> StatusView {
    let farm = &state.farm;
    let mut pools: Vec<PoolStatus> = farm.pools.values().map(|p| p.status()).collect();
    pools.sort_by(|a, b| a.host_type.cmp(&b.host_type));
    let queue = farm
        .queue_snapshot()
        .into_iter()
        .map(|q| QueueView {
            host_type: q.host_type.clone(),
            class: format!("{:?}", q.class).to_lowercase(),
            len: q.len,
            oldest_wait_secs: q.oldest_wait.as_secs(),
        })
        .collect();
    let recent = farm
        .store
        .recent_builds(25)
        .await
        .map(|v| v.iter().map(BuildView::from).collect())
        .unwrap_or_default();
    let now = std::time::SystemTime::now();
    let reverse_hosts = farm
        .revdial_registry
        .as_ref()
        .map(|r| {
            r.list()
                .into_iter()
                .map(|h| ReverseHostView {
                    hostname: h.hostname,
                    host_type: h.host_type,
                    version: h.version,
                    connected_secs: now.duration_since(h.connected_since).map(|d| d.as_secs()).unwrap_or(0),
                    ping_rtt_ms: h.last_ping_rtt.map(|d| d.as_secs_f64() * 1000.0),
                })
                .collect()
        })
        .unwrap_or_default();
    StatusView {
        uptime_secs: farm.started_at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        pools,
        queue,
        active: farm.active_builds(),
        recent,
        reverse_hosts,
        gomote_instances: state.api.instance_count(),
    }
}

#[derive(Deserialize, Default)]
pub struct FormatQuery {
    format: Option<String>,
}

async fn status_json(State(state): State<AppState>) -> Response {
    axum::Json(status_view(&state).await).into_response()
}

async fn status_page(State(state): State<AppState>, Query(q): Query<FormatQuery>) -> Response {
    let view = status_view(&state).await;
    if q.format.as_deref() == Some("json") {
        return axum::Json(view).into_response();
    }
    Html(render_status(&view)).into_response()
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn render_status(v: &StatusView) -> String {
    use std::fmt::Write;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><title>buildfarm status</title>\
         <meta http-equiv=refresh content=5>\
         <style>body{{font-family:sans-serif;margin:1em 2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}.failed,.infra-failure{{background:#fdd}}\
         .ok{{background:#dfd}}</style></head><body><h1>buildfarm</h1><p>up {}s</p>",
        v.uptime_secs
    );
    h.push_str("<h2>Pools</h2><table><tr><th>host type</th><th>kind</th><th>capacity</th><th>in use</th><th>idle</th><th>starting</th></tr>");
    for p in &v.pools {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&p.host_type),
            p.kind,
            p.capacity,
            p.in_use,
            p.idle,
            p.starting
        );
    }
    h.push_str("</table><h2>Queue</h2><table><tr><th>host type</th><th>class</th><th>waiting</th><th>oldest wait</th></tr>");
    for q in &v.queue {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}s</td></tr>",
            esc(&q.host_type),
            esc(&q.class),
            q.len,
            q.oldest_wait_secs
        );
    }
    h.push_str("</table><h2>Active builds</h2><table><tr><th>builder</th><th>repo</th><th>rev</th><th>buildlet</th><th>elapsed</th><th>log</th></tr>");
    let now = now_ms();
    for a in &v.active {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}s</td><td><a href=\"/log/{}\">live log</a></td></tr>",
            esc(&a.builder),
            esc(&a.repo),
            esc(short(&a.rev)),
            esc(a.buildlet.as_deref().unwrap_or("(waiting)")),
            (now - a.started_unix_ms).max(0) / 1000,
            esc(&a.build_id)
        );
    }
    h.push_str("</table><h2>Recent results</h2><table><tr><th>builder</th><th>repo</th><th>rev</th><th>kind</th><th>result</th><th>summary</th></tr>");
    for b in &v.recent {
        let _ = write!(
            h,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/log/{}\">{}</a></td><td>{}</td></tr>",
            esc(&b.state),
            esc(&b.builder),
            esc(&b.repo),
            esc(short(&b.rev)),
            esc(&b.kind),
            esc(&b.id),
            esc(&b.state),
            esc(b.summary.as_deref().unwrap_or(""))
        );
    }
    h.push_str("</table><h2>Reverse hosts</h2><table><tr><th>hostname</th><th>host type</th><th>version</th><th>connected</th><th>ping</th></tr>");
    for r in &v.reverse_hosts {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}s</td><td>{}</td></tr>",
            esc(&r.hostname),
            esc(&r.host_type),
            esc(&r.version),
            r.connected_secs,
            r.ping_rtt_ms.map(|ms| format!("{ms:.1} ms")).unwrap_or_default()
        );
    }
    h.push_str("</table></body></html>");
    h
}

/// The log of a build: the stored log once finished; while running, what it printed
/// so far followed by everything it prints until it ends, as one streamed response.
async fn build_log(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if let Some(live) = state.farm.logs.get(&id) {
        let (past, rx) = live.snapshot_and_subscribe();
        let head = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes::Bytes::from(past)) });
        let body = match rx {
            Some(rx) => {
                let tail = tokio_stream::wrappers::BroadcastStream::new(rx)
                    .filter_map(|r| async move { r.ok().map(Ok::<_, std::io::Error>) });
                Body::from_stream(head.chain(tail))
            }
            None => Body::from_stream(head),
        };
        return (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
                (header::HeaderName::from_static("x-content-type-options"), "nosniff"),
            ],
            body,
        )
            .into_response();
    }
    match state.farm.store.get_log(&id).await {
        Ok(Some(log)) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::HeaderName::from_static("x-content-type-options"), "nosniff"),
            ],
            log,
        )
            .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no log for build {id}\n")).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("build {id}: {e}\n")).into_response(),
    }
}

#[derive(Deserialize)]
pub struct BuildsQuery {
    repo: String,
    rev: String,
}

/// Post-submit builds of one commit.
async fn builds_json(State(state): State<AppState>, Query(q): Query<BuildsQuery>) -> Response {
    match state.farm.store.builds_for_commits(&q.repo, std::slice::from_ref(&q.rev)).await {
        Ok(builds) => axum::Json(builds.iter().map(BuildView::from).collect::<Vec<_>>()).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response(),
    }
}

#[derive(Serialize)]
struct AttemptView {
    n: u32,
    buildlet: String,
    started_unix_ms: i64,
    finished_unix_ms: Option<i64>,
    state: Option<String>,
    error: Option<String>,
}

async fn build_json(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let build = match state.farm.store.get_build(&id).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::NOT_FOUND, format!("build {id}: {e}\n")).into_response(),
    };
    let attempts: Vec<AttemptView> = state
        .farm
        .store
        .list_attempts(&id)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|a| AttemptView {
            n: a.n,
            buildlet: a.buildlet,
            started_unix_ms: a.started_at,
            finished_unix_ms: a.finished_at,
            state: a.state.map(|s| s.as_str().to_owned()),
            error: a.error,
        })
        .collect();
    let mut v = serde_json::to_value(BuildView::from(&build)).unwrap_or_default();
    v["attempts"] = serde_json::to_value(attempts).unwrap_or_default();
    axum::Json(v).into_response()
}

/// A push webhook: any POST for a known repo triggers an immediate poll. With a
/// configured secret, the body must carry a valid `X-Hub-Signature-256` (GitHub style).
async fn webhook(
    State(state): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let Some(cfg) = state.farm.config.repo(&repo) else {
        return (StatusCode::NOT_FOUND, format!("unknown repo {repo:?}\n")).into_response();
    };
    if let Some(secret) = &cfg.webhook_secret {
        let sig = headers
            .get("x-hub-signature-256")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("sha256="))
            .and_then(|v| hex::decode(v).ok());
        let Some(sig) = sig else {
            return (StatusCode::UNAUTHORIZED, "missing X-Hub-Signature-256\n").into_response();
        };
        use hmac::Mac;
        let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.expose().as_bytes()) else {
            return (StatusCode::INTERNAL_SERVER_ERROR, "bad secret\n").into_response();
        };
        mac.update(&body);
        if mac.verify_slice(&sig).is_err() {
            return (StatusCode::FORBIDDEN, "signature mismatch\n").into_response();
        }
    }
    state.poll_kick.notify_one();
    (StatusCode::ACCEPTED, "poll scheduled\n").into_response()
}
