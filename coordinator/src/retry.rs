//! Retrying store writes during a build: a store that is down for a while must delay a
//! build's bookkeeping, never abandon it. Backoff doubles up to a cap, with jitter so
//! many builds waiting on one store do not retry in lockstep.

use std::future::Future;
use std::time::Duration;

use buildfarm_store::StoreError;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long to wait between tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before try `n + 1` (n from 1): `first * 2^(n-1)`, capped at `max`, then
    /// between half and all of that.
    pub fn delay(&self, n: u32, jitter: f64) -> Duration {
        let base = self
            .first
            .saturating_mul(1u32 << n.saturating_sub(1).min(20))
            .min(self.max);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// Whether an error is an answer (retrying gets the same one) rather than a failure to
/// reach the store.
pub fn is_answer(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::NotFound { .. }
            | StoreError::AlreadyFinished { .. }
            | StoreError::InvalidArgument { .. }
            | StoreError::Corrupt { .. }
    )
}

/// Runs `op` until it succeeds or answers (see [`is_answer`]), waiting per `backoff`
/// between failures. `None` when `stop` is cancelled first: the coordinator is stopping
/// and the next one resumes the work.
pub async fn store_op<T, F, Fut>(
    what: &str,
    backoff: Backoff,
    stop: &CancellationToken,
    mut op: F,
) -> Option<Result<T, StoreError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut n = 0u32;
    loop {
        match op().await {
            Ok(v) => return Some(Ok(v)),
            Err(e) if is_answer(&e) => return Some(Err(e)),
            Err(e) => {
                n += 1;
                let wait = backoff.delay(n, rand::random::<f64>());
                warn!(operation = what, tries = n, error = %e, retry_in = ?wait, "store write failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let b = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(1));
    }
}
