//! The tcp and http probes against real local servers, success and failure.

use std::net::TcpListener;

use crate::util::{class, f64_of, probe, Target};

#[test]
fn tcp_connect_time_and_refused_port() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (v, code) = probe("tcp", &addr, &[]);
    assert_eq!(code, 0, "{v}");
    let took = f64_of(&v, "connect_seconds");
    assert!(took > 0.0 && took < 0.1, "{took}");
    drop(listener);
    let (v, code) = probe("tcp", &addr, &[]);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "refused", "{v}");
}

#[test]
fn http_against_the_target_server() {
    let target = Target::start("127.0.0.1:0", 4);
    let (v, code) = probe("http", &format!("{}/garbage?ckSize=2", target.url()), &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["status_code"].as_u64(), Some(200));
    assert_eq!(v["body_bytes"].as_u64(), Some(2 << 20));
    let (v, _) = probe(
        "http",
        &format!("{}/getIP", target.url()),
        &["--body-match", "processedString"],
    );
    assert_eq!(class(&v), "", "{v}");
    let (v, code) = probe("http", &format!("{}/missing", target.url()), &[]);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "http_status", "{v}");
    assert_eq!(v["status_code"].as_u64(), Some(404));
    let (v, _) = probe(
        "http",
        &format!("{}/getIP", target.url()),
        &["--body-match", "nope"],
    );
    assert_eq!(class(&v), "mismatch", "{v}");
}
