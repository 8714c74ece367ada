//! The operator commands `tests ...` and `run-now`: their arguments, reaching PostgreSQL
//! (the URL resolved by `config::database_url`), calling fleet.rs / runs.rs, printing tables
//! (or JSON). Errors become `commands::Failure`: usage (exit 2) for a bad file, request or
//! unknown version, runtime (exit 1) for a database failure; a run-now that did not get
//! every reached agent's result exits 1 on its own.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use tokio_postgres::Client;

use crate::config::{self, Config};
use crate::fleet::{self, Change, FleetError, Selection};
use crate::pg;
use crate::remote::{self, Remote};
use crate::runs::{self, RunRequest, RunResult, RunTest};

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad configuration, file, request or usage: exit 2, the message on stderr.
    Usage(String),
    /// The command could not do its work: exit 1, the message on stderr.
    Runtime(String),
    /// `run` stopped on an error: exit 1, the error logged (the collector's log is its
    /// tracing output, read by journald).
    Run(anyhow::Error),
}

/// How often run-now reads the run's state.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// How the operator commands reach PostgreSQL: --database-url, else the [database] url of
/// --config (default /etc/edgeprobe/collector.toml when it exists), else
/// EDGEPROBE_DATABASE_URL or DATABASE_URL, else those variables in the collector.env
/// beside the configuration (where a packaged install keeps the URL).
#[derive(clap::Args, Clone, Debug)]
pub struct DbArgs {
    /// PostgreSQL URL (overrides the configuration and the environment).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// The collector configuration whose [database] url (and collector.env beside it) to
    /// use [default: /etc/edgeprobe/collector.toml when it exists].
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Agents not heard from for longer than this are shown as stale, not as behind
    /// [default: [fleet] stale_after of the configuration, else 24h].
    #[arg(long, global = true, value_name = "DURATION", value_parser = edgeprobe_proto::testdef::parse_duration)]
    pub stale_after: Option<Duration>,
    /// Work through the collector's HTTP API instead of the database, from a host without
    /// database access: https://HOST:PORT of its [api] listen, with an operator
    /// certificate (--cert, --key) and the fleet CA (--ca). For `tests list`, `agents`,
    /// `results` and `run-now`.
    #[arg(long, global = true, value_name = "URL", requires_all = ["cert", "key", "ca"])]
    pub api: Option<String>,
    /// With --api: the operator certificate (`cert issue --operator NAME`).
    #[arg(long, global = true, value_name = "FILE", requires = "api")]
    pub cert: Option<PathBuf>,
    /// With --api: the operator certificate's key.
    #[arg(long, global = true, value_name = "FILE", requires = "api")]
    pub key: Option<PathBuf>,
    /// With --api: the fleet CA certificate (ca.pem), the only one trusted.
    #[arg(long, global = true, value_name = "FILE", requires = "api")]
    pub ca: Option<PathBuf>,
}

impl DbArgs {
    /// The API client when --api is given.
    fn remote(&self) -> Result<Option<Remote>, Failure> {
        match (&self.api, &self.cert, &self.key, &self.ca) {
            (Some(url), Some(cert), Some(key), Some(ca)) => {
                Remote::new(url, cert, key, ca).map(Some)
            }
            (Some(_), ..) => Err(Failure::Usage("--api needs --cert, --key and --ca".into())),
            _ => Ok(None),
        }
    }

    /// `?stale_after=Ns` when given.
    fn stale_query(&self) -> Vec<(&'static str, String)> {
        self.stale_after
            .map(|d| vec![("stale_after", format!("{}s", d.as_secs()))])
            .unwrap_or_default()
    }
}

/// What the operator commands reach: the database and the settings of the configuration.
pub struct Reached {
    pub client: Client,
    pub stale_after: Duration,
}

/// The configuration the operator commands read: --config, else the packaged one when it
/// exists (a missing default is no error; a missing --config is).
fn operator_config(path: Option<&Path>) -> Result<Option<(PathBuf, Config)>, Failure> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let default = PathBuf::from(config::DEFAULT_CONFIG);
            if !default.exists() {
                return Ok(None);
            }
            default
        }
    };
    let c = Config::load(Some(&path)).map_err(|e| Failure::Usage(e.to_string()))?;
    Ok(Some((path, c)))
}

/// The database URL of `--database-url` / `--config` / the environment / collector.env,
/// through the one resolver (`config::database_url`), and the configuration read.
pub fn resolve_url(
    flag: Option<String>,
    config_path: Option<&Path>,
) -> Result<(String, Option<Config>), Failure> {
    let config = operator_config(config_path)?;
    let (file_url, env_file) = match &config {
        Some((path, c)) => (
            c.database.url.clone(),
            config::read_env_file(&config::env_file_of(path))
                .map_err(|e| Failure::Usage(e.to_string()))?,
        ),
        None => (None, Vec::new()),
    };
    let (_, url) = config::database_url(flag, file_url, &env_file).ok_or_else(|| {
        let read = match &config {
            Some((path, _)) => format!(
                "{} has no [database] url and {} no EDGEPROBE_DATABASE_URL",
                path.display(),
                config::env_file_of(path).display()
            ),
            None => format!("there is no {}", config::DEFAULT_CONFIG),
        };
        Failure::Usage(format!(
            "no database URL ({read}): pass --database-url or --config FILE, or set EDGEPROBE_DATABASE_URL or DATABASE_URL"
        ))
    })?;
    Ok((url, config.map(|(_, c)| c)))
}

/// The database of an operator command (`--database-url`, `--config`, the environment).
pub(crate) async fn connect(db: &DbArgs) -> Result<Reached, Failure> {
    let (url, config) = resolve_url(db.database_url.clone(), db.config.as_deref())?;
    let stale_after = db.stale_after.unwrap_or_else(|| {
        config
            .as_ref()
            .map_or(config::DEFAULT_STALE_AFTER, |c| c.fleet.stale_after)
    });
    let target = pg::Target::parse(&url).map_err(|e| Failure::Usage(e.to_string()))?;
    let client = target.connect().await.map_err(|e| {
        // `tokio_postgres::Error` alone displays as the bare "db error".
        Failure::Runtime(format!(
            "error: cannot connect to postgres: {}",
            pg::describe(&e)
        ))
    })?;
    Ok(Reached {
        client,
        stale_after,
    })
}

#[derive(Subcommand)]
pub enum TestsCommand {
    /// Check FILE ([[test]] blocks, each with `select = { label = "value" }` or
    /// `agents = ["id", ...]`, neither = every agent) and make it the new version. Refused
    /// (exit 2, file:line:col) when bad, or when a test has the name of a local test of an
    /// agent it selects. The same set as the current version makes no new version.
    Apply {
        /// The fleet tests file: [[test]] blocks with `select` or `agents`.
        #[arg(long)]
        file: PathBuf,
        /// Check and show what would change; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply although the file removes every fleet test, a test selects no known
        /// agent or names an unknown one, or an `every` is over 31 days.
        #[arg(long)]
        force: bool,
        /// Recorded as who made the version (default: $SUDO_USER, else $USER), e.g. by
        /// automation acting for a person.
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Show what applying FILE would add, change (field by field) and remove, and how many
    /// known agents each test selects; run every check `apply` runs. Changes nothing. Exit
    /// 2 where `apply` would refuse.
    Diff {
        /// The fleet tests file: [[test]] blocks with `select` or `agents`.
        #[arg(long)]
        file: PathBuf,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The current version (who, when), its tests and the agents selected, and how many
    /// agents applied it, are behind, or refused it (with the reason).
    List {
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Every version, newest first.
    Versions {
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Make a new version holding the tests of VERSION (origin "rollback").
    Rollback {
        /// The version whose tests become current again (see `tests versions`).
        version: i64,
        /// Make the new version even when VERSION holds the current tests: the same set
        /// is pushed again to the agents that refused it (once what they lacked is fixed).
        #[arg(long)]
        force: bool,
        /// Recorded as who made the version (default: $SUDO_USER, else $USER), e.g. by
        /// automation acting for a person.
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// `results [--agent ID]... [--test NAME] [--since D] [--format table|json|csv]`.
#[derive(clap::Args)]
pub struct ResultsArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Results of this agent (repeatable; default: every agent).
    #[arg(long, value_name = "ID")]
    agent: Vec<String>,
    /// Results of this test only.
    #[arg(long, value_name = "NAME")]
    test: Option<String>,
    /// Results started at most this long ago (e.g. 15m, 24h, 7d).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = edgeprobe_proto::testdef::parse_duration)]
    since: Duration,
    /// table: one line per result with its main figures; json: one array of objects with
    /// every column; csv: every column, for spreadsheets. Oldest first, streamed.
    #[arg(long, value_enum, default_value = "table")]
    format: crate::results::Format,
}

/// `agents [--select k=v] [--json]` and `agents retire ID`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentsArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Only agents whose labels include LABEL=VALUE (repeatable: all must match).
    #[arg(long, value_name = "LABEL=VALUE", value_parser = parse_pair)]
    select: Vec<(String, String)>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Option<AgentsCommand>,
}

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Forget an agent that is gone (decommissioned, renamed): it leaves `agents`, `tests
    /// list` and the fleet counts; its results stay. One that comes back is simply known
    /// again. Refused while the agent is online, unless --force.
    Retire {
        /// The agent's id.
        id: String,
        /// Retire it although it was heard from in the last 45 s.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("who").args(["select", "agent"])))]
#[command(group(clap::ArgGroup::new("what").args(["test", "kind"])))]
pub struct RunNowArgs {
    /// Show run RUN_ID as it stands (each agent's state, the results), and exit.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["who", "what", "timeout", "expires"])]
    show: Option<i64>,
    #[command(flatten)]
    db: DbArgs,
    /// Agents whose labels include LABEL=VALUE (repeatable: all must match).
    #[arg(long, value_name = "LABEL=VALUE", value_parser = parse_pair)]
    select: Vec<(String, String)>,
    /// An agent by id (repeatable).
    #[arg(long, value_name = "ID")]
    agent: Vec<String>,
    /// A test the agents know: a fleet test or one of their own.
    #[arg(long, value_name = "NAME")]
    test: Option<String>,
    /// An ad-hoc test of this kind (speed, icmp, tcp, http, dns, path, responsiveness,
    /// stamp), with --target.
    #[arg(long, requires = "target")]
    kind: Option<String>,
    /// The ad-hoc test's target, as in the agent config.
    #[arg(long, requires = "kind")]
    target: Option<String>,
    /// An option of the ad-hoc test, as in [test.options] (repeatable); the value is an
    /// integer, true|false, or else a string ("10s", "GET"); e.g. a stamp test's
    /// `--option dscp=46 --option packet_size=160`.
    #[arg(long = "option", value_name = "KEY=VALUE", value_parser = parse_pair, requires = "kind")]
    options: Vec<(String, String)>,
    /// The ad-hoc test's name in the results (default run-now).
    #[arg(long, requires = "kind")]
    name: Option<String>,
    /// Bind the ad-hoc test to this interface (option `interface`), e.g. wwan0.
    #[arg(long, value_name = "IFACE", requires = "kind")]
    interface: Option<String>,
    /// Bind the ad-hoc test's sockets to this local address (option `source`).
    #[arg(long, value_name = "ADDR", requires = "kind")]
    source: Option<String>,
    /// The ad-hoc test's IP family (option `family`): ipv4, ipv6, any, or both (one result
    /// per family).
    #[arg(long, value_name = "FAMILY", value_parser = ["ipv4", "ipv6", "any", "both"], requires = "kind")]
    family: Option<String>,
    /// Print one JSON document at the end instead of the table.
    #[arg(long)]
    json: bool,
    /// How long to wait for results (default 30s; a speed test 2 x duration + 30s).
    #[arg(long, value_parser = edgeprobe_proto::testdef::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// How long the request waits for agents to connect: an agent that connects later
    /// never runs it (at most 1h).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = edgeprobe_proto::testdef::parse_duration)]
    expires: Duration,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// The operator as `created_by`: $SUDO_USER (the person behind sudo), else $USER, else
/// the user name of the uid (else the uid).
pub fn operator_name() -> String {
    use std::os::unix::fs::MetadataExt;
    ["SUDO_USER", "USER"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| match std::fs::metadata("/proc/self") {
            // No $USER (a cron job, a bare `sudo -i`): the name of the uid.
            Ok(m) => user_of(m.uid()).unwrap_or_else(|| format!("uid {}", m.uid())),
            Err(_) => "unknown".to_string(),
        })
}

/// The name of `uid` in /etc/passwd.
fn user_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

impl From<FleetError> for Failure {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::Invalid(m) | FleetError::NotFound(m) => Failure::Usage(m),
            e @ FleetError::Db(_) => Failure::Runtime(format!("error: {e}")),
        }
    }
}

fn read_file(path: &std::path::Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("{}: cannot read: {e}", path.display())))
}

/// `println!` that ends the process quietly when stdout is a closed pipe (`| head`), as
/// command line tools do, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("writing to stdout: {e}");
        }
    }};
}

fn print_json<T: serde::Serialize>(value: &T) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("plain structs serialize")
    );
}

/// `tests apply|diff|list|versions|rollback`.
pub async fn tests(db: DbArgs, command: TestsCommand) -> Result<ExitCode, Failure> {
    if let Some(remote) = db.remote()? {
        let TestsCommand::List { json } = command else {
            return Err(Failure::Usage(
                "over --api this command runs `tests list` only; apply, diff, versions and rollback are POST /api/v1/tests... (docs/API.md)".into(),
            ));
        };
        let path = format!("/api/v1/tests{}", remote::query(&db.stale_query()));
        let l: fleet::Listing = remote.get(&path).await?;
        print_listing(&l, json);
        return Ok(ExitCode::SUCCESS);
    }
    // A bad file is reported without a database.
    if let TestsCommand::Apply { file, .. } | TestsCommand::Diff { file, .. } = &command {
        fleet::parse_file(&read_file(file)?, &file.display().to_string())?;
    }
    let Reached {
        mut client,
        stale_after,
    } = connect(&db).await?;
    match command {
        TestsCommand::Apply {
            file,
            dry_run,
            force,
            by,
            json,
        } => {
            let text = read_file(&file)?;
            let origin = file.display().to_string();
            let applied = fleet::apply(
                &mut client,
                &text,
                &origin,
                &by.unwrap_or_else(operator_name),
                dry_run,
                force,
            )
            .await?;
            if json {
                print_json(&applied);
                return Ok(ExitCode::SUCCESS);
            }
            let d = &applied.diff;
            for r in &d.refusals {
                eprintln!("warning: {r}");
            }
            let counts = format!(
                "+{} ~{} -{} tests; selects {} of {} known agents",
                d.added, d.changed, d.removed, d.agents_selected, d.agents_known
            );
            match (applied.version, d.current) {
                (Some(v), _) => outln!("version {v} applied: {counts}"),
                (None, Some(cur)) if d.is_empty() => {
                    outln!("no change, version {cur} stays")
                }
                (None, cur) => {
                    print_changes(d);
                    let next = cur.unwrap_or(0) + 1;
                    outln!("dry run: would make version {next}: {counts}");
                }
            }
        }
        TestsCommand::Diff { file, json } => {
            let text = read_file(&file)?;
            let d = fleet::diff(&client, &text, &file.display().to_string()).await?;
            let verdict = if d.refusals.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
            if json {
                print_json(&d);
                return Ok(verdict);
            }
            print_changes(&d);
            let against = match d.current {
                Some(v) => format!("version {v}"),
                None => "no fleet tests".to_string(),
            };
            outln!(
                "against {against}: +{} ~{} -{} tests ({} unchanged); the file selects {} of {} known agents",
                d.added,
                d.changed,
                d.removed,
                d.tests.len() - d.added - d.changed - d.removed,
                d.agents_selected,
                d.agents_known
            );
            if !d.refusals.is_empty() {
                for r in &d.refusals {
                    eprintln!("{r}");
                }
                eprintln!("`tests apply` refuses this file unless --force");
            }
            return Ok(verdict);
        }
        TestsCommand::List { json } => {
            let l = fleet::list(&client, stale_after).await?;
            print_listing(&l, json);
        }
        TestsCommand::Versions { json } => {
            let vs = fleet::versions(&client).await?;
            if json {
                // The document of GET /api/v1/tests/versions.
                print_json(&serde_json::json!({ "versions": vs }));
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<[String; 5]> = vs
                .iter()
                .map(|v| {
                    [
                        v.version.to_string(),
                        v.created_at.clone(),
                        v.created_by.clone(),
                        v.tests.to_string(),
                        origin_of(v),
                    ]
                })
                .collect();
            print_table(["VERSION", "CREATED", "BY", "TESTS", "ORIGIN"], &rows);
        }
        TestsCommand::Rollback {
            version,
            force,
            by,
            json,
        } => {
            let by = by.unwrap_or_else(operator_name);
            let applied = fleet::rollback(&mut client, version, &by, force).await?;
            if json {
                print_json(&applied);
                return Ok(ExitCode::SUCCESS);
            }
            let d = &applied.diff;
            let Some(new) = applied.version else {
                outln!(
                    "no change: the current version {} already holds the tests of version {version} (--force makes a new version to push them again)",
                    d.current.unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            };
            outln!(
                "version {new} applied (the tests of version {version}): +{} ~{} -{} tests; selects {} of {} known agents",
                d.added,
                d.changed,
                d.removed,
                d.agents_selected,
                d.agents_known
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tests list`: the current version, its tests and where the agents stand.
fn print_listing(l: &fleet::Listing, json: bool) {
    if json {
        print_json(l);
        return;
    }
    let Some(v) = &l.current else {
        outln!(
            "no fleet tests yet ({} known agents); make some with `tests apply --file F`",
            l.agents_known
        );
        return;
    };
    let from = match v.rolled_back_to {
        Some(_) => origin_of(v),
        None => format!("from {}", v.origin),
    };
    outln!(
        "version {} by {} at {} ({from})",
        v.version,
        v.created_by,
        v.created_at
    );
    let rows: Vec<[String; 6]> = l
        .tests
        .iter()
        .map(|t| {
            [
                t.test.name.clone(),
                t.test.kind.clone(),
                t.test.target.clone(),
                t.timing.clone(),
                t.test.selection.describe(),
                t.agents_selected.to_string(),
            ]
        })
        .collect();
    print_table(
        ["NAME", "KIND", "TARGET", "WHEN", "SELECTION", "AGENTS"],
        &rows,
    );
    print_fleet_state(l);
}

/// The agents' side of `tests list`: counts, then every agent that is not running the
/// current version, by name and why.
fn print_fleet_state(l: &fleet::Listing) {
    let stale_after = humantime::format_duration(Duration::from_secs(l.stale_after_seconds));
    outln!(
        "agents: {} known, {} applied, {} behind, {} refused, {} too old for fleet tests, {} stale",
        l.agents_known,
        l.applied,
        l.behind,
        l.refused.len(),
        l.too_old,
        l.stale.len()
    );
    for r in &l.refused {
        let running = match r.running_version {
            Some(v) => format!("it runs version {v}"),
            None => "it runs no fleet tests".to_string(),
        };
        outln!("  refused by {}: {} ({running})", r.agent_id, r.error);
    }
    for b in &l.behind_agents {
        let running = match b.fleet_version {
            Some(v) => format!("runs version {v}"),
            None => "no version yet".to_string(),
        };
        outln!(
            "  behind: {} ({running}, seen {} ago)",
            b.agent_id,
            humantime::format_duration(Duration::from_secs(b.seen_seconds_ago as u64))
        );
    }
    if !l.stale.is_empty() {
        outln!(
            "  stale (not seen for over {stale_after}; `agents retire ID` forgets one that is gone): {}",
            l.stale.join(", ")
        );
    }
}

fn origin_of(v: &fleet::VersionInfo) -> String {
    match v.rolled_back_to {
        Some(to) => format!("rollback to version {to}"),
        None => v.origin.clone(),
    }
}

fn print_changes(d: &fleet::Diff) {
    let rows: Vec<[String; 6]> = d
        .tests
        .iter()
        .filter(|t| t.change != Change::Unchanged)
        .map(|t| {
            let mark = match t.change {
                Change::Added => "+ added",
                Change::Changed => "~ changed",
                Change::Removed => "- removed",
                Change::Unchanged => "",
            };
            [
                mark.to_string(),
                t.name.clone(),
                t.kind.clone(),
                t.target.clone(),
                t.selection.clone(),
                t.agents_selected.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        print_table(
            ["CHANGE", "NAME", "KIND", "TARGET", "SELECTION", "AGENTS"],
            &rows,
        );
    }
    for t in d.tests.iter().filter(|t| t.change == Change::Changed) {
        for f in &t.fields {
            outln!("  ~ {}: {}", t.name, f.describe());
        }
    }
}

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `results`: streamed from a server-side cursor to stdout as it comes.
pub async fn results(args: ResultsArgs) -> Result<ExitCode, Failure> {
    use crate::results::{self, Format};
    if let Some(remote) = args.db.remote()? {
        return results_over_api(&remote, args).await;
    }
    let Reached { mut client, .. } = connect(&args.db).await?;
    let filter = results::Filter {
        agents: args.agent,
        test: args.test,
        since: args.since,
    };
    let format = args.format;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // A reader that went away (`| head`) ends the export quietly, as command line tools do.
    let write = |out: &mut std::io::BufWriter<std::io::StdoutLock>, text: &str| {
        if let Err(e) = out.write_all(text.as_bytes()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing the results: {e}");
            std::process::exit(1);
        }
    };
    match format {
        Format::Table => write(
            &mut out,
            &format!(
                "{:<20}  {:<16}  {:<5}  {:<20}  {:<4}  RESULT\n",
                "STARTED (UTC)", "TEST", "KIND", "AGENT", "OK"
            ),
        ),
        other => write(&mut out, &results::head(other)),
    }
    let mut cursor = results::Cursor::open(&mut client, &filter).await?;
    let mut rows = 0u64;
    while let Some(batch) = cursor.next().await? {
        for row in &batch {
            let text = match format {
                Format::Table => table_line(row),
                other => results::line(other, row, rows),
            };
            write(&mut out, &text);
            rows += 1;
        }
    }
    match format {
        Format::Table if rows == 0 => write(
            &mut out,
            &format!(
                "no results in the last {}\n",
                humantime::format_duration(args.since)
            ),
        ),
        other => write(&mut out, results::tail(other, rows)),
    }
    if let Err(e) = out.flush() {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(Failure::Runtime(format!("error: writing the results: {e}")));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `results --api`: the API's streamed body, as it comes: CSV and JSON as they are (the
/// same bytes as from the database), a table from the JSON, one line (one result) at a
/// time.
async fn results_over_api(remote: &Remote, args: ResultsArgs) -> Result<ExitCode, Failure> {
    use crate::results::Format;
    let mut pairs: Vec<(&str, String)> = args.agent.iter().map(|a| ("agent", a.clone())).collect();
    if let Some(t) = &args.test {
        pairs.push(("test", t.clone()));
    }
    pairs.push(("since", format!("{}s", args.since.as_secs())));
    let wire = if args.format == Format::Csv {
        "csv"
    } else {
        "json"
    };
    pairs.push(("format", wire.to_string()));
    let mut response = remote
        .stream(&format!("/api/v1/results{}", remote::query(&pairs)))
        .await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let write = |out: &mut std::io::BufWriter<std::io::StdoutLock>, bytes: &[u8]| {
        if let Err(e) = out.write_all(bytes) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing the results: {e}");
            std::process::exit(1);
        }
    };
    if args.format == Format::Table {
        write(
            &mut out,
            format!(
                "{:<20}  {:<16}  {:<5}  {:<20}  {:<4}  RESULT\n",
                "STARTED (UTC)", "TEST", "KIND", "AGENT", "OK"
            )
            .as_bytes(),
        );
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut rows = 0u64;
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| Failure::Runtime(format!("error: the export was cut: {e}")))?;
        let Some(chunk) = chunk else { break };
        if args.format != Format::Table {
            write(&mut out, &chunk);
            continue;
        }
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim().trim_start_matches(['[', ',']).trim();
            if text.is_empty() || text == "]" {
                continue;
            }
            let row: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| {
                    Failure::Runtime(format!("error: an exported row is not JSON: {e}"))
                })?;
            write(&mut out, table_line(&row).as_bytes());
            rows += 1;
        }
    }
    if args.format == Format::Table && rows == 0 {
        write(
            &mut out,
            format!(
                "no results in the last {}\n",
                humantime::format_duration(args.since)
            )
            .as_bytes(),
        );
    }
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

/// A result as a table line: when, who, what, and the kind's main figures.
fn table_line(row: &serde_json::Map<String, serde_json::Value>) -> String {
    let text = |k: &str| {
        row.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let started = text("started_at").replace('T', " ");
    let r = RunResult {
        agent_id: text("agent_id"),
        test: text("test"),
        kind: text("kind"),
        target: text("target"),
        success: row
            .get("success")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        duration_seconds: row
            .get("duration_seconds")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
        error_class: row
            .get("error_class")
            .and_then(|v| v.as_str())
            .map(String::from),
        error_message: row
            .get("error_message")
            .and_then(|v| v.as_str())
            .map(String::from),
        ip_family: row
            .get("ip_family")
            .and_then(|v| v.as_str())
            .map(String::from),
        local_address: row
            .get("local_address")
            .and_then(|v| v.as_str())
            .map(String::from),
        interface: row
            .get("interface")
            .and_then(|v| v.as_str())
            .map(String::from),
        figures: row.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    format!(
        "{:<20}  {:<16}  {:<5}  {}\n",
        started.get(..19).unwrap_or(&started),
        r.test,
        r.kind,
        result_row(&r)
    )
}

/// `agents` and `agents retire ID`.
pub async fn agents(args: AgentsArgs) -> Result<ExitCode, Failure> {
    if let Some(AgentsCommand::Retire { id, force, db }) = &args.command {
        if let Some(remote) = db.remote()?.or(args.db.remote()?) {
            let mut pairs = Vec::new();
            if *force {
                pairs.push(("force", "true".to_string()));
            }
            let path = format!(
                "/api/v1/agents/{}{}",
                percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC),
                remote::query(&pairs)
            );
            let r: crate::agents::Retired = remote.delete(&path).await?;
            outln!("{}", retired_line(&r));
            return Ok(ExitCode::SUCCESS);
        }
    }
    if let Some(remote) = args.db.remote()? {
        let mut pairs: Vec<(&str, String)> = args
            .select
            .iter()
            .map(|(k, v)| ("select", format!("{k}={v}")))
            .collect();
        pairs.extend(args.db.stale_query());
        #[derive(serde::Deserialize)]
        struct Answer {
            agents: Vec<crate::agents::AgentView>,
        }
        let a: Answer = remote
            .get(&format!("/api/v1/agents{}", remote::query(&pairs)))
            .await?;
        if args.json {
            print_json(&serde_json::json!({ "agents": a.agents }));
        } else {
            print_agents(&a.agents);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(AgentsCommand::Retire { id, force, db }) = args.command {
        let Reached { client, .. } = connect(&db).await?;
        let r = crate::agents::retire(&client, &id, force).await?;
        outln!("{}", retired_line(&r));
        return Ok(ExitCode::SUCCESS);
    }
    let Reached {
        client,
        stale_after,
    } = connect(&args.db).await?;
    let select = args.select.into_iter().collect();
    let list = crate::agents::list(&client, &select, stale_after).await?;
    if args.json {
        print_json(&serde_json::json!({ "agents": list }));
        return Ok(ExitCode::SUCCESS);
    }
    print_agents(&list);
    Ok(ExitCode::SUCCESS)
}

/// The `agents` table, then the reasons of refusals.
pub fn print_agents(list: &[crate::agents::AgentView]) {
    use crate::agents::{fleet_text, labels_text};
    let rows: Vec<[String; 9]> = list
        .iter()
        .map(|a| {
            [
                a.agent_id.clone(),
                labels_text(&a.labels),
                a.version.clone(),
                if a.online { "yes" } else { "no" }.to_string(),
                format!("{} ago", human_age(a.seen_seconds_ago)),
                a.backlog.to_string(),
                fleet_text(a),
                a.clock.clone(),
                a.identity_conflicts.to_string(),
            ]
        })
        .collect();
    print_table(
        [
            "ID",
            "LABELS",
            "VERSION",
            "ONLINE",
            "LAST SEEN",
            "BACKLOG",
            "FLEET",
            "CLOCK",
            "CONFLICTS",
        ],
        &rows,
    );
    for a in list {
        if let (Some(v), Some(e)) = (a.fleet_refused_version, &a.fleet_error) {
            outln!("{} refused fleet version {v}: {e}", a.agent_id);
        }
    }
    let online = list.iter().filter(|a| a.online).count();
    outln!(
        "{} agent{}, {online} online",
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    );
}

/// `agent X retired; its 5120 results stay`.
fn retired_line(r: &crate::agents::Retired) -> String {
    let (noun, verb) = if r.results_kept == 1 {
        ("result", "stays")
    } else {
        ("results", "stay")
    };
    format!(
        "agent {} retired; its {} {noun} {verb}",
        r.agent_id, r.results_kept
    )
}

/// `42s`, `5m`, `3h`, `2d`: how long ago, to the unit that matters.
fn human_age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `run-now`.
pub async fn run_now(args: RunNowArgs) -> Result<ExitCode, Failure> {
    let source = match args.db.remote()? {
        Some(remote) => RunSource::Api(remote),
        None => RunSource::Db(connect(&args.db).await?.client),
    };
    if let Some(run_id) = args.show {
        let status = source.status(run_id).await?;
        if args.json {
            print_json(&status);
        } else {
            print_run(&status);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.select.is_empty() && args.agent.is_empty() {
        return Err(Failure::Usage(
            "give the agents: --select LABEL=VALUE or --agent ID (or --show RUN_ID)".into(),
        ));
    }
    let mut options = args.options;
    for (key, flag) in [
        ("interface", args.interface),
        ("source", args.source),
        ("family", args.family),
    ] {
        if let Some(value) = flag {
            if options.iter().any(|(k, _)| k == key) {
                return Err(Failure::Usage(format!(
                    "--{key} and --option {key}=... both given: give one"
                )));
            }
            options.push((key.to_string(), value));
        }
    }
    let test = match (args.test, args.kind, args.target) {
        (Some(name), None, None) => RunTest::Named(name),
        (None, Some(kind), Some(target)) => {
            // Checked before the database: a typo is exit 2 without touching anything.
            runs::adhoc_block(&kind, &target, &options, args.name.as_deref())?;
            RunTest::Adhoc {
                kind,
                target,
                options,
                name: args.name,
            }
        }
        _ => {
            return Err(Failure::Usage(
                "give --test NAME, or --kind K --target T for an ad-hoc test".into(),
            ))
        }
    };
    let selection = if args.agent.is_empty() {
        Selection {
            select: args.select.into_iter().collect(),
            agents: None,
        }
    } else {
        Selection {
            select: Default::default(),
            agents: Some(args.agent),
        }
    };
    let mut source = source;
    let created = source
        .create(&RunRequest {
            selection,
            test,
            expires: args.expires,
        })
        .await?;
    if !created.unknown.is_empty() {
        eprintln!(
            "unknown agents (never seen by a collector, not asked): {}",
            created.unknown.join(", ")
        );
    }
    let timeout = args.timeout.unwrap_or(created.timeout);
    if !args.json {
        outln!(
            "run {}: test {} on {} agent{} (waiting up to {}; the request expires at {})",
            created.run_id,
            created.test,
            created.agents.len(),
            if created.agents.len() == 1 { "" } else { "s" },
            humantime::format_duration(timeout),
            created.expires_at
        );
    }
    // Ctrl-C ends the wait, not the run: installed before the first poll.
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let progress = !args.json && std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut printed = BTreeSet::new();
    let mut header = false;
    let status = loop {
        let status = source.status(created.run_id).await?;
        let summary = status.summary();
        if !args.json {
            for r in &status.results {
                // Per agent and family: `family = "both"` gives each agent two results.
                if printed.insert((r.agent_id.clone(), r.ip_family.clone())) {
                    if progress {
                        // The progress line stays at the bottom: clear it before a row.
                        eprint!("\r\x1b[K");
                    }
                    if !header {
                        outln!("{:<20}  {:<4}  RESULT", "AGENT", "OK");
                        header = true;
                    }
                    outln!("{}", result_row(r));
                }
            }
        }
        if progress {
            eprint!(
                "\r\x1b[K{}/{} done, {} running, {} waiting, {} pending, {} offline, {} refused",
                summary.done.len(),
                created.agents.len(),
                summary.running.len(),
                summary.busy.len(),
                summary.pending.len(),
                summary.offline.len(),
                summary.refused.len()
            );
            let _ = std::io::stderr().flush();
        }
        if summary.finished() || start.elapsed() >= timeout {
            break status;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = &mut interrupt => {
                if progress {
                    eprintln!();
                }
                eprintln!(
                    "interrupted: run {id} goes on; agents not reached by {} never run it (see `edgeprobe-collector run-now --show {id}`)",
                    created.expires_at,
                    id = created.run_id
                );
                return Ok(ExitCode::from(130));
            }
        }
    };
    if progress {
        eprintln!();
    }
    let s = status.summary();
    let timed_out: Vec<String> = s
        .running
        .iter()
        .chain(&s.pending)
        .cloned()
        .collect::<Vec<_>>();
    if args.json {
        print_json(&serde_json::json!({
            "run_id": created.run_id,
            "test": created.test,
            "results": status.results,
            "offline": s.offline,
            "expired": s.expired,
            "expires_at": created.expires_at,
            "busy": s.busy,
            "refused": s.refused,
            "timed_out": timed_out,
            "unknown": created.unknown,
        }));
    } else {
        if !s.offline.is_empty() {
            outln!(
                "offline (no session within {}s): {}; the request expires at {}, so one that connects later never runs it",
                runs::DISPATCH_WINDOW.as_secs(),
                s.offline.join(", "),
                created.expires_at
            );
        }
        if !s.expired.is_empty() {
            outln!(
                "expired (no session before {}, never sent): {}",
                created.expires_at,
                s.expired.join(", ")
            );
        }
        if !s.busy.is_empty() {
            outln!("busy (a speed test holds them): {}", s.busy.join(", "));
        }
        for r in &s.refused {
            outln!("refused by {}: {}", r.agent_id, r.reason);
        }
        if !timed_out.is_empty() {
            outln!(
                "no result within {}: {}",
                humantime::format_duration(timeout),
                timed_out.join(", ")
            );
        }
        outln!(
            "{} of {} agents returned a result",
            s.done.len(),
            created.agents.len()
        );
    }
    // Every agent reached (all but the offline ones) returned a result, and at least one.
    let reached = created.agents.len() - s.offline.len() - s.expired.len();
    Ok(if !s.done.is_empty() && s.done.len() == reached {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Where run-now makes and reads its run: the database, or the API (`--api`).
enum RunSource {
    Db(Client),
    Api(Remote),
}

impl RunSource {
    async fn create(&mut self, req: &RunRequest) -> Result<runs::Created, Failure> {
        match self {
            RunSource::Db(client) => Ok(runs::create(client, req, &operator_name()).await?),
            RunSource::Api(remote) => {
                let mut body = serde_json::Map::new();
                match &req.selection.agents {
                    Some(ids) => body.insert("agents".into(), serde_json::json!(ids)),
                    None => body.insert("select".into(), serde_json::json!(req.selection.select)),
                };
                match &req.test {
                    RunTest::Named(name) => {
                        body.insert("test".into(), name.clone().into());
                    }
                    RunTest::Adhoc {
                        kind,
                        target,
                        options,
                        name,
                    } => {
                        body.insert("kind".into(), kind.clone().into());
                        body.insert("target".into(), target.clone().into());
                        // Strings: the API types them as the command line does.
                        let options: serde_json::Map<String, serde_json::Value> = options
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone().into()))
                            .collect();
                        body.insert("options".into(), options.into());
                        if let Some(n) = name {
                            body.insert("name".into(), n.clone().into());
                        }
                    }
                }
                body.insert(
                    "expires".into(),
                    format!("{}ms", req.expires.as_millis()).into(),
                );
                #[derive(serde::Deserialize)]
                struct Answer {
                    #[serde(flatten)]
                    created: runs::Created,
                    timeout_seconds: f64,
                }
                let a: Answer = remote.post("/api/v1/runs", &body.into()).await?;
                Ok(runs::Created {
                    timeout: Duration::from_secs_f64(a.timeout_seconds.max(0.0)),
                    ..a.created
                })
            }
        }
    }

    async fn status(&self, run_id: i64) -> Result<runs::Status, Failure> {
        match self {
            RunSource::Db(client) => Ok(runs::status(client, run_id).await?),
            RunSource::Api(remote) => remote.get(&format!("/api/v1/runs/{run_id}")).await,
        }
    }
}

/// `run-now --show`: the run's agents by state, then its results.
fn print_run(status: &runs::Status) {
    let expiry = if status.expires_in_seconds > 0.0 {
        format!("expires at {}", status.expires_at)
    } else {
        format!("expired at {}", status.expires_at)
    };
    outln!(
        "run {}: test {}, made {} ago, {expiry}",
        status.run_id,
        status.test,
        human_age(status.age_seconds)
    );
    let rows: Vec<[String; 3]> = status
        .agents
        .iter()
        .map(|a| {
            [
                a.agent_id.clone(),
                a.state.clone(),
                a.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(["AGENT", "STATE", "REASON"], &rows);
    if !status.results.is_empty() {
        outln!("{:<20}  {:<4}  RESULT", "AGENT", "OK");
        for r in &status.results {
            outln!("{}", result_row(r));
        }
    }
}

/// `branch-042  ok    down 93.2 Mbit/s  up 11.0 Mbit/s ...`
fn result_row(r: &RunResult) -> String {
    let f = |k: &str| r.figures.get(k).and_then(|v| v.as_f64());
    let secs = |k: &str, label: &str| f(k).map(|v| format!("{label} {}", human_seconds(v)));
    let mut parts: Vec<String> = Vec::new();
    match r.kind.as_str() {
        "speed" => {
            parts.extend(f("download_bits_per_second").map(|v| format!("down {}", human_bps(v))));
            parts.extend(f("upload_bits_per_second").map(|v| format!("up {}", human_bps(v))));
            parts.extend(secs("idle_latency_seconds", "latency"));
            parts.extend(secs("jitter_seconds", "jitter"));
            parts.extend(
                f("download_loaded_loss_ratio")
                    .map(|v| format!("loss under load down {}", percent(v))),
            );
            parts.extend(f("upload_loaded_loss_ratio").map(|v| format!("up {}", percent(v))));
        }
        "icmp" => {
            parts.extend(secs("rtt_avg_seconds", "rtt avg"));
            parts.extend(secs("rtt_max_seconds", "max"));
            parts.extend(f("loss_ratio").map(|v| format!("loss {:.0}%", v * 100.0)));
        }
        "tcp" => {
            parts.extend(secs("connect_seconds", "connect"));
            parts.extend(secs("tls_seconds", "tls"));
        }
        "http" => {
            parts.extend(f("status_code").map(|v| format!("status {v}")));
            parts.extend(secs("ttfb_seconds", "ttfb"));
            parts.push(format!("total {}", human_seconds(r.duration_seconds)));
        }
        "dns" => {
            parts.extend(secs("resolve_seconds", "resolve"));
            parts.extend(
                r.figures
                    .get("rcode")
                    .and_then(|v| v.as_str())
                    .map(|c| c.to_string()),
            );
            parts.extend(f("answers").map(|v| format!("{v} answers")));
        }
        "responsiveness" => {
            parts.extend(f("responsiveness_rpm").map(|v| format!("{v:.0} RPM")));
            parts.extend(
                r.figures
                    .get("rating")
                    .and_then(|v| v.as_str())
                    .map(|c| format!("({c})")),
            );
            parts.extend(f("download_bits_per_second").map(|v| format!("down {}", human_bps(v))));
            parts.extend(f("upload_bits_per_second").map(|v| format!("up {}", human_bps(v))));
            parts.extend(secs("loaded_latency_seconds", "loaded latency"));
            if r.figures.get("stable").and_then(|v| v.as_bool()) == Some(false) {
                parts.push("not stable".into());
            }
        }
        "stamp" => {
            parts.extend(f("forward_loss_ratio").map(|v| format!("loss out {}", percent(v))));
            parts.extend(f("reverse_loss_ratio").map(|v| format!("back {}", percent(v))));
            parts.extend(secs("rtt_avg_seconds", "rtt avg"));
            parts.extend(secs("forward_delay_avg_seconds", "one-way out"));
            parts.extend(secs("reverse_delay_avg_seconds", "back"));
            parts.extend(secs("jitter_seconds", "jitter"));
            parts.extend(f("mos").map(|v| format!("MOS {v:.2}")));
        }
        "path" => {
            let hops = f("hop_count").unwrap_or(0.0);
            parts.push(match r.figures.get("reached").and_then(|v| v.as_bool()) {
                Some(true) => format!("reached in {hops:.0} hops"),
                _ => format!("not reached, {hops:.0} hops seen"),
            });
            parts.extend(f("path_loss_ratio").map(|v| format!("path loss {:.0}%", v * 100.0)));
            parts.extend(secs("rtt_avg_seconds", "rtt avg"));
            if r.figures.get("path_changed").and_then(|v| v.as_bool()) == Some(true) {
                parts.push("path changed".into());
            }
        }
        _ => {}
    }
    // The link after the figures, before an error: `family = "both"` gives two rows per
    // agent, told apart by it.
    let link: Vec<String> = [
        r.ip_family.clone(),
        r.interface.as_ref().map(|i| format!("via {i}")),
        r.local_address.as_ref().map(|a| format!("from {a}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !link.is_empty() {
        parts.push(link.join(" "));
    }
    if !r.success {
        parts.push(format!(
            "error {}: {}",
            r.error_class.as_deref().unwrap_or("?"),
            r.error_message.as_deref().unwrap_or("")
        ));
    }
    let mut row = format!(
        "{:<20}  {:<4}  {}",
        r.agent_id,
        if r.success { "ok" } else { "FAIL" },
        parts.join("  ")
    );
    if let Some(hops) = r.figures.get("hops").and_then(|h| h.as_array()) {
        hop_table(&mut row, hops);
    }
    row
}

/// A loss ratio as a percentage with the precision small losses need (`0.3%`, `12%`).
fn percent(ratio: f64) -> String {
    let p = ratio * 100.0;
    if p > 0.0 && p < 10.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// A path result's hops under its row, laid out as the agent's `probe path` table (and
/// `mtr --report`): TTL, address, Loss% (`!`: rate limiting, not path loss), Snt, Rcv, then
/// Avg, Best, Wrst, StDev in milliseconds; further addresses of a hop on their own lines.
fn hop_table(out: &mut String, hops: &[serde_json::Value]) {
    use std::fmt::Write as _;
    let text =
        |h: &serde_json::Value, k: &str| h.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let num = |h: &serde_json::Value, k: &str| h.get(k).and_then(|v| v.as_f64());
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |s| format!("{:.2}", s * 1e3));
    let width = hops
        .iter()
        .filter_map(|h| text(h, "address").map(|a| a.len()))
        .max()
        .unwrap_or(3)
        .max(4);
    let _ = write!(
        out,
        "\n      {:>3}  {:<width$}  {:>7} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8}",
        "TTL", "Host", "Loss%", "Snt", "Rcv", "Avg", "Best", "Wrst", "StDev"
    );
    let mut rate_limited = false;
    for h in hops {
        let limited = h.get("rate_limited").and_then(|v| v.as_bool()) == Some(true);
        rate_limited |= limited;
        let loss = num(h, "loss_ratio").map_or_else(
            || "-".to_string(),
            |l| format!("{:.1}%{}", l * 100.0, if limited { "!" } else { "" }),
        );
        let count = |k: &str| num(h, k).map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
        let _ = write!(
            out,
            "\n      {:>3}. {:<width$}  {:>7} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8}",
            num(h, "ttl").map_or(0, |t| t as i64),
            text(h, "address").unwrap_or_else(|| "???".into()),
            loss,
            count("sent"),
            count("received"),
            ms(num(h, "rtt_avg_seconds")),
            ms(num(h, "rtt_min_seconds")),
            ms(num(h, "rtt_max_seconds")),
            ms(num(h, "rtt_mdev_seconds")),
        );
        let main = text(h, "address");
        for other in h
            .get("addresses")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(other) = other.as_str().filter(|o| Some(*o) != main.as_deref()) {
                let _ = write!(out, "\n           {other}");
            }
        }
    }
    if rate_limited {
        out.push_str("\n      ! loss at this hop does not carry on to later hops: the router rate-limits its ICMP, not path loss");
    }
}

fn human_seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn human_bps(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} Gbit/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} Mbit/s", b / 1e6)
    } else {
        format!("{:.0} kbit/s", b / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bps(93_200_000.0), "93.2 Mbit/s");
        assert_eq!(human_bps(1_500_000_000.0), "1.50 Gbit/s");
        assert_eq!(human_seconds(0.0123), "12.3 ms");
        assert_eq!(human_seconds(2.5), "2.50 s");
        assert_eq!(percent(0.003), "0.3%");
        assert_eq!(percent(0.0), "0%");
        assert_eq!(percent(0.12), "12%");
    }

    #[test]
    fn stamp_and_loaded_loss_rows() {
        let result = |kind: &str, figures: serde_json::Value| RunResult {
            agent_id: "hh1".into(),
            test: "run-now".into(),
            kind: kind.into(),
            target: "192.0.2.7".into(),
            success: true,
            duration_seconds: 2.1,
            error_class: None,
            error_message: None,
            ip_family: None,
            local_address: None,
            interface: None,
            figures: serde_json::from_value(figures).unwrap(),
        };
        let stamp = result(
            "stamp",
            serde_json::json!({
                "forward_loss_ratio": 0.03, "reverse_loss_ratio": 0.0,
                "rtt_avg_seconds": 0.0125, "forward_delay_avg_seconds": 0.008,
                "reverse_delay_avg_seconds": 0.004, "jitter_seconds": 0.0009, "mos": 3.92
            }),
        );
        assert_eq!(
            result_row(&stamp),
            "hh1                   ok    loss out 3.0%  back 0%  rtt avg 12.5 ms  \
             one-way out 8.0 ms  back 4.0 ms  jitter 0.9 ms  MOS 3.92"
        );
        let speed = result(
            "speed",
            serde_json::json!({
                "download_bits_per_second": 9.4e7, "download_loaded_loss_ratio": 0.021,
                "upload_loaded_loss_ratio": 0.0
            }),
        );
        assert_eq!(
            result_row(&speed),
            "hh1                   ok    down 94.0 Mbit/s  loss under load down 2.1%  up 0%"
        );
    }

    #[test]
    fn rows_show_the_link() {
        let mut r = RunResult {
            agent_id: "hh1".into(),
            test: "run-now".into(),
            kind: "tcp".into(),
            target: "example.net:443".into(),
            success: false,
            duration_seconds: 3.0,
            error_class: Some("timeout".into()),
            error_message: Some("no answer".into()),
            ip_family: Some("ipv6".into()),
            local_address: Some("2001:db8::10".into()),
            interface: Some("wwan0".into()),
            figures: Default::default(),
        };
        assert_eq!(
            result_row(&r),
            "hh1                   FAIL  ipv6 via wwan0 from 2001:db8::10  error timeout: no answer"
        );
        r.interface = None;
        r.local_address = None;
        r.ip_family = Some("ipv4".into());
        r.success = true;
        r.figures.insert("connect_seconds".into(), 0.0021.into());
        assert_eq!(
            result_row(&r),
            "hh1                   ok    connect 2.1 ms  ipv4"
        );
    }
}
