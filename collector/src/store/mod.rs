//! The PostgreSQL store: a small pool of writer tasks, each owning one connection, fed by
//! one bounded job queue shared by all agent streams.
//!
//! Invariants:
//! - Exactly-once per (agent, incarnation): a writer transaction locks the incarnations it
//!   writes (`agent_incarnations … FOR UPDATE`, ordered by (agent_id, incarnation) so
//!   writers never deadlock on them), keeps only results with seq above the
//!   incarnation's `committed_seq`, COPYs them, quarantines the refused results of the
//!   same batches in `rejected_results`, raises `committed_seq` over both and commits. A
//!   result delivered twice, to this or another collector, lands once. A missing
//!   watermark row (an operator deleted it) is recreated at 0; the redelivered rows it
//!   lets through are found by the primary key and counted as duplicates, never an error.
//!   Each stream has at most one batch in the store at a time, so a batch is never
//!   committed before the batch that precedes it.
//! - `agents` keeps one row per agent: `committed_seq` is that of its latest incarnation,
//!   `rejected` counts its quarantined results.
//! - A job's reply is sent only after its transaction committed; the ack follows it.
//! - Every PostgreSQL error is logged with its SQLSTATE and message, and counted by class.
//!   Transient ones (no SQLSTATE: the connection; and every class but 22 and 23) fail
//!   the jobs, which their streams retry with backoff. Permanent ones (class 22 data
//!   exception, 23 integrity constraint) are never retried as they are: the group is
//!   rolled back and each job written alone; a job that still fails is written again in
//!   one transaction, its rows COPYed range by range under savepoints and the failing
//!   ranges halved down to the offending rows, which go to `rejected_results` with their
//!   SQLSTATE while everything else commits. A hello whose labels PostgreSQL refuses is
//!   stored without them, so the agent still gets its welcome.
//! - Backpressure: the queue is bounded; when Postgres is slow or down, writers stop
//!   taking jobs, streams stop reading, agents keep buffering on disk.
//! - Writers group jobs from many streams into one transaction (up to `MAX_ROWS` rows).
//! - A writer's statements cost what its group touches, not the fleet: each joins the
//!   group's agents (an array) to `agents` / `agent_incarnations` / `path_last`, tables
//!   of one or a few rows per agent. The planner, costing index probes as disk reads,
//!   scans such a table whole whenever it is small enough (10,000 agents: three scans
//!   of 10,000 rows per transaction, about 6 ms of PostgreSQL CPU, for a group of 70
//!   rows), so the writers' sessions run with `enable_seqscan = off` (unless the URL's
//!   `options` set it): the primary keys are used and a group of n agents costs n
//!   probes. The statements aggregate per agent before they join, never per row.
//! - Failover (a multi-host URL with `target_session_attrs=read-write`, e.g. Patroni): a
//!   writer whose connection closes, or whose server refuses a write as read-only (25006:
//!   a demoted primary still answers), reconnects, and the URL picks the writable host.
//!   The health check counts a server that answers `transaction_read_only = on` as down,
//!   so `/readyz` says 503 until a primary is reached. The watermark commits with the rows,
//!   so nothing is lost if the database acknowledges a commit only once a standby has it
//!   (Patroni `synchronous_mode`).
//! - A host that vanishes (no RST, no ICMP) is given up within seconds: every connection
//!   has TCP keepalive and TCP_USER_TIMEOUT (`pgtls`), so a writer's query or COMMIT on
//!   it fails within about 11 s and the writer reconnects through the URL. Writers'
//!   statements are also cancelled by the server past [`WRITE_STATEMENT_TIMEOUT`] (a
//!   server that answers but does not progress), except COMMIT: a cancelled wait for the
//!   synchronous standby would report a commit the standby may not have, and the ack would
//!   follow it; a COMMIT is bounded by the TCP liveness only.
//! - The health check connects to each host of the URL on its own, all at once, each
//!   within [`HEALTH_BOUND`] (connect and `SHOW transaction_read_only`), every
//!   [`HEALTH_EVERY`]; the first host in the URL's order that is writable is the primary
//!   it reports (`/readyz`, `edgeprobe_postgres_primary_info`, the log when it changes).
//!   A dead first host does not hide a live second one, and either change (primary gone,
//!   new primary up) is seen within HEALTH_EVERY + HEALTH_BOUND = 3 s.
//!
//! - Shutdown: the writers and the health check run on the caller's `TaskTracker` and stop
//!   on the store's own token, which `run` cancels only after the gRPC server has drained
//!   (so every committer has had its last write answered). A writer then finishes the
//!   group it holds and the jobs still queued, and returns; it is never dropped inside a
//!   transaction by a clean shutdown.
//!
//! Files: `writer.rs` (the writer loop: grouping, retry, reconnect, split on a permanent
//! error), `results.rs` (the results transaction: watermarks and COPY, where exactly-once
//! is decided), `path.rs` (`path_changed`, decided in that transaction), `quarantine.rs`
//! (isolating refused rows under savepoints), `agents.rs`
//! (hello, heartbeat and conflict statements on `agents`); this file holds the handle,
//! the job queue and the health check. PostgreSQL's connection, TLS, COPY format and error
//! vocabulary are `crate::pg`.

mod agents;
mod path;
mod quarantine;
mod results;
mod writer;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{pin_mut, SinkExt};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{AgentHello, Batch, BufferState, Rejected, ResultRow};
use crate::metrics::Metrics;
use crate::pg::{describe, Target};

use writer::Writer;

/// Rows per writer transaction at most.
const MAX_ROWS: usize = 50_000;
/// Jobs waiting for a writer at most. The backpressure bound on memory is the ingest's
/// in-flight budget (`ingest::MAX_IN_FLIGHT_UNITS`, one unit at least per batch, and one
/// write job per stream at a time); this bound is as large so that it is not also the
/// bound of a writer's group: 10,000 agents sending single results need groups of
/// thousands of rows, and a queue of 256 jobs made groups of at most 256.
const QUEUE: usize = 16_384;
/// A writer's reconnect delays (jittered, `backoff`).
const RECONNECT_BASE: Duration = Duration::from_millis(200);
const RECONNECT_CAP: Duration = Duration::from_secs(10);
/// Health checks start this often (a round that takes longer delays the next).
pub const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// A host's health check (connect when needed, then the query) at most.
pub const HEALTH_BOUND: Duration = Duration::from_secs(2);
/// A writer's statement at most (server side; not COMMIT, see the module's doc). The
/// largest group (MAX_ROWS rows) is COPYed in about a second; 20 s leaves room for a slow
/// disk and for upkeep's short locks.
pub const WRITE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("the store is shutting down")]
    Closed,
}

impl StoreError {
    fn of(e: &tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(describe(e))
    }
}

/// What a committed write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The incarnation's committed seq after the transaction.
    pub committed_seq: i64,
    pub inserted: u64,
    pub duplicates: u64,
    /// Results put in the quarantine: refused by validation, or by PostgreSQL.
    pub quarantined: u64,
    /// The results PostgreSQL refused, (seq, reason): the ack names them too.
    pub refused: Vec<(i64, String)>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Job {
    Hello(AgentHello, Reply<i64>),
    /// Consecutive batches of one agent, in seq order, written in one transaction.
    Write(Vec<Arc<Batch>>, Reply<Written>),
    Heartbeat(String, BufferState),
    /// A session refused because another incarnation of the agent was connected.
    Conflict(String),
}

/// Handle used by the ingest streams; cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    ready: Arc<AtomicBool>,
    /// The host the health check last found writable (`host:port`).
    primary: Arc<std::sync::Mutex<Option<String>>>,
}

impl Store {
    /// Starts `writers` writer tasks and a health checker against `target` on `tasks`.
    /// They run until `stop` is cancelled; the writers then finish what they hold and
    /// what is queued.
    pub fn start(
        target: &Target,
        writers: usize,
        site_label: String,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Store {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let ready = Arc::new(AtomicBool::new(false));
        let primary = Arc::new(std::sync::Mutex::new(None));
        let writing = target
            .with_statement_timeout(WRITE_STATEMENT_TIMEOUT)
            .with_setting("enable_seqscan", "off");
        for id in 0..writers {
            let writer = Writer {
                id,
                target: writing.clone(),
                jobs: rx.clone(),
                metrics: metrics.clone(),
                site_label: site_label.clone(),
                stale: AtomicBool::new(false),
            };
            tasks.spawn(writer.run(stop.clone()));
        }
        tasks.spawn(health(
            target.clone(),
            ready.clone(),
            primary.clone(),
            metrics,
            stop,
        ));
        Store {
            jobs: tx,
            ready,
            primary,
        }
    }

    /// True while a writable PostgreSQL answers.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The writable host (`host:port`) while ready.
    pub fn primary(&self) -> Option<String> {
        let host = self.primary.lock().expect("not poisoned").clone();
        host.filter(|_| self.ready())
    }

    /// Registers (or updates) an agent and its incarnation; returns the committed seq of
    /// that incarnation.
    pub async fn hello(&self, hello: AgentHello) -> Result<i64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Hello(hello, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes consecutive batches of one agent (in seq order): their valid results, and
    /// their refused ones to the quarantine; returns after commit.
    pub async fn write(&self, batches: Vec<Arc<Batch>>) -> Result<Written, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Write(batches, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records buffer state; dropped when the queue is full (the next heartbeat repeats it).
    pub fn heartbeat(&self, agent_id: String, state: BufferState) {
        let _ = self.jobs.try_send(Job::Heartbeat(agent_id, state));
    }

    /// Counts an identity conflict on the agent's row; best effort, like a heartbeat.
    pub fn identity_conflict(&self, agent_id: String) {
        let _ = self.jobs.try_send(Job::Conflict(agent_id));
    }
}

/// What one host answered to the health check.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostHealth {
    Writable,
    ReadOnly,
    Down(String),
}

/// Connects to `target` when `slot` holds no open connection, then asks whether it takes
/// writes; all within HEALTH_BOUND. A connection that fails or does not answer is dropped.
async fn check_host(target: &Target, slot: &mut Option<Client>) -> HostHealth {
    let answer = tokio::time::timeout(HEALTH_BOUND, async {
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = None;
            *slot = Some(target.connect().await?);
        }
        let client = slot.as_ref().expect("connected above");
        client.simple_query("SHOW transaction_read_only").await
    })
    .await;
    let health = match answer {
        Ok(Ok(rows)) => {
            let off = rows.iter().any(|m| {
                matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("off"))
            });
            if off {
                HostHealth::Writable
            } else {
                HostHealth::ReadOnly
            }
        }
        Ok(Err(e)) => HostHealth::Down(describe(&e)),
        Err(_) => HostHealth::Down(format!("no answer within {} s", HEALTH_BOUND.as_secs_f64())),
    };
    if matches!(health, HostHealth::Down(_)) {
        *slot = None;
    }
    health
}

async fn health(
    target: Target,
    ready: Arc<AtomicBool>,
    primary: Arc<std::sync::Mutex<Option<String>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let hosts = target.hosts();
    // One connection per host, kept while it answers.
    let mut clients: Vec<Option<Client>> = hosts.iter().map(|_| None).collect();
    let mut last: Option<String> = None;
    let mut ticks = tokio::time::interval(HEALTH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Every host at once, each under its own bound: a dead first host costs its bound,
        // not the whole round, and never hides a live one behind it.
        let round = futures::future::join_all(
            hosts
                .iter()
                .zip(clients.iter_mut())
                .map(|((_, t), slot)| check_host(t, slot)),
        );
        let answers = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = round => a,
        };
        // The first writable host in the URL's order, as target_session_attrs=read-write
        // picks it for the writers.
        let reached = hosts
            .iter()
            .zip(&answers)
            .find(|(_, h)| **h == HostHealth::Writable)
            .map(|((name, _), _)| name.clone());
        let ok = reached.is_some();
        if reached != last {
            match &reached {
                Some(host) => tracing::info!(host = %host, "postgres primary reached; ready"),
                None => {
                    let why: Vec<String> = hosts
                        .iter()
                        .zip(&answers)
                        .map(|((name, _), h)| match h {
                            HostHealth::Writable => format!("{name}: writable"),
                            HostHealth::ReadOnly => format!("{name}: read-only"),
                            HostHealth::Down(e) => format!("{name}: {e}"),
                        })
                        .collect();
                    tracing::warn!(
                        "no writable postgres reachable; not ready, holding acks ({})",
                        why.join("; ")
                    )
                }
            }
            metrics.set_postgres_primary(reached.as_deref());
            *primary.lock().expect("not poisoned") = reached.clone();
            last = reached;
        }
        ready.store(ok, Ordering::Relaxed);
        metrics.postgres_up.set(ok as i64);
    }
}
