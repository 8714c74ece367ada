//! Fleet-scale storage behaviour: several collectors on one PostgreSQL, daily partitions
//! and retention, metrics that pass promtool.

use std::time::Duration;

use crate::support::*;

#[test]
fn an_agent_failing_over_between_two_collectors_lands_every_seq_once() {
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let db = TestDb::new();
    let mut a = Collector::start(&dir_a, &db);
    let mut b = Collector::start(&dir_b, &db);
    let target = HttpTarget::start("ok");
    let tests = format!(
        "[[test]]\nname = \"web\"\nkind = \"http\"\ntarget = \"{}\"\nevery = \"20ms\"\n",
        target.url()
    );
    let mut agent = Agent::new(dir.path(), "roamer", &a.endpoint(), &tests);
    // Both collectors in the endpoint list: the agent moves on when one fails.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace(
            &format!("[\"{}\"]", a.endpoint()),
            &format!("[\"{}\", \"{}\"]", a.endpoint(), b.endpoint()),
        ),
    )
    .unwrap();
    agent.start();
    let rows = |db: &TestDb| db.scalar("SELECT count(*) FROM results");
    for round in 0..4 {
        let before = rows(&db);
        wait_for(Duration::from_secs(60), "progress", || {
            (rows(&db) > before + 30).then_some(())
        });
        let (victim, victim_dir) = if round % 2 == 0 {
            (&mut a, &dir_a)
        } else {
            (&mut b, &dir_b)
        };
        victim.proc.kill9();
        let before = rows(&db);
        wait_for(
            Duration::from_secs(60),
            "progress on the other collector",
            || (rows(&db) > before + 30).then_some(()),
        );
        victim.restart(victim_dir);
    }
    assert_eq!(agent.stop(), Some(0));
    let last = drain(&mut agent, &db, "roamer");
    assert_exactly_once(&db, "roamer", last);
}

#[test]
fn partitions_are_created_ahead_and_dropped_past_retention() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    // Migrate first, then plant a partition from ten days ago, as if the collector had run
    // back then.
    migrate(&db);
    let old_day: String = db
        .client()
        .query_one(
            "SELECT to_char(now() - interval '10 days', 'YYYYMMDD')",
            &[],
        )
        .unwrap()
        .get(0);
    db.client()
        .batch_execute(&format!(
            "CREATE TABLE results_p{old_day} PARTITION OF results FOR VALUES FROM \
             (date_trunc('day', now() - interval '10 days')) TO (date_trunc('day', now() - interval '9 days'))"
        ))
        .unwrap();
    let partitions = |db: &TestDb| {
        db.scalar(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'results' AND c.relname LIKE 'results_p%'",
        )
    };
    assert_eq!(
        partitions(&db),
        5 + 1,
        "yesterday..today+3, and the planted one"
    );

    let config = dir.path().join("collector.toml");
    let (grpc, http) = (free_addr(), free_addr());
    std::fs::write(
        &config,
        format!(
            "[server]\ninsecure = true\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\n\n[database]\nurl = \"{}\"\nretention = \"7d\"\n",
            db.url
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(collector_bin());
    cmd.arg("run").arg("--config").arg(&config);
    let _collector = Proc::spawn(cmd, dir.path().join("collector.log"));
    wait_for(
        Duration::from_secs(30),
        "the old partition to be dropped",
        || (partitions(&db) == 5).then_some(()),
    );
    let ahead = db.scalar(
        "SELECT count(*) FROM pg_class WHERE relname = 'results_p' || to_char(now() + interval '3 days', 'YYYYMMDD')",
    );
    assert_eq!(ahead, 1, "partitions are kept three days ahead");
}

#[test]
fn metrics_pass_promtool_with_results_of_every_kind_seen() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let tests = format!(
        "[[test]]\nname = \"web\"\nkind = \"http\"\ntarget = \"{}\"\nevery = \"100ms\"\n\n\
         [[test]]\nname = \"port\"\nkind = \"tcp\"\ntarget = \"{}\"\nevery = \"100ms\"\n",
        target.url(),
        target.addr
    );
    let mut agent = Agent::new(dir.path(), "metrics", &collector.endpoint(), &tests);
    agent.start();
    wait_for(Duration::from_secs(30), "results", || {
        (db.scalar("SELECT count(*) FROM results") > 20).then_some(())
    });
    let text = collector.metrics();
    agent.stop();
    for series in [
        "edgeprobe_results_total{ip_family=\"ipv4\",kind=\"http\",outcome=\"success\",site=\"lab\",test=\"web\"}",
        "edgeprobe_latency_seconds_count{kind=\"tcp\",site=\"lab\",test=\"port\"}",
        "edgeprobe_http_responses_total{code=\"2xx\",site=\"lab\",test=\"web\"}",
        "edgeprobe_agent_last_seen_timestamp_seconds{agent=\"metrics\"}",
        "edgeprobe_agents_connected",
        "edgeprobe_postgres_up",
    ] {
        assert!(metric(&text, series) > 0.0, "{series} missing in:\n{text}");
    }
    // No raw agent id or target on result metrics.
    for line in text
        .lines()
        .filter(|l| l.starts_with("edgeprobe_results_total"))
    {
        assert!(
            !line.contains("agent=") && !line.contains("target="),
            "{line}"
        );
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn migration_2_keeps_version_1_rows_and_still_refuses_duplicates() {
    let db = TestDb::new();
    let mut client = db.client();
    // A database left by a collector that knew only version 1, holding results.
    client
        .batch_execute(include_str!("../../migrations/0001_init.sql"))
        .unwrap();
    client
        .batch_execute(
            "CREATE TABLE edgeprobe_migrations (version integer PRIMARY KEY, name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO edgeprobe_migrations (version, name) VALUES (1, 'init');
             INSERT INTO results (agent_id, seq, test, kind, target, started_at,
                                  duration_seconds, success)
             SELECT 'old-agent', s, 'web', 'http', 'http://x/', now() - s * interval '1 second',
                    0.1, true
               FROM generate_series(1, 500) AS s;",
        )
        .unwrap();

    migrate(&db);
    // Every migration this tree ships applied on top of version 1 (counted from the
    // migrations folder, so a new migration does not make this test stale).
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".sql") && name[..4].bytes().all(|b| b.is_ascii_digit())
        })
        .count() as i64;
    assert!(shipped >= 8, "{shipped} migrations");
    assert_eq!(
        db.scalar("SELECT max(version)::int8 FROM edgeprobe_migrations"),
        shipped
    );
    assert_eq!(
        db.scalar("SELECT count(DISTINCT seq) FROM results WHERE agent_id = 'old-agent'"),
        500
    );
    // Version 3: old rows belong to the incarnation '' and carry no clock flags.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM results WHERE agent_id = 'old-agent' AND incarnation = ''
                AND NOT clock_unsynced AND NOT clock_corrected AND reported_started_at IS NULL"
        ),
        500
    );
    // One btree and one BRIN per partition, nothing else to keep up on every insert.
    let indexes: Vec<String> = client
        .query(
            "SELECT am.amname || ':' || pg_get_indexdef(i.indexrelid)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_am am ON am.oid = c.relam
              WHERE i.indrelid = 'results'::regclass ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Version 4 adds a partial index on run_id: only on-demand rows (run_id set) enter it.
    assert_eq!(indexes.len(), 3, "{indexes:?}");
    assert!(indexes[0].starts_with("brin:") && indexes[0].contains("(started_at)"));
    assert!(
        indexes[1].starts_with("btree:")
            && indexes[1].contains("(run_id) WHERE (run_id IS NOT NULL)"),
        "{indexes:?}"
    );
    assert!(
        indexes[2].starts_with("btree:")
            && indexes[2].contains("UNIQUE")
            && indexes[2].contains("(agent_id, test, started_at, seq)"),
        "{indexes:?}"
    );
    // The same result again is refused by the key, the watermark aside.
    let duplicate = client.batch_execute(
        "INSERT INTO results (agent_id, seq, test, kind, target, started_at, duration_seconds,
                              success)
         SELECT agent_id, seq, test, kind, target, started_at, duration_seconds, success
           FROM results WHERE agent_id = 'old-agent' AND seq = 7",
    );
    let error = duplicate.expect_err("a duplicate result was accepted");
    assert_eq!(
        error.code(),
        Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
        "{error}"
    );
}
