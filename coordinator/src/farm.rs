//! The running farm: shared state (config, store, pools, scheduler, live logs) and the
//! dispatcher loop that pops work from the scheduler whenever a pool has room and
//! starts it: a build (see `runner`) or a gomote instance request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use buildfarm_config::Config;
use buildfarm_scheduler::{
    HostUsage, Policy, PushError, Scheduler, Timestamp, WorkClass, WorkId, WorkItem,
};
use buildfarm_store::{Build, BuildKind, BuildState, Store};
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::git::Mirror;
use crate::logs::LogHub;
use crate::pool::{Lease, Pool};

/// A change other parts watch: try watchers, the status page.
#[derive(Debug, Clone)]
pub enum FarmEvent {
    BuildChanged {
        build_id: String,
        try_id: Option<String>,
    },
}

/// A build being run right now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActiveBuild {
    pub build_id: String,
    pub builder: String,
    pub repo: String,
    pub rev: String,
    pub kind: &'static str,
    pub buildlet: Option<String>,
    pub attempt: u32,
    pub started_unix_ms: i64,
    #[serde(skip)]
    pub cancel: CancellationToken,
}

/// Holds one unit of a pool's capacity; dropping it frees the slot and wakes the
/// dispatcher.
pub struct Slot {
    farm: Arc<Farm>,
    host_type: String,
    /// Counted against the interactive share too (a gomote instance).
    interactive: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(held) = self
            .farm
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.host_type)
        {
            held.total = held.total.saturating_sub(1);
            if self.interactive {
                held.interactive = held.interactive.saturating_sub(1);
            }
        }
        self.farm.wake.notify_one();
    }
}

/// Slots held on one host type.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    total: usize,
    interactive: usize,
}

/// What a gomote `create` waits for.
pub type InstanceGrant = (Lease, Slot);

/// What a farm is made of; see `main` for how each part is built.
pub struct FarmParts {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub pools: HashMap<String, Arc<dyn Pool>>,
    pub mirrors: HashMap<String, Mirror>,
    pub revdial_registry: Option<revdial::Registry>,
    pub master_key: Vec<u8>,
    pub data_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

pub struct Farm {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub pools: HashMap<String, Arc<dyn Pool>>,
    pub mirrors: HashMap<String, Mirror>,
    pub revdial_registry: Option<revdial::Registry>,
    pub logs: LogHub,
    pub master_key: Vec<u8>,
    pub data_dir: PathBuf,
    pub events: broadcast::Sender<FarmEvent>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Base URL of the HTTP side, for links in API answers.
    pub base_url: Mutex<String>,
    pub started_at: SystemTime,
    scheduler: Mutex<Scheduler>,
    in_flight: Mutex<HashMap<String, Held>>,
    pub(crate) active: Mutex<HashMap<String, ActiveBuild>>,
    gomote_waiters: Mutex<HashMap<String, oneshot::Sender<InstanceGrant>>>,
    wake: Notify,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_ts() -> Timestamp {
    Timestamp::from_millis(now_ms().max(0) as u64)
}

impl Farm {
    pub fn new(parts: FarmParts) -> Arc<Farm> {
        let (events, _) = broadcast::channel(1024);
        let policy = Policy {
            interactive_share_percent: parts.config.limits.interactive_share_percent,
            ..Policy::default()
        };
        Arc::new(Farm {
            config: parts.config,
            store: parts.store,
            pools: parts.pools,
            mirrors: parts.mirrors,
            revdial_registry: parts.revdial_registry,
            logs: LogHub::default(),
            master_key: parts.master_key,
            data_dir: parts.data_dir,
            events,
            shutdown: parts.shutdown,
            tasks: parts.tasks,
            base_url: Mutex::new(String::new()),
            started_at: SystemTime::now(),
            scheduler: Mutex::new(Scheduler::new(policy)),
            in_flight: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            gomote_waiters: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        })
    }

    pub fn base_url(&self) -> String {
        self.base_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn notify_build(&self, build_id: &str, try_id: Option<&str>) {
        let _ = self.events.send(FarmEvent::BuildChanged {
            build_id: build_id.to_owned(),
            try_id: try_id.map(str::to_owned),
        });
    }

    /// Queues a stored build for running. Post-submit work is ordered by the commit's
    /// time (newest first); without one, by when the build was created.
    pub fn enqueue(&self, build: &Build, commit_time_ms: Option<i64>) -> anyhow::Result<()> {
        let builder = self.config.builder(&build.builder).ok_or_else(|| {
            anyhow::anyhow!("build {} names unknown builder {}", build.id, build.builder)
        })?;
        let (class, commit_time) = match build.kind {
            BuildKind::Try => (WorkClass::Try, None),
            BuildKind::PostSubmit => {
                let t = commit_time_ms.unwrap_or(build.created_at).max(0) as u64;
                (WorkClass::PostSubmit, Some(Timestamp::from_millis(t)))
            }
        };
        let pushed = self
            .scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(WorkItem {
                id: WorkId(format!("build:{}", build.id)),
                host_type: builder.host_type.clone(),
                class,
                enqueued_at: now_ts(),
                commit_time,
            });
        match pushed {
            Ok(()) => {}
            // Already queued (e.g. a poll racing a resume): nothing to do.
            Err(PushError::DuplicateId(_)) => {}
            Err(e) => anyhow::bail!("queueing build {}: {e}", build.id),
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Removes a queued build from the scheduler (cancel). False if it was not queued.
    pub fn dequeue(&self, build_id: &str) -> bool {
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&WorkId(format!("build:{build_id}")))
            .is_some()
    }

    /// Asks for an interactive (gomote) buildlet of `host_type`; the receiver gets the
    /// lease when the scheduler reaches the request. `request_id` identifies it for
    /// [`Farm::queue_position`] and [`Farm::cancel_instance_request`].
    pub fn request_instance(
        &self,
        request_id: &str,
        host_type: &str,
    ) -> oneshot::Receiver<InstanceGrant> {
        let (tx, rx) = oneshot::channel();
        self.gomote_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.to_owned(), tx);
        let pushed = self
            .scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(WorkItem {
                id: WorkId(format!("gomote:{request_id}")),
                host_type: host_type.to_owned(),
                class: WorkClass::Interactive,
                enqueued_at: now_ts(),
                commit_time: None,
            });
        if let Err(e) = pushed {
            // The sender is dropped with the waiter, so the requester sees "unavailable".
            warn!(request_id, error = %e, "gomote request not queued");
            self.gomote_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(request_id);
        }
        self.wake.notify_one();
        rx
    }

    pub fn cancel_instance_request(&self, request_id: &str) {
        self.gomote_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id);
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&WorkId(format!("gomote:{request_id}")));
    }

    /// When interactive work already holds its share of `host_type`, says so (for the
    /// gomote create progress line); `None` while there is room.
    pub fn interactive_share_full(&self, host_type: &str) -> Option<String> {
        let capacity = self.pools.get(host_type)?.capacity();
        let limit = self
            .scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .policy()
            .interactive_limit(capacity);
        let held = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host_type)
            .map_or(0, |h| h.interactive);
        // With no capacity at all the wait is the pool's, not the share's.
        (capacity > 0 && held >= limit).then(|| {
            format!(
                "gomote instances hold {held} of host type {host_type}'s {capacity} buildlets, its interactive share ({}%, limits.interactive_share_percent); try and post-submit builds get the rest",
                self.config.limits.interactive_share_percent
            )
        })
    }

    pub fn queue_position(&self, request_id: &str) -> Option<usize> {
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .position(&WorkId(format!("gomote:{request_id}")), now_ts())
    }

    pub fn queue_snapshot(&self) -> Vec<buildfarm_scheduler::QueueStat> {
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(now_ts())
    }

    pub fn active_builds(&self) -> Vec<ActiveBuild> {
        let mut v: Vec<ActiveBuild> = self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|a| a.started_unix_ms);
        v
    }

    /// Cancels a build, queued or running. False if it was neither.
    pub async fn cancel_build(self: &Arc<Self>, build_id: &str) -> anyhow::Result<bool> {
        if self.dequeue(build_id) {
            let build = self.store.get_build(build_id).await?;
            let cancelled = self.store.cancel_build(build_id).await?;
            self.notify_build(build_id, build.try_id.as_deref());
            return Ok(cancelled);
        }
        let token = self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(build_id)
            .map(|a| a.cancel.clone());
        match token {
            Some(t) => {
                t.cancel();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Re-queues the work a previous coordinator left: queued builds, and running ones
    /// (whose open attempt the store records as an infra failure).
    pub async fn resume(&self) -> anyhow::Result<usize> {
        let builds = self.store.resume_after_restart().await?;
        let mut n = 0;
        for b in &builds {
            match self.enqueue(b, None) {
                Ok(()) => n += 1,
                Err(e) => {
                    warn!(build_id = %b.id, error = %e, "cannot resume build; cancelling it");
                    let _ = self.store.cancel_build(&b.id).await;
                }
            }
        }
        if n > 0 {
            info!(builds = n, "resumed unfinished work");
        }
        Ok(n)
    }

    /// The dispatcher: whenever work or capacity changes, start as much queued work as
    /// the pools have room for, in the scheduler's order.
    pub async fn dispatch_loop(self: Arc<Self>) {
        loop {
            self.dispatch_once();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                // Pool capacity can change without a wake (a reverse host connects).
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    fn dispatch_once(self: &Arc<Self>) {
        let host_types: Vec<String> = self
            .scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .host_types_with_work()
            .map(str::to_owned)
            .collect();
        for host_type in host_types {
            let Some(pool) = self.pools.get(&host_type).cloned() else {
                continue;
            };
            loop {
                let capacity = pool.capacity();
                let item = {
                    let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    let held = in_flight.entry(host_type.clone()).or_default();
                    // The scheduler decides, from the counts, whether anything fits and
                    // whether interactive work is past its share.
                    let usage = HostUsage {
                        capacity,
                        in_use: held.total,
                        interactive_in_use: held.interactive,
                    };
                    let item = self
                        .scheduler
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pop_within(&host_type, now_ts(), usage);
                    if let Some(item) = &item {
                        held.total += 1;
                        if item.class == WorkClass::Interactive {
                            held.interactive += 1;
                        }
                    }
                    item
                };
                let Some(item) = item else { break };
                let slot = Slot {
                    farm: self.clone(),
                    host_type: host_type.clone(),
                    interactive: item.class == WorkClass::Interactive,
                };
                self.start_item(item, pool.clone(), slot);
            }
        }
    }

    fn start_item(self: &Arc<Self>, item: WorkItem, pool: Arc<dyn Pool>, slot: Slot) {
        let farm = self.clone();
        let id = item.id.0.clone();
        if let Some(build_id) = id.strip_prefix("build:") {
            let build_id = build_id.to_owned();
            self.tasks.spawn(async move {
                crate::runner::run_build(farm, build_id, pool, slot).await;
            });
        } else if let Some(request_id) = id.strip_prefix("gomote:") {
            let request_id = request_id.to_owned();
            self.tasks.spawn(async move {
                let waiter = farm
                    .gomote_waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&request_id);
                let Some(waiter) = waiter else { return };
                let cancel = farm.shutdown.child_token();
                match pool.acquire(&cancel).await {
                    Ok(lease) => {
                        // If the requester went away, the grant is dropped and the
                        // buildlet and slot go back.
                        let _ = waiter.send((lease, slot));
                    }
                    Err(e) => {
                        warn!(request_id, error = %e, "no buildlet for gomote request");
                        drop(waiter);
                    }
                }
            });
        }
    }

    /// Marks a build as final in the store exactly once and tells watchers.
    pub async fn finish(&self, build: &Build, state: BuildState, summary: &str, log: &[u8]) {
        match self
            .store
            .finish_build(&build.id, state, Some(summary), log)
            .await
        {
            Ok(()) => {
                info!(build_id = %build.id, builder = %build.builder, rev = %build.rev, result = %state, summary, "build finished");
                println!(
                    "build {} {} {} {}: {state} ({summary})",
                    build.repo,
                    short(&build.rev),
                    build.builder,
                    build.kind
                );
            }
            Err(e) => warn!(build_id = %build.id, error = %e, "could not record result"),
        }
        self.notify_build(&build.id, build.try_id.as_deref());
    }
}

pub fn short(rev: &str) -> &str {
    rev.get(..10).unwrap_or(rev)
}
