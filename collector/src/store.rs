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

use crate::domain::{AgentHello, Batch, BufferState, Rejected, ResultRow};
use crate::metrics::Metrics;
use crate::pgcopy;
use crate::pgtls::Target;

/// Rows per writer transaction at most.
const MAX_ROWS: usize = 50_000;
/// Jobs waiting for a writer at most (the backpressure bound).
const QUEUE: usize = 256;
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

/// What a database error means for the data that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying as it is: the connection, serialization, deadlock, locks, shutdown,
    /// resources, and the schema (an operator fixes it; the data waits).
    Transient,
    /// SQLSTATE class 22 (data exception) or 23 (integrity constraint): the same data
    /// fails the same way every time.
    Permanent,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

pub fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    match e.code().map(SqlState::code) {
        Some(code) if code.starts_with("22") || code.starts_with("23") => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// SQLSTATE 25006 (read_only_sql_transaction): the server is, or has become, a standby.
pub fn is_read_only(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// The error with its SQLSTATE, message, detail and where, or the chain of causes of a
/// connection error. `tokio_postgres::Error` alone displays as the bare "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("SQLSTATE {}: {}", db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        match (db.table(), db.column()) {
            (Some(t), Some(c)) => text.push_str(&format!(" [{t}.{c}]")),
            (Some(t), None) => text.push_str(&format!(" [{t}]")),
            _ => {}
        }
        return text;
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
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
    /// Starts `writers` writer tasks and a health checker against `target`.
    pub fn start(
        target: &Target,
        writers: usize,
        site_label: String,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Store {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let ready = Arc::new(AtomicBool::new(false));
        let primary = Arc::new(std::sync::Mutex::new(None));
        let writing = target.with_statement_timeout(WRITE_STATEMENT_TIMEOUT);
        for id in 0..writers {
            let writer = Writer {
                id,
                target: writing.clone(),
                jobs: rx.clone(),
                metrics: metrics.clone(),
                site_label: site_label.clone(),
                stale: AtomicBool::new(false),
            };
            tokio::spawn(writer.run(shutdown.clone()));
        }
        tokio::spawn(health(
            target.clone(),
            ready.clone(),
            primary.clone(),
            metrics,
            shutdown,
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

/// Connects to the target with its TLS settings (`pgtls`); the connection task runs until
/// the client is dropped.
pub async fn connect(target: &Target) -> Result<Client, tokio_postgres::Error> {
    target.connect().await
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
            *slot = Some(connect(target).await?);
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

struct Writer {
    id: usize,
    target: Target,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    metrics: Arc<Metrics>,
    site_label: String,
    /// Set when the server refused a write as read-only: reconnect before the next group.
    stale: AtomicBool,
}

impl Writer {
    async fn run(self, shutdown: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            let client = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = connect(&self.target) => c,
            };
            let mut client = match client {
                Ok(c) => {
                    attempt = 0;
                    c
                }
                Err(e) => {
                    let delay =
                        Duration::from_millis(200 * (1 << attempt.min(6))).min(RECONNECT_CAP);
                    attempt += 1;
                    tracing::warn!(
                        writer = self.id,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot connect to postgres: {}",
                        describe(&e)
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            loop {
                let Some(group) = (tokio::select! {
                    _ = shutdown.cancelled() => return,
                    g = self.next_group() => g,
                }) else {
                    return;
                };
                self.process(&mut client, group).await;
                // Readiness is the health check's alone: one writer's lost connection says
                // nothing about the host the URL reaches now.
                if client.is_closed() || self.stale.swap(false, Ordering::Relaxed) {
                    break;
                }
            }
        }
    }

    /// Waits for one job, then takes whatever else is queued up to `MAX_ROWS` rows.
    async fn next_group(&self) -> Option<Vec<Job>> {
        let mut rx = self.jobs.lock().await;
        let first = rx.recv().await?;
        let mut rows = job_rows(&first);
        let mut group = vec![first];
        while rows < MAX_ROWS {
            match rx.try_recv() {
                Ok(job) => {
                    rows += job_rows(&job);
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        Some(group)
    }

    /// Logs and counts a database error; returns its class.
    fn note(&self, e: &tokio_postgres::Error, what: &str) -> ErrorClass {
        let class = classify(e);
        self.metrics
            .store_errors
            .with_label_values(&[class.name()])
            .inc();
        self.metrics
            .ingest_errors
            .with_label_values(&["store"])
            .inc();
        let sqlstate = e.code().map_or("", SqlState::code);
        if is_read_only(e) {
            // The server was demoted (a failover): only a new connection, which
            // `target_session_attrs=read-write` sends to the new primary, can write again.
            self.stale.store(true, Ordering::Relaxed);
        }
        tracing::warn!(
            writer = self.id,
            sqlstate,
            class = class.name(),
            "{what} failed: {}",
            describe(e)
        );
        class
    }

    /// Runs one group; every job gets its reply.
    async fn process(&self, client: &mut Client, group: Vec<Job>) {
        let mut writes = Vec::new();
        let mut hellos = Vec::new();
        let mut heartbeats = HashMap::new();
        let mut conflicts: HashMap<String, i64> = HashMap::new();
        for job in group {
            match job {
                Job::Hello(hello, reply) => hellos.push((hello, reply)),
                // The newest heartbeat of an agent wins.
                Job::Heartbeat(agent, state) => {
                    heartbeats.insert(agent, state);
                }
                Job::Conflict(agent) => *conflicts.entry(agent).or_default() += 1,
                Job::Write(batches, reply) => writes.push((batches, reply)),
            }
        }
        // One statement for all the hellos and one for all the heartbeats of the group:
        // a fleet reconnecting at once costs a few round trips, not one per agent.
        if !hellos.is_empty() {
            self.hellos(client, hellos).await;
        }
        if !heartbeats.is_empty() {
            if let Err(e) = heartbeat_agents(client, &heartbeats).await {
                self.note(&e, "heartbeat bookkeeping");
            }
        }
        if !conflicts.is_empty() {
            if let Err(e) = count_conflicts(client, &conflicts).await {
                self.note(&e, "identity conflict bookkeeping");
            }
        }
        if !writes.is_empty() {
            self.writes(client, writes).await;
        }
    }

    async fn hellos(&self, client: &Client, hellos: Vec<(AgentHello, Reply<i64>)>) {
        let all: Vec<&AgentHello> = hellos.iter().map(|(h, _)| h).collect();
        let e = match hello_agents(client, &all, true).await {
            Ok(committed) => {
                for (hello, reply) in hellos {
                    let _ = reply.send(committed_of(&committed, &hello));
                }
                return;
            }
            Err(e) => e,
        };
        let alone = hellos.len() == 1;
        if self.note(&e, "agent bookkeeping (hello)") == ErrorClass::Transient || client.is_closed()
        {
            for (_, reply) in hellos {
                let _ = reply.send(Err(StoreError::of(&e)));
            }
            return;
        }
        // Permanent: one hello's data. Each alone, then without the labels that fail.
        for (hello, reply) in hellos {
            let _ = reply.send(self.hello_alone(client, &hello, alone).await);
        }
    }

    async fn hello_alone(
        &self,
        client: &Client,
        hello: &AgentHello,
        tried_alone: bool,
    ) -> Result<i64, StoreError> {
        if !tried_alone {
            match hello_agents(client, &[hello], true).await {
                Ok(committed) => return committed_of(&committed, hello),
                Err(e) => {
                    if self.note(&e, "agent bookkeeping (hello)") == ErrorClass::Transient {
                        return Err(StoreError::of(&e));
                    }
                }
            }
        }
        tracing::warn!(
            writer = self.id,
            agent_id = %hello.agent_id,
            "the agent's labels cannot be stored; registering it without labels (its results carry them and land or are quarantined with the reason)"
        );
        match hello_agents(client, &[hello], false).await {
            Ok(committed) => committed_of(&committed, hello),
            Err(e) => {
                self.note(&e, "agent bookkeeping (hello without labels)");
                Err(StoreError::of(&e))
            }
        }
    }

    async fn writes(&self, client: &mut Client, writes: Vec<(Vec<Arc<Batch>>, Reply<Written>)>) {
        let start = Instant::now();
        let all: Vec<&Batch> = writes
            .iter()
            .flat_map(|(job, _)| job.iter().map(|b| &**b))
            .collect();
        let e = match write_group(client, &all, false).await {
            Ok(outcomes) => {
                self.committed(start, writes, outcomes);
                return;
            }
            Err(e) => e,
        };
        let alone = writes.len() == 1;
        if self.note(&e, "write") == ErrorClass::Transient || client.is_closed() {
            for (_, reply) in writes {
                let _ = reply.send(Err(StoreError::of(&e)));
            }
            return;
        }
        // Permanent: some rows of some job. The others must not wait for it.
        for (job, reply) in writes {
            let start = Instant::now();
            let batches: Vec<&Batch> = job.iter().map(|b| &**b).collect();
            match self.write_alone(client, &batches, alone).await {
                Ok(outcomes) => self.committed(start, vec![(job, reply)], outcomes),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    /// One job in its own transaction; on a permanent error, again with the offending
    /// rows isolated.
    async fn write_alone(
        &self,
        client: &mut Client,
        batches: &[&Batch],
        tried_alone: bool,
    ) -> Result<Vec<Outcome>, StoreError> {
        if !tried_alone {
            match write_group(client, batches, false).await {
                Ok(outcomes) => return Ok(outcomes),
                Err(e) => {
                    if self.note(&e, "write") == ErrorClass::Transient || client.is_closed() {
                        return Err(StoreError::of(&e));
                    }
                }
            }
        }
        let outcomes = match write_group(client, batches, true).await {
            Ok(o) => o,
            Err(e) => {
                self.note(&e, "write with the offending rows isolated");
                return Err(StoreError::of(&e));
            }
        };
        let refused: usize = outcomes.iter().map(|o| o.refused.len()).sum();
        if refused > 0 {
            self.metrics
                .store_errors
                .with_label_values(&[ErrorClass::Permanent.name()])
                .inc_by(refused as u64);
            let (seq, reason) = outcomes
                .iter()
                .find_map(|o| o.refused.first())
                .expect("refused > 0");
            tracing::warn!(
                writer = self.id,
                agent_id = %batches[0].agent_id,
                refused,
                first_seq = seq,
                "postgres refused results; quarantined in rejected_results, the rest committed: {reason}"
            );
        }
        Ok(outcomes)
    }

    /// Replies to the jobs of a committed transaction and counts what it did.
    fn committed(
        &self,
        start: Instant,
        writes: Vec<(Vec<Arc<Batch>>, Reply<Written>)>,
        outcomes: Vec<Outcome>,
    ) {
        self.metrics
            .commit_seconds
            .observe(start.elapsed().as_secs_f64());
        self.metrics.ingest_transactions.inc();
        let mut rows = 0;
        let mut outcomes = outcomes.into_iter();
        for (job, reply) in writes {
            let mut total = Written::default();
            for (batch, outcome) in job.iter().zip(outcomes.by_ref()) {
                rows += outcome.inserted;
                self.count(batch, &outcome);
                total.committed_seq = outcome.committed_seq;
                total.inserted += outcome.inserted;
                total.duplicates += outcome.duplicates;
                total.quarantined += outcome.quarantined;
                total.refused.extend(outcome.refused);
            }
            let _ = reply.send(Ok(total));
        }
        self.metrics.rows_per_transaction.observe(rows as f64);
    }

    fn count(&self, batch: &Batch, outcome: &Outcome) {
        let m = &self.metrics;
        m.ingest_results
            .with_label_values(&["committed"])
            .inc_by(outcome.inserted);
        m.ingest_results
            .with_label_values(&["duplicate"])
            .inc_by(outcome.duplicates);
        m.ingest_results
            .with_label_values(&["rejected"])
            .inc_by(outcome.quarantined);
        m.ingest_batches.inc();
        // Aggregates over what is new in this batch: the rows above the old watermark,
        // less the ones PostgreSQL refused or already held.
        let new = batch.rows[outcome.fresh_from..]
            .iter()
            .filter(|r| !outcome.skipped.contains(&r.seq));
        m.observe_results(new, &self.site_label);
    }
}

fn job_rows(job: &Job) -> usize {
    match job {
        Job::Write(batches, _) => batches.iter().map(|b| b.len()).sum(),
        _ => 1,
    }
}

fn committed_of(
    committed: &HashMap<(String, String), i64>,
    hello: &AgentHello,
) -> Result<i64, StoreError> {
    committed
        .get(&(hello.agent_id.clone(), hello.incarnation.clone()))
        .copied()
        // Another incarnation of the agent said hello in the same group and won.
        .ok_or_else(|| StoreError::Postgres("superseded by another hello of the agent".into()))
}

/// Registers or updates agents and their incarnations; returns each incarnation's
/// committed seq. `with_labels: false` stores '{}' for the labels.
async fn hello_agents(
    client: &Client,
    hellos: &[&AgentHello],
    with_labels: bool,
) -> Result<HashMap<(String, String), i64>, tokio_postgres::Error> {
    // One row per agent: a statement cannot upsert the same row twice.
    let mut latest: BTreeMap<&str, &AgentHello> = BTreeMap::new();
    for h in hellos {
        latest.insert(&h.agent_id, h);
    }
    let ids: Vec<&str> = latest.keys().copied().collect();
    let incarnations: Vec<&str> = latest.values().map(|h| h.incarnation.as_str()).collect();
    let labels: Vec<serde_json::Value> = latest
        .values()
        .map(|h| match with_labels {
            true => labels_json(&h.labels),
            false => serde_json::Value::Object(Default::default()),
        })
        .collect();
    let versions: Vec<&str> = latest.values().map(|h| h.version.as_str()).collect();
    // Arrays of arrays of different lengths do not unnest: each list travels as JSON.
    let features: Vec<serde_json::Value> = latest
        .values()
        .map(|h| serde_json::json!(h.features))
        .collect();
    let local_tests: Vec<serde_json::Value> = latest
        .values()
        .map(|h| serde_json::json!(h.local_tests))
        .collect();
    // The incarnation first (its row lock orders this statement after a writer holding
    // it, so the committed seq read is the committed one), then the agent's row, which
    // follows its latest incarnation.
    let rows = client
        .query(
            "WITH v AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::text[],
                                      $5::jsonb[], $6::jsonb[])
                     AS v(agent_id, incarnation, labels, version, features, local_tests)
             ), inc AS (
                 INSERT INTO agent_incarnations (agent_id, incarnation)
                 SELECT agent_id, incarnation FROM v ORDER BY agent_id
                 ON CONFLICT (agent_id, incarnation) DO UPDATE SET last_seen = now()
                 RETURNING agent_id, incarnation, committed_seq
             ), agent AS (
                 INSERT INTO agents (agent_id, labels, version, incarnation, committed_seq,
                                     features, local_tests)
                 SELECT v.agent_id, v.labels, v.version, v.incarnation, inc.committed_seq,
                        ARRAY(SELECT jsonb_array_elements_text(v.features)),
                        ARRAY(SELECT jsonb_array_elements_text(v.local_tests))
                   FROM v JOIN inc USING (agent_id, incarnation)
                 ON CONFLICT (agent_id) DO UPDATE
                    SET labels = EXCLUDED.labels, version = EXCLUDED.version,
                        features = EXCLUDED.features, local_tests = EXCLUDED.local_tests,
                        incarnation = EXCLUDED.incarnation,
                        committed_seq = EXCLUDED.committed_seq, last_seen = now()
             )
             SELECT agent_id, incarnation, committed_seq FROM inc",
            &[
                &ids,
                &incarnations,
                &labels,
                &versions,
                &features,
                &local_tests,
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

async fn heartbeat_agents(
    client: &Client,
    beats: &HashMap<String, BufferState>,
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = beats.keys().map(String::as_str).collect();
    let backlog: Vec<i64> = beats.values().map(|s| s.backlog).collect();
    let dropped: Vec<i64> = beats.values().map(|s| s.dropped).collect();
    let oldest: Vec<Option<SystemTime>> = beats.values().map(|s| s.oldest).collect();
    client
        .execute(
            "UPDATE agents SET backlog = v.backlog, dropped = v.dropped,
                    oldest_buffered_at = v.oldest, last_seen = now()
               FROM unnest($1::text[], $2::int8[], $3::int8[], $4::timestamptz[])
                    AS v(agent_id, backlog, dropped, oldest)
              WHERE agents.agent_id = v.agent_id",
            &[&ids, &backlog, &dropped, &oldest],
        )
        .await?;
    Ok(())
}

async fn count_conflicts(
    client: &Client,
    conflicts: &HashMap<String, i64>,
) -> Result<(), tokio_postgres::Error> {
    let (ids, counts): (Vec<&str>, Vec<i64>) =
        conflicts.iter().map(|(a, n)| (a.as_str(), *n)).unzip();
    client
        .execute(
            "UPDATE agents SET identity_conflicts = identity_conflicts + v.n
               FROM unnest($1::text[], $2::int8[]) AS v(agent_id, n)
              WHERE agents.agent_id = v.agent_id",
            &[&ids, &counts],
        )
        .await?;
    Ok(())
}

fn labels_json(labels: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// What one batch of a committed transaction did.
#[derive(Debug, Default)]
struct Outcome {
    committed_seq: i64,
    /// Index of the first row of the batch above the old watermark.
    fresh_from: usize,
    inserted: u64,
    duplicates: u64,
    quarantined: u64,
    refused: Vec<(i64, String)>,
    /// Seqs above the old watermark that were not inserted (refused or already stored).
    skipped: HashSet<i64>,
}

type Key = (String, String);

fn key(b: &Batch) -> Key {
    (b.agent_id.clone(), b.incarnation.to_string())
}

/// One transaction for several batches (of one or more agents). Returns one `Outcome`
/// per batch, in order. With `isolate`, rows PostgreSQL refuses are found and quarantined
/// instead of failing the transaction (slower: savepoints and one COPY per row range).
async fn write_group(
    client: &mut Client,
    batches: &[&Batch],
    isolate: bool,
) -> Result<Vec<Outcome>, tokio_postgres::Error> {
    let mut keys: Vec<Key> = batches.iter().map(|b| key(b)).collect();
    keys.sort_unstable();
    keys.dedup();

    let tx = client.transaction().await?;
    let mut committed = lock_incarnations(&tx, &keys).await?;
    if committed.len() < keys.len() {
        // Watermark rows removed by an operator since hello: recreate them at 0.
        recreate_incarnations(&tx, &keys).await?;
        committed = lock_incarnations(&tx, &keys).await?;
    }
    let before = committed.clone();

    let mut outcomes = Vec::with_capacity(batches.len());
    let mut fresh: Vec<(usize, &ResultRow)> = Vec::new();
    // (index of the batch, result) to quarantine.
    let mut quarantine: Vec<(usize, Cow<Rejected>)> = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let watermark = committed.get_mut(&key(b)).expect("locked above");
        let fresh_from = b.rows.partition_point(|r| r.seq <= *watermark);
        fresh.extend(b.rows[fresh_from..].iter().map(|r| (i, r)));
        let before_quarantine = quarantine.len();
        quarantine.extend(
            b.rejected
                .iter()
                .filter(|q| q.seq > *watermark)
                .map(|q| (i, Cow::Borrowed(q))),
        );
        let quarantined = quarantine.len() - before_quarantine;
        *watermark = (*watermark).max(b.last_seq);
        outcomes.push(Outcome {
            committed_seq: *watermark,
            fresh_from,
            inserted: (b.rows.len() - fresh_from) as u64,
            duplicates: (fresh_from + b.rejected.len() - quarantined) as u64,
            quarantined: quarantined as u64,
            ..Default::default()
        });
    }

    if isolate {
        let rows: Vec<&ResultRow> = fresh.iter().map(|(_, r)| *r).collect();
        let stored = stored_rows(&tx, &rows).await?;
        let candidates: Vec<usize> = (0..rows.len()).filter(|i| !stored.contains(i)).collect();
        let refused = copy_isolating(&tx, &rows, &candidates).await?;
        for i in stored {
            let (b, r) = fresh[i];
            let o = &mut outcomes[b];
            o.inserted -= 1;
            o.duplicates += 1;
            o.skipped.insert(r.seq);
        }
        for (i, sqlstate, message) in refused {
            let (b, r) = fresh[i];
            let o = &mut outcomes[b];
            o.inserted -= 1;
            o.skipped.insert(r.seq);
            if sqlstate == SqlState::UNIQUE_VIOLATION.code() {
                o.duplicates += 1;
                continue;
            }
            let q = Rejected::of_row(r, &sqlstate, &message);
            o.quarantined += 1;
            o.refused.push((r.seq, q.reason.clone()));
            quarantine.push((b, Cow::Owned(q)));
        }
        let inserted = quarantine_guarded(&tx, batches, &quarantine).await?;
        already_quarantined(&mut outcomes, &quarantine, &inserted);
    } else {
        if !quarantine.is_empty() {
            let inserted = insert_quarantine(&tx, batches, &quarantine, false).await?;
            already_quarantined(&mut outcomes, &quarantine, &inserted);
        }
        if !fresh.is_empty() {
            copy_rows(&tx, fresh.iter().map(|(_, r)| *r)).await?;
        }
    }

    let mut quarantined: HashMap<Key, i64> = HashMap::new();
    for (b, o) in batches.iter().zip(&outcomes) {
        *quarantined.entry(key(b)).or_default() += o.quarantined as i64;
    }
    let moved: Vec<(&Key, i64, i64)> = committed
        .iter()
        .map(|(k, seq)| (k, *seq, quarantined.get(k).copied().unwrap_or(0)))
        .filter(|(k, seq, q)| *q > 0 || before.get(*k).is_some_and(|b| b < seq))
        .collect();
    if !moved.is_empty() {
        raise_watermarks(&tx, &moved).await?;
    }
    // COMMIT runs without the writers' statement_timeout: a cancelled wait for the
    // synchronous standby still commits (with a warning) and would be acknowledged.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.commit().await?;
    Ok(outcomes)
}

async fn lock_incarnations(
    tx: &Transaction<'_>,
    keys: &[Key],
) -> Result<HashMap<Key, i64>, tokio_postgres::Error> {
    let (ids, incarnations): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(a, i)| (a.as_str(), i.as_str())).unzip();
    Ok(tx
        .query(
            "SELECT agent_id, incarnation, committed_seq FROM agent_incarnations
              WHERE (agent_id, incarnation) IN (SELECT * FROM unnest($1::text[], $2::text[]))
              ORDER BY agent_id, incarnation FOR UPDATE",
            &[&ids, &incarnations],
        )
        .await?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

async fn recreate_incarnations(
    tx: &Transaction<'_>,
    keys: &[Key],
) -> Result<(), tokio_postgres::Error> {
    let (ids, incarnations): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(a, i)| (a.as_str(), i.as_str())).unzip();
    tx.execute(
        "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[]) AS v(agent_id, incarnation)),
         agent AS (
             INSERT INTO agents (agent_id, incarnation)
             SELECT DISTINCT ON (agent_id) agent_id, incarnation FROM v
             ON CONFLICT DO NOTHING
         )
         INSERT INTO agent_incarnations (agent_id, incarnation)
         SELECT agent_id, incarnation FROM v ON CONFLICT DO NOTHING",
        &[&ids, &incarnations],
    )
    .await?;
    Ok(())
}

/// Raises the watermarks of (key, seq, quarantined): the incarnation's, and the agent's
/// when it is the agent's latest incarnation; adds the quarantined to `agents.rejected`.
async fn raise_watermarks(
    tx: &Transaction<'_>,
    moved: &[(&Key, i64, i64)],
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = moved.iter().map(|(k, _, _)| k.0.as_str()).collect();
    let incarnations: Vec<&str> = moved.iter().map(|(k, _, _)| k.1.as_str()).collect();
    let seqs: Vec<i64> = moved.iter().map(|m| m.1).collect();
    let rejected: Vec<i64> = moved.iter().map(|m| m.2).collect();
    tx.execute(
        "WITH v AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])
                 AS v(agent_id, incarnation, seq, rejected)
         ), inc AS (
             UPDATE agent_incarnations i SET committed_seq = v.seq, last_seen = now()
               FROM v
              WHERE i.agent_id = v.agent_id AND i.incarnation = v.incarnation
                AND i.committed_seq < v.seq
         )
         UPDATE agents a
            SET committed_seq = greatest(a.committed_seq, coalesce(
                    (SELECT max(v.seq) FROM v
                      WHERE v.agent_id = a.agent_id AND v.incarnation = a.incarnation),
                    a.committed_seq)),
                rejected = a.rejected
                    + (SELECT sum(v.rejected) FROM v WHERE v.agent_id = a.agent_id)::int8,
                last_seen = now()
          WHERE a.agent_id IN (SELECT agent_id FROM v)",
        &[&ids, &incarnations, &seqs, &rejected],
    )
    .await?;
    Ok(())
}

/// COPYs rows in one stream.
async fn copy_rows<'a>(
    tx: &Transaction<'_>,
    rows: impl Iterator<Item = &'a ResultRow>,
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in::<_, Bytes>(pgcopy::COPY_SQL).await?;
    pin_mut!(sink);
    let mut encoder = pgcopy::Encoder::new();
    for r in rows {
        if let Some(chunk) = encoder.row(r) {
            sink.send(chunk).await?;
        }
    }
    sink.send(encoder.finish()).await?;
    sink.finish().await?;
    Ok(())
}

fn permanent(e: &tokio_postgres::Error) -> Option<(String, String)> {
    match classify(e) {
        ErrorClass::Permanent => e
            .as_db_error()
            .map(|db| (db.code().code().to_string(), db.message().to_string())),
        ErrorClass::Transient => None,
    }
}

/// COPYs `rows[i]` for each i of `candidates` (in order), each range under a savepoint;
/// a range PostgreSQL refuses for its data is rolled back and halved until the offending
/// rows are alone. Returns them as (index, SQLSTATE, message); the others are written.
async fn copy_isolating(
    tx: &Transaction<'_>,
    rows: &[&ResultRow],
    candidates: &[usize],
) -> Result<Vec<(usize, String, String)>, tokio_postgres::Error> {
    let mut refused = Vec::new();
    let mut ranges = vec![candidates];
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        tx.batch_execute("SAVEPOINT edgeprobe_rows").await?;
        match copy_rows(tx, range.iter().map(|&i| rows[i])).await {
            Ok(()) => tx.batch_execute("RELEASE SAVEPOINT edgeprobe_rows").await?,
            Err(e) => {
                let Some((sqlstate, message)) = permanent(&e) else {
                    return Err(e);
                };
                tx.batch_execute(
                    "ROLLBACK TO SAVEPOINT edgeprobe_rows; RELEASE SAVEPOINT edgeprobe_rows",
                )
                .await?;
                if let [i] = range {
                    refused.push((*i, sqlstate, message));
                } else {
                    // The first half is written first: rows go in in seq order.
                    let (first, second) = range.split_at(range.len() / 2);
                    ranges.push(second);
                    ranges.push(first);
                }
            }
        }
    }
    Ok(refused)
}

/// Indexes of `rows` whose primary key (agent, test, start, seq) is already stored: a
/// redelivery after the watermark row went missing. Unknown (none) when the lookup itself
/// fails for the data (e.g. a name the database's encoding cannot hold).
async fn stored_rows(
    tx: &Transaction<'_>,
    rows: &[&ResultRow],
) -> Result<HashSet<usize>, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.agent_id.as_str()).collect();
    let tests: Vec<&str> = rows.iter().map(|r| r.test.as_str()).collect();
    let starts: Vec<SystemTime> = rows.iter().map(|r| r.started_at).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    tx.batch_execute("SAVEPOINT edgeprobe_lookup").await?;
    let found = tx
        .query(
            "SELECT v.i FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[])
                     WITH ORDINALITY AS v(agent_id, test, started_at, seq, i)
              WHERE EXISTS (SELECT 1 FROM results r
                             WHERE r.agent_id = v.agent_id AND r.test = v.test
                               AND r.started_at = v.started_at AND r.seq = v.seq)",
            &[&ids, &tests, &starts, &seqs],
        )
        .await;
    match found {
        Ok(found) => {
            tx.batch_execute("RELEASE SAVEPOINT edgeprobe_lookup")
                .await?;
            Ok(found
                .iter()
                .map(|r| r.get::<_, i64>(0) as usize - 1)
                .collect())
        }
        Err(e) if permanent(&e).is_some() => {
            tx.batch_execute(
                "ROLLBACK TO SAVEPOINT edgeprobe_lookup; RELEASE SAVEPOINT edgeprobe_lookup",
            )
            .await?;
            Ok(HashSet::new())
        }
        Err(e) => Err(e),
    }
}

/// Counts the results that were in the quarantine already (a redelivery after the
/// watermark went missing) as duplicates.
fn already_quarantined(
    outcomes: &mut [Outcome],
    items: &[(usize, Cow<'_, Rejected>)],
    inserted: &HashSet<(usize, i64)>,
) {
    for (b, q) in items {
        if !inserted.contains(&(*b, q.seq)) {
            outcomes[*b].quarantined -= 1;
            outcomes[*b].duplicates += 1;
        }
    }
}

/// Quarantines results of `batches` (by index); one already there (a redelivery) stays as
/// it was. Returns the (batch index, seq) inserted. `ascii` escapes non-ASCII in the
/// reasons, for a database whose encoding cannot hold them.
async fn insert_quarantine(
    tx: &Transaction<'_>,
    batches: &[&Batch],
    items: &[(usize, Cow<'_, Rejected>)],
    ascii: bool,
) -> Result<HashSet<(usize, i64)>, tokio_postgres::Error> {
    let ids: Vec<&str> = items
        .iter()
        .map(|(b, _)| batches[*b].agent_id.as_str())
        .collect();
    let incarnations: Vec<&str> = items
        .iter()
        .map(|(b, _)| &*batches[*b].incarnation)
        .collect();
    let seqs: Vec<i64> = items.iter().map(|(_, q)| q.seq).collect();
    let reasons: Vec<Cow<str>> = items
        .iter()
        .map(|(_, q)| match ascii {
            true => Cow::Owned(escape_non_ascii(&q.reason)),
            false => Cow::Borrowed(q.reason.as_str()),
        })
        .collect();
    let reasons: Vec<&str> = reasons.iter().map(|r| r.as_ref()).collect();
    let sqlstates: Vec<Option<&str>> = items.iter().map(|(_, q)| q.sqlstate.as_deref()).collect();
    let raws: Vec<&[u8]> = items.iter().map(|(_, q)| q.raw.as_slice()).collect();
    let formats: Vec<&str> = items.iter().map(|(_, q)| q.raw_format.name()).collect();
    let truncated: Vec<bool> = items.iter().map(|(_, q)| q.raw_truncated).collect();
    let inserted = tx
        .query(
            "INSERT INTO rejected_results
                 (agent_id, incarnation, seq, reason, sqlstate, raw, raw_format, raw_truncated)
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[],
                                  $6::bytea[], $7::text[], $8::bool[])
             ON CONFLICT DO NOTHING
             RETURNING agent_id, incarnation, seq",
            &[
                &ids,
                &incarnations,
                &seqs,
                &reasons,
                &sqlstates,
                &raws,
                &formats,
                &truncated,
            ],
        )
        .await?;
    let inserted: HashSet<(String, String, i64)> = inserted
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(items
        .iter()
        .map(|(b, q)| (*b, q.seq))
        .filter(|(b, seq)| {
            let b = batches[*b];
            inserted.contains(&(b.agent_id.clone(), b.incarnation.to_string(), *seq))
        })
        .collect())
}

/// `insert_quarantine` that survives reasons the database cannot encode: they are
/// stored again with non-ASCII escaped.
async fn quarantine_guarded(
    tx: &Transaction<'_>,
    batches: &[&Batch],
    items: &[(usize, Cow<'_, Rejected>)],
) -> Result<HashSet<(usize, i64)>, tokio_postgres::Error> {
    if items.is_empty() {
        return Ok(HashSet::new());
    }
    tx.batch_execute("SAVEPOINT edgeprobe_quarantine").await?;
    match insert_quarantine(tx, batches, items, false).await {
        Ok(inserted) => {
            tx.batch_execute("RELEASE SAVEPOINT edgeprobe_quarantine")
                .await?;
            Ok(inserted)
        }
        Err(e) if permanent(&e).is_some() => {
            tx.batch_execute(
                "ROLLBACK TO SAVEPOINT edgeprobe_quarantine; RELEASE SAVEPOINT edgeprobe_quarantine",
            )
            .await?;
            insert_quarantine(tx, batches, items, true).await
        }
        Err(e) => Err(e),
    }
}

fn escape_non_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.extend(c.escape_unicode());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_escape_to_ascii() {
        assert_eq!(
            escape_non_ascii("label `東京` ok"),
            "label `\\u{6771}\\u{4eac}` ok"
        );
        assert_eq!(escape_non_ascii("plain"), "plain");
    }
}
