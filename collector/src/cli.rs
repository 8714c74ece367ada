//! The operator commands `tests ...` and `run-now`: their arguments, reaching PostgreSQL
//! (the URL resolved by `config::database_url`), calling fleet.rs / runs.rs, printing tables
//! (or JSON). Errors become `commands::Failure`: usage (exit 2) for a bad file, request or
//! unknown version, runtime (exit 1) for a database failure; a run-now that did not get
//! every reached agent's result exits 1 on its own.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use tokio_postgres::Client;

use crate::config::{self, Config};
use crate::fleet::{self, Change, FleetError, Selection};
use crate::pg;
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

/// How `tests` and `run-now` reach PostgreSQL: --database-url, else the [database] url of
/// --config, else EDGEPROBE_DATABASE_URL or DATABASE_URL.
#[derive(clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// A collector configuration whose [database] url to use.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
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
        /// Recorded as who made the version (default: $SUDO_USER, else $USER), e.g. by
        /// automation acting for a person.
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Show what applying FILE would add, change and remove, and how many known agents each
    /// test selects. Changes nothing.
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
        /// Recorded as who made the version (default: $SUDO_USER, else $USER), e.g. by
        /// automation acting for a person.
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["select", "agent"])))]
#[command(group(clap::ArgGroup::new("what").required(true).args(["test", "kind"])))]
pub struct RunNowArgs {
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
    /// An ad-hoc test of this kind (speed, icmp, tcp, http, dns, path), with --target.
    #[arg(long, requires = "target")]
    kind: Option<String>,
    /// The ad-hoc test's target, as in the agent config.
    #[arg(long, requires = "kind")]
    target: Option<String>,
    /// An option of the ad-hoc test, as in [test.options] (repeatable); the value is an
    /// integer, true|false, or else a string ("10s", "GET").
    #[arg(long = "option", value_name = "KEY=VALUE", value_parser = parse_pair, requires = "kind")]
    options: Vec<(String, String)>,
    /// The ad-hoc test's name in the results (default run-now).
    #[arg(long, requires = "kind")]
    name: Option<String>,
    /// Print one JSON document at the end instead of the table.
    #[arg(long)]
    json: bool,
    /// How long to wait for results (default 30s; a speed test 2 x duration + 30s).
    #[arg(long, value_parser = edgeprobe_proto::testdef::parse_duration)]
    timeout: Option<std::time::Duration>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// The operator as `created_by`: $SUDO_USER (the person behind sudo), else $USER, else
/// the uid.
pub fn operator_name() -> String {
    use std::os::unix::fs::MetadataExt;
    ["SUDO_USER", "USER"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| match std::fs::metadata("/proc/self") {
            Ok(m) => format!("uid {}", m.uid()),
            Err(_) => "unknown".to_string(),
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

pub(crate) async fn connect(db: &DbArgs) -> Result<Client, Failure> {
    // The file is read only when the flag does not give the URL.
    let file = match (&db.database_url, &db.config) {
        (None, Some(path)) => {
            let config = Config::load(Some(path)).map_err(|e| Failure::Usage(e.to_string()))?;
            config.database.url
        }
        _ => None,
    };
    let (_, url) = config::database_url(db.database_url.clone(), file).ok_or_else(|| {
        Failure::Usage(
            "no database URL: pass --database-url or --config, or set EDGEPROBE_DATABASE_URL or DATABASE_URL"
                .into(),
        )
    })?;
    let target = pg::Target::parse(&url).map_err(|e| Failure::Usage(e.to_string()))?;
    target.connect().await.map_err(|e| {
        // `tokio_postgres::Error` alone displays as the bare "db error".
        Failure::Runtime(format!(
            "error: cannot connect to postgres: {}",
            pg::describe(&e)
        ))
    })
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
    // A bad file is reported without a database.
    if let TestsCommand::Apply { file, .. } | TestsCommand::Diff { file, .. } = &command {
        fleet::parse_file(&read_file(file)?, &file.display().to_string())?;
    }
    let mut client = connect(&db).await?;
    match command {
        TestsCommand::Apply {
            file,
            dry_run,
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
            )
            .await?;
            if json {
                print_json(&applied);
                return Ok(ExitCode::SUCCESS);
            }
            let d = &applied.diff;
            warn_unselecting(d);
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
            if json {
                print_json(&d);
                return Ok(ExitCode::SUCCESS);
            }
            print_changes(&d);
            warn_unselecting(&d);
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
        }
        TestsCommand::List { json } => {
            let l = fleet::list(&client).await?;
            if json {
                print_json(&l);
                return Ok(ExitCode::SUCCESS);
            }
            let Some(v) = &l.current else {
                outln!(
                    "no fleet tests yet ({} known agents); make some with `tests apply --file F`",
                    l.agents_known
                );
                return Ok(ExitCode::SUCCESS);
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
            outln!(
                "agents: {} known, {} applied, {} behind, {} refused, {} too old for fleet tests",
                l.agents_known,
                l.applied,
                l.behind,
                l.refused.len(),
                l.too_old
            );
            for r in &l.refused {
                outln!("  refused by {}: {}", r.agent_id, r.error);
            }
        }
        TestsCommand::Versions { json } => {
            let vs = fleet::versions(&client).await?;
            if json {
                print_json(&vs);
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
        TestsCommand::Rollback { version, by, json } => {
            let applied =
                fleet::rollback(&mut client, version, &by.unwrap_or_else(operator_name)).await?;
            if json {
                print_json(&applied);
                return Ok(ExitCode::SUCCESS);
            }
            let d = &applied.diff;
            outln!(
                "version {} applied (the tests of version {version}): +{} ~{} -{} tests; selects {} of {} known agents",
                applied.version.unwrap_or_default(),
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

/// Warns (stderr) about tests that select none of the known agents: a typo in an id or a
/// label value is otherwise applied without a word. Not an error: the agent may not have
/// connected yet.
fn warn_unselecting(d: &fleet::Diff) {
    for t in &d.tests {
        if t.agents_selected == 0 && !matches!(t.change, fleet::Change::Removed) {
            eprintln!(
                "warning: test `{}` ({}) selects none of the {} known agents; check the ids or labels",
                t.name, t.selection, d.agents_known
            );
        }
    }
}

/// `run-now`.
pub async fn run_now(args: RunNowArgs) -> Result<ExitCode, Failure> {
    let test = match (args.test, args.kind, args.target) {
        (Some(name), None, None) => RunTest::Named(name),
        (None, Some(kind), Some(target)) => {
            // Checked before the database: a typo is exit 2 without touching anything.
            runs::adhoc_block(&kind, &target, &args.options, args.name.as_deref())?;
            RunTest::Adhoc {
                kind,
                target,
                options: args.options,
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
    let mut client = connect(&args.db).await?;
    let created = runs::create(
        &mut client,
        &RunRequest { selection, test },
        &operator_name(),
    )
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
            "run {}: test {} on {} agent{} (waiting up to {})",
            created.run_id,
            created.test,
            created.agents.len(),
            if created.agents.len() == 1 { "" } else { "s" },
            humantime::format_duration(timeout)
        );
    }
    let progress = !args.json && std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut printed = BTreeSet::new();
    let mut header = false;
    let status = loop {
        let status = runs::status(&client, created.run_id).await?;
        let summary = status.summary();
        if !args.json {
            for r in &status.results {
                if printed.insert(r.agent_id.clone()) {
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
        tokio::time::sleep(POLL_EVERY).await;
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
            "busy": s.busy,
            "refused": s.refused,
            "timed_out": timed_out,
            "unknown": created.unknown,
        }));
    } else {
        if !s.offline.is_empty() {
            outln!(
                "offline (no session within {}s): {}",
                runs::DISPATCH_WINDOW.as_secs(),
                s.offline.join(", ")
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
    let reached = created.agents.len() - s.offline.len();
    Ok(if !s.done.is_empty() && s.done.len() == reached {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
    }
}
