//! The pages of a running farm in a real browser: headless Chromium loads the status
//! page and the dashboard (screenshots kept under `target/web-screenshots/` for a person
//! to look at), watches a running build's log grow in its page without a reload (through
//! the DevTools protocol on a pipe), `promtool check metrics` accepts `/metrics`, and
//! the connection counters there and on the status page follow real connections.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const SLOW_STEP: &str = "for i in $(seq 1 25); do echo line $i; sleep 1; done";

fn config(data_dir: &Path, repo: &Path) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 3 }}

[[builders]]
name = "linux-amd64"
host_type = "local"
steps = [{{ name = "check", command = ["sh", "-c", "echo all good"] }}]

[[builders]]
name = "linux-amd64-failing"
host_type = "local"
steps = [{{ name = "test", command = ["sh", "-c", "echo '<b>not bold</b>'; exit 1"] }}]

[[builders]]
name = "linux-amd64-slow"
host_type = "local"
steps = [{{ name = "count", command = ["sh", "-c", "{SLOW_STEP}"] }}]

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]
"#,
        data = data_dir.display(),
        repo = repo.display(),
    )
}

async fn start() -> (tempfile::TempDir, TestFarm, String) {
    start_with("").await
}

/// A farm whose config ends with `extra` (TOML tables).
async fn start_with(extra: &str) -> (tempfile::TempDir, TestFarm, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let rev = make_go_repo(&repo);
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &repo) + extra).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    (tmp, farm, rev)
}

fn chromium(profile: &Path) -> Command {
    let mut c = Command::new(CHROMIUM);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdin(Stdio::null());
    c
}

fn screenshot_dir() -> PathBuf {
    let dir = bin_dir()
        .parent()
        .expect("target dir")
        .join("web-screenshots");
    std::fs::create_dir_all(&dir).expect("mkdir screenshots");
    dir
}

/// Loads `url` in headless Chromium and saves a 1280x1600 screenshot to `out`.
async fn screenshot(url: String, out: PathBuf, profile: PathBuf) {
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&out);
        let status = chromium(&profile)
            .arg(format!("--screenshot={}", out.display()))
            .arg("--window-size=1280,1600")
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run chromium");
        assert!(status.success(), "chromium screenshot of {url}: {status}");
    })
    .await
    .expect("join");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_and_dashboard_render_in_chromium() {
    let (tmp, farm, rev) = start().await;
    let builds = farm.wait_final_builds("t", &rev, 2).await;
    assert!(builds.iter().any(|b| b["state"] == "failed"), "{builds:#?}");

    // Every page has a JSON form.
    let status = farm.get_json("/?format=json").await;
    assert_eq!(status["pools"][0]["host_type"], "local");
    assert!(status["checks"].as_array().is_some_and(|c| !c.is_empty()));
    let api_status = farm.get_json("/api/status").await;
    assert_eq!(api_status["store"]["backend"], "sqlite");
    let dash = farm.get_json("/dashboard?format=json").await;
    assert_eq!(dash["repo"], "t");
    assert_eq!(dash["rows"][0]["hash"], rev.as_str());
    let failing = builds
        .iter()
        .find(|b| b["state"] == "failed")
        .expect("failing build");
    let id = failing["id"].as_str().expect("id");
    let detail = farm.get_json(&format!("/build/{id}?format=json")).await;
    assert_eq!(detail["attempts"].as_array().map(Vec::len), Some(1));
    let page = farm.get_text(&format!("/build/{id}")).await;
    assert!(
        page.contains("&lt;b&gt;not bold&lt;/b&gt;") || page.contains("&#60;b&#62;not bold"),
        "{page}"
    );

    let dir = screenshot_dir();
    for (name, path) in [("status", "/"), ("dashboard", "/dashboard")] {
        let out = dir.join(format!("{name}.png"));
        screenshot(
            format!("http://{}{path}", farm.addr),
            out.clone(),
            tmp.path().join(format!("profile-{name}")),
        )
        .await;
        let len = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        // A blank 1280x1600 PNG is a few KB; a page with tables and text is far more.
        assert!(len > 20_000, "{} is only {len} bytes", out.display());
        let mut head = [0u8; 8];
        std::fs::File::open(&out)
            .expect("open png")
            .read_exact(&mut head)
            .expect("read png");
        assert_eq!(&head, b"\x89PNG\r\n\x1a\n");
    }
    farm.kill().await;
}

/// A minimal DevTools-protocol client over `--remote-debugging-pipe` (fd 3 in, fd 4 out,
/// messages end with NUL), enough to evaluate JavaScript in a page.
struct Devtools {
    child: std::process::Child,
    to: std::fs::File,
    from: mpsc::Receiver<Value>,
    next_id: u64,
}

impl Devtools {
    fn launch(profile: &Path, url: &str) -> Devtools {
        let (cmd_r, cmd_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
        let (out_r, out_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
        let (r3, w4) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut c = chromium(profile);
        c.arg("--remote-debugging-pipe")
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                if nix::libc::dup2(r3, 3) < 0 || nix::libc::dup2(w4, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().expect("spawn chromium");
        drop((cmd_r, out_w));
        let (tx, from) = mpsc::channel();
        let reader = std::fs::File::from(out_r);
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            loop {
                let mut msg = Vec::new();
                match r.read_until(0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        msg.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&msg)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Devtools {
            child,
            to: std::fs::File::from(cmd_w),
            from,
            next_id: 0,
        }
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer to {method}: {e}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }
}

impl Drop for Devtools {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_lines(text: &Value) -> usize {
    text.as_str()
        .unwrap_or("")
        .lines()
        .filter(|l| l.starts_with("line "))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn running_build_log_grows_in_the_page_without_reload() {
    let (tmp, farm, rev) = start().await;
    let slow = farm.wait_running("t", &rev, "linux-amd64-slow").await;
    let id = slow["id"].as_str().expect("id").to_owned();
    let url = format!("http://{}/build/{id}", farm.addr);
    let profile = tmp.path().join("profile-live");
    let (first, later, same_page) = tokio::task::spawn_blocking(move || {
        let mut dt = Devtools::launch(&profile, &url);
        let deadline = Instant::now() + WAIT;
        let session = loop {
            let targets = dt.call(None, "Target.getTargets", json!({}));
            let page = targets["targetInfos"]
                .as_array()
                .and_then(|t| {
                    t.iter().find(|t| {
                        t["type"] == "page"
                            && t["url"].as_str().is_some_and(|u| u.contains("/build/"))
                    })
                })
                .cloned();
            if let Some(p) = page {
                let r = dt.call(
                    None,
                    "Target.attachToTarget",
                    json!({"targetId": p["targetId"], "flatten": true}),
                );
                break r["sessionId"].as_str().expect("session").to_owned();
            }
            assert!(Instant::now() < deadline, "no page target: {targets}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = "(document.getElementById('log') || {}).textContent || ''";
        // Wait for the first lines, then mark the document so a reload would show.
        let first = loop {
            let n = log_lines(&dt.eval(&session, text));
            if n >= 1 {
                break n;
            }
            assert!(Instant::now() < deadline, "the log never showed a line");
            std::thread::sleep(Duration::from_millis(200));
        };
        dt.eval(&session, "window.__marker = 42; 1");
        let later = loop {
            let n = log_lines(&dt.eval(&session, text));
            if n >= first + 2 {
                break n;
            }
            assert!(
                Instant::now() < deadline,
                "the log did not grow past {first} lines"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let same_page = dt.eval(&session, "window.__marker === 42");
        (first, later, same_page)
    })
    .await
    .expect("join");
    assert!(later > first, "lines: {first} then {later}");
    assert_eq!(same_page, json!(true), "the page was reloaded");

    // When the build ends, the stored log has every line.
    let done = farm.wait_final_builds("t", &rev, 3).await;
    let slow = done
        .iter()
        .find(|b| b["builder"] == "linux-amd64-slow")
        .expect("slow build");
    assert_eq!(slow["state"], "ok", "{slow}");
    let log = farm.get_text(&format!("/log/{id}")).await;
    assert!(log.contains("line 25"), "{log}");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool() {
    let (tmp, farm, rev) = start().await;
    farm.wait_final_builds("t", &rev, 2).await;
    let text = eventually_async(&farm).await;
    for name in [
        // Families with labels appear once they have a value (the queue may be empty).
        "buildfarm_buildlets{",
        "buildfarm_pool_capacity{host_type=\"local\",pool=\"local\"} 3",
        "buildfarm_revdial_handshakes_accepted_total 0",
        "buildfarm_revdial_handshakes_refused_total{reason=\"bad_credential\"} 0",
        "buildfarm_store_up 1",
        "buildfarm_store_ping_seconds",
        "buildfarm_connections_open ",
        "buildfarm_connections_handshaking ",
        "buildfarm_connections_accepted_total ",
        "buildfarm_connections_evicted_total 0",
        "buildfarm_connections_refused_total 0",
        "buildfarm_accept_errors_total 0",
        "buildfarm_build_duration_seconds_bucket{builder=\"linux-amd64\",result=\"ok\"",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
    assert!(!text.contains(&rev), "no commit in labels");
    let file = tmp.path().join("metrics.txt");
    std::fs::write(&file, &text).expect("write metrics");
    let out = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    farm.kill().await;
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse::<f64>().ok())?
        })
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// Polls `/metrics` until `ok` holds of it.
async fn metrics_until(farm: &TestFarm, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = farm.get_text("/metrics").await;
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_counters_follow_real_connections() {
    // Idle connections must outlive the test's waits on a loaded machine.
    let (_tmp, farm, _rev) = start_with("\n[connections]\nhandshake_timeout = \"10m\"\n").await;
    let before = farm.get_text("/metrics").await;
    let accepted_before = sample(&before, "buildfarm_connections_accepted_total");
    // Connected TCP that never sends a byte stays in its handshake (sniffing the first
    // byte) until the handshake timeout.
    const IDLE: usize = 5;
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(
            tokio::net::TcpStream::connect(&farm.addr)
                .await
                .expect("connect"),
        );
    }
    let during = metrics_until(&farm, "counted the idle connections", |t| {
        sample(t, "buildfarm_connections_handshaking") >= IDLE as f64
            && sample(t, "buildfarm_connections_open") >= IDLE as f64 + 1.0
            && sample(t, "buildfarm_connections_accepted_total") >= accepted_before + IDLE as f64
    })
    .await;
    let open_during = sample(&during, "buildfarm_connections_open");
    let status: Value = serde_json::from_str(&farm.get_text("/?format=json").await).expect("json");
    let open_on_page = status["connections"]["open"]
        .as_u64()
        .expect("connections.open");
    // The idle ones and the page request itself.
    assert!(open_on_page > IDLE as u64, "{status}");
    assert!(status["connections"]["max"].as_u64().expect("max") > open_on_page);
    let html = farm.get_text("/").await;
    assert!(html.contains("connection(s) open"), "{html}");
    // bwrap is installed here: local buildlets are sandboxed, and no check says otherwise.
    assert_eq!(status["local_sandboxed"], true, "{status}");
    assert!(
        !status["checks"].to_string().contains("sandbox"),
        "{status}"
    );

    drop(idle);
    let after = metrics_until(&farm, "saw the idle connections close", |t| {
        sample(t, "buildfarm_connections_handshaking") == 0.0
            && sample(t, "buildfarm_connections_open") < open_during
    })
    .await;
    // Counters never go back.
    assert!(
        sample(&after, "buildfarm_connections_accepted_total")
            >= sample(&during, "buildfarm_connections_accepted_total")
    );
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unsandboxed_local_buildlets_warn_on_the_status_page() {
    let (_tmp, farm, _rev) = start_with("\n[sandbox]\nmode = \"none\"\n").await;
    let status: Value = serde_json::from_str(&farm.get_text("/?format=json").await).expect("json");
    assert_eq!(status["local_sandboxed"], false, "{status}");
    let warned = status["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .any(|c| {
            c["level"] == "warn"
                && c["message"].as_str().is_some_and(|m| {
                    m.starts_with(
                        "local buildlets run without a sandbox ([sandbox] mode = \"none\")",
                    )
                })
        });
    assert!(warned, "{status}");
    let html = farm.get_text("/").await;
    assert!(
        html.contains("<li class=\"warn\">local buildlets run without a sandbox"),
        "{html}"
    );
    farm.kill().await;
}

/// `/metrics` once the finished builds are counted (the counter follows build events).
async fn eventually_async(farm: &TestFarm) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = farm.get_text("/metrics").await;
        if text.contains("buildfarm_builds_total{builder=\"linux-amd64\",result=\"ok\"} 1")
            && text.contains("result=\"failed\"} 1")
        {
            return text;
        }
        assert!(Instant::now() < deadline, "builds never counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
