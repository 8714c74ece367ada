//! `edgeprobe-agent run`: wires buffer, scheduler and uplink together and shuts them down
//! in order when the caller's `shutdown` token is cancelled (main cancels it on SIGTERM or
//! SIGINT; tests and benchmarks can drive a whole agent in process): stop firing, let runs
//! in progress record their results, stop the uplink, close the buffer. SIGHUP reloads the configuration file: tests are
//! rescheduled, the uplink restarts if its settings changed, and a file that does not
//! check keeps the running configuration, and so does one whose tests clash with the applied
//! fleet tests; unchanged tests keep their schedule (`Scheduler::apply`). Fleet pushes and
//! run-now requests arrive from the uplink (`fleet::Inbound`) and are answered on the
//! session that asked. A clock watch asks the kernel every
//! `CLOCK_CHECK_EVERY` whether its clock is synchronised and corrects buffered results
//! when something vouches for the clock.
//!
//! Blocking work stays off the async workers: opening the buffer (sled, a journal to
//! finish, waits for its lock), persisting a fleet push (fsync, rename, directory fsync),
//! the published status (sled reads) and closing the buffer run on `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeprobe_proto::bounds;
use edgeprobe_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError};
use crate::clock::Clock;
use crate::config::Config;
use crate::fleet::{self, Fleet, Inbound};
use crate::schedule::{FirstFire, Scheduler};
use crate::uplink::Uplink;

/// Time given to runs in progress at shutdown.
const GRACE: Duration = Duration::from_secs(5);

/// Why the agent could not start or stop cleanly (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("installing the SIGHUP handler")]
    Hangup(#[source] std::io::Error),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("the buffer's {0} task failed")]
    Task(&'static str, #[source] tokio::task::JoinError),
}

/// Runs the agent of `config` (read from `path`, which SIGHUP reloads) until `shutdown`
/// is cancelled, then stops in order.
pub async fn run(
    config: Config,
    path: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(RunError::Hangup)?;
    let agent_id = config.agent_id();
    let buffer = open_buffer(&config).await?;
    let stats = buffer.stats_async().await?;
    let clock = Clock::new();
    // The last fleet tests a collector pushed, before any collector is reached.
    let mut fleet = fleet::load(&config.agent.state_dir, &config);
    tracing::info!(
        agent_id = %agent_id,
        version = env!("CARGO_PKG_VERSION"),
        incarnation = %stats.incarnation,
        backlog = stats.backlog,
        next_seq = stats.next_seq,
        tests = config.tests.len(),
        fleet_version = fleet.as_ref().map_or(0, |f| f.version),
        clock_synchronised = clock.base().is_some(),
        "edgeprobe-agent starting"
    );

    // The caller's token stops the main loop; this one stops the tasks, in order, after it.
    let stop = shutdown;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_clock(
        clock.clone(),
        buffer.clone(),
        shutdown.child_token(),
    ));
    let (inbound_tx, mut inbound) = mpsc::channel::<Inbound>(16);
    let mut uplink = start_uplink(&config, &buffer, &clock, &inbound_tx, &shutdown);
    let mut scheduler = Scheduler::start(
        &config,
        fleet.as_ref().map_or(&[][..], |f| &f.tests),
        buffer.clone(),
        clock.clone(),
        shutdown.child_token(),
    );
    if let Some(f) = &fleet {
        tracing::info!(version = f.version, tests = ?f.names(), source = "persisted", "fleet tests applied");
    }
    tokio::spawn(publish_status(
        buffer.clone(),
        config.agent.state_dir.clone(),
        shutdown.child_token(),
    ));

    let mut config = config;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(msg) = inbound.recv() => match msg {
                Inbound::FleetTests { push, reply } => {
                    let error = apply_fleet(&push, &config, &mut fleet, &mut scheduler).await;
                    // The collector stores the reason: it fits the error bound.
                    let error = error.map_or_else(String::new, |e| bounds::fit_error_message(&e).0);
                    answer(reply, pb::agent_message::Msg::TestsApplied(pb::TestsApplied {
                        version: push.version,
                        error,
                    }));
                }
                Inbound::RunNow { run, reply } => {
                    let status = if run.test_toml.len() > bounds::MAX_RUN_NOW_BYTES {
                        pb::RunStatus {
                            run_id: run.run_id,
                            state: pb::run_status::State::Refused as i32,
                            reason: format!(
                                "the ad-hoc test is {} bytes, at most {}",
                                run.test_toml.len(),
                                bounds::MAX_RUN_NOW_BYTES
                            ),
                        }
                    } else {
                        let later = reply.clone();
                        scheduler.run_now_then(&run, move |status| {
                            answer(later, pb::agent_message::Msg::RunStatus(status));
                        })
                    };
                    // The collector stores the reason: it fits the error bound.
                    let status = pb::RunStatus {
                        reason: bounds::fit_error_message(&status.reason).0,
                        ..status
                    };
                    if status.state == pb::run_status::State::Refused as i32 {
                        tracing::warn!(run_id = run.run_id, test = %run.test, "run-now refused: {}", status.reason);
                    }
                    answer(reply, pb::agent_message::Msg::RunStatus(status));
                }
            },
            _ = hangups.recv() => {
                // Reload: a bad file keeps the running configuration.
                let new = match Config::load(&path) {
                    Ok(new) => new,
                    Err(e) => {
                        tracing::error!("reload refused, keeping the running configuration: {e}");
                        continue;
                    }
                };
                // The applied fleet tests must still fit beside the new local tests.
                let refit = match fleet.as_ref().map(|f| f.recheck(&new)).transpose() {
                    Ok(refit) => refit,
                    Err(e) => {
                        tracing::error!(
                            fleet_version = fleet.as_ref().map_or(0, |f| f.version),
                            "reload refused, keeping the running configuration: the applied fleet tests do not fit beside {}: {e}",
                            path.display()
                        );
                        continue;
                    }
                };
                if new.agent.state_dir != config.agent.state_dir
                    || new.agent.buffer_max_bytes != config.agent.buffer_max_bytes
                {
                    tracing::warn!("state_dir and buffer_max_bytes take effect at the next restart");
                }
                if new.agent_id() != config.agent_id()
                    || new.agent.labels != config.agent.labels
                    || local_tests(&new) != local_tests(&config)
                    || format!("{:?}", new.collector) != format!("{:?}", config.collector)
                {
                    // The hello carries id, labels and local test names: a new session.
                    uplink.0.cancel();
                    let _ = tokio::time::timeout(GRACE, uplink.1).await;
                    uplink = start_uplink(&new, &buffer, &clock, &inbound_tx, &shutdown);
                }
                fleet = refit;
                let applied = scheduler.apply(
                    &new,
                    fleet.as_ref().map_or(&[][..], |f| &f.tests),
                    FirstFire::AtOnce,
                );
                tracing::info!(
                    tests = new.tests.len(),
                    kept = applied.kept.len(),
                    started = ?applied.started,
                    stopped = ?applied.stopped,
                    "configuration reloaded"
                );
                config = new;
            }
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    scheduler.stop(GRACE).await;
    let _ = tokio::time::timeout(GRACE, uplink.1).await;
    tokio::task::spawn_blocking(move || buffer.close())
        .await
        .map_err(|e| RunError::Task("close", e))?;
    tracing::info!("stopped");
    Ok(())
}

/// Applies a push: checked against the running configuration, persisted, rescheduled.
/// `Some(reason)` when refused (the previous set runs on). A push identical to what runs
/// (a reconnect) is applied without touching the schedule.
async fn apply_fleet(
    push: &pb::FleetTests,
    config: &Config,
    fleet: &mut Option<Fleet>,
    scheduler: &mut Scheduler,
) -> Option<String> {
    if push.version == 0 {
        let reason = "fleet tests version 0 is never pushed".to_string();
        tracing::warn!("fleet tests refused: {reason}");
        return Some(reason);
    }
    // The bounds first: a push over them is refused before it is parsed.
    if let Err(e) = bounds::fleet_push(push.tests_toml.len()) {
        tracing::warn!(
            version = push.version,
            "fleet tests refused, keeping the running set: {e}"
        );
        return Some(e.to_string());
    }
    let same = fleet
        .as_ref()
        .is_some_and(|f| f.tests_toml == push.tests_toml)
        || (fleet.is_none() && push.tests_toml.trim().is_empty());
    let next = if same {
        let mut f = fleet.clone().unwrap_or(Fleet {
            version: push.version,
            tests_toml: push.tests_toml.clone(),
            tests: Vec::new(),
        });
        f.version = push.version;
        f
    } else {
        match Fleet::parse(push.version, &push.tests_toml, config) {
            Ok(f) => {
                if let Err(e) = bounds::agent_tests(config.tests.len(), f.tests.len()) {
                    tracing::warn!(
                        version = push.version,
                        "fleet tests refused, keeping the running set: {e}"
                    );
                    return Some(e.to_string());
                }
                f
            }
            Err(e) => {
                tracing::warn!(
                    version = push.version,
                    running_version = fleet.as_ref().map_or(0, |f| f.version),
                    "fleet tests refused, keeping the running set: {e}"
                );
                return Some(e.to_string());
            }
        }
    };
    let unchanged_file = fleet.as_ref().is_some_and(|f| f.version == push.version) && same;
    if !unchanged_file {
        let (state_dir, version, tests_toml) = (
            config.agent.state_dir.clone(),
            next.version,
            next.tests_toml.clone(),
        );
        let saved = tokio::task::spawn_blocking(move || {
            fleet::save(&state_dir, version, &tests_toml, chrono::Utc::now())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = saved {
            let reason = format!(
                "cannot persist the fleet tests in {}: {e}",
                fleet::path(&config.agent.state_dir).display()
            );
            tracing::error!(version = push.version, "fleet tests refused: {reason}");
            return Some(reason);
        }
    }
    if same {
        tracing::info!(version = next.version, tests = ?next.names(), unchanged = true, "fleet tests applied");
    } else {
        // Staggered: the push reaches the whole fleet at once.
        let applied = scheduler.apply(config, &next.tests, FirstFire::Staggered);
        tracing::info!(
            version = next.version,
            tests = ?next.names(),
            started = ?applied.started,
            stopped = ?applied.stopped,
            "fleet tests applied"
        );
    }
    *fleet = Some(next);
    None
}

/// Sends an answer on the session that asked, without holding up the scheduler side (a
/// session that ended drops it).
fn answer(reply: mpsc::Sender<pb::AgentMessage>, msg: pb::agent_message::Msg) {
    tokio::spawn(async move {
        let _ = reply.send(pb::AgentMessage { msg: Some(msg) }).await;
    });
}

fn local_tests(config: &Config) -> Vec<String> {
    config
        .tests
        .iter()
        .map(|t| t.name.get_ref().clone())
        .collect()
}

/// Opens the buffer on a blocking thread (sled's open, a renumbering journal to finish and
/// its own waits can take seconds), waiting up to `LOCK_WAIT` while another process holds
/// its lock: an `edgeprobe-agent buffer` run at the moment the agent starts holds it for a
/// moment, and must not make the start fail. Another running agent still fails the start
/// after that.
async fn open_buffer(config: &Config) -> Result<Buffer, RunError> {
    const LOCK_WAIT: Duration = Duration::from_secs(10);
    let start = std::time::Instant::now();
    loop {
        let (dir, max_bytes) = (
            config.agent.state_dir.clone(),
            config.agent.buffer_max_bytes,
        );
        let opened = tokio::task::spawn_blocking(move || Buffer::open(&dir, max_bytes))
            .await
            .map_err(|e| RunError::Task("open", e))?;
        match opened {
            Err(BufferError::Locked { .. }) if start.elapsed() < LOCK_WAIT => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Starts the uplink with its own token, so a reload can replace it alone.
fn start_uplink(
    config: &Config,
    buffer: &Buffer,
    clock: &Clock,
    inbound: &mpsc::Sender<Inbound>,
    shutdown: &CancellationToken,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = shutdown.child_token();
    let uplink = Uplink {
        agent_id: config.agent_id(),
        labels: config.agent.labels.clone(),
        collector: config.collector.clone(),
        buffer: buffer.clone(),
        clock: clock.clone(),
        local_tests: local_tests(config),
        inbound: inbound.clone(),
    };
    (token.clone(), tokio::spawn(uplink.run(token)))
}

/// How often the kernel is asked whether its clock is synchronised.
const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Asks the kernel about its clock every few seconds and corrects buffered results once
/// something vouches for the clock (the kernel here, a collector's welcome in the uplink).
async fn watch_clock(clock: Clock, buffer: Buffer, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(CLOCK_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // One adjtimex call: cheap enough for an async worker.
        if clock.check_kernel() {
            crate::uplink::correct_in_background(clock.clone(), buffer.clone()).await;
        }
    }
}

/// How often the running agent publishes its buffer stats for `edgeprobe-agent buffer`.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The file `edgeprobe-agent buffer` reads while sled is locked by this process.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("buffer.status")
}

/// Writes the buffer stats to `status_path` every few seconds (atomically, by rename).
async fn publish_status(buffer: Buffer, state_dir: PathBuf, shutdown: CancellationToken) {
    let path = status_path(&state_dir);
    let tmp = path.with_extension("status.tmp");
    let mut ticks = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let Ok(stats) = buffer.stats_async().await else {
            break;
        };
        let text = crate::report::buffer_json(&stats, &state_dir).to_string();
        let written = async {
            tokio::fs::write(&tmp, text).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), "cannot write buffer status: {e}");
        }
    }
    // Stale once the agent stops: the buffer itself can be opened then.
    let _ = tokio::fs::remove_file(&path).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[agent]
id = "a1"
[collector]
endpoints = ["http://127.0.0.1:1"]
insecure = true
[[test]]
name = "local"
kind = "tcp"
target = "127.0.0.1:1"
every = "1h"
"#;

    fn push(version: u64, name: &str) -> pb::FleetTests {
        pb::FleetTests {
            version,
            tests_toml: format!(
                "[[test]]\nname = \"{name}\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:1\"\nevery = \"1h\"\n"
            ),
        }
    }

    fn persisted_version(dir: &Path) -> u64 {
        fleet::read(&fleet::path(dir)).unwrap().0
    }

    #[tokio::test]
    async fn pushes_are_applied_persisted_or_refused_keeping_the_previous_set() {
        let dir = tempfile::tempdir().unwrap();
        let text = CONFIG.replace(
            "id = \"a1\"",
            &format!("id = \"a1\"\nstate_dir = \"{}\"", dir.path().display()),
        );
        let config = Config::parse(&text, "agent.toml").unwrap();
        let buffer = Buffer::open(dir.path(), 1 << 20).unwrap();
        let mut scheduler =
            Scheduler::start(&config, &[], buffer, Clock::new(), CancellationToken::new());
        let mut fleet = None;

        assert_eq!(
            apply_fleet(&push(1, "f1"), &config, &mut fleet, &mut scheduler).await,
            None
        );
        assert_eq!(scheduler.test_names(), ["f1", "local"]);
        assert_eq!(persisted_version(dir.path()), 1);

        // The same set as a new version: applied, persisted with the version.
        assert_eq!(
            apply_fleet(&push(2, "f1"), &config, &mut fleet, &mut scheduler).await,
            None
        );
        assert_eq!(fleet.as_ref().unwrap().version, 2);
        assert_eq!(persisted_version(dir.path()), 2);
        // The same version again (a reconnect): applied again.
        assert_eq!(
            apply_fleet(&push(2, "f1"), &config, &mut fleet, &mut scheduler).await,
            None
        );

        // A clash with a local test, and version 0: refused, version 2 runs on.
        let e = apply_fleet(&push(3, "local"), &config, &mut fleet, &mut scheduler)
            .await
            .unwrap();
        assert!(e.contains("own config file"), "{e}");
        let e = apply_fleet(&push(0, "f9"), &config, &mut fleet, &mut scheduler)
            .await
            .unwrap();
        assert!(e.contains("version 0"), "{e}");
        assert_eq!(fleet.as_ref().unwrap().version, 2);
        assert_eq!(persisted_version(dir.path()), 2);
        assert_eq!(scheduler.test_names(), ["f1", "local"]);

        // A new set replaces the old one; an empty one removes them all.
        assert_eq!(
            apply_fleet(&push(4, "f2"), &config, &mut fleet, &mut scheduler).await,
            None
        );
        assert_eq!(scheduler.test_names(), ["f2", "local"]);
        let empty = pb::FleetTests {
            version: 5,
            tests_toml: String::new(),
        };
        assert_eq!(
            apply_fleet(&empty, &config, &mut fleet, &mut scheduler).await,
            None
        );
        assert_eq!(scheduler.test_names(), ["local"]);
        assert_eq!(persisted_version(dir.path()), 5);

        // Over the bounds: refused (before parsing when too big), version 5 runs on.
        let big = pb::FleetTests {
            version: 6,
            tests_toml: "#".repeat(bounds::MAX_PUSH_BYTES + 1),
        };
        let e = apply_fleet(&big, &config, &mut fleet, &mut scheduler)
            .await
            .unwrap();
        assert!(e.ends_with("at most 1000000 in one push"), "{e}");
        let many = pb::FleetTests {
            version: 7,
            tests_toml: (0..bounds::MAX_AGENT_TESTS)
                .map(|i| push(7, &format!("f{i}")).tests_toml)
                .collect(),
        };
        let e = apply_fleet(&many, &config, &mut fleet, &mut scheduler)
            .await
            .unwrap();
        assert_eq!(
            e,
            "4096 fleet tests beside 1 local tests, at most 4096 tests on one agent"
        );
        assert_eq!(fleet.as_ref().unwrap().version, 5);
        assert_eq!(persisted_version(dir.path()), 5);
        assert_eq!(scheduler.test_names(), ["local"]);
        scheduler.stop(Duration::from_secs(1)).await;
    }
}
