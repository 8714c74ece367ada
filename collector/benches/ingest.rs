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
//! Flags: --agents N, --rate R (results per second per agent; 0 = as fast as possible),
//! --batch B (results per batch), --seconds S, --no-reference. DATABASE_URL names the
//! server (default postgres://postgres@127.0.0.1:5432/postgres).

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

struct Args {
    agents: usize,
    rate: f64,
    batch: usize,
    seconds: u64,
    reference: bool,
}

fn args() -> Args {
    let mut a = Args {
        agents: 8,
        rate: 0.0,
        batch: 1000,
        seconds: 20,
        reference: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
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
            "--no-reference" => a.reference = false,
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn result(agent: &str, seq: u64, now_nanos: i64) -> pb::Result {
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
}

/// One simulated agent: hello, then batches at its rate; records send-to-ack latency.
async fn agent(
    id: String,
    endpoint: String,
    args: Arc<Args>,
    deadline: Instant,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = IngestClient::new(channel).max_encoding_message_size(8 << 20);
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: id.clone(),
            version: "loadgen".into(),
            labels: Default::default(),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = inbound.message().await?;
    anyhow::ensure!(
        matches!(
            welcome.and_then(|m| m.msg),
            Some(pb::collector_message::Msg::Welcome(_))
        ),
        "no welcome"
    );
    // Acks come back in order; keep the send time of each batch until its ack.
    let sent: Arc<Mutex<std::collections::VecDeque<(u64, Instant, u64)>>> = Default::default();
    let acks = {
        let sent = sent.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(pb::collector_message::Msg::Ack(ack)) = m.msg {
                    let mut q = sent.lock().unwrap();
                    while q.front().is_some_and(|(last, _, _)| *last <= ack.seq) {
                        let (_, at, n) = q.pop_front().unwrap();
                        stats.committed.fetch_add(n, Ordering::Relaxed);
                        stats
                            .latencies_us
                            .lock()
                            .unwrap()
                            .push(at.elapsed().as_micros() as u64);
                    }
                }
            }
        })
    };
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
    // Spread the fleet's first sends over one interval, like real agents.
    if !interval.is_zero() {
        let jitter = rand::random::<f64>() * interval.as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(jitter)).await;
    }
    let mut seq = 0u64;
    let mut next = Instant::now();
    while Instant::now() < deadline {
        let now = now_nanos();
        let results: Vec<pb::Result> = (0..batch)
            .map(|_| {
                seq += 1;
                result(&id, seq, now)
            })
            .collect();
        sent.lock()
            .unwrap()
            .push_back((seq, Instant::now(), batch as u64));
        if tx
            .send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Batch(pb::ResultBatch { results })),
            })
            .await
            .is_err()
        {
            break;
        }
        if !interval.is_zero() {
            next += interval;
            tokio::time::sleep_until(next.into()).await;
        }
    }
    // Let the last acks arrive.
    let wait = Instant::now();
    while !sent.lock().unwrap().is_empty() && wait.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(tx);
    acks.abort();
    Ok(())
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

#[tokio::main]
async fn main() {
    let args = Arc::new(args());
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let tmp = tempfile::tempdir().unwrap();
    let url = fresh_db(&server, "edgeprobe_bench_ingest");
    let (grpc, http) = (free_port(), free_port());
    let config = tmp.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ninsecure = true\ngrpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n[database]\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(tmp.path().join("collector.log")).unwrap();
    let mut collector = Command::new(collector_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = collector.id();
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(up.elapsed() < Duration::from_secs(30), "collector not up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stats = Arc::new(Stats::default());
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let mut tasks = Vec::new();
    for i in 0..args.agents {
        tasks.push(tokio::spawn(agent(
            format!("load-{i:05}"),
            endpoint.clone(),
            args.clone(),
            deadline,
            stats.clone(),
        )));
        // Connect in waves so the accept queue is not flooded.
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut peak_rss = 0.0f64;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak_rss = peak_rss.max(rss_mib(pid));
    }
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    peak_rss = peak_rss.max(rss_mib(pid));
    let _ = collector.kill();
    let _ = collector.wait();

    let committed = stats.committed.load(Ordering::Relaxed);
    let (check, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows: i64 = check
        .query_one("SELECT count(*) FROM results", &[])
        .await
        .unwrap()
        .get(0);
    drop(check);
    psql(
        &server,
        "DROP DATABASE IF EXISTS edgeprobe_bench_ingest WITH (FORCE)",
    );
    let mut lat = stats.latencies_us.lock().unwrap().clone();
    lat.sort_unstable();
    let rate = committed as f64 / elapsed;

    println!(
        "ingest benchmark: {} agents, rate {} results/s per agent, batch {}, {} s, {failed} agents failed",
        args.agents,
        if args.rate > 0.0 { args.rate.to_string() } else { "max".into() },
        args.batch,
        args.seconds
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| committed results/s (acked after commit) | {rate:.0} |");
    println!("| rows in PostgreSQL / acked | {rows} / {committed} |");
    println!("| offered results/s | {:.0} |", offered(&args));
    println!(
        "| result-to-commit latency p50 / p99 / max | {:.3} / {:.3} / {:.3} s |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    println!("| collector peak RSS | {peak_rss:.0} MiB |");
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
}
