//! tcp probe: time to connect to `host:port`, and the TLS handshake when `tls = true`.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;

use super::{secs, tls, ErrorClass, Fields, Measured, ProbeError, ProbeSpec, TcpFields};

pub async fn run(spec: &ProbeSpec) -> Measured {
    let mut fields = TcpFields::default();
    let error = measure(spec, &mut fields).await.err();
    (Fields::Tcp(fields), error)
}

async fn measure(spec: &ProbeSpec, fields: &mut TcpFields) -> Result<(), ProbeError> {
    let (host, _port) = split_host_port(&spec.target)?;
    let addr = resolve(&spec.target).await?;
    let start = Instant::now();
    let stream = connect(addr).await?;
    fields.connect_seconds = Some(secs(start.elapsed()));
    if spec.options.tls.unwrap_or(false) {
        let config = tls::client_config(spec.options.insecure_tls.unwrap_or(false), &[]);
        let (_stream, took, _expiry) = tls::handshake(stream, host, config).await?;
        fields.tls_seconds = Some(secs(took));
    }
    Ok(())
}

/// Splits `host:port`, accepting `[v6]:port`.
pub fn split_host_port(target: &str) -> Result<(&str, u16), ProbeError> {
    let bad = || {
        ProbeError::new(
            ErrorClass::Local,
            format!("target `{target}` is not host:port"),
        )
    };
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().map_err(|_| bad())?;
    Ok((host, port))
}

/// Resolves `host:port` with the system resolver to its first address.
pub async fn resolve(host_port: &str) -> Result<SocketAddr, ProbeError> {
    let mut addrs = tokio::net::lookup_host(host_port).await.map_err(|e| {
        ProbeError::new(ErrorClass::Dns, format!("cannot resolve {host_port}: {e}"))
    })?;
    addrs
        .next()
        .ok_or_else(|| ProbeError::new(ErrorClass::Dns, format!("{host_port} has no addresses")))
}

pub async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ProbeError::new(ErrorClass::of_io(&e), format!("connect to {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
