//! The coordinator's HTTP side: the status page, the dashboard and try pages, build
//! logs (live while running), a JSON form of every page for scripts, Prometheus
//! metrics, the push webhook, artifacts on request and the files builds kept, and the
//! public gRPC API merged into one router.
//!
//! Pages are askama templates (`src/http/templates`, escaping on by default) rendered
//! from plain view structs; each view is built by a pure function with an explicit
//! `now`, so tests render fixed pages.

pub mod artifacts;
pub mod buildlet_bin;
pub mod charts;
pub mod dashboard;
pub mod logs;
pub mod metrics;
pub mod not_found;
pub mod status;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use buildfarm_proto::coordinator::coordinator_server::CoordinatorServer;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::warn;

use crate::api::Api;
use crate::farm::{Farm, now_ms};

#[derive(Clone)]
pub struct AppState {
    pub farm: Arc<Farm>,
    pub api: Api,
    pub poll_kick: Arc<Notify>,
    pub web: Arc<WebState>,
}

/// State of the pages beyond the farm's own: chart history and metrics.
pub struct WebState {
    pub history: charts::History,
    pub metrics: Arc<metrics::Metrics>,
    /// For handshake counters in `/metrics`; `None` when the farm has no reverse port.
    pub revdial: Option<revdial::Listener>,
    /// The port's connection counters, for `/metrics` and the status page.
    pub acceptor: Option<revdial::accept::Acceptor>,
    /// Why local buildlets run without a sandbox; `None` when they are sandboxed or
    /// there is no local pool. Fixed at start-up.
    pub unsandboxed: Option<String>,
    /// The buildlet binaries served at `/buildlet/{os}-{arch}`; `None` serves none.
    pub binaries: Option<Arc<crate::pool::bootstrap::BuildletBinaries>>,
}

/// What the pages report beyond the farm's own state.
#[derive(Default)]
pub struct WebParts {
    pub revdial: Option<revdial::Listener>,
    pub acceptor: Option<revdial::accept::Acceptor>,
    pub unsandboxed: Option<String>,
    pub binaries: Option<Arc<crate::pool::bootstrap::BuildletBinaries>>,
}

impl WebState {
    /// Creates the state and starts its tasks (chart sampler, build-result counter)
    /// on the farm's task tracker; they stop when the farm shuts down.
    pub fn start(farm: &Arc<Farm>, parts: WebParts) -> anyhow::Result<Arc<WebState>> {
        let web = Arc::new(WebState {
            history: charts::History::default(),
            metrics: Arc::new(metrics::Metrics::new()?),
            revdial: parts.revdial,
            acceptor: parts.acceptor,
            unsandboxed: parts.unsandboxed,
            binaries: parts.binaries,
        });
        farm.tasks().spawn(sample_loop(farm.clone(), web.clone()));
        farm.tasks()
            .spawn(metrics::watch_builds(farm.clone(), web.metrics.clone()));
        Ok(web)
    }
}

/// Records a chart sample now and every [`charts::SAMPLE_EVERY`] until shutdown.
async fn sample_loop(farm: Arc<Farm>, web: Arc<WebState>) {
    let mut tick = tokio::time::interval(charts::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = farm.shutdown_token().cancelled() => return,
            _ = tick.tick() => {}
        }
        let queued = farm.queue_snapshot().iter().map(|q| q.len).sum();
        let in_use = farm.pools().map(|p| p.status().in_use).sum();
        web.history.push(charts::Sample {
            at_ms: now_ms(),
            queued,
            in_use,
        });
    }
}

pub fn router(state: AppState) -> Router {
    let max_message = state.farm.config().limits.max_message_bytes();
    let access = state.api.access().clone();
    let grpc = tonic::service::Routes::new(
        CoordinatorServer::new(state.api.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    )
    .into_axum_router()
    .layer(axum::middleware::map_response(name_message_limit))
    .layer(axum::middleware::from_fn_with_state(
        access.clone(),
        crate::api::grpc_auth,
    ));
    for repo in state
        .farm
        .config()
        .repos
        .iter()
        .filter(|r| r.danger_accept_unsigned_webhooks)
    {
        warn!(
            repo = %repo.name,
            "danger_accept_unsigned_webhooks: anyone who can reach the coordinator can trigger polls of this repo"
        );
    }
    let pages = Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/dashboard", get(dashboard_page))
        .route("/try/{id}", get(try_page))
        .route("/build/{id}", get(logs::build_html))
        .route("/log/{id}", get(logs::build_log))
        .route("/log/{id}/events", get(logs::log_events))
        .route("/metrics", get(metrics_page))
        .route("/api/status", get(status_json))
        .route("/api/dashboard", get(dashboard_json))
        .route("/api/try/{id}", get(try_json))
        .route("/api/builds", get(builds_json))
        .route("/api/builds/{id}", get(logs::build_json))
        .route("/webhook/{repo}", post(webhook))
        .route("/buildlet/{platform}", get(buildlet_bin::serve))
        .route(
            "/artifacts/{repo}/{goos}/{goarch}/{version}",
            get(artifacts::download).post(artifacts::request),
        )
        .route(
            "/artifacts/{repo}/{goos}/{goarch}/{version}/log",
            get(artifacts::log),
        )
        .route("/build/{id}/artifacts/{*name}", get(artifacts::build_file))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(access, http_auth));
    // Not `merge`: the gRPC router's fallback answers every unknown path with an empty
    // gRPC UNIMPLEMENTED (HTTP 200). gRPC requests are told apart by their content type.
    pages.fallback_service(tower::service_fn(move |req| {
        not_found::fallback(grpc.clone(), req)
    }))
}

/// The HTTP side of access control, in front of every page: reads need a token of
/// role viewer unless `access.anonymous_viewers`; anything else needs a developer.
/// Routes with their own credentials (`access::policy::http_action`) pass.
async fn http_auth(
    State(access): State<Arc<crate::access::Access>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(action) = crate::access::policy::http_action(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    match access
        .authorize(req.headers().get(header::AUTHORIZATION), action)
        .await
    {
        Ok(principal) => {
            // Handlers that record who asked (artifact requests) read it from here.
            if let Some(p) = principal {
                req.extensions_mut().insert(p);
            }
            next.run(req).await
        }
        Err(crate::access::Denied::Refused(r)) => {
            let status = r.http_status();
            let mut resp = (status, format!("{}\n", r.message)).into_response();
            if status == StatusCode::UNAUTHORIZED {
                // A browser then asks for credentials: any user name, the token as password.
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static(
                        "Basic realm=\"buildfarm\", charset=\"UTF-8\"",
                    ),
                );
            }
            resp
        }
        Err(crate::access::Denied::Unavailable(m)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{m}\n")).into_response()
        }
    }
}

/// A build as scripts and pages see it.
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
    /// The Go commit whose toolchain the build used (subrepo builds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub go_rev: Option<String>,
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
            go_rev: b.go_rev.clone(),
        }
    }
}

/// `?format=json` turns any page into its JSON form.
#[derive(Deserialize, Default)]
pub struct FormatQuery {
    pub format: Option<String>,
}

impl FormatQuery {
    fn json(&self) -> bool {
        self.format.as_deref() == Some("json")
    }
}

/// Why a page cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("store: {0}")]
    Unavailable(String),
    #[error("rendering page: {0}")]
    Render(#[from] askama::Error),
}

impl PageError {
    pub fn store(e: buildfarm_store::StoreError) -> Self {
        PageError::Unavailable(e.to_string())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let code = match &self {
            PageError::NotFound(_) => StatusCode::NOT_FOUND,
            PageError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PageError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            PageError::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if code.is_server_error() {
            warn!(error = %self, "page failed");
        }
        (code, format!("{self}\n")).into_response()
    }
}

/// A view as HTML, or as JSON with `?format=json`; a missing thing is a 404 page in
/// the same form.
fn page<V: Template + Serialize>(view: Result<V, PageError>, f: &FormatQuery) -> Response {
    let view = match view {
        Ok(v) => v,
        Err(PageError::NotFound(what)) => return not_found::not_found("", &what, f.json()),
        Err(e) => return e.into_response(),
    };
    if f.json() {
        return axum::Json(view).into_response();
    }
    match view.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => PageError::from(e).into_response(),
    }
}

/// "45s", "3m05s", "2h04m", "3d04h".
pub fn fmt_duration_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// How long before `now_ms` the time `t_ms` was, e.g. "3m05s ago".
pub fn fmt_ago(now_ms: i64, t_ms: i64) -> String {
    if t_ms > now_ms {
        return "just now".into();
    }
    format!("{} ago", fmt_duration_secs(((now_ms - t_ms) / 1000) as u64))
}

/// Percent-encodes a URL query component (everything but RFC 3986 unreserved bytes).
pub fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn status_page(State(state): State<AppState>, Query(f): Query<FormatQuery>) -> Response {
    page(Ok(status::view(&state).await), &f)
}

async fn status_json(State(state): State<AppState>) -> Response {
    axum::Json(status::view(&state).await).into_response()
}

async fn dashboard_view(
    state: &AppState,
    q: &dashboard::DashQuery,
) -> Result<dashboard::DashboardView, PageError> {
    let input = dashboard::gather(
        state.farm.store().as_ref(),
        q,
        dashboard::config_builders(state),
    )
    .await?;
    Ok(dashboard::dashboard_view(input, now_ms()))
}

async fn dashboard_page(
    State(state): State<AppState>,
    Query(q): Query<dashboard::DashQuery>,
    Query(f): Query<FormatQuery>,
) -> Response {
    page(dashboard_view(&state, &q).await, &f)
}

async fn dashboard_json(
    State(state): State<AppState>,
    Query(q): Query<dashboard::DashQuery>,
) -> Response {
    page(
        dashboard_view(&state, &q).await,
        &FormatQuery {
            format: Some("json".into()),
        },
    )
}

async fn try_view(state: &AppState, id: &str) -> Result<dashboard::TryView, PageError> {
    let t = state.farm.store().get_try(id).await.map_err(|e| match e {
        buildfarm_store::StoreError::NotFound { .. } => {
            PageError::NotFound(format!("no try run {id}"))
        }
        e => PageError::store(e),
    })?;
    let builds = state
        .farm
        .store()
        .builds_for_try(id)
        .await
        .map_err(PageError::store)?;
    Ok(dashboard::try_view(&t, &builds, now_ms()))
}

async fn try_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(f): Query<FormatQuery>,
) -> Response {
    page(try_view(&state, &id).await, &f)
}

async fn try_json(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    page(
        try_view(&state, &id).await,
        &FormatQuery {
            format: Some("json".into()),
        },
    )
}

/// `/metrics`: refreshes the scrape-time values, then encodes the registry.
async fn metrics_page(State(state): State<AppState>) -> Response {
    let farm = &state.farm;
    let input = metrics::ScrapeInput {
        queue: farm.queue_snapshot(),
        pools: farm.pools().map(|p| p.status()).collect(),
        reverse_hosts: farm
            .revdial_registry()
            .map(|r| r.list())
            .unwrap_or_default(),
        listener: state.web.revdial.as_ref().map(|l| l.metrics()),
        connections: state.web.acceptor.as_ref().map(|a| a.stats()),
        store_ping: status::ping_store(farm.store().as_ref()).await,
        active_builds: farm.active_builds().len(),
        source_tarballs_built: farm.sources().built(),
    };
    state.web.metrics.update(&input);
    match state.web.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

#[derive(Deserialize)]
pub struct BuildsQuery {
    repo: String,
    rev: String,
}

/// Post-submit builds of one commit.
async fn builds_json(State(state): State<AppState>, Query(q): Query<BuildsQuery>) -> Response {
    match state
        .farm
        .store()
        .builds_for_commits(&q.repo, std::slice::from_ref(&q.rev))
        .await
    {
        Ok(builds) => {
            axum::Json(builds.iter().map(BuildView::from).collect::<Vec<_>>()).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response(),
    }
}

/// Rewrites tonic's "decoded message length too large" refusals (a trailers-only
/// response: the status is in the headers) into `ResourceExhausted` naming
/// `limits.max_message_bytes`; see [`crate::api::over_limit_status`].
async fn name_message_limit(mut resp: Response) -> Response {
    // Cheap check first: only OutOfRange (11) can be a size refusal.
    if resp.headers().get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return resp;
    }
    let Some(status) = tonic::Status::from_header_map(resp.headers()) else {
        return resp;
    };
    if let Some(named) =
        crate::api::over_limit_status(&status, crate::api::LimitHolder::Coordinator)
    {
        resp.headers_mut().remove("grpc-message");
        if let Err(e) = named.add_header(resp.headers_mut()) {
            warn!(error = %e, "could not rewrite a message-size status");
        }
    }
    resp
}

/// A push webhook: a POST for a known repo triggers an immediate poll. The body must
/// carry a valid `X-Hub-Signature-256` (GitHub style) under the repo's `webhook_secret`;
/// a repo without a secret refuses webhooks (403) unless it sets
/// `danger_accept_unsigned_webhooks`.
async fn webhook(
    State(state): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let signature = headers
        .get(crate::webhook::SIGNATURE_HEADER)
        .map(|v| v.as_bytes());
    let push = match crate::webhook::check_push(state.farm.config(), &repo, signature, &body) {
        Ok(push) => push,
        Err(e) => {
            warn!(repo, error = %e, "webhook refused");
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN);
            return (status, format!("{e}\n")).into_response();
        }
    };
    state.poll_kick.notify_one();
    let answer = if push.signed {
        "poll scheduled\n"
    } else {
        "poll scheduled (unsigned)\n"
    };
    (StatusCode::ACCEPTED, answer).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(fmt_duration_secs(5), "5s");
        assert_eq!(fmt_duration_secs(185), "3m05s");
        assert_eq!(fmt_duration_secs(7440), "2h04m");
        assert_eq!(fmt_duration_secs(3 * 86400 + 4 * 3600), "3d04h");
        assert_eq!(fmt_ago(10_000, 4_000), "6s ago");
        assert_eq!(fmt_ago(0, 4_000), "just now");
    }

    #[test]
    fn url_components_are_encoded() {
        assert_eq!(
            url_component("release-branch.go1.22"),
            "release-branch.go1.22"
        );
        assert_eq!(url_component("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
