//! PostgreSQL failover seen from the collector (issue 16, gap 5), on two throwaway
//! clusters: the collector is given both in one multi-host URL with
//! `target_session_attrs=read-write`, and the first is demoted while results land (made
//! read-only, as a Patroni primary that lost its leader key is). Its open connections
//! still answer but refuse every write with SQLSTATE 25006: the writers must drop them and
//! reconnect, which the URL sends to the other, writable server, and `/readyz` must not
//! call a read-only server ready. The full Patroni + etcd run, with SIGKILL and the
//! exactly-once count, is `scripts/test-failover.sh` (root).
//!
//! Issue 28, case 1: a primary whose host vanishes (no RST, no ICMP: a blackhole route)
//! while a synchronous streaming standby is promoted 10 s later. The primary runs in a
//! network namespace behind a veth pair; the vanish is a blackhole route in it towards this
//! side, so every packet it would send (SYN-ACKs, replies, ACKs) is dropped and this side
//! sees silence. Needs root (`ip netns`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

fn count(url: &str) -> i64 {
    postgres::Client::connect(url, postgres::NoTls)
        .and_then(|mut c| c.query_one("SELECT count(*) FROM results", &[]))
        .map_or(0, |r| r.get(0))
}

#[test]
fn a_demoted_primary_sends_the_writers_to_the_writable_host() {
    let tmp = tempfile::tempdir().unwrap();
    let old = PgCluster::start();
    let new = PgCluster::start();
    for c in [&old, &new] {
        postgres::Client::connect(&c.url("postgres"), postgres::NoTls)
            .unwrap()
            .batch_execute("CREATE DATABASE edgeprobe")
            .unwrap();
        let (code, _, stderr) = collector_cmd(&["migrate", "--database-url", &c.url("edgeprobe")]);
        assert_eq!(code, Some(0), "migrate failed: {stderr}");
    }
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/edgeprobe?target_session_attrs=read-write",
        old.port, new.port
    );
    let collector = Collector::start_url(tmp.path(), &url, free_addr(), free_addr());
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        tmp.path(),
        "demoted",
        &collector.endpoint(),
        &http_test(&target.url(), "100ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "results on the first host", || {
        (count(&old.url("edgeprobe")) > 5).then_some(())
    });
    assert_eq!(count(&new.url("edgeprobe")), 0);

    // The demotion: every session of the first host turns read-only at its next
    // transaction.
    let mut admin = postgres::Client::connect(&old.url("postgres"), postgres::NoTls).unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(
        Duration::from_secs(30),
        "results on the writable host after the demotion",
        || (count(&new.url("edgeprobe")) > 5).then_some(()),
    );
    wait_for(
        Duration::from_secs(10),
        "/readyz 200 on the new host",
        || {
            http_get(collector.http, "/readyz")
                .filter(|(code, _)| *code == 200)
                .map(|_| ())
        },
    );
    agent.stop();
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {} (this test needs root for ip netns)",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair (a /30); removed on drop.
struct Netns {
    name: String,
    /// This side's address, and the namespace's.
    host: String,
    inner: String,
}

impl Netns {
    fn new() -> Netns {
        let pid = std::process::id();
        let name = format!("epfo{}", pid % 10_000_000);
        let (a, b) = (100 + (pid >> 8) % 100, pid % 256);
        let n = Netns {
            host: format!("10.{a}.{b}.1"),
            inner: format!("10.{a}.{b}.2"),
            name,
        };
        let _ = Command::new("ip").args(["netns", "del", &n.name]).output();
        let (outer, inner) = (format!("{}h", n.name), format!("{}n", n.name));
        ip(&["netns", "add", &n.name]);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &n.name]);
        ip(&["addr", "add", &format!("{}/30", n.host), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ip(&[
            "-n",
            &n.name,
            "addr",
            "add",
            &format!("{}/30", n.inner),
            "dev",
            &inner,
        ]);
        ip(&["-n", &n.name, "link", "set", &inner, "up"]);
        ip(&["-n", &n.name, "link", "set", "lo", "up"]);
        n
    }

    /// The namespace's host vanishes for this side: whatever it sends here is dropped,
    /// without an RST or an ICMP error.
    fn vanish(&self) {
        ip(&[
            "-n",
            &self.name,
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.host),
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}h", self.name)])
            .output();
    }
}

/// A PostgreSQL node in a temp dir, in a network namespace or this one; stopped and
/// removed on drop.
struct Node {
    dir: PathBuf,
    netns: Option<String>,
    listen: String,
    port: u16,
}

impl Node {
    fn new(netns: Option<&str>, listen: &str, port: u16) -> Node {
        let dir =
            std::env::temp_dir().join(format!("edgeprobe-failover-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown").arg("postgres").arg(&dir).status();
        Node {
            dir,
            netns: netns.map(str::to_string),
            listen: listen.to_string(),
            port,
        }
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn as_pg(&self, args: &[&str]) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser"]);
                c
            }
            None => Command::new("runuser"),
        };
        let out = cmd
            .args(["-u", "postgres", "--"])
            .arg(pg_program(args[0]))
            .args(&args[1..])
            .output()
            .expect("runuser");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new cluster that trusts the veth's subnet too (clients and replication).
    fn primary(netns: &Netns) -> Node {
        let node = Node::new(Some(&netns.name), &netns.inner, 5432);
        node.as_pg(&[
            "initdb",
            "-D",
            &node.data(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]);
        let hba = format!("{}/pg_hba.conf", node.data());
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str("host all all 10.0.0.0/8 trust\nhost replication all 10.0.0.0/8 trust\n");
        std::fs::write(&hba, text).unwrap();
        node.start();
        node
    }

    /// A streaming standby of `primary`, in this namespace on 127.0.0.1.
    fn standby_of(primary: &Node) -> Node {
        let node = Node::new(None, "127.0.0.1", free_addr().port());
        node.as_pg(&[
            "pg_basebackup",
            "-h",
            &primary.listen,
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            &node.data(),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        ]);
        node.start();
        node
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync=off",
            self.port,
            self.dir.display(),
            self.listen
        );
        let log = self.dir.join("log").display().to_string();
        self.as_pg(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &opts,
            "-l",
            &log,
            "-w",
            "start",
        ]);
    }

    fn promote(&self) {
        self.as_pg(&["pg_ctl", "-D", &self.data(), "-w", "promote"]);
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:{}/{db}", self.listen, self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_program("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn count_within(url: &str) -> Option<i64> {
    let url = format!("{url}?connect_timeout=1");
    postgres::Client::connect(&url, postgres::NoTls)
        .and_then(|mut c| c.query_one("SELECT count(*) FROM results", &[]))
        .map(|r| r.get(0))
        .ok()
}

fn readyz(collector: &Collector) -> u16 {
    http_get(collector.http, "/readyz").map_or(0, |(code, _)| code)
}

/// Polls every 100 ms until `f` holds; the seconds it took, or None past `limit`.
fn seconds_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_vanished_primary_hands_over_to_the_promoted_standby_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let netns = Netns::new();
    let old = Node::primary(&netns);
    postgres::Client::connect(&old.url("postgres"), postgres::NoTls)
        .unwrap()
        .batch_execute("CREATE DATABASE edgeprobe")
        .unwrap();
    let (code, _, stderr) = collector_cmd(&["migrate", "--database-url", &old.url("edgeprobe")]);
    assert_eq!(code, Some(0), "migrate failed: {stderr}");
    let new = Node::standby_of(&old);
    // Synchronous replication, as docs/SCALING.md requires: an acknowledged commit is on
    // the standby, so the promotion loses none.
    let mut admin = postgres::Client::connect(&old.url("postgres"), postgres::NoTls).unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(Duration::from_secs(30), "a synchronous standby", || {
        let state: Option<String> = admin
            .query_opt("SELECT sync_state FROM pg_stat_replication", &[])
            .unwrap()
            .map(|r| r.get(0));
        (state.as_deref() == Some("sync")).then_some(())
    });
    drop(admin);

    // The URL docs/SCALING.md recommends (without its TLS parameters).
    let url = format!(
        "postgres://postgres@{}:{},127.0.0.1:{}/edgeprobe?target_session_attrs=read-write",
        old.listen, old.port, new.port
    );
    let collector = Collector::start_url(tmp.path(), &url, free_addr(), free_addr());
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        tmp.path(),
        "vanish",
        &collector.endpoint(),
        &http_test(&target.url(), "100ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "results on the primary", || {
        (count_within(&old.url("edgeprobe")).unwrap_or(0) > 10).then_some(())
    });
    netns.vanish();
    let unready = seconds_until(Duration::from_secs(10), || readyz(&collector) == 503);
    // The standby is promoted 10 s after the vanish (the field report's timing).
    std::thread::sleep(
        Duration::from_secs(10).saturating_sub(Duration::from_secs_f64(unready.unwrap_or(10.0))),
    );
    let at_promotion = count_within(&new.url("edgeprobe")).expect("the standby answers");
    new.promote();
    let ready = seconds_until(Duration::from_secs(30), || readyz(&collector) == 200);
    let resumed = seconds_until(Duration::from_secs(60), || {
        count_within(&new.url("edgeprobe")).unwrap_or(0) > at_promotion
    });
    println!(
        "figures: /readyz 503 {unready:?} s after the vanish, 200 {ready:?} s after the promotion; first new row {resumed:?} s after the promotion"
    );
    assert!(
        unready.is_some_and(|s| s <= 5.0),
        "/readyz 503 within 5 s of the vanish: {unready:?}"
    );
    assert!(
        ready.is_some_and(|s| s <= 5.0),
        "/readyz 200 naming the new primary within 5 s of the promotion: {ready:?}"
    );
    assert!(
        resumed.is_some_and(|s| s <= 30.0),
        "ingest resumed within 30 s of the promotion: {resumed:?}"
    );
    // The host reached is named: in /readyz's body and as an info metric.
    let new_host = format!("127.0.0.1:{}", new.port);
    let body = http_get(collector.http, "/readyz").unwrap().1;
    assert!(body.contains(&new_host), "/readyz body: {body}");
    assert!(collector.metrics().contains(&format!(
        "edgeprobe_postgres_primary_info{{host=\"{new_host}\"}} 1"
    )));
    assert_eq!(
        metric(&collector.metrics(), "edgeprobe_postgres_up"),
        1.0,
        "edgeprobe_postgres_up after the promotion"
    );

    // Every seq exactly once on the new primary.
    std::thread::sleep(Duration::from_secs(1));
    agent.stop();
    let db = TestDb::existing(&new.url("edgeprobe"));
    let last = drain(&mut agent, &db, "vanish");
    assert_exactly_once(&db, "vanish", last);
}
