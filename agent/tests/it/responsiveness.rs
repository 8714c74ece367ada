//! The responsiveness probe (SPEC section 16) against `serve-target`, over real links.
//!
//! `Link`: client, router and target in three namespaces (`epr*`), the router shaping both
//! directions with tbf at 20 Mbit/s and a queue of a given length, reno everywhere (bbr,
//! the machine's default, keeps queues short). The reference is the same as the issue's:
//! iperf3 saturating the link while ping times it, 60 / median RTT.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{cannot_run, class, f64_of, heavy_lock, probe, probe_in, sh, Netns, Target};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The client's side of the router.
/// The target.
const TARGET: &str = "10.89.2.2";

/// Client (0), router (1), target (2).
struct Link {
    ns: Netns,
}

impl Link {
    /// Builds the three namespaces, shaped to `rate` with a tbf queue of `queue`.
    fn build(rate: &str, queue: &str) -> Option<Link> {
        let mut ns = Netns { names: Vec::new() };
        for _ in 0..3 {
            let name = format!(
                "epr{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .expect("cannot run `ip` (iproute2)");
            if !out.status.success() {
                cannot_run(&format!(
                    "`ip netns add` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
                return None;
            }
            ns.names.push(name.clone());
            sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &name,
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_congestion_control=reno",
                ],
            );
        }
        let n = ns.names.clone();
        for (left, right, l, r, net) in [
            (&n[0], &n[1], "rc0", "rc1", "10.89.1"),
            (&n[1], &n[2], "rt1", "rt2", "10.89.2"),
        ] {
            sh(
                "ip",
                &[
                    "link", "add", l, "netns", left, "type", "veth", "peer", "name", r, "netns",
                    right,
                ],
            );
            for (name, dev, side) in [(left, l, 1), (right, r, 2)] {
                sh(
                    "ip",
                    &[
                        "-n",
                        name,
                        "addr",
                        "add",
                        &format!("{net}.{side}/24"),
                        "dev",
                        dev,
                    ],
                );
                sh("ip", &["-n", name, "link", "set", dev, "up"]);
            }
        }
        // Router: 10.89.1.2 towards the client, 10.89.2.1 towards the target.
        sh(
            "ip",
            &["-n", &n[0], "route", "add", "default", "via", "10.89.1.2"],
        );
        sh(
            "ip",
            &["-n", &n[2], "route", "add", "default", "via", "10.89.2.1"],
        );
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &n[1],
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        let link = Link { ns };
        link.shape(rate, queue, "add");
        Some(link)
    }

    /// tbf on both router interfaces: `rc1` carries the download, `rt1` the upload.
    fn shape(&self, rate: &str, queue: &str, verb: &str) {
        for dev in ["rc1", "rt1"] {
            sh(
                "tc",
                &[
                    "-n",
                    &self.ns.names[1],
                    "qdisc",
                    verb,
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "32kb",
                    "latency",
                    queue,
                ],
            );
        }
    }

    fn client(&self) -> &str {
        &self.ns.names[0]
    }

    fn target(&self) -> &str {
        &self.ns.names[2]
    }

    /// 60 / median ping RTT while iperf3 (reno) saturates the download.
    fn ping_reference_rpm(&self) -> f64 {
        let _server = self
            .ns
            .spawn(2, "iperf3", &["-s", "-B", TARGET, "-p", "5211"]);
        std::thread::sleep(Duration::from_millis(500));
        let client = self.client().to_string();
        let load = std::thread::spawn(move || {
            Command::new("ip")
                .args([
                    "netns", "exec", &client, "iperf3", "-c", TARGET, "-p", "5211",
                ])
                .args(["-R", "-t", "14", "-C", "reno", "-J"])
                .stdout(Stdio::null())
                .status()
                .expect("iperf3")
        });
        // Let the queue fill, then time round trips across it.
        std::thread::sleep(Duration::from_secs(4));
        let out = Command::new("ip")
            .args(["netns", "exec", self.client(), "ping", "-n", "-c", "40"])
            .args(["-i", "0.2", TARGET])
            .output()
            .expect("ping");
        let status = load.join().expect("iperf3 thread");
        assert!(status.success(), "iperf3 failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut rtts: Vec<f64> = text
            .lines()
            .filter_map(|l| l.split("time=").nth(1))
            .filter_map(|t| t.split_whitespace().next()?.parse().ok())
            .collect();
        assert!(
            rtts.len() >= 20,
            "ping under load answered too little:\n{text}"
        );
        rtts.sort_by(f64::total_cmp);
        let median_ms = rtts[rtts.len() / 2];
        60_000.0 / median_ms
    }
}

/// Runs the probe from the client namespace; returns its result and how long it took.
fn run(link: &Link, url: &str, args: &[&str]) -> (Value, i32, Duration) {
    let start = Instant::now();
    let (value, code) = probe_in(Some(link.client()), "responsiveness", url, args);
    let ms = |key: &str| value[key].as_f64().map_or(f64::NAN, |s| s * 1e3);
    eprintln!(
        "trimmed means: foreign tcp {:.1} ms, tls {:.1} ms, http {:.1} ms; self {:.1} ms",
        ms("foreign_tcp_seconds"),
        ms("foreign_tls_seconds"),
        ms("foreign_http_seconds"),
        ms("self_http_seconds")
    );
    (value, code, start.elapsed())
}

#[test]
fn rpm_follows_the_queue_and_agrees_with_ping_under_iperf3() {
    let _heavy = heavy_lock();
    let Some(link) = Link::build("20mbit", "300ms") else {
        return;
    };
    let target = Target::start_in(Some(link.target()), &format!("{TARGET}:8080"), 4);
    let url = target.url();

    let reference = link.ping_reference_rpm();
    let (bloated, code, took) = run(&link, &url, &[]);
    assert_eq!(code, 0, "{bloated}");
    let rpm = f64_of(&bloated, "responsiveness_rpm");
    eprintln!(
        "bloated (300 ms queue): ours {rpm:.0} RPM (down {:.0}, up {:.0}, stable {}, {} \
         connections, {took:?}), ping under iperf3 {reference:.0} RPM",
        f64_of(&bloated, "download_responsiveness_rpm"),
        f64_of(&bloated, "upload_responsiveness_rpm"),
        bloated["stable"],
        bloated["load_connections"]
    );
    assert!(
        rpm > reference / 3.0 && rpm < reference * 3.0,
        "ours {rpm:.0} RPM is not within a factor of 3 of ping's {reference:.0}: {bloated}"
    );
    let rating = bloated["rating"].as_str().unwrap_or_default();
    assert!(
        rating == "poor" || rating == "fair",
        "a 300 ms queue rates {rating}"
    );
    let down = f64_of(&bloated, "download_bits_per_second");
    assert!(
        (14e6..21e6).contains(&down),
        "the download saturates the 20 Mbit/s link: {down}"
    );
    assert!(f64_of(&bloated, "idle_latency_seconds") < 0.02, "{bloated}");
    assert!(
        f64_of(&bloated, "loaded_latency_seconds") > 0.05,
        "{bloated}"
    );
    assert!(
        bloated["foreign_tls_seconds"].is_null(),
        "plain HTTP has no TLS"
    );

    link.shape("20mbit", "10ms", "change");
    let shallow_reference = link.ping_reference_rpm();
    let (shallow, code, took) = run(&link, &url, &[]);
    assert_eq!(code, 0, "{shallow}");
    let shallow_rpm = f64_of(&shallow, "responsiveness_rpm");
    eprintln!(
        "shallow (10 ms queue): ours {shallow_rpm:.0} RPM (down {:.0}, up {:.0}, stable {}, \
         {took:?}), ping under iperf3 {shallow_reference:.0} RPM",
        f64_of(&shallow, "download_responsiveness_rpm"),
        f64_of(&shallow, "upload_responsiveness_rpm"),
        shallow["stable"],
    );
    assert!(
        shallow_rpm >= 3.0 * rpm,
        "a 10 ms queue ({shallow_rpm:.0} RPM) is not 3x as responsive as a 300 ms one \
         ({rpm:.0} RPM)"
    );
}

/// A CA and a certificate for `ip` it signed, written to `dir`: (chain, key, ca).
fn throwaway_pki(dir: &Path, ip: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "edgeprobe test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![ip.to_string()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(
        path("chain.pem"),
        format!("{}{}", cert.pem(), ca_cert.pem()),
    )
    .unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
    (path("chain.pem"), path("key.pem"), path("ca.pem"))
}

#[test]
fn https_target_reports_foreign_tls_handshakes() {
    let Some(link) = Link::build("20mbit", "50ms") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, _) = throwaway_pki(dir.path(), TARGET);
    let target = Target::start_with(
        Some(link.target()),
        &format!("{TARGET}:8443"),
        4,
        &["--tls-cert", &chain, "--tls-key", &key],
    );
    let url = format!("https://{}/.well-known/nq", target.addr);

    // Our CA is in no trust store: without --insecure-tls the run fails on TLS.
    let (refused, code, _) = run(&link, &url, &["--max-duration", "3s"]);
    assert_eq!(code, 1);
    assert_eq!(class(&refused), "tls", "{refused}");

    let (value, code, took) = run(&link, &url, &["--max-duration", "6s", "--insecure-tls"]);
    assert_eq!(code, 0, "{value}");
    let tls = f64_of(&value, "foreign_tls_seconds");
    let tcp = f64_of(&value, "foreign_tcp_seconds");
    eprintln!(
        "https: {:.0} RPM, foreign tcp {:.1} ms, tls {:.1} ms, http {:.1} ms, self {:.1} ms, \
         {took:?}",
        f64_of(&value, "responsiveness_rpm"),
        tcp * 1e3,
        tls * 1e3,
        f64_of(&value, "foreign_http_seconds") * 1e3,
        f64_of(&value, "self_http_seconds") * 1e3,
    );
    // A TLS round trip crosses the same loaded queue as the TCP handshake.
    assert!(tls > 0.0 && tls > tcp / 5.0, "{value}");
    assert!(took < Duration::from_secs(3 * 6 + 15), "{took:?}");
}

/// A server answering every request with `body` as JSON.
fn json_server(body: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn a_configuration_without_an_upload_url_is_a_protocol_failure() {
    let addr = json_server(
        r#"{"version":1,"urls":{"large_download_url":"http://127.0.0.1:9/l","small_download_url":"http://127.0.0.1:9/s"}}"#,
    );
    let start = Instant::now();
    let (value, code) = probe(
        "responsiveness",
        &format!("http://{addr}/.well-known/nq"),
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(class(&value), "protocol", "{value}");
    let message = value["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("upload_url"), "{message}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_busy_target_is_busy() {
    let target = Target::start("127.0.0.1:0", 1);
    // Another test holds the only slot (a download it does not read: the target reaps
    // it after 10 s without progress, long after our probe asked).
    let mut hog = std::net::TcpStream::connect(target.addr).unwrap();
    write!(
        hog,
        "GET /garbage?ckSize=1024&test=hog HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 64];
    hog.read_exact(&mut first).unwrap();
    let start = Instant::now();
    let (value, code) = probe("responsiveness", &target.url(), &["--max-duration", "5s"]);
    assert_eq!(code, 1);
    assert_eq!(class(&value), "busy", "{value}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(hog);
}

#[test]
fn a_target_that_stops_answering_mid_run_fails_in_time() {
    let Some(link) = Link::build("20mbit", "50ms") else {
        return;
    };
    let target = Target::start_in(Some(link.target()), &format!("{TARGET}:8080"), 4);
    let pid = target.proc.0.id().to_string();
    let client = link.client().to_string();
    let url = target.url();
    let start = Instant::now();
    let run = std::thread::spawn(move || {
        let out = Command::new("ip")
            .args(["netns", "exec", &client, crate::util::BIN, "probe"])
            .args(["responsiveness", &url, "--json", "--max-duration", "10s"])
            .output()
            .expect("probe");
        crate::util::parse_probe("responsiveness", &url, &out)
    });
    // Mid-download: the target process freezes (its kernel still accepts connections).
    std::thread::sleep(Duration::from_secs(4));
    // `ip netns exec` execs the target: the pid is serve-target's own.
    let stopped = Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let (value, code) = run.join().expect("probe thread");
    let took = start.elapsed();
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!(code, 1, "{value}");
    assert_eq!(class(&value), "timeout", "{value}");
    let message = value["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("stopped answering"), "{message}");
    // The run's own limit is 2 x 10 s + 15 s; the stall is seen long before.
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(value["idle_latency_seconds"].is_number(), "kept: {value}");
}

/// Cloudflare's `mach` (scripts/build-mach), if built.
fn mach_bin() -> Option<String> {
    let bin = std::env::var("MACH_BIN").unwrap_or_else(|_| "/var/cache/mach/mach".into());
    Path::new(&bin).is_file().then_some(bin)
}

/// mach's download and upload RPM (`mach rpm` prints one JSON report).
fn mach_rpm(link: &Link, mach: &str, config: &str) -> (f64, f64) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            link.client(),
            mach,
            "rpm",
            "--config",
            config,
        ])
        .arg("--insecure")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mach");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mach failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = stdout.find('{').expect("mach prints JSON");
    let report: Value = serde_json::from_str(&stdout[start..]).expect("mach's JSON report");
    (
        f64_of(&report["download"], "rpm"),
        f64_of(&report["upload"], "rpm"),
    )
}

#[test]
fn mach_agrees_with_ours() {
    let Some(mach) = mach_bin() else {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-mach");
        let buildable = Command::new(script)
            .arg("--check")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            !(buildable && std::env::var("CI").as_deref() == Ok("true")),
            "mach is not built but scripts/build-mach --check says it can be here: run \
             scripts/build-mach before the tests"
        );
        eprintln!("SKIPPED: Cloudflare's mach is not built here (scripts/build-mach builds it)");
        return;
    };
    let _heavy = heavy_lock();
    let Some(link) = Link::build("20mbit", "300ms") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, _) = throwaway_pki(dir.path(), TARGET);
    let target = Target::start_with(
        Some(link.target()),
        &format!("{TARGET}:8443"),
        4,
        &["--tls-cert", &chain, "--tls-key", &key],
    );
    let config = format!("https://{}/.well-known/nq", target.addr);
    for (queue, verb) in [("300ms", "change"), ("10ms", "change")] {
        link.shape("20mbit", queue, verb);
        let (ours, code, _) = run(&link, &config, &["--insecure-tls"]);
        assert_eq!(code, 0, "{ours}");
        let ours = f64_of(&ours, "responsiveness_rpm");
        let (down, up) = mach_rpm(&link, &mach, &config);
        let theirs = (down + up) / 2.0;
        eprintln!(
            "{queue} queue: ours {ours:.0} RPM, mach {theirs:.0} RPM (down {down:.0}, up {up:.0})"
        );
        assert!(
            ours > theirs / 2.0 && ours < theirs * 2.0,
            "{queue} queue: ours {ours:.0} RPM is not within a factor of 2 of mach's {theirs:.0}"
        );
    }
}
