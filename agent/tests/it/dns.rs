//! The dns probe against a small authoritative responder run here (UDP and TCP on one
//! port): answers, NXDOMAIN, silence, truncation, a closed port.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

use crate::util::{class, f64_of, probe};

/// `ok.test` has 2 A and 1 AAAA records (a stray answer with a wrong id comes first),
/// `big.test` is truncated over UDP and has 3 A records over TCP, `silent.test` gets no
/// answer, everything else is NXDOMAIN.
fn responder() -> SocketAddr {
    // One port for both: a free TCP port whose UDP twin is free too.
    let (udp, tcp) = (0..100)
        .find_map(|_| {
            let tcp = TcpListener::bind("127.0.0.1:0").ok()?;
            let udp = UdpSocket::bind(tcp.local_addr().ok()?).ok()?;
            Some((udp, tcp))
        })
        .expect("a port free for UDP and TCP");
    let addr = udp.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let name = query.queries()[0].name().to_ascii();
            if name == "silent.test." {
                continue;
            }
            if name == "ok.test." {
                let mut stray = answer(&query, false);
                stray.set_id(query.id().wrapping_add(1));
                let _ = udp.send_to(&stray.to_vec().unwrap(), from);
            }
            let reply = answer(&query, true);
            let _ = udp.send_to(&reply.to_vec().unwrap(), from);
        }
    });
    std::thread::spawn(move || {
        for stream in tcp.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut len = [0u8; 2];
            if stream.read_exact(&mut len).is_err() {
                continue;
            }
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            if stream.read_exact(&mut buf).is_err() {
                continue;
            }
            let Ok(query) = Message::from_vec(&buf) else {
                continue;
            };
            let wire = answer(&query, false).to_vec().unwrap();
            let _ = stream.write_all(&(wire.len() as u16).to_be_bytes());
            let _ = stream.write_all(&wire);
        }
    });
    addr
}

fn answer(query: &Message, udp: bool) -> Message {
    let q = &query.queries()[0];
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .add_query(q.clone());
    let name = q.name().clone();
    let record = |rdata| Record::from_rdata(name.clone(), 60, rdata);
    match (q.name().to_ascii().as_str(), q.query_type()) {
        ("ok.test.", RecordType::A) => {
            reply.add_answer(record(RData::A(A(Ipv4Addr::new(192, 0, 2, 1)))));
            reply.add_answer(record(RData::A(A(Ipv4Addr::new(192, 0, 2, 2)))));
        }
        ("ok.test.", RecordType::AAAA) => {
            reply.add_answer(record(RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))));
        }
        ("big.test.", _) if udp => {
            reply.set_truncated(true);
        }
        ("big.test.", _) => {
            for i in 1..=3 {
                reply.add_answer(record(RData::A(A(Ipv4Addr::new(198, 51, 100, i)))));
            }
        }
        ("ok.test.", _) => {}
        _ => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    reply
}

#[test]
fn dns_counts_answers_of_the_asked_type() {
    let server = responder().to_string();
    let (v, code) = probe("dns", "ok.test", &["--server", &server]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v["answers"].as_u64(),
        Some(2),
        "the stray answer with a wrong id is ignored"
    );
    assert_eq!(v["rcode"], "NOERROR");
    let took = f64_of(&v, "resolve_seconds");
    assert!(took > 0.0 && took < 0.5, "{took}");

    let (v, code) = probe(
        "dns",
        "ok.test.",
        &["--server", &server, "--record-type", "aaaa"],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["answers"].as_u64(), Some(1));

    let (v, code) = probe(
        "dns",
        "ok.test",
        &["--server", &server, "--record-type", "MX"],
    );
    assert_eq!(code, 0, "NODATA is a NOERROR answer: {v}");
    assert_eq!(v["answers"].as_u64(), Some(0));
}

#[test]
fn dns_nxdomain_is_a_dns_failure_with_its_rcode() {
    let server = responder().to_string();
    let (v, code) = probe("dns", "missing.test", &["--server", &server]);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "dns", "{v}");
    assert_eq!(v["rcode"], "NXDOMAIN");
    assert_eq!(v["answers"].as_u64(), Some(0));
    assert!(
        v["resolve_seconds"].as_f64().is_some(),
        "the time to NXDOMAIN is measured"
    );
}

#[test]
fn dns_truncated_answer_is_retried_over_tcp() {
    let server = responder().to_string();
    let (v, code) = probe("dns", "big.test", &["--server", &server]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["answers"].as_u64(), Some(3));
}

#[test]
fn dns_silent_server_times_out() {
    let server = responder().to_string();
    let (v, code) = probe(
        "dns",
        "silent.test",
        &["--server", &server, "--timeout", "2500ms"],
    );
    assert_eq!(code, 1);
    assert_eq!(class(&v), "timeout", "{v}");
    assert_eq!(v["rcode"], "");
    let took = f64_of(&v, "duration_seconds");
    assert!(
        (2.0..3.0).contains(&took),
        "resent until just before the limit: {took}"
    );
}

#[test]
fn dns_closed_port_is_refused_and_bad_input_is_local() {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (v, code) = probe(
        "dns",
        "ok.test",
        &["--server", &format!("127.0.0.1:{port}")],
    );
    assert_eq!(code, 1);
    assert_eq!(class(&v), "refused", "{v}");

    // Bad options are refused before anything is sent, as `check` refuses them: exit 2
    // with the reason, no result.
    for (args, reason) in [
        (
            &["--server", "127.0.0.1", "--record-type", "NOPE"][..],
            "record_type",
        ),
        (&["--server", "not-an-ip"][..], "server"),
    ] {
        let output = std::process::Command::new(crate::util::BIN)
            .args(["probe", "dns", "ok.test", "--json"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn dns_without_a_server_uses_the_system_resolver_and_its_hosts_file() {
    // localhost comes from /etc/hosts, which only the system resolver reads.
    let (v, code) = probe("dns", "localhost", &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["rcode"], "NOERROR");
    assert!(v["answers"].as_u64().is_some_and(|n| n >= 1), "{v}");
    let (v, code) = probe("dns", "no-such-host.invalid", &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(class(&v), "dns", "{v}");
}

/// A server whose answers match the query (id, question) but whose answer record cannot
/// be parsed: `rdlen.test` gets an A record with RDLENGTH 5, `svcb.test` an HTTPS record
/// with its SvcParamKeys out of order (port before alpn).
fn malformed_responder() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                return;
            };
            let query = &buf[..n];
            // The question: the name's labels up to the root, then type and class.
            let mut end = 12;
            while query[end] != 0 {
                end += 1 + usize::from(query[end]);
            }
            let question = &query[12..end + 5];
            let name = Message::from_vec(query).unwrap().queries()[0]
                .name()
                .to_ascii();
            let (rtype, rdata): (u16, Vec<u8>) = match name.as_str() {
                "rdlen.test." => (1, vec![192, 0, 2, 1, 7]),
                "svcb.test." => {
                    let mut rdata = vec![0, 1, 0]; // priority 1, target "."
                    rdata.extend_from_slice(&[0, 3, 0, 2, 1, 187]); // port=443
                    rdata.extend_from_slice(&[0, 1, 0, 3, 2, b'h', b'2']); // alpn=h2
                    (65, rdata)
                }
                _ => continue,
            };
            let mut reply = query[..2].to_vec();
            reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
            reply.extend_from_slice(question);
            reply.extend_from_slice(&[0xc0, 12]);
            reply.extend_from_slice(&rtype.to_be_bytes());
            reply.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            reply.extend_from_slice(&rdata);
            let _ = udp.send_to(&reply, from);
        }
    });
    addr
}

/// An answer that cannot be parsed is the server's answer: `protocol` at once, naming
/// the record, with its time; not "no answer" after the whole timeout.
#[test]
fn dns_malformed_answer_is_protocol_at_once() {
    let server = malformed_responder().to_string();
    for (name, rtype) in [("rdlen.test", "A"), ("svcb.test", "HTTPS")] {
        let (v, code) = probe("dns", name, &["--server", &server, "--record-type", rtype]);
        eprintln!("{name}: {v}");
        assert_eq!(code, 1, "{v}");
        assert_eq!(class(&v), "protocol", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "malformed answer from {server}: answer record 1 of 1"
            )),
            "{message}"
        );
        let took = f64_of(&v, "resolve_seconds");
        assert!(took < 0.5, "{v}");
        assert!(f64_of(&v, "duration_seconds") < 1.0, "{v}");
    }
}
