//! Issue 27, collector half: a real agent process with `family = "both"` against a
//! dual-stack name stores one row per family with the family, the local address and the
//! interface; with the IPv6 path gone the IPv6 row fails and the IPv4 row succeeds. The
//! counter, the exports and `run-now --family both --interface` show the same.
//!
//! Dual stack on loopback: the target listens on 127.0.0.1 and ::1 at one port, and the
//! agent runs in a mount namespace of its own (`unshare --mount`) whose /etc/hosts names
//! both addresses `dual.test`: the host's network, the agent's own resolver file, nothing
//! changed outside the test.

use std::io::ErrorKind;
use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

/// A listener that accepts and drops connections until it is closed (dropped).
struct Listener {
    open: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn start(listener: TcpListener) -> Listener {
        listener.set_nonblocking(true).unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let flag = open.clone();
        let thread = std::thread::spawn(move || {
            while flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => drop(stream),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            // The socket closes here: connections to its address are refused.
        });
        Listener {
            open,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.open.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// 127.0.0.1 and ::1 listening on one port.
fn dual_stack_port() -> (u16, Listener, Listener) {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            return (port, Listener::start(v4), Listener::start(v6));
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

/// The agent of `config` in a mount namespace whose /etc/hosts is `hosts`.
fn start_with_hosts(agent: &mut Agent, hosts: &Path) {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$1\" run --config \"$2\"",
    ])
    .arg(hosts)
    .arg(agent_bin())
    .arg(&agent.config);
    agent.proc = Some(Proc::spawn(cmd, agent.config.with_extension("log")));
}

/// (ip_family, local_address, interface, success, error_class) of the agent's rows of test
/// `test` with seq above `after`, oldest first.
type Row = (
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    Option<String>,
);

fn rows(db: &TestDb, test: &str, after: i64) -> Vec<Row> {
    db.client()
        .query(
            "SELECT ip_family, local_address, interface, success, error_class FROM results
              WHERE agent_id = 'dual' AND test = $1 AND seq > $2 ORDER BY seq",
            &[&test, &after],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

fn some(s: &str) -> Option<String> {
    Some(s.to_string())
}

#[test]
fn family_both_stores_one_row_per_family_with_its_link_and_a_lost_ipv6_path_fails_only_ipv6() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    // The IPv4 listener stays up to the end.
    let (port, _v4, v6) = dual_stack_port();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 dual.test\n::1 dual.test\n").unwrap();
    let tests = format!(
        "[[test]]\nname = \"dual\"\nkind = \"tcp\"\ntarget = \"dual.test:{port}\"\nevery = \"1s\"\n\
         [test.options]\nfamily = \"both\"\ninterface = \"lo\"\n"
    );
    let mut agent = Agent::new(dir.path(), "dual", &collector.endpoint(), &tests);
    start_with_hosts(&mut agent, &hosts);

    // Both paths up: each run gives an IPv4 and an IPv6 row, both successful, each with
    // its local address and the interface.
    let up = wait_for(Duration::from_secs(30), "two runs of both families", || {
        let r = rows(&db, "dual", 0);
        (r.len() >= 4).then_some(r)
    });
    let v4_ok = (some("ipv4"), some("127.0.0.1"), some("lo"), true, None);
    let v6_ok = (some("ipv6"), some("::1"), some("lo"), true, None);
    for pair in up.chunks(2).filter(|p| p.len() == 2) {
        assert_eq!(pair, [v4_ok.clone(), v6_ok.clone()], "{up:?}");
    }
    let mark = db.scalar("SELECT coalesce(max(seq), 0) FROM results WHERE agent_id = 'dual'");

    // The IPv6 path gone (nothing listens on ::1 any more): the IPv6 rows fail, refused,
    // still marked ipv6 on lo; the IPv4 rows keep succeeding.
    drop(v6);
    let down = wait_for(Duration::from_secs(30), "a run with IPv6 down", || {
        let r = rows(&db, "dual", mark);
        r.iter()
            .any(|row| row.0.as_deref() == Some("ipv6") && !row.3)
            .then_some(r)
    });
    let v6_failed: Vec<&Row> = down.iter().filter(|r| !r.3).collect();
    for r in &v6_failed {
        assert_eq!(
            (r.0.as_deref(), r.2.as_deref(), r.4.as_deref()),
            (Some("ipv6"), Some("lo"), Some("refused")),
            "{down:?}"
        );
        // The socket may have no local address recorded when the connect failed.
        assert!(matches!(r.1.as_deref(), None | Some("::1")), "{down:?}");
    }
    let v4_after: Vec<&Row> = down
        .iter()
        .filter(|r| r.0.as_deref() == Some("ipv4"))
        .collect();
    assert!(!v4_after.is_empty(), "{down:?}");
    assert!(v4_after.iter().all(|r| **r == v4_ok), "{down:?}");
    // No row without a family: every run got as far as an address.
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id = 'dual' AND ip_family IS NULL"),
        0
    );

    // The counter splits by family.
    let metrics = collector.metrics();
    for series in [
        "edgeprobe_results_total{ip_family=\"ipv4\",kind=\"tcp\",outcome=\"success\",site=\"lab\",test=\"dual\"}",
        "edgeprobe_results_total{ip_family=\"ipv6\",kind=\"tcp\",outcome=\"success\",site=\"lab\",test=\"dual\"}",
        "edgeprobe_results_total{ip_family=\"ipv6\",kind=\"tcp\",outcome=\"failure\",site=\"lab\",test=\"dual\"}",
    ] {
        assert!(metric(&metrics, series) > 0.0, "{series} missing in:\n{metrics}");
    }
    assert!(
        !metrics.contains("ip_family=\"ipv4\",kind=\"tcp\",outcome=\"failure\""),
        "{metrics}"
    );

    // run-now with the flags: both results of the agent, told apart by family, before the
    // command ends (the first result marks the agent done; the run waits for the second).
    let target = format!("dual.test:{port}");
    let (code, out, err) = collector_cmd(&[
        "run-now",
        "--agent",
        "dual",
        "--kind",
        "tcp",
        "--target",
        &target,
        "--family",
        "both",
        "--interface",
        "lo",
        "--name",
        "adhoc-dual",
        "--json",
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "run-now: {out}{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = run["results"].as_array().unwrap();
    let got: Vec<(&str, &str, bool, &str)> = results
        .iter()
        .map(|r| {
            (
                r["ip_family"].as_str().unwrap_or("-"),
                r["interface"].as_str().unwrap_or("-"),
                r["success"].as_bool().unwrap(),
                r["error_class"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        [("ipv4", "lo", true, ""), ("ipv6", "lo", false, "refused")],
        "{out}"
    );
    assert_eq!(results[0]["local_address"], "127.0.0.1", "{out}");
    let stored = rows(&db, "adhoc-dual", 0);
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0], v4_ok, "{stored:?}");

    // Exports carry the link columns, last; the table shows the link before the figures.
    let (code, csv, err) = collector_cmd(&[
        "results",
        "--agent",
        "dual",
        "--test",
        "dual",
        "--format",
        "csv",
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let header = csv.lines().next().unwrap();
    assert!(
        header.ends_with(",ip_family,local_address,interface"),
        "{header}"
    );
    assert!(csv.lines().any(|l| l.ends_with(",ipv6,::1,lo")), "{csv}");
    assert!(
        csv.lines().any(|l| l.ends_with(",ipv4,127.0.0.1,lo")),
        "{csv}"
    );
    let (code, table, err) = collector_cmd(&[
        "results",
        "--agent",
        "dual",
        "--test",
        "dual",
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "{err}");
    // The figures, then the link; a failure's link before its error.
    for (start, end) in [
        (" ok    connect ", "  ipv4 via lo from 127.0.0.1"),
        (" ok    connect ", "  ipv6 via lo from ::1"),
        (" FAIL  ipv6 via lo", "  error refused: "),
    ] {
        assert!(
            table.lines().any(|l| l.contains(start) && l.contains(end)),
            "no row with {start:?} and {end:?}:\n{table}"
        );
    }
    agent.stop();
}

/// The flags are the options, checked as the agent checks them, before the database: a
/// source has one family and `both` needs two; a flag and the same `--option` clash.
#[test]
fn run_now_link_flags_are_checked_before_anything_is_sent() {
    let db = TestDb::new();
    migrate(&db);
    let base = [
        "run-now",
        "--agent",
        "a1",
        "--kind",
        "tcp",
        "--target",
        "example.net:443",
        "--database-url",
        &db.url,
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend(extra);
        collector_cmd(&args)
    };
    let (code, _, err) = run(&["--family", "both", "--source", "192.0.2.7"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`family` both needs two"), "{err}");
    let (code, _, err) = run(&["--family", "ipv6", "--source", "192.0.2.7"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is IPv4 but `family` is ipv6"), "{err}");
    let (code, _, err) = run(&["--interface", "wan 0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not an interface name"), "{err}");
    let (code, _, err) = run(&["--family", "ipv5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ipv5"), "{err}");
    let (code, _, err) = run(&["--family", "ipv4", "--option", "family=ipv6"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--family and --option family"), "{err}");
    // Valid flags get as far as the agents: none is known in this database.
    let (code, _, err) = run(&[
        "--family",
        "ipv6",
        "--source",
        "2001:db8::7",
        "--interface",
        "wwan0",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no known agent"), "{err}");
}

/// The same over the API (`run-now --api`): the flags travel as the request's options,
/// and both results of the agent come back with their family, address and interface.
#[test]
fn run_now_family_both_over_the_api_returns_both_results_with_their_link() {
    use crate::api::{operator, ApiCollector};
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    let (port, _v4, _v6) = dual_stack_port();
    let hosts = dir.path().join("hosts");
    // localhost too: the agent reaches the collector by the name on its certificate.
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 dual.test\n::1 dual.test\n",
    )
    .unwrap();
    let endpoint = format!("https://localhost:{}", c.grpc.port());
    let mut agent = Agent::new_tls(dir.path(), "dual", &endpoint, "", &pki);
    start_with_hosts(&mut agent, &hosts);
    wait_for(
        Duration::from_secs(30),
        "the agent known with run-now",
        || {
            (db.scalar("SELECT count(*) FROM agents WHERE 'run-now' = ANY(features)") == 1)
                .then_some(())
        },
    );
    let (cert, key) = (alice.0.display().to_string(), alice.1.display().to_string());
    let api = format!("https://localhost:{}", c.api.port());
    let ca = c.pki_ca.display().to_string();
    let target = format!("dual.test:{port}");
    let (code, out, err) = collector_cmd(&[
        "run-now",
        "--agent",
        "dual",
        "--kind",
        "tcp",
        "--target",
        &target,
        "--family",
        "both",
        "--interface",
        "lo",
        "--json",
        "--api",
        &api,
        "--cert",
        &cert,
        "--key",
        &key,
        "--ca",
        &ca,
    ]);
    assert_eq!(code, Some(0), "run-now --api: {out}{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<(&str, &str, &str, bool)> = run["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["ip_family"].as_str().unwrap_or("-"),
                r["local_address"].as_str().unwrap_or("-"),
                r["interface"].as_str().unwrap_or("-"),
                r["success"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("ipv4", "127.0.0.1", "lo", true),
            ("ipv6", "::1", "lo", true)
        ],
        "{out}"
    );
    let spec: String = db
        .client()
        .query_one("SELECT spec_toml FROM runs", &[])
        .unwrap()
        .get(0);
    assert!(
        spec.contains("family = \"both\"") && spec.contains("interface = \"lo\""),
        "{spec}"
    );
    agent.stop();
}
