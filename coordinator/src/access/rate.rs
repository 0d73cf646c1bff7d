//! Per-user rate limits as plain data: a sliding window of the times each user was
//! allowed something. `now` is a parameter; the caller holds the lock and the clock.

use std::collections::{HashMap, VecDeque};

/// How often each user did something within the last `window_ms`.
#[derive(Debug, Default)]
pub struct RateWindow {
    seen: HashMap<String, VecDeque<i64>>,
}

/// A refusal: the user already did it `limit` times in the window; the oldest of those
/// leaves the window in `retry_after_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub limit: u32,
    pub retry_after_ms: i64,
}

impl RateWindow {
    /// Counts one more for `user` at `now_ms` if that stays within `limit` per
    /// `window_ms` (`limit` 0: no limit); otherwise changes nothing and says when to
    /// try again.
    pub fn take(
        &mut self,
        user: &str,
        now_ms: i64,
        limit: u32,
        window_ms: i64,
    ) -> Result<(), OverLimit> {
        if limit == 0 {
            return Ok(());
        }
        let times = self.seen.entry(user.to_owned()).or_default();
        while times.front().is_some_and(|&t| t <= now_ms - window_ms) {
            times.pop_front();
        }
        if times.len() >= limit as usize {
            let oldest = times.front().copied().unwrap_or(now_ms);
            return Err(OverLimit {
                limit,
                retry_after_ms: (oldest + window_ms - now_ms).max(0),
            });
        }
        times.push_back(now_ms);
        Ok(())
    }

    /// Forgets users with nothing in the window, so the map stays bounded by the users
    /// active in the last window.
    pub fn prune(&mut self, now_ms: i64, window_ms: i64) {
        self.seen.retain(|_, times| {
            while times.front().is_some_and(|&t| t <= now_ms - window_ms) {
                times.pop_front();
            }
            !times.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn a_user_gets_limit_per_window_then_waits_for_the_oldest() {
        let mut w = RateWindow::default();
        assert_eq!(w.take("alice", 0, 2, HOUR), Ok(()));
        assert_eq!(w.take("alice", 1_000, 2, HOUR), Ok(()));
        assert_eq!(
            w.take("alice", 2_000, 2, HOUR),
            Err(OverLimit {
                limit: 2,
                retry_after_ms: HOUR - 2_000
            })
        );
        // Others are counted apart.
        assert_eq!(w.take("bob", 2_000, 2, HOUR), Ok(()));
        // A refusal does not count; once the oldest leaves the window, one more fits.
        assert!(w.take("alice", HOUR - 1, 2, HOUR).is_err());
        assert_eq!(w.take("alice", HOUR, 2, HOUR), Ok(()));
        assert!(w.take("alice", HOUR + 500, 2, HOUR).is_err());
    }

    #[test]
    fn zero_is_no_limit_and_prune_forgets_idle_users() {
        let mut w = RateWindow::default();
        for t in 0..100 {
            assert_eq!(w.take("alice", t, 0, HOUR), Ok(()));
        }
        w.take("bob", 0, 5, HOUR).expect("first");
        w.prune(HOUR + 1, HOUR);
        assert!(w.seen.is_empty());
    }
}
