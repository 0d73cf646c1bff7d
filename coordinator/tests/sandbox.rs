//! The local sandbox, end to end: a real coordinator, real sandboxed buildlets (bubblewrap,
//! and their own uids when the tests run as root), real gomote commands and builds trying
//! to read the farm's secrets, escape other buildlets' workdirs, and leave processes
//! behind; and the coordinator's start-up cleanup and refusal without bwrap.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// A farm whose local buildlets must run under bubblewrap, with its workdir root at
/// `root`; `body` (builders, repos) is appended after the host type.
fn sandbox_config(data: &Path, root: &Path, sandbox_extra: &str, body: &str) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"
max_attempts = 1

# These tests borrow both buildlets as gomote instances.
[limits]
interactive_share_percent = 100

[sandbox]
mode = "bwrap"
workdir_root = "{root}"
{sandbox_extra}

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 2 }}
{body}
"#,
        data = data.display(),
        root = root.display(),
    )
}

/// A builder for gomote instances, and no repo (so no build competes for buildlets).
const GOMOTE_ONLY: &str = r#"
[[builders]]
name = "linux-amd64"
host_type = "local"
steps = [{ name = "test", command = ["true"] }]
"#;

struct Setup {
    tmp: tempfile::TempDir,
    data: PathBuf,
    root: PathBuf,
    cfg: PathBuf,
    rev: String,
}

/// A temp dir with a Go repo and a config; `body` may use `@REPO@` and `@DATA@`,
/// `sandbox_extra` (more `[sandbox]` fields) `@ROOT@`.
fn setup(sandbox_extra: &str, body: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The sandbox uids must be able to pass through to the workdir root (not list it).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .expect("chmod tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let root = tmp.path().join("workdirs");
    let rev = make_go_repo(&repo);
    let body = body
        .replace("@REPO@", &repo.display().to_string())
        .replace("@DATA@", &data.display().to_string());
    let sandbox_extra = sandbox_extra.replace("@ROOT@", &root.display().to_string());
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, sandbox_config(&data, &root, &sandbox_extra, &body))
        .expect("write config");
    Setup {
        tmp,
        data,
        root,
        cfg,
        rev,
    }
}

fn run_gomote(farm: &TestFarm, args: &[&str]) -> (Option<i32>, String, String) {
    let out = farm.gomote().args(args).output().expect("gomote");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn create(farm: &TestFarm) -> String {
    let (code, out, err) = run_gomote(farm, &["create", "linux-amd64"]);
    assert_eq!(code, Some(0), "gomote create: {err}");
    out.trim().to_owned()
}

/// A shell script that tries every way we know to reach the farm's secrets from inside a
/// buildlet, and prints whatever it could read. It ends with `probe done` so a script that
/// did not run cannot pass for one that found nothing. The words it prints are split in
/// its source, so a log that echoes the command does not match them.
fn secrets_probe(data: &Path, coordinator_pid: u32) -> String {
    let d = data.display();
    format!(
        r#"
for p in ../../master.key ../../../master.key ../../../data/master.key ../../tls/ca.key \
  {d}/master.key {d}/tls/ca.key {d}/tls/coordinator-client.key {d}/tls/coordinator.key \
  {d}/buildfarm.db {d}/buildfarm.db-wal \
  /proc/{coordinator_pid}/root{d}/master.key /proc/{coordinator_pid}/cwd/master.key \
  /proc/$PPID/root{d}/master.key /proc/$PPID/cwd/../../master.key /proc/1/root{d}/master.key \
  /proc/1/cwd/{d}/master.key; do
  if cat "$p" 2>/dev/null; then echo "LE""AK $p"; fi
done
ls -a {d} {d}/tls 2>/dev/null | grep -E 'master|\.key|\.db' | sed 's/^/LE''AK listing /'
echo "uid $(id -u)"
echo "probe" "done"
"#
    )
}

/// Fails if `output` shows any of the farm's secrets.
fn assert_no_secrets(output: &str, data: &Path) {
    assert!(
        output.contains("probe done"),
        "the probe did not finish: {output}"
    );
    assert!(!output.contains("LEAK"), "{output}");
    let key = std::fs::read_to_string(data.join("master.key")).expect("master key");
    assert!(
        !output.contains(key.trim()),
        "the master key leaked: {output}"
    );
    let ca_key = std::fs::read_to_string(data.join("tls/ca.key")).expect("ca key");
    let body = ca_key
        .lines()
        .find(|l| !l.starts_with("-----"))
        .expect("pem body");
    assert!(!output.contains(body), "the CA key leaked: {output}");
    assert!(!output.contains("SQLite format 3"), "the database leaked");
    if nix::unistd::geteuid().is_root() {
        assert!(
            !output.contains("uid 0\n"),
            "buildlets must not run as root: {output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gomote_user_cannot_read_the_farms_secrets_or_other_workdirs() {
    let s = setup("", GOMOTE_ONLY);
    // The config file may hold secrets too; outside /tmp (which sandboxes do not share)
    // and readable by all, it is what an operator's /etc/buildfarm/coordinator.toml is.
    let canary = format!("config-canary-{}", unique_marker());
    let cfg = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{canary}.toml"));
    let text = std::fs::read_to_string(&s.cfg).expect("config");
    std::fs::write(&cfg, format!("# {canary}\n{text}")).expect("write config");
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod config");
    let farm = TestFarm::start(&cfg, &s.data).await;
    let a = create(&farm);
    let b = create(&farm);
    let pid = farm.child.id().expect("coordinator pid");

    let probe = format!(
        "{}\ncat {} 2>/dev/null; true\n",
        secrets_probe(&s.data, pid),
        cfg.display()
    );
    let (code, out, err) = run_gomote(&farm, &["run", &a, "--", "sh", "-c", &probe]);
    let _ = std::fs::remove_file(&cfg);
    assert_eq!(code, Some(0), "{err}");
    assert_no_secrets(&out, &s.data);
    assert!(!out.contains(&canary), "the config file leaked: {out}");
    // The secrets are there on the host all along: the sandbox hides them.
    assert!(s.data.join("master.key").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&s.data).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "data dir mode");
    for f in ["master.key", "tls/ca.key", "buildfarm.db"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(s.data.join(f))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // A leaves a file in its workdir; B cannot see A's workdir at all.
    let (code, _, err) = run_gomote(
        &farm,
        &[
            "run",
            &a,
            "--",
            "sh",
            "-c",
            "echo top-secret-of-a > secret-a.txt",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let a_home = std::fs::read_dir(&s.root)
        .expect("list root")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("work/secret-a.txt").exists())
        .expect("A's workdir on the host");
    let a_file = a_home.join("work/secret-a.txt");
    let a_slug = a_home
        .file_name()
        .expect("slug")
        .to_string_lossy()
        .into_owned();
    let script = format!(
        "cat {f} 2>/dev/null; cat /proc/*/root{f} 2>/dev/null; ls -a {root} 2>&1; ls -a ../.. 2>&1; echo uid $(id -u); echo probe done",
        f = a_file.display(),
        root = s.root.display()
    );
    let (_, out_b, _) = run_gomote(&farm, &["run", &b, "--", "sh", "-c", &script]);
    assert!(out_b.contains("probe done"), "{out_b}");
    assert!(!out_b.contains("top-secret-of-a"), "{out_b}");
    assert!(!out_b.contains(&a_slug), "B lists A's workdir: {out_b}");
    let (_, out_a, _) = run_gomote(&farm, &["run", &a, "--", "sh", "-c", "echo uid $(id -u)"]);
    if nix::unistd::geteuid().is_root() {
        let uid = |o: &str| {
            o.lines()
                .find_map(|l| l.strip_prefix("uid "))
                .map(str::to_owned)
                .unwrap_or_default()
        };
        assert_ne!(uid(&out_a), uid(&out_b), "each buildlet has its own uid");
        assert_ne!(uid(&out_a), "0");
    }
    assert_eq!(run_gomote(&farm, &["destroy", &a]).0, Some(0));
    assert_eq!(run_gomote(&farm, &["destroy", &b]).0, Some(0));
    // Released buildlets leave nothing in the root.
    eventually("released workdirs removed", || {
        let left: Vec<_> = std::fs::read_dir(&s.root)
            .expect("list root")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && n != "bin")
            .collect();
        left.is_empty().then_some(())
    })
    .await;
    farm.kill().await;
    drop(s.tmp);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_step_cannot_read_the_farms_secrets() {
    // The coordinator's pid is not known when the config is written: try every pid's root.
    let script = secrets_probe(Path::new("@DATA@"), 0)
        .replace("/proc/0/", "/proc/*/")
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let body = format!(
        r#"
[[builders]]
name = "linux-amd64-probe"
host_type = "local"
steps = [{{ name = "probe", command = ["sh", "-c", "{script}"] }}]

[[repos]]
name = "t"
url = "@REPO@"
branches = ["main"]
"#
    );
    let s = setup("", &body);
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let builds = farm.wait_final_builds("t", &s.rev, 1).await;
    let id = builds[0]["id"].as_str().expect("id");
    let log = farm.get_text(&format!("/log/{id}")).await;
    assert_eq!(builds[0]["state"], "ok", "{log}");
    assert_no_secrets(&log, &s.data);
    farm.kill().await;
}

/// A number no other process on the machine has in its command line.
fn unique_marker() -> String {
    format!("{}{:06}", std::process::id() % 1000, rand_u32() % 1_000_000)
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}

/// Processes (not zombies) whose command line contains `marker`, but `except`.
fn marked_processes(marker: &str, except: &[u32]) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if except.contains(&(pid as u32)) || pid as u32 == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(marker) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Starts, on instance `inst`, a command that leaves three escaped processes (setsid, a
/// double fork, nohup) and keeps running; returns the gomote client and the marker once
/// all of them are seen on the host.
async fn start_escapes(farm: &TestFarm, inst: &str) -> (tokio::process::Child, String) {
    let m = unique_marker();
    let script = format!(
        "setsid sh -c 'sleep 300.{m}1' </dev/null >/dev/null 2>&1 &
         (sh -c 'sleep 300.{m}2' </dev/null >/dev/null 2>&1 &)
         nohup sleep 300.{m}3 </dev/null >/dev/null 2>&1 &
         echo escapes started; sleep 300.{m}4"
    );
    let client = tokio::process::Command::from(farm.gomote())
        .args(["run", inst, "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("gomote run");
    let except = [client.id().unwrap_or(0)];
    eventually("escaped processes running", || {
        let procs = marked_processes(&m, &except);
        (1..=4)
            .all(|i| {
                let sleep = format!("sleep 300.{m}{i}");
                procs.iter().any(|(_, c)| c.trim() == sleep)
            })
            .then_some(())
    })
    .await;
    (client, m)
}

async fn assert_all_gone(marker: &str, client: &tokio::process::Child) {
    let except = [client.id().unwrap_or(0)];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = marked_processes(marker, &except);
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left behind: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn escaped_processes_are_gone_after_destroy() {
    let s = setup("", GOMOTE_ONLY);
    // A buildlet binary the sandbox cannot see where it is (a private dir under /tmp, as
    // CI's target dir under /root is private): the coordinator runs a link of it.
    let private = s.tmp.path().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let bin = private.join("buildlet");
    if std::fs::hard_link(buildlet_bin(), &bin).is_err() {
        std::fs::copy(buildlet_bin(), &bin).expect("copy buildlet");
    }
    let farm = TestFarm::start_with_buildlet(&s.cfg, &s.data, &[], &bin).await;
    let inst = create(&farm);
    let (client, m) = start_escapes(&farm, &inst).await;
    let (code, _, err) = run_gomote(&farm, &["destroy", &inst]);
    assert_eq!(code, Some(0), "{err}");
    assert_all_gone(&m, &client).await;
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_a_build_leaves_are_gone_when_its_lease_is_released() {
    let m = unique_marker();
    let body = format!(
        r#"
[[builders]]
name = "linux-amd64-escape"
host_type = "local"
steps = [{{ name = "escape", command = ["sh", "-c", "setsid sh -c 'sleep 300.{m}1' </dev/null >/dev/null 2>&1 & (nohup sleep 300.{m}2 </dev/null >/dev/null 2>&1 &); sleep 1; pgrep -fx 'sleep 300.{m}1' >/dev/null && pgrep -fx 'sleep 300.{m}2' >/dev/null && echo both; echo alive"] }}]

[[repos]]
name = "t"
url = "@REPO@"
branches = ["main"]
"#
    );
    let s = setup("", &body);
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let builds = farm.wait_final_builds("t", &s.rev, 1).await;
    let id = builds[0]["id"].as_str().expect("id");
    let log = farm.get_text(&format!("/log/{id}")).await;
    assert_eq!(builds[0]["state"], "ok", "{log}");
    assert!(
        log.contains("both\nalive"),
        "the escapes did not start: {log}"
    );
    // The build is over and its buildlet released: nothing of it may still run.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = marked_processes(&m, &[]);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes outlived the build: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    farm.kill().await;
}

/// The host pid of the buildlet process (not bwrap) whose workdir is under `root`.
fn buildlet_process(root: &Path) -> Option<i32> {
    let needle = format!("--workdir {}/", root.display());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (comm.trim() == "buildlet" && cmdline.contains(&needle)).then_some(pid)
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn escaped_processes_are_gone_after_the_buildlet_is_killed() {
    let s = setup("", GOMOTE_ONLY);
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let inst = create(&farm);
    let (client, m) = start_escapes(&farm, &inst).await;
    let pid = buildlet_process(&s.root).expect("the buildlet process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 buildlet");
    assert_all_gone(&m, &client).await;
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_coordinator_leaves_no_process_and_its_workdirs_go_at_the_next_start() {
    let s = setup("", GOMOTE_ONLY);
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let inst = create(&farm);
    let (client, m) = start_escapes(&farm, &inst).await;
    let pid = farm.child.id().expect("coordinator pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 coordinator");
    assert_all_gone(&m, &client).await;
    farm.kill().await;

    // The dead coordinator could not remove the workdir; the next one does at start-up.
    let stale: Vec<PathBuf> = std::fs::read_dir(&s.root)
        .expect("list root")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("work").exists())
        .collect();
    assert_eq!(stale.len(), 1, "{stale:?}");
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    assert!(
        !stale[0].exists(),
        "stale workdir {} kept",
        stale[0].display()
    );
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_kills_leftover_processes_and_removes_leftover_workdirs() {
    // A uid range of this test's own, so no other farm's buildlets are in it.
    let uid_base = 3_000_000 + (std::process::id() % 100_000) * 8;
    let s = setup(&format!("uid_base = {uid_base}"), GOMOTE_ONLY);
    // What a previous run could leave: a root with our marker, a workdir and a credentials
    // dir, a process working in that workdir and one running as a sandbox uid.
    let stale = s.root.join("local-7-0123456789abcdef");
    std::fs::create_dir_all(stale.join("work/sub")).expect("mkdir");
    std::fs::write(stale.join("work/sub/f"), "x").expect("write");
    std::fs::create_dir_all(s.root.join("local-7-0123456789abcdef.creds")).expect("mkdir");
    std::fs::write(s.root.join(".buildfarm-workdir-root"), "").expect("marker");
    // Where an older version kept workdirs: inside the data dir.
    let legacy = s.data.join("buildlets/local-1-0123/work");
    std::fs::create_dir_all(&legacy).expect("mkdir");
    let m = unique_marker();
    let mut by_cwd = std::process::Command::new("sleep")
        .arg(format!("300.{m}1"))
        .current_dir(stale.join("work"))
        .spawn()
        .expect("spawn sleep");
    let mut by_uid = None;
    if nix::unistd::geteuid().is_root() {
        let uid = nix::unistd::Uid::from_raw(uid_base + 1);
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg(format!("300.{m}2")).current_dir("/");
        // SAFETY: only setuid(2) runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::unistd::setuid(uid).map_err(std::io::Error::from)
            });
        }
        by_uid = Some(cmd.spawn().expect("spawn sleep as a sandbox uid"));
    }
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    assert!(!stale.exists(), "stale workdir kept");
    assert!(!s.root.join("local-7-0123456789abcdef.creds").exists());
    assert!(!s.data.join("buildlets").exists(), "legacy workdirs kept");
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(st) = by_cwd.try_wait().expect("wait") {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the process working in a stale workdir was not killed");
    assert!(!status.success());
    if let Some(mut p) = by_uid {
        let status = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(st) = p.try_wait().expect("wait") {
                    return st;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the process running as a sandbox uid was not killed");
        assert!(!status.success());
    }
    // The farm still works after cleaning up.
    let inst = create(&farm);
    let (code, out, err) = run_gomote(&farm, &["run", &inst, "--", "echo", "hello"]);
    assert_eq!((code, out.as_str()), (Some(0), "hello\n"), "{err}");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bwrap_mode_without_bwrap_refuses_to_start() {
    let s = setup("", GOMOTE_ONLY);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .arg("--config")
            .arg(&s.cfg)
            .arg("--buildlet")
            .arg(buildlet_bin())
            .env("PATH", s.tmp.path().join("no-such-bin"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("coordinator exits")
    .expect("run coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without bwrap: {stderr}");
    assert!(
        stderr.contains("no `bwrap` was found on PATH") && stderr.contains("bubblewrap"),
        "{stderr}"
    );
    // Nothing was started: no workdir root was made.
    assert!(!s.root.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writable_path_inside_the_workdir_root_is_refused_and_nothing_is_removed() {
    let s = setup("writable_paths = [\"@ROOT@/shared\"]", GOMOTE_ONLY);
    // What a start would delete if it went ahead: the root is emptied at start-up.
    let shared = s.root.join("shared");
    std::fs::create_dir_all(&shared).expect("mkdir");
    std::fs::write(shared.join("precious"), "x").expect("write");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&s.cfg)
        .arg("--buildlet")
        .arg(buildlet_bin())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("sandbox.writable_paths[0]") && stderr.contains("workdir root"),
        "{stderr}"
    );
    assert!(shared.join("precious").exists());
}
