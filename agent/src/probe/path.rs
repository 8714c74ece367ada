//! Path probe (SPEC section 15). Placeholder of the base branch: the probe loop lands
//! with the `path` kind.

use super::{ErrorClass, Fields, Measured, Partial, PathFields, ProbeError, ProbeSpec};

pub async fn run(_spec: &ProbeSpec, _partial: &Partial) -> Measured {
    (
        Fields::Path(PathFields::default()),
        Some(ProbeError::new(
            ErrorClass::Local,
            "path probe not built yet",
        )),
    )
}
