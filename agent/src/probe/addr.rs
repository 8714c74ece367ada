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
//! - The link (`interface`, `source`, `family`, every kind): [`Link`] is made once per run
//!   from the test's options, and every socket a probe opens goes through
//!   [`Link::bind`] (SO_BINDTODEVICE, then bind to the source) before it connects or
//!   sends; names resolve through [`resolve`], which keeps to the family. An interface
//!   that does not exist or a source address not on the host is a `local` failure naming
//!   it: the socket is never opened unbound, so nothing falls back to the default route.
//! - `redact` is the only place that hides a URL's password; every target that leaves a
//!   probe (result, output, logs, `check`) goes through it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};

pub use edgeprobe_proto::testdef::IpFamily;
use socket2::SockRef;

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

/// The link a run leaves by (the test's `interface`, `source` and `family`) and what it
/// used: the family and local address of the first socket it bound. One per run; clones
/// share what was used.
#[derive(Debug, Clone, Default)]
pub struct Link {
    pub interface: Option<String>,
    pub source: Option<String>,
    pub family: IpFamily,
    used: Arc<Mutex<Used>>,
}

#[derive(Debug, Clone, Default)]
struct Used {
    family: Option<IpFamily>,
    local: Option<IpAddr>,
}

impl Link {
    pub fn of(options: &crate::config::TestOptions) -> Link {
        Link {
            interface: options.interface.clone(),
            source: options.source.clone(),
            family: options.family.unwrap_or_default(),
            used: Arc::default(),
        }
    }

    /// Whether sockets are bound (an interface or a source is set).
    pub fn binds(&self) -> bool {
        self.interface.is_some() || self.source.is_some()
    }

    /// The family the run used ("ipv4"/"ipv6"), "" when it opened no socket.
    pub fn used_family(&self) -> &'static str {
        match self.used.lock().unwrap_or_else(|p| p.into_inner()).family {
            Some(IpFamily::Ipv4) => "ipv4",
            Some(IpFamily::Ipv6) => "ipv6",
            _ => "",
        }
    }

    /// The local address of the run's first socket that had one, "" when none.
    pub fn used_local(&self) -> String {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.local.map(|ip| ip.to_string()).unwrap_or_default()
    }

    fn note_family(&self, dest: &SocketAddr) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.family.get_or_insert(if dest.is_ipv4() {
            IpFamily::Ipv4
        } else {
            IpFamily::Ipv6
        });
    }

    /// Records the local address of a socket (once bound or connected); the first one that
    /// is not the unspecified address counts.
    pub fn note_local(&self, local: Option<SocketAddr>) {
        let Some(local) = local.filter(|l| !l.ip().is_unspecified()) else {
            return;
        };
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.local.get_or_insert(local.ip());
    }

    /// Binds a new socket that will talk to `dest` to the link: SO_BINDTODEVICE to
    /// `interface`, then `source` (port 0). Every socket a probe opens goes through here
    /// before it connects or sends.
    pub fn bind(&self, socket: SockRef<'_>, dest: SocketAddr) -> Result<(), ProbeError> {
        self.note_family(&dest);
        if let Some(interface) = &self.interface {
            socket
                .bind_device(Some(interface.as_bytes()))
                .map_err(|e| {
                    let why = if e.raw_os_error() == Some(libc::ENODEV) {
                        "no such interface on this host".to_string()
                    } else {
                        e.to_string()
                    };
                    ProbeError::new(
                        ErrorClass::Local,
                        format!("cannot bind to interface `{interface}`: {why}"),
                    )
                })?;
        }
        if let Some(source) = &self.source {
            let local = self.source_addr(source, &dest)?;
            socket.bind(&local.into()).map_err(|e| {
                let why = if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                    "the address is not on this host".to_string()
                } else {
                    e.to_string()
                };
                ProbeError::new(
                    ErrorClass::Local,
                    format!("cannot bind to source address {source}: {why}"),
                )
            })?;
        }
        self.note_local(socket.local_addr().ok().and_then(|a| a.as_socket()));
        Ok(())
    }

    fn source_addr(&self, source: &str, dest: &SocketAddr) -> Result<SocketAddr, ProbeError> {
        let (ip, zone) = parse_ip(source.trim()).ok_or_else(|| {
            ProbeError::new(
                ErrorClass::Local,
                format!("source `{source}` is not an IP address"),
            )
        })?;
        if ip.is_ipv4() != dest.is_ipv4() {
            return Err(ProbeError::new(
                ErrorClass::Local,
                format!(
                    "source address {source} is {} but {} is {}",
                    family_name(&ip),
                    dest.ip(),
                    family_name(&dest.ip())
                ),
            ));
        }
        socket_addr(ip, zone, 0)
    }

    /// The wildcard address of `dest`'s family (for sockets that must be bound to send).
    pub fn unspecified(dest: &SocketAddr) -> SocketAddr {
        if dest.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        }
    }
}

fn family_name(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// A UDP socket for `dest` over the link, bound (to the source, or the wildcard).
pub fn udp_socket(dest: SocketAddr, link: &Link) -> Result<std::net::UdpSocket, ProbeError> {
    let local_err = |e: std::io::Error| {
        ProbeError::new(
            ErrorClass::Local,
            format!("cannot open a UDP socket for {dest}: {e}"),
        )
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(dest),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(local_err)?;
    link.bind(SockRef::from(&socket), dest)?;
    if link.source.is_none() {
        socket
            .bind(&Link::unspecified(&dest).into())
            .map_err(local_err)?;
    }
    Ok(socket.into())
}

/// The address to connect to: an IP literal (with its zone) as it is, a name through the
/// system resolver (getaddrinfo), its first address of the link's family (`family`).
pub async fn resolve(host: &str, port: u16, link: &Link) -> Result<SocketAddr, ProbeError> {
    if let Some((ip, zone)) = parse_ip(host) {
        if !link.family.admits(&ip) {
            return Err(ProbeError::new(
                ErrorClass::Local,
                format!(
                    "{ip} is {} but the test's family is {}",
                    family_name(&ip),
                    link.family.name()
                ),
            ));
        }
        return socket_addr(ip, zone, port);
    }
    if host.contains('%') {
        return Err(ProbeError::new(
            ErrorClass::Local,
            format!("`{host}`: a zone (%interface) needs an IPv6 address before it"),
        ));
    }
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ProbeError::new(ErrorClass::Dns, format!("cannot resolve {host}: {e}")))?;
    let mut addrs = addrs.filter(|a| link.family.admits(&a.ip()));
    let addr = addrs.next().ok_or_else(|| match link.family {
        IpFamily::Ipv4 => ProbeError::new(ErrorClass::Dns, format!("{host} has no IPv4 address")),
        IpFamily::Ipv6 => ProbeError::new(ErrorClass::Dns, format!("{host} has no IPv6 address")),
        _ => ProbeError::new(ErrorClass::Dns, format!("{host} has no addresses")),
    })?;
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

    fn link(interface: Option<&str>, source: Option<&str>) -> Link {
        Link {
            interface: interface.map(str::to_string),
            source: source.map(str::to_string),
            ..Link::default()
        }
    }

    /// A missing interface, an address not on the host and a source of the other family
    /// are `local` failures naming them; a good binding records its family and address.
    #[test]
    fn link_binding_fails_locally_and_records_what_it_used() {
        let dest: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for (l, named) in [
            (link(Some("nonexistent7"), None), "nonexistent7"),
            (link(None, Some("192.0.2.77")), "192.0.2.77"),
            (link(None, Some("::1")), "::1"),
        ] {
            let e = udp_socket(dest, &l).unwrap_err();
            assert_eq!(e.class, ErrorClass::Local, "{}", e.message);
            assert!(e.message.contains(named), "{}", e.message);
        }
        let l = link(Some("lo"), Some("127.0.0.1"));
        let socket = udp_socket(dest, &l).unwrap();
        assert_eq!(socket.local_addr().unwrap().ip(), dest.ip());
        assert_eq!(
            (l.used_family(), l.used_local().as_str()),
            ("ipv4", "127.0.0.1")
        );
        assert_eq!(Link::default().used_family(), "");
    }

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
