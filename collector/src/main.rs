//! edgeprobe-collector: parse the command line, set up logging, dispatch to the command,
//! map its failure to the exit code: 0 ok, 1 runtime failure, 2 bad configuration or
//! usage. For `run`, main also owns the process's signals: SIGTERM and SIGINT cancel the
//! shutdown token that `run::run` drains on (SIGHUP, the TLS reload, stays in `tls.rs`).
#![forbid(unsafe_code)]

/// mimalloc instead of glibc's malloc: the ingest path allocates on one thread and frees
/// on another, where glibc spent about a third of the collector's time (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod agents;
mod api;
mod backoff;
mod ca;
mod cli;
mod commands;
mod config;
mod controller;
mod docgen;
mod domain;
mod fleet;
mod http;
mod identity;
mod ingest;
mod listen;
mod metrics;
mod paths;
mod pg;
mod remote;
mod results;
mod run;
mod runs;
mod schema;
mod sessions;
mod store;
mod tls;
mod wire;

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::commands::{Cli, Command, Failure, RunArgs};

fn main() -> ExitCode {
    if let Some(code) = docgen::packaging_command(<Cli as clap::CommandFactory>::command()) {
        return code;
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Run(args) => serve(args),
        Command::Check { config, offline } => block_on(commands::check(&config, offline)),
        Command::Migrate(args) => block_on(commands::migrate(args)),
        Command::Ca { command } => commands::ca(command),
        Command::Cert { command } => commands::cert(command),
        Command::Tests { db, command } => block_on(cli::tests(db, command)),
        Command::RunNow(args) => block_on(cli::run_now(args)),
        Command::Paths { db, command } => block_on(paths::paths(db, command)),
        Command::Asn { db, command } => block_on(paths::asn(db, command)),
        Command::Agents(args) => block_on(cli::agents(args)),
        Command::Results(args) => block_on(cli::results(args)),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
        Err(Failure::Run(e)) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    runtime().block_on(f)
}

/// `run`: the checked configuration, then the collector until SIGTERM or SIGINT.
fn serve(args: RunArgs) -> Result<ExitCode, Failure> {
    let config = args.config()?;
    runtime().block_on(async {
        let shutdown = CancellationToken::new();
        // Handlers first: a signal during start-up (e.g. while waiting for PostgreSQL)
        // stops the collector cleanly instead of killing it.
        let stop = shutdown_signal();
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                stop.await;
                tracing::info!("shutting down");
                shutdown.cancel();
            }
        });
        run::run(config, shutdown).await.map_err(Failure::Run)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Installs the SIGTERM and SIGINT handlers now, so that a signal arriving during start-up
/// is handled rather than fatal, and returns a future that resolves on the first of them.
/// Must be called inside the runtime.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("cannot install the SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
