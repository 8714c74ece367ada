//! The edgeprobe agent: scheduled network tests, a durable result buffer and the uplink
//! to a collector. `main.rs` (with `commands.rs`) is the command line; everything else
//! lives here so that tests and benchmarks can drive the same code, a whole agent
//! included (`run::run(config, path, shutdown)`).
//!
//! Layout, in the order data flows (the only edge back is the collector's ack):
//! - `config`: the agent's file, parsed and checked once, then immutable; `fleet` holds
//!   the tests a collector pushed, checked against it.
//! - `schedule`: fires each test on its cron calendar or interval.
//! - `probe`: one run of one test, an `Outcome` whatever happens (`clock` says whether
//!   its start time can be trusted).
//! - `record`: the outcome as the wire `Result`, within the shared bounds.
//! - `buffer`: the durable result store; the only module that touches sled.
//! - `uplink`: ships the buffer to a collector and deletes what it acks.
//!
//! Around them: `run` wires and stops them in order, `report` renders outcomes and buffer
//! counters for people, and `target` is the `serve-target` speed target.
//!
//! Unsafe code is denied except in seven functions, each `#[allow(unsafe_code)]` with a
//! SAFETY comment: `clock::kernel_time_status` (adjtimex), `bytes_acked` and
//! `delivery_rate` in `probe::speed::conn` (getsockopt TCP_INFO), `errqueue::enable` and
//! `errqueue::read` in `probe::errqueue` (setsockopt of an int option: IP_RECVERR for the
//! icmp and path probes, IP_RECVTTL / IPV6_RECVHOPLIMIT for the STAMP reflector; recvmsg
//! MSG_ERRQUEUE), `recv` in `target::reflector` (recvmsg for the reflector's received
//! TTL) and `footprint::release_relocation_table` (madvise of the relocation table's
//! pages).
#![deny(unsafe_code)]

pub mod buffer;
pub mod clock;
pub mod config;
pub mod fleet;
pub mod footprint;
pub mod probe;
pub mod record;
pub mod report;
pub mod run;
pub mod schedule;
pub mod target;
pub mod uplink;
