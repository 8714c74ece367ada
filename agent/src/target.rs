//! `serve-target`: a speed and latency target speaking the LibreSpeed backend protocol, so
//! edgeprobe agents and stock LibreSpeed clients can test against any host.
//!
//! Endpoints (each also under `/backend/` and with a `.php` suffix, as LibreSpeed lays
//! them out): `GET /garbage?ckSize=N` streams N MiB (clamped 1..=1024, default 4) of
//! incompressible data, `GET|POST /empty` drains any request body (sized or chunked) and
//! answers 200, `GET /getIP` answers `{"processedString": "<client ip>", "rawIspInfo": ""}`.
//! Every response carries LibreSpeed's CORS headers and `Cache-Control: no-store`.
//!
//! networkQuality (draft-ietf-ippm-responsiveness-09 sections 7 and 8): `GET
//! /.well-known/nq` answers the JSON configuration with the draft's key names
//! (`large_download_url`, `small_download_url`, `upload_url`) and Apple's
//! (`large_https_download_url`, `small_https_download_url`, `https_upload_url`, which
//! Cloudflare's `mach` reads), all naming this server as the client reached it (its `Host`
//! or `:authority`, and the scheme it is served with). `GET /nq/large` streams
//! `LARGE_BYTES` (the draft asks for at least 8 GB) and is a transfer under the cap like a
//! garbage download; `GET /nq/small` answers 1 byte and is never refused (it is the
//! latency probe); `POST /nq/upload` drains its body like `/empty`. HTTP/1.1 and HTTP/2
//! are both served (HTTP/2 as prior knowledge in plaintext, by ALPN over TLS): the draft's
//! self probes need HTTP/2 to share a load-generating connection.
//!
//! TLS (`--tls-cert FILE --tls-key FILE`, PEM): every connection is HTTPS (rustls, ALPN
//! `h2` and `http/1.1`); handshakes run beside the accept loop, each bounded by
//! `HANDSHAKE_TIMEOUT`, so a slow or silent client delays nobody else.
//!
//! Invariants:
//! - Garbage is one random buffer generated at start and sent as reference-counted slices
//!   (as LibreSpeed's garbage.php repeats one random chunk): no per-request generation, no
//!   copies in user space, so loopback runs at memory speed.
//! - A speed test is identified by the `test=<id>` query parameter our agent sends (1 to
//!   64 of `A-Za-z0-9_-`), else by the client IP (stock LibreSpeed clients), so agents
//!   behind one NAT are separate tests. A test is running while it has a transfer: a
//!   garbage or `/nq/large` download, or any request with a body (`Content-Length` > 0,
//!   `Transfer-Encoding`, or an HTTP/2 request whose headers do not end the stream) whatever its method or path, for as long as the request is
//!   handled. It keeps its slot for `LINGER` after its last transfer ends so the gap
//!   between a test's download and upload phases does not give it away. At most
//!   `max_tests` tests run at once (0 = no cap); a transfer of another test beyond that
//!   is answered 503 and never shares the link. Pings (`/empty` without a body) and
//!   `/getIP` are never refused.
//! - No test holds the target without moving data: every connection records when it last
//!   read or wrote a byte (`Watched`), and a transfer whose connection made no progress
//!   for `STALL` loses its slot at once (no linger) and its connection is closed (its I/O
//!   fails), whether the client stalled, died or its link went half-open.
//! - Shutdown: when `shutdown` resolves, stop accepting, let requests in flight finish for
//!   up to `GRACE`, then return.
//!
//! STAMP (SPEC section 17): `reflector` is a Session-Reflector on UDP (by default port 862
//! of the listen address), started beside the HTTP server and stopped with it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub mod reflector;

pub const DEFAULT_MAX_TESTS: usize = 4;
/// Time a finished test keeps its slot (covers the switch from download to upload).
const LINGER: Duration = Duration::from_secs(3);
/// A transfer whose connection moves no byte for this long loses its slot and connection.
const STALL: Duration = Duration::from_secs(10);
/// How often stalled transfers are looked for.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// Longest `test=` id taken; a longer or odd one falls back to the client address.
const MAX_ID: usize = 64;
/// Time given to requests in flight at shutdown.
const GRACE: Duration = Duration::from_secs(5);
const MIB: usize = 1 << 20;
const DEFAULT_CHUNKS: u64 = 4;
const MAX_CHUNKS: u64 = 1024;
/// Size of the networkQuality large download, in MiB chunks: 64 GiB, over the draft's
/// 8 GB, so no client reaches its end.
const LARGE_CHUNKS: u64 = 64 * 1024;
/// Longest TLS handshake a client gets.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The networkQuality well-known path (draft section 8.1, RFC 8615).
pub const NQ_PATH: &str = "/.well-known/nq";

/// A certificate chain and key for HTTPS, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Where `serve` reflects STAMP.
#[derive(Debug, Clone, Copy)]
pub enum StampListen {
    /// No reflector.
    Off,
    /// The default (the listen host, UDP 862): a failure to bind is a warning.
    Default(SocketAddr),
    /// Asked for: a failure to bind is an error.
    Explicit(SocketAddr),
}

impl StampListen {
    /// The default for an HTTP listen address: its host at the STAMP port.
    pub fn default_for(listen: SocketAddr) -> StampListen {
        StampListen::Default(SocketAddr::new(
            listen.ip(),
            edgeprobe_proto::testdef::defaults::STAMP_PORT,
        ))
    }
}

/// Why `serve` stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot reflect STAMP on UDP {addr}")]
    StampListen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("serving")]
    Serve(#[source] io::Error),
    #[error("cannot use the TLS certificate {cert} and key {key}: {reason}")]
    Tls {
        cert: String,
        key: String,
        reason: String,
    },
}

/// Serves until `shutdown`; HTTPS when `tls` is given.
pub async fn serve(
    listen: SocketAddr,
    max_tests: usize,
    tls: Option<TlsFiles>,
    stamp: (StampListen, reflector::Limits),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let acceptor = tls.as_ref().map(tls_acceptor).transpose()?;
    let bound = async {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    let (listener, local) = bound.await.map_err(|source| ServeError::Listen {
        addr: listen,
        source,
    })?;
    let stamp_addr = match stamp.0 {
        StampListen::Off => None,
        StampListen::Default(addr) | StampListen::Explicit(addr) => Some(addr),
    };
    let reflector = match stamp_addr.map(|addr| (addr, reflector::bind(addr, stamp.1))) {
        None => None,
        Some((_, Ok(r))) => Some(r),
        Some((addr, Err(source))) => match stamp.0 {
            StampListen::Explicit(_) => return Err(ServeError::StampListen { addr, source }),
            _ => {
                tracing::warn!(udp = %addr, error = %source, "cannot reflect STAMP on the default port; going on without (--stamp-listen ADDR to choose another)");
                None
            }
        },
    };
    let state = Arc::new(Target {
        garbage: random_chunk(),
        tests: Tests::new(max_tests),
        https: acceptor.is_some(),
    });
    let reaper = tokio::spawn(reap(state.clone()));
    let _reaper = scopeguard(move || reaper.abort());
    let app = router(state);
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    tracing::info!(listen = %local, max_tests, scheme, "serve-target listening");
    let stop_reflector = CancellationToken::new();
    let _reflector = match reflector {
        Some(r) => {
            let udp = r.local_addr().map_err(|source| ServeError::StampListen {
                addr: stamp_addr.unwrap_or(local),
                source,
            })?;
            // Logged after the HTTP address, under another key: scripts read `listen=`.
            tracing::info!(udp = %udp, limits = ?stamp.1, "STAMP reflector running");
            let stop = stop_reflector.clone();
            Some(tokio::spawn(async move {
                r.run(stop).await;
            }))
        }
        None => None,
    };
    let _stop_reflector = scopeguard({
        let stop = stop_reflector.clone();
        move || stop.cancel()
    });

    let stop = CancellationToken::new();
    let listener = match acceptor {
        None => WatchedListener::Plain(listener),
        Some(acceptor) => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let handshakes = tokio::spawn(tls_accept_loop(listener, acceptor, tx));
            WatchedListener::Tls {
                local,
                ready: rx,
                _handshakes: AbortOnDrop(handshakes),
            }
        }
    };
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server, shutdown);
    tokio::select! {
        result = &mut server => return result.map_err(ServeError::Serve),
        () = &mut shutdown => {}
    }
    tracing::info!("serve-target stopping");
    stop.cancel();
    match tokio::time::timeout(GRACE, server).await {
        Ok(result) => result.map_err(ServeError::Serve)?,
        Err(_) => tracing::info!(grace = ?GRACE, "transfers still running at shutdown, closed"),
    }
    tracing::info!("serve-target stopped");
    Ok(())
}

struct Target {
    garbage: Bytes,
    tests: Tests,
    /// Served over TLS: the networkQuality URLs are https.
    https: bool,
}

/// Reads the PEM certificate chain and key into a rustls acceptor offering HTTP/2 and
/// HTTP/1.1.
fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |reason: String| ServeError::Tls {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(format!("reading the certificate: {e}")))?;
    if certs.is_empty() {
        return Err(fail("the certificate file holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| fail(format!("reading the key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(format!("the key does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections and runs their TLS handshakes concurrently, handing finished
/// ones to the server; a failed or slow handshake only loses its own connection.
async fn tls_accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: tokio::sync::mpsc::Sender<(Served, SocketAddr)>,
) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let watched = Watched::new(tcp);
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let watch = watched.watch.clone();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(watched)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((Served::Tls(Box::new(tls), watch), addr)).await;
                }
                Ok(Err(e)) => tracing::debug!(client = %addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
            }
        });
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `f` when dropped.
struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

/// Takes the slots of stalled transfers away and closes their connections.
async fn reap(target: Arc<Target>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    loop {
        tick.tick().await;
        target.tests.reap(Instant::now());
    }
}

fn router(state: Arc<Target>) -> Router {
    let mut app = Router::new()
        .route(NQ_PATH, get(nq_config))
        .route("/nq/large", get(nq_large))
        .route("/nq/small", get(nq_small))
        .route("/nq/upload", get(empty).post(empty).put(empty));
    for prefix in ["", "/backend"] {
        for suffix in ["", ".php"] {
            app = app
                .route(
                    &format!("{prefix}/garbage{suffix}"),
                    get(garbage).options(preflight),
                )
                .route(
                    &format!("{prefix}/empty{suffix}"),
                    get(empty).post(empty).options(preflight),
                )
                .route(
                    &format!("{prefix}/getIP{suffix}"),
                    get(get_ip).options(preflight),
                );
        }
    }
    app.fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cap_bodies,
        ))
        .layer(axum::middleware::map_response(common_headers))
        .with_state(state)
}

/// Every request with a body is an upload: it counts against the cap for as long as it is
/// handled, whatever its method or path (a GET with a body uploads as well as a POST).
async fn cap_bodies(
    State(target): State<Arc<Target>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    if !has_body(request.headers()) && request.body().is_end_stream() {
        return next.run(request).await;
    }
    let key = TestKey::of(request.uri(), &peer);
    let Some(_slot) = target.tests.begin(key.clone(), &peer.watch) else {
        return busy(&key);
    };
    next.run(request).await
}

fn has_body(headers: &HeaderMap) -> bool {
    let sized = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    sized || headers.contains_key(header::TRANSFER_ENCODING)
}

/// LibreSpeed's CORS headers and no caching, on every response.
async fn common_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Encoding, Content-Type"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn preflight() -> StatusCode {
    StatusCode::OK
}

async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

fn busy(test: &TestKey) -> Response {
    tracing::info!(%test, "speed test refused: at the cap of concurrent tests");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "30")],
        "busy: this target is serving its maximum of concurrent speed tests\n",
    )
        .into_response()
}

async fn garbage(
    State(target): State<Arc<Target>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    uri: Uri,
) -> Response {
    let chunks = chunks(uri.query().unwrap_or(""));
    let key = TestKey::of(&uri, &peer);
    let Some(slot) = target.tests.begin(key.clone(), &peer.watch) else {
        return busy(&key);
    };
    let body = Garbage {
        chunk: target.garbage.clone(),
        remaining: chunks,
        _slot: slot,
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=random.dat",
            ),
            (
                header::CACHE_CONTROL,
                "no-store, no-cache, must-revalidate, max-age=0, s-maxage=0",
            ),
            (header::PRAGMA, "no-cache"),
        ],
        Body::new(body),
    )
        .into_response()
}

/// Drains the body (its slot is held by `cap_bodies`).
async fn empty(body: Body) -> Response {
    let mut body = body;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            // The client went away mid-upload: nobody is left to answer.
            return StatusCode::BAD_REQUEST.into_response();
        }
    }
    ([(header::CONNECTION, "keep-alive")], StatusCode::OK).into_response()
}

/// The networkQuality configuration (draft section 8.1, plus Apple's key names), naming
/// this server as the client addressed it.
async fn nq_config(State(target): State<Arc<Target>>, headers: HeaderMap, uri: Uri) -> Response {
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|a| a.parse::<axum::http::uri::Authority>().is_ok());
    let Some(authority) = authority else {
        return (
            StatusCode::BAD_REQUEST,
            "no Host: the networkQuality URLs name the host the client asked for\n",
        )
            .into_response();
    };
    let scheme = if target.https { "https" } else { "http" };
    let url = |path: &str| format!("{scheme}://{authority}{path}");
    let config = serde_json::json!({
        "version": 1,
        "urls": {
            "large_download_url": url("/nq/large"),
            "small_download_url": url("/nq/small"),
            "upload_url": url("/nq/upload"),
            "large_https_download_url": url("/nq/large"),
            "small_https_download_url": url("/nq/small"),
            "https_upload_url": url("/nq/upload"),
        },
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        config.to_string(),
    )
        .into_response()
}

/// The networkQuality large object: a transfer under the cap, like a garbage download.
async fn nq_large(
    State(target): State<Arc<Target>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    uri: Uri,
) -> Response {
    let key = TestKey::of(&uri, &peer);
    let Some(slot) = target.tests.begin(key.clone(), &peer.watch) else {
        return busy(&key);
    };
    peer.watch.paced.store(true, Ordering::Relaxed);
    let body = Garbage {
        chunk: target.garbage.clone(),
        remaining: LARGE_CHUNKS,
        _slot: slot,
    };
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::new(body),
    )
        .into_response()
}

/// The networkQuality small object: 1 byte, never refused.
async fn nq_small() -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from_static(b"x"),
    )
        .into_response()
}

async fn get_ip(ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    let ip = peer.addr.ip().to_canonical().to_string();
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        serde_json::json!({ "processedString": ip, "rawIspInfo": "" }).to_string(),
    )
        .into_response()
}

/// The `ckSize` parameter: whole MiB, clamped to 1..=1024, 4 when absent or unreadable.
fn chunks(query: &str) -> u64 {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "ckSize")
        .and_then(|(_, n)| n.trim().parse::<f64>().ok())
        .filter(|n| n.is_finite())
        .map(|n| (n.round().max(1.0) as u64).min(MAX_CHUNKS))
        .unwrap_or(DEFAULT_CHUNKS)
}

fn random_chunk() -> Bytes {
    let mut chunk = vec![0u8; MIB];
    rand::rng().fill_bytes(&mut chunk);
    Bytes::from(chunk)
}

/// `remaining` more copies of the random chunk; holds the test's slot until dropped (sent
/// or the client gone).
struct Garbage {
    chunk: Bytes,
    remaining: u64,
    _slot: Slot,
}

impl hyper::body::Body for Garbage {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        self.remaining -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining * self.chunk.len() as u64)
    }
}

/// What identifies a speed test: the id our agent sends, else the client address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TestKey {
    Id(String),
    Addr(IpAddr),
}

impl TestKey {
    fn of(uri: &Uri, peer: &Peer) -> TestKey {
        uri.query()
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("test="))
            .filter(|id| {
                (1..=MAX_ID).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .map(|id| TestKey::Id(id.to_string()))
            .unwrap_or_else(|| TestKey::Addr(peer.addr.ip().to_canonical()))
    }
}

impl fmt::Display for TestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestKey::Id(id) => write!(f, "test {id}"),
            TestKey::Addr(ip) => write!(f, "client {ip}"),
        }
    }
}

/// The speed tests in progress.
struct Tests {
    max: usize,
    inner: Arc<Mutex<TestsInner>>,
}

#[derive(Default)]
struct TestsInner {
    by_key: HashMap<TestKey, Activity>,
    next_transfer: u64,
}

struct Activity {
    transfers: HashMap<u64, Transfer>,
    last_end: Instant,
}

/// A transfer in progress and the connection that carries it.
struct Transfer {
    watch: Arc<ConnWatch>,
    started: Instant,
}

/// One transfer of a test; dropping it ends the transfer.
struct Slot {
    key: TestKey,
    id: u64,
    inner: Arc<Mutex<TestsInner>>,
}

impl Tests {
    fn new(max: usize) -> Self {
        Tests {
            max,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TestsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a transfer of test `key` on the connection `watch`: joins its running test,
    /// or starts the test if there is room; `None` means busy.
    fn begin(&self, key: TestKey, watch: &Arc<ConnWatch>) -> Option<Slot> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner
            .by_key
            .retain(|_, a| !a.transfers.is_empty() || now.duration_since(a.last_end) < LINGER);
        let running = inner.by_key.len();
        let id = inner.next_transfer;
        inner.next_transfer += 1;
        let transfer = Transfer {
            watch: watch.clone(),
            started: now,
        };
        match inner.by_key.get_mut(&key) {
            Some(activity) => {
                activity.transfers.insert(id, transfer);
            }
            None if self.max > 0 && running >= self.max => return None,
            None => {
                inner.by_key.insert(
                    key.clone(),
                    Activity {
                        transfers: HashMap::from([(id, transfer)]),
                        last_end: now,
                    },
                );
                tracing::debug!(%key, running = running + 1, "speed test started");
            }
        }
        Some(Slot {
            key,
            id,
            inner: self.inner.clone(),
        })
    }

    /// Ends every transfer whose connection moved nothing for `STALL` (counted from the
    /// transfer's start at the earliest) and closes that connection; a test left without
    /// transfers this way frees its slot at once.
    fn reap(&self, now: Instant) {
        let mut inner = self.lock();
        inner.by_key.retain(|key, activity| {
            let before = activity.transfers.len();
            activity.transfers.retain(|_, t| {
                let progress = t.watch.last_progress().max(t.started);
                let stalled = now.saturating_duration_since(progress) >= STALL;
                if stalled {
                    t.watch.cancel.cancel();
                }
                !stalled
            });
            let reaped = before - activity.transfers.len();
            if reaped > 0 {
                tracing::info!(%key, reaped, stall = ?STALL, "stalled speed transfers closed");
            }
            reaped == 0 || !activity.transfers.is_empty()
        });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(activity) = inner.by_key.get_mut(&self.key) {
            if activity.transfers.remove(&self.id).is_some() && activity.transfers.is_empty() {
                activity.last_end = Instant::now();
            }
        }
    }
}

/// A connection's progress and the switch that closes it, shared by its I/O and the
/// transfers it carries.
struct ConnWatch {
    born: Instant,
    /// Serves a networkQuality large download: its unsent data follows its delivery rate
    /// (draft-ietf-ippm-responsiveness-09 section 6.1.1), so the self probes sharing it
    /// wait for the network's queue, not this server's send buffer.
    paced: std::sync::atomic::AtomicBool,
    /// Milliseconds from `born` to the last byte read or written.
    last_ms: AtomicU64,
    cancel: CancellationToken,
}

impl ConnWatch {
    fn new() -> Self {
        ConnWatch {
            born: Instant::now(),
            paced: std::sync::atomic::AtomicBool::new(false),
            last_ms: AtomicU64::new(0),
            cancel: CancellationToken::new(),
        }
    }

    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last_progress(&self) -> Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The client's address and its connection's watch, given to every handler.
#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    watch: Arc<ConnWatch>,
}

impl Connected<IncomingStream<'_, WatchedListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, WatchedListener>) -> Self {
        Peer {
            addr: *stream.remote_addr(),
            watch: stream.io().watch().clone(),
        }
    }
}

/// Accepts connections as `Watched` streams (with `TCP_NODELAY`: answers are small),
/// plain or after their TLS handshake.
enum WatchedListener {
    Plain(TcpListener),
    Tls {
        local: SocketAddr,
        ready: tokio::sync::mpsc::Receiver<(Served, SocketAddr)>,
        _handshakes: AbortOnDrop,
    },
}

impl axum::serve::Listener for WatchedListener {
    type Io = Served;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Served, SocketAddr) {
        match self {
            WatchedListener::Plain(listener) => {
                let (tcp, addr) = axum::serve::Listener::accept(listener).await;
                (Served::Plain(Watched::new(tcp)), addr)
            }
            WatchedListener::Tls { ready, .. } => match ready.recv().await {
                Some(accepted) => accepted,
                // The handshake task is gone only when the server is dropped.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            WatchedListener::Plain(listener) => listener.local_addr(),
            WatchedListener::Tls { local, .. } => Ok(*local),
        }
    }
}

/// A served connection: plain or TLS, over a `Watched` TCP stream.
enum Served {
    Plain(Watched),
    Tls(
        Box<tokio_rustls::server::TlsStream<Watched>>,
        Arc<ConnWatch>,
    ),
}

impl Served {
    fn watch(&self) -> &Arc<ConnWatch> {
        match self {
            Served::Plain(w) => &w.watch,
            Served::Tls(_, watch) => watch,
        }
    }
}

impl AsyncRead for Served {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Served::Plain(w) => Pin::new(w).poll_read(cx, buf),
            Served::Tls(t, _) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Served {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Served::Plain(w) => Pin::new(w).poll_write(cx, data),
            Served::Tls(t, _) => Pin::new(t.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Served::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            Served::Tls(t, _) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Served::Plain(w) => w.is_write_vectored(),
            Served::Tls(t, _) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Served::Plain(w) => Pin::new(w).poll_flush(cx),
            Served::Tls(t, _) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Served::Plain(w) => Pin::new(w).poll_shutdown(cx),
            Served::Tls(t, _) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A TCP stream that records progress in its `ConnWatch` and fails every operation once
/// the watch is cancelled (then hyper drops the connection and the socket closes).
struct Watched {
    tcp: TcpStream,
    watch: Arc<ConnWatch>,
    /// When the unsent-data bound was last set (paced connections).
    paced_at: Instant,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Watched {
    fn new(tcp: TcpStream) -> Watched {
        let _ = tcp.set_nodelay(true);
        let watch = Arc::new(ConnWatch::new());
        let cancelled = Box::pin(watch.cancel.clone().cancelled_owned());
        Watched {
            tcp,
            watch,
            paced_at: Instant::now(),
            cancelled,
        }
    }

    /// After the inner operation: its result, unless the connection was closed by the
    /// reaper (checked, and woken for, only while the operation waits).
    fn settle<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let closed = match poll {
            Poll::Pending => self.cancelled.as_mut().poll(cx).is_ready(),
            Poll::Ready(_) => self.watch.cancel.is_cancelled(),
        };
        if closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no progress: closed by serve-target",
            )));
        }
        poll
    }

    fn pace(&mut self) {
        if self.watch.paced.load(Ordering::Relaxed) {
            crate::probe::responsiveness::Paced::repace(&self.tcp, &mut self.paced_at);
        }
    }

    fn moved(&self, poll: &Poll<io::Result<usize>>) {
        if matches!(poll, Poll::Ready(Ok(n)) if *n > 0) {
            self.watch.touch();
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.touch();
        }
        self.settle(cx, poll)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.pace();
        let poll = Pin::new(&mut self.tcp).poll_write(cx, data);
        self.moved(&poll);
        self.settle(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.pace();
        let poll = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.moved(&poll);
        self.settle(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.tcp).poll_flush(cx);
        self.settle(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.tcp).poll_shutdown(cx);
        self.settle(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_count_is_clamped() {
        assert_eq!(chunks(""), 4);
        assert_eq!(chunks("r=0.5&ckSize=100"), 100);
        assert_eq!(chunks("ckSize=0"), 1);
        assert_eq!(chunks("ckSize=99999"), 1024);
        assert_eq!(chunks("ckSize=lots"), 4);
    }

    fn addr(ip: &str) -> TestKey {
        TestKey::Addr(ip.parse().unwrap())
    }

    #[test]
    fn cap_counts_tests_not_connections() {
        let tests = Tests::new(1);
        let conn = Arc::new(ConnWatch::new());
        let (a, b) = (addr("192.0.2.1"), addr("192.0.2.2"));
        let first = tests.begin(a.clone(), &conn).expect("room for one test");
        let second = tests.begin(a, &conn).expect("same client, same test");
        assert!(
            tests.begin(b.clone(), &conn).is_none(),
            "a second client is busy"
        );
        drop(first);
        drop(second);
        assert!(
            tests.begin(b.clone(), &conn).is_none(),
            "the slot lingers after the last transfer"
        );
        assert!(Tests::new(0).begin(b, &conn).is_some(), "0 means no cap");
    }

    #[test]
    fn a_stalled_transfer_loses_its_slot_at_once() {
        let tests = Tests::new(1);
        let conn = Arc::new(ConnWatch::new());
        let slot = tests.begin(addr("192.0.2.1"), &conn).unwrap();
        tests.reap(Instant::now() + STALL / 2);
        assert!(!conn.cancel.is_cancelled());
        tests.reap(Instant::now() + STALL);
        assert!(conn.cancel.is_cancelled(), "its connection is closed");
        let other = Arc::new(ConnWatch::new());
        assert!(
            tests.begin(addr("192.0.2.2"), &other).is_some(),
            "no linger"
        );
        drop(slot);
    }

    #[test]
    fn test_id_before_address() {
        let peer = Peer {
            addr: "192.0.2.1:5000".parse().unwrap(),
            watch: Arc::new(ConnWatch::new()),
        };
        let key = |uri: &str| TestKey::of(&uri.parse().unwrap(), &peer);
        assert_eq!(key("/empty?r=1&test=ab-C_9"), TestKey::Id("ab-C_9".into()));
        assert_eq!(key("/empty?r=1"), addr("192.0.2.1"));
        assert_eq!(key("/empty?test="), addr("192.0.2.1"));
        assert_eq!(key("/empty?test=a%20b"), addr("192.0.2.1"));
        assert_eq!(
            key(&format!("/e?test={}", "x".repeat(65))),
            addr("192.0.2.1")
        );
    }
}
