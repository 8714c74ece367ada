//! Connections of a responsiveness run: HTTP/2 load-generating connections (self probes
//! are further streams on them), and HTTP/1.1 foreign probes on new connections, each
//! timed by phase.
//!
//! HTTP/2 is negotiated by ALPN over TLS (the draft, section 7: "Both the client and the
//! server MUST support HTTP/2 over TLS") and spoken with prior knowledge over plain HTTP
//! (`serve-target` takes both). A server that answers a load connection with anything
//! else fails the run with class `protocol`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::super::addr::HttpUrl;
use super::super::speed::conn::{check_status, hyper_error};
use super::super::{tcp, tls, ErrorClass, ProbeError};

/// HTTP/2 flow-control windows the client grants: large enough that the window never
/// limits a load-generating stream (the link's queue must, draft section 5.1.3).
const STREAM_WINDOW: u32 = 16 << 20;
const CONN_WINDOW: u32 = 32 << 20;
/// Upload body frames: slices of one random buffer.
const UPLOAD_FRAME: usize = 64 * 1024;

/// Unsent data a load-generating socket may hold, in time at its delivery rate: the
/// draft's 5 ms (section 6.1.1, TCP_REPLENISH_TIME or TCP_NOTSENT_LOWAT set from the
/// measured throughput), so the sender's own buffer does not add to the round trips.
const UNSENT_TIME: f64 = 0.005;
/// Bounds of that unsent data, in bytes.
const MIN_UNSENT: u64 = 16 * 1024;
const MAX_UNSENT: u64 = 4 << 20;
/// How often the bound follows the delivery rate.
const REPACE_EVERY: Duration = Duration::from_millis(50);

/// Sets the socket's `TCP_NOTSENT_LOWAT` to `UNSENT_TIME` of its delivery rate.
pub fn pace_unsent(socket: &tokio::net::TcpStream) {
    let rate = super::super::speed::conn::delivery_rate(socket).unwrap_or(0) as f64;
    let lowat = ((rate * UNSENT_TIME) as u64).clamp(MIN_UNSENT, MAX_UNSENT);
    let _ = socket2::SockRef::from(socket).set_tcp_notsent_lowat(lowat as u32);
}

/// A TCP stream whose unsent data follows its delivery rate (`pace_unsent`), re-set before
/// a write at most every `REPACE_EVERY`.
pub struct Paced {
    tcp: tokio::net::TcpStream,
    paced_at: Instant,
}

impl Paced {
    pub fn new(tcp: tokio::net::TcpStream) -> Paced {
        pace_unsent(&tcp);
        Paced {
            tcp,
            paced_at: Instant::now(),
        }
    }

    /// Re-sets the bound when it is due.
    pub fn repace(tcp: &tokio::net::TcpStream, paced_at: &mut Instant) {
        if paced_at.elapsed() >= REPACE_EVERY {
            pace_unsent(tcp);
            *paced_at = Instant::now();
        }
    }
}

impl AsyncRead for Paced {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Paced {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        Paced::repace(&this.tcp, &mut this.paced_at);
        Pin::new(&mut this.tcp).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Where the test URLs live: resolved once per run.
#[derive(Debug, Clone)]
pub struct Server {
    pub https: bool,
    /// Host name for TLS (SNI and verification).
    pub host: String,
    /// `scheme://host[:port]`, the front of every HTTP/2 request URI.
    pub origin: String,
    /// `host[:port]` for HTTP/1.1 `Host`.
    pub authority: String,
    pub addr: SocketAddr,
    /// The run's link: every connection is bound to it.
    pub link: super::super::addr::Link,
    pub insecure_tls: bool,
}

impl Server {
    /// The server of `url`, connecting to `connect_host` (the configuration's
    /// `test_endpoint`) when given.
    pub async fn of(
        url: &HttpUrl,
        connect_host: Option<&str>,
        insecure_tls: bool,
        link: &super::super::addr::Link,
    ) -> Result<Server, ProbeError> {
        let port = url.port();
        let resolve_host = connect_host.map_or_else(|| url.host(), str::to_string);
        let host = url
            .url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let scheme = if url.https() { "https" } else { "http" };
        Ok(Server {
            https: url.https(),
            host,
            origin: format!("{scheme}://{}", url.authority()),
            authority: url.authority(),
            addr: super::super::addr::resolve(&resolve_host, port, link).await?,
            link: link.clone(),
            insecure_tls,
        })
    }
}

/// A request body: empty, or endless random bytes counted into `sent` as hyper takes them
/// (HTTP/2 flow control lets it take no more than the server's window ahead of the wire).
pub enum ReqBody {
    Empty,
    Endless { chunk: Bytes, sent: Arc<AtomicU64> },
}

impl ReqBody {
    pub fn endless(sent: Arc<AtomicU64>) -> ReqBody {
        let mut chunk = vec![0u8; UPLOAD_FRAME];
        rand::rng().fill_bytes(&mut chunk);
        ReqBody::Endless {
            chunk: Bytes::from(chunk),
            sent,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Endless { chunk, sent } => {
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(chunk.clone()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ReqBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Endless { .. } => SizeHint::default(),
        }
    }
}

/// One HTTP/2 connection; its task dies with the last handle.
#[derive(Clone)]
pub struct H2 {
    sender: http2::SendRequest<ReqBody>,
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl H2 {
    /// Opens an HTTP/2 connection to `server` (TLS with ALPN `h2` when https).
    pub async fn open(server: &Server) -> Result<H2, ProbeError> {
        let stream = tcp::connect(server.addr, &server.link).await?;
        // Closed with a reset: data still queued when a phase ends does not load the next.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        if server.https {
            let config = tls::client_config(server.insecure_tls, &[b"h2"]);
            let (stream, _, _) = tls::handshake(Paced::new(stream), &server.host, config).await?;
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() != Some(b"h2") {
                return Err(ProbeError::new(
                    ErrorClass::Protocol,
                    format!(
                        "{} does not speak HTTP/2 over TLS (ALPN h2), which the responsiveness \
                         test needs for its self probes (draft section 7)",
                        server.origin
                    ),
                ));
            }
            H2::handshake(server, stream).await
        } else {
            H2::handshake(server, Paced::new(stream)).await
        }
    }

    async fn handshake<I>(server: &Server, io: I) -> Result<H2, ProbeError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                let mut e = hyper_error("HTTP/2 handshake", e);
                e.message = format!(
                    "{}: {} (the responsiveness test needs HTTP/2: over TLS by ALPN, or in \
                     plaintext with prior knowledge)",
                    server.origin, e.message
                );
                e
            })?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(H2 {
            sender,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// Sends a request on a new stream; non-2xx is an error (503: busy).
    pub async fn send(
        &self,
        method: Method,
        server: &Server,
        url: &HttpUrl,
        body: ReqBody,
    ) -> Result<Response<Incoming>, ProbeError> {
        let uri = format!("{}{}", server.origin, url.path_and_query());
        let request = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header(hyper::header::USER_AGENT, user_agent())
            .header(hyper::header::ACCEPT_ENCODING, "identity")
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .map_err(|e| ProbeError::new(ErrorClass::Local, format!("bad request {uri}: {e}")))?;
        let mut sender = self.sender.clone();
        sender
            .ready()
            .await
            .map_err(|e| hyper_error(&format!("{method} {uri}"), e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| hyper_error(&format!("{method} {uri}"), e))?;
        check_status(&method, &uri, response.status())?;
        Ok(response)
    }

    /// GET of `url` read to its end: the round trip of a self probe (or an idle one).
    pub async fn get_all(&self, server: &Server, url: &HttpUrl) -> Result<Duration, ProbeError> {
        let start = Instant::now();
        let response = self.send(Method::GET, server, url, ReqBody::Empty).await?;
        read_to_end(response, url).await?;
        Ok(start.elapsed())
    }
}

fn user_agent() -> &'static str {
    concat!("edgeprobe-agent/", env!("CARGO_PKG_VERSION"))
}

async fn read_to_end(response: Response<Incoming>, url: &HttpUrl) -> Result<Bytes, ProbeError> {
    response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| hyper_error(&format!("reading {}", url.url), e))
}

/// One foreign probe's phases (draft section 5.3): TCP handshake, TLS handshake divided
/// by its round trips (TLS 1.3: 1, TLS 1.2: 2), and the HTTP GET of the small object.
#[derive(Debug, Clone, Copy)]
pub struct Foreign {
    pub tcp: Duration,
    pub tls: Option<Duration>,
    pub http: Duration,
}

/// A GET of `url` on a new HTTP/1.1 connection (TLS when https), timed by phase; the body
/// is returned too (the configuration is fetched this way).
pub async fn get_new_connection(
    server: &Server,
    url: &HttpUrl,
) -> Result<(Foreign, Bytes), ProbeError> {
    let start = Instant::now();
    let stream = tcp::connect(server.addr, &server.link).await?;
    let tcp_time = start.elapsed();
    if server.https {
        let config = tls::client_config(server.insecure_tls, &[b"http/1.1"]);
        let (stream, took, _) = tls::handshake(stream, &server.host, config).await?;
        let round_trips = match stream.get_ref().1.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => 2,
            _ => 1,
        };
        let (http, body) = get_h1(server, url, stream).await?;
        let foreign = Foreign {
            tcp: tcp_time,
            tls: Some(took / round_trips),
            http,
        };
        Ok((foreign, body))
    } else {
        let (http, body) = get_h1(server, url, stream).await?;
        let foreign = Foreign {
            tcp: tcp_time,
            tls: None,
            http,
        };
        Ok((foreign, body))
    }
}

async fn get_h1<I>(server: &Server, url: &HttpUrl, io: I) -> Result<(Duration, Bytes), ProbeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| hyper_error("HTTP handshake", e))?;
    let task = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let path = url.path_and_query();
    let request = Request::builder()
        .method(Method::GET)
        .uri(&path)
        .header(hyper::header::HOST, &server.authority)
        .header(hyper::header::USER_AGENT, user_agent())
        .header(hyper::header::ACCEPT_ENCODING, "identity")
        .body(http_body_util::Empty::new())
        .map_err(|e| ProbeError::new(ErrorClass::Local, format!("bad request {path}: {e}")))?;
    let start = Instant::now();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| hyper_error(&format!("GET {}", url.url), e))?;
    check_status(&Method::GET, url.url.as_str(), response.status())?;
    let body = read_to_end(response, url).await?;
    let took = start.elapsed();
    drop(task);
    Ok((took, body))
}
