//! The http and tcp probes against odd servers run here (issue 14): credentials in the
//! URL (case 3), bodies too long for the old window or content-encoded (case 4), redirects,
//! servers that accept and never answer (case 9), and a reader that closes the pipe.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::util::{class, f64_of, probe, BIN};

/// A one-thread HTTP/1.1 server: each connection's request head goes to the returned
/// channel, and `respond(head)` is written back before the connection is closed.
fn server(
    respond: impl Fn(&str) -> Vec<u8> + Send + 'static,
) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let head = read_head(&mut stream);
            let _ = stream.write_all(&respond(&head));
            let _ = tx.send(head);
        }
    });
    (addr, rx)
}

fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn response(status: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Case 3: `http://user:secret@host/` sent `Host: user:secret@host` and no Authorization,
/// and kept the password in the result's target.
#[test]
fn url_credentials_become_basic_auth_and_are_redacted() {
    let (addr, heads) = server(|_| response("200 OK", &[], b"hello"));
    let target = format!("http://us%40er:p%3Asecret@{addr}/echo");
    let output = Command::new(BIN)
        .args(["probe", "http", &target, "--json"])
        .output()
        .unwrap();
    let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        header(&head, "host"),
        Some(addr.to_string().as_str()),
        "{head}"
    );
    // base64("us@er:p:secret")
    assert_eq!(
        header(&head, "authorization"),
        Some("Basic dXNAZXI6cDpzZWNyZXQ="),
        "{head}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["target"], format!("http://us%40er:***@{addr}/echo"));
    assert_eq!(v["status_code"], 200);
    for text in [&stdout, &String::from_utf8_lossy(&output.stderr)] {
        assert!(!text.contains("secret"), "password shown: {text}");
    }
    // The table for people shows the same redacted target.
    let table = Command::new(BIN)
        .args(["probe", "http", &target])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("us%40er:***@") && !table.contains("secret"),
        "{table}"
    );
    // A target refused by the checks `check` runs is not printed with its password.
    let refused = Command::new(BIN)
        .args(["probe", "http", "http://u:secret@[::1/"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("u:***@") && !stderr.contains("secret"),
        "{stderr}"
    );
}

/// Case 4: only the first 1 MiB was searched, and content-encoded bodies were searched
/// as they came over the wire.
#[test]
fn body_match_searches_the_whole_decoded_body() {
    use flate2::write::{GzEncoder, ZlibEncoder};
    let needle = "edgeprobe-needle-at-the-end";
    // 2 MiB that do not contain the needle, then the needle.
    let mut page: Vec<u8> = (0..2u32 << 20).map(|i| b'a' + (i % 23) as u8).collect();
    page.extend_from_slice(needle.as_bytes());

    let gzip = {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&page).unwrap();
        e.finish().unwrap()
    };
    let deflate = {
        let mut e = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&page).unwrap();
        e.finish().unwrap()
    };
    let br = {
        let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        e.write_all(&page).unwrap();
        e.into_inner()
    };
    for (encoding, wire) in [
        ("identity", page.clone()),
        ("gzip", gzip),
        ("deflate", deflate),
        ("br", br),
    ] {
        let body = wire.clone();
        let header = format!("Content-Encoding: {encoding}");
        let (addr, _heads) = server(move |_| response("200 OK", &[&header], &body));
        let url = format!("http://{addr}/page");
        let (v, code) = probe("http", &url, &["--body-match", needle]);
        assert_eq!((code, class(&v)), (0, ""), "{encoding}: {v}");
        assert_eq!(
            v["body_bytes"].as_u64(),
            Some(wire.len() as u64),
            "wire size, {encoding}"
        );
        let (v, code) = probe("http", &url, &["--body-match", "not-in-the-page"]);
        assert_eq!((code, class(&v)), (1, "mismatch"), "{encoding}: {v}");
    }
}

#[test]
fn redirects_are_followed_only_when_asked() {
    let (addr, heads) = server(|head| {
        if head.starts_with("GET /start ") {
            response("302 Found", &["Location: /final"], b"moved")
        } else {
            response("200 OK", &[], b"the final page")
        }
    });
    let url = format!("http://u:pw@{addr}/start");
    let (v, code) = probe("http", &url, &["--body-match", "final page"]);
    assert_eq!(
        (code, class(&v), v["status_code"].as_u64()),
        (1, "mismatch", Some(302)),
        "{v}"
    );
    let _ = heads.recv_timeout(Duration::from_secs(5));
    let (v, code) = probe(
        "http",
        &url,
        &["--body-match", "final page", "--follow-redirects", "2"],
    );
    assert_eq!((code, v["status_code"].as_u64()), (0, Some(200)), "{v}");
    assert_eq!(v["body_bytes"].as_u64(), Some(14));
    let first = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    let second = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(second.starts_with("GET /final "), "{second}");
    for head in [first, second] {
        assert_eq!(
            header(&head, "authorization"),
            Some("Basic dTpwdw=="),
            "same origin: {head}"
        );
    }
}

/// Accepts connections and never answers (nor reads); keeps them open.
fn silent_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    addr
}

/// Case 9: a run cut off by its timeout threw away the phases it had measured.
#[test]
fn timeouts_keep_what_was_measured() {
    let addr = silent_server();
    let (v, code) = probe("http", &format!("http://{addr}/"), &["--timeout", "2s"]);
    assert_eq!((code, class(&v)), (1, "timeout"), "{v}");
    assert!(f64_of(&v, "connect_seconds") < 0.5, "{v}");
    assert!(f64_of(&v, "dns_seconds") < 0.5, "{v}");
    assert!(v["ttfb_seconds"].is_null(), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("waiting for the response"), "{message}");

    let (v, code) = probe("tcp", &addr.to_string(), &["--tls", "--timeout", "2s"]);
    assert_eq!((code, class(&v)), (1, "timeout"), "{v}");
    assert!(f64_of(&v, "connect_seconds") < 0.5, "{v}");
    assert!(v["tls_seconds"].is_null(), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("TLS handshake"), "{message}");
}

/// `probe ... | head -1`: the reader is gone before the result is printed.
#[test]
fn a_closed_pipe_ends_the_probe_quietly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut child = Command::new(BIN)
        .args(["probe", "tcp", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}

/// A server that sends `answer` to every connection and then holds it open, so only
/// parsing can end the probe early.
fn holding_server(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                read_head(&mut stream);
                let _ = stream.write_all(answer);
                std::thread::sleep(Duration::from_secs(15));
            });
        }
    });
    addr
}

/// An answer that is not HTTP is `protocol` at once, saying what could not be parsed.
#[test]
fn malformed_http_answers_are_protocol_at_once() {
    let cases: [(&[u8], &str); 4] = [
        (
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
            "invalid HTTP status-code",
        ),
        (
            b"HTTP/1.1 200 OK\r\nNo Colon Here\r\nContent-Length: 0\r\n\r\n",
            "invalid HTTP header",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
            "invalid content-length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
            "chunk size",
        ),
    ];
    for (answer, reason) in cases {
        let addr = holding_server(answer);
        let (v, code) = probe("http", &format!("http://{addr}/"), &["--timeout", "5s"]);
        assert_eq!(code, 1, "{v}");
        assert_eq!(class(&v), "protocol", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{reason}: {message}");
        assert!(f64_of(&v, "duration_seconds") < 1.0, "{v}");
    }
}
