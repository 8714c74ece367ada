//! Partition upkeep never stalls ingest (issue 16, gap 2), against a real collector and a
//! real PostgreSQL: a session holds a read of `results` open for 60 s (a long dashboard
//! query) while upkeep has partitions to create, a default partition to drain and a
//! partition past retention to drop; a hand-written gRPC agent keeps committing batches
//! throughout, and once the reader is gone upkeep finishes its work.

use std::time::{Duration, Instant};

use edgeprobe_proto::v1 as pb;
use edgeprobe_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

const HOLD: Duration = Duration::from_secs(60);

fn result(id: &str, seq: u64) -> pb::Result {
    http_result(id, seq, now_nanos() - 1_000_000_000)
}

/// `results_pYYYYMMDD` of the UTC day `days` from today, via PostgreSQL's calendar.
fn partition(db: &TestDb, days: i64) -> String {
    db.client()
        .query_one(
            "SELECT 'results_p' || to_char((now() AT TIME ZONE 'UTC')::date + $1::int, 'YYYYMMDD')",
            &[&(days as i32)],
        )
        .unwrap()
        .get(0)
}

fn attached(db: &TestDb, name: &str) -> bool {
    db.client()
        .query_opt(
            "SELECT 1 FROM pg_class WHERE relname = $1 AND relispartition",
            &[&name],
        )
        .unwrap()
        .is_some()
}

fn exists(db: &TestDb, name: &str) -> bool {
    db.client()
        .query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&name])
        .unwrap()
        .is_some()
}

/// Commits one batch of 20 results after another on one stream until `until`; returns
/// (seconds since `t0` at which each commit was acked, its latency).
async fn commit_until(
    endpoint: String,
    id: String,
    t0: Instant,
    until: Instant,
) -> Vec<(f64, f64)> {
    let mut client = IngestClient::connect(endpoint).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(agent_msg(pb::agent_message::Msg::Hello(pb::Hello {
        agent_id: id.clone(),
        version: "test".into(),
        labels: Default::default(),
        incarnation: "upkeep".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = inbound.message().await.unwrap();
    assert!(
        matches!(
            welcome,
            Some(pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::Welcome(_))
            })
        ),
        "{welcome:?}"
    );
    let mut seq = 0;
    let mut out = Vec::new();
    while Instant::now() < until {
        let results = (0..20).map(|_| {
            seq += 1;
            result(&id, seq)
        });
        let sent = Instant::now();
        tx.send(agent_msg(pb::agent_message::Msg::Batch(pb::ResultBatch {
            results: results.collect(),
        })))
        .await
        .unwrap();
        match tokio::time::timeout(Duration::from_secs(90), inbound.message()).await {
            Ok(Ok(Some(pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::Ack(a)),
            }))) => assert_eq!(a.seq, seq),
            other => panic!("expected an ack, got {other:?}"),
        }
        out.push((t0.elapsed().as_secs_f64(), sent.elapsed().as_secs_f64()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

/// Before: upkeep's `CREATE TABLE ... PARTITION OF` queued behind the reader with no
/// lock_timeout, and everything touching `results` queued behind it (the collector did not
/// even become ready: upkeep ran before it accepted agents). After: ingest commits all
/// through the hold, and upkeep does its work once the reader is gone.
#[test]
fn upkeep_behind_a_long_reader_never_stalls_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    migrate(&db);
    let ahead = partition(&db, 3);
    let stale = partition(&db, -100);
    let late = partition(&db, -5);
    {
        let mut c = db.client();
        // Tomorrow's window moved on: the farthest partition ahead is missing.
        c.batch_execute(&format!(
            "ALTER TABLE results DETACH PARTITION {ahead}; DROP TABLE {ahead};"
        ))
        .unwrap();
        // A partition past the 90-day retention, with a row.
        c.batch_execute(&format!(
            "CREATE TABLE {stale} PARTITION OF results FOR VALUES FROM
                 ((now() AT TIME ZONE 'UTC')::date - 100) TO ((now() AT TIME ZONE 'UTC')::date - 99)"
        ))
        .unwrap();
        // Rows of a day with no partition: in the default partition, one past retention.
        c.batch_execute(
            "INSERT INTO results (agent_id, seq, test, kind, target, started_at, duration_seconds, success)
             VALUES ('old', 1, 'web', 'http', 't', (now() AT TIME ZONE 'UTC')::date - 100 + interval '1 hour', 0, true),
                    ('late', 1, 'web', 'http', 't', (now() AT TIME ZONE 'UTC')::date - 5 + interval '1 hour', 0, true),
                    ('late', 2, 'web', 'http', 't', (now() AT TIME ZONE 'UTC')::date - 5 + interval '2 hours', 0, true),
                    ('ancient', 1, 'web', 'http', 't', (now() AT TIME ZONE 'UTC')::date - 200, 0, true)",
        )
        .unwrap();
    }
    assert_eq!(db.scalar("SELECT count(*) FROM results_default"), 3);
    assert_eq!(db.scalar(&format!("SELECT count(*) FROM {stale}")), 1);

    // The long reader: a transaction that has read `results` (every partition) and stays.
    let mut reader = db.client();
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM results;")
        .unwrap();
    let t0 = Instant::now();

    let (grpc, http) = (free_addr(), free_addr());
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ninsecure = true\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\n\n[database]\nurl = \"{}\"\n",
            db.url
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(collector_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("EDGEPROBE_UPKEEP_INTERVAL_MS", "2000")
        .env("RUST_LOG", "info,edgeprobe_collector::schema=debug");
    let mut proc = Proc::spawn(cmd, dir.path().join("collector.log"));
    wait_for(Duration::from_secs(20), "collector /readyz", || {
        assert!(proc.is_running(), "collector exited: {}", proc.log_text());
        http_get(http, "/readyz").filter(|(s, _)| *s == 200)
    });

    let until = t0 + HOLD + Duration::from_secs(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let endpoint = format!("http://{grpc}");
    let agents: Vec<_> = (0..4)
        .map(|i| rt.spawn(commit_until(endpoint.clone(), format!("ing{i}"), t0, until)))
        .collect();
    // Hold the read for 60 s while upkeep tries; nothing of its work may happen meanwhile
    // (the reader would see it), and nothing of ingest may wait for it.
    std::thread::sleep(HOLD.saturating_sub(t0.elapsed()));
    assert!(!exists(&db, &ahead), "{ahead} created under the reader?");
    reader.batch_execute("COMMIT").unwrap();
    let released = t0.elapsed().as_secs_f64();

    let mut commits: Vec<(f64, f64)> = Vec::new();
    for a in agents {
        commits.extend(rt.block_on(a).unwrap());
    }
    let during: Vec<f64> = commits
        .iter()
        .filter(|(at, _)| *at < released)
        .map(|(_, l)| *l)
        .collect();
    let mut lat: Vec<f64> = commits.iter().map(|(_, l)| *l).collect();
    lat.sort_by(f64::total_cmp);
    let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
    eprintln!(
        "upkeep under a {}s reader: {} commits ({} during the hold), p99 {:.3}s, max {:.3}s",
        HOLD.as_secs(),
        lat.len(),
        during.len(),
        p99,
        lat[lat.len() - 1]
    );
    // Commits kept landing in every 5-second window of the hold.
    let first = commits.iter().map(|(at, _)| *at).fold(f64::MAX, f64::min);
    let mut window = first;
    while window + 5.0 < released {
        assert!(
            commits
                .iter()
                .any(|(at, _)| *at >= window && *at < window + 5.0),
            "no commit between {window:.0}s and {:.0}s of the hold",
            window + 5.0
        );
        window += 5.0;
    }
    assert!(p99 < 1.0, "p99 {p99:.3}s");

    // Once the reader is gone, upkeep does what it deferred.
    let log = dir.path().join("collector.log");
    wait_for(Duration::from_secs(60), "upkeep after the reader", || {
        (attached(&db, &ahead) && attached(&db, &late) && !exists(&db, &stale)).then_some(())
    });
    // Drained into their day's own partition, the row past retention deleted.
    assert_eq!(db.scalar(&format!("SELECT count(*) FROM {late}")), 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM results_default"),
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Every result the agents were acked for is there exactly once.
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id LIKE 'ing%'"),
        db.scalar("SELECT count(DISTINCT (agent_id, seq)) FROM results WHERE agent_id LIKE 'ing%'")
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id LIKE 'ing%'") as usize,
        commits.len() * 20
    );
    proc.stop();
}

/// `migrate --retention`, the owner's daily upkeep: rows of a day without a partition
/// (here yesterday, whose partition the window includes, and five days ago, which it does
/// not) get their day's partition, the rows moved there; below 2 days is refused. Before:
/// the rows stayed in the default partition for good (and blocked yesterday's partition:
/// its `CREATE … PARTITION OF` failed on them), and `--retention 12h` was accepted.
#[test]
fn migrate_drains_the_default_partition_and_refuses_a_short_retention() {
    let db = TestDb::new();
    migrate(&db);
    let yesterday = partition(&db, -1);
    let late = partition(&db, -5);
    db.client()
        .batch_execute(&format!(
            "ALTER TABLE results DETACH PARTITION {yesterday}; DROP TABLE {yesterday};
             INSERT INTO results (agent_id, seq, test, kind, target, started_at, duration_seconds, success)
             VALUES ('late', 1, 'web', 'http', 't', (now() AT TIME ZONE 'UTC')::date - 5 + interval '1 hour', 0, true),
                    ('late', 2, 'web', 'http', 't', (now() AT TIME ZONE 'UTC')::date - 1 + interval '1 hour', 0, true);"
        ))
        .unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM results_default"), 2);

    let (code, _, stderr) =
        collector_cmd(&["migrate", "--database-url", &db.url, "--retention", "12h"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("below the minimum of 2d"), "{stderr}");

    let (code, _, stderr) =
        collector_cmd(&["migrate", "--database-url", &db.url, "--retention", "90d"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        attached(&db, &late) && attached(&db, &yesterday),
        "{stderr}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM results_default"), 0);
    assert_eq!(db.scalar(&format!("SELECT count(*) FROM {late}")), 1);
    assert_eq!(db.scalar(&format!("SELECT count(*) FROM {yesterday}")), 1);
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id = 'late'"),
        2
    );
}
