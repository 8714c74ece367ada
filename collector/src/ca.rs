//! The fleet CA: `ca init` and `cert issue`, so an operator needs no openssl recipe.
//!
//! One self-signed ECDSA P-256 CA (10 years, path length 0) signs three kinds of leaf:
//! agent certificates (client-auth EKU only, CN = agent id: the collector takes the agent's
//! identity from it), collector certificates (server-auth EKU only, the name and every
//! `--san` as subject alternative names) and operator certificates for the HTTP API
//! (client-auth EKU only, CN = the operator's name and the URI SAN
//! `urn:edgeprobe:operator:NAME`, the role marker `identity::operator_of` reads). The EKUs
//! keep servers and clients apart: a collector's certificate cannot log in as an agent or
//! an operator and an agent's cannot serve as the collector; the URI SAN keeps agents and
//! operators apart (the API refuses a certificate without it, the ingest one with it).
//!
//! Invariants: private keys are created 0600 and never overwritten without `--force`; the
//! CA is never overwritten at all; with `--force` a new pair replaces the old one by rename,
//! so a collector reloading its files sees the old pair or the new one, never half a file.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CA_DAYS: i64 = 3650;
/// The CA/Browser Forum's ceiling for public leaf certificates; a sane default here too.
pub const LEAF_DAYS: i64 = 397;
pub const MAX_LEAF_DAYS: i64 = 825;
/// Backdating absorbs clock skew between the issuing host and the fleet.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Bad arguments: exit code 2.
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Cert { what: String, source: rcgen::Error },
}

impl CaError {
    pub fn is_usage(&self) -> bool {
        matches!(self, CaError::Usage(_))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |source| CaError::Cert {
        what: what.to_string(),
        source,
    }
}

/// The kind of leaf certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Server,
    Operator,
}

impl Role {
    pub fn describe(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Server => "collector",
            Role::Operator => "operator",
        }
    }
}

/// What `cert issue` is asked for.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub ca_dir: PathBuf,
    pub name: String,
    pub out: PathBuf,
    pub role: Role,
    pub sans: Vec<String>,
    pub days: i64,
    pub force: bool,
}

/// Files written by `init` or `issue`.
#[derive(Debug)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: OffsetDateTime,
}

/// Creates `dir` (0700 when it is new) with a new CA; refuses if a CA is there already.
pub fn init(dir: &Path) -> Result<Written, CaError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CaError::Usage(format!(
                "{} exists: refusing to overwrite a CA (every certificate it signed depends on it)",
                p.display()
            )));
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err("key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "edgeprobe");
    dn.push(DnType::CommonName, "edgeprobe fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(CA_DAYS);
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key).map_err(cert_err("CA"))?;

    // Key first: a CA certificate without its key would block a retry of `init`.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
        not_after: params.not_after,
    })
}

/// Issues an agent, collector or operator certificate signed by the CA in `req.ca_dir`.
pub fn issue(req: &IssueRequest) -> Result<Written, CaError> {
    check_name(&req.name).map_err(|e| match (e, &req.role) {
        (CaError::Usage(m), Role::Operator) => {
            CaError::Usage(m.replacen("--name", "--operator", 1))
        }
        (e, _) => e,
    })?;
    if !(1..=MAX_LEAF_DAYS).contains(&req.days) {
        return Err(CaError::Usage(format!(
            "--days must be 1..={MAX_LEAF_DAYS}"
        )));
    }
    let mut sans = Vec::new();
    if req.role == Role::Server {
        for name in std::iter::once(&req.name).chain(&req.sans) {
            let san = san(name)?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
    } else if !req.sans.is_empty() {
        return Err(CaError::Usage(
            "--san applies to --server certificates; an agent or operator is named by its name alone".into(),
        ));
    }
    if req.role == Role::Operator {
        let urn = format!("{}{}", crate::identity::OPERATOR_URN, req.name);
        sans.push(SanType::URI(urn.as_str().try_into().map_err(|e| {
            CaError::Usage(format!("`{}`: {e}", req.name.escape_debug()))
        })?));
    }

    let ca_cert_path = req.ca_dir.join(CA_CERT);
    let ca_key_path = req.ca_dir.join(CA_KEY);
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let mode = fs::metadata(&ca_key_path)
        .map_err(io(&ca_key_path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %ca_key_path.display(), mode = format!("{:o}", mode & 0o777), "the CA key is readable by others; chmod 600 it");
    }
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(cert_err("CA certificate"))?;

    let cert_path = req.out.join(format!("{}.pem", req.name));
    let key_path = req.out.join(format!("{}.key", req.name));
    if !req.force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CaError::Usage(format!(
                    "{} exists; pass --force to replace it",
                    p.display()
                )));
            }
        }
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err("key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.name.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if req.role == Role::Server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(req.days);
    params.serial_number = Some(serial());
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(cert_err("certificate"))?;

    fs::create_dir_all(&req.out).map_err(io(&req.out))?;
    if req.force {
        replace(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        replace(&cert_path, cert.pem().as_bytes(), 0o644)?;
    } else {
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    }
    Ok(Written {
        cert: cert_path,
        key: key_path,
        not_after: params.not_after,
    })
}

/// Names become file names and certificate identities: a conservative alphabet, no path
/// tricks. Agent ids outside it (spaces, slashes) cannot get a certificate.
fn check_name(name: &str) -> Result<(), CaError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if ok {
        Ok(())
    } else {
        Err(CaError::Usage(format!(
            "--name `{}`: use 1..=128 of A-Z a-z 0-9 . - _ @, not starting with . or -",
            name.escape_debug()
        )))
    }
}

fn san(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || (i == 0 && label == "*"))
        });
    if !valid {
        return Err(CaError::Usage(format!(
            "`{}` is neither an IP address nor a DNS name",
            name.escape_debug()
        )));
    }
    Ok(SanType::DnsName(
        name.try_into()
            .map_err(|e| CaError::Usage(format!("`{name}`: {e}")))?,
    ))
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets).
fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    // The umask may have taken bits away from a 0644 certificate; set the mode exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Atomic replacement: a temp file in the same directory, then rename over the old one.
fn replace(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, data, mode)?;
    fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sans() {
        for good in ["branch-042", "a", "agent_1@site.example", "A.b-C"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(matches!(san("10.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("::1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(
            san("collector.example.net"),
            Ok(SanType::DnsName(_))
        ));
        assert!(matches!(san("*.example.net"), Ok(SanType::DnsName(_))));
        for bad in ["", "a..b", "-a.b", "a b", "a.*", "x_y.z"] {
            assert!(san(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn init_then_issue_with_modes_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca), 0o700);
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca.join(CA_CERT)), 0o644);
        assert!(init(&ca).unwrap_err().is_usage());

        let out = dir.path().join("out");
        let mut req = IssueRequest {
            ca_dir: ca.clone(),
            name: "branch-042".into(),
            out: out.clone(),
            role: Role::Agent,
            sans: vec![],
            days: LEAF_DAYS,
            force: false,
        };
        let w = issue(&req).unwrap();
        assert_eq!(mode(&w.key), 0o600);
        assert_eq!(mode(&w.cert), 0o644);
        let first = fs::read(&w.cert).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&first)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(
            crate::identity::agent_id_of(&der).as_deref(),
            Some("branch-042")
        );
        assert!(issue(&req).unwrap_err().is_usage());
        req.force = true;
        issue(&req).unwrap();
        assert_ne!(fs::read(&w.cert).unwrap(), first, "--force replaced it");
        assert_eq!(mode(&w.key), 0o600);

        req.sans = vec!["x".into()];
        assert!(issue(&req).unwrap_err().is_usage(), "--san needs --server");
        req.role = Role::Operator;
        assert!(
            issue(&req).unwrap_err().is_usage(),
            "no --san for an operator"
        );
        req.sans.clear();
        req.name = "alice".into();
        let w = issue(&req).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_file(&w.cert)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(
            crate::identity::operator_of(&der),
            crate::identity::Operator::Named("alice".into())
        );
        // An agent's certificate carries no operator role.
        let agent = rustls::pki_types::pem::PemObject::from_pem_slice(&first)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(
            crate::identity::operator_of(&agent),
            crate::identity::Operator::None
        );
        req.role = Role::Server;
        req.name = "collector.example.net".into();
        req.sans = vec!["127.0.0.1".into(), "localhost".into()];
        issue(&req).unwrap();
        req.days = 0;
        assert!(issue(&req).unwrap_err().is_usage());
    }
}
