//! The edgeprobe.v1 wire protocol, generated from `proto/edgeprobe/v1/edgeprobe.proto`
//! by `build.rs` (protoc from the `protobuf-compiler` package).
//!
//! This crate holds what agent and collector share: the wire types, `bounds` (the limits
//! on what an agent sends, checked by `edgeprobe-agent check`, by the agent when it
//! records and by the collector), `testdef`, the test definition both sides parse,
//! check, store and run, `identity`, the agent id a certificate carries, and the protocol's named constants (features, refusal reasons).
//! Everything else lives in each binary, at its boundary.

pub mod bounds;
pub mod identity;
pub mod testdef;

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("edgeprobe.v1");
}

/// Version of the agent/collector protocol carried in `Hello.version` alongside the build version.
pub const PROTOCOL: &str = "edgeprobe.v1";

/// Controller feature in `Hello.features` / `Welcome.features`: FleetTests / TestsApplied.
pub const FEATURE_FLEET_TESTS: &str = "fleet-tests";
/// Controller feature in `Hello.features` / `Welcome.features`: RunNow / RunStatus, and
/// `Result.run_id`.
pub const FEATURE_RUN_NOW: &str = "run-now";

/// Status metadata key (ASCII) naming why the collector refused a session, beside the
/// status code and its human message. Agents match the value, never the message.
pub const REASON_KEY: &str = "edgeprobe-reason";
/// `REASON_KEY` value on the FAILED_PRECONDITION that refuses a hello because another
/// incarnation of its agent id is connected (two hosts share the id, e.g. a cloned image).
pub const REASON_IDENTITY_CONFLICT: &str = "identity-conflict";
/// `REASON_KEY` value on the UNAVAILABLE that ends every session of a collector stopping
/// on SIGTERM (after its committed batches were acked): the agent reconnects at once,
/// with its `reconnect_spread`, rather than taking it for a failure.
pub const REASON_SHUTDOWN: &str = "shutdown";
