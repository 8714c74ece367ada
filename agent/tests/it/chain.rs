//! A chain of network namespaces for path tests: source, four routers, destination,
//! joined by veth pairs, IPv4 and IPv6, forwarding on in the routers, no ICMP rate
//! limit anywhere (Linux limits time-exceeded to about one a second per source by
//! default, which would drown the loss a test sets up). Tests add their own faults
//! (iptables, routes) in the namespace they name.
//!
//! Link `j` (0 to 4) joins namespace `j` and `j + 1`: `10.88.j.1` / `fd88:0:0:j::1` on
//! the left, `.2` / `::2` on the right. So router `i` (namespace `i`, 1 to 4) answers
//! time-exceeded from `10.88.(i-1).2`, and the destination is `10.88.4.2` /
//! `fd88:0:0:4::2`, five hops from the source.

use std::process::{Command, Output};

use serde_json::Value;

use crate::util::{sh, Netns, BIN};

/// Routers between source and destination.
pub const ROUTERS: usize = 4;
/// Namespaces: source, routers, destination.
const NODES: usize = ROUTERS + 2;

/// The chain; its namespaces go when it is dropped.
pub struct Chain {
    pub ns: Netns,
}

/// Index of the source namespace.
pub const SOURCE: usize = 0;
/// Index of the destination namespace.
pub const DEST: usize = NODES - 1;

pub fn v4(link: usize, side: u8) -> String {
    format!("10.88.{link}.{side}")
}

/// In the form `Ipv6Addr` displays (`fd88::2` for link 0), as results carry it.
pub fn v6(link: usize, side: u8) -> String {
    let ip: std::net::Ipv6Addr = format!("fd88:0:0:{link}::{side}").parse().unwrap();
    ip.to_string()
}

impl Chain {
    /// Builds the chain; `None` only where `util::cannot_run` allows a skip.
    pub fn build() -> Option<Chain> {
        let ns = Netns::create(NODES)?;
        // Before any link exists: without duplicate address detection the link-local
        // addresses are usable at once; a tentative one holds neighbour discovery back
        // and the first IPv6 answers by a second or two.
        for name in &ns.names {
            for setting in [
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ] {
                sh("ip", &["netns", "exec", name, "sysctl", "-qw", setting]);
            }
        }
        for link in 0..NODES - 1 {
            let (left, right) = (&ns.names[link], &ns.names[link + 1]);
            sh(
                "ip",
                &[
                    "link", "add", "vr", "netns", left, "type", "veth", "peer", "name", "vl",
                    "netns", right,
                ],
            );
            for (name, dev, side) in [(left, "vr", 1u8), (right, "vl", 2u8)] {
                sh(
                    "ip",
                    &[
                        "-n",
                        name,
                        "addr",
                        "add",
                        &format!("{}/24", v4(link, side)),
                        "dev",
                        dev,
                    ],
                );
                sh(
                    "ip",
                    &[
                        "-n",
                        name,
                        "addr",
                        "add",
                        &format!("{}/64", v6(link, side)),
                        "dev",
                        dev,
                        "nodad",
                    ],
                );
                sh("ip", &["-n", name, "link", "set", dev, "up"]);
            }
        }
        for node in 0..NODES {
            let name = &ns.names[node];
            for setting in [
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.icmp_ratelimit=0",
                "net.ipv6.icmp.ratelimit=0",
                "net.ipv4.icmp_msgs_per_sec=100000",
            ] {
                sh("ip", &["netns", "exec", name, "sysctl", "-qw", setting]);
            }
            // Every link not attached here is reached through the neighbour on its side.
            for link in 0..NODES - 1 {
                let (via4, via6, dev) = if link + 1 < node {
                    (v4(node - 1, 1), v6(node - 1, 1), "vl")
                } else if link > node {
                    (v4(node, 2), v6(node, 2), "vr")
                } else {
                    continue;
                };
                sh(
                    "ip",
                    &[
                        "-n",
                        name,
                        "route",
                        "add",
                        &format!("10.88.{link}.0/24"),
                        "via",
                        &via4,
                        "dev",
                        dev,
                    ],
                );
                sh(
                    "ip",
                    &[
                        "-n",
                        name,
                        "-6",
                        "route",
                        "add",
                        &format!("fd88:0:0:{link}::/64"),
                        "via",
                        &via6,
                        "dev",
                        dev,
                    ],
                );
            }
        }
        let chain = Chain { ns };
        chain.settle();
        Some(chain)
    }

    /// Waits until IPv6 can resolve neighbours on every link (each veth has its
    /// link-local address, which the kernel adds only once it has seen the link up,
    /// batched up to a second later), then sends one ping each way end to end, so the
    /// neighbour entries exist and the first probes of a test are not held back.
    fn settle(&self) {
        let start = std::time::Instant::now();
        for node in 0..NODES {
            let links = if node == SOURCE || node == DEST { 1 } else { 2 };
            loop {
                let out = sh(
                    "ip",
                    &[
                        "-n",
                        self.name(node),
                        "-6",
                        "-o",
                        "addr",
                        "show",
                        "scope",
                        "link",
                    ],
                );
                let ready = out.lines().filter(|l| !l.contains("tentative")).count();
                if ready >= links {
                    break;
                }
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(10),
                    "no IPv6 link-local addresses in {} after 10 s:\n{out}",
                    self.name(node)
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        for ipv6 in [false, true] {
            let dest = self.dest(ipv6);
            let ok = (0..20).any(|_| {
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        self.name(SOURCE),
                        "ping",
                        "-c",
                        "1",
                        "-W",
                        "1",
                        &dest,
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            assert!(ok, "the chain does not carry pings to {dest}");
        }
    }

    pub fn name(&self, node: usize) -> &str {
        &self.ns.names[node]
    }

    /// Runs a command inside namespace `node`, panicking with its output on failure.
    pub fn exec(&self, node: usize, program: &str, args: &[&str]) -> String {
        self.ns.exec(node, program, args)
    }

    /// The destination's address.
    pub fn dest(&self, ipv6: bool) -> String {
        if ipv6 {
            v6(NODES - 2, 2)
        } else {
            v4(NODES - 2, 2)
        }
    }

    /// The address each hop answers from, TTL 1 to the destination.
    pub fn hops(&self, ipv6: bool) -> Vec<String> {
        (0..NODES - 1)
            .map(|link| if ipv6 { v6(link, 2) } else { v4(link, 2) })
            .collect()
    }

    /// `edgeprobe-agent probe path TARGET --json ARGS` in the source namespace, as `user`
    /// when given (`runuser`), returning the JSON result and exit code.
    pub fn probe(&self, user: Option<&str>, target: &str, args: &[&str]) -> (Value, i32) {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.name(SOURCE)]);
        if let Some(user) = user {
            command.args(["runuser", "-u", user, "--"]);
        }
        command
            .args([BIN, "probe", "path", target, "--json"])
            .args(args);
        let output = command.output().expect("run edgeprobe-agent probe path");
        crate::util::parse_probe("path", target, &output)
    }

    /// `mtr -n --report --json ARGS TARGET` in the source namespace: each hop's host
    /// ("???" for a silent one) and Loss% as a ratio.
    pub fn mtr(&self, target: &str, args: &[&str]) -> Vec<(String, f64)> {
        let output: Output = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.name(SOURCE),
                "mtr",
                "-n",
                "--report",
                "--json",
            ])
            .args(args)
            .arg(target)
            .output()
            .expect("mtr (Debian package mtr-tiny; scripts/setup installs it)");
        assert!(
            output.status.success(),
            "mtr failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Value = serde_json::from_slice(&output.stdout).expect("mtr --json");
        report["report"]["hubs"]
            .as_array()
            .expect("mtr hubs")
            .iter()
            .map(|hub| {
                (
                    hub["host"].as_str().unwrap_or("").to_string(),
                    hub["Loss%"].as_f64().expect("Loss%") / 100.0,
                )
            })
            .collect()
    }
}
