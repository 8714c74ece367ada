//! TLS to PostgreSQL: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, read from
//! the database URL, on rustls through `tokio-postgres-rustls` (the rustls connector the
//! tokio-postgres documentation points to; no OpenSSL). tokio-postgres parses `sslmode`
//! itself but knows only disable/prefer/require and none of the file parameters, so
//! [`Target::parse`] takes these four out of the URL and hands the rest to it.
//!
//! Invariants:
//! - The modes mean what they mean to libpq. `disable`: plaintext. `prefer` (the default
//!   when the URL names none, as in libpq): TLS when the server offers it, without
//!   checking its certificate, else plaintext. `require`: TLS or no connection; the
//!   certificate is not checked unless `sslrootcert` is given, which makes it `verify-ca`
//!   (libpq does the same). `verify-ca`: the server's chain must end at a CA of
//!   `sslrootcert`. `verify-full`: that, and the certificate must name the host of the
//!   URL (a DNS name, or an IP address SAN). `allow` is refused: it would fall back to
//!   plaintext in the one case TLS was asked for.
//! - `verify-ca` and `verify-full` need `sslrootcert` (a PEM file, or `system` for the
//!   Mozilla roots compiled in); libpq's `~/.postgresql/` defaults are not read, so what
//!   is trusted is always written in the URL. `sslcert` and `sslkey` (PEM) go together.
//! - The files are read once, when the URL is parsed: a missing or unreadable file is an
//!   error at start-up (exit 2), never a writer retrying forever. Replacing them needs a
//!   restart.
//! - Errors name the parameter and the file, never the URL (it may carry a password). A
//!   server certificate not issued by `sslrootcert` says so in plain words.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values that edgeprobe supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("database url: {0}")]
    Url(String),
    #[error("database url: {param}={path}: {reason}")]
    File {
        param: &'static str,
        path: String,
        reason: String,
    },
}

/// A parsed database URL with its TLS settings and files loaded; cheap to clone.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    mode: SslMode,
    tls: Option<MakeRustlsConnect>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config holds the password: name the mode only.
        f.debug_struct("Target").field("mode", &self.mode).finish()
    }
}

/// The TLS parameters taken out of a URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct Params {
    mode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl Target {
    /// Parses `url` (a `postgres://` URL, or libpq's `key=value` form without the file
    /// parameters) and loads the files it names.
    pub fn parse(url: &str) -> Result<Target, PgTlsError> {
        let (rest, params) = split_params(url)?;
        let mut config = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| PgTlsError::Url(crate::store::describe(&e)))?;
        let mode =
            match params.mode.as_deref() {
                None => match config.get_ssl_mode() {
                    PgSslMode::Disable => SslMode::Disable,
                    PgSslMode::Require => SslMode::Require,
                    _ => SslMode::Prefer,
                },
                Some("disable") => SslMode::Disable,
                Some("prefer") => SslMode::Prefer,
                Some("require") => SslMode::Require,
                Some("verify-ca") => SslMode::VerifyCa,
                Some("verify-full") => SslMode::VerifyFull,
                Some("allow") => return Err(PgTlsError::Url(
                    "sslmode=allow is not supported: use prefer, require, verify-ca or verify-full"
                        .into(),
                )),
                Some(other) => {
                    return Err(PgTlsError::Url(format!(
                "unknown sslmode `{other}`: use disable, prefer, require, verify-ca or verify-full"
            )))
                }
            };
        // A CA given with `require` is checked, as libpq does.
        let mode = if mode == SslMode::Require && params.rootcert.is_some() {
            SslMode::VerifyCa
        } else {
            mode
        };
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(MakeRustlsConnect::new(client_config(mode, &params)?)),
        };
        Ok(Target { config, mode, tls })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// True when a host of the URL is not this machine and the mode does not check the
    /// server's certificate: a man in the middle could pose as the database.
    pub fn unverified_remote(&self) -> bool {
        let local = |h: &Host| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        !matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull)
            && !self.config.get_hosts().iter().all(local)
    }

    /// Connects; the connection task runs until the client is dropped.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        fn ended(r: Result<(), tokio_postgres::Error>) {
            if let Err(e) = r {
                tracing::debug!("postgres connection ended: {}", crate::store::describe(&e));
            }
        }
        match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(async move { ended(connection.await) });
                Ok(client)
            }
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                tokio::spawn(async move { ended(connection.await) });
                Ok(client)
            }
        }
    }
}

impl Target {
    /// Connects, and hands on the server's notifications (LISTEN) through the receiver;
    /// it closes when the connection ends.
    pub async fn connect_notifying(
        &self,
    ) -> Result<
        (
            Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        ),
        tokio_postgres::Error,
    > {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(forward_notifications(connection, tx));
                client
            }
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                tokio::spawn(forward_notifications(connection, tx));
                client
            }
        };
        Ok((client, rx))
    }
}

async fn forward_notifications<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(m) = futures::StreamExt::next(&mut messages).await {
        match m {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                let _ = tx.send(n);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("postgres connection ended: {}", crate::store::describe(&e));
                return;
            }
        }
    }
}

/// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of a URL's query and returns
/// the URL without them. A `key=value` string is returned as it is (tokio-postgres reads
/// its `sslmode`; the file parameters are URL-only and it refuses them by name).
fn split_params(url: &str) -> Result<(String, Params), PgTlsError> {
    let mut params = Params::default();
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_string(), params));
    };
    let mut kept = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| PgTlsError::Url(format!("`{k}` is not valid UTF-8")))
        };
        let slot = match decode(k)?.as_str() {
            "sslmode" => &mut params.mode,
            "sslrootcert" => &mut params.rootcert,
            "sslcert" => &mut params.cert,
            "sslkey" => &mut params.key,
            _ => {
                kept.push(part);
                continue;
            }
        };
        *slot = Some(decode(v)?);
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(mode: SslMode, params: &Params) -> Result<ClientConfig, PgTlsError> {
    let provider = provider();
    let roots = match (&params.rootcert, mode) {
        (Some(path), _) => Some((path.clone(), Arc::new(roots(path)?))),
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(PgTlsError::Url(format!(
                "sslmode={} needs sslrootcert: the PEM file of the CA that issued the server's certificate (or `system` for the public web CAs)",
                mode.name()
            )))
        }
        (None, _) => None,
    };
    let verifier = match roots {
        None => Verifier::Unchecked(provider.clone()),
        Some((path, roots)) => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| PgTlsError::File {
                    param: "sslrootcert",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            Verifier::Checked {
                inner,
                names: mode == SslMode::VerifyFull,
                rootcert: path,
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgTlsError::Url(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    match (&params.cert, &params.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = read_certs("sslcert", cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| PgTlsError::File {
                param: "sslkey",
                path: key.clone(),
                reason: format!("no PEM private key ({e})"),
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| PgTlsError::File {
                    param: "sslkey",
                    path: key.clone(),
                    reason: format!("does not go with sslcert: {e}"),
                })
        }
        (Some(_), None) | (None, Some(_)) => Err(PgTlsError::Url(
            "sslcert and sslkey go together: give both or neither".into(),
        )),
    }
}

fn roots(path: &str) -> Result<RootCertStore, PgTlsError> {
    if path == "system" {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    }
    let mut store = RootCertStore::empty();
    for cert in read_certs("sslrootcert", path)? {
        store.add(cert).map_err(|e| PgTlsError::File {
            param: "sslrootcert",
            path: path.to_string(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(store)
}

fn read_certs(param: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, PgTlsError> {
    let err = |reason: String| PgTlsError::File {
        param,
        path: path.to_string(),
        reason,
    };
    let pem = std::fs::read(Path::new(path)).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// How the server's certificate is judged.
#[derive(Debug)]
enum Verifier {
    /// `prefer` and `require` without a CA: encrypted, the peer not authenticated (the
    /// handshake signature is still checked, so the server holds the certificate's key).
    Unchecked(Arc<CryptoProvider>),
    /// `verify-ca` (names false) and `verify-full`.
    Checked {
        inner: Arc<WebPkiServerVerifier>,
        names: bool,
        rootcert: String,
    },
}

/// A refusal worded for the operator; rustls shows it after "invalid peer certificate".
#[derive(Debug)]
struct Refusal(String);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Verifier::Checked {
            inner,
            names,
            rootcert,
        } = self
        else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(v) => Ok(v),
            // webpki checks the chain before the name: a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !names => Ok(ServerCertVerified::assertion()),
            // BadSignature: a CA of the same name (another `ca init`) that did not sign it.
            Err(rustls::Error::InvalidCertificate(
                why @ (CertificateError::UnknownIssuer | CertificateError::BadSignature),
            )) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(Refusal(format!(
                    "the server's certificate is not issued by a CA in sslrootcert={rootcert} ({why:?})"
                )))),
            ))),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self {
            Verifier::Unchecked(p) => {
                verify_tls12_signature(message, cert, dss, &p.signature_verification_algorithms)
            }
            Verifier::Checked { inner, .. } => inner.verify_tls12_signature(message, cert, dss),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self {
            Verifier::Unchecked(p) => {
                verify_tls13_signature(message, cert, dss, &p.signature_verification_algorithms)
            }
            Verifier::Checked { inner, .. } => inner.verify_tls13_signature(message, cert, dss),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match self {
            Verifier::Unchecked(p) => p.signature_verification_algorithms.supported_schemes(),
            Verifier::Checked { inner, .. } => inner.supported_verify_schemes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_tls_parameters_out_of_the_url() {
        let (rest, p) = split_params(
            "postgres://u:p%3Fw@h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@h1:5432,h2:5433/db?target_session_attrs=read-write&connect_timeout=5"
        );
        assert_eq!(
            p,
            Params {
                mode: Some("verify-full".into()),
                rootcert: Some("/etc/ca.pem".into()),
                cert: Some("/c.pem".into()),
                key: Some("/k.pem".into()),
            }
        );
        let (rest, p) = split_params("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(p.mode.as_deref(), Some("require"));
        let (rest, p) = split_params("host=h dbname=d sslmode=require").unwrap();
        assert_eq!(rest, "host=h dbname=d sslmode=require");
        assert_eq!(p, Params::default());
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |url: &str| Target::parse(url).map(|t| t.mode());
        assert_eq!(mode("postgres://u@h/db").unwrap(), SslMode::Prefer);
        assert_eq!(
            mode("postgres://u@h/db?sslmode=disable").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://u@h/db?sslmode=require").unwrap(),
            SslMode::Require
        );
        assert_eq!(
            mode("host=h user=u sslmode=require").unwrap(),
            SslMode::Require
        );
        let e = mode("postgres://u:secret@h/db?sslmode=verify-full")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=verify-full needs sslrootcert"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = mode("postgres://u@h/db?sslmode=allow")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=allow is not supported"), "{e}");
        let e = mode("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sslrootcert=/nonexistent/ca.pem: cannot read"),
            "{e}"
        );
        let e = mode("postgres://u@h/db?sslmode=require&sslcert=/c.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslcert and sslkey go together"), "{e}");
        assert_eq!(
            mode("postgres://u@h/db?sslmode=verify-full&sslrootcert=system").unwrap(),
            SslMode::VerifyFull
        );
        let remote = |url: &str| Target::parse(url).unwrap().unverified_remote();
        assert!(remote("postgres://u@db.example.net/db?sslmode=require"));
        assert!(remote("postgres://u@127.0.0.1,db.example.net/db"));
        assert!(!remote("postgres://u@127.0.0.1:5432,localhost:5433/db"));
        assert!(!remote("postgres://u@[::1]/db?sslmode=disable"));
        assert!(!remote(
            "postgres://u@db.example.net/db?sslmode=verify-full&sslrootcert=system"
        ));
    }
}
