//! The PostgreSQL store: a small pool of writer tasks, each owning one connection, fed by
//! one bounded job queue shared by all agent streams.
//!
//! Invariants:
//! - Exactly-once: a writer transaction locks the rows of the agents it writes
//!   (`SELECT … FOR UPDATE`, in agent-id order so writers never deadlock), keeps only
//!   results with seq above the agent's `committed_seq`, COPYs them, raises
//!   `committed_seq` and commits. A result delivered twice, to this or another collector,
//!   lands once. Each stream has at most one batch in the store at a time, so a batch is
//!   never committed before the batch that precedes it.
//! - A job's reply is sent only after its transaction committed; the ack follows it.
//! - Backpressure: the queue is bounded; when Postgres is slow or down, writers stop
//!   taking jobs, streams stop reading, agents keep buffering on disk.
//! - Writers group jobs from many streams into one transaction (up to `MAX_ROWS` rows).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{pin_mut, SinkExt};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::domain::{AgentHello, BufferState, ResultRow};
use crate::metrics::Metrics;
use crate::pgcopy;

/// Rows per writer transaction at most.
const MAX_ROWS: usize = 50_000;
/// Jobs waiting for a writer at most (the backpressure bound).
const QUEUE: usize = 256;
const RECONNECT_CAP: Duration = Duration::from_secs(10);
const HEALTH_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("the store is shutting down")]
    Closed,
}

/// What a committed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The agent's committed seq after the transaction.
    pub committed_seq: i64,
    pub inserted: u64,
    pub duplicates: u64,
}

enum Job {
    Hello(AgentHello, oneshot::Sender<Result<i64, StoreError>>),
    /// Consecutive batches of one agent, in seq order, written in one transaction.
    Write(
        Vec<Arc<Vec<ResultRow>>>,
        oneshot::Sender<Result<Written, StoreError>>,
    ),
    Heartbeat(String, BufferState),
}

/// Handle used by the ingest streams; cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    ready: Arc<AtomicBool>,
}

impl Store {
    /// Starts `writers` writer tasks and a health checker against `url`.
    pub fn start(
        url: &str,
        writers: usize,
        site_label: String,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Store {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let ready = Arc::new(AtomicBool::new(false));
        for id in 0..writers {
            let writer = Writer {
                id,
                url: url.to_string(),
                jobs: rx.clone(),
                metrics: metrics.clone(),
                ready: ready.clone(),
                site_label: site_label.clone(),
            };
            tokio::spawn(writer.run(shutdown.clone()));
        }
        tokio::spawn(health(url.to_string(), ready.clone(), metrics, shutdown));
        Store { jobs: tx, ready }
    }

    /// True while Postgres answers.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Registers (or updates) an agent; returns its committed seq.
    pub async fn hello(&self, hello: AgentHello) -> Result<i64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Hello(hello, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes consecutive batches of one agent (in seq order); returns after commit.
    pub async fn write(&self, rows: Vec<Arc<Vec<ResultRow>>>) -> Result<Written, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Write(rows, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records buffer state; dropped when the queue is full (the next heartbeat repeats it).
    pub fn heartbeat(&self, agent_id: String, state: BufferState) {
        let _ = self.jobs.try_send(Job::Heartbeat(agent_id, state));
    }
}

/// Connects with the URL; the connection task runs until the client is dropped.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("postgres connection ended: {e}");
        }
    });
    Ok(client)
}

async fn health(
    url: String,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut client: Option<Client> = None;
    let mut ticks = tokio::time::interval(HEALTH_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tokio::time::timeout(HEALTH_EVERY, connect(&url))
                .await
                .ok()
                .and_then(|r| r.ok());
        }
        let ok = match &client {
            Some(c) => matches!(
                tokio::time::timeout(HEALTH_EVERY, c.simple_query("SELECT 1")).await,
                Ok(Ok(_))
            ),
            None => false,
        };
        if !ok {
            client = None;
        }
        if ready.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("postgres is reachable; ready");
            } else {
                tracing::warn!("postgres is unreachable; not ready, holding acks");
            }
        }
        metrics.postgres_up.set(ok as i64);
    }
}

struct Writer {
    id: usize,
    url: String,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    site_label: String,
}

impl Writer {
    async fn run(self, shutdown: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            let client = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = connect(&self.url) => c,
            };
            let mut client = match client {
                Ok(c) => {
                    attempt = 0;
                    c
                }
                Err(e) => {
                    self.ready.store(false, Ordering::Relaxed);
                    let delay =
                        Duration::from_millis(200 * (1 << attempt.min(6))).min(RECONNECT_CAP);
                    attempt += 1;
                    tracing::warn!(
                        writer = self.id,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot connect to postgres: {e}"
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
                if let Err(e) = self.process(&mut client, group).await {
                    self.metrics
                        .ingest_errors
                        .with_label_values(&["store"])
                        .inc();
                    tracing::warn!(writer = self.id, "write failed: {e}");
                    if client.is_closed() {
                        self.ready.store(false, Ordering::Relaxed);
                        break;
                    }
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

    /// Runs one group; every job gets its reply. Returns the first error for logging.
    async fn process(&self, client: &mut Client, group: Vec<Job>) -> Result<(), StoreError> {
        let mut writes = Vec::new();
        let mut hellos = Vec::new();
        let mut heartbeats = HashMap::new();
        let mut first_error = None;
        for job in group {
            match job {
                Job::Hello(hello, reply) => hellos.push((hello, reply)),
                // The newest heartbeat of an agent wins.
                Job::Heartbeat(agent, state) => {
                    heartbeats.insert(agent, state);
                }
                Job::Write(rows, reply) => writes.push((rows, reply)),
            }
        }
        // One statement for all the hellos and one for all the heartbeats of the group:
        // a fleet reconnecting at once costs a few round trips, not one per agent.
        if !hellos.is_empty() {
            let agents: Vec<&AgentHello> = hellos.iter().map(|(h, _)| h).collect();
            match hello_agents(client, &agents).await {
                Ok(committed) => {
                    for (hello, reply) in hellos {
                        let seq = committed.get(&hello.agent_id).copied();
                        let _ = reply.send(seq.ok_or(StoreError::Closed));
                    }
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| e.to_string());
                    for (_, reply) in hellos {
                        let _ = reply.send(Err(StoreError::Postgres(e.to_string())));
                    }
                }
            }
        }
        if !heartbeats.is_empty() {
            if let Err(e) = heartbeat_agents(client, &heartbeats).await {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
        if !writes.is_empty() {
            let start = Instant::now();
            let batches: Vec<&[ResultRow]> = writes
                .iter()
                .flat_map(|(job, _)| job.iter().map(|b| b.as_slice()))
                .collect();
            match write_group(client, &batches).await {
                Ok(outcomes) => {
                    self.metrics
                        .commit_seconds
                        .observe(start.elapsed().as_secs_f64());
                    self.metrics.ingest_transactions.inc();
                    let mut rows = 0;
                    let mut outcomes = outcomes.into_iter();
                    for (job, reply) in writes {
                        let mut total: Option<Written> = None;
                        for (batch, written) in job.iter().zip(outcomes.by_ref()) {
                            rows += written.inserted;
                            self.count(batch, &written);
                            total = Some(match total {
                                None => written,
                                Some(t) => Written {
                                    committed_seq: written.committed_seq,
                                    inserted: t.inserted + written.inserted,
                                    duplicates: t.duplicates + written.duplicates,
                                },
                            });
                        }
                        let _ = reply.send(total.ok_or(StoreError::Closed));
                    }
                    self.metrics.rows_per_transaction.observe(rows as f64);
                }
                Err(e) => {
                    let e = StoreError::from(e);
                    for (_, reply) in writes {
                        let _ = reply.send(Err(StoreError::Postgres(e.to_string())));
                    }
                    return Err(e);
                }
            }
        }
        match first_error {
            Some(e) => {
                tracing::warn!(writer = self.id, "agent bookkeeping failed: {e}");
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn count(&self, batch: &[ResultRow], written: &Written) {
        let m = &self.metrics;
        m.ingest_results
            .with_label_values(&["committed"])
            .inc_by(written.inserted);
        m.ingest_results
            .with_label_values(&["duplicate"])
            .inc_by(written.duplicates);
        m.ingest_batches.inc();
        // Aggregates over what was new in this batch (the tail above the old watermark).
        let new = &batch[batch.len() - written.inserted as usize..];
        m.observe_results(new, &self.site_label);
    }
}

fn job_rows(job: &Job) -> usize {
    match job {
        Job::Write(batches, _) => batches.iter().map(|b| b.len()).sum(),
        _ => 1,
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(e.to_string())
    }
}

/// Registers or updates agents; returns each one's committed seq.
async fn hello_agents(
    client: &Client,
    hellos: &[&AgentHello],
) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
    // One row per agent: a statement cannot upsert the same row twice.
    let mut latest: BTreeMap<&str, &AgentHello> = BTreeMap::new();
    for h in hellos {
        latest.insert(&h.agent_id, h);
    }
    let ids: Vec<&str> = latest.keys().copied().collect();
    let labels: Vec<serde_json::Value> = latest.values().map(|h| labels_json(&h.labels)).collect();
    let versions: Vec<&str> = latest.values().map(|h| h.version.as_str()).collect();
    let rows = client
        .query(
            "INSERT INTO agents (agent_id, labels, version)
             SELECT * FROM unnest($1::text[], $2::jsonb[], $3::text[])
             ON CONFLICT (agent_id) DO UPDATE
                SET labels = EXCLUDED.labels, version = EXCLUDED.version, last_seen = now()
             RETURNING agent_id, committed_seq",
            &[&ids, &labels, &versions],
        )
        .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn heartbeat_agents(
    client: &Client,
    beats: &HashMap<String, BufferState>,
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = beats.keys().map(String::as_str).collect();
    let backlog: Vec<i64> = beats.values().map(|s| s.backlog).collect();
    let dropped: Vec<i64> = beats.values().map(|s| s.dropped).collect();
    let oldest: Vec<Option<std::time::SystemTime>> = beats.values().map(|s| s.oldest).collect();
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

fn labels_json(labels: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// One transaction for several batches (of one or more agents). Returns one `Written`
/// per batch, in order.
async fn write_group(
    client: &mut Client,
    batches: &[&[ResultRow]],
) -> Result<Vec<Written>, tokio_postgres::Error> {
    let mut ids: Vec<&str> = batches
        .iter()
        .flat_map(|b| b.first().map(|r| r.agent_id.as_str()))
        .collect();
    ids.sort_unstable();
    ids.dedup();

    let tx = client.transaction().await?;
    let mut committed: HashMap<String, i64> = lock_agents(&tx, &ids).await?;
    if committed.len() < ids.len() {
        // Agent rows removed by an operator since hello: recreate them.
        tx.execute(
            "INSERT INTO agents (agent_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            &[&ids],
        )
        .await?;
        committed = lock_agents(&tx, &ids).await?;
    }

    let mut outcomes = Vec::with_capacity(batches.len());
    let mut fresh: Vec<&ResultRow> = Vec::new();
    for batch in batches {
        let mut inserted = 0u64;
        let mut mark = 0i64;
        if let Some(first) = batch.first() {
            let watermark = committed.get_mut(&first.agent_id).expect("locked above");
            for row in batch.iter() {
                if row.seq > *watermark {
                    *watermark = row.seq;
                    fresh.push(row);
                    inserted += 1;
                }
            }
            mark = *watermark;
        }
        outcomes.push(Written {
            committed_seq: mark,
            inserted,
            duplicates: batch.len() as u64 - inserted,
        });
    }

    if !fresh.is_empty() {
        let sink = tx.copy_in::<_, Bytes>(pgcopy::COPY_SQL).await?;
        pin_mut!(sink);
        let mut encoder = pgcopy::Encoder::new();
        for r in &fresh {
            if let Some(chunk) = encoder.row(r) {
                sink.send(chunk).await?;
            }
        }
        sink.send(encoder.finish()).await?;
        sink.finish().await?;

        let (agent_ids, seqs): (Vec<&str>, Vec<i64>) =
            committed.iter().map(|(a, s)| (a.as_str(), *s)).unzip();
        tx.execute(
            "UPDATE agents SET committed_seq = v.seq, last_seen = now()
               FROM unnest($1::text[], $2::int8[]) AS v(agent_id, seq)
              WHERE agents.agent_id = v.agent_id AND agents.committed_seq < v.seq",
            &[&agent_ids, &seqs],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

async fn lock_agents(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[&str],
) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
    Ok(tx
        .query(
            "SELECT agent_id, committed_seq FROM agents WHERE agent_id = ANY($1)
              ORDER BY agent_id FOR UPDATE",
            &[&ids],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
