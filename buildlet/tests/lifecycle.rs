//! Interactive shells on a PTY, and shutting the buildlet down (Halt, SIGTERM) with
//! running commands killed and a clean exit.

mod common;

use std::time::Duration;

use buildlet::client::{ErrorCode, ExecEvent, ExecSpec, ShellEvent, ShellStart};
use common::*;
use futures::StreamExt;

#[tokio::test]
async fn shell_runs_commands_and_reports_the_exit_code() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let (w, mut r) = c
        .shell(ShellStart {
            argv: vec!["sh".into()],
            rows: 30,
            cols: 100,
            term: "dumb".into(),
        })
        .await
        .expect("shell");
    w.resize(40, 120).await.expect("resize");
    w.send_stdin("stty size; echo h''i; exit 7\n")
        .await
        .expect("stdin");
    let mut out = String::new();
    let exit = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = r.next().await {
            match ev.expect("shell event") {
                ShellEvent::Data(d) => out.push_str(&String::from_utf8_lossy(&d)),
                ShellEvent::Exit(st) => return Some(st),
            }
        }
        None
    })
    .await
    .expect("shell did not end");
    let st = exit.expect("no exit status");
    assert_eq!(st.code, Some(7), "{st:?}\n{out}");
    // The echoed input holds `h''i`; only the command's output has `hi` on its own line.
    assert!(
        out.contains("\nhi\r\n") || out.contains("hi\r\n"),
        "{out:?}"
    );
    assert!(out.contains("40 120"), "resize not applied: {out:?}");
    assert!(r.next().await.is_none(), "events after exit");
}

#[tokio::test]
async fn shell_reports_a_missing_program_as_an_exit_error() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let (_w, mut r) = c
        .shell(ShellStart {
            argv: vec!["no-such-shell-buildfarm".into()],
            ..Default::default()
        })
        .await
        .expect("shell");
    match r.next().await {
        Some(Ok(ShellEvent::Exit(st))) => {
            assert!(
                st.error.as_deref().unwrap_or("").contains("not found"),
                "{st:?}"
            )
        }
        other => panic!("expected an exit error, got {other:?}"),
    }
}

/// Starts a command that runs until killed and returns its process group id.
async fn start_sleeper(
    c: &buildlet::client::BuildletClient,
) -> (buildlet::client::ExecStream, i32) {
    let mut s = c
        .exec(ExecSpec::new("sh").args(["-c", "echo $$; sleep 300 & sleep 300"]))
        .await
        .expect("exec");
    let mut first = String::new();
    while !first.contains('\n') {
        match s.next().await {
            Some(Ok(ExecEvent::Output { data, .. })) => {
                first.push_str(&String::from_utf8_lossy(&data))
            }
            other => panic!("expected the pid, got {other:?}"),
        }
    }
    let pgid: i32 = first.trim().parse().expect("pid");
    assert!(
        eventually(Duration::from_secs(20), || group_members(pgid).len() >= 3).await,
        "group {pgid} never filled"
    );
    (s, pgid)
}

#[tokio::test]
async fn halt_answers_kills_commands_and_exits_zero() {
    let mut b = TestBuildlet::start().await;
    let c = b.client().await;
    let (mut running, pgid) = start_sleeper(&c).await;
    assert_eq!(c.status().await.expect("status").running_commands, 1);
    c.halt().await.expect("halt");
    // The running command is killed rather than hanging the shutdown, and its caller
    // learns the buildlet went away (a lost host, not a failed command: no exit status).
    let last = tokio::time::timeout(Duration::from_secs(30), async {
        let mut last = None;
        while let Some(ev) = running.next().await {
            last = Some(ev);
        }
        last
    })
    .await
    .expect("exec stream did not end");
    match last {
        Some(Err(e)) => {
            assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
            assert!(e.to_string().contains("shutting down"), "{e}");
        }
        other => panic!("expected the stream to end as unavailable, got {other:?}"),
    }
    let st = b.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(st.code(), Some(0), "{}", b.log());
    assert!(
        eventually(Duration::from_secs(30), || group_members(pgid).is_empty()).await,
        "group {pgid} survived halt"
    );
}

#[tokio::test]
async fn sigterm_stops_the_buildlet_cleanly() {
    let mut b = TestBuildlet::start().await;
    let c = b.client().await;
    let (_running, pgid) = start_sleeper(&c).await;
    let pid = b.child.id().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let st = b.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(st.code(), Some(0), "{}", b.log());
    assert!(
        eventually(Duration::from_secs(30), || group_members(pgid).is_empty()).await,
        "group {pgid} survived sigterm"
    );
}
