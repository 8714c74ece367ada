//! edgeprobe-collector: parse the command line, set up logging, dispatch. Exit codes: 0 ok,
//! 1 runtime failure, 2 bad configuration or usage.
#![forbid(unsafe_code)]

/// mimalloc instead of glibc's malloc: the ingest path allocates on one thread and frees
/// on another, where glibc spent about a third of the collector's time (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod ca;
mod config;
mod domain;
mod http;
mod identity;
mod ingest;
mod listen;
mod metrics;
mod pgcopy;
mod pgtls;
mod run;
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
                    Some((from, url)) => match pgtls::Target::parse(&url) {
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
            let target = match pgtls::Target::parse(&url) {
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
