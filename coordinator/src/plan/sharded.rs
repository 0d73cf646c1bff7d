//! A sharded test step: on its first buildlet it lists the units, splits them into
//! `test_shards` shards balanced by the durations earlier runs recorded, and runs the
//! shards on that buildlet and on helper buildlets leased beside it (each prepared like
//! the first: source, snapshots, cache). Shards are a queue that every buildlet takes
//! from, so a build never waits for helpers it cannot get: the first buildlet alone
//! finishes them if need be. A buildlet lost mid-shard puts the rest of its shard back on
//! the queue, and a fresh helper is leased to take it; units already done stay done.
//! Each unit's output is logged whole, in unit order, as soon as the units before it are
//! done; one verdict covers the step, and the durations are recorded for next time.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use buildlet::client::{ExecSpec, OutputStream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tracing::warn;

use super::shards::{InOrder, assign};
use super::{Ctx, PlanLease, StepEnd, StepLog, exit_problem, prepare, units};
use crate::logs::ShardView;
use crate::pool::Lease;
use crate::retry::store_op;
use crate::runner::SRC_DIR;

/// Most bytes of one unit's output kept; the rest is dropped with a marker.
const MAX_UNIT_OUTPUT: usize = 8 << 20;

/// How one unit ended.
struct UnitResult {
    passed: bool,
    millis: u64,
}

/// The shards' shared state; locked only between awaits.
struct Board {
    queue: VecDeque<(usize, Vec<usize>)>,
    merged: InOrder,
    results: Vec<Option<UnitResult>>,
    views: Vec<ShardView>,
}

/// How a worker (one buildlet taking shards) stopped.
enum WorkerEnd {
    /// The queue was empty.
    Drained,
    /// Its buildlet was lost; the rest of its shard is queued again.
    Lost(String),
    /// It got no buildlet, or could not prepare one.
    NoBuildlet(StepEnd),
}

pub(crate) async fn run(ctx: &Ctx<'_>, i: usize, lease: PlanLease) -> StepEnd {
    let env = ctx.env;
    let s = &ctx.steps()[i];
    let Some(kind) = s.units else {
        return StepEnd::Failed(format!("step {} has no units", s.name));
    };
    // Prepare and list on the first buildlet; losing it here retries the whole step.
    let mut log = StepLog::default();
    let listed = tokio::select! {
        biased;
        _ = lease.lost.cancelled() => Err(StepEnd::Infra(format!("buildlet {} lost", lease.name))),
        r = prepare_and_list(ctx, i, &lease, kind, &mut log) => r,
    };
    log.flush_to(env);
    let (names, cache) = match listed {
        Ok(n) => n,
        Err(end) => return end,
    };
    if names.is_empty() {
        env.log.note(&format!("step {}: no units to run", s.name));
        return StepEnd::Passed;
    }
    let durations: HashMap<String, u64> =
        match store_op("unit_durations", env.store_retry, &env.shutdown, || {
            env.store.unit_durations(&env.builder.name)
        })
        .await
        {
            None => return StepEnd::Cancelled,
            Some(Ok(d)) => d.into_iter().collect(),
            Some(Err(e)) => {
                warn!(error = %e, "reading unit durations; balancing by count");
                HashMap::new()
            }
        };
    let shards = assign(&names, &durations, env.builder.test_shards as usize);
    env.log.note(&format!(
        "step {}: {} units in {} shard{} ({})",
        s.name,
        names.len(),
        shards.len(),
        if shards.len() == 1 { "" } else { "s" },
        if durations.is_empty() {
            "balanced by count"
        } else {
            "balanced by recorded durations"
        }
    ));
    let views: Vec<ShardView> = shards
        .iter()
        .enumerate()
        .map(|(k, units)| ShardView {
            step: s.name.clone(),
            shard: k + 1,
            state: "waiting",
            units: units.len(),
            done: 0,
            failed: 0,
            buildlet: String::new(),
        })
        .collect();
    for v in &views {
        env.log.set_shard(v.clone());
    }
    let board = Mutex::new(Board {
        queue: shards.iter().cloned().enumerate().collect(),
        merged: InOrder::new(),
        results: (0..names.len()).map(|_| None).collect(),
        views,
    });
    let work = Work {
        ctx,
        step: i,
        kind,
        names: &names,
        board: &board,
    };

    // The first buildlet (prepared with the step's cache) is handed back by its worker
    // when the queue is empty; while it idles, a worker replacing a lost one takes it
    // before leasing a helper.
    let mut first = None;
    let mut workers = FuturesUnordered::new();
    workers.push(work.worker(Some(lease)));
    for _ in 1..shards.len() {
        workers.push(work.worker(None));
    }
    let max_losses = env.max_attempts.max(1);
    let mut losses = 0u32;
    let mut last_problem = None;
    while work.remaining() > 0 {
        let Some((end, given_back)) = workers.next().await else {
            // Every worker stopped with units left: lease another while losses allow.
            if losses >= max_losses {
                return last_problem.unwrap_or_else(|| {
                    StepEnd::Infra(format!("no buildlet left to run step {}", s.name))
                });
            }
            losses += 1;
            workers.push(work.worker(first.take()));
            continue;
        };
        if given_back.is_some() {
            first = given_back;
        }
        match end {
            WorkerEnd::Drained => {}
            WorkerEnd::Lost(why) => {
                losses += 1;
                if losses > max_losses {
                    return StepEnd::Infra(format!(
                        "step {}: {losses} buildlets lost, the last: {why}",
                        s.name
                    ));
                }
                last_problem = Some(StepEnd::Infra(why));
                workers.push(work.worker(first.take()));
            }
            WorkerEnd::NoBuildlet(StepEnd::Cancelled) => return StepEnd::Cancelled,
            WorkerEnd::NoBuildlet(end) => last_problem = Some(end),
        }
    }
    // Helpers still waiting for a slot or a buildlet are dropped here.
    drop(workers);

    let board = board.into_inner().unwrap_or_else(|e| e.into_inner());
    // The first buildlet saves the cache, unless it was lost meanwhile.
    if let Some(lease) = first.filter(|l| !l.lost.is_cancelled()) {
        let mut log = StepLog::default();
        prepare::save_cache(ctx, i, cache, &lease, &mut log).await;
        log.flush_to(env);
    }
    let recorded: Vec<(String, u64)> = board
        .results
        .iter()
        .enumerate()
        .filter_map(|(u, r)| r.as_ref().map(|r| (names[u].clone(), r.millis)))
        .collect();
    if let Some(Err(e)) = store_op(
        "record_unit_durations",
        env.store_retry,
        &env.shutdown,
        || {
            env.store
                .record_unit_durations(&env.builder.name, &recorded)
        },
    )
    .await
    {
        warn!(error = %e, "recording unit durations");
    }
    let failed: Vec<&str> = board
        .results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_ref().is_some_and(|r| !r.passed))
        .map(|(u, _)| names[u].as_str())
        .collect();
    if failed.is_empty() {
        env.log.note(&format!(
            "step {}: all {} units passed",
            s.name,
            names.len()
        ));
        StepEnd::Passed
    } else {
        let shown: Vec<&str> = failed.iter().take(10).copied().collect();
        let more = if failed.len() > shown.len() {
            ", ..."
        } else {
            ""
        };
        StepEnd::Failed(format!(
            "step {}: {} of {} units failed: {}{more}",
            s.name,
            failed.len(),
            names.len(),
            shown.join(", ")
        ))
    }
}

async fn prepare_and_list(
    ctx: &Ctx<'_>,
    i: usize,
    lease: &Lease,
    kind: buildfarm_config::Units,
    log: &mut StepLog,
) -> Result<(Vec<String>, Option<prepare::CacheState>), StepEnd> {
    let s = &ctx.steps()[i];
    let cache = prepare::prepare(ctx, i, lease, log).await?;
    let argv = units::list_command(kind);
    log.note(&format!(
        "step {}: listing units: {}",
        s.name,
        argv.join(" ")
    ));
    let mut spec = ExecSpec::new(argv[0].clone())
        .args(argv[1..].iter().cloned())
        .dir(SRC_DIR)
        .timeout(s.timeout);
    spec.env = prepare::step_env(ctx, s);
    spec.path = s.path.clone();
    let mut stdout = Vec::new();
    let st = lease
        .client
        .exec_collect(spec, |stream, data| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(data),
            OutputStream::Stderr => log.append(data),
        })
        .await
        .map_err(|e| StepEnd::Infra(format!("listing units: {e}")))?;
    if let Some(end) = exit_problem(&format!("{} (listing units)", s.name), s.timeout, &st) {
        log.append(&stdout);
        return Err(end);
    }
    let names = units::parse(kind, &stdout)
        .and_then(|listed| units::select(listed, &s.only_units))
        .map_err(|e| StepEnd::Failed(format!("step {}: listing units: {e}", s.name)))?;
    Ok((names, cache))
}

/// What workers share.
#[derive(Clone, Copy)]
struct Work<'a, 'c> {
    ctx: &'a Ctx<'c>,
    step: usize,
    kind: buildfarm_config::Units,
    names: &'a [String],
    board: &'a Mutex<Board>,
}

impl Work<'_, '_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remaining(&self) -> usize {
        self.lock().results.iter().filter(|r| r.is_none()).count()
    }

    fn update(&self, shard: usize, f: impl FnOnce(&mut ShardView)) {
        let view = {
            let mut b = self.lock();
            let v = &mut b.views[shard];
            f(v);
            v.clone()
        };
        self.ctx.env.log.set_shard(view);
    }

    /// Takes shards until the queue is empty, on the `given` buildlet (handed back with
    /// `Drained`) or on a helper it leases (released when it stops).
    async fn worker(self, given: Option<PlanLease>) -> (WorkerEnd, Option<PlanLease>) {
        match given {
            Some(lease) => match self.take_shards(&lease).await {
                WorkerEnd::Drained => (WorkerEnd::Drained, Some(lease)),
                end => (end, None),
            },
            None => (self.helper().await, None),
        }
    }

    /// Leases and prepares a helper, then takes shards on it.
    async fn helper(self) -> WorkerEnd {
        let env = self.ctx.env;
        if self.lock().queue.is_empty() {
            return WorkerEnd::Drained;
        }
        let helper = match self.ctx.acquire().await {
            Ok(l) => l,
            Err(end) => return WorkerEnd::NoBuildlet(end),
        };
        if self.lock().queue.is_empty() {
            return WorkerEnd::Drained;
        }
        let mut log = StepLog::default();
        log.note(&format!(
            "step {}: helper {} joins",
            self.ctx.dag.name(self.step),
            helper.name
        ));
        let prepared = tokio::select! {
            biased;
            _ = helper.lost.cancelled() => Err(StepEnd::Infra(format!("buildlet {} lost", helper.name))),
            r = prepare::prepare(self.ctx, self.step, &helper, &mut log) => r,
        };
        log.flush_to(env);
        if let Err(end) = prepared {
            return WorkerEnd::NoBuildlet(end);
        }
        self.take_shards(&helper).await
    }

    /// Runs shards from the queue on `lease` until the queue is empty or it is lost.
    async fn take_shards(&self, lease: &Lease) -> WorkerEnd {
        let env = self.ctx.env;
        loop {
            let Some((shard, units)) = self.lock().queue.pop_front() else {
                return WorkerEnd::Drained;
            };
            self.update(shard, |v| {
                v.state = "running";
                v.buildlet = lease.name.clone();
            });
            for (pos, &u) in units.iter().enumerate() {
                let r = tokio::select! {
                    biased;
                    _ = lease.lost.cancelled() => Err(format!("buildlet {} lost", lease.name)),
                    r = self.run_unit(lease, shard, u) => r,
                };
                match r {
                    Ok(()) => {}
                    Err(why) => {
                        let rest = units[pos..].to_vec();
                        let n = rest.len();
                        self.lock().queue.push_front((shard, rest));
                        self.update(shard, |v| v.state = "lost");
                        env.log.note(&format!(
                            "shard {} of step {} lost with its buildlet ({why}): its {n} remaining unit{} run again alone on another buildlet",
                            shard + 1,
                            self.ctx.dag.name(self.step),
                            if n == 1 { "" } else { "s" },
                        ));
                        return WorkerEnd::Lost(why);
                    }
                }
            }
            self.update(shard, |v| {
                v.state = if v.failed == 0 { "passed" } else { "failed" };
            });
        }
    }

    /// Runs one unit and records its result; `Err` when the buildlet failed.
    async fn run_unit(&self, lease: &Lease, shard: usize, u: usize) -> Result<(), String> {
        let s = &self.ctx.steps()[self.step];
        let unit = &self.names[u];
        let (cmd, args) = s
            .command
            .split_first()
            .ok_or_else(|| format!("step {} has no command", s.name))?;
        let mut spec = ExecSpec::new(cmd.clone())
            .args(args.iter().cloned())
            .args(units::unit_args(self.kind, unit))
            .dir(SRC_DIR)
            .timeout(s.timeout);
        spec.env = prepare::step_env(self.ctx, s);
        spec.path = s.path.clone();
        let started = Instant::now();
        let mut out = Vec::new();
        let mut cut = false;
        let st = lease
            .client
            .exec_collect(spec, |_, data| {
                if out.len() + data.len() <= MAX_UNIT_OUTPUT {
                    out.extend_from_slice(data);
                } else {
                    cut = true;
                }
            })
            .await
            .map_err(|e| format!("unit {unit}: {e}"))?;
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let problem = exit_problem(unit, s.timeout, &st);
        if let Some(StepEnd::Infra(why)) = problem {
            return Err(why);
        }
        let passed = problem.is_none();
        let mut text = format!(
            "[buildfarm] unit {unit}: {} (shard {} on {}, {:.1}s)\n",
            if passed { "ok" } else { "FAIL" },
            shard + 1,
            lease.name,
            millis as f64 / 1000.0
        )
        .into_bytes();
        text.extend_from_slice(&out);
        if cut {
            text.extend_from_slice(b"\n[buildfarm] unit output truncated\n");
        }
        if let Some(StepEnd::Failed(why)) = &problem
            && st.code.is_none()
        {
            text.extend_from_slice(format!("[buildfarm] {why}\n").as_bytes());
        }
        // Appended under the board's lock, so released units reach the log in order.
        let mut b = self.lock();
        b.results[u] = Some(UnitResult { passed, millis });
        let v = &mut b.views[shard];
        v.done += 1;
        if !passed {
            v.failed += 1;
        }
        let view = v.clone();
        for chunk in b.merged.push(u, text) {
            self.ctx.env.log.append(&chunk);
        }
        drop(b);
        self.ctx.env.log.set_shard(view);
        Ok(())
    }
}
