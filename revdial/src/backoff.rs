//! Reconnect backoff: exponential with full jitter above a floor, as a pure function
//! of the failure count and a random number, so it is tested with numbers. Jitter
//! matters: after a coordinator restart every host redials at once.

use std::time::Duration;

/// Reconnect delays of a dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Shortest delay. Default 0.5 s.
    pub min: Duration,
    /// Longest delay. Default 30 s.
    pub max: Duration,
    /// A tunnel that lived at least this long resets the failure count. Default 30 s.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The ceiling after `failures` consecutive failures: min * 2^(failures+1), capped
    /// at max (and never below min).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_add(1));
        self.min
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max)
            .max(self.min)
    }

    /// The delay before the next dial: uniform in [min, ceiling] picked by `unit`,
    /// a random number in [0, 1) (clamped).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        let ceiling = self.ceiling(failures);
        let span = ceiling.saturating_sub(self.min);
        self.min + span.mul_f64(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceiling_doubles_up_to_max() {
        let b = Backoff::default();
        let got: Vec<_> = (0..9).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            got,
            [
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(16000),
                ms(30000),
                ms(30000),
                ms(30000),
                ms(30000)
            ]
        );
        assert_eq!(b.ceiling(u32::MAX), ms(30000), "no overflow");
    }

    #[test]
    fn delay_spans_min_to_ceiling() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), ms(500));
        assert_eq!(b.delay(0, 0.5), ms(750));
        assert_eq!(b.delay(3, 0.5), ms(4250));
        assert_eq!(b.delay(10, 1.0), ms(30000));
        assert_eq!(b.delay(10, 7.0), ms(30000), "clamped");
        assert_eq!(b.delay(10, -1.0), ms(500), "clamped");
        assert_eq!(b.delay(10, f64::NAN), ms(500));
    }

    #[test]
    fn min_above_max_still_waits_min() {
        let b = Backoff {
            min: ms(100),
            max: ms(10),
            reset_after: ms(0),
        };
        assert_eq!(b.delay(5, 0.9), ms(100));
    }
}
