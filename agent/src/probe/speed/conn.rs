//! HTTP/1.1 connections for the speed probe: one TCP (or TLS) connection per stream,
//! opened against the resolved target address, each with its own hyper connection task
//! that dies with the `Conn`.
//!
//! Transfer sockets close with a reset (SO_LINGER 0), so data still queued in the kernel
//! when a phase ends cannot leak into the next phase. Upload bytes are the bytes the peer
//! acknowledged (`Acked`): the kernel's `tcpi_bytes_acked` of each upload socket, exact at
//! any instant, where bytes handed to hyper or the kernel run ahead of the wire by whatever
//! sits in buffers (at 1 Mbit/s a 64 KiB write alone is half a second). Upload sockets
//! still keep at most `NOTSENT_LOWAT` unsent bytes in the kernel and hyper buffers at most
//! `UPLOAD_BUF`: less queued data for the reset to throw away at the end.
//!
//! Unsafe code: `bytes_acked` calls `libc::getsockopt(TCP_INFO)` on a socket we own
//! (a duplicate of the upload socket's descriptor, held as long as it is read) into a
//! zeroed `libc::tcp_info`, checking the length the kernel wrote; neither socket2 nor
//! rustix wraps TCP_INFO.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use socket2::{SockRef, Socket};
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
    /// The run's link: every connection is bound to it.
    pub link: crate::probe::addr::Link,
    pub insecure_tls: bool,
    /// Sent as `test=` with every request so `serve-target` tells this run from other
    /// agents behind the same address (stock LibreSpeed servers ignore it).
    pub test_id: String,
}

/// What a connection is for; decides its socket options.
#[derive(Debug, Clone)]
pub enum Use {
    Ping,
    Download,
    /// Counts the connection's acknowledged bytes into the direction's total.
    Upload(Arc<Acked>),
}

pub struct Conn<B> {
    sender: SendRequest<B>,
    task: JoinHandle<()>,
    /// Upload connections: their socket in the acknowledged-bytes total.
    _acked: Option<AckedSocket>,
}

/// The bytes the peer acknowledged on every upload socket of a direction: the sockets
/// still open, read live, plus the final count of those already closed.
#[derive(Debug, Default)]
pub struct Acked {
    inner: Mutex<AckedInner>,
}

#[derive(Debug, Default)]
struct AckedInner {
    closed: u64,
    next_id: u64,
    open: HashMap<u64, Socket>,
    /// Open sockets whose count stops at a mark (`Conn::forfeit_after`).
    caps: HashMap<u64, u64>,
    /// TCP_INFO could not be read (not Linux >= 4.1): the total means nothing.
    unreadable: bool,
}

impl Acked {
    /// Acknowledged bytes so far, or `None` when the kernel does not report them.
    pub fn total(&self) -> Option<u64> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = inner.closed;
        let mut unreadable = inner.unreadable;
        for (id, socket) in &inner.open {
            match bytes_acked(socket) {
                Some(n) => total += inner.caps.get(id).map_or(n, |cap| n.min(*cap)),
                None => unreadable = true,
            }
        }
        inner.unreadable = unreadable;
        (!unreadable).then_some(total)
    }

    fn register(self: &Arc<Self>, socket: Socket) -> AckedSocket {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let id = inner.next_id;
        inner.next_id += 1;
        inner.open.insert(id, socket);
        AckedSocket {
            acked: self.clone(),
            id,
        }
    }
}

/// One upload socket in an `Acked` total; on drop its final count moves to `closed`.
struct AckedSocket {
    acked: Arc<Acked>,
    id: u64,
}

impl AckedSocket {
    fn acked(&self) -> Option<u64> {
        let inner = self.acked.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.open.get(&self.id).and_then(bytes_acked)
    }

    fn cap(&self, mark: u64) {
        let mut inner = self.acked.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.caps.insert(self.id, mark);
    }
}

impl Drop for AckedSocket {
    fn drop(&mut self) {
        let mut inner = self.acked.inner.lock().unwrap_or_else(|e| e.into_inner());
        let cap = inner.caps.remove(&self.id).unwrap_or(u64::MAX);
        if let Some(socket) = inner.open.remove(&self.id) {
            match bytes_acked(&socket) {
                Some(n) => inner.closed += n.min(cap),
                None => inner.unreadable = true,
            }
        }
    }
}

/// `tcpi_bytes_acked` (Linux >= 4.1) less the SYN it counts: bytes of this connection the
/// peer acknowledged.
#[allow(unsafe_code)]
fn bytes_acked(socket: &Socket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open (owned by `socket`), `info` is a zeroed plain C
    // struct of `len` bytes, and the kernel writes at most `len` bytes and updates it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    (rc == 0 && len as usize >= needed).then(|| info.tcpi_bytes_acked.saturating_sub(1))
}

/// `tcpi_delivery_rate` (Linux >= 4.9): the kernel's latest estimate of the bytes per
/// second this connection delivers.
#[allow(unsafe_code)]
pub fn delivery_rate(socket: &impl std::os::fd::AsRawFd) -> Option<u64> {
    // SAFETY: as in `bytes_acked`: an open descriptor, a zeroed plain C struct of `len`
    // bytes, and the kernel writes at most `len` bytes and updates it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_delivery_rate) + 8;
    (rc == 0 && len as usize >= needed).then_some(info.tcpi_delivery_rate)
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
            if conn.idle().await {
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
        let stream = tcp::connect(self.addr, &self.link).await?;
        let socket = SockRef::from(&stream);
        if !matches!(purpose, Use::Ping) {
            let _ = socket.set_linger(Some(Duration::ZERO));
        }
        let mut builder = Builder::new();
        let mut acked = None;
        if let Use::Upload(total) = &purpose {
            let _ = socket.set_tcp_notsent_lowat(NOTSENT_LOWAT);
            builder.max_buf_size(UPLOAD_BUF);
            // A second descriptor of the same socket, readable while hyper owns the
            // stream; the socket closes (with its reset) when both are gone.
            let dup = socket.try_clone().map_err(|e| {
                ProbeError::new(ErrorClass::Local, format!("duplicate upload socket: {e}"))
            })?;
            acked = Some(total.register(dup));
        }
        let mut conn = if self.https {
            let config = tls::client_config(self.insecure_tls, &[b"http/1.1"]);
            let (stream, _, _) = tls::handshake(stream, &self.host, config).await?;
            handshake(&builder, stream).await?
        } else {
            handshake(&builder, stream).await?
        };
        conn._acked = acked;
        Ok(conn)
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
    Ok(Conn {
        sender,
        task,
        _acked: None,
    })
}

impl<B> Conn<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Waits until the connection can take another request (hyper has written the last
    /// request's body) or is gone; true when it can.
    pub async fn idle(&mut self) -> bool {
        !self.sender.is_closed() && self.sender.ready().await.is_ok()
    }

    /// Upload connections: the bytes the peer acknowledged on this socket so far.
    pub fn acked(&self) -> Option<u64> {
        self._acked.as_ref().and_then(AckedSocket::acked)
    }

    /// Upload connections: counts no byte this socket's peer acknowledges past `mark`
    /// (bytes its kernel took that the target never read).
    pub fn forfeit_after(&self, mark: u64) {
        if let Some(socket) = &self._acked {
            socket.cap(mark);
        }
    }

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
            // hyper reports a body it cannot parse (a bad chunk size) as invalid data.
            let class = match io.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::InvalidData
                | std::io::ErrorKind::InvalidInput => ErrorClass::Protocol,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_acked_counts_what_the_peer_took() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let acked = Arc::new(Acked::default());
        let registered = acked.register(SockRef::from(&client).try_clone().unwrap());
        client.write_all(&[1u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        server.read_exact(&mut got).unwrap();
        // The acknowledgement follows the data; loopback takes microseconds.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(acked.total(), Some(100_000));
        drop(registered);
        assert_eq!(
            acked.total(),
            Some(100_000),
            "kept after the socket is gone"
        );
    }
}
