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
//!
//! Liveness (issue 28): every connection of the collector is bounded, so a server whose
//! host vanishes (power, uplink: no RST, no ICMP) is given up within seconds instead of
//! after the kernel's `tcp_retries2` (about 15 minutes). libpq's parameters are honoured
//! when the URL gives them (`connect_timeout`, `keepalives`, `keepalives_idle`,
//! `keepalives_interval`, `keepalives_count`, `tcp_user_timeout`); absent or 0, these
//! defaults apply:
//! - `connect_timeout=2` ([`CONNECT_TIMEOUT`]): per host, so a dead first host of a
//!   multi-host URL costs 2 s before the next is tried (two SYNs; Linux resends at 1 s).
//! - keepalives on, `keepalives_idle=5`, `keepalives_interval=2`, `keepalives_count=3`: an
//!   idle connection (a writer waiting for jobs, the controller's LISTEN, a COMMIT waiting
//!   for its reply) whose peer is gone is closed within 5 + 3 x 2 = 11 s. A probe every
//!   2 s after 5 s of silence is a few bytes per idle connection.
//! - `tcp_user_timeout=10` (TCP_USER_TIMEOUT): data sent and not acknowledged for 10 s
//!   closes the connection (a query to a host that vanished). Ten seconds is far above a
//!   live path's retransmissions and well inside the 30 s that ingest may stop in a
//!   failover; it also caps the keepalive probing above.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::{Host, SslMode as PgSslMode, TargetSessionAttrs};
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// `connect_timeout` when the URL gives none: per host (see the module's doc).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `keepalives_idle`, `keepalives_interval` and `keepalives_count` when the URL gives none.
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(5);
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(2);
pub const KEEPALIVES_COUNT: u32 = 3;
/// `tcp_user_timeout` when the URL gives none.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

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
            .map_err(|e| PgTlsError::Url(crate::pg::describe(&e)))?;
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
        bound_liveness(&mut config);
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(MakeRustlsConnect::new(client_config(mode, &params)?)),
        };
        Ok(Target { config, mode, tls })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The same target whose sessions cancel any statement running longer than `limit`
    /// (`statement_timeout`, sent in the startup packet's `options`), unless the URL's
    /// `options` set a `statement_timeout` of their own.
    pub fn with_statement_timeout(&self, limit: Duration) -> Target {
        self.with_setting("statement_timeout", &limit.as_millis().to_string())
    }

    /// The same target whose sessions start with the server setting `name = value` (sent
    /// in the startup packet's `options`), unless the URL's `options` set `name` themselves.
    pub fn with_setting(&self, name: &str, value: &str) -> Target {
        let mut t = self.clone();
        let options = t.config.get_options().unwrap_or("");
        if !options.contains(name) {
            let ours = format!("-c {name}={value}");
            t.config.options(match options.trim() {
                "" => ours,
                theirs => format!("{theirs} {ours}"),
            });
        }
        t
    }

    /// One target per host of the URL, in the URL's order, each named `host:port` (no
    /// credentials), with the same settings and `target_session_attrs=any`: the health
    /// check connects to each on its own, under its own bound, and judges writability
    /// itself.
    pub fn hosts(&self) -> Vec<(String, Target)> {
        let c = &self.config;
        let hosts = c.get_hosts();
        let addrs = c.get_hostaddrs();
        let ports = c.get_ports();
        let n = hosts.len().max(addrs.len());
        (0..n)
            .map(|i| {
                let mut one = tokio_postgres::Config::new();
                if let Some(user) = c.get_user() {
                    one.user(user);
                }
                if let Some(password) = c.get_password() {
                    one.password(password);
                }
                if let Some(db) = c.get_dbname() {
                    one.dbname(db);
                }
                if let Some(options) = c.get_options() {
                    one.options(options);
                }
                if let Some(name) = c.get_application_name() {
                    one.application_name(name);
                }
                one.ssl_mode(c.get_ssl_mode())
                    .ssl_negotiation(c.get_ssl_negotiation())
                    .channel_binding(c.get_channel_binding())
                    .keepalives(c.get_keepalives())
                    .keepalives_idle(c.get_keepalives_idle())
                    .target_session_attrs(TargetSessionAttrs::Any);
                if let Some(t) = c.get_connect_timeout() {
                    one.connect_timeout(*t);
                }
                if let Some(t) = c.get_tcp_user_timeout() {
                    one.tcp_user_timeout(*t);
                }
                if let Some(t) = c.get_keepalives_interval() {
                    one.keepalives_interval(t);
                }
                if let Some(n) = c.get_keepalives_retries() {
                    one.keepalives_retries(n);
                }
                let mut name = match hosts.get(i) {
                    Some(Host::Tcp(h)) => {
                        one.host(h);
                        h.clone()
                    }
                    Some(Host::Unix(p)) => {
                        one.host_path(p);
                        p.display().to_string()
                    }
                    None => String::new(),
                };
                if let Some(addr) = addrs.get(i) {
                    one.hostaddr(*addr);
                    if name.is_empty() {
                        name = addr.to_string();
                    }
                }
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                one.port(port);
                let name = match name.parse::<std::net::Ipv6Addr>() {
                    Ok(_) => format!("[{name}]:{port}"),
                    Err(_) => format!("{name}:{port}"),
                };
                (
                    name,
                    Target {
                        config: one,
                        mode: self.mode,
                        tls: self.tls.clone(),
                    },
                )
            })
            .collect()
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
                tracing::debug!("postgres connection ended: {}", crate::pg::describe(&e));
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

/// The liveness defaults (see the module's doc) where the URL gave none. tokio-postgres
/// has parsed what it gave: `connect_timeout`, `tcp_user_timeout`, `keepalives_interval`
/// and `keepalives_count` are unset when absent (or 0), `keepalives_idle` is its own
/// default of two hours.
fn bound_liveness(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_keepalives_idle() == tokio_postgres::Config::new().get_keepalives_idle() {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVES_COUNT);
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
                tracing::debug!("postgres connection ended: {}", crate::pg::describe(&e));
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
        return Ok((keyword_renamed(url), params));
    };
    let mut kept = Vec::new();
    let mut renamed = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| PgTlsError::Url(format!("`{k}` is not valid UTF-8")))
        };
        let slot = match decode(k)?.as_str() {
            // libpq's name; tokio-postgres calls it keepalives_retries.
            "keepalives_count" => {
                renamed.push(format!("keepalives_retries={v}"));
                continue;
            }
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
    let kept: Vec<&str> = kept
        .into_iter()
        .chain(renamed.iter().map(String::as_str))
        .collect();
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

/// libpq's `keepalives_count` in the `key=value` form, under tokio-postgres's name.
fn keyword_renamed(s: &str) -> String {
    const KEY: &str = "keepalives_count";
    let mut out = String::with_capacity(s.len());
    let mut from = 0;
    for (at, _) in s.match_indices(KEY) {
        let starts = s[..at].chars().next_back().is_none_or(char::is_whitespace);
        let assigns = s[at + KEY.len()..].trim_start().starts_with('=');
        if starts && assigns {
            out.push_str(&s[from..at]);
            out.push_str("keepalives_retries");
            from = at + KEY.len();
        }
    }
    out.push_str(&s[from..]);
    out
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
    fn liveness_is_bounded_by_default_and_the_url_wins() {
        let t = Target::parse("postgres://u@h1,h2/db?target_session_attrs=read-write").unwrap();
        let c = &t.config;
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(c.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(c.get_keepalives_retries(), Some(KEEPALIVES_COUNT));

        let t = Target::parse(
            "postgres://u@h/db?connect_timeout=7&tcp_user_timeout=30&keepalives_idle=60&keepalives_interval=9&keepalives_count=4",
        )
        .unwrap();
        let c = &t.config;
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(9)));
        assert_eq!(c.get_keepalives_retries(), Some(4));
        assert!(!Target::parse("postgres://u@h/db?keepalives=0")
            .unwrap()
            .config
            .get_keepalives());

        let t = Target::parse("host=h user=u keepalives_count=6 tcp_user_timeout=20").unwrap();
        assert_eq!(t.config.get_keepalives_retries(), Some(6));
        assert_eq!(
            t.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(20))
        );
        assert_eq!(
            keyword_renamed("application_name=my_keepalives_count keepalives_count =2"),
            "application_name=my_keepalives_count keepalives_retries =2"
        );
    }

    #[test]
    fn hosts_are_split_for_the_health_check() {
        let t = Target::parse(
            "postgres://u:pw@10.0.0.1:5441,db2,[::1]:5443/edgeprobe?target_session_attrs=read-write&options=-c%20work_mem%3D4MB",
        )
        .unwrap()
        .with_statement_timeout(Duration::from_secs(20))
        .with_setting("enable_seqscan", "off");
        assert_eq!(
            t.config.get_options(),
            Some("-c work_mem=4MB -c statement_timeout=20000 -c enable_seqscan=off")
        );
        let hosts = t.hosts();
        let names: Vec<&str> = hosts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["10.0.0.1:5441", "db2:5432", "[::1]:5443"]);
        let (_, one) = &hosts[1];
        assert_eq!(one.config.get_hosts(), [Host::Tcp("db2".into())]);
        assert_eq!(one.config.get_ports(), [5432]);
        assert_eq!(one.config.get_password(), Some(&b"pw"[..]));
        assert_eq!(one.config.get_dbname(), Some("edgeprobe"));
        assert_eq!(
            one.config.get_target_session_attrs(),
            TargetSessionAttrs::Any
        );
        assert_eq!(one.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(one.config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(one.config.get_keepalives_retries(), Some(KEEPALIVES_COUNT));
        // The URL's own statement_timeout stands.
        let t = Target::parse("postgres://u@h/db?options=-c%20statement_timeout%3D5s")
            .unwrap()
            .with_statement_timeout(Duration::from_secs(20));
        assert_eq!(t.config.get_options(), Some("-c statement_timeout=5s"));
        let t = Target::parse("postgres://u@h/db?options=-c%20enable_seqscan%3Don")
            .unwrap()
            .with_setting("enable_seqscan", "off");
        assert_eq!(t.config.get_options(), Some("-c enable_seqscan=on"));
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
