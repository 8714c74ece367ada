//! The gRPC listener: the socket with an explicit accept queue, and the accept loop on a
//! thread of its own.
//!
//! A fleet reconnects at once when a collector restarts: 10,000 agents inside a quarter of
//! a second. The kernel keeps connections that finished their TCP handshake in the
//! listener's accept queue until the process accepts them; when the queue is full it drops
//! them (`TcpExtListenOverflows`) and the agent's connect fails or stalls. Two things keep
//! the queue from overflowing:
//!
//! - Its length is set explicitly (`[server] listen_backlog`, default the kernel's
//!   `net.core.somaxconn`, which also caps it). tokio's `TcpListener::bind` asks for 1,024,
//!   so socket2 creates the socket here.
//! - Accepting runs on a dedicated thread with its own single-threaded runtime, so it keeps
//!   draining the queue while the async workers are busy setting up the streams it handed
//!   over (on the shared runtime the accept task waits its turn behind thousands of them).
//!   Accepted sockets leave that runtime (`into_std`) and join the server's on arrival.
//!
//! Invariant: accepting never waits for anything but the kernel: not for TLS handshake
//! slots, not for the server taking the previous connection. The sockets waiting in between
//! are bounded by the process's file descriptor limit (`accept` failing with EMFILE backs
//! off).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";
/// Used when `SOMAXCONN` cannot be read; the kernel's default since Linux 5.4.
const FALLBACK_BACKLOG: u32 = 4096;

/// The kernel's cap on any listener's accept queue.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string(SOMAXCONN).ok()?.trim().parse().ok()
}

/// A bound, listening socket and the accept queue length it asked for.
pub struct Listener {
    socket: std::net::TcpListener,
    pub backlog: u32,
}

/// Binds `addr` and listens with `backlog` (default: `net.core.somaxconn`). A value above
/// `somaxconn` is passed on (the kernel truncates it silently) and logged.
pub fn bind(addr: SocketAddr, backlog: Option<u32>) -> io::Result<Listener> {
    let cap = somaxconn();
    let backlog = backlog.or(cap).unwrap_or(FALLBACK_BACKLOG);
    if let Some(cap) = cap.filter(|&cap| backlog > cap) {
        tracing::warn!(
            listen_backlog = backlog,
            somaxconn = cap,
            "[server] listen_backlog is above net.core.somaxconn; the kernel caps the accept queue at {cap} (raise the sysctl)"
        );
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's bind does: a restarted collector rebinds while old connections linger in
    // TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(Listener {
        socket: socket.into(),
        backlog,
    })
}

/// Accepted connections, in the order they were accepted, registered with the runtime that
/// polls this stream.
pub struct Accepted {
    rx: mpsc::UnboundedReceiver<std::net::TcpStream>,
}

impl tokio_stream::Stream for Accepted {
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|s| s.map(TcpStream::from_std))
    }
}

/// Starts the accept thread; it stops, closing the listener (new connects are refused), at
/// `shutdown` or when the stream is dropped.
pub fn accept(listener: Listener, shutdown: CancellationToken) -> io::Result<Accepted> {
    let (tx, rx) = mpsc::unbounded_channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("grpc-accept".into())
        .spawn(move || runtime.block_on(accept_loop(listener.socket, tx, shutdown)))?;
    Ok(Accepted { rx })
}

async fn accept_loop(
    socket: std::net::TcpListener,
    tx: mpsc::UnboundedSender<std::net::TcpStream>,
    shutdown: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot register the grpc listener: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted.and_then(|(stream, _)| {
            stream.set_nodelay(true)?;
            stream.into_std()
        }) {
            Ok(stream) => {
                if tx.send(stream).is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_defaults_to_somaxconn_and_can_be_set() {
        let l = bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert_eq!(l.backlog, somaxconn().unwrap_or(FALLBACK_BACKLOG));
        let l = bind("127.0.0.1:0".parse().unwrap(), Some(17)).unwrap();
        assert_eq!(l.backlog, 17);
    }

    #[test]
    fn the_kernel_queues_no_more_than_the_backlog() {
        // Linux keeps backlog + 1 handshaken connections in the accept queue and drops the
        // SYNs beyond (a listener made by tokio's bind would take 1,025).
        let l = bind("127.0.0.1:0".parse().unwrap(), Some(4)).unwrap();
        let addr = l.socket.local_addr().unwrap();
        let clients: Vec<_> = (0..8)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()
            })
            .collect();
        assert_eq!(clients.len(), 5);
        // tx_queue:rx_queue of a listener (state 0A) in /proc/net/tcp is its accept queue.
        let queued = std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .find_map(|line| {
                let f: Vec<_> = line.split_whitespace().collect();
                let port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
                (port == addr.port() && f[3] == "0A")
                    .then(|| u32::from_str_radix(f[4].rsplit(':').next().unwrap(), 16).unwrap())
            })
            .expect("the listener in /proc/net/tcp");
        assert_eq!(queued, 5);
    }

    #[tokio::test]
    async fn accepted_streams_reach_the_server_runtime() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_stream::StreamExt;
        let l = bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = l.socket.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let mut accepted = accept(l, shutdown.clone()).unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = accepted.next().await.unwrap().unwrap();
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        shutdown.cancel();
        // The listener closes with the thread: connects are refused.
        let refused = async {
            loop {
                if TcpStream::connect(addr).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), refused)
            .await
            .expect("the listener closes at shutdown");
    }
}
