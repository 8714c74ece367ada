//! The gRPC ingest service: one long-lived stream per agent.
//!
//! hello (within `HELLO_TIMEOUT`) -> welcome(committed seq) -> batches -> acks.
//! Each stream has a reader (validates, hands batches on through a small bounded queue)
//! and a committer (writes one batch at a time, acks after commit, retries while Postgres
//! is away). When the queue is full the reader stops reading, so HTTP/2 flow control
//! pushes back to the agent, which keeps buffering on disk.
//!
//! Invariants: a batch is written entirely or not at all; an invalid batch (any bad result,
//! oversized, another agent's id) closes only its own stream and writes nothing; an ack
//! names only seqs whose transaction committed.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use edgeprobe_proto::v1 as pb;
use futures::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::domain::{AgentHello, BufferState, ResultRow, MAX_BATCH_RESULTS};
use crate::metrics::Metrics;
use crate::store::Store;

pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches accepted from one stream and not yet committed, at most.
const STREAM_QUEUE: usize = 4;
/// Batches accepted from all streams and not yet committed, at most. With one decoded
/// batch per stream waiting for a share, memory stays within (this + streams) batches.
pub const MAX_IN_FLIGHT_BATCHES: usize = 256;
const RETRY_CAP: Duration = Duration::from_secs(5);

pub struct IngestService {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub in_flight: Arc<Semaphore>,
    /// A stream that has not said hello by then is closed.
    pub hello_timeout: Duration,
    /// mTLS mode: a stream without a certificate identity is refused.
    pub require_identity: bool,
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
        let committed = self
            .store
            .hello(hello)
            .await
            .map_err(|e| Status::unavailable(format!("database unavailable: {e}")))?;
        tracing::info!(agent_id = %agent_id, %peer, %version, committed_seq = committed, "agent connected");

        let (out_tx, out_rx) = mpsc::channel(STREAM_QUEUE + 2);
        let _ = out_tx
            .send(Ok(message(pb::collector_message::Msg::Welcome(
                pb::Welcome {
                    committed_seq: committed as u64,
                    ..Default::default()
                },
            ))))
            .await;
        self.metrics.seen(&agent_id);
        let session = Session {
            agent_id,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            in_flight: self.in_flight.clone(),
        };
        tokio::spawn(session.run(inbound, out_tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// A read error that is the peer's input (too large, undecodable) becomes
/// INVALID_ARGUMENT with the reason; `None` for transport ends (reset, disconnect).
fn refused_input(status: &Status, metrics: &Metrics) -> Option<Status> {
    use tonic::Code;
    let what = match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => "message too large",
        Code::Internal if status.message().contains("decode") => "malformed message",
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
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    in_flight: Arc<Semaphore>,
}

/// A batch on its way to the store, holding its share of the global in-flight bound.
struct Pending {
    rows: Arc<Vec<ResultRow>>,
    _permit: OwnedSemaphorePermit,
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
                m = inbound.message() => m,
            };
            let msg = match msg {
                Ok(Some(m)) => m,
                Ok(None) => break None,
                Err(status) => match refused_input(&status, &this.metrics) {
                    Some(refusal) => break Some(refusal),
                    None => break None,
                },
            };
            match msg.msg {
                Some(pb::agent_message::Msg::Batch(batch)) => match this.validate(batch) {
                    Ok(rows) if rows.is_empty() => {}
                    Ok(rows) => {
                        // A share of the global bound, taken after the read so an idle
                        // stream holds none: when the store is behind, streams wait here
                        // with one batch each, stop reading, and HTTP/2 flow control
                        // pushes back to the agents.
                        let permit = tokio::select! {
                            _ = this.shutdown.cancelled() => break None,
                            p = this.in_flight.clone().acquire_owned() => match p {
                                Ok(p) => p,
                                Err(_) => break None,
                            },
                        };
                        this.metrics.in_flight_batches.inc();
                        let pending = Pending {
                            rows: Arc::new(rows),
                            _permit: permit,
                        };
                        if batch_tx.send(pending).await.is_err() {
                            this.metrics.in_flight_batches.dec();
                            break None;
                        }
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
                Some(pb::agent_message::Msg::Hello(_)) | None => {
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
                let _ = out.send(Err(status)).await;
            }
            None => {
                let _ = committer.await;
            }
        }
        tracing::info!(agent_id = %this.agent_id, "agent disconnected");
    }

    /// Every result valid and this agent's, or the whole batch is refused.
    fn validate(&self, batch: pb::ResultBatch) -> Result<Vec<ResultRow>, Status> {
        if batch.results.len() > MAX_BATCH_RESULTS {
            self.metrics
                .ingest_errors
                .with_label_values(&["validate"])
                .inc();
            return Err(Status::invalid_argument(format!(
                "batch of {} results, at most {MAX_BATCH_RESULTS}",
                batch.results.len()
            )));
        }
        let n = batch.results.len() as u64;
        let mut rows = Vec::with_capacity(batch.results.len());
        let mut last = 0;
        for r in batch.results {
            if r.agent_id != self.agent_id {
                self.metrics
                    .ingest_errors
                    .with_label_values(&["permission"])
                    .inc();
                self.metrics
                    .ingest_results
                    .with_label_values(&["invalid"])
                    .inc_by(n);
                return Err(Status::permission_denied(format!(
                    "batch holds a result of agent `{}` on the stream of `{}`",
                    r.agent_id.chars().take(128).collect::<String>(),
                    self.agent_id
                )));
            }
            let seq = r.seq;
            let previous = rows.last().map(|p: &ResultRow| &p.labels);
            let row = ResultRow::from_wire(r, previous).map_err(|e| {
                self.metrics
                    .ingest_errors
                    .with_label_values(&["validate"])
                    .inc();
                self.metrics
                    .ingest_results
                    .with_label_values(&["invalid"])
                    .inc_by(n);
                Status::invalid_argument(format!("result seq {seq}: {e}"))
            })?;
            if row.seq <= last {
                self.metrics
                    .ingest_errors
                    .with_label_values(&["validate"])
                    .inc();
                return Err(Status::invalid_argument("seqs in a batch must increase"));
            }
            last = row.seq;
            rows.push(row);
        }
        Ok(rows)
    }

    async fn commit_loop(self: Arc<Self>, mut batches: mpsc::Receiver<Pending>, out: Out) {
        while let Some(first) = batches.recv().await {
            // Batches already queued behind this one go into the same transaction: fewer,
            // larger commits while an agent drains a backlog, and still in seq order.
            let mut taken = vec![first];
            while let Ok(next) = batches.try_recv() {
                taken.push(next);
            }
            let n = taken.len() as i64;
            let rows: Vec<Arc<Vec<ResultRow>>> = taken.iter().map(|p| p.rows.clone()).collect();
            let last = rows
                .iter()
                .rev()
                .find_map(|b| b.last())
                .map_or(0, |r| r.seq);
            let mut delay = Duration::from_millis(100);
            loop {
                match self.store.write(rows.clone()).await {
                    Ok(_) => {
                        self.metrics.seen(&self.agent_id);
                        let ack = message(pb::collector_message::Msg::Ack(pb::Ack {
                            seq: last as u64,
                            ..Default::default()
                        }));
                        self.metrics.in_flight_batches.sub(n);
                        drop(taken);
                        if out.send(Ok(ack)).await.is_err() {
                            // The agent left; what committed stays committed, the welcome
                            // tells it next time.
                            while batches.try_recv().is_ok() {
                                self.metrics.in_flight_batches.dec();
                            }
                            return;
                        }
                        break;
                    }
                    Err(e) => {
                        if self.shutdown.is_cancelled() || out.is_closed() {
                            self.metrics.in_flight_batches.sub(n);
                            while batches.try_recv().is_ok() {
                                self.metrics.in_flight_batches.dec();
                            }
                            return;
                        }
                        tracing::warn!(agent_id = %self.agent_id, retry_in_ms = delay.as_millis() as u64, "batch not committed, retrying: {e}");
                        tokio::select! {
                            _ = self.shutdown.cancelled() => {}
                            _ = out.closed() => {}
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(RETRY_CAP);
                    }
                }
            }
        }
    }
}
