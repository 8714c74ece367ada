//! A writer task: one connection, jobs grouped into transactions, transient errors
//! retried with backoff and a reconnect, a group split job by job on a permanent error.

use super::agents::*;
use super::results::*;
use super::*;
use crate::backoff::Backoff;
use crate::pg::{classify, is_read_only, ErrorClass};

pub(super) struct Writer {
    pub(super) id: usize,
    pub(super) target: Target,
    pub(super) jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) site_label: String,
    /// Set when the server refused a write as read-only: reconnect before the next group.
    pub(super) stale: AtomicBool,
}

impl Writer {
    /// Until `stop`: connect (with backoff), then take groups and write them. After
    /// `stop`, the group in hand is finished (never cut inside its transaction) and the
    /// jobs still queued are written too, then the writer returns.
    pub(super) async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_CAP);
        loop {
            let client = tokio::select! {
                _ = stop.cancelled() => return,
                c = self.target.connect() => c,
            };
            let mut client = match client {
                Ok(c) => {
                    backoff.reset();
                    c
                }
                Err(e) => {
                    let delay = backoff.next();
                    tracing::warn!(
                        writer = self.id,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot connect to postgres: {}",
                        describe(&e)
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            loop {
                let group = tokio::select! {
                    _ = stop.cancelled() => self.queued_group().await,
                    g = self.next_group() => g,
                };
                let Some(group) = group else {
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

    /// After `stop`: what is queued now, without waiting for more; `None` when the queue
    /// is empty.
    async fn queued_group(&self) -> Option<Vec<Job>> {
        let mut rx = self.jobs.lock().await;
        let first = rx.try_recv().ok()?;
        Some(fill_group(&mut rx, first))
    }

    /// Waits for one job, then takes whatever else is queued up to `MAX_ROWS` rows.
    pub(super) async fn next_group(&self) -> Option<Vec<Job>> {
        let mut rx = self.jobs.lock().await;
        let first = rx.recv().await?;
        Some(fill_group(&mut rx, first))
    }

    /// Logs and counts a database error; returns its class.
    pub(super) fn note(&self, e: &tokio_postgres::Error, what: &str) -> ErrorClass {
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
    pub(super) async fn process(&self, client: &mut Client, group: Vec<Job>) {
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

    pub(super) async fn hellos(&self, client: &Client, hellos: Vec<(AgentHello, Reply<i64>)>) {
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

    pub(super) async fn hello_alone(
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

    pub(super) async fn writes(
        &self,
        client: &mut Client,
        writes: Vec<(Vec<Arc<Batch>>, Reply<Written>)>,
    ) {
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
    pub(super) async fn write_alone(
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
    pub(super) fn committed(
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

    pub(super) fn count(&self, batch: &Batch, outcome: &Outcome) {
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
        if !outcome.path_changes.is_empty() {
            let changed = batch.rows[outcome.fresh_from..]
                .iter()
                .filter(|r| outcome.path_changes.contains(&r.seq));
            m.observe_path_changes(changed, &self.site_label);
        }
    }
}

/// `first` and whatever else is queued behind it, up to `MAX_ROWS` rows.
fn fill_group(rx: &mut mpsc::Receiver<Job>, first: Job) -> Vec<Job> {
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
    group
}

pub(super) fn job_rows(job: &Job) -> usize {
    match job {
        Job::Write(batches, _) => batches.iter().map(|b| b.len()).sum(),
        _ => 1,
    }
}

pub(super) fn committed_of(
    committed: &HashMap<(String, String), i64>,
    hello: &AgentHello,
) -> Result<i64, StoreError> {
    committed
        .get(&(hello.agent_id.clone(), hello.incarnation.clone()))
        .copied()
        // Another incarnation of the agent said hello in the same group and won.
        .ok_or_else(|| StoreError::Postgres("superseded by another hello of the agent".into()))
}
