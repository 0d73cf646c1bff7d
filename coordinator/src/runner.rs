//! The build runner: for one build, lease a buildlet, push the source, run the
//! builder's steps with output streamed to the live log, and return how it ended. It
//! gets a narrow environment ([`RunEnv`]) and records only attempts; the farm records
//! the result. A lost buildlet or a pool that cannot provide one is an infra failure
//! of the attempt: the build is retried on a fresh buildlet up to `max_attempts` times.
//! Store writes are retried with backoff until they succeed or the coordinator stops.

use std::sync::Arc;

use buildfarm_config::{Builder, Config};
use buildfarm_store::{Build, BuildKind, BuildState, Store};
use buildlet::client::ExecSpec;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::git::Mirror;
use crate::logs::LiveLog;
use crate::pool::{Lease, Pool, PoolError};
use crate::retry::{Backoff, store_op};
use crate::sources::SourceCache;

/// How one attempt ended.
pub(crate) enum Outcome {
    /// The build has a result (ok or failed); `summary` says why.
    Done(BuildState, String),
    /// The infrastructure failed; another attempt may succeed.
    Infra(String),
    Cancelled,
}

/// How a run ended, for the farm to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// A final result: ok, failed, infra failure after the last attempt, cancelled.
    Finished(BuildState, String),
    /// The coordinator is stopping: the build stays unfinished in the store so the next
    /// coordinator resumes it.
    Stopped,
    /// The store says the build is already final (e.g. cancelled there): nothing to do.
    AlreadyFinal(String),
}

/// Called when an attempt starts on a buildlet: (buildlet name, attempt number).
pub type AttemptHook = Box<dyn Fn(&str, u32) + Send + Sync>;

/// Everything a run may touch.
pub struct RunEnv {
    pub store: Arc<dyn Store>,
    pub sources: Arc<SourceCache>,
    /// The build's repo; `None` fails the build ("unknown repo").
    pub mirror: Option<Mirror>,
    pub pool: Arc<dyn Pool>,
    pub builder: Builder,
    /// The host type's and builder's env (see [`builder_env`]).
    pub base_env: Vec<(String, String)>,
    pub log: Arc<LiveLog>,
    pub max_attempts: u32,
    /// Files to keep once the steps pass, and where they go; `None` keeps none.
    pub collect: Option<(
        crate::artifacts::CollectSpec,
        Arc<crate::artifacts::Artifacts>,
    )>,
    /// Cancelled by a user's cancel, and by shutdown (it is a child of `shutdown`).
    pub cancel: CancellationToken,
    pub shutdown: CancellationToken,
    pub store_retry: Backoff,
    /// The pause between attempts, so a crash-looping pool doesn't spin.
    pub attempt_backoff: Backoff,
    pub on_attempt: AttemptHook,
    /// Snapshots and caches of plan steps.
    pub workspaces: Arc<crate::plan::workspace::Workspaces>,
    /// Where a plan build gets slots for buildlets beyond its own.
    pub dispatcher: Arc<crate::dispatcher::Dispatcher>,
    /// The build's own dispatcher slot. A plan build waiting for another build (a Go
    /// toolchain) gives it back meanwhile, so the build it waits for can get one.
    pub build_slot: std::sync::Mutex<Option<crate::dispatcher::Slot>>,
    /// The build's repo's `go` pairing: which Go repo and branch a step with `toolchain`
    /// takes its toolchain from (`None`: the build's own commit).
    pub go_pairing: Option<buildfarm_config::GoPairing>,
}

/// Where the source goes in the buildlet's workdir; steps run there.
pub(crate) const SRC_DIR: &str = "src";

impl RunEnv {
    /// Gives the build's slot back to the dispatcher while it waits on other builds.
    pub(crate) fn release_build_slot(&self) {
        let slot = self
            .build_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(slot);
    }

    /// Takes a slot again after [`RunEnv::release_build_slot`] (at once if still held).
    pub(crate) async fn reclaim_build_slot(&self) {
        let held = self
            .build_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if held {
            return;
        }
        let pool = self.pool.clone();
        let slot = self
            .dispatcher
            .returning_slot(self.pool.host_type(), || pool.capacity())
            .await;
        *self.build_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
    }

    pub(crate) fn cancelled(&self) -> RunOutcome {
        if self.shutdown.is_cancelled() {
            RunOutcome::Stopped
        } else {
            self.log.note("cancelled");
            RunOutcome::Finished(BuildState::Cancelled, "cancelled".into())
        }
    }

    /// Records an attempt that never got a buildlet, so the store counts it.
    async fn record_failed_attempt(&self, build_id: &str, why: &str) -> Option<()> {
        let n = match store_op("start_attempt", self.store_retry, &self.shutdown, || {
            self.store.start_attempt(build_id, "none")
        })
        .await?
        {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "recording a failed attempt");
                return Some(());
            }
        };
        self.finish_infra_attempt(build_id, n, why).await
    }

    pub(crate) async fn finish_infra_attempt(
        &self,
        build_id: &str,
        n: u32,
        why: &str,
    ) -> Option<()> {
        if let Err(e) = store_op("finish_attempt", self.store_retry, &self.shutdown, || {
            self.store
                .finish_attempt(build_id, n, BuildState::InfraFailure, Some(why))
        })
        .await?
        {
            warn!(error = %e, "recording an attempt's infra failure");
        }
        Some(())
    }
}

/// Runs `build` to an outcome.
pub async fn run(env: &RunEnv, build: &Build) -> RunOutcome {
    if env.builder.is_plan() {
        // Steps with requirements, snapshots, caches or units: one buildlet per step.
        return crate::plan::run(env, build).await;
    }
    let max_attempts = env.max_attempts.max(1);
    let timeout = env.builder.build_timeout;
    let mut attempts_here = 0u32;
    loop {
        attempts_here += 1;
        if env.cancel.is_cancelled() {
            return env.cancelled();
        }
        // Waiting for a buildlet is bounded like the build itself: a pool that never
        // yields one fails the attempt instead of holding the build forever.
        let acquired = tokio::select! {
            // A cancel wins over a buildlet that arrives at the same moment.
            biased;
            _ = env.cancel.cancelled() => return env.cancelled(),
            r = tokio::time::timeout(timeout, env.pool.acquire(&env.cancel)) => r,
        };
        let outcome = match acquired {
            Ok(Err(PoolError::Cancelled)) => Outcome::Cancelled,
            Err(_) | Ok(Err(_)) => {
                let why = match acquired {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!(
                        "no buildlet of host type {} within {}",
                        env.builder.host_type,
                        humantime::format_duration(timeout)
                    ),
                };
                env.log.note(&format!("no buildlet: {why}"));
                if env.record_failed_attempt(&build.id, &why).await.is_none() {
                    return RunOutcome::Stopped;
                }
                Outcome::Infra(why)
            }
            Ok(Ok(_)) if env.cancel.is_cancelled() => return env.cancelled(),
            Ok(Ok(lease)) => {
                let attempt =
                    match store_op("start_attempt", env.store_retry, &env.shutdown, || {
                        env.store.start_attempt(&build.id, &lease.name)
                    })
                    .await
                    {
                        None => return RunOutcome::Stopped,
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return RunOutcome::AlreadyFinal(e.to_string()),
                    };
                (env.on_attempt)(&lease.name, attempt);
                env.log.note(&format!(
                    "attempt {attempt} of {} {} at {} on {}",
                    build.builder, build.repo, build.rev, lease.name
                ));
                let outcome = run_attempt(env, build, &lease).await;
                if let Outcome::Infra(ref why) = outcome
                    && env
                        .finish_infra_attempt(&build.id, attempt, why)
                        .await
                        .is_none()
                {
                    return RunOutcome::Stopped;
                }
                drop(lease);
                outcome
            }
        };
        match outcome {
            Outcome::Done(state, summary) => return RunOutcome::Finished(state, summary),
            Outcome::Cancelled => return env.cancelled(),
            Outcome::Infra(why) => {
                env.log.note(&format!("infrastructure failure: {why}"));
                let total = build.attempts + attempts_here;
                if total >= max_attempts {
                    return RunOutcome::Finished(
                        BuildState::InfraFailure,
                        format!("infra failure after {total} attempts: {why}"),
                    );
                }
                let pause = env.attempt_backoff.delay(attempts_here, rand::random());
                tokio::select! {
                    _ = env.cancel.cancelled() => return env.cancelled(),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

async fn run_attempt(env: &RunEnv, build: &Build, lease: &Lease) -> Outcome {
    let timeout = env.builder.build_timeout;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    tokio::select! {
        biased;
        _ = env.cancel.cancelled() => Outcome::Cancelled,
        _ = lease.lost.cancelled() => Outcome::Infra(format!("buildlet {} lost", lease.name)),
        _ = &mut deadline => Outcome::Done(
            BuildState::Failed,
            format!("build timed out after {}", humantime::format_duration(timeout)),
        ),
        o = steps(env, build, lease) => o,
    }
}

/// The environment every command of `builder` runs with, before any step's own env: the
/// host type's env, then the builder's. Later entries win (the buildlet applies them in
/// order), so the builder overrides its host type. Gomote commands get the same.
pub fn builder_env(config: &Config, builder: &Builder) -> Vec<(String, String)> {
    config
        .host_type(&builder.host_type)
        .map(|h| &h.env)
        .into_iter()
        .flatten()
        .chain(builder.env.iter())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Runs one step, appending its output to the log as it arrives.
async fn run_step(
    client: &buildlet::client::BuildletClient,
    spec: ExecSpec,
    log: &LiveLog,
) -> Result<buildlet::client::ExitStatus, buildlet::client::ClientError> {
    use buildlet::client::ExecEvent;
    use futures::StreamExt;
    let mut events = client.exec(spec).await?;
    while let Some(ev) = events.next().await {
        match ev? {
            ExecEvent::Output { data, .. } => log.append(&data),
            ExecEvent::Exit(status) => return Ok(status),
        }
    }
    Err(buildlet::client::ClientError::new(
        "exec",
        buildlet::client::ErrorCode::Unavailable,
        "stream ended without an exit status",
    ))
}

/// The build's source tarball (its rev, with its try patch applied), opened for reading.
pub(crate) async fn open_source(env: &RunEnv, build: &Build) -> Result<tokio::fs::File, Outcome> {
    let log = &env.log;
    let Some(mirror) = env.mirror.as_ref() else {
        return Err(Outcome::Done(
            BuildState::Failed,
            format!("unknown repo {}", build.repo),
        ));
    };
    let patch = match (build.kind, &build.try_id) {
        (BuildKind::Try, Some(try_id)) => {
            match store_op("get_try", env.store_retry, &env.shutdown, || {
                env.store.get_try(try_id)
            })
            .await
            {
                None => return Err(Outcome::Cancelled),
                Some(Ok(t)) => t.patch,
                Some(Err(e)) => {
                    return Err(Outcome::Done(
                        BuildState::Failed,
                        format!("reading try run {try_id}: {e}"),
                    ));
                }
            }
        }
        _ => None,
    };
    match env.sources.open(mirror, &build.rev, patch.as_deref()).await {
        Ok(f) => Ok(f),
        Err(e) => {
            // A patch that does not apply is the change's fault, not the farm's.
            let msg = format!("{e:#}");
            log.note(&format!("preparing source: {msg}"));
            Err(Outcome::Done(BuildState::Failed, format!("source: {msg}")))
        }
    }
}

async fn steps(env: &RunEnv, build: &Build, lease: &Lease) -> Outcome {
    let (builder, log) = (&env.builder, &env.log);
    let file = match open_source(env, build).await {
        Ok(f) => f,
        Err(outcome) => return outcome,
    };
    if let Err(e) = lease.client.put_tar(SRC_DIR, file, None).await {
        return Outcome::Infra(format!("pushing source: {e}"));
    }
    log.note(&format!("source pushed to {SRC_DIR}/"));

    for step in &builder.steps {
        let Some((cmd, args)) = step.command.split_first() else {
            continue;
        };
        let step_env: Vec<(String, String)> = env
            .base_env
            .iter()
            .cloned()
            .chain(step.env.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect();
        log.note(&format!("step {}: {}", step.name, step.command.join(" ")));
        let mut spec = ExecSpec::new(cmd.clone())
            .args(args.iter().cloned())
            .dir(SRC_DIR)
            .timeout(step.timeout);
        spec.env = step_env;
        spec.path = step.path.clone();
        let status = run_step(&lease.client, spec, log).await;
        match status {
            // A call that fails (lost connection, buildlet error) is the farm's fault.
            Err(e) => return Outcome::Infra(format!("step {}: {e}", step.name)),
            Ok(st) => {
                if st.timed_out {
                    return Outcome::Done(
                        BuildState::Failed,
                        format!(
                            "step {} timed out after {}",
                            step.name,
                            humantime::format_duration(step.timeout)
                        ),
                    );
                }
                if let Some(err) = st.error.as_deref().filter(|e| !e.is_empty()) {
                    log.note(&format!("step {} could not start: {err}", step.name));
                    return Outcome::Done(
                        BuildState::Failed,
                        format!("step {} could not start: {err}", step.name),
                    );
                }
                match (st.code, st.signal) {
                    (Some(0), _) => {}
                    (Some(code), _) => {
                        return Outcome::Done(
                            BuildState::Failed,
                            format!("step {} exited with status {code}", step.name),
                        );
                    }
                    (None, Some(sig)) => {
                        return Outcome::Done(
                            BuildState::Failed,
                            format!("step {} killed by signal {sig}", step.name),
                        );
                    }
                    (None, None) => {
                        return Outcome::Infra(format!("step {}: no exit status", step.name));
                    }
                }
            }
        }
    }
    let n = builder.steps.len();
    let plural = if n == 1 { "" } else { "s" };
    let mut summary = format!("{n} step{plural} passed");
    if let Some((spec, artifacts)) = &env.collect {
        match keep_outputs(env, build, lease, spec, artifacts).await {
            Ok(0) => {}
            Ok(k) => {
                let plural = if k == 1 { "" } else { "s" };
                summary.push_str(&format!(", {k} artifact{plural} kept"));
            }
            Err(outcome) => return outcome,
        }
    }
    Outcome::Done(BuildState::Ok, summary)
}

/// Copies the files `spec` names into the artifact store and records them; returns how
/// many. A build that must produce files (an artifact request) and made none fails.
async fn keep_outputs(
    env: &RunEnv,
    build: &Build,
    lease: &Lease,
    spec: &crate::artifacts::CollectSpec,
    artifacts: &crate::artifacts::Artifacts,
) -> Result<usize, Outcome> {
    use crate::artifacts::CollectError;
    let log = &env.log;
    let (files, _no_sweep_until_recorded) = match artifacts.collect(&lease.client, spec).await {
        Ok(r) => r,
        Err(CollectError::Infra(why)) => {
            return Err(Outcome::Infra(format!("collecting outputs: {why}")));
        }
        Err(CollectError::Refused(why)) => {
            log.note(&format!("outputs refused: {why}"));
            return Err(Outcome::Done(BuildState::Failed, why));
        }
    };
    let patterns = spec.patterns.join(" ");
    if files.is_empty() {
        if spec.required {
            let why = format!(
                "the build produced no output files (looked for {patterns} in {}/)",
                spec.base
            );
            log.note(&why);
            return Err(Outcome::Done(BuildState::Failed, why));
        }
        log.note(&format!(
            "no files match the declared artifacts ({patterns})"
        ));
        return Ok(0);
    }
    for f in &files {
        log.note(&format!(
            "artifact {} ({} bytes, sha256 {})",
            f.name, f.size, f.sha256
        ));
    }
    match store_op("add_artifacts", env.store_retry, &env.shutdown, || {
        env.store.add_artifacts(&build.id, &files)
    })
    .await
    {
        None => Err(Outcome::Cancelled),
        Some(Ok(())) => Ok(files.len()),
        Some(Err(e)) => Err(Outcome::Done(
            BuildState::Failed,
            format!("recording artifacts: {e}"),
        )),
    }
}
