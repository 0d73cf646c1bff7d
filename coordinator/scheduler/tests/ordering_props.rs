//! Property tests of the scheduler's ordering rule against a naive model written directly
//! from the rule in the crate docs, plus drain-order, no-loss and starvation properties.

use std::collections::HashSet;
use std::time::Duration;

use buildfarm_scheduler::{Policy, Scheduler, Timestamp, WorkClass, WorkId, WorkItem};
use proptest::prelude::*;

const HOSTS: [&str; 3] = ["linux", "windows", "darwin"];

fn class() -> impl Strategy<Value = WorkClass> {
    prop_oneof![
        Just(WorkClass::Interactive),
        Just(WorkClass::Try),
        Just(WorkClass::PostSubmit)
    ]
}

#[derive(Debug, Clone)]
enum Op {
    /// Push an item queued `back` ms before now.
    Push {
        host: usize,
        class: WorkClass,
        back: u64,
        commit: Option<u64>,
    },
    Pop {
        host: usize,
    },
    /// Remove the n-th item ever pushed (it may already be gone).
    Remove(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..HOSTS.len(), class(), 0..50u64, proptest::option::of(0..1_000u64))
            .prop_map(|(host, class, back, commit)| Op::Push { host, class, back, commit }),
        3 => (0..HOSTS.len()).prop_map(|host| Op::Pop { host }),
        1 => (0..64usize).prop_map(Op::Remove),
        2 => (0..60u64).prop_map(Op::Advance),
    ]
}

/// The rule, stated naively: starved items oldest first; else by class, FIFO for
/// interactive and try, newest commit first for post-submit; ties by insertion order.
fn model_pick(
    queued: &[(WorkItem, u64)],
    host: &str,
    now: Timestamp,
    starve: Duration,
) -> Option<usize> {
    let mine = || {
        queued
            .iter()
            .enumerate()
            .filter(|(_, (w, _))| w.host_type == host)
    };
    let starved = mine()
        .filter(|(_, (w, _))| now.saturating_duration_since(w.enqueued_at) > starve)
        .min_by_key(|(_, (w, seq))| (w.enqueued_at, *seq));
    if let Some((i, _)) = starved {
        return Some(i);
    }
    let best_class = mine().map(|(_, (w, _))| w.class).min()?;
    let same = mine().filter(|(_, (w, _))| w.class == best_class);
    let pick = if best_class == WorkClass::PostSubmit {
        same.min_by_key(|(_, (w, seq))| (std::cmp::Reverse(w.sort_time()), *seq))
    } else {
        same.min_by_key(|(_, (w, seq))| (w.enqueued_at, *seq))
    };
    pick.map(|(i, _)| i)
}

proptest! {
    #[test]
    fn matches_the_model_and_loses_nothing(ops in proptest::collection::vec(op(), 1..200)) {
        let starve = Duration::from_millis(100);
        let mut s = Scheduler::new(Policy { starvation_after: starve, ..Policy::default() });
        let mut model: Vec<(WorkItem, u64)> = Vec::new();
        let mut pushed: Vec<WorkId> = Vec::new();
        let mut out: Vec<WorkId> = Vec::new();
        let mut now = 1_000u64;
        for op in ops {
            let t = Timestamp::from_millis(now);
            match op {
                Op::Push { host, class, back, commit } => {
                    let item = WorkItem {
                        id: WorkId::new(format!("w{}", pushed.len())),
                        host_type: HOSTS[host].to_owned(),
                        class,
                        enqueued_at: Timestamp::from_millis(now - back),
                        commit_time: commit.map(Timestamp::from_millis),
                    };
                    s.push(item.clone()).unwrap();
                    model.push((item.clone(), pushed.len() as u64));
                    pushed.push(item.id);
                }
                Op::Pop { host } => {
                    let got = s.pop_next(HOSTS[host], t);
                    let want = model_pick(&model, HOSTS[host], t, starve)
                        .map(|i| model.remove(i).0);
                    prop_assert_eq!(&got, &want);
                    if let Some(w) = got {
                        prop_assert_eq!(w.host_type.as_str(), HOSTS[host]);
                        out.push(w.id);
                    }
                }
                Op::Remove(n) => {
                    let Some(id) = pushed.get(n) else { continue };
                    let got = s.remove(id);
                    let want = model.iter().position(|(w, _)| &w.id == id)
                        .map(|i| model.remove(i).0);
                    prop_assert_eq!(&got, &want);
                    if let Some(w) = got {
                        out.push(w.id);
                    }
                }
                Op::Advance(d) => now += d,
            }
            prop_assert_eq!(s.len(), model.len());
            // position() agrees with the order the model would pop in.
            if let Some((w, _)) = model.first() {
                let mut rest = model.clone();
                let mut ahead = 0;
                while let Some(i) = model_pick(&rest, &w.host_type, Timestamp::from_millis(now), starve) {
                    if rest[i].0.id == w.id { break; }
                    rest.remove(i);
                    ahead += 1;
                }
                prop_assert_eq!(s.position(&w.id, Timestamp::from_millis(now)), Some(ahead));
            }
        }
        // Drain the rest: every pushed item comes out exactly once.
        for host in HOSTS {
            while let Some(w) = s.pop_next(host, Timestamp::from_millis(now)) {
                out.push(w.id);
            }
        }
        prop_assert!(s.is_empty());
        let unique: HashSet<&WorkId> = out.iter().collect();
        prop_assert_eq!(unique.len(), out.len(), "an item came out twice");
        prop_assert_eq!(out.len(), pushed.len(), "an item was lost");
    }

    #[test]
    fn drain_follows_class_order_when_nothing_has_aged(
        items in proptest::collection::vec((class(), 0..1_000u64, proptest::option::of(0..1_000u64)), 0..100)
    ) {
        let mut s = Scheduler::new(Policy { starvation_after: Duration::from_secs(3600), ..Policy::default() });
        for (i, (class, enq, commit)) in items.iter().enumerate() {
            s.push(WorkItem {
                id: WorkId::new(i.to_string()),
                host_type: "h".into(),
                class: *class,
                enqueued_at: Timestamp::from_millis(*enq),
                commit_time: commit.map(Timestamp::from_millis),
            }).unwrap();
        }
        let now = Timestamp::from_millis(1_000);
        let drained: Vec<WorkItem> = std::iter::from_fn(|| s.pop_next("h", now)).collect();
        prop_assert_eq!(drained.len(), items.len());
        let seq = |w: &WorkItem| w.id.0.parse::<usize>().unwrap();
        for pair in drained.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            prop_assert!(a.class <= b.class, "class order: {:?} then {:?}", a, b);
            if a.class != b.class { continue; }
            match a.class {
                // FIFO: by enqueue time, then insertion.
                WorkClass::Interactive | WorkClass::Try => prop_assert!(
                    (a.enqueued_at, seq(a)) < (b.enqueued_at, seq(b)), "fifo: {:?} then {:?}", a, b),
                // Newest commit first, then insertion.
                WorkClass::PostSubmit => prop_assert!(
                    a.sort_time() > b.sort_time() || (a.sort_time() == b.sort_time() && seq(a) < seq(b)),
                    "newest first: {:?} then {:?}", a, b),
            }
        }
    }

    #[test]
    fn aged_low_class_work_is_not_starved_by_a_stream_of_urgent_work(
        backlog in 0..20usize,
        per_tick in 1..4usize,
        tick_ms in 1..50u64,
        urgent in prop_oneof![Just(WorkClass::Interactive), Just(WorkClass::Try)],
    ) {
        let starve = Duration::from_millis(500);
        let mut s = Scheduler::new(Policy { starvation_after: starve, ..Policy::default() });
        let mut n = 0;
        let mut push = |s: &mut Scheduler, class, at: u64| {
            n += 1;
            s.push(WorkItem {
                id: WorkId::new(format!("u{n}")),
                host_type: "h".into(),
                class,
                enqueued_at: Timestamp::from_millis(at),
                commit_time: None,
            }).unwrap();
        };
        // Urgent work queued before the low item may legitimately go first.
        for _ in 0..backlog {
            push(&mut s, urgent, 0);
        }
        let low_at = 1u64;
        s.push(WorkItem {
            id: WorkId::new("low"),
            host_type: "h".into(),
            class: WorkClass::PostSubmit,
            enqueued_at: Timestamp::from_millis(low_at),
            commit_time: None,
        }).unwrap();
        // More urgent work arrives each tick than the one buildlet can take.
        let mut now = low_at;
        let mut pops_after_starved = 0;
        loop {
            for _ in 0..per_tick {
                push(&mut s, urgent, now);
            }
            let t = Timestamp::from_millis(now);
            let starved = t.saturating_duration_since(Timestamp::from_millis(low_at)) > starve;
            let popped = s.pop_next("h", t).unwrap();
            if starved {
                pops_after_starved += 1;
            }
            if popped.id.0 == "low" {
                prop_assert!(starved, "urgent work was queued, so low went first only by aging");
                break;
            }
            prop_assert!(pops_after_starved <= backlog, "low item not popped within {} pops of starving", backlog + 1);
            now += tick_ms;
            prop_assert!(now < 1_000_000, "low item never popped");
        }
    }
}
