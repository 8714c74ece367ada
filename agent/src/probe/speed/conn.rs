//! HTTP/1.1 connections for the speed probe: one TCP (or TLS) connection per stream,
//! opened against the resolved target address, each with its own hyper connection task
//! that dies with the `Conn`.
//!
//! Transfer sockets close with a reset (SO_LINGER 0), so data still queued in the kernel
//! when a phase ends cannot leak into the next phase. Upload sockets keep at most
//! `NOTSENT_LOWAT` unsent bytes in the kernel and hyper buffers at most `UPLOAD_BUF`, so
//! the bytes the probe counts as handed over track the bytes on the wire closely.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::super::{tcp, tls, ErrorClass, ProbeError};

/// Unsent bytes the kernel may hold for an upload socket.
const NOTSENT_LOWAT: u32 = 128 * 1024;
/// hyper's write buffer for uploads (it also bounds the read buffer; answers are tiny).
const UPLOAD_BUF: usize = 64 * 1024;

/// Where the target lives: resolved once per run.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub https: bool,
    /// Host name for TLS.
    pub host: String,
    /// `host[:port]` for the Host header.
    pub authority: String,
    pub addr: SocketAddr,
    pub insecure_tls: bool,
}

/// What a connection is for; decides its socket options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Use {
    Ping,
    Download,
    Upload,
}

pub struct Conn<B> {
    sender: SendRequest<B>,
    task: JoinHandle<()>,
}

impl<B> Drop for Conn<B> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    /// `kept` if it can take another request (the server may have closed it), else a new
    /// connection.
    pub async fn reuse_or_open<B>(
        &self,
        kept: Option<Conn<B>>,
        purpose: Use,
    ) -> Result<Conn<B>, ProbeError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(mut conn) = kept {
            if !conn.sender.is_closed() && conn.sender.ready().await.is_ok() {
                return Ok(conn);
            }
        }
        self.open(purpose).await
    }

    pub async fn open<B>(&self, purpose: Use) -> Result<Conn<B>, ProbeError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = tcp::connect(self.addr).await?;
        let socket = SockRef::from(&stream);
        if purpose != Use::Ping {
            let _ = socket.set_linger(Some(Duration::ZERO));
        }
        let mut builder = Builder::new();
        if purpose == Use::Upload {
            let _ = socket.set_tcp_notsent_lowat(NOTSENT_LOWAT);
            builder.max_buf_size(UPLOAD_BUF);
        }
        if self.https {
            let config = tls::client_config(self.insecure_tls, &[b"http/1.1"]);
            let (stream, _, _) = tls::handshake(stream, &self.host, config).await?;
            handshake(&builder, stream).await
        } else {
            handshake(&builder, stream).await
        }
    }
}

async fn handshake<I, B>(builder: &Builder, io: I) -> Result<Conn<B>, ProbeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) = builder
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| hyper_error("HTTP handshake", e))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn { sender, task })
}

impl<B> Conn<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends a request and waits for the response head; non-2xx is an error (503: busy).
    pub async fn send(
        &mut self,
        endpoint: &Endpoint,
        method: Method,
        path: &str,
        body: B,
    ) -> Result<Response<Incoming>, ProbeError> {
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, &endpoint.authority)
            .header(
                hyper::header::USER_AGENT,
                concat!("edgeprobe-agent/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .map_err(|e| ProbeError::new(ErrorClass::Local, format!("bad request {path}: {e}")))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| hyper_error(&format!("{method} {path}"), e))?;
        check_status(&method, path, response.status())?;
        Ok(response)
    }
}

pub fn check_status(method: &Method, path: &str, status: StatusCode) -> Result<(), ProbeError> {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return Err(ProbeError::new(
            ErrorClass::Busy,
            format!("target busy: {method} {path} answered 503"),
        ));
    }
    if !status.is_success() {
        return Err(ProbeError::new(
            ErrorClass::HttpStatus,
            format!("{method} {path} answered {status}"),
        ));
    }
    Ok(())
}

/// Classifies a hyper error by the I/O error under it, if any.
pub fn hyper_error(what: &str, e: hyper::Error) -> ProbeError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            let class = match io.kind() {
                std::io::ErrorKind::UnexpectedEof => ErrorClass::Protocol,
                _ => ErrorClass::of_io(io),
            };
            return ProbeError::new(class, format!("{what}: {e}: {io}"));
        }
        source = err.source();
    }
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        ErrorClass::Refused
    } else {
        ErrorClass::Protocol
    };
    ProbeError::new(class, format!("{what}: {e}"))
}
