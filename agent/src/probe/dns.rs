//! dns probe: one query for `name`/`record_type` (default A) to a given server (`server`,
//! `ip` or `ip:port`, IPv6 with a zone: `fe80::1%eth0`, `[fe80::1%eth0]:53`) or to the
//! first `nameserver` of /etc/resolv.conf (its zone kept), timed from the first datagram
//! to the matching answer.
//!
//! Without `server`, A and AAAA go through the system resolver (getaddrinfo), so
//! /etc/hosts and nsswitch count as they do for every other program on the host; other
//! record types ask the first `nameserver` of /etc/resolv.conf. With `server`, every
//! type is asked of that server.
//!
//! - The query goes over UDP with EDNS (1232-byte payload), is resent every second until
//!   the run's deadline, and is repeated over TCP when the answer is truncated.
//! - An answer counts only if its id, QR bit and question match the query; anything else
//!   arriving on the socket is ignored, so a confused or hostile server cannot end the run.
//! - An answer whose header and question match but whose rest cannot be parsed (a record
//!   with a wrong RDLENGTH, SVCB keys out of order, ...) is the server's answer all the
//!   same: a `protocol` failure at once, naming the record that could not be parsed and
//!   keeping `resolve_seconds`, not a wait for an answer that already came.
//! - NOERROR is success, also with an empty answer section (NODATA), like
//!   blackbox-exporter's default; any other rcode is a failure of class `dns` that keeps
//!   the rcode and the answer count.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::timeout_at;

use super::{addr, secs, DnsFields, ErrorClass, Fields, Measured, Partial, ProbeError, ProbeSpec};

/// Time between UDP retransmissions of the query.
const RESEND: Duration = Duration::from_secs(1);
/// Where the system resolver's servers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let mut fields = DnsFields::default();
    let error = measure(spec, &mut fields, partial).await.err();
    (Fields::Dns(fields), error)
}

async fn measure(
    spec: &ProbeSpec,
    fields: &mut DnsFields,
    partial: &Partial,
) -> Result<(), ProbeError> {
    // Finish a little before the outer limit so a timeout is reported here, with context.
    let limit = spec.options.timeout_for(spec.kind);
    let deadline = tokio::time::Instant::now()
        + limit.saturating_sub((limit / 10).min(Duration::from_millis(500)));

    // The name is taken as absolute: no search domains, as dig does.
    let mut name = Name::from_str(spec.target.trim()).map_err(|e| {
        ProbeError::new(
            ErrorClass::Local,
            format!("bad name `{}`: {e}", spec.target),
        )
    })?;
    name.set_fqdn(true);
    let record_type = spec.options.record_type.as_deref().unwrap_or("A");
    let rtype = RecordType::from_str(&record_type.to_ascii_uppercase()).map_err(|_| {
        ProbeError::new(
            ErrorClass::Local,
            format!("unknown record type `{record_type}`"),
        )
    })?;
    let server = match &spec.options.server {
        Some(s) => parse_server(s)?,
        // Bound to a link or a family, the query must leave by it: the first nameserver
        // (of that family) is asked directly (getaddrinfo's sockets cannot be bound).
        None if matches!(rtype, RecordType::A | RecordType::AAAA)
            && !spec.link.binds()
            && matches!(spec.link.family, addr::IpFamily::Any | addr::IpFamily::Both) =>
        {
            partial.publish(
                Fields::Dns(fields.clone()),
                "waiting for the system resolver",
            );
            return system_lookup(spec.target.trim(), rtype, deadline, fields).await;
        }
        None => system_server(spec.link.family)?,
    };
    if !spec.link.family.admits(&server.ip()) {
        return Err(ProbeError::new(
            ErrorClass::Local,
            format!(
                "the server {server} is not in the test's family {}",
                spec.link.family.name()
            ),
        ));
    }

    let mut query = Message::new();
    query
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    query.set_edns(edns);
    let wire = query
        .to_vec()
        .map_err(|e| ProbeError::new(ErrorClass::Local, format!("cannot encode the query: {e}")))?;

    partial.publish(
        Fields::Dns(fields.clone()),
        format!("waiting for an answer from {server}"),
    );
    let start = Instant::now();
    let exchange = async {
        let answer = ask_udp(server, &wire, &query, deadline, &spec.link).await?;
        if answer.truncated() {
            return ask_tcp(server, &wire, &query, deadline, &spec.link).await;
        }
        Ok(answer)
    };
    let answer = exchange.await.inspect_err(|e| {
        // A malformed answer is an answer: its time counts.
        if e.class == ErrorClass::Protocol {
            fields.resolve_seconds = Some(secs(start.elapsed()));
        }
    })?;
    fields.resolve_seconds = Some(secs(start.elapsed()));
    fields.answers = answer.answers().len() as u32;
    let rcode = answer.response_code();
    fields.rcode = rcode_name(rcode);
    if rcode != ResponseCode::NoError {
        return Err(ProbeError::new(
            ErrorClass::Dns,
            format!(
                "{} {record_type}: {} from {server}",
                spec.target, fields.rcode
            ),
        ));
    }
    Ok(())
}

/// A or AAAA through getaddrinfo (on tokio's blocking pool), counting the addresses of the
/// asked family. getaddrinfo reports no rcode: success is NOERROR, failure has none.
async fn system_lookup(
    name: &str,
    rtype: RecordType,
    deadline: tokio::time::Instant,
    fields: &mut DnsFields,
) -> Result<(), ProbeError> {
    let start = Instant::now();
    let lookup = timeout_at(
        deadline,
        tokio::net::lookup_host((name.trim_end_matches('.'), 0)),
    )
    .await
    .map_err(|_| {
        ProbeError::new(
            ErrorClass::Timeout,
            format!("{name}: no answer from the system resolver"),
        )
    })?;
    fields.resolve_seconds = Some(secs(start.elapsed()));
    match lookup {
        Ok(addrs) => {
            let want_v4 = rtype == RecordType::A;
            fields.answers = addrs.filter(|a| a.is_ipv4() == want_v4).count() as u32;
            fields.rcode = "NOERROR".into();
            Ok(())
        }
        Err(e) => Err(ProbeError::new(
            ErrorClass::Dns,
            format!("{name} {rtype}: system resolver: {e}"),
        )),
    }
}

/// `ip`, `ip:port`, `[v6]:port`, each IPv6 with an optional `%zone`; port 53 by default.
fn parse_server(s: &str) -> Result<SocketAddr, ProbeError> {
    let s = s.trim();
    let bad = || {
        ProbeError::new(
            ErrorClass::Local,
            format!("server `{s}` is not ip or ip:port"),
        )
    };
    let (host, port) = match addr::parse_ip(s) {
        Some(_) => (s, 53),
        None => {
            let (host, port) = addr::split_host_port(s).map_err(|_| bad())?;
            if !s.starts_with('[') && host.contains(':') {
                return Err(bad());
            }
            (host, port)
        }
    };
    let (ip, zone) = addr::parse_ip(host).ok_or_else(bad)?;
    addr::socket_addr(ip, zone, port)
}

/// The first `nameserver` of /etc/resolv.conf in `family`, or 127.0.0.1 (::1 for ipv6)
/// like glibc when none is listed.
fn system_server(family: addr::IpFamily) -> Result<SocketAddr, ProbeError> {
    let text = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    let in_family = text
        .lines()
        .filter(|l| first_nameserver(l).is_some_and(|(ip, _)| family.admits(&ip)))
        .collect::<Vec<_>>()
        .join("\n");
    match first_nameserver(&in_family) {
        Some((ip, zone)) => addr::socket_addr(ip, zone.as_deref(), 53).map_err(|e| {
            ProbeError::new(e.class, format!("{RESOLV_CONF}: nameserver {}", e.message))
        }),
        None if family == addr::IpFamily::Ipv6 => {
            Ok(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), 53))
        }
        None => Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53)),
    }
}

/// The address and zone (`fe80::1%eth0`) of the first `nameserver` line.
fn first_nameserver(resolv_conf: &str) -> Option<(IpAddr, Option<String>)> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            return None;
        }
        let (ip, zone) = addr::parse_ip(words.next()?)?;
        Some((ip, zone.map(str::to_string)))
    })
}

fn io_error(server: SocketAddr, what: &str, e: std::io::Error) -> ProbeError {
    ProbeError::new(ErrorClass::of_io(&e), format!("{what} {server}: {e}"))
}

fn timeout(server: SocketAddr) -> ProbeError {
    ProbeError::new(ErrorClass::Timeout, format!("no answer from {server}"))
}

async fn ask_udp(
    server: SocketAddr,
    wire: &[u8],
    query: &Message,
    deadline: tokio::time::Instant,
    link: &addr::Link,
) -> Result<Message, ProbeError> {
    let socket = addr::udp_socket(server, link)?;
    socket
        .set_nonblocking(true)
        .map_err(|e| io_error(server, "cannot open a UDP socket for", e))?;
    let socket = UdpSocket::from_std(socket)
        .map_err(|e| io_error(server, "cannot open a UDP socket for", e))?;
    // Connected, so the kernel drops datagrams from other peers and reports port
    // unreachable as ECONNREFUSED.
    socket
        .connect(server)
        .await
        .map_err(|e| io_error(server, "cannot reach", e))?;
    link.note_local(socket.local_addr().ok());
    let mut buf = vec![0u8; 65535];
    loop {
        socket
            .send(wire)
            .await
            .map_err(|e| io_error(server, "cannot send to", e))?;
        let resend = (tokio::time::Instant::now() + RESEND).min(deadline);
        loop {
            match timeout_at(resend, socket.recv(&mut buf)).await {
                Err(_) if resend >= deadline => return Err(timeout(server)),
                Err(_) => break,
                Ok(Err(e)) => return Err(io_error(server, "no answer from", e)),
                Ok(Ok(n)) => {
                    if let Some(answer) = matching(query, &buf[..n]) {
                        return answer.map_err(|why| malformed(server, why));
                    }
                }
            }
        }
    }
}

async fn ask_tcp(
    server: SocketAddr,
    wire: &[u8],
    query: &Message,
    deadline: tokio::time::Instant,
    link: &addr::Link,
) -> Result<Message, ProbeError> {
    let exchange = async {
        let mut stream = super::tcp::connect(server, link).await?;
        let mut framed = Vec::with_capacity(wire.len() + 2);
        framed.extend_from_slice(&(wire.len() as u16).to_be_bytes());
        framed.extend_from_slice(wire);
        stream
            .write_all(&framed)
            .await
            .map_err(|e| io_error(server, "cannot send (TCP) to", e))?;
        loop {
            let len = stream
                .read_u16()
                .await
                .map_err(|e| io_error(server, "no answer (TCP) from", e))?;
            let mut buf = vec![0u8; len as usize];
            stream
                .read_exact(&mut buf)
                .await
                .map_err(|e| io_error(server, "short answer (TCP) from", e))?;
            if let Some(answer) = matching(query, &buf) {
                return answer.map_err(|why| malformed(server, why));
            }
        }
    };
    timeout_at(deadline, exchange)
        .await
        .unwrap_or_else(|_| Err(timeout(server)))
}

/// The datagram parsed, if it answers this query (its id, QR bit and question match);
/// `Err` saying what could not be parsed when it answers but is malformed.
fn matching(query: &Message, datagram: &[u8]) -> Option<Result<Message, String>> {
    let mut decoder = BinDecoder::new(datagram);
    let header = Header::read(&mut decoder).ok()?;
    if header.id() != query.id() || header.message_type() != MessageType::Response {
        return None;
    }
    let questions = (0..header.query_count())
        .map(|_| Query::read(&mut decoder))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let same_question = questions.len() == query.queries().len()
        && questions
            .iter()
            .zip(query.queries())
            .all(|(a, q)| a.query_type() == q.query_type() && a.name() == q.name());
    if !same_question {
        return None;
    }
    Some(Message::from_vec(datagram).map_err(|e| {
        // Say which record, where hickory's own error does not.
        let sections = [
            ("answer", header.answer_count()),
            ("authority", header.name_server_count()),
            ("additional", header.additional_count()),
        ];
        for (section, count) in sections {
            for i in 1..=count {
                if let Err(e) = Record::read(&mut decoder) {
                    return format!("{section} record {i} of {count}: {e}");
                }
            }
        }
        e.to_string()
    }))
}

fn malformed(server: SocketAddr, why: String) -> ProbeError {
    ProbeError::new(
        ErrorClass::Protocol,
        format!("malformed answer from {server}: {why}"),
    )
}

/// The rcode as dig prints it: NOERROR, NXDOMAIN, SERVFAIL, ...
fn rcode_name(rcode: ResponseCode) -> String {
    let name = match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::YXDomain => "YXDOMAIN",
        ResponseCode::YXRRSet => "YXRRSET",
        ResponseCode::NXRRSet => "NXRRSET",
        ResponseCode::NotAuth => "NOTAUTH",
        ResponseCode::NotZone => "NOTZONE",
        ResponseCode::BADVERS => "BADVERS",
        other => return format!("RCODE{}", u16::from(other)),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_with_and_without_port() {
        assert_eq!(
            parse_server("192.0.2.53").unwrap(),
            "192.0.2.53:53".parse().unwrap()
        );
        assert_eq!(
            parse_server("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_server("[::1]:5353").unwrap(),
            "[::1]:5353".parse().unwrap()
        );
        assert_eq!(parse_server("::1").unwrap(), "[::1]:53".parse().unwrap());
        let lo = |port| {
            SocketAddr::V6(std::net::SocketAddrV6::new(
                "fe80::2".parse().unwrap(),
                port,
                0,
                1,
            ))
        };
        assert_eq!(parse_server("fe80::2%lo").unwrap(), lo(53));
        assert_eq!(parse_server("[fe80::2%lo]:5353").unwrap(), lo(5353));
        assert_eq!(parse_server("[fe80::2%1]").unwrap(), lo(53));
        let e = parse_server("fe80::2").unwrap_err();
        assert!(e.message.contains("%interface"), "{}", e.message);
        assert_eq!(
            parse_server("resolver").unwrap_err().class,
            ErrorClass::Local
        );
    }

    #[test]
    fn resolv_conf_first_nameserver() {
        let conf =
            "# generated\nsearch example.net\nnameserver fe80::1%eth0\nnameserver 10.0.0.1\n";
        assert_eq!(
            first_nameserver(conf),
            Some(("fe80::1".parse().unwrap(), Some("eth0".to_string())))
        );
        assert_eq!(first_nameserver("options ndots:2\n"), None);
    }

    #[test]
    fn rcodes_print_like_dig() {
        assert_eq!(rcode_name(ResponseCode::NXDomain), "NXDOMAIN");
        assert_eq!(rcode_name(ResponseCode::NoError), "NOERROR");
        assert_eq!(rcode_name(ResponseCode::Unknown(3000)), "RCODE3000");
    }
}
