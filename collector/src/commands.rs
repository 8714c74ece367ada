//! The collector's command line: the clap definitions of every command, and the one-shot
//! commands `check`, `migrate`, `ca` and `cert` (`run` is `run.rs`; `tests` and `run-now`,
//! the operator commands, are `cli.rs`).
//!
//! Each command returns `Result<ExitCode, Failure>`; `main` prints a failure and maps it
//! to the exit code (2 usage or configuration, 1 runtime). Messages are final here: main
//! adds nothing to them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::{ca, cli, paths, pg, run, schema};

pub use crate::cli::Failure;

/// Receives results from edgeprobe agents over gRPC, writes them to PostgreSQL and
/// exposes fleet metrics to Prometheus.
#[derive(Parser)]
#[command(name = "edgeprobe-collector", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check a configuration file and what `run` needs (TLS files, key matching the
    /// certificate, the database reachable); exit 0, 2 with file:line:col and the reason
    /// for a bad file, 1 when the database does not answer.
    Check {
        /// Collector configuration (TOML) to check.
        #[arg(long, short, default_value = "/etc/edgeprobe/collector.toml")]
        config: PathBuf,
        /// Do not connect to the database (checks its URL's settings only).
        #[arg(long)]
        offline: bool,
    },
    /// Run the collector.
    Run(RunArgs),
    /// Apply pending database migrations and exit.
    Migrate(MigrateArgs),
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
        db: cli::DbArgs,
        #[command(subcommand)]
        command: cli::TestsCommand,
    },
    /// Run a test now on some agents and print their results as they land. Exit 0 when
    /// every agent reached returned a result, 1 otherwise, 2 for a bad request.
    RunNow(cli::RunNowArgs),
    /// Path results: the hops that degraded agents share.
    Paths {
        #[command(flatten)]
        db: cli::DbArgs,
        #[command(subcommand)]
        command: paths::PathsCommand,
    },
    /// AS numbers of address ranges, naming the hops of path results.
    Asn {
        #[command(flatten)]
        db: cli::DbArgs,
        #[command(subcommand)]
        command: paths::AsnCommand,
    },
    /// The fleet: every known agent with its labels, version, online state, last contact,
    /// backlog, fleet tests version or refusal, clock and identity conflicts; `agents
    /// retire ID` forgets one that is gone.
    Agents(cli::AgentsArgs),
    /// Results as stored, oldest first: a table, JSON or CSV, streamed (an export of any
    /// size never sits in memory).
    Results(cli::ResultsArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Collector configuration (TOML). Without it, defaults plus the flags below.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL (overrides the file; else EDGEPROBE_DATABASE_URL or DATABASE_URL).
    #[arg(long)]
    pub database_url: Option<String>,
    /// gRPC listen address (default 0.0.0.0:7443).
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP listen address for /metrics, /healthz, /readyz (default 127.0.0.1:9464).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL (else the [database] url of --config, else EDGEPROBE_DATABASE_URL
    /// or DATABASE_URL, else those in the collector.env beside the configuration).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// The collector configuration whose database to migrate [default:
    /// /etc/edgeprobe/collector.toml when it exists].
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also drop daily partitions older than this (e.g. 90d). Without it, partitions are
    /// only created, never dropped.
    #[arg(long, value_parser = parse_retention)]
    pub retention: Option<std::time::Duration>,
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a CA (ca.pem, ca.key with mode 0600) in DIR; never overwrites one.
    Init {
        /// Directory to create the CA in (created if missing), e.g. /etc/edgeprobe/ca.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CertCommand {
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
        /// Directory to write NAME.pem and NAME.key into (created if missing).
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

impl RunArgs {
    /// The configuration `run` starts with: the file (or the defaults) with the flags and
    /// the environment applied, checked.
    pub fn config(self) -> Result<Config, Failure> {
        Config::load(self.config.as_deref())
            .and_then(|c| c.finish(self.database_url, self.grpc_listen, self.http_listen))
            .map_err(|e| Failure::Usage(e.to_string()))
    }
}

/// `check`: what `run` needs, short of binding its ports. The file parses; the server's
/// TLS files exist, hold PEM certificates and a private key, and the key belongs to the
/// certificate (the same load `run` does, `tls::ServerTls::load`); there is a database URL
/// that `run` would use (the file's, else the environment's) with valid TLS settings, and the
/// database answers a query within `DB_CHECK_TIMEOUT` (`offline` skips the connection).
pub async fn check(path: &Path, offline: bool) -> Result<ExitCode, Failure> {
    let c = Config::load(Some(path)).map_err(|e| Failure::Usage(e.to_string()))?;
    if !c.server.insecure {
        let missing: Vec<&str> = [
            ("tls_cert", &c.server.tls_cert),
            ("tls_key", &c.server.tls_key),
            ("client_ca", &c.server.client_ca),
        ]
        .into_iter()
        .filter(|(_, p)| p.is_none())
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(Failure::Usage(format!(
                "{}: [server] needs {} (mTLS is the default); set `insecure = true` only for local demos",
                path.display(),
                missing.join(", ")
            )));
        }
        let files = crate::tls::TlsFiles {
            cert: c.server.tls_cert.clone().unwrap_or_default(),
            key: c.server.tls_key.clone().unwrap_or_default(),
            client_ca: c.server.client_ca.clone().unwrap_or_default(),
        };
        crate::tls::ServerTls::load(files, std::sync::Arc::new(crate::metrics::Metrics::new()))
            .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
    }
    // The database URL's TLS settings and files, as `run` and `migrate` read them: the
    // file's URL, else the environment's (the unit's EnvironmentFile).
    let env_file = config::read_env_file(&config::env_file_of(path))
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let url = match config::database_url(None, c.database.url.clone(), &env_file) {
        Some((from, url)) => match pg::Target::parse(&url) {
            Ok(target) => {
                if !offline {
                    reach_database(&target, path, &from.to_string()).await?;
                }
                format!(
                    "from {from}, sslmode={}{}",
                    target.mode().name(),
                    if offline {
                        ", not connected (--offline)"
                    } else {
                        ", reachable"
                    }
                )
            }
            Err(e) => {
                return Err(Failure::Usage(format!(
                    "{}: {e} (url from {from})",
                    path.display()
                )))
            }
        },
        // `run --config FILE`, as the packaged unit starts it, would refuse to start.
        None => {
            return Err(Failure::Usage(format!(
                "{}: no database URL: `run` would refuse to start; set \
                 EDGEPROBE_DATABASE_URL in {} (the unit's EnvironmentFile) or [database] url",
                path.display(),
                config::env_file_of(path).display()
            )))
        }
    };
    println!("{}: ok (database url {url})", path.display());
    Ok(ExitCode::SUCCESS)
}

/// How long `check` waits for the database to answer.
const DB_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the database and runs one query; a failure is a runtime failure (exit 1)
/// that names the reason PostgreSQL (or the network) gave.
async fn reach_database(target: &pg::Target, path: &Path, from: &str) -> Result<(), Failure> {
    let unreachable = |why: String| {
        Failure::Runtime(format!(
            "{}: the database (url from {from}) is not reachable: {why}; `run` would retry \
             until it is (`check --offline` skips this)",
            path.display()
        ))
    };
    let attempt = async {
        let client = target.connect().await?;
        client.simple_query("SELECT 1").await.map(|_| ())
    };
    match tokio::time::timeout(DB_CHECK_TIMEOUT, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(unreachable(pg::describe(&e))),
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            DB_CHECK_TIMEOUT.as_secs()
        ))),
    }
}

/// `migrate`: applies pending migrations and keeps partitions once.
pub async fn migrate(args: MigrateArgs) -> Result<ExitCode, Failure> {
    let (url, _) = cli::resolve_url(args.database_url, args.config.as_deref())?;
    let target = pg::Target::parse(&url).map_err(|e| Failure::Usage(format!("migrate: {e}")))?;
    let applied = run::migrate_once(&target, args.retention)
        .await
        .map_err(|e| Failure::Runtime(format!("migrate: {e:#}")))?;
    println!(
        "schema at version {} (applied now: {:?})",
        schema::latest_version(),
        applied
    );
    Ok(ExitCode::SUCCESS)
}

fn ca_failure(e: ca::CaError) -> Failure {
    let message = format!("error: {e}");
    if e.is_usage() {
        Failure::Usage(message)
    } else {
        Failure::Runtime(message)
    }
}

/// `ca init`.
pub fn ca(command: CaCommand) -> Result<ExitCode, Failure> {
    match command {
        CaCommand::Init { dir } => {
            let w = ca::init(&dir).map_err(ca_failure)?;
            println!(
                "CA certificate {} (valid until {})\nCA key {} (mode 0600: keep it off the collector if you can)",
                w.cert.display(),
                w.not_after.date(),
                w.key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `cert issue`.
pub fn cert(command: CertCommand) -> Result<ExitCode, Failure> {
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
            let w = ca::issue(&req).map_err(ca_failure)?;
            println!(
                "{} certificate {} and key {} for `{}` (valid until {})",
                req.role.describe(),
                w.cert.display(),
                w.key.display(),
                req.name,
                w.not_after.date()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
