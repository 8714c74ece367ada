//! The spine: agent -> sled -> gRPC -> collector -> Postgres -> ack.

use std::time::Duration;

use crate::support::*;

#[test]
fn http_results_land_with_typed_fields_and_the_buffer_empties() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("hello edgeprobe");
    let tcp = format!(
        "[[test]]\nname = \"pg-port\"\nkind = \"tcp\"\ntarget = \"{}\"\nschedule = \"* * * * * *\"\n",
        target.addr
    );
    let mut agent = Agent::new(
        dir.path(),
        "spine-1",
        &collector.endpoint(),
        &(http_test(&target.url(), "200ms") + &tcp),
    );
    agent.start();
    wait_for(
        Duration::from_secs(30),
        "10 http rows and 1 tcp row",
        || {
            let http = db.scalar("SELECT count(*) FROM results WHERE kind = 'http'");
            let tcp = db.scalar("SELECT count(*) FROM results WHERE kind = 'tcp'");
            (http >= 10 && tcp >= 1).then_some(())
        },
    );
    assert_eq!(agent.stop(), Some(0), "agent exit code");
    let last = drain(&mut agent, &db, "spine-1");

    // Every recorded result landed once, and the buffer is empty.
    assert_exactly_once(&db, "spine-1", last);
    assert_eq!(agent.stat("backlog"), 0);
    assert_eq!(agent.stat("stored bytes"), 0);

    let mut client = db.client();
    let row = client
        .query_one(
            "SELECT test, target, success, status_code, body_bytes, dns_seconds, connect_seconds,
                    ttfb_seconds, transfer_seconds, tls_seconds, labels->>'site', duration_seconds,
                    error_class, extract(epoch FROM now() - started_at)::float8
               FROM http_results WHERE agent_id = 'spine-1' ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "web");
    assert_eq!(row.get::<_, String>(1), target.url());
    assert!(row.get::<_, bool>(2));
    assert_eq!(row.get::<_, Option<i32>>(3), Some(200));
    assert_eq!(
        row.get::<_, Option<i64>>(4),
        Some("hello edgeprobe".len() as i64)
    );
    for col in 5..=8 {
        let v: Option<f64> = row.get(col);
        assert!(
            v.is_some_and(|s| (0.0..1.0).contains(&s)),
            "column {col} = {v:?}"
        );
    }
    assert_eq!(row.get::<_, Option<f64>>(9), None, "no TLS on http://");
    assert_eq!(row.get::<_, Option<String>>(10).as_deref(), Some("lab"));
    assert!(row.get::<_, f64>(11) > 0.0);
    assert_eq!(row.get::<_, Option<String>>(12), None);
    let age: f64 = row.get(13);
    assert!((0.0..120.0).contains(&age), "started {age} s ago");

    let tcp_row = client
        .query_one(
            "SELECT success, connect_seconds FROM tcp_results WHERE agent_id = 'spine-1' LIMIT 1",
            &[],
        )
        .unwrap();
    assert!(tcp_row.get::<_, bool>(0));
    assert!(tcp_row.get::<_, Option<f64>>(1).is_some_and(|s| s > 0.0));

    let agents = client
        .query_one(
            "SELECT committed_seq, version FROM agents WHERE agent_id = 'spine-1'",
            &[],
        )
        .unwrap();
    assert_eq!(agents.get::<_, i64>(0), last as i64);
    assert_eq!(agents.get::<_, String>(1), env!("CARGO_PKG_VERSION"));

    let metrics = collector.metrics();
    let committed = metric(
        &metrics,
        "edgeprobe_ingest_results_total{outcome=\"committed\"}",
    );
    assert_eq!(committed, last as f64, "{metrics}");
}

#[test]
fn a_failed_probe_is_a_result_with_an_error_class() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    // A port nobody listens on.
    let closed = free_addr();
    let mut agent = Agent::new(
        dir.path(),
        "spine-fail",
        &collector.endpoint(),
        &http_test(&format!("http://{closed}/"), "100ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "failed rows", || {
        (db.scalar("SELECT count(*) FROM results WHERE NOT success") >= 3).then_some(())
    });
    agent.stop();
    let row = db
        .client()
        .query_one(
            "SELECT error_class, error_message, status_code FROM results WHERE agent_id = 'spine-fail' LIMIT 1",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("refused"));
    assert!(row
        .get::<_, Option<String>>(1)
        .is_some_and(|m| m.contains(&closed.to_string())));
    assert_eq!(row.get::<_, Option<i32>>(2), None);
}

#[test]
fn restarts_mid_stream_land_every_seq_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "spine-2",
        &collector.endpoint(),
        &http_test(&target.url(), "20ms"),
    );
    agent.start();

    let rows = |db: &TestDb| db.scalar("SELECT count(*) FROM results");
    for round in 0..2 {
        let before = rows(&db);
        wait_for(Duration::from_secs(30), "progress", || {
            (rows(&db) > before + 20).then_some(())
        });
        // Agent restart: graceful, then (second round) SIGKILL.
        if round == 0 {
            assert_eq!(agent.stop(), Some(0));
        } else {
            agent.kill9();
        }
        agent.start();
        let before = rows(&db);
        wait_for(Duration::from_secs(30), "progress", || {
            (rows(&db) > before + 20).then_some(())
        });
        // Collector restart mid-stream: graceful, then SIGKILL.
        if round == 0 {
            assert_eq!(collector.proc.stop(), Some(0), "collector exit code");
        } else {
            collector.proc.kill9();
        }
        std::thread::sleep(Duration::from_millis(500));
        collector.restart(dir.path());
    }
    let before = rows(&db);
    wait_for(
        Duration::from_secs(30),
        "progress after the last restart",
        || (rows(&db) > before + 20).then_some(()),
    );
    agent.stop();
    let last = drain(&mut agent, &db, "spine-2");
    assert!(last > 100, "only {last} results");
    assert_exactly_once(&db, "spine-2", last);
    assert_eq!(agent.stat("backlog"), 0);
}

#[test]
fn results_wait_in_the_buffer_while_the_collector_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let (grpc, http) = (free_addr(), free_addr());
    let target = HttpTarget::start("ok");
    let endpoint = format!("http://{grpc}");
    let mut agent = Agent::new(
        dir.path(),
        "spine-3",
        &endpoint,
        &http_test(&target.url(), "50ms"),
    );
    agent.start();
    std::thread::sleep(Duration::from_secs(3));
    // Nothing could land: there is no collector (and no schema yet).
    let down_until = std::time::SystemTime::now();
    let collector = Collector::start_at(dir.path(), &db, grpc, http);
    wait_for(Duration::from_secs(40), "the backlog to land", || {
        let n = db.scalar(&format!(
            "SELECT count(*) FROM results WHERE agent_id = 'spine-3' AND started_at < to_timestamp({})",
            down_until.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
        ));
        (n >= 40).then_some(())
    });
    agent.stop();
    let last = drain(&mut agent, &db, "spine-3");
    assert_exactly_once(&db, "spine-3", last);
    drop(collector);
}

#[test]
fn sighup_reloads_the_tests_and_a_bad_file_keeps_the_running_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        dir.path(),
        "reload",
        &collector.endpoint(),
        &http_test(&target.url(), "100ms"),
    );
    agent.start();
    let count = |test: &str| {
        db.scalar(&format!(
            "SELECT count(*) FROM results WHERE test = '{test}'"
        ))
    };
    wait_for(Duration::from_secs(30), "results of the first test", || {
        (count("web") >= 3).then_some(())
    });

    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("name = \"web\"", "name = \"web-renamed\""),
    )
    .unwrap();
    agent.proc.as_ref().unwrap().signal("HUP");
    wait_for(
        Duration::from_secs(30),
        "results of the reloaded test",
        || (count("web-renamed") >= 3).then_some(()),
    );

    // A file that does not check is refused; the agent goes on with what it runs.
    std::fs::write(
        &agent.config,
        text.replace("name = \"web\"", "nmae = \"web\""),
    )
    .unwrap();
    agent.proc.as_ref().unwrap().signal("HUP");
    let before = count("web-renamed");
    wait_for(
        Duration::from_secs(30),
        "the running configuration to go on",
        || (count("web-renamed") >= before + 5).then_some(()),
    );
    assert!(agent.proc.as_mut().unwrap().is_running());
    assert_eq!(agent.stop(), Some(0));
}
