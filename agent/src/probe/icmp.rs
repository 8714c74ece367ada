//! icmp probe (built in the probe-suite issue).

use std::time::Duration;

use super::{empty_fields, ErrorClass, Measured, ProbeError, ProbeSpec};

pub const DEFAULT_COUNT: u32 = 5;
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(spec: &ProbeSpec) -> Measured {
    (
        empty_fields(spec.kind),
        Some(ProbeError::new(
            ErrorClass::Local,
            "icmp probe not built yet",
        )),
    )
}
