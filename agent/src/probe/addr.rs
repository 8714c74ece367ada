//! Targets as addresses: `host:port` with IPv6 zones and resolution to a socket address.
//! The syntax of URLs and IP literals, and `redact`, are the test definition's
//! (`edgeprobe_proto::testdef`).
//!
//! - Zones: `fe80::2%eth0` (RFC 4007) in every kind's target and in dns `server`, written
//!   `[fe80::2%eth0]:8080` with a port and `http://[fe80::2%25eth0]:8080/` in a URL (RFC
//!   6874; a bare `%eth0` is taken there too). The zone is an interface name (resolved in
//!   the agent's network namespace with `SIOCGIFINDEX`) or an index, and becomes the
//!   address's scope id. It is never sent to the peer (not in `Host`, not in SNI).
//! - A link-local IPv6 address (fe80::/10) without a zone is ambiguous on a host with more
//!   than one interface: it is a `local` failure that asks for `%interface`, not an EINVAL
//!   from the kernel.
//! - `redact` is the only place that hides a URL's password; every target that leaves a
//!   probe (result, output, logs, `check`) goes through it.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

/// Target syntax is part of the test definition, shared with the collector.
pub use edgeprobe_proto::testdef::{parse_ip, redact, HttpUrl};

use super::{ErrorClass, ProbeError};

/// The socket address of an IP literal: the zone resolved to a scope id; a link-local
/// address without one is refused with a message that says how to write it.
pub fn socket_addr(ip: IpAddr, zone: Option<&str>, port: u16) -> Result<SocketAddr, ProbeError> {
    let IpAddr::V6(v6) = ip else {
        return Ok(SocketAddr::new(ip, port));
    };
    let scope = match zone {
        Some(zone) => scope_id(zone)?,
        None if is_link_local(&ip) => {
            return Err(ProbeError::new(
                ErrorClass::Local,
                format!(
                    "{ip} is link-local: name the interface as {ip}%interface \
                     (e.g. [{ip}%eth0]:{port}, or %25eth0 inside a URL)"
                ),
            ))
        }
        None => 0,
    };
    Ok(SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scope)))
}

/// fe80::/10, the addresses that mean nothing without an interface.
pub fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// An interface name or index as the scope id of this network namespace.
pub fn scope_id(zone: &str) -> Result<u32, ProbeError> {
    if let Ok(index) = zone.parse::<u32>() {
        return Ok(index);
    }
    let unknown = |e: &dyn std::fmt::Display| {
        ProbeError::new(
            ErrorClass::Local,
            format!("zone `%{zone}`: no such interface ({e})"),
        )
    };
    // Any socket will do for SIOCGIFINDEX; it answers for the caller's namespace.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|e| unknown(&e))?;
    rustix::net::netdevice::name_to_index(&socket, zone).map_err(|e| unknown(&e))
}

/// Splits `host:port`; `[v6]:port` and `[v6%zone]:port` keep the host without brackets.
pub fn split_host_port(target: &str) -> Result<(&str, u16), ProbeError> {
    let bad = || {
        ProbeError::new(
            ErrorClass::Local,
            format!("target `{}` is not host:port", redact(target)),
        )
    };
    let (host, port) = target.trim().rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port.parse().map_err(|_| bad())?))
}

/// The address to connect to: an IP literal (with its zone) as it is, a name through the
/// system resolver (getaddrinfo), its first address.
pub async fn resolve(host: &str, port: u16) -> Result<SocketAddr, ProbeError> {
    if let Some((ip, zone)) = parse_ip(host) {
        return socket_addr(ip, zone, port);
    }
    if host.contains('%') {
        return Err(ProbeError::new(
            ErrorClass::Local,
            format!("`{host}`: a zone (%interface) needs an IPv6 address before it"),
        ));
    }
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ProbeError::new(ErrorClass::Dns, format!("cannot resolve {host}: {e}")))?;
    let addr = addrs
        .next()
        .ok_or_else(|| ProbeError::new(ErrorClass::Dns, format!("{host} has no addresses")))?;
    match addr {
        SocketAddr::V6(v6) if v6.scope_id() == 0 && is_link_local(&addr.ip()) => {
            Err(ProbeError::new(
                ErrorClass::Local,
                format!(
                    "{host} resolves to the link-local {}, which needs an interface: \
                     use {}%interface as the target",
                    v6.ip(),
                    v6.ip()
                ),
            ))
        }
        _ => Ok(addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_with_zones() {
        assert_eq!(
            parse_ip("[fe80::2%vA]"),
            Some(("fe80::2".parse().unwrap(), Some("vA")))
        );
        assert_eq!(parse_ip("192.0.2.1%eth0"), None);
        assert_eq!(parse_ip("fe80::2%"), None);
        assert_eq!(parse_ip("example.net"), None);
        assert_eq!(
            split_host_port("[fe80::2%vA]:8080").unwrap(),
            ("fe80::2%vA", 8080)
        );
        let e = socket_addr("fe80::2".parse().unwrap(), None, 80).unwrap_err();
        assert_eq!(e.class, ErrorClass::Local);
        assert!(e.message.contains("%interface"), "{}", e.message);
        let a = socket_addr("fe80::2".parse().unwrap(), Some("7"), 80).unwrap();
        assert_eq!(
            a,
            SocketAddr::V6(SocketAddrV6::new("fe80::2".parse().unwrap(), 80, 0, 7))
        );
        assert_eq!(scope_id("lo").unwrap(), 1);
        assert_eq!(
            scope_id("nonexistent0").unwrap_err().class,
            ErrorClass::Local
        );
    }
}
