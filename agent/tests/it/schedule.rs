//! Cron schedules in real `edgeprobe-agent run` processes whose wall clock is set or
//! stepped by libfaketime (the monotonic clock stays real): Vixie day semantics, wall-clock
//! steps in both directions, time zones, and `check` on a bad zone. Tests are tcp probes
//! of a closed port (instant results); runs are counted from the agent's debug log line
//! `recorded test=NAME`, so no collector is needed. The daylight-saving days are tested
//! as pure functions in `schedule.rs` (no waiting for March).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Timelike;

use crate::util::{Proc, BIN};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// An agent config whose results go nowhere (the collector port is closed) and whose
/// tests probe a closed port; `agent` is added under `[agent]`, `tests` at the end.
fn write_config(dir: &Path, agent: &str, tests: &str) -> PathBuf {
    let port = closed_port();
    let path = dir.join("agent.toml");
    let text = format!(
        r#"[agent]
id = "it-schedule"
state_dir = "{state}"
{agent}

[collector]
endpoints = ["http://127.0.0.1:{port}"]
insecure = true
{tests}"#,
        state = dir.join("state").display(),
        tests = tests.replace("TARGET", &format!("127.0.0.1:{port}")),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `edgeprobe-agent run` with its wall clock under libfaketime (`env`), logging each
/// recorded result.
struct Agent {
    _proc: Proc,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, config: &Path, env: &[(&str, String)]) -> Agent {
        assert!(
            Path::new(LIBFAKETIME).exists(),
            "libfaketime missing: apt-get install faketime (scripts/setup does)"
        );
        let log = dir.join("agent.log");
        let proc = Proc(
            Command::new(BIN)
                .args(["run", "--config", config.to_str().unwrap()])
                .env("RUST_LOG", "info,edgeprobe_agent::schedule=debug")
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start edgeprobe-agent run"),
        );
        Agent { _proc: proc, log }
    }

    /// Results of test `name` recorded so far.
    fn recorded(&self, name: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let field = format!("test={name}");
        text.lines()
            .filter(|l| l.contains(" recorded ") && l.split_whitespace().any(|w| w == field))
            .count()
    }

    /// Waits until test `name` has `n` results (the agent has started and fires).
    fn wait_for(&self, name: &str, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.recorded(name) < n {
            assert!(
                Instant::now() < deadline,
                "`{name}` recorded {} results in {within:?}, expected {n}; log:\n{}",
                self.recorded(name),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Case 1: `* * * 30 * 2` is "day 30 OR Tuesday". On Monday 2026-11-30 it fires every
/// second; before, the scheduler ANDed the fields and it never fired there.
#[test]
fn cron_day_fields_are_ored_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "",
        r#"
[[test]]
name = "day30-or-tuesday"
kind = "tcp"
target = "TARGET"
schedule = "* * * 30 * 2"

[[test]]
name = "tuesday-only"
kind = "tcp"
target = "TARGET"
schedule = "* * * * * 2"

[[test]]
name = "every-second"
kind = "tcp"
target = "TARGET"
schedule = "* * * * * *"
"#,
    );
    let agent = Agent::start(
        dir.path(),
        &config,
        &[("FAKETIME", "@2026-11-30 12:00:00".into())],
    );
    agent.wait_for("every-second", 1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(6));
    let (ored, every, tuesday) = (
        agent.recorded("day30-or-tuesday"),
        agent.recorded("every-second"),
        agent.recorded("tuesday-only"),
    );
    assert!(
        ored + 1 >= every && every >= 6,
        "day 30 OR Tuesday fired {ored} times, every second {every}; log:\n{}",
        agent.log()
    );
    assert_eq!(tuesday, 0, "a Tuesday-only schedule fired on a Monday");
    eprintln!("in 6 s on Monday the 30th: `* * * 30 * 2` {ored}, `* * * * * *` {every}, `* * * * * 2` {tuesday}");
}

/// Case 2: the wall clock steps back one hour, then forward one day, under a running
/// agent. `*/2 * * * * *` keeps firing after the step back (before: nothing for the
/// hour) and does not burst after the step forward; `every = "2s"` is the reference.
#[test]
fn a_stepped_wall_clock_neither_stalls_nor_bursts_cron() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("faketime");
    // Replaced by rename: libfaketime re-reads it on every call (FAKETIME_NO_CACHE) and
    // must never see it half written.
    let step_to = |spec: &str| {
        let tmp = dir.path().join("faketime.new");
        std::fs::write(&tmp, format!("{spec}\n")).unwrap();
        std::fs::rename(&tmp, &offset).unwrap();
    };
    step_to("+0");
    let config = write_config(
        dir.path(),
        "",
        r#"
[[test]]
name = "cron2"
kind = "tcp"
target = "TARGET"
schedule = "*/2 * * * * *"

[[test]]
name = "every2"
kind = "tcp"
target = "TARGET"
every = "2s"
"#,
    );
    let agent = Agent::start(
        dir.path(),
        &config,
        &[
            ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
        ],
    );
    agent.wait_for("cron2", 2, Duration::from_secs(20));

    step_to("-3600");
    let (cron_before, every_before) = (agent.recorded("cron2"), agent.recorded("every2"));
    std::thread::sleep(Duration::from_secs(8));
    let after_back = agent.recorded("cron2") - cron_before;
    let every_back = agent.recorded("every2") - every_before;
    assert!(
        after_back >= 3,
        "cron recorded {after_back} results in the 8 s after a step back of 1 h \
         (every = 2s: {every_back}); log:\n{}",
        agent.log()
    );

    step_to("+1d");
    let (cron_before, every_before) = (agent.recorded("cron2"), agent.recorded("every2"));
    std::thread::sleep(Duration::from_secs(8));
    let after_forward = agent.recorded("cron2") - cron_before;
    let every_forward = agent.recorded("every2") - every_before;
    // A little over 8 s of a 2 s schedule holds 4 or 5 runs by phase; the step itself
    // may add one run (fired once when seen, then back on even seconds). A catch-up of
    // the skipped day would be thousands.
    assert!(
        (3..=6).contains(&after_forward),
        "cron recorded {after_forward} results in the 8 s after a step forward of 25 h \
         (every = 2s: {every_forward}); log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("wall clock stepped back"), "{log}");
    assert!(log.contains("wall clock stepped forward"), "{log}");
    eprintln!(
        "8 s after a step back of 1 h: cron {after_back}, every {every_back}; \
         8 s after a step forward of 25 h: cron {after_forward}, every {every_forward}"
    );
}

/// Case 2, Vixie's rule for a short step back: a fixed-time job that ran does not run
/// again when the wall clock steps back over its time (here 5 s), while the schedule still
/// follows the new time (the step-back test above).
#[test]
fn a_fixed_time_job_does_not_rerun_after_a_short_step_back() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("faketime");
    let step_to = |spec: &str| {
        let tmp = dir.path().join("faketime.new");
        std::fs::write(&tmp, format!("{spec}\n")).unwrap();
        std::fs::rename(&tmp, &offset).unwrap();
    };
    step_to("+0");
    // A time of day a few seconds ahead, far enough for the agent to start first.
    let at = chrono::Utc::now() + chrono::TimeDelta::seconds(8);
    let config = write_config(
        dir.path(),
        "",
        &format!(
            r#"
[[test]]
name = "once"
kind = "tcp"
target = "TARGET"
schedule = "{} {} {} * * *"
"#,
            at.second(),
            at.minute(),
            at.hour()
        ),
    );
    let agent = Agent::start(
        dir.path(),
        &config,
        &[
            ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
        ],
    );
    agent.wait_for("once", 1, Duration::from_secs(20));
    step_to("-5");
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(agent.recorded("once"), 1, "{}", agent.log());
    assert!(agent.log().contains("wall clock stepped back"));
}

/// Case 2, time zones: `[agent] timezone` applies to every schedule, a test's own
/// `timezone` overrides it. From 07:59:50 UTC on 2026-11-30 (08:59:50 in Berlin, CET),
/// `0 0 9 * * *` in Berlin fires within seconds (the margin is for a slow start on a busy
/// machine: a start after the fire time would wait for tomorrow); in UTC it does not.
#[test]
fn a_schedule_fires_at_the_local_time_of_its_zone() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"timezone = "Europe/Berlin""#,
        r#"
[[test]]
name = "nine-berlin"
kind = "tcp"
target = "TARGET"
schedule = "0 0 9 * * *"

[[test]]
name = "nine-utc"
kind = "tcp"
target = "TARGET"
schedule = "0 0 9 * * *"
timezone = "UTC"

[[test]]
name = "eight-utc"
kind = "tcp"
target = "TARGET"
schedule = "0 0 8 * * *"
timezone = "Etc/UTC"
"#,
    );
    let agent = Agent::start(
        dir.path(),
        &config,
        &[("FAKETIME", "@2026-11-30 07:59:50".into())],
    );
    agent.wait_for("nine-berlin", 1, Duration::from_secs(30));
    agent.wait_for("eight-utc", 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.recorded("nine-berlin"), 1, "{}", agent.log());
    assert_eq!(agent.recorded("eight-utc"), 1, "{}", agent.log());
    assert_eq!(agent.recorded("nine-utc"), 0, "{}", agent.log());
}

/// `check` refuses an unknown zone at its place in the file, for the agent and a test.
#[test]
fn check_refuses_an_unknown_time_zone_located() {
    let dir = tempfile::tempdir().unwrap();
    let tests = r#"
[[test]]
name = "mars"
kind = "tcp"
target = "TARGET"
schedule = "0 0 9 * * *"
timezone = "Mars/Olympus"
"#;
    let config = write_config(dir.path(), "", tests);
    let out = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "{}:15:12: unknown time zone `Mars/Olympus`; use an IANA name such as \"Europe/Berlin\" or \"UTC\"",
            config.display()
        )
    );

    let config = write_config(dir.path(), r#"timezone = "Berlin""#, "");
    let out = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{}:4:12: unknown time zone `Berlin`",
            config.display()
        )),
        "{stderr}"
    );
}

/// Issue 28 case 6: a schedule that can never fire passed `check` ("ok") and the running
/// agent never ran it. `check` now refuses it at the schedule's place, exit 2.
#[test]
fn check_refuses_a_schedule_that_can_never_fire() {
    let dir = tempfile::tempdir().unwrap();
    for (cron, why) in [
        (
            "0 0 6 31 4,6,9,11 *",
            "can never fire: no date in the calendar matches all its fields",
        ),
        (
            "0 0 0 1 1 * 2019",
            "never fires again: its last time was 2019-01-01 00:00:00 UTC",
        ),
    ] {
        let tests = format!(
            "\n[[test]]\nname = \"never\"\nkind = \"tcp\"\ntarget = \"TARGET\"\nschedule = \"{cron}\"\n"
        );
        let config = write_config(dir.path(), "", &tests);
        let out = Command::new(BIN)
            .args(["check", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cron}: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "{}:14:12: test `never`: schedule `{cron}` {why}",
                config.display()
            )),
            "{stderr}"
        );
    }
}
