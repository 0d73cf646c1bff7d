//! Contained process trees, against the real buildlet binary over TLS: processes a
//! command detaches (`setsid`, double fork, `nohup setsid`) die when the command ends,
//! is cancelled, on Halt and on SIGTERM, with cgroups (`--cgroup auto`, and an explicit
//! v1 hierarchy) and without (`--cgroup none`: subreaper and exec marker). After a
//! SIGKILL of the buildlet, its reported cgroup lets a supervisor kill the leftovers,
//! and a buildlet restarted on the same workdir kills them. No zombie children remain.
//!
//! Each escaped process runs `sleep <marker>`, where the marker is a unique duration
//! (`300.0<digits>`), so it is found by its command line in /proc.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use buildlet::client::{BuildletClient, ExecEvent, ExecSpec, ExecStream};
use common::*;
use futures::StreamExt;

/// How long leftovers get to disappear (the machine is loaded).
const GONE_WITHIN: Duration = Duration::from_secs(10);

/// A unique `sleep` duration that identifies one escaped process.
fn marker() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "300.0{}{:03}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// The ways a command detaches a process from its process group.
const ESCAPES: [&str; 3] = [
    "setsid sh -c 'sleep {M}' &",
    "(sh -c 'sleep {M}' &) &",
    "nohup setsid sleep {M} &",
];

/// Live processes whose command line contains `marker`.
fn procs_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(marker) && state_of(pid) != Some('Z') {
            out.push(pid);
        }
    }
    out
}

/// The `sleep <marker>` process itself (not a shell whose script mentions it).
fn sleeper(marker: &str) -> Option<i32> {
    procs_with(marker).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c == format!("sleep\0{marker}\0").into_bytes())
            .unwrap_or(false)
    })
}

fn stat_fields(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

fn state_of(pid: i32) -> Option<char> {
    stat_fields(pid).map(|(s, _)| s)
}

/// Zombie children of `parent`.
fn zombie_children(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat_fields(*pid) == Some(('Z', parent)))
        .collect()
}

/// Kills what a failed test left, so a failure does not leave sleepers for 5 minutes.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.0 {
            for pid in procs_with(m) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

async fn start(mode: &[&str]) -> TestBuildlet {
    TestBuildlet::start_full(Options::default(), mode, None).await
}

fn pid_of(b: &TestBuildlet) -> i32 {
    b.child.id().expect("buildlet pid") as i32
}

/// Runs a script that starts each escape in `escapes` (with its own marker), prints
/// "started", and then waits for the file `go` in the workdir. Returns the stream once
/// every escaped sleeper is running.
async fn run_escapes(c: &BuildletClient, escapes: &[&str], markers: &[String]) -> ExecStream {
    let mut script = String::new();
    for (e, m) in escapes.iter().zip(markers) {
        script.push_str(&e.replace("{M}", m));
        script.push('\n');
    }
    script.push_str("echo started\nwhile [ ! -e go ]; do sleep 0.05; done\n");
    let mut s = c
        .exec(ExecSpec::new("sh").args(["-c", &script]))
        .await
        .expect("exec");
    let mut out = String::new();
    while !out.contains("started") {
        match tokio::time::timeout(Duration::from_secs(30), s.next()).await {
            Ok(Some(Ok(ExecEvent::Output { data, .. }))) => {
                out.push_str(&String::from_utf8_lossy(&data))
            }
            other => panic!("command did not start: {other:?} (output {out:?})"),
        }
    }
    for m in markers {
        assert!(
            eventually(Duration::from_secs(10), || sleeper(m).is_some()).await,
            "escaped sleeper {m} never ran"
        );
    }
    s
}

async fn assert_gone(b: &TestBuildlet, markers: &[String], after: &str) {
    for m in markers {
        let gone = eventually(GONE_WITHIN, || procs_with(m).is_empty()).await;
        assert!(
            gone,
            "{after}: processes with {m} remain: {:?}\n{}",
            procs_with(m),
            b.log()
        );
    }
}

async fn assert_no_zombies(b: &TestBuildlet) {
    let pid = pid_of(b);
    let clean = eventually(GONE_WITHIN, || zombie_children(pid).is_empty()).await;
    assert!(
        clean,
        "zombie children of the buildlet: {:?}",
        zombie_children(pid)
    );
}

/// Each escape, one command each: gone once the command ended normally.
async fn command_end(mode: &[&str]) {
    let b = start(mode).await;
    let c = b.client().await;
    for escape in ESCAPES {
        let markers = vec![marker()];
        let _cleanup = Cleanup(markers.clone());
        let mut s = run_escapes(&c, &[escape], &markers).await;
        std::fs::write(b.workdir.join("go"), "").expect("write go");
        let mut exit = None;
        // The escapees hold the output pipes: the stream must still end promptly.
        let drained = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(ev) = s.next().await {
                if let Ok(ExecEvent::Exit(st)) = ev {
                    exit = Some(st);
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "{escape}: stream did not end\n{}", b.log());
        // The escapees held the pipes; they were killed rather than waited out.
        assert!(
            !b.log().contains("output still open"),
            "{escape}: draining waited for escaped processes\n{}",
            b.log()
        );
        let exit = exit.unwrap_or_else(|| panic!("{escape}: no exit status"));
        assert_eq!(exit.code, Some(0), "{escape}: {exit:?}");
        assert_gone(&b, &markers, &format!("{escape} after the command ended")).await;
        assert!(
            eventually(GONE_WITHIN, || no_exec_cgroups_left(&b)).await,
            "exec cgroup left after {escape}"
        );
        std::fs::remove_file(b.workdir.join("go")).expect("remove go");
    }
    assert_no_zombies(&b).await;
}

/// Each escape, one command each: gone once the caller dropped the stream.
async fn cancelled(mode: &[&str]) {
    let b = start(mode).await;
    let c = b.client().await;
    for escape in ESCAPES {
        let markers = vec![marker()];
        let _cleanup = Cleanup(markers.clone());
        let s = run_escapes(&c, &[escape], &markers).await;
        drop(s);
        assert_gone(&b, &markers, &format!("{escape} after cancel")).await;
    }
    assert_no_zombies(&b).await;
    assert!(
        eventually(GONE_WITHIN, || no_exec_cgroups_left(&b)).await,
        "exec cgroups left in the container"
    );
}

fn no_exec_cgroups_left(b: &TestBuildlet) -> bool {
    // No exec cgroup left in the container (or no container at all).
    let Some(cg) = b.container_cgroup() else {
        return true;
    };
    std::fs::read_dir(cg)
        .map(|d| !d.flatten().any(|e| e.path().is_dir()))
        .unwrap_or(true)
}

/// All escapes in one command, then the buildlet stops (Halt or SIGTERM).
async fn buildlet_stops(mode: &[&str], sigterm: bool) {
    let mut b = start(mode).await;
    let c = b.client().await;
    let markers: Vec<String> = ESCAPES.iter().map(|_| marker()).collect();
    let _cleanup = Cleanup(markers.clone());
    let _s = run_escapes(&c, &ESCAPES, &markers).await;
    if sigterm {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid_of(&b)),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("sigterm");
    } else {
        c.halt().await.expect("halt");
    }
    let st = b.wait_exit(Duration::from_secs(60)).await;
    assert!(st.success(), "buildlet exit {st:?}\n{}", b.log());
    let how = if sigterm { "sigterm" } else { "halt" };
    assert_gone(&b, &markers, &format!("after {how}")).await;
    let cg = b.container_cgroup();
    assert_eq!(
        cg.is_some(),
        !mode.contains(&"none") && cgroups_usable(),
        "{}",
        b.log()
    );
    if let Some(cg) = cg {
        assert!(
            !cg.exists(),
            "container cgroup {} left after {how}",
            cg.display()
        );
    }
}

#[tokio::test]
async fn cgroup_auto_command_end_kills_escapees() {
    command_end(&[]).await;
}

#[tokio::test]
async fn cgroup_auto_cancel_kills_escapees() {
    cancelled(&[]).await;
}

#[tokio::test]
async fn cgroup_auto_halt_kills_escapees() {
    buildlet_stops(&[], false).await;
}

#[tokio::test]
async fn cgroup_auto_sigterm_kills_escapees() {
    buildlet_stops(&[], true).await;
}

#[tokio::test]
async fn fallback_command_end_kills_escapees() {
    command_end(&["--cgroup", "none"]).await;
}

#[tokio::test]
async fn fallback_cancel_kills_escapees() {
    cancelled(&["--cgroup", "none"]).await;
}

#[tokio::test]
async fn fallback_halt_kills_escapees() {
    buildlet_stops(&["--cgroup", "none"], false).await;
}

#[tokio::test]
async fn fallback_sigterm_kills_escapees() {
    buildlet_stops(&["--cgroup", "none"], true).await;
}

/// Whether this machine must have working cgroups for the test to mean anything:
/// CI, root, and a cgroup hierarchy mounted writable.
fn cgroups_required() -> bool {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let writable = [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/pids",
    ]
    .iter()
    .any(|d| {
        Path::new(d).join("cgroup.procs").exists()
            && nix::unistd::access(*d, nix::unistd::AccessFlags::W_OK).is_ok()
    });
    ci && root && writable
}

/// Whether the buildlet can make a cgroup here (as `--cgroup auto` would).
fn cgroups_usable() -> bool {
    buildlet::cgroup::usable_own_cgroup().is_ok()
}

/// The buildlet's reported cgroup, or None (with a note) where cgroups are unusable.
async fn reported_cgroup(c: &BuildletClient) -> Option<String> {
    let st = c.status().await.expect("status");
    if st.cgroup.is_empty() {
        assert_eq!(st.containment, "subreaper");
        assert!(
            !cgroups_required(),
            "CI, root and writable cgroups, yet the buildlet runs without one"
        );
        eprintln!("note: no usable cgroup here; skipping");
        return None;
    }
    assert!(
        st.containment.starts_with("cgroup v") && st.containment.ends_with(&st.cgroup),
        "{st:?}"
    );
    Some(st.cgroup)
}

/// Starts all escapes, then SIGKILLs the buildlet: the leftovers survive it (nothing
/// could kill them), which is what a supervisor and a restart must clean up. Returns
/// the cgroup the buildlet reported (None: no cgroup here, test skipped) with `need_cgroup`.
async fn sigkilled_with_leftovers(
    mode: &[&str],
    need_cgroup: bool,
) -> Option<(TestBuildlet, Vec<String>, String)> {
    let mut b = start(mode).await;
    let c = b.client().await;
    let cgroup = if need_cgroup {
        reported_cgroup(&c).await?
    } else {
        String::new()
    };
    let markers: Vec<String> = ESCAPES.iter().map(|_| marker()).collect();
    let cleanup = Cleanup(markers.clone());
    let _s = run_escapes(&c, &ESCAPES, &markers).await;
    b.child.start_kill().expect("sigkill");
    b.wait_exit(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for m in &markers {
        assert!(
            sleeper(m).is_some(),
            "{m} died with the buildlet: the test proves nothing"
        );
    }
    // The caller's own Cleanup takes over.
    std::mem::forget(cleanup);
    Some((b, markers, cgroup))
}

#[tokio::test]
async fn sigkill_supervisor_kills_the_reported_cgroup() {
    let Some((b, markers, cgroup)) = sigkilled_with_leftovers(&[], true).await else {
        return;
    };
    let _cleanup = Cleanup(markers.clone());
    // The supervisor's side: the reported path alone is enough.
    let cg = buildlet::cgroup::Cgroup::open(&cgroup).expect("open the reported cgroup");
    assert!(!cg.is_empty().expect("list"), "leftovers not in {cgroup}");
    cg.remove(Duration::from_secs(10)).expect("kill and remove");
    assert_gone(&b, &markers, "after the supervisor killed the cgroup").await;
}

#[tokio::test]
async fn sigkill_restart_on_the_same_workdir_kills_leftovers() {
    let Some((b, markers, _)) = sigkilled_with_leftovers(&[], true).await else {
        return;
    };
    let _cleanup = Cleanup(markers.clone());
    let again = TestBuildlet::start_full(Options::default(), &[], Some(&b.workdir)).await;
    assert_gone(&again, &markers, "after a restart on the same workdir").await;
    // And the restarted buildlet works.
    let st = again.client().await.status().await.expect("status");
    assert_eq!(st.running_commands, 0);
}

#[tokio::test]
async fn fallback_sigkill_restart_on_the_same_workdir_kills_leftovers() {
    let mode = ["--cgroup", "none"];
    let (b, markers, _) = sigkilled_with_leftovers(&mode, false)
        .await
        .expect("leftovers");
    let _cleanup = Cleanup(markers.clone());
    let _again = TestBuildlet::start_full(Options::default(), &mode, Some(&b.workdir)).await;
    assert_gone(&b, &markers, "after a fallback restart on the same workdir").await;
}

#[tokio::test]
async fn explicit_v1_pids_hierarchy_contains_commands() {
    let dir = "/sys/fs/cgroup/pids";
    if buildlet::cgroup::Cgroup::open(dir)
        .and_then(|cg| buildlet::cgroup::probe(&cg))
        .is_err()
    {
        assert!(
            !cgroups_required() || !Path::new(dir).exists(),
            "{dir} not usable"
        );
        eprintln!("note: {dir} not usable here; skipping");
        return;
    }
    let b = start(&["--cgroup", dir]).await;
    let st = b.client().await.status().await.expect("status");
    assert!(st.containment.starts_with("cgroup v1"), "{st:?}");
    assert!(st.cgroup.starts_with(dir), "{st:?}");
    drop(b);
    command_end(&["--cgroup", dir]).await;
}

#[tokio::test]
async fn unusable_cgroup_dirs_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_a_cgroup = dir.path().display().to_string();
    for (arg, says) in [
        ("relative", "relative"),
        (not_a_cgroup.as_str(), "not a cgroup"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_buildlet"))
            .args(["--listen", "127.0.0.1:0", "--workdir"])
            .arg(dir.path().join("work"))
            .args([
                "--auth-key-file",
                "/dev/null",
                "--tls-cert",
                "/nonexistent.crt",
            ])
            .args(["--tls-key", "/nonexistent.key", "--cgroup", arg])
            .output()
            .await
            .expect("run buildlet");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "--cgroup {arg}: {err}");
        assert!(
            err.contains("--cgroup") && err.contains(says),
            "--cgroup {arg}: {err}"
        );
    }
}

/// Fallback precision: the end of one command kills its own escapees, not those of a
/// command still running; an escapee that erased its marker dies once no command runs.
#[tokio::test]
async fn fallback_kills_only_the_finished_commands_escapees() {
    let b = start(&["--cgroup", "none"]).await;
    let c = b.client().await;
    let (long, short, unmarked) = (marker(), marker(), marker());
    let _cleanup = Cleanup(vec![long.clone(), short.clone(), unmarked.clone()]);
    // Waits for its own file, so the short command's `go` does not end it.
    let long_script =
        format!("setsid sleep {long} & echo started; while [ ! -e go-long ]; do sleep 0.05; done");
    let mut long_stream = c
        .exec(ExecSpec::new("sh").args(["-c", &long_script]))
        .await
        .expect("exec long");
    assert!(
        eventually(Duration::from_secs(10), || sleeper(&long).is_some()).await,
        "long sleeper never ran"
    );
    let escapes = [
        "setsid sleep {M} &",
        "env -u BUILDLET_EXEC_ID setsid sleep {M} >/dev/null 2>&1 &",
    ];
    let s = run_escapes(&c, &escapes, &[short.clone(), unmarked.clone()]).await;
    std::fs::write(b.workdir.join("go"), "").expect("write go");
    let _ = s.collect::<Vec<_>>().await;
    assert_gone(&b, std::slice::from_ref(&short), "after its command ended").await;
    assert!(
        sleeper(&long).is_some(),
        "the running command's escapee was killed by another command's end"
    );
    assert!(
        sleeper(&unmarked).is_some(),
        "an unmarked escapee is only attributed once no command runs"
    );
    std::fs::write(b.workdir.join("go-long"), "").expect("write go-long");
    while let Some(ev) = long_stream.next().await {
        ev.expect("long event");
    }
    assert_gone(&b, &[long, unmarked], "after the last command ended").await;
    assert_no_zombies(&b).await;
}

/// A `gomote ssh` session: what it detached dies when the session ends.
async fn shell_session_end(mode: &[&str]) {
    use buildlet::client::{ShellEvent, ShellStart};
    let b = start(mode).await;
    let c = b.client().await;
    let markers: Vec<String> = ESCAPES.iter().map(|_| marker()).collect();
    let _cleanup = Cleanup(markers.clone());
    let mut script = String::new();
    for (e, m) in ESCAPES.iter().zip(&markers) {
        // Detached from the terminal too, as a user hiding work would.
        script.push_str(
            &e.replace("{M}", m)
                .replace(" &", " </dev/null >/dev/null 2>&1 &"),
        );
        script.push('\n');
    }
    script.push_str("while [ ! -e go ]; do sleep 0.05; done\n");
    let (_w, mut r) = c
        .shell(ShellStart {
            argv: vec!["sh".into(), "-c".into(), script],
            rows: 24,
            cols: 80,
            term: "dumb".into(),
        })
        .await
        .expect("shell");
    for m in &markers {
        assert!(
            eventually(Duration::from_secs(10), || sleeper(m).is_some()).await,
            "escaped sleeper {m} never ran"
        );
    }
    std::fs::write(b.workdir.join("go"), "").expect("write go");
    let exit = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = r.next().await {
            if let Ok(ShellEvent::Exit(st)) = ev {
                return Some(st);
            }
        }
        None
    })
    .await
    .expect("shell did not end");
    assert_eq!(exit.expect("exit status").code, Some(0));
    assert_gone(&b, &markers, "after the shell session ended").await;
    assert_no_zombies(&b).await;
}

#[tokio::test]
async fn cgroup_auto_shell_session_end_kills_escapees() {
    shell_session_end(&[]).await;
}

#[tokio::test]
async fn fallback_shell_session_end_kills_escapees() {
    shell_session_end(&["--cgroup", "none"]).await;
}

/// A supervisor cleaning up may remove the container of a live buildlet: the next
/// command still gets a cgroup (the container is made again) and is contained.
#[tokio::test]
async fn a_removed_container_is_made_again() {
    let b = start(&[]).await;
    let Some(cg) = reported_cgroup(&b.client().await).await else {
        return;
    };
    buildlet::cgroup::Cgroup::open(&cg)
        .expect("open")
        .remove(Duration::from_secs(10))
        .expect("remove");
    assert!(!Path::new(&cg).exists());
    let c = b.client().await;
    let markers = vec![marker()];
    let _cleanup = Cleanup(markers.clone());
    let s = run_escapes(&c, &ESCAPES[..1], &markers).await;
    assert!(Path::new(&cg).is_dir(), "{cg} not made again");
    std::fs::write(b.workdir.join("go"), "").expect("write go");
    let _ = s.collect::<Vec<_>>().await;
    assert_gone(&b, &markers, "after the command ended").await;
}

/// The recipe for a supervisor running a buildlet as an unprivileged user: make a
/// cgroup, hand it over (chown), start the buildlet inside it (join, then drop
/// privileges, between fork and exec). The buildlet (`--cgroup auto`) contains its
/// commands in children of that cgroup, and the supervisor kills everything, leftovers
/// of a SIGKILLed buildlet included, by removing it.
#[tokio::test]
async fn an_unprivileged_buildlet_in_a_delegated_cgroup() {
    use buildlet::cgroup::{Cgroup, Hierarchy, own_cgroup, probe};
    const NOBODY: u32 = 65534;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("note: needs root to hand a cgroup to another user; skipping");
        return;
    }
    let base = match own_cgroup(Hierarchy::V2) {
        Ok(Some(cg)) if probe(&cg).is_ok() => cg,
        _ => {
            assert!(!cgroups_required() || !Path::new("/sys/fs/cgroup/unified").exists());
            eprintln!("note: no writable cgroup v2 here; skipping");
            return;
        }
    };
    let delegated = base
        .create_child(&format!("buildlet-test-delegated-{}", std::process::id()))
        .expect("make the delegated cgroup");
    struct RemoveCgroup(Cgroup);
    impl Drop for RemoveCgroup {
        fn drop(&mut self) {
            let _ = self.0.remove(Duration::from_secs(10));
        }
    }
    let delegated = RemoveCgroup(delegated);
    delegated.0.chown(NOBODY, NOBODY).expect("chown");
    let procs = delegated.0.procs_file().expect("procs file");
    let opts = Options {
        copy_binary: true,
        ..Options::default()
    };
    let mut b = TestBuildlet::start_custom(opts, &[], None, |cmd, dir| {
        for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
            std::os::unix::fs::chown(e.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
        }
        // SAFETY: only open/write/close and set*id calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Join while still root: moving a process needs write access to the
                // common ancestor's cgroup.procs, which only root has.
                procs.join_current()?;
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
    .await;
    let c = b.client().await;
    let st = c.status().await.expect("status");
    let container = Path::new(&st.cgroup);
    assert!(
        container.starts_with(delegated.0.path()) && container != delegated.0.path(),
        "{st:?} not inside {}",
        delegated.0.path().display()
    );
    let uid = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
            })
    };
    assert_eq!(
        uid(pid_of(&b)),
        Some(NOBODY),
        "the buildlet is not unprivileged"
    );
    // Contained while unprivileged: an escape dies with its command.
    let markers = vec![marker()];
    let _cleanup = Cleanup(markers.clone());
    let s = run_escapes(&c, &ESCAPES[..1], &markers).await;
    std::fs::write(b.workdir.join("go"), "").expect("write go");
    let _ = s.collect::<Vec<_>>().await;
    assert_gone(&b, &markers, "unprivileged, after the command ended").await;
    std::fs::remove_file(b.workdir.join("go")).expect("remove go");
    // SIGKILL: the leftovers stay in the delegated cgroup until the supervisor acts.
    let markers = vec![marker()];
    let _cleanup2 = Cleanup(markers.clone());
    let _s = run_escapes(&c, &ESCAPES[..1], &markers).await;
    b.child.start_kill().expect("sigkill");
    b.wait_exit(Duration::from_secs(30)).await;
    let leftover = sleeper(&markers[0]).expect("leftover sleeper");
    assert_eq!(uid(leftover), Some(NOBODY));
    delegated
        .0
        .remove(Duration::from_secs(10))
        .expect("kill and remove");
    assert_gone(
        &b,
        &markers,
        "after the supervisor removed the delegated cgroup",
    )
    .await;
}

/// A supervisor that lost a buildlet (SIGKILL) and knows only its workdir and the
/// cgroup it was given kills what it left, with and without cgroups.
#[tokio::test]
async fn a_supervisor_kills_leftovers_by_workdir() {
    for mode in [&[][..], &["--cgroup", "none"][..]] {
        let (b, markers, _) = sigkilled_with_leftovers(mode, false)
            .await
            .expect("leftovers");
        let _cleanup = Cleanup(markers.clone());
        let base = b.container_cgroup().map(|cg| {
            buildlet::cgroup::Cgroup::open(cg.parent().expect("parent")).expect("open base")
        });
        let killed =
            buildlet::contain::kill_leftovers(&b.workdir, base.as_ref()).expect("kill leftovers");
        assert!(killed >= markers.len(), "{mode:?}: killed only {killed}");
        assert_gone(&b, &markers, &format!("{mode:?}: after kill_leftovers")).await;
        if let Some(cg) = b.container_cgroup() {
            assert!(!cg.exists(), "{} left", cg.display());
        }
    }
}
