//! Run-now on the agent: a scheduled test or an ad-hoc block, once, beside its schedule,
//! without spread, under the same lock, rate-limited by the rule the collector applies too
//! (`edgeprobe_proto::testdef::run_now`). A request carries its expiry
//! (`RunNow.expires_unix_nanos`, the collector's clock): one that cannot start before it,
//! on arrival or after waiting behind a speed test, is refused with the reason
//! [`EXPIRED`] and never runs, so a speed test does not fire long after anyone asked.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeprobe_proto::bounds;
use edgeprobe_proto::testdef::run_now::RunNowLimit;
use edgeprobe_proto::v1 as pb;

use super::runner::{make_test, Test};
use super::Scheduler;
use crate::config::Kind;

/// The reason of the RunStatus refusing a request whose expiry passed before it started.
pub use edgeprobe_proto::testdef::run_now::REASON_EXPIRED as EXPIRED;

impl Scheduler {
    /// [`Scheduler::run_now_then`] without a later status (an expiry while waiting is
    /// only logged).
    pub fn run_now(&mut self, run: &pb::RunNow) -> pb::RunStatus {
        self.run_now_then(run, |_| {})
    }

    /// Runs a test at once for run-now: the scheduled test `run.test`, or the ad-hoc
    /// block `run.test_toml`. Started, waiting (a speed test holds the exclusive lock, or
    /// this speed test waits for the tests running), or refused with the reason. A waiting
    /// run whose expiry passes before its lock comes does not run: `later` gets its
    /// refusal ([`EXPIRED`]).
    pub fn run_now_then(
        &mut self,
        run: &pb::RunNow,
        later: impl FnOnce(pb::RunStatus) + Send + 'static,
    ) -> pb::RunStatus {
        let status = |state: pb::run_status::State, reason: String| pb::RunStatus {
            run_id: run.run_id,
            state: state as i32,
            reason,
        };
        let refused = |reason: String| status(pb::run_status::State::Refused, reason);
        let deadline = match run.expires_unix_nanos {
            Some(expires) => match self.expiry_deadline(expires) {
                Some(deadline) => Some(deadline),
                None => {
                    tracing::info!(
                        run_id = run.run_id,
                        test = %run.test,
                        "run-now arrived after its expiry; not run"
                    );
                    return refused(EXPIRED.into());
                }
            },
            None => None,
        };
        let test = if !run.test_toml.is_empty() {
            let origin = format!("run-now {} ad-hoc test", run.run_id);
            let tc = match edgeprobe_proto::testdef::parse_adhoc_test(&run.test_toml, &origin) {
                Ok(tc) => tc,
                Err(e) => return refused(format!("invalid ad-hoc test: {e}")),
            };
            let test = make_test(&self.agent_labels, &tc);
            if let Err(e) = bounds::labels(test.info.labels.iter()) {
                return refused(format!(
                    "invalid ad-hoc test: {e} after merging [agent] labels"
                ));
            }
            test
        } else {
            match self.entries.get(&run.test) {
                Some(entry) => Test {
                    info: entry.test.info.clone(),
                    spec: entry.test.spec.clone(),
                    spread: None,
                    running: Arc::new(AtomicBool::new(false)),
                },
                None if run.test.is_empty() => {
                    return refused("run-now names no test and carries no ad-hoc test".into())
                }
                None => return refused(format!("unknown test `{}`", run.test)),
            }
        };
        if let Err(reason) = RunNowLimit::default().admit(
            &mut self.last_runs,
            test.spec.kind == Kind::Speed,
            std::time::Instant::now(),
        ) {
            return refused(reason);
        }
        let mut test = test;
        test.info.run_id = run.run_id;
        let expired = refused(EXPIRED.into());
        let (run_id, name) = (run.run_id, run.test.clone());
        let may_start = move || match deadline {
            Some(deadline) if Instant::now() >= deadline => {
                tracing::info!(
                    run_id,
                    test = %name,
                    "run-now expired while waiting for a running test; not run"
                );
                later(expired);
                false
            }
            _ => true,
        };
        if self.runner.fire_now(Arc::new(test), may_start) {
            status(pb::run_status::State::Started, String::new())
        } else {
            status(pb::run_status::State::Waiting, String::new())
        }
    }

    /// The local instant a request expiring at `expires_unix_nanos` (the collector's
    /// clock) expires, `None` when it has. Now is read on the collector's clock when the
    /// agent has a trusted base (its wall clock may be off), else on the wall clock.
    fn expiry_deadline(&self, expires_unix_nanos: i64) -> Option<Instant> {
        let now = match self.runner.clock.base() {
            Some(base) => base.saturating_add(crate::clock::boottime_nanos()),
            None => crate::clock::unix_nanos(std::time::SystemTime::now()),
        };
        let left = expires_unix_nanos.saturating_sub(now);
        (left > 0).then(|| Instant::now() + Duration::from_nanos(left as u64))
    }
}
