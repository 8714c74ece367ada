//! The kinds of test (SPEC section 3), one enum for configs, JSON, the database, metrics
//! and the wire (`pb::Kind`, converted at the boundary).

use std::fmt;

use crate::v1 as pb;

/// The kinds of test an agent can run (SPEC section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Speed,
    Icmp,
    Tcp,
    Http,
    Dns,
    Path,
    Responsiveness,
    Stamp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Speed => "speed",
            Kind::Icmp => "icmp",
            Kind::Tcp => "tcp",
            Kind::Http => "http",
            Kind::Dns => "dns",
            Kind::Path => "path",
            Kind::Responsiveness => "responsiveness",
            Kind::Stamp => "stamp",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "speed" => Ok(Kind::Speed),
            "icmp" => Ok(Kind::Icmp),
            "tcp" => Ok(Kind::Tcp),
            "http" => Ok(Kind::Http),
            "dns" => Ok(Kind::Dns),
            "path" => Ok(Kind::Path),
            "responsiveness" => Ok(Kind::Responsiveness),
            "stamp" => Ok(Kind::Stamp),
            other => Err(format!(
                "unknown kind `{other}`, expected one of speed, icmp, tcp, http, dns, path, responsiveness, stamp"
            )),
        }
    }
}

impl Kind {
    /// Every kind, in the order of SPEC section 3.
    pub const ALL: [Kind; 8] = [
        Kind::Speed,
        Kind::Icmp,
        Kind::Tcp,
        Kind::Http,
        Kind::Dns,
        Kind::Path,
        Kind::Responsiveness,
        Kind::Stamp,
    ];
}

impl From<Kind> for pb::Kind {
    fn from(kind: Kind) -> pb::Kind {
        match kind {
            Kind::Speed => pb::Kind::Speed,
            Kind::Icmp => pb::Kind::Icmp,
            Kind::Tcp => pb::Kind::Tcp,
            Kind::Http => pb::Kind::Http,
            Kind::Dns => pb::Kind::Dns,
            Kind::Path => pb::Kind::Path,
            Kind::Responsiveness => pb::Kind::Responsiveness,
            Kind::Stamp => pb::Kind::Stamp,
        }
    }
}

/// A wire kind this version does not know (or `UNSPECIFIED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0}")]
pub struct UnknownKind(pub i32);

impl TryFrom<pb::Kind> for Kind {
    type Error = UnknownKind;
    fn try_from(kind: pb::Kind) -> Result<Kind, UnknownKind> {
        match kind {
            pb::Kind::Speed => Ok(Kind::Speed),
            pb::Kind::Icmp => Ok(Kind::Icmp),
            pb::Kind::Tcp => Ok(Kind::Tcp),
            pb::Kind::Http => Ok(Kind::Http),
            pb::Kind::Dns => Ok(Kind::Dns),
            pb::Kind::Path => Ok(Kind::Path),
            pb::Kind::Responsiveness => Ok(Kind::Responsiveness),
            pb::Kind::Stamp => Ok(Kind::Stamp),
            pb::Kind::Unspecified => Err(UnknownKind(kind as i32)),
        }
    }
}

impl TryFrom<i32> for Kind {
    type Error = UnknownKind;
    fn try_from(kind: i32) -> Result<Kind, UnknownKind> {
        pb::Kind::try_from(kind)
            .map_err(|_| UnknownKind(kind))
            .and_then(Kind::try_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_the_wire_and_its_name() {
        for kind in Kind::ALL {
            assert_eq!(Kind::try_from(pb::Kind::from(kind)), Ok(kind));
            assert_eq!(Kind::try_from(pb::Kind::from(kind) as i32), Ok(kind));
            assert_eq!(kind.name().parse::<Kind>(), Ok(kind));
        }
        assert_eq!(Kind::try_from(0), Err(UnknownKind(0)));
        assert_eq!(Kind::try_from(99), Err(UnknownKind(99)));
    }
}
