//! Snapshot tests of the rendered pages: a real SQLite store in a temp dir filled with
//! fixed commits, builds and try runs under a fixed clock, rendered through the same
//! view functions the server uses, with a fixed `now`. Ids are redacted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use askama::Template;
use buildfarm_scheduler::{QueueStat, WorkClass};
use buildfarm_store::{BuildKind, BuildState, Commit, NewBuild, NewTry, Store};
use coordinator::farm::ActiveBuild;
use coordinator::http::charts::Sample;
use coordinator::http::dashboard::{self, DashQuery};
use coordinator::http::logs::build_page;
use coordinator::http::status::{ConnectionsView, REVERSE_HOSTS_LISTED, StatusInput, status_view};
use coordinator::pool::PoolStatus;

/// 2024-01-01T00:00:00Z, the fixture's epoch.
const T0: i64 = 1_704_067_200_000;
const NOW: i64 = T0 + 3_600_000;
const BUILDERS: [&str; 3] = ["linux-amd64", "linux-amd64-race", "windows-amd64"];
const EVIL: &str = "<script>alert(1)</script> & \"quotes\"";

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    clock: Arc<AtomicI64>,
    revs: Vec<String>,
    try_id: String,
}

impl Fixture {
    fn tick(&self, ms: i64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    async fn finish(
        &self,
        repo: &str,
        rev: &str,
        builder: &str,
        state: BuildState,
        summary: &str,
        log: &str,
    ) -> String {
        let b = self
            .store
            .builds_for_commits(repo, &[rev.to_owned()])
            .await
            .expect("builds")
            .into_iter()
            .find(|b| b.builder == builder)
            .expect("build exists");
        let n = self
            .store
            .start_attempt(&b.id, "local/local#1")
            .await
            .expect("start");
        self.tick(65_000);
        if state == BuildState::InfraFailure {
            self.store
                .finish_attempt(&b.id, n, state, Some("buildlet lost"))
                .await
                .expect("finish attempt");
        }
        if state != BuildState::Running {
            self.store
                .finish_build(&b.id, state, Some(summary), log.as_bytes())
                .await
                .expect("finish");
        }
        b.id
    }
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(AtomicI64::new(T0));
    let c = clock.clone();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = buildfarm_store::open_with_clock(&url, Arc::new(move || c.load(Ordering::SeqCst)))
        .await
        .expect("open store");
    let mut revs = Vec::new();
    for (i, msg) in ["first commit\n\nbody", EVIL, "third commit: faster"]
        .iter()
        .enumerate()
    {
        let hash = format!("{:04x}{}", 0xabc0 + i, "0".repeat(36));
        store
            .upsert_commit(&Commit {
                repo: "t".into(),
                branch: "main".into(),
                hash: hash.clone(),
                parents: vec![],
                author: if i == 1 {
                    "Mallory <m@example.com>".into()
                } else {
                    "Gopher <g@example.com>".into()
                },
                message: (*msg).into(),
                commit_time: T0 + i as i64 * 600_000,
            })
            .await
            .expect("commit");
        for b in BUILDERS {
            store
                .enqueue_build(&NewBuild {
                    kind: BuildKind::PostSubmit,
                    repo: "t".into(),
                    branch: Some("main".into()),
                    rev: hash.clone(),
                    builder: b.into(),
                    try_id: None,
                })
                .await
                .expect("enqueue");
        }
        revs.push(hash);
    }
    let f = Fixture {
        _dir: dir,
        store,
        clock,
        revs,
        try_id: String::new(),
    };
    let r = f.revs.clone();
    f.finish(
        "t",
        &r[0],
        "linux-amd64",
        BuildState::Ok,
        "all steps passed",
        "ok\n",
    )
    .await;
    f.finish(
        "t",
        &r[0],
        "linux-amd64-race",
        BuildState::Failed,
        "step test failed",
        "--- FAIL\n",
    )
    .await;
    f.finish(
        "t",
        &r[0],
        "windows-amd64",
        BuildState::InfraFailure,
        "buildlet lost",
        "",
    )
    .await;
    f.finish(
        "t",
        &r[1],
        "linux-amd64",
        BuildState::Ok,
        "all steps passed",
        EVIL,
    )
    .await;
    f.finish("t", &r[1], "linux-amd64-race", BuildState::Running, "", "")
        .await;
    let queued = f
        .store
        .builds_for_commits("t", &[r[2].clone()])
        .await
        .expect("builds");
    let cancel = queued
        .iter()
        .find(|b| b.builder == "windows-amd64")
        .expect("build");
    f.store.cancel_build(&cancel.id).await.expect("cancel");
    let (t, builds) = f
        .store
        .create_try(&NewTry {
            repo: "t".into(),
            rev: r[2].clone(),
            patch: Some(b"diff".to_vec()),
            builders: vec!["linux-amd64".into(), "windows-amd64".into()],
            user: "dev <script>".into(),
        })
        .await
        .expect("try");
    for b in &builds {
        let n = f
            .store
            .start_attempt(&b.id, "local/local#2")
            .await
            .expect("start");
        let _ = n;
        f.tick(30_000);
        let state = if b.builder == "linux-amd64" {
            BuildState::Ok
        } else {
            BuildState::Failed
        };
        f.store
            .finish_build(&b.id, state, Some("done"), b"log")
            .await
            .expect("finish");
    }
    Fixture { try_id: t.id, ..f }
}

fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    // uuid v7 ids differ every run.
    s.add_filter(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[id]",
    );
    s
}

async fn dashboard_html(f: &Fixture) -> (String, dashboard::DashboardView) {
    let q = DashQuery {
        repo: Some("t".into()),
        branch: Some("main".into()),
        page: None,
    };
    let builders = |_: &str, _: &str| BUILDERS.iter().map(|s| s.to_string()).collect();
    let input = dashboard::gather(f.store.as_ref(), &q, builders)
        .await
        .expect("gather");
    let view = dashboard::dashboard_view(input, NOW);
    (view.render().expect("render"), view)
}

#[tokio::test]
async fn dashboard_grid_snapshot() {
    let f = fixture().await;
    let (html, view) = dashboard_html(&f).await;
    assert_eq!(view.rows.len(), 3);
    // Newest first.
    assert_eq!(view.rows[0].hash, f.revs[2]);
    let classes: Vec<Vec<&str>> = view
        .rows
        .iter()
        .map(|r| r.cells.iter().map(|c| c.class).collect())
        .collect();
    assert_eq!(
        classes,
        [
            vec!["queued", "queued", "cancelled"],
            vec!["ok", "running", "queued"],
            vec!["ok", "failed", "infra"],
        ]
    );
    assert_eq!(view.try_runs.len(), 1);
    assert_eq!(view.try_runs[0].verdict, "failed");
    settings().bind(|| insta::assert_snapshot!("dashboard", html));
}

#[tokio::test]
async fn user_text_is_escaped_everywhere() {
    let f = fixture().await;
    let (html, _) = dashboard_html(&f).await;
    assert!(
        !html.contains("<script>alert(1)"),
        "commit message not escaped:\n{html}"
    );
    assert!(
        html.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
            || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(!html.contains("dev <script>"), "try user not escaped");

    let builds = f
        .store
        .builds_for_commits("t", &[f.revs[1].clone()])
        .await
        .expect("builds");
    let b = builds
        .iter()
        .find(|b| b.builder == "linux-amd64")
        .expect("build");
    let log = f
        .store
        .get_log(&b.id)
        .await
        .expect("log")
        .expect("some log");
    let page = build_page(
        b,
        f.store.list_attempts(&b.id).await.expect("attempts"),
        &log,
        false,
        NOW,
    )
    .render()
    .expect("render");
    assert!(
        !page.contains("<script>alert(1)"),
        "log not escaped:\n{page}"
    );
    assert!(
        !page.contains("EventSource"),
        "a finished build's page does not stream"
    );
}

#[tokio::test]
async fn try_page_snapshot() {
    let f = fixture().await;
    let t = f.store.get_try(&f.try_id).await.expect("try");
    let builds = f.store.builds_for_try(&f.try_id).await.expect("builds");
    let view = dashboard::try_view(&t, &builds, NOW);
    assert_eq!(view.verdict, "failed");
    assert_eq!(view.builds.len(), 2);
    settings().bind(|| insta::assert_snapshot!("try", view.render().expect("render")));
}

#[tokio::test]
async fn build_page_snapshots() {
    let f = fixture().await;
    let builds = f
        .store
        .builds_for_commits("t", &[f.revs[0].clone()])
        .await
        .expect("builds");
    let b = builds
        .iter()
        .find(|b| b.builder == "windows-amd64")
        .expect("build");
    let attempts = f.store.list_attempts(&b.id).await.expect("attempts");
    assert_eq!(attempts.len(), 1);
    let html = build_page(b, attempts, b"", false, NOW)
        .render()
        .expect("render");
    settings().bind(|| insta::assert_snapshot!("build_finished", html));

    let running = f
        .store
        .builds_for_commits("t", &[f.revs[1].clone()])
        .await
        .expect("builds");
    let r = running
        .iter()
        .find(|b| b.state == BuildState::Running)
        .expect("running build");
    let attempts = f.store.list_attempts(&r.id).await.expect("attempts");
    let html = build_page(r, attempts, "line 1\nline 2\n".as_bytes(), true, NOW)
        .render()
        .expect("render");
    assert!(
        html.contains("events?from=14"),
        "the stream resumes after what the page shows"
    );
    settings().bind(|| insta::assert_snapshot!("build_running", html));
}

fn shard_view(
    shard: usize,
    state: &'static str,
    units: usize,
    done: usize,
    failed: usize,
    buildlet: &str,
) -> coordinator::logs::ShardView {
    coordinator::logs::ShardView {
        step: "test".into(),
        shard,
        state,
        units,
        done,
        failed,
        buildlet: buildlet.into(),
    }
}

fn status_input(recent: Vec<buildfarm_store::Build>) -> StatusInput {
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("addr");
    StatusInput {
        uptime_secs: 7_384,
        pools: vec![
            PoolStatus {
                kind: "reverse",
                host_type: "host-darwin-arm64".into(),
                capacity: 1,
                in_use: 1,
                idle: 0,
                starting: 0,
                expected: Some(2),
            },
            PoolStatus {
                kind: "local",
                host_type: "local".into(),
                capacity: 2,
                in_use: 1,
                idle: 0,
                starting: 1,
                expected: None,
            },
        ],
        queue: vec![
            QueueStat {
                host_type: "local".into(),
                class: WorkClass::PostSubmit,
                len: 4,
                oldest_wait: Duration::from_secs(754),
            },
            QueueStat {
                host_type: "local".into(),
                class: WorkClass::Try,
                len: 1,
                oldest_wait: Duration::from_secs(12),
            },
            QueueStat {
                host_type: "host-plan9".into(),
                class: WorkClass::Interactive,
                len: 1,
                oldest_wait: Duration::from_secs(3),
            },
        ],
        active: vec![ActiveBuild {
            build_id: "0190a0a0-0000-7000-8000-000000000001".into(),
            builder: "linux-amd64".into(),
            repo: "t".into(),
            rev: format!("abc1{}", "0".repeat(36)),
            kind: "post-submit",
            buildlet: Some("local/local#1".into()),
            attempt: 1,
            started_unix_ms: NOW - 95_000,
            cancel: Default::default(),
        }],
        shards: [(
            "0190a0a0-0000-7000-8000-000000000001".to_owned(),
            vec![
                shard_view(1, "passed", 3, 3, 0, "local/local#1"),
                shard_view(2, "running", 3, 1, 1, "local/local#2"),
                shard_view(3, "waiting", 2, 0, 0, ""),
            ],
        )]
        .into(),
        recent,
        reverse_hosts: vec![revdial::HostInfo {
            id: revdial::HostId(1),
            host_type: "host-darwin-arm64".into(),
            hostname: "mac-mini-<1>".into(),
            version: "buildlet 0.1.0".into(),
            peer,
            connected_since: UNIX_EPOCH + Duration::from_millis((NOW - 3_000_000) as u64),
            last_ping_rtt: Some(Duration::from_micros(1_500)),
        }],
        gomote_instances: 1,
        store_backend: "sqlite",
        store_ping: Ok(Duration::from_micros(800)),
        history: (0..20)
            .map(|i| Sample {
                at_ms: NOW - (20 - i) * 60_000,
                queued: (i % 7) as usize,
                in_use: (i % 3) as usize,
            })
            .collect(),
        unsandboxed: None,
        connections: Some(ConnectionsView {
            open: 7,
            handshaking: 1,
            max: 4000,
        }),
        poll_problems: vec![],
    }
}

#[tokio::test]
async fn status_page_snapshot() {
    let f = fixture().await;
    let recent = f.store.recent_builds(25).await.expect("recent");
    let view = status_view(status_input(recent), NOW);
    let messages: Vec<&str> = view.checks.iter().map(|c| c.message.as_str()).collect();
    // Errors first, then warnings, each in the order found.
    assert_eq!(
        messages,
        [
            "host type host-plan9 has no running pool; 1 waiting",
            "reverse host type host-darwin-arm64: 1 of 2 connected",
            "queue for local (postsubmit) waiting 12m34s (over 10m00s)",
        ]
    );
    let html = view.render().expect("render");
    assert!(!html.contains("mac-mini-<1>"), "hostname escaped");
    settings().bind(|| insta::assert_snapshot!("status", html));
    let json = serde_json::to_value(&view).expect("json");
    assert_eq!(json["checks"][0]["level"], "error");
    assert_eq!(json["queue"].as_array().map(Vec::len), Some(3));
    assert_eq!(json["local_sandboxed"], true);
    assert_eq!(json["connections"]["open"], 7);
    assert!(html.contains("7 of 4000 connection(s) open, 1 in handshake"));
    // A sharded step of an active build, summed on one line and in the JSON.
    assert!(
        html.contains(
            "test: 3 shards (1 running, 1 waiting, 1 passed), 4 of 8 units done, 1 failed"
        ),
        "{html}"
    );
    let step = &json["active"][0]["shards"][0];
    assert_eq!(step["units_done"], 4, "{json:#}");
    assert_eq!(step["buildlets"], serde_json::json!(["local/local#2"]));
}

#[test]
fn a_big_fleet_lists_its_newest_hosts_on_the_page_and_every_host_in_the_json() {
    let mut input = status_input(vec![]);
    let template = input.reverse_hosts[0].clone();
    let n = REVERSE_HOSTS_LISTED * 5 / 2;
    // Host i connected i seconds before NOW: fleet-00000 is the newest.
    input.reverse_hosts = (0..n)
        .map(|i| revdial::HostInfo {
            id: revdial::HostId(1000 - i as u64),
            hostname: format!("fleet-{i:05}"),
            connected_since: UNIX_EPOCH + Duration::from_millis((NOW - i as i64 * 1000) as u64),
            ..template.clone()
        })
        .collect();
    let view = status_view(input, NOW);
    let listed: Vec<&str> = view
        .listed_hosts
        .iter()
        .map(|h| h.hostname.as_str())
        .collect();
    let newest: Vec<String> = (0..REVERSE_HOSTS_LISTED)
        .map(|i| format!("fleet-{i:05}"))
        .collect();
    assert_eq!(listed, newest, "the newest connections, newest first");
    let html = view.render().expect("render");
    assert_eq!(html.matches("<td>fleet-").count(), REVERSE_HOSTS_LISTED);
    assert!(
        html.contains(&format!(
            "{n} connected; the {REVERSE_HOSTS_LISTED} most recently connected are listed"
        )),
        "no note on the hosts left out"
    );
    assert!(
        !html.contains(&format!("fleet-{:05}", n - 1)),
        "the oldest is left out"
    );
    let json = serde_json::to_value(&view).expect("json");
    assert_eq!(json["reverse_hosts"].as_array().map(Vec::len), Some(n));
    assert!(json.get("listed_hosts").is_none());
}

#[tokio::test]
async fn unsandboxed_local_buildlets_are_a_warning_and_sandboxed_ones_are_not() {
    let sandboxed = status_view(status_input(vec![]), NOW);
    assert!(
        sandboxed
            .checks
            .iter()
            .all(|c| !c.message.contains("sandbox")),
        "{:?}",
        sandboxed.checks
    );
    assert_eq!(sandboxed.local_sandboxed, Some(true));

    let mut input = status_input(vec![]);
    input.unsandboxed = Some("no `bwrap` found on PATH".into());
    let view = status_view(input, NOW);
    let warning = "local buildlets run without a sandbox (no `bwrap` found on PATH): builds can \
                   read the coordinator's secrets (install bubblewrap and set [sandbox] mode = \"auto\")";
    let check = view
        .checks
        .iter()
        .find(|c| c.message == warning)
        .unwrap_or_else(|| panic!("no sandbox warning in {:?}", view.checks));
    assert_eq!(check.class(), "warn");
    assert_eq!(view.local_sandboxed, Some(false));
    let html = view.render().expect("render");
    assert!(
        html.contains("local buildlets run without a sandbox (no `bwrap` found on PATH)"),
        "{html}"
    );
    let json = serde_json::to_value(&view).expect("json");
    assert!(
        json["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .any(|c| c["level"] == "warn" && c["message"] == warning),
        "{json}"
    );
    assert_eq!(json["local_sandboxed"], false);

    // Alone, it replaces "all checks pass".
    let mut input = status_input(vec![]);
    input.pools.retain(|p| p.kind == "local");
    input.queue.clear();
    input.unsandboxed = Some("[sandbox] mode = \"none\"".into());
    let view = status_view(input, NOW);
    assert_eq!(view.checks.len(), 1, "{:?}", view.checks);
    assert!(view.checks[0].message.contains("mode = \"none\""));
}

#[tokio::test]
async fn store_failure_is_the_first_warning() {
    let mut input = status_input(vec![]);
    input.store_ping = Err("connection refused".into());
    input.pools.clear();
    input.queue.clear();
    let view = status_view(input, NOW);
    assert_eq!(
        view.checks[0].message,
        "store unreachable: connection refused"
    );
    let html = view.render().expect("render");
    let first = html.find("store unreachable").expect("shown");
    assert!(
        first < html.find("<h2>Pools").expect("pools"),
        "warnings come first"
    );
}

#[tokio::test]
async fn not_found_is_a_404_page_or_json_with_the_path_escaped() {
    use coordinator::http::not_found::{not_found, wants_json};
    let body = |resp: axum::response::Response| async move {
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, ct, String::from_utf8_lossy(&bytes).into_owned())
    };
    let (status, ct, html) = body(not_found(EVIL, "there is no page at this address", false)).await;
    assert_eq!(status, 404);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(!html.contains("<script>"), "unescaped path: {html}");
    settings().bind(|| insta::assert_snapshot!("not_found", html));

    let (status, ct, json) = body(not_found("/api/x", "no build x", true)).await;
    assert_eq!(status, 404);
    assert!(ct.starts_with("application/json"), "{ct}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"error": "not found", "path": "/api/x", "message": "no build x"})
    );
    assert!(wants_json(&"/api/builds/x".parse().expect("uri")));
    assert!(wants_json(&"/build/x?format=json".parse().expect("uri")));
    assert!(!wants_json(&"/build/x".parse().expect("uri")));
}
