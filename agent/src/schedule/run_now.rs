//! Run-now on the agent: a scheduled test or an ad-hoc block, once, beside its schedule,
//! without spread, under the same lock, rate-limited by the rule the collector applies too
//! (`edgeprobe_proto::testdef::run_now`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use edgeprobe_proto::bounds;
use edgeprobe_proto::testdef::run_now::RunNowLimit;
use edgeprobe_proto::v1 as pb;

use super::runner::{make_test, Test};
use super::Scheduler;
use crate::config::Kind;

impl Scheduler {
    /// Runs a test at once for run-now: the scheduled test `run.test`, or the ad-hoc
    /// block `run.test_toml`. Started, waiting (a speed test holds the exclusive lock, or
    /// this speed test waits for the tests running), or refused with the reason.
    pub fn run_now(&mut self, run: &pb::RunNow) -> pb::RunStatus {
        let status = |state: pb::run_status::State, reason: String| pb::RunStatus {
            run_id: run.run_id,
            state: state as i32,
            reason,
        };
        let refused = |reason: String| status(pb::run_status::State::Refused, reason);
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
        if self.runner.fire_now(Arc::new(test)) {
            status(pb::run_status::State::Started, String::new())
        } else {
            status(pb::run_status::State::Waiting, String::new())
        }
    }
}
