//! Accuracy on a real link: two network namespaces joined by a veth pair shaped to
//! 100 Mbit/s with tbf on both sides. iperf3 measures the link, then the speed probe runs
//! against `serve-target` on the same link; then icmp against iputils ping.

use crate::util::{f64_of, heavy_lock, iperf3_goodput, probe_in, Netns, Target};

/// iperf3's receiver goodput in bits/s (`reverse`: the server sends, i.e. download).
fn iperf3(ns: &Netns, reverse: bool) -> f64 {
    let mut args = vec!["-c", "10.77.0.2", "-t", "5", "-O", "1", "-J"];
    if reverse {
        args.push("-R");
    }
    iperf3_goodput(ns, &args)
}

#[test]
fn speed_agrees_with_iperf3_on_a_100mbit_link() {
    let _heavy = heavy_lock();
    let Some(ns) = Netns::pair(Some("100mbit")) else {
        return;
    };
    let _iperf = ns.spawn(1, "iperf3", &["-s", "-B", "10.77.0.2"]);
    let target = Target::start_in(Some(&ns.names[1]), "10.77.0.2:8080", 4);

    let iperf_up = iperf3(&ns, false);
    let iperf_down = iperf3(&ns, true);
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "speed",
        &target.url(),
        &["--duration", "6s"],
    );
    assert_eq!(code, 0, "{v}");
    let down = f64_of(&v, "download_bits_per_second");
    let up = f64_of(&v, "upload_bits_per_second");
    let idle = f64_of(&v, "idle_latency_seconds");
    let loaded_down = f64_of(&v, "download_loaded_latency_seconds");
    let loaded_up = f64_of(&v, "upload_loaded_latency_seconds");
    eprintln!("| direction | iperf3 Mbit/s | edgeprobe Mbit/s | ratio |");
    eprintln!(
        "| download | {:.2} | {:.2} | {:.4} |",
        iperf_down / 1e6,
        down / 1e6,
        down / iperf_down
    );
    eprintln!(
        "| upload | {:.2} | {:.2} | {:.4} |",
        iperf_up / 1e6,
        up / 1e6,
        up / iperf_up
    );
    eprintln!(
        "latency idle {:.3} ms, loaded download {:.3} ms, loaded upload {:.3} ms",
        idle * 1e3,
        loaded_down * 1e3,
        loaded_up * 1e3
    );
    assert!(
        iperf_down > 80e6 && iperf_up > 80e6,
        "the link is about 100 Mbit/s"
    );
    assert!(
        (down / iperf_down - 1.0).abs() <= 0.03,
        "download {down} vs iperf3 {iperf_down}"
    );
    assert!(
        (up / iperf_up - 1.0).abs() <= 0.03,
        "upload {up} vs iperf3 {iperf_up}"
    );
    // tbf queues up to 20 ms: a saturated link shows it, an idle one does not.
    for loaded in [loaded_down, loaded_up] {
        assert!(
            loaded > 2e-3 && loaded > 5.0 * idle,
            "loaded {loaded} vs idle {idle}"
        );
    }
}

#[test]
fn icmp_rtt_agrees_with_iputils_ping() {
    // A busy CPU delays wake-ups by more than the tolerance: not with a loopback blast.
    let _heavy = heavy_lock();
    let Some(ns) = Netns::pair(None) else { return };
    let (v, code) = probe_in(
        Some(&ns.names[0]),
        "icmp",
        "10.77.0.2",
        &["--count", "20", "--interval", "50ms"],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["received"].as_u64(), Some(20));
    let ours = f64_of(&v, "rtt_avg_seconds");
    let out = ns.exec(
        0,
        "ping",
        &["-q", "-n", "-c", "20", "-i", "0.05", "10.77.0.2"],
    );
    // rtt min/avg/max/mdev = 0.036/0.049/0.058/0.006 ms
    let line = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .expect("ping summary");
    let numbers = line
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches(" ms");
    let ping_avg: f64 = numbers.split('/').nth(1).unwrap().parse::<f64>().unwrap() / 1e3;
    eprintln!(
        "icmp rtt avg: edgeprobe {:.4} ms, ping {:.4} ms",
        ours * 1e3,
        ping_avg * 1e3
    );
    let tolerance = (0.1 * ping_avg).max(0.2e-3);
    assert!(
        (ours - ping_avg).abs() <= tolerance,
        "ours {ours} vs ping {ping_avg}"
    );
}
