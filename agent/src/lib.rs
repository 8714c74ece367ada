//! The edgeprobe agent: scheduled network tests, a durable result buffer and the uplink
//! to a collector. `main.rs` is the command line; everything else lives here so that
//! benchmarks can drive the same code.
// Unsafe code is allowed in exactly one function, `clock::kernel_synchronised` (adjtimex).
#![deny(unsafe_code)]

pub mod buffer;
pub mod clock;
pub mod config;
pub mod fleet;
pub mod probe;
pub mod record;
pub mod report;
pub mod run;
pub mod schedule;
pub mod target;
pub mod uplink;
