//! Fleet tests in PostgreSQL (SPEC section 13): apply a fleet tests file as a new version,
//! diff a file against the current version, list the current set and the agents' state,
//! the version history, and rollback. The `tests` CLI and the HTTP API both call these.
//!
//! Invariants: the current set is the highest version in `fleet_versions`; a version is
//! never edited (a rollback is a new version). Every insert takes the transaction-level
//! advisory lock [`FLEET_LOCK`], so two concurrent applies make two consecutive versions,
//! and sends `NOTIFY edgeprobe_fleet, '<version>'` in the same transaction (delivered at
//! commit, never for a rolled-back insert). An apply identical to the current set makes no
//! version. A file is checked by the agent's own parser (`FleetFile::parse`), so whatever
//! is stored an agent accepts, bar its own local names and label bound. A version whose
//! push to a known agent would pass `bounds::MAX_PUSH_BYTES`, or give it more than
//! `bounds::MAX_AGENT_TESTS` tests, is refused (apply, diff and rollback alike): the
//! collector would not send it (bytes) or the agent would refuse it (tests).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use edgeprobe_proto::bounds;
use edgeprobe_proto::testdef::{from_toml, FleetFile, FleetTest, TestsOnly};
use serde::Serialize;
use tokio_postgres::types::Json;
use tokio_postgres::{Client, GenericClient};

/// Arbitrary constant identifying the fleet version lock (pg_advisory_xact_lock).
const FLEET_LOCK: i64 = 0x6570_666c_6565_7401;

/// The schema version the operator commands need: the controller's tables (4) and the
/// expiry of run-now requests (6).
const SCHEMA_NEEDED: i32 = 6;

/// Agent ids named in a refusal (the rest are counted).
const IDS_SHOWN: usize = 5;

/// What went wrong, so the CLI maps it to an exit code and the API to a status.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Bad input; the message is located (`file:line:col: reason`) where it can be. CLI
    /// exit 2, API 400.
    #[error("{0}")]
    Invalid(String),
    /// A version or run that does not exist. CLI exit 2, API 404.
    #[error("{0}")]
    NotFound(String),
    /// The database failed or is not ready. CLI exit 1, API 500.
    #[error("database: {0}")]
    Db(String),
}

impl From<tokio_postgres::Error> for FleetError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => FleetError::Db(db.message().to_string()),
            None => FleetError::Db(e.to_string()),
        }
    }
}

/// Refuses clearly when the schema predates what the operator commands need.
pub async fn check_schema(client: &impl GenericClient) -> Result<(), FleetError> {
    // Two statements: a query naming a missing table fails at planning.
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('edgeprobe_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let version: i32 = if exists {
        client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM edgeprobe_migrations",
                &[],
            )
            .await?
            .get(0)
    } else {
        0
    };
    if version < SCHEMA_NEEDED {
        return Err(FleetError::Db(format!(
            "the schema is at version {version}, fleet tests need {SCHEMA_NEEDED}: run `edgeprobe-collector migrate` (or start an upgraded collector) first"
        )));
    }
    Ok(())
}

/// Which agents a test (or a run) selects: ids, else labels that must all match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Selection {
    pub select: BTreeMap<String, String>,
    pub agents: Option<Vec<String>>,
}

impl Selection {
    pub fn selects(&self, agent: &KnownAgent) -> bool {
        edgeprobe_proto::testdef::selects(
            &self.select,
            self.agents.as_deref(),
            &agent.agent_id,
            &agent.labels,
        )
    }

    /// `site=berlin,role=edge`, `agents a, b`, or `all agents`.
    pub fn describe(&self) -> String {
        match &self.agents {
            Some(ids) => format!("agents {}", ids.join(", ")),
            None if self.select.is_empty() => "all agents".to_string(),
            None => self
                .select
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// An agent in the `agents` table, as far as the controller cares.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct KnownAgent {
    pub agent_id: String,
    pub labels: BTreeMap<String, String>,
    pub features: Vec<String>,
    pub local_tests: Vec<String>,
    pub fleet_version: Option<i64>,
    pub fleet_refused_version: Option<i64>,
    pub fleet_error: Option<String>,
    /// Seconds since a collector last heard from it (hello or heartbeat), by the
    /// database's clock.
    pub seen_seconds_ago: f64,
}

/// Heard from within this: online. Three heartbeats of the agent's 15 s.
pub const ONLINE_WITHIN: Duration = Duration::from_secs(45);

impl KnownAgent {
    /// Heard from (hello or heartbeat) within [`ONLINE_WITHIN`].
    pub fn is_online(&self) -> bool {
        self.seen_seconds_ago <= ONLINE_WITHIN.as_secs_f64()
    }

    /// Not heard from for longer than `stale_after`: gone, or cut off for long. An online
    /// agent is never stale, whatever `stale_after` says (a `--stale-after` shorter than
    /// the online window showed one agent online and stale at once).
    pub fn is_stale(&self, stale_after: Duration) -> bool {
        !self.is_online() && self.seen_seconds_ago > stale_after.as_secs_f64()
    }
}

/// Every agent the collectors have seen (10,000 rows are a few hundred kB).
pub async fn known_agents(client: &impl GenericClient) -> Result<Vec<KnownAgent>, FleetError> {
    let rows = client
        .query(
            "SELECT agent_id, labels, features, local_tests, fleet_version,
                    fleet_refused_version, fleet_error,
                    greatest(extract(epoch FROM now() - last_seen), 0)::float8
             FROM agents ORDER BY agent_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| KnownAgent {
            agent_id: r.get(0),
            labels: labels_of(r.get::<_, Json<serde_json::Value>>(1).0),
            features: r.get(2),
            local_tests: r.get(3),
            fleet_version: r.get(4),
            fleet_refused_version: r.get(5),
            fleet_error: r.get(6),
            seen_seconds_ago: r.get(7),
        })
        .collect())
}

/// A jsonb label map; non-string values (never written by a collector) compare as JSON.
pub(crate) fn labels_of(v: serde_json::Value) -> BTreeMap<String, String> {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// One stored fleet test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StoredTest {
    pub name: String,
    pub kind: String,
    pub target: String,
    #[serde(flatten)]
    pub selection: Selection,
    /// The `[[test]]` block an agent gets.
    pub spec_toml: String,
}

impl StoredTest {
    fn from_file(t: &FleetTest) -> StoredTest {
        StoredTest {
            name: t.config.name.get_ref().clone(),
            kind: t.config.kind.name().to_string(),
            target: t.config.target.get_ref().clone(),
            selection: Selection {
                select: t.select.clone(),
                agents: t.agents.clone(),
            },
            spec_toml: t.spec_toml.clone(),
        }
    }

    /// `schedule "0 */5 * * * *"` or `every 30s`, read back from the block.
    pub fn timing(&self) -> String {
        let test = from_toml::<TestsOnly>(&self.spec_toml, "fleet test")
            .ok()
            .and_then(|t| t.tests.into_iter().next());
        match test.map(|t| (t.schedule, t.every)) {
            Some((Some(s), _)) => format!("schedule \"{}\"", s.get_ref()),
            Some((None, Some(e))) => format!("every {}", humantime::format_duration(e)),
            _ => String::new(),
        }
    }
}

/// A row of `fleet_versions`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VersionInfo {
    pub version: i64,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_by: String,
    pub origin: String,
    pub rolled_back_to: Option<i64>,
    pub tests: i64,
}

const VERSION_COLUMNS: &str = "v.version,
    to_char(v.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
    v.created_by, v.origin, v.rolled_back_to,
    (SELECT count(*) FROM fleet_tests t WHERE t.version = v.version)";

fn version_info(r: &tokio_postgres::Row) -> VersionInfo {
    VersionInfo {
        version: r.get(0),
        created_at: r.get(1),
        created_by: r.get(2),
        origin: r.get(3),
        rolled_back_to: r.get(4),
        tests: r.get(5),
    }
}

/// The current version, if any.
pub async fn current_version(
    client: &impl GenericClient,
) -> Result<Option<VersionInfo>, FleetError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {VERSION_COLUMNS} FROM fleet_versions v ORDER BY v.version DESC LIMIT 1"
            ),
            &[],
        )
        .await?;
    Ok(row.as_ref().map(version_info))
}

/// Every version, newest first.
pub async fn versions(client: &impl GenericClient) -> Result<Vec<VersionInfo>, FleetError> {
    check_schema(client).await?;
    let rows = client
        .query(
            &format!("SELECT {VERSION_COLUMNS} FROM fleet_versions v ORDER BY v.version DESC"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(version_info).collect())
}

/// The tests of `version`, by name.
pub async fn tests_of(
    client: &impl GenericClient,
    version: i64,
) -> Result<Vec<StoredTest>, FleetError> {
    let rows = client
        .query(
            "SELECT name, kind, target, select_labels, agents, spec_toml
             FROM fleet_tests WHERE version = $1 ORDER BY name",
            &[&version],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StoredTest {
            name: r.get(0),
            kind: r.get(1),
            target: r.get(2),
            selection: Selection {
                select: labels_of(r.get::<_, Json<serde_json::Value>>(3).0),
                agents: r.get(4),
            },
            spec_toml: r.get(5),
        })
        .collect())
}

/// How one test differs from the current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Changed,
    Removed,
    Unchanged,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TestChange {
    pub name: String,
    pub change: Change,
    pub kind: String,
    pub target: String,
    pub selection: String,
    /// Known agents (the `agents` table) the test selects; for a removed test, selected.
    pub agents_selected: usize,
    /// For a changed test, what changed, field by field (`options.count`, `select.site`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
}

/// One field of a changed test: its old and new value as TOML (`None`: not set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

impl FieldChange {
    /// `every 30s -> 1m`, `options.count (unset) -> 5`.
    pub fn describe(&self) -> String {
        let v = |x: &Option<String>| x.clone().unwrap_or_else(|| "(unset)".to_string());
        format!("{} {} -> {}", self.field, v(&self.old), v(&self.new))
    }
}

/// The fields of a stored test as flat `key` / `table.key` -> TOML value: its block and
/// its selection.
fn flat_fields(t: &StoredTest) -> BTreeMap<String, String> {
    fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => flatten(&key, inner, out),
                other => {
                    out.insert(key, other.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    let block = toml::from_str::<toml::Table>(&t.spec_toml)
        .ok()
        .and_then(|doc| {
            doc.get("test")
                .and_then(|v| v.as_array())
                .and_then(|a| a.first())
                .and_then(|v| v.as_table())
                .cloned()
        })
        .unwrap_or_default();
    flatten("", &block, &mut out);
    for (k, v) in &t.selection.select {
        out.insert(
            format!("select.{k}"),
            toml::Value::String(v.clone()).to_string(),
        );
    }
    if let Some(ids) = &t.selection.agents {
        let list = toml::Value::Array(ids.iter().map(|i| toml::Value::String(i.clone())).collect());
        out.insert("agents".into(), list.to_string());
    }
    out
}

/// What differs between two versions of a test, field by field.
fn field_changes(old: &StoredTest, new: &StoredTest) -> Vec<FieldChange> {
    let (a, b) = (flat_fields(old), flat_fields(new));
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldChange {
            field: k.clone(),
            old: a.get(k).cloned(),
            new: b.get(k).cloned(),
        })
        .collect()
}

/// A file compared with the current version: what `tests diff` prints and `tests apply`
/// would do.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Diff {
    /// The current version (None: no fleet tests yet).
    pub current: Option<i64>,
    /// Every test of the file and every removed one, by name.
    pub tests: Vec<TestChange>,
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    /// Known agents that at least one test of the new set selects.
    pub agents_selected: usize,
    pub agents_known: usize,
    /// Why `tests apply` would refuse this file unless forced (`--force`, `force=true`):
    /// located `origin:line:col: reason` where a test is at fault.
    pub refusals: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added + self.changed + self.removed == 0
    }
}

fn compare(
    current: Option<i64>,
    old: &[StoredTest],
    new: &[StoredTest],
    agents: &[KnownAgent],
) -> Diff {
    let count = |s: &Selection| agents.iter().filter(|a| s.selects(a)).count();
    let old_by: BTreeMap<&str, &StoredTest> = old.iter().map(|t| (t.name.as_str(), t)).collect();
    let new_names: BTreeSet<&str> = new.iter().map(|t| t.name.as_str()).collect();
    let mut tests = Vec::new();
    for t in new {
        let (change, fields) = match old_by.get(t.name.as_str()) {
            None => (Change::Added, Vec::new()),
            Some(o) if *o == t => (Change::Unchanged, Vec::new()),
            Some(o) => (Change::Changed, field_changes(o, t)),
        };
        tests.push(TestChange {
            name: t.name.clone(),
            change,
            kind: t.kind.clone(),
            target: t.target.clone(),
            selection: t.selection.describe(),
            agents_selected: count(&t.selection),
            fields,
        });
    }
    for t in old.iter().filter(|t| !new_names.contains(t.name.as_str())) {
        tests.push(TestChange {
            name: t.name.clone(),
            change: Change::Removed,
            kind: t.kind.clone(),
            target: t.target.clone(),
            selection: t.selection.describe(),
            agents_selected: count(&t.selection),
            fields: Vec::new(),
        });
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    let n = |c: Change| tests.iter().filter(|t| t.change == c).count();
    Diff {
        current,
        added: n(Change::Added),
        changed: n(Change::Changed),
        removed: n(Change::Removed),
        agents_selected: agents
            .iter()
            .filter(|a| new.iter().any(|t| t.selection.selects(a)))
            .count(),
        agents_known: agents.len(),
        tests,
        refusals: Vec::new(),
    }
}

/// The longest `every` accepted without `--force`: a typo such as "100000d" is refused.
pub const MAX_SANE_EVERY: std::time::Duration = std::time::Duration::from_secs(31 * 86_400);

/// The checks that make an apply dangerous rather than wrong, refused unless forced: it
/// removes every fleet test, a test selects none of the known agents, a test names an
/// agent no collector has seen, or an `every` is beyond [`MAX_SANE_EVERY`]. Each reason is
/// located at the test's name. Before any agent has connected (a first rollout, where the
/// collector's role applies the fleet tests before the agents' role runs) no selection can
/// match a known agent, so the selection checks wait until there is a fleet to check
/// against.
fn dangers(
    file: &FleetFile,
    new: &[StoredTest],
    old: &[StoredTest],
    agents: &[KnownAgent],
    text: &str,
    origin: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    if new.is_empty() && !old.is_empty() {
        out.push(format!(
            "{origin}: the file has no tests: applying it removes all {} fleet tests from every agent",
            old.len()
        ));
    }
    let fleet_known = !agents.is_empty();
    for (t, stored) in file.tests.iter().zip(new) {
        let (line, col) = line_col(text, t.config.name.span().start);
        let at = format!("{origin}:{line}:{col}: test `{}`", stored.name);
        if let Some(ids) = stored.selection.agents.as_ref().filter(|_| fleet_known) {
            let unknown: Vec<&str> = ids
                .iter()
                .filter(|id| !agents.iter().any(|a| &a.agent_id == *id))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                out.push(format!(
                    "{at} names agents no collector has seen: {} (a typo? see `edgeprobe-collector agents`)",
                    unknown.join(", ")
                ));
            }
        }
        if fleet_known && !agents.iter().any(|a| stored.selection.selects(a)) {
            out.push(format!(
                "{at} selects none of the {} known agents ({}); check the ids or labels (see `edgeprobe-collector agents`)",
                agents.len(),
                stored.selection.describe()
            ));
        }
        if let Some(every) = t.config.every.filter(|e| *e > MAX_SANE_EVERY) {
            out.push(format!(
                "{at} runs every {} days, more than {} days apart (a typo?)",
                every.as_secs() / 86_400,
                MAX_SANE_EVERY.as_secs() / 86_400
            ));
        }
    }
    out
}

/// Refuses a test named like a local test of an agent it selects (never forced: the agent
/// would refuse the whole set).
fn check_clashes(
    file: &FleetFile,
    new: &[StoredTest],
    agents: &[KnownAgent],
    text: &str,
    origin: &str,
) -> Result<(), FleetError> {
    for (t, stored) in file.tests.iter().zip(new) {
        let clashing: Vec<&str> = agents
            .iter()
            .filter(|a| a.local_tests.contains(&stored.name) && stored.selection.selects(a))
            .map(|a| a.agent_id.as_str())
            .collect();
        if !clashing.is_empty() {
            let (line, col) = line_col(text, t.config.name.span().start);
            let more = match clashing.len().saturating_sub(IDS_SHOWN) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            return Err(FleetError::Invalid(format!(
                "{origin}:{line}:{col}: fleet test `{}` has the name of a local test of agent {}{more}; rename the fleet test or narrow its selection",
                stored.name,
                clashing[..clashing.len().min(IDS_SHOWN)].join(", "),
            )));
        }
    }
    Ok(())
}

/// A known agent for which a set of tests breaks a bound of what it can be pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Over {
    agent_id: String,
    /// The encoded length of its push (`tests_toml`), and its fleet and local tests.
    bytes: usize,
    tests: usize,
    local: usize,
    /// Index in `tests` of the test at which the push passes the bound.
    at: usize,
    /// Known agents over a bound, this one included.
    agents: usize,
}

/// The worst known agent whose push of `tests` would pass `MAX_PUSH_BYTES` or give it more
/// than `MAX_AGENT_TESTS` tests; measured as the controller builds the push.
fn over_bounds(tests: &[StoredTest], agents: &[KnownAgent]) -> Option<Over> {
    let mut worst: Option<Over> = None;
    let mut count = 0;
    for a in agents {
        let selected: Vec<usize> = (0..tests.len())
            .filter(|&i| tests[i].selection.selects(a))
            .collect();
        let bytes = crate::controller::push_len(selected.iter().map(|&i| tests[i].spec_toml.len()));
        let over_bytes = bounds::fleet_push(bytes).is_err();
        let over_count = bounds::agent_tests(a.local_tests.len(), selected.len()).is_err();
        if !over_bytes && !over_count {
            continue;
        }
        count += 1;
        // Where it passes: the first test past the byte bound, else past the count.
        let at = if over_bytes {
            let mut sum = 0usize;
            let mut at = *selected.last().expect("over the bound with no test");
            for (k, &i) in selected.iter().enumerate() {
                sum += tests[i].spec_toml.len() + usize::from(k > 0);
                if sum > bounds::MAX_PUSH_BYTES {
                    at = i;
                    break;
                }
            }
            at
        } else {
            selected[bounds::MAX_AGENT_TESTS
                .saturating_sub(a.local_tests.len())
                .min(selected.len() - 1)]
        };
        let over = Over {
            agent_id: a.agent_id.clone(),
            bytes,
            tests: selected.len(),
            local: a.local_tests.len(),
            at,
            agents: 0,
        };
        if worst
            .as_ref()
            .is_none_or(|w| (over.bytes, over.tests) > (w.bytes, w.tests))
        {
            worst = Some(over);
        }
    }
    worst.map(|w| Over { agents: count, ..w })
}

impl Over {
    /// The refusal: `where` locates it (`file:line:col` of the test at which the push
    /// passes the bound, or the version).
    fn refusal(&self, location: &str) -> FleetError {
        let more = match self.agents.saturating_sub(1) {
            0 => String::new(),
            1 => " (1 more known agent is over it too)".to_string(),
            n => format!(" ({n} more known agents are over it too)"),
        };
        let what = if self.bytes > bounds::MAX_PUSH_BYTES {
            format!(
                "the fleet tests selecting agent {} are {} bytes ({} test{}), over the {} bytes one push may carry",
                self.agent_id,
                self.bytes,
                self.tests,
                if self.tests == 1 { "" } else { "s" },
                bounds::MAX_PUSH_BYTES
            )
        } else {
            format!(
                "agent {} would run {} fleet test{} beside its {} local tests, over the {} tests one agent may run",
                self.agent_id,
                self.tests,
                if self.tests == 1 { "" } else { "s" },
                self.local,
                bounds::MAX_AGENT_TESTS
            )
        };
        let fate = if self.bytes > bounds::MAX_PUSH_BYTES {
            "the collector would not send it"
        } else {
            "the agent would refuse it"
        };
        FleetError::Invalid(format!(
            "{location}: {what}{more}; {fate}: narrow the selections or split the tests across agents"
        ))
    }
}

/// Refuses a file's tests that would pass a push bound for a known agent, located at the
/// test where the push passes it.
fn check_pushes(
    file: &FleetFile,
    new: &[StoredTest],
    agents: &[KnownAgent],
    text: &str,
    origin: &str,
) -> Result<(), FleetError> {
    match over_bounds(new, agents) {
        None => Ok(()),
        Some(over) => {
            let (line, col) = line_col(text, file.tests[over.at].config.name.span().start);
            Err(over.refusal(&format!(
                "{origin}:{line}:{col}: test `{}`",
                new[over.at].name
            )))
        }
    }
}

/// Parses a fleet tests file; errors are located `origin:line:col: reason`.
pub fn parse_file(text: &str, origin: &str) -> Result<FleetFile, FleetError> {
    FleetFile::parse(text, origin).map_err(|e| FleetError::Invalid(e.to_string()))
}

/// `tests diff`: the file against the current version; changes nothing.
pub async fn diff(
    client: &impl GenericClient,
    text: &str,
    origin: &str,
) -> Result<Diff, FleetError> {
    let file = parse_file(text, origin)?;
    check_schema(client).await?;
    let new: Vec<StoredTest> = file.tests.iter().map(StoredTest::from_file).collect();
    let current = current_version(client).await?.map(|v| v.version);
    let old = match current {
        Some(v) => tests_of(client, v).await?,
        None => Vec::new(),
    };
    let agents = known_agents(client).await?;
    check_clashes(&file, &new, &agents, text, origin)?;
    check_pushes(&file, &new, &agents, text, origin)?;
    let mut diff = compare(current, &old, &new, &agents);
    diff.refusals = dangers(&file, &new, &old, &agents, text, origin);
    Ok(diff)
}

/// What an apply or rollback did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Applied {
    /// The new version; None when nothing changed (or a dry run).
    pub version: Option<i64>,
    pub dry_run: bool,
    #[serde(flatten)]
    pub diff: Diff,
}

/// `tests apply`: checks the file, refuses a test named like a local test of an agent it
/// selects, refuses what [`dangers`] finds unless `force`, and stores a new version
/// (unless identical to the current one or `dry_run`; a dry run reports the dangers in
/// `refusals` instead).
pub async fn apply(
    client: &mut Client,
    text: &str,
    origin: &str,
    created_by: &str,
    dry_run: bool,
    force: bool,
) -> Result<Applied, FleetError> {
    let file = parse_file(text, origin)?;
    check_schema(&*client).await?;
    let new: Vec<StoredTest> = file.tests.iter().map(StoredTest::from_file).collect();
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FLEET_LOCK])
        .await?;
    let agents = known_agents(&tx).await?;
    check_clashes(&file, &new, &agents, text, origin)?;
    check_pushes(&file, &new, &agents, text, origin)?;
    let current = current_version(&tx).await?.map(|v| v.version);
    let old = match current {
        Some(v) => tests_of(&tx, v).await?,
        None => Vec::new(),
    };
    let mut diff = compare(current, &old, &new, &agents);
    diff.refusals = dangers(&file, &new, &old, &agents, text, origin);
    if !diff.refusals.is_empty() && !force && !dry_run {
        return Err(FleetError::Invalid(format!(
            "{}\nnothing applied; if this is what you mean, apply with --force (API: force=true)",
            diff.refusals.join("\n")
        )));
    }
    if dry_run || (diff.is_empty() && current.is_some()) {
        return Ok(Applied {
            version: None,
            dry_run,
            diff,
        });
    }
    let version = insert_version(&tx, created_by, origin, text, None, &new).await?;
    tx.commit().await?;
    Ok(Applied {
        version: Some(version),
        dry_run,
        diff,
    })
}

/// `tests rollback V`: a new version holding V's tests (origin `rollback`); none when they
/// are the current tests, unless `force`.
pub async fn rollback(
    client: &mut Client,
    version: i64,
    created_by: &str,
    force: bool,
) -> Result<Applied, FleetError> {
    check_schema(&*client).await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FLEET_LOCK])
        .await?;
    let exists = tx
        .query_opt(
            "SELECT 1 FROM fleet_versions WHERE version = $1",
            &[&version],
        )
        .await?;
    if exists.is_none() {
        return Err(FleetError::NotFound(format!(
            "no fleet version {version} (see `edgeprobe-collector tests versions`)"
        )));
    }
    let old_tests = tests_of(&tx, version).await?;
    let current = current_version(&tx).await?.map(|v| v.version);
    let current_tests = match current {
        Some(v) => tests_of(&tx, v).await?,
        None => Vec::new(),
    };
    let agents = known_agents(&tx).await?;
    if let Some(over) = over_bounds(&old_tests, &agents) {
        return Err(over.refusal(&format!(
            "fleet version {version}, test `{}`",
            old_tests[over.at].name
        )));
    }
    let diff = compare(current, &current_tests, &old_tests, &agents);
    // Rolling back to what is current changes nothing: no version, unless forced (a new
    // version is pushed again to agents that refused the current one).
    if diff.is_empty() && current.is_some() && !force {
        return Ok(Applied {
            version: None,
            dry_run: false,
            diff,
        });
    }
    let new = insert_version(&tx, created_by, "rollback", "", Some(version), &old_tests).await?;
    tx.commit().await?;
    Ok(Applied {
        version: Some(new),
        dry_run: false,
        diff,
    })
}

async fn insert_version(
    tx: &tokio_postgres::Transaction<'_>,
    created_by: &str,
    origin: &str,
    source: &str,
    rolled_back_to: Option<i64>,
    tests: &[StoredTest],
) -> Result<i64, FleetError> {
    let version: i64 = tx
        .query_one(
            "INSERT INTO fleet_versions (version, created_by, origin, source, rolled_back_to)
             SELECT coalesce(max(version), 0) + 1, $1, $2, $3, $4 FROM fleet_versions
             RETURNING version",
            &[&created_by, &origin, &source, &rolled_back_to],
        )
        .await?
        .get(0);
    let insert = tx
        .prepare(
            "INSERT INTO fleet_tests (version, name, kind, target, select_labels, agents, spec_toml)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    for t in tests {
        let select = Json(&t.selection.select);
        tx.execute(
            &insert,
            &[
                &version,
                &t.name,
                &t.kind,
                &t.target,
                &select,
                &t.selection.agents,
                &t.spec_toml,
            ],
        )
        .await?;
    }
    tx.execute(
        "SELECT pg_notify('edgeprobe_fleet', $1)",
        &[&version.to_string()],
    )
    .await?;
    Ok(version)
}

/// One test of the current set, as `tests list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ListedTest {
    #[serde(flatten)]
    pub test: StoredTest,
    /// `schedule "..."` or `every ...`.
    pub timing: String,
    pub agents_selected: usize,
}

/// An agent that refused the current version.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Refusal {
    pub agent_id: String,
    /// The version it refused (the current one).
    pub version: i64,
    pub error: String,
    /// The version it still runs, if any: a refused set leaves the previous one running,
    /// and one refused at the agent's start leaves none.
    pub running_version: Option<i64>,
}

/// An agent that has not applied the current version yet.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Behind {
    pub agent_id: String,
    /// The version it applied last (None: none yet).
    pub fleet_version: Option<i64>,
    /// Seconds since a collector last heard from it.
    pub seen_seconds_ago: f64,
}

/// `tests list`: the current version and where the fleet stands.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Listing {
    pub current: Option<VersionInfo>,
    pub tests: Vec<ListedTest>,
    pub agents_known: usize,
    /// Agents that applied the current version (or a later one).
    pub applied: usize,
    /// How many agents speaking fleet-tests have not applied or refused it (yet)...
    pub behind: usize,
    /// ... and which, with the version they run.
    pub behind_agents: Vec<Behind>,
    /// Agents that refused the current version, with the reason.
    pub refused: Vec<Refusal>,
    /// Agents whose last hello did not list "fleet-tests": they get no fleet tests.
    pub too_old: usize,
    /// Agents not heard from for longer than `stale_after_seconds`: not counted above
    /// (`agents retire ID` forgets one that is gone).
    pub stale: Vec<String>,
    pub stale_after_seconds: u64,
}

/// Where one agent stands with the current version (`cur`, 0 for none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetState {
    /// Not heard from for longer than the stale threshold.
    Stale,
    /// Its hello did not list "fleet-tests".
    TooOld,
    /// It refused the current version (whatever it reported before).
    Refused,
    /// It runs the current version (or there is none).
    Applied,
    /// It has neither applied nor refused the current version yet.
    Behind,
}

impl KnownAgent {
    /// Its state against version `cur`. A refusal of `cur` outranks an earlier "applied":
    /// an agent that refused the version it had applied (a local test of the same name
    /// added, then a restart) does not run it.
    pub fn fleet_state(&self, cur: i64, stale_after: Duration) -> FleetState {
        if self.is_stale(stale_after) {
            FleetState::Stale
        } else if !self
            .features
            .iter()
            .any(|f| f == edgeprobe_proto::FEATURE_FLEET_TESTS)
        {
            FleetState::TooOld
        } else if cur > 0 && self.fleet_refused_version == Some(cur) {
            FleetState::Refused
        } else if cur == 0 || self.fleet_version.is_some_and(|v| v >= cur) {
            FleetState::Applied
        } else {
            FleetState::Behind
        }
    }
}

/// `tests list`: the current set, and every known agent sorted by [`FleetState`].
pub async fn list(
    client: &impl GenericClient,
    stale_after: Duration,
) -> Result<Listing, FleetError> {
    check_schema(client).await?;
    let current = current_version(client).await?;
    let agents = known_agents(client).await?;
    let tests = match &current {
        Some(v) => tests_of(client, v.version).await?,
        None => Vec::new(),
    };
    let tests = tests
        .into_iter()
        .map(|t| ListedTest {
            timing: t.timing(),
            agents_selected: agents.iter().filter(|a| t.selection.selects(a)).count(),
            test: t,
        })
        .collect();
    let cur = current.as_ref().map_or(0, |v| v.version);
    let mut listing = Listing {
        current,
        tests,
        agents_known: agents.len(),
        applied: 0,
        behind: 0,
        behind_agents: Vec::new(),
        refused: Vec::new(),
        too_old: 0,
        stale: Vec::new(),
        stale_after_seconds: stale_after.as_secs(),
    };
    for a in &agents {
        match a.fleet_state(cur, stale_after) {
            FleetState::Stale => listing.stale.push(a.agent_id.clone()),
            FleetState::TooOld => listing.too_old += 1,
            FleetState::Refused => listing.refused.push(Refusal {
                agent_id: a.agent_id.clone(),
                version: cur,
                error: a.fleet_error.clone().unwrap_or_default(),
                running_version: a.fleet_version.filter(|v| *v < cur),
            }),
            FleetState::Applied => listing.applied += 1,
            FleetState::Behind => listing.behind_agents.push(Behind {
                agent_id: a.agent_id.clone(),
                fleet_version: a.fleet_version,
                seen_seconds_ago: a.seen_seconds_ago,
            }),
        }
    }
    listing.behind = listing.behind_agents.len();
    Ok(listing)
}

/// 1-based line and column (in characters) of a byte offset, as the agent's errors count.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    fn seen(seconds_ago: f64) -> KnownAgent {
        KnownAgent {
            agent_id: "a".into(),
            labels: BTreeMap::new(),
            features: Vec::new(),
            local_tests: Vec::new(),
            fleet_version: None,
            fleet_refused_version: None,
            fleet_error: None,
            seen_seconds_ago: seconds_ago,
        }
    }

    #[test]
    fn an_online_agent_is_never_stale() {
        let short = Duration::from_secs(10);
        assert!(seen(20.0).is_online());
        assert!(!seen(20.0).is_stale(short));
        assert!(seen(60.0).is_stale(short));
        assert!(!seen(60.0).is_online());
        assert!(!seen(3600.0).is_stale(Duration::from_secs(86_400)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, labels: &[(&str, &str)]) -> KnownAgent {
        KnownAgent {
            agent_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            features: vec!["fleet-tests".into()],
            local_tests: vec![],
            fleet_version: None,
            fleet_refused_version: None,
            fleet_error: None,
            seen_seconds_ago: 0.0,
        }
    }

    #[test]
    fn a_set_over_a_push_bound_is_found_with_its_agent_and_place() {
        let stored = |name: &str, bytes: usize, agents: Option<&[&str]>| StoredTest {
            name: name.into(),
            kind: "tcp".into(),
            target: "x:1".into(),
            selection: Selection {
                select: BTreeMap::new(),
                agents: agents.map(|a| a.iter().map(|s| s.to_string()).collect()),
            },
            spec_toml: "#".repeat(bytes),
        };
        let half = bounds::MAX_PUSH_BYTES / 2;
        let tests = [
            stored("a", half, None),
            stored("b", half, Some(&["big", "big2"])),
            stored("c", 10, Some(&["big"])),
        ];
        let agents = [agent("big", &[]), agent("big2", &[]), agent("small", &[])];
        // a + b is exactly the bound plus one separator: over, from b on.
        let over = over_bounds(&tests, &agents).unwrap();
        assert_eq!(over.agent_id, "big");
        assert_eq!(
            (over.bytes, over.tests, over.at, over.agents),
            (2 * half + 12, 3, 1, 2)
        );
        let e = over.refusal("f.toml:7:8: test `b`").to_string();
        assert!(
            e.starts_with(&format!(
                "f.toml:7:8: test `b`: the fleet tests selecting agent big are {} bytes (3 tests), over the 1000000 bytes one push may carry (1 more known agent is over it too)",
                2 * half + 12
            )),
            "{e}"
        );
        assert!(over_bounds(&tests[..1], &agents).is_none());

        // The count bound, with the agent's local tests.
        let mut many = agent("many", &[]);
        many.local_tests = (0..bounds::MAX_AGENT_TESTS)
            .map(|i| i.to_string())
            .collect();
        let over = over_bounds(&tests[2..], &[many.clone()]).is_none();
        assert!(over, "test c selects only big");
        let over = over_bounds(&tests[..1], &[many]).unwrap();
        assert!(over.refusal("v").to_string().contains(
            "agent many would run 1 fleet test beside its 4096 local tests, over the 4096 tests"
        ));
    }

    #[test]
    fn compare_counts_changes_and_selected_agents() {
        let file = |s: &str| {
            parse_file(s, "f.toml")
                .unwrap()
                .tests
                .iter()
                .map(StoredTest::from_file)
                .collect::<Vec<_>>()
        };
        let old = file(
            "[[test]]\nname = \"a\"\nkind = \"tcp\"\ntarget = \"x:1\"\nevery = \"30s\"\n\
             [[test]]\nname = \"b\"\nkind = \"tcp\"\ntarget = \"x:1\"\nevery = \"30s\"\n",
        );
        let new = file(
            "[[test]]\nname = \"a\"\nkind = \"tcp\"\ntarget = \"x:2\"\nevery = \"30s\"\n\
             [[test]]\nname = \"c\"\nkind = \"tcp\"\ntarget = \"x:1\"\nevery = \"30s\"\nselect = { site = \"berlin\" }\n",
        );
        let agents = [agent("a1", &[("site", "berlin")]), agent("a2", &[])];
        let d = compare(Some(1), &old, &new, &agents);
        assert_eq!((d.added, d.changed, d.removed), (1, 1, 1));
        assert_eq!(d.tests[2].name, "c");
        assert_eq!(d.tests[2].agents_selected, 1);
        assert_eq!(d.agents_selected, 2);
        assert_eq!(new[0].timing(), "every 30s");
        assert!(compare(Some(1), &new, &new, &agents).is_empty());
    }
}
