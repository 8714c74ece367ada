//! edgeprobe-collector: parse the command line, set up logging, dispatch. Exit codes: 0 ok,
//! 1 runtime failure, 2 bad configuration or usage.
#![forbid(unsafe_code)]

/// mimalloc instead of glibc's malloc: the ingest path allocates on one thread and frees
/// on another, where glibc spent about a third of the collector's time (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod ca;
mod cli;
mod config;
mod controller;
mod domain;
mod fleet;
mod http;
mod identity;
mod ingest;
mod listen;
mod metrics;
mod pg;
mod run;
mod runs;
mod schema;
mod sessions;
mod store;
mod tls;
mod wire;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Receives results from edgeprobe agents over gRPC, writes them to PostgreSQL and
/// exposes fleet metrics to Prometheus.
#[derive(Parser)]
#[command(name = "edgeprobe-collector", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a configuration file; exit 0, or exit 2 with file:line:col and the reason.
    Check {
        #[arg(long, short, default_value = "/etc/edgeprobe/collector.toml")]
        config: PathBuf,
    },
    /// Run the collector.
    Run {
        /// Collector configuration (TOML). Without it, defaults plus the flags below.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// PostgreSQL URL (overrides the file; else EDGEPROBE_DATABASE_URL or DATABASE_URL).
        #[arg(long)]
        database_url: Option<String>,
        /// gRPC listen address (default 0.0.0.0:7443).
        #[arg(long)]
        grpc_listen: Option<SocketAddr>,
        /// HTTP listen address for /metrics, /healthz, /readyz (default 127.0.0.1:9464).
        #[arg(long)]
        http_listen: Option<SocketAddr>,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        /// PostgreSQL URL (else EDGEPROBE_DATABASE_URL or DATABASE_URL).
        #[arg(long)]
        database_url: Option<String>,
        /// Also drop daily partitions older than this (e.g. 90d). Without it, partitions are
        /// only created, never dropped.
        #[arg(long, value_parser = parse_retention)]
        retention: Option<std::time::Duration>,
    },
    /// The fleet certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Certificates signed by the fleet CA.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Fleet tests: tests kept in PostgreSQL, versioned, pushed to every connected agent
    /// they select (agents that speak "fleet-tests"), beside the agents' own tests.
    Tests {
        #[command(flatten)]
        db: DbArgs,
        #[command(subcommand)]
        command: TestsCommand,
    },
    /// Run a test now on some agents and print their results as they land. Exit 0 when
    /// every agent reached returned a result, 1 otherwise, 2 for a bad request.
    RunNow(RunNowArgs),
}

/// How `tests` and `run-now` reach PostgreSQL: --database-url, else the [database] url of
/// --config, else EDGEPROBE_DATABASE_URL or DATABASE_URL.
#[derive(clap::Args)]
struct DbArgs {
    /// PostgreSQL URL.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// A collector configuration whose [database] url to use.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TestsCommand {
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
struct RunNowArgs {
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
    /// An ad-hoc test of this kind (speed, icmp, tcp, http, dns), with --target.
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
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA (ca.pem, ca.key with mode 0600) in DIR; never overwrites one.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue an agent certificate (client auth, CN = ID), with --server a collector
    /// certificate (server auth, SANs = ID and every --san), or with --operator an operator
    /// certificate for the HTTP API (client auth, CN = NAME, URI SAN
    /// urn:edgeprobe:operator:NAME). Writes OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The agent id, or the collector's DNS name.
        #[arg(
            long,
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        name: Option<String>,
        /// An operator certificate for the HTTP API, named NAME (recorded as who made each
        /// change); agents' certificates never carry the operator role.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["server", "sans"])]
        operator: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// A collector (server) certificate instead of an agent (client) one.
        #[arg(long)]
        server: bool,
        /// Another DNS name or IP address of the collector (repeatable; --server only).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = ca::LEAF_DAYS)]
        days: i64,
        /// Replace existing files (atomically).
        #[arg(long)]
        force: bool,
    },
}

fn parse_retention(s: &str) -> Result<std::time::Duration, String> {
    config::parse_retention(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match cli.command {
        Command::Ca { command } => return ca_command(command),
        Command::Cert { command } => return cert_command(command),
        other => Cli { command: other },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");

    match cli.command {
        Command::Run {
            config,
            database_url,
            grpc_listen,
            http_listen,
        } => {
            let config = match Config::load(config.as_deref())
                .and_then(|c| c.finish(database_url, grpc_listen, http_listen))
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(run::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match Config::load(Some(&config)) {
            Ok(c) => {
                let mut missing = Vec::new();
                if !c.server.insecure {
                    for p in [&c.server.tls_cert, &c.server.tls_key, &c.server.client_ca] {
                        match p {
                            Some(p) if std::fs::metadata(p).is_err() => {
                                missing.push(p.display().to_string())
                            }
                            None => missing.push("(not set)".into()),
                            _ => {}
                        }
                    }
                }
                // The database URL's TLS settings and files, as `run` and `migrate` read
                // them: the file's URL, else the environment's (the unit's EnvironmentFile).
                let env = ["EDGEPROBE_DATABASE_URL", "DATABASE_URL"]
                    .into_iter()
                    .find_map(|v| std::env::var(v).ok().map(|url| (v, url)));
                let source = match (&c.database.url, env) {
                    (Some(url), _) => Some(("the file".to_string(), url.clone())),
                    (None, Some((var, url))) => Some((format!("${var}"), url)),
                    (None, None) => None,
                };
                let url = match source {
                    Some((from, url)) => match pg::Target::parse(&url) {
                        Ok(target) => format!("from {from}, sslmode={}", target.mode().name()),
                        Err(e) => {
                            eprintln!("{}: {e} (url from {from})", config.display());
                            return ExitCode::from(2);
                        }
                    },
                    None => "from --database-url or the environment".to_string(),
                };
                if missing.is_empty() {
                    println!("{}: ok (database url {url})", config.display());
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                        "{}: TLS files missing or unreadable: {}",
                        config.display(),
                        missing.join(", ")
                    );
                    ExitCode::from(2)
                }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Migrate {
            database_url,
            retention,
        } => {
            let url = database_url
                .or_else(|| std::env::var("EDGEPROBE_DATABASE_URL").ok())
                .or_else(|| std::env::var("DATABASE_URL").ok());
            let Some(url) = url else {
                eprintln!("no database URL: pass --database-url or set EDGEPROBE_DATABASE_URL or DATABASE_URL");
                return ExitCode::from(2);
            };
            let target = match pg::Target::parse(&url) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("migrate: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(run::migrate_once(&target, retention)) {
                Ok(applied) => {
                    println!(
                        "schema at version {} (applied now: {:?})",
                        schema::latest_version(),
                        applied
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("migrate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Tests { db, command } => runtime.block_on(cli::tests(db, command)),
        Command::RunNow(args) => runtime.block_on(cli::run_now(args)),
        Command::Ca { .. } | Command::Cert { .. } => unreachable!("dispatched above"),
    }
}

fn ca_exit(e: ca::CaError) -> ExitCode {
    eprintln!("error: {e}");
    if e.is_usage() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

fn ca_command(command: CaCommand) -> ExitCode {
    match command {
        CaCommand::Init { dir } => match ca::init(&dir) {
            Ok(w) => {
                println!(
                    "CA certificate {} (valid until {})\nCA key {} (mode 0600: keep it off the collector if you can)",
                    w.cert.display(),
                    w.not_after.date(),
                    w.key.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => ca_exit(e),
        },
    }
}

fn cert_command(command: CertCommand) -> ExitCode {
    match command {
        CertCommand::Issue {
            ca,
            name,
            operator,
            out,
            server,
            sans,
            days,
            force,
        } => {
            let (name, role) = match (operator, server) {
                (Some(op), _) => (op, ca::Role::Operator),
                (None, true) => (name.unwrap_or_default(), ca::Role::Server),
                (None, false) => (name.unwrap_or_default(), ca::Role::Agent),
            };
            let req = ca::IssueRequest {
                ca_dir: ca,
                name,
                out,
                role,
                sans,
                days,
                force,
            };
            match ca::issue(&req) {
                Ok(w) => {
                    println!(
                        "{} certificate {} and key {} for `{}` (valid until {})",
                        req.role.describe(),
                        w.cert.display(),
                        w.key.display(),
                        req.name,
                        w.not_after.date()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => ca_exit(e),
            }
        }
    }
}
