//! The uplink: ships buffered results to a collector over one long-lived gRPC stream.
//!
//! Session: Hello(incarnation) -> Welcome(committed seq, collector clock) -> delete what
//! already landed, take the collector's clock as a base when nothing better vouches for
//! ours -> send batches from the buffer, several in flight, while acks delete them.
//! Heartbeats carry backlog and drop counts. On any error the session ends and the uplink
//! reconnects to the next endpoint with exponential backoff and full jitter.
//!
//! Controller (docs/ARCHITECTURE.md, "Fleet tests on the agent"): the hello lists the
//! features `fleet-tests` and `run-now` and the local test names; FleetTests and RunNow go
//! to `run.rs` (`fleet::Inbound`) only when the welcome listed their feature, with the
//! session's sender for the answer. A message of a kind this agent does not know is
//! logged and ignored; only the end of the stream ends the session.
//!
//! Bounds: the client encodes and decodes up to `bounds::MAX_MESSAGE_BYTES`, the bound
//! of the collector's server, so no message a collector may send ends the stream for its
//! size. A controller message that does not decode (`UplinkCodec`) but whose kind and id
//! can be read (FleetTests and its version, RunNow and its run id) is refused with the
//! reason (TestsApplied / RunStatus) and the session goes on: a bad push never stops the
//! results.
//!
//! Storms: when a collector restarts, every agent of the fleet loses its session at the same
//! moment, and with the backoff alone (250 ms first step) all of them would reconnect
//! within a quarter of a second. So the first reconnect after a session that was welcomed
//! also waits a random time, uniform up to `[collector] reconnect_spread` (full jitter),
//! on top of the backoff. The first connect at start is spread the same way when the host
//! booted less than `BOOT_WINDOW` ago (a site whose power returns boots all its agents
//! together); an agent restarted on a running host connects at once, since nothing
//! synchronises it with the rest of the fleet.
//!
//! Invariants:
//! - Results are deleted from the buffer only on an ack (or a welcome) naming their seq;
//!   a batch is never sent ahead of `MAX_IN_FLIGHT` unacknowledged ones.
//! - Every result leaves corrected by the clock when it can be (`Clock::correct`); the
//!   buffer is corrected too, in the background, so a reboot keeps the correction.
//! - Results the collector quarantined are acked like the others (counted, logged once
//!   per burst): one bad result never stalls delivery.
//! - Backoff never resets into a loop: a session the collector refused (an
//!   INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS,
//!   UNAUTHENTICATED or RESOURCE_EXHAUSTED status) grows it even if it was welcomed; it
//!   resets only after a session that got an ack or lasted `STABLE_SESSION`.
//! - A session ends with a typed `SessionEnd`, classified once where the status arrives
//!   (`SessionEnd::from_status`): a refusal, an identity conflict (known by the status
//!   metadata `edgeprobe_proto::REASON_KEY`, never by the message's words), a lost
//!   session, or shutdown.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use edgeprobe_proto::bounds;
use edgeprobe_proto::v1 as pb;
use futures::stream::{FuturesOrdered, StreamExt};
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::buffer::{Buffer, BufferError, Deletion};
use crate::clock::{self, Clock};
use crate::config::CollectorSection;
use crate::fleet::Inbound;
use crate::record;

/// Results per batch at most.
const BATCH_MAX_RESULTS: usize = 5_000;
/// Encoded bytes per batch at most: half the message bound both peers apply.
const BATCH_MAX_BYTES: usize = bounds::MAX_MESSAGE_BYTES / 2;
/// Unacknowledged batches at most.
const MAX_IN_FLIGHT: usize = 8;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// An agent starting this soon after its host booted spreads its first connect.
const BOOT_WINDOW: Duration = Duration::from_secs(300);
/// A session this long resets the backoff even without an ack.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// A burst of quarantined results still going on is logged again after this long.
const QUARANTINE_LOG_EVERY: Duration = Duration::from_secs(300);

pub struct Uplink {
    pub agent_id: String,
    pub labels: BTreeMap<String, String>,
    pub collector: CollectorSection,
    pub buffer: Buffer,
    pub clock: Clock,
    /// Names of the tests of the agent's own file (`Hello.local_tests`).
    pub local_tests: Vec<String>,
    /// Where FleetTests and RunNow go (the scheduler side, `run.rs`).
    pub inbound: mpsc::Sender<Inbound>,
}

impl Uplink {
    /// Runs sessions until `shutdown`; never returns early on network errors.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.collector.insecure {
            tracing::warn!(
                "collector.insecure = true: results travel in PLAINTEXT without authentication; local demos only"
            );
        }
        let spread = self.collector.reconnect_spread;
        let uptime = Duration::from_nanos(clock::boottime_nanos().max(0) as u64);
        let first = start_delay(spread, uptime);
        if !first.is_zero() {
            tracing::info!(
                uptime_s = uptime.as_secs(),
                delay_ms = first.as_millis() as u64,
                "the host just booted: spreading the first connect over reconnect_spread"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(first) => {}
            }
        }
        let mut attempt: u32 = 0;
        let mut index = 0usize;
        while !shutdown.is_cancelled() {
            let endpoint = &self.collector.endpoints[index % self.collector.endpoints.len()];
            let started = Instant::now();
            let Ended {
                welcomed,
                acked,
                end,
            } = self.session(endpoint, &shutdown).await;
            if !end.is_refusal() && (acked || started.elapsed() >= STABLE_SESSION) {
                attempt = 0;
            }
            let delay = reconnect_delay(attempt, welcomed, spread);
            attempt = attempt.saturating_add(1);
            index += 1;
            match &end {
                SessionEnd::Shutdown => return,
                SessionEnd::IdentityConflict(status) => tracing::error!(
                    endpoint = %endpoint,
                    agent_id = %self.agent_id,
                    retry_in_ms = delay.as_millis() as u64,
                    "another host is using this agent id (a cloned image?); the \
                     collector refused this one: {}",
                    status.message()
                ),
                SessionEnd::Refused(status) => tracing::warn!(
                    endpoint = %endpoint,
                    code = ?status.code(),
                    retry_in_ms = delay.as_millis() as u64,
                    "the collector refused the session: {}",
                    with_sources(&end)
                ),
                _ => tracing::warn!(
                    endpoint = %endpoint,
                    retry_in_ms = delay.as_millis() as u64,
                    "collector session ended: {}",
                    with_sources(&end)
                ),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self, endpoint: &str) -> Result<Channel, SessionEnd> {
        let transport = |source| SessionEnd::Transport {
            endpoint: endpoint.to_string(),
            source,
        };
        let mut ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(transport)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        if !self.collector.insecure {
            ep = ep
                .tls_config(tls_config(&self.collector)?)
                .map_err(transport)?;
        }
        ep.connect().await.map_err(transport)
    }

    /// One session, until it ends (`SessionEnd::Shutdown` on shutdown).
    async fn session(&self, endpoint: &str, shutdown: &CancellationToken) -> Ended {
        let (mut welcomed, mut acked) = (false, false);
        let end = match self
            .session_inner(endpoint, shutdown, &mut welcomed, &mut acked)
            .await
        {
            Ok(()) => SessionEnd::Shutdown,
            Err(end) => end,
        };
        Ended {
            welcomed,
            acked,
            end,
        }
    }

    async fn session_inner(
        &self,
        endpoint: &str,
        shutdown: &CancellationToken,
        welcomed: &mut bool,
        acked: &mut bool,
    ) -> Result<(), SessionEnd> {
        let channel = self.connect(endpoint).await?;
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(MAX_IN_FLIGHT + 4);
        let hello = pb::Hello {
            agent_id: self.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: self.labels.clone().into_iter().collect(),
            incarnation: self.buffer.incarnation().to_string(),
            features: vec![
                edgeprobe_proto::FEATURE_FLEET_TESTS.to_string(),
                edgeprobe_proto::FEATURE_RUN_NOW.to_string(),
            ],
            local_tests: self.local_tests.clone(),
        };
        tx.send(message(pb::agent_message::Msg::Hello(hello)))
            .await
            .map_err(|_| SessionEnd::Closed)?;
        // The hello leaves with the stream request: the welcome's round trip starts here.
        let hello_sent = Instant::now();
        let mut inbound = open_stream(channel, ReceiverStream::new(rx))
            .await
            .map_err(SessionEnd::from_status)?
            .into_inner();

        let welcome = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
            .await
            .map_err(|_| SessionEnd::Protocol(format!("no welcome within {WELCOME_TIMEOUT:?}")))?
            .map_err(SessionEnd::from_status)?;
        let rtt = hello_sent.elapsed();
        let (committed, collector_time, features) = match welcome {
            Some(Incoming::Message(pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::Welcome(w)),
            })) => (w.committed_seq, w.collector_unix_nanos, w.features),
            other => {
                return Err(SessionEnd::Protocol(format!(
                    "expected welcome, got {other:?}"
                )))
            }
        };
        *welcomed = true;
        self.buffer
            .reconcile(committed)
            .await
            .map_err(SessionEnd::Buffer)?;
        self.clock.observe_collector(collector_time, rtt);
        tokio::spawn(correct_in_background(
            self.clock.clone(),
            self.buffer.clone(),
        ));
        tracing::info!(
            endpoint,
            committed_seq = committed,
            incarnation = self.buffer.incarnation(),
            features = ?features,
            "connected to collector"
        );
        let speaks = |f: &str| features.iter().any(|g| g == f);
        let (fleet_tests, run_now) = (
            speaks(edgeprobe_proto::FEATURE_FLEET_TESTS),
            speaks(edgeprobe_proto::FEATURE_RUN_NOW),
        );

        let mut appended = self.buffer.subscribe();
        let mut last_sent = committed;
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        // Deletions of acknowledged ranges run on the buffer's writer thread while this
        // loop keeps the window full; one that fails ends the session like any I/O error.
        let mut deletions: FuturesOrdered<Deletion> = FuturesOrdered::new();
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        let mut quarantine = QuarantineLog::default();
        loop {
            // Fill the window.
            while in_flight.len() < MAX_IN_FLIGHT && *appended.borrow_and_update() > last_sent {
                let entries = self
                    .buffer
                    .read_after(last_sent, BATCH_MAX_RESULTS, BATCH_MAX_BYTES)
                    .await?;
                let Some(last) = entries.last().map(|e| e.seq) else {
                    break;
                };
                let results = entries
                    .into_iter()
                    .filter_map(|e| match pb::Result::decode(e.payload.as_slice()) {
                        Ok(mut r) => {
                            r.agent_id = self.agent_id.clone();
                            r.seq = e.seq;
                            self.clock.correct(&mut r);
                            Some(r)
                        }
                        Err(err) => {
                            tracing::error!(
                                seq = e.seq,
                                "skipping undecodable buffered result: {err}"
                            );
                            None
                        }
                    })
                    .collect();
                tx.send(message(pb::agent_message::Msg::Batch(pb::ResultBatch {
                    results,
                })))
                .await
                .map_err(|_| SessionEnd::Closed)?;
                last_sent = last;
                in_flight.push_back(last);
            }

            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = appended.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                Some(deleted) = deletions.next() => {
                    deleted.map_err(|_| BufferError::Closed)??;
                }
                _ = heartbeat.tick() => {
                    let stats = self.buffer.stats_async().await?;
                    tx.send(message(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                        backlog: stats.backlog,
                        dropped: stats.dropped,
                        oldest_unix_seconds: stats.oldest_unix_seconds,
                    })))
                    .await
                    .map_err(|_| SessionEnd::Closed)?;
                }
                msg = inbound.message() => {
                    let msg = match msg.map_err(SessionEnd::from_status)? {
                        None => return Err(SessionEnd::Protocol("collector closed the stream".into())),
                        Some(Incoming::Message(msg)) => msg,
                        Some(Incoming::Undecodable { what, error }) => {
                            if let Some(answer) = refuse_undecodable(what, &error, fleet_tests, run_now) {
                                tx.send(message(answer))
                                    .await
                                    .map_err(|_| SessionEnd::Closed)?;
                            }
                            continue;
                        }
                    };
                    match msg.msg {
                        Some(pb::collector_message::Msg::Ack(ack)) => {
                            if ack.seq > last_sent {
                                return Err(SessionEnd::Protocol(format!(
                                    "collector acked seq {} beyond the last sent {last_sent}",
                                    ack.seq
                                )));
                            }
                            while in_flight.front().is_some_and(|&s| s <= ack.seq) {
                                in_flight.pop_front();
                            }
                            *acked = true;
                            quarantine.observe(&ack.rejected);
                            let quarantined = ack.rejected.len() as u64;
                            deletions.push_back(self.buffer.ack(ack.seq, quarantined)?);
                        }
                        Some(pb::collector_message::Msg::FleetTests(push)) if fleet_tests => {
                            self.forward(Inbound::FleetTests { push, reply: tx.clone() }, shutdown).await;
                        }
                        Some(pb::collector_message::Msg::RunNow(run)) if run_now => {
                            self.forward(Inbound::RunNow { run, reply: tx.clone() }, shutdown).await;
                        }
                        Some(msg @ (pb::collector_message::Msg::FleetTests(_)
                        | pb::collector_message::Msg::RunNow(_))) => {
                            // Its welcome did not list the feature: no answer may be sent.
                            tracing::warn!(
                                "ignoring a controller message the collector's welcome did not announce: {}",
                                kind_name(&msg)
                            );
                        }
                        Some(other @ pb::collector_message::Msg::Welcome(_)) => {
                            return Err(SessionEnd::Protocol(format!(
                                "unexpected message from collector: {other:?}"
                            )));
                        }
                        // A message kind newer than this agent: the negotiation should
                        // keep it away, and it is no reason to drop the session.
                        None => tracing::warn!("ignoring a message of a kind this agent does not know"),
                    }
                }
            }
        }
    }
}

impl Uplink {
    /// Hands a controller message to the scheduler side; waits while it is busy, never
    /// past shutdown.
    async fn forward(&self, msg: Inbound, shutdown: &CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            sent = self.inbound.send(msg) => {
                if sent.is_err() {
                    tracing::debug!("the scheduler side has stopped; dropping a controller message");
                }
            }
        }
    }
}

/// Opens the Ingest stream with `UplinkCodec` and the message bound both peers apply.
pub async fn open_stream(
    channel: Channel,
    outbound: impl tonic::IntoStreamingRequest<Message = pb::AgentMessage>,
) -> Result<tonic::Response<tonic::Streaming<Incoming>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(bounds::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(bounds::MAX_MESSAGE_BYTES);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the channel is not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/edgeprobe.v1.Ingest/Stream");
    grpc.streaming(outbound.into_streaming_request(), path, UplinkCodec)
        .await
}

/// What the uplink reads from a collector.
#[derive(Debug)]
pub enum Incoming {
    Message(pb::CollectorMessage),
    /// A controller message that did not decode, known by its kind and id.
    Undecodable {
        what: Controller,
        error: String,
    },
}

/// A controller message known by its kind and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    FleetTests { version: u64 },
    RunNow { run_id: u64 },
}

/// The answer refusing an undecodable controller message (logged), when its feature was
/// negotiated; `None` otherwise (no answer may be sent).
fn refuse_undecodable(
    what: Controller,
    error: &str,
    fleet_tests: bool,
    run_now: bool,
) -> Option<pb::agent_message::Msg> {
    match what {
        Controller::FleetTests { version } if fleet_tests => {
            let reason = format!("the fleet tests message does not decode: {error}");
            tracing::warn!(
                version,
                "fleet tests refused, keeping the running set: {reason}"
            );
            Some(pb::agent_message::Msg::TestsApplied(pb::TestsApplied {
                version,
                error: bounds::fit_error_message(&reason).0,
            }))
        }
        Controller::RunNow { run_id } if run_now => {
            let reason = format!("the run-now message does not decode: {error}");
            tracing::warn!(run_id, "run-now refused: {reason}");
            Some(pb::agent_message::Msg::RunStatus(pb::RunStatus {
                run_id,
                state: pb::run_status::State::Refused as i32,
                reason: bounds::fit_error_message(&reason).0,
            }))
        }
        _ => {
            tracing::warn!("ignoring an undecodable {what:?} the collector's welcome did not announce: {error}");
            None
        }
    }
}

/// prost encoding of what the agent sends; decoding that tells an undecodable controller
/// message (refused, the stream goes on) from an undecodable anything else (the stream
/// ends, as with any codec).
#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkCodec;

pub struct UplinkEncoder;
pub struct UplinkDecoder;

impl tonic::codec::Codec for UplinkCodec {
    type Encode = pb::AgentMessage;
    type Decode = Incoming;
    type Encoder = UplinkEncoder;
    type Decoder = UplinkDecoder;

    fn encoder(&mut self) -> UplinkEncoder {
        UplinkEncoder
    }

    fn decoder(&mut self) -> UplinkDecoder {
        UplinkDecoder
    }
}

impl tonic::codec::Encoder for UplinkEncoder {
    type Item = pb::AgentMessage;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: pb::AgentMessage,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(format!("encode: {e}")))
    }
}

impl tonic::codec::Decoder for UplinkDecoder {
    type Item = Incoming;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Incoming>, tonic::Status> {
        use bytes::Buf;
        let bytes = buf.copy_to_bytes(buf.remaining());
        decode_incoming(&bytes).map(Some)
    }
}

/// One collector message's bytes: the message, an identified undecodable controller
/// message, or an error (ends the stream).
pub fn decode_incoming(bytes: &[u8]) -> Result<Incoming, tonic::Status> {
    match pb::CollectorMessage::decode(bytes) {
        Ok(m) => Ok(Incoming::Message(m)),
        Err(e) => match identify(bytes) {
            Some(what) => Ok(Incoming::Undecodable {
                what,
                error: e.to_string(),
            }),
            None => Err(tonic::Status::internal(format!(
                "failed to decode message: {e}"
            ))),
        },
    }
}

/// The kind and id of a controller message in undecodable bytes: the last top-level
/// FleetTests (field 3) or RunNow (field 4), with its field 1 (version, run id) when it is
/// there and not 0.
fn identify(mut bytes: &[u8]) -> Option<Controller> {
    let mut found = None;
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut bytes)?;
            }
            1 => bytes = bytes.get(8..)?,
            5 => bytes = bytes.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                // A truncated last field still names its kind.
                let inner = bytes.get(..len).unwrap_or(bytes);
                bytes = bytes.get(len..).unwrap_or_default();
                let id = first_varint_field(inner).filter(|&id| id != 0);
                found = match (field, id) {
                    (3, Some(version)) => Some(Controller::FleetTests { version }),
                    (4, Some(run_id)) => Some(Controller::RunNow { run_id }),
                    (3 | 4, None) => None,
                    _ => found,
                };
            }
            _ => return found,
        }
    }
    found
}

/// Field 1 of a message as a varint, if it can be read.
fn first_varint_field(mut bytes: &[u8]) -> Option<u64> {
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        match (key >> 3, key & 7) {
            (1, 0) => return varint(&mut bytes),
            (_, 0) => {
                varint(&mut bytes)?;
            }
            (_, 1) => bytes = bytes.get(8..)?,
            (_, 5) => bytes = bytes.get(4..)?,
            (_, 2) => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                bytes = bytes.get(len..)?;
            }
            _ => return None,
        }
    }
    None
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(value);
        }
    }
    None
}

fn kind_name(msg: &pb::collector_message::Msg) -> &'static str {
    match msg {
        pb::collector_message::Msg::Welcome(_) => "Welcome",
        pb::collector_message::Msg::Ack(_) => "Ack",
        pb::collector_message::Msg::FleetTests(_) => "FleetTests",
        pb::collector_message::Msg::RunNow(_) => "RunNow",
    }
}

/// A session that ended, and how far it got.
struct Ended {
    /// The collector welcomed the session: losing it may be losing the collector, which
    /// the whole fleet then does at once.
    welcomed: bool,
    /// The session got at least one ack.
    acked: bool,
    end: SessionEnd,
}

/// Why a session ended. A status from the collector is classified once, where it
/// arrives (`from_status`); the reconnect loop matches the variant.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The uplink is shutting down (or the buffer stopped): not an error.
    #[error("shutting down")]
    Shutdown,
    /// Another incarnation of this agent id is connected: the collector's status carries
    /// `edgeprobe_proto::REASON_IDENTITY_CONFLICT` in its metadata. A refusal too.
    #[error("identity conflict: {}", .0.message())]
    IdentityConflict(tonic::Status),
    /// The collector refused the session with a status it will give again
    /// (`is_refusal_code`): reconnecting at once would only loop.
    #[error("{}", status_text(.0))]
    Refused(tonic::Status),
    /// Any other status: the stream or the collector went away.
    #[error("{}", status_text(.0))]
    Lost(tonic::Status),
    /// The endpoint could not be set up or reached.
    #[error("cannot connect to {endpoint}")]
    Transport {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The mTLS files of `[collector]` are missing or unreadable.
    #[error("[collector] {what} is not set")]
    CredentialUnset { what: &'static str },
    #[error("cannot read {what} {}", path.display())]
    Credential {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The outbound stream closed under the uplink.
    #[error("stream closed")]
    Closed,
    /// The collector broke the protocol (no welcome, an unexpected message, an ack past
    /// what was sent) or ended the stream.
    #[error("{0}")]
    Protocol(String),
    #[error("the buffer failed")]
    Buffer(#[from] BufferError),
}

impl SessionEnd {
    /// Classifies a status from the collector.
    pub fn from_status(status: tonic::Status) -> SessionEnd {
        if is_identity_conflict(&status) {
            SessionEnd::IdentityConflict(status)
        } else if is_refusal_code(status.code()) {
            SessionEnd::Refused(status)
        } else {
            SessionEnd::Lost(status)
        }
    }

    /// The collector refused the session and will refuse the same again.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            SessionEnd::Refused(_) | SessionEnd::IdentityConflict(_)
        )
    }
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// An error and its sources, ": "-separated, for one log line.
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Corrects the buffered results once a base is known (logged, never fatal: the uplink
/// corrects what it sends anyway).
pub async fn correct_in_background(clock: Clock, buffer: Buffer) {
    if let Err(e) = record::correct_buffered(&clock, &buffer).await {
        tracing::warn!("cannot correct the start time of buffered results: {e}");
    }
}

/// Codes with which the collector refuses a session it will refuse again.
fn is_refusal_code(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::Unauthenticated
            | Code::ResourceExhausted
    )
}

/// Two live incarnations of this agent id: the collector refuses the second session with
/// FAILED_PRECONDITION and `edgeprobe-reason: identity-conflict` in the status metadata.
/// The message is prose for people and is not read.
fn is_identity_conflict(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status
            .metadata()
            .get(edgeprobe_proto::REASON_KEY)
            .is_some_and(|v| v.as_bytes() == edgeprobe_proto::REASON_IDENTITY_CONFLICT.as_bytes())
}

/// Logs quarantined results once per burst (a run of acks that carry rejections), not
/// per ack, and again while a burst goes on for long.
#[derive(Default)]
struct QuarantineLog {
    /// Results quarantined in the current burst.
    burst: u64,
    logged_at: Option<Instant>,
}

impl QuarantineLog {
    fn observe(&mut self, rejected: &[pb::Rejection]) {
        let Some(first) = rejected.first() else {
            if self.burst > 0 {
                tracing::info!(
                    quarantined = self.burst,
                    "the collector accepts results again; {} were quarantined in this burst",
                    self.burst
                );
            }
            *self = QuarantineLog::default();
            return;
        };
        self.burst += rejected.len() as u64;
        if self
            .logged_at
            .is_none_or(|at| at.elapsed() >= QUARANTINE_LOG_EVERY)
        {
            tracing::warn!(
                quarantined = self.burst,
                "the collector quarantined {} results (seq {}: {})",
                self.burst,
                first.seq,
                first.reason
            );
            self.logged_at = Some(Instant::now());
        }
    }
}

fn message(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

fn tls_config(c: &CollectorSection) -> Result<ClientTlsConfig, SessionEnd> {
    let read = |p: &Option<std::path::PathBuf>, what: &'static str| {
        let p = p.as_ref().ok_or(SessionEnd::CredentialUnset { what })?;
        std::fs::read(p).map_err(|source| SessionEnd::Credential {
            what,
            path: p.clone(),
            source,
        })
    };
    let ca = read(&c.ca, "ca")?;
    let cert = read(&c.cert, "cert")?;
    let key = read(&c.key, "key")?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}

/// The wait before the next connect: the backoff, plus a random share of `spread` after
/// a session the collector had welcomed (the first reconnect of a possible storm).
fn reconnect_delay(attempt: u32, welcomed: bool, spread: Duration) -> Duration {
    let delay = backoff(attempt);
    if welcomed {
        delay + jitter(spread)
    } else {
        delay
    }
}

/// The wait before the first connect after start: a random share of `spread` on a host up
/// for less than `BOOT_WINDOW`, none on a host that was already running.
fn start_delay(spread: Duration, uptime: Duration) -> Duration {
    if uptime < BOOT_WINDOW {
        jitter(spread)
    } else {
        Duration::ZERO
    }
}

/// Uniform in [0, spread] (full jitter).
fn jitter(spread: Duration) -> Duration {
    Duration::from_millis(rand::rng().random_range(0..=spread.as_millis() as u64))
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)].
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    let ms = rand::rng().random_range(0..=ceiling.as_millis() as u64);
    Duration::from_millis(ms.max(50))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every stream with `messages`, encoding up to the shared
    /// bound as the collector's route does (`collector/src/run.rs` `ingest_route`).
    struct Sends(Vec<pb::CollectorMessage>);

    #[tonic::async_trait]
    impl pb::ingest_server::Ingest for Sends {
        type StreamStream = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<pb::CollectorMessage, tonic::Status>> + Send>,
        >;

        async fn stream(
            &self,
            _: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let messages = self.0.clone().into_iter().map(Ok);
            Ok(tonic::Response::new(Box::pin(futures::stream::iter(
                messages,
            ))))
        }
    }

    /// A push whose whole message encodes to `bytes`.
    fn push_of(bytes: usize) -> pb::CollectorMessage {
        use prost::Message;
        let mut len = bytes - 16;
        loop {
            let m = pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::FleetTests(pb::FleetTests {
                    version: 1,
                    tests_toml: "#".repeat(len),
                })),
            };
            match m.encoded_len().cmp(&bytes) {
                std::cmp::Ordering::Equal => return m,
                std::cmp::Ordering::Less => len += 1,
                std::cmp::Ordering::Greater => len -= 1,
            }
        }
    }

    /// Issue 28 case 2: the agent decoded 1 MiB while the collector sent up to 4 MiB, so a
    /// big push ended every session. The agent's client (`open_stream`) now decodes the
    /// largest message the shared bound lets a collector send.
    #[tokio::test]
    async fn the_agent_decodes_the_largest_message_a_collector_may_send() {
        let largest = push_of(bounds::MAX_MESSAGE_BYTES);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    pb::ingest_server::IngestServer::new(Sends(vec![largest.clone()]))
                        .max_encoding_message_size(bounds::MAX_MESSAGE_BYTES),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
        let mut inbound = open_stream(channel, tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        match inbound.message().await {
            Ok(Some(Incoming::Message(m))) => assert_eq!(m, largest),
            other => panic!("the agent did not decode the largest message: {other:?}"),
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_CAP, "{d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..50).map(|_| backoff(10)).collect();
        assert!(samples.len() > 10, "full jitter spreads retries");
    }

    #[test]
    fn the_first_reconnect_after_a_lost_session_is_spread() {
        let spread = Duration::from_secs(30);
        let lost: Vec<_> = (0..1000)
            .map(|_| reconnect_delay(0, true, spread))
            .collect();
        let failed: Vec<_> = (0..1000)
            .map(|_| reconnect_delay(0, false, spread))
            .collect();
        // A fleet losing its collector comes back over the whole window, not in the
        // backoff's first 250 ms.
        assert!(lost.iter().all(|d| *d <= spread + BACKOFF_BASE), "{lost:?}");
        let late = lost.iter().filter(|d| **d > spread / 2).count();
        assert!(
            (400..=600).contains(&late),
            "{late} of 1000 in the second half"
        );
        assert!(failed.iter().all(|d| *d <= BACKOFF_BASE), "{failed:?}");
        // "0s" turns it off.
        assert!((0..100).all(|_| reconnect_delay(0, true, Duration::ZERO) <= BACKOFF_BASE));
    }

    #[test]
    fn the_first_connect_is_spread_only_just_after_boot() {
        let spread = Duration::from_secs(30);
        let booting: Vec<_> = (0..1000)
            .map(|_| start_delay(spread, Duration::from_secs(40)))
            .collect();
        assert!(booting.iter().all(|d| *d <= spread));
        let late = booting.iter().filter(|d| **d > spread / 2).count();
        assert!(
            (400..=600).contains(&late),
            "{late} of 1000 in the second half"
        );
        assert_eq!(start_delay(spread, BOOT_WINDOW), Duration::ZERO);
        assert_eq!(
            start_delay(spread, Duration::from_secs(86_400)),
            Duration::ZERO
        );
        assert_eq!(start_delay(Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }

    /// The status the collector refuses a cloned host with (`sessions::Conflict::status`).
    fn conflict_status(message: &str) -> tonic::Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            edgeprobe_proto::REASON_KEY,
            tonic::metadata::MetadataValue::from_static(edgeprobe_proto::REASON_IDENTITY_CONFLICT),
        );
        tonic::Status::with_metadata(tonic::Code::FailedPrecondition, message, metadata)
    }

    #[test]
    fn refusals_are_told_from_trouble() {
        let refused = SessionEnd::from_status(tonic::Status::invalid_argument("result seq 1: bad"));
        assert!(matches!(refused, SessionEnd::Refused(_)) && refused.is_refusal());
        let denied = SessionEnd::from_status(tonic::Status::permission_denied("not yours"));
        assert!(denied.is_refusal());
        let down = SessionEnd::from_status(tonic::Status::unavailable("connection reset"));
        assert!(matches!(down, SessionEnd::Lost(_)) && !down.is_refusal());
        assert!(!SessionEnd::Protocol("collector closed the stream".into()).is_refusal());
        assert!(!SessionEnd::Closed.is_refusal());

        // The identity conflict is the metadata's reason, whatever the message says.
        let clone = SessionEnd::from_status(conflict_status("refused"));
        assert!(matches!(clone, SessionEnd::IdentityConflict(_)) && clone.is_refusal());
        // A FAILED_PRECONDITION whose words merely mention a conflict is a plain refusal.
        for words in [
            "identity conflict: agent r1 is connected with another incarnation",
            "two hosts use the agent id `r1` (a cloned image?): incarnation `bb` from \
             10.0.0.2:1 is refused while incarnation `aa` from 10.0.0.1:1 is connected",
            "migrating",
        ] {
            let end = SessionEnd::from_status(tonic::Status::failed_precondition(words));
            assert!(matches!(end, SessionEnd::Refused(_)), "{words}: {end:?}");
        }
        // The reason on another code is not a conflict either.
        let mut other = tonic::Status::unavailable("restarting");
        other.metadata_mut().insert(
            edgeprobe_proto::REASON_KEY,
            tonic::metadata::MetadataValue::from_static(edgeprobe_proto::REASON_IDENTITY_CONFLICT),
        );
        assert!(matches!(
            SessionEnd::from_status(other),
            SessionEnd::Lost(_)
        ));
    }

    /// A server that refuses every stream with `status`.
    struct Refuses(tonic::Status);

    #[tonic::async_trait]
    impl pb::ingest_server::Ingest for Refuses {
        type StreamStream = <Sends as pb::ingest_server::Ingest>::StreamStream;

        async fn stream(
            &self,
            _: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            Err(self.0.clone())
        }
    }

    /// How a real stream refused with `status` ends.
    async fn refused_with(status: tonic::Status) -> SessionEnd {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::ingest_server::IngestServer::new(Refuses(status)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
        match open_stream(channel, tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(_) => panic!("the stream was not refused"),
            Err(status) => SessionEnd::from_status(status),
        }
    }

    /// The reason crosses the wire in the status metadata; the message alone does not
    /// make a conflict.
    #[tokio::test]
    async fn the_identity_conflict_is_read_from_the_status_metadata() {
        let end = refused_with(conflict_status("two hosts use the agent id `r1`")).await;
        match end {
            SessionEnd::IdentityConflict(status) => {
                assert_eq!(status.message(), "two hosts use the agent id `r1`")
            }
            other => panic!("{other:?}"),
        }
        let end = refused_with(tonic::Status::failed_precondition(
            "identity conflict: incarnation bb is refused",
        ))
        .await;
        assert!(matches!(end, SessionEnd::Refused(_)), "{end:?}");
    }

    #[test]
    fn an_undecodable_controller_message_is_identified_to_be_refused() {
        let good = pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::FleetTests(pb::FleetTests {
                version: 300,
                tests_toml: "[[test]]\n".into(),
            })),
        }
        .encode_to_vec();
        assert!(matches!(decode_incoming(&good), Ok(Incoming::Message(_))));
        // The same with tests_toml not UTF-8: FleetTests version 300, refused.
        let mut bad = good.clone();
        let at = bad.iter().position(|&b| b == b'[').unwrap();
        bad[at] = 0xff;
        match decode_incoming(&bad) {
            Ok(Incoming::Undecodable { what, error }) => {
                assert_eq!(what, Controller::FleetTests { version: 300 });
                assert!(
                    error.contains("UTF-8") || error.contains("utf-8"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        let answer = refuse_undecodable(Controller::FleetTests { version: 300 }, "x", true, true);
        assert!(matches!(
            answer,
            Some(pb::agent_message::Msg::TestsApplied(pb::TestsApplied { version: 300, ref error }))
                if error.contains("does not decode")
        ));
        assert!(
            refuse_undecodable(Controller::FleetTests { version: 300 }, "x", false, true).is_none()
        );
        // A RunNow whose test name is not UTF-8.
        let mut run = pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::RunNow(pb::RunNow {
                run_id: 9,
                test: "web".into(),
                test_toml: String::new(),
            })),
        }
        .encode_to_vec();
        let at = run.iter().position(|&b| b == b'w').unwrap();
        run[at] = 0xc3;
        assert!(matches!(
            decode_incoming(&run),
            Ok(Incoming::Undecodable {
                what: Controller::RunNow { run_id: 9 },
                ..
            })
        ));
        // Anything else that does not decode ends the stream.
        assert!(decode_incoming(&[0x12, 0x05, 0x08]).is_err());
        assert!(decode_incoming(&[0xff; 12]).is_err());
    }

    #[test]
    fn quarantine_is_logged_per_burst() {
        let mut log = QuarantineLog::default();
        let rejected = |seq| pb::Rejection {
            seq,
            reason: "40 labels, at most 32".into(),
        };
        log.observe(&[rejected(1), rejected(2)]);
        let first = log.logged_at;
        log.observe(&[rejected(3)]);
        assert_eq!((log.burst, log.logged_at), (3, first), "one line per burst");
        log.observe(&[]);
        assert_eq!((log.burst, log.logged_at), (0, None));
    }
}
