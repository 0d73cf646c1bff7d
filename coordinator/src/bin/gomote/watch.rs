//! `gomote watch`: keep an instance's copy of a local tree current and re-run a
//! command on every save. Whether to run is decided by content, not by file events: a
//! burst of events is waited out (debounce), then the tree's digests are compared with
//! what was last pushed, so saving an unchanged file, touching an ignored one or
//! anything under `.git` runs nothing. `gomote try --watch` does the same for a whole
//! try run: the local changes of a checkout, as a patch on a commit.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use coordinator::client::{ApiError, ApiStream, ExecEvent, RunSpec, TryState};
use futures::StreamExt;
use notify::Watcher;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::sync::{TreeChanges, TreeDigests, remote_digests, send_changes, tree_digests};
use crate::{
    Client, describe_exit, print_state_changes, render_try, status_err, submit_try, write_output,
};

/// Quiet time before a new try run: saves of several files in an editor come within
/// it, and a try run costs far more than the wait.
const TRY_DEBOUNCE: Duration = Duration::from_millis(500);

/// However long saves keep coming, a run starts after this long.
const MAX_DEBOUNCE_WAIT: Duration = Duration::from_secs(5);

/// One run of the command in progress.
struct Run {
    number: u32,
    started: Instant,
    events: ApiStream<ExecEvent>,
}

/// Syncs `src` into `dest` of the instance, runs `request`, and again on every change
/// until Ctrl-C. Dropping a run's stream cancels it: the buildlet kills its processes.
pub async fn watch(
    c: &mut Client,
    src: &Path,
    dest: &str,
    instance: &str,
    request: RunSpec,
    debounce: Duration,
) -> Result<ExitCode> {
    let src = std::fs::canonicalize(src).with_context(|| format!("watching {}", src.display()))?;
    let (_watcher, mut saves) = watch_tree(&src)?;

    // The first push mirrors the tree (removing what else is in `dest`); later ones
    // send the difference from the last push, so files the command writes stay.
    let remote = remote_digests(c, instance, dest).await?;
    let mut pushed = tree_digests(&src)?;
    let first = TreeChanges::between(&remote, &pushed);
    send_changes(c, instance, &src, dest, &first).await?;
    let mut runs = 0u32;
    let mut run = Some(start(c, instance, &request, &mut runs, &first).await?);
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
                if let Err(e) = send_changes(c, instance, &src, dest, &changes).await {
                    // Kept as not pushed: the next save sends it again.
                    eprintln!("gomote: {e:#}");
                    continue;
                }
                pushed = now;
                run = Some(start(c, instance, &request, &mut runs, &changes).await?);
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

/// Follows `src` (but its `.git`) for changes; each one sends `()`. Watching stops
/// when the watcher is dropped.
fn watch_tree(src: &Path) -> Result<(notify::RecommendedWatcher, UnboundedReceiver<()>)> {
    let (tx, saves) = tokio::sync::mpsc::unbounded_channel::<()>();
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
        .watch(src, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", src.display()))?;
    Ok((watcher, saves))
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
    instance: &str,
    request: &RunSpec,
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
        .exec(instance, request.clone())
        .await
        .map_err(|e| status_err("run", e))?;
    Ok(Run {
        number: *runs,
        started: Instant::now(),
        events,
    })
}

/// The next event of the run in progress; never ready when there is none.
async fn next_event(run: &mut Option<Run>) -> Option<Result<ExecEvent, ApiError>> {
    match run {
        Some(r) => r.events.next().await,
        None => std::future::pending().await,
    }
}

/// Writes output; for the end of a run, says how it ended. A run that cannot go on
/// (the instance is gone) ends the watch with its error.
fn handle_event(ev: Option<Result<ExecEvent, ApiError>>) -> Result<Option<String>> {
    match ev {
        Some(Ok(ExecEvent::Output { stream, data })) => {
            write_output(stream, &data)?;
            Ok(None)
        }
        Some(Ok(ExecEvent::Exit(x))) => Ok(Some(match &x.error {
            None => describe_exit(&x).1,
            Some(error) => format!("did not start: {error}"),
        })),
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

/// One try run in progress under `gomote try --watch`.
struct TryRun {
    number: u32,
    id: String,
    started: Instant,
    states: ApiStream<TryState>,
    last: Option<TryState>,
}

/// `gomote try --watch`: a try run of `rev` with the local changes of the checkout
/// `src`, and a new one (the old one cancelled) whenever those changes change.
pub async fn watch_try(
    c: &mut Client,
    src: &Path,
    repo: &str,
    rev: &str,
    builders: &[String],
) -> Result<ExitCode> {
    let src = std::fs::canonicalize(src).with_context(|| format!("watching {}", src.display()))?;
    // The coordinator must build what the diff was made against, whatever the local
    // name `rev` means there.
    let commit = git_text(
        &src,
        None,
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )
    .await
    .with_context(|| format!("{rev} in {}", src.display()))?;
    let (_watcher, mut saves) = watch_tree(&src)?;
    eprintln!(
        "gomote: try runs of {repo} at {} with the local changes of {}",
        &commit[..commit.len().min(12)],
        src.display()
    );
    let mut patch = local_patch(&src, &commit).await?;
    let mut runs = 0u32;
    let mut current = start_try(c, repo, &commit, builders, &patch, &mut runs).await;
    loop {
        tokio::select! {
            state = next_state(&mut current) => {
                let r = current.as_mut().context("a state without a try run")?;
                match state {
                    Some(Ok(state)) => {
                        print_state_changes(r.last.as_ref(), &state);
                        let done = state.done;
                        r.last = Some(state);
                        if done {
                            let r = current.take().context("finished try run")?;
                            let state = r.last.context("finished try run's state")?;
                            eprint!("{}", render_try(&state));
                            banner(&format!(
                                "try {} ({}): verdict {} after {}",
                                r.number,
                                r.id,
                                state.verdict,
                                secs(r.started)
                            ));
                            eprintln!("gomote: watching {} for changes (Ctrl-C to stop)", src.display());
                        }
                    }
                    Some(Err(status)) => return Err(status_err("try (watch)", status)),
                    None => {
                        banner(&format!("try {} ({}): the coordinator ended the watch", r.number, r.id));
                        current = None;
                    }
                }
            }
            Some(()) = saves.recv() => {
                wait_quiet(&mut saves, TRY_DEBOUNCE).await;
                let now = match local_patch(&src, &commit).await {
                    Ok(now) => now,
                    Err(e) => {
                        eprintln!("gomote: {e:#}");
                        continue;
                    }
                };
                if now == patch {
                    continue;
                }
                patch = now;
                if let Some(r) = current.take() {
                    cancel_try(c, &r, "the tree changed").await;
                }
                current = start_try(c, repo, &commit, builders, &patch, &mut runs).await;
            }
            _ = tokio::signal::ctrl_c() => {
                if let Some(r) = current.take() {
                    cancel_try(c, &r, "stopped watching").await;
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// Submits and starts following a try run; a refusal (a patch that does not apply, a
/// full queue) is said and the watch goes on until the next change.
async fn start_try(
    c: &mut Client,
    repo: &str,
    commit: &str,
    builders: &[String],
    patch: &[u8],
    runs: &mut u32,
) -> Option<TryRun> {
    *runs += 1;
    let number = *runs;
    let started = Instant::now();
    let submitted = async {
        let id = submit_try(c, repo, commit, builders, patch.to_vec()).await?;
        let states = c
            .watch_try(&id)
            .await
            .map_err(|e| status_err("try (watch)", e))?;
        anyhow::Ok((id, states))
    };
    match submitted.await {
        Ok((id, states)) => {
            banner(&format!(
                "try {number} ({id}): {} of local changes",
                if patch.is_empty() {
                    "none".to_owned()
                } else {
                    format!("a {}-byte patch", patch.len())
                }
            ));
            Some(TryRun {
                number,
                id,
                started,
                states,
                last: None,
            })
        }
        Err(e) => {
            banner(&format!("try {number} not started: {e:#}"));
            None
        }
    }
}

async fn cancel_try(c: &mut Client, r: &TryRun, why: &str) {
    let cancelled = c.cancel_try(&r.id).await;
    match cancelled {
        Ok(_) => banner(&format!(
            "try {} ({}) cancelled after {}: {why}",
            r.number,
            r.id,
            secs(r.started)
        )),
        Err(e) => eprintln!("gomote: {:#}", status_err("cancel", e)),
    }
}

async fn next_state(run: &mut Option<TryRun>) -> Option<Result<TryState, ApiError>> {
    match run {
        Some(r) => r.states.next().await,
        None => std::future::pending().await,
    }
}

/// The local changes of the checkout `src` against `commit` as a binary patch: tracked
/// and untracked files, leaving out what `.gitignore` names. A scratch index is used,
/// so the checkout's own index is not touched.
async fn local_patch(src: &Path, commit: &str) -> Result<Vec<u8>> {
    let scratch = tempfile::tempdir().context("scratch dir for a git index")?;
    let index = scratch.path().join("index");
    git_text(src, Some(&index), &["read-tree", commit]).await?;
    git_text(src, Some(&index), &["add", "--all", "."]).await?;
    git_output(
        src,
        Some(&index),
        &["diff", "--cached", "--binary", "--no-color", commit],
    )
    .await
}

async fn git_output(dir: &Path, index: Option<&Path>, args: &[&str]) -> Result<Vec<u8>> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("-C").arg(dir).args(args);
    if let Some(index) = index {
        cmd.env("GIT_INDEX_FILE", index);
    }
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running git {}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

async fn git_text(dir: &Path, index: Option<&Path>, args: &[&str]) -> Result<String> {
    let out = git_output(dir, index, args).await?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}
