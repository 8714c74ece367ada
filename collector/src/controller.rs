//! The collector's live side of the controller (SPEC section 13): pushes the current fleet
//! tests version to the agents connected here, hands run-now requests to them, and writes
//! back what they answer.
//!
//! One task per collector owns a dedicated PostgreSQL connection that LISTENs on
//! `edgeprobe_fleet` and `edgeprobe_runs` (reconnecting with backoff) and also polls every
//! `POLL`: a lost notification delays a push or a run by one poll, never loses it.
//!
//! Invariants:
//! - Nothing here blocks an ingest stream: sessions hand events over with `try_send`, and
//!   control messages reach a session through its `Control` (latest-only FleetTests slot,
//!   bounded RunNow queue), never through a wait.
//! - A session gets FleetTests only when its hello listed "fleet-tests", RunNow only when
//!   it listed "run-now"; an old agent sees neither (its run_agents row: refused).
//! - The current version only grows; each live session gets the latest one (right after
//!   its welcome, and on every new version), with the tests that select it: `agents`
//!   names it, or every `select` label equals its hello label; neither selects all.
//! - A run_agents row is claimed with `UPDATE ... WHERE state = 'pending'`: of two
//!   collectors only the one whose claim returns the row sends, and only the collector
//!   holding the agent's session tries. A request past its `runs.expires_at` is never
//!   sent: an agent that connects later does not run it, and its rows still pending
//!   become `expired` at the next poll.
//! - Rate limit per agent here too: at most one run-now per `run_every`, one speed run-now
//!   per `speed_every`; over it the row becomes rate_limited and nothing is sent.
//! - Agents' answers (TestsApplied, RunStatus, results with a run id) are written in
//!   batches, one statement per kind every `FLUSH`, latest answer per agent.
//! - Nothing is sent that an agent cannot take: a push whose blocks pass
//!   `bounds::MAX_PUSH_BYTES` (or a message past `bounds::MAX_MESSAGE_BYTES`, or a run-now
//!   block past `bounds::MAX_RUN_NOW_BYTES`) is not sent and is recorded as refused with
//!   the reason, like an agent's own refusal; an oversized message would end the agent's
//!   whole stream, results and all.
//! - A version an agent refused (or that could not be sent to it) is not pushed to it
//!   again: the refusal is kept per agent for the current version (in memory, from
//!   `agents.fleet_refused_version` on every poll), and only a new version reaches it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeprobe_proto::bounds;
use edgeprobe_proto::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::pg::Target;
use crate::sessions::{Control, Sessions};

pub const FLEET_CHANNEL: &str = "edgeprobe_fleet";
pub const RUNS_CHANNEL: &str = "edgeprobe_runs";
/// Polled this often besides the notifications.
const POLL: Duration = Duration::from_secs(5);
/// Answers are written this often.
const FLUSH: Duration = Duration::from_millis(200);
/// Dispatches triggered by new sessions are this far apart at least.
const DISPATCH_EVERY: Duration = Duration::from_secs(1);
/// Answers waiting to be written, at most; more are dropped (and logged).
const EVENT_QUEUE: usize = 65_536;
const RECONNECT_BASE: Duration = Duration::from_millis(200);
const RECONNECT_CAP: Duration = Duration::from_secs(10);

use edgeprobe_proto::testdef::run_now::LastRuns;
/// The run-now rate limit, per agent: the rule the agent applies too.
pub use edgeprobe_proto::testdef::run_now::RunNowLimit as RateLimit;

/// One test of a fleet version, as pushed.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetTest {
    pub name: String,
    pub spec_toml: String,
    pub select: BTreeMap<String, String>,
    pub agents: Option<Vec<String>>,
}

impl FleetTest {
    pub fn selects(&self, agent_id: &str, labels: &BTreeMap<String, String>) -> bool {
        edgeprobe_proto::testdef::selects(&self.select, self.agents.as_deref(), agent_id, labels)
    }
}

/// A fleet version: its number and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSet {
    pub version: u64,
    pub tests: Vec<FleetTest>,
}

impl FleetSet {
    /// The `[[test]]` blocks of the tests selecting the agent, joined by a blank line.
    pub fn tests_toml(&self, agent_id: &str, labels: &BTreeMap<String, String>) -> String {
        join_blocks(
            self.tests
                .iter()
                .filter(|t| t.selects(agent_id, labels))
                .map(|t| t.spec_toml.as_str()),
        )
    }

    /// The push for `control`, or why it cannot be sent (its size passes the bounds).
    fn message(&self, control: &Control) -> Result<pb::FleetTests, String> {
        let push = pb::FleetTests {
            version: self.version,
            tests_toml: self.tests_toml(&control.agent_id, &control.labels),
        };
        bounds::fleet_push(push.tests_toml.len())
            .map_err(|e| e.to_string())
            .and_then(|()| fits(pb::collector_message::Msg::FleetTests(push.clone())))
            .map(|()| push)
            .map_err(|e| {
                format!(
                    "not sent by the collector: {e} (a larger message would cut the agent off; \
                     narrow the selection or split the tests, then apply a new version)"
                )
            })
    }
}

/// A push's `tests_toml`: the blocks joined by a newline (each ends with one). `tests
/// apply` measures a push as `push_len` of the same blocks.
pub fn join_blocks<'a>(blocks: impl Iterator<Item = &'a str>) -> String {
    blocks.collect::<Vec<_>>().join("\n")
}

/// The length of `join_blocks` of blocks of these lengths, without building it.
pub fn push_len(block_lens: impl Iterator<Item = usize>) -> usize {
    let (bytes, n) = block_lens.fold((0usize, 0usize), |(b, n), l| (b + l, n + 1));
    bytes + n.saturating_sub(1)
}

/// Whether a message to an agent fits the message bound both peers apply.
fn fits(msg: pb::collector_message::Msg) -> Result<(), String> {
    let len = pb::CollectorMessage { msg: Some(msg) }.encoded_len();
    if len > bounds::MAX_MESSAGE_BYTES {
        return Err(format!(
            "the message is {len} bytes, at most {}",
            bounds::MAX_MESSAGE_BYTES
        ));
    }
    Ok(())
}

/// The current version and the agents that refused it (or could not be sent it).
#[derive(Default)]
struct Current {
    set: Option<Arc<FleetSet>>,
    refused: HashSet<String>,
}

/// What a session hands to the controller.
#[derive(Debug)]
enum Event {
    Applied {
        agent_id: String,
        version: u64,
        error: String,
    },
    Status {
        agent_id: String,
        run_id: u64,
        state: &'static str,
        reason: String,
    },
    Done {
        agent_id: String,
        run_id: i64,
    },
    /// A session attached: a run waiting for its agent can go now.
    SessionStarted,
}

/// The sessions' side of the controller; cheap to clone, never waits.
#[derive(Clone)]
pub struct Handle {
    events: mpsc::Sender<Event>,
    current: Arc<Mutex<Current>>,
    metrics: Arc<Metrics>,
}

impl Handle {
    /// A new session, attached to the registry: gets the current version now if it
    /// speaks fleet-tests (a version loaded later reaches it through the registry).
    pub fn session_started(&self, control: &Control) {
        if control.run_now {
            self.event(Event::SessionStarted);
        }
        if !control.fleet_tests {
            return;
        }
        let set = {
            let current = self.current.lock().expect("never poisoned");
            match &current.set {
                // A refused version is not pushed again to the agent that refused it.
                Some(set) if !current.refused.contains(&control.agent_id) => set.clone(),
                _ => return,
            }
        };
        self.push(control, &set);
    }

    /// Pushes `set` to a session, or records why it cannot be sent.
    fn push(&self, control: &Control, set: &FleetSet) {
        match set.message(control) {
            Ok(m) => control.push_fleet(m),
            Err(reason) => {
                tracing::warn!(agent_id = %control.agent_id, version = set.version, "fleet tests not sent to the agent: {reason}");
                self.refused(&control.agent_id, set.version, reason);
            }
        }
    }

    /// Records a refusal of `version` by (or for) an agent: counted, written to its
    /// agents row, and remembered so the version is not pushed to it again.
    fn refused(&self, agent_id: &str, version: u64, reason: String) {
        self.metrics.fleet_refused.inc();
        {
            let mut current = self.current.lock().expect("never poisoned");
            if current.set.as_ref().is_some_and(|s| s.version == version) {
                current.refused.insert(agent_id.to_string());
            }
        }
        self.event(Event::Applied {
            agent_id: agent_id.to_string(),
            version,
            error: reason,
        });
    }

    pub fn tests_applied(&self, control: &Control, applied: pb::TestsApplied) {
        if applied.error.is_empty() {
            control
                .applied
                .fetch_max(applied.version, Ordering::Relaxed);
            self.event(Event::Applied {
                agent_id: control.agent_id.clone(),
                version: applied.version,
                error: String::new(),
            });
        } else {
            // Stored as text: no NUL, at most the error bound.
            let (reason, _) = bounds::fit_error_message(&applied.error);
            tracing::warn!(agent_id = %control.agent_id, version = applied.version, "the agent refused the fleet tests: {reason}");
            self.refused(&control.agent_id, applied.version, reason);
        }
    }

    pub fn run_status(&self, agent_id: &str, status: pb::RunStatus) {
        let state = match pb::run_status::State::try_from(status.state) {
            Ok(pb::run_status::State::Started) => "started",
            Ok(pb::run_status::State::Waiting) => "waiting",
            // An agent refuses a request whose expiry passed before it could start: the
            // run expired (as an unsent request does), nobody refused it.
            Ok(pb::run_status::State::Refused)
                if status.reason == edgeprobe_proto::testdef::run_now::REASON_EXPIRED =>
            {
                "expired"
            }
            Ok(pb::run_status::State::Refused) => "refused",
            _ => {
                tracing::debug!(%agent_id, state = status.state, "ignoring a run status of unknown state");
                return;
            }
        };
        self.metrics
            .run_now_requests
            .with_label_values(&[state])
            .inc();
        // Stored as text: no NUL, at most the error bound.
        let (reason, _) = bounds::fit_error_message(&status.reason);
        if state == "refused" {
            tracing::info!(%agent_id, run_id = status.run_id, "the agent refused a run-now: {reason}");
        }
        self.event(Event::Status {
            agent_id: agent_id.to_string(),
            run_id: status.run_id,
            state,
            reason,
        });
    }

    /// A result taken for run `run_id` was committed.
    pub fn run_done(&self, agent_id: &str, run_id: i64) {
        self.metrics
            .run_now_requests
            .with_label_values(&["done"])
            .inc();
        self.event(Event::Done {
            agent_id: agent_id.to_string(),
            run_id,
        });
    }

    fn event(&self, e: Event) {
        if let Err(e) = self.events.try_send(e) {
            tracing::warn!("controller queue full, an agent's answer is not recorded: {e}");
        }
    }
}

/// Starts the controller task on `tasks` (it returns on `shutdown`); returns the sessions'
/// handle.
pub fn start(
    target: Target,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    limit: RateLimit,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Handle {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let handle = Handle {
        events: tx,
        current: Default::default(),
        metrics: metrics.clone(),
    };
    let controller = Controller {
        target,
        sessions,
        metrics,
        limit,
        handle: handle.clone(),
        current: handle.current.clone(),
        events: rx,
        last_run: HashMap::new(),
        pending: Pending::default(),
    };
    tasks.spawn(controller.run(shutdown));
    handle
}

#[derive(Default)]
struct Pending {
    applied: HashMap<String, (u64, String)>,
    status: HashMap<(u64, String), (&'static str, String)>,
    done: Vec<(i64, String)>,
    /// A session started since the last dispatch.
    dispatch: bool,
}

impl Pending {
    fn add(&mut self, e: Event) {
        match e {
            Event::Applied {
                agent_id,
                version,
                error,
            } => {
                self.applied.insert(agent_id, (version, error));
            }
            Event::Status {
                agent_id,
                run_id,
                state,
                reason,
            } => {
                self.status.insert((run_id, agent_id), (state, reason));
            }
            Event::Done { agent_id, run_id } => self.done.push((run_id, agent_id)),
            Event::SessionStarted => self.dispatch = true,
        }
    }

    fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.status.is_empty() && self.done.is_empty()
    }
}

struct Controller {
    target: Target,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    limit: RateLimit,
    /// Records refusals found while pushing.
    handle: Handle,
    current: Arc<Mutex<Current>>,
    events: mpsc::Receiver<Event>,
    /// Per agent: when this collector last sent it a run-now, and a speed run-now.
    last_run: HashMap<String, LastRuns>,
    pending: Pending,
}

impl Controller {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_CAP);
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.target.connect_notifying() => c,
            };
            let delay = match connected {
                Ok((client, notes)) => {
                    backoff.reset();
                    match self.serve(&client, notes, &shutdown).await {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(
                            "controller: database connection lost, reconnecting: {e}"
                        ),
                    }
                    backoff.next()
                }
                Err(e) => {
                    let delay = backoff.next();
                    tracing::warn!(
                        retry_in_ms = delay.as_millis() as u64,
                        "controller: cannot connect to postgres: {}",
                        crate::pg::describe(&e)
                    );
                    delay
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Serves on one connection until shutdown (Ok) or a database error.
    async fn serve(
        &mut self,
        client: &Client,
        mut notes: mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let describe = |e: tokio_postgres::Error| crate::pg::describe(&e);
        client
            .batch_execute(&format!("LISTEN {FLEET_CHANNEL}; LISTEN {RUNS_CHANNEL}"))
            .await
            .map_err(describe)?;
        tracing::info!("controller: listening for fleet versions and runs");
        // What a notification lost before the LISTEN would have said.
        self.check_version(client).await.map_err(describe)?;
        self.dispatch_runs(client).await.map_err(describe)?;
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_dispatch = Instant::now();
        let mut flush = tokio::time::interval(FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = notes.recv() => match n {
                    Some(n) if n.channel() == FLEET_CHANNEL => {
                        self.check_version(client).await.map_err(describe)?
                    }
                    Some(n) if n.channel() == RUNS_CHANNEL => {
                        self.dispatch_runs(client).await.map_err(describe)?
                    }
                    Some(_) => {}
                    None => return Err("the connection ended".into()),
                },
                _ = poll.tick() => {
                    self.check_version(client).await.map_err(describe)?;
                    self.load_refusals(client).await.map_err(describe)?;
                    self.dispatch_runs(client).await.map_err(describe)?;
                    expire_runs(client).await.map_err(describe)?;
                    self.count_behind();
                }
                _ = flush.tick() => {
                    self.flush(client).await.map_err(describe)?;
                    // Runs for agents that just connected go at the next flush, once per
                    // second at most while a fleet reconnects.
                    if self.pending.dispatch && last_dispatch.elapsed() >= DISPATCH_EVERY {
                        self.pending.dispatch = false;
                        last_dispatch = Instant::now();
                        self.dispatch_runs(client).await.map_err(describe)?;
                    }
                }
                e = self.events.recv(), if !self.events.is_closed() || !self.events.is_empty() => {
                    if let Some(e) = e {
                        self.pending.add(e);
                    }
                }
            }
        }
    }

    fn current(&self) -> Option<Arc<FleetSet>> {
        self.current.lock().expect("never poisoned").set.clone()
    }

    /// Adds the refusals of the current version recorded by any collector (this one's
    /// are in memory already): an agent that refused it is not pushed it again here
    /// either, after a reconnect to this collector or a restart of it.
    async fn load_refusals(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let Some(version) = self.current().map(|c| c.version) else {
            return Ok(());
        };
        let rows = client
            .query(
                "SELECT agent_id FROM agents WHERE fleet_refused_version = $1",
                &[&(version as i64)],
            )
            .await?;
        let mut current = self.current.lock().expect("never poisoned");
        if current.set.as_ref().is_some_and(|s| s.version == version) {
            current
                .refused
                .extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        Ok(())
    }

    async fn check_version(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let row = client
            .query_one("SELECT max(version) FROM fleet_versions", &[])
            .await?;
        let Some(latest) = row.get::<_, Option<i64>>(0) else {
            return Ok(());
        };
        let latest = latest as u64;
        if self.current().is_some_and(|c| c.version >= latest) {
            return Ok(());
        }
        let rows = client
            .query(
                "SELECT name, spec_toml, select_labels, agents FROM fleet_tests
                  WHERE version = $1 ORDER BY name",
                &[&(latest as i64)],
            )
            .await?;
        let tests = rows
            .into_iter()
            .map(|r| {
                let select: serde_json::Value = r.get(2);
                FleetTest {
                    name: r.get(0),
                    spec_toml: r.get(1),
                    select: serde_json::from_value(select).unwrap_or_default(),
                    agents: r.get(3),
                }
            })
            .collect();
        let set = Arc::new(FleetSet {
            version: latest,
            tests,
        });
        // Current first, then the registry: a session attached meanwhile is reached by
        // one or the other (`Handle::session_started` reads current after attaching).
        *self.current.lock().expect("never poisoned") = Current {
            set: Some(set.clone()),
            refused: HashSet::new(),
        };
        // Refusals recorded before this collector loaded the version (it restarted).
        self.load_refusals(client).await?;
        let refused = self.current.lock().expect("never poisoned").refused.clone();
        self.metrics.fleet_version.set(latest as i64);
        let started = Instant::now();
        let mut pushed = 0usize;
        for control in self.sessions.controls() {
            if control.fleet_tests && !refused.contains(&control.agent_id) {
                self.handle.push(&control, &set);
                pushed += 1;
            }
        }
        tracing::info!(
            version = latest,
            tests = set.tests.len(),
            sessions = pushed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pushing fleet tests"
        );
        self.count_behind();
        Ok(())
    }

    fn count_behind(&self) {
        let Some(current) = self.current() else {
            self.metrics.fleet_agents_behind.set(0);
            return;
        };
        // A refused version counts as not applied (`tests list` tells the two apart).
        let behind = self
            .sessions
            .controls()
            .iter()
            .filter(|c| c.fleet_tests && c.applied.load(Ordering::Relaxed) < current.version)
            .count();
        self.metrics.fleet_agents_behind.set(behind as i64);
    }

    /// Sends the pending run requests of the agents connected here.
    async fn dispatch_runs(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let controls: HashMap<String, Arc<Control>> = self
            .sessions
            .controls()
            .into_iter()
            .map(|c| (c.agent_id.clone(), c))
            .collect();
        if controls.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = controls.keys().map(String::as_str).collect();
        let rows = client
            .query(
                "SELECT ra.run_id, ra.agent_id, r.test, r.spec_toml,
                        COALESCE(r.kind, (SELECT ft.kind FROM fleet_tests ft
                                           WHERE ft.name = r.test
                                           ORDER BY ft.version DESC LIMIT 1), ''),
                        (extract(epoch FROM r.expires_at) * 1e9)::int8
                   FROM run_agents ra JOIN runs r USING (run_id)
                  WHERE ra.state = 'pending' AND ra.agent_id = ANY($1)
                    AND r.expires_at > now()
                  ORDER BY ra.run_id",
                &[&ids],
            )
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut decided: Vec<(i64, String, &'static str, Option<String>)> = Vec::new();
        let mut messages: HashMap<(i64, String), pb::RunNow> = HashMap::new();
        for r in rows {
            let run_id: i64 = r.get(0);
            let agent_id: String = r.get(1);
            let test: String = r.get(2);
            let spec_toml: String = r.get(3);
            let kind: String = r.get(4);
            let expires_unix_nanos: i64 = r.get(5);
            let control = &controls[&agent_id];
            let run = pb::RunNow {
                run_id: run_id as u64,
                test,
                test_toml: spec_toml,
                // The agent refuses the run when it cannot start it before this.
                expires_unix_nanos: Some(expires_unix_nanos),
            };
            let (state, reason) = if !control.run_now {
                ("refused", Some("agent too old for run-now".to_string()))
            } else if let Err(e) = sendable(&run) {
                ("refused", Some(e))
            } else if !self.allow(&agent_id, kind == "speed", now) {
                (
                    "rate_limited",
                    Some(format!(
                        "at most one run-now per {:?} per agent ({:?} for speed tests)",
                        self.limit.run_every, self.limit.speed_every
                    )),
                )
            } else {
                messages.insert((run_id, agent_id.clone()), run);
                ("sent", None)
            };
            decided.push((run_id, agent_id, state, reason));
        }
        let run_ids: Vec<i64> = decided.iter().map(|d| d.0).collect();
        let agents: Vec<&str> = decided.iter().map(|d| d.1.as_str()).collect();
        let states: Vec<&str> = decided.iter().map(|d| d.2).collect();
        let reasons: Vec<Option<&str>> = decided.iter().map(|d| d.3.as_deref()).collect();
        // The claim: only rows still pending are ours.
        let claimed = client
            .query(
                "UPDATE run_agents ra SET state = v.state, reason = v.reason, updated_at = now()
                   FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[])
                        AS v(run_id, agent_id, state, reason)
                  WHERE ra.run_id = v.run_id AND ra.agent_id = v.agent_id
                    AND ra.state = 'pending'
                 RETURNING ra.run_id, ra.agent_id, ra.state",
                &[&run_ids, &agents, &states, &reasons],
            )
            .await?;
        let mut undeliverable = Vec::new();
        for row in claimed {
            let run_id: i64 = row.get(0);
            let agent_id: String = row.get(1);
            let state: String = row.get(2);
            let state = match state.as_str() {
                "sent" => {
                    let msg = messages.remove(&(run_id, agent_id.clone()));
                    let sent = msg.is_some_and(|m| {
                        controls[&agent_id].send(pb::collector_message::Msg::RunNow(m))
                    });
                    if !sent {
                        undeliverable.push((run_id, agent_id.clone()));
                        "undeliverable"
                    } else {
                        "sent"
                    }
                }
                "refused" => "refused",
                _ => "rate_limited",
            };
            tracing::info!(run_id, %agent_id, state, "run-now");
            self.metrics
                .run_now_requests
                .with_label_values(&[state])
                .inc();
        }
        for (run_id, agent_id) in undeliverable {
            self.pending.status.insert(
                (run_id as u64, agent_id),
                (
                    "refused",
                    "the agent's session could not take the request (its queue was full)"
                        .to_string(),
                ),
            );
        }
        Ok(())
    }

    /// The collector-side rate limit: true (and counted) when the agent may get a run now.
    fn allow(&mut self, agent_id: &str, speed: bool, now: Instant) -> bool {
        let last = self.last_run.entry(agent_id.to_string()).or_default();
        if self.limit.admit(last, speed, now).is_err() {
            return false;
        }
        // Forget agents whose limits have all passed, so the map follows the live fleet.
        if self.last_run.len() > 4 * self.sessions.len().max(1024) {
            let limit = self.limit;
            self.last_run.retain(|_, last| !limit.expired(last, now));
        }
        true
    }

    /// Writes the answers gathered since the last flush.
    async fn flush(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        while let Ok(e) = self.events.try_recv() {
            self.pending.add(e);
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let had_applied = !self.pending.applied.is_empty();
        // Kept for the next connection when the write fails.
        write(client, &self.pending).await?;
        self.pending = Pending {
            dispatch: self.pending.dispatch,
            ..Pending::default()
        };
        if had_applied {
            self.count_behind();
        }
        Ok(())
    }
}

/// Marks the agents of expired requests that were never sent `expired` (any collector may:
/// the update is idempotent).
async fn expire_runs(client: &Client) -> Result<(), tokio_postgres::Error> {
    let n = client
        .execute(
            "UPDATE run_agents ra SET state = 'expired',
                    reason = 'no session before the request expired; not sent', updated_at = now()
               FROM runs r
              WHERE ra.run_id = r.run_id AND ra.state = 'pending' AND r.expires_at <= now()",
            &[],
        )
        .await?;
    if n > 0 {
        tracing::info!(agents = n, "run-now requests expired unsent");
    }
    Ok(())
}

/// Whether a run-now may be sent: its ad-hoc block within `MAX_RUN_NOW_BYTES` and the
/// message within the message bound.
fn sendable(run: &pb::RunNow) -> Result<(), String> {
    if run.test_toml.len() > bounds::MAX_RUN_NOW_BYTES {
        return Err(format!(
            "not sent by the collector: the ad-hoc test is {} bytes, at most {}",
            run.test_toml.len(),
            bounds::MAX_RUN_NOW_BYTES
        ));
    }
    fits(pb::collector_message::Msg::RunNow(run.clone()))
        .map_err(|e| format!("not sent by the collector: {e}"))
}

async fn write(client: &Client, p: &Pending) -> Result<(), tokio_postgres::Error> {
    if !p.applied.is_empty() {
        let ids: Vec<&str> = p.applied.keys().map(String::as_str).collect();
        let versions: Vec<i64> = p.applied.values().map(|v| v.0 as i64).collect();
        let errors: Vec<&str> = p.applied.values().map(|v| v.1.as_str()).collect();
        // A refusal of the version the agent had applied means it does not run it any
        // more (it refused it at its start, beside a new local test of the same name):
        // the applied version is cleared rather than left claiming it runs.
        client
            .execute(
                "UPDATE agents SET
                    fleet_version = CASE WHEN v.error = '' THEN v.version
                                         WHEN agents.fleet_version = v.version THEN NULL
                                         ELSE agents.fleet_version END,
                    fleet_applied_at = CASE WHEN v.error = '' THEN now() ELSE agents.fleet_applied_at END,
                    fleet_refused_version = CASE WHEN v.error = '' THEN NULL ELSE v.version END,
                    fleet_error = CASE WHEN v.error = '' THEN NULL ELSE v.error END
                   FROM unnest($1::text[], $2::int8[], $3::text[]) AS v(agent_id, version, error)
                  WHERE agents.agent_id = v.agent_id",
                &[&ids, &versions, &errors],
            )
            .await?;
    }
    if !p.status.is_empty() {
        let run_ids: Vec<i64> = p.status.keys().map(|k| k.0 as i64).collect();
        let agents: Vec<&str> = p.status.keys().map(|k| k.1.as_str()).collect();
        let states: Vec<&str> = p.status.values().map(|v| v.0).collect();
        let reasons: Vec<Option<&str>> = p
            .status
            .values()
            .map(|v| (!v.1.is_empty()).then_some(v.1.as_str()))
            .collect();
        // A late status never undoes 'done'.
        client
            .execute(
                "UPDATE run_agents ra SET state = v.state, reason = v.reason, updated_at = now()
                   FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[])
                        AS v(run_id, agent_id, state, reason)
                  WHERE ra.run_id = v.run_id AND ra.agent_id = v.agent_id AND ra.state <> 'done'",
                &[&run_ids, &agents, &states, &reasons],
            )
            .await?;
    }
    if !p.done.is_empty() {
        let run_ids: Vec<i64> = p.done.iter().map(|d| d.0).collect();
        let agents: Vec<&str> = p.done.iter().map(|d| d.1.as_str()).collect();
        client
            .execute(
                "UPDATE run_agents ra SET state = 'done', reason = NULL, updated_at = now()
                   FROM (SELECT DISTINCT * FROM unnest($1::int8[], $2::text[])) AS v(run_id, agent_id)
                  WHERE ra.run_id = v.run_id AND ra.agent_id = v.agent_id AND ra.state <> 'done'",
                &[&run_ids, &agents],
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test(name: &str, select: &[(&str, &str)], agents: Option<&[&str]>) -> FleetTest {
        FleetTest {
            name: name.into(),
            spec_toml: format!("[[test]]\nname = \"{name}\"\n"),
            select: select
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agents: agents.map(|a| a.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn a_test_selects_by_id_or_by_every_label() {
        let set = FleetSet {
            version: 3,
            tests: vec![
                test("all", &[], None),
                test("berlin", &[("site", "berlin")], None),
                test("berlin-lte", &[("site", "berlin"), ("link", "lte")], None),
                test("named", &[], Some(&["b-1"])),
            ],
        };
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let names = |toml: String| {
            toml.lines()
                .filter_map(|l| l.strip_prefix("name = "))
                .map(|n| n.trim_matches('"').to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(set.tests_toml("b-1", &labels(&[("site", "berlin")]))),
            ["all", "berlin", "named"]
        );
        assert_eq!(
            names(set.tests_toml("b-2", &labels(&[("site", "berlin"), ("link", "lte")]))),
            ["all", "berlin", "berlin-lte"]
        );
        assert_eq!(names(set.tests_toml("p-1", &labels(&[]))), ["all"]);
        assert!(set.tests_toml("p-1", &labels(&[])).ends_with('\n'));
    }

    #[test]
    fn push_len_measures_the_joined_blocks() {
        for blocks in [vec![], vec!["a\n"], vec!["a\n", "bb\n", "ccc\n"]] {
            assert_eq!(
                push_len(blocks.iter().map(|b| b.len())),
                join_blocks(blocks.iter().copied()).len()
            );
        }
    }

    #[tokio::test]
    async fn a_push_over_the_bound_is_not_sent_and_a_refused_version_not_pushed_again() {
        let (tx, mut rx) = mpsc::channel(16);
        let metrics = Arc::new(Metrics::new());
        let handle = Handle {
            events: tx,
            current: Default::default(),
            metrics: metrics.clone(),
        };
        let features = [edgeprobe_proto::FEATURE_FLEET_TESTS.to_string()];
        let session = |id: &str| Control::channel(id.into(), BTreeMap::new(), &features);
        // One block of a little over the push bound, for agent "big" only.
        let mut huge = test("huge", &[], Some(&["big"]));
        huge.spec_toml
            .push_str(&"# x\n".repeat(bounds::MAX_PUSH_BYTES / 4 + 1));
        let set = FleetSet {
            version: 7,
            tests: vec![test("small", &[], None), huge],
        };
        handle.current.lock().unwrap().set = Some(Arc::new(set));

        let small = session("small-agent");
        handle.session_started(&small.control);
        assert_eq!(small.control.take_fleet().map(|m| m.version), Some(7));

        let big = session("big");
        handle.session_started(&big.control);
        assert!(
            big.control.take_fleet().is_none(),
            "nothing over the bound is sent"
        );
        match rx.try_recv().unwrap() {
            Event::Applied {
                agent_id,
                version,
                error,
            } => {
                assert_eq!((agent_id.as_str(), version), ("big", 7));
                assert!(error.contains("at most 1000000 in one push"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(metrics.fleet_refused.get(), 1);
        // Reconnects: not pushed, not counted again.
        handle.session_started(&big.control);
        assert!(big.control.take_fleet().is_none());
        assert!(rx.try_recv().is_err());
        assert_eq!(metrics.fleet_refused.get(), 1);

        // An agent's own refusal is remembered the same way.
        handle.tests_applied(
            &small.control,
            pb::TestsApplied {
                version: 7,
                error: "bad\0reason".into(),
            },
        );
        match rx.try_recv().unwrap() {
            Event::Applied { error, .. } => assert_eq!(error, "bad\u{fffd}reason"),
            other => panic!("{other:?}"),
        }
        handle.session_started(&small.control);
        assert!(small.control.take_fleet().is_none());
    }

    #[test]
    fn a_run_now_that_cannot_be_sent_is_refused() {
        let run = |toml: String| pb::RunNow {
            run_id: 1,
            test: "t".into(),
            test_toml: toml,
            expires_unix_nanos: None,
        };
        assert!(sendable(&run("[[test]]\n".into())).is_ok());
        let e = sendable(&run("#".repeat(bounds::MAX_RUN_NOW_BYTES + 1))).unwrap_err();
        assert!(e.contains("at most 65536"), "{e}");
    }

    #[test]
    fn rate_limit_per_agent_and_for_speed() {
        let (tx, rx) = mpsc::channel(1);
        let handle = Handle {
            events: tx,
            current: Default::default(),
            metrics: Arc::new(Metrics::new()),
        };
        let mut c = Controller {
            target: Target::parse("postgres://localhost/x").unwrap(),
            sessions: Default::default(),
            metrics: Arc::new(Metrics::new()),
            limit: RateLimit::default(),
            handle,
            current: Default::default(),
            events: rx,
            last_run: HashMap::new(),
            pending: Pending::default(),
        };
        let t0 = Instant::now();
        assert!(c.allow("a", true, t0));
        assert!(!c.allow("a", false, t0 + Duration::from_secs(5)));
        assert!(c.allow("b", false, t0 + Duration::from_secs(5)));
        assert!(c.allow("a", false, t0 + Duration::from_secs(11)));
        assert!(!c.allow("a", true, t0 + Duration::from_secs(30)));
        assert!(c.allow("a", true, t0 + Duration::from_secs(61)));
    }
}
