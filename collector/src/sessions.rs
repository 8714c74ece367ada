//! The agent sessions open on this collector, at most one per agent id, and the rule that
//! tells a reconnecting agent from a second host using the same id.
//!
//! Invariants:
//! - At most one registered session per agent id.
//! - A hello whose incarnation differs from the live session's comes from another buffer
//!   under the same id: two hosts share the id (and certificate), e.g. a cloned image.
//!   It is refused (`Conflict`), never admitted beside the live one. The refusal is a
//!   FAILED_PRECONDITION whose metadata carries `edgeprobe-reason: identity-conflict`
//!   (`Conflict::status`): agents match that, and the message stays prose for people.
//! - A hello with the live session's incarnation is the same agent reconnecting (its old
//!   connection may be half dead): it replaces the live session, which is told to close.
//! - A live session silent for `STALE` (three agent heartbeats) is taken as dead and
//!   replaced whatever its incarnation: a host re-imaged and back within the transport's
//!   keepalive timeout is not refused for the connection its previous life left behind.
//! - A session leaves the registry when its `Registration` drops, only if it is still the
//!   registered one (a replaced session never removes its successor).
//! - A live session carries its `Control` (once attached after the welcome): what the
//!   controller needs to reach it (hello features, labels) and its control queue. Control
//!   messages never wait: RunNow goes through a small bounded queue (`try_send`), and
//!   FleetTests through a one-message slot that keeps only the latest version.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeprobe_proto::v1 as pb;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Silence after which a live session no longer counts against a new incarnation.
pub const STALE: Duration = Duration::from_secs(45);

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
}

struct Live {
    id: u64,
    incarnation: String,
    peer: String,
    activity: Arc<Activity>,
    close: CancellationToken,
    control: Option<Arc<Control>>,
}

/// RunNow messages queued for one session and not yet taken by its outbound stream.
pub const CONTROL_QUEUE: usize = 16;

/// How the controller reaches one live session.
pub struct Control {
    pub agent_id: String,
    pub labels: BTreeMap<String, String>,
    /// The hello listed "fleet-tests" / "run-now".
    pub fleet_tests: bool,
    pub run_now: bool,
    /// The fleet version the agent last said it applied (0: none yet on this session).
    pub applied: AtomicU64,
    /// The latest FleetTests not yet taken by the outbound stream.
    latest: Mutex<Option<pb::FleetTests>>,
    wake: Notify,
    queue: mpsc::Sender<pb::CollectorMessage>,
}

/// The receiving end of a session's control messages, merged into its outbound stream.
pub struct ControlRx {
    pub control: Arc<Control>,
    pub queue: mpsc::Receiver<pb::CollectorMessage>,
}

impl Control {
    /// A session's control and the receiving end for its outbound stream.
    pub fn channel(
        agent_id: String,
        labels: BTreeMap<String, String>,
        features: &[String],
    ) -> ControlRx {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let has = |f: &str| features.iter().any(|x| x == f);
        let control = Arc::new(Control {
            agent_id,
            labels,
            fleet_tests: has(edgeprobe_proto::FEATURE_FLEET_TESTS),
            run_now: has(edgeprobe_proto::FEATURE_RUN_NOW),
            applied: AtomicU64::new(0),
            latest: Mutex::new(None),
            wake: Notify::new(),
            queue: tx,
        });
        ControlRx { control, queue: rx }
    }

    /// Replaces the FleetTests waiting to go out (if any) with `tests`; never waits.
    pub fn push_fleet(&self, tests: pb::FleetTests) {
        *self.latest.lock().expect("never poisoned") = Some(tests);
        self.wake.notify_one();
    }

    /// Queues a message without waiting; false when the queue is full or the session gone.
    pub fn send(&self, msg: pb::collector_message::Msg) -> bool {
        self.queue
            .try_send(pb::CollectorMessage { msg: Some(msg) })
            .is_ok()
    }

    /// Takes the waiting FleetTests, if any.
    pub fn take_fleet(&self) -> Option<pb::FleetTests> {
        self.latest.lock().expect("never poisoned").take()
    }

    /// Resolves when a FleetTests may be waiting (check with `take_fleet`).
    pub async fn fleet_pushed(&self) {
        self.wake.notified().await
    }
}

/// When a session last received a message.
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// A hello refused because another incarnation of its agent id is connected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "two hosts use the agent id `{agent_id}` (a cloned image?): incarnation `{incarnation}` \
     from {peer} is refused while incarnation `{live_incarnation}` from {live_peer} is \
     connected; give each host its own agent id and certificate"
)]
pub struct Conflict {
    pub agent_id: String,
    pub incarnation: String,
    pub peer: String,
    pub live_incarnation: String,
    pub live_peer: String,
}

impl Conflict {
    /// The status refusing the hello: FAILED_PRECONDITION with this conflict's message
    /// (what agents of the previous release read) and the typed reason in its metadata
    /// (`edgeprobe_proto::REASON_KEY`), what this release's agents match.
    pub fn status(&self) -> tonic::Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            edgeprobe_proto::REASON_KEY,
            tonic::metadata::MetadataValue::from_static(edgeprobe_proto::REASON_IDENTITY_CONFLICT),
        );
        tonic::Status::with_metadata(tonic::Code::FailedPrecondition, self.to_string(), metadata)
    }
}

/// The status that ends a session when the collector stops (SIGTERM or SIGINT): sent after
/// the session's queued batches were committed and acked, on the stream the graceful
/// shutdown's HTTP/2 GOAWAY lets finish. UNAVAILABLE (retry) with the typed reason
/// `edgeprobe_proto::REASON_SHUTDOWN`: this release's agents reconnect at once with their
/// spread; older ones see an UNAVAILABLE and reconnect as after any lost session.
pub fn shutting_down() -> tonic::Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        edgeprobe_proto::REASON_KEY,
        tonic::metadata::MetadataValue::from_static(edgeprobe_proto::REASON_SHUTDOWN),
    );
    tonic::Status::with_metadata(
        tonic::Code::Unavailable,
        "the collector is shutting down; reconnect",
        metadata,
    )
}

/// A session's place in the registry; leaves it on drop.
pub struct Registration {
    sessions: Arc<Sessions>,
    agent_id: String,
    id: u64,
    /// Touched on every message of the session.
    pub activity: Arc<Activity>,
    /// Cancelled when a newer session of the same agent replaces this one.
    pub close: CancellationToken,
    /// The peer of the session this one replaced, if any.
    pub replaced: Option<String>,
}

impl Sessions {
    /// Registers a session of `agent_id` with `incarnation` from `peer`, or refuses it.
    pub fn admit(
        self: &Arc<Self>,
        agent_id: &str,
        incarnation: &str,
        peer: &str,
    ) -> Result<Registration, Conflict> {
        let mut live = self
            .live
            .lock()
            .expect("the registry lock is never poisoned");
        let mut replaced = None;
        if let Some(l) = live.get(agent_id) {
            if l.incarnation != incarnation && l.activity.idle() < STALE {
                return Err(Conflict {
                    agent_id: agent_id.to_string(),
                    incarnation: incarnation.to_string(),
                    peer: peer.to_string(),
                    live_incarnation: l.incarnation.clone(),
                    live_peer: l.peer.clone(),
                });
            }
            l.close.cancel();
            replaced = Some(l.peer.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        let close = CancellationToken::new();
        live.insert(
            agent_id.to_string(),
            Live {
                id,
                incarnation: incarnation.to_string(),
                peer: peer.to_string(),
                activity: activity.clone(),
                close: close.clone(),
                control: None,
            },
        );
        Ok(Registration {
            sessions: self.clone(),
            agent_id: agent_id.to_string(),
            id,
            activity,
            close,
            replaced,
        })
    }
}

impl Sessions {
    /// The controls of every live session that has one.
    pub fn controls(&self) -> Vec<Arc<Control>> {
        let live = self
            .live
            .lock()
            .expect("the registry lock is never poisoned");
        live.values().filter_map(|l| l.control.clone()).collect()
    }
}

impl Sessions {
    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.live
            .lock()
            .expect("the registry lock is never poisoned")
            .len()
    }
}

impl Registration {
    /// Makes the session reachable by the controller, while it is the registered one.
    pub fn attach(&self, control: Arc<Control>) {
        let mut live = self
            .sessions
            .live
            .lock()
            .expect("the registry lock is never poisoned");
        if let Some(l) = live.get_mut(&self.agent_id).filter(|l| l.id == self.id) {
            l.control = Some(control);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = self
            .sessions
            .live
            .lock()
            .expect("the registry lock is never poisoned");
        if live.get(&self.agent_id).is_some_and(|l| l.id == self.id) {
            live.remove(&self.agent_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_incarnation_is_refused_the_same_one_replaces() {
        let sessions = Arc::new(Sessions::default());
        let first = sessions.admit("a1", "aaaa", "10.0.0.1:1").unwrap();
        let conflict = sessions.admit("a1", "bbbb", "10.0.0.2:1").err().unwrap();
        assert_eq!(conflict.live_incarnation, "aaaa");
        assert_eq!(conflict.live_peer, "10.0.0.1:1");
        let text = conflict.to_string();
        assert!(text.contains("two hosts use the agent id `a1` (a cloned image?)"));
        assert!(text.contains("`bbbb`") && text.contains("`aaaa`") && text.contains("10.0.0.1:1"));
        let status = conflict.status();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.message(), text, "previous agents read the message");
        assert_eq!(
            status.metadata().get(edgeprobe_proto::REASON_KEY).unwrap(),
            edgeprobe_proto::REASON_IDENTITY_CONFLICT
        );
        assert!(!first.close.is_cancelled());

        let second = sessions.admit("a1", "aaaa", "10.0.0.1:2").unwrap();
        assert!(
            first.close.is_cancelled(),
            "the old session is told to close"
        );
        assert_eq!(second.replaced.as_deref(), Some("10.0.0.1:1"));
        // The replaced session ending does not remove its successor.
        drop(first);
        assert!(sessions.admit("a1", "bbbb", "10.0.0.2:1").is_err());
        drop(second);
        assert!(sessions.admit("a1", "bbbb", "10.0.0.2:1").is_ok());
        // Other agents are independent.
        assert!(sessions.admit("a2", "cccc", "10.0.0.3:1").is_ok());
    }

    #[test]
    fn a_silent_session_does_not_block_a_new_incarnation() {
        let sessions = Arc::new(Sessions::default());
        let old = sessions.admit("a1", "aaaa", "10.0.0.1:1").unwrap();
        // As if its last message came more than STALE ago.
        let stale = Activity {
            epoch: Instant::now() - STALE - Duration::from_secs(1),
            last_ms: AtomicU64::new(0),
        };
        assert!(stale.idle() >= STALE);
        sessions
            .live
            .lock()
            .unwrap()
            .get_mut("a1")
            .unwrap()
            .activity = Arc::new(stale);
        let new = sessions.admit("a1", "bbbb", "10.0.0.2:1").unwrap();
        assert!(old.close.is_cancelled());
        assert_eq!(new.replaced.as_deref(), Some("10.0.0.1:1"));
    }
}
