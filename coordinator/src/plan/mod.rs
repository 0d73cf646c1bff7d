//! Plan builds: a builder whose steps use `requires`, `snapshot`, `restore`, `cache` or
//! `units` runs each step on its own buildlet of the builder's host type, steps whose
//! requirements passed in parallel (the order is the pure [`buildfarm_config::dag`]).
//! A step's output is logged whole when it ends, so parallel steps never interleave; a
//! sharded step's units are logged in unit order (`sharded`). A step that loses its
//! buildlet is retried alone on a fresh one, up to `max_attempts` times; the first failing
//! step ends the build (steps still running are dropped, releasing their buildlets).
//!
//! Parts: `prepare` (source, snapshots and caches on a buildlet), `sharded` (test units
//! over helper buildlets), `shards` (pure balancing and in-order merging), `units` (unit
//! listers), `workspace` (the coordinator's snapshot and cache store), `toolchain` (Go
//! toolchains published by one build and restored by others: misc-compile and subrepo
//! builders).

pub(crate) mod prepare;
pub(crate) mod sharded;
pub mod shards;
pub mod toolchain;
pub mod units;
pub mod workspace;

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use buildfarm_config::Step;
use buildfarm_config::dag::{Dag, Progress};
use buildfarm_store::{Build, BuildState};
use buildlet::client::ExecSpec;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::OwnedMutexGuard;
use tracing::warn;

use crate::dispatcher::Slot;
use crate::pool::{Lease, PoolError};
use crate::retry::store_op;
use crate::runner::{RunEnv, RunOutcome, SRC_DIR};
use workspace::{Pin, Workspaces};

/// How a step (or a try at it) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepEnd {
    Passed,
    /// The step's code failed; the build fails with this summary.
    Failed(String),
    /// The farm failed (lost buildlet, no buildlet); another try may pass.
    Infra(String),
    Cancelled,
}

/// A step's own log, written to the build's log in one piece when the step ends.
#[derive(Default)]
pub(crate) struct StepLog {
    buf: Vec<u8>,
}

impl StepLog {
    pub(crate) fn note(&mut self, line: &str) {
        self.buf
            .extend_from_slice(format!("[buildfarm] {line}\n").as_bytes());
    }

    pub(crate) fn append(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Moves what was written so far to the build's log.
    pub(crate) fn flush_to(&mut self, env: &RunEnv) {
        env.log.append(&std::mem::take(&mut self.buf));
    }
}

/// What every step of one plan build shares.
pub(crate) struct Ctx<'a> {
    pub(crate) env: &'a RunEnv,
    pub(crate) build: &'a Build,
    pub(crate) dag: Dag,
    pub(crate) ws: Arc<Workspaces>,
    /// Snapshots saved by this build's steps, by step; held until the build ends.
    snapshots: Mutex<HashMap<usize, Pin>>,
    /// The toolchain each step with `toolchain` restores, by step; set before any runs.
    toolchains: Mutex<HashMap<usize, toolchain::Resolved>>,
    /// The build's own dispatcher slot: one buildlet of the plan at a time holds it;
    /// every other one needs a helper slot.
    own_slot: Arc<tokio::sync::Mutex<()>>,
}

/// A buildlet leased for a plan step or shard, with the slot it counts against. The
/// lease is released before the slot, so the freed slot finds the buildlet back.
pub(crate) struct PlanLease {
    lease: Lease,
    _slot: Reservation,
}

/// Held only to be dropped with the lease.
enum Reservation {
    Own { _held: OwnedMutexGuard<()> },
    Helper { _slot: Slot },
}

impl Deref for PlanLease {
    type Target = Lease;
    fn deref(&self) -> &Lease {
        &self.lease
    }
}

impl Ctx<'_> {
    pub(crate) fn steps(&self) -> &[Step] {
        &self.env.builder.steps
    }

    pub(crate) fn snapshot_digest(&self, step: usize) -> Option<String> {
        lock(&self.snapshots).get(&step).map(|p| p.digest.clone())
    }

    pub(crate) fn keep_snapshot(&self, step: usize, pin: Pin) {
        lock(&self.snapshots).insert(step, pin);
    }

    pub(crate) fn toolchain(&self, step: usize) -> Option<toolchain::Resolved> {
        lock(&self.toolchains).get(&step).cloned()
    }

    /// Leases a buildlet of the builder's host type, bounded like the build: on the
    /// build's own slot when it is free, else on a helper slot the dispatcher grants
    /// only from spare capacity (queued work first).
    pub(crate) async fn acquire(&self) -> Result<PlanLease, StepEnd> {
        let env = self.env;
        let timeout = env.builder.build_timeout;
        let host_type = env.pool.host_type();
        let leased = async {
            let slot = tokio::select! {
                biased;
                held = self.own_slot.clone().lock_owned() => Reservation::Own { _held: held },
                slot = env.dispatcher.helper_slot(host_type, || env.pool.capacity()) => {
                    Reservation::Helper { _slot: slot }
                }
            };
            let lease = env.pool.acquire(&env.cancel).await?;
            Ok::<_, PoolError>(PlanLease { lease, _slot: slot })
        };
        let leased = tokio::select! {
            _ = env.cancel.cancelled() => return Err(StepEnd::Cancelled),
            r = tokio::time::timeout(timeout, leased) => r,
        };
        match leased {
            Ok(Ok(lease)) => Ok(lease),
            Ok(Err(PoolError::Cancelled)) => Err(StepEnd::Cancelled),
            Ok(Err(e)) => Err(StepEnd::Infra(e.to_string())),
            Err(_) => Err(StepEnd::Infra(format!(
                "no buildlet of host type {} within {}",
                self.env.builder.host_type,
                humantime::format_duration(timeout)
            ))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a plan build to an outcome. One store attempt covers the whole plan; steps
/// retried after infrastructure failures are noted in the log.
pub(crate) async fn run(env: &RunEnv, build: &Build) -> RunOutcome {
    if env.cancel.is_cancelled() {
        return env.cancelled();
    }
    let dag = match Dag::new(&env.builder.steps) {
        Ok(d) => d,
        Err(errors) => {
            let why = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            env.log.note(&format!("bad plan: {why}"));
            return RunOutcome::Finished(BuildState::Failed, format!("bad plan: {why}"));
        }
    };
    let n = dag.len();
    let label = format!("plan of {n} step{}", if n == 1 { "" } else { "s" });
    let attempt = match store_op("start_attempt", env.store_retry, &env.shutdown, || {
        env.store.start_attempt(&build.id, &label)
    })
    .await
    {
        None => return RunOutcome::Stopped,
        Some(Ok(a)) => a,
        Some(Err(e)) => return RunOutcome::AlreadyFinal(e.to_string()),
    };
    (env.on_attempt)(&label, attempt);
    env.log.note(&format!(
        "attempt {attempt} of {} {} at {}: a {label}, each on its own buildlet",
        build.builder, build.repo, build.rev
    ));
    let ctx = Ctx {
        env,
        build,
        dag,
        ws: env.workspaces.clone(),
        snapshots: Mutex::new(HashMap::new()),
        own_slot: Arc::new(tokio::sync::Mutex::new(())),
        toolchains: Mutex::new(HashMap::new()),
    };
    let timeout = env.builder.build_timeout;
    let end = tokio::select! {
        biased;
        _ = env.cancel.cancelled() => StepEnd::Cancelled,
        _ = tokio::time::sleep(timeout) => StepEnd::Failed(format!(
            "build timed out after {}",
            humantime::format_duration(timeout)
        )),
        // Pairing with a toolchain may wait for its build: no buildlet is held meanwhile.
        e = async {
            match toolchain::resolve_all(env, build).await {
                Ok(t) => {
                    *lock(&ctx.toolchains) = t;
                    env.reclaim_build_slot().await;
                    drive(&ctx).await
                }
                Err(end) => end,
            }
        } => e,
    };
    drop(ctx);
    if let Err(e) = env.workspaces.prune(SystemTime::now()).await {
        warn!(error = %format!("{e:#}"), "pruning snapshots and caches");
    }
    match end {
        StepEnd::Passed => RunOutcome::Finished(BuildState::Ok, format!("{label} passed")),
        StepEnd::Failed(why) => RunOutcome::Finished(BuildState::Failed, why),
        StepEnd::Cancelled => env.cancelled(),
        StepEnd::Infra(why) => {
            if env.shutdown.is_cancelled() {
                return RunOutcome::Stopped;
            }
            env.log.note(&format!("infrastructure failure: {why}"));
            if env
                .finish_infra_attempt(&build.id, attempt, &why)
                .await
                .is_none()
            {
                return RunOutcome::Stopped;
            }
            RunOutcome::Finished(BuildState::InfraFailure, format!("infra failure: {why}"))
        }
    }
}

/// Starts every step whose requirements passed, until all passed or one did not.
async fn drive(ctx: &Ctx<'_>) -> StepEnd {
    let mut progress = Progress::new(&ctx.dag);
    let mut running = FuturesUnordered::new();
    loop {
        for i in progress.ready(&ctx.dag) {
            progress.start(i);
            running.push(async move {
                let started = std::time::Instant::now();
                (i, step(ctx, i).await, started.elapsed())
            });
        }
        let Some((i, end, took)) = running.next().await else {
            break;
        };
        let name = ctx.dag.name(i);
        match end {
            StepEnd::Passed => {
                progress.finish(i, true);
                ctx.env
                    .log
                    .note(&format!("step {name} passed in {:.1}s", took.as_secs_f64()));
            }
            StepEnd::Failed(why) => {
                progress.finish(i, false);
                ctx.env.log.note(&format!("step {name} failed: {why}"));
                // Steps still running are dropped with their buildlets.
                return StepEnd::Failed(why);
            }
            other => return other,
        }
    }
    if progress.all_passed() {
        StepEnd::Passed
    } else {
        StepEnd::Failed("steps left unrun".into())
    }
}

/// Runs step `i` on a fresh buildlet, again on another one after an infrastructure
/// failure, up to `max_attempts` tries.
async fn step(ctx: &Ctx<'_>, i: usize) -> StepEnd {
    let env = ctx.env;
    let name = ctx.dag.name(i);
    let max = env.max_attempts.max(1);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let end = match ctx.acquire().await {
            Err(end) => end,
            Ok(lease) => {
                env.log
                    .note(&format!("step {name} started on {}", lease.name));
                if ctx.steps()[i].units.is_some() {
                    sharded::run(ctx, i, lease).await
                } else {
                    let mut log = StepLog::default();
                    let end = tokio::select! {
                        biased;
                        _ = lease.lost.cancelled() => {
                            StepEnd::Infra(format!("buildlet {} lost", lease.name))
                        }
                        e = plain(ctx, i, &lease, &mut log) => e,
                    };
                    log.flush_to(env);
                    end
                }
            }
        };
        match end {
            StepEnd::Infra(why) if tries < max && !env.cancel.is_cancelled() => {
                env.log.note(&format!(
                    "step {name}: infrastructure failure ({why}); running it again on another buildlet ({tries} of {max} tries used)"
                ));
                let pause = env.attempt_backoff.delay(tries, rand::random());
                tokio::select! {
                    _ = env.cancel.cancelled() => return StepEnd::Cancelled,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            other => return other,
        }
    }
}

/// A step without units: prepare, run the command, save the snapshot and cache.
async fn plain(ctx: &Ctx<'_>, i: usize, lease: &Lease, log: &mut StepLog) -> StepEnd {
    let s = &ctx.steps()[i];
    let cache = match prepare::prepare(ctx, i, lease, log).await {
        Ok(c) => c,
        Err(end) => return end,
    };
    let Some((cmd, args)) = s.command.split_first() else {
        return StepEnd::Failed(format!("step {} has no command", s.name));
    };
    log.note(&format!("step {}: {}", s.name, s.command.join(" ")));
    let mut spec = ExecSpec::new(cmd.clone())
        .args(args.iter().cloned())
        .dir(SRC_DIR)
        .timeout(s.timeout);
    spec.env = prepare::step_env(ctx, s);
    spec.path = s.path.clone();
    let started = std::time::Instant::now();
    let status = lease
        .client
        .exec_collect(spec, |_, data| log.append(data))
        .await;
    let st = match status {
        Err(e) => return StepEnd::Infra(format!("step {}: {e}", s.name)),
        Ok(st) => st,
    };
    log.note(&format!(
        "step {}: command took {:.1}s",
        s.name,
        started.elapsed().as_secs_f64()
    ));
    if let Some(why) = exit_problem(&s.name, s.timeout, &st) {
        return why;
    }
    if let Err(end) = prepare::save_snapshot(ctx, i, lease, log).await {
        return end;
    }
    prepare::save_cache(ctx, i, cache, lease, log).await;
    StepEnd::Passed
}

/// What a finished command's status means for its step: `None` when it passed.
pub(crate) fn exit_problem(
    name: &str,
    timeout: std::time::Duration,
    st: &buildlet::client::ExitStatus,
) -> Option<StepEnd> {
    if st.timed_out {
        return Some(StepEnd::Failed(format!(
            "step {name} timed out after {}",
            humantime::format_duration(timeout)
        )));
    }
    if let Some(err) = st.error.as_deref().filter(|e| !e.is_empty()) {
        return Some(StepEnd::Failed(format!(
            "step {name} could not start: {err}"
        )));
    }
    match (st.code, st.signal) {
        (Some(0), _) => None,
        (Some(code), _) => Some(StepEnd::Failed(format!(
            "step {name} exited with status {code}"
        ))),
        (None, Some(sig)) => Some(StepEnd::Failed(format!(
            "step {name} killed by signal {sig}"
        ))),
        (None, None) => Some(StepEnd::Infra(format!("step {name}: no exit status"))),
    }
}
