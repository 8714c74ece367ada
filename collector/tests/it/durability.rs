//! Never lose a result: SIGKILL of agent and collector, PostgreSQL outages, a full buffer
//! and a corrupted one. Every test counts rows in PostgreSQL against what the agent
//! recorded (its last seq), and checks there are no duplicates and no holes.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn agent_sigkill_ten_times_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "kill-agent",
        &collector.endpoint(),
        &http_test(&target.url(), "100ms"),
    );
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..10 {
        agent.start();
        // A random moment between 0.3 s and 1.5 s into the run.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(300 + rng % 1200));
        agent.kill9();
    }
    let recorded = agent.last_seq();
    assert!(recorded >= 20, "only {recorded} results recorded");
    assert_eq!(agent.stat("dropped"), 0);
    let last = drain(&mut agent, &db, "kill-agent");
    assert_eq!(last, recorded);
    assert_exactly_once(&db, "kill-agent", last);
    assert_eq!(agent.stat("backlog"), 0);
}

#[test]
fn collector_sigkill_five_times_during_heavy_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let tcp = |name: &str| {
        format!(
            "[[test]]\nname = \"{name}\"\nkind = \"tcp\"\ntarget = \"{}\"\nevery = \"10ms\"\n",
            target.addr
        )
    };
    let ids = ["heavy-1", "heavy-2", "heavy-3"];
    let mut agents: Vec<Agent> = ids
        .iter()
        .map(|id| {
            let tests = tcp("a") + &tcp("b") + &http_test(&target.url(), "20ms");
            Agent::new(dir.path(), id, &collector.endpoint(), &tests)
        })
        .collect();
    for a in &mut agents {
        a.start();
    }
    let rows = |db: &TestDb| db.scalar("SELECT count(*) FROM results");
    for _ in 0..5 {
        let before = rows(&db);
        wait_for(Duration::from_secs(60), "ingest progress", || {
            (rows(&db) > before + 200).then_some(())
        });
        collector.proc.kill9();
        std::thread::sleep(Duration::from_millis(700));
        collector.restart(dir.path());
    }
    for (a, id) in agents.iter_mut().zip(ids) {
        assert_eq!(a.stop(), Some(0));
        let last = drain(a, &db, id);
        assert_eq!(a.stat("dropped"), 0);
        assert_exactly_once(&db, id, last);
    }
}

#[test]
fn postgres_outage_of_30s_holds_acks_bounds_memory_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = PgCluster::start();
    let db = TestDb::on_server(&cluster.url("postgres"));
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "pg-outage",
        &collector.endpoint(),
        &http_test(&target.url(), "20ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "first rows", || {
        (db.scalar("SELECT count(*) FROM results") > 50).then_some(())
    });

    cluster.pause();
    let start = Instant::now();
    let mut max_rss = 0;
    let mut saw_unready = false;
    while start.elapsed() < Duration::from_secs(30) {
        if let Some((status, _)) = http_get(collector.http, "/readyz") {
            saw_unready |= status == 503;
        }
        max_rss = max_rss.max(rss_kib(collector.proc.pid()));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(saw_unready, "/readyz never reported the outage");
    // Bounded: the collector holds at most a fixed number of batches, whatever the outage.
    assert!(
        max_rss < 200 * 1024,
        "collector RSS reached {max_rss} KiB during the outage"
    );
    cluster.resume();

    wait_for(Duration::from_secs(30), "ready again", || {
        http_get(collector.http, "/readyz").filter(|(s, _)| *s == 200)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.stop(), Some(0));
    let last = drain(&mut agent, &db, "pg-outage");
    assert!(last > 1000, "only {last} results over 30 s at 50/s");
    assert_exactly_once(&db, "pg-outage", last);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_full_buffer_drops_the_oldest_and_the_count_reaches_postgres_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let (grpc, http) = (free_addr(), free_addr());
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "tiny-cap",
        &format!("http://{grpc}"),
        &http_test(&target.url(), "10ms"),
    );
    // Room for a few dozen results only.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("[collector]", "buffer_max_bytes = \"8KiB\"\n\n[collector]"),
    )
    .unwrap();
    agent.start();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.stop(), Some(0));
    let last = agent.last_seq();
    let dropped = agent.stat("dropped");
    let kept = agent.stat("backlog");
    assert!(dropped > 0 && kept > 0, "dropped {dropped}, kept {kept}");
    assert_eq!(
        dropped + kept,
        last,
        "every result is either kept or counted as dropped"
    );

    let collector = Collector::start_at(dir.path(), &db, grpc, http);
    drain(&mut agent, &db, "tiny-cap");
    // The newest results landed, the oldest were dropped, nothing else is missing.
    let (rows, max, distinct) = seq_summary(&db, "tiny-cap");
    assert_eq!(
        (rows, max, distinct),
        (kept as i64, last as i64, kept as i64)
    );
    let min = db.scalar("SELECT min(seq) FROM results WHERE agent_id = 'tiny-cap'");
    assert_eq!(min as u64, dropped + 1);
    assert_eq!(
        db.scalar("SELECT dropped FROM agents WHERE agent_id = 'tiny-cap'") as u64,
        dropped
    );
    let metrics = collector.metrics();
    let series = "edgeprobe_agent_dropped_results{agent=\"tiny-cap\"}";
    assert_eq!(metric(&metrics, series) as u64, dropped, "{metrics}");
}

#[test]
fn a_corrupted_buffer_gives_a_located_error_and_no_silent_wipe() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "corrupt",
        &collector.endpoint(),
        &http_test(&target.url(), "50ms"),
    );
    agent.start();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.stop(), Some(0));
    let buffer = dir.path().join("corrupt-state").join("buffer");
    let db_file = buffer.join("db");
    let len = std::fs::metadata(&db_file).unwrap().len() as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&db_file, garbage).unwrap();

    for subcommand in ["run", "buffer"] {
        let out = Command::new(agent_bin())
            .arg(subcommand)
            .arg("--config")
            .arg(&agent.config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{subcommand}: {err}");
        assert!(
            err.contains(&buffer.display().to_string()),
            "{subcommand} names the path: {err}"
        );
        assert!(
            err.contains("aside (mv "),
            "{subcommand} names the recovery step: {err}"
        );
    }
    // Not wiped and carried on: the directory is still there, and the agent still refuses
    // it (sled rewrote what it could not read, so a one-off error would be a silent wipe).
    assert!(db_file.exists());
    let again = Command::new(agent_bin())
        .arg("run")
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(1),
        "a third start still refuses the buffer"
    );
}

/// A tmpfs of `mib` MiB mounted at `dir` for the life of the value (needs root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mib: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_drops_and_counts_like_a_full_buffer_and_the_agent_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let Some(_disk) = Tmpfs::mount(&dir.path().join("disk"), 40) else {
        panic!("mounting a tmpfs failed: this test needs root (CI runs as root)");
    };
    let (grpc, http) = (free_addr(), free_addr());
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "disk-full",
        &format!("http://{grpc}"),
        &http_test(&target.url(), "10ms"),
    );
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let state = dir.path().join("disk").join("state");
    std::fs::write(
        &agent.config,
        text.replace(
            &dir.path().join("disk-full-state").display().to_string(),
            &state.display().to_string(),
        ),
    )
    .unwrap();
    // Leave less free space than the buffer's reserve.
    let filler = dir.path().join("disk").join("filler");
    std::fs::write(&filler, vec![0u8; 30 << 20]).unwrap();

    agent.start();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.proc.as_mut().unwrap().is_running(),
        "the agent died of a full disk"
    );
    assert_eq!(agent.stop(), Some(0));
    let dropped = agent.stat("dropped");
    assert!(
        dropped > 20,
        "results on a full disk are counted as dropped: {dropped}"
    );
    assert_eq!(agent.stat("backlog"), 0);

    // Room again: results are recorded again, and everything recorded lands.
    std::fs::remove_file(&filler).unwrap();
    agent.start();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.stop(), Some(0));
    let kept = agent.stat("backlog");
    assert!(kept > 20, "recording resumed: {kept}");
    let _collector = Collector::start_at(dir.path(), &db, grpc, http);
    let last = drain(&mut agent, &db, "disk-full");
    let (rows, max, distinct) = seq_summary(&db, "disk-full");
    assert_eq!(
        (rows, max, distinct),
        (kept as i64, last as i64, kept as i64)
    );
    assert_eq!(
        db.scalar("SELECT dropped FROM agents WHERE agent_id = 'disk-full'") as u64,
        dropped
    );
}
