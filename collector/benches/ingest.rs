//! Ingest load generator and benchmark (edgeprobe-loadgen): N simulated agents, each on its
//! own real gRPC connection to a real collector process, sending realistic results at a
//! chosen rate. Reports committed results/s, result-to-commit latency percentiles (send
//! of a batch to its ack, i.e. after the PostgreSQL commit) and collector RSS, next to the
//! reference measured in the same run: two parallel `psql \copy` streams of the same rows
//! into the same schema.
//!
//!     scripts/bench-ingest                                 # throughput: 8 agents, as fast as possible
//!     scripts/bench-ingest --agents 10000 --rate 1 --seconds 60   # fleet: 10,000 streams
//!
//!     scripts/bench-ingest --agents 10000 --rate 1 --seconds 90 --apply-at 20 --no-reference
//!                                                  # controller: a fleet tests apply
//!
//!     scripts/bench-ingest --kind path                    # path results with 30 hops each
//!
//! The simulated agents connect over mTLS as in production (`--plaintext` for the old
//! figures), each with its own certificate from the collector's CA tooling, issued once
//! and cached (`Pki`); the report gives the connects per second and the CPU per connect of
//! the collector and of the load generator (the client side) in the start storm and after
//! a restart, the collector's failed handshakes by reason, the steady-state latency and
//! the load average around the run.
//!
//! Flags: --kind http|path (the results sent: http, or path results of 30 hops; the
//! reference stays the same http rows), --agents N, --rate R (results per second per
//! agent; 0 = as fast as possible),
//! --batch B (results per batch), --seconds S, --no-reference, --apply-at S (S seconds
//! after the last agent joined, `edgeprobe-collector tests apply` a fleet tests file for
//! every agent; reports when every simulated agent got the push and when PostgreSQL shows
//! every agent's applied version, and the committed results/s in the 10 s before the
//! apply against the time until all applied). The simulated agents list the
//! "fleet-tests" feature and answer each push with TestsApplied at once, as an agent does
//! when the set checks. DATABASE_URL names the server (default
//! postgres://postgres@127.0.0.1:5432/postgres).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::v1 as pb;
use edgeprobe_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

struct Args {
    agents: usize,
    rate: f64,
    batch: usize,
    seconds: u64,
    reference: bool,
    /// Seconds of full jitter on the first reconnect after a lost session (the agent's
    /// `reconnect_spread`).
    spread: f64,
    /// Restart the collector once every agent is in: SIGTERM or SIGKILL.
    restart: Option<&'static str>,
    /// Apply a fleet tests file this many seconds after every agent joined.
    apply_at: Option<f64>,
    /// mTLS as in production (default), or `--plaintext`.
    tls: bool,
}

fn args() -> Args {
    let mut a = Args {
        agents: 8,
        rate: 0.0,
        batch: 1000,
        seconds: 20,
        reference: true,
        spread: 30.0,
        restart: None,
        apply_at: None,
        tls: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--kind" {
            let path = match it.next().as_deref() {
                Some("http") => false,
                Some("path") => true,
                other => panic!("--kind http|path, not {other:?}"),
            };
            PATH_RESULTS.store(path, Ordering::Relaxed);
            continue;
        }
        if flag == "--restart" {
            a.restart = match it.next().as_deref() {
                Some("term") => Some("TERM"),
                Some("kill") => Some("KILL"),
                other => panic!("--restart term|kill, not {other:?}"),
            };
            continue;
        }
        let mut value = || {
            it.next()
                .expect("flag value")
                .parse::<f64>()
                .expect("number")
        };
        match flag.as_str() {
            "--agents" => a.agents = value() as usize,
            "--rate" => a.rate = value(),
            "--batch" => a.batch = value() as usize,
            "--seconds" => a.seconds = value() as u64,
            "--spread" => a.spread = value(),
            "--no-reference" => a.reference = false,
            "--plaintext" => a.tls = false,
            "--apply-at" => a.apply_at = Some(value()),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// `--kind path`: the simulated agents send path results instead of http ones.
static PATH_RESULTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A path result of 30 hops as the agent sends one (count = 10, one address per hop, the
/// path changing every 50 results).
fn path_result(agent: &str, seq: u64, now_nanos: i64) -> pb::Result {
    let variant = seq / 50 % 2;
    let hops: Vec<pb::PathHop> = (1..=30u32)
        .map(|ttl| {
            let address = format!("100.{}.{variant}.{ttl}", 64 + ttl % 4);
            let rtt = 0.001 * f64::from(ttl);
            pb::PathHop {
                ttl,
                addresses: vec![address.clone()],
                address,
                sent: 10,
                received: 10,
                loss_ratio: Some(0.0),
                rtt_min_seconds: Some(rtt * 0.9),
                rtt_avg_seconds: Some(rtt),
                rtt_max_seconds: Some(rtt * 1.4),
                rtt_mdev_seconds: Some(rtt * 0.1),
                rate_limited: false,
            }
        })
        .collect();
    pb::Result {
        agent_id: agent.to_string(),
        seq,
        test: "path".into(),
        kind: pb::Kind::Path as i32,
        target: "203.0.113.10".into(),
        started_at_unix_nanos: now_nanos,
        duration_seconds: 10.3,
        success: true,
        labels: [("site".to_string(), format!("site-{}", seq % 20))].into(),
        fields: Some(pb::result::Fields::Path(pb::PathFields {
            reached: true,
            hop_count: 30,
            path_id: format!("{:016x}", 0x9e37_79b9_7f4a_7c15u64 ^ variant),
            path_loss_ratio: Some(0.0),
            rtt_avg_seconds: Some(0.030),
            protocol: "icmp".into(),
            hops,
        })),
        ..Default::default()
    }
}

fn result(agent: &str, seq: u64, now_nanos: i64) -> pb::Result {
    if PATH_RESULTS.load(Ordering::Relaxed) {
        return path_result(agent, seq, now_nanos);
    }
    pb::Result {
        agent_id: agent.to_string(),
        seq,
        test: "web".into(),
        kind: pb::Kind::Http as i32,
        target: "https://www.example.net/health".into(),
        started_at_unix_nanos: now_nanos,
        duration_seconds: 0.041,
        success: true,
        error_class: String::new(),
        error_message: String::new(),
        labels: [("site".to_string(), format!("site-{}", seq % 20))].into(),
        fields: Some(pb::result::Fields::Http(pb::HttpFields {
            status_code: Some(200),
            dns_seconds: Some(0.001),
            connect_seconds: Some(0.012),
            tls_seconds: Some(0.021),
            ttfb_seconds: Some(0.034),
            transfer_seconds: Some(0.002),
            body_bytes: 1256,
            tls_cert_expiry_seconds: Some(7_000_000.0),
        })),
        ..Default::default()
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

#[derive(Default)]
struct Stats {
    committed: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    /// (ms since the run started the batch was sent, its send-to-ack latency in µs): the
    /// steady-state percentiles leave out the storms.
    sent_latencies: Mutex<Vec<(u64, u64)>>,
    /// When each connect (TCP, TLS handshake with the client certificate, HTTP/2) succeeded,
    /// ms since the run started.
    connects_ms: Mutex<Vec<u64>>,
    /// Failed connects and lost sessions, by reason.
    failures: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Stats {
    fn failed(&self, reason: &'static str) {
        *self.failures.lock().unwrap().entry(reason).or_default() += 1;
    }
}

/// What one simulated agent did, for the report. Times in ms since the run started; 0 =
/// not yet.
#[derive(Default)]
struct Progress {
    /// First and last welcome.
    first_welcomed_ms: AtomicU64,
    welcomed_ms: AtomicU64,
    /// Last ack.
    acked_ms: AtomicU64,
    /// Highest seq generated once the agent stops.
    last_seq: AtomicU64,
    /// Highest fleet tests version pushed to it.
    fleet_version: AtomicU64,
}

/// The agent's backoff (agent/src/uplink.rs): full jitter up to min(30 s, 250 ms x 2^n),
/// at least 50 ms.
fn backoff(attempt: u32) -> Duration {
    let ceiling = (250u64 << attempt.min(16)).min(30_000);
    Duration::from_millis(rand::random_range(0..=ceiling).max(50))
}

/// The collector's status ending a session because it stops (SIGTERM), as the agent
/// recognises it (agent/src/uplink/end.rs).
fn announced_shutdown(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status
            .metadata()
            .get(edgeprobe_proto::REASON_KEY)
            .is_some_and(|v| v.as_bytes() == edgeprobe_proto::REASON_SHUTDOWN.as_bytes())
}

/// Why a connect or a session failed, in a few words for the report.
fn reason(e: &anyhow::Error) -> &'static str {
    if let Some(status) = e.chain().find_map(|e| e.downcast_ref::<tonic::Status>()) {
        if announced_shutdown(status) {
            return "shutdown announced (UNAVAILABLE, edgeprobe-reason: shutdown)";
        }
        let text = format!("{status:?}").to_ascii_lowercase();
        if text.contains("connection refused") {
            return "connection refused";
        }
        if text.contains("reset") {
            return "connection reset";
        }
        // A stream cut by a dying collector ends as "Unknown error" (h2 reset or EOF).
        return status.code().description();
    }
    let text = format!("{e:#}").to_ascii_lowercase();
    for (needle, reason) in [
        ("connection refused", "connection refused"),
        ("reset", "connection reset"),
        ("timed out", "connect timeout"),
        ("timeout", "timeout"),
        ("no welcome", "no welcome"),
        ("closed", "stream closed"),
        ("broken pipe", "broken pipe"),
    ] {
        if text.contains(needle) {
            return reason;
        }
    }
    "other"
}

/// One simulated agent, like a real one: results are generated at its rate whether or not
/// it is connected and kept until acked; it connects with the agent's timeouts, resends
/// what was not committed after each welcome, and on a failed connect or a lost session
/// retries with the agent's backoff, plus a random share of `--spread` after a session
/// that was welcomed (agent/src/uplink.rs). Records send-to-ack latency.
#[allow(clippy::too_many_arguments)]
async fn agent(
    id: String,
    endpoint: String,
    tls: Option<ClientTlsConfig>,
    args: Arc<Args>,
    t0: Instant,
    deadline: Instant,
    stats: Arc<Stats>,
    progress: Arc<Progress>,
) -> bool {
    let batch = if args.rate > 0.0 {
        (args.rate as usize).clamp(1, args.batch)
    } else {
        args.batch
    };
    let interval = if args.rate > 0.0 {
        Duration::from_secs_f64(batch as f64 / args.rate)
    } else {
        Duration::ZERO
    };
    // Spread the fleet's first results over one interval, like real agents.
    let offset = Duration::from_secs_f64(rand::random::<f64>() * interval.as_secs_f64());
    let mut gen = Generator {
        id: id.clone(),
        start: t0 + offset,
        interval,
        batch,
        seq: 0,
        pending: Default::default(),
    };
    let mut attempt = 0u32;
    let done = loop {
        let mut welcomed = false;
        let result = session(
            &endpoint,
            tls.as_ref(),
            &mut gen,
            &args,
            t0,
            deadline,
            &stats,
            &progress,
            &mut welcomed,
        )
        .await;
        let error = match result {
            Ok(()) => break true,
            Err(e) => e,
        };
        stats.failed(reason(&error));
        if Instant::now() >= deadline + Duration::from_secs(90) {
            break false;
        }
        // As the agent: an announced shutdown resets the backoff and spreads the reconnect.
        let stopping = error
            .chain()
            .filter_map(|e| e.downcast_ref::<tonic::Status>())
            .any(announced_shutdown);
        let welcomed = welcomed || stopping;
        if welcomed {
            attempt = 0;
        }
        let mut delay = backoff(attempt);
        attempt += 1;
        if welcomed {
            delay += Duration::from_secs_f64(rand::random::<f64>() * args.spread);
        }
        tokio::time::sleep(delay).await;
    };
    progress.last_seq.store(gen.seq, Ordering::Relaxed);
    done
}

/// The results an agent has recorded and not yet seen acked: its buffer.
struct Generator {
    id: String,
    start: Instant,
    interval: Duration,
    batch: usize,
    seq: u64,
    pending: std::collections::VecDeque<pb::Result>,
}

impl Generator {
    /// Records every result due by now (or one batch when the rate is unbounded and the
    /// buffer is short).
    fn catch_up(&mut self, deadline: Instant) {
        let now = Instant::now().min(deadline);
        let due = if self.interval.is_zero() {
            if self.pending.len() >= 8 * self.batch || now >= deadline {
                return;
            }
            self.seq + self.batch as u64
        } else if now < self.start {
            0
        } else {
            (((now - self.start).as_secs_f64() / self.interval.as_secs_f64()) as u64 + 1)
                * self.batch as u64
        };
        let nanos = now_nanos();
        while self.seq < due {
            self.seq += 1;
            self.pending.push_back(result(&self.id, self.seq, nanos));
        }
    }

    fn acked(&mut self, seq: u64) {
        while self.pending.front().is_some_and(|r| r.seq <= seq) {
            self.pending.pop_front();
        }
    }
}

/// One session; `Ok` once everything generated until `deadline` was acked.
#[allow(clippy::too_many_arguments)]
async fn session(
    endpoint: &str,
    tls: Option<&ClientTlsConfig>,
    gen: &mut Generator,
    args: &Args,
    t0: Instant,
    deadline: Instant,
    stats: &Stats,
    progress: &Progress,
    welcomed: &mut bool,
) -> anyhow::Result<()> {
    let ms = || t0.elapsed().as_millis().max(1) as u64;
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.clone())?;
    }
    let channel = ep.connect().await?;
    stats.connects_ms.lock().unwrap().push(ms());
    let mut client = IngestClient::new(channel).max_encoding_message_size(8 << 20);
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: gen.id.clone(),
            version: "loadgen".into(),
            labels: Default::default(),
            features: vec![edgeprobe_proto::FEATURE_FLEET_TESTS.to_string()],
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = tokio::time::timeout(Duration::from_secs(15), inbound.message())
        .await
        .map_err(|_| anyhow::anyhow!("no welcome within 15 s"))??;
    let committed = match welcome.and_then(|m| m.msg) {
        Some(pb::collector_message::Msg::Welcome(w)) => w.committed_seq,
        _ => anyhow::bail!("no welcome"),
    };
    *welcomed = true;
    let now = ms();
    let _ =
        progress
            .first_welcomed_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    progress.welcomed_ms.store(now, Ordering::Relaxed);
    gen.acked(committed);
    // (last seq of a batch, sent at, results) in send order; acks come back in order.
    let mut in_flight: std::collections::VecDeque<(u64, Instant, u64)> = Default::default();
    let mut last_sent = committed;
    let mut tick = tokio::time::interval(if gen.interval.is_zero() {
        Duration::from_millis(1)
    } else {
        gen.interval.min(Duration::from_millis(500))
    });
    loop {
        gen.catch_up(deadline);
        while in_flight.len() < 8 {
            let results: Vec<pb::Result> = gen
                .pending
                .iter()
                .filter(|r| r.seq > last_sent)
                .take(args.batch)
                .cloned()
                .collect();
            let Some(last) = results.last().map(|r| r.seq) else {
                break;
            };
            in_flight.push_back((last, Instant::now(), results.len() as u64));
            last_sent = last;
            tx.send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Batch(pb::ResultBatch { results })),
            })
            .await
            .map_err(|_| anyhow::anyhow!("stream closed"))?;
        }
        if Instant::now() >= deadline && gen.pending.is_empty() {
            return Ok(());
        }
        tokio::select! {
            _ = tick.tick(), if !gen.interval.is_zero() || in_flight.len() < 8 => {}
            msg = inbound.message() => match msg?.and_then(|m| m.msg) {
                Some(pb::collector_message::Msg::Ack(ack)) => {
                    progress.acked_ms.store(ms(), Ordering::Relaxed);
                    gen.acked(ack.seq);
                    while in_flight.front().is_some_and(|(last, _, _)| *last <= ack.seq) {
                        let (_, at, n) = in_flight.pop_front().unwrap();
                        stats.committed.fetch_add(n, Ordering::Relaxed);
                        let latency = at.elapsed().as_micros() as u64;
                        stats.latencies_us.lock().unwrap().push(latency);
                        let sent = at.saturating_duration_since(t0).as_millis() as u64;
                        stats.sent_latencies.lock().unwrap().push((sent, latency));
                    }
                }
                Some(pb::collector_message::Msg::FleetTests(f)) => {
                    progress.fleet_version.fetch_max(f.version, Ordering::Relaxed);
                    tx.send(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::TestsApplied(pb::TestsApplied {
                            version: f.version,
                            error: String::new(),
                        })),
                    })
                    .await
                    .map_err(|_| anyhow::anyhow!("stream closed"))?;
                }
                Some(_) => {}
                None => anyhow::bail!("the collector closed the stream"),
            },
        }
    }
}

/// A fleet tests apply during the run, and when its version reached the agents.
struct Apply {
    at_ms: u64,
    version: u64,
    /// The apply command's own time and output.
    command_ms: u64,
    output: String,
    /// Every simulated agent got the push / PostgreSQL shows every agent applied.
    pushed_ms: Option<u64>,
    recorded_ms: Option<u64>,
}

impl Apply {
    async fn run(dir: &Path, url: &str, at_ms: u64) -> Apply {
        let file = dir.join("fleet-tests.toml");
        std::fs::write(
            &file,
            "# every agent\n[[test]]\nname = \"fleet-web\"\nkind = \"http\"\ntarget = \"https://www.example.net/health\"\nevery = \"1m\"\n\n[[test]]\nname = \"fleet-dns\"\nkind = \"dns\"\ntarget = \"example.net\"\nschedule = \"0 */5 * * * *\"\n",
        )
        .unwrap();
        let (url, file) = (url.to_string(), file.clone());
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(collector_bin())
                .args(["tests", "apply", "--file"])
                .arg(&file)
                .args(["--database-url", &url])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "tests apply failed: {output}");
        Apply {
            at_ms,
            version: 1,
            command_ms: started.elapsed().as_millis() as u64,
            output: output.trim().to_string(),
            pushed_ms: None,
            recorded_ms: None,
        }
    }

    async fn observe(
        &mut self,
        now_ms: u64,
        progress: &[Arc<Progress>],
        db: &tokio_postgres::Client,
    ) {
        if self.pushed_ms.is_none()
            && progress
                .iter()
                .all(|p| p.fleet_version.load(Ordering::Relaxed) >= self.version)
        {
            self.pushed_ms = Some(now_ms - self.at_ms);
        }
        if self.recorded_ms.is_none() {
            let applied: i64 = db
                .query_one(
                    "SELECT count(*) FROM agents WHERE fleet_version >= $1",
                    &[&(self.version as i64)],
                )
                .await
                .map_or(0, |r| r.get(0));
            if applied as usize == progress.len() {
                self.recorded_ms = Some(now_ms - self.at_ms);
            }
        }
    }

    fn report(&self, agents: usize, committed_at: &[(u64, u64)]) {
        let secs = |t: Option<u64>| {
            t.map_or("not within the run".into(), |t| {
                format!("{:.1} s", t as f64 / 1e3)
            })
        };
        // Committed results/s over [from, to) ms.
        let rate = |from: u64, to: u64| {
            let at = |t: u64| {
                committed_at
                    .iter()
                    .find(|(ms, _)| *ms >= t)
                    .or(committed_at.last())
                    .copied()
            };
            match (at(from), at(to)) {
                (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => {
                    (c1 - c0) as f64 * 1e3 / (t1 - t0) as f64
                }
                _ => 0.0,
            }
        };
        let until = self.at_ms + self.recorded_ms.unwrap_or(10_000).max(5_000);
        println!(
            "| fleet tests apply at {:.1} s: `tests apply` took | {:.2} s ({}) |",
            self.at_ms as f64 / 1e3,
            self.command_ms as f64 / 1e3,
            self.output.replace('\n', "; ")
        );
        println!(
            "| every one of {agents} agents got the push after | {} |",
            secs(self.pushed_ms)
        );
        println!(
            "| PostgreSQL shows all {agents} applied after | {} |",
            secs(self.recorded_ms)
        );
        let (before, during) = (
            rate(self.at_ms.saturating_sub(10_000), self.at_ms),
            rate(self.at_ms, until),
        );
        println!(
            "| committed results/s: 10 s before the apply / from the apply until all applied | {before:.0} / {during:.0} ({:.2}) |",
            if before > 0.0 { during / before } else { 0.0 }
        );
    }
}

/// The fleet PKI of the mTLS runs, made with the collector's own CA tooling (`ca init`,
/// `cert issue --server`, `cert issue` per agent): one certificate per simulated agent, as
/// in production. Generated once and kept in `EDGEPROBE_BENCH_CERTS` (default
/// /var/cache/edgeprobe-bench-certs); a later run issues only the agents it lacks.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn ensure(agents: usize) -> Pki {
        let dir = std::env::var_os("EDGEPROBE_BENCH_CERTS").map_or_else(
            || PathBuf::from("/var/cache/edgeprobe-bench-certs"),
            PathBuf::from,
        );
        let pki = Pki { dir };
        let run = |args: &[&str]| {
            let out = Command::new(collector_bin()).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "edgeprobe-collector {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (ca, certs) = (pki.dir.join("ca"), pki.dir.join("certs"));
        let (ca_s, certs_s) = (ca.to_str().unwrap(), certs.to_str().unwrap());
        if !ca.join("ca.pem").exists() {
            run(&["ca", "init", "--dir", ca_s]);
        }
        if !pki.pair("localhost").0.exists() {
            run(&[
                "cert",
                "issue",
                "--ca",
                ca_s,
                "--out",
                certs_s,
                "--name",
                "localhost",
                "--server",
                "--san",
                "127.0.0.1",
            ]);
        }
        let missing: Vec<String> = (0..agents)
            .map(agent_id)
            .filter(|id| !pki.pair(id).0.exists())
            .collect();
        if !missing.is_empty() {
            let started = Instant::now();
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            let next = AtomicU64::new(0);
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(id) = missing.get(i) else { return };
                        run(&[
                            "cert", "issue", "--ca", ca_s, "--out", certs_s, "--name", id,
                        ]);
                    });
                }
            });
            eprintln!(
                "issued {} agent certificates with `edgeprobe-collector cert issue` in {:.0} s (cached in {})",
                missing.len(),
                started.elapsed().as_secs_f64(),
                pki.dir.display()
            );
        }
        pki
    }

    fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        let certs = self.dir.join("certs");
        (
            certs.join(format!("{name}.pem")),
            certs.join(format!("{name}.key")),
        )
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca").join("ca.pem")
    }

    /// The client config of agent `id`: the fleet CA and its own certificate and key.
    fn client(&self, id: &str) -> ClientTlsConfig {
        let (cert, key) = self.pair(id);
        let read = |p: &Path| std::fs::read(p).unwrap();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca_pem())))
            .identity(Identity::from_pem(read(&cert), read(&key)))
    }
}

fn agent_id(i: usize) -> String {
    format!("load-{i:05}")
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn collector_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("edgeprobe-collector");
    assert!(
        bin.exists(),
        "{} missing: use scripts/bench-ingest",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn psql(url: &str, sql: &str) {
    let status = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .stdout(Stdio::null())
        .status()
        .expect("psql");
    assert!(status.success(), "psql failed: {sql}");
}

fn fresh_db(server: &str, name: &str) -> String {
    psql(
        server,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
    psql(server, &format!("CREATE DATABASE {name}"));
    format!("{}/{name}", &server[..server.rfind('/').unwrap()])
}

/// Two parallel `psql \copy` streams of `rows` rows shaped like the ones the agents sent,
/// into the collector's schema (migrated by `edgeprobe-collector migrate`). Rows/s.
fn copy_reference(server: &str, dir: &Path, rows: u64) -> f64 {
    let url = fresh_db(server, "edgeprobe_bench_copy");
    let out = Command::new(collector_bin())
        .args(["migrate", "--database-url", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let columns =
        "agent_id, seq, test, kind, target, started_at, duration_seconds, success, labels, \
        status_code, dns_seconds, connect_seconds, tls_seconds, ttfb_seconds, transfer_seconds, \
        body_bytes, tls_cert_expiry_seconds";
    let started = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let mut files = Vec::new();
    for stream in 0..2 {
        let path = dir.join(format!("copy-{stream}.csv"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for seq in 1..=rows / 2 {
            writeln!(
                f,
                "copy-{stream},{seq},web,http,https://www.example.net/health,{started},0.041,t,\"{{\"\"site\"\": \"\"site-{}\"\"}}\",200,0.001,0.012,0.021,0.034,0.002,1256,7000000",
                seq % 20
            )
            .unwrap();
        }
        f.flush().unwrap();
        files.push(path);
    }
    let start = Instant::now();
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            Command::new("psql")
                .args(["-q", "-v", "ON_ERROR_STOP=1", &url, "-c"])
                .arg(format!(
                    "\\copy results ({columns}) FROM '{}' WITH (FORMAT csv)",
                    f.display()
                ))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "psql \\copy failed");
    }
    let rate = (rows / 2 * 2) as f64 / start.elapsed().as_secs_f64();
    psql(
        server,
        "DROP DATABASE IF EXISTS edgeprobe_bench_copy WITH (FORCE)",
    );
    rate
}

/// Results per second the simulated fleet sends (0 rate = as fast as acks allow).
fn offered(args: &Args) -> f64 {
    if args.rate > 0.0 {
        args.rate * args.agents as f64
    } else {
        f64::NAN
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1e6
}

fn spawn_collector(config: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(collector_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn wait_listening(grpc: u16) {
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(up.elapsed() < Duration::from_secs(60), "collector not up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kernel_counter(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .position(|n| n == name)
        .and_then(|i| values.split_whitespace().nth(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The 1-minute load average (other work on the machine during the run).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// Adds the collector's `edgeprobe_tls_handshake_errors_total` by reason, read from its
/// /metrics on `http`, to `into`; nothing when it does not answer.
fn add_handshake_errors(into: &mut std::collections::BTreeMap<String, u64>, http: u16) {
    use std::io::Read;
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", http)) else {
        return;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    if conn
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return;
    }
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("edgeprobe_tls_handshake_errors_total{reason=\"") else {
            continue;
        };
        let Some((reason, value)) = rest.split_once("\"} ") else {
            continue;
        };
        if let Ok(n) = value.trim().parse::<f64>() {
            *into.entry(reason.to_string()).or_default() += n as u64;
        }
    }
}

/// The collector's restart, as the report shows it (ms since the run started).
struct Restart {
    signal: &'static str,
    at_ms: u64,
    stop_ms: u64,
    exit: Option<i32>,
    back_ms: Option<u64>,
    flowing_ms: Option<u64>,
    peak_rss: f64,
    /// The new collector's CPU seconds until every agent was welcomed again.
    back_cpu: f64,
}

#[tokio::main]
async fn main() {
    let args = Arc::new(args());
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let tmp = tempfile::tempdir().unwrap();
    let url = fresh_db(&server, "edgeprobe_bench_ingest");
    let (grpc, http) = (free_port(), free_port());
    let config = tmp.path().join("collector.toml");
    let pki = args.tls.then(|| Pki::ensure(args.agents));
    let server_tls = match &pki {
        Some(pki) => {
            let (cert, key) = pki.pair("localhost");
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n",
                cert.display(),
                key.display(),
                pki.ca_pem().display()
            )
        }
        None => "insecure = true\n".into(),
    };
    std::fs::write(
        &config,
        format!(
            "[server]\n{server_tls}grpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n[database]\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    let log = tmp.path().join("collector.log");
    let mut collector = spawn_collector(&config, &log);
    wait_listening(grpc).await;

    let (overflows, syncookies) = (
        kernel_counter("ListenOverflows"),
        kernel_counter("SyncookiesSent"),
    );
    let stats = Arc::new(Stats::default());
    // Read before the clock starts: 20,000 files are not part of the storm.
    let clients: Vec<Option<ClientTlsConfig>> = (0..args.agents)
        .map(|i| pki.as_ref().map(|p| p.client(&agent_id(i))))
        .collect();
    let load_start = loadavg();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(args.seconds);
    let endpoint = format!(
        "{}://127.0.0.1:{grpc}",
        if args.tls { "https" } else { "http" }
    );
    let cpu_start = cpu_seconds(collector.id());
    let own_cpu_start = cpu_seconds(std::process::id());
    // Every agent starts at once: the storm of a fleet whose collector came back.
    let progress: Vec<Arc<Progress>> = (0..args.agents).map(|_| Default::default()).collect();
    let tasks: Vec<_> = progress
        .iter()
        .zip(clients)
        .enumerate()
        .map(|(i, (p, tls))| {
            tokio::spawn(agent(
                agent_id(i),
                endpoint.clone(),
                tls,
                args.clone(),
                t0,
                deadline,
                stats.clone(),
                p.clone(),
            ))
        })
        .collect();
    let ms = || t0.elapsed().as_millis() as u64;
    let mut peak_rss = 0.0f64;
    let mut joined_ms = None;
    let mut restart: Option<Restart> = None;
    // Collector CPU seconds from the start until the last agent was welcomed.
    let mut storm_cpu = 0.0;
    // The load generator's own CPU seconds over the same time: the client side.
    let mut storm_own_cpu = 0.0;
    // The collector's failed TLS handshakes by reason (its /metrics), summed over restarts.
    let mut handshake_errors = std::collections::BTreeMap::<String, u64>::new();
    let mut apply: Option<Apply> = None;
    // (ms since start, results committed so far), every tick: the ingest around an apply.
    let mut committed_at: Vec<(u64, u64)> = Vec::new();
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        committed_at.push((ms(), stats.committed.load(Ordering::Relaxed)));
        if let (Some(after), Some(joined)) = (args.apply_at, joined_ms) {
            match &mut apply {
                None if ms() as f64 >= joined as f64 + after * 1e3 => {
                    apply = Some(Apply::run(tmp.path(), &url, ms()).await);
                }
                Some(a) => a.observe(ms(), &progress, &db).await,
                None => {}
            }
        }
        let rss = rss_mib(collector.id());
        peak_rss = peak_rss.max(rss);
        let last_join = progress
            .iter()
            .map(|p| p.first_welcomed_ms.load(Ordering::Relaxed))
            .try_fold(0, |max, t| (t > 0).then_some(max.max(t)));
        if joined_ms.is_none() {
            joined_ms = last_join;
            if joined_ms.is_some() {
                storm_cpu = cpu_seconds(collector.id()) - cpu_start;
                storm_own_cpu = cpu_seconds(std::process::id()) - own_cpu_start;
            }
        }
        match (&mut restart, args.restart, joined_ms) {
            // Ten seconds of steady state first, so every agent has results acked.
            (None, Some(signal), Some(joined)) if ms() >= joined + 10_000 => {
                add_handshake_errors(&mut handshake_errors, http);
                let at_ms = ms();
                let status = Command::new("kill")
                    .arg(format!("-{signal}"))
                    .arg(collector.id().to_string())
                    .status()
                    .unwrap();
                assert!(status.success());
                let exit = tokio::task::spawn_blocking(move || {
                    let status = collector.wait().unwrap();
                    status.code()
                })
                .await
                .unwrap();
                let stop_ms = ms() - at_ms;
                collector = spawn_collector(&config, &log);
                restart = Some(Restart {
                    signal,
                    at_ms,
                    stop_ms,
                    exit,
                    back_ms: None,
                    flowing_ms: None,
                    peak_rss: 0.0,
                    back_cpu: 0.0,
                });
            }
            (Some(r), _, _) => {
                r.peak_rss = r.peak_rss.max(rss);
                let after = |t: &AtomicU64| t.load(Ordering::Relaxed) > r.at_ms;
                if r.back_ms.is_none() && progress.iter().all(|p| after(&p.welcomed_ms)) {
                    r.back_ms = Some(ms() - r.at_ms);
                    r.back_cpu = cpu_seconds(collector.id());
                }
                if r.flowing_ms.is_none() && progress.iter().all(|p| after(&p.acked_ms)) {
                    r.flowing_ms = Some(ms() - r.at_ms);
                }
            }
            _ => {}
        }
    }
    drop(db);
    let mut failed = 0;
    for t in tasks {
        if !t.await.unwrap_or(false) {
            failed += 1;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let load_end = loadavg();
    peak_rss = peak_rss.max(rss_mib(collector.id()));
    add_handshake_errors(&mut handshake_errors, http);
    let _ = collector.kill();
    let _ = collector.wait();
    let (overflows, syncookies) = (
        kernel_counter("ListenOverflows") - overflows,
        kernel_counter("SyncookiesSent") - syncookies,
    );

    let committed = stats.committed.load(Ordering::Relaxed);
    let generated: u64 = progress
        .iter()
        .map(|p| p.last_seq.load(Ordering::Relaxed))
        .sum();
    let (check, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = check
        .query_one(
            "SELECT count(*), count(DISTINCT (agent_id, seq)) FROM results",
            &[],
        )
        .await
        .unwrap();
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    drop(check);
    psql(
        &server,
        "DROP DATABASE IF EXISTS edgeprobe_bench_ingest WITH (FORCE)",
    );
    let mut lat = stats.latencies_us.lock().unwrap().clone();
    lat.sort_unstable();
    let rate = committed as f64 / elapsed;

    println!(
        "ingest benchmark: {} {} agents, rate {} results/s per agent, batch {}, {} s, spread {} s{}: {failed} agents failed for good",
        args.agents,
        if args.tls { "mTLS" } else { "plaintext" },
        if args.rate > 0.0 { args.rate.to_string() } else { "max".into() },
        args.batch,
        args.seconds,
        args.spread,
        restart.as_ref().map_or(String::new(), |r| format!(", collector restarted with SIG{}", r.signal)),
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| committed results/s (acked after commit) | {rate:.0} |");
    println!("| rows in PostgreSQL / acked | {rows} / {committed} |");
    println!(
        "| generated / distinct (agent, seq) in PostgreSQL: lost, duplicate | {generated} / {distinct}: {}, {} |",
        generated as i64 - distinct,
        rows - distinct
    );
    println!("| offered results/s | {:.0} |", offered(&args));
    println!(
        "| result-to-commit latency p50 / p99 / max | {:.3} / {:.3} / {:.3} s |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    println!(
        "| last agent in (first welcome) | {} |",
        joined_ms.map_or("never".into(), |t| format!("{:.1} s", t as f64 / 1e3))
    );
    let connects = stats.connects_ms.lock().unwrap().clone();
    let transport = if args.tls { "mTLS" } else { "plaintext" };
    if let Some(joined) = joined_ms {
        let n = connects.iter().filter(|&&t| t <= joined).count();
        println!(
            "| start storm: {transport} connects (TCP + {}HTTP/2) / per second / collector CPU per connect / load generator CPU per connect | {n} / {:.0} / {:.2} ms / {:.2} ms |",
            if args.tls { "TLS 1.3 handshake with client certificate + " } else { "" },
            n as f64 * 1e3 / joined.max(1) as f64,
            storm_cpu * 1e3 / n.max(1) as f64,
            storm_own_cpu * 1e3 / n.max(1) as f64
        );
    }
    let steady: Vec<u64> = {
        let from = joined_ms.map_or(u64::MAX, |j| j + 10_000);
        let until = restart.as_ref().map_or(u64::MAX, |r| r.at_ms);
        let mut v: Vec<u64> = stats
            .sent_latencies
            .lock()
            .unwrap()
            .iter()
            .filter(|(sent, _)| *sent >= from && *sent < until)
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        v
    };
    println!(
        "| steady result-to-commit latency (sent from 10 s after the last agent joined{}) p50 / p99 / max, batches | {:.3} / {:.3} / {:.3} s, {} |",
        if restart.is_some() { " until the restart" } else { "" },
        percentile(&steady, 0.5),
        percentile(&steady, 0.99),
        percentile(&steady, 1.0),
        steady.len()
    );
    let failures = stats.failures.lock().unwrap();
    println!(
        "| failed connects and lost sessions, by reason | {} |",
        if failures.is_empty() {
            "none".to_string()
        } else {
            failures
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!(
        "| kernel: listen overflows / SYN cookies sent during the run (host-wide) | {overflows} / {syncookies} |"
    );
    if args.tls {
        println!(
            "| collector: TLS handshakes failed, by reason (edgeprobe_tls_handshake_errors_total) | {} |",
            if handshake_errors.is_empty() {
                "none".to_string()
            } else {
                handshake_errors
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    println!("| collector peak RSS | {peak_rss:.0} MiB |");
    println!("| load average (1 min) at the start / end of the run | {load_start} / {load_end} |");
    if let Some(a) = &apply {
        a.report(args.agents, &committed_at);
    }
    if let Some(r) = &restart {
        let secs = |t: Option<u64>| {
            t.map_or("not within the run".into(), |t| {
                format!("{:.1} s", t as f64 / 1e3)
            })
        };
        println!(
            "| SIG{} at {:.1} s: old collector gone after / exit code | {:.1} s / {:?} |",
            r.signal,
            r.at_ms as f64 / 1e3,
            r.stop_ms as f64 / 1e3,
            r.exit
        );
        println!(
            "| every agent welcomed again after the signal | {} |",
            secs(r.back_ms)
        );
        println!(
            "| every agent acked again after the signal | {} |",
            secs(r.flowing_ms)
        );
        println!("| restarted collector peak RSS | {:.0} MiB |", r.peak_rss);
        if let Some(back) = r.back_ms {
            let n = connects
                .iter()
                .filter(|&&t| t > r.at_ms && t <= r.at_ms + back)
                .count();
            println!(
                "| after the restart: {transport} connects until all welcomed / per second / new collector CPU per connect | {n} / {:.0} / {:.2} ms |",
                n as f64 * 1e3 / back.max(1) as f64,
                r.back_cpu * 1e3 / n.max(1) as f64
            );
        }
    }
    println!(
        "rerun: scripts/bench-ingest {}",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" ")
    );
    if args.reference {
        let reference = copy_reference(&server, tmp.path(), committed.clamp(200_000, 2_000_000));
        println!("| reference: two parallel psql \\copy streams, rows/s | {reference:.0} |");
        println!(
            "| ratio edgeprobe / psql \\copy | {:.2} |",
            rate / reference
        );
    }
    // Every acked result is in PostgreSQL; rows beyond the acks are batches that committed
    // after the generator stopped waiting for their acks (it gives up after 90 s).
    assert!(
        rows as u64 >= committed,
        "an acked result is missing from PostgreSQL"
    );
    assert_eq!(rows, distinct, "a result was stored twice");
}
