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
//! synchronises it with the rest of the fleet. A collector stopping on SIGTERM ends every
//! session with UNAVAILABLE and `edgeprobe-reason: shutdown` (then HTTP/2 GOAWAY closes
//! the connection): the agent reconnects at once with the spread and the backoff reset,
//! to the next endpoint, rather than finding a dead connection at its next send.
//!
//! Files: `codec.rs` (the stream and its codec: what an undecodable controller message
//! is), `end.rs` (`SessionEnd`, how a session ended and the identity-conflict reason).
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

mod codec;
mod end;

pub use codec::{decode_incoming, open_stream, Controller, Incoming, UplinkCodec};
use codec::{kind_name, refuse_undecodable};
use end::with_sources;
pub use end::SessionEnd;

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
            // A collector that announced its shutdown is no failure: reconnect at once,
            // spread like the rest of the fleet that heard it too, the backoff not grown.
            let stopping = matches!(end, SessionEnd::CollectorStopping(_));
            if stopping || (!end.is_refusal() && (acked || started.elapsed() >= STABLE_SESSION)) {
                attempt = 0;
            }
            let delay = reconnect_delay(attempt, welcomed || stopping, spread);
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
                SessionEnd::CollectorStopping(_) => tracing::info!(
                    endpoint = %endpoint,
                    retry_in_ms = delay.as_millis() as u64,
                    "the collector is shutting down (it acked what it committed); reconnecting, spread over reconnect_spread"
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

/// A session that ended, and how far it got.
struct Ended {
    /// The collector welcomed the session: losing it may be losing the collector, which
    /// the whole fleet then does at once.
    welcomed: bool,
    /// The session got at least one ack.
    acked: bool,
    end: SessionEnd,
}

/// Corrects the buffered results once a base is known (logged, never fatal: the uplink
/// corrects what it sends anyway).
pub async fn correct_in_background(clock: Clock, buffer: Buffer) {
    if let Err(e) = record::correct_buffered(&clock, &buffer).await {
        tracing::warn!("cannot correct the start time of buffered results: {e}");
    }
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
