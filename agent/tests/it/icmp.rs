//! The icmp probe: loopback, a silent host, late replies, no route, a blackhole route, a
//! router's destination-unreachable on both kinds of socket, and the socket fallbacks
//! (raw, then ping socket, then a `local` error naming both fixes).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::util::{class, f64_of, probe, probe_in, sh, Netns, BIN};

fn assert_all_lost(v: &serde_json::Value, sent: u64) {
    assert_eq!(v["sent"].as_u64(), Some(sent), "{v}");
    assert_eq!(v["received"].as_u64(), Some(0), "{v}");
    assert_eq!(v["loss_ratio"].as_f64(), Some(1.0), "{v}");
    assert!(v["rtt_avg_seconds"].is_null(), "{v}");
}

#[test]
fn icmp_to_loopback_answers_every_request() {
    let (v, code) = probe("icmp", "127.0.0.1", &["--count", "4", "--interval", "50ms"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["sent"].as_u64(), Some(4));
    assert_eq!(v["received"].as_u64(), Some(4));
    assert_eq!(v["loss_ratio"].as_f64(), Some(0.0));
    let (min, avg, max) = (
        f64_of(&v, "rtt_min_seconds"),
        f64_of(&v, "rtt_avg_seconds"),
        f64_of(&v, "rtt_max_seconds"),
    );
    assert!(0.0 < min && min <= avg && avg <= max && max < 0.01, "{v}");
    assert!(f64_of(&v, "rtt_mdev_seconds") <= max - min);
}

#[test]
fn icmp_ipv6_loopback() {
    let Some(ns) = Netns::create(1) else { return };
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "icmp",
        "::1",
        &["--count", "3", "--interval", "50ms"],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["received"].as_u64(), Some(3));
}

#[test]
fn icmp_to_a_silent_host_is_loss() {
    let Some(ns) = Netns::pair(None) else { return };
    ns.exec(1, "sysctl", &["-qw", "net.ipv4.icmp_echo_ignore_all=1"]);
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "icmp",
        "10.77.0.2",
        &["--count", "3", "--interval", "50ms", "--timeout", "2s"],
    );
    assert_eq!(code, 1);
    assert_eq!(class(&v), "loss", "{v}");
    assert_all_lost(&v, 3);
    let took = f64_of(&v, "duration_seconds");
    assert!(
        (1.5..2.0).contains(&took),
        "waits for late replies until just before the limit: {took}"
    );
}

/// Answers every echo request arriving in namespace `ns` after `delay`, from a raw socket
/// on a thread of the test that entered the namespace (the kernel's own answers are
/// switched off there). Stops when dropped.
struct LateResponder {
    stop: Arc<AtomicBool>,
}

impl Drop for LateResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn late_responder(ns: &Netns, i: usize, delay: Duration) -> LateResponder {
    ns.exec(i, "sysctl", &["-qw", "net.ipv4.icmp_echo_ignore_all=1"]);
    let path = format!("/run/netns/{}", ns.names[i]);
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let (ready, started) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns moves only this thread, with a namespace descriptor we hold open.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let socket = Arc::new(UdpSocket::from(socket));
        ready.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while !stopped.load(Ordering::Relaxed) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let header = usize::from(buf[0] & 0x0f) * 4;
            let Some(request) = buf.get(header..n).filter(|icmp| icmp.first() == Some(&8)) else {
                continue;
            };
            let mut reply = request.to_vec();
            reply[0] = 0;
            reply[2..4].copy_from_slice(&[0, 0]);
            let sum = checksum(&reply);
            reply[2..4].copy_from_slice(&sum.to_be_bytes());
            let socket = socket.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = socket.send_to(&reply, from);
            });
        }
    });
    started
        .recv_timeout(Duration::from_secs(5))
        .expect("responder started");
    LateResponder { stop }
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Replies 2.5 s late on a lossless path are replies, whatever the request's position:
/// each request waits for its own reply, not the run for the last request's.
#[test]
fn icmp_late_replies_are_not_loss() {
    let Some(ns) = Netns::pair(None) else { return };
    let _responder = late_responder(&ns, 1, Duration::from_millis(2500));
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "icmp",
        "10.77.0.2",
        &["--count", "5", "--interval", "200ms"],
    );
    eprintln!("5 x 200 ms, replies 2.5 s late: {v}");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["received"].as_u64(), Some(5), "{v}");
    assert_eq!(v["loss_ratio"].as_f64(), Some(0.0), "{v}");
    let (min, max) = (f64_of(&v, "rtt_min_seconds"), f64_of(&v, "rtt_max_seconds"));
    assert!(2.45 < min && max < 2.8, "{v}");
    let took = f64_of(&v, "duration_seconds");
    assert!(took < 4.0, "ends when every reply is in: {took}");

    let (v, code) = probe_in(Some(&ns.names[0]), "icmp", "10.77.0.2", &["--count", "1"]);
    assert_eq!(code, 0, "one request: {v}");
    assert_eq!(v["received"].as_u64(), Some(1), "{v}");

    // The run's limit still bounds the whole.
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "icmp",
        "10.77.0.2",
        &["--count", "1", "--timeout", "2s"],
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(class(&v), "loss", "{v}");
    assert!(f64_of(&v, "duration_seconds") < 2.0, "{v}");
}

#[test]
fn icmp_without_a_route_is_unreachable() {
    let Some(ns) = Netns::create(1) else { return };
    let args = ["--count", "2", "--interval", "50ms"];
    let (v, code) = probe_in(Some(&ns.names[0]), "icmp", "10.1.2.3", &args);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "unreachable", "{v}");
    assert_all_lost(&v, 2);

    sh(
        "ip",
        &[
            "-n",
            &ns.names[0],
            "route",
            "add",
            "blackhole",
            "10.9.0.0/16",
        ],
    );
    let (v, code) = probe_in(Some(&ns.names[0]), "icmp", "10.9.0.1", &args);
    assert_eq!(code, 1);
    assert_eq!(class(&v), "unreachable", "blackhole route: {v}");
    assert_all_lost(&v, 2);
}

#[test]
fn icmp_to_an_unresolvable_name_is_dns() {
    // No network in the namespace: the resolver fails at once.
    let Some(ns) = Netns::create(1) else { return };
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "icmp",
        "nowhere.invalid",
        &["--timeout", "4s"],
    );
    assert_eq!(code, 1);
    assert_eq!(class(&v), "dns", "{v}");
}

/// Runs the probe in `ns` without CAP_NET_RAW (raw sockets refused).
fn probe_without_cap_net_raw(ns: &str, target: &str) -> (serde_json::Value, i32) {
    probe_without_cap_net_raw_args(ns, target, &["--count", "2", "--interval", "50ms"])
}

fn probe_without_cap_net_raw_args(
    ns: &str,
    target: &str,
    args: &[&str],
) -> (serde_json::Value, i32) {
    let output = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "setpriv",
            "--inh-caps=-net_raw",
            "--bounding-set=-net_raw",
        ])
        .args([BIN, "probe", "icmp", target, "--json"])
        .args(args)
        .output()
        .expect("setpriv");
    let v: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    (v, output.status.code().unwrap_or(-1))
}

#[test]
fn icmp_falls_back_to_a_ping_socket_without_cap_net_raw() {
    let Some(ns) = Netns::create(1) else { return };
    // ping_group_range is per namespace: allow root's group here only.
    ns.exec(0, "sysctl", &["-qw", "net.ipv4.ping_group_range=0 0"]);
    for target in ["127.0.0.1", "::1"] {
        let (v, code) = probe_without_cap_net_raw(&ns.names[0], target);
        assert_eq!(code, 0, "{target}: {v}");
        assert_eq!(v["received"].as_u64(), Some(2), "{v}");
    }
}

#[test]
fn icmp_without_any_icmp_socket_names_both_fixes() {
    let Some(ns) = Netns::create(1) else { return };
    ns.exec(0, "sysctl", &["-qw", "net.ipv4.ping_group_range=1 0"]);
    let (v, code) = probe_without_cap_net_raw(&ns.names[0], "127.0.0.1");
    assert_eq!(code, 1);
    assert_eq!(class(&v), "local", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("CAP_NET_RAW"), "{message}");
    assert!(message.contains("ping_group_range"), "{message}");
}

/// A router's destination-unreachable is `unreachable` with the router's words on both
/// kinds of socket: the ping socket reads it from its error queue (IP_RECVERR).
#[test]
fn icmp_router_unreachable_is_the_same_on_a_ping_socket() {
    let Some(ns) = Netns::pair(None) else { return };
    let (host, router) = (&ns.names[0], &ns.names[1]);
    ns.exec(1, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    // Every request gets its error, however fast the runs follow each other.
    ns.exec(1, "sysctl", &["-qw", "net.ipv4.icmp_ratelimit=0"]);
    sh(
        "ip",
        &["-n", router, "route", "add", "unreachable", "10.99.0.0/24"],
    );
    sh(
        "ip",
        &[
            "-n",
            host,
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            "10.77.0.2",
        ],
    );
    ns.exec(0, "sysctl", &["-qw", "net.ipv4.ping_group_range=0 0"]);
    let args = ["--count", "2", "--interval", "50ms", "--timeout", "4s"];

    let (raw, code) = probe_in(Some(host), "icmp", "10.99.0.1", &args);
    assert_eq!(code, 1, "{raw}");
    assert_eq!(class(&raw), "unreachable", "raw socket: {raw}");
    let (dgram, code) = probe_without_cap_net_raw_args(host, "10.99.0.1", &args);
    assert_eq!(code, 1, "{dgram}");
    assert_eq!(class(&dgram), "unreachable", "ping socket: {dgram}");
    let message = raw["error"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        "10.77.0.2 reports 10.99.0.1 unreachable: host unreachable (code 1)"
    );
    assert_eq!(dgram["error"]["message"].as_str(), Some(message), "{dgram}");
    for v in [&raw, &dgram] {
        assert_all_lost(v, 2);
        let took = f64_of(v, "duration_seconds");
        assert!(
            took < 1.0,
            "nothing left to wait for once the network said so: {v}"
        );
    }
}
