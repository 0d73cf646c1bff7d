//! Reverse buildlets end to end: a real coordinator with a `kind = "reverse"` host
//! type, and real `buildlet --reverse` processes dialling its one port over TLS with the
//! builder key that `coordinator builder-key` prints. Builds run on them; one killed
//! mid-build costs an infra-failure attempt, and the retry runs once it is back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use common::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::process::{Child, Command};

const HOST_TYPE: &str = "host-rev-linux";
const BUILDER: &str = "linux-amd64-rev";

/// A config whose only host type is reverse, with one builder running `script`.
fn config(data_dir: &Path, repo: &Path, script: &str) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"
max_attempts = 3

[[host_types]]
name = "{HOST_TYPE}"
pool = {{ kind = "reverse", expected = 1 }}

[[builders]]
name = "{BUILDER}"
host_type = "{HOST_TYPE}"
steps = [{{ name = "check", command = ["sh", "-c", {script:?}] }}]

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]
"#,
        data = data_dir.display(),
        repo = repo.display(),
    )
}

struct Setup {
    tmp: tempfile::TempDir,
    data: PathBuf,
    cfg: PathBuf,
    rev: String,
    key_file: PathBuf,
}

/// Writes the repo and config, and gets the builder key from the coordinator's CLI
/// (which creates the master key in the data dir the farm will then use).
async fn setup(script: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let rev = make_go_repo(&repo);
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &repo, script)).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&cfg)
        .args(["builder-key", HOST_TYPE])
        .output()
        .await
        .expect("coordinator builder-key");
    assert!(
        out.status.success(),
        "builder-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(key.len(), 64, "a hex builder key: {key:?}");
    let key_file = tmp.path().join("builder.key");
    std::fs::write(&key_file, format!("{key}\n")).expect("write key");
    Setup {
        tmp,
        data,
        cfg,
        rev,
        key_file,
    }
}

/// Starts `buildlet --reverse` at the farm as `hostname`.
fn start_reverse(s: &Setup, farm: &TestFarm, hostname: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.tmp.path().join(format!("{hostname}.log")))
        .expect("log");
    Command::new(buildlet_bin())
        .arg("--reverse")
        .arg(format!("https://{}", farm.addr))
        .arg("--ca-file")
        .arg(s.data.join("tls").join("ca.crt"))
        .args(["--host-type", HOST_TYPE, "--hostname", hostname])
        .arg("--builder-key-file")
        .arg(&s.key_file)
        .arg("--workdir")
        .arg(s.tmp.path().join(format!("work-{hostname}")))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn reverse buildlet")
}

fn reverse_log(s: &Setup, hostname: &str) -> String {
    std::fs::read_to_string(s.tmp.path().join(format!("{hostname}.log"))).unwrap_or_default()
}

/// True if some object in `v` has `"hostname": hostname`: the status JSON lists each
/// connected reverse host that way, wherever the page puts the list.
fn lists_host(v: &Value, hostname: &str) -> bool {
    match v {
        Value::Object(m) => {
            m.get("hostname").and_then(Value::as_str) == Some(hostname)
                || m.values().any(|x| lists_host(x, hostname))
        }
        Value::Array(a) => a.iter().any(|x| lists_host(x, hostname)),
        _ => false,
    }
}

/// Polls `/api/status` until it lists `hostname` as connected (or, with `connected`
/// false, no longer does).
async fn wait_status(farm: &TestFarm, hostname: &str, connected: bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = farm.get_json("/api/status").await;
        if lists_host(&v, hostname) == connected {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {hostname} connected={connected} in the status: {v:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn build_detail(farm: &TestFarm, build: &Value) -> Value {
    farm.get_json(&format!(
        "/api/builds/{}",
        build["id"].as_str().expect("id")
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_runs_on_a_reverse_buildlet() {
    let s = setup("test -f go.mod && echo reverse step saw $(head -n 1 go.mod)").await;
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let hostname = "rev-e2e-ok";
    let _buildlet = start_reverse(&s, &farm, hostname);

    // The status JSON lists it once it is connected.
    wait_status(&farm, hostname, true).await;

    let builds = farm.wait_final_builds("t", &s.rev, 1).await;
    let b = &builds[0];
    assert_eq!(b["builder"], BUILDER, "{b:#}");
    assert_eq!(b["state"], "ok", "{b:#}\n{}", reverse_log(&s, hostname));
    let detail = build_detail(&farm, b).await;
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{detail:#}");
    assert_eq!(
        attempts[0]["buildlet"],
        format!("reverse/{hostname}"),
        "{detail:#}"
    );
    let log = farm
        .get_text(&format!("/log/{}", b["id"].as_str().expect("id")))
        .await;
    assert!(
        log.contains("reverse step saw module example.com/t"),
        "{log}"
    );
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reverse_buildlet_killed_mid_build_costs_one_attempt_and_the_retry_passes() {
    let tmp0 = tempfile::tempdir().expect("tempdir");
    let marker = tmp0.path().join("step-pid");
    // The first attempt records its pid and hangs; the retry sees the marker and passes.
    let script = format!(
        "if [ ! -e {m} ]; then echo $$ > {m}.tmp && mv {m}.tmp {m}; exec sleep 300; fi; echo second attempt passes",
        m = marker.display()
    );
    let s = setup(&script).await;
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let hostname = "rev-e2e-kill";
    let mut buildlet = start_reverse(&s, &farm, hostname);

    let running = farm.wait_running("t", &s.rev, BUILDER).await;
    let pid = eventually("the hanging step", || {
        std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
    })
    .await;
    buildlet.start_kill().expect("kill -9");
    let _ = buildlet.wait().await;
    // The step was orphaned by the kill; it is in its own process group.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);

    // The attempt on the dead machine is recorded as an infra failure.
    let deadline = Instant::now() + WAIT;
    loop {
        let d = build_detail(&farm, &running).await;
        let first = &d["attempts"][0];
        if first["state"] == "infra-failure" {
            assert_eq!(first["buildlet"], format!("reverse/{hostname}"), "{d:#}");
            break;
        }
        assert!(Instant::now() < deadline, "no infra-failure attempt: {d:#}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Gone from the status JSON too.
    wait_status(&farm, hostname, false).await;

    let _buildlet = start_reverse(&s, &farm, hostname);
    wait_status(&farm, hostname, true).await;
    let builds = farm.wait_final_builds("t", &s.rev, 1).await;
    let b = &builds[0];
    assert_eq!(b["state"], "ok", "{b:#}\n{}", reverse_log(&s, hostname));
    let detail = build_detail(&farm, b).await;
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert!(attempts.len() >= 2, "{detail:#}");
    assert_eq!(attempts[0]["state"], "infra-failure", "{detail:#}");
    let last = attempts.last().expect("an attempt");
    assert_eq!(
        last["buildlet"],
        format!("reverse/{hostname}"),
        "{detail:#}"
    );
    let log = farm
        .get_text(&format!("/log/{}", b["id"].as_str().expect("id")))
        .await;
    assert!(log.contains("second attempt passes"), "{log}");
    assert!(log.contains("infrastructure failure"), "{log}");
    farm.kill().await;
}
