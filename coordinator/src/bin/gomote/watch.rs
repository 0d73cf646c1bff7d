//! `gomote watch`: keep an instance's copy of a local tree current and re-run a
//! command on every save. Whether to run is decided by content, not by file events: a
//! burst of events is waited out (debounce), then the tree's digests are compared with
//! what was last pushed, so saving an unchanged file, touching an ignored one or
//! anything under `.git` runs nothing.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use buildfarm_proto::buildlet as bp;
use buildfarm_proto::coordinator as cp;
use futures::StreamExt;
use notify::Watcher;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::sync::{TreeChanges, TreeDigests, remote_digests, send_changes, tree_digests};
use crate::{Client, describe_exit, status_err, write_output};

/// However long saves keep coming, a run starts after this long.
const MAX_DEBOUNCE_WAIT: Duration = Duration::from_secs(5);

/// One run of the command in progress.
struct Run {
    number: u32,
    started: Instant,
    events: tonic::Streaming<bp::ExecEvent>,
}

/// Syncs `src` into `dest` of the instance, runs `request`, and again on every change
/// until Ctrl-C. Dropping a run's stream cancels it: the buildlet kills its processes.
pub async fn watch(
    c: &mut Client,
    src: &Path,
    dest: &str,
    request: cp::InstanceExecRequest,
    debounce: Duration,
) -> Result<ExitCode> {
    let src = std::fs::canonicalize(src).with_context(|| format!("watching {}", src.display()))?;
    let (tx, mut saves) = tokio::sync::mpsc::unbounded_channel::<()>();
    let git_dir = src.join(".git");
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let relevant = match &ev {
            // Reads (ours included, when digesting the tree) change nothing.
            Ok(ev) => {
                !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev.paths.iter().any(|p| !p.starts_with(&git_dir))
            }
            // A lost event (queue overflow): look at the tree again to be sure.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })
    .context("starting the file watcher")?;
    watcher
        .watch(&src, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", src.display()))?;

    // The first push mirrors the tree (removing what else is in `dest`); later ones
    // send the difference from the last push, so files the command writes stay.
    let remote = remote_digests(c, &request.instance, dest).await?;
    let mut pushed = tree_digests(&src)?;
    let first = TreeChanges::between(&remote, &pushed);
    send_changes(c, &request.instance, &src, dest, &first).await?;
    let mut runs = 0u32;
    let mut run = Some(start(c, &request, &mut runs, &first).await?);
    loop {
        tokio::select! {
            ev = next_event(&mut run) => {
                if let Some(ended) = handle_event(ev)? {
                    let r = run.take().context("an event without a run")?;
                    banner(&format!("run {} {ended} after {}", r.number, secs(r.started)));
                    eprintln!("gomote: watching {} for changes (Ctrl-C to stop)", src.display());
                }
            }
            Some(()) = saves.recv() => {
                wait_quiet(&mut saves, debounce).await;
                let Some((now, changes)) = look(&src, &pushed) else { continue };
                if let Some(r) = run.take() {
                    drop(r.events);
                    banner(&format!(
                        "run {} cancelled after {}: the tree changed",
                        r.number,
                        secs(r.started)
                    ));
                }
                if let Err(e) = send_changes(c, &request.instance, &src, dest, &changes).await {
                    // Kept as not pushed: the next save sends it again.
                    eprintln!("gomote: {e:#}");
                    continue;
                }
                pushed = now;
                run = Some(start(c, &request, &mut runs, &changes).await?);
            }
            _ = tokio::signal::ctrl_c() => {
                if let Some(r) = run.take() {
                    drop(r.events);
                    banner(&format!("run {} cancelled: stopped watching", r.number));
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// The tree now and what changed since `pushed`, or None when nothing did (or the tree
/// cannot be read right now, which is said).
fn look(src: &Path, pushed: &TreeDigests) -> Option<(TreeDigests, TreeChanges)> {
    match tree_digests(src) {
        Ok(now) => {
            let changes = TreeChanges::between(pushed, &now);
            (!changes.is_empty()).then_some((now, changes))
        }
        Err(e) => {
            eprintln!("gomote: {e:#}");
            None
        }
    }
}

async fn start(
    c: &mut Client,
    request: &cp::InstanceExecRequest,
    runs: &mut u32,
    changes: &TreeChanges,
) -> Result<Run> {
    *runs += 1;
    banner(&format!(
        "run {}: pushed {} changed file(s), removed {}",
        runs,
        changes.changed.len(),
        changes.gone.len()
    ));
    let events = c
        .exec(request.clone())
        .await
        .map_err(|e| status_err("run", e))?
        .into_inner();
    Ok(Run {
        number: *runs,
        started: Instant::now(),
        events,
    })
}

/// The next event of the run in progress; never ready when there is none.
async fn next_event(run: &mut Option<Run>) -> Option<Result<bp::ExecEvent, tonic::Status>> {
    match run {
        Some(r) => r.events.next().await,
        None => std::future::pending().await,
    }
}

/// Writes output; for the end of a run, says how it ended. A run that cannot go on
/// (the instance is gone) ends the watch with its error.
fn handle_event(ev: Option<Result<bp::ExecEvent, tonic::Status>>) -> Result<Option<String>> {
    match ev {
        Some(Ok(bp::ExecEvent {
            event: Some(bp::exec_event::Event::Output(o)),
        })) => {
            write_output(&o)?;
            Ok(None)
        }
        Some(Ok(bp::ExecEvent {
            event: Some(bp::exec_event::Event::Exit(x)),
        })) => Ok(Some(if x.error.is_empty() {
            describe_exit(&x).1
        } else {
            format!("did not start: {}", x.error)
        })),
        Some(Ok(bp::ExecEvent { event: None })) => Ok(None),
        Some(Err(status)) => Err(status_err("run", status)),
        None => anyhow::bail!("run: the stream ended without an exit status (buildlet lost?)"),
    }
}

/// Waits until no save has come for `debounce` (or [`MAX_DEBOUNCE_WAIT`] has passed).
async fn wait_quiet(saves: &mut UnboundedReceiver<()>, debounce: Duration) {
    let deadline = Instant::now() + MAX_DEBOUNCE_WAIT;
    while Instant::now() < deadline {
        match tokio::time::timeout(debounce, saves.recv()).await {
            Ok(Some(())) => continue,
            _ => return,
        }
    }
}

fn banner(text: &str) {
    eprintln!("── gomote watch: {text} ──");
}

fn secs(since: Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}
