//! edgeprobe-agent: parse the command line, set up logging, dispatch. Exit codes: 0 ok,
//! 1 runtime failure, 2 bad configuration or usage.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use edgeprobe_agent::config::{Config, Kind, TestOptions};
use edgeprobe_agent::probe::{self, ProbeSpec};
use edgeprobe_agent::{buffer, fleet, report, run, target};

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
        #[arg(long, short, default_value = "/etc/edgeprobe/agent.toml")]
        config: PathBuf,
    },
    /// Run one probe now and print its result.
    Probe {
        /// speed, icmp, tcp, http or dns.
        kind: Kind,
        /// URL (speed, http), host (icmp, dns) or host:port (tcp).
        target: String,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// speed: measurement time per direction, e.g. 10s.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// speed: parallel streams per direction (default 6 down, 3 up).
        #[arg(long)]
        streams: Option<u32>,
        /// icmp: echo requests to send.
        #[arg(long)]
        count: Option<u32>,
        /// icmp: time between echo requests, e.g. 200ms.
        #[arg(long, value_parser = parse_duration)]
        interval: Option<Duration>,
        /// Whole-run limit, e.g. 5s.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// tcp: also time a TLS handshake.
        #[arg(long)]
        tls: bool,
        /// tcp, http: accept any server certificate.
        #[arg(long)]
        insecure_tls: bool,
        /// http: request method.
        #[arg(long)]
        method: Option<String>,
        /// http: the status that counts as success (default: any below 400).
        #[arg(long)]
        expect_status: Option<u16>,
        /// http: text the body must contain (searched decoded, up to 64 MiB).
        #[arg(long)]
        body_match: Option<String>,
        /// http: redirects to follow, at most (default 0).
        #[arg(long)]
        follow_redirects: Option<u32>,
        /// dns: record type (A, AAAA, MX, TXT, ...).
        #[arg(long)]
        record_type: Option<String>,
        /// dns: server to ask (ip or ip:port) instead of the system resolver.
        #[arg(long)]
        server: Option<String>,
    },
    /// Serve as a speed and latency target (LibreSpeed backend protocol).
    ServeTarget {
        /// Address to listen on, e.g. 0.0.0.0:8080.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Concurrent speed tests served; more get 503 busy.
        #[arg(long, default_value_t = target::DEFAULT_MAX_TESTS)]
        max_tests: usize,
    },
    /// Show the local result buffer (backlog, oldest result, size on disk, dropped) and
    /// the fleet tests version this agent runs.
    Buffer {
        #[arg(long, short, default_value = "/etc/edgeprobe/agent.toml")]
        config: PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    edgeprobe_proto::testdef::parse_duration(s)
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
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok (agent {}, {} tests, {} endpoint(s))",
                    config.display(),
                    c.agent_id(),
                    c.tests.len(),
                    c.collector.endpoints.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let path = config;
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match runtime().block_on(run::run(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Buffer { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match buffer::Buffer::open(&config.agent.state_dir, config.agent.buffer_max_bytes) {
                Ok(buffer) => {
                    print!("{}", buffer.stats().render(&config.agent.state_dir));
                    print!("{}", fleet::describe(&config.agent.state_dir));
                    ExitCode::SUCCESS
                }
                Err(buffer::BufferError::Locked { .. }) => {
                    // A running agent holds sled's lock; show what it publishes. One that
                    // just started publishes within a few seconds.
                    let path = run::status_path(&config.agent.state_dir);
                    let deadline = std::time::Instant::now() + run::STATUS_EVERY * 2;
                    loop {
                        if let Ok(text) = std::fs::read_to_string(&path) {
                            let age = std::fs::metadata(&path)
                                .and_then(|m| m.modified())
                                .ok()
                                .and_then(|t| t.elapsed().ok())
                                .map_or(0, |d| d.as_secs());
                            print!("{text}");
                            print!("{}", fleet::describe(&config.agent.state_dir));
                            println!("(published by the running agent {age}s ago)");
                            return ExitCode::SUCCESS;
                        }
                        if std::time::Instant::now() >= deadline {
                            eprintln!("the buffer is in use by a running agent, which has not published its status; try again in a few seconds");
                            return ExitCode::FAILURE;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ServeTarget { listen, max_tests } => {
            let rt = runtime();
            let stop = {
                let _entered = rt.enter();
                run::shutdown_signal()
            };
            match rt.block_on(target::serve(listen, max_tests, stop)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("serve-target: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Probe {
            kind,
            target,
            json,
            duration,
            streams,
            count,
            interval,
            timeout,
            tls,
            insecure_tls,
            method,
            expect_status,
            body_match,
            follow_redirects,
            record_type,
            server,
        } => {
            if let Err(reason) = edgeprobe_proto::testdef::check_target(kind, &target) {
                eprintln!("edgeprobe-agent probe: {reason}");
                return ExitCode::from(2);
            }
            let spec = ProbeSpec {
                kind,
                target,
                options: TestOptions {
                    timeout,
                    duration,
                    streams,
                    count,
                    interval,
                    tls: tls.then_some(true),
                    insecure_tls: insecure_tls.then_some(true),
                    method,
                    expect_status,
                    body_match,
                    follow_redirects,
                    record_type,
                    server,
                    ..TestOptions::default()
                },
            };
            // The speed probe takes ~20 s: show progress when a person is watching.
            probe::speed::show_progress(kind == Kind::Speed && std::io::stderr().is_terminal());
            let outcome = runtime().block_on(probe::run(&spec));
            let text = if json {
                format!("{}\n", report::json(&spec, &outcome))
            } else {
                report::human(&spec, &outcome)
            };
            // `probe ... | head -1`: a reader that has gone is not an error worth a panic
            // (print! would panic on EPIPE); the exit code still says how the probe went.
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush());
            if outcome.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
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
