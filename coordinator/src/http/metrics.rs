//! Prometheus metrics at `/metrics`, in one registry owned by the app (not the global
//! default, so tests and several farms in one process never share state).
//!
//! Gauges (queue, pools, reverse hosts, store latency) are refreshed from the farm at
//! scrape time; build results are counted as builds finish (see [`watch_builds`]).
//! Labels are bounded: host type, pool kind, class, builder, result, refusal reason;
//! never a build id, commit or hostname.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use buildfarm_store::Build;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::sync::broadcast::error::RecvError;
use tracing::warn;

use crate::farm::{Farm, FarmEvent};
use crate::pool::PoolStatus;

/// Build ids remembered so a build is counted once though several events name it.
const SEEN_BUILDS: usize = 10_000;

/// Build duration buckets, seconds: from a quick vet to a long race build.
const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

pub struct Metrics {
    registry: Registry,
    queue_length: IntGaugeVec,
    queue_oldest_wait: GaugeVec,
    build_duration: HistogramVec,
    builds: IntCounterVec,
    buildlets: IntGaugeVec,
    pool_capacity: IntGaugeVec,
    reverse_expected: IntGaugeVec,
    reverse_connections: IntGaugeVec,
    reverse_ping_rtt: GaugeVec,
    handshakes_accepted: IntCounter,
    handshakes_refused: IntCounterVec,
    tunnels_lost: IntCounter,
    connections_open: IntGauge,
    connections_handshaking: IntGauge,
    connections_accepted: IntCounter,
    connections_evicted: IntCounter,
    connections_refused: IntCounter,
    accept_errors: IntCounter,
    store_up: IntGauge,
    store_ping: Gauge,
    active_builds: IntGauge,
    source_tarballs: IntCounter,
    /// Scrapes update shared gauges and counter deltas; one at a time.
    scrape: Mutex<()>,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

/// What a scrape reads from the farm.
pub struct ScrapeInput {
    pub queue: Vec<buildfarm_scheduler::QueueStat>,
    pub pools: Vec<PoolStatus>,
    pub reverse_hosts: Vec<revdial::HostInfo>,
    pub listener: Option<revdial::ListenerMetrics>,
    /// The coordinator port's bounded acceptor; `None` when not serving.
    pub connections: Option<revdial::accept::AcceptStats>,
    /// How long a store ping took, or why it failed.
    pub store_ping: Result<Duration, String>,
    pub active_builds: usize,
    /// Source tarballs made since start (each rev and patch once).
    pub source_tarballs_built: u64,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: T,
) -> prometheus::Result<T> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let r = Registry::new();
        let m = Metrics {
            queue_length: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "buildfarm_queue_length",
                        "Work items waiting for a buildlet.",
                    ),
                    &["host_type", "class"],
                )?,
            )?,
            queue_oldest_wait: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "buildfarm_queue_oldest_wait_seconds",
                        "How long the longest-waiting queued item has waited.",
                    ),
                    &["host_type", "class"],
                )?,
            )?,
            build_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "buildfarm_build_duration_seconds",
                        "Time from a build's first attempt start to its result.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["builder", "result"],
                )?,
            )?,
            builds: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "buildfarm_builds_total",
                        "Builds finished, by builder and result.",
                    ),
                    &["builder", "result"],
                )?,
            )?,
            buildlets: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("buildfarm_buildlets", "Buildlets by pool and state."),
                    &["host_type", "pool", "state"],
                )?,
            )?,
            pool_capacity: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "buildfarm_pool_capacity",
                        "Most buildlets a pool can lease at once right now.",
                    ),
                    &["host_type", "pool"],
                )?,
            )?,
            reverse_expected: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "buildfarm_reverse_expected_hosts",
                        "Reverse hosts the config expects to be connected.",
                    ),
                    &["host_type"],
                )?,
            )?,
            reverse_connections: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "buildfarm_reverse_connections",
                        "Reverse hosts connected now.",
                    ),
                    &["host_type"],
                )?,
            )?,
            reverse_ping_rtt: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "buildfarm_reverse_ping_rtt_seconds",
                        "Slowest last tunnel ping round trip among a host type's connected hosts.",
                    ),
                    &["host_type"],
                )?,
            )?,
            handshakes_accepted: reg(
                &r,
                IntCounter::new(
                    "buildfarm_revdial_handshakes_accepted_total",
                    "Reverse dial-ins let in.",
                )?,
            )?,
            handshakes_refused: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "buildfarm_revdial_handshakes_refused_total",
                        "Reverse dial-ins refused, by reason.",
                    ),
                    &["reason"],
                )?,
            )?,
            tunnels_lost: reg(
                &r,
                IntCounter::new(
                    "buildfarm_revdial_tunnels_lost_total",
                    "Reverse tunnels lost.",
                )?,
            )?,
            connections_open: reg(
                &r,
                IntGauge::new(
                    "buildfarm_connections_open",
                    "Connections open on the coordinator's port now (TLS, plaintext HTTP, reverse dial-ins).",
                )?,
            )?,
            connections_handshaking: reg(
                &r,
                IntGauge::new(
                    "buildfarm_connections_handshaking",
                    "Connections on the coordinator's port still in their handshake.",
                )?,
            )?,
            connections_accepted: reg(
                &r,
                IntCounter::new(
                    "buildfarm_connections_accepted_total",
                    "Connections the coordinator's port admitted.",
                )?,
            )?,
            connections_evicted: reg(
                &r,
                IntCounter::new(
                    "buildfarm_connections_evicted_total",
                    "Idle or handshaking connections closed to make room at the connection cap.",
                )?,
            )?,
            connections_refused: reg(
                &r,
                IntCounter::new(
                    "buildfarm_connections_refused_total",
                    "New connections closed at once because the cap was reached and every open one was busy.",
                )?,
            )?,
            accept_errors: reg(
                &r,
                IntCounter::new(
                    "buildfarm_accept_errors_total",
                    "Failed accept calls on the coordinator's port (e.g. out of file descriptors).",
                )?,
            )?,
            store_up: reg(
                &r,
                IntGauge::new(
                    "buildfarm_store_up",
                    "1 if the store answered a ping at scrape time.",
                )?,
            )?,
            store_ping: reg(
                &r,
                Gauge::new(
                    "buildfarm_store_ping_seconds",
                    "How long a store ping took at scrape time.",
                )?,
            )?,
            active_builds: reg(
                &r,
                IntGauge::new("buildfarm_active_builds", "Builds running now.")?,
            )?,
            source_tarballs: reg(
                &r,
                IntCounter::new(
                    "buildfarm_source_tarballs_built_total",
                    "Source tarballs made (once per revision and patch, however many builders use one).",
                )?,
            )?,
            registry: r,
            scrape: Mutex::new(()),
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
        };
        Ok(m)
    }

    /// Counts a final build once; non-final builds and repeats are ignored.
    pub fn observe_build(&self, b: &Build) {
        if !b.state.is_final() {
            return;
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !seen.0.insert(b.id.clone()) {
                return;
            }
            seen.1.push_back(b.id.clone());
            if seen.1.len() > SEEN_BUILDS
                && let Some(old) = seen.1.pop_front()
            {
                seen.0.remove(&old);
            }
        }
        let labels = [b.builder.as_str(), b.state.as_str()];
        self.builds.with_label_values(&labels).inc();
        // A build cancelled while queued never ran: no duration to observe.
        if let (Some(start), Some(end)) = (b.started_at, b.finished_at) {
            self.build_duration
                .with_label_values(&labels)
                .observe((end - start).max(0) as f64 / 1000.0);
        }
    }

    /// Refreshes the scrape-time gauges and counters from `input`.
    pub fn update(&self, input: &ScrapeInput) {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        // Reset first so a host type that left the queue does not linger at its old value.
        self.queue_length.reset();
        self.queue_oldest_wait.reset();
        for q in &input.queue {
            let labels = [q.host_type.as_str(), q.class.as_str()];
            self.queue_length
                .with_label_values(&labels)
                .set(q.len as i64);
            self.queue_oldest_wait
                .with_label_values(&labels)
                .set(q.oldest_wait.as_secs_f64());
        }
        self.buildlets.reset();
        self.pool_capacity.reset();
        self.reverse_expected.reset();
        self.reverse_connections.reset();
        self.reverse_ping_rtt.reset();
        for p in &input.pools {
            for (state, n) in [
                ("in_use", p.in_use),
                ("idle", p.idle),
                ("starting", p.starting),
            ] {
                self.buildlets
                    .with_label_values(&[p.host_type.as_str(), p.kind, state])
                    .set(n as i64);
            }
            self.pool_capacity
                .with_label_values(&[p.host_type.as_str(), p.kind])
                .set(p.capacity as i64);
            if let Some(expected) = p.expected {
                self.reverse_expected
                    .with_label_values(&[p.host_type.as_str()])
                    .set(expected as i64);
                // Present (possibly 0) for every expected host type, so alerts can fire on 0.
                self.reverse_connections
                    .with_label_values(&[p.host_type.as_str()])
                    .set(0);
            }
        }
        let mut rtt: HashMap<&str, f64> = HashMap::new();
        for h in &input.reverse_hosts {
            self.reverse_connections
                .with_label_values(&[h.host_type.as_str()])
                .inc();
            if let Some(d) = h.last_ping_rtt {
                let e = rtt.entry(h.host_type.as_str()).or_insert(0.0);
                *e = e.max(d.as_secs_f64());
            }
        }
        for (ht, secs) in rtt {
            self.reverse_ping_rtt.with_label_values(&[ht]).set(secs);
        }
        if let Some(l) = &input.listener {
            // The listener's counters are monotonic; carry them over as deltas.
            advance(&self.handshakes_accepted, l.accepted_total);
            advance(&self.tunnels_lost, l.lost_total);
            for kind in revdial::RefusalKind::ALL {
                advance(
                    &self.handshakes_refused.with_label_values(&[kind.as_str()]),
                    l.refused(kind),
                );
            }
        }
        if let Some(c) = &input.connections {
            self.connections_open.set(c.open as i64);
            self.connections_handshaking.set(c.handshaking as i64);
            // Monotonic in the acceptor; carried over as deltas.
            advance(&self.connections_accepted, c.accepted_total);
            advance(&self.connections_evicted, c.evicted_total);
            advance(&self.connections_refused, c.refused_total);
            advance(&self.accept_errors, c.accept_errors_total);
        }
        match &input.store_ping {
            Ok(d) => {
                self.store_up.set(1);
                self.store_ping.set(d.as_secs_f64());
            }
            Err(_) => {
                self.store_up.set(0);
                self.store_ping.set(f64::NAN);
            }
        }
        self.active_builds.set(input.active_builds as i64);
        advance(&self.source_tarballs, input.source_tarballs_built);
    }

    /// Adds a collector owned elsewhere (e.g. the access-denial counter).
    pub fn register<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        c: C,
    ) -> anyhow::Result<()> {
        reg(&self.registry, c).context("registering a metric")?;
        Ok(())
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> anyhow::Result<String> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .context("encoding metrics")?;
        String::from_utf8(buf).context("metrics are not utf-8")
    }
}

fn advance(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// Counts every build that becomes final, until the farm shuts down. A watcher that lags
/// behind the event channel misses those builds in the counters (logged), never blocks
/// the farm.
pub async fn watch_builds(farm: Arc<Farm>, metrics: Arc<Metrics>) {
    let mut events = farm.subscribe();
    loop {
        let ev = tokio::select! {
            _ = farm.shutdown_token().cancelled() => return,
            ev = events.recv() => ev,
        };
        match ev {
            Ok(FarmEvent::BuildChanged(b)) => metrics.observe_build(&b),
            Err(RecvError::Lagged(n)) => warn!(missed = n, "metrics missed build events"),
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use buildfarm_store::{BuildKind, BuildState};

    fn build(id: &str, state: BuildState) -> Build {
        Build {
            id: id.into(),
            kind: BuildKind::PostSubmit,
            repo: "go".into(),
            branch: Some("main".into()),
            rev: "abc".into(),
            builder: "linux-amd64".into(),
            try_id: None,
            state,
            attempts: 1,
            created_at: 0,
            started_at: Some(1_000),
            finished_at: Some(4_000),
            summary: None,
            go_rev: None,
        }
    }

    #[test]
    fn builds_are_counted_once_when_final() {
        let m = Metrics::new().expect("metrics");
        m.observe_build(&build("a", BuildState::Running));
        m.observe_build(&build("a", BuildState::Ok));
        m.observe_build(&build("a", BuildState::Ok));
        m.observe_build(&build("b", BuildState::Failed));
        let text = m.encode().expect("encode");
        assert!(
            text.contains("buildfarm_builds_total{builder=\"linux-amd64\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("buildfarm_builds_total{builder=\"linux-amd64\",result=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "buildfarm_build_duration_seconds_sum{builder=\"linux-amd64\",result=\"ok\"} 3"
            ),
            "{text}"
        );
    }

    #[test]
    fn scrape_values_replace_old_ones() {
        use buildfarm_scheduler::{QueueStat, WorkClass};
        let m = Metrics::new().expect("metrics");
        let mut input = ScrapeInput {
            queue: vec![QueueStat {
                host_type: "linux".into(),
                class: WorkClass::Try,
                len: 3,
                oldest_wait: Duration::from_secs(7),
            }],
            pools: vec![PoolStatus {
                kind: "reverse",
                host_type: "mac".into(),
                capacity: 0,
                in_use: 0,
                idle: 0,
                starting: 0,
                expected: Some(2),
            }],
            reverse_hosts: vec![],
            listener: None,
            connections: Some(revdial::accept::AcceptStats {
                open: 3,
                handshaking: 1,
                accepted_total: 10,
                evicted_total: 2,
                refused_total: 1,
                accept_errors_total: 0,
            }),
            store_ping: Ok(Duration::from_millis(2)),
            active_builds: 1,
            source_tarballs_built: 2,
        };
        m.update(&input);
        let text = m.encode().expect("encode");
        assert!(
            text.contains("buildfarm_queue_length{class=\"try\",host_type=\"linux\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("buildfarm_reverse_connections{host_type=\"mac\"} 0"),
            "{text}"
        );
        assert!(text.contains("buildfarm_store_up 1"), "{text}");
        assert!(
            text.contains("buildfarm_source_tarballs_built_total 2"),
            "{text}"
        );
        assert!(text.contains("buildfarm_connections_open 3"), "{text}");
        assert!(
            text.contains("buildfarm_connections_accepted_total 10"),
            "{text}"
        );
        assert!(
            text.contains("buildfarm_connections_evicted_total 2"),
            "{text}"
        );
        input.queue.clear();
        input.connections = Some(revdial::accept::AcceptStats {
            open: 1,
            handshaking: 0,
            accepted_total: 14,
            evicted_total: 2,
            refused_total: 1,
            accept_errors_total: 0,
        });
        input.store_ping = Err("down".into());
        m.update(&input);
        let text = m.encode().expect("encode");
        assert!(!text.contains("buildfarm_queue_length{"), "{text}");
        assert!(text.contains("buildfarm_store_up 0"), "{text}");
        assert!(text.contains("buildfarm_connections_open 1"), "{text}");
        assert!(
            text.contains("buildfarm_connections_accepted_total 14"),
            "{text}"
        );
    }
}
