//! The run-now rate limit: per agent, at most one run-now per [`RUN_NOW_EVERY`] and one
//! speed run-now per [`SPEED_RUN_NOW_EVERY`]. The collector enforces it before it sends and
//! the agent again when it receives, so a buggy collector cannot turn run-now into a
//! traffic cannon; both use this one rule.

use std::time::{Duration, Instant};

/// The reason of an agent's RunStatus (state REFUSED) for a request whose expiry
/// (`RunNow.expires_unix_nanos`) passed before it could start; the collector records the
/// run as `expired`, not refused.
pub const REASON_EXPIRED: &str = "expired";

/// At most one run-now per agent this often.
pub const RUN_NOW_EVERY: Duration = Duration::from_secs(10);
/// At most one speed run-now per agent this often.
pub const SPEED_RUN_NOW_EVERY: Duration = Duration::from_secs(60);

/// The two intervals of the rule (tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunNowLimit {
    pub run_every: Duration,
    pub speed_every: Duration,
}

impl Default for RunNowLimit {
    fn default() -> RunNowLimit {
        RunNowLimit {
            run_every: RUN_NOW_EVERY,
            speed_every: SPEED_RUN_NOW_EVERY,
        }
    }
}

/// When one agent last got a run-now, and a speed run-now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastRuns {
    pub any: Option<Instant>,
    pub speed: Option<Instant>,
}

impl RunNowLimit {
    /// Admits a run-now at `now` (recorded in `last`), or says why not (not recorded).
    pub fn admit(&self, last: &mut LastRuns, speed: bool, now: Instant) -> Result<(), String> {
        let within = |at: Option<Instant>, every: Duration| {
            at.is_some_and(|t| now.saturating_duration_since(t) < every)
        };
        if speed && within(last.speed, self.speed_every) {
            return Err(format!(
                "rate limited: at most 1 speed run-now per {} s on this agent",
                self.speed_every.as_secs()
            ));
        }
        if within(last.any, self.run_every) {
            return Err(format!(
                "rate limited: at most 1 run-now per {} s on this agent",
                self.run_every.as_secs()
            ));
        }
        last.any = Some(now);
        if speed {
            last.speed = Some(now);
        }
        Ok(())
    }

    /// Whether every limit `last` holds has passed at `now` (it can be forgotten).
    pub fn expired(&self, last: &LastRuns, now: Instant) -> bool {
        let keep = self.run_every.max(self.speed_every);
        [last.any, last.speed]
            .iter()
            .all(|t| t.is_none_or(|t| now.saturating_duration_since(t) >= keep))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_run_now_per_interval_and_one_speed_run_per_minute() {
        let limit = RunNowLimit::default();
        let mut last = LastRuns::default();
        let t0 = Instant::now();
        assert!(limit.admit(&mut last, true, t0).is_ok());
        let e = limit
            .admit(&mut last, false, t0 + Duration::from_secs(5))
            .unwrap_err();
        assert!(e.contains("1 run-now per 10 s"), "{e}");
        assert!(limit
            .admit(&mut last, false, t0 + Duration::from_secs(11))
            .is_ok());
        let e = limit
            .admit(&mut last, true, t0 + Duration::from_secs(30))
            .unwrap_err();
        assert!(e.contains("1 speed run-now per 60 s"), "{e}");
        assert!(!limit.expired(&last, t0 + Duration::from_secs(59)));
        assert!(limit
            .admit(&mut last, true, t0 + Duration::from_secs(61))
            .is_ok());
        assert!(limit.expired(&last, t0 + Duration::from_secs(200)));
    }
}
