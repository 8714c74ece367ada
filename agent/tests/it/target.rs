//! `serve-target` speaks the LibreSpeed backend protocol, over real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::{http, Target};

fn get(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    http(addr, request.as_bytes())
}

#[test]
fn garbage_streams_ck_size_mib_of_incompressible_data() {
    let target = Target::start("127.0.0.1:0", 4);
    for (path, mib) in [
        ("/garbage?ckSize=3", 3),
        ("/garbage", 4),
        ("/backend/garbage.php?r=0.1&ckSize=2", 2),
        ("/garbage.php?ckSize=0", 1),
        ("/backend/garbage?ckSize=x", 4),
    ] {
        let (status, head, body) = get(target.addr, path);
        assert_eq!(status, 200, "{path}");
        assert_eq!(body.len(), mib << 20, "{path}");
        assert!(head.contains("access-control-allow-origin: *"), "{head}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        assert!(
            head.contains("content-type: application/octet-stream"),
            "{head}"
        );
    }
    // Incompressible: every byte value occurs, none dominates, no 4-byte period.
    let (_, _, body) = get(target.addr, "/garbage?ckSize=1");
    let mut counts = [0usize; 256];
    body.iter().for_each(|b| counts[*b as usize] += 1);
    let expected = body.len() / 256;
    assert!(
        counts.iter().all(|c| c.abs_diff(expected) < expected / 5),
        "byte histogram is flat"
    );
    assert_ne!(body[..4096], body[4..4100]);
}

#[test]
fn garbage_is_clamped_to_1024_mib() {
    let target = Target::start("127.0.0.1:0", 4);
    let mut stream = TcpStream::connect(target.addr).unwrap();
    stream
        .write_all(b"GET /garbage?ckSize=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 512];
    let n = stream.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", 1024u64 << 20)),
        "{head}"
    );
}

#[test]
fn empty_drains_sized_and_chunked_bodies() {
    let target = Target::start("127.0.0.1:0", 4);
    let body = vec![7u8; 3 << 20];
    let mut sized = format!(
        "POST /empty HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    sized.extend_from_slice(&body);
    let (status, head, _) = http(target.addr, &sized);
    assert_eq!(status, 200);
    assert!(head.contains("access-control-allow-headers: content-encoding, content-type"));
    assert!(head.contains("access-control-allow-methods: get, post"));

    let mut chunked =
        b"POST /backend/empty.php HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..10 {
        chunked.extend_from_slice(format!("{:x}\r\n", 100_000).as_bytes());
        chunked.extend_from_slice(&[1u8; 100_000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(http(target.addr, &chunked).0, 200);

    for path in [
        "/empty",
        "/empty.php",
        "/backend/empty",
        "/backend/empty.php?r=1",
    ] {
        assert_eq!(get(target.addr, path).0, 200, "{path}");
    }
    let (status, _, _) = http(
        target.addr,
        b"OPTIONS /empty HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "CORS preflight");
    assert_eq!(get(target.addr, "/nothing-here").0, 404);
}

#[test]
fn get_ip_answers_the_client_address_as_json() {
    let target = Target::start("127.0.0.1:0", 4);
    for path in ["/getIP", "/backend/getIP.php", "/getIP.php"] {
        let (status, head, body) = get(target.addr, path);
        assert_eq!(status, 200);
        assert!(head.contains("application/json"), "{head}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["processedString"], "127.0.0.1");
    }
}

/// A second client IP beyond `--max-tests 1` gets 503; pings still answer.
#[test]
fn a_test_beyond_the_cap_is_answered_busy() {
    let target = Target::start("127.0.0.1:0", 1);
    // Client 127.0.0.2 starts a big download and does not read it: its test is running.
    let mut holder = connect_from("127.0.0.2", target.addr);
    holder
        .write_all(b"GET /garbage?ckSize=1024 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 64];
    let _ = holder.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"));

    let (status, head, _) = get(target.addr, "/garbage?ckSize=1");
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("access-control-allow-origin: *"));
    let upload =
        b"POST /empty HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd"
            .to_vec();
    assert_eq!(http(target.addr, &upload).0, 503);
    assert_eq!(get(target.addr, "/empty").0, 200, "pings are never refused");

    // The holder leaves; after the linger the slot is free again.
    drop(holder);
    let start = Instant::now();
    loop {
        if http(target.addr, &upload).0 == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "slot never released"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A blocking TCP connection from a chosen loopback source address.
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

#[test]
fn shutdown_on_sigterm_is_graceful() {
    let mut target = Target::start("127.0.0.1:0", 4);
    let pid = target.proc.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = target.proc.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "serve-target exits 0 on SIGTERM: {status}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "serve-target did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Case 8: four uploads that stall after one byte, from four addresses, hold every slot;
/// each loses its slot and its connection after 10 s without progress, so the target
/// answers a normal test again within about 12 s.
#[test]
fn stalled_uploads_lose_their_slots_and_connections() {
    let target = Target::start("127.0.0.1:0", 4);
    let mut stalled: Vec<TcpStream> = (2..=5)
        .map(|i| {
            let mut s = connect_from(&format!("127.0.0.{i}"), target.addr);
            s.write_all(b"POST /empty HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nx")
                .unwrap();
            s
        })
        .collect();
    let upload =
        b"POST /empty HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd";
    // Let the four bodies reach their handlers, then the target is full.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    assert_eq!(
        http(target.addr, upload).0,
        503,
        "four stalled tests fill the cap"
    );
    loop {
        if http(target.addr, upload).0 == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(14),
            "stalled uploads still hold the target after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("target free again after {:?}", start.elapsed());
    // And their connections are gone: the server closed them (EOF after any answer).
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("closed by the target, not left open");
    }
}

/// Case 8: a GET with a body uploads too, so it counts against the cap.
#[test]
fn a_get_with_a_body_counts_against_the_cap() {
    let target = Target::start("127.0.0.1:0", 1);
    let mut holder = connect_from("127.0.0.2", target.addr);
    holder
        .write_all(b"GET /empty HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n")
        .unwrap();
    holder.write_all(&[0u8; 65536]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let upload =
        b"POST /empty HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd";
    assert_eq!(
        http(target.addr, upload).0,
        503,
        "the GET upload holds the slot"
    );
}

/// Case 8: tests are told apart by the id our agent sends, so two agents behind one NAT
/// (one address) are two tests; a stock client without an id is its address.
#[test]
fn tests_are_identified_by_their_id_before_their_address() {
    let target = Target::start("127.0.0.1:0", 1);
    let mut holder = TcpStream::connect(target.addr).unwrap();
    holder
        .write_all(b"GET /garbage?ckSize=1024&test=agent-a HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 64];
    let _ = holder.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"));

    let upload = |path: &str| {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd"
        );
        http(target.addr, request.as_bytes()).0
    };
    assert_eq!(
        upload("/empty?test=agent-b"),
        503,
        "another agent, same address"
    );
    assert_eq!(upload("/empty?r=1&test=agent-a"), 200, "the same test");
    // A stock client from another address is its own test too.
    let mut other = connect_from("127.0.0.2", target.addr);
    other
        .write_all(b"POST /empty HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd")
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}
