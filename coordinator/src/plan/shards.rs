//! Pure rules of sharded test steps: how units are split into shards balanced by the
//! durations earlier runs recorded (falling back to counts), and how per-unit results
//! coming back from several buildlets in any order become one log in unit order, each
//! unit's output whole. No I/O, no clock.

use std::collections::{BTreeMap, HashMap};

/// Splits units `0..units.len()` into at most `shards` non-empty shards, balancing the
/// expected time per shard. A unit's expected time is its recorded duration (ms); units
/// never recorded count as the mean of the recorded ones (or 1 when none is, which
/// balances by count). Longest units are placed first, each on the least loaded shard
/// (ties: the lowest shard), and each shard lists its units in unit order. Deterministic.
pub fn assign(
    units: &[String],
    durations: &HashMap<String, u64>,
    shards: usize,
) -> Vec<Vec<usize>> {
    let shards = shards.max(1).min(units.len().max(1));
    let known: Vec<u64> = units
        .iter()
        .filter_map(|u| durations.get(u).copied())
        .collect();
    let fallback = if known.is_empty() {
        1
    } else {
        (known.iter().sum::<u64>() / known.len() as u64).max(1)
    };
    let cost = |i: usize| durations.get(&units[i]).copied().unwrap_or(fallback).max(1);
    let mut order: Vec<usize> = (0..units.len()).collect();
    // Longest first; equal costs keep unit order.
    order.sort_by(|&a, &b| cost(b).cmp(&cost(a)).then(a.cmp(&b)));
    let mut load = vec![0u64; shards];
    let mut out = vec![Vec::new(); shards];
    for i in order {
        let target = (0..shards).min_by_key(|&s| (load[s], s)).unwrap_or(0);
        load[target] += cost(i);
        out[target].push(i);
    }
    for shard in &mut out {
        shard.sort_unstable();
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Collects each unit's output as it finishes, in any order, and releases it in unit
/// order: a unit's output is released once every unit before it has been.
#[derive(Debug, Default)]
pub struct InOrder {
    next: usize,
    waiting: BTreeMap<usize, Vec<u8>>,
}

impl InOrder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records unit `index`'s whole output; returns the outputs now releasable, in order.
    /// A unit pushed twice keeps its first output.
    pub fn push(&mut self, index: usize, output: Vec<u8>) -> Vec<Vec<u8>> {
        if index >= self.next {
            self.waiting.entry(index).or_insert(output);
        }
        let mut out = Vec::new();
        while let Some(o) = self.waiting.remove(&self.next) {
            out.push(o);
            self.next += 1;
        }
        out
    }

    /// How many units were released.
    pub fn released(&self) -> usize {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("u{i}")).collect()
    }

    fn loads(shards: &[Vec<usize>], cost: impl Fn(usize) -> u64) -> Vec<u64> {
        shards
            .iter()
            .map(|s| s.iter().map(|&i| cost(i)).sum())
            .collect()
    }

    #[test]
    fn without_durations_units_split_by_count() {
        let s = assign(&names(7), &HashMap::new(), 3);
        assert_eq!(s, [vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
    }

    #[test]
    fn recorded_durations_balance_the_shards() {
        let units = names(6);
        // One long unit and five short ones: the long one gets a shard to itself.
        let d: HashMap<String, u64> = [
            ("u0", 100),
            ("u1", 10),
            ("u2", 10),
            ("u3", 10),
            ("u4", 10),
            ("u5", 10),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let s = assign(&units, &d, 3);
        assert_eq!(s, [vec![0], vec![1, 3, 5], vec![2, 4]]);
        let by_count = assign(&units, &HashMap::new(), 3);
        let cost = |i: usize| d[&units[i]];
        let max = |v: Vec<u64>| v.into_iter().max().unwrap();
        assert!(max(loads(&s, cost)) < max(loads(&by_count, cost)));
    }

    #[test]
    fn unknown_units_count_as_the_mean_of_known_ones() {
        let units = names(4);
        let d: HashMap<String, u64> = [("u0".to_owned(), 30), ("u1".to_owned(), 10)].into();
        // u2 and u3 count as 20 each: loads 30 | 20+10 | 20.
        assert_eq!(assign(&units, &d, 3), [vec![0], vec![1, 2], vec![3]]);
    }

    #[test]
    fn more_shards_than_units_gives_one_unit_each_and_none_empty() {
        assert_eq!(assign(&names(2), &HashMap::new(), 5), [vec![0], vec![1]]);
        assert!(
            assign(&[], &HashMap::new(), 3)
                .iter()
                .all(|s| !s.is_empty())
        );
        assert_eq!(assign(&names(3), &HashMap::new(), 0), [vec![0, 1, 2]]);
    }

    #[test]
    fn every_unit_is_in_exactly_one_shard() {
        for n in 0..40 {
            for k in 1..6 {
                let d: HashMap<String, u64> = (0..n)
                    .filter(|i| i % 3 != 0)
                    .map(|i| (format!("u{i}"), (i * 7 % 11) as u64))
                    .collect();
                let s = assign(&names(n), &d, k);
                let mut all: Vec<usize> = s.concat();
                all.sort_unstable();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n={n} k={k}");
                assert!(s.len() <= k);
            }
        }
    }

    #[test]
    fn outputs_are_released_in_unit_order_each_whole() {
        let mut m = InOrder::new();
        assert!(m.push(2, b"two".to_vec()).is_empty());
        assert!(m.push(1, b"one".to_vec()).is_empty());
        assert_eq!(
            m.push(0, b"zero".to_vec()),
            [b"zero".to_vec(), b"one".to_vec(), b"two".to_vec()]
        );
        assert!(
            m.push(1, b"again".to_vec()).is_empty(),
            "a repeat is ignored"
        );
        assert_eq!(m.push(3, b"three".to_vec()), [b"three".to_vec()]);
        assert_eq!(m.released(), 4);
    }
}
