//! The collector side of "never stall, never lose" (issue 13), driven by a hand-written
//! gRPC agent against a real collector and a real PostgreSQL: results the collector must
//! refuse are quarantined per result while the rest of their batch commits and the stream
//! goes on; implausible start times land flagged; a lost watermark makes redeliveries
//! duplicates, not errors; a database that cannot hold an agent's labels (LATIN1) still
//! welcomes it and quarantines only what it cannot store; buffer incarnations keep a
//! re-imaged host's results and refuse a cloned one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::v1 as pb;
use edgeprobe_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::support::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn client(c: &Collector) -> IngestClient<Channel> {
    IngestClient::connect(c.endpoint()).await.unwrap()
}

fn hello(id: &str, incarnation: &str) -> pb::Hello {
    pb::Hello {
        agent_id: id.to_string(),
        version: "test".into(),
        labels: [("site".to_string(), "lab".to_string())].into(),
        incarnation: incarnation.to_string(),
        ..Default::default()
    }
}

/// A valid http result, started `seq` milliseconds after a fixed recent time (so a
/// redelivery repeats its start time exactly).
fn result(id: &str, seq: u64, base_nanos: i64) -> pb::Result {
    pb::Result {
        labels: [("site".to_string(), "lab".to_string())].into(),
        ..http_result(id, seq, base_nanos + seq as i64 * 1_000_000)
    }
}

/// A minute ago, whole milliseconds.
fn recent() -> i64 {
    (now_nanos() - 60_000_000_000) / 1_000_000 * 1_000_000
}

/// One open Ingest stream, past the welcome.
struct Session {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::CollectorMessage>,
    welcome: pb::Welcome,
}

const REPLY_WAIT: Duration = Duration::from_secs(20);

async fn open(client: &mut IngestClient<Channel>, hello: pb::Hello) -> Result<Session, Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(agent_msg(pb::agent_message::Msg::Hello(hello)))
        .await
        .unwrap();
    let mut inbound = tokio::time::timeout(REPLY_WAIT, client.stream(ReceiverStream::new(rx)))
        .await
        .map_err(|_| Status::unknown("test: no response to the stream"))??
        .into_inner();
    match tokio::time::timeout(REPLY_WAIT, inbound.message()).await {
        Ok(Ok(Some(pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::Welcome(welcome)),
        }))) => Ok(Session {
            tx,
            inbound,
            welcome,
        }),
        Ok(Err(s)) => Err(s),
        other => Err(Status::unknown(format!(
            "test: expected a welcome, got {other:?}"
        ))),
    }
}

/// Opens a stream, retrying while the collector still holds the previous session of the
/// same agent id (it ends a moment after the client dropped it).
async fn open_when_free(client: &mut IngestClient<Channel>, hello: pb::Hello) -> Session {
    let start = std::time::Instant::now();
    loop {
        match open(client, hello.clone()).await {
            Ok(s) => return s,
            Err(s) if s.code() == Code::FailedPrecondition && start.elapsed() < REPLY_WAIT => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("hello refused: {s:?}"),
        }
    }
}

impl Session {
    /// Sends a batch; the ack, or the status the stream ended with.
    async fn batch(&mut self, results: Vec<pb::Result>) -> Result<pb::Ack, Status> {
        let m = agent_msg(pb::agent_message::Msg::Batch(pb::ResultBatch { results }));
        if self.tx.send(m).await.is_err() {
            return Err(Status::unknown("test: request stream already closed"));
        }
        match tokio::time::timeout(REPLY_WAIT, self.inbound.message()).await {
            Ok(Ok(Some(pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::Ack(a)),
            }))) => Ok(a),
            Ok(Err(s)) => Err(s),
            other => Err(Status::unknown(format!(
                "test: expected an ack, got {other:?}"
            ))),
        }
    }
}

fn seqs(db: &TestDb, table: &str, agent: &str) -> Vec<i64> {
    db.client()
        .query(
            &format!("SELECT seq FROM {table} WHERE agent_id = $1 ORDER BY seq"),
            &[&agent],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn rejected_seqs(ack: &pb::Ack) -> Vec<u64> {
    ack.rejected.iter().map(|r| r.seq).collect()
}

/// Case 1 of the issue, per result: 40 labels, a NUL in a label, an over-long error
/// message. Before: the whole batch was refused (INVALID_ARGUMENT) and redelivered forever.
#[test]
fn invalid_results_are_quarantined_and_the_rest_of_their_batch_commits() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let id = "q1";
    let base = recent();
    let mut batch: Vec<pb::Result> = (1..=7).map(|s| result(id, s, base)).collect();
    batch[1].labels = (0..40)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    batch[3].labels = [("site".to_string(), "l\0b".to_string())].into();
    batch[5].success = false;
    batch[5].error_class = "refused".into();
    batch[5].error_message = "e".repeat(5000);
    let sent = batch.clone();

    runtime().block_on(async {
        let mut c = client(&collector).await;
        let mut s = open(&mut c, hello(id, "")).await.expect("welcome");
        let ack = s
            .batch(batch)
            .await
            .expect("the batch is acked, not refused");
        assert_eq!(ack.seq, 7, "the ack covers the whole batch");
        assert_eq!(rejected_seqs(&ack), [2, 4, 6]);
        assert_eq!(ack.rejected[0].reason, "40 labels, at most 32");
        assert!(ack.rejected[1].reason.contains("control characters"));
        assert_eq!(
            ack.rejected[2].reason,
            "error message is 5000 bytes, at most 4096"
        );
        // The stream stays open and goes on.
        let ack = s.batch(vec![result(id, 8, base)]).await.unwrap();
        assert_eq!((ack.seq, ack.rejected.len()), (8, 0));
        // A redelivery of the first batch changes nothing and names the refusals again.
        let ack = s.batch(sent.clone()).await.unwrap();
        assert_eq!((ack.seq, rejected_seqs(&ack)), (7, vec![2, 4, 6]));
    });

    assert_eq!(seqs(&db, "results", id), [1, 3, 5, 7, 8]);
    assert_eq!(seqs(&db, "rejected_results", id), [2, 4, 6]);
    let mut client = db.client();
    for row in client
        .query(
            "SELECT seq, reason, sqlstate, raw, raw_format, raw_truncated, incarnation
               FROM rejected_results WHERE agent_id = $1 ORDER BY seq",
            &[&id],
        )
        .unwrap()
    {
        let seq: i64 = row.get(0);
        let raw: Vec<u8> = row.get(3);
        assert!(!row.get::<_, String>(1).is_empty());
        assert_eq!(
            row.get::<_, Option<String>>(2),
            None,
            "seq {seq}: no SQLSTATE"
        );
        let decoded: pb::Result = prost::Message::decode(&raw[..]).unwrap();
        assert_eq!(
            decoded,
            sent[seq as usize - 1],
            "seq {seq}: the raw bytes are the result as sent"
        );
        assert_eq!(row.get::<_, String>(4), "protobuf");
        assert!(!row.get::<_, bool>(5));
        assert_eq!(row.get::<_, String>(6), "");
    }
    let agent = client
        .query_one(
            "SELECT rejected, committed_seq FROM agents WHERE agent_id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!((agent.get::<_, i64>(0), agent.get::<_, i64>(1)), (3, 8));
    assert_eq!(
        collector.metric("edgeprobe_ingest_results_total{outcome=\"rejected\"}"),
        3.0
    );
    assert_eq!(
        collector.metric("edgeprobe_ingest_results_total{outcome=\"committed\"}"),
        5.0
    );
    assert_eq!(
        collector.metric("edgeprobe_ingest_results_total{outcome=\"duplicate\"}"),
        7.0
    );
    let log = collector.proc.log_text();
    assert!(
        log.contains("results quarantined in rejected_results") && log.contains("agent_id=q1"),
        "{log}"
    );
}

/// Wrong clocks: a result stamped 1970 and one stamped 2019 land, stored by arrival and
/// flagged, and the good result after them in the same batch lands too. Before: the whole
/// batch was refused, and the good result was held behind the bad ones forever.
#[test]
fn implausible_start_times_land_flagged_and_hold_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let id = "clock";
    let base = recent();
    let mut batch: Vec<pb::Result> = (1..=3).map(|s| result(id, s, base)).collect();
    batch[0].started_at_unix_nanos = 5_000_000_000; // 1970-01-01 00:00:05
    batch[0].clock_unsynced = true;
    batch[1].started_at_unix_nanos = 1_559_390_400_000_000_000; // 2019-06-01 12:00:00
    batch[2].clock_corrected = true;
    let before = SystemTime::now();
    runtime().block_on(async {
        let mut c = client(&collector).await;
        let mut s = open(&mut c, hello(id, "c0ffee")).await.unwrap();
        assert_eq!(s.welcome.committed_seq, 0);
        let skew = (s.welcome.collector_unix_nanos - now_nanos()).abs();
        assert!(
            skew < 60_000_000_000,
            "welcome carries the collector's clock"
        );
        let ack = s.batch(batch).await.expect("acked");
        assert_eq!((ack.seq, ack.rejected.len()), (3, 0));
    });
    let after = SystemTime::now();
    let rows = db
        .client()
        .query(
            "SELECT seq, started_at, reported_started_at, clock_unsynced, clock_corrected,
                    incarnation, tableoid::regclass::text
               FROM results WHERE agent_id = $1 ORDER BY seq",
            &[&id],
        )
        .unwrap();
    assert_eq!(rows.len(), 3);
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    for (row, reported) in rows[..2].iter().zip([at(5), at(1_559_390_400)]) {
        let started: SystemTime = row.get(1);
        assert!(
            started >= before - Duration::from_secs(1) && started <= after,
            "stored by arrival"
        );
        assert_eq!(row.get::<_, Option<SystemTime>>(2), Some(reported));
        assert!(row.get::<_, bool>(3), "flagged clock_unsynced");
        assert_ne!(
            row.get::<_, String>(6),
            "results_default",
            "in today's partition"
        );
    }
    let good = &rows[2];
    assert_eq!(
        good.get::<_, SystemTime>(1),
        UNIX_EPOCH + Duration::from_nanos((base + 3_000_000) as u64)
    );
    assert_eq!(good.get::<_, Option<SystemTime>>(2), None);
    assert!(!good.get::<_, bool>(3));
    assert!(good.get::<_, bool>(4), "clock_corrected carried");
    assert_eq!(good.get::<_, String>(5), "c0ffee");
}

/// An operator deletes the agent's rows from agents and agent_incarnations; the agent
/// redelivers what is already stored. Before: a duplicate-key error retried forever.
#[test]
fn redelivery_after_the_watermark_is_deleted_counts_duplicates_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let id = "forgotten";
    let base = recent();
    let mut first: Vec<pb::Result> = (1..=5).map(|s| result(id, s, base)).collect();
    first[2].labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    runtime().block_on(async {
        let mut c = client(&collector).await;
        let mut s = open(&mut c, hello(id, "")).await.unwrap();
        assert_eq!(s.batch(first.clone()).await.unwrap().seq, 5);
        tokio::task::block_in_place(|| {
            db.client()
                .batch_execute(&format!(
                    "DELETE FROM agent_incarnations WHERE agent_id = '{id}';
                     DELETE FROM agents WHERE agent_id = '{id}';"
                ))
                .unwrap()
        });
        let ack = s
            .batch(first.clone())
            .await
            .expect("the redelivery commits");
        assert_eq!((ack.seq, rejected_seqs(&ack)), (5, vec![3]));
        let ack = s
            .batch((6..=8).map(|s| result(id, s, base)).collect())
            .await
            .expect("the stream goes on");
        assert_eq!(ack.seq, 8);
    });
    assert_eq!(seqs(&db, "results", id), [1, 2, 4, 5, 6, 7, 8]);
    assert_eq!(seqs(&db, "rejected_results", id), [3]);
    assert_eq!(
        collector.metric("edgeprobe_ingest_results_total{outcome=\"duplicate\"}"),
        5.0,
        "4 stored and 1 quarantined result redelivered"
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT committed_seq FROM agent_incarnations WHERE agent_id = '{id}' AND incarnation = ''"
        )),
        8
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT committed_seq FROM agents WHERE agent_id = '{id}'"
        )),
        8,
        "the agent's row is recreated"
    );
    let log = collector.proc.log_text();
    assert!(!log.contains("db error"), "{log}");
}

/// Case 3 of the issue: a LATIN1 database and an agent labelled city = "東京". Before: its
/// hello failed on every connect ("agent bookkeeping failed: db error") and nothing of it
/// ever landed. Now it is welcomed, what the database cannot hold is quarantined with
/// SQLSTATE 22P05, its other results land, and a healthy agent beside it is not held up.
#[test]
fn a_latin1_database_quarantines_what_it_cannot_hold_and_nothing_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    // The same database name, recreated in LATIN1 (TestDb drops it at the end).
    let (server, name) = db.url.rsplit_once('/').unwrap();
    let mut admin =
        postgres::Client::connect(&format!("{server}/postgres"), postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {name}"))
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ))
        .unwrap();
    let collector = Collector::start(dir.path(), &db);
    let tokyo = |r: &mut pb::Result| {
        r.labels.insert("city".into(), "東京".into());
    };
    let base = recent();
    runtime().block_on(async {
        let mut c = client(&collector).await;
        let mut h = hello("tokyo", "");
        h.labels.insert("city".into(), "東京".into());
        let mut bad = open(&mut c, h).await.expect("the agent is welcomed");
        let mut good = open(&mut c, hello("healthy", "")).await.unwrap();
        for round in 0..10u64 {
            let mut mixed: Vec<pb::Result> = (1..=3)
                .map(|s| result("tokyo", round * 3 + s, base))
                .collect();
            tokyo(&mut mixed[0]);
            tokyo(&mut mixed[2]);
            let healthy: Vec<pb::Result> = (1..=3)
                .map(|s| result("healthy", round * 3 + s, base))
                .collect();
            // Both at once, so the writers may group them in one transaction.
            let (a, b) = tokio::join!(bad.batch(mixed), good.batch(healthy));
            let a = a.expect("tokio's batch is acked");
            assert_eq!(a.seq, round * 3 + 3);
            assert_eq!(
                rejected_seqs(&a),
                [round * 3 + 1, round * 3 + 3],
                "{:?}",
                a.rejected
            );
            assert!(
                a.rejected[0].reason.starts_with("SQLSTATE 22P05: "),
                "{}",
                a.rejected[0].reason
            );
            assert_eq!(b.expect("healthy's batch is acked").seq, round * 3 + 3);
        }
    });
    assert_eq!(seqs(&db, "results", "healthy").len(), 30);
    let tokyo_rows = seqs(&db, "results", "tokyo");
    assert_eq!(
        tokyo_rows,
        (1..=10).map(|r| r * 3 - 1).collect::<Vec<i64>>()
    );
    let quarantined = db
        .client()
        .query(
            // The raw row is UTF-8 JSON, which this database cannot hold as text.
            "SELECT seq, sqlstate, raw_format,
                    position('\"city\":\"'::bytea || '\\xe69db1e4baac'::bytea in raw) > 0
               FROM rejected_results WHERE agent_id = 'tokyo' ORDER BY seq",
            &[],
        )
        .unwrap();
    assert_eq!(quarantined.len(), 20);
    for row in &quarantined {
        assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("22P05"));
        assert_eq!(row.get::<_, String>(2), "json");
        assert!(row.get::<_, bool>(3), "the raw row holds the label as sent");
    }
    assert_eq!(
        db.scalar("SELECT rejected FROM agents WHERE agent_id = 'tokyo'"),
        20
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'tokyo' AND labels = '{}'"),
        1,
        "registered without the labels the database cannot hold"
    );
    assert!(collector.metric("edgeprobe_store_errors_total{class=\"permanent\"}") >= 20.0);
    let log = collector.proc.log_text();
    assert!(log.contains("SQLSTATE 22P05"), "{log}");
    assert!(
        log.contains("sqlstate=\"22P05\"") || log.contains("sqlstate=22P05"),
        "{log}"
    );
    assert!(
        !log.contains("db error"),
        "the bare \"db error\" was logged: {log}"
    );
    assert!(
        log.contains("the database is not UTF8"),
        "startup warns about the encoding: {log}"
    );
}

/// Two streams with one agent id and different incarnations: a cloned host. The second is
/// refused and counted; the same incarnation again replaces the live session. Before: both
/// were welcomed.
#[test]
fn a_second_incarnation_is_refused_and_the_same_one_replaces_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let id = "twin";
    let base = recent();
    runtime().block_on(async {
        let mut c = client(&collector).await;
        let mut first = open(&mut c, hello(id, "aaaa")).await.unwrap();
        assert_eq!(first.batch(vec![result(id, 1, base)]).await.unwrap().seq, 1);

        let mut other = client(&collector).await;
        let status = open(&mut other, hello(id, "bbbb"))
            .await
            .err()
            .expect("a second incarnation is refused");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let text = status.message();
        assert!(
            text.contains("two hosts use the agent id `twin` (a cloned image?)"),
            "{text}"
        );
        assert!(
            text.contains("`bbbb`") && text.contains("`aaaa`") && text.contains("127.0.0.1:"),
            "{text}"
        );
        // The typed reason agents match, beside the message older agents read.
        assert_eq!(
            status.metadata().get(edgeprobe_proto::REASON_KEY),
            Some(&tonic::metadata::MetadataValue::from_static(
                edgeprobe_proto::REASON_IDENTITY_CONFLICT
            )),
            "{status:?}"
        );
        // The live session is untouched.
        assert_eq!(first.batch(vec![result(id, 2, base)]).await.unwrap().seq, 2);

        // The same incarnation again: the agent reconnecting. It replaces the session.
        let mut again = open(&mut c, hello(id, "aaaa")).await.unwrap();
        assert_eq!(again.welcome.committed_seq, 2);
        let ended = tokio::time::timeout(REPLY_WAIT, first.inbound.message()).await;
        assert!(
            matches!(ended, Ok(Err(ref s)) if s.code() == Code::Aborted),
            "the replaced session is closed: {ended:?}"
        );
        assert_eq!(again.batch(vec![result(id, 3, base)]).await.unwrap().seq, 3);
    });
    assert_eq!(
        collector.metric("edgeprobe_agent_identity_conflicts_total"),
        1.0
    );
    wait_for(Duration::from_secs(10), "agents.identity_conflicts", || {
        (db.scalar("SELECT identity_conflicts FROM agents WHERE agent_id = 'twin'") == 1)
            .then_some(())
    });
    assert_eq!(seqs(&db, "results", id), [1, 2, 3]);
    let log = collector.proc.log_text();
    assert!(log.contains("identity conflict"), "{log}");
}

/// Case 2 of the issue: incarnation A lands seq 1..100, the host is re-imaged and its new
/// buffer (incarnation B) sends seq 1..200. Before: the welcome said 100 and B's 1..100 were
/// taken for committed. Now all 300 are stored.
#[test]
fn a_reimaged_host_starts_a_fresh_sequence_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let id = "r1";
    let base = recent();
    runtime().block_on(async {
        let mut c = client(&collector).await;
        {
            let mut a = open(&mut c, hello(id, "aaaa")).await.unwrap();
            assert_eq!(a.welcome.committed_seq, 0);
            let ack = a
                .batch((1..=100).map(|s| result(id, s, base)).collect())
                .await
                .unwrap();
            assert_eq!(ack.seq, 100);
        }
        // B's results start later (its buffer was made after the re-image).
        let later = base + 1_000_000_000;
        let mut b = open_when_free(&mut c, hello(id, "bbbb")).await;
        assert_eq!(b.welcome.committed_seq, 0, "a new incarnation starts at 0");
        for chunk in [1..=100u64, 101..=200] {
            let end = *chunk.end();
            let ack = b
                .batch(chunk.map(|s| result(id, s, later)).collect())
                .await
                .unwrap();
            assert_eq!(ack.seq, end);
        }
    });
    let per: Vec<(String, i64, i64)> = db
        .client()
        .query(
            "SELECT incarnation, count(DISTINCT seq), max(seq) FROM results
              WHERE agent_id = $1 GROUP BY 1 ORDER BY 1",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        per,
        [
            ("aaaa".to_string(), 100, 100),
            ("bbbb".to_string(), 200, 200)
        ]
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id = 'r1'"),
        300
    );
    let agent = db
        .client()
        .query_one(
            "SELECT incarnation, committed_seq FROM agents WHERE agent_id = 'r1'",
            &[],
        )
        .unwrap();
    assert_eq!(
        (agent.get::<_, String>(0), agent.get::<_, i64>(1)),
        ("bbbb".to_string(), 200),
        "agents follows the latest incarnation"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM agent_incarnations WHERE agent_id = 'r1'"),
        2
    );
}
