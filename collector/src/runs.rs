//! run-now requests in PostgreSQL (SPEC section 13): [`create`] resolves the selected agents
//! from `agents`, inserts `runs` + `run_agents` (pending) and notifies `edgeprobe_runs`;
//! [`status`] reads the agents' states and the results that carry the run id, and
//! [`Status::summary`] sorts the agents into done / offline / busy / refused. The collector
//! holding an agent's session moves `run_agents` on (sessions.rs); the `run-now` CLI and
//! the HTTP API both call these.
//!
//! Invariants: a run names a test every selected agent may know (a current fleet test or a
//! local test of one of them) or carries an ad-hoc block checked by the agent's own parser;
//! the run and its agents are inserted and notified in one transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use edgeprobe_proto::testdef::run_now::RunNowLimit;
use edgeprobe_proto::testdef::{
    from_toml, parse_adhoc_test, IpFamily, Kind, TestOptions, TestsOnly,
};
use serde::Serialize;
use tokio_postgres::types::Json;
use tokio_postgres::{Client, GenericClient};

use crate::fleet::{self, FleetError, Selection};

/// An agent still `pending` this long after the run was made has no live session: offline.
pub const DISPATCH_WINDOW: Duration = Duration::from_secs(5);

/// The whole-run wait unless given: a speed test waits 2 x its duration + 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request may wait for its agents unless given: an agent that connects later
/// never runs it ("run-now" means now).
pub const DEFAULT_EXPIRES: Duration = Duration::from_secs(30);

/// The longest expiry accepted: a request that waits longer is a schedule, not run-now.
pub const MAX_EXPIRES: Duration = Duration::from_secs(3600);

/// What to run.
#[derive(Debug, Clone)]
pub enum RunTest {
    /// A fleet test or a test of the agents' own files, by name.
    Named(String),
    /// A one-off test: kind, target, options (`k=v`, the value an integer, true|false, or a
    /// string), and a name (default `run-now`).
    Adhoc {
        kind: String,
        target: String,
        options: Vec<(String, String)>,
        name: Option<String>,
    },
}

/// A run-now request: agents by labels (all must match) or by ids, the test, and how
/// long it may wait for an agent to connect.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub selection: Selection,
    pub test: RunTest,
    /// Sent to no agent after this long ([`DEFAULT_EXPIRES`] unless given).
    pub expires: Duration,
}

/// A run as created.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Created {
    pub run_id: i64,
    pub test: String,
    pub kind: Option<String>,
    /// The ad-hoc block sent to the agents ('' for a named test).
    pub spec_toml: String,
    /// The agents asked, by id.
    pub agents: Vec<String>,
    /// Requested ids not in `agents` (never seen by a collector): not asked.
    pub unknown: Vec<String>,
    /// When the request expires (RFC 3339, UTC): no agent is sent it after that.
    pub expires_at: String,
    /// How long a client should wait for the results, by default.
    #[serde(skip)]
    pub timeout: Duration,
}

/// Builds the `[[test]]` block of an ad-hoc test and checks it as the agent will.
pub fn adhoc_block(
    kind: &str,
    target: &str,
    options: &[(String, String)],
    name: Option<&str>,
) -> Result<String, FleetError> {
    let mut test = toml::Table::new();
    test.insert("name".into(), name.unwrap_or("run-now").into());
    test.insert("kind".into(), kind.into());
    test.insert("target".into(), target.into());
    if !options.is_empty() {
        let mut opts = toml::Table::new();
        for (k, v) in options {
            let value = if let Ok(i) = v.parse::<i64>() {
                toml::Value::Integer(i)
            } else if let Ok(b) = v.parse::<bool>() {
                toml::Value::Boolean(b)
            } else {
                toml::Value::String(v.clone())
            };
            opts.insert(k.clone(), value);
        }
        test.insert("options".into(), toml::Value::Table(opts));
    }
    let mut doc = toml::Table::new();
    doc.insert(
        "test".into(),
        toml::Value::Array(vec![toml::Value::Table(test)]),
    );
    let text = toml::to_string(&doc).map_err(|e| FleetError::Invalid(e.to_string()))?;
    if text.len() > edgeprobe_proto::bounds::MAX_RUN_NOW_BYTES {
        return Err(FleetError::Invalid(format!(
            "the ad-hoc test is {} bytes, at most {} in one run-now",
            text.len(),
            edgeprobe_proto::bounds::MAX_RUN_NOW_BYTES
        )));
    }
    parse_adhoc_test(&text, "run-now").map_err(|e| {
        FleetError::Invalid(format!(
            "{e} (the ad-hoc test, as built from the flags:\n{text})"
        ))
    })?;
    Ok(text)
}

/// The default wait for a test block: the test's whole-run limit (the agent's, from the
/// test definition: speed 2 x duration + 30 s), and never less than [`DEFAULT_TIMEOUT`].
/// `spec_toml` is empty for a test the agents run by name from their own files.
fn timeout_of(kind: Option<&str>, spec_toml: &str) -> Duration {
    let test = from_toml::<TestsOnly>(spec_toml, "run-now")
        .ok()
        .and_then(|t| t.tests.into_iter().next());
    let limit = match (test, kind.and_then(|k| k.parse::<Kind>().ok())) {
        // family = "both": one run per family, one after the other.
        (Some(test), _) => test.timeout() * results_per_run(spec_toml) as u32,
        (None, Some(kind)) => TestOptions::default().timeout_for(kind),
        (None, None) => DEFAULT_TIMEOUT,
    };
    limit.max(DEFAULT_TIMEOUT)
}

/// Resolves the agents, checks the test, inserts the run and notifies the collectors.
pub async fn create(
    client: &mut Client,
    req: &RunRequest,
    created_by: &str,
) -> Result<Created, FleetError> {
    fleet::check_schema(&*client).await?;
    if req.expires.is_zero() || req.expires > MAX_EXPIRES {
        return Err(FleetError::Invalid(format!(
            "expires {}: give 1s to {} (run-now means now)",
            humantime::format_duration(req.expires),
            humantime::format_duration(MAX_EXPIRES)
        )));
    }
    if req.selection.agents.as_ref().is_some_and(|a| a.is_empty()) {
        return Err(FleetError::Invalid("no agent ids given".into()));
    }
    let known = fleet::known_agents(&*client).await?;
    let chosen: Vec<&fleet::KnownAgent> =
        known.iter().filter(|a| req.selection.selects(a)).collect();
    let unknown: Vec<String> = match &req.selection.agents {
        Some(ids) => ids
            .iter()
            .filter(|id| !known.iter().any(|a| a.agent_id == **id))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    if chosen.is_empty() {
        return Err(FleetError::Invalid(match &req.selection.agents {
            Some(_) => format!("no known agent among {}", unknown.join(", ")),
            None => format!(
                "no known agent carries the labels {}",
                req.selection.describe()
            ),
        }));
    }
    let (test, kind, spec_toml) = match &req.test {
        RunTest::Named(name) => {
            let fleet_kind = match fleet::current_version(&*client).await? {
                Some(v) => fleet::tests_of(&*client, v.version)
                    .await?
                    .into_iter()
                    .find(|t| t.name == *name)
                    .map(|t| (t.kind, t.spec_toml)),
                None => None,
            };
            let local = chosen.iter().any(|a| a.local_tests.contains(name));
            if fleet_kind.is_none() && !local {
                return Err(FleetError::Invalid(format!(
                    "no test named `{name}`: neither a current fleet test nor a local test of the selected agents (see `edgeprobe-collector tests list`)"
                )));
            }
            match fleet_kind {
                Some((kind, spec)) => (name.clone(), Some(kind), spec),
                None => (name.clone(), None, String::new()),
            }
        }
        RunTest::Adhoc {
            kind,
            target,
            options,
            name,
        } => {
            let block = adhoc_block(kind, target, options, name.as_deref())?;
            (
                name.clone().unwrap_or_else(|| "run-now".into()),
                Some(kind.clone()),
                block,
            )
        }
    };
    let timeout = timeout_of(kind.as_deref(), &spec_toml);
    // A named test is sent by name: the agent runs its own copy.
    let stored_spec = match &req.test {
        RunTest::Named(_) => String::new(),
        RunTest::Adhoc { .. } => spec_toml,
    };
    let target = match &req.test {
        RunTest::Adhoc { target, .. } => Some(target.clone()),
        RunTest::Named(_) => None,
    };
    let ids: Vec<String> = chosen.iter().map(|a| a.agent_id.clone()).collect();
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO runs (created_by, test, kind, target, spec_toml, select_labels, agents,
                               expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
             RETURNING run_id,
                       to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[
                &created_by,
                &test,
                &kind,
                &target,
                &stored_spec,
                &Json(&req.selection.select),
                &req.selection.agents,
                &req.expires.as_secs_f64(),
            ],
        )
        .await?;
    let (run_id, expires_at): (i64, String) = (row.get(0), row.get(1));
    tx.execute(
        "INSERT INTO run_agents (run_id, agent_id) SELECT $1, unnest($2::text[])",
        &[&run_id, &ids],
    )
    .await?;
    tx.execute(
        "SELECT pg_notify('edgeprobe_runs', $1)",
        &[&run_id.to_string()],
    )
    .await?;
    tx.commit().await?;
    Ok(Created {
        run_id,
        test,
        kind,
        spec_toml: stored_spec,
        agents: ids,
        unknown,
        expires_at,
        timeout,
    })
}

/// One agent's state in a run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AgentState {
    pub agent_id: String,
    /// pending, sent, started, waiting, refused, rate_limited, done, expired (pending when
    /// the request expired: never sent)
    pub state: String,
    pub reason: Option<String>,
}

/// One result of a run. Figures are in SI units: seconds, bits per second, bytes, ratios.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunResult {
    pub agent_id: String,
    pub test: String,
    pub kind: String,
    pub target: String,
    pub success: bool,
    pub duration_seconds: f64,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    /// The link the run was taken on (`results.ip_family`, `local_address`, `interface`;
    /// null when the agent sent none): a test with `family = "both"` gives two results,
    /// told apart by `ip_family`.
    #[serde(default)]
    pub ip_family: Option<String>,
    #[serde(default)]
    pub local_address: Option<String>,
    #[serde(default)]
    pub interface: Option<String>,
    /// The kind's non-null figures, named like the columns of `results`.
    #[serde(flatten)]
    pub figures: BTreeMap<String, serde_json::Value>,
}

/// A run as it stands.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub run_id: i64,
    pub test: String,
    /// Seconds since the run was made (the database's clock).
    pub age_seconds: f64,
    /// When the request expires (RFC 3339, UTC), and in how many seconds (negative: past).
    pub expires_at: String,
    pub expires_in_seconds: f64,
    pub agents: Vec<AgentState>,
    pub results: Vec<RunResult>,
    /// Results each agent returns: 2 for a test with `family = "both"` (one per family),
    /// else 1. An agent is done when that many landed. 1 from collectors before it.
    #[serde(default = "one")]
    pub results_per_agent: usize,
}

fn one() -> usize {
    1
}

/// Results one run of the test in `spec_toml` gives an agent: 2 with `family = "both"`,
/// else 1 (also for a test the collector cannot see: an agent's own).
pub fn results_per_run(spec_toml: &str) -> usize {
    from_toml::<TestsOnly>(spec_toml, "run-now")
        .ok()
        .and_then(|t| t.tests.into_iter().next())
        .map_or(1, |t| match t.options.get_ref().family {
            Some(IpFamily::Both) => 2,
            _ => 1,
        })
}

/// A run result carries the kind's non-null figure columns
/// ([`crate::domain::FIGURE_COLUMNS`]); a path result's hops come from the `path_hops`
/// view, one object per TTL, as `probe path --json` shows them.
const FIGURES: &[&str] = crate::domain::FIGURE_COLUMNS;

/// The run's agents and the results that landed so far.
pub async fn status(client: &impl GenericClient, run_id: i64) -> Result<Status, FleetError> {
    let run = client
        .query_opt(
            "SELECT test, extract(epoch FROM now() - created_at)::float8,
                    to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    extract(epoch FROM expires_at - now())::float8, spec_toml
               FROM runs WHERE run_id = $1",
            &[&run_id],
        )
        .await?
        .ok_or_else(|| FleetError::NotFound(format!("no run {run_id}")))?;
    let expires_in_seconds: f64 = run.get(3);
    // A named test is not stored with the run: the current fleet test of that name, if any
    // (an agent's own test is one result).
    let spec: String = run.get(4);
    let results_per_agent = if spec.is_empty() {
        match fleet::current_version(client).await? {
            Some(v) => fleet::tests_of(client, v.version)
                .await?
                .into_iter()
                .find(|t| t.name == run.get::<_, String>(0))
                .map_or(1, |t| results_per_run(&t.spec_toml)),
            None => 1,
        }
    } else {
        results_per_run(&spec)
    };
    // A rate-limited agent is told when a retry is admitted: the limit is per agent and
    // counts from its last admitted run-now, which came before this refusal, so the
    // refusal time plus the limit is a moment a retry surely passes (the collector's limit
    // is at most the agent's default rule, which both sides apply).
    let run_every = RunNowLimit::default().run_every.as_secs_f64();
    let speed_every = RunNowLimit::default().speed_every.as_secs_f64();
    let agents = client
        .query(
            "SELECT ra.agent_id, ra.state, ra.reason,
                    CASE WHEN ra.state = 'rate_limited' THEN
                      to_char(date_trunc('second', ra.updated_at
                                 + make_interval(secs => CASE WHEN coalesce(r.kind, 'speed') = 'speed'
                                                              THEN $2::float8 ELSE $3::float8 END)
                                 + interval '999 milliseconds') AT TIME ZONE 'UTC',
                              'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                    END
               FROM run_agents ra JOIN runs r USING (run_id)
              WHERE ra.run_id = $1 ORDER BY ra.agent_id",
            &[&run_id, &speed_every, &run_every],
        )
        .await?
        .iter()
        .map(|r| AgentState {
            agent_id: r.get(0),
            state: r.get(1),
            reason: match (r.get::<_, Option<String>>(2), r.get::<_, Option<String>>(3)) {
                (reason, Some(at)) => Some(format!(
                    "{}; retry after {at}",
                    reason.unwrap_or_else(|| "rate limited".into())
                )),
                (reason, None) => reason,
            },
        })
        .map(|mut a| {
            // What the controller writes at its next poll, shown now (or without one).
            if a.state == "pending" && expires_in_seconds <= 0.0 {
                a.state = "expired".into();
            }
            a
        })
        .collect();
    // to_jsonb keeps each figure's own type (integer, float, text) without a column list
    // per kind.
    let rows = client
        .query(
            "SELECT agent_id, test, kind, target, success, duration_seconds, error_class,
                    error_message, to_jsonb(r) - 'hops',
                    (SELECT jsonb_agg(jsonb_build_object(
                                'ttl', h.ttl, 'address', h.address, 'addresses', h.addresses,
                                'sent', h.sent, 'received', h.received,
                                'loss_ratio', h.loss_ratio,
                                'rtt_min_seconds', h.rtt_min_seconds,
                                'rtt_avg_seconds', h.rtt_avg_seconds,
                                'rtt_max_seconds', h.rtt_max_seconds,
                                'rtt_mdev_seconds', h.rtt_mdev_seconds,
                                'rate_limited', h.rate_limited) ORDER BY h.ttl)
                       FROM path_hops h
                      WHERE h.agent_id = r.agent_id AND h.test = r.test
                        AND h.started_at = r.started_at AND h.seq = r.seq)
             FROM results r WHERE run_id = $1 ORDER BY agent_id, started_at",
            &[&run_id],
        )
        .await?;
    let results = rows
        .iter()
        .map(|r| {
            let all = r.get::<_, Json<serde_json::Value>>(8).0;
            let hops = r.get::<_, Option<Json<serde_json::Value>>>(9).map(|h| h.0);
            let mut figures: BTreeMap<String, serde_json::Value> = FIGURES
                .iter()
                .filter_map(|f| {
                    all.get(*f)
                        .filter(|v| !v.is_null())
                        .map(|v| (f.to_string(), v.clone()))
                })
                .collect();
            if let Some(hops) = hops {
                figures.insert("hops".into(), hops);
            }
            let text = |c: &str| all.get(c).and_then(|v| v.as_str()).map(String::from);
            RunResult {
                agent_id: r.get(0),
                test: r.get(1),
                kind: r.get(2),
                target: r.get(3),
                success: r.get(4),
                duration_seconds: r.get(5),
                error_class: r.get(6),
                error_message: r.get(7),
                ip_family: text("ip_family"),
                local_address: text("local_address"),
                interface: text("interface"),
                figures,
            }
        })
        .collect();
    Ok(Status {
        run_id,
        test: run.get(0),
        age_seconds: run.get(1),
        expires_at: run.get(2),
        expires_in_seconds,
        agents,
        results,
        results_per_agent,
    })
}

/// A refused or rate-limited agent.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Refused {
    pub agent_id: String,
    pub reason: String,
}

/// Where each agent of a run stands.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Agents whose result landed.
    pub done: Vec<String>,
    /// Still pending after the dispatch window: no live session.
    pub offline: Vec<String>,
    /// Never sent: no session before the request expired (offline agents end here).
    pub expired: Vec<String>,
    /// Waiting: a speed test holds the agent.
    pub busy: Vec<String>,
    /// Sent or started, result not here yet.
    pub running: Vec<String>,
    /// Pending within the dispatch window.
    pub pending: Vec<String>,
    /// Refused by the agent or the collector, or rate limited.
    pub refused: Vec<Refused>,
}

impl Summary {
    /// Nothing left to wait for (busy agents may still answer, so they count as open).
    pub fn finished(&self) -> bool {
        self.running.is_empty() && self.pending.is_empty() && self.busy.is_empty()
    }
}

impl Status {
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        let window = self.age_seconds >= DISPATCH_WINDOW.as_secs_f64();
        for a in &self.agents {
            let landed = self
                .results
                .iter()
                .filter(|r| r.agent_id == a.agent_id)
                .count();
            // With family = "both" the first result marks the agent done in run_agents;
            // the second is still on its way.
            let has_result = landed >= self.results_per_agent.max(1);
            let id = a.agent_id.clone();
            match a.state.as_str() {
                _ if has_result => s.done.push(id),
                "done" if landed == 0 => s.done.push(id),
                "refused" | "rate_limited" => s.refused.push(Refused {
                    agent_id: id,
                    // "agent too old", or "rate_limited: ..." (the state says which limit).
                    reason: match (&a.reason, a.state.as_str()) {
                        (Some(r), "refused") if !r.is_empty() => r.clone(),
                        (Some(r), state) if !r.is_empty() && !r.starts_with(state) => {
                            format!("{state}: {r}")
                        }
                        (Some(r), _) if !r.is_empty() => r.clone(),
                        _ => a.state.clone(),
                    },
                }),
                "waiting" => s.busy.push(id),
                "expired" => s.expired.push(id),
                "pending" if window => s.offline.push(id),
                "pending" => s.pending.push(id),
                _ => s.running.push(id),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adhoc_blocks_are_checked_and_typed() {
        let block = adhoc_block(
            "icmp",
            "192.0.2.1",
            &[
                ("count".into(), "3".into()),
                ("interval".into(), "200ms".into()),
            ],
            None,
        )
        .unwrap();
        assert!(block.contains("count = 3"), "{block}");
        assert!(block.contains("interval = \"200ms\""), "{block}");
        assert!(block.contains("name = \"run-now\""), "{block}");
        let e =
            adhoc_block("icmp", "192.0.2.1", &[("streams".into(), "4".into())], None).unwrap_err();
        assert!(e.to_string().contains("streams"), "{e}");
        assert!(adhoc_block("smoke", "x", &[], None).is_err());
    }

    #[test]
    fn summary_sorts_agents_by_state_and_the_dispatch_window() {
        let agent = |id: &str, state: &str, reason: Option<&str>| AgentState {
            agent_id: id.into(),
            state: state.into(),
            reason: reason.map(String::from),
        };
        let mut status = Status {
            run_id: 1,
            test: "web".into(),
            age_seconds: 1.0,
            expires_at: String::new(),
            expires_in_seconds: 29.0,
            agents: vec![
                agent("a", "pending", None),
                agent("b", "started", None),
                agent("c", "waiting", None),
                agent("d", "refused", Some("agent too old")),
                agent("e", "rate_limited", Some("at most one run-now per 10s")),
                agent("f", "sent", None),
            ],
            results: vec![RunResult {
                agent_id: "f".into(),
                test: "web".into(),
                kind: "tcp".into(),
                target: "x:1".into(),
                success: true,
                duration_seconds: 0.1,
                error_class: None,
                error_message: None,
                ip_family: None,
                local_address: None,
                interface: None,
                figures: BTreeMap::new(),
            }],
            results_per_agent: 1,
        };
        let s = status.summary();
        assert_eq!(s.done, ["f"]);
        assert_eq!((s.pending.len(), s.offline.len()), (1, 0));
        assert_eq!(
            (s.running.as_slice(), s.busy.as_slice()),
            (&["b".to_string()][..], &["c".to_string()][..])
        );
        assert_eq!(s.refused[0].reason, "agent too old");
        assert_eq!(
            s.refused[1].reason,
            "rate_limited: at most one run-now per 10s"
        );
        assert!(!s.finished());
        status.age_seconds = 6.0;
        status
            .agents
            .retain(|a| a.state != "started" && a.state != "waiting");
        let s = status.summary();
        assert_eq!(s.offline, ["a"]);
        assert!(s.finished());
        // family = "both": marked done at its first result, done only with the second.
        status.results_per_agent = 2;
        let f = status
            .agents
            .iter_mut()
            .find(|a| a.agent_id == "f")
            .unwrap();
        f.state = "done".into();
        let s = status.summary();
        assert_eq!(
            (s.done.len(), s.running.as_slice()),
            (0, &["f".to_string()][..])
        );
        assert!(!s.finished());
        let mut v6 = status.results[0].clone();
        v6.ip_family = Some("ipv6".into());
        status.results.push(v6);
        let s = status.summary();
        assert_eq!(s.done, ["f"]);
        assert!(s.finished());
    }

    #[test]
    fn family_both_is_two_results_and_twice_the_wait() {
        let both = adhoc_block(
            "tcp",
            "example.net:443",
            &[
                ("family".into(), "both".into()),
                ("interface".into(), "wwan0".into()),
            ],
            None,
        )
        .unwrap();
        assert_eq!(results_per_run(&both), 2);
        let one = adhoc_block(
            "tcp",
            "example.net:443",
            &[("family".into(), "ipv6".into())],
            None,
        )
        .unwrap();
        assert_eq!(results_per_run(&one), 1);
        assert_eq!(results_per_run(""), 1);
        let slow = |family: &str| {
            adhoc_block(
                "tcp",
                "example.net:443",
                &[
                    ("family".into(), family.into()),
                    ("timeout".into(), "20s".into()),
                ],
                None,
            )
            .unwrap()
        };
        assert_eq!(
            timeout_of(Some("tcp"), &slow("any")),
            Duration::from_secs(30)
        );
        assert_eq!(
            timeout_of(Some("tcp"), &slow("both")),
            Duration::from_secs(40)
        );
        // The proto's checks: a source has one family, both needs two.
        let e = adhoc_block(
            "tcp",
            "example.net:443",
            &[
                ("family".into(), "both".into()),
                ("source".into(), "192.0.2.7".into()),
            ],
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`family` both needs two"), "{e}");
    }

    #[test]
    fn an_adhoc_block_over_the_run_now_bound_is_refused_when_made() {
        let huge = "x".repeat(edgeprobe_proto::bounds::MAX_RUN_NOW_BYTES);
        let e = adhoc_block("http", "http://h/", &[("body_match".into(), huge)], None).unwrap_err();
        assert!(
            e.to_string().contains("at most 65536 in one run-now"),
            "{e}"
        );
    }

    #[test]
    fn speed_waits_for_both_directions() {
        let block = adhoc_block(
            "speed",
            "https://speed.example/",
            &[("duration".into(), "20s".into())],
            None,
        )
        .unwrap();
        assert_eq!(timeout_of(Some("speed"), &block), Duration::from_secs(70));
        assert_eq!(timeout_of(Some("speed"), ""), Duration::from_secs(50));
        assert_eq!(timeout_of(Some("tcp"), ""), DEFAULT_TIMEOUT);
    }
}
