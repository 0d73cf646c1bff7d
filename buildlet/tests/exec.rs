//! Exec against the real buildlet binary over TLS: streamed output and exit status,
//! cancellation and timeouts killing the whole process group, start failures.

mod common;

use std::time::{Duration, Instant};

use buildlet::client::{EnvMode, ExecEvent, ExecSpec, OutputStream};
use common::*;
use futures::StreamExt;

#[tokio::test]
async fn exec_streams_stdout_and_stderr_then_one_exit_status() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let spec = ExecSpec::new("sh").args(["-c", "echo out1; echo err1 >&2; echo out2; exit 3"]);
    let mut events = Vec::new();
    let mut s = c.exec(spec).await.expect("exec");
    while let Some(ev) = s.next().await {
        events.push(ev.expect("event"));
    }
    let exits: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, ExecEvent::Exit(_)))
        .collect();
    assert_eq!(exits.len(), 1, "{events:?}");
    let Some(ExecEvent::Exit(status)) = events.last() else {
        panic!("last event is not the exit status: {events:?}");
    };
    assert_eq!(status.code, Some(3));
    assert_eq!(status.signal, None);
    assert!(!status.timed_out);
    assert!(!status.success());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for e in &events {
        if let ExecEvent::Output { stream, data } = e {
            match stream {
                OutputStream::Stdout => out.extend_from_slice(data),
                OutputStream::Stderr => err.extend_from_slice(data),
            }
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "out1\nout2\n");
    assert_eq!(String::from_utf8_lossy(&err), "err1\n");
}

#[tokio::test]
async fn output_arrives_while_the_command_runs() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let spec = ExecSpec::new("sh").args(["-c", "echo one; sleep 1; echo two"]);
    let mut s = c.exec(spec).await.expect("exec");
    let mut got_one = None;
    let mut exit_at = None;
    let mut out = String::new();
    while let Some(ev) = s.next().await {
        match ev.expect("event") {
            ExecEvent::Output { data, .. } => {
                out.push_str(&String::from_utf8_lossy(&data));
                if got_one.is_none() && out.contains("one") {
                    got_one = Some(Instant::now());
                }
            }
            ExecEvent::Exit(st) => {
                assert_eq!(st.code, Some(0));
                exit_at = Some(Instant::now());
            }
        }
    }
    let (one, exit) = (got_one.expect("saw one"), exit_at.expect("saw exit"));
    let gap = exit.duration_since(one);
    assert!(
        gap >= Duration::from_millis(500),
        "\"one\" arrived only {gap:?} before the exit status: output is not streamed"
    );
    assert_eq!(out, "one\ntwo\n");
}

/// Starts `sh -c 'echo $$; sleep 300 & sleep 300'` and returns the stream and the
/// process group id (the shell's pid), once the group has its sleepers.
async fn start_sleepers(
    c: &buildlet::client::BuildletClient,
    timeout: Option<Duration>,
) -> (buildlet::client::ExecStream, i32) {
    let mut spec = ExecSpec::new("sh").args(["-c", "echo $$; sleep 300 & sleep 300"]);
    if let Some(t) = timeout {
        spec = spec.timeout(t);
    }
    let mut s = c.exec(spec).await.expect("exec");
    let mut first = String::new();
    while !first.contains('\n') {
        match s.next().await {
            Some(Ok(ExecEvent::Output { data, .. })) => {
                first.push_str(&String::from_utf8_lossy(&data))
            }
            other => panic!("expected the pid first, got {other:?}"),
        }
    }
    let pgid: i32 = first.trim().parse().expect("pid");
    assert!(
        eventually(Duration::from_secs(20), || group_members(pgid).len() >= 3).await,
        "the shell and both sleeps never showed up in group {pgid}: {:?}",
        group_members(pgid)
    );
    (s, pgid)
}

#[tokio::test]
async fn dropping_the_stream_kills_the_whole_process_group() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let (s, pgid) = start_sleepers(&c, None).await;
    drop(s);
    assert!(
        eventually(Duration::from_secs(30), || group_members(pgid).is_empty()).await,
        "processes of group {pgid} survived cancellation: {:?}",
        group_members(pgid)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running = c.status().await.expect("status").running_commands;
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status still counts {running} commands"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let (mut s, pgid) = start_sleepers(&c, Some(Duration::from_millis(1500))).await;
    let mut exit = None;
    while let Some(ev) = s.next().await {
        if let ExecEvent::Exit(st) = ev.expect("event") {
            exit = Some(st);
        }
    }
    let st = exit.expect("exit status");
    assert!(st.timed_out, "{st:?}");
    assert_eq!(st.signal, Some(9), "{st:?}");
    assert_eq!(st.code, None);
    assert!(
        eventually(Duration::from_secs(30), || group_members(pgid).is_empty()).await,
        "processes of group {pgid} survived the timeout: {:?}",
        group_members(pgid)
    );
}

#[tokio::test]
async fn command_not_found_is_an_exit_error_not_a_call_failure() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    for cmd in ["no-such-command-buildfarm", "./missing-script.sh"] {
        let st = c
            .exec_collect(ExecSpec::new(cmd), |_, _| {})
            .await
            .unwrap_or_else(|e| panic!("{cmd}: call failed: {e}"));
        let err = st.error.clone().unwrap_or_default();
        assert!(
            err.contains("not found") || err.contains("No such file"),
            "{cmd}: {st:?}"
        );
        assert!(err.contains(cmd.trim_start_matches("./")), "{cmd}: {err}");
        assert_eq!(st.code, None);
        assert!(!st.success());
    }
}

#[tokio::test]
async fn env_dir_and_path_are_applied() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    c.write_file(
        "sub/bin/hello",
        0o755,
        "#!/bin/sh\necho hello-from-workdir\n",
    )
    .await
    .expect("write script");
    let spec = ExecSpec::new("sh")
        .args([
            "-c",
            "pwd; echo $FOO; echo $TMPDIR; echo ${USER:-unset}; hello",
        ])
        .dir("sub")
        .env("FOO", "bar")
        .env_mode(EnvMode::Replace)
        .path(["$WORKDIR/sub/bin", "/usr/bin", "/bin"]);
    let mut out = Vec::new();
    let st = c
        .exec_collect(spec, |_, d| out.extend_from_slice(d))
        .await
        .expect("exec");
    assert_eq!(st.code, Some(0), "{}", String::from_utf8_lossy(&out));
    let wd = b.workdir.display();
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("{wd}/sub\nbar\n{wd}/tmp\nunset\nhello-from-workdir\n")
    );
    assert!(b.workdir.join("tmp").is_dir(), "TMPDIR was not created");
}
