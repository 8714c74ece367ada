//! Firing a test: skip a tick while the previous run goes on, the random `spread`, the
//! lock that makes a speed test run alone, the probe and the append of its one result.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::clock::Clock;
use crate::config::{Kind, TestConfig};
use crate::probe::{self, ProbeSpec};
use crate::record::{self, TestInfo};

pub(super) struct Test {
    pub(super) info: TestInfo,
    pub(super) spec: ProbeSpec,
    pub(super) spread: Option<Duration>,
    /// A scheduled run is in progress. Shared by the old and new version of a test a
    /// reload changed, so the new one does not overlap the old one's last run.
    pub(super) running: Arc<AtomicBool>,
}

/// Shared by all runs of all tests.
pub(super) struct Runner {
    pub(super) buffer: Buffer,
    pub(super) clock: Clock,
    pub(super) exclusive: Arc<RwLock<()>>,
    pub(super) shutdown: CancellationToken,
    pub(super) runs: std::sync::Mutex<JoinSet<()>>,
}

pub(super) fn make_test(agent_labels: &BTreeMap<String, String>, tc: &TestConfig) -> Test {
    let mut labels = agent_labels.clone();
    labels.extend(tc.labels.get_ref().clone());
    Test {
        info: TestInfo {
            name: tc.name.get_ref().clone(),
            kind: tc.kind,
            target: tc.target.get_ref().clone(),
            labels,
            run_id: 0,
        },
        spec: ProbeSpec::new(
            tc.kind,
            tc.target.get_ref().clone(),
            tc.options.get_ref().clone(),
        ),
        spread: tc.spread,
        running: Arc::new(AtomicBool::new(false)),
    }
}

/// The lock a run holds: a speed test runs alone, the others together.
#[allow(dead_code)] // Held for its drop, never read.
pub(super) enum Hold {
    Shared(OwnedRwLockReadGuard<()>),
    Exclusive(OwnedRwLockWriteGuard<()>),
}

impl Runner {
    /// Starts one run of `test` unless it is still running.
    pub(super) fn fire(self: &Arc<Self>, test: Arc<Test>) {
        if self.shutdown.is_cancelled() {
            return;
        }
        if test.running.swap(true, Ordering::AcqRel) {
            tracing::debug!(test = %test.info.name, "previous run still in progress; skipping this tick");
            return;
        }
        let runner = self.clone();
        self.spawn_run(async move {
            runner.run_once(&test).await;
            test.running.store(false, Ordering::Release);
        });
    }

    /// Starts one run of `test` now (run-now: no spread, beside its schedule). True when
    /// it got its lock at once, false when it waits for it; then `may_start` decides, when
    /// the lock comes, whether the run still starts (run-now expiry, `run_now.rs`).
    pub(super) fn fire_now(
        self: &Arc<Self>,
        test: Arc<Test>,
        may_start: impl FnOnce() -> bool + Send + 'static,
    ) -> bool {
        let speed = test.spec.kind == Kind::Speed;
        let held = if speed {
            self.exclusive
                .clone()
                .try_write_owned()
                .ok()
                .map(Hold::Exclusive)
        } else {
            self.exclusive
                .clone()
                .try_read_owned()
                .ok()
                .map(Hold::Shared)
        };
        let started = held.is_some();
        tracing::info!(
            test = %test.info.name,
            run_id = test.info.run_id,
            waiting = !started,
            "run-now"
        );
        let runner = self.clone();
        self.spawn_run(async move {
            let _held = match held {
                Some(held) => held,
                None => {
                    let held = runner.hold(speed).await;
                    if !may_start() {
                        return;
                    }
                    held
                }
            };
            runner.probe_and_record(&test).await;
        });
        started
    }

    pub(super) fn spawn_run(&self, run: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut runs = self.runs.lock().unwrap();
        // Reap finished runs so the set stays small.
        while runs.try_join_next().is_some() {}
        runs.spawn(run);
    }

    pub(super) async fn hold(&self, speed: bool) -> Hold {
        if speed {
            Hold::Exclusive(self.exclusive.clone().write_owned().await)
        } else {
            Hold::Shared(self.exclusive.clone().read_owned().await)
        }
    }

    pub(super) async fn run_once(&self, test: &Test) {
        if let Some(spread) = test.spread.filter(|s| !s.is_zero()) {
            let delay = rand::rng().random_range(Duration::ZERO..spread);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let _held = self.hold(test.spec.kind == Kind::Speed).await;
        self.probe_and_record(test).await;
    }

    /// One run of `test`: one result, or one per family with `family = "both"`.
    pub(super) async fn probe_and_record(&self, test: &Test) {
        for spec in test.spec.runs() {
            self.probe_and_record_one(test, &spec).await;
        }
    }

    async fn probe_and_record_one(&self, test: &Test, spec: &ProbeSpec) {
        let outcome = probe::run(spec).await;
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
                    run_id = test.info.run_id,
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
