//! The test definition: what a test is, in the one form agent and collector share. The
//! agent runs it, `edgeprobe-agent check` and the collector's `tests apply` check it with
//! the same code, the collector stores and pushes it (`FleetTests.tests_toml` carries
//! [`TestConfig::block`]s) and runs it on demand. It lives in the wire crate because it is
//! part of the contract between the two binaries; nothing here does I/O.
//!
//! - [`Kind`]: the kinds of test, with the wire's `pb::Kind` at the boundary.
//! - [`TestConfig`] / [`TestOptions`] and [`check_test`] (test.rs): a `[[test]]` block and
//!   the checks that need more than one field; [`TestOptions::timeout_for`], the default
//!   whole-run limit of each kind.
//! - [`CronSchedule`] (cron.rs): the calendar of `schedule`.
//! - target.rs: target syntax, [`HttpUrl`], [`redact`].
//! - located.rs: `file:line:col: reason` errors ([`ConfigError`]).
//! - units.rs: durations, time zones and the serde adapters that check values in place.
//! - fleet.rs: fleet tests files, [`selects`] (the one selection rule), ad-hoc tests.
//! - run_now.rs: the run-now rate limit both sides enforce.
//!
//! Invariant: a test that passes [`check_test`] yields only results the collector accepts
//! (names, targets and labels are checked against [`crate::bounds`]).

mod cron;
mod fleet;
mod kind;
mod located;
pub mod run_now;
mod target;
mod test;
pub mod units;

pub use cron::CronSchedule;
pub use fleet::{parse_adhoc_test, selects, FleetFile, FleetTest, TestsOnly};
pub use kind::{Kind, UnknownKind};
pub use located::{from_toml, line_col, locate, Blame, ConfigError};
pub use target::{check_target, parse_ip, redact, stamp_host_port, HttpUrl};
pub use test::{
    check_link_options, check_option_values, check_path_options, check_stamp_options, check_test,
    defaults, is_interface_name, AgentContext, IpFamily, PathProtocol, Scheduling, TestConfig,
    TestOptions, DNS_RECORD_TYPES, MAX_SPEED_STREAMS,
};
pub use units::{parse_duration, parse_timezone};
