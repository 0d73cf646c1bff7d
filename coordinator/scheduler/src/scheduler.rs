//! The scheduler: per-host-type priority queues with aging, as plain data.
//!
//! # Ordering rule
//!
//! At time `now`, the next item for a host type is the first of its items in this order:
//!
//! 1. **Starved items** — those that have waited *strictly longer* than
//!    [`Policy::starvation_after`] (`now - enqueued_at > starvation_after`) — oldest
//!    `enqueued_at` first, whatever their class; ties by insertion order.
//! 2. Then the other items by class, `Interactive`, then `Try`, then `PostSubmit`:
//!    - `Interactive` and `Try`: FIFO, oldest `enqueued_at` first, ties by insertion order;
//!    - `PostSubmit`: newest [`WorkItem::sort_time`] (commit time) first, so fresh commits
//!      build first and older ones backfill (the Go farm's LIFO); ties by insertion order.
//!
//! Starved items are served FIFO among themselves, not by class, so a steady stream of
//! urgent work that itself ages cannot starve older low-class work: once an item is starved,
//! only items queued before it can still go ahead of it (bounded by the queue length at
//! that moment).
//!
//! # Interactive share
//!
//! [`Scheduler::pop_within`] also caps interactive (gomote) work: given how much of a host
//! type's capacity is in use and how much of that is interactive, it skips interactive
//! items (starved or not) once interactive work holds [`Policy::interactive_limit`]
//! buildlets, so a borrowed buildlet, which may be held for the whole idle timeout, can
//! never take the capacity that try and post-submit work needs. A skipped item stays
//! queued and is popped when an interactive buildlet is given back.
//!
//! # Cost
//!
//! Each class of each host type keeps two `BTreeMap`s (by order and by age), so `push`,
//! `remove` and `pop_next` are O(log n). `position` is O(items of that host type) and
//! `snapshot` O(host types); both are for display.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::item::{Timestamp, WorkClass, WorkId, WorkItem};

/// Tuning of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// An item that has waited longer than this goes ahead of every item that has not
    /// (see the module docs). Default: 10 minutes.
    pub starvation_after: Duration,
    /// Most items queued at once over all host types; `push` beyond it is rejected with
    /// [`PushError::Full`] (callers answer `ResourceExhausted`). Default: 100,000.
    pub max_items: usize,
    /// Percent of a host type's capacity interactive work may hold at once (see
    /// [`Policy::interactive_limit`]); values above 100 count as 100. Default: 50.
    pub interactive_share_percent: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            starvation_after: Duration::from_secs(10 * 60),
            max_items: 100_000,
            interactive_share_percent: 50,
        }
    }
}

impl Policy {
    /// How many of `capacity` buildlets interactive work may hold at once:
    /// `interactive_share_percent` of it rounded down, but at least one (a host type with
    /// a single buildlet can still be borrowed) and never more than `capacity`.
    pub fn interactive_limit(&self, capacity: usize) -> usize {
        let percent = self.interactive_share_percent.min(100) as usize;
        (capacity.saturating_mul(percent) / 100)
            .max(1)
            .min(capacity)
    }
}

/// What a host type's capacity is and how much of it is held, as the dispatcher counts
/// it: the input of [`Scheduler::pop_within`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostUsage {
    /// Buildlets the pool can provide at once now.
    pub capacity: usize,
    /// Of those, how many are held by running work of any class.
    pub in_use: usize,
    /// Of `in_use`, how many are held by interactive (gomote) work.
    pub interactive_in_use: usize,
}

/// Why [`Scheduler::push`] refused an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// An item with this id is already queued; it is kept unchanged. To requeue, `remove`
    /// it first (replacing silently would move it in line).
    #[error("work item {0} is already queued")]
    DuplicateId(WorkId),
    /// The queue holds [`Policy::max_items`] items.
    #[error("scheduler queue is full ({limit} items)")]
    Full {
        /// The configured limit.
        limit: usize,
    },
}

/// Queue length and longest wait of one class of one host type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStat {
    /// The host type.
    pub host_type: String,
    /// The class.
    pub class: WorkClass,
    /// Items queued.
    pub len: usize,
    /// How long the longest-waiting of them has waited.
    pub oldest_wait: Duration,
}

/// Position of an item within its class queue: a rank then the insertion sequence.
/// For FIFO classes the rank is `enqueued_at`; for post-submit it is the sort time inverted,
/// so the newest sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct OrderKey {
    rank: u64,
    seq: u64,
}

type AgeKey = (Timestamp, u64);

/// Where an item stands in the pop order at a given `now`; smaller pops first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PopKey {
    Starved(AgeKey),
    Queued(WorkClass, OrderKey),
}

#[derive(Debug)]
struct Entry {
    item: WorkItem,
    seq: u64,
}

impl Entry {
    fn order_key(&self) -> OrderKey {
        let rank = match self.item.class {
            WorkClass::Interactive | WorkClass::Try => self.item.enqueued_at.as_millis(),
            WorkClass::PostSubmit => u64::MAX - self.item.sort_time().as_millis(),
        };
        OrderKey {
            rank,
            seq: self.seq,
        }
    }

    fn age_key(&self) -> AgeKey {
        (self.item.enqueued_at, self.seq)
    }
}

#[derive(Debug, Default)]
struct ClassQueue {
    by_order: BTreeMap<OrderKey, WorkId>,
    by_age: BTreeMap<AgeKey, WorkId>,
}

#[derive(Debug, Default)]
struct HostQueue {
    classes: [ClassQueue; 3],
}

impl HostQueue {
    fn is_empty(&self) -> bool {
        self.classes.iter().all(|c| c.by_order.is_empty())
    }

    fn len(&self) -> usize {
        self.classes.iter().map(|c| c.by_order.len()).sum()
    }
}

/// Per-host-type priority queues; see the module docs for the ordering rule.
#[derive(Debug, Default)]
pub struct Scheduler {
    policy: Policy,
    items: HashMap<WorkId, Entry>,
    // Sorted so status pages list host types in a stable order.
    hosts: BTreeMap<String, HostQueue>,
    next_seq: u64,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(policy: Policy) -> Self {
        Scheduler {
            policy,
            ..Scheduler::default()
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Queues `item`. A duplicate id is rejected and the queued item kept.
    pub fn push(&mut self, item: WorkItem) -> Result<(), PushError> {
        if self.items.contains_key(&item.id) {
            return Err(PushError::DuplicateId(item.id));
        }
        if self.items.len() >= self.policy.max_items {
            return Err(PushError::Full {
                limit: self.policy.max_items,
            });
        }
        let entry = Entry {
            seq: self.next_seq,
            item,
        };
        self.next_seq += 1;
        let queue = &mut self
            .hosts
            .entry(entry.item.host_type.clone())
            .or_default()
            .classes[entry.item.class.index()];
        queue
            .by_order
            .insert(entry.order_key(), entry.item.id.clone());
        queue.by_age.insert(entry.age_key(), entry.item.id.clone());
        self.items.insert(entry.item.id.clone(), entry);
        Ok(())
    }

    /// Takes an item out of the queue (a cancelled build, a gomote request given up).
    pub fn remove(&mut self, id: &WorkId) -> Option<WorkItem> {
        let entry = self.items.remove(id)?;
        let host = &entry.item.host_type;
        if let Some(hq) = self.hosts.get_mut(host) {
            let queue = &mut hq.classes[entry.item.class.index()];
            queue.by_order.remove(&entry.order_key());
            queue.by_age.remove(&entry.age_key());
            if hq.is_empty() {
                // Drop empty host queues so churn over many host types does not leak.
                self.hosts.remove(host);
            }
        }
        Some(entry.item)
    }

    /// Takes the item that should run next on a free buildlet of `host_type` at `now`,
    /// whatever its class (no share is enforced; see [`Scheduler::pop_within`]).
    pub fn pop_next(&mut self, host_type: &str, now: Timestamp) -> Option<WorkItem> {
        self.pop_where(host_type, now, |_| true)
    }

    /// Takes the item that should run next on `host_type` at `now` given its `usage`:
    /// nothing when the capacity is all in use, and no interactive item once interactive
    /// work holds its share ([`Policy::interactive_limit`]); other classes go ahead of a
    /// capped interactive item then, and it keeps its place for later.
    pub fn pop_within(
        &mut self,
        host_type: &str,
        now: Timestamp,
        usage: HostUsage,
    ) -> Option<WorkItem> {
        if usage.in_use >= usage.capacity {
            return None;
        }
        let interactive_ok =
            usage.interactive_in_use < self.policy.interactive_limit(usage.capacity);
        self.pop_where(host_type, now, |class| {
            class != WorkClass::Interactive || interactive_ok
        })
    }

    /// The ordering rule over the classes `allowed` accepts.
    fn pop_where(
        &mut self,
        host_type: &str,
        now: Timestamp,
        allowed: impl Fn(WorkClass) -> bool,
    ) -> Option<WorkItem> {
        let hq = self.hosts.get(host_type)?;
        let open = || {
            WorkClass::ALL
                .into_iter()
                .filter(|c| allowed(*c))
                .map(|c| &hq.classes[c.index()])
        };
        let oldest = open()
            .filter_map(|q| q.by_age.first_key_value())
            .min_by_key(|(key, _)| **key);
        let id = match oldest {
            // Starvation is monotone in age: if the oldest item is not starved, none is.
            Some(((enqueued_at, _), id)) if self.starved(*enqueued_at, now) => id,
            _ => open()
                .find_map(|q| q.by_order.first_key_value())
                .map(|(_, id)| id)?,
        };
        let id = id.clone();
        self.remove(&id)
    }

    /// How many items would be popped before `id` on its host type at `now`
    /// (0 means it is next), for the gomote "waiters ahead" display.
    pub fn position(&self, id: &WorkId, now: Timestamp) -> Option<usize> {
        let entry = self.items.get(id)?;
        let mine = self.pop_key(entry, now);
        let hq = self.hosts.get(&entry.item.host_type)?;
        let ahead = hq
            .classes
            .iter()
            .flat_map(|q| q.by_order.values())
            .filter_map(|other| self.items.get(other))
            .filter(|other| self.pop_key(other, now) < mine)
            .count();
        Some(ahead)
    }

    /// Length and longest wait per host type and class with queued work, sorted by host
    /// type then class.
    pub fn snapshot(&self, now: Timestamp) -> Vec<QueueStat> {
        let mut out = Vec::new();
        for (host, hq) in &self.hosts {
            for class in WorkClass::ALL {
                let q = &hq.classes[class.index()];
                if let Some(((oldest, _), _)) = q.by_age.first_key_value() {
                    out.push(QueueStat {
                        host_type: host.clone(),
                        class,
                        len: q.by_order.len(),
                        oldest_wait: now.saturating_duration_since(*oldest),
                    });
                }
            }
        }
        out
    }

    /// The queued item with this id.
    pub fn get(&self, id: &WorkId) -> Option<&WorkItem> {
        self.items.get(id).map(|e| &e.item)
    }

    /// Items queued over all host types.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items queued for one host type.
    pub fn len_for(&self, host_type: &str) -> usize {
        self.hosts.get(host_type).map_or(0, HostQueue::len)
    }

    /// Host types with at least one queued item, sorted; pools use it to decide what to
    /// create or wait for.
    pub fn host_types_with_work(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }

    fn starved(&self, enqueued_at: Timestamp, now: Timestamp) -> bool {
        now.saturating_duration_since(enqueued_at) > self.policy.starvation_after
    }

    fn pop_key(&self, entry: &Entry, now: Timestamp) -> PopKey {
        if self.starved(entry.item.enqueued_at, now) {
            PopKey::Starved(entry.age_key())
        } else {
            PopKey::Queued(entry.item.class, entry.order_key())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn item(id: &str, host: &str, class: WorkClass, enq: u64, commit: Option<u64>) -> WorkItem {
        WorkItem {
            id: WorkId::new(id),
            host_type: host.to_owned(),
            class,
            enqueued_at: Timestamp::from_millis(enq),
            commit_time: commit.map(Timestamp::from_millis),
        }
    }

    fn drain(s: &mut Scheduler, host: &str, now: u64) -> Vec<String> {
        std::iter::from_fn(|| s.pop_next(host, Timestamp::from_millis(now)))
            .map(|i| i.id.0)
            .collect()
    }

    #[test]
    fn classes_pop_interactive_then_try_then_post_submit() {
        let mut s = Scheduler::default();
        s.push(item("post", "h", WorkClass::PostSubmit, 0, Some(5)))
            .unwrap();
        s.push(item("try", "h", WorkClass::Try, 1, None)).unwrap();
        s.push(item("gomote", "h", WorkClass::Interactive, 2, None))
            .unwrap();
        assert_eq!(drain(&mut s, "h", 3), ["gomote", "try", "post"]);
        assert!(s.is_empty());
    }

    #[test]
    fn try_work_is_fifo_by_enqueue_time_then_insertion() {
        let mut s = Scheduler::default();
        s.push(item("b", "h", WorkClass::Try, 20, None)).unwrap();
        s.push(item("a", "h", WorkClass::Try, 10, None)).unwrap();
        s.push(item("c", "h", WorkClass::Try, 20, None)).unwrap();
        assert_eq!(drain(&mut s, "h", 30), ["a", "b", "c"]);
    }

    #[test]
    fn post_submit_builds_newest_commit_first() {
        let mut s = Scheduler::default();
        s.push(item("old", "h", WorkClass::PostSubmit, 0, Some(100)))
            .unwrap();
        s.push(item("new", "h", WorkClass::PostSubmit, 1, Some(300)))
            .unwrap();
        // Without a commit time, the enqueue time stands in.
        s.push(item("nocommit", "h", WorkClass::PostSubmit, 200, None))
            .unwrap();
        s.push(item("new2", "h", WorkClass::PostSubmit, 2, Some(300)))
            .unwrap();
        assert_eq!(drain(&mut s, "h", 250), ["new", "new2", "nocommit", "old"]);
    }

    #[test]
    fn duplicate_ids_are_rejected_and_the_original_kept() {
        let mut s = Scheduler::default();
        s.push(item("x", "h", WorkClass::PostSubmit, 0, None))
            .unwrap();
        let err = s.push(item("x", "other", WorkClass::Interactive, 5, None));
        assert_eq!(err, Err(PushError::DuplicateId(WorkId::new("x"))));
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(&WorkId::new("x")).unwrap().host_type, "h");
        assert!(s.pop_next("other", Timestamp::from_millis(5)).is_none());
    }

    #[test]
    fn a_full_scheduler_rejects_pushes() {
        let mut s = Scheduler::new(Policy {
            max_items: 2,
            ..Policy::default()
        });
        s.push(item("a", "h", WorkClass::Try, 0, None)).unwrap();
        s.push(item("b", "h", WorkClass::Try, 0, None)).unwrap();
        let err = s.push(item("c", "h", WorkClass::Try, 0, None));
        assert_eq!(err, Err(PushError::Full { limit: 2 }));
        assert_eq!(
            err.unwrap_err().to_string(),
            "scheduler queue is full (2 items)"
        );
        s.remove(&WorkId::new("a")).unwrap();
        s.push(item("c", "h", WorkClass::Try, 0, None)).unwrap();
    }

    #[test]
    fn removed_items_are_never_popped() {
        let mut s = Scheduler::default();
        s.push(item("a", "h", WorkClass::Try, 0, None)).unwrap();
        s.push(item("b", "h", WorkClass::Try, 1, None)).unwrap();
        assert_eq!(s.remove(&WorkId::new("a")).unwrap().id.0, "a");
        assert_eq!(s.remove(&WorkId::new("a")), None);
        assert_eq!(drain(&mut s, "h", 2), ["b"]);
        assert_eq!(
            s.host_types_with_work().count(),
            0,
            "empty host queue dropped"
        );
    }

    #[test]
    fn other_host_types_work_is_never_returned() {
        let mut s = Scheduler::default();
        s.push(item("a", "linux", WorkClass::Interactive, 0, None))
            .unwrap();
        s.push(item("b", "windows", WorkClass::PostSubmit, 0, None))
            .unwrap();
        assert!(s.pop_next("darwin", Timestamp::from_millis(1)).is_none());
        assert_eq!(drain(&mut s, "windows", 1), ["b"]);
        assert_eq!(s.len_for("linux"), 1);
        assert_eq!(s.host_types_with_work().collect::<Vec<_>>(), ["linux"]);
    }

    #[test]
    fn an_item_waiting_longer_than_starvation_after_goes_first() {
        let mut s = Scheduler::default(); // 10 minutes
        s.push(item("post", "h", WorkClass::PostSubmit, 0, None))
            .unwrap();
        s.push(item("try", "h", WorkClass::Try, 5 * MIN, None))
            .unwrap();
        s.push(item("gomote", "h", WorkClass::Interactive, 9 * MIN, None))
            .unwrap();
        // Exactly 10 minutes is not yet "longer than".
        assert_eq!(
            s.position(&WorkId::new("post"), Timestamp::from_millis(10 * MIN)),
            Some(2)
        );
        assert_eq!(drain(&mut s, "h", 10 * MIN + 1), ["post", "gomote", "try"]);
    }

    #[test]
    fn starved_items_are_served_oldest_first_regardless_of_class() {
        let mut s = Scheduler::default();
        s.push(item("try", "h", WorkClass::Try, 2 * MIN, None))
            .unwrap();
        s.push(item("post", "h", WorkClass::PostSubmit, MIN, None))
            .unwrap();
        s.push(item("gomote", "h", WorkClass::Interactive, 3 * MIN, None))
            .unwrap();
        assert_eq!(drain(&mut s, "h", 60 * MIN), ["post", "try", "gomote"]);
    }

    #[test]
    fn position_counts_the_items_popped_before_it() {
        let mut s = Scheduler::default();
        s.push(item("post", "h", WorkClass::PostSubmit, 0, Some(0)))
            .unwrap();
        s.push(item("g1", "h", WorkClass::Interactive, 1, None))
            .unwrap();
        s.push(item("t1", "h", WorkClass::Try, 2, None)).unwrap();
        s.push(item("g2", "h", WorkClass::Interactive, 3, None))
            .unwrap();
        s.push(item("elsewhere", "x", WorkClass::Interactive, 0, None))
            .unwrap();
        let now = Timestamp::from_millis(4);
        let pos = |s: &Scheduler, id: &str| s.position(&WorkId::new(id), now);
        assert_eq!(pos(&s, "g1"), Some(0));
        assert_eq!(pos(&s, "g2"), Some(1));
        assert_eq!(pos(&s, "t1"), Some(2));
        assert_eq!(pos(&s, "post"), Some(3));
        assert_eq!(pos(&s, "elsewhere"), Some(0));
        assert_eq!(pos(&s, "missing"), None);
    }

    #[test]
    fn snapshot_reports_length_and_longest_wait_per_class() {
        let mut s = Scheduler::default();
        s.push(item("p1", "b", WorkClass::PostSubmit, 1_000, Some(9_000)))
            .unwrap();
        s.push(item("p2", "b", WorkClass::PostSubmit, 4_000, Some(1)))
            .unwrap();
        s.push(item("t", "a", WorkClass::Try, 2_000, None)).unwrap();
        let snap = s.snapshot(Timestamp::from_millis(5_000));
        assert_eq!(
            snap,
            [
                QueueStat {
                    host_type: "a".into(),
                    class: WorkClass::Try,
                    len: 1,
                    oldest_wait: Duration::from_secs(3),
                },
                QueueStat {
                    host_type: "b".into(),
                    class: WorkClass::PostSubmit,
                    len: 2,
                    // By enqueue time, not by commit time.
                    oldest_wait: Duration::from_secs(4),
                },
            ]
        );
    }

    fn usage(capacity: usize, in_use: usize, interactive_in_use: usize) -> HostUsage {
        HostUsage {
            capacity,
            in_use,
            interactive_in_use,
        }
    }

    #[test]
    fn interactive_limit_is_the_share_rounded_down_but_at_least_one() {
        let half = Policy::default();
        assert_eq!(half.interactive_limit(0), 0);
        assert_eq!(half.interactive_limit(1), 1);
        assert_eq!(half.interactive_limit(2), 1);
        assert_eq!(half.interactive_limit(3), 1);
        assert_eq!(half.interactive_limit(10), 5);
        let all = Policy {
            interactive_share_percent: 250,
            ..Policy::default()
        };
        assert_eq!(all.interactive_limit(4), 4);
        let tiny = Policy {
            interactive_share_percent: 1,
            ..Policy::default()
        };
        assert_eq!(tiny.interactive_limit(50), 1);
        assert_eq!(tiny.interactive_limit(300), 3);
    }

    #[test]
    fn interactive_work_past_its_share_waits_while_try_work_runs() {
        let mut s = Scheduler::default(); // half of 2 buildlets: 1 interactive
        s.push(item("g1", "h", WorkClass::Interactive, 0, None))
            .unwrap();
        s.push(item("g2", "h", WorkClass::Interactive, 1, None))
            .unwrap();
        s.push(item("try", "h", WorkClass::Try, 2, None)).unwrap();
        let now = Timestamp::from_millis(3);
        let first = s.pop_within("h", now, usage(2, 0, 0)).unwrap();
        assert_eq!(first.id.0, "g1");
        // g1 holds the interactive share: the try build goes ahead of g2.
        let second = s.pop_within("h", now, usage(2, 1, 1)).unwrap();
        assert_eq!(second.id.0, "try");
        // The farm is full.
        assert_eq!(s.pop_within("h", now, usage(2, 2, 1)), None);
        // The try build finished: still no room for g2 while g1 is held.
        assert_eq!(s.pop_within("h", now, usage(2, 1, 1)), None);
        assert_eq!(s.len(), 1, "g2 stays queued");
        // g1 was destroyed: g2 gets its buildlet.
        assert_eq!(s.pop_within("h", now, usage(2, 0, 0)).unwrap().id.0, "g2");
    }

    #[test]
    fn a_starved_interactive_item_still_respects_the_share() {
        let mut s = Scheduler::default();
        s.push(item("gomote", "h", WorkClass::Interactive, 0, None))
            .unwrap();
        s.push(item("post", "h", WorkClass::PostSubmit, 30 * MIN, None))
            .unwrap();
        let late = Timestamp::from_millis(60 * MIN);
        assert_eq!(
            s.pop_within("h", late, usage(4, 2, 2)).unwrap().id.0,
            "post"
        );
        assert_eq!(s.pop_within("h", late, usage(4, 3, 2)), None);
        // Below the share, the starved item goes first as usual.
        s.push(item("try", "h", WorkClass::Try, 59 * MIN, None))
            .unwrap();
        assert_eq!(
            s.pop_within("h", late, usage(4, 3, 1)).unwrap().id.0,
            "gomote"
        );
    }

    #[test]
    fn a_single_buildlet_host_type_can_still_be_borrowed() {
        let mut s = Scheduler::default();
        s.push(item("g", "h", WorkClass::Interactive, 0, None))
            .unwrap();
        let now = Timestamp::from_millis(1);
        assert_eq!(s.pop_within("h", now, usage(0, 0, 0)), None, "no capacity");
        assert_eq!(s.pop_within("h", now, usage(1, 0, 0)).unwrap().id.0, "g");
    }

    #[test]
    fn ten_thousand_items_over_a_thousand_host_types() {
        let mut s = Scheduler::default();
        let classes = WorkClass::ALL;
        for i in 0..10_000u64 {
            let host = format!("host-{}", i % 1_000);
            let class = classes[(i % 3) as usize];
            s.push(item(&format!("w{i}"), &host, class, i, Some(i)))
                .unwrap();
        }
        assert_eq!(s.host_types_with_work().count(), 1_000);
        let now = Timestamp::from_millis(10_000);
        let mut popped = 0;
        for h in 0..1_000 {
            let host = format!("host-{h}");
            let mut last_class = WorkClass::Interactive;
            while let Some(w) = s.pop_next(&host, now) {
                assert_eq!(w.host_type, host);
                assert!(w.class >= last_class);
                last_class = w.class;
                popped += 1;
            }
        }
        assert_eq!(popped, 10_000);
        assert!(s.is_empty());
    }
}
