//! Two links, two families (issue 27): a client namespace with two uplinks through two
//! router namespaces to one target, dual-stack, shaped differently with tbf (uplink 1:
//! 50 Mbit/s through r1, the default route; uplink 2: 5 Mbit/s through r2). The target
//! holds its service addresses 10.81.9.9 and fd81:9::9 on lo, serve-target, iperf3 and a
//! tiny DNS responder for the dual-stack name `dual.test` (A and AAAA).
//!
//! Which link a packet took is counted on the routers: an iptables/ip6tables rule in
//! each router's FORWARD chain, read with `-v -x`.

use std::process::Command;

use serde_json::Value;

use crate::util::{class, f64_of, heavy_lock, probe_in, sh, Netns, Proc, Target, BIN};

const DNS_RESPONDER: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
A = socket.inet_aton("10.81.9.9")
AAAA = socket.inet_pton(socket.AF_INET6, "fd81:9::9")
while True:
    q, peer = s.recvfrom(2048)
    i = 12
    while q[i]:
        i += q[i] + 1
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
    name = q[12:i + 1].lower()
    known = name == b"\x04dual\x04test\x00"
    ans, n = b"", 0
    if known and qtype == 1:
        ans, n = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + A, 1
    if known and qtype == 28:
        ans, n = b"\xc0\x0c" + struct.pack(">HHIH", 28, 1, 60, 16) + AAAA, 1
    flags = 0x8180 | (0 if known else 3)
    s.sendto(q[:2] + struct.pack(">HHHHH", flags, 1, n, 0, 0) + q[12:i + 5] + ans, peer)
"#;

/// client (0), r1 (1), r2 (2), target (3).
struct Links {
    ns: Netns,
    _procs: Vec<Proc>,
    target: Target,
    script: std::path::PathBuf,
}

const CLIENT: usize = 0;
const R1: usize = 1;
const R2: usize = 2;
const TARGET: usize = 3;

impl Links {
    fn new() -> Option<Links> {
        let ns = Netns::create(4)?;
        let n = |i: usize| ns.names[i].clone();
        let veth = |a: usize, da: &str, b: usize, db: &str| {
            sh(
                "ip",
                &[
                    "link",
                    "add",
                    da,
                    "netns",
                    &n(a),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    db,
                    "netns",
                    &n(b),
                ],
            );
        };
        veth(CLIENT, "up1", R1, "r1c");
        veth(CLIENT, "up2", R2, "r2c");
        veth(R1, "r1t", TARGET, "t1");
        veth(R2, "r2t", TARGET, "t2");
        let addr = |i: usize, dev: &str, v4: &str, v6: &str| {
            sh("ip", &["-n", &n(i), "addr", "add", v4, "dev", dev]);
            sh(
                "ip",
                &["-n", &n(i), "-6", "addr", "add", v6, "dev", dev, "nodad"],
            );
            sh("ip", &["-n", &n(i), "link", "set", dev, "up"]);
        };
        addr(CLIENT, "up1", "10.81.1.2/24", "fd81:1::2/64");
        addr(R1, "r1c", "10.81.1.1/24", "fd81:1::1/64");
        addr(CLIENT, "up2", "10.81.2.2/24", "fd81:2::2/64");
        addr(R2, "r2c", "10.81.2.1/24", "fd81:2::1/64");
        addr(R1, "r1t", "10.81.3.1/24", "fd81:3::1/64");
        addr(TARGET, "t1", "10.81.3.2/24", "fd81:3::2/64");
        addr(R2, "r2t", "10.81.4.1/24", "fd81:4::1/64");
        addr(TARGET, "t2", "10.81.4.2/24", "fd81:4::2/64");
        sh(
            "ip",
            &["-n", &n(TARGET), "addr", "add", "10.81.9.9/32", "dev", "lo"],
        );
        sh(
            "ip",
            &[
                "-n",
                &n(TARGET),
                "-6",
                "addr",
                "add",
                "fd81:9::9/128",
                "dev",
                "lo",
            ],
        );
        let ip = |i: usize, args: &[&str]| {
            let mut all = vec!["-n", &ns.names[i]];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        for r in [R1, R2] {
            ns.exec(r, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            ns.exec(r, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        // Routers: the service addresses through the target, the client's networks direct.
        ip(R1, &["route", "add", "10.81.9.9/32", "via", "10.81.3.2"]);
        ip(
            R1,
            &["-6", "route", "add", "fd81:9::9/128", "via", "fd81:3::2"],
        );
        ip(R2, &["route", "add", "10.81.9.9/32", "via", "10.81.4.2"]);
        ip(
            R2,
            &["-6", "route", "add", "fd81:9::9/128", "via", "fd81:4::2"],
        );
        // The target answers each uplink's addresses back through its router.
        ip(
            TARGET,
            &["route", "add", "10.81.1.0/24", "via", "10.81.3.1"],
        );
        ip(
            TARGET,
            &["-6", "route", "add", "fd81:1::/64", "via", "fd81:3::1"],
        );
        ip(
            TARGET,
            &["route", "add", "10.81.2.0/24", "via", "10.81.4.1"],
        );
        ip(
            TARGET,
            &["-6", "route", "add", "fd81:2::/64", "via", "fd81:4::1"],
        );
        // Client: the default route is uplink 1; uplink 2 has a worse default (taken when a
        // socket is bound to up2) and a policy rule for its own addresses, as a multi-homed
        // host is set up.
        ip(
            CLIENT,
            &[
                "route",
                "add",
                "default",
                "via",
                "10.81.1.1",
                "metric",
                "10",
            ],
        );
        ip(
            CLIENT,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd81:1::1",
                "metric",
                "10",
            ],
        );
        ip(
            CLIENT,
            &[
                "route",
                "add",
                "default",
                "via",
                "10.81.2.1",
                "metric",
                "200",
            ],
        );
        ip(
            CLIENT,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd81:2::1",
                "metric",
                "200",
            ],
        );
        ip(
            CLIENT,
            &[
                "route",
                "add",
                "default",
                "via",
                "10.81.2.1",
                "table",
                "102",
            ],
        );
        ip(
            CLIENT,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd81:2::1",
                "table",
                "102",
            ],
        );
        ip(
            CLIENT,
            &["rule", "add", "from", "10.81.2.2", "table", "102"],
        );
        ip(
            CLIENT,
            &["-6", "rule", "add", "from", "fd81:2::2", "table", "102"],
        );
        // Shaping: each uplink's both directions.
        for (i, dev, rate) in [
            (CLIENT, "up1", "50mbit"),
            (R1, "r1c", "50mbit"),
            (CLIENT, "up2", "5mbit"),
            (R2, "r2c", "5mbit"),
        ] {
            sh(
                "tc",
                &[
                    "-n",
                    &ns.names[i],
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "32kb",
                    "latency",
                    "20ms",
                ],
            );
        }
        for r in [R1, R2] {
            for tool in ["iptables", "ip6tables"] {
                ns.exec(r, tool, &["-w", "-A", "FORWARD", "-j", "ACCEPT"]);
            }
        }
        // One per Links: tests of one process run side by side.
        let script = std::env::temp_dir().join(format!(
            "ep-links-dns-{}-{}.py",
            std::process::id(),
            ns.names[CLIENT]
        ));
        std::fs::write(&script, DNS_RESPONDER).expect("write the DNS responder");
        let procs = vec![
            ns.spawn(TARGET, "python3", &[script.to_str().unwrap(), "10.81.9.9"]),
            ns.spawn(TARGET, "iperf3", &["-s"]),
        ];
        let target = Target::start_in(Some(&ns.names[TARGET]), "[::]:8080", 8);
        // The client's resolver: the responder (ip netns exec mounts /etc/netns/NAME).
        let etc = format!("/etc/netns/{}", ns.names[CLIENT]);
        std::fs::create_dir_all(&etc).expect("/etc/netns");
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 10.81.9.9\n").unwrap();
        let links = Links {
            ns,
            _procs: procs,
            target,
            script,
        };
        // Wait until both paths carry traffic (neighbour discovery, the servers).
        for _ in 0..50 {
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &links.ns.names[CLIENT],
                    "ping",
                    "-c1",
                    "-W1",
                    "-I",
                ])
                .args(["10.81.2.2", "10.81.9.9"])
                .status()
                .is_ok_and(|s| s.success())
                && Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &links.ns.names[CLIENT],
                        "ping",
                        "-c1",
                        "-W1",
                    ])
                    .arg("fd81:9::9")
                    .status()
                    .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Some(links)
    }

    /// Packets router `r` forwarded (IPv4 plus IPv6).
    fn forwarded(&self, r: usize) -> u64 {
        ["iptables", "ip6tables"]
            .iter()
            .map(|tool| {
                let out = self
                    .ns
                    .exec(r, tool, &["-w", "-n", "-v", "-x", "-L", "FORWARD"]);
                out.lines()
                    .filter(|l| l.contains("ACCEPT"))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    fn client(&self) -> &str {
        &self.ns.names[CLIENT]
    }

    /// Every JSON object `probe --json` prints (two with `--family both`).
    fn probe_all(&self, kind: &str, target: &str, args: &[&str]) -> Vec<Value> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.client(),
                BIN,
                "probe",
                kind,
                target,
                "--json",
            ])
            .args(args)
            .output()
            .expect("probe");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
            .collect()
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.ns.names[CLIENT]));
        let _ = std::fs::remove_file(&self.script);
    }
}

fn iperf3_on(links: &Links, dev: &str, reverse: bool) -> f64 {
    let mut args = vec![
        "-c",
        "10.81.9.9",
        "--bind-dev",
        dev,
        "-t",
        "6",
        "-O",
        "1",
        "-J",
    ];
    if reverse {
        args.push("-R");
    }
    for attempt in 0.. {
        let out = Command::new("ip")
            .args(["netns", "exec", links.client(), "iperf3"])
            .args(&args)
            .output()
            .expect("iperf3");
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J");
            return f64_of(&v["end"]["sum_received"], "bits_per_second");
        }
        assert!(
            attempt < 20,
            "iperf3: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    unreachable!()
}

#[test]
fn speed_with_interface_measures_each_uplink() {
    let _heavy = heavy_lock();
    let Some(links) = Links::new() else {
        return;
    };
    let url = "http://10.81.9.9:8080/";
    eprintln!("| uplink | direction | iperf3 Mbit/s | edgeprobe Mbit/s | ratio |");
    for (dev, nominal) in [("up1", 50e6), ("up2", 5e6)] {
        let iperf_down = iperf3_on(&links, dev, true);
        let iperf_up = iperf3_on(&links, dev, false);
        let (v, code) = probe_in(
            Some(links.client()),
            "speed",
            url,
            &["--duration", "6s", "--interface", dev],
        );
        assert_eq!(code, 0, "{v}");
        assert_eq!(v["interface"], dev, "{v}");
        assert_eq!(v["ip_family"], "ipv4", "{v}");
        let local = v["local_address"].as_str().unwrap_or_default();
        assert_eq!(
            local,
            if dev == "up1" {
                "10.81.1.2"
            } else {
                "10.81.2.2"
            }
        );
        let down = f64_of(&v, "download_bits_per_second");
        let up = f64_of(&v, "upload_bits_per_second");
        for (direction, ours, theirs) in [("download", down, iperf_down), ("upload", up, iperf_up)]
        {
            eprintln!(
                "| {dev} | {direction} | {:.2} | {:.2} | {:.4} |",
                theirs / 1e6,
                ours / 1e6,
                ours / theirs
            );
            assert!(
                theirs > 0.8 * nominal && theirs < 1.1 * nominal,
                "{dev} {direction}: iperf3 {theirs} on a {nominal} link"
            );
            assert!(
                (ours / theirs - 1.0).abs() <= 0.10,
                "{dev} {direction}: edgeprobe {ours} vs iperf3 {theirs}"
            );
        }
    }
}

#[test]
fn source_leaves_by_the_chosen_uplink() {
    let Some(links) = Links::new() else {
        return;
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "tcp",
            "10.81.9.9:8080".into(),
            vec!["--source", "10.81.2.2"],
        ),
        (
            "tcp",
            "[fd81:9::9]:8080".into(),
            vec!["--source", "fd81:2::2"],
        ),
        (
            "http",
            links.target.url().replace("[::]", "10.81.9.9") + "/nq/small",
            vec!["--source", "10.81.2.2"],
        ),
        (
            "icmp",
            "10.81.9.9".into(),
            vec![
                "--source",
                "10.81.2.2",
                "--count",
                "3",
                "--interval",
                "100ms",
            ],
        ),
        (
            "icmp",
            "fd81:9::9".into(),
            vec![
                "--source",
                "fd81:2::2",
                "--count",
                "3",
                "--interval",
                "100ms",
            ],
        ),
        (
            "dns",
            "dual.test".into(),
            vec!["--source", "10.81.2.2", "--server", "10.81.9.9"],
        ),
        (
            "path",
            "10.81.9.9".into(),
            vec![
                "--source",
                "10.81.2.2",
                "--count",
                "2",
                "--interval",
                "100ms",
            ],
        ),
        (
            "path",
            "10.81.9.9".into(),
            vec![
                "--source",
                "10.81.2.2",
                "--count",
                "2",
                "--interval",
                "100ms",
                "--protocol",
                "udp",
            ],
        ),
        (
            "path",
            "10.81.9.9".into(),
            vec![
                "--source",
                "10.81.2.2",
                "--count",
                "2",
                "--interval",
                "100ms",
                "--protocol",
                "tcp",
                "--port",
                "8080",
            ],
        ),
        // The reflector answers from the address the route back gives (t2's), not the one
        // asked (10.81.9.9 on lo), so a connected sender hears it only at t2's address.
        (
            "stamp",
            "10.81.4.2".into(),
            vec![
                "--source",
                "10.81.2.2",
                "--count",
                "5",
                "--interval",
                "10ms",
            ],
        ),
        (
            "responsiveness",
            links.target.url().replace("[::]", "10.81.9.9"),
            vec!["--source", "10.81.2.2", "--max-duration", "2s"],
        ),
    ];
    for (kind, target, args) in &cases {
        let r1 = links.forwarded(R1);
        let r2 = links.forwarded(R2);
        let (v, code) = probe_in(Some(links.client()), kind, target, args);
        assert_eq!(code, 0, "{kind} {target} {args:?}: {v}");
        let (r1_after, r2_after) = (links.forwarded(R1), links.forwarded(R2));
        eprintln!(
            "{kind} {target} {args:?}: r1 forwarded {}, r2 forwarded {}, local {}",
            r1_after - r1,
            r2_after - r2,
            v["local_address"]
        );
        assert_eq!(r1_after, r1, "{kind} {target}: nothing through r1");
        assert!(r2_after > r2, "{kind} {target}: through r2");
        assert_eq!(v["local_address"], args[1], "{kind}: {v}");
    }
    // `interface` alone: the uplink's own route, whatever the default.
    for (kind, target) in [
        ("tcp", "10.81.9.9:8080"),
        ("icmp", "10.81.9.9"),
        ("path", "10.81.9.9"),
    ] {
        let r1 = links.forwarded(R1);
        let args = ["--interface", "up2", "--count", "2", "--interval", "100ms"];
        let args = if kind == "tcp" { &args[..2] } else { &args[..] };
        let (v, code) = probe_in(Some(links.client()), kind, target, args);
        assert_eq!(code, 0, "{kind} {args:?}: {v}");
        assert_eq!(links.forwarded(R1), r1, "{kind} on up2: nothing through r1");
        assert_eq!(
            (v["interface"].as_str(), v["local_address"].as_str()),
            (Some("up2"), Some("10.81.2.2")),
            "{v}"
        );
    }
    // Without `source` the same probe leaves by the default route (r1): the counters see.
    let r1 = links.forwarded(R1);
    let (v, code) = probe_in(Some(links.client()), "tcp", "10.81.9.9:8080", &[]);
    assert_eq!(code, 0, "{v}");
    assert!(links.forwarded(R1) > r1, "the default route is r1");
    assert_eq!(v["local_address"], "10.81.1.2");
}

#[test]
fn family_both_gives_one_result_per_family() {
    let Some(links) = Links::new() else {
        return;
    };
    let results = links.probe_all("tcp", "dual.test:8080", &["--family", "both"]);
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0]["ip_family"], "ipv4", "{}", results[0]);
    assert_eq!(results[1]["ip_family"], "ipv6", "{}", results[1]);
    assert!(results.iter().all(|r| r["success"] == true), "{results:?}");
    assert_eq!(results[0]["local_address"], "10.81.1.2");
    assert_eq!(results[1]["local_address"], "fd81:1::2");

    // dns with a family and no server asks the namespace's nameserver of that family.
    let (v, code) = probe_in(
        Some(links.client()),
        "dns",
        "dual.test",
        &["--family", "ipv4", "--record-type", "AAAA"],
    );
    assert_eq!((code, v["answers"].as_u64()), (0, Some(1)), "{v}");
    assert_eq!(v["ip_family"], "ipv4", "{v}");

    // `family = "ipv6"` alone, and a name without such an address is a dns failure.
    let (v, code) = probe_in(
        Some(links.client()),
        "http",
        "http://dual.test:8080/nq/small",
        &["--family", "ipv6"],
    );
    assert_eq!((code, v["ip_family"].as_str()), (0, Some("ipv6")), "{v}");

    // The IPv6 routes gone: the IPv6 result fails, the IPv4 one still succeeds.
    for metric in ["10", "200"] {
        let via = if metric == "10" {
            "fd81:1::1"
        } else {
            "fd81:2::1"
        };
        links.ns.exec(
            CLIENT,
            "ip",
            &[
                "-6", "route", "del", "default", "via", via, "metric", metric,
            ],
        );
    }
    let results = links.probe_all("tcp", "dual.test:8080", &["--family", "both"]);
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0]["success"], true, "{}", results[0]);
    assert_eq!(results[1]["success"], false, "{}", results[1]);
    assert_eq!(results[1]["ip_family"], "ipv6");
    assert_eq!(class(&results[1]), "unreachable", "{}", results[1]);
}

#[test]
fn a_missing_interface_or_source_is_local_and_sends_nothing() {
    let Some(links) = Links::new() else {
        return;
    };
    let cases: [(&str, &str, [&str; 2], &str); 6] = [
        ("tcp", "10.81.9.9:8080", ["--interface", "wwan7"], "wwan7"),
        ("icmp", "10.81.9.9", ["--interface", "wwan7"], "wwan7"),
        ("path", "10.81.9.9", ["--interface", "wwan7"], "wwan7"),
        ("dns", "dual.test", ["--interface", "wwan7"], "wwan7"),
        (
            "tcp",
            "10.81.9.9:8080",
            ["--source", "10.81.5.5"],
            "10.81.5.5",
        ),
        ("icmp", "10.81.9.9", ["--source", "10.81.5.5"], "10.81.5.5"),
    ];
    for (kind, target, args, named) in cases {
        let before = (links.forwarded(R1), links.forwarded(R2));
        let (v, code) = probe_in(Some(links.client()), kind, target, &args);
        assert_eq!(code, 1, "{v}");
        assert_eq!(class(&v), "local", "{kind} {args:?}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{kind}: {message}");
        assert_eq!(
            (links.forwarded(R1), links.forwarded(R2)),
            before,
            "{kind} {args:?}: no packet left"
        );
    }
}

/// `check` takes the link options on any kind, refuses a bad interface name or a `source`
/// of the other family, and warns (exit 0) about an interface this host does not have.
#[test]
fn check_validates_link_options_and_warns_of_a_missing_interface() {
    let dir = tempfile::tempdir().unwrap();
    let check = |options: &str| {
        let path = dir.path().join("agent.toml");
        let text = format!(
            "[agent]\nid = \"it-links\"\nstate_dir = \"{}\"\n\n[collector]\n\
             endpoints = [\"http://127.0.0.1:9\"]\ninsecure = true\n\n[[test]]\n\
             name = \"uplink-2\"\nkind = \"tcp\"\ntarget = \"192.0.2.1:443\"\nevery = \"1m\"\n\n\
             [test.options]\n{options}\n",
            dir.path().join("state").display()
        );
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = check("interface = \"wwan7\"\nfamily = \"both\"");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("interface `wwan7` does not exist on this host"),
        "{stderr}"
    );
    let (code, stderr) = check("interface = \"lo\"\nsource = \"127.0.0.1\"\nfamily = \"ipv4\"");
    assert_eq!((code, stderr.as_str()), (Some(0), ""));
    let (code, stderr) = check("interface = \"eth0:1\"");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not an interface name"), "{stderr}");
    let (code, stderr) = check("source = \"2001:db8::1\"\nfamily = \"ipv4\"");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is IPv6 but `family` is ipv4"), "{stderr}");
}
