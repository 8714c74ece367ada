//! The fleet as an operator sees it (SPEC section 18): every known agent with its labels,
//! version, whether it is online, when it was last heard from, its backlog, where it
//! stands with the fleet tests, its clock and its identity conflicts; and `retire`, which
//! forgets an agent that is gone. The `agents` CLI and `GET /api/v1/agents` both call
//! these.
//!
//! Invariants: "online" means heard from (hello or heartbeat, every 15 s) within
//! [`ONLINE_WITHIN`], by the database's clock, so every collector and the CLI agree
//! without asking each other. Retiring deletes the `agents` row only: results and the
//! per-incarnation watermarks (`agent_incarnations`) stay, so an agent that comes back
//! is simply known again at its next hello and never redelivers what was committed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::fleet::{self, FleetError, FleetState, KnownAgent};

pub use crate::fleet::ONLINE_WITHIN;

/// The clock state is read from an agent's latest result within this window.
const CLOCK_WINDOW_SECONDS: f64 = 3600.0;

/// One agent as `agents` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AgentView {
    pub agent_id: String,
    pub labels: BTreeMap<String, String>,
    /// The agent's version, from its last hello.
    pub version: String,
    pub online: bool,
    /// RFC 3339, UTC.
    pub last_seen: String,
    pub seen_seconds_ago: f64,
    /// Results recorded but not acknowledged, and dropped (buffer full), from its last
    /// heartbeat.
    pub backlog: i64,
    pub dropped: i64,
    /// Where it stands with the current fleet version.
    pub fleet: FleetState,
    pub fleet_version: Option<i64>,
    pub fleet_refused_version: Option<i64>,
    pub fleet_error: Option<String>,
    /// From its latest result of the last hour: `synced`, `corrected` (taken before the
    /// clock was trusted, corrected since), `unsynced`, or `unknown` (no result).
    pub clock: String,
    /// Sessions refused because another live buffer incarnation claimed this id (a
    /// cloned host).
    pub identity_conflicts: i64,
}

/// Every known agent whose labels hold all of `select`, by id.
pub async fn list(
    client: &impl GenericClient,
    select: &BTreeMap<String, String>,
    stale_after: Duration,
) -> Result<Vec<AgentView>, FleetError> {
    fleet::check_schema(client).await?;
    let cur = fleet::current_version(client)
        .await?
        .map_or(0, |v| v.version);
    let known = fleet::known_agents(client).await?;
    let rows = client
        .query(
            "SELECT a.agent_id, a.version,
                    to_char(a.last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    a.backlog, a.dropped, a.identity_conflicts,
                    CASE WHEN c.agent_id IS NULL THEN 'unknown'
                         WHEN c.clock_unsynced THEN 'unsynced'
                         WHEN c.clock_corrected THEN 'corrected'
                         ELSE 'synced' END
               FROM agents a
               LEFT JOIN LATERAL (
                   SELECT r.agent_id, r.clock_unsynced, r.clock_corrected FROM results r
                    WHERE r.agent_id = a.agent_id
                      AND r.started_at > now() - make_interval(secs => $1)
                    ORDER BY r.started_at DESC LIMIT 1) c ON true
              ORDER BY a.agent_id",
            &[&CLOCK_WINDOW_SECONDS],
        )
        .await?;
    let mut more: BTreeMap<String, &tokio_postgres::Row> = BTreeMap::new();
    for r in &rows {
        more.insert(r.get(0), r);
    }
    let filter = fleet::Selection {
        select: select.clone(),
        agents: None,
    };
    Ok(known
        .into_iter()
        .filter(|a| filter.selects(a))
        .filter_map(|a| {
            let r = more.get(&a.agent_id)?;
            Some(view(&a, r, cur, stale_after))
        })
        .collect())
}

fn view(a: &KnownAgent, r: &tokio_postgres::Row, cur: i64, stale_after: Duration) -> AgentView {
    AgentView {
        agent_id: a.agent_id.clone(),
        labels: a.labels.clone(),
        version: r.get(1),
        online: a.is_online(),
        last_seen: r.get(2),
        seen_seconds_ago: a.seen_seconds_ago,
        backlog: r.get(3),
        dropped: r.get(4),
        fleet: a.fleet_state(cur, stale_after),
        fleet_version: a.fleet_version,
        fleet_refused_version: a.fleet_refused_version,
        fleet_error: a.fleet_error.clone(),
        clock: r.get(6),
        identity_conflicts: r.get(5),
    }
}

/// What `retire` did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Retired {
    pub agent_id: String,
    /// Its results, kept.
    pub results_kept: i64,
}

/// Forgets agent `id`: its `agents` row goes, its results stay. Refused (unless
/// `force`) while it is online: it is not gone, and it would be known again at its next
/// hello anyway.
pub async fn retire(
    client: &impl GenericClient,
    id: &str,
    force: bool,
) -> Result<Retired, FleetError> {
    fleet::check_schema(client).await?;
    let seen = client
        .query_opt(
            "SELECT greatest(extract(epoch FROM now() - last_seen), 0)::float8
               FROM agents WHERE agent_id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| {
            FleetError::NotFound(format!(
                "no known agent `{id}` (see `edgeprobe-collector agents`)"
            ))
        })?
        .get::<_, f64>(0);
    if !force && seen <= ONLINE_WITHIN.as_secs_f64() {
        return Err(FleetError::Invalid(format!(
            "agent `{id}` was heard from {seen:.0}s ago: it is online, not gone. Stop it first (it is known again at its next connection anyway), or retire it with --force"
        )));
    }
    client
        .execute("DELETE FROM agents WHERE agent_id = $1", &[&id])
        .await?;
    let results_kept: i64 = client
        .query_one("SELECT count(*) FROM results WHERE agent_id = $1", &[&id])
        .await?
        .get(0);
    Ok(Retired {
        agent_id: id.to_string(),
        results_kept,
    })
}

/// `site=berlin,role=edge` for a table cell.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The FLEET cell: `v3`, `refused v3`, `behind (v2)`, `stale`, `too old`.
pub fn fleet_text(a: &AgentView) -> String {
    let version = |v: Option<i64>| v.map_or("none".to_string(), |v| format!("v{v}"));
    match a.fleet {
        FleetState::Applied => match a.fleet_version {
            Some(v) => format!("v{v}"),
            None => "-".to_string(),
        },
        FleetState::Refused => format!("refused {}", version(a.fleet_refused_version)),
        FleetState::Behind => format!("behind ({})", version(a.fleet_version)),
        FleetState::Stale => "stale".to_string(),
        FleetState::TooOld => "too old".to_string(),
    }
}
