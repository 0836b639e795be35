//! Restart pacing: exponential backoff with jitter, reset by a stable run, and the crash-loop
//! verdict. Pure logic (the caller supplies the random jitter), so it is tested here directly.

use crate::config::RestartConfig;
use std::time::Duration;

/// Jitter applied to every delay: ±20 %.
pub const JITTER: f64 = 0.2;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    stable_after: Duration,
    crashloop_after: u32,
    /// Failed runs in a row since the last stable one (also the exponent of the next delay).
    failures: u32,
}

impl Backoff {
    pub fn new(restart: &RestartConfig) -> Backoff {
        Backoff {
            initial: restart.initial_backoff,
            max: restart.max_backoff.max(restart.initial_backoff),
            stable_after: restart.stable_after,
            crashloop_after: restart.crashloop_after,
            failures: 0,
        }
    }

    /// Records the end of a run. `ready_for` is how long the instance had been ready when it
    /// ended (`None`: it never became ready). A run ready for `stable_after` resets the backoff.
    pub fn record_exit(&mut self, ready_for: Option<Duration>) {
        if ready_for.is_some_and(|d| d >= self.stable_after) {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
    }

    /// Restarts in a row without a stable run.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the instance is crash-looping: `crashloop_after` restarts without a stable run.
    /// It is still restarted, at the ceiling the doubling reaches.
    pub fn crashlooping(&self) -> bool {
        self.crashloop_after > 0 && self.failures >= self.crashloop_after
    }

    /// The delay before the next start: `initial * 2^(failures-1)` capped at `max`, scaled by
    /// `1 + JITTER * (2*unit - 1)` where `unit` is uniform in `[0, 1)`.
    pub fn delay(&self, unit: f64) -> Duration {
        let exp = self.failures.saturating_sub(1).min(30);
        let base = self
            .initial
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        let factor = 1.0 + JITTER * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart() -> RestartConfig {
        RestartConfig {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
            crashloop_after: 5,
            liveness_failures: 3,
        }
    }

    #[test]
    fn doubles_up_to_the_ceiling() {
        let mut b = Backoff::new(&restart());
        let mut seen = Vec::new();
        for _ in 0..10 {
            b.record_exit(None);
            seen.push(b.delay(0.5).as_millis());
        }
        assert_eq!(
            seen,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
    }

    #[test]
    fn jitter_is_twenty_percent() {
        let mut b = Backoff::new(&restart());
        b.record_exit(None);
        assert_eq!(b.delay(0.0), Duration::from_millis(400));
        assert_eq!(b.delay(1.0), Duration::from_millis(600));
    }

    #[test]
    fn crashloop_after_n_failures_and_reset_by_a_stable_run() {
        let mut b = Backoff::new(&restart());
        for _ in 0..4 {
            b.record_exit(Some(Duration::from_secs(1)));
            assert!(!b.crashlooping());
        }
        b.record_exit(None);
        assert!(b.crashlooping());
        b.record_exit(Some(Duration::from_secs(61)));
        assert_eq!(b.failures(), 1);
        assert!(!b.crashlooping());
        assert_eq!(b.delay(0.5), Duration::from_millis(500));
    }

    #[test]
    fn huge_exponent_does_not_overflow() {
        let mut b = Backoff::new(&restart());
        for _ in 0..1000 {
            b.record_exit(None);
        }
        assert_eq!(b.delay(0.5), Duration::from_secs(60));
    }
}
