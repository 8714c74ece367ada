//! The scheduler: fires each configured test on its cron schedule or fixed interval, runs
//! the probe and appends the result to the buffer.
//!
//! - `schedule` is a cron expression with seconds, parsed by `edgeprobe_proto::testdef::CronSchedule`, the
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
//! - `Scheduler::apply` (reload, fleet push) keeps the trigger of a test whose settings
//!   did not change, so `every` keeps its phase; changed and removed tests stop firing,
//!   their runs in progress finish.
//! - A new `every` test fires at once at agent start and on a reload of the local file,
//!   but one a fleet push starts (new or changed) first fires after a random delay in
//!   [0, every) ([`FirstFire`]): a push reaches the whole fleet in the same second, and
//!   must not make every agent run the test in that second.
//! - Run-now (`Scheduler::run_now`) runs a test once beside its schedule, without spread,
//!   under the same lock, rate-limited by the rule the collector applies too
//!   (`edgeprobe_proto::testdef::run_now`).
//! - Every run yields exactly one result; when the buffer refuses it, the failure is
//!   logged with the test name.
//! - A result recorded while nothing vouches for the clock marks the clock "dirty" once it
//!   is stored, so the next correction pass finds it.

//!
//! Files: `timer.rs` (the cron timer on the monotonic clock), `runner.rs` (firing, the
//! exclusivity lock, spread, probe and record), `run_now.rs` (run-now and its rate limit);
//! the calendar itself is `edgeprobe_proto::testdef::CronSchedule`.

mod run_now;
mod runner;
mod timer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use rand::Rng;
use tokio::sync::RwLock;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::clock::Clock;
use crate::config::{Config, TestConfig};
use edgeprobe_proto::testdef::run_now::LastRuns;

use runner::{make_test, Runner, Test};
use timer::cron_timer;
pub use timer::{RERUN_GUARD, STEP};

/// One scheduled test: what it was started from and its trigger task.
struct Entry {
    settings: Settings,
    test: Arc<Test>,
    trigger: AbortHandle,
}

/// What [`Scheduler::apply`] did, by test name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Same name and same settings: the trigger runs on, `every` keeps its phase.
    pub kept: Vec<String>,
    /// New, or changed (then also in `stopped`).
    pub started: Vec<String>,
    /// Removed or changed: no more firing; a run in progress records its result.
    pub stopped: Vec<String>,
}

/// When an `every` test that [`Scheduler::apply`] starts fires first. Cron tests fire at
/// their schedule's times either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstFire {
    /// At once, then every interval: agent start, reload of the local file.
    AtOnce,
    /// After a uniformly random delay in [0, every), then every interval: a fleet push,
    /// which reaches all agents at once.
    Staggered,
}

impl FirstFire {
    /// The delay before the first fire of a test with interval `every`.
    fn delay(self, every: Duration) -> Duration {
        match self {
            FirstFire::Staggered if !every.is_zero() => {
                rand::rng().random_range(Duration::ZERO..every)
            }
            _ => Duration::ZERO,
        }
    }
}

impl Applied {
    pub fn changed(&self) -> bool {
        !self.started.is_empty() || !self.stopped.is_empty()
    }
}

pub struct Scheduler {
    /// One task per test: its cron timer or its interval.
    triggers: JoinSet<()>,
    entries: BTreeMap<String, Entry>,
    runner: Arc<Runner>,
    /// `[agent] labels` of the applied configuration: merged into ad-hoc run-now tests.
    agent_labels: BTreeMap<String, String>,
    /// This agent's last run-nows, against the shared run-now rule.
    last_runs: LastRuns,
}

impl Scheduler {
    /// Starts every test of `config` and the fleet tests `fleet` (checked against it).
    /// Cannot fail; spawns the triggers, so it must be called inside the runtime.
    pub fn start(
        config: &Config,
        fleet: &[TestConfig],
        buffer: Buffer,
        clock: Clock,
        shutdown: CancellationToken,
    ) -> Scheduler {
        let runner = Arc::new(Runner {
            buffer,
            clock,
            exclusive: Arc::new(RwLock::new(())),
            shutdown,
            runs: std::sync::Mutex::new(JoinSet::new()),
        });
        let mut scheduler = Scheduler {
            triggers: JoinSet::new(),
            entries: BTreeMap::new(),
            runner,
            agent_labels: config.agent.labels.clone(),
            last_runs: LastRuns::default(),
        };
        scheduler.apply(config, fleet, FirstFire::AtOnce);
        tracing::info!(
            tests = config.tests.len(),
            fleet_tests = fleet.len(),
            "scheduler started"
        );
        scheduler
    }

    /// Reschedules to the local tests of `config` plus `fleet` (SIGHUP, a fleet push):
    /// a test with the same name and settings keeps its trigger (and so its phase);
    /// removed and changed ones stop firing, their runs in progress finish and record;
    /// new and changed ones start, an `every` one firing first as `first` says.
    pub fn apply(&mut self, config: &Config, fleet: &[TestConfig], first: FirstFire) -> Applied {
        while self.triggers.try_join_next().is_some() {}
        self.agent_labels = config.agent.labels.clone();
        let wanted: BTreeMap<&str, &TestConfig> = config
            .tests
            .iter()
            .chain(fleet)
            .map(|tc| (tc.name.get_ref().as_str(), tc))
            .collect();
        let mut applied = Applied::default();
        let mut running = BTreeMap::new();
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in names {
            let keep = wanted
                .get(name.as_str())
                .is_some_and(|tc| settings(config, tc) == self.entries[&name].settings);
            if !keep {
                let entry = self.entries.remove(&name).expect("listed");
                entry.trigger.abort();
                running.insert(name.clone(), entry.test.running.clone());
                applied.stopped.push(name);
            }
        }
        for (name, tc) in wanted {
            if self.entries.contains_key(name) {
                applied.kept.push(name.to_string());
                continue;
            }
            let mut test = make_test(&config.agent.labels, tc);
            if let Some(flag) = running.remove(name) {
                test.running = flag;
            }
            let test = Arc::new(test);
            let trigger = self.spawn_trigger(config, tc, test.clone(), first);
            self.entries.insert(
                name.to_string(),
                Entry {
                    settings: settings(config, tc),
                    test,
                    trigger,
                },
            );
            applied.started.push(name.to_string());
        }
        applied
    }

    fn spawn_trigger(
        &mut self,
        config: &Config,
        tc: &TestConfig,
        test: Arc<Test>,
        first: FirstFire,
    ) -> AbortHandle {
        let runner = self.runner.clone();
        let shutdown = self.runner.shutdown.clone();
        if let Some(every) = tc.every {
            let delay = first.delay(every);
            if first == FirstFire::Staggered {
                tracing::debug!(
                    test = %test.info.name,
                    ?every,
                    first_run_in = ?delay,
                    "fleet push: first run at a random point of the first interval"
                );
            }
            let start = Instant::now() + delay;
            self.triggers.spawn(async move {
                let mut ticks = tokio::time::interval_at(start, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = ticks.tick() => runner.fire(test.clone()),
                    }
                }
            })
        } else if let Some(schedule) = &tc.schedule {
            let schedule = schedule.get_ref().clone();
            let tz = tc.timezone.unwrap_or(config.agent.timezone);
            self.triggers.spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = cron_timer(&schedule, tz, &test, &runner) => {}
                }
            })
        } else {
            // `check` requires one of them; nothing to fire.
            self.triggers.spawn(async {})
        }
    }

    /// Names of the scheduled tests.
    pub fn test_names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
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

/// What a test was scheduled from: equal values mean the same runs (so a reload keeps the
/// trigger). Spans do not take part in `TestConfig`'s equality; the agent's labels and
/// time zone do, as they change what a test records and when it fires.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    test: TestConfig,
    /// The test's labels merged over the agent's: what its results carry.
    labels: BTreeMap<String, String>,
    timezone: Option<Tz>,
}

fn settings(config: &Config, tc: &TestConfig) -> Settings {
    let mut labels = config.agent.labels.clone();
    labels.extend(tc.labels.get_ref().clone());
    Settings {
        test: tc.clone(),
        labels,
        timezone: tc
            .schedule
            .as_ref()
            .map(|_| tc.timezone.unwrap_or(config.agent.timezone)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use edgeprobe_proto::v1 as pb;

    use super::*;

    fn config(tests: &str) -> Config {
        let text = format!(
            "[agent]\nid = \"a1\"\nlabels = {{ site = \"berlin\" }}\n\
             [collector]\nendpoints = [\"http://127.0.0.1:1\"]\ninsecure = true\n{tests}"
        );
        Config::parse(&text, "agent.toml").unwrap()
    }

    fn tcp(name: &str, port: u16, every: &str) -> String {
        format!("[[test]]\nname = \"{name}\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:{port}\"\nevery = \"{every}\"\n")
    }

    async fn scheduler(
        config: &Config,
        fleet: &[TestConfig],
    ) -> (Scheduler, Buffer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(dir.path(), 1 << 20).unwrap();
        let s = Scheduler::start(
            config,
            fleet,
            buffer.clone(),
            Clock::new(),
            CancellationToken::new(),
        );
        (s, buffer, dir)
    }

    fn trigger_ids(s: &Scheduler) -> BTreeMap<String, tokio::task::Id> {
        s.entries
            .iter()
            .map(|(n, e)| (n.clone(), e.trigger.id()))
            .collect()
    }

    #[tokio::test]
    async fn apply_keeps_unchanged_tests_and_restarts_changed_ones() {
        let old = config(&format!(
            "{}{}{}",
            tcp("a", 1, "1h"),
            tcp("b", 1, "1h"),
            tcp("gone", 1, "1h")
        ));
        let fleet = config(&tcp("f", 1, "1h")).tests;
        let (mut s, _buffer, _dir) = scheduler(&old, &fleet).await;
        let before = trigger_ids(&s);
        assert_eq!(s.test_names(), ["a", "b", "f", "gone"]);
        let b_running = s.entries["b"].test.running.clone();

        // `a` moves to another line (other spans) but is the same test; `b` changes its
        // interval; `gone` goes; `c` comes; the fleet test stays.
        let new = config(&format!(
            "\n\n{}{}{}",
            tcp("b", 1, "2h"),
            tcp("a", 1, "1h"),
            tcp("c", 1, "1h")
        ));
        let applied = s.apply(&new, &fleet, FirstFire::AtOnce);
        assert_eq!(applied.kept, ["a", "f"]);
        assert_eq!(applied.started, ["b", "c"]);
        assert_eq!(applied.stopped, ["b", "gone"]);
        let after = trigger_ids(&s);
        assert_eq!(
            after["a"], before["a"],
            "the same trigger task: `every` keeps its phase"
        );
        assert_eq!(after["f"], before["f"]);
        assert_ne!(after["b"], before["b"]);
        assert!(
            Arc::ptr_eq(&s.entries["b"].test.running, &b_running),
            "a changed test does not overlap its old version's run"
        );
        // Applying the same again changes nothing.
        let again = s.apply(&new, &fleet, FirstFire::AtOnce);
        assert!(!again.changed(), "{again:?}");
        assert_eq!(trigger_ids(&s), after);
        // New agent labels change every test's result labels: all restart.
        let relabelled = config(&format!(
            "{}{}{}",
            tcp("b", 1, "2h"),
            tcp("a", 1, "1h"),
            tcp("c", 1, "1h")
        ))
        .tap_labels();
        let applied = s.apply(&relabelled, &[], FirstFire::AtOnce);
        assert!(applied.kept.is_empty(), "{applied:?}");
        assert_eq!(applied.stopped, ["a", "b", "c", "f"]);
        s.stop(Duration::from_secs(1)).await;
    }

    /// Names of the tests that fired. With the speed-test lock held by the caller, a run
    /// waits for it, so a test that fired once stays `running`.
    fn fired(s: &Scheduler) -> Vec<String> {
        s.entries
            .iter()
            .filter(|(_, e)| e.test.running.load(Ordering::Acquire))
            .map(|(n, _)| n.clone())
            .collect()
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn a_staggered_first_fire_is_a_random_point_of_the_interval() {
        let every = Duration::from_secs(60);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| FirstFire::Staggered.delay(every))
            .collect();
        assert!(delays.iter().all(|d| *d < every), "within [0, every)");
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(
            *min < every / 10 && *max > every * 9 / 10,
            "spread over the interval: {min:?}..{max:?}"
        );
        assert_eq!(FirstFire::AtOnce.delay(every), Duration::ZERO);
        assert_eq!(FirstFire::Staggered.delay(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn every_tests_new_in_a_fleet_push_fire_first_at_a_random_point_of_their_interval() {
        let c = config(&tcp("local", 1, "1h"));
        let (mut s, _buffer, _dir) = scheduler(&c, &[]).await;
        // Taken before the triggers first run: every run waits, `fired` shows who fired.
        let held = s.runner.exclusive.clone().write_owned().await;
        // At agent start, at once (the interval is an hour).
        wait_for("local fires at start", || fired(&s) == ["local"]).await;

        // A push of ten tests: not all at once, each within its first interval, at
        // different times.
        let every = Duration::from_secs(3);
        let names: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
        let blocks: String = names.iter().map(|n| tcp(n, 1, "3s")).collect();
        let fleet = config(&blocks).tests;
        let pushed = std::time::Instant::now();
        let applied = s.apply(&c, &fleet, FirstFire::Staggered);
        assert_eq!(applied.started, names);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at_once = fired(&s).len() - 1;
        assert!(
            at_once < names.len(),
            "all {at_once} pushed tests fired at once"
        );
        let mut first: BTreeMap<String, Duration> = BTreeMap::new();
        wait_for("every pushed test fires", || {
            for n in fired(&s) {
                first.entry(n).or_insert_with(|| pushed.elapsed());
            }
            first.len() == names.len() + 1
        })
        .await;
        first.remove("local");
        let times: Vec<Duration> = first.values().copied().collect();
        let (min, max) = (times.iter().min().unwrap(), times.iter().max().unwrap());
        assert!(
            *max < every + Duration::from_secs(1),
            "within the first interval: {first:?}"
        );
        assert!(*max - *min > every / 10, "spread: {first:?}");

        // A reload of the local file starts a new test at once; the pushed ones are kept.
        let reloaded = config(&format!("{}{}", tcp("local", 1, "1h"), tcp("b", 1, "1h")));
        let applied = s.apply(&reloaded, &fleet, FirstFire::AtOnce);
        assert_eq!(applied.started, ["b"]);
        assert_eq!(applied.kept.len(), names.len() + 1);
        wait_for("b fires at once on reload", || {
            fired(&s).contains(&"b".to_string())
        })
        .await;
        drop(held);
        s.stop(Duration::from_secs(5)).await;
    }

    trait TapLabels {
        fn tap_labels(self) -> Self;
    }
    impl TapLabels for Config {
        fn tap_labels(mut self) -> Self {
            self.agent.labels.insert("site".into(), "hamburg".into());
            self
        }
    }

    #[tokio::test]
    async fn run_now_runs_a_named_or_ad_hoc_test_with_its_run_id() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let c = config(&tcp("a", port, "1h"));
        let (mut s, buffer, _dir) = scheduler(&c, &[]).await;
        let run = |run_id, test: &str, test_toml: &str| pb::RunNow {
            run_id,
            test: test.into(),
            test_toml: test_toml.into(),
            expires_unix_nanos: None,
        };
        use pb::run_status::State;
        let st = s.run_now(&run(1, "nope", ""));
        assert_eq!(
            (st.state, st.reason.as_str()),
            (State::Refused as i32, "unknown test `nope`")
        );
        let st = s.run_now(&run(
            2,
            "",
            "[[test]]\nname = \"x\"\nkind = \"tcp\"\ntarget = \"no port\"\n",
        ));
        assert_eq!(st.state, State::Refused as i32);
        assert!(
            st.reason
                .starts_with("invalid ad-hoc test: run-now 2 ad-hoc test:4:10:"),
            "{}",
            st.reason
        );
        let st = s.run_now(&run(3, "a", ""));
        assert_eq!((st.run_id, st.state), (3, State::Started as i32), "{st:?}");
        let st = s.run_now(&run(4, "a", ""));
        assert_eq!(st.state, State::Refused as i32);
        assert!(st.reason.starts_with("rate limited"), "{}", st.reason);
        s.last_runs = LastRuns::default();
        let adhoc = format!("[[test]]\nname = \"adhoc\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:{port}\"\nlabels = {{ why = \"debug\" }}\n");
        let st = s.run_now(&run(5, "", &adhoc));
        assert_eq!(st.state, State::Started as i32, "{st:?}");

        // Both land in the buffer with their run ids, beside the scheduled run of `a`.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let results = loop {
            let results: Vec<pb::Result> = buffer
                .read_after(0, 100, 1 << 20)
                .await
                .unwrap()
                .iter()
                .map(|e| prost::Message::decode(e.payload.as_slice()).unwrap())
                .collect();
            if results.iter().filter(|r| r.run_id != 0).count() == 2 {
                break results;
            }
            assert!(std::time::Instant::now() < deadline, "{results:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let a = results.iter().find(|r| r.run_id == 3).unwrap();
        assert_eq!(a.test, "a");
        let adhoc = results.iter().find(|r| r.run_id == 5).unwrap();
        assert_eq!(adhoc.test, "adhoc");
        assert_eq!(
            adhoc.labels.get("site").map(String::as_str),
            Some("berlin"),
            "agent labels merged"
        );
        assert_eq!(adhoc.labels.get("why").map(String::as_str), Some("debug"));
        s.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_run_now_waits_while_a_speed_test_runs() {
        let c = config(&tcp("a", 1, "1h"));
        let (mut s, _buffer, _dir) = scheduler(&c, &[]).await;
        let held = s.runner.exclusive.clone().write_owned().await;
        let st = s.run_now(&pb::RunNow {
            run_id: 9,
            test: "a".into(),
            test_toml: String::new(),
            expires_unix_nanos: None,
        });
        assert_eq!(st.state, pb::run_status::State::Waiting as i32, "{st:?}");
        drop(held);
        s.stop(Duration::from_secs(5)).await;
    }

    fn unix_nanos_in(d: Duration, past: bool) -> i64 {
        let now = crate::clock::unix_nanos(std::time::SystemTime::now());
        let d = d.as_nanos() as i64;
        if past {
            now - d
        } else {
            now + d
        }
    }

    /// Issue 25 item 5: a request that reaches the agent after its expiry is refused
    /// "expired" and never runs (nor counts against the rate limit).
    #[tokio::test]
    async fn a_run_now_past_its_expiry_is_refused() {
        let c = config(&tcp("a", 1, "1h"));
        let (mut s, _buffer, _dir) = scheduler(&c, &[]).await;
        let st = s.run_now(&pb::RunNow {
            run_id: 7,
            test: "a".into(),
            test_toml: String::new(),
            expires_unix_nanos: Some(unix_nanos_in(Duration::from_secs(1), true)),
        });
        use pb::run_status::State;
        assert_eq!(
            (st.run_id, st.state, st.reason.as_str()),
            (7, State::Refused as i32, run_now::EXPIRED),
            "{st:?}"
        );
        let st = s.run_now(&pb::RunNow {
            run_id: 8,
            test: "a".into(),
            test_toml: String::new(),
            expires_unix_nanos: Some(unix_nanos_in(Duration::from_secs(30), false)),
        });
        assert_eq!(st.state, State::Started as i32, "{st:?}");
        s.stop(Duration::from_secs(5)).await;
    }

    /// Issue 25 item 5: a run-now held behind a running speed test past its expiry does
    /// not run when the speed test ends; the agent answers "expired". One whose expiry is
    /// still ahead runs then, with its run id.
    #[tokio::test]
    async fn a_run_now_that_expires_while_waiting_never_runs() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let c = config(&format!("{}{}", tcp("a", port, "1h"), tcp("b", port, "1h")));
        let (mut s, buffer, _dir) = scheduler(&c, &[]).await;
        // Let the scheduled first runs land before the lock is taken.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = s.runner.exclusive.clone().write_owned().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let later = move |st: pb::RunStatus| {
            let _ = tx.send(st);
        };
        let st = s.run_now_then(
            &pb::RunNow {
                run_id: 11,
                test: "a".into(),
                test_toml: String::new(),
                expires_unix_nanos: Some(unix_nanos_in(Duration::from_millis(200), false)),
            },
            later.clone(),
        );
        use pb::run_status::State;
        assert_eq!(st.state, State::Waiting as i32, "{st:?}");
        s.last_runs = LastRuns::default();
        let st = s.run_now_then(
            &pb::RunNow {
                run_id: 12,
                test: "b".into(),
                test_toml: String::new(),
                expires_unix_nanos: Some(unix_nanos_in(Duration::from_secs(60), false)),
            },
            later,
        );
        assert_eq!(st.state, State::Waiting as i32, "{st:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(held);
        let st = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a status after the lock came")
            .unwrap();
        assert_eq!(
            (st.run_id, st.state, st.reason.as_str()),
            (11, State::Refused as i32, run_now::EXPIRED)
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let run_ids = loop {
            let run_ids: Vec<u64> = buffer
                .read_after(0, 100, 1 << 20)
                .await
                .unwrap()
                .iter()
                .map(|e| prost::Message::decode(e.payload.as_slice()).unwrap())
                .map(|r: pb::Result| r.run_id)
                .filter(|id| *id != 0)
                .collect();
            if !run_ids.is_empty() {
                break run_ids;
            }
            assert!(std::time::Instant::now() < deadline, "run 12 never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Give an expired run the time it would have taken to land, had it run.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(run_ids, vec![12]);
        assert!(
            rx.try_recv().is_err(),
            "only the expired run has a later status"
        );
        s.stop(Duration::from_secs(5)).await;
    }
}
