//! `[[notifications]]` and a repo's `commit_status`: where build and try results are sent
//! (webhooks, chat rooms, a forge's commit-status API).

use serde::{Deserialize, Serialize};

use crate::model::Secret;

/// `[[notifications]]`: one receiver of build and try results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    /// Where events are POSTed, `http://` or `https://`. Required.
    pub url: String,
    /// The body: `webhook` (a JSON event, see the README) or `chat` (a Slack-compatible
    /// incoming-webhook body, `{"text": "..."}`). Default: `webhook`.
    #[serde(default)]
    pub kind: NotificationKind,
    /// Key of the HMAC-SHA256 signature of the body, sent as
    /// `X-Buildfarm-Signature-256: sha256=<hex>`. Default: none (unsigned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// Names of the repos whose results are sent. Default: empty, meaning every repo.
    #[serde(default)]
    pub repos: Vec<String>,
    /// Branches whose post-submit results are sent. Default: empty, meaning every
    /// watched branch.
    #[serde(default)]
    pub branches: Vec<String>,
    /// `changes`: a post-submit result is sent only when it differs from the builder's
    /// previous result on that branch (ok to failed and back; a first result only when it
    /// is a failure); `every`: every final result. Default: `changes`.
    #[serde(default)]
    pub on: NotifyOn,
    /// Also send each try run's verdict, once, when it is decided. Default: `true`.
    #[serde(default = "default_true")]
    pub try_runs: bool,
}

fn default_true() -> bool {
    true
}

/// The body a [`Notification`] receiver gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationKind {
    #[default]
    Webhook,
    Chat,
}

/// Which post-submit results a [`Notification`] receiver gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyOn {
    #[default]
    Changes,
    Every,
}

/// `commit_status` of a `[[repos]]` entry: each post-submit build's state posted to a
/// forge's commit-status API (GitHub's REST shape:
/// `POST {api_url}/repos/{repo}/statuses/{rev}`), so results show next to the commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitStatus {
    /// Base URL of the forge's REST API, e.g. `https://api.github.com`. Required.
    pub api_url: String,
    /// The repo on the forge, `owner/name`. Required.
    pub repo: String,
    /// Token sent as `Authorization: Bearer <token>`. Required.
    pub token: Secret,
    /// The coordinator's public base URL, for links from each status to the build's
    /// log. Default: none (statuses carry no link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_url: Option<String>,
}

/// Problems with one `[[notifications]]` entry, as (field, message).
pub(crate) fn check_notification(n: &Notification, repos: &[&str]) -> Vec<(&'static str, String)> {
    let mut out = vec![];
    if let Some(msg) = url_problem(&n.url) {
        out.push(("url", msg));
    }
    if n.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
        out.push((
            "secret",
            "an empty secret signs nothing; leave it out".to_owned(),
        ));
    }
    for r in &n.repos {
        if !repos.contains(&r.as_str()) {
            out.push(("repos", format!("no repo named \"{r}\" in [[repos]]")));
        }
    }
    out
}

/// Problems with a repo's `commit_status`, as (field, message).
pub(crate) fn check_commit_status(c: &CommitStatus) -> Vec<(&'static str, String)> {
    let mut out = vec![];
    if let Some(msg) = url_problem(&c.api_url) {
        out.push(("api_url", msg));
    }
    let parts: Vec<&str> = c.repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        out.push(("repo", format!("\"{}\" is not `owner/name`", c.repo)));
    }
    if c.token.expose().trim().is_empty() {
        out.push(("token", "the token is empty".to_owned()));
    }
    if let Some(msg) = c.target_url.as_deref().and_then(url_problem) {
        out.push(("target_url", msg));
    }
    out
}

fn url_problem(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => None,
        _ => Some(format!("\"{url}\" is not an http:// or https:// URL")),
    }
}
