//! The commands other than `run`: `check`, `buffer`, `probe` (the command line turned into
//! a `ProbeSpec`) and `serve-target`. Each returns its exit code (0 ok, 1 runtime failure,
//! 2 bad configuration or usage) or its error.
//!
//! Output goes through `out`: a reader that has gone (`... | head`) is not worth a panic
//! (`print!` panics on EPIPE); the exit code still says how the command went.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use edgeprobe_agent::buffer::{self, Buffer, BufferError};
use edgeprobe_agent::config::{Config, Kind, TestOptions};
use edgeprobe_agent::probe::{self, ProbeSpec};
use edgeprobe_agent::{fleet, report, run, target};
use edgeprobe_proto::testdef::{IpFamily, PathProtocol};

/// Writes `text` to stdout, ignoring a closed pipe.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// `check`: exit 0 with a summary, or 2 with the located reason. Beyond the file it checks
/// what `run` would fail on: the mTLS files and the identity (`Config::check_credentials`)
/// and the stored fleet tests against the local ones (`fleet::check_stored`; a clash is a
/// warning, as `run` starts and refuses the fleet set). `offline`
/// checks the file alone, for a config rendered for another host (Ansible's `validate`).
pub fn check(path: &Path, offline: bool) -> ExitCode {
    let c = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    warn_missing_interfaces(&c);
    if offline {
        out(&format!(
            "{}: ok (agent {}; the file only: TLS files and stored fleet tests not checked)\n",
            path.display(),
            c.agent_id()
        ));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = c.check_credentials() {
        eprintln!("{}: {e}", path.display());
        return ExitCode::from(2);
    }
    // A clash with the stored fleet tests is a warning, not a refusal: `run` starts,
    // delivers its buffer and runs its local tests, refusing the fleet set and telling the
    // collector why. Failing here would keep a packaged agent down (the unit's
    // ExecStartPre runs `check`) with its results undelivered.
    let fleet = match fleet::check_stored(&c.agent.state_dir, &c) {
        Ok(Some(version)) => format!(", fleet tests version {version}"),
        Ok(None) => String::new(),
        Err(e) => {
            eprintln!("warning: {e}");
            ", fleet tests refused (see the warning)".to_string()
        }
    };
    let n =
        |count: usize, what: &str| format!("{count} {what}{}", if count == 1 { "" } else { "s" });
    out(&format!(
        "{}: ok (agent {}, {}, {}{fleet})\n",
        path.display(),
        c.agent_id(),
        n(c.tests.len(), "test"),
        n(c.collector.endpoints.len(), "endpoint")
    ));
    ExitCode::SUCCESS
}

/// Warns (stderr, not an error) about each test bound to an interface this host does not
/// have now: it may appear later (an LTE modem, a VPN), and until it does the test fails
/// with class `local` naming it.
fn warn_missing_interfaces(c: &Config) {
    for test in &c.tests {
        let Some(interface) = &test.options.get_ref().interface else {
            continue;
        };
        if probe::addr::scope_id(interface).is_err() {
            eprintln!(
                "warning: test `{}`: interface `{interface}` does not exist on this host (yet); \
                 its runs fail with class local until it does",
                test.name.get_ref()
            );
        }
    }
}

/// `buffer`: the buffer's counters and the fleet version, for people or (`json`) as one
/// JSON object. Opens the buffer when no agent holds it; otherwise shows what the
/// running agent publishes (`run::status_path`).
pub fn buffer(path: &Path, json: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let state_dir = &config.agent.state_dir;
    match Buffer::open(state_dir, config.agent.buffer_max_bytes) {
        Ok(buffer) => {
            show_buffer(&buffer.stats(), state_dir, None, json);
            ExitCode::SUCCESS
        }
        Err(BufferError::Locked { .. }) => published_status(state_dir, json),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the counters and the fleet tests; `published_age` is how old the running
/// agent's published counters are (`None`: read from the buffer itself).
fn show_buffer(stats: &buffer::Stats, state_dir: &Path, published_age: Option<u64>, json: bool) {
    if json {
        let mut v = report::buffer_json(stats, state_dir);
        v["fleet_tests"] = fleet::describe_json(state_dir);
        v["published_seconds_ago"] = serde_json::json!(published_age);
        out(&format!("{v}\n"));
    } else {
        out(&format!(
            "{}{}{}",
            report::buffer_status(stats, state_dir),
            fleet::describe(state_dir),
            published_age.map_or(String::new(), |age| format!(
                "(published by the running agent {age}s ago)\n"
            ))
        ));
    }
}

/// A running agent holds sled's lock; show what it publishes. One that just started
/// publishes within a few seconds.
fn published_status(state_dir: &Path, json: bool) -> ExitCode {
    let path = run::status_path(state_dir);
    let deadline = Instant::now() + run::STATUS_EVERY * 2;
    loop {
        let published = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .and_then(|v| report::stats_from_json(&v));
        if let Some(stats) = published {
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map_or(0, |d| d.as_secs());
            show_buffer(&stats, state_dir, Some(age), json);
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            eprintln!("the buffer is in use by a running agent, which has not published its status; try again in a few seconds");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `serve-target` until `shutdown`.
pub fn serve_target(
    rt: &tokio::runtime::Runtime,
    listen: SocketAddr,
    max_tests: usize,
    tls: Option<target::TlsFiles>,
    stamp: (target::StampListen, target::reflector::Limits),
    shutdown: CancellationToken,
) -> Result<(), target::ServeError> {
    rt.block_on(target::serve(
        listen,
        max_tests,
        tls,
        stamp,
        shutdown.cancelled_owned(),
    ))
}

/// `--stamp-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
pub enum StampListenArg {
    Off,
    At(SocketAddr),
}

pub fn parse_stamp_listen(s: &str) -> Result<StampListenArg, String> {
    if s == "off" {
        return Ok(StampListenArg::Off);
    }
    s.parse()
        .map(StampListenArg::At)
        .map_err(|_| format!("`{s}`: expected ADDRESS:PORT (e.g. 0.0.0.0:862) or off"))
}

/// `probe`'s command line.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// speed, icmp, tcp, http, dns, path, responsiveness or stamp.
    kind: Kind,
    /// URL (speed, http; responsiveness: a networkQuality configuration
    /// `https://host/.well-known/nq` or an edgeprobe target's base URL), host (icmp, dns,
    /// path), host:port (tcp) or host[:port] (stamp: a STAMP reflector, port 862 unless
    /// given).
    target: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// speed: measurement time per direction, e.g. 10s.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// responsiveness: longest time of each direction (2s to 300s, default 20s).
    #[arg(long, value_parser = parse_duration)]
    max_duration: Option<Duration>,
    /// speed: parallel streams per direction (default 6 down, 3 up).
    #[arg(long)]
    streams: Option<u32>,
    /// icmp: echo requests to send; path: rounds (default 10); stamp: test packets
    /// (default 100).
    #[arg(long)]
    count: Option<u32>,
    /// icmp: time between echo requests, e.g. 200ms; path: between rounds (default 1s);
    /// stamp: between test packets (default 20ms).
    #[arg(long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// stamp: DSCP of the test packets (0 to 63, e.g. 46 for EF as voice is marked).
    #[arg(long)]
    dscp: Option<u8>,
    /// stamp: UDP payload of each test packet in bytes (44 to 1472, default 44).
    #[arg(long)]
    packet_size: Option<u32>,
    /// Whole-run limit, e.g. 5s.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// tcp: also time a TLS handshake.
    #[arg(long)]
    tls: bool,
    /// tcp, http, speed, responsiveness: accept any server certificate.
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
    /// path: probe packets, icmp (default; CAP_NET_RAW or a ping socket), udp (no
    /// privileges) or tcp (SYN; CAP_NET_RAW).
    #[arg(long, value_parser = parse_protocol)]
    protocol: Option<PathProtocol>,
    /// path: destination port of udp (default 33434) and tcp (default 80) probes.
    #[arg(long)]
    port: Option<u16>,
    /// path: highest TTL probed (default 30).
    #[arg(long)]
    max_hops: Option<u32>,
    /// Every kind: bind the probe's sockets to this interface (SO_BINDTODEVICE).
    #[arg(long)]
    interface: Option<String>,
    /// Every kind: bind the probe's sockets to this local address before they connect.
    #[arg(long)]
    source: Option<String>,
    /// Every kind: ipv4, ipv6, any (default) or both (one run per family).
    #[arg(long, value_parser = parse_family)]
    family: Option<IpFamily>,
}

fn parse_family(s: &str) -> Result<IpFamily, String> {
    match s {
        "ipv4" => Ok(IpFamily::Ipv4),
        "ipv6" => Ok(IpFamily::Ipv6),
        "any" => Ok(IpFamily::Any),
        "both" => Ok(IpFamily::Both),
        other => Err(format!("`{other}`: expected ipv4, ipv6, any or both")),
    }
}

fn parse_protocol(s: &str) -> Result<PathProtocol, String> {
    match s {
        "icmp" => Ok(PathProtocol::Icmp),
        "udp" => Ok(PathProtocol::Udp),
        "tcp" => Ok(PathProtocol::Tcp),
        other => Err(format!("`{other}`: expected icmp, udp or tcp")),
    }
}

/// The value checks of a `[[test]]`'s options (icmp `count = 0`, speed `streams = 0`, a dns
/// `server` that is no address, ...), so `probe` refuses what `check` refuses.
fn check_options(spec: &ProbeSpec) -> Result<(), String> {
    edgeprobe_proto::testdef::check_option_values("probe", spec.kind, &spec.options)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    edgeprobe_proto::testdef::parse_duration(s)
}

/// `probe`: one probe now; exit 0 when it succeeded, 1 when it failed, 2 for a target
/// its kind does not take.
pub fn probe(args: ProbeArgs) -> ExitCode {
    let ProbeArgs {
        kind,
        target,
        json,
        duration,
        max_duration,
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
        protocol,
        port,
        max_hops,
        dscp,
        packet_size,
        interface,
        source,
        family,
    } = args;
    if let Err(reason) = edgeprobe_proto::testdef::check_target(kind, &target) {
        eprintln!("edgeprobe-agent probe: {reason}");
        return ExitCode::from(2);
    }
    let spec = ProbeSpec::new(
        kind,
        target,
        TestOptions {
            timeout,
            duration,
            max_duration,
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
            protocol,
            port,
            max_hops,
            dscp,
            packet_size,
            interface,
            source,
            family,
            ..TestOptions::default()
        },
    );
    if let Err(reason) = check_options(&spec) {
        eprintln!("edgeprobe-agent probe: {reason}");
        return ExitCode::from(2);
    }
    // The speed probe takes ~20 s: show progress when a person is watching.
    probe::speed::show_progress(kind == Kind::Speed && std::io::stderr().is_terminal());
    let mut all_ok = true;
    for spec in spec.runs() {
        let outcome = crate::runtime().block_on(probe::run(&spec));
        let text = if json {
            format!("{}\n", report::json(&spec, &outcome))
        } else {
            report::human(&spec, &outcome)
        };
        out(&text);
        all_ok &= outcome.success();
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
