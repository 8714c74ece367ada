//! The gRPC ingest service: one long-lived stream per agent.
//!
//! hello (within `HELLO_TIMEOUT`) -> welcome(committed seq of the agent's incarnation,
//! collector clock) -> batches -> acks. Each stream has a reader (validates, hands
//! batches on through a small bounded queue) and a committer (writes one batch at a time,
//! acks after commit, retries while Postgres is away). When the queue is full the reader
//! stops reading, so HTTP/2 flow control pushes back to the agent, which keeps buffering
//! on disk.
//!
//! Invariants:
//! - One bad result never stalls a stream: a result that fails validation is quarantined
//!   with its reason, in the same transaction as the valid results of its batch, and the
//!   ack covers it and names it (`Ack.rejected`). Only a bad peer closes its stream
//!   (another agent's result, seq 0, seqs not increasing, too many results, an
//!   undecodable or oversized message), and then writes nothing of that batch.
//! - An ack names only seqs whose transaction committed.
//! - One live session per agent id (`sessions`): a second incarnation of the id is
//!   refused with FAILED_PRECONDITION naming the conflict; the same incarnation replaces
//!   its previous session, which is closed (ABORTED) and counted
//!   (`edgeprobe_agent_sessions_replaced_total`).
//! - A stream holds at most `STREAM_QUEUE` batches of the shared in-flight budget, also
//!   when its peer reads no acks: the committer reserves the ack's place in the outbound
//!   queue before it takes batches, so a full outbound queue stops only that stream's
//!   committer (never a writer), and the reader waits for a place in its own queue before
//!   it takes a share. A closed or replaced session lets go of everything at once, and a
//!   peer that reads no ack for `ACK_STALL` has its stream closed (RESOURCE_EXHAUSTED).
//! - What a message may cost decoded is bounded before it is decoded (`wire`).
//! - Shutdown: a stream's reader stops at once, its committer finishes the batches already
//!   queued (committed and acked while the peer is there) and stops retrying; every
//!   session runs on `session_tasks`, which `run` awaits before it stops the store.
//! - Controller messages (FleetTests, RunNow) join the outbound stream from the session's
//!   `Control` after the welcome and never take an ack's place: the acks' queue comes
//!   first, and the controller never waits on a session (`controller`). A message kind
//!   this collector does not know is logged and ignored.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::v1 as pb;
use futures::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::backoff::Backoff;
use crate::controller;
use crate::domain::{AgentHello, Batch, BatchRefused, BufferState};
use crate::metrics::Metrics;
use crate::sessions::{Control, ControlRx, Registration, Sessions};
use crate::store::Store;

pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that reads no ack for this long has its stream closed. An agent reads its acks
/// as they come; only a stuck or hostile one lets its receive window fill.
pub const ACK_STALL: Duration = Duration::from_secs(60);
/// Batches accepted from one stream and not yet committed, at most.
const STREAM_QUEUE: usize = 4;
/// What batches accepted from all streams and not yet committed may hold, in units
/// (`in_flight_units`): at most 262,144 results and 256 MiB of messages. With one decoded
/// batch per stream waiting for a share, memory stays within this plus one batch per
/// stream. Counted in units, not batches, so that a fleet sending small batches gets large
/// transactions: with a bound of 256 batches, 10,000 agents sending one result a second
/// were committed at most 256 at a time, and at about 15 ms a transaction on a loaded
/// 2-core host that capped the ingest near 8,500 results/s (docs/BENCHMARKS.md).
pub const MAX_IN_FLIGHT_UNITS: usize = 16_384;
/// A unit of the in-flight budget: this many results or `UNIT_BYTES` of message,
/// whichever a batch has more of; a batch takes at least one.
const UNIT_RESULTS: usize = 16;
const UNIT_BYTES: usize = 16 << 10;

/// The share of the in-flight budget a batch of `results` results in a message of `bytes`
/// takes.
fn in_flight_units(results: usize, bytes: usize) -> u32 {
    results
        .div_ceil(UNIT_RESULTS)
        .max(bytes.div_ceil(UNIT_BYTES))
        .clamp(1, MAX_IN_FLIGHT_UNITS) as u32
}
/// A committer's retry delays while PostgreSQL is away (jittered, `backoff`).
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_CAP: Duration = Duration::from_secs(5);
/// A stream logs quarantined results at most this often (the rest are counted).
const REJECTION_LOG_EVERY: Duration = Duration::from_secs(60);
/// Bytes of a rejection's reason carried in an ack at most (the quarantine keeps it all).
const MAX_ACK_REASON: usize = 200;
/// Rejections of one ack that carry their reason; the others carry only their seq. A job
/// can hold 20,000 quarantined results: with every reason the ack would pass the agent's
/// 1 MiB message limit, and an ack the agent cannot read would stall it.
const MAX_ACK_REASONS: usize = 16;

pub struct IngestService {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub in_flight: Arc<Semaphore>,
    /// A stream that has not said hello by then is closed.
    pub hello_timeout: Duration,
    /// A stream whose peer has read no ack for this long (its outbound queue stayed full)
    /// is closed, and lets go of its share of the in-flight budget.
    pub ack_stall: Duration,
    /// mTLS mode: a stream without a certificate identity is refused.
    pub require_identity: bool,
    pub sessions: Arc<Sessions>,
    pub controller: controller::Handle,
    /// Every session's task (reader and committer), so shutdown can wait for the
    /// committers also of streams whose peers left: the gRPC server's drain waits only for
    /// connections still open.
    pub session_tasks: TaskTracker,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

fn message(msg: pb::collector_message::Msg) -> pb::CollectorMessage {
    pb::CollectorMessage { msg: Some(msg) }
}

/// The client certificate's identity (set by the TLS layer), if any.
fn peer_identity<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    crate::identity::agent_id_of(leaf.as_ref())
}

/// Why the client certificate may not act as an agent: it carries the operator role.
fn operator_refusal<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    match crate::identity::operator_of(certs.first()?.as_ref()) {
        crate::identity::Operator::None => None,
        crate::identity::Operator::Named(name) => Some(format!(
            "`{name}` holds an operator certificate (for the HTTP API), which cannot act as an agent"
        )),
        crate::identity::Operator::Inconsistent(why) => {
            Some(format!("not an agent certificate: {why}"))
        }
    }
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    type StreamStream = Outbound;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let identity = peer_identity(&request);
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if let Some(why) = operator_refusal(&request) {
            self.metrics
                .ingest_errors
                .with_label_values(&["permission"])
                .inc();
            tracing::warn!(%peer, "{why}");
            return Err(Status::permission_denied(why));
        }
        let mut inbound = request.into_inner();
        if self.require_identity && identity.is_none() {
            self.metrics
                .ingest_errors
                .with_label_values(&["permission"])
                .inc();
            return Err(Status::unauthenticated(
                "the client certificate names no agent (CN or DNS SAN)",
            ));
        }
        let first = tokio::time::timeout(self.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("no hello within {:?}", self.hello_timeout))
            })?
            .map_err(|status| refused_input(&status, &self.metrics).unwrap_or(status))?;
        let hello = match first.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Hello(h)) => AgentHello::try_from(h).map_err(|e| {
                self.metrics
                    .ingest_errors
                    .with_label_values(&["validate"])
                    .inc();
                Status::invalid_argument(format!("hello: {e}"))
            })?,
            _ => {
                self.metrics
                    .ingest_errors
                    .with_label_values(&["protocol"])
                    .inc();
                return Err(Status::invalid_argument("the first message must be hello"));
            }
        };
        if let Some(id) = &identity {
            if *id != hello.agent_id {
                self.metrics
                    .ingest_errors
                    .with_label_values(&["permission"])
                    .inc();
                tracing::warn!(%peer, certificate = %id, claimed = %hello.agent_id, "hello claims another agent's id");
                return Err(Status::permission_denied(format!(
                    "certificate is for `{id}`, hello claims `{}`",
                    hello.agent_id
                )));
            }
        }
        let agent_id = hello.agent_id.clone();
        let version = hello.version.clone();
        let control = Control::channel(agent_id.clone(), hello.labels.clone(), &hello.features);
        let incarnation: Arc<str> = Arc::from(hello.incarnation.as_str());
        let registration = match self.sessions.admit(&agent_id, &incarnation, &peer) {
            Ok(r) => r,
            Err(conflict) => {
                self.metrics.identity_conflicts.inc();
                self.store.identity_conflict(agent_id.clone());
                tracing::warn!(
                    agent_id = %agent_id,
                    incarnation = %conflict.incarnation,
                    %peer,
                    live_incarnation = %conflict.live_incarnation,
                    live_peer = %conflict.live_peer,
                    "identity conflict: {conflict}"
                );
                return Err(conflict.status());
            }
        };
        if let Some(replaced) = &registration.replaced {
            self.metrics.sessions_replaced.inc();
            tracing::info!(agent_id = %agent_id, %peer, replaced_peer = %replaced, "the agent reconnected; closing its previous session");
        }
        let committed = self
            .store
            .hello(hello)
            .await
            .map_err(|e| Status::unavailable(format!("database unavailable: {e}")))?;
        tracing::info!(agent_id = %agent_id, incarnation = %incarnation, %peer, %version, committed_seq = committed, "agent connected");

        let (out_tx, out_rx) = mpsc::channel(STREAM_QUEUE + 2);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let _ = out_tx
            .send(Ok(message(pb::collector_message::Msg::Welcome(
                pb::Welcome {
                    committed_seq: committed as u64,
                    collector_unix_nanos: now,
                    features: vec![
                        edgeprobe_proto::FEATURE_FLEET_TESTS.to_string(),
                        edgeprobe_proto::FEATURE_RUN_NOW.to_string(),
                    ],
                },
            ))))
            .await;
        // Reachable by the controller from now on; then the current version, if any (a
        // version loaded meanwhile reaches it through the registry).
        registration.attach(control.control.clone());
        self.controller.session_started(&control.control);
        self.metrics.seen(&agent_id);
        let session = Session {
            agent_id,
            incarnation,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            in_flight: self.in_flight.clone(),
            registration,
            ack_stall: self.ack_stall,
            stalled: CancellationToken::new(),
            control: control.control.clone(),
            controller: self.controller.clone(),
        };
        self.session_tasks.spawn(session.run(inbound, out_tx));
        Ok(Response::new(outbound(out_rx, control)))
    }
}

/// The session's outbound stream: the welcome, acks and the closing status from `main`
/// (first, and its end ends the stream), then what the controller queued: the latest
/// FleetTests and RunNow messages.
fn outbound(
    main: mpsc::Receiver<Result<pb::CollectorMessage, Status>>,
    control: ControlRx,
) -> Outbound {
    struct State {
        main: mpsc::Receiver<Result<pb::CollectorMessage, Status>>,
        control: ControlRx,
        queue_open: bool,
    }
    let state = State {
        main,
        control,
        queue_open: true,
    };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Ok(m) = s.main.try_recv() {
                return Some((m, s));
            }
            if let Some(tests) = s.control.control.take_fleet() {
                let m = message(pb::collector_message::Msg::FleetTests(tests));
                return Some((Ok(m), s));
            }
            tokio::select! {
                biased;
                m = s.main.recv() => return m.map(|m| (m, s)),
                _ = s.control.control.fleet_pushed() => {}
                m = s.control.queue.recv(), if s.queue_open => match m {
                    Some(m) => return Some((Ok(m), s)),
                    None => s.queue_open = false,
                },
            }
        }
    }))
}

/// A read error that is the peer's input (too large, undecodable) becomes
/// INVALID_ARGUMENT with the reason; `None` for transport ends (reset, disconnect).
fn refused_input(status: &Status, metrics: &Metrics) -> Option<Status> {
    use tonic::Code;
    let what = match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => "message too large",
        Code::Internal if status.message().contains("decode") => "malformed message",
        // `wire::BoundedCodec` refused it before decoding.
        Code::InvalidArgument => {
            metrics.ingest_errors.with_label_values(&["validate"]).inc();
            return Some(status.clone());
        }
        _ => {
            tracing::debug!("stream ended: {status}");
            return None;
        }
    };
    metrics.ingest_errors.with_label_values(&["validate"]).inc();
    Some(Status::invalid_argument(format!(
        "{what}: {}",
        status.message()
    )))
}

struct Session {
    agent_id: String,
    incarnation: Arc<str>,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    in_flight: Arc<Semaphore>,
    /// Leaves the registry when the session ends.
    registration: Registration,
    ack_stall: Duration,
    /// Cancelled by the committer when the peer read no ack for `ack_stall`.
    stalled: CancellationToken,
    control: Arc<Control>,
    controller: controller::Handle,
}

/// A batch on its way to the store, holding its share of the global in-flight bound and
/// counted in the in-flight gauge until it drops, however the session ends.
struct Pending {
    batch: Arc<Batch>,
    metrics: Arc<Metrics>,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    fn new(batch: Batch, metrics: Arc<Metrics>, permit: OwnedSemaphorePermit) -> Pending {
        metrics.in_flight_batches.inc();
        Pending {
            batch: Arc::new(batch),
            metrics,
            _permit: permit,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.metrics.in_flight_batches.dec();
    }
}

/// Decrements the connected gauge however the session ends.
struct Connected(Arc<Metrics>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.agents_connected.dec();
    }
}

type Out = mpsc::Sender<Result<pb::CollectorMessage, Status>>;

impl Session {
    async fn run(self, mut inbound: Streaming<pb::AgentMessage>, out: Out) {
        self.metrics.agents_connected.inc();
        let _connected = Connected(self.metrics.clone());
        let this = Arc::new(self);
        let (batch_tx, batch_rx) = mpsc::channel::<Pending>(STREAM_QUEUE);
        let committer = tokio::spawn(this.clone().commit_loop(batch_rx, out.clone()));

        let end = loop {
            let msg = tokio::select! {
                _ = this.shutdown.cancelled() => break None,
                status = this.closing() => break Some(status),
                m = inbound.message() => m,
            };
            this.registration.activity.touch();
            let msg = match msg {
                Ok(Some(m)) => m,
                Ok(None) => break None,
                Err(status) => match refused_input(&status, &this.metrics) {
                    Some(refusal) => break Some(refusal),
                    None => break None,
                },
            };
            // A batch's share of the in-flight budget, from its wire form.
            let units = match &msg.msg {
                Some(pb::agent_message::Msg::Batch(b)) => {
                    in_flight_units(b.results.len(), prost::Message::encoded_len(b))
                }
                _ => 0,
            };
            match msg.msg {
                Some(pb::agent_message::Msg::Batch(batch)) => match this.validate(batch) {
                    Ok(batch) if batch.len() == 0 => {}
                    Ok(batch) => {
                        // A place in this stream's queue first, then a share of the global
                        // bound: a stream whose queue is full (its agent reads no acks, so
                        // its committer waits) waits here holding no share, so it never
                        // holds more than the shares of STREAM_QUEUE batches. The share is taken
                        // after the read so an idle stream holds none: when the store is
                        // behind, streams wait here, stop reading, and HTTP/2 flow control
                        // pushes back to the agents.
                        let slot = tokio::select! {
                            _ = this.shutdown.cancelled() => break None,
                            status = this.closing() => break Some(status),
                            s = batch_tx.reserve() => match s {
                                Ok(s) => s,
                                Err(_) => break None,
                            },
                        };
                        let permit = tokio::select! {
                            _ = this.shutdown.cancelled() => break None,
                            status = this.closing() => break Some(status),
                            p = this.in_flight.clone().acquire_many_owned(units) => match p {
                                Ok(p) => p,
                                Err(_) => break None,
                            },
                        };
                        slot.send(Pending::new(batch, this.metrics.clone(), permit));
                    }
                    Err(status) => break Some(status),
                },
                Some(pb::agent_message::Msg::Heartbeat(h)) => match BufferState::try_from(h) {
                    Ok(state) => {
                        let m = &this.metrics;
                        m.agent_backlog
                            .with_label_values(&[&this.agent_id])
                            .set(state.backlog);
                        m.agent_dropped
                            .with_label_values(&[&this.agent_id])
                            .set(state.dropped);
                        m.seen(&this.agent_id);
                        this.store.heartbeat(this.agent_id.clone(), state)
                    }
                    Err(e) => break Some(Status::invalid_argument(format!("heartbeat: {e}"))),
                },
                Some(pb::agent_message::Msg::TestsApplied(applied)) => {
                    this.controller.tests_applied(&this.control, applied);
                }
                Some(pb::agent_message::Msg::RunStatus(status)) => {
                    this.controller.run_status(&this.agent_id, status);
                }
                None => {
                    // A kind added after this collector: the agent sends it only when
                    // our welcome listed its feature, so this is a newer peer's extra.
                    tracing::debug!(agent_id = %this.agent_id, "ignoring a message of unknown kind");
                }
                Some(pb::agent_message::Msg::Hello(_)) => {
                    this.metrics
                        .ingest_errors
                        .with_label_values(&["protocol"])
                        .inc();
                    break Some(Status::invalid_argument("unexpected message after hello"));
                }
            }
        };
        drop(batch_tx);
        match end {
            Some(status) => {
                // Refuse at once: batches already queued are still committed and acked
                // by the committer, but nothing from this stream is read any more.
                tracing::warn!(agent_id = %this.agent_id, code = ?status.code(), "closing stream: {}", status.message());
                let _ = committer.await;
                // Never waits: a peer that reads nothing does not get to keep this task.
                let _ = out.try_send(Err(status));
            }
            None => {
                let _ = committer.await;
                // Stopping: tell the agent (it reconnects at once, spread), never waiting.
                if this.shutdown.is_cancelled() {
                    let _ = out.try_send(Err(crate::sessions::shutting_down()));
                }
            }
        }
        tracing::info!(agent_id = %this.agent_id, "agent disconnected");
    }

    /// Resolves when the session must close although its peer is still there: a newer
    /// session of the agent replaced it, or the peer stopped reading acks.
    async fn closing(&self) -> Status {
        tokio::select! {
            _ = self.registration.close.cancelled() => {
                Status::aborted("replaced by a newer session of the same agent")
            }
            _ = self.stalled.cancelled() => Status::resource_exhausted(format!(
                "no ack read for {:?}: closing the stream",
                self.ack_stall
            )),
        }
    }

    /// A batch of this agent's results in seq order, its invalid ones set aside for the
    /// quarantine; or, from a bad peer, the status that closes the stream.
    fn validate(&self, batch: pb::ResultBatch) -> Result<Batch, Status> {
        let n = batch.results.len() as u64;
        let refused = |stage: &str, status: Status| {
            self.metrics.ingest_errors.with_label_values(&[stage]).inc();
            self.metrics
                .ingest_results
                .with_label_values(&["invalid"])
                .inc_by(n);
            status
        };
        match Batch::from_wire(batch, &self.agent_id, &self.incarnation, SystemTime::now()) {
            Ok(batch) => {
                if !batch.rejected.is_empty() {
                    self.metrics
                        .ingest_errors
                        .with_label_values(&["validate"])
                        .inc_by(batch.rejected.len() as u64);
                }
                Ok(batch)
            }
            Err(BatchRefused::Permission(why)) => {
                Err(refused("permission", Status::permission_denied(why)))
            }
            Err(BatchRefused::Invalid(why)) => {
                Err(refused("validate", Status::invalid_argument(why)))
            }
        }
    }

    /// Commits this stream's batches in order and acks each commit. An ack's place in the
    /// outbound queue is reserved before its batches are taken, so a peer that reads no
    /// acks stops its own committer, never a writer; the session's close (a newer session
    /// of the agent), shutdown, or `ack_stall` without a place ends the wait, and the
    /// batches still queued drop with their shares of the budget.
    async fn commit_loop(self: Arc<Self>, mut batches: mpsc::Receiver<Pending>, out: Out) {
        let mut burst = Burst::default();
        loop {
            let slot = tokio::select! {
                biased;
                s = out.reserve() => match s {
                    Ok(s) => s,
                    Err(_) => return,
                },
                _ = self.registration.close.cancelled() => return,
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.ack_stall) => {
                    self.metrics.ingest_errors.with_label_values(&["ack_stall"]).inc();
                    self.stalled.cancel();
                    return;
                }
            };
            let Some(first) = batches.recv().await else {
                return;
            };
            // Batches already queued behind this one go into the same transaction: fewer,
            // larger commits while an agent drains a backlog, and still in seq order.
            let mut taken = vec![first];
            while let Ok(next) = batches.try_recv() {
                taken.push(next);
            }
            let job: Vec<Arc<Batch>> = taken.iter().map(|p| p.batch.clone()).collect();
            let last = job.last().map_or(0, |b| b.last_seq);
            let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
            loop {
                match self.store.write(job.clone()).await {
                    Ok(written) => {
                        self.metrics.seen(&self.agent_id);
                        let rejected = rejections(&job, written.refused);
                        burst.note(&self.agent_id, &rejected);
                        let ack = message(pb::collector_message::Msg::Ack(pb::Ack {
                            seq: last as u64,
                            rejected,
                        }));
                        drop(taken);
                        slot.send(Ok(ack));
                        for row in job.iter().flat_map(|b| b.rows.iter()) {
                            if let Some(run_id) = row.run_id {
                                self.controller.run_done(&self.agent_id, run_id);
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        // The agent left or we stop: what committed stays committed, the
                        // welcome tells it next time.
                        if self.shutdown.is_cancelled() || out.is_closed() {
                            return;
                        }
                        let delay = backoff.next();
                        tracing::warn!(agent_id = %self.agent_id, retry_in_ms = delay.as_millis() as u64, "batch not committed, retrying: {e}");
                        tokio::select! {
                            _ = self.shutdown.cancelled() => {}
                            _ = out.closed() => {}
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }
}

/// The quarantined results of a committed job for its ack, in seq order: those refused by
/// validation and those PostgreSQL refused. The first `MAX_ACK_REASONS` carry their reason,
/// cut to `MAX_ACK_REASON` bytes; `rejected_results` keeps every reason in full.
fn rejections(job: &[Arc<Batch>], refused_by_db: Vec<(i64, String)>) -> Vec<pb::Rejection> {
    let mut all: Vec<(i64, String)> = job
        .iter()
        .flat_map(|b| b.rejected.iter())
        .map(|q| (q.seq, q.reason.clone()))
        .chain(refused_by_db)
        .collect();
    all.sort_by_key(|r| r.0);
    all.into_iter()
        .enumerate()
        .map(|(i, (seq, reason))| pb::Rejection {
            seq: seq as u64,
            reason: if i < MAX_ACK_REASONS {
                cut(reason, MAX_ACK_REASON)
            } else {
                String::new()
            },
        })
        .collect()
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Logs a stream's quarantined results once per `REJECTION_LOG_EVERY`, with the first
/// seq and reason and how many went unlogged since.
#[derive(Default)]
struct Burst {
    logged: Option<Instant>,
    unlogged: usize,
}

impl Burst {
    fn note(&mut self, agent_id: &str, rejected: &[pb::Rejection]) {
        let Some(first) = rejected.first() else {
            return;
        };
        if self
            .logged
            .is_some_and(|at| at.elapsed() < REJECTION_LOG_EVERY)
        {
            self.unlogged += rejected.len();
            return;
        }
        tracing::warn!(
            agent_id,
            seq = first.seq,
            count = rejected.len(),
            unlogged_before = self.unlogged,
            "results quarantined in rejected_results, delivery goes on: {}",
            first.reason
        );
        self.logged = Some(Instant::now());
        self.unlogged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Rejected;

    #[test]
    fn a_batch_takes_its_share_of_the_budget_by_results_or_bytes() {
        // A fleet's single results take one unit each: a batch from each of 10,000
        // agents fits in the budget at once (256 did, before).
        assert_eq!(in_flight_units(1, 400), 1);
        const { assert!(10_000 <= MAX_IN_FLIGHT_UNITS) };
        // An empty batch still counts.
        assert_eq!(in_flight_units(0, 0), 1);
        assert_eq!(in_flight_units(1000, 400_000), 63);
        assert_eq!(in_flight_units(10, 1 << 20), 64);
        // The largest batch fits, so no stream waits for a share it can never get.
        let largest = in_flight_units(
            edgeprobe_proto::bounds::MAX_BATCH_RESULTS,
            edgeprobe_proto::bounds::MAX_MESSAGE_BYTES,
        );
        assert_eq!(largest, 625);
        // The budget bounds results and bytes as the doc says.
        assert_eq!(MAX_IN_FLIGHT_UNITS * UNIT_RESULTS, 262_144);
        assert_eq!(MAX_IN_FLIGHT_UNITS * UNIT_BYTES, 256 << 20);
    }

    #[test]
    fn acks_name_every_quarantined_result_in_seq_order() {
        let rejected = |seq, reason: &str| Rejected {
            seq,
            reason: reason.into(),
            sqlstate: None,
            raw: vec![],
            raw_format: crate::domain::RawFormat::Protobuf,
            raw_truncated: false,
        };
        let batch = |rejected: Vec<Rejected>, last_seq| {
            Arc::new(Batch {
                agent_id: "a1".into(),
                incarnation: Arc::from(""),
                rows: vec![],
                rejected,
                last_seq,
            })
        };
        let job = vec![
            batch(vec![rejected(3, "40 labels, at most 32")], 4),
            batch(vec![rejected(9, &"é".repeat(200))], 10),
        ];
        let list = rejections(&job, vec![(6, "SQLSTATE 22P05: no".into())]);
        let seqs: Vec<u64> = list.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [3, 6, 9]);
        assert_eq!(list[1].reason, "SQLSTATE 22P05: no");
        assert_eq!(list[2].reason.len(), MAX_ACK_REASON);

        // A job full of quarantined results still makes an ack the agent can read.
        let many: Vec<Rejected> = (1..=20_000)
            .map(|s| rejected(s, &"x".repeat(500)))
            .collect();
        let list = rejections(&[batch(many, 20_000)], vec![]);
        assert_eq!(list.len(), 20_000);
        assert!(list[MAX_ACK_REASONS - 1].reason.len() == MAX_ACK_REASON);
        assert!(list[MAX_ACK_REASONS].reason.is_empty());
        let ack = pb::Ack {
            seq: 20_000,
            rejected: list,
        };
        assert!(prost::Message::encoded_len(&ack) < 1 << 20);
    }
}
