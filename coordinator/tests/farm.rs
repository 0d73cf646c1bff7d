//! End-to-end tests of the coordinator: real coordinator and buildlet processes, a real
//! git repository, real Go builds, results read over the coordinator's HTTP JSON.

mod common;

use std::path::Path;

use common::*;

const GO_MARKER_STEP: &str = "step-marker";

/// A config for `repo` with a passing linux builder, a builder whose tests fail on
/// purpose, and a cross-compile builder; `extra` is appended (more builders).
fn config(data_dir: &Path, repo: &Path, extra: &str) -> String {
    let host = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let gocache = data_dir.join("gocache");
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"
max_attempts = 3

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 2 }}
env = {{ GOCACHE = "{gocache}", GOFLAGS = "-mod=mod" }}

[[builders]]
name = "linux-{host}"
host_type = "local"
steps = [
  {{ name = "vet", command = ["go", "vet", "./..."] }},
  {{ name = "test", command = ["go", "test", "./..."] }},
]

[[builders]]
name = "linux-{host}-failing"
host_type = "local"
env = {{ HELLO_FAIL = "1" }}
steps = [{{ name = "test", command = ["go", "test", "./..."] }}]

[[builders]]
name = "windows-amd64"
host_type = "local"
env = {{ GOOS = "windows", GOARCH = "amd64", CGO_ENABLED = "0" }}
steps = [{{ name = "build", command = ["go", "build", "./..."] }}]
{extra}

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]
"#,
        data = data_dir.display(),
        repo = repo.display(),
        gocache = gocache.display(),
    )
}

/// A `[sandbox]` table making `dir` visible and writable inside sandboxed buildlets
/// (they have a private /tmp and, under root, their own uids), for marker files.
fn shared_with_sandbox(dir: &Path) -> String {
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod shared dir");
    format!("\n[sandbox]\nwritable_paths = [\"{}\"]\n", dir.display())
}

fn host_builder() -> String {
    match std::env::consts::ARCH {
        "aarch64" => "linux-arm64".into(),
        _ => "linux-amd64".into(),
    }
}

fn by_builder<'a>(builds: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    builds
        .iter()
        .find(|b| b["builder"] == name)
        .unwrap_or_else(|| panic!("no build for {name} in {builds:#?}"))
}

fn setup(
    extra: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    String,
) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let rev = make_go_repo(&repo);
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &repo, extra)).expect("write config");
    (tmp, repo, cfg, rev)
}

#[tokio::test(flavor = "multi_thread")]
async fn new_commits_build_on_every_builder_with_the_right_results() {
    let (tmp, repo, cfg, rev) = setup("");
    let farm = TestFarm::start(&cfg, &tmp.path().join("data")).await;
    let builds = farm.wait_final_builds("t", &rev, 3).await;
    assert_eq!(builds.len(), 3, "one build per builder: {builds:#?}");
    let host = host_builder();
    assert_eq!(by_builder(&builds, &host)["state"], "ok");
    assert_eq!(by_builder(&builds, "windows-amd64")["state"], "ok");
    let failing = by_builder(&builds, &format!("{host}-failing"));
    assert_eq!(failing["state"], "failed");
    let log = farm
        .get_text(&format!("/log/{}", failing["id"].as_str().expect("id")))
        .await;
    assert!(
        log.contains("intentional failure for the farm's test"),
        "log: {log}"
    );
    assert!(log.contains("--- FAIL: TestHello"), "log: {log}");

    // A new commit gets its own builds; the old ones are not built again.
    std::fs::write(
        repo.join("extra.go"),
        "package t\n\n// Extra is new.\nconst Extra = 1\n",
    )
    .expect("write");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "second commit"]);
    let rev2 = git(&repo, &["rev-parse", "HEAD"]);
    let builds2 = farm.wait_final_builds("t", &rev2, 3).await;
    assert_eq!(by_builder(&builds2, &host)["state"], "ok");
    let again = farm
        .get_json(&format!("/api/builds?repo=t&rev={rev}"))
        .await;
    assert_eq!(
        again.as_array().map(Vec::len),
        Some(3),
        "no duplicate builds of the first commit"
    );
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn try_runs_with_a_patch_report_a_verdict() {
    let (tmp, repo, cfg, rev) = setup("");
    let farm = TestFarm::start(&cfg, &tmp.path().join("data")).await;
    let host = host_builder();

    // A patch that breaks the test.
    std::fs::write(
        repo.join("hello.go"),
        "package t\n\n// Hello greets.\nfunc Hello() string { return \"bye\" }\n",
    )
    .expect("write");
    let bad_patch = git(&repo, &["diff", "--binary"]);
    git(&repo, &["checkout", "--", "."]);
    let bad = tmp.path().join("bad.patch");
    std::fs::write(&bad, format!("{bad_patch}\n")).expect("write patch");
    let out = farm
        .gomote()
        .args(["try", "t", &rev, "--builders", &host, "--patch"])
        .arg(&bad)
        .output()
        .expect("gomote try");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a failing try run exits non-zero: {stdout}"
    );
    assert!(stdout.contains("verdict: failed"), "{stdout}");

    // The same commit without the patch passes.
    let out = farm
        .gomote()
        .args(["try", "--json", "t", &rev, "--builders", &host])
        .output()
        .expect("gomote try");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout {stdout} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["verdict"], "ok");
    assert_eq!(v["builders"][0]["builder"], host.as_str());

    // A builder that is not a try builder is refused with a clear message.
    let out = farm
        .gomote()
        .args(["try", "t", &rev, "--builders", "plan9-386"])
        .output()
        .expect("gomote try");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a try builder"));
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_buildlet_is_an_infra_failure_then_a_retry_passes() {
    let tmp0 = tempfile::tempdir().expect("tempdir");
    let marker = tmp0.path().join(GO_MARKER_STEP);
    // The first attempt creates the marker and hangs; the test kills its buildlet. The
    // retry sees the marker and passes.
    let extra = format!(
        r#"
[[builders]]
name = "linux-amd64-slow"
host_type = "local"
repos = ["t"]
steps = [{{ name = "hang-once", command = ["sh", "-c", "if [ ! -e {m} ]; then touch {m}; sleep 300; fi; echo second attempt passes"] }}]
{shared}
"#,
        m = marker.display(),
        shared = shared_with_sandbox(tmp0.path()),
    );
    let (tmp, _repo, cfg, rev) = setup(&extra);
    let data = tmp.path().join("data");
    let farm = TestFarm::start(&cfg, &data).await;
    eventually("the marker", || marker.exists().then_some(())).await;
    // Find the buildlet running the slow build: the one whose workdir has the step's
    // shell as a child. Simpler and exact: kill every buildlet running `sleep 300`.
    let pid = eventually("the hanging buildlet", || {
        buildlet_pids(&data.display().to_string())
            .into_iter()
            .find(|pid| process_tree_contains(*pid, "sleep 300"))
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");

    let builds = farm.wait_final_builds("t", &rev, 4).await;
    let slow = by_builder(&builds, "linux-amd64-slow");
    assert_eq!(slow["state"], "ok", "{slow:#}");
    let detail = farm
        .get_json(&format!("/api/builds/{}", slow["id"].as_str().expect("id")))
        .await;
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert!(attempts.len() >= 2, "{detail:#}");
    assert_eq!(attempts[0]["state"], "infra-failure", "{detail:#}");
    let log = farm
        .get_text(&format!("/log/{}", slow["id"].as_str().expect("id")))
        .await;
    assert!(log.contains("second attempt passes"), "{log}");
    assert!(log.contains("infrastructure failure"), "{log}");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_coordinator_resumes_queued_and_running_work_on_restart() {
    restart_resumes(nix::sys::signal::Signal::SIGKILL).await;
}

/// SIGTERM is an orderly stop: running builds must stay resumable, not be cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_coordinator_resumes_queued_and_running_work_on_restart() {
    restart_resumes(nix::sys::signal::Signal::SIGTERM).await;
}

async fn restart_resumes(signal: nix::sys::signal::Signal) {
    let tmp0 = tempfile::tempdir().expect("tempdir");
    let gate = tmp0.path().join("gate");
    // Steps wait for the gate file, so work is running (2 slots) and queued when the
    // coordinator is killed.
    let extra = format!(
        r#"
[[builders]]
name = "linux-amd64-gated"
host_type = "local"
steps = [{{ name = "wait", command = ["sh", "-c", "while [ ! -e {g} ]; do sleep 0.2; done; echo gate open"] }}]
{shared}
"#,
        g = gate.display(),
        shared = shared_with_sandbox(tmp0.path()),
    );
    let (tmp, _repo, cfg, rev) = setup(&extra);
    let data = tmp.path().join("data");
    let farm = TestFarm::start(&cfg, &data).await;
    let running = farm.wait_running("t", &rev, "linux-amd64-gated").await;
    assert!(running["id"].is_string());
    let pid = farm.child.id().expect("coordinator pid") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal coordinator");
    let mut farm = farm;
    let status = tokio::time::timeout(WAIT, farm.child.wait())
        .await
        .expect("coordinator exits")
        .expect("wait");
    if signal == nix::sys::signal::Signal::SIGTERM {
        assert!(status.success(), "an orderly stop exits 0: {status}");
    }
    // Its buildlets die with it (kill_on_drop does not reach them on SIGKILL, so reap).
    for pid in buildlet_pids(&data.display().to_string()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::fs::write(&gate, "open").expect("open gate");
    let farm = TestFarm::start(&cfg, &data).await;
    let builds = farm.wait_final_builds("t", &rev, 4).await;
    assert_eq!(
        builds.len(),
        4,
        "every build finished exactly once: {builds:#?}"
    );
    let gated = by_builder(&builds, "linux-amd64-gated");
    assert_eq!(gated["state"], "ok", "{gated:#}");
    let failing = by_builder(&builds, &format!("{}-failing", host_builder()));
    assert_eq!(failing["state"], "failed");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_configs_get_precise_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[coordinator]\nlisten = \"127.0.0.1:0\"\n\n[[builders]]\nname = \"linux-amd64\"\nhost_type = \"nope\"\nsteps = [{ name = \"t\", command = [\"true\"] }]\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .output()
        .expect("run coordinator");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:6"), "names the line: {err}");
    assert!(err.contains("nope"), "names the value: {err}");

    std::fs::write(&cfg, "[coordinator\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run coordinator");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn gomote_commands_end_to_end() {
    let (tmp, _repo, cfg, _rev) = setup("");
    let farm = TestFarm::start(&cfg, &tmp.path().join("data")).await;
    let run = |args: &[&str]| {
        let out = farm.gomote().args(args).output().expect("gomote");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, inst, err) = run(&["create", &host_builder()]);
    assert_eq!(code, Some(0), "{err}");
    let inst = inst.trim().to_owned();
    let (_, list, _) = run(&["list"]);
    assert!(list.contains(&inst), "{list}");

    // put + run: output streamed, exit code passed on.
    let local = tmp.path().join("script.sh");
    std::fs::write(&local, "#!/bin/sh\necho out; echo err >&2; exit 7\n").expect("write");
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&local).expect("meta").permissions(),
        0o755,
    );
    assert_eq!(
        run(&["put", &inst, local.to_str().expect("utf8")]).0,
        Some(0)
    );
    let (code, out, err) = run(&["run", &inst, "--", "sh", "script.sh"]);
    assert_eq!(code, Some(7));
    assert_eq!(out, "out\n");
    assert!(err.contains("err"));

    // push sends only what changed, and removes what was deleted locally.
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("a.txt"), "a").expect("write");
    std::fs::write(tree.join("sub/b.txt"), "b").expect("write");
    let (code, _, err) = run(&[
        "push",
        &inst,
        tree.to_str().expect("utf8"),
        "--dest",
        "tree",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("pushed 2 changed"), "{err}");
    std::fs::write(tree.join("a.txt"), "a2").expect("write");
    std::fs::remove_file(tree.join("sub/b.txt")).expect("rm");
    let (code, _, err) = run(&[
        "push",
        &inst,
        tree.to_str().expect("utf8"),
        "--dest",
        "tree",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("pushed 1 changed file(s), removed 1"), "{err}");
    let (_, ls, _) = run(&["ls", &inst, "tree", "-R"]);
    assert!(ls.contains("a.txt") && !ls.contains("b.txt"), "{ls}");
    let (_, cat, _) = run(&["run", &inst, "--dir", "tree", "--", "cat", "a.txt"]);
    assert_eq!(cat, "a2");

    // gettar returns a real tarball of the tree.
    let out_tar = tmp.path().join("out.tar.gz");
    assert_eq!(
        run(&[
            "gettar",
            &inst,
            "--dir",
            "tree",
            "-o",
            out_tar.to_str().expect("utf8")
        ])
        .0,
        Some(0)
    );
    let mut names = vec![];
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&out_tar).expect("open"),
    ));
    for e in ar.entries().expect("entries") {
        names.push(
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string(),
        );
    }
    assert!(names.iter().any(|n| n.ends_with("a.txt")), "{names:?}");

    assert_eq!(run(&["rm", &inst, "tree"]).0, Some(0));
    let (_, ls, _) = run(&["ls", &inst]);
    assert!(!ls.contains("tree"), "{ls}");

    // Paths that escape the workdir are refused by the buildlet, through the proxy.
    let (code, _, err) = run(&["rm", &inst, "../outside"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("InvalidArgument"), "{err}");

    // Another user's token cannot touch the instance.
    let token = farm.issue_token("mallory");
    let out = farm
        .gomote()
        .env("BUILDFARM_TOKEN", &token)
        .args(["run", &inst, "--", "true"])
        .output()
        .expect("gomote");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
    let out = farm
        .gomote()
        .env("BUILDFARM_TOKEN", "forged.00")
        .args(["list"])
        .output()
        .expect("gomote");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));

    assert_eq!(run(&["destroy", &inst]).0, Some(0));
    let (_, list, _) = run(&["list"]);
    assert!(!list.contains(&inst), "{list}");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_webhook_triggers_a_poll_and_a_bad_signature_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    make_go_repo(&repo);
    // Polls only hourly: only the webhook can make the second commit show up in time.
    let cfg_text = config(&data, &repo, "")
        .replace("repo_poll_interval = \"1s\"", "repo_poll_interval = \"1h\"")
        .replace(
            "branches = [\"main\"]\n",
            "branches = [\"main\"]\nwebhook_secret = \"s3cret\"\n",
        );
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, cfg_text).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;

    std::fs::write(
        repo.join("more.go"),
        "package t\n\n// More is new.\nconst More = 2\n",
    )
    .expect("write");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "pushed commit"]);
    let rev = git(&repo, &["rev-parse", "HEAD"]);
    let url = format!("http://{}/webhook/t", farm.addr);
    let body = br#"{"ref":"refs/heads/main"}"#.to_vec();

    let resp = farm
        .http
        .post(&url)
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 401, "no signature");
    let resp = farm
        .http
        .post(&url)
        .header("X-Hub-Signature-256", "sha256=00")
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 403, "wrong signature");
    let resp = farm
        .http
        .post(format!("http://{}/webhook/nope", farm.addr))
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 404, "unknown repo");

    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").expect("hmac");
    mac.update(&body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let resp = farm
        .http
        .post(&url)
        .header("X-Hub-Signature-256", sig)
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 202);
    let builds = farm.wait_final_builds("t", &rev, 3).await;
    assert_eq!(by_builder(&builds, &host_builder())["state"], "ok");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsigned_webhook_is_refused_unless_the_repo_opts_in() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let closed = tmp.path().join("closed");
    let open = tmp.path().join("open");
    let first_rev = make_go_repo(&open);
    make_go_repo(&closed);
    // Polls only hourly: only the webhook can make a new commit show up in time. The
    // builder does nothing, so the test waits on the webhook, not on Go.
    let cfg_text = format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 1 }}

[[builders]]
name = "linux-amd64"
host_type = "local"
steps = [{{ name = "noop", command = ["true"] }}]

[[repos]]
name = "closed"
url = "{closed}"

[[repos]]
name = "open"
url = "{open}"
danger_accept_unsigned_webhooks = true
"#,
        data = data.display(),
        closed = closed.display(),
        open = open.display(),
    );
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, cfg_text).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    // The start-up poll is done once the first commit is built.
    farm.wait_final_builds("open", &first_rev, 1).await;

    let body = br#"{"ref":"refs/heads/main"}"#.to_vec();
    let resp = farm
        .http
        .post(format!("http://{}/webhook/closed", farm.addr))
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(
        resp.status().as_u16(),
        403,
        "unsigned, no secret, no opt-in"
    );
    let text = resp.text().await.expect("body");
    assert!(
        text.contains("webhooks for repo \"closed\" are refused: it has no webhook_secret"),
        "{text}"
    );

    std::fs::write(
        open.join("more.go"),
        "package t\n\n// More is new.\nconst More = 2\n",
    )
    .expect("write");
    git(&open, &["add", "-A"]);
    git(&open, &["commit", "--quiet", "-m", "pushed commit"]);
    let rev = git(&open, &["rev-parse", "HEAD"]);
    let resp = farm
        .http
        .post(format!("http://{}/webhook/open", farm.addr))
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 202, "unsigned, opted in");
    let builds = farm.wait_final_builds("open", &rev, 1).await;
    assert_eq!(builds[0]["state"], "ok", "{builds:#?}");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_gomote_instances_expire_and_ssh_runs_a_shell() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    make_go_repo(&repo);
    let cfg_text = config(&data, &repo, "").replace(
        "max_attempts = 3\n",
        "max_attempts = 3\ngomote_idle_timeout = \"3s\"\n",
    );
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, cfg_text).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;

    let out = farm
        .gomote()
        .args(["create", &host_builder()])
        .output()
        .expect("gomote");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inst = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    // ssh with a piped stdin: the remote shell reads our commands and its exit code
    // becomes gomote's.
    let mut child = farm
        .gomote()
        .args(["ssh", &inst])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gomote ssh");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"echo hello-from-$((6*7))\nexit 5\n")
            .expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello-from-42"));

    // Unused for longer than the idle timeout: gone.
    eventually("the instance to expire", || {
        let out = farm.gomote().arg("list").output().ok()?;
        (!String::from_utf8_lossy(&out.stdout).contains(&inst)).then_some(())
    })
    .await;
    let out = farm
        .gomote()
        .args(["run", &inst, "--", "true"])
        .output()
        .expect("gomote");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_try_run_can_be_cancelled_by_its_owner_only() {
    let extra = r#"
[[builders]]
name = "linux-amd64-sleepy"
host_type = "local"
steps = [{ name = "sleep", command = ["sleep", "297"] }]
"#;
    let (tmp, _repo, cfg, rev) = setup(extra);
    let farm = TestFarm::start(&cfg, &tmp.path().join("data")).await;
    let (mut watcher, try_id) = farm.watch_try("t", &rev, "linux-amd64-sleepy");

    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = farm.get_json(&format!("/api/try/{try_id}")).await;
        if v["builds"][0]["state"] == "running" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never running: {v:#}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Someone else may not cancel it.
    let token = farm.issue_token("mallory");
    let out = farm
        .gomote()
        .env("BUILDFARM_TOKEN", &token)
        .args(["cancel", &try_id])
        .output()
        .expect("gomote cancel");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));

    let out = farm
        .gomote()
        .args(["cancel", &try_id])
        .output()
        .expect("gomote cancel");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled 1 build"));

    // The watcher sees the end and fails; the build is cancelled, not left running.
    let status = tokio::task::spawn_blocking(move || watcher.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(!status.success());
    let v = farm.get_json(&format!("/api/try/{try_id}")).await;
    assert_eq!(v["builds"][0]["state"], "cancelled", "{v:#}");
    assert_eq!(v["verdict"], "failed");
    // The step's process is gone too (only this test sleeps 297 s).
    eventually("the cancelled step's process to die", || {
        (!process_running("sleep 297")).then_some(())
    })
    .await;
    farm.kill().await;
}

/// Is some process's command line exactly `cmdline` (arguments joined by spaces)?
fn process_running(cmdline: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == cmdline)
                .unwrap_or(false)
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_builders_of_one_new_commit_make_one_source_tarball() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let rev = make_go_repo(&repo);
    let mut builders = String::new();
    for i in 1..=20 {
        builders.push_str(&format!(
            "[[builders]]\nname = \"linux-amd64-s{i}\"\nhost_type = \"local\"\n\
             steps = [{{ name = \"check\", command = [\"sh\", \"-c\", \"test -f go.mod\"] }}]\n\n"
        ));
    }
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 4 }}

{builders}
[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]
"#,
            data = data.display(),
            repo = repo.display(),
        ),
    )
    .expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    let builds = farm.wait_final_builds("t", &rev, 20).await;
    assert_eq!(builds.len(), 20, "{builds:#?}");
    assert!(builds.iter().all(|b| b["state"] == "ok"), "{builds:#?}");
    let metrics = farm.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "buildfarm_source_tarballs_built_total 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("source_tarballs"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
