//! tcp probe: time to connect to `host:port` (`[v6]:port`, `[fe80::1%eth0]:port`), and
//! the TLS handshake when `tls = true`. Each phase is published as it ends, so a run cut
//! off by its limit (a peer that accepts and never answers the TLS hello) keeps its
//! connect time.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::{TcpSocket, TcpStream};

use super::{
    addr, secs, tls, ErrorClass, Fields, Measured, Partial, ProbeError, ProbeSpec, TcpFields,
};

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let mut fields = TcpFields::default();
    let error = measure(spec, &mut fields, partial).await.err();
    (Fields::Tcp(fields), error)
}

async fn measure(
    spec: &ProbeSpec,
    fields: &mut TcpFields,
    partial: &Partial,
) -> Result<(), ProbeError> {
    let (host, port) = addr::split_host_port(&spec.target)?;
    partial.publish(Fields::Tcp(fields.clone()), format!("resolving {host}"));
    let addr = addr::resolve(host, port, &spec.link).await?;
    partial.publish(Fields::Tcp(fields.clone()), format!("connecting to {addr}"));
    let start = Instant::now();
    let stream = connect(addr, &spec.link).await?;
    fields.connect_seconds = Some(secs(start.elapsed()));
    if spec.options.tls.unwrap_or(false) {
        partial.publish(
            Fields::Tcp(fields.clone()),
            format!("connected, TLS handshake with {addr}"),
        );
        let config = tls::client_config(spec.options.insecure_tls.unwrap_or(false), &[]);
        let name = addr::parse_ip(host).map_or(host.to_string(), |(ip, _)| ip.to_string());
        let (_stream, took, _expiry) = tls::handshake(stream, &name, config).await?;
        fields.tls_seconds = Some(secs(took));
    }
    Ok(())
}

/// Resolves `host:port` (an IP literal with its zone as it is, a name with the system
/// resolver) to its first address.
pub async fn resolve(host_port: &str, link: &addr::Link) -> Result<SocketAddr, ProbeError> {
    let (host, port) = addr::split_host_port(host_port)?;
    addr::resolve(host, port, link).await
}

/// A TCP connection to `addr` over the run's link (bound by [`addr::Link::bind`] before
/// it connects).
pub async fn connect(addr: SocketAddr, link: &addr::Link) -> Result<TcpStream, ProbeError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| ProbeError::new(ErrorClass::Local, format!("cannot open a TCP socket: {e}")))?;
    link.bind(socket2::SockRef::from(&socket), addr)?;
    let stream = socket.connect(addr).await.map_err(|e| {
        let class = match ErrorClass::of_io(&e) {
            // EINVAL on connect: a scope the address cannot use (a wrong interface).
            ErrorClass::Other if e.kind() == std::io::ErrorKind::InvalidInput => ErrorClass::Local,
            class => class,
        };
        ProbeError::new(class, format!("connect to {addr}: {e}"))
    })?;
    link.note_local(stream.local_addr().ok());
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
