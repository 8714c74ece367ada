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

/// Both directions within 5 % of iperf3 in every run, and within 3 % over 10 s with one
/// stream. The STAMP loaded-loss stream at a fixed 50 packets/s took 3.4 % of this link:
/// one stream's upload read 0.968-0.972 of iperf3 in every run, and the default three
/// streams 0.938 once under CI's load.
#[test]
fn speed_on_a_1mbit_link_agrees_with_iperf3_both_ways() {
    let Some(ns) = shaped_pair("1mbit") else {
        return;
    };
    let _iperf = ns.spawn(1, "iperf3", &["-s", "-B", "10.78.0.2"]);
    let target = Target::start_in(Some(&ns.names[1]), "10.78.0.2:8080", 4);
    // iperf3 before and after the probes, the better of the two: under CI's parallel
    // tests one iperf3 run read 0.920 Mbit/s where the link carries 0.957.
    let mut up_ref = iperf3_reference(&ns, false);
    let mut down_ref = iperf3_reference(&ns, true);
    let mut readings = Vec::new();
    for args in [
        &["--duration", "4s", "--streams", "1"][..],
        &["--duration", "4s"][..],
        &["--duration", "10s", "--streams", "1"][..],
        &[][..],
    ] {
        let (v, code) = probe_in(Some(&ns.names[0]), "speed", &target.url(), args);
        assert_eq!(code, 0, "{args:?}: {v}");
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
    let mut worst_one_stream: f64 = 0.0;
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
            if *args == ["--duration", "10s", "--streams", "1"] {
                worst_one_stream = worst_one_stream.max((ratio - 1.0).abs());
            }
        }
    }
    assert!(
        worst <= 0.05,
        "a reading is {:.1} % off iperf3",
        worst * 100.0
    );
    assert!(
        worst_one_stream <= 0.03,
        "a 10 s one-stream reading is {:.1} % off iperf3",
        worst_one_stream * 100.0
    );
}
