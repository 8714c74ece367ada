//! Path tests end to end (issue 22, both halves): real agents in network namespaces
//! probing real routers, a real collector, a real PostgreSQL. A route change lands flagged
//! with both paths in `path_hops` and counted on /metrics; three agents behind a router that
//! turns lossy are found by `paths shared` with that router first; `run-now` of a path test
//! prints the hop table and the result lands; a fleet path test runs on the agent it
//! selects only.
//!
//! The namespaces (`Lab`, names prefixed `pe`) are IPv4 only: the probe's IPv6, zones and
//! agreement with mtr are the agent's tests (agent/tests/it/path.rs). Each agent's namespace
//! also has a veth to the host's namespace (`Lab::uplink`), where the collector listens, so
//! the results travel the real gRPC stream while the probes take the routers.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

// ---------------------------------------------------------------------------------------
// Namespaces

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Network namespaces joined by veths and bridges, deleted (with their veths) when dropped.
struct Lab {
    names: Vec<String>,
}

impl Lab {
    /// `n` namespaces, loopback up, forwarding on, no ICMP rate limit (Linux sends about
    /// one time-exceeded a second per source by default, which a path test reads as loss).
    fn new(n: usize) -> Lab {
        let mut lab = Lab { names: Vec::new() };
        for _ in 0..n {
            let name = format!(
                "pe{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .expect("run ip netns add");
            assert!(
                out.status.success(),
                "these tests need network namespaces (run them as root): ip netns add: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            lab.names.push(name);
            let i = lab.names.len() - 1;
            ip(&["-n", lab.ns(i), "link", "set", "lo", "up"]);
            for setting in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.icmp_ratelimit=0",
                "net.ipv4.icmp_msgs_per_sec=100000",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ] {
                lab.exec(i, "sysctl", &["-qw", setting]);
            }
        }
        lab
    }

    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Runs a program in namespace `i`, panicking with its stderr on failure.
    fn exec(&self, i: usize, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.ns(i), program];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A veth pair from namespace `a` to `b`, both ends up; returns their names.
    fn veth(&self, a: usize, b: usize) -> (String, String) {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let (da, db) = (format!("v{k}a"), format!("v{k}b"));
        ip(&[
            "link",
            "add",
            &da,
            "netns",
            self.ns(a),
            "type",
            "veth",
            "peer",
            "name",
            &db,
            "netns",
            self.ns(b),
        ]);
        ip(&["-n", self.ns(a), "link", "set", &da, "up"]);
        ip(&["-n", self.ns(b), "link", "set", &db, "up"]);
        (da, db)
    }

    /// A veth from `a` (address `a_cidr`) to `b` (`b_cidr`).
    fn link(&self, a: usize, a_cidr: &str, b: usize, b_cidr: &str) {
        let (da, db) = self.veth(a, b);
        ip(&["-n", self.ns(a), "addr", "add", a_cidr, "dev", &da]);
        ip(&["-n", self.ns(b), "addr", "add", b_cidr, "dev", &db]);
    }

    /// A bridge `br0` in namespace `i` with address `cidr`: one L2 segment, so the router
    /// answers every host on it from the same address.
    fn bridge(&self, i: usize, cidr: &str) {
        ip(&["-n", self.ns(i), "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", self.ns(i), "addr", "add", cidr, "dev", "br0"]);
        ip(&["-n", self.ns(i), "link", "set", "br0", "up"]);
    }

    /// Namespace `host` on the bridge of namespace `bridge`, with address `cidr`.
    fn join(&self, host: usize, cidr: &str, bridge: usize) {
        let (dh, db) = self.veth(host, bridge);
        ip(&["-n", self.ns(host), "addr", "add", cidr, "dev", &dh]);
        ip(&["-n", self.ns(bridge), "link", "set", &db, "master", "br0"]);
    }

    fn route(&self, i: usize, prefix: &str, via: &str) {
        ip(&["-n", self.ns(i), "route", "replace", prefix, "via", via]);
    }

    /// A veth from namespace `i` to the host's namespace, where the collector listens;
    /// returns the host side's address. A /30 of 10.249.0.0/16 no interface of the host
    /// has yet (tests in other processes make their own).
    fn uplink(&self, i: usize) -> Ipv4Addr {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let host_dev = format!("pe{}u{k}", std::process::id() % 1_000_000);
        let inner_dev = format!("up{k}");
        let used = ip(&["-4", "-o", "addr", "show"]);
        let start = std::process::id() as usize * 7 + k as usize;
        let (host, inner) = (0..16_384)
            .map(|n| {
                let slot = ((start + n) % 16_384) as u32;
                let base = u32::from(Ipv4Addr::new(10, 249, 0, 0)) + slot * 4;
                (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
            })
            .find(|(h, _)| !used.contains(&format!(" {h}/")))
            .expect("a free /30 in 10.249.0.0/16");
        ip(&[
            "link",
            "add",
            &host_dev,
            "type",
            "veth",
            "peer",
            "name",
            &inner_dev,
            "netns",
            self.ns(i),
        ]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_dev]);
        ip(&["link", "set", &host_dev, "up"]);
        ip(&[
            "-n",
            self.ns(i),
            "addr",
            "add",
            &format!("{inner}/30"),
            "dev",
            &inner_dev,
        ]);
        ip(&["-n", self.ns(i), "link", "set", &inner_dev, "up"]);
        host
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A line of `routers` between source (namespace 0) and destination (the last): link `k`
/// joins namespace `k` (`10.NET.k.1`) and `k + 1` (`10.NET.k.2`). Returns the lab and the
/// address each hop answers from, TTL 1 to the destination.
fn line(routers: usize, net: u8) -> (Lab, Vec<String>) {
    let lab = Lab::new(routers + 2);
    let a = |k: usize, side: u8| format!("10.{net}.{k}.{side}");
    for k in 0..=routers {
        lab.link(
            k,
            &format!("{}/24", a(k, 1)),
            k + 1,
            &format!("{}/24", a(k, 2)),
        );
    }
    lab.route(0, "default", &a(0, 2));
    for r in 1..=routers {
        lab.route(r, "default", &a(r, 2));
        for left in 0..r.saturating_sub(1) {
            lab.route(r, &format!("10.{net}.{left}.0/24"), &a(r - 1, 1));
        }
    }
    lab.route(routers + 1, "default", &a(routers, 1));
    let hops = (0..=routers).map(|k| a(k, 2)).collect();
    (lab, hops)
}

// ---------------------------------------------------------------------------------------
// Collector and agents

/// A collector whose gRPC listens on every address (the agents come through their
/// uplinks), and a database.
fn collector(dir: &Path) -> (TestDb, Collector, u16) {
    let db = TestDb::new();
    let port = free_addr().port();
    let grpc = SocketAddr::from(([0, 0, 0, 0], port));
    let c = Collector::start_at(dir, &db, grpc, free_addr());
    (db, c, port)
}

/// Agent `id` (labels `site = SITE`) running in namespace `node` of `lab`, sending to the
/// collector on `port` through its own uplink, with `tests` (`[[test]]` blocks).
fn agent_in(
    lab: &Lab,
    node: usize,
    dir: &Path,
    id: &str,
    site: &str,
    port: u16,
    tests: &str,
) -> Agent {
    let host = lab.uplink(node);
    let mut agent = Agent::new(dir, id, &format!("http://{host}:{port}"), tests);
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("site = \"lab\"", &format!("site = \"{site}\"")),
    )
    .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", lab.ns(node)])
        .arg(agent_bin())
        .arg("run")
        .arg("--config")
        .arg(&agent.config);
    agent.proc = Some(Proc::spawn(cmd, agent.config.with_extension("log")));
    agent
}

/// A scheduled path test: 5 rounds 200 ms apart every 3 s, the run cut at 2 s (a lossy
/// path does not make it wait the default 3 s for the last round).
fn path_test(name: &str, target: &str) -> String {
    format!(
        "[[test]]\nname = \"{name}\"\nkind = \"path\"\ntarget = \"{target}\"\nevery = \"3s\"\noptions = {{ count = 5, interval = \"200ms\", timeout = \"2s\" }}\n"
    )
}

/// The database's clock, in seconds since the epoch.
fn db_now(db: &TestDb) -> f64 {
    db.client()
        .query_one("SELECT extract(epoch FROM now())::float8", &[])
        .unwrap()
        .get(0)
}

/// Results of `agent`'s `test` that started after `after` (epoch seconds).
fn results_after(db: &TestDb, agent: &str, test: &str, after: f64) -> i64 {
    db.client()
        .query_one(
            "SELECT count(*) FROM results WHERE agent_id = $1 AND test = $2
                AND started_at > to_timestamp($3)",
            &[&agent, &test, &after],
        )
        .unwrap()
        .get(0)
}

/// Waits until `agent` has `n` results of `test` started after `after`; the agent's log
/// in the panic.
fn wait_results(db: &TestDb, agent: &Agent, id: &str, test: &str, after: f64, n: i64) {
    let limit = Duration::from_secs(60);
    let start = std::time::Instant::now();
    while results_after(db, id, test, after) < n {
        assert!(
            start.elapsed() < limit,
            "{id}: fewer than {n} results of {test} within {limit:?}; agent log:\n{}",
            agent.proc.as_ref().map(Proc::log_text).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The value of the series of `name` whose labels include every one of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// Tests

/// Before issue 22 there was no path kind; on the collector half alone, no agent sends
/// one. Here a real agent runs a path test every 3 s on source - r1 - r2 - r3 - destination;
/// then a bypass r1 - r3 is switched in both ways by changing routes. The first result
/// over the new path lands with `path_changed`, the one after it without, `path_hops`
/// holds the hops of both paths, and /metrics counts exactly the flagged rows.
#[test]
fn a_route_change_lands_flagged_with_both_paths_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (lab, old) = line(3, 91);
    // r1 (namespace 1) and r3 (namespace 3), joined directly; not used yet.
    lab.link(1, "10.91.9.1/24", 3, "10.91.9.2/24");
    let dest = old.last().unwrap().clone();
    assert_eq!(old, ["10.91.0.2", "10.91.1.2", "10.91.2.2", "10.91.3.2"]);
    let new: Vec<String> = ["10.91.0.2", "10.91.9.2", "10.91.3.2"]
        .map(String::from)
        .to_vec();

    let (db, collector, port) = collector(dir.path());
    let agent = agent_in(
        &lab,
        0,
        dir.path(),
        "berlin-1",
        "berlin",
        port,
        &path_test("route", &dest),
    );
    wait_results(&db, &agent, "berlin-1", "route", 0.0, 2);

    let switched = db_now(&db);
    lab.route(1, "default", "10.91.9.2");
    lab.route(3, "10.91.0.0/24", "10.91.9.1");
    wait_results(&db, &agent, "berlin-1", "route", switched + 0.1, 2);

    let rows = db
        .client()
        .query(
            "SELECT extract(epoch FROM r.started_at)::float8, r.duration_seconds,
                    r.path_changed, r.success,
                    (SELECT array_agg(coalesce(h.address, '???') ORDER BY h.ttl) FROM path_hops h
                      WHERE h.agent_id = r.agent_id AND h.test = r.test
                        AND h.started_at = r.started_at AND h.seq = r.seq)
               FROM results r WHERE r.agent_id = 'berlin-1' AND r.test = 'route'
              ORDER BY r.started_at",
            &[],
        )
        .unwrap();
    let mut changed = 0;
    let mut after = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let (started, duration, flag): (f64, f64, Option<bool>) =
            (row.get(0), row.get(1), row.get(2));
        let hops: Vec<String> = row.get::<_, Option<Vec<String>>>(4).unwrap_or_default();
        assert!(row.get::<_, bool>(3), "every run reaches: {hops:?}");
        let flag = flag.expect("path results carry path_changed");
        changed += i64::from(flag);
        if started + duration < switched {
            assert_eq!(hops, old, "before the switch");
            assert!(!flag, "no change before the switch (result {i})");
        } else if started > switched + 0.1 {
            assert_eq!(hops, new, "after the switch");
            after.push(flag);
        }
        if i == 0 {
            assert!(!flag, "the first result has nothing to differ from");
        }
    }
    // The first result over the bypass is flagged unless one that straddled the switch
    // already was; the one after it is on the same path.
    let straddled = rows
        .iter()
        .filter(|r| {
            let (started, duration): (f64, f64) = (r.get(0), r.get(1));
            started + duration >= switched && started <= switched + 0.1
        })
        .count();
    assert!(after.len() >= 2);
    assert!(
        !after[1],
        "the second result over the bypass is no change: {after:?}"
    );
    assert!(
        after[0] || straddled > 0,
        "the first result over the bypass is flagged: {after:?}"
    );
    assert!(
        (1..=2).contains(&changed),
        "one change (two if a result straddled the switch): {changed}"
    );

    // path_hops: one row per hop, of both paths.
    let seen: Vec<(i32, String)> = db
        .client()
        .query(
            "SELECT DISTINCT ttl, address FROM path_hops
              WHERE agent_id = 'berlin-1' AND test = 'route' ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (ttl, address) in old.iter().enumerate().chain(new.iter().enumerate()) {
        assert!(
            seen.contains(&(ttl as i32 + 1, address.to_string())),
            "path_hops lacks {address} at TTL {}: {seen:?}",
            ttl + 1
        );
    }
    let hop_rows =
        db.scalar("SELECT count(*) FROM path_hops WHERE agent_id = 'berlin-1' AND test = 'route'");
    let expected = db.scalar(
        "SELECT sum(json_array_length(hops)) FROM results
          WHERE agent_id = 'berlin-1' AND test = 'route'",
    );
    assert_eq!(hop_rows, expected, "one path_hops row per stored hop");

    let counted = series(
        &collector.metrics(),
        "edgeprobe_path_changes_total",
        &["test=\"route\"", "site=\"berlin\""],
    );
    assert_eq!(
        counted, changed as f64,
        "edgeprobe_path_changes_total counts the flagged rows"
    );
    drop(agent);
}

/// Three agents on one office LAN behind router C, a fourth ("clean") on the transit
/// segment behind it, all probing the same destination every 3 s:
///
/// ```text
///  s1, s2, s3 -- LAN 10.93.1.0/24 -- C -- transit 10.93.2.0/24 -- R -- D (10.93.3.2)
///                                         s4 -----'
/// ```
///
/// After a clean baseline, C drops 30 % of what it forwards (iptables statistic in its
/// FORWARD chain). `paths shared` over the lossy window against the clean one, and the SQL
/// function, list C first with 3 degraded agents of 3, and the clean agent's hops (R, D)
/// after it with 3 of 4.
#[test]
fn shared_hops_of_degraded_agents_put_the_common_lossy_router_first() {
    let dir = tempfile::tempdir().unwrap();
    // 0..3: s1..s3, 3: C, 4: R, 5: D, 6: s4
    let lab = Lab::new(7);
    let (c, r, d, s4) = (3, 4, 5, 6);
    lab.bridge(c, "10.93.1.1/24");
    lab.bridge(r, "10.93.2.1/24");
    for s in 0..3 {
        lab.join(s, &format!("10.93.1.1{}/24", s + 1), c);
        lab.route(s, "default", "10.93.1.1");
    }
    lab.join(c, "10.93.2.2/24", r);
    lab.join(s4, "10.93.2.4/24", r);
    lab.link(r, "10.93.3.1/24", d, "10.93.3.2/24");
    lab.route(c, "default", "10.93.2.1");
    lab.route(s4, "default", "10.93.2.1");
    lab.route(r, "10.93.1.0/24", "10.93.2.2");
    lab.route(d, "default", "10.93.3.1");

    let (db, _collector, port) = collector(dir.path());
    let test = path_test("office", "10.93.3.2");
    let ids = ["berlin-1", "berlin-2", "berlin-3", "berlin-clean"];
    let agents: Vec<Agent> = ids
        .iter()
        .zip([0, 1, 2, s4])
        .map(|(id, node)| agent_in(&lab, node, dir.path(), id, "berlin", port, &test))
        .collect();
    let began = db_now(&db);
    for (agent, id) in agents.iter().zip(ids) {
        wait_results(&db, agent, id, "office", 0.0, 3);
    }

    let lossy = db_now(&db);
    lab.exec(
        c,
        "iptables",
        &[
            "-A",
            "FORWARD",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.3",
            "-j",
            "DROP",
        ],
    );
    for (agent, id) in agents.iter().zip(ids) {
        wait_results(&db, agent, id, "office", lossy + 0.5, 3);
    }
    // Recent: from just after the loss began; baseline: everything before it.
    let now = db_now(&db);
    let since = (now - lossy - 0.5).floor() as u64;
    let baseline = (lossy - began).ceil() as u64 + 5;

    let (code, out, err) = collector_cmd(&[
        "paths",
        "shared",
        "--since",
        &format!("{since}s"),
        "--baseline",
        &format!("{baseline}s"),
        "--json",
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "paths shared: {err}");
    let hops: Value = serde_json::from_str(&out).expect("paths shared --json");
    let table: Vec<(String, i64, i64)> = hops
        .as_array()
        .expect("an array of hops")
        .iter()
        .map(|h| {
            (
                h["address"].as_str().unwrap_or_default().to_string(),
                h["agents"].as_i64().unwrap_or(-1),
                h["degraded_agents"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let degraded = db.scalar(&format!(
        "SELECT count(*) FROM results WHERE test = 'office'
           AND started_at > to_timestamp({lossy}) AND path_loss_ratio > 0"
    ));
    assert_eq!(
        table.first(),
        Some(&("10.93.1.1".to_string(), 3, 3)),
        "the common router first, 3 of its 3 agents degraded: {table:?} \
         ({degraded} lossy results since the loss began)"
    );
    for behind in ["10.93.2.1", "10.93.3.2"] {
        assert!(
            table.contains(&(behind.to_string(), 4, 3)),
            "{behind}: 4 agents, the clean one not degraded: {table:?}"
        );
    }
    assert_eq!(table.len(), 3, "only the hops degraded agents go through");

    // The SQL function the Paths dashboard and the command read.
    let first: (String, i64, i64) = {
        let row = db
            .client()
            .query_one(
                "SELECT address, agents, degraded_agents FROM path_shared_hops(
                    make_interval(secs => $1), make_interval(secs => $2)) LIMIT 1",
                &[&(since as f64), &(baseline as f64)],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(first, ("10.93.1.1".to_string(), 3, 3));

    // The table people read names the same hop first.
    let (code, out, err) = collector_cmd(&[
        "paths",
        "shared",
        "--since",
        &format!("{since}s"),
        "--baseline",
        &format!("{baseline}s"),
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "paths shared: {err}");
    let first_row = out.lines().nth(1).unwrap_or_default();
    let cells: Vec<&str> = first_row.split_whitespace().collect();
    assert_eq!(cells.first(), Some(&"10.93.1.1"), "{out}");
    assert!(first_row.contains(" 3 ") && cells.len() >= 5, "{out}");
    drop(agents);
}

/// "Traceroute from Berlin, now": `run-now --kind path` on a live agent in a namespace
/// behind two routers prints the hop table (each hop's address, TTL order) and the result
/// lands on demand with its hops.
#[test]
fn run_now_of_a_path_test_prints_the_hop_table_and_lands() {
    let dir = tempfile::tempdir().unwrap();
    let (lab, hops) = line(2, 94);
    let dest = hops.last().unwrap().clone();
    let (db, _collector, port) = collector(dir.path());
    let _agent = agent_in(&lab, 0, dir.path(), "berlin-1", "berlin", port, "");
    wait_for(Duration::from_secs(30), "the agent's session", || {
        (db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'berlin-1'") > 0).then_some(())
    });

    let (code, out, err) = collector_cmd(&[
        "run-now",
        "--select",
        "site=berlin",
        "--kind",
        "path",
        "--target",
        &dest,
        "--option",
        "count=3",
        "--option",
        "interval=100ms",
        "--name",
        "trace",
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "run-now: {out}\n{err}");
    eprintln!("{out}");
    // The agent's row, then one line per hop: TTL, address, loss, sent, received.
    let table: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.first().is_some_and(|c| c.ends_with('.')))
        .collect();
    let printed: Vec<(&str, &str)> = table.iter().map(|c| (c[0], c[1])).collect();
    assert_eq!(
        printed,
        [
            ("1.", "10.94.0.2"),
            ("2.", "10.94.1.2"),
            ("3.", "10.94.2.2")
        ],
        "the hop table:\n{out}"
    );
    for cells in &table {
        assert_eq!(
            &cells[2..5],
            ["0.0%", "3", "3"],
            "loss, sent, received:\n{out}"
        );
    }
    assert!(out.contains("reached in 3 hops"), "{out}");

    let row = db
        .client()
        .query_one(
            "SELECT on_demand, reached, hop_count, seq FROM results
              WHERE agent_id = 'berlin-1' AND test = 'trace'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<bool>>(0), Some(true));
    assert_eq!(row.get::<_, Option<bool>>(1), Some(true));
    assert_eq!(row.get::<_, Option<i32>>(2), Some(3));
    let stored: Vec<String> = db
        .client()
        .query(
            "SELECT address FROM path_hops WHERE agent_id = 'berlin-1' AND test = 'trace'
                AND seq = $1 ORDER BY ttl",
            &[&row.get::<_, i64>(3)],
        )
        .unwrap()
        .iter()
        .map(|h| h.get(0))
        .collect();
    assert_eq!(stored, hops);
}

/// A fleet test of kind path applied with `tests apply` for the Berlin agents runs on the
/// Berlin agent and lands with its hops; the Paris agent in the same namespace, not
/// selected, runs nothing.
#[test]
fn a_fleet_path_test_runs_on_the_selected_agent_and_lands_with_hops() {
    let dir = tempfile::tempdir().unwrap();
    let (lab, hops) = line(2, 95);
    let dest = hops.last().unwrap().clone();
    let (db, _collector, port) = collector(dir.path());
    let berlin = agent_in(&lab, 0, dir.path(), "berlin-1", "berlin", port, "");
    let paris = agent_in(&lab, 0, dir.path(), "paris-1", "paris", port, "");
    wait_for(Duration::from_secs(30), "both agents' sessions", || {
        (db.scalar("SELECT count(*) FROM agents") == 2).then_some(())
    });
    let file = dir.path().join("fleet.toml");
    std::fs::write(
        &file,
        format!(
            "{}select = {{ site = \"berlin\" }}\n",
            path_test("trace", &dest)
        ),
    )
    .unwrap();
    let (code, out, err) = collector_cmd(&[
        "tests",
        "apply",
        "--file",
        file.to_str().unwrap(),
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "tests apply: {out}\n{err}");
    wait_results(&db, &berlin, "berlin-1", "trace", 0.0, 2);

    let per_result: Vec<(bool, Vec<String>)> = db
        .client()
        .query(
            "SELECT success, array_agg(address ORDER BY ttl) FROM path_hops
               JOIN results USING (agent_id, test, started_at, seq)
              WHERE agent_id = 'berlin-1' AND test = 'trace'
              GROUP BY agent_id, seq, success ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(per_result.len() >= 2, "{per_result:?}");
    for (success, addresses) in &per_result {
        assert!(success);
        assert_eq!(addresses, &hops);
    }
    let fleet_flag: Option<bool> = db
        .client()
        .query_one(
            "SELECT bool_and(NOT on_demand) FROM results WHERE agent_id = 'berlin-1' AND test = 'trace'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(fleet_flag, Some(true), "scheduled, not on demand");
    assert_eq!(
        results_of(&db, "paris-1", "trace"),
        0,
        "paris is not selected"
    );
    drop((berlin, paris));
}
