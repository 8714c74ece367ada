//! Responsiveness probe (SPEC section 16). Placeholder of the base branch: the probe
//! lands with the `responsiveness` kind.

use super::{ErrorClass, Fields, Measured, Partial, ProbeError, ProbeSpec, ResponsivenessFields};

pub async fn run(_spec: &ProbeSpec, _partial: &Partial) -> Measured {
    (
        Fields::Responsiveness(ResponsivenessFields::default()),
        Some(ProbeError::new(
            ErrorClass::Local,
            "responsiveness probe not built yet",
        )),
    )
}
