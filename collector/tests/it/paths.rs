//! Path results in the collector (issue 22, collector half), against a real collector
//! process and a real PostgreSQL, fed by simulated agents over the real gRPC stream: hops
//! land exactly once with their result and quarantine like any bad result; path changes are
//! flagged and counted once whatever the batching, reconnects and redeliveries; `asn load`
//! names hops and locates bad lines; `paths shared` puts the hop that degraded agents have
//! in common first; retention removes hops with their partition.

use edgeprobe_proto::v1 as pb;

use crate::support::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A recent start time, whole milliseconds, `minutes` ago plus `seq` ms (a redelivery
/// repeats it exactly).
fn ago(minutes: i64, seq: u64) -> i64 {
    let base = (now_nanos() - minutes * 60_000_000_000) / 1_000_000 * 1_000_000;
    base + seq as i64 * 1_000_000
}

/// `n` hop addresses of a 30-hop path that differ by `variant` from hop 5 on.
fn long_path(variant: u8, n: usize) -> Vec<String> {
    (1..=n)
        .map(|ttl| {
            if ttl < 5 {
                format!("10.0.{ttl}.1")
            } else {
                format!("100.64.{variant}.{ttl}")
            }
        })
        .collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn count(db: &TestDb, sql: &str, agent: &str) -> i64 {
    db.client().query_one(sql, &[&agent]).unwrap().get(0)
}

/// Before: every path result was quarantined ("fields do not match kind path"). After: a
/// 30-hop result lands with its 30 hops, also over a redelivery of the same batch on a new
/// session, and only the result with a bad hop is quarantined.
#[test]
fn path_results_land_exactly_once_with_their_hops() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let rt = runtime();
    let hops = long_path(1, 30);
    let mut batch: Vec<pb::Result> = (1..=4)
        .map(|seq| path_result("p1", seq, ago(5, seq), &refs(&hops)))
        .collect();
    // One hop answered from two addresses (ECMP), one not at all, one rate-limited.
    {
        let p = path_fields(&mut batch[0]);
        p.hops[7].addresses.push("100.64.9.8".into());
        p.hops[9] = path_hop(10, "", 1.0);
        p.hops[11].loss_ratio = Some(0.3);
        p.hops[11].received = 7;
        p.hops[11].rate_limited = true;
    }
    // seq 3: hops out of order.
    path_fields(&mut batch[2]).hops.swap(3, 4);
    batch.push(http_result("p1", 5, ago(5, 5)));
    rt.block_on(async {
        let mut s = AgentStream::open(&collector.endpoint(), "p1", "lab", "i1").await;
        let ack = s.batch(batch.clone()).await;
        assert_eq!(ack.seq, 5);
        assert_eq!(ack.rejected.iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
        drop(s);
        // The ack was lost: the agent sends the same batch again on a new session.
        let mut s = AgentStream::open(&collector.endpoint(), "p1", "lab", "i1").await;
        assert_eq!(s.welcome.committed_seq, 5);
        let ack = s.batch(batch.clone()).await;
        assert_eq!(ack.seq, 5);
    });
    let rows = |sql: &str| count(&db, sql, "p1");
    assert_eq!(
        rows("SELECT count(*) FROM results WHERE agent_id = $1 AND kind = 'path'"),
        3
    );
    assert_eq!(
        rows("SELECT count(*) FROM path_results WHERE agent_id = $1"),
        3
    );
    assert_eq!(
        rows("SELECT count(*) FROM path_hops WHERE agent_id = $1"),
        90,
        "30 hops of each stored path result, once"
    );
    assert_eq!(
        rows("SELECT count(DISTINCT (seq, ttl)) FROM path_hops WHERE agent_id = $1"),
        90
    );
    assert_eq!(
        rows("SELECT count(*) FROM results WHERE agent_id = $1 AND kind = 'http'"),
        1
    );
    let reason: String = db
        .client()
        .query_one(
            "SELECT reason FROM rejected_results WHERE agent_id = 'p1' AND seq = 3",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(reason.contains("ascending ttl order"), "{reason}");
    assert_eq!(
        rows("SELECT count(*) FROM rejected_results WHERE agent_id = $1"),
        1
    );
    // The hops as the agent sent them.
    let mut c = db.client();
    let mut hop = |ttl: i32| {
        c.query_one(
            "SELECT address, addresses, sent, received, loss_ratio, rtt_avg_seconds, rate_limited
               FROM path_hops WHERE agent_id = 'p1' AND seq = 1 AND ttl = $1",
            &[&ttl],
        )
        .unwrap()
    };
    let h8 = hop(8);
    assert_eq!(
        h8.get::<_, Option<String>>(0).as_deref(),
        Some("100.64.1.8")
    );
    assert_eq!(
        h8.get::<_, Vec<String>>(1),
        ["100.64.1.8".to_string(), "100.64.9.8".to_string()]
    );
    let h10 = hop(10);
    assert_eq!(h10.get::<_, Option<String>>(0), None);
    assert_eq!((h10.get::<_, i32>(2), h10.get::<_, i32>(3)), (10, 0));
    assert_eq!(h10.get::<_, Option<f64>>(5), None);
    let h12 = hop(12);
    assert_eq!(h12.get::<_, Option<f64>>(4), Some(0.3));
    assert!(h12.get::<_, bool>(6));
    let r = c
        .query_one(
            "SELECT reached, hop_count, path_id, path_loss_ratio, rtt_avg_seconds, protocol, path_changed
               FROM path_results WHERE agent_id = 'p1' AND seq = 2",
            &[],
        )
        .unwrap();
    assert!(r.get::<_, bool>(0));
    assert_eq!(r.get::<_, i32>(1), 30);
    assert_eq!(
        r.get::<_, String>(2),
        path_id_of(&path_fields(&mut batch[1].clone()).hops)
    );
    assert_eq!(r.get::<_, f64>(3), 0.0);
    assert!((r.get::<_, f64>(4) - 0.030).abs() < 1e-9);
    assert_eq!(r.get::<_, String>(5), "icmp");
    assert!(!r.get::<_, bool>(6));
    // The http result has no path columns.
    let http: Option<bool> = c
        .query_one(
            "SELECT path_changed FROM results WHERE agent_id = 'p1' AND kind = 'http'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(http, None);
    let m = collector.metrics();
    assert_eq!(
        metric(&m, "edgeprobe_ingest_results_total{outcome=\"duplicate\"}"),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            "edgeprobe_path_loss_ratio_count{site=\"lab\",test=\"path\"}"
        ),
        3.0
    );
}

/// The paths A, A, B, B, A of one agent and test: path_changed false, false, true, false,
/// true, however they arrive. Agent `one` sends the five in one batch; `split` in five
/// batches; `reconnect` in batches of 2, 2, 1 over three sessions, its last batch
/// redelivered on a fourth session. Each agent is at its own site, so each site's
/// edgeprobe_path_changes_total is 2.
#[test]
fn path_changes_are_flagged_once_in_one_batch_across_batches_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let a = ["10.1.0.1", "198.51.100.1", "203.0.113.10"];
    let b = ["10.1.0.1", "198.51.100.77", "203.0.113.10"];
    let sequence = [&a, &a, &b, &b, &a];
    let base = ago(10, 0);
    let results = |id: &str, site: &str| -> Vec<pb::Result> {
        sequence
            .iter()
            .enumerate()
            .map(|(i, hops)| {
                let seq = i as u64 + 1;
                let at = base + i as i64 * 60_000_000_000;
                let mut r = path_result(id, seq, at, &hops[..]);
                r.labels = [("site".to_string(), site.to_string())].into();
                r
            })
            .collect()
    };
    let endpoint = collector.endpoint();
    let rt = runtime();
    rt.block_on(async {
        let mut s = AgentStream::open(&endpoint, "one", "site-one", "i").await;
        s.batch(results("one", "site-one")).await;

        let mut s = AgentStream::open(&endpoint, "split", "site-split", "i").await;
        for r in results("split", "site-split") {
            s.batch(vec![r]).await;
        }

        let all = results("reconnect", "site-reconnect");
        for part in [&all[0..2], &all[2..4], &all[4..5], &all[4..5]] {
            let mut s = AgentStream::open(&endpoint, "reconnect", "site-reconnect", "i").await;
            s.batch(part.to_vec()).await;
        }
    });
    // The watermark lost (an operator deleted it): the whole sequence comes again and is
    // found stored row by row (the isolating write), counted as duplicates, not as changes.
    db.client()
        .batch_execute("DELETE FROM agent_incarnations WHERE agent_id = 'one'")
        .unwrap();
    rt.block_on(async {
        let mut s = AgentStream::open(&endpoint, "one", "site-one", "i").await;
        assert_eq!(s.welcome.committed_seq, 0);
        let ack = s.batch(results("one", "site-one")).await;
        assert_eq!((ack.seq, ack.rejected.len()), (5, 0));
    });
    assert_eq!(
        metric(
            &collector.metrics(),
            "edgeprobe_ingest_results_total{outcome=\"duplicate\"}"
        ),
        6.0,
        "the redelivered last batch of `reconnect` and the five of `one`"
    );
    for agent in ["one", "split", "reconnect"] {
        let flags: Vec<bool> = db
            .client()
            .query(
                "SELECT path_changed FROM path_results WHERE agent_id = $1 ORDER BY started_at, seq",
                &[&agent],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(flags, [false, false, true, false, true], "agent {agent}");
    }
    let m = collector.metrics();
    for site in ["site-one", "site-split", "site-reconnect"] {
        assert_eq!(
            metric(
                &m,
                &format!("edgeprobe_path_changes_total{{site=\"{site}\",test=\"path\"}}")
            ),
            2.0,
            "{site}"
        );
    }
    // The latest path per agent and test is what the next result is compared with.
    assert_eq!(db.scalar("SELECT count(*) FROM path_last"), 3);

    // A result that arrives after a later one of its test (its start time was corrected)
    // is compared with the stored result just before it in time.
    let at = |minute: i64| base + minute * 60_000_000_000;
    rt.block_on(async {
        let mut s = AgentStream::open(&endpoint, "late", "site-late", "i").await;
        s.batch(vec![
            path_result("late", 1, at(0), &a),
            path_result("late", 2, at(4), &b),
        ])
        .await;
        s.batch(vec![path_result("late", 3, at(2), &b)]).await;
    });
    let flags: Vec<bool> = db
        .client()
        .query(
            "SELECT path_changed FROM path_results WHERE agent_id = 'late' ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(flags, [false, true, true]);
    // The path series keep Prometheus' naming rules.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    use std::io::Write;
    assert!(m.contains("edgeprobe_path_loss_ratio_bucket"));
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(m.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_tsv(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const ASN_TSV: &str = "0.0.0.0\t0.255.255.255\t0\tNone\tNot routed\n\
    10.0.0.0\t10.255.255.255\t0\tNone\tNot routed\n\
    198.51.100.0\t198.51.100.127\t64500\tDE\tEXAMPLE-TRANSIT Frankfurt\n\
    198.51.100.128\t198.51.100.255\t64501\tNL\tOTHER-TRANSIT\n\
    203.0.113.0\t203.0.113.255\t64510\tUS\tEXAMPLE-CONTENT\n\
    2001:db8::\t2001:db8:ffff:ffff:ffff:ffff:ffff:ffff\t64496\tFR\tEXAMPLE-V6 \u{e9}t\u{e9}\n";

/// Three agents whose recent paths go through 198.51.100.1 with rising loss, one clean
/// agent through other hops to the same destination: the common hop is first, with
/// degraded_agents = 3 and its AS from `asn load`; the destination, shared by all four, is
/// after it. A bad line of a later load is named by its number and changes nothing.
#[test]
fn shared_hops_of_degraded_agents_name_the_common_hop_first() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--database-url".to_string(), db.url.clone()]);
        v
    };
    let run = |extra: &[&str]| {
        let v = args(extra);
        collector_cmd(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let tsv = write_tsv(dir.path(), "ip2asn.tsv", ASN_TSV);
    let (code, out, err) = run(&["asn", "load", &tsv]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("loaded 4 ranges")
            && out.contains("3 IPv4, 1 IPv6")
            && out.contains("skipped 2 not routed"),
        "{out}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM asn_ranges"), 4);
    let v6: (i64, String) = {
        let r = db
            .client()
            .query_one("SELECT asn, as_name FROM asn_of('2001:db8:5::1')", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(v6, (64496, "EXAMPLE-V6 \u{e9}t\u{e9}".to_string()));
    assert_eq!(
        db.scalar("SELECT count(*) FROM asn_of('fe80::1%eth0')"),
        0,
        "a zoned link-local hop has no AS and no error"
    );

    // A bad line: the load stops, names it, and the table keeps the previous contents.
    let bad = write_tsv(
        dir.path(),
        "bad.tsv",
        "192.0.2.0\t192.0.2.255\t64499\tGB\tFINE\n\
         2001:db8::\t2001:db8::ff\t64498\tGB\tFINE-V6\n\
         192.0.2.0\t192.0.2.x\t64499\tGB\tBROKEN\n",
    );
    let (code, _, err) = run(&["asn", "load", &bad]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{bad}:3: range end `192.0.2.x` is not an IP address"
        )),
        "{err}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM asn_ranges"), 4);

    // Baseline (2 to 4 hours ago): every path clean. Recent (the last 40 minutes): the
    // three agents through the common hop see loss rising there and at the destination.
    let endpoint = collector.endpoint();
    let common = "198.51.100.1";
    let destination = "203.0.113.10";
    let rt = runtime();
    rt.block_on(async {
        for (n, agent) in ["deg-1", "deg-2", "deg-3", "clean"].iter().enumerate() {
            let mut s = AgentStream::open(&endpoint, agent, "lab", "i").await;
            let lan = if n == 1 {
                "fe80::1%eth0".to_string()
            } else {
                format!("10.{n}.0.1")
            };
            let path: Vec<String> = if *agent == "clean" {
                vec![lan, "198.51.100.200".into(), destination.into()]
            } else {
                vec![
                    lan,
                    format!("100.64.{n}.1"),
                    common.into(),
                    destination.into(),
                ]
            };
            let mut batch = Vec::new();
            let mut seq = 0;
            for minutes in (130..=240).step_by(10).chain((0..=40).step_by(5)) {
                seq += 1;
                let mut r = path_result(agent, seq, ago(minutes, seq), &refs(&path));
                if minutes <= 40 && *agent != "clean" {
                    // Loss appears at the common hop and carries on to the destination.
                    let loss = 0.2 + 0.05 * f64::from(8 - minutes as u32 / 5);
                    let p = path_fields(&mut r);
                    let at = p.hops.len() - 2;
                    p.hops[at] = path_hop(at as u32 + 1, common, loss);
                    let last = p.hops.len() - 1;
                    p.hops[last] = path_hop(last as u32 + 1, destination, loss);
                    p.path_loss_ratio = Some(p.hops[last].loss_ratio.unwrap());
                }
                batch.push(r);
            }
            s.batch(batch).await;
        }
    });

    let (code, out, err) = run(&["paths", "shared", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let hops: serde_json::Value = serde_json::from_str(&out).unwrap();
    let first = &hops[0];
    assert_eq!(first["address"], common, "{out}");
    assert_eq!(first["degraded_agents"], 3, "{out}");
    assert_eq!(first["agents"], 3, "{out}");
    assert_eq!(first["asn"], 64500, "{out}");
    assert_eq!(first["as_name"], "EXAMPLE-TRANSIT Frankfurt", "{out}");
    let loss = first["loss_ratio"].as_f64().unwrap();
    assert!((0.2..=0.7).contains(&loss), "{out}");
    // The destination: all four agents, three degraded; after the more specific hop.
    let dest = hops
        .as_array()
        .unwrap()
        .iter()
        .position(|h| h["address"] == destination)
        .expect("the destination is shared");
    assert!(dest > 0);
    assert_eq!(hops[dest]["agents"], 4);
    assert_eq!(hops[dest]["degraded_agents"], 3);
    assert_eq!(hops[dest]["asn"], 64510);
    // Hops only the clean agent uses are not listed; each degraded agent's own hops are,
    // with one degraded agent each (the zoned one without an AS).
    let listed: Vec<&str> = hops
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["address"].as_str().unwrap())
        .collect();
    assert!(!listed.contains(&"198.51.100.200"), "{listed:?}");
    assert!(listed.contains(&"fe80::1%eth0"), "{listed:?}");
    assert_eq!(listed.len(), 2 + 2 * 3, "{listed:?}");

    // The same table for a person, and the function itself.
    let (code, out, _) = run(&["paths", "shared", "--since", "1h", "--baseline", "24h"]);
    assert_eq!(code, Some(0));
    let first_row = out.lines().nth(1).unwrap();
    assert!(
        first_row.starts_with(common)
            && first_row.contains("AS64500")
            && first_row.contains("EXAMPLE-TRANSIT Frankfurt"),
        "{out}"
    );
    assert_eq!(
        db.scalar("SELECT degraded_agents FROM path_shared_hops('1 hour', '24 hours') LIMIT 1"),
        3
    );
    // A baseline window that holds no results: nothing to compare, nothing degraded.
    let (code, out, _) = run(&["paths", "shared", "--since", "1m", "--baseline", "1m"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("no degraded path tests"), "{out}");
}

/// Path rows (and so their hops) follow their results' partition: dropped past
/// retention with it, kept within it.
#[test]
fn retention_removes_path_hops_with_their_partition() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let hops = long_path(2, 30);
    let day = 24 * 60;
    let rt = runtime();
    rt.block_on(async {
        let mut s = AgentStream::open(&collector.endpoint(), "old", "lab", "i").await;
        s.batch(vec![
            path_result("old", 1, ago(10 * day, 1), &refs(&hops)),
            path_result("old", 2, ago(2 * day, 2), &refs(&hops)),
        ])
        .await;
    });
    let hops_of = |older_than_days: i32| {
        db.client()
            .query_one(
                "SELECT count(*) FROM path_hops WHERE agent_id = 'old'
                  AND started_at < now() - make_interval(days => $1)",
                &[&older_than_days],
            )
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!((hops_of(0), hops_of(7)), (60, 30));
    // The days get their partitions (the rows move out of the default one) ...
    migrate(&db);
    let partitions: i64 =
        db.scalar("SELECT count(DISTINCT tableoid) FROM results WHERE agent_id = 'old'");
    assert_eq!(partitions, 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM results_default WHERE agent_id = 'old'"),
        0
    );
    // Every partition, those upkeep made included, compresses hops with lz4.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM pg_inherits i JOIN pg_attribute a ON a.attrelid = i.inhrelid
              WHERE i.inhparent = 'results'::regclass AND a.attname = 'hops'
                AND a.attcompression <> 'l'"
        ),
        0
    );
    // ... and the one past a 7-day retention is dropped with its hops.
    let (code, _, err) =
        collector_cmd(&["migrate", "--database-url", &db.url, "--retention", "7d"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!((hops_of(0), hops_of(7)), (30, 0));
    assert_eq!(
        db.scalar("SELECT count(*) FROM path_results WHERE agent_id = 'old'"),
        1
    );
}
