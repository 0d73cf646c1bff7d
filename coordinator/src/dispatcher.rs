//! The dispatcher's state: the scheduler, the capacity each host type has handed out
//! (in-flight counts), gomote requests waiting for a buildlet, and the builds that are
//! active. It alone moves work between "queued" and "active", under one lock order
//! (scheduler, then active), so a build is always in exactly one of the two until the
//! farm records its result: cancel always finds it.
//!
//! No I/O here: the farm's dispatch loop calls [`Dispatcher::pop_ready`] when woken and
//! spawns what it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use buildfarm_scheduler::{
    HostUsage, Policy, PushError, QueueStat, Scheduler, Timestamp, WorkClass, WorkId, WorkItem,
};
use buildfarm_store::{Build, BuildKind};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::pool::{Lease, Pool};

/// A build being run right now (or popped and about to be).
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

/// What a gomote `create` waits for.
pub type InstanceGrant = (Lease, Slot);

/// Why work could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    #[error("the build queue is full ({limit} items); try again later")]
    Full { limit: usize },
}

/// Holds one unit of a pool's capacity; dropping it frees the slot and wakes the
/// dispatch loop.
pub struct Slot {
    dispatcher: Arc<Dispatcher>,
    host_type: String,
    /// Counted against the interactive share too (a gomote instance).
    interactive: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(held) = lock(&self.dispatcher.in_flight).get_mut(&self.host_type) {
            held.total = held.total.saturating_sub(1);
            if self.interactive {
                held.interactive = held.interactive.saturating_sub(1);
            }
        }
        self.dispatcher.wake();
    }
}

/// Slots held on one host type.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    total: usize,
    interactive: usize,
}

/// What the queue remembers of a build so it can be listed as active the moment it is
/// popped, before anything reads the store.
#[derive(Debug, Clone)]
struct QueuedBuild {
    builder: String,
    repo: String,
    rev: String,
    kind: &'static str,
    attempts: u32,
}

/// Work the dispatch loop must start now.
pub enum Ready {
    /// A build, already registered as active with `cancel`.
    Build {
        build_id: String,
        pool: Arc<dyn Pool>,
        slot: Slot,
        cancel: CancellationToken,
    },
    /// A gomote request whose requester is still waiting.
    Instance {
        request_id: String,
        waiter: oneshot::Sender<InstanceGrant>,
        pool: Arc<dyn Pool>,
        slot: Slot,
    },
}

pub struct Dispatcher {
    scheduler: Mutex<Scheduler>,
    queued: Mutex<HashMap<String, QueuedBuild>>,
    in_flight: Mutex<HashMap<String, Held>>,
    active: Mutex<HashMap<String, ActiveBuild>>,
    gomote_waiters: Mutex<HashMap<String, oneshot::Sender<InstanceGrant>>>,
    wake: Notify,
    /// Told at every wake, for plans waiting for a helper slot.
    helper_room: Notify,
}

/// A poisoned lock only means another thread panicked mid-update of plain counters and
/// maps; carrying on beats taking the farm down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn build_work_id(build_id: &str) -> WorkId {
    WorkId(format!("build:{build_id}"))
}

fn gomote_work_id(request_id: &str) -> WorkId {
    WorkId(format!("gomote:{request_id}"))
}

impl Dispatcher {
    pub fn new(policy: Policy) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            scheduler: Mutex::new(Scheduler::new(policy)),
            queued: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            gomote_waiters: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            helper_room: Notify::new(),
        })
    }

    /// Wakes the dispatch loop (new work, freed capacity, a host connected). A wake
    /// with no one waiting is kept, so none is lost.
    pub fn wake(&self) {
        self.wake.notify_one();
        self.helper_room.notify_waiters();
    }

    /// A slot beyond those held on `host_type`, if it has room; with `queued_first`, only
    /// while nothing is queued for it.
    fn try_spare_slot(
        self: &Arc<Self>,
        host_type: &str,
        capacity: usize,
        queued_first: bool,
    ) -> Option<Slot> {
        let s = lock(&self.scheduler);
        if queued_first && s.len_for(host_type) > 0 {
            return None;
        }
        let mut in_flight = lock(&self.in_flight);
        let held = in_flight.entry(host_type.to_owned()).or_default();
        if held.total >= capacity {
            return None;
        }
        held.total += 1;
        Some(Slot {
            dispatcher: self.clone(),
            host_type: host_type.to_owned(),
            interactive: false,
        })
    }

    /// A slot for one more buildlet of a plan build that already holds its own: taken
    /// only while `host_type` has room beyond the slots held and nothing is queued for
    /// it, so queued work always goes first (a plan can finish on its own slot).
    pub async fn helper_slot(
        self: &Arc<Self>,
        host_type: &str,
        capacity: impl Fn() -> usize,
    ) -> Slot {
        self.wait_for_slot(host_type, capacity, true).await
    }

    /// A slot for a build that gave its own back while it waited for another build:
    /// taken as soon as `host_type` has room, ahead of queued work (the build was
    /// popped before it).
    pub async fn returning_slot(
        self: &Arc<Self>,
        host_type: &str,
        capacity: impl Fn() -> usize,
    ) -> Slot {
        self.wait_for_slot(host_type, capacity, false).await
    }

    /// `capacity` is asked again at every try (a pool's capacity changes as machines
    /// come and go); a missed wake costs at most a second.
    async fn wait_for_slot(
        self: &Arc<Self>,
        host_type: &str,
        capacity: impl Fn() -> usize,
        queued_first: bool,
    ) -> Slot {
        loop {
            let room = self.helper_room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(slot) = self.try_spare_slot(host_type, capacity(), queued_first) {
                return slot;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), room).await;
        }
    }

    /// Resolves at the next [`Dispatcher::wake`].
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Whether `n` more items fit in the queue now (checked before storing new work, so
    /// a full queue refuses it before anything is written).
    pub fn has_room(&self, n: usize) -> Result<(), QueueFull> {
        let s = lock(&self.scheduler);
        let limit = s.policy().max_items;
        if s.len().saturating_add(n) > limit {
            return Err(QueueFull::Full { limit });
        }
        Ok(())
    }

    /// Queues a stored build on `host_type`. Post-submit work is ordered by the commit's
    /// time (newest first); without one, by when the build was created. A build already
    /// queued or active is left alone.
    pub fn push_build(
        &self,
        build: &Build,
        host_type: &str,
        commit_time_ms: Option<i64>,
        now: Timestamp,
    ) -> Result<(), QueueFull> {
        let (class, commit_time) = match build.kind {
            // Someone waits for an artifact as for a try run.
            BuildKind::Try | BuildKind::Artifact => (WorkClass::Try, None),
            BuildKind::PostSubmit => {
                let t = commit_time_ms.unwrap_or(build.created_at).max(0) as u64;
                (WorkClass::PostSubmit, Some(Timestamp::from_millis(t)))
            }
        };
        let mut s = lock(&self.scheduler);
        if lock(&self.active).contains_key(&build.id) {
            return Ok(());
        }
        let pushed = s.push(WorkItem {
            id: build_work_id(&build.id),
            host_type: host_type.to_owned(),
            class,
            enqueued_at: now,
            commit_time,
        });
        match pushed {
            Ok(()) => {
                lock(&self.queued).insert(
                    build.id.clone(),
                    QueuedBuild {
                        builder: build.builder.clone(),
                        repo: build.repo.clone(),
                        rev: build.rev.clone(),
                        kind: build.kind.as_str(),
                        attempts: build.attempts,
                    },
                );
            }
            // Already queued (e.g. a poll racing the reconciler): nothing to do.
            Err(PushError::DuplicateId(_)) => return Ok(()),
            Err(PushError::Full { limit }) => return Err(QueueFull::Full { limit }),
        }
        drop(s);
        self.wake();
        Ok(())
    }

    /// Takes a queued build out of the queue (cancel). False if it was not queued.
    pub fn remove_queued(&self, build_id: &str) -> bool {
        let removed = lock(&self.scheduler)
            .remove(&build_work_id(build_id))
            .is_some();
        if removed {
            lock(&self.queued).remove(build_id);
        }
        removed
    }

    /// Cancels a build wherever it is. Queued: taken out of the queue
    /// ([`Cancelled::Dequeued`]; the caller records it). Active: its token is cancelled
    /// and its runner ends it ([`Cancelled::Signalled`]). Both checks happen under the
    /// scheduler lock that popping also holds, so no build slips between them.
    pub fn cancel(&self, build_id: &str) -> Option<Cancelled> {
        let mut s = lock(&self.scheduler);
        if s.remove(&build_work_id(build_id)).is_some() {
            lock(&self.queued).remove(build_id);
            return Some(Cancelled::Dequeued);
        }
        let active = lock(&self.active);
        drop(s);
        active.get(build_id).map(|a| {
            a.cancel.cancel();
            Cancelled::Signalled
        })
    }

    /// True while the build is queued or active: the reconciler leaves it alone.
    pub fn knows(&self, build_id: &str) -> bool {
        let s = lock(&self.scheduler);
        s.get(&build_work_id(build_id)).is_some() || lock(&self.active).contains_key(build_id)
    }

    /// Records which buildlet and attempt an active build is on, for the status page.
    pub fn set_attempt(&self, build_id: &str, buildlet: &str, attempt: u32) {
        if let Some(a) = lock(&self.active).get_mut(build_id) {
            a.buildlet = Some(buildlet.to_owned());
            a.attempt = attempt;
        }
    }

    /// Forgets an active build; the farm calls it after the result is recorded.
    pub fn finish_active(&self, build_id: &str) {
        lock(&self.active).remove(build_id);
    }

    pub fn active_builds(&self) -> Vec<ActiveBuild> {
        let mut v: Vec<ActiveBuild> = lock(&self.active).values().cloned().collect();
        v.sort_by_key(|a| a.started_unix_ms);
        v
    }

    /// Asks for an interactive (gomote) buildlet of `host_type`; the receiver gets the
    /// lease when the scheduler reaches the request, or is dropped if it cannot be queued.
    pub fn request_instance(
        &self,
        request_id: &str,
        host_type: &str,
        now: Timestamp,
    ) -> oneshot::Receiver<InstanceGrant> {
        let (tx, rx) = oneshot::channel();
        let mut s = lock(&self.scheduler);
        let pushed = s.push(WorkItem {
            id: gomote_work_id(request_id),
            host_type: host_type.to_owned(),
            class: WorkClass::Interactive,
            enqueued_at: now,
            commit_time: None,
        });
        match pushed {
            Ok(()) => {
                lock(&self.gomote_waiters).insert(request_id.to_owned(), tx);
            }
            // The sender is dropped, so the requester sees "unavailable".
            Err(e) => tracing::warn!(request_id, error = %e, "gomote request not queued"),
        }
        drop(s);
        self.wake();
        rx
    }

    pub fn cancel_instance_request(&self, request_id: &str) {
        lock(&self.scheduler).remove(&gomote_work_id(request_id));
        lock(&self.gomote_waiters).remove(request_id);
    }

    pub fn queue_position(&self, request_id: &str, now: Timestamp) -> Option<usize> {
        lock(&self.scheduler).position(&gomote_work_id(request_id), now)
    }

    pub fn queue_snapshot(&self, now: Timestamp) -> Vec<QueueStat> {
        lock(&self.scheduler).snapshot(now)
    }

    /// Interactive slots held on `host_type` and the most they may hold of `capacity`.
    pub fn interactive_held(&self, host_type: &str, capacity: usize) -> (usize, usize) {
        let limit = lock(&self.scheduler).policy().interactive_limit(capacity);
        let held = lock(&self.in_flight)
            .get(host_type)
            .map_or(0, |h| h.interactive);
        (held, limit)
    }

    /// Pops, in scheduler order, all the work the pools have room for. Each build is
    /// registered active with a fresh child token of `parent` before this returns.
    pub fn pop_ready(
        self: &Arc<Self>,
        pools: &HashMap<String, Arc<dyn Pool>>,
        parent: &CancellationToken,
        now: Timestamp,
        now_ms: i64,
    ) -> Vec<Ready> {
        let mut out = Vec::new();
        let host_types: Vec<String> = lock(&self.scheduler)
            .host_types_with_work()
            .map(str::to_owned)
            .collect();
        for host_type in host_types {
            let Some(pool) = pools.get(&host_type) else {
                continue;
            };
            loop {
                let capacity = pool.capacity();
                let mut s = lock(&self.scheduler);
                let item = {
                    let mut in_flight = lock(&self.in_flight);
                    let held = in_flight.entry(host_type.clone()).or_default();
                    // The scheduler decides, from the counts, whether anything fits and
                    // whether interactive work is past its share.
                    let usage = HostUsage {
                        capacity,
                        in_use: held.total,
                        interactive_in_use: held.interactive,
                    };
                    let item = s.pop_within(&host_type, now, usage);
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
                    dispatcher: self.clone(),
                    host_type: host_type.clone(),
                    interactive: item.class == WorkClass::Interactive,
                };
                if let Some(build_id) = item.id.0.strip_prefix("build:") {
                    let cancel = parent.child_token();
                    let meta = lock(&self.queued).remove(build_id);
                    // Still under the scheduler lock: cancel sees it queued or active.
                    lock(&self.active).insert(
                        build_id.to_owned(),
                        ActiveBuild {
                            build_id: build_id.to_owned(),
                            builder: meta.as_ref().map(|m| m.builder.clone()).unwrap_or_default(),
                            repo: meta.as_ref().map(|m| m.repo.clone()).unwrap_or_default(),
                            rev: meta.as_ref().map(|m| m.rev.clone()).unwrap_or_default(),
                            kind: meta.as_ref().map_or("", |m| m.kind),
                            buildlet: None,
                            attempt: meta.as_ref().map_or(1, |m| m.attempts + 1),
                            started_unix_ms: now_ms,
                            cancel: cancel.clone(),
                        },
                    );
                    drop(s);
                    out.push(Ready::Build {
                        build_id: build_id.to_owned(),
                        pool: pool.clone(),
                        slot,
                        cancel,
                    });
                } else if let Some(request_id) = item.id.0.strip_prefix("gomote:") {
                    drop(s);
                    // A requester that gave up took its waiter; the slot goes back.
                    if let Some(waiter) = lock(&self.gomote_waiters).remove(request_id) {
                        out.push(Ready::Instance {
                            request_id: request_id.to_owned(),
                            waiter,
                            pool: pool.clone(),
                            slot,
                        });
                    }
                }
            }
        }
        out
    }
}

/// How [`Dispatcher::cancel`] found the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    Dequeued,
    Signalled,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(d: &Dispatcher, host_type: &str) -> usize {
        lock(&d.in_flight).get(host_type).map_or(0, |h| h.total)
    }

    #[test]
    fn helper_slots_fill_spare_capacity_and_come_back_when_dropped() {
        let d = Dispatcher::new(Policy::default());
        let a = d
            .try_spare_slot("linux-amd64", 2, true)
            .expect("room for one");
        let b = d
            .try_spare_slot("linux-amd64", 2, true)
            .expect("room for two");
        assert!(
            d.try_spare_slot("linux-amd64", 2, true).is_none(),
            "capacity is 2"
        );
        assert_eq!(held(&d, "linux-amd64"), 2);
        assert!(
            d.try_spare_slot("linux-arm64", 1, true).is_some(),
            "other host types are counted apart"
        );
        drop(a);
        assert_eq!(held(&d, "linux-amd64"), 1);
        assert!(d.try_spare_slot("linux-amd64", 2, true).is_some());
        drop(b);
    }

    #[test]
    fn queued_work_goes_before_helpers() {
        let d = Dispatcher::new(Policy::default());
        let _waiting = d.request_instance("r1", "linux-amd64", Timestamp::from_millis(1));
        assert!(
            d.try_spare_slot("linux-amd64", 4, true).is_none(),
            "a queued request must be served before a plan's helper"
        );
        d.cancel_instance_request("r1");
        assert!(d.try_spare_slot("linux-amd64", 4, true).is_some());
    }

    #[tokio::test]
    async fn a_returning_build_goes_before_queued_work_but_not_past_capacity() {
        let d = Dispatcher::new(Policy::default());
        let _waiting = d.request_instance("r1", "h", Timestamp::from_millis(1));
        let slot = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            d.returning_slot("h", || 1),
        )
        .await
        .expect("room for the returning build despite the queue");
        assert_eq!(held(&d, "h"), 1);
        assert!(d.try_spare_slot("h", 1, false).is_none(), "capacity is 1");
        drop(slot);
    }

    #[tokio::test]
    async fn a_waiting_helper_gets_the_slot_another_frees() {
        let d = Dispatcher::new(Policy::default());
        let first = d.try_spare_slot("h", 1, true).expect("room");
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.helper_slot("h", || 1).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no room while the first is held");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(30), waiter)
            .await
            .expect("woken by the freed slot")
            .expect("task ran");
        assert_eq!(held(&d, "h"), 1);
        drop(second);
        assert_eq!(held(&d, "h"), 0);
    }
}
