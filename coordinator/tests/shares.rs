//! Fair shares and right answers, end to end: a real coordinator with real local
//! buildlets, the real `gomote` CLI, a real git repository and Go builds.
//!
//! - one user cannot hold the farm: the per-user gomote instance limit answers
//!   `ResourceExhausted` naming the limit, and interactive work never holds more than its
//!   share of a host type, so a try run still gets a buildlet;
//! - unknown pages and builds are 404s while gRPC keeps answering on the same port;
//!   `gomote rm` of the workdir root needs `--all`; a patch that does not apply is refused
//!   at submit with no server path and nothing stored; an oversized token is refused by
//!   `gomote` before sending.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn host_builder() -> String {
    match std::env::consts::ARCH {
        "aarch64" => "linux-arm64".into(),
        _ => "linux-amd64".into(),
    }
}

/// Two local buildlets, one builder that builds the Go module, default `[limits]`
/// (2 instances per user; interactive work may hold half: 1 of the 2 buildlets).
fn config(data_dir: &Path, repo: &Path) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 2 }}
env = {{ GOCACHE = "{gocache}", GOFLAGS = "-mod=mod" }}

[[builders]]
name = "{builder}"
host_type = "local"
steps = [{{ name = "build", command = ["go", "build", "./..."] }}]

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]
"#,
        data = data_dir.display(),
        gocache = data_dir.join("gocache").display(),
        repo = repo.display(),
        builder = host_builder(),
    )
}

async fn start() -> (tempfile::TempDir, TestFarm, std::path::PathBuf, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let rev = make_go_repo(&repo);
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &repo)).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    (tmp, farm, repo, rev)
}

/// Runs gomote as `token`'s user and waits for it.
fn gomote_as(farm: &TestFarm, token: &str, args: &[&str]) -> Output {
    farm.gomote()
        .env("BUILDFARM_TOKEN", token)
        .args(args)
        .output()
        .expect("run gomote")
}

/// Like [`gomote_as`], but fails the test instead of hanging if gomote does not finish
/// within [`WAIT`].
async fn gomote_within(farm: &TestFarm, token: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(gomote_bin())
        .env("BUILDFARM_GOMOTE_CONFIG", farm.data_dir.join("gomote.json"))
        .env("BUILDFARM_TOKEN", token)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gomote");
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("gomote {args:?} did not finish within {WAIT:?}"))
        .expect("gomote output")
}

/// Waits until the coordinator's queue holds `n` interactive (gomote) requests.
async fn wait_queued_interactive(farm: &TestFarm, n: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = farm.get_json("/api/status").await;
        let queued: u64 = status["queue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|q| q["class"] == "interactive")
            .filter_map(|q| q["len"].as_u64())
            .sum();
        if queued == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} queued gomote requests: {:#}",
            status["queue"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `gomote create` left running in the background, with its first progress line read.
struct PendingCreate {
    child: tokio::process::Child,
    stderr: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    /// The first progress line.
    first: String,
}

impl PendingCreate {
    /// Starts `gomote create` and returns once it reports waiting in the queue.
    async fn start(farm: &TestFarm, token: &str) -> PendingCreate {
        let mut child = tokio::process::Command::new(gomote_bin())
            .env("BUILDFARM_GOMOTE_CONFIG", farm.data_dir.join("gomote.json"))
            .env("BUILDFARM_TOKEN", token)
            .args(["create", &host_builder()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gomote create");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let first = tokio::time::timeout(WAIT, stderr.next_line())
            .await
            .expect("gomote create said nothing")
            .expect("read stderr")
            .unwrap_or_default();
        assert!(
            first.contains("waiting for a"),
            "expected the create to wait in the queue, got {first:?}"
        );
        PendingCreate {
            child,
            stderr,
            first,
        }
    }

    fn still_waiting(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the instance name it prints once granted.
    async fn granted(mut self) -> String {
        // Drain progress lines so gomote never blocks on a full pipe.
        let drain =
            tokio::spawn(async move { while let Ok(Some(_)) = self.stderr.next_line().await {} });
        let mut stdout = self.child.stdout.take().expect("stdout");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("create was never granted")
            .expect("wait");
        let mut name = String::new();
        stdout.read_to_string(&mut name).await.expect("read stdout");
        drain.abort();
        assert!(status.success(), "create failed: {status}");
        name.trim().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_user_cannot_hold_the_farm_and_try_runs_still_get_a_buildlet() {
    let (_tmp, farm, _repo, rev) = start().await;
    let builder = host_builder();
    // Let the post-submit build of the commit finish so the two buildlets are free.
    let builds = farm.wait_final_builds("t", &rev, 1).await;
    assert_eq!(builds[0]["state"], "ok", "{builds:#?}");
    let alice = farm.issue_token("alice");
    let bob = farm.issue_token("bob");

    // Alice borrows one buildlet: interactive work now holds its share (1 of 2).
    let out = gomote_as(&farm, &alice, &["create", &builder]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout).trim().to_owned();

    // Bob's create waits in the queue instead of taking the last buildlet...
    let mut bobs = PendingCreate::start(&farm, &bob).await;
    wait_queued_interactive(&farm, 1).await;
    assert!(
        bobs.first.contains("gomote instances hold 1 of host type local's 2 buildlets, its interactive share (50%, limits.interactive_share_percent)"),
        "{}",
        bobs.first
    );

    // ...which a try run gets, and passes on.
    let out = gomote_within(
        &farm,
        &alice,
        &["try", "--json", "t", &rev, "--builders", &builder],
    )
    .await;
    assert!(
        out.status.success(),
        "try run failed while gomote held the share: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("json");
    assert_eq!(v["verdict"], "ok", "{v:#}");
    assert!(bobs.still_waiting(), "bob's create went past the share");

    // Alice may have two instances, counting one still waiting; a third is refused at
    // once with the limit named.
    let mut alices_second = PendingCreate::start(&farm, &alice).await;
    wait_queued_interactive(&farm, 2).await;
    let out = gomote_as(&farm, &alice, &["create", &builder]);
    assert!(!out.status.success(), "third create accepted");
    let err = text(&out.stderr);
    assert!(err.contains("ResourceExhausted"), "{err}");
    assert!(
        err.contains(
            "user alice has 2 gomote instances (1 live, 1 being created); the limit is 2 (limits.gomote_instances_per_user)"
        ),
        "{err}"
    );
    // The limit is per user: bob is not refused (his create still waits).
    assert!(bobs.still_waiting());

    // Giving the buildlet back lets the first waiter (bob) in.
    let out = gomote_as(&farm, &alice, &["destroy", &first]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bobs_instance = bobs.granted().await;
    assert!(bobs_instance.starts_with("bob-"), "{bobs_instance}");
    assert!(alices_second.still_waiting(), "share is held by bob now");
    wait_queued_interactive(&farm, 1).await;

    // An abandoned create gives its place in alice's allowance back.
    alices_second.child.start_kill().expect("kill");
    let _ = alices_second.child.wait().await;
    let deadline = std::time::Instant::now() + WAIT;
    let mut again = loop {
        let mut c = tokio::process::Command::new(gomote_bin())
            .env("BUILDFARM_GOMOTE_CONFIG", farm.data_dir.join("gomote.json"))
            .env("BUILDFARM_TOKEN", &alice)
            .args(["create", &builder])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let mut lines = BufReader::new(c.stderr.take().expect("stderr")).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("no output")
            .expect("read")
            .unwrap_or_default();
        if line.contains("waiting for a") {
            break c;
        }
        // The server notices the abandoned stream shortly after the kill.
        assert!(
            line.contains("ResourceExhausted") && std::time::Instant::now() < deadline,
            "unexpected {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = again.start_kill();
    farm.kill().await;
}

/// A raw HTTP/1.1 GET of `path` exactly as written (no client-side `..` folding);
/// returns the status code and the body.
async fn raw_get(addr: &str, path: &str) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut resp))
        .await
        .expect("response timed out")
        .expect("read");
    let resp = text(&resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    (code, resp)
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_requests_get_right_answers() {
    let (tmp, farm, repo, rev) = start().await;
    let builder = host_builder();
    let alice = farm.issue_token("alice");
    let get = |path: &str| {
        let url = format!("http://{}{path}", farm.addr);
        let http = farm.http.clone();
        async move {
            let r = http.get(&url).send().await.expect("GET");
            let code = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (code, ct, r.text().await.expect("body"))
        }
    };

    // Unknown pages: an HTML 404, JSON for scripts; known pages still work.
    let (code, ct, body) = get("/no/such/page").await;
    assert_eq!(code, 404, "{body}");
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(body.contains("404: not found"), "{body}");
    for path in ["/no/such/page?format=json", "/api/nope"] {
        let (code, ct, body) = get(path).await;
        assert_eq!(code, 404, "{path}: {body}");
        assert!(ct.starts_with("application/json"), "{path}: {ct}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"], "not found", "{v}");
    }
    assert_eq!(get("/").await.0, 200);
    assert_eq!(get("/healthz").await.0, 200);
    let (code, resp) = raw_get(&farm.addr, "/log/../../etc/passwd").await;
    assert_eq!(code, 404, "{resp}");
    assert!(!resp.contains("root:"), "{resp}");

    // Unknown builds: 404 everywhere, including the live-log event stream.
    let missing = "0190aaaa-0000-7000-8000-000000000000";
    for path in [
        format!("/log/{missing}/events"),
        format!("/log/{missing}"),
        format!("/build/{missing}"),
        format!("/api/builds/{missing}"),
        format!("/try/{missing}"),
    ] {
        let (code, _, body) = get(&path).await;
        assert_eq!(code, 404, "{path}: {body}");
        assert!(!body.contains("finished"), "{path}: {body}");
    }
    let (code, ct, _) = get(&format!("/api/builds/{missing}")).await;
    assert_eq!((code, ct.starts_with("application/json")), (404, true));

    // A known build's events still stream (ending, since it is over).
    let builds = farm.wait_final_builds("t", &rev, 1).await;
    let id = builds[0]["id"].as_str().expect("id").to_owned();
    let (code, ct, body) = get(&format!("/log/{id}/events")).await;
    assert_eq!(code, 200, "{body}");
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert!(body.contains("event: end"), "{body}");

    // gRPC still answers on the same port (gomote is a gRPC client).
    let out = gomote_as(&farm, &alice, &["create", &builder]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let inst = text(&out.stdout).trim().to_owned();

    // rm of the workdir root needs --all; a refused rm changes nothing.
    let out = gomote_as(
        &farm,
        &alice,
        &[
            "run",
            &inst,
            "--",
            "sh",
            "-c",
            "mkdir -p d && echo x > d/f && echo y > top",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for root in ["", ".", "./", "d/.."] {
        let out = gomote_as(&farm, &alice, &["rm", &inst, root]);
        assert!(!out.status.success(), "rm {root:?} accepted");
        assert!(
            text(&out.stderr).contains("InvalidArgument"),
            "{root:?}: {}",
            text(&out.stderr)
        );
    }
    let out = gomote_as(&farm, &alice, &["ls", &inst, "-R"]);
    let ls = text(&out.stdout);
    assert!(ls.contains("d/f") && ls.contains("top"), "{ls}");
    let out = gomote_as(&farm, &alice, &["rm", &inst, "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = gomote_as(&farm, &alice, &["ls", &inst]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "", "workdir not emptied");
    let out = gomote_as(&farm, &alice, &["rm", &inst]);
    assert!(!out.status.success(), "rm without paths or --all accepted");

    // Patches that do not apply are refused at submit, naming git's reason and no
    // server path, and nothing is stored.
    let garbage = tmp.path().join("garbage.patch");
    std::fs::write(&garbage, "this is not a patch\n").expect("write");
    std::fs::write(
        repo.join("hello.go"),
        "package t\n\n// Hello greets.\nfunc Hello() string { return \"bye\" }\n",
    )
    .expect("write");
    let good = git(&repo, &["diff", "--binary"]);
    git(&repo, &["checkout", "--", "."]);
    let stale = tmp.path().join("stale.patch");
    std::fs::write(&stale, format!("{}\n", good.replace("hello.go", "gone.go"))).expect("write");
    let conflicting = tmp.path().join("conflicting.patch");
    std::fs::write(
        &conflicting,
        // The line the patch removes is not what the file has.
        format!("{}\n", good.replace("\"hello\"", "\"hi\"")),
    )
    .expect("write");
    let server_paths = [
        tmp.path().display().to_string(),
        farm.data_dir.display().to_string(),
    ];
    for (patch, reason) in [
        (&garbage, "No valid patches"),
        (&stale, "gone.go: does not exist in that revision"),
        (&conflicting, "hello.go"),
    ] {
        let out = gomote_as(
            &farm,
            &alice,
            &[
                "try",
                "t",
                &rev,
                "--builders",
                &builder,
                "--patch",
                patch.to_str().expect("utf8"),
            ],
        );
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{}: accepted", patch.display());
        assert!(err.contains("InvalidArgument"), "{err}");
        assert!(err.contains("does not apply"), "{err}");
        assert!(err.contains(reason), "{}: {err}", patch.display());
        for p in &server_paths {
            assert!(!err.contains(p.as_str()), "server path {p} in {err}");
        }
    }
    let store = buildfarm_store::open(&format!(
        "sqlite://{}",
        farm.data_dir.join("buildfarm.db").display()
    ))
    .await
    .expect("open store");
    let runs = store.list_try_runs(100).await.expect("list try runs");
    assert!(runs.is_empty(), "refused patches were stored: {runs:#?}");

    // A 100 KB token is refused by gomote before sending, naming the limit.
    let huge = "a".repeat(100 * 1024);
    let out = gomote_as(&farm, &huge, &["list"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("102400 bytes; the limit is 1024 bytes"),
        "{err}"
    );
    assert!(!err.contains("protocol error"), "{err}");
    farm.kill().await;
}
