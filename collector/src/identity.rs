//! Identities carried by client certificates of the fleet CA.
//!
//! An agent is named by the subject's common name, or else the first DNS subject
//! alternative name; the ingest service compares it with the id an agent claims. An
//! operator (a person or script using the HTTP API, `api.rs`) has a certificate from
//! `cert issue --operator NAME`: CN = NAME and the URI subject alternative name
//! `urn:edgeprobe:operator:NAME` (`OPERATOR_URN`), the role marker no agent certificate
//! carries. The API admits only certificates with the marker; the ingest refuses them.

use x509_parser::extensions::GeneralName;

/// The prefix of an operator certificate's URI SAN; the operator's name follows it.
pub const OPERATOR_URN: &str = "urn:edgeprobe:operator:";

/// The agent id of a certificate: the one rule both binaries read it by.
pub use edgeprobe_proto::identity::agent_id_of;

/// What a client certificate says about an operator role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// No operator marker: an agent's (or any other) certificate.
    None,
    /// The marker, and the common name agrees with it: the operator's name.
    Named(String),
    /// A marker that does not match the common name (or several markers): not trusted.
    Inconsistent(String),
}

/// The operator role of a client certificate (DER).
pub fn operator_of(der: &[u8]) -> Operator {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Operator::None;
    };
    let names: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => u.strip_prefix(OPERATOR_URN),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        // A certificate whose SAN extension does not parse (or appears twice) cannot be
        // taken for an agent's either; call it inconsistent so both sides refuse it.
        Err(e) => {
            return Operator::Inconsistent(format!("unreadable subject alternative names: {e}"))
        }
    };
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    match (names.as_slice(), cn) {
        ([], _) => Operator::None,
        ([name], Some(cn)) if *name == cn && !name.is_empty() => Operator::Named(cn.to_string()),
        ([name], cn) => Operator::Inconsistent(format!(
            "the operator marker names `{}` but the common name is `{}`",
            name.escape_debug(),
            cn.unwrap_or("").escape_debug()
        )),
        _ => Operator::Inconsistent("several operator markers".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_operator_marker_must_agree_with_the_common_name() {
        assert_eq!(operator_of(&cert(Some("branch-042"), &[])), Operator::None);
        assert_eq!(
            operator_of(&cert(Some("x"), &["https://example.net/"])),
            Operator::None
        );
        assert_eq!(
            operator_of(&cert(Some("alice"), &["urn:edgeprobe:operator:alice"])),
            Operator::Named("alice".into())
        );
        for bad in [
            cert(Some("mallory"), &["urn:edgeprobe:operator:alice"]),
            cert(None, &["urn:edgeprobe:operator:alice"]),
            cert(Some(""), &["urn:edgeprobe:operator:"]),
            cert(
                Some("alice"),
                &["urn:edgeprobe:operator:alice", "urn:edgeprobe:operator:bob"],
            ),
        ] {
            assert!(
                matches!(operator_of(&bad), Operator::Inconsistent(_)),
                "{:?}",
                operator_of(&bad)
            );
        }
        assert_eq!(operator_of(b"not a certificate"), Operator::None);
    }
}
