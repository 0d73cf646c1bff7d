//! The build runner: for one build, lease a buildlet, push the source, run the
//! builder's steps with output streamed to the live log, and record the result once.
//! A lost buildlet or a pool that cannot provide one is an infra failure of the
//! attempt: the build is retried on a fresh buildlet up to `max_attempts` times.

use std::sync::Arc;
use std::time::Duration;

use buildfarm_config::{Builder, Config};
use buildfarm_store::{Build, BuildKind, BuildState};
use buildlet::client::ExecSpec;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::farm::{ActiveBuild, Farm, Slot, now_ms};
use crate::logs::LiveLog;
use crate::pool::{Lease, Pool};

/// How an attempt ended.
enum Outcome {
    /// The build has a result (ok or failed); `summary` says why.
    Done(BuildState, String),
    /// The infrastructure failed; another attempt may succeed.
    Infra(String),
    Cancelled,
}

/// Where the source goes in the buildlet's workdir; steps run there.
const SRC_DIR: &str = "src";

pub async fn run_build(farm: Arc<Farm>, build_id: String, pool: Arc<dyn Pool>, slot: Slot) {
    let span = info_span!("build", build_id = %build_id);
    async move {
        let build = match farm.store.get_build(&build_id).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "queued build vanished from the store");
                return;
            }
        };
        if build.state.is_final() {
            return;
        }
        let Some(builder) = farm.config.builder(&build.builder).cloned() else {
            let log = format!("unknown builder {}\n", build.builder);
            farm.finish(
                &build,
                BuildState::Failed,
                "unknown builder",
                log.as_bytes(),
            )
            .await;
            return;
        };
        let cancel = farm.shutdown.child_token();
        let log = farm.logs.open(&build.id);
        farm.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                build.id.clone(),
                ActiveBuild {
                    build_id: build.id.clone(),
                    builder: build.builder.clone(),
                    repo: build.repo.clone(),
                    rev: build.rev.clone(),
                    kind: build.kind.as_str(),
                    buildlet: None,
                    attempt: build.attempts + 1,
                    started_unix_ms: now_ms(),
                    cancel: cancel.clone(),
                },
            );
        run_attempts(&farm, &build, &builder, pool.as_ref(), &log, &cancel).await;
        farm.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&build.id);
        farm.logs.close(&build.id);
        drop(slot);
    }
    .instrument(span)
    .await
}

async fn run_attempts(
    farm: &Arc<Farm>,
    build: &Build,
    builder: &Builder,
    pool: &dyn Pool,
    log: &Arc<LiveLog>,
    cancel: &CancellationToken,
) {
    let max_attempts = farm.config.coordinator.max_attempts.max(1);
    let mut attempts_here = 0u32;
    loop {
        attempts_here += 1;
        let lease = tokio::select! {
            _ = farm.shutdown.cancelled() => return, // resumed by the next coordinator
            r = pool.acquire(cancel) => r,
        };
        let outcome = match lease {
            Err(e) => {
                log.note(&format!("no buildlet: {e}"));
                if cancel.is_cancelled() {
                    Outcome::Cancelled
                } else {
                    // Record the attempt so the store counts it.
                    match farm.store.start_attempt(&build.id, "none").await {
                        Ok(n) => {
                            let _ = farm
                                .store
                                .finish_attempt(
                                    &build.id,
                                    n,
                                    BuildState::InfraFailure,
                                    Some(&e.to_string()),
                                )
                                .await;
                        }
                        Err(se) => warn!(error = %se, "recording attempt"),
                    }
                    Outcome::Infra(e.to_string())
                }
            }
            Ok(lease) => {
                let attempt = match farm.store.start_attempt(&build.id, &lease.name).await {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(error = %e, "store refused to start an attempt");
                        return;
                    }
                };
                if let Some(a) = farm
                    .active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&build.id)
                {
                    a.buildlet = Some(lease.name.clone());
                    a.attempt = attempt;
                }
                farm.notify_build(&build.id, build.try_id.as_deref());
                log.note(&format!(
                    "attempt {attempt} of {} {} at {} on {}",
                    build.builder, build.repo, build.rev, lease.name
                ));
                let outcome = tokio::select! {
                    // The coordinator is stopping: leave the build running in the store
                    // so the next coordinator resumes it.
                    _ = farm.shutdown.cancelled() => return,
                    o = run_attempt(farm, build, builder, &lease, log, cancel) => o,
                };
                if let Outcome::Infra(ref why) = outcome {
                    let _ = farm
                        .store
                        .finish_attempt(&build.id, attempt, BuildState::InfraFailure, Some(why))
                        .await;
                }
                drop(lease);
                outcome
            }
        };
        match outcome {
            Outcome::Done(state, summary) => {
                farm.finish(build, state, &summary, &log.contents()).await;
                return;
            }
            // The build's token is a child of the coordinator's: on shutdown the build
            // stays unfinished in the store, and the next coordinator resumes it.
            Outcome::Cancelled if farm.shutdown.is_cancelled() => return,
            Outcome::Cancelled => {
                log.note("cancelled");
                farm.finish(build, BuildState::Cancelled, "cancelled", &log.contents())
                    .await;
                return;
            }
            Outcome::Infra(why) => {
                log.note(&format!("infrastructure failure: {why}"));
                let total = build.attempts + attempts_here;
                if total >= max_attempts {
                    let summary = format!("infra failure after {total} attempts: {why}");
                    farm.finish(build, BuildState::InfraFailure, &summary, &log.contents())
                        .await;
                    return;
                }
                farm.notify_build(&build.id, build.try_id.as_deref());
                // A short pause so a crash-looping pool doesn't spin.
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempts_here))).await;
            }
        }
    }
}

async fn run_attempt(
    farm: &Arc<Farm>,
    build: &Build,
    builder: &Builder,
    lease: &Lease,
    log: &Arc<LiveLog>,
    cancel: &CancellationToken,
) -> Outcome {
    let deadline = tokio::time::sleep(builder.build_timeout);
    tokio::pin!(deadline);
    tokio::select! {
        _ = cancel.cancelled() => Outcome::Cancelled,
        _ = lease.lost.cancelled() => Outcome::Infra(format!("buildlet {} lost", lease.name)),
        _ = &mut deadline => Outcome::Done(
            BuildState::Failed,
            format!("build timed out after {}", humantime::format_duration(builder.build_timeout)),
        ),
        o = steps(farm, build, builder, lease, log) => o,
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

async fn steps(
    farm: &Arc<Farm>,
    build: &Build,
    builder: &Builder,
    lease: &Lease,
    log: &Arc<LiveLog>,
) -> Outcome {
    let Some(mirror) = farm.mirrors.get(&build.repo) else {
        return Outcome::Done(BuildState::Failed, format!("unknown repo {}", build.repo));
    };
    let patch = match (build.kind, &build.try_id) {
        (BuildKind::Try, Some(try_id)) => match farm.store.get_try(try_id).await {
            Ok(t) => t.patch,
            Err(e) => return Outcome::Infra(format!("reading try run {try_id}: {e}")),
        },
        _ => None,
    };
    let tarball = match mirror.source_tarball(&build.rev, patch.as_deref()).await {
        Ok(p) => p,
        Err(e) => {
            // A patch that does not apply is the change's fault, not the farm's.
            let msg = format!("{e:#}");
            log.note(&format!("preparing source: {msg}"));
            return Outcome::Done(BuildState::Failed, format!("source: {msg}"));
        }
    };
    let file = match tokio::fs::File::open(&tarball).await {
        Ok(f) => f,
        Err(e) => return Outcome::Infra(format!("opening {}: {e}", tarball.display())),
    };
    if let Err(e) = lease.client.put_tar(SRC_DIR, file, None).await {
        return Outcome::Infra(format!("pushing source: {e}"));
    }
    log.note(&format!("source pushed to {SRC_DIR}/"));

    let base_env = builder_env(&farm.config, builder);
    for step in &builder.steps {
        let Some((cmd, args)) = step.command.split_first() else {
            continue;
        };
        let env: Vec<(String, String)> = base_env
            .iter()
            .cloned()
            .chain(step.env.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect();
        log.note(&format!("step {}: {}", step.name, step.command.join(" ")));
        let mut spec = ExecSpec::new(cmd.clone())
            .args(args.iter().cloned())
            .dir(SRC_DIR)
            .timeout(step.timeout);
        spec.env = env;
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
    Outcome::Done(BuildState::Ok, format!("{n} step{plural} passed"))
}
