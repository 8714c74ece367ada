//! Upload accuracy on a slow shaped link (issue 14 case 7): two network namespaces
//! (`eps2-*`) joined by a veth pair shaped to 1 Mbit/s with tbf; iperf3 measures the
//! uplink, then the speed probe runs against `serve-target` on the same link with short
//! and default durations, one stream and the default streams.

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

/// iperf3's upload goodput (client in namespace 0 sends) in bits/s, the slow-start and
/// tbf burst left out.
fn iperf3_upload(ns: &Netns) -> f64 {
    iperf3_goodput(ns, &["-c", "10.78.0.2", "-t", "10", "-O", "2", "-J"])
}

#[test]
fn upload_on_a_1mbit_link_agrees_with_iperf3() {
    let Some(ns) = shaped_pair("1mbit") else {
        return;
    };
    let _iperf = ns.spawn(1, "iperf3", &["-s", "-B", "10.78.0.2"]);
    let target = Target::start_in(Some(&ns.names[1]), "10.78.0.2:8080", 4);
    let reference = iperf3_upload(&ns);
    assert!(
        (0.9e6..1.02e6).contains(&reference),
        "the link carries about 0.96 Mbit/s: {reference}"
    );
    let mut worst: f64 = 0.0;
    for args in [
        &["--duration", "4s", "--streams", "1"][..],
        &["--duration", "4s"][..],
        &["--duration", "10s", "--streams", "1"][..],
        &[][..],
    ] {
        let (v, code) = probe_in(Some(&ns.names[0]), "speed", &target.url(), args);
        assert_eq!(code, 0, "{args:?}: {v}");
        let up = f64_of(&v, "upload_bits_per_second");
        let ratio = up / reference;
        eprintln!(
            "upload {args:?}: edgeprobe {:.4} Mbit/s, iperf3 {:.4} Mbit/s, ratio {ratio:.4}",
            up / 1e6,
            reference / 1e6
        );
        worst = worst.max((ratio - 1.0).abs());
    }
    assert!(
        worst <= 0.05,
        "an upload reading is {:.1} % off iperf3",
        worst * 100.0
    );
}
