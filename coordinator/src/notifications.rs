//! Build and try results sent out: to the receivers `[[notifications]]` names (JSON
//! webhooks, signed; chat rooms) and to forges' commit-status APIs (a repo's
//! `commit_status`). What to send is decided by the pure functions at the top; each
//! receiver then has its own queue and task, which delivers in order and retries with
//! backoff. Every message carries a stable id (`X-Buildfarm-Delivery`), so a receiver
//! that gets one twice (a retry after a lost answer) can drop the repeat.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildfarm_config::{CommitStatus, Notification, NotificationKind, NotifyOn};
use buildfarm_store::{Build, BuildKind, BuildState, Verdict, try_verdict};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::farm::{Farm, FarmEvent};
use crate::retry::Backoff;

/// Messages waiting per receiver; beyond it new ones are dropped (and logged) rather
/// than holding memory for a receiver that is gone for good.
const QUEUE_LEN: usize = 10_000;

/// Tries per message before it is given up (logged): with the default backoff, about a
/// day of a receiver being down.
const MAX_TRIES: u32 = 300;

// ---- what to send (pure) ----

/// Whether a post-submit result is sent under `on`, given the builder's previous final
/// result on the branch. Under `changes`: a move between passing and not passing, or a
/// first result that does not pass; cancelled builds say nothing about the code.
pub fn worth_sending(on: NotifyOn, previous: Option<BuildState>, now: BuildState) -> bool {
    if !is_final(now) {
        return false;
    }
    match on {
        NotifyOn::Every => true,
        NotifyOn::Changes => {
            if now == BuildState::Cancelled {
                return false;
            }
            let passing = now == BuildState::Ok;
            match previous {
                None => !passing,
                Some(p) => (p == BuildState::Ok) != passing,
            }
        }
    }
}

fn is_final(s: BuildState) -> bool {
    !matches!(s, BuildState::Queued | BuildState::Running)
}

/// Whether a receiver wants results of this repo and (for post-submit) branch.
pub fn matches(n: &Notification, repo: &str, branch: Option<&str>) -> bool {
    (n.repos.is_empty() || n.repos.iter().any(|r| r == repo))
        && match branch {
            Some(b) => n.branches.is_empty() || n.branches.iter().any(|x| x == b),
            None => true,
        }
}

/// The JSON event of a post-submit result.
pub fn build_event(b: &Build, previous: Option<BuildState>, base_url: &str) -> Value {
    json!({
        "id": format!("build:{}:{}", b.id, b.state.as_str()),
        "type": "build",
        "repo": b.repo,
        "branch": b.branch,
        "rev": b.rev,
        "builder": b.builder,
        "state": b.state.as_str(),
        "previous_state": previous.map(BuildState::as_str),
        "summary": b.summary,
        "build_id": b.id,
        "log_url": format!("{base_url}/log/{}", b.id),
    })
}

/// The JSON event of a decided try run.
pub fn try_event(try_id: &str, verdict: Verdict, builds: &[Build], base_url: &str) -> Value {
    let first = builds.first();
    json!({
        "id": format!("try:{try_id}"),
        "type": "try",
        "try_id": try_id,
        "repo": first.map(|b| b.repo.as_str()),
        "rev": first.map(|b| b.rev.as_str()),
        "verdict": verdict_str(verdict),
        "builders": builds.iter().map(|b| json!({
            "builder": b.builder,
            "state": b.state.as_str(),
            "log_url": format!("{base_url}/log/{}", b.id),
        })).collect::<Vec<_>>(),
    })
}

fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Pending => "pending",
        Verdict::Ok => "ok",
        Verdict::Failed => "failed",
    }
}

/// A Slack-compatible incoming-webhook body for an event made by [`build_event`] or
/// [`try_event`].
pub fn chat_body(event: &Value) -> Value {
    let s = |k: &str| event[k].as_str().unwrap_or("?").to_owned();
    let short = |rev: String| rev.chars().take(12).collect::<String>();
    let text = if event["type"] == "try" {
        format!(
            "try run {} of {} at {}: {}",
            s("try_id"),
            s("repo"),
            short(s("rev")),
            s("verdict")
        )
    } else {
        let was = match event["previous_state"].as_str() {
            Some(p) => format!(" (was {p})"),
            None => String::new(),
        };
        format!(
            "{} on {}/{} at {}: {}{was} <{}|log>",
            s("builder"),
            s("repo"),
            s("branch"),
            short(s("rev")),
            s("state"),
            s("log_url")
        )
    };
    json!({ "text": text })
}

/// The commit-status body (GitHub's shape) for a post-submit build's state.
pub fn commit_status_body(b: &Build, target_url: Option<&str>) -> Value {
    let (state, description) = match b.state {
        BuildState::Queued => ("pending", "queued".to_owned()),
        BuildState::Running => ("pending", "running".to_owned()),
        BuildState::Ok => ("success", "passed".to_owned()),
        BuildState::Failed => ("failure", b.summary.clone().unwrap_or("failed".into())),
        BuildState::InfraFailure => ("error", "infrastructure failure".to_owned()),
        BuildState::Cancelled => ("error", "cancelled".to_owned()),
    };
    let mut body = json!({
        "state": state,
        "context": format!("buildfarm/{}", b.builder),
        // The API takes at most 140 characters.
        "description": description.chars().take(140).collect::<String>(),
    });
    if let Some(base) = target_url {
        body["target_url"] = json!(format!("{}/log/{}", base.trim_end_matches('/'), b.id));
    }
    body
}

/// `sha256=<hex HMAC-SHA256 of body under secret>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

// ---- sending ----

/// One HTTP POST to make, with its stable id.
#[derive(Debug, Clone)]
struct Message {
    id: String,
    url: String,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

/// A receiver's queue; its task delivers what is pushed.
#[derive(Clone)]
struct Outbox {
    name: String,
    tx: mpsc::Sender<Message>,
}

impl Outbox {
    fn start(
        name: String,
        client: reqwest::Client,
        backoff: Backoff,
        stop: CancellationToken,
    ) -> (Outbox, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        let task = deliver_all(name.clone(), rx, client, backoff, stop);
        (Outbox { name, tx }, task)
    }

    fn push(&self, m: Message) {
        if let Err(e) = self.tx.try_send(m) {
            warn!(receiver = %self.name, error = %e, "notification queue full or closed; message dropped");
        }
    }
}

async fn deliver_all(
    name: String,
    mut rx: mpsc::Receiver<Message>,
    client: reqwest::Client,
    backoff: Backoff,
    stop: CancellationToken,
) {
    while let Some(m) = tokio::select! { _ = stop.cancelled() => None, m = rx.recv() => m } {
        let mut tries = 0u32;
        loop {
            tries += 1;
            match post(&client, &m).await {
                Ok(()) => {
                    info!(receiver = %name, id = %m.id, tries, "notification delivered");
                    break;
                }
                Err(Failure::Refused(why)) => {
                    warn!(receiver = %name, id = %m.id, %why, "notification refused; not retried");
                    break;
                }
                Err(Failure::Retry(why)) if tries >= MAX_TRIES => {
                    warn!(receiver = %name, id = %m.id, %why, tries, "notification given up");
                    break;
                }
                Err(Failure::Retry(why)) => {
                    let wait = backoff.delay(tries, rand::random::<f64>());
                    warn!(receiver = %name, id = %m.id, %why, ?wait, "notification not delivered; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

enum Failure {
    /// The receiver answered that this message is wrong (4xx): sending it again gets
    /// the same answer.
    Refused(String),
    Retry(String),
}

async fn post(client: &reqwest::Client, m: &Message) -> Result<(), Failure> {
    let mut req = client
        .post(&m.url)
        .header("content-type", "application/json")
        .header("user-agent", "buildfarm")
        .header("x-buildfarm-delivery", &m.id)
        .body(m.body.clone());
    for (k, v) in &m.headers {
        req = req.header(*k, v);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Failure::Retry(format!("{e:#}")))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else if status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        Err(Failure::Refused(format!("HTTP {status}")))
    } else {
        Err(Failure::Retry(format!("HTTP {status}")))
    }
}

// ---- the notifier ----

/// Follows the farm's build events and fills each receiver's outbox.
pub struct Notifier {
    farm: Arc<Farm>,
    receivers: Vec<(Notification, Outbox)>,
    statuses: HashMap<String, (CommitStatus, Outbox)>,
    /// The last final state of each (repo, branch, builder) seen; filled from the
    /// store the first time a key is seen.
    last: Mutex<HashMap<(String, String, String), BuildState>>,
    tries_sent: Mutex<HashSet<String>>,
}

impl Notifier {
    /// Starts a delivery task per receiver and the event follower on the farm's task
    /// tracker; does nothing when nothing is configured.
    pub fn start(farm: &Arc<Farm>, backoff: Backoff) -> anyhow::Result<()> {
        let cfg = farm.config();
        let with_status: Vec<_> = cfg
            .repos
            .iter()
            .filter_map(|r| r.commit_status.clone().map(|c| (r.name.clone(), c)))
            .collect();
        if cfg.notifications.is_empty() && with_status.is_empty() {
            return Ok(());
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| anyhow::anyhow!("making the notification HTTP client: {e}"))?;
        let stop = farm.shutdown_token().clone();
        let tasks = farm.tasks();
        let mut receivers = vec![];
        for (i, n) in cfg.notifications.iter().enumerate() {
            let (outbox, task) = Outbox::start(
                format!("notifications[{i}]"),
                client.clone(),
                backoff,
                stop.clone(),
            );
            tasks.spawn(task);
            receivers.push((n.clone(), outbox));
        }
        let mut statuses = HashMap::new();
        for (repo, cs) in with_status {
            let (outbox, task) = Outbox::start(
                format!("commit_status of {repo}"),
                client.clone(),
                backoff,
                stop.clone(),
            );
            tasks.spawn(task);
            statuses.insert(repo, (cs, outbox));
        }
        let notifier = Arc::new(Notifier {
            farm: farm.clone(),
            receivers,
            statuses,
            last: Mutex::new(HashMap::new()),
            tries_sent: Mutex::new(HashSet::new()),
        });
        let mut events = farm.subscribe();
        tasks.spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = events.recv() => ev,
                };
                match ev {
                    Ok(FarmEvent::BuildChanged(b)) => notifier.on_build(&b).await,
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed = n, "notifications missed build events")
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(())
    }

    async fn on_build(&self, b: &Build) {
        let base = self.farm.base_url();
        match b.kind {
            BuildKind::PostSubmit => {
                if let Some((cs, outbox)) = self.statuses.get(&b.repo) {
                    outbox.push(status_message(cs, b));
                }
                if !is_final(b.state) || self.receivers.is_empty() {
                    return;
                }
                let branch = b.branch.clone().unwrap_or_default();
                let previous = self.previous_state(b, &branch).await;
                let event = build_event(b, previous, &base);
                for (n, outbox) in &self.receivers {
                    if matches(n, &b.repo, Some(&branch)) && worth_sending(n.on, previous, b.state)
                    {
                        outbox.push(message(n, &event));
                    }
                }
            }
            // Someone asked for it and is waiting on its URL: nothing to announce.
            BuildKind::Artifact => {}
            BuildKind::Try => {
                let Some(try_id) = &b.try_id else { return };
                if !is_final(b.state) || !self.receivers.iter().any(|(n, _)| n.try_runs) {
                    return;
                }
                if self.tries_sent.lock().expect("tries_sent").contains(try_id) {
                    return;
                }
                let builds = match self.farm.store().builds_for_try(try_id).await {
                    Ok(builds) => builds,
                    Err(e) => {
                        warn!(%try_id, error = %e, "reading a try run for its notification");
                        return;
                    }
                };
                let verdict = try_verdict(&builds);
                if verdict == Verdict::Pending
                    || !self
                        .tries_sent
                        .lock()
                        .expect("tries_sent")
                        .insert(try_id.clone())
                {
                    return;
                }
                let event = try_event(try_id, verdict, &builds, &base);
                for (n, outbox) in &self.receivers {
                    if n.try_runs && matches(n, &b.repo, None) {
                        outbox.push(message(n, &event));
                    }
                }
            }
        }
    }

    /// The builder's previous final result on the branch, and records this one.
    async fn previous_state(&self, b: &Build, branch: &str) -> Option<BuildState> {
        let key = (b.repo.clone(), branch.to_owned(), b.builder.clone());
        let known = self.last.lock().expect("last").get(&key).copied();
        let previous = match known {
            Some(s) => Some(s),
            None => self.previous_from_store(b, branch).await,
        };
        self.last.lock().expect("last").insert(key, b.state);
        previous
    }

    /// The newest final result of the builder on an older commit of the branch.
    async fn previous_from_store(&self, b: &Build, branch: &str) -> Option<BuildState> {
        let store = self.farm.store();
        let commits = store.list_commits(&b.repo, branch, 50, 0).await.ok()?;
        let older: Vec<String> = commits
            .iter()
            .map(|c| c.hash.clone())
            .skip_while(|h| *h != b.rev)
            .skip(1)
            .collect();
        let builds = store.builds_for_commits(&b.repo, &older).await.ok()?;
        older.iter().find_map(|rev| {
            builds
                .iter()
                .find(|x| &x.rev == rev && x.builder == b.builder && is_final(x.state))
                .map(|x| x.state)
        })
    }
}

fn message(n: &Notification, event: &Value) -> Message {
    let id = event["id"].as_str().unwrap_or_default().to_owned();
    let body = match n.kind {
        NotificationKind::Webhook => event.clone(),
        NotificationKind::Chat => chat_body(event),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut headers = vec![(
        "x-buildfarm-event",
        event["type"].as_str().unwrap_or_default().to_owned(),
    )];
    if let Some(secret) = &n.secret {
        headers.push((
            "x-buildfarm-signature-256",
            signature(secret.expose().as_bytes(), &body),
        ));
    }
    Message {
        id,
        url: n.url.clone(),
        body,
        headers,
    }
}

fn status_message(cs: &CommitStatus, b: &Build) -> Message {
    let body = commit_status_body(b, cs.target_url.as_deref());
    Message {
        id: format!("status:{}:{}", b.id, b.state.as_str()),
        url: format!(
            "{}/repos/{}/statuses/{}",
            cs.api_url.trim_end_matches('/'),
            cs.repo,
            b.rev
        ),
        body: serde_json::to_vec(&body).unwrap_or_default(),
        headers: vec![
            ("authorization", format!("Bearer {}", cs.token.expose())),
            ("accept", "application/vnd.github+json".to_owned()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BuildState::*;

    #[test]
    fn changes_mean_passing_to_not_passing_and_back() {
        let on = NotifyOn::Changes;
        assert!(!worth_sending(on, None, Ok), "a first pass is not news");
        assert!(worth_sending(on, None, Failed), "a first failure is");
        assert!(worth_sending(on, Some(Ok), Failed));
        assert!(worth_sending(on, Some(Failed), Ok));
        assert!(worth_sending(on, Some(Ok), InfraFailure));
        assert!(!worth_sending(on, Some(Failed), Failed));
        assert!(!worth_sending(on, Some(InfraFailure), Failed));
        assert!(!worth_sending(on, Some(Ok), Ok));
        assert!(!worth_sending(on, Some(Ok), Cancelled));
        assert!(!worth_sending(on, Some(Ok), Running), "not final");
        assert!(worth_sending(NotifyOn::Every, Some(Ok), Ok));
        assert!(worth_sending(NotifyOn::Every, None, Cancelled));
        assert!(!worth_sending(NotifyOn::Every, None, Queued));
    }

    fn build(state: BuildState) -> Build {
        Build {
            id: "b1".into(),
            kind: BuildKind::PostSubmit,
            repo: "go".into(),
            branch: Some("main".into()),
            rev: "0123456789abcdef0123".into(),
            builder: "linux-amd64".into(),
            try_id: None,
            state,
            attempts: 1,
            created_at: 0,
            started_at: None,
            finished_at: None,
            summary: Some("test failed".into()),
            go_rev: None,
        }
    }

    #[test]
    fn receivers_match_repos_and_branches() {
        let mut n = Notification {
            url: "http://x".into(),
            kind: NotificationKind::Webhook,
            secret: None,
            repos: vec![],
            branches: vec![],
            on: NotifyOn::Changes,
            try_runs: true,
        };
        assert!(matches(&n, "go", Some("main")));
        n.repos = vec!["tools".into()];
        assert!(!matches(&n, "go", Some("main")));
        assert!(matches(&n, "tools", None));
        n.branches = vec!["release".into()];
        assert!(!matches(&n, "tools", Some("main")));
        assert!(matches(&n, "tools", Some("release")));
    }

    #[test]
    fn bodies_say_what_happened() {
        let b = build(Failed);
        let ev = build_event(&b, Some(Ok), "https://farm");
        assert_eq!(ev["id"], "build:b1:failed");
        assert_eq!(ev["previous_state"], "ok");
        assert_eq!(ev["log_url"], "https://farm/log/b1");
        let chat = chat_body(&ev);
        assert_eq!(
            chat["text"],
            "linux-amd64 on go/main at 0123456789ab: failed (was ok) <https://farm/log/b1|log>"
        );
        let st = commit_status_body(&b, Some("https://farm/"));
        assert_eq!(st["state"], "failure");
        assert_eq!(st["context"], "buildfarm/linux-amd64");
        assert_eq!(st["target_url"], "https://farm/log/b1");
        assert_eq!(
            commit_status_body(&build(Running), None)["state"],
            "pending"
        );
        assert!(
            commit_status_body(&build(Ok), None)
                .get("target_url")
                .is_none()
        );
        let t = try_event("t1", Verdict::Ok, &[build(Ok)], "https://farm");
        assert_eq!(t["id"], "try:t1");
        assert_eq!(
            chat_body(&t)["text"],
            "try run t1 of go at 0123456789ab: ok"
        );
    }

    #[test]
    fn signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
