//! edgeprobe-agent: parse the command line, set up logging, install the shutdown signals,
//! dispatch. `run` goes to `edgeprobe_agent::run::run(config, path, shutdown)`; the other
//! commands live in `commands.rs`. Exit codes: 0 ok, 1 runtime failure, 2 bad
//! configuration or usage.
#![forbid(unsafe_code)]

mod commands;
mod docgen;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use edgeprobe_agent::config::Config;
use edgeprobe_agent::{run, target};

/// Runs scheduled network tests, keeps every result in a durable local buffer and streams
/// the results to an edgeprobe collector.
#[derive(Parser)]
#[command(name = "edgeprobe-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: schedule the configured tests and the fleet tests a collector pushed
    /// (kept in <state_dir>/fleet-tests.toml), run tests on demand (run-now), and ship
    /// the results. SIGHUP reloads the configuration file.
    Run {
        /// Agent configuration (TOML).
        #[arg(long, short, default_value = "/etc/edgeprobe/agent.toml")]
        config: PathBuf,
    },
    /// Check a configuration file; exit 0, or exit 2 with file:line:col and the reason.
    Check {
        /// Agent configuration (TOML) to check.
        #[arg(long, short, default_value = "/etc/edgeprobe/agent.toml")]
        config: PathBuf,
        /// Check the file alone, not the TLS files, the certificate's identity and the stored
        /// fleet tests it names (a config rendered for another host, Ansible's `validate`).
        #[arg(long)]
        offline: bool,
    },
    /// Run one probe now and print its result.
    Probe(commands::ProbeArgs),
    /// Serve as a speed and latency target (LibreSpeed backend protocol), a
    /// networkQuality responsiveness server (`/.well-known/nq`) and a STAMP
    /// Session-Reflector (RFC 8762, UDP 862).
    ServeTarget {
        /// Address to listen on, e.g. 0.0.0.0:8080.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Concurrent speed tests served; more get 503 busy.
        #[arg(long, default_value_t = target::DEFAULT_MAX_TESTS)]
        max_tests: usize,
        /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Reflect STAMP (RFC 8762 Session-Reflector) on this UDP address, or `off`.
        /// Default: the --listen host at UDP 862, skipped with a warning when it cannot be
        /// bound (an address given here that cannot be bound is an error).
        #[arg(long, value_parser = commands::parse_stamp_listen)]
        stamp_listen: Option<commands::StampListenArg>,
        /// STAMP packets per second reflected for each source address.
        #[arg(long, default_value_t = target::reflector::DEFAULT_RATE)]
        stamp_rate: u32,
        /// STAMP packets a source address may send at once beyond --stamp-rate.
        #[arg(long, default_value_t = target::reflector::DEFAULT_BURST)]
        stamp_burst: u32,
        /// STAMP sessions (sender address and port) kept; the longest idle go first.
        #[arg(long, default_value_t = target::reflector::DEFAULT_MAX_SESSIONS)]
        stamp_max_sessions: usize,
    },
    /// Show the local result buffer (backlog, oldest result, size on disk, dropped) and
    /// the fleet tests version this agent runs.
    Buffer {
        /// Agent configuration (TOML); the buffer is in its `state_dir`.
        #[arg(long, short, default_value = "/etc/edgeprobe/agent.toml")]
        config: PathBuf,
        /// One JSON object instead of lines for people.
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages (edgeprobe-agent.1 with the configuration reference, one page
    /// per command) into a directory. For packaging (scripts/package.sh).
    #[command(hide = true)]
    Manpage {
        /// Directory to write the pages into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...).
    #[command(hide = true)]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

/// For the long-running commands (`run`, `serve-target`): the relocation table was read
/// once, before main, and a service runs for months (`footprint`).
fn release_relocation_table() {
    match edgeprobe_agent::footprint::release_relocation_table() {
        Ok(bytes) => tracing::debug!(bytes, "relocation table released"),
        Err(e) => tracing::debug!(error = %e, "relocation table kept"),
    }
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

    match cli.command {
        Command::Manpage { out } => match docgen::write_man_pages(
            Cli::command(),
            "/etc/edgeprobe/agent.toml",
            include_str!("../../packaging/etc/agent.toml"),
            include_str!("../../packaging/man/edgeprobe-agent.roff"),
            &out,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "manpage: cannot write the man pages to {}: {e}",
                    out.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Completions { shell } => match docgen::write_completions(Cli::command(), shell) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("completions: cannot write the script: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config, offline } => commands::check(&config, offline),
        Command::Buffer { config, json } => commands::buffer(&config, json),
        Command::Probe(args) => commands::probe(args),
        Command::ServeTarget {
            listen,
            max_tests,
            tls_cert,
            tls_key,
            stamp_listen,
            stamp_rate,
            stamp_burst,
            stamp_max_sessions,
        } => {
            release_relocation_table();
            let rt = runtime();
            let shutdown = shutdown_on_signals(&rt);
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| target::TlsFiles { cert, key });
            let stamp = match stamp_listen {
                None => target::StampListen::default_for(listen),
                Some(commands::StampListenArg::Off) => target::StampListen::Off,
                Some(commands::StampListenArg::At(addr)) => target::StampListen::Explicit(addr),
            };
            let limits = target::reflector::Limits {
                max_sessions: stamp_max_sessions.max(1),
                rate: stamp_rate,
                burst: stamp_burst,
            };
            match commands::serve_target(&rt, listen, max_tests, tls, (stamp, limits), shutdown) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("serve-target: {:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            release_relocation_table();
            let rt = runtime();
            let shutdown = shutdown_on_signals(&rt);
            match rt.block_on(run::run(config, path, shutdown)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

/// A token cancelled on the first SIGTERM or SIGINT. The handlers are installed before
/// anything starts, so a signal arriving during start-up is handled rather than fatal.
fn shutdown_on_signals(rt: &tokio::runtime::Runtime) -> CancellationToken {
    use tokio::signal::unix::{signal, SignalKind};
    let _entered = rt.enter();
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("cannot install the SIGINT handler");
    let token = CancellationToken::new();
    let cancel = token.clone();
    rt.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        cancel.cancel();
    });
    token
}
