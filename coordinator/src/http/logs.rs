//! Build logs: `/log/{id}` as plain text (the stored log, or while the build runs what
//! it printed so far followed by the rest as it comes), `/build/{id}` an HTML page with
//! the build, its attempts and the log, which grows live through `/log/{id}/events`
//! (server-sent events) while the build runs.

use std::convert::Infallible;

use askama::Template;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use buildfarm_store::{Attempt, Build, StoreError};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::dashboard::state_class;
use super::{AppState, BuildView, FormatQuery, PageError, fmt_ago, fmt_duration_secs, page};
use crate::farm::now_ms;

#[derive(Debug, Serialize)]
pub struct AttemptView {
    pub n: u32,
    pub buildlet: String,
    pub started_unix_ms: i64,
    pub finished_unix_ms: Option<i64>,
    pub state: Option<String>,
    pub error: Option<String>,
    #[serde(skip)]
    pub took: String,
}

impl From<Attempt> for AttemptView {
    fn from(a: Attempt) -> Self {
        let took = a
            .finished_at
            .map(|f| fmt_duration_secs(((f - a.started_at).max(0) / 1000) as u64))
            .unwrap_or_else(|| "running".into());
        AttemptView {
            n: a.n,
            buildlet: a.buildlet,
            started_unix_ms: a.started_at,
            finished_unix_ms: a.finished_at,
            state: a.state.map(|s| s.as_str().to_owned()),
            error: a.error,
            took,
        }
    }
}

#[derive(Debug, Serialize, Template)]
#[template(path = "build.html")]
pub struct BuildPage {
    #[serde(flatten)]
    pub build: BuildView,
    pub branch: Option<String>,
    pub try_id: Option<String>,
    pub created_unix_ms: i64,
    pub started_unix_ms: Option<i64>,
    #[serde(skip)]
    pub class: &'static str,
    #[serde(skip)]
    pub created: String,
    #[serde(skip)]
    pub duration: String,
    pub attempts: Vec<AttemptView>,
    /// Shards of sharded test steps while the build runs (empty otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<crate::logs::ShardView>,
    /// True while the log is still growing.
    pub live: bool,
    #[serde(skip)]
    pub log: String,
    /// Bytes of the log shown; the live stream continues from here.
    #[serde(skip)]
    pub log_offset: usize,
    /// Files the build kept, with their download links.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<super::artifacts::ArtifactLink>,
}

/// The page's data; `log` is what is known of the log now and `live` whether it grows.
pub fn build_page(
    b: &Build,
    attempts: Vec<Attempt>,
    log: &[u8],
    live: bool,
    now_ms: i64,
) -> BuildPage {
    let duration = match (b.started_at, b.finished_at) {
        (Some(s), Some(f)) => fmt_duration_secs(((f - s).max(0) / 1000) as u64),
        (Some(s), None) => format!(
            "{} so far",
            fmt_duration_secs(((now_ms - s).max(0) / 1000) as u64)
        ),
        _ => "-".into(),
    };
    BuildPage {
        build: BuildView::from(b),
        branch: b.branch.clone(),
        try_id: b.try_id.clone(),
        created_unix_ms: b.created_at,
        started_unix_ms: b.started_at,
        class: state_class(b.state).0,
        created: fmt_ago(now_ms, b.created_at),
        duration,
        attempts: attempts.into_iter().map(AttemptView::from).collect(),
        shards: Vec::new(),
        live,
        log: String::from_utf8_lossy(log).into_owned(),
        log_offset: log.len(),
        artifacts: Vec::new(),
    }
}

async fn load_build(state: &AppState, id: &str) -> Result<BuildPage, PageError> {
    let b = state
        .farm
        .store()
        .get_build(id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound { .. } => PageError::NotFound(format!("no build {id}")),
            e => PageError::store(e),
        })?;
    let attempts = state
        .farm
        .store()
        .list_attempts(id)
        .await
        .map_err(PageError::store)?;
    let mut shards = Vec::new();
    let (log, live) = match state.farm.logs().get(id) {
        Some(live) => {
            shards = live.shards();
            (live.contents(), true)
        }
        None => (
            state
                .farm
                .store()
                .get_log(id)
                .await
                .map_err(PageError::store)?
                .unwrap_or_default(),
            false,
        ),
    };
    let files = state
        .farm
        .store()
        .list_artifacts(id)
        .await
        .map_err(PageError::store)?;
    let mut page = build_page(&b, attempts, &log, live, now_ms());
    page.shards = shards;
    page.artifacts = super::artifacts::links(id, &files);
    Ok(page)
}

/// `/build/{id}`.
pub async fn build_html(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(f): Query<FormatQuery>,
) -> Response {
    page(load_build(&state, &id).await, &f)
}

/// `/api/builds/{id}`: the build with its attempts (no log; that is `/log/{id}`).
pub async fn build_json(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match load_build(&state, &id).await {
        Ok(p) => axum::Json(p).into_response(),
        Err(PageError::NotFound(what)) => super::not_found::not_found("", &what, true),
        Err(e) => e.into_response(),
    }
}

/// `/log/{id}`: plain text, streamed while the build runs.
pub async fn build_log(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if let Some(live) = state.farm.logs().get(&id) {
        let (past, rx) = live.snapshot_and_subscribe();
        // Holding the log would keep its sender alive and the stream open forever.
        drop(live);
        let head =
            futures::stream::once(async move { Ok::<_, std::io::Error>(bytes::Bytes::from(past)) });
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
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
            .into_response();
    }
    match state.farm.store().get_log(&id).await {
        Ok(Some(log)) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            log,
        )
            .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no log for build {id}\n")).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("build {id}: {e}\n")).into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Byte offset the page already shows.
    from: Option<usize>,
}

/// Splits a byte stream into UTF-8 text, holding back a character cut between chunks.
#[derive(Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    pub fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An incomplete sequence at the end waits for the next chunk.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let tail = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = tail;
        text
    }
}

fn log_event(text: &str) -> Event {
    // JSON keeps newlines and carriage returns inside one SSE data line.
    Event::default()
        .event("log")
        .data(serde_json::to_string(text).unwrap_or_default())
}

/// `/log/{id}/events`: the log from `from` on as `log` events, then one `end` event
/// when the build is over.
pub async fn log_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let live = state.farm.logs().get(&id);
    if live.is_none() {
        // Without a live log the build must at least exist; an unknown id is a 404, not
        // an empty stream that says "finished".
        match state.farm.store().get_build(&id).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => {
                return (StatusCode::NOT_FOUND, format!("no build {id}\n")).into_response();
            }
            Err(e) => return PageError::store(e).into_response(),
        }
    }
    let shutdown = state.farm.shutdown_token().clone();
    let stream = async_stream::stream! {
        if let Some(live) = live {
            let (past, rx) = live.snapshot_and_subscribe();
            drop(live);
            let mut chunker = Utf8Chunker::default();
            let from = q.from.unwrap_or(0).min(past.len());
            let head = chunker.push(&past[from..]);
            if !head.is_empty() {
                yield Ok::<_, Infallible>(log_event(&head));
            }
            if let Some(mut rx) = rx {
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        next = rx.recv() => next,
                    };
                    match next {
                        Ok(bytes) => {
                            let text = chunker.push(&bytes);
                            if !text.is_empty() {
                                yield Ok(log_event(&text));
                            }
                        }
                        Err(RecvError::Lagged(n)) => {
                            yield Ok(log_event(&format!("\n[buildfarm] {n} chunks of output skipped; reload for the whole log]\n")));
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            }
        }
        yield Ok(Event::default().event("end").data("finished"));
    };
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunker_holds_back_split_characters() {
        let mut c = Utf8Chunker::default();
        let s = "héllo".as_bytes();
        assert_eq!(c.push(&s[..2]), "h");
        assert_eq!(c.push(&s[2..]), "éllo");
        assert_eq!(c.push(b"\xff!"), "\u{fffd}!");
    }
}
