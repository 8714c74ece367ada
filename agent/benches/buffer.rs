//! Buffer benchmark: durable appends per second (against raw sled in the same run), bytes
//! on disk and agent RSS with a 1,000,000-result backlog, and the drain rate of that
//! backlog into a real collector and PostgreSQL.
//!
//!     scripts/bench-buffer            # builds the collector, then runs this
//!
//! Environment: DATABASE_URL (a server where a database can be created; default
//! postgres://postgres@127.0.0.1:5432/postgres), BENCH_RESULTS (default 1000000).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use edgeprobe_agent::buffer::Buffer;
use edgeprobe_agent::config::Kind;
use edgeprobe_agent::probe::{Fields, HttpFields, Outcome};
use edgeprobe_agent::record::{self, TestInfo};

const PRODUCERS: usize = 64;

static CLOCK: std::sync::LazyLock<edgeprobe_agent::clock::Clock> =
    std::sync::LazyLock::new(edgeprobe_agent::clock::Clock::new);

fn payload(i: u64) -> Vec<u8> {
    let test = TestInfo {
        name: "web".into(),
        kind: Kind::Http,
        target: "https://www.example.net/health".into(),
        labels: [("site".to_string(), "berlin".to_string())].into(),
        run_id: 0,
    };
    let outcome = Outcome {
        started_at: SystemTime::now(),
        boottime_nanos: edgeprobe_agent::clock::boottime_nanos(),
        duration: Duration::from_millis(40 + i % 17),
        error: None,
        fields: Fields::Http(HttpFields {
            status_code: Some(200),
            dns_seconds: Some(0.001),
            connect_seconds: Some(0.012),
            tls_seconds: Some(0.021),
            ttfb_seconds: Some(0.034),
            transfer_seconds: Some(0.002),
            body_bytes: 1256,
            tls_cert_expiry_seconds: Some(7_000_000.0),
        }),
        ip_family: "ipv4".into(),
        local_address: "192.0.2.10".into(),
        interface: String::new(),
    };
    record::encode(&test, &outcome, &CLOCK)
}

fn rss_mib() -> f64 {
    rss_of(std::process::id())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Durable appends from PRODUCERS concurrent tasks, like many tests finishing together.
async fn append_many(buffer: &Buffer, n: u64) -> Duration {
    let start = Instant::now();
    let per = n / PRODUCERS as u64;
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS as u64 {
        let buffer = buffer.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                buffer.append(payload(p * per + i)).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// The reference: raw sled inserts with a flush every 1,000 keys (no fsync).
fn raw_sled(dir: &Path, n: u64) -> Duration {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(8 << 20)
        .open()
        .unwrap();
    let start = Instant::now();
    for i in 0..n {
        db.insert(i.to_be_bytes(), payload(i)).unwrap();
        if i % 1000 == 999 {
            db.flush().unwrap();
        }
    }
    db.flush().unwrap();
    start.elapsed()
}

fn rss_of(pid: u32) -> f64 {
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

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/buffer-xxxx -> target/release/NAME
    let bin = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        bin.exists(),
        "{} missing: run scripts/bench-buffer (it builds the binaries first)",
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

#[tokio::main]
async fn main() {
    let n: u64 = std::env::var("BENCH_RESULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let tmp = tempfile::tempdir().unwrap();
    let sample = 200_000.min(n);

    // 1. Appends: ours (durable, group-committed) vs raw sled (flush per 1,000, no fsync).
    let reference = raw_sled(&tmp.path().join("raw"), sample);
    let state = tmp.path().join("state");
    let buffer = Buffer::open(&state, 1 << 40).unwrap();
    let ours = append_many(&buffer, sample).await;
    let ours_rate = sample as f64 / ours.as_secs_f64();
    let ref_rate = sample as f64 / reference.as_secs_f64();

    // 2. Fill to n, close, and measure the disk the backlog takes.
    append_many(&buffer, n - sample).await;
    let backlog = buffer.stats().backlog;
    assert_eq!(backlog, n / PRODUCERS as u64 * PRODUCERS as u64);
    let bench_rss = rss_mib();
    buffer.close();
    drop(buffer);
    let disk = dir_bytes(&state.join("buffer"));

    // 3. The real agent binary on that state dir: RSS while the collector is away, then
    //    the drain into a real collector and PostgreSQL, with the agent's peak RSS.
    let (admin, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .expect("connect to DATABASE_URL");
    tokio::spawn(conn);
    admin
        .batch_execute("DROP DATABASE IF EXISTS edgeprobe_bench WITH (FORCE)")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE edgeprobe_bench")
        .await
        .unwrap();
    let db_url = format!("{}/edgeprobe_bench", &server[..server.rfind('/').unwrap()]);
    let (grpc, http) = (free_port(), free_port());
    let agent_config = tmp.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[agent]\nid = \"bench-agent\"\nstate_dir = \"{}\"\nbuffer_max_bytes = \"1GiB\"\n[collector]\nendpoints = [\"http://127.0.0.1:{grpc}\"]\ninsecure = true\n",
            state.display()
        ),
    )
    .unwrap();
    let mut agent = Command::new(bin("edgeprobe-agent"))
        .args(["run", "--config"])
        .arg(&agent_config)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_backlog = rss_of(agent.id());

    let config = tmp.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ninsecure = true\ngrpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n[database]\nurl = \"{db_url}\"\n"
        ),
    )
    .unwrap();
    let mut collector = Command::new(bin("edgeprobe-collector"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (check, conn) = loop {
        if let Ok(c) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::spawn(conn);
    let committed = || async {
        check
            .query_opt(
                "SELECT committed_seq FROM agents WHERE agent_id = 'bench-agent'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map_or(0, |r| r.get::<_, i64>(0) as u64)
    };
    // The drain starts with the first committed batch (after migrations and connect).
    while committed().await == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    let first = committed().await;
    let mut peak_rss = rss_backlog;
    while committed().await < backlog {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak_rss = peak_rss.max(rss_of(agent.id()));
        assert!(start.elapsed() < Duration::from_secs(600), "drain too slow");
    }
    let drain = start.elapsed();
    let drained = backlog - first;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let _ = agent.wait();
    let _ = collector.kill();
    let _ = collector.wait();
    let rows: i64 = check
        .query_one("SELECT count(*) FROM results", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as u64, backlog, "every buffered result landed");
    drop(check);
    let _ = admin
        .batch_execute("DROP DATABASE IF EXISTS edgeprobe_bench WITH (FORCE)")
        .await;

    let per = disk as f64 / backlog as f64;
    println!(
        "buffer benchmark ({backlog} results of {} bytes)",
        payload(0).len()
    );
    println!("| measure | edgeprobe | reference (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| durable appends/s ({PRODUCERS} producers, fsync per group) | {ours_rate:.0} | raw sled insert + flush/1000 (no fsync): {ref_rate:.0} | {:.2} | >= 20,000 |",
        ours_rate / ref_rate
    );
    println!(
        "| drain of the backlog by the agent binary into collector + PostgreSQL, results/s | {:.0} | - | - | >= 50,000 |",
        drained as f64 / drain.as_secs_f64()
    );
    println!(
        "| disk for the backlog | {:.0} MiB ({per:.0} B/result) | - | - | 1M in <= 400 MiB |",
        disk as f64 / (1 << 20) as f64
    );
    println!(
        "| agent RSS with the backlog (collector away / peak while draining) | {rss_backlog:.0} / {peak_rss:.0} MiB | - | - | <= 64 MiB |"
    );
    println!("(the benchmark process that wrote the backlog peaked at {bench_rss:.0} MiB)");
    println!("\nrerun: scripts/bench-buffer");
}
