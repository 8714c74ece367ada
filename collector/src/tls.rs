//! The collector's TLS: a rustls server config built from the three files of `[server]`
//! (`tls_cert`, `tls_key`, `client_ca`), reloaded without a restart (SIGHUP, or the files
//! changing on disk), and the loop that handshakes each connection the accept thread
//! (`listen.rs`) hands over with whichever config is current before handing it to tonic.
//!
//! Invariants: TLS 1.3 only, ALPN h2, no session resumption (every connection verifies its
//! certificate afresh, so a rotated CA or an expired certificate counts at once). Every
//! connection presents a client certificate that chains to `client_ca`, is within its
//! validity and (when it lists EKUs) allows client auth. A reload swaps the config only when
//! all three files parse and the key matches the certificate; otherwise the old config
//! stays, and the error is logged and counted. Handshakes run off the accept loop (which
//! never waits for them, `listen.rs`), each within a timeout, at most `MAX_HANDSHAKES` at
//! once, so a slow or silent client delays nobody. Connections already open keep the
//! config they were accepted with. The operators' API (`api.rs`) takes the same config with
//! ALPN http/1.1 (`api_config`), so it is reloaded with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::listen::Accepted;
use crate::metrics::Metrics;

/// TLS handshakes in progress at most; further accepted connections wait for a slot.
const MAX_HANDSHAKES: usize = 1024;

/// The files the config is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

struct Loaded {
    config: Arc<ServerConfig>,
    /// The same config for the operators' HTTP API (`api.rs`): ALPN http/1.1 instead of h2.
    api: Arc<ServerConfig>,
    /// The files' bytes the config was built from: a reload with equal bytes is a no-op.
    contents: Vec<u8>,
}

impl Loaded {
    fn new(config: ServerConfig, contents: Vec<u8>) -> Loaded {
        let mut api = config.clone();
        api.alpn_protocols = vec![b"http/1.1".to_vec()];
        Loaded {
            config: Arc::new(config),
            api: Arc::new(api),
            contents,
        }
    }
}

/// The current server config and how to renew it.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Loaded>,
    /// Bytes of the last set of files that failed, so polling reports a bad file once.
    last_failed: Mutex<Option<Vec<u8>>>,
    metrics: Arc<Metrics>,
}

impl ServerTls {
    /// Loads the files; an error here is a startup error.
    pub fn load(files: TlsFiles, metrics: Arc<Metrics>) -> Result<Arc<ServerTls>, TlsError> {
        let contents = read_all(&files)?;
        let (config, not_after) = build(&files, &contents)?;
        metrics.tls_cert_expiry.set(not_after);
        Ok(Arc::new(ServerTls {
            files,
            current: RwLock::new(Loaded::new(config, contents)),
            last_failed: Mutex::new(None),
            metrics,
        }))
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .clone()
    }

    /// The config of the HTTP API's listener: the same files, ALPN http/1.1.
    pub fn api_config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .api
            .clone()
    }

    /// Rereads the files and swaps the config when they changed and are good. `Ok(true)`
    /// when swapped, `Ok(false)` when unchanged (or, unless `retry_failed`, the same bad
    /// files as last time).
    pub fn reload(&self, retry_failed: bool) -> Result<bool, TlsError> {
        let contents = read_all(&self.files)?;
        if self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contents
            == contents
        {
            return Ok(false);
        }
        let mut last_failed = self.last_failed.lock().unwrap_or_else(|e| e.into_inner());
        if !retry_failed && last_failed.as_ref() == Some(&contents) {
            return Ok(false);
        }
        match build(&self.files, &contents) {
            Ok((config, not_after)) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    Loaded::new(config, contents);
                *last_failed = None;
                self.metrics.tls_cert_expiry.set(not_after);
                self.metrics.tls_reloads.with_label_values(&["ok"]).inc();
                Ok(true)
            }
            Err(e) => {
                *last_failed = Some(contents);
                self.metrics.tls_reloads.with_label_values(&["error"]).inc();
                Err(e)
            }
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_all(files: &TlsFiles) -> Result<Vec<u8>, TlsError> {
    let mut all = Vec::new();
    for (what, path) in [
        ("tls_cert", &files.cert),
        ("tls_key", &files.key),
        ("client_ca", &files.client_ca),
    ] {
        let bytes = read(what, path)?;
        all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        all.extend_from_slice(&bytes);
    }
    Ok(all)
}

/// Splits what `read_all` joined.
fn split(contents: &[u8]) -> [&[u8]; 3] {
    let mut rest = contents;
    let mut parts = [&[][..]; 3];
    for part in &mut parts {
        let (len, tail) = rest.split_at(8);
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        let (this, tail) = tail.split_at(len);
        *part = this;
        rest = tail;
    }
    parts
}

fn certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// A server config from the files' bytes, and the serving certificate's notAfter.
fn build(files: &TlsFiles, contents: &[u8]) -> Result<(ServerConfig, i64), TlsError> {
    let [cert_pem, key_pem, ca_pem] = split(contents);
    let chain = certs("tls_cert", &files.cert, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Invalid {
        what: "tls_key",
        path: files.key.clone(),
        reason: format!("no usable PEM private key ({e})"),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certs("client_ca", &files.client_ca, ca_pem)? {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            what: "client_ca",
            path: files.client_ca.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| TlsError::Invalid {
            what: "tls_cert",
            path: files.cert.clone(),
            reason: format!("cannot parse the certificate: {e}"),
        })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Invalid {
            what: "client_ca",
            path: files.client_ca.clone(),
            reason: e.to_string(),
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid {
            what: "tls_cert/tls_key",
            path: files.cert.clone(),
            reason: format!("{e} (does the key belong to the certificate?)"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((config, not_after))
}

/// Reloads on SIGHUP and whenever the files change (checked every `every`) until
/// `shutdown`. A bad set of files is logged once; the old config stays.
pub async fn watch(tls: Arc<ServerTls>, every: Duration, shutdown: CancellationToken) {
    let mut hup = hangups();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    ticks.tick().await;
    loop {
        let trigger = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => "sighup",
            _ = ticks.tick() => "poll",
        };
        let tls = tls.clone();
        let sighup = trigger == "sighup";
        let result = tokio::task::spawn_blocking(move || tls.reload(sighup)).await;
        match result {
            Ok(Ok(true)) => tracing::info!(trigger, "tls certificates reloaded"),
            Ok(Ok(false)) if sighup => tracing::info!(trigger, "tls files unchanged"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!(
                trigger,
                "tls reload failed, keeping the current certificates: {e}"
            ),
            Err(e) => tracing::error!(trigger, "tls reload task failed: {e}"),
        }
    }
}

/// SIGHUP as a channel; a process without the handler would die of the signal.
pub fn hangups() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => tracing::warn!("cannot install the SIGHUP handler, reload by polling only: {e}"),
    }
    rx
}

/// TLS connections from `accepted`, each handshaken with the config current when it
/// arrived; failed handshakes are counted and dropped here. A connection waits for one of
/// the `MAX_HANDSHAKES` slots after it was accepted, never before, so the accept thread
/// keeps emptying the kernel's queue while handshakes are busy; its timeout starts with its
/// slot.
pub fn incoming(
    mut accepted: Accepted,
    tls: Arc<ServerTls>,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = accepted.next() => match next {
                    Some(Ok(tcp)) => tcp,
                    Some(Err(e)) => {
                        tracing::warn!("cannot register an accepted connection: {e}");
                        continue;
                    }
                    None => return,
                },
            };
            let peer = tcp
                .peer_addr()
                .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
            let acceptor = TlsAcceptor::from(tls.config());
            let metrics = tls.metrics.clone();
            let tx = tx.clone();
            let permits = permits.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    p = permits.acquire_owned() => p.expect("the semaphore is never closed"),
                };
                let (reason, error) =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                            return;
                        }
                        Ok(Err(e)) => (classify(&e), e.to_string()),
                        Err(_) => (
                            "timeout",
                            format!("no handshake within {handshake_timeout:?}"),
                        ),
                    };
                metrics
                    .tls_handshake_errors
                    .with_label_values(&[reason])
                    .inc();
                // A certificate the CA signed that no longer passes (expired, say) is worth an
                // operator's eye; scanners and garbage are not.
                if reason == "bad_client_cert" {
                    tracing::info!(%peer, reason, "tls handshake refused: {error}");
                } else {
                    tracing::debug!(%peer, reason, "tls handshake failed: {error}");
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

pub fn classify(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_cert",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_client_cert",
        Some(_) => "protocol",
        None => "io",
    }
}
