//! The scheduler: fires each configured test on its cron schedule or fixed interval, runs
//! the probe and appends the result to the buffer.
//!
//! - `schedule` is a cron expression with seconds, parsed by [`CronSchedule::parse`], the
//!   one parser `check` (config.rs) and the run share. croner does the calendar
//!   arithmetic; on top of it we apply Vixie cron's day rule: when day-of-month and
//!   day-of-week are both restricted (neither starts with `*` or `?`), a day matches if
//!   either matches; when one of them starts with `*`, both must match.
//! - A schedule is read in its test's time zone (`timezone` of the test, else of
//!   `[agent]`, else UTC; chrono-tz, whose IANA database is compiled in, so the host's
//!   /usr/share/zoneinfo does not matter). Daylight saving, with croner's rules: a
//!   fixed-time job (one second, one minute, one hour) whose time falls in the
//!   spring-forward gap runs once at the first instant after the gap (02:30 -> 03:00),
//!   and once, at the first pass, on the fall-back day; a job with a wildcard or a step in
//!   its time fields runs at every instant that matches, so it keeps its rhythm through
//!   both days.
//! - Cron runs on our own timer, not on tokio-cron-scheduler: the next fire time comes
//!   from the wall clock, the wait is on the monotonic clock in steps of at most
//!   [`STEP`], and the wall clock is read again after each step. A wall clock stepped back
//!   (NTP) is noticed within a step and the next fire time recomputed from the new time,
//!   so the schedule neither stalls for the stepped amount nor (for fixed-time jobs,
//!   steps under [`RERUN_GUARD`]) runs again what it already ran; a wall clock stepped
//!   forward past fire times fires once and continues from the new time, with no
//!   catch-up burst. tokio-cron-scheduler 0.15 cannot do this: its ticker compares
//!   `Utc::now()` with a stored next tick (a step back stalls every job for the stepped
//!   amount), it parses with `dom_and_dow(true)` (day-of-month AND day-of-week), and it
//!   turns a time zone into the fixed offset of the moment the job is created (wrong
//!   after the next daylight-saving change).
//! - `every` runs on a tokio interval, the monotonic clock alone: wall-clock steps do not
//!   touch it, and it honours sub-second intervals.
//! - `spread` delays each run by a random offset in [0, spread) so a fleet does not fire
//!   at the same second.
//! - A speed test runs exclusively: it takes the write side of a lock every other test
//!   reads, so nothing overlaps it on this agent.
//! - A run that is still going when its next tick comes makes that tick skip (logged),
//!   so a slow target cannot pile up runs.
//! - Every run yields exactly one result; when the buffer refuses it, the failure is
//!   logged with the test name.
//! - A result recorded while nothing vouches for the clock marks the clock "dirty" once it
//!   is stored, so the next correction pass finds it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use rand::Rng;
use tokio::sync::RwLock;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::clock::Clock;
use crate::config::{Config, Kind, TestConfig};
use crate::probe::{self, ProbeSpec};
use crate::record::{self, TestInfo};

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

/// A parsed cron schedule: six fields with seconds (`sec min hour day-of-month month
/// day-of-week`, an optional seventh for the year), Vixie day semantics.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    text: String,
    cron: croner::Cron,
    fixed_time: bool,
}

impl CronSchedule {
    /// Parses `text`; the error says what is expected.
    pub fn parse(text: &str) -> Result<CronSchedule, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        // Vixie cron: a day field starting with `*` is "unrestricted" (even `*/2`), and
        // then both day fields must match; croner ORs only fields that are not exactly
        // `*`, so it is told to AND when a day field is a starred step.
        let starred = |i: usize| {
            fields
                .get(i)
                .is_some_and(|f| f.starts_with('*') || f.starts_with('?'))
        };
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(starred(3) || starred(5))
            .build()
            .parse(text)
            .map_err(|e| {
                format!(
                    "invalid cron `{text}` ({e}); expected 6 fields: sec min hour day-of-month month day-of-week"
                )
            })?;
        let fixed_time = cron.determine_job_type() == croner::JobType::FixedTime;
        Ok(CronSchedule {
            text: text.to_string(),
            cron,
            fixed_time,
        })
    }

    /// The first fire time strictly after `after`, reading the schedule on the wall clock
    /// of `tz`; `None` when there is none within croner's search horizon (a year).
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner searches local wall time: from inside a fall-back overlap it can answer
        // the first pass of a time, an hour before `after`. Its iterator yields both
        // passes in order; skip the ones not after `after`.
        let in_zone = self
            .cron
            .iter_after(after.with_timezone(&tz))
            .take(4)
            .map(|t| t.with_timezone(&Utc))
            .find(|t| *t > after);
        if self.fixed_time {
            return in_zone;
        }
        // A wildcard job runs in both passes of a fall-back hour, but from the first
        // pass croner's wall-time search starts after the naive times the second pass
        // repeats. So when the offset is about to fall back, search again on the later
        // offset as a fixed one, and keep the answer if that offset is really in force
        // then.
        let offset_at = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix();
        let later = offset_at(after + chrono::TimeDelta::hours(3));
        if later.local_minus_utc() >= offset_at(after).local_minus_utc() {
            return in_zone;
        }
        let repeated = self
            .cron
            .find_next_occurrence(&after.with_timezone(&later), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
            .filter(|t| offset_at(*t) == later);
        match (in_zone, repeated) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

struct Test {
    info: TestInfo,
    spec: ProbeSpec,
    spread: Option<Duration>,
    running: AtomicBool,
}

/// Shared by all runs of all tests.
struct Runner {
    buffer: Buffer,
    clock: Clock,
    exclusive: RwLock<()>,
    shutdown: CancellationToken,
    runs: std::sync::Mutex<JoinSet<()>>,
}

pub struct Scheduler {
    /// One task per test: its cron timer or its interval.
    triggers: JoinSet<()>,
    runner: Arc<Runner>,
}

impl Scheduler {
    /// Starts every test of `config`.
    pub async fn start(
        config: &Config,
        buffer: Buffer,
        clock: Clock,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Scheduler> {
        let runner = Arc::new(Runner {
            buffer,
            clock,
            exclusive: RwLock::new(()),
            shutdown: shutdown.clone(),
            runs: std::sync::Mutex::new(JoinSet::new()),
        });
        let mut triggers = JoinSet::new();
        for tc in &config.tests {
            let test = Arc::new(make_test(config, tc));
            let runner = runner.clone();
            let shutdown = shutdown.clone();
            if let Some(every) = tc.every {
                triggers.spawn(async move {
                    let mut ticks = tokio::time::interval(every);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = ticks.tick() => runner.fire(test.clone()),
                        }
                    }
                });
            } else if let Some(schedule) = &tc.schedule {
                let schedule = schedule.clone();
                let tz = tc.timezone.unwrap_or(config.agent.timezone);
                triggers.spawn(async move {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = cron_timer(&schedule, tz, &test, &runner) => {}
                    }
                });
            }
        }
        tracing::info!(tests = config.tests.len(), "scheduler started");
        Ok(Scheduler { triggers, runner })
    }

    /// Stops firing and waits up to `grace` for runs in progress to record their results.
    pub async fn stop(mut self, grace: Duration) {
        self.triggers.abort_all();
        let mut runs = std::mem::take(&mut *self.runner.runs.lock().unwrap());
        let drained =
            tokio::time::timeout(grace, async { while runs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("runs still in progress after {grace:?}; abandoning them");
            runs.abort_all();
        }
    }
}

/// Fires `test` at each time of `schedule` on the wall clock of `tz`, waiting on the
/// monotonic clock in steps of at most [`STEP`] (module doc: wall-clock steps).
async fn cron_timer(schedule: &CronSchedule, tz: Tz, test: &Arc<Test>, runner: &Arc<Runner>) {
    let name = &test.info.name;
    let mut now = Utc::now();
    let mut next = schedule.next_after(tz, now);
    let mut last_fired: Option<DateTime<Utc>> = None;
    loop {
        let Some(at) = next else {
            tracing::warn!(test = %name, schedule = %schedule, "schedule has no run within a year; not firing");
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
                    if schedule.fixed_time
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

fn make_test(config: &Config, tc: &TestConfig) -> Test {
    let mut labels = config.agent.labels.clone();
    labels.extend(tc.labels.get_ref().clone());
    Test {
        info: TestInfo {
            name: tc.name.get_ref().clone(),
            kind: tc.kind,
            target: tc.target.get_ref().clone(),
            labels,
        },
        spec: ProbeSpec {
            kind: tc.kind,
            target: tc.target.get_ref().clone(),
            options: tc.options.get_ref().clone(),
        },
        spread: tc.spread,
        running: AtomicBool::new(false),
    }
}

impl Runner {
    /// Starts one run of `test` unless it is still running.
    fn fire(self: &Arc<Self>, test: Arc<Test>) {
        if self.shutdown.is_cancelled() {
            return;
        }
        if test.running.swap(true, Ordering::AcqRel) {
            tracing::debug!(test = %test.info.name, "previous run still in progress; skipping this tick");
            return;
        }
        let runner = self.clone();
        let mut runs = self.runs.lock().unwrap();
        // Reap finished runs so the set stays small.
        while runs.try_join_next().is_some() {}
        runs.spawn(async move {
            runner.run_once(&test).await;
            test.running.store(false, Ordering::Release);
        });
    }

    async fn run_once(&self, test: &Test) {
        if let Some(spread) = test.spread.filter(|s| !s.is_zero()) {
            let delay = rand::rng().random_range(Duration::ZERO..spread);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let outcome = if test.spec.kind == Kind::Speed {
            let _exclusive = self.exclusive.write().await;
            probe::run(&test.spec).await
        } else {
            let _shared = self.exclusive.read().await;
            probe::run(&test.spec).await
        };
        let result = record::to_wire(&test.info, &outcome, &self.clock);
        let payload = prost::Message::encode_to_vec(&result);
        match self.buffer.append(payload).await {
            Ok(seq) => {
                if result.clock_unsynced {
                    self.clock.mark_dirty();
                }
                tracing::debug!(
                    test = %test.info.name,
                    seq,
                    success = outcome.success(),
                    clock_unsynced = result.clock_unsynced,
                    "recorded"
                )
            }
            // The buffer logs write failures once per burst and counts the loss.
            Err(e) => tracing::debug!(test = %test.info.name, "result not recorded: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    /// The fire times of `expr` in `tz` strictly after `from`, up to `until`.
    fn runs(expr: &str, tz: Tz, from: DateTime<Utc>, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let schedule = CronSchedule::parse(expr).unwrap();
        let mut out = Vec::new();
        let mut t = from;
        while let Some(next) = schedule.next_after(tz, t).filter(|n| *n <= until) {
            out.push(next);
            t = next;
        }
        out
    }

    #[test]
    fn day_fields_are_ored_when_both_are_restricted() {
        // Monday 2026-11-30: day 30, not a Tuesday; it matches "day 30 OR Tuesday".
        let s = CronSchedule::parse("0 0 12 30 * 2").unwrap();
        let from = utc(2026, 11, 29, 13, 0, 0);
        assert_eq!(
            s.next_after(Tz::UTC, from),
            Some(utc(2026, 11, 30, 12, 0, 0))
        );
        // And Tuesday 2026-12-01, not the 30th, matches too.
        let after = utc(2026, 11, 30, 12, 0, 0);
        assert_eq!(
            s.next_after(Tz::UTC, after),
            Some(utc(2026, 12, 1, 12, 0, 0))
        );
        // A starred day-of-month (even a step) makes it AND, as in Vixie cron: odd days
        // that are Mondays. 2026-11-30 is even, 2026-12-07 is an odd Monday.
        let s = CronSchedule::parse("0 0 12 */2 * 1").unwrap();
        assert_eq!(
            s.next_after(Tz::UTC, from),
            Some(utc(2026, 12, 7, 12, 0, 0))
        );
        // One restricted field alone restricts.
        let s = CronSchedule::parse("0 0 12 * * 2").unwrap();
        assert_eq!(
            s.next_after(Tz::UTC, from),
            Some(utc(2026, 12, 1, 12, 0, 0))
        );
    }

    #[test]
    fn refuses_what_is_not_six_fields() {
        for bad in [
            "0 */30 * *",
            "* * * * *",
            "61 * * * * *",
            "* * * * * * * *",
            "",
        ] {
            let e = CronSchedule::parse(bad).unwrap_err();
            assert!(e.contains("expected 6 fields"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_local_time_in_berlin_follows_daylight_saving() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 08:00 in Berlin is 07:00 UTC in winter and 06:00 UTC in summer.
        let s = CronSchedule::parse("0 0 8 * * 1-5").unwrap();
        assert_eq!(
            s.next_after(berlin, utc(2026, 11, 30, 0, 0, 0)),
            Some(utc(2026, 11, 30, 7, 0, 0))
        );
        assert_eq!(
            s.next_after(berlin, utc(2026, 6, 1, 0, 0, 0)),
            Some(utc(2026, 6, 1, 6, 0, 0))
        );
        // In UTC, the same expression is 08:00 UTC.
        assert_eq!(
            s.next_after(Tz::UTC, utc(2026, 11, 30, 0, 0, 0)),
            Some(utc(2026, 11, 30, 8, 0, 0))
        );
    }

    #[test]
    fn spring_forward_runs_a_time_in_the_gap_once_after_it() {
        // Berlin 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let got = runs(
            "0 30 2 * * *",
            berlin,
            utc(2026, 3, 28, 0, 0, 0),
            utc(2026, 3, 30, 23, 0, 0),
        );
        assert_eq!(
            got,
            vec![
                utc(2026, 3, 28, 1, 30, 0), // 02:30 CET
                utc(2026, 3, 29, 1, 0, 0),  // 03:00 CEST, the first instant after the gap
                utc(2026, 3, 30, 0, 30, 0), // 02:30 CEST
            ]
        );
    }

    #[test]
    fn fall_back_runs_a_repeated_time_once() {
        // Berlin 2026-10-25: 03:00 CEST falls back to 02:00 CET (01:00 UTC); 02:30 comes twice.
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let got = runs(
            "0 30 2 * * *",
            berlin,
            utc(2026, 10, 24, 0, 0, 0),
            utc(2026, 10, 26, 23, 0, 0),
        );
        assert_eq!(
            got,
            vec![
                utc(2026, 10, 24, 0, 30, 0), // 02:30 CEST
                utc(2026, 10, 25, 0, 30, 0), // 02:30 CEST, the first pass only
                utc(2026, 10, 26, 1, 30, 0), // 02:30 CET
            ]
        );
        // Asked from inside the second pass (02:10 CET), it is tomorrow's, not the past one.
        let s = CronSchedule::parse("0 30 2 * * *").unwrap();
        assert_eq!(
            s.next_after(berlin, utc(2026, 10, 25, 1, 10, 0)),
            Some(utc(2026, 10, 26, 1, 30, 0))
        );
    }

    #[test]
    fn an_interval_keeps_its_rhythm_through_both_changes() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        for (from, until) in [
            (utc(2026, 3, 29, 0, 0, 0), utc(2026, 3, 29, 3, 0, 0)),
            (utc(2026, 10, 24, 23, 0, 0), utc(2026, 10, 25, 2, 0, 0)),
        ] {
            let got = runs("0 */15 * * * *", berlin, from, until);
            let gaps: Vec<i64> = got
                .windows(2)
                .map(|w| (w[1] - w[0]).num_minutes())
                .collect();
            assert_eq!(got.len(), 12, "{got:?}");
            assert!(gaps.iter().all(|g| *g == 15), "{gaps:?}");
        }
    }

    #[test]
    fn a_schedule_that_never_fires_answers_none_quickly() {
        let s = CronSchedule::parse("0 0 0 30 2 *").unwrap();
        let started = std::time::Instant::now();
        assert_eq!(s.next_after(Tz::UTC, utc(2026, 1, 1, 0, 0, 0)), None);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
