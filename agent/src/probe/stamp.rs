//! STAMP probe (SPEC section 17). Placeholder of the base branch: the Session-Sender
//! lands with the `stamp` kind.

use super::{ErrorClass, Fields, Measured, Partial, ProbeError, ProbeSpec, StampFields};

pub async fn run(_spec: &ProbeSpec, _partial: &Partial) -> Measured {
    (
        Fields::Stamp(StampFields::default()),
        Some(ProbeError::new(
            ErrorClass::Local,
            "stamp probe not built yet",
        )),
    )
}
