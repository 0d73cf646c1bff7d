//! The operator's status page `/`: health checks with warnings first, then pools, the
//! queue, active builds, recent results, connected reverse hosts and two small charts.
//!
//! [`gather`] reads the farm; [`status_view`] turns what it read into the page's data
//! with an explicit `now`, so tests render a fixed page.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use askama::Template;
use buildfarm_scheduler::QueueStat;
use buildfarm_store::Build;
use serde::Serialize;

use super::charts::{Sample, line_chart};
use super::{AppState, BuildView, fmt_ago, fmt_duration_secs};
use crate::farm::{ActiveBuild, now_ms, short};
use crate::logs::ShardView;
use crate::pool::PoolStatus;

/// A queue whose oldest item waited longer than this gets a warning.
pub const QUEUE_WAIT_WARN: Duration = Duration::from_secs(10 * 60);
/// A store ping slower than this counts as unreachable.
pub const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The charts' time window.
pub const CHART_WINDOW: Duration = Duration::from_secs(4 * 3600);
const RECENT: u32 = 25;
/// Most reverse hosts the HTML page lists one by one (the most recently connected);
/// the JSON lists every host. A fleet of thousands would otherwise make the page
/// megabytes of rows no one reads, rendered on every refresh; the pools table
/// already gives each host type's connected and expected counts.
pub const REVERSE_HOSTS_LISTED: usize = 100;

/// Everything the status page shows, as read from the farm.
pub struct StatusInput {
    pub uptime_secs: u64,
    pub pools: Vec<PoolStatus>,
    pub queue: Vec<QueueStat>,
    pub active: Vec<ActiveBuild>,
    /// The shards of active builds' sharded steps, by build id (from their live logs).
    pub shards: HashMap<String, Vec<ShardView>>,
    pub recent: Vec<Build>,
    pub reverse_hosts: Vec<revdial::HostInfo>,
    pub gomote_instances: usize,
    pub store_backend: &'static str,
    /// How long a store ping took, or why it failed.
    pub store_ping: Result<Duration, String>,
    pub history: Vec<Sample>,
    /// Why local buildlets run without a sandbox; `None` when they are sandboxed or
    /// there is no local pool.
    pub unsandboxed: Option<String>,
    /// The coordinator port's connections now; `None` when not serving.
    pub connections: Option<ConnectionsView>,
    /// Repos and branches whose last poll failed.
    pub poll_problems: Vec<crate::farm::PollProblem>,
}

/// The coordinator port's connections, as the bounded acceptor counts them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnectionsView {
    pub open: usize,
    pub handshaking: usize,
    pub max: usize,
}

impl ConnectionsView {
    pub fn of(acceptor: &revdial::accept::Acceptor) -> Self {
        let stats = acceptor.stats();
        ConnectionsView {
            open: stats.open,
            handshaking: stats.handshaking,
            max: acceptor.limits().max_connections,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warn,
    Ok,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub level: Level,
    pub message: String,
}

impl Check {
    pub fn class(&self) -> &'static str {
        match self.level {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Ok => "okcheck",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StoreView {
    pub backend: &'static str,
    pub ok: bool,
    pub ping_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct QueueView {
    pub host_type: String,
    pub class: String,
    pub len: usize,
    pub oldest_wait_secs: u64,
    #[serde(skip)]
    pub oldest_wait: String,
    pub stale: bool,
}

#[derive(Debug, Serialize)]
pub struct ActiveView {
    pub build_id: String,
    pub builder: String,
    pub repo: String,
    pub rev: String,
    pub kind: &'static str,
    pub buildlet: Option<String>,
    pub attempt: u32,
    pub started_unix_ms: i64,
    pub elapsed_secs: u64,
    #[serde(skip)]
    pub elapsed: String,
    /// One line per sharded step of the build; empty for unsharded builds.
    pub shards: Vec<ShardStepView>,
}

/// A sharded step of an active build, summed over its shards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShardStepView {
    pub step: String,
    pub shards: usize,
    pub waiting: usize,
    pub running: usize,
    pub passed: usize,
    pub failed: usize,
    /// Lost with their buildlet; their remaining units are queued again.
    pub lost: usize,
    pub units: usize,
    pub units_done: usize,
    pub units_failed: usize,
    /// The buildlets running its shards now.
    pub buildlets: Vec<String>,
}

impl ShardStepView {
    /// The status page's one-line form.
    pub fn line(&self) -> String {
        let states: Vec<String> = [
            (self.running, "running"),
            (self.waiting, "waiting"),
            (self.passed, "passed"),
            (self.failed, "failed"),
            (self.lost, "lost"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        let mut line = format!(
            "{}: {} shard{} ({}), {} of {} units done",
            self.step,
            self.shards,
            if self.shards == 1 { "" } else { "s" },
            states.join(", "),
            self.units_done,
            self.units
        );
        if self.units_failed > 0 {
            line.push_str(&format!(", {} failed", self.units_failed));
        }
        line
    }
}

/// Sums shard views by step, steps in the order their first shard appears.
pub fn summarize_shards(views: &[ShardView]) -> Vec<ShardStepView> {
    let mut steps: Vec<ShardStepView> = Vec::new();
    for v in views {
        let i = match steps.iter().position(|s| s.step == v.step) {
            Some(i) => i,
            None => {
                steps.push(ShardStepView {
                    step: v.step.clone(),
                    ..ShardStepView::default()
                });
                steps.len() - 1
            }
        };
        let s = &mut steps[i];
        s.shards += 1;
        match v.state {
            "running" => {
                s.running += 1;
                if !v.buildlet.is_empty() && !s.buildlets.contains(&v.buildlet) {
                    s.buildlets.push(v.buildlet.clone());
                }
            }
            "passed" => s.passed += 1,
            "failed" => s.failed += 1,
            "lost" => s.lost += 1,
            _ => s.waiting += 1,
        }
        s.units += v.units;
        s.units_done += v.done;
        s.units_failed += v.failed;
    }
    steps
}

#[derive(Debug, Serialize)]
pub struct RecentView {
    #[serde(flatten)]
    pub build: BuildView,
    #[serde(skip)]
    pub finished_ago: String,
    #[serde(skip)]
    pub short_rev: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReverseHostView {
    pub hostname: String,
    pub host_type: String,
    pub version: String,
    pub connected_secs: u64,
    pub ping_rtt_ms: Option<f64>,
    #[serde(skip)]
    pub connected: String,
    #[serde(skip)]
    pub ping: String,
}

#[derive(Debug, Serialize)]
pub struct ChartView {
    pub title: &'static str,
    #[serde(skip)]
    pub svg: String,
}

#[derive(Debug, Serialize, Template)]
#[template(path = "status.html")]
pub struct StatusView {
    pub generated_unix_ms: i64,
    pub uptime_secs: u64,
    #[serde(skip)]
    pub uptime: String,
    pub checks: Vec<Check>,
    pub store: StoreView,
    pub pools: Vec<PoolStatus>,
    pub queue: Vec<QueueView>,
    pub active: Vec<ActiveView>,
    pub recent: Vec<RecentView>,
    /// Every connected reverse host, oldest connection first.
    pub reverse_hosts: Vec<ReverseHostView>,
    /// The page's table: the [`REVERSE_HOSTS_LISTED`] most recently connected hosts,
    /// newest first (see [`most_recently_connected`]).
    #[serde(skip)]
    pub listed_hosts: Vec<ReverseHostView>,
    pub gomote_instances: usize,
    /// Whether local buildlets run in a sandbox; `None` without a local pool.
    pub local_sandboxed: Option<bool>,
    pub connections: Option<ConnectionsView>,
    pub history: Vec<Sample>,
    #[serde(skip)]
    pub charts: Vec<ChartView>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Health checks, errors first, then warnings; one "ok" line when all pass.
/// `unsandboxed` says why local buildlets run without a sandbox, if they do.
pub fn health_checks(
    pools: &[PoolStatus],
    queue: &[QueueStat],
    hosts: &[revdial::HostInfo],
    store: &Result<Duration, String>,
    unsandboxed: Option<&str>,
) -> Vec<Check> {
    let mut checks = Vec::new();
    if let Some(reason) = unsandboxed {
        checks.push(Check {
            level: Level::Warn,
            message: format!(
                "local buildlets run without a sandbox ({reason}): builds can read the \
                 coordinator's secrets (install bubblewrap and set [sandbox] mode = \"auto\")"
            ),
        });
    }
    if let Err(e) = store {
        checks.push(Check {
            level: Level::Error,
            message: format!("store unreachable: {e}"),
        });
    }
    for p in pools {
        let Some(expected) = p.expected else { continue };
        let connected = hosts.iter().filter(|h| h.host_type == p.host_type).count();
        if connected < expected {
            checks.push(Check {
                level: if connected == 0 {
                    Level::Error
                } else {
                    Level::Warn
                },
                message: format!(
                    "reverse host type {}: {connected} of {expected} connected",
                    p.host_type
                ),
            });
        }
    }
    let pooled: HashSet<&str> = pools.iter().map(|p| p.host_type.as_str()).collect();
    let mut unpooled: BTreeMap<&str, usize> = BTreeMap::new();
    for q in queue {
        if !pooled.contains(q.host_type.as_str()) {
            *unpooled.entry(q.host_type.as_str()).or_default() += q.len;
        }
        if q.oldest_wait > QUEUE_WAIT_WARN {
            checks.push(Check {
                level: Level::Warn,
                message: format!(
                    "queue for {} ({}) waiting {} (over {})",
                    q.host_type,
                    q.class.as_str(),
                    fmt_duration_secs(q.oldest_wait.as_secs()),
                    fmt_duration_secs(QUEUE_WAIT_WARN.as_secs())
                ),
            });
        }
    }
    for (ht, n) in unpooled {
        checks.push(Check {
            level: Level::Error,
            message: format!("host type {ht} has no running pool; {n} waiting"),
        });
    }
    checks.sort_by(|a, b| a.level.cmp(&b.level));
    if checks.is_empty() {
        checks.push(Check {
            level: Level::Ok,
            message: "all checks pass".into(),
        });
    }
    checks
}

/// One error per repo or branch whose last poll failed: its new commits are not being
/// built.
pub fn poll_checks(problems: &[crate::farm::PollProblem]) -> Vec<Check> {
    problems
        .iter()
        .map(|p| Check {
            level: Level::Error,
            message: match &p.branch {
                Some(b) => format!("polling {} branch {b} failed: {}", p.repo, p.error),
                None => format!("polling {} failed: {}", p.repo, p.error),
            },
        })
        .collect()
}

/// The page's data from what was read, as of `now_ms`.
pub fn status_view(input: StatusInput, now_ms: i64) -> StatusView {
    let mut checks = health_checks(
        &input.pools,
        &input.queue,
        &input.reverse_hosts,
        &input.store_ping,
        input.unsandboxed.as_deref(),
    );
    let polls = poll_checks(&input.poll_problems);
    if !polls.is_empty() {
        checks.retain(|c| c.level != Level::Ok);
        checks.extend(polls);
        checks.sort_by(|a, b| a.level.cmp(&b.level));
    }
    let local_sandboxed = input
        .pools
        .iter()
        .any(|p| p.kind == "local")
        .then_some(input.unsandboxed.is_none());
    let mut pools = input.pools;
    pools.sort_by(|a, b| a.host_type.cmp(&b.host_type));
    let mut queue: Vec<QueueView> = input
        .queue
        .iter()
        .map(|q| QueueView {
            host_type: q.host_type.clone(),
            class: q.class.as_str().to_owned(),
            len: q.len,
            oldest_wait_secs: q.oldest_wait.as_secs(),
            oldest_wait: fmt_duration_secs(q.oldest_wait.as_secs()),
            stale: q.oldest_wait > QUEUE_WAIT_WARN,
        })
        .collect();
    queue.sort_by(|a, b| (&a.host_type, &a.class).cmp(&(&b.host_type, &b.class)));
    let shards = input.shards;
    let active = input
        .active
        .into_iter()
        .map(|a| {
            let elapsed_secs = ((now_ms - a.started_unix_ms).max(0) / 1000) as u64;
            let shards = shards
                .get(&a.build_id)
                .map(|v| summarize_shards(v))
                .unwrap_or_default();
            ActiveView {
                shards,
                build_id: a.build_id,
                builder: a.builder,
                repo: a.repo,
                rev: short(&a.rev).to_owned(),
                kind: a.kind,
                buildlet: a.buildlet,
                attempt: a.attempt,
                started_unix_ms: a.started_unix_ms,
                elapsed_secs,
                elapsed: fmt_duration_secs(elapsed_secs),
            }
        })
        .collect();
    let recent = input
        .recent
        .iter()
        .map(|b| RecentView {
            build: BuildView::from(b),
            finished_ago: b
                .finished_at
                .map(|t| fmt_ago(now_ms, t))
                .unwrap_or_default(),
            short_rev: short(&b.rev).to_owned(),
        })
        .collect();
    let reverse_hosts: Vec<ReverseHostView> = input
        .reverse_hosts
        .into_iter()
        .map(|h| {
            let connected_secs = ((now_ms - unix_ms(h.connected_since)).max(0) / 1000) as u64;
            let ping_rtt_ms = h.last_ping_rtt.map(|d| d.as_secs_f64() * 1000.0);
            ReverseHostView {
                hostname: h.hostname,
                host_type: h.host_type,
                version: h.version,
                connected_secs,
                ping_rtt_ms,
                connected: fmt_duration_secs(connected_secs),
                ping: ping_rtt_ms
                    .map(|ms| format!("{ms:.1} ms"))
                    .unwrap_or_else(|| "-".into()),
            }
        })
        .collect();
    let listed_hosts = most_recently_connected(&reverse_hosts, REVERSE_HOSTS_LISTED);
    let window = CHART_WINDOW.as_millis() as i64;
    let queued: Vec<(i64, f64)> = input
        .history
        .iter()
        .map(|s| (s.at_ms, s.queued as f64))
        .collect();
    let in_use: Vec<(i64, f64)> = input
        .history
        .iter()
        .map(|s| (s.at_ms, s.in_use as f64))
        .collect();
    let charts = vec![
        ChartView {
            title: "queue length",
            svg: line_chart("queue length", &queued, now_ms, window),
        },
        ChartView {
            title: "buildlets in use",
            svg: line_chart("buildlets in use", &in_use, now_ms, window),
        },
    ];
    StatusView {
        generated_unix_ms: now_ms,
        uptime_secs: input.uptime_secs,
        uptime: fmt_duration_secs(input.uptime_secs),
        checks,
        store: StoreView {
            backend: input.store_backend,
            ok: input.store_ping.is_ok(),
            ping_ms: input
                .store_ping
                .as_ref()
                .ok()
                .map(|d| d.as_secs_f64() * 1000.0),
            error: input.store_ping.err(),
        },
        pools,
        queue,
        active,
        recent,
        reverse_hosts,
        listed_hosts,
        gomote_instances: input.gomote_instances,
        local_sandboxed,
        connections: input.connections,
        history: input.history,
        charts,
    }
}

/// The `limit` hosts connected most recently, newest first (ties by hostname): on a
/// big fleet those are the ones an operator looks for (reconnects, new machines).
pub fn most_recently_connected(hosts: &[ReverseHostView], limit: usize) -> Vec<ReverseHostView> {
    let mut order: Vec<&ReverseHostView> = hosts.iter().collect();
    order.sort_by(|a, b| (a.connected_secs, &a.hostname).cmp(&(b.connected_secs, &b.hostname)));
    order.into_iter().take(limit).cloned().collect()
}

/// Pings the store with a short timeout; the error says why it is unreachable.
pub async fn ping_store(store: &dyn buildfarm_store::Store) -> Result<Duration, String> {
    let start = std::time::Instant::now();
    match tokio::time::timeout(STORE_PING_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {}",
            fmt_duration_secs(STORE_PING_TIMEOUT.as_secs())
        )),
    }
}

/// Reads what the status page shows from the running farm.
pub async fn gather(state: &AppState) -> StatusInput {
    let farm = &state.farm;
    let store_ping = ping_store(farm.store().as_ref()).await;
    let recent = if store_ping.is_ok() {
        farm.store().recent_builds(RECENT).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let active = farm.active_builds();
    let shards = active
        .iter()
        .filter_map(|a| {
            let views = farm.logs().get(&a.build_id)?.shards();
            (!views.is_empty()).then(|| (a.build_id.clone(), views))
        })
        .collect();
    StatusInput {
        uptime_secs: farm
            .started_at()
            .elapsed()
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pools: farm.pools().map(|p| p.status()).collect(),
        queue: farm.queue_snapshot(),
        active,
        shards,
        recent,
        reverse_hosts: farm
            .revdial_registry()
            .map(|r| r.list())
            .unwrap_or_default(),
        gomote_instances: state.api.instance_count(),
        store_backend: farm.store().backend(),
        store_ping,
        history: state.web.history.snapshot(),
        unsandboxed: state.web.unsandboxed.clone(),
        connections: state.web.acceptor.as_ref().map(ConnectionsView::of),
        poll_problems: farm.poll_problems(),
    }
}

/// `/` and `/api/status`.
pub async fn view(state: &AppState) -> StatusView {
    status_view(gather(state).await, now_ms())
}
