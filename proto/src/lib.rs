//! The edgeprobe.v1 wire protocol, generated from `proto/edgeprobe/v1/edgeprobe.proto`
//! by `build.rs` (protoc from the `protobuf-compiler` package).
//!
//! This crate holds the wire types shared by agent and collector, and `bounds`: the limits
//! on what an agent sends, checked by `edgeprobe-agent check`, by the agent when it
//! records and by the collector. Domain types live in each binary, at its boundary.

pub mod bounds;

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("edgeprobe.v1");

    impl Kind {
        /// The lowercase name used in configs, JSON output, the database and metrics.
        pub fn name(self) -> &'static str {
            match self {
                Kind::Unspecified => "unspecified",
                Kind::Speed => "speed",
                Kind::Icmp => "icmp",
                Kind::Tcp => "tcp",
                Kind::Http => "http",
                Kind::Dns => "dns",
            }
        }
    }
}

/// Version of the agent/collector protocol carried in `Hello.version` alongside the build version.
pub const PROTOCOL: &str = "edgeprobe.v1";

/// Controller feature in `Hello.features` / `Welcome.features`: FleetTests / TestsApplied.
pub const FEATURE_FLEET_TESTS: &str = "fleet-tests";
/// Controller feature in `Hello.features` / `Welcome.features`: RunNow / RunStatus, and
/// `Result.run_id`.
pub const FEATURE_RUN_NOW: &str = "run-now";
