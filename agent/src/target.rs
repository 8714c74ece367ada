//! `serve-target`: a speed and latency target speaking the LibreSpeed backend protocol, so
//! edgeprobe agents and stock LibreSpeed clients can test against any host.
//!
//! Endpoints (each also under `/backend/` and with a `.php` suffix, as LibreSpeed lays
//! them out): `GET /garbage?ckSize=N` streams N MiB (clamped 1..=1024, default 4) of
//! incompressible data, `GET|POST /empty` drains any request body (sized or chunked) and
//! answers 200, `GET /getIP` answers `{"processedString": "<client ip>", "rawIspInfo": ""}`.
//! Every response carries LibreSpeed's CORS headers and `Cache-Control: no-store`.
//!
//! Invariants:
//! - Garbage is one random buffer generated at start and sent as reference-counted slices
//!   (as LibreSpeed's garbage.php repeats one random chunk): no per-request generation, no
//!   copies in user space, so loopback runs at memory speed.
//! - A speed test is a client IP with an active transfer (a garbage download or an upload
//!   body being drained), kept for `LINGER` after its last transfer ends so the gap between
//!   a test's download and upload phases does not give its slot away. At most `max_tests`
//!   tests run at once (0 = no cap); a transfer from another IP beyond that is answered
//!   503 and never shares the link. Pings (`/empty` without a body) and `/getIP` are never
//!   refused.
//! - Shutdown: when `shutdown` resolves, stop accepting, let requests in flight finish for
//!   up to `GRACE`, then return.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use rand::RngCore;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_MAX_TESTS: usize = 4;
/// Time a finished test keeps its slot (covers the switch from download to upload).
const LINGER: Duration = Duration::from_secs(3);
/// Time given to requests in flight at shutdown.
const GRACE: Duration = Duration::from_secs(5);
const MIB: usize = 1 << 20;
const DEFAULT_CHUNKS: u64 = 4;
const MAX_CHUNKS: u64 = 1024;

pub async fn serve(
    listen: SocketAddr,
    max_tests: usize,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr().context("listening address")?;
    let state = Arc::new(Target {
        garbage: random_chunk(),
        tests: Tests::new(max_tests),
    });
    let app = router(state);
    tracing::info!(listen = %local, max_tests, "serve-target listening");

    let stop = CancellationToken::new();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server, shutdown);
    tokio::select! {
        result = &mut server => return result.context("serving"),
        () = &mut shutdown => {}
    }
    tracing::info!("serve-target stopping");
    stop.cancel();
    match tokio::time::timeout(GRACE, server).await {
        Ok(result) => result.context("serving")?,
        Err(_) => tracing::info!(grace = ?GRACE, "transfers still running at shutdown, closed"),
    }
    tracing::info!("serve-target stopped");
    Ok(())
}

struct Target {
    garbage: Bytes,
    tests: Tests,
}

fn router(state: Arc<Target>) -> Router {
    let mut app = Router::new();
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
        .layer(axum::middleware::map_response(common_headers))
        .with_state(state)
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

fn busy(ip: IpAddr) -> Response {
    tracing::info!(client = %ip, "speed test refused: at the cap of concurrent tests");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "30")],
        "busy: this target is serving its maximum of concurrent speed tests\n",
    )
        .into_response()
}

async fn garbage(
    State(target): State<Arc<Target>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
) -> Response {
    let chunks = chunks(uri.query().unwrap_or(""));
    let ip = peer.ip().to_canonical();
    let Some(slot) = target.tests.begin(ip) else {
        return busy(ip);
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

async fn empty(
    State(target): State<Arc<Target>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let sized = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let _slot = if method == Method::POST && (sized || chunked) {
        let ip = peer.ip().to_canonical();
        match target.tests.begin(ip) {
            Some(slot) => Some(slot),
            None => return busy(ip),
        }
    } else {
        None
    };
    let mut body = body;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            // The client went away mid-upload: nobody is left to answer.
            return StatusCode::BAD_REQUEST.into_response();
        }
    }
    ([(header::CONNECTION, "keep-alive")], StatusCode::OK).into_response()
}

async fn get_ip(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let ip = peer.ip().to_canonical().to_string();
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

/// The speed tests in progress, by client IP.
struct Tests {
    max: usize,
    by_ip: Arc<Mutex<HashMap<IpAddr, Activity>>>,
}

#[derive(Clone, Copy)]
struct Activity {
    transfers: usize,
    last_end: Instant,
}

/// One transfer of a test; dropping it ends the transfer.
struct Slot {
    ip: IpAddr,
    by_ip: Arc<Mutex<HashMap<IpAddr, Activity>>>,
}

impl Tests {
    fn new(max: usize) -> Self {
        Tests {
            max,
            by_ip: Arc::default(),
        }
    }

    /// Starts a transfer for `ip`: joins its running test, or starts a test if there is
    /// room; `None` means busy.
    fn begin(&self, ip: IpAddr) -> Option<Slot> {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        by_ip.retain(|_, a| a.transfers > 0 || now.duration_since(a.last_end) < LINGER);
        let running = by_ip.len();
        match by_ip.get_mut(&ip) {
            Some(activity) => activity.transfers += 1,
            None if self.max > 0 && running >= self.max => return None,
            None => {
                by_ip.insert(
                    ip,
                    Activity {
                        transfers: 1,
                        last_end: now,
                    },
                );
                tracing::debug!(client = %ip, running = by_ip.len(), "speed test started");
            }
        }
        Some(Slot {
            ip,
            by_ip: self.by_ip.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(activity) = by_ip.get_mut(&self.ip) {
            activity.transfers = activity.transfers.saturating_sub(1);
            if activity.transfers == 0 {
                activity.last_end = Instant::now();
            }
        }
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

    #[test]
    fn cap_counts_client_ips_not_connections() {
        let tests = Tests::new(1);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = tests.begin(a).expect("room for one test");
        let second = tests.begin(a).expect("same client, same test");
        assert!(tests.begin(b).is_none(), "a second client is busy");
        drop(first);
        drop(second);
        assert!(
            tests.begin(b).is_none(),
            "the slot lingers after the last transfer"
        );
        assert!(Tests::new(0).begin(b).is_some(), "0 means no cap");
    }
}
