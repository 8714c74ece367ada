//! The cron timer (module doc of `schedule`: wall-clock steps): fire times from the wall
//! clock in the test's zone, waits on the monotonic clock in steps of at most [`STEP`].

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use edgeprobe_proto::testdef::CronSchedule;
use tokio::time::Instant;

use super::runner::{Runner, Test};

/// Longest wait on the monotonic clock before the wall clock is read again: a step of the
/// wall clock is noticed within this time.
pub const STEP: Duration = Duration::from_secs(1);

/// A wall clock that moved this much more or less than the monotonic clock over one wait
/// was stepped. Timer lateness shows in both clocks alike; NTP slewing (at most 500 ppm)
/// stays far below it.
const STEP_TOLERANCE: Duration = Duration::from_millis(500);

/// After a step back shorter than this, a fixed-time job does not run again at a time it
/// already ran (Vixie cron's rule for steps under three hours).
pub const RERUN_GUARD: Duration = Duration::from_secs(3 * 3600);

/// Fires `test` at each time of `schedule` on the wall clock of `tz`, waiting on the
/// monotonic clock in steps of at most [`STEP`] (module doc: wall-clock steps).
pub(super) async fn cron_timer(
    schedule: &CronSchedule,
    tz: Tz,
    test: &Arc<Test>,
    runner: &Arc<Runner>,
) {
    let name = &test.info.name;
    let mut now = Utc::now();
    let mut next = schedule.next_after(tz, now);
    let mut last_fired: Option<DateTime<Utc>> = None;
    loop {
        let Some(at) = next else {
            tracing::warn!(test = %name, schedule = %schedule, "schedule has no run ahead (its year field is past); not firing");
            return;
        };
        let wait = (at - now).to_std().unwrap_or(Duration::ZERO).min(STEP);
        let slept_from = Instant::now();
        tokio::time::sleep(wait).await;
        let expected = now + slept_from.elapsed();
        now = Utc::now();
        let stepped_back = (expected - now).to_std().is_ok_and(|d| d > STEP_TOLERANCE);
        let stepped_forward = (now - expected).to_std().is_ok_and(|d| d > STEP_TOLERANCE);
        if stepped_back {
            // Recompute from the new time, or the schedule would stall for the step. A
            // fixed-time job that already ran at a time now ahead does not run it again.
            let from = match last_fired {
                Some(fired)
                    if schedule.fixed_time()
                        && (fired - now).to_std().is_ok_and(|d| d < RERUN_GUARD) =>
                {
                    fired
                }
                _ => now,
            };
            tracing::info!(test = %name, from = %expected, to = %now, "wall clock stepped back; rescheduling from the new time");
            next = schedule.next_after(tz, from);
            continue;
        }
        if now >= at {
            if stepped_forward {
                tracing::info!(test = %name, missed_since = %at, "wall clock stepped forward past fire times; firing once and continuing from the new time");
            }
            runner.fire(test.clone());
            last_fired = Some(at);
            // From now, not from `at`: fire times skipped by a step forward are not
            // caught up one by one.
            next = schedule.next_after(tz, now.max(at));
        }
    }
}
