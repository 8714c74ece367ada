//! Target syntax, without I/O: `host:port`, http(s) URLs with IPv6 zones (RFC 4007, RFC
//! 6874), IP literals, the per-kind check `check` and `tests apply` run, and `redact`, the
//! one place a URL's password is hidden. Resolution (getaddrinfo, interface indexes) is
//! the agent's (`probe::addr`).
//!
//! - Zones: `fe80::2%eth0` in every kind's target and in dns `server`, written
//!   `[fe80::2%eth0]:8080` with a port and `http://[fe80::2%25eth0]:8080/` in a URL (a bare
//!   `%eth0` is taken there too). The zone is never sent to the peer.
//! - `redact` is the only place that hides a URL's password; every target that leaves a
//!   probe (result, output, logs, `check`) goes through it.

use std::borrow::Cow;
use std::net::IpAddr;

use super::Kind;
use crate::bounds;

/// An IP literal and its zone, if any (`fe80::2%eth0`, `[fe80::2%eth0]`, `192.0.2.1`).
pub fn parse_ip(host: &str) -> Option<(IpAddr, Option<&str>)> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let (ip, zone) = match host.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (host, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    match zone {
        Some(z) if z.is_empty() || ip.is_ipv4() => None,
        _ => Some((ip, zone)),
    }
}

/// An http(s) URL parsed, its IPv6 zone kept apart (the URL parser knows none).
#[derive(Debug, Clone)]
pub struct HttpUrl {
    pub url: url::Url,
    pub zone: Option<String>,
}

impl HttpUrl {
    pub fn parse(target: &str) -> Result<HttpUrl, String> {
        let bad = |why: &dyn std::fmt::Display| {
            format!("target `{}` is not a URL: {why}", redact(target))
        };
        let (plain, zone) = take_zone(target.trim());
        let url = url::Url::parse(&plain).map_err(|e| bad(&e))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "target `{}` must start with http:// or https://",
                redact(target)
            ));
        }
        match (url.host(), &zone) {
            (None, _) => return Err(bad(&"no host")),
            (Some(url::Host::Ipv6(_)), _) | (_, None) => {}
            (Some(_), Some(_)) => return Err(bad(&"a zone is only for an IPv6 address")),
        }
        Ok(HttpUrl { url, zone })
    }

    pub fn https(&self) -> bool {
        self.url.scheme() == "https"
    }

    pub fn port(&self) -> u16 {
        self.url
            .port_or_known_default()
            .unwrap_or(if self.https() { 443 } else { 80 })
    }

    /// The host for resolving: a name, or an IP literal with its zone.
    pub fn host(&self) -> String {
        match (self.url.host(), &self.zone) {
            (Some(url::Host::Ipv6(ip)), Some(zone)) => format!("{ip}%{zone}"),
            (Some(url::Host::Ipv6(ip)), None) => ip.to_string(),
            (Some(host), _) => host.to_string(),
            (None, _) => String::new(),
        }
    }

    /// The `Host` header: host and non-default port, no userinfo, no zone.
    pub fn authority(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    /// The request target: path and query.
    pub fn path_and_query(&self) -> String {
        match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_string(),
        }
    }

    /// `user` and `password` percent-decoded, when the URL carries a user.
    pub fn credentials(&self) -> Option<(String, String)> {
        if self.url.username().is_empty() && self.url.password().is_none() {
            return None;
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Some((
            decode(self.url.username()),
            decode(self.url.password().unwrap_or_default()),
        ))
    }

    /// Same scheme, host (and zone) and port: where credentials may go again.
    pub fn same_origin(&self, other: &HttpUrl) -> bool {
        self.url.origin() == other.url.origin() && self.zone == other.zone
    }

    /// A `Location` resolved against this URL; a relative one keeps this URL's zone.
    pub fn join(&self, location: &str) -> Result<HttpUrl, String> {
        if location.contains("://") {
            return HttpUrl::parse(location);
        }
        let url = self
            .url
            .join(location)
            .map_err(|e| format!("bad Location `{location}`: {e}"))?;
        let zone = (url.host() == self.url.host()).then(|| self.zone.clone());
        Ok(HttpUrl {
            url,
            zone: zone.flatten(),
        })
    }
}

/// Takes the zone out of a URL's bracketed host: `http://[fe80::2%25eth0]:80/` is
/// `http://[fe80::2]:80/` and `eth0`. `%25` is RFC 6874's form; a bare `%` is taken too
/// when what follows is not an escape.
fn take_zone(target: &str) -> (Cow<'_, str>, Option<String>) {
    let Some(open) = target.find("://").map(|i| i + 3) else {
        return (Cow::Borrowed(target), None);
    };
    let authority_end = target[open..]
        .find(['/', '?', '#'])
        .map_or(target.len(), |i| open + i);
    let authority = &target[open..authority_end];
    let (Some(lb), Some(rb)) = (authority.find('['), authority.find(']')) else {
        return (Cow::Borrowed(target), None);
    };
    let Some(pct) = authority[lb..rb].find('%').map(|i| lb + i) else {
        return (Cow::Borrowed(target), None);
    };
    let raw = &authority[pct + 1..rb];
    let raw = raw.strip_prefix("25").unwrap_or(raw);
    let zone = percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned();
    let plain = format!(
        "{}{}{}",
        &target[..open + pct],
        &authority[rb..],
        &target[authority_end..]
    );
    (Cow::Owned(plain), Some(zone))
}

/// The target with a URL's password replaced by `***` (`user:***@host`): the only form of
/// a target that is stored, shown or logged.
pub fn redact(target: &str) -> Cow<'_, str> {
    let Some(open) = target.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(target);
    };
    let authority_end = target[open..]
        .find(['/', '?', '#'])
        .map_or(target.len(), |i| open + i);
    let Some(at) = target[open..authority_end].rfind('@').map(|i| open + i) else {
        return Cow::Borrowed(target);
    };
    match target[open..at].find(':').map(|i| open + i) {
        Some(colon) => Cow::Owned(format!("{}:***{}", &target[..colon], &target[at..])),
        None => Cow::Borrowed(target),
    }
}

/// Checks a target's syntax for its kind (reachability is the probe's business). Messages
/// show the target with its password redacted.
pub fn check_target(kind: Kind, target: &str) -> Result<(), String> {
    bounds::target(target).map_err(|e| e.to_string())?;
    let shown = redact(target);
    match kind {
        Kind::Http | Kind::Responsiveness => {
            HttpUrl::parse(target)?;
        }
        Kind::Speed => {
            let uri: http::Uri = target
                .parse()
                .map_err(|e| format!("target `{shown}` is not a URL: {e}"))?;
            match uri.scheme_str() {
                Some("http") | Some("https") => {}
                _ => {
                    return Err(format!(
                        "target `{shown}` must start with http:// or https://"
                    ))
                }
            }
            if uri.host().is_none() {
                return Err(format!("target `{shown}` has no host"));
            }
        }
        Kind::Tcp => {
            let (host, port) = target
                .rsplit_once(':')
                .ok_or_else(|| format!("target `{target}` must be host:port"))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("target `{target}` must be host:port"));
            }
        }
        Kind::Stamp => {
            stamp_host_port(target)?;
        }
        Kind::Icmp | Kind::Dns | Kind::Path => {
            if target.contains(char::is_whitespace) || target.contains('/') {
                return Err(format!("target `{target}` must be a host name or address"));
            }
        }
    }
    Ok(())
}

/// A stamp target (SPEC section 17): `host`, `host:port`, `[v6]:port` or a bare IPv6
/// address (zones allowed); the port defaults to the STAMP port 862. Returns the host
/// without brackets and the port.
pub fn stamp_host_port(target: &str) -> Result<(&str, u16), String> {
    let bad = || {
        format!(
            "target `{target}` must be host, host:port, [IPv6]:port or an IPv6 address \
             (the reflector's UDP port defaults to {})",
            super::test::defaults::STAMP_PORT
        )
    };
    if target.is_empty() || target.contains(char::is_whitespace) || target.contains('/') {
        return Err(bad());
    }
    let port_of = |p: &str| match p.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad()),
    };
    if let Some(rest) = target.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        if host.is_empty() {
            return Err(bad());
        }
        return match after {
            "" => Ok((host, super::test::defaults::STAMP_PORT)),
            _ => Ok((host, port_of(after.strip_prefix(':').ok_or_else(bad)?)?)),
        };
    }
    match target.matches(':').count() {
        0 => Ok((target, super::test::defaults::STAMP_PORT)),
        1 => {
            let (host, port) = target.split_once(':').ok_or_else(bad)?;
            if host.is_empty() {
                return Err(bad());
            }
            Ok((host, port_of(port)?))
        }
        // A bare IPv6 address: no port (brackets are needed for one).
        _ => Ok((target, super::test::defaults::STAMP_PORT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_targets() {
        assert_eq!(stamp_host_port("192.0.2.1"), Ok(("192.0.2.1", 862)));
        assert_eq!(stamp_host_port("r1.example:8620"), Ok(("r1.example", 8620)));
        assert_eq!(stamp_host_port("[2001:db8::1]:9"), Ok(("2001:db8::1", 9)));
        assert_eq!(stamp_host_port("[fe80::1%eth0]"), Ok(("fe80::1%eth0", 862)));
        assert_eq!(stamp_host_port("2001:db8::1"), Ok(("2001:db8::1", 862)));
        for bad in ["", "h:0", "h:x", ":862", "[::1]x", "a b", "http://h/"] {
            assert!(stamp_host_port(bad).is_err(), "{bad}");
            assert!(check_target(Kind::Stamp, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_redacted_and_nothing_else() {
        assert_eq!(
            redact("http://user:secret@127.0.0.1:8081/echo"),
            "http://user:***@127.0.0.1:8081/echo"
        );
        assert_eq!(
            redact("https://u:p%40ss:w@h/x?next=a@b"),
            "https://u:***@h/x?next=a@b"
        );
        assert_eq!(redact("http://user@h/"), "http://user@h/");
        assert_eq!(redact("http://h/a:b@c"), "http://h/a:b@c");
        assert_eq!(redact("[fe80::1%eth0]:80"), "[fe80::1%eth0]:80");
    }

    #[test]
    fn urls_with_zones_and_credentials() {
        let u = HttpUrl::parse("http://al%20ice:p%3Ass@[fe80::2%25vA]:8080/p?q=1").unwrap();
        assert_eq!(u.zone.as_deref(), Some("vA"));
        assert_eq!(u.host(), "fe80::2%vA");
        assert_eq!(u.authority(), "[fe80::2]:8080");
        assert_eq!(u.path_and_query(), "/p?q=1");
        assert_eq!(u.credentials(), Some(("al ice".into(), "p:ss".into())));
        let bare = HttpUrl::parse("http://[fe80::2%vA]/").unwrap();
        assert_eq!((bare.zone.as_deref(), bare.port()), (Some("vA"), 80));
        let next = u.join("/other").unwrap();
        assert_eq!(next.zone.as_deref(), Some("vA"));
        assert!(u.same_origin(&next));
        assert!(HttpUrl::parse("http://h%25x/").is_err());
        assert!(HttpUrl::parse("ftp://h/").is_err());
        assert_eq!(HttpUrl::parse("https://h/").unwrap().credentials(), None);
    }
}
