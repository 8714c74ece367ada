//! Never stall, never lose (issue 13), with real agent and collector processes: a config
//! whose results the collector would refuse, a wrong wall clock, a re-imaged host, a cloned
//! host, and SIGKILL in the middle of the buffer's multi-step changes (renumbering, time
//! correction). Every test counts rows in PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Environment that runs a process with its wall clock at `at` (libfaketime; the monotonic
/// and boot-time clocks stay real, as on a box whose real-time clock is wrong).
fn faketime(at: &str) -> Vec<(String, String)> {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "libfaketime missing: apt-get install faketime (scripts/setup does)"
    );
    vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), format!("@{at}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Starts `agent` with extra environment variables.
fn start_with(agent: &mut Agent, env: &[(String, String)]) {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run").arg("--config").arg(&agent.config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    agent.proc = Some(Proc::spawn(cmd, agent.config.with_extension("log")));
}

/// `n` tcp tests against `target`, each every `every`.
fn tcp_tests(target: std::net::SocketAddr, n: usize, every: &str) -> String {
    (0..n)
        .map(|i| {
            format!("[[test]]\nname = \"tcp{i}\"\nkind = \"tcp\"\ntarget = \"{target}\"\nevery = \"{every}\"\n")
        })
        .collect()
}

/// Multi-step buffer changes in chunks of 100 results with a pause after each, so a test
/// can SIGKILL the agent between two chunks (test-only variables of the agent).
fn slow_chunks() -> Vec<(String, String)> {
    vec![
        ("EDGEPROBE_TEST_CHUNK_RESULTS".into(), "100".into()),
        ("EDGEPROBE_TEST_CHUNK_PAUSE_MS".into(), "500".into()),
    ]
}

/// Per incarnation of `agent`: (incarnation, rows, max seq, distinct seqs).
fn by_incarnation(db: &TestDb, agent: &str) -> Vec<(String, i64, i64, i64)> {
    db.client()
        .query(
            "SELECT incarnation, count(*), max(seq), count(DISTINCT seq) FROM results
              WHERE agent_id = $1 GROUP BY 1 ORDER BY min(received_at)",
            &[&agent],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn agent_log(agent: &Agent) -> String {
    std::fs::read_to_string(agent.config.with_extension("log")).unwrap_or_default()
}

fn state_dir(agent: &Agent) -> PathBuf {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("state_dir"))
        .expect("state_dir in the config");
    PathBuf::from(line.split('"').nth(1).unwrap())
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Case 1: 20 labels under [agent] and 20 more on a test passed `check`, and the collector
/// refused every batch (40 labels, at most 32). `check` now refuses the file, located.
#[test]
fn check_refuses_results_the_collector_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let agent_labels: Vec<String> = (0..20).map(|i| format!("a{i} = \"x\"")).collect();
    let test_labels: Vec<String> = (0..20).map(|i| format!("t{i} = \"y\"")).collect();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"many-labels\"\nlabels = {{ {} }}\nstate_dir = \"{}\"\n\n\
             [collector]\nendpoints = [\"http://127.0.0.1:1\"]\ninsecure = true\n\n\
             [[test]]\nname = \"web\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:80\"\nevery = \"1s\"\n\
             labels = {{ {} }}\n",
            agent_labels.join(", "),
            dir.path().join("state").display(),
            test_labels.join(", ")
        ),
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "check accepted it: {stderr}");
    let located = format!("{}:15:", config.display());
    assert!(
        stderr.contains(&located) && stderr.contains("40 labels") && stderr.contains("32"),
        "expected {located} and the bound in: {stderr}"
    );

    // A control character in a label value: refused as well, located.
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"ctl\"\nlabels = {{ site = \"a\\u0007b\" }}\nstate_dir = \"{}\"\n\n\
             [collector]\nendpoints = [\"http://127.0.0.1:1\"]\ninsecure = true\n",
            dir.path().join("state").display(),
        ),
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "check accepted it: {stderr}");
    assert!(
        stderr.contains(&format!("{}:3:", config.display())) && stderr.contains("control"),
        "{stderr}"
    );
}

/// Case 1, the wrong clock: an agent that runs 6 s at 2019-06-01 (a drifting clock) then
/// normally. Its 2019 results used to sit at the head of the buffer and every batch was
/// refused: 0 rows, ever. Now every result lands exactly once, and none is stored at 2019.
#[test]
fn results_from_a_clock_in_2019_land_and_later_ones_are_not_held_behind() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let id = "clock-2019";
    let mut agent = Agent::new(
        dir.path(),
        id,
        &collector.endpoint(),
        &tcp_tests(collector.http, 1, "200ms"),
    );
    start_with(&mut agent, &faketime("2019-06-01 12:00:00"));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(agent.stop(), Some(0), "log: {}", agent_log(&agent));
    let wrong = agent.last_seq();
    assert!(wrong >= 10, "only {wrong} results under the wrong clock");
    agent.start();
    // Results taken after the clock is right land while the agent runs.
    wait_for(
        Duration::from_secs(20),
        "results past the 2019 ones",
        || {
            let landed = db.scalar(&format!(
                "SELECT count(*) FROM results WHERE agent_id = '{id}' AND seq > {wrong}"
            ));
            (landed >= 5).then_some(())
        },
    );
    assert_eq!(agent.stop(), Some(0));
    let last = drain(&mut agent, &db, id);
    assert_exactly_once(&db, id, last);
    let stored_in_2019 = db.scalar(&format!(
        "SELECT count(*) FROM results WHERE agent_id = '{id}' AND started_at < now() - interval '1 day'"
    ));
    assert_eq!(stored_in_2019, 0, "rows stored at the wrong time");
    let flagged = db.scalar(&format!(
        "SELECT count(*) FROM results WHERE agent_id = '{id}' AND seq <= {wrong}
            AND (clock_corrected OR clock_unsynced)"
    ));
    assert_eq!(flagged, wrong as i64, "every 2019 result is flagged");
    assert_eq!(db.scalar("SELECT count(*) FROM rejected_results"), 0);
}

/// A box without a real-time clock boots in 1970 and records while the collector is away:
/// its results land flagged, and a good result recorded after them is not held behind.
#[test]
fn results_stamped_1970_land_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let id = "clock-1970";
    let mut agent = Agent::new(
        dir.path(),
        id,
        &collector.endpoint(),
        &tcp_tests(collector.http, 1, "200ms"),
    );
    collector.proc.stop();
    start_with(&mut agent, &faketime("1970-01-02 00:00:00"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.stop(), Some(0), "log: {}", agent_log(&agent));
    let old = agent.last_seq();
    assert!(old >= 5, "only {old} results in 1970");
    agent.start();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.stop(), Some(0));
    collector.restart(dir.path());
    let last = drain(&mut agent, &db, id);
    assert!(last > old);
    assert_exactly_once(&db, id, last);
    let row = db
        .client()
        .query_one(
            "SELECT count(*) FILTER (WHERE clock_corrected OR clock_unsynced),
                    count(*) FILTER (WHERE started_at < '2020-01-01')
               FROM results WHERE agent_id = $1 AND seq <= $2",
            &[&id, &(old as i64)],
        )
        .unwrap();
    let (flagged, in_1970): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((flagged, in_1970), (old as i64, 0));
}

/// Case 2: a host re-imaged (state dir wiped, same id) records while the collector is away.
/// Its new buffer used to take the old committed seq for its own: seq 1..100 deleted as
/// "already committed". Now the new incarnation starts its own sequence.
#[test]
fn a_reimaged_host_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let id = "r1";
    let mut agent = Agent::new(
        dir.path(),
        id,
        &collector.endpoint(),
        &tcp_tests(collector.http, 1, "10ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "100 results landed", || {
        (db.scalar("SELECT count(*) FROM results") >= 100).then_some(())
    });
    assert_eq!(agent.stop(), Some(0));
    let first = drain(&mut agent, &db, id);

    collector.proc.stop();
    std::fs::remove_dir_all(state_dir(&agent)).unwrap();
    agent.start();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent.stop(), Some(0));
    let second = agent.last_seq();
    assert!(
        second > first,
        "re-imaged host recorded {second}, first life {first}"
    );
    collector.restart(dir.path());
    drain(&mut agent, &db, id);

    let lives = by_incarnation(&db, id);
    assert_eq!(lives.len(), 2, "{lives:?}");
    assert_ne!(lives[0].0, lives[1].0);
    let f = first as i64;
    let s = second as i64;
    assert_eq!((lives[0].1, lives[0].2, lives[0].3), (f, f, f), "{lives:?}");
    assert_eq!((lives[1].1, lives[1].2, lives[1].3), (s, s, s), "{lives:?}");
}

/// Two hosts cloned from one image (same id, same certificate, their own buffers): the
/// second is refused with a status naming the conflict, counted, and backs off instead of
/// reconnecting in a loop; once the first is gone it gets in and loses nothing.
#[test]
fn a_cloned_host_is_refused_counted_and_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let id = "twin";
    let tests = tcp_tests(collector.http, 1, "100ms");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut a = Agent::new(&a_dir, id, &collector.endpoint(), &tests);
    let mut b = Agent::new(&b_dir, id, &collector.endpoint(), &tests);
    a.start();
    wait_for(Duration::from_secs(20), "the first twin's rows", || {
        (db.scalar("SELECT count(*) FROM results") >= 5).then_some(())
    });
    b.start();
    std::thread::sleep(Duration::from_secs(10));
    let conflicts = metric(
        &collector.metrics(),
        "edgeprobe_agent_identity_conflicts_total",
    );
    // Before: about 7 reconnects a second (~70 in 10 s). With a growing, fully jittered
    // backoff: 6 to 9 in 10 s; 15 leaves room for the jitter and is far below a loop.
    assert!(
        (1.0..=15.0).contains(&conflicts),
        "{conflicts} conflicts in 10 s"
    );
    assert!(
        agent_log(&b).contains("another host"),
        "the refused twin says why: {}",
        agent_log(&b)
    );
    assert!(db.scalar("SELECT identity_conflicts FROM agents WHERE agent_id = 'twin'") >= 1);
    let incarnations = by_incarnation(&db, id);
    assert_eq!(
        incarnations.len(),
        1,
        "only the first twin lands: {incarnations:?}"
    );

    // The first host goes away: the second gets in within its backoff and lands everything.
    assert_eq!(a.stop(), Some(0));
    wait_for(Duration::from_secs(60), "the second twin's rows", || {
        (by_incarnation(&db, id).len() == 2).then_some(())
    });
    assert_eq!(b.stop(), Some(0));
    // Each twin drains alone (agents.committed_seq follows the latest hello's incarnation).
    let last_b = drain(&mut b, &db, id) as i64;
    let last_a = drain(&mut a, &db, id) as i64;
    let mut lives: Vec<(i64, i64, i64)> = by_incarnation(&db, id)
        .into_iter()
        .map(|l| (l.1, l.2, l.3))
        .collect();
    lives.sort();
    let mut want = vec![(last_a, last_a, last_a), (last_b, last_b, last_b)];
    want.sort();
    assert_eq!(lives, want, "every result of both twins exactly once");
}

/// A state dir restored from a snapshot is behind the collector: its new results reuse
/// committed seqs and are renumbered after them. SIGKILL in the middle of the renumbering
/// loses and duplicates nothing.
#[test]
fn sigkill_during_renumbering_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let id = "snapshot";
    let mut agent = Agent::new(
        dir.path(),
        id,
        &collector.endpoint(),
        &tcp_tests(collector.http, 2, "10ms"),
    );
    // Life 1, then a snapshot of a drained state dir.
    agent.start();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.stop(), Some(0));
    let snapshot_seq = drain(&mut agent, &db, id);
    let state = state_dir(&agent);
    let snapshot = dir.path().join("snapshot-copy");
    copy_dir(&state, &snapshot);
    // Life 2 goes on past the snapshot (twice as long as life 3 below, so the restored
    // buffer stays behind however fast this machine records).
    agent.start();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(agent.stop(), Some(0));
    let committed = drain(&mut agent, &db, id);
    // The snapshot is restored; the restored host records while the collector is away.
    collector.proc.stop();
    copy_dir(&snapshot, &state);
    agent.start();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.stop(), Some(0));
    let pending = agent.last_seq() - snapshot_seq;
    assert!(
        pending > 300 && snapshot_seq + pending < committed,
        "pending {pending} after {snapshot_seq}, committed {committed}: the restored buffer must be behind"
    );
    collector.restart(dir.path());
    // Renumbering in slow chunks; SIGKILL between two of them.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, text.split("[[test]]").next().unwrap()).unwrap();
    start_with(&mut agent, &slow_chunks());
    wait_for(Duration::from_secs(30), "renumbering to start", || {
        agent_log(&agent).contains("renumbering").then_some(())
    });
    std::thread::sleep(Duration::from_millis(750));
    agent.kill9();
    assert!(
        !agent_log(&agent).contains("renumbered"),
        "killed after the renumbering, not in it: {}",
        agent_log(&agent)
    );
    let last = drain(&mut agent, &db, id);
    assert_eq!(
        last,
        committed + pending,
        "renumbered after the committed seq"
    );
    assert_exactly_once(&db, id, last);
}

/// Results taken under a wrong clock are corrected in the buffer once the clock can be
/// trusted; SIGKILL in the middle of the correction loses and duplicates nothing.
#[test]
fn sigkill_during_time_correction_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let id = "correct-me";
    let mut agent = Agent::new(
        dir.path(),
        id,
        &collector.endpoint(),
        &tcp_tests(collector.http, 2, "10ms"),
    );
    collector.proc.stop();
    start_with(&mut agent, &faketime("2019-06-01 12:00:00"));
    // Over 300 results (three chunks of the slowed correction below) even on a loaded
    // machine: 2 s gave 282 while other tests ran.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent.stop(), Some(0));
    let recorded = agent.last_seq();
    assert!(
        recorded > 300,
        "only {recorded} results under the wrong clock"
    );
    collector.restart(dir.path());
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, text.split("[[test]]").next().unwrap()).unwrap();
    // Acks would delete the results before the correction reaches them: hold every COPY
    // into results (the hello and the welcome still go through) until the agent is killed.
    let mut holder = db.client();
    let mut hold = holder.transaction().unwrap();
    hold.batch_execute("LOCK TABLE results IN SHARE MODE")
        .unwrap();
    start_with(&mut agent, &slow_chunks());
    wait_for(Duration::from_secs(30), "the correction to start", || {
        agent_log(&agent)
            .contains("correcting the start time")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(750));
    agent.kill9();
    assert!(
        !agent_log(&agent).contains("correcting the start time: done"),
        "killed after the correction, not in it: {}",
        agent_log(&agent)
    );
    hold.rollback().unwrap();
    let last = drain(&mut agent, &db, id);
    assert_eq!(last, recorded);
    assert_exactly_once(&db, id, last);
    let in_2019 = db.scalar(&format!(
        "SELECT count(*) FROM results WHERE agent_id = '{id}' AND started_at < '2020-01-01'"
    ));
    assert_eq!(in_2019, 0);
}
