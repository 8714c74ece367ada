//! The speed probe against real servers on 127.0.0.1: our target, a stock LibreSpeed URL
//! layout, and targets that misbehave.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::util::{class, f64_of, heavy_lock, probe, Target};

#[test]
fn speed_against_our_target_measures_both_directions_and_latency() {
    let _heavy = heavy_lock();
    let target = Target::start("127.0.0.1:0", 4);
    let (v, code) = probe("speed", &target.url(), &["--duration", "2s"]);
    assert_eq!(code, 0, "{v}");
    for key in ["download_bits_per_second", "upload_bits_per_second"] {
        assert!(f64_of(&v, key) > 200e6, "{key} on loopback: {v}");
    }
    // Rates are over the window after the warm-up, bytes over the whole direction.
    assert!(
        v["bytes_downloaded"].as_u64().unwrap() as f64 * 8.0
            > f64_of(&v, "download_bits_per_second")
    );
    assert!(
        v["bytes_uploaded"].as_u64().unwrap() as f64 * 8.0 > f64_of(&v, "upload_bits_per_second")
    );
    let idle = f64_of(&v, "idle_latency_seconds");
    assert!(idle > 0.0 && idle < 0.05, "idle latency {idle}");
    assert!(f64_of(&v, "jitter_seconds") >= 0.0);
    assert!(f64_of(&v, "download_loaded_latency_seconds") > 0.0);
    assert!(f64_of(&v, "upload_loaded_latency_seconds") > 0.0);
    let took = f64_of(&v, "duration_seconds");
    assert!(
        (4.0..10.0).contains(&took),
        "two directions of 2 s, plus pings: {took}"
    );
}

/// A run cut off by its whole-run limit during the upload keeps the idle latency and the
/// download it measured (it used to report every field empty).
#[test]
fn speed_cut_off_by_its_limit_keeps_the_download() {
    let _heavy = heavy_lock();
    let target = Target::start("127.0.0.1:0", 4);
    let (v, code) = probe(
        "speed",
        &target.url(),
        &["--duration", "2s", "--timeout", "3500ms"],
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(class(&v), "timeout", "{v}");
    assert!(f64_of(&v, "idle_latency_seconds") > 0.0, "{v}");
    assert!(f64_of(&v, "download_bits_per_second") > 1e6, "{v}");
    assert!(v["upload_bits_per_second"].is_null(), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("upload")),
        "{v}"
    );
}

/// A server with only LibreSpeed's stock layout (`/backend/*.php`, chunked garbage as
/// garbage.php sends it), recording what was asked.
fn stock_librespeed() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    stock_librespeed_on("127.0.0.1:0")
}

/// `stock_librespeed` listening on `bind` (bound in the caller's network namespace).
pub fn stock_librespeed_on(bind: &str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let hits: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = TcpListener::bind(bind).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = hits.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let chunk = Bytes::from(vec![0x5a; 1 << 20]);
            let record = seen.clone();
            let app = Router::new()
                .route(
                    "/backend/garbage.php",
                    get(move |request: Request| {
                        let chunk = chunk.clone();
                        async move {
                            let n: usize = request
                                .uri()
                                .query()
                                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("ckSize=")))
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(4);
                            let chunks =
                                (0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
                            Body::from_stream(futures::stream::iter(chunks))
                        }
                    }),
                )
                .route("/backend/empty.php", get(drain).post(drain))
                .layer(axum::middleware::from_fn(
                    move |request: Request, next: axum::middleware::Next| {
                        record.lock().unwrap().push(format!(
                            "{} {}",
                            request.method(),
                            request.uri().path()
                        ));
                        next.run(request)
                    },
                ));
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (addr, hits)
}

async fn drain(request: Request) -> &'static str {
    let _ = request.into_body().collect().await;
    ""
}

#[test]
fn speed_against_a_stock_librespeed_layout() {
    let (addr, hits) = stock_librespeed();
    let (v, code) = probe(
        "speed",
        &format!("http://{addr}/"),
        &["--duration", "1s", "--streams", "2"],
    );
    assert_eq!(code, 0, "{v}");
    assert!(f64_of(&v, "download_bits_per_second") > 10e6, "{v}");
    assert!(f64_of(&v, "upload_bits_per_second") > 10e6, "{v}");
    let hits = hits.lock().unwrap();
    assert!(
        hits.iter().any(|h| h == "GET /backend/garbage.php"),
        "{hits:?}"
    );
    assert!(
        hits.iter().any(|h| h == "POST /backend/empty.php"),
        "{hits:?}"
    );
    assert!(
        hits.iter()
            .filter(|h| *h == "GET /backend/empty.php")
            .count()
            >= 10,
        "idle pings"
    );
}

#[test]
fn speed_against_a_busy_target_is_busy() {
    let target = Target::start("127.0.0.1:0", 1);
    // Another client (127.0.0.2) holds the only slot with a download it does not read.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect(&target.addr.into()).unwrap();
    let mut holder: TcpStream = socket.into();
    holder
        .write_all(b"GET /garbage?ckSize=1024 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut status = String::new();
    BufReader::new(&holder).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    let (v, code) = probe("speed", &target.url(), &["--duration", "1s"]);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "busy", "{v}");
    assert!(
        v["idle_latency_seconds"].as_f64().is_some(),
        "pings still measured: {v}"
    );
}

#[test]
fn speed_to_a_closed_port_is_refused() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (v, code) = probe("speed", &format!("http://127.0.0.1:{port}"), &[]);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "refused", "{v}");
}

#[test]
fn speed_without_speed_endpoints_is_http_status() {
    let target = Target::start("127.0.0.1:0", 4);
    let (v, code) = probe("speed", &format!("{}/not/here", target.url()), &[]);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "http_status", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/not/here/backend/empty.php"),
        "tried layouts are named: {message}"
    );
}

#[test]
fn speed_against_a_silent_target_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and never answers.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let (v, code) = probe("speed", &format!("http://{addr}"), &["--timeout", "2s"]);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "timeout", "{v}");
    assert!(f64_of(&v, "duration_seconds") < 3.0);
}

/// A target that answers pings but cuts every download short: a failed result, no crash.
#[test]
fn speed_against_a_target_that_cuts_transfers_fails_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || serve_cutting(stream));
        }
    });
    let (v, code) = probe("speed", &format!("http://{addr}"), &["--duration", "1s"]);
    assert_eq!(code, 1);
    assert!(["refused", "protocol"].contains(&class(&v)), "{v}");
    assert!(v["idle_latency_seconds"].as_f64().is_some(), "{v}");
}

fn serve_cutting(stream: TcpStream) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        if request_line.contains("/garbage") {
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n");
            let _ = writer.write_all(&[0u8; 10_000]);
            std::thread::sleep(Duration::from_millis(20));
            return;
        }
        let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    }
}

/// A LibreSpeed-style server built from `garbage` (the handler for `/garbage`) and an
/// `/empty` that answers pings and drains uploads, except that the `lose_ping`-th GET
/// (1-based, 0 = none) is never answered.
fn misbehaving_librespeed<H, T>(garbage: H, lose_ping: usize) -> SocketAddr
where
    H: axum::handler::Handler<T, ()> + Clone + Send + Sync + 'static,
    T: 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let pings = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let ping = move || {
                let n = pings.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                async move {
                    if n == lose_ping {
                        std::future::pending::<()>().await;
                    }
                    ""
                }
            };
            let app = Router::new()
                .route("/garbage", get(garbage))
                .route("/empty", get(ping).post(drain));
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

/// Case 6: a garbage endpoint that answers a small HTML page (a broken PHP install, a
/// captive portal) is a `protocol` failure without a download rate, not a slow link.
#[test]
fn speed_against_a_garbage_endpoint_that_sends_a_page_is_protocol() {
    let page = "<!DOCTYPE html><html><head><title>garbage.php</title></head><body>\
                <?php // the PHP module is not installed ?></body></html>\n";
    let addr = misbehaving_librespeed(move || async move { page }, 0);
    let (v, code) = probe(
        "speed",
        &format!("http://{addr}"),
        &["--duration", "1s", "--streams", "2"],
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(class(&v), "protocol", "{v}");
    assert!(v["download_bits_per_second"].is_null(), "no rate: {v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{} bytes", page.len())),
        "{message}"
    );
}

/// Case 9: one unanswered idle ping is a lost sample, not a failed test.
#[test]
fn speed_with_a_lost_idle_ping_still_measures() {
    let chunk = Bytes::from(vec![0x5a; 1 << 20]);
    let garbage = move |request: Request| {
        let chunk = chunk.clone();
        async move { Body::from_stream(mib_stream(chunk, ck_size(&request), usize::MAX)) }
    };
    // Ping 1 is spent on layout detection; the 3rd is the 2nd idle one.
    let addr = misbehaving_librespeed(garbage, 3);
    let (v, code) = probe(
        "speed",
        &format!("http://{addr}"),
        &["--duration", "1s", "--streams", "2"],
    );
    assert_eq!(code, 0, "{v}");
    let idle = f64_of(&v, "idle_latency_seconds");
    assert!(idle < 0.05, "the lost ping is not a sample: {idle}");
    assert!(f64_of(&v, "download_bits_per_second") > 10e6, "{v}");
    assert!(f64_of(&v, "upload_bits_per_second") > 10e6, "{v}");
}

/// Case 9: one download stream that breaks lowers the stream count, is reported, and the
/// rate comes from the others.
#[test]
fn speed_with_a_broken_stream_reports_it_and_measures_the_rest() {
    let chunk = Bytes::from(vec![0x5a; 1 << 20]);
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let garbage = move |request: Request| {
        let chunk = chunk.clone();
        let n = requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // The first download breaks after 2 MiB; every other one is whole.
        let cut = if n == 0 { 2 } else { usize::MAX };
        async move { Body::from_stream(mib_stream(chunk, ck_size(&request), cut)) }
    };
    let addr = misbehaving_librespeed(garbage, 0);
    let (v, code) = probe(
        "speed",
        &format!("http://{addr}"),
        &["--duration", "1s", "--streams", "3"],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["streams_failed"].as_u64(), Some(1), "{v}");
    assert!(f64_of(&v, "download_bits_per_second") > 10e6, "{v}");
    assert!(f64_of(&v, "upload_bits_per_second") > 10e6, "{v}");
}

fn ck_size(request: &Request) -> usize {
    request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("ckSize=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(4)
}

/// `n` MiB chunks, or an error (the connection is cut) after `cut` of them.
fn mib_stream(
    chunk: Bytes,
    n: usize,
    cut: usize,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::iter((0..n).map(move |i| {
        if i < cut {
            Ok(chunk.clone())
        } else {
            Err(std::io::Error::other("cut"))
        }
    }))
}

/// A LibreSpeed-style target on plain threads: `/empty` answers, `/garbage` sends what is
/// asked; a POST is answered `200` at once, before its body is read, when `early(n)` holds
/// for the n-th POST (0-based) — that connection then takes nothing more and closes after
/// 300 ms — else its body is read whole first.
fn early_answering_target(early: fn(usize) -> bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let posts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let posts = posts.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        if header == "\r\n" {
                            break;
                        }
                        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                    if request_line.starts_with("POST") {
                        if early(posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) {
                            let _ = writer.write_all(ok);
                            std::thread::sleep(Duration::from_millis(300));
                            return;
                        }
                        let mut body = (&mut reader).take(length as u64);
                        let _ = std::io::copy(&mut body, &mut std::io::sink());
                        let _ = writer.write_all(ok);
                    } else if request_line.contains("/garbage") {
                        let mib = 100;
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", mib << 20);
                        let _ = writer.write_all(head.as_bytes());
                        let chunk = vec![0x5a; 1 << 20];
                        for _ in 0..mib {
                            if writer.write_all(&chunk).is_err() {
                                return;
                            }
                        }
                    } else {
                        let _ = writer.write_all(ok);
                    }
                }
            });
        }
    });
    addr
}

/// An upload answered before its body was read is no measurement: every stream answered
/// so fails the upload as `protocol`, naming what the target did.
#[test]
fn speed_upload_answered_before_its_body_is_protocol() {
    let addr = early_answering_target(|_| true);
    let (v, code) = probe(
        "speed",
        &format!("http://{addr}"),
        &["--duration", "2s", "--streams", "3"],
    );
    eprintln!("every POST answered early: {v}");
    assert_eq!(code, 1, "{v}");
    assert_eq!(class(&v), "protocol", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the target answered the upload before reading its body"),
        "{message}"
    );
    assert_eq!(v["streams_failed"].as_u64(), Some(3), "{v}");
    assert!(f64_of(&v, "download_bits_per_second") > 10e6, "{v}");
}

/// One stream answered early is a broken stream; the others measure.
#[test]
fn speed_upload_with_one_early_answer_counts_a_failed_stream() {
    let addr = early_answering_target(|n| n == 0);
    let (v, code) = probe(
        "speed",
        &format!("http://{addr}"),
        &["--duration", "2s", "--streams", "3"],
    );
    eprintln!("first POST answered early: {v}");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["streams_failed"].as_u64(), Some(1), "{v}");
    assert!(f64_of(&v, "upload_bits_per_second") > 10e6, "{v}");
}

/// A garbage endpoint whose chunked body cannot be parsed is `protocol` at once, saying
/// so (it was `other`: hyper reports it as invalid data).
#[test]
fn speed_with_a_malformed_chunked_download_is_protocol() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request = String::new();
                    while !request.ends_with("\r\n\r\n") {
                        if reader.read_line(&mut request).unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    if request.contains("/garbage") {
                        let _ = writer.write_all(
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
                        );
                        std::thread::sleep(Duration::from_secs(10));
                        return;
                    }
                    let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    let (v, code) = probe(
        "speed",
        &format!("http://{addr}"),
        &["--duration", "2s", "--streams", "2"],
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(class(&v), "protocol", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("chunk size"), "{message}");
    assert!(f64_of(&v, "duration_seconds") < 1.5, "{v}");
}
