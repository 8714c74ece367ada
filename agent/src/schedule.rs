//! The scheduler: fires each configured test on its cron schedule or fixed interval, runs
//! the probe and appends the result to the buffer.
//!
//! - `schedule` (cron with seconds) runs on tokio-cron-scheduler. `every` runs on a tokio
//!   interval: tokio-cron-scheduler ticks every 500 ms and keeps next ticks in whole
//!   seconds, which cannot honour sub-second intervals.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use tokio::sync::RwLock;
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::clock::Clock;
use crate::config::{Config, Kind, TestConfig};
use crate::probe::{self, ProbeSpec};
use crate::record::{self, TestInfo};

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
    cron: Option<JobScheduler>,
    intervals: JoinSet<()>,
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
        let mut intervals = JoinSet::new();
        let mut cron = None;
        for tc in &config.tests {
            let test = Arc::new(make_test(config, tc));
            if let Some(every) = tc.every {
                let runner = runner.clone();
                let shutdown = shutdown.clone();
                intervals.spawn(async move {
                    let mut ticks = tokio::time::interval(every);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = ticks.tick() => runner.fire(test.clone()),
                        }
                    }
                });
            } else if let Some(expr) = &tc.schedule {
                if cron.is_none() {
                    cron = Some(
                        JobScheduler::new()
                            .await
                            .context("starting the cron scheduler")?,
                    );
                }
                let runner = runner.clone();
                let job = Job::new_async(expr.as_str(), move |_id, _lock| {
                    runner.fire(test.clone());
                    Box::pin(async {})
                })
                .with_context(|| format!("test `{}`: bad schedule `{expr}`", tc.name.get_ref()))?;
                cron.as_ref()
                    .expect("created above")
                    .add(job)
                    .await
                    .context("adding a cron job")?;
            }
        }
        if let Some(c) = &cron {
            c.start().await.context("starting the cron scheduler")?;
        }
        tracing::info!(tests = config.tests.len(), "scheduler started");
        Ok(Scheduler {
            cron,
            intervals,
            runner,
        })
    }

    /// Stops firing and waits up to `grace` for runs in progress to record their results.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(mut cron) = self.cron.take() {
            let _ = cron.shutdown().await;
        }
        self.intervals.abort_all();
        let mut runs = std::mem::take(&mut *self.runner.runs.lock().unwrap());
        let drained =
            tokio::time::timeout(grace, async { while runs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("runs still in progress after {grace:?}; abandoning them");
            runs.abort_all();
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
