//! The icmp probe: loopback, a silent host, no route, a blackhole route, and the socket
//! fallbacks (raw, then ping socket, then a `local` error naming both fixes).

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
        &["--count", "3", "--interval", "50ms"],
    );
    assert_eq!(code, 1);
    assert_eq!(class(&v), "loss", "{v}");
    assert_all_lost(&v, 3);
    let took = f64_of(&v, "duration_seconds");
    assert!(took < 4.0, "waits a bounded time for late replies: {took}");
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
    let output = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "setpriv",
            "--inh-caps=-net_raw",
            "--bounding-set=-net_raw",
        ])
        .args([
            BIN,
            "probe",
            "icmp",
            target,
            "--json",
            "--count",
            "2",
            "--interval",
            "50ms",
        ])
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
