//! Accuracy on a slow shaped link (issue 14 case 7): two network namespaces (`eps2-*`)
//! joined by a veth pair shaped to 1 Mbit/s with tbf; iperf3 measures the uplink and the
//! downlink, then the speed probe runs against `serve-target` (which reflects STAMP, so the
//! loaded-loss stream runs beside the transfer) on the same link with short and default
//! durations, one stream and the default streams.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::util::{cannot_run, f64_of, iperf3_goodput, probe_in, sh, Netns, Target};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Namespaces `eps2-<pid>-<n>` a/b, veth `eps2a` (10.78.0.1) and `eps2b` (10.78.0.2), both
/// ends shaped to `rate` with tbf; deleted on drop (`Netns`). The bucket is 10 kB: the
/// 64 kB of the 100 Mbit/s test would let half a second of data through at once at
/// 1 Mbit/s and skew short measurements (ours and iperf3's alike).
fn shaped_pair(rate: &str) -> Option<Netns> {
    let mut ns = Netns { names: Vec::new() };
    for _ in 0..2 {
        let name = format!(
            "eps2-{}-{}",
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
    }
    let (a, b) = (ns.names[0].clone(), ns.names[1].clone());
    sh(
        "ip",
        &[
            "link", "add", "eps2a", "netns", &a, "type", "veth", "peer", "name", "eps2b", "netns",
            &b,
        ],
    );
    for (name, dev, addr) in [(&a, "eps2a", "10.78.0.1/24"), (&b, "eps2b", "10.78.0.2/24")] {
        sh("ip", &["-n", name, "addr", "add", addr, "dev", dev]);
        sh("ip", &["-n", name, "link", "set", dev, "up"]);
        sh(
            "tc",
            &[
                "-n", name, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                "10kb", "latency", "50ms",
            ],
        );
    }
    Some(ns)
}

/// iperf3's goodput (client in namespace 0; `-R` for the download) in bits/s, the
/// slow-start and tbf burst left out.
fn iperf3_reference(ns: &Netns, reverse: bool) -> f64 {
    let mut args = vec!["-c", "10.78.0.2", "-t", "10", "-O", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    iperf3_goodput(ns, &args)
}

/// Both directions within 5 % of iperf3 in every run, and the STAMP loaded-loss stream,
/// counted where it arrives, under 1 % of the link. At a fixed 50 packets/s it took 3.4 %
/// (about 29 kbit/s of IP packets each way): one stream's upload read 0.962-0.972 of
/// iperf3 in every run, and the default three streams 0.938 once under CI's load. One
/// run's goodput is too noisy under CI's parallel tests to tell a 3 % bias (a one-stream
/// 10 s download once read 0.953 with the stream paced), so the stream itself is measured.
#[test]
fn speed_on_a_1mbit_link_agrees_with_iperf3_both_ways() {
    let Some(ns) = shaped_pair("1mbit") else {
        return;
    };
    let _iperf = ns.spawn(1, "iperf3", &["-s", "-B", "10.78.0.2"]);
    let target = Target::start_in(Some(&ns.names[1]), "10.78.0.2:8080", 4);
    // Counts the STAMP packets reaching the target's reflector (UDP 862).
    ns.exec(
        1,
        "iptables",
        &["-I", "INPUT", "-p", "udp", "--dport", "862"],
    );
    // iperf3 before and after the probes, the better of the two: under CI's parallel
    // tests one iperf3 run read 0.920 Mbit/s where the link carries 0.957.
    let mut up_ref = iperf3_reference(&ns, false);
    let mut down_ref = iperf3_reference(&ns, true);
    let mut readings = Vec::new();
    let mut stamp_worst: f64 = 0.0;
    for args in [
        &["--duration", "4s", "--streams", "1"][..],
        &["--duration", "4s"][..],
        &["--duration", "10s", "--streams", "1"][..],
        &[][..],
    ] {
        ns.exec(1, "iptables", &["-Z", "INPUT"]);
        let started = std::time::Instant::now();
        let (v, code) = probe_in(Some(&ns.names[0]), "speed", &target.url(), args);
        let took = started.elapsed().as_secs_f64();
        assert_eq!(code, 0, "{args:?}: {v}");
        let counters = ns.exec(1, "iptables", &["-nvxL", "INPUT"]);
        let stamp_bytes: f64 = counters
            .lines()
            .find(|l| l.contains("dpt:862"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no STAMP counter in:\n{counters}"));
        let stamp_bits_per_second = stamp_bytes * 8.0 / took;
        eprintln!(
            "STAMP {args:?}: {stamp_bytes} bytes in {took:.1} s, {:.2} kbit/s",
            stamp_bits_per_second / 1e3
        );
        stamp_worst = stamp_worst.max(stamp_bits_per_second);
        assert!(
            v["upload_loaded_loss_ratio"].is_number(),
            "the loaded-loss stream ran: {v}"
        );
        readings.push((args, v));
    }
    up_ref = up_ref.max(iperf3_reference(&ns, false));
    down_ref = down_ref.max(iperf3_reference(&ns, true));
    for reference in [up_ref, down_ref] {
        assert!(
            (0.9e6..1.02e6).contains(&reference),
            "the link carries about 0.96 Mbit/s: {reference}"
        );
    }
    let mut worst: f64 = 0.0;
    for (args, v) in &readings {
        for (direction, reference) in [("upload", up_ref), ("download", down_ref)] {
            let rate = f64_of(v, &format!("{direction}_bits_per_second"));
            let ratio = rate / reference;
            eprintln!(
                "{direction} {args:?}: edgeprobe {:.4} Mbit/s, iperf3 {:.4} Mbit/s, ratio {ratio:.4}",
                rate / 1e6,
                reference / 1e6
            );
            worst = worst.max((ratio - 1.0).abs());
        }
    }
    assert!(
        worst <= 0.05,
        "a reading is {:.1} % off iperf3",
        worst * 100.0
    );
    assert!(
        stamp_worst <= 0.01 * up_ref,
        "the loaded-loss stream took {:.2} kbit/s of a {:.2} Mbit/s link",
        stamp_worst / 1e3,
        up_ref / 1e6
    );
}
