//! Property tests of the interactive share: whatever the arrivals and releases, a
//! dispatcher popping with `pop_within` never lets interactive work hold more than
//! `Policy::interactive_limit` of a host type, never holds more than its capacity, and
//! never leaves a buildlet idle while work it may run is queued.

use std::collections::HashMap;
use std::time::Duration;

use buildfarm_scheduler::{HostUsage, Policy, Scheduler, Timestamp, WorkClass, WorkId, WorkItem};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Push(WorkClass),
    /// Give back the n-th held buildlet (modulo how many are held).
    Release(usize),
    /// Pop while anything fits, as `Farm::dispatch_once` does.
    Dispatch,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let class = prop_oneof![
        Just(WorkClass::Interactive),
        Just(WorkClass::Try),
        Just(WorkClass::PostSubmit)
    ];
    prop_oneof![
        4 => class.prop_map(Op::Push),
        2 => (0..16usize).prop_map(Op::Release),
        3 => Just(Op::Dispatch),
        1 => (0..400u64).prop_map(Op::Advance),
    ]
}

proptest! {
    #[test]
    fn interactive_work_never_exceeds_its_share_and_no_buildlet_idles_needlessly(
        capacity in 0..6usize,
        percent in 1..=100u32,
        ops in proptest::collection::vec(op(), 1..150),
    ) {
        let policy = Policy {
            // Short, so starved items take part too.
            starvation_after: Duration::from_millis(500),
            interactive_share_percent: percent,
            ..Policy::default()
        };
        let limit = policy.interactive_limit(capacity);
        let mut s = Scheduler::new(policy);
        let mut held: Vec<WorkClass> = Vec::new();
        let mut queued: HashMap<WorkClass, usize> = HashMap::new();
        let mut now = 0u64;
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Push(class) => {
                    s.push(WorkItem {
                        id: WorkId::new(format!("w{next}")),
                        host_type: "h".into(),
                        class,
                        enqueued_at: Timestamp::from_millis(now),
                        commit_time: None,
                    }).unwrap();
                    next += 1;
                    *queued.entry(class).or_default() += 1;
                }
                Op::Release(n) => {
                    if !held.is_empty() {
                        held.remove(n % held.len());
                    }
                }
                Op::Advance(ms) => now += ms,
                Op::Dispatch => {
                    loop {
                        let usage = HostUsage {
                            capacity,
                            in_use: held.len(),
                            interactive_in_use: held
                                .iter()
                                .filter(|c| **c == WorkClass::Interactive)
                                .count(),
                        };
                        let Some(item) = s.pop_within("h", Timestamp::from_millis(now), usage)
                        else {
                            break;
                        };
                        *queued.get_mut(&item.class).unwrap() -= 1;
                        held.push(item.class);
                        let interactive = held
                            .iter()
                            .filter(|c| **c == WorkClass::Interactive)
                            .count();
                        prop_assert!(held.len() <= capacity);
                        prop_assert!(interactive <= limit, "{interactive} > {limit}");
                    }
                    // Work-conserving within the rules: a free buildlet is left idle only
                    // when what waits is interactive work past its share.
                    if held.len() < capacity {
                        let interactive = held
                            .iter()
                            .filter(|c| **c == WorkClass::Interactive)
                            .count();
                        let others = queued.get(&WorkClass::Try).copied().unwrap_or(0)
                            + queued.get(&WorkClass::PostSubmit).copied().unwrap_or(0);
                        prop_assert_eq!(others, 0);
                        if interactive < limit {
                            prop_assert_eq!(
                                queued.get(&WorkClass::Interactive).copied().unwrap_or(0),
                                0
                            );
                        }
                    }
                }
            }
        }
    }
}
