//! The cron calendar of a test's `schedule`: six fields with seconds (`sec min hour
//! day-of-month month day-of-week`, an optional seventh for the year), parsed by croner with
//! Vixie cron's day rule, and read on the wall clock of an IANA time zone. The one parser
//! `edgeprobe-agent check`, the running agent and `edgeprobe-collector tests apply` share;
//! the timer that waits for the fire times is the agent's (`schedule/`).
//!
//! - Vixie day rule: when day-of-month and day-of-week are both restricted (neither starts
//!   with `*` or `?`), a day matches if either matches; when one of them starts with `*`,
//!   both must match.
//! - Daylight saving, with croner's rules: a fixed-time job whose time falls in the
//!   spring-forward gap runs once at the first instant after the gap, and once, at the
//!   first pass, on the fall-back day; a job with a wildcard or a step in its time fields
//!   runs at every instant that matches.
//! - A schedule that can never fire (no date matches, or its year field is past) is
//!   refused by [`CronSchedule::check_fires`].

use std::fmt;

use chrono::{DateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

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

impl CronSchedule {
    /// `Ok` when the schedule fires at some time after `now` on the wall clock of `tz`;
    /// otherwise why it never will: no date matches it at all (the 31st of a 30-day month,
    /// 30 February, 29 February of a year that is not a leap year), or its year field
    /// lies in the past. `check` refuses both (the running agent would never fire them).
    pub fn check_fires(&self, tz: Tz, now: DateTime<Utc>) -> Result<(), String> {
        if self.next_after(tz, now).is_some() {
            return Ok(());
        }
        // Only a year field can put every run in the past; without one the calendar has
        // no matching date at all (and searching back through the centuries is slow).
        let with_year = self.text.split_whitespace().count() == 7;
        let before = with_year
            .then(|| {
                self.cron
                    .find_previous_occurrence(&now.with_timezone(&tz), false)
                    .ok()
            })
            .flatten();
        Err(match before {
            Some(last) => format!(
                "schedule `{}` never fires again: its last time was {} (its year field allows no later one)",
                self.text,
                last.format("%Y-%m-%d %H:%M:%S %Z")
            ),
            None => format!(
                "schedule `{}` can never fire: no date in the calendar matches all its fields",
                self.text
            ),
        })
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl CronSchedule {
    /// A fixed-time job (one second, one minute, one hour), as croner classifies it: it
    /// runs once on both daylight-saving change days, and not again at a time it ran.
    pub fn fixed_time(&self) -> bool {
        self.fixed_time
    }
}

impl PartialEq for CronSchedule {
    /// The same text is the same calendar.
    fn eq(&self, other: &CronSchedule) -> bool {
        self.text == other.text
    }
}

impl serde::Serialize for CronSchedule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
