//! The collector's one retry delay: capped exponential backoff with full jitter, used by
//! every loop that waits for PostgreSQL (the store's writers, the controller, the ingest
//! committers, start-up's migration).
//!
//! Invariants: a delay never exceeds the site's cap and never falls below half its base
//! (a failing loop does not spin). The jitter is why this exists: the committers of
//! thousands of streams that failed together in one outage would otherwise retry
//! PostgreSQL in lockstep when it comes back.

use std::time::Duration;

use rand::Rng;

/// Retry delays for one loop: `next` after each failure, `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays whose ceiling starts at `base` and doubles per failure up to `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next attempt: uniform in [base / 2, ceiling], where the
    /// ceiling is `base * 2^failures` capped at `cap`.
    pub fn next(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let floor = (self.base / 2).min(ceiling);
        let ms = rand::rng().random_range(floor.as_millis() as u64..=ceiling.as_millis() as u64);
        Duration::from_millis(ms)
    }

    /// After a success: the next failure starts again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_between_half_the_base_and_the_cap() {
        let base = Duration::from_millis(200);
        let cap = Duration::from_secs(10);
        let mut b = Backoff::new(base, cap);
        for _ in 0..100 {
            let d = b.next();
            assert!(d >= base / 2 && d <= cap, "{d:?}");
        }
        // The first delay is bounded by the base itself.
        b.reset();
        assert!(b.next() <= base);
    }

    #[test]
    fn delays_are_spread_not_in_lockstep() {
        let samples: std::collections::HashSet<Duration> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
                for _ in 0..6 {
                    b.next();
                }
                b.next()
            })
            .collect();
        assert!(
            samples.len() > 10,
            "full jitter spreads retries: {samples:?}"
        );
    }

    #[test]
    fn the_ceiling_doubles_until_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let maxima: Vec<Duration> = (0..10)
            .map(|_| {
                let d = b.next();
                assert!(d <= Duration::from_secs(5));
                d
            })
            .collect();
        // The fourth delay may reach 800 ms, the first only 100 ms.
        assert!(maxima[0] <= Duration::from_millis(100));
        assert!(maxima[3] <= Duration::from_millis(800));
    }
}
