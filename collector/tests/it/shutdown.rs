//! Issue 21: a collector stopped with SIGTERM in the middle of heavy ingest exits 0 within a
//! bound, and its drain is complete: every result an agent saw acked is committed, nothing
//! is half-written, no transaction of the collector is cut, and after a restart every seq
//! lands exactly once.
//!
//! Why this fails if the writers were abandoned mid-transaction: a statement trigger makes
//! every watermark raise (the last statement of a writer's transaction, `store/results.rs`)
//! take 300 ms, so at any moment some writer is inside a transaction. The simulated
//! agents drop their connections as the signal is sent, so the gRPC server drains at once
//! and does not wait for their committers (while an agent stays connected, its stream
//! holds the drain until its committer is done, which would hide the bug). A collector
//! that returned from `run` without joining its sessions and writers would exit with
//! those transactions open: PostgreSQL rolls them back, which
//! `pg_stat_database.xact_rollback` counts (nothing else in this test rolls back). A
//! collector that joins them lets each commit, so the count does not move. The row checks
//! alone could not tell: an interrupted transaction leaves no rows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeprobe_proto::v1 as pb;
use edgeprobe_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const AGENTS: usize = 10;
/// Results per batch, and a batch this often per agent.
const BATCH: u64 = 20;
const EVERY: Duration = Duration::from_millis(50);
/// How long the collector may take to exit after SIGTERM.
const EXIT_BOUND: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Seen {
    welcomes: AtomicU64,
    acks: AtomicU64,
    /// Highest seq recorded.
    last_seq: AtomicU64,
    /// Highest seq the collector acked.
    acked_seq: AtomicU64,
}

/// A simulated agent: records `BATCH` results every `EVERY` while `recording`, keeps them
/// until acked, sends without waiting for acks. When `cut` is cancelled it drops its
/// connection (when given `cut`); after any lost session it waits for `resumed` before
/// reconnecting. It returns when recording has stopped and everything is acked.
async fn agent(
    id: String,
    endpoint: String,
    seen: Arc<Seen>,
    recording: Arc<AtomicBool>,
    cut: Option<CancellationToken>,
    resumed: Arc<AtomicBool>,
) {
    let mut pending: VecDeque<pb::Result> = VecDeque::new();
    let mut seq = 0u64;
    loop {
        let cut_now = cut.clone().filter(|_| !resumed.load(Ordering::Relaxed));
        match session(
            &id,
            &endpoint,
            &seen,
            &recording,
            &mut pending,
            &mut seq,
            cut_now,
        )
        .await
        {
            Ok(()) => return,
            // The collector is stopping or restarting: wait for the test's word, then retry.
            Err(_) => {
                while !resumed.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session(
    id: &str,
    endpoint: &str,
    seen: &Seen,
    recording: &AtomicBool,
    pending: &mut VecDeque<pb::Result>,
    seq: &mut u64,
    cut: Option<CancellationToken>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = IngestClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    tx.send(agent_msg(pb::agent_message::Msg::Hello(pb::Hello {
        agent_id: id.to_string(),
        version: "shutdown-test".into(),
        incarnation: "shutdown".into(),
        ..Default::default()
    })))
    .await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let committed = match tokio::time::timeout(Duration::from_secs(15), inbound.message())
        .await??
        .and_then(|m| m.msg)
    {
        Some(pb::collector_message::Msg::Welcome(w)) => w.committed_seq,
        other => anyhow::bail!("expected a welcome, got {other:?}"),
    };
    seen.welcomes.fetch_add(1, Ordering::Relaxed);
    while pending.front().is_some_and(|r| r.seq <= committed) {
        pending.pop_front();
    }
    let mut last_sent = committed;
    let mut tick = tokio::time::interval(EVERY);
    let cut = cut.unwrap_or_default();
    loop {
        if recording.load(Ordering::Relaxed) {
            for _ in 0..BATCH {
                *seq += 1;
                pending.push_back(http_result(id, *seq, now_nanos()));
            }
            seen.last_seq.store(*seq, Ordering::Relaxed);
        } else if pending.is_empty() {
            return Ok(());
        }
        let batch: Vec<pb::Result> = pending
            .iter()
            .filter(|r| r.seq > last_sent)
            .take(500)
            .cloned()
            .collect();
        if let Some(last) = batch.last().map(|r| r.seq) {
            last_sent = last;
            let batch = agent_msg(pb::agent_message::Msg::Batch(pb::ResultBatch {
                results: batch,
            }));
            tokio::select! {
                _ = cut.cancelled() => anyhow::bail!("cut"),
                r = tx.send(batch) => r?,
            }
        }
        tokio::select! {
            _ = cut.cancelled() => anyhow::bail!("cut"),
            _ = tick.tick() => {}
            msg = inbound.message() => match msg?.and_then(|m| m.msg) {
                Some(pb::collector_message::Msg::Ack(ack)) => {
                    while pending.front().is_some_and(|r| r.seq <= ack.seq) {
                        pending.pop_front();
                    }
                    seen.acked_seq.fetch_max(ack.seq, Ordering::Relaxed);
                    seen.acks.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {}
                None => anyhow::bail!("the collector closed the stream"),
            },
        }
    }
}

/// Transactions rolled back in the test's database, once the backends of everyone else
/// (the stopped collector) are gone, so their counts are flushed.
fn rollbacks_after_exit(db: &TestDb) -> i64 {
    let mut client = db.client();
    wait_for(
        Duration::from_secs(10),
        "the collector's backends to end",
        || {
            let others: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
            (others == 0).then_some(())
        },
    );
    rollbacks(&mut client)
}

fn rollbacks(client: &mut postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn sigterm_during_ingest_commits_every_acked_result_cuts_no_transaction_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    // Every watermark raise takes 300 ms: a writer is nearly always inside a transaction.
    db.client()
        .batch_execute(
            "CREATE FUNCTION slow_watermark() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
             CREATE TRIGGER slow_watermark AFTER UPDATE ON agent_incarnations
               FOR EACH STATEMENT EXECUTE FUNCTION slow_watermark();",
        )
        .unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let recording = Arc::new(AtomicBool::new(true));
    let cut = CancellationToken::new();
    let resumed = Arc::new(AtomicBool::new(false));
    let seen: Vec<Arc<Seen>> = (0..AGENTS).map(|_| Default::default()).collect();
    let tasks: Vec<_> = seen
        .iter()
        .enumerate()
        .map(|(i, s)| {
            runtime.spawn(agent(
                format!("shutdown-{i:02}"),
                collector.endpoint(),
                s.clone(),
                recording.clone(),
                Some(cut.clone()),
                resumed.clone(),
            ))
        })
        .collect();
    wait_for(Duration::from_secs(60), "every agent acked 3 times", || {
        seen.iter()
            .all(|s| s.acks.load(Ordering::Relaxed) >= 3)
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let before = rollbacks(&mut db.client());

    // SIGTERM mid-ingest, and the agents leave at the same moment.
    cut.cancel();
    let start = Instant::now();
    let code = collector.proc.stop();
    let took = start.elapsed();
    assert_eq!(
        code,
        Some(0),
        "exit code; log: {}",
        collector.proc.log_text()
    );
    assert!(took < EXIT_BOUND, "exited after {took:?}");
    assert!(
        collector.proc.log_text().contains("stopped"),
        "run returned: {}",
        collector.proc.log_text()
    );

    // No transaction of the collector was cut by its exit.
    assert_eq!(
        rollbacks_after_exit(&db),
        before,
        "transactions rolled back by the shutdown; log: {}",
        collector.proc.log_text()
    );
    // Every acked result committed; nothing half-written: each incarnation's rows are
    // exactly 1..=committed_seq.
    let mut client = db.client();
    for (i, s) in seen.iter().enumerate() {
        let id = format!("shutdown-{i:02}");
        let committed: i64 = client
            .query_one(
                "SELECT committed_seq FROM agent_incarnations WHERE agent_id = $1 AND incarnation = 'shutdown'",
                &[&id],
            )
            .unwrap()
            .get(0);
        let acked = s.acked_seq.load(Ordering::Relaxed) as i64;
        assert!(
            acked > 0 && acked <= committed,
            "{id}: acked {acked}, committed {committed}"
        );
        assert_eq!(
            seq_summary(&db, &id),
            (committed, committed, committed),
            "{id}: (rows, max seq, distinct seqs) against committed_seq"
        );
    }

    // Restart; the agents come back, stop recording and drain: every seq exactly once.
    collector.restart(dir.path());
    recording.store(false, Ordering::Relaxed);
    resumed.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
            .await
            .expect("every agent drained within 120 s")
    });
    for (i, s) in seen.iter().enumerate() {
        let id = format!("shutdown-{i:02}");
        assert_exactly_once(&db, &id, s.last_seq.load(Ordering::Relaxed));
    }
    assert_eq!(collector.proc.stop(), Some(0));
}

/// How soon after SIGTERM a real agent (spread 2 s) must be welcomed by the restarted
/// collector: the old one's drain, the new one's start (migrations checked) and the spread.
const REJOIN_BOUND: Duration = Duration::from_secs(15);

/// Issue 26: a collector stopping on SIGTERM tells its agents (UNAVAILABLE with
/// `edgeprobe-reason: shutdown`, then HTTP/2 GOAWAY), and a real agent process takes it as
/// the collector going away, not as a failure: it logs the announced shutdown, reconnects
/// at once within its spread to the collector started again on the same port, and every
/// result it recorded throughout lands exactly once. An agent that did not recognise the
/// status would log a lost session first ("collector session ended").
#[test]
fn an_agent_told_of_the_shutdown_reconnects_to_the_restarted_collector_at_once_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "told",
        &collector.endpoint(),
        &http_test(&target.url(), "100ms"),
    );
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("reconnect_spread = \"0s\"", "reconnect_spread = \"2s\""),
    )
    .unwrap();
    agent.start();
    let committed = |db: &TestDb| -> i64 {
        db.client()
            .query_opt(
                "SELECT committed_seq FROM agents WHERE agent_id = 'told'",
                &[],
            )
            .unwrap()
            .map_or(0, |r| r.get(0))
    };
    wait_for(Duration::from_secs(30), "20 results committed", || {
        (committed(&db) >= 20).then_some(())
    });
    let log = agent.config.with_extension("log");
    let welcomes = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("connected to collector")
            .count()
    };
    assert_eq!(welcomes(), 1);

    let signalled = Instant::now();
    assert_eq!(collector.proc.stop(), Some(0), "exit code");
    let stopped = signalled.elapsed();
    collector.restart(dir.path());
    let back = wait_for(REJOIN_BOUND, "the agent welcomed again", || {
        (welcomes() >= 2).then(|| signalled.elapsed())
    });
    assert!(
        back < REJOIN_BOUND,
        "welcomed again {back:?} after the signal"
    );
    let agent_log = std::fs::read_to_string(&log).unwrap();
    // The first session end the agent logs is the announced shutdown; connects refused
    // while the collector was down may follow it.
    let announced = agent_log.find("the collector is shutting down");
    let lost = agent_log.find("collector session ended");
    assert!(
        announced.is_some_and(|a| lost.is_none_or(|l| a < l)),
        "the agent did not take the announced shutdown as such: {agent_log}"
    );
    let before = committed(&db);
    wait_for(Duration::from_secs(30), "results committed again", || {
        (committed(&db) > before + 10).then_some(())
    });
    eprintln!(
        "SIGTERM: old collector gone after {stopped:?}, agent welcomed again {back:?} after the signal"
    );

    assert_eq!(agent.stop(), Some(0));
    let last = drain(&mut agent, &db, "told");
    assert_exactly_once(&db, "told", last);
    assert_eq!(collector.proc.stop(), Some(0));
}
