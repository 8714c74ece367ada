//! The controller's live side: fleet test versions pushed to real agents through a real
//! collector, run-now requests dispatched to them, and an old-protocol client left alone.
//! Versions and runs are inserted with SQL plus NOTIFY, exactly what `tests apply` and
//! `run-now` do.

use std::time::Duration;

use edgeprobe_proto::v1 as pb;
use edgeprobe_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// One fleet test: name, select labels (JSON), agent ids, every.
struct T<'a> {
    name: &'a str,
    select: &'a str,
    agents: Option<&'a [&'a str]>,
}

fn spec(name: &str, target: &str) -> String {
    format!(
        "[[test]]\nname = \"{name}\"\nkind = \"http\"\ntarget = \"{target}\"\nevery = \"100ms\"\n"
    )
}

/// Inserts version `version` with `tests`, then notifies, as `tests apply` does.
fn apply(db: &TestDb, version: i64, target: &str, tests: &[T]) {
    insert_version(db, version, target, tests, true)
}

fn insert_version(db: &TestDb, version: i64, target: &str, tests: &[T], notify: bool) {
    let mut c = db.client();
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "INSERT INTO fleet_versions (version, created_by, origin) VALUES ($1, 'it', 'test')",
        &[&version],
    )
    .unwrap();
    for t in tests {
        let agents: Option<Vec<String>> =
            t.agents.map(|a| a.iter().map(|s| s.to_string()).collect());
        tx.execute(
            "INSERT INTO fleet_tests (version, name, kind, target, select_labels, agents, spec_toml)
             VALUES ($1, $2, 'http', $3, $4::text::jsonb, $5, $6)",
            &[&version, &t.name, &target, &t.select, &agents, &spec(t.name, target)],
        )
        .unwrap();
    }
    if notify {
        tx.execute(&format!("NOTIFY edgeprobe_fleet, '{version}'"), &[])
            .unwrap();
    }
    tx.commit().unwrap();
}

/// Inserts a run of `test` for `agents`, then notifies, as `run-now` does; its id.
fn run_now(db: &TestDb, test: &str, agents: &[&str]) -> i64 {
    let mut c = db.client();
    let mut tx = c.transaction().unwrap();
    let ids: Vec<String> = agents.iter().map(|s| s.to_string()).collect();
    let run_id: i64 = tx
        .query_one(
            "INSERT INTO runs (created_by, test, agents) VALUES ('it', $1, $2) RETURNING run_id",
            &[&test, &ids],
        )
        .unwrap()
        .get(0);
    tx.execute(
        "INSERT INTO run_agents (run_id, agent_id) SELECT $1, unnest($2::text[])",
        &[&run_id, &ids],
    )
    .unwrap();
    tx.execute(&format!("NOTIFY edgeprobe_runs, '{run_id}'"), &[])
        .unwrap();
    tx.commit().unwrap();
    run_id
}

fn fleet_version(db: &TestDb, agent: &str) -> Option<i64> {
    db.client()
        .query_opt(
            "SELECT fleet_version FROM agents WHERE agent_id = $1",
            &[&agent],
        )
        .unwrap()
        .and_then(|r| r.get(0))
}

fn states(db: &TestDb, run_id: i64) -> Vec<(String, String)> {
    db.client()
        .query(
            "SELECT agent_id, state FROM run_agents WHERE run_id = $1 ORDER BY agent_id",
            &[&run_id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn connected(db: &TestDb, ids: &[&str]) {
    wait_for(WAIT, "agents connected with their features", || {
        let n = db.scalar(&format!(
            "SELECT count(*) FROM agents WHERE 'fleet-tests' = ANY(features) AND agent_id IN ({})",
            ids.iter()
                .map(|i| format!("'{i}'"))
                .collect::<Vec<_>>()
                .join(",")
        ));
        (n == ids.len() as i64).then_some(())
    });
}

#[test]
fn selected_agents_run_a_pushed_version_and_a_new_version_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let url = target.url();
    let ids = ["b-1", "b-2", "p-1"];
    let _agents: Vec<Agent> = ids
        .iter()
        .map(|id| {
            let site = if id.starts_with('b') {
                "berlin"
            } else {
                "paris"
            };
            agent_at_site(dir.path(), id, site, &collector.endpoint(), "")
        })
        .collect();
    connected(&db, &ids);

    apply(
        &db,
        1,
        &url,
        &[
            T {
                name: "berlin-web",
                select: r#"{"site":"berlin"}"#,
                agents: None,
            },
            T {
                name: "only-p1",
                select: "{}",
                agents: Some(&["p-1"]),
            },
        ],
    );
    wait_for(
        WAIT,
        "version 1 applied and run by the selected agents",
        || {
            let ran = results_of(&db, "b-1", "berlin-web") > 0
                && results_of(&db, "b-2", "berlin-web") > 0
                && results_of(&db, "p-1", "only-p1") > 0;
            let applied = ids.iter().all(|id| fleet_version(&db, id) == Some(1));
            (ran && applied).then_some(())
        },
    );
    assert_eq!(
        results_of(&db, "p-1", "berlin-web"),
        0,
        "paris is not selected"
    );
    assert_eq!(results_of(&db, "b-1", "only-p1"), 0);
    assert_eq!(results_of(&db, "b-2", "only-p1"), 0);
    let metrics = collector.metrics();
    assert_eq!(metric(&metrics, "edgeprobe_fleet_version"), 1.0);

    apply(
        &db,
        2,
        &url,
        &[T {
            name: "everyone",
            select: "{}",
            agents: None,
        }],
    );
    wait_for(WAIT, "version 2 replaces version 1 everywhere", || {
        let ran = ids.iter().all(|id| results_of(&db, id, "everyone") > 0);
        let applied = ids.iter().all(|id| fleet_version(&db, id) == Some(2));
        (ran && applied).then_some(())
    });
    // The tests of version 1 stopped: no new results once in-flight ones landed.
    std::thread::sleep(Duration::from_millis(1500));
    let before = results_of(&db, "b-1", "berlin-web") + results_of(&db, "p-1", "only-p1");
    std::thread::sleep(Duration::from_millis(1500));
    let after = results_of(&db, "b-1", "berlin-web") + results_of(&db, "p-1", "only-p1");
    assert_eq!(before, after, "version 1's tests are no longer run");
    let metrics = collector.metrics();
    assert_eq!(metric(&metrics, "edgeprobe_fleet_version"), 2.0);
    assert_eq!(metric(&metrics, "edgeprobe_fleet_agents_behind"), 0.0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE fleet_error IS NOT NULL"),
        0
    );
}

#[test]
fn run_now_reaches_three_agents_once_and_a_second_request_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let ids = ["r-1", "r-2", "r-3"];
    // A local test that never runs by itself within the test: run-now runs it.
    let local = format!(
        "[[test]]\nname = \"slow\"\nkind = \"http\"\ntarget = \"{}\"\nevery = \"1h\"\n",
        target.url()
    );
    let _agents: Vec<Agent> = ids
        .iter()
        .map(|id| {
            let mut a = Agent::new(dir.path(), id, &collector.endpoint(), &local);
            a.start();
            a
        })
        .collect();
    connected(&db, &ids);
    // An `every` test fires once at agent start: wait for those three scheduled results,
    // or one landing late would count as a scheduled result taken on demand.
    wait_for(WAIT, "the three start-up runs of `slow`", || {
        (db.scalar("SELECT count(*) FROM results WHERE test = 'slow'") == 3).then_some(())
    });
    let before = db.scalar("SELECT count(*) FROM results WHERE test = 'slow'");

    let run = run_now(&db, "slow", &ids);
    wait_for(WAIT, "three on-demand results and the run done", || {
        let done = states(&db, run).iter().all(|(_, s)| s == "done");
        let n = db
            .client()
            .query_one(
                "SELECT count(*) FROM results WHERE run_id = $1 AND on_demand",
                &[&run],
            )
            .unwrap()
            .get::<_, i64>(0);
        (done && n == 3).then_some(())
    });
    assert_eq!(
        db.scalar("SELECT count(DISTINCT agent_id) FROM results WHERE on_demand"),
        3
    );
    // Scheduled results are not on demand.
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE test = 'slow' AND NOT on_demand"),
        before
    );

    let again = run_now(&db, "slow", &ids);
    wait_for(WAIT, "the second run rate-limited on every agent", || {
        states(&db, again)
            .iter()
            .all(|(_, s)| s == "rate_limited")
            .then_some(())
    });
    assert_eq!(
        db.client()
            .query_one("SELECT count(*) FROM results WHERE run_id = $1", &[&again])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    let metrics = collector.metrics();
    assert_eq!(
        metric(
            &metrics,
            "edgeprobe_run_now_requests_total{state=\"rate_limited\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(&metrics, "edgeprobe_run_now_requests_total{state=\"sent\"}"),
        3.0
    );
}

/// The next message of a stream, of a known kind.
async fn next(inbound: &mut tonic::Streaming<pb::CollectorMessage>) -> pb::collector_message::Msg {
    tokio::time::timeout(Duration::from_secs(20), inbound.message())
        .await
        .expect("a reply")
        .expect("the stream stays open")
        .expect("a message")
        .msg
        .expect("a known kind")
}

#[test]
fn an_old_protocol_client_gets_no_controller_message_and_keeps_delivering() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    apply(
        &db,
        1,
        "http://127.0.0.1:9/",
        &[T {
            name: "everyone",
            select: "{}",
            agents: None,
        }],
    );
    wait_for(WAIT, "the collector loaded version 1", || {
        (metric(&collector.metrics(), "edgeprobe_fleet_version") == 1.0).then_some(())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = IngestClient::connect(collector.endpoint()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let hello = pb::Hello {
            agent_id: "old-1".into(),
            version: "0.9.0".into(),
            labels: [("site".to_string(), "lab".to_string())].into(),
            incarnation: "0a0b".into(),
            ..Default::default()
        };
        tx.send(agent_msg(pb::agent_message::Msg::Hello(hello)))
            .await
            .unwrap();
        let mut inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        match next(&mut inbound).await {
            pb::collector_message::Msg::Welcome(w) => assert!(w.features.len() == 2),
            other => panic!("expected the welcome, got {other:?}"),
        }
        let base = now_nanos() - 60_000_000_000;
        let mut seq = 0;
        for version in 2..=3 {
            // The blocking postgres client has its own runtime: off this one's workers.
            let run = tokio::task::block_in_place(|| {
                let everyone = T {
                    name: "everyone",
                    select: "{}",
                    agents: None,
                };
                apply(&db, version, "http://127.0.0.1:9/", &[everyone]);
                run_now(&db, "everyone", &["old-1"])
            });
            // Time for a push and a dispatch to happen, if they wrongly did.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let states = tokio::task::block_in_place(|| states(&db, run));
            assert_eq!(states, [("old-1".to_string(), "refused".to_string())]);
            // A message of a kind this collector does not know is ignored, not fatal.
            tx.send(pb::AgentMessage { msg: None }).await.unwrap();
            seq += 1;
            tx.send(agent_msg(pb::agent_message::Msg::Batch(pb::ResultBatch {
                results: vec![http_result("old-1", seq, base + seq as i64)],
            })))
            .await
            .unwrap();
            match next(&mut inbound).await {
                pb::collector_message::Msg::Ack(a) => assert_eq!(a.seq, seq),
                other => panic!("an old agent got {other:?}"),
            }
        }
    });
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id = 'old-1' AND NOT on_demand"),
        2
    );
    let reason: String = db
        .client()
        .query_one("SELECT reason FROM run_agents LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(reason, "agent too old for run-now");
}

#[test]
fn a_refused_version_is_recorded_with_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let url = target.url();
    // The agent has a local test named like the fleet test: it refuses the version.
    let local = spec("web", &url).replace("100ms", "1h");
    let mut a = Agent::new(dir.path(), "clash-1", &collector.endpoint(), &local);
    a.start();
    connected(&db, &["clash-1"]);
    apply(
        &db,
        1,
        &url,
        &[T {
            name: "web",
            select: "{}",
            agents: None,
        }],
    );
    let error: String = wait_for(WAIT, "the refusal recorded", || {
        db.client()
            .query_one(
                "SELECT fleet_error FROM agents WHERE agent_id = 'clash-1' AND fleet_refused_version = 1",
                &[],
            )
            .ok()
            .and_then(|r| r.get(0))
    });
    assert!(error.contains("web"), "{error}");
    assert_eq!(fleet_version(&db, "clash-1"), None);
    let metrics = collector.metrics();
    assert_eq!(metric(&metrics, "edgeprobe_fleet_refused_total"), 1.0);
    assert_eq!(metric(&metrics, "edgeprobe_fleet_agents_behind"), 1.0);
    assert!(collector
        .proc
        .log_text()
        .contains("the agent refused the fleet tests"));
}

/// Inserts version `version` selecting every agent: `n` mesh tests of about 200 bytes
/// each (5,600 encode to 1.1 MB, as in the field report), straight into the tables, as an
/// older collector or a bug past `tests apply` would, then notifies.
fn insert_mesh(db: &TestDb, version: i64, n: i32) {
    let mut c = db.client();
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "INSERT INTO fleet_versions (version, created_by, origin) VALUES ($1, 'it', 'test')",
        &[&version],
    )
    .unwrap();
    let zone = format!("{}.{}.example.net", "a".repeat(60), "b".repeat(40));
    tx.execute(
        "INSERT INTO fleet_tests (version, name, kind, target, select_labels, agents, spec_toml)
         SELECT $1, name, 'icmp', target, '{}'::jsonb, NULL,
                format(E'[[test]]\\nname = \"%s\"\\nkind = \"icmp\"\\ntarget = \"%s\"\\nevery = \"1m\"\\n', name, target)
           FROM (SELECT format('mesh-%s', lpad(i::text, 4, '0')) AS name,
                        format('mesh-%s.%s', lpad(i::text, 4, '0'), $3::text) AS target
                   FROM generate_series(1, $2) AS i) AS t",
        &[&version, &n, &zone],
    )
    .unwrap();
    tx.execute(&format!("NOTIFY edgeprobe_fleet, '{version}'"), &[])
        .unwrap();
    tx.commit().unwrap();
}

#[test]
fn a_push_too_big_for_the_agent_is_refused_and_its_results_keep_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let url = target.url();
    let mut a = Agent::new(
        dir.path(),
        "mesh-1",
        &collector.endpoint(),
        &http_test(&url, "1s"),
    );
    a.start();
    connected(&db, &["mesh-1"]);
    wait_for(WAIT, "the local test delivering", || {
        (results_of(&db, "mesh-1", "web") > 0).then_some(())
    });

    insert_mesh(&db, 1, 5_600);
    let pushed: i64 =
        db.scalar("SELECT sum(length(spec_toml) + 1) - 1 FROM fleet_tests WHERE version = 1");
    let before = results_of(&db, "mesh-1", "web");
    std::thread::sleep(Duration::from_secs(30));
    let landed = results_of(&db, "mesh-1", "web") - before;
    let log = collector.proc.log_text();
    let sessions = log.matches("agent connected").count();
    let not_sent = log.matches("fleet tests not sent to the agent").count();
    eprintln!(
        "a push of {pushed} bytes: {landed} rows of the local test in 30 s, {sessions} sessions, {not_sent} refusals logged"
    );
    assert!(pushed > 1_000_000, "{pushed}");
    assert!(landed >= 20, "only {landed} rows in 30 s");
    assert_eq!(sessions, 1, "the session never ended");

    // Recorded as refused, with the reason, counted and listed.
    let (refused, error): (Option<i64>, Option<String>) = {
        let r = db
            .client()
            .query_one(
                "SELECT fleet_refused_version, fleet_error FROM agents WHERE agent_id = 'mesh-1'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let error = error.unwrap_or_default();
    assert_eq!(refused, Some(1), "{error}");
    assert!(
        error.starts_with(&format!(
            "not sent by the collector: the fleet tests for this agent are {pushed} bytes, at most 1000000 in one push"
        )),
        "{error}"
    );
    assert_eq!(
        metric(&collector.metrics(), "edgeprobe_fleet_refused_total"),
        1.0
    );
    let (code, out, err) = collector_cmd(&["tests", "list", "--database-url", &db.url]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("0 behind, 1 refused"), "{out}");
    assert!(
        out.contains("refused by mesh-1: not sent by the collector"),
        "{out}"
    );

    // A reconnect is not pushed the refused version again.
    a.stop();
    a.start();
    wait_for(WAIT, "the agent's second session", || {
        (collector.proc.log_text().matches("agent connected").count() == 2).then_some(())
    });
    let delivered = results_of(&db, "mesh-1", "web");
    wait_for(WAIT, "results after the reconnect", || {
        (results_of(&db, "mesh-1", "web") > delivered + 3).then_some(())
    });
    let log = collector.proc.log_text();
    assert_eq!(log.matches("fleet tests not sent to the agent").count(), 1);
    assert_eq!(log.matches("agent connected").count(), 2);
    assert_eq!(
        metric(&collector.metrics(), "edgeprobe_fleet_refused_total"),
        1.0
    );

    // A version that fits reaches it.
    apply(
        &db,
        2,
        &url,
        &[T {
            name: "small",
            select: "{}",
            agents: None,
        }],
    );
    wait_for(WAIT, "version 2 applied and run", || {
        (fleet_version(&db, "mesh-1") == Some(2) && results_of(&db, "mesh-1", "small") > 0)
            .then_some(())
    });
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE fleet_error IS NOT NULL"),
        0
    );
}

/// Simulated agents (raw streams, as many per connection as the collector allows) that
/// answer every FleetTests with TestsApplied and count what they got.
/// `EDGEPROBE_IT_SIM_AGENTS` sets how many (default 600; 10,000 took 0.8 s to push and
/// 1 s to write back on a 2-core machine).
#[test]
fn a_version_reaches_hundreds_of_sessions_within_seconds() {
    let agents: usize = std::env::var("EDGEPROBE_IT_SIM_agents")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
        / 4
        * 4;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        (u64, String),
    >::new()));
    let endpoint = collector.endpoint();
    let welcomed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    rt.block_on(async {
        for chunk in 0..agents / 4 {
            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            for i in 0..4 {
                let n = chunk * 4 + i;
                let id = format!("sim-{n:04}");
                let site = if n.is_multiple_of(2) { "a" } else { "b" };
                let mut client = IngestClient::new(channel.clone());
                let (got, welcomed) = (got.clone(), welcomed.clone());
                tokio::spawn(async move {
                    let (tx, rx) = mpsc::channel(8);
                    let hello = pb::Hello {
                        agent_id: id.clone(),
                        version: "sim".into(),
                        labels: [("site".to_string(), site.to_string())].into(),
                        incarnation: "5151".into(),
                        features: vec!["fleet-tests".into(), "run-now".into()],
                        local_tests: vec![],
                    };
                    tx.send(agent_msg(pb::agent_message::Msg::Hello(hello)))
                        .await
                        .unwrap();
                    let mut inbound = client
                        .stream(ReceiverStream::new(rx))
                        .await
                        .unwrap()
                        .into_inner();
                    while let Ok(Some(m)) = inbound.message().await {
                        match m.msg {
                            Some(pb::collector_message::Msg::Welcome(_)) => {
                                welcomed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Some(pb::collector_message::Msg::FleetTests(f)) => {
                                got.lock()
                                    .unwrap()
                                    .insert(id.clone(), (f.version, f.tests_toml));
                                let applied = pb::TestsApplied {
                                    version: f.version,
                                    error: String::new(),
                                };
                                let _ = tx
                                    .send(agent_msg(pb::agent_message::Msg::TestsApplied(applied)))
                                    .await;
                            }
                            _ => {}
                        }
                    }
                });
            }
        }
    });
    wait_for(WAIT, "every simulated agent welcomed", || {
        (welcomed.load(std::sync::atomic::Ordering::Relaxed) == agents).then_some(())
    });
    let start = std::time::Instant::now();
    apply(
        &db,
        1,
        "http://127.0.0.1:9/",
        &[T {
            name: "only-a",
            select: r#"{"site":"a"}"#,
            agents: None,
        }],
    );
    wait_for(WAIT, "every session got version 1", || {
        let got = got.lock().unwrap();
        (got.len() == agents && got.values().all(|(v, _)| *v == 1)).then_some(())
    });
    let pushed = start.elapsed();
    wait_for(WAIT, "every session's answer written", || {
        (db.scalar("SELECT count(*) FROM agents WHERE fleet_version = 1") == agents as i64)
            .then_some(())
    });
    let written = start.elapsed();
    eprintln!("{agents} sessions: pushed in {pushed:?}, answers written in {written:?}");
    assert!(pushed < Duration::from_secs(5), "{pushed:?}");
    assert!(written < Duration::from_secs(10), "{written:?}");
    {
        let got = got.lock().unwrap();
        for (id, (_, toml)) in got.iter() {
            let n: usize = id[4..].parse().unwrap();
            assert_eq!(toml.contains("only-a"), n.is_multiple_of(2), "{id}: {toml}");
        }
    }
    wait_for(WAIT, "no agent behind", || {
        (metric(&collector.metrics(), "edgeprobe_fleet_agents_behind") == 0.0).then_some(())
    });
    assert!(!collector.proc.log_text().contains("controller: database"));
    drop(rt);
}

#[test]
fn a_run_waits_for_its_agent_to_connect_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let local = spec("slow", &target.url()).replace("100ms", "1h");
    let mut a = Agent::new(dir.path(), "late-1", &collector.endpoint(), &local);
    a.start();
    connected(&db, &["late-1"]);
    assert_eq!(a.stop(), Some(0));
    let run = run_now(&db, "slow", &["late-1"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        states(&db, run),
        [("late-1".to_string(), "pending".to_string())]
    );
    a.start();
    wait_for(WAIT, "the run done once the agent is back", || {
        (states(&db, run) == [("late-1".to_string(), "done".to_string())]).then_some(())
    });
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE on_demand AND agent_id = 'late-1'"),
        1
    );
}

#[test]
fn a_lost_listener_connection_and_a_lost_notification_still_push() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let url = target.url();
    let mut a = agent_at_site(dir.path(), "lost-1", "lab", &collector.endpoint(), "");
    connected(&db, &["lost-1"]);
    wait_for(WAIT, "the controller listening", || {
        collector
            .proc
            .log_text()
            .contains("controller: listening")
            .then_some(())
    });
    // The controller's connection is the one that LISTENs.
    let killed = db.scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND (query LIKE 'LISTEN%' OR query LIKE '%fleet_versions%' OR query LIKE '%run_agents%')",
    );
    assert_eq!(killed, 1);
    // No NOTIFY at all: the poll finds the version.
    let tests = [T {
        name: "found-by-poll",
        select: "{}",
        agents: None,
    }];
    insert_version(&db, 1, &url, &tests, false);
    wait_for(WAIT, "the version applied without a notification", || {
        (fleet_version(&db, "lost-1") == Some(1) && results_of(&db, "lost-1", "found-by-poll") > 0)
            .then_some(())
    });
    let log = collector.proc.log_text();
    assert!(
        log.contains("controller: database connection lost, reconnecting"),
        "{log}"
    );
    // A notification lost on a healthy connection: the next poll (5 s) finds the version.
    let tests = [T {
        name: "found-by-poll-2",
        select: "{}",
        agents: None,
    }];
    insert_version(&db, 2, &url, &tests, false);
    let start = std::time::Instant::now();
    wait_for(WAIT, "version 2 applied without a notification", || {
        (fleet_version(&db, "lost-1") == Some(2)).then_some(())
    });
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(a.stop(), Some(0));
}

/// The same agent id with a live session on each of two collectors (a half-dead session
/// left behind on the first): a run is claimed by one collector and sent once.
#[test]
fn two_collectors_never_both_send_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let db = TestDb::new();
    let a = Collector::start(&dir_a, &db);
    let b = Collector::start(&dir_b, &db);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    rt.block_on(async {
        for endpoint in [a.endpoint(), b.endpoint()] {
            let mut client = IngestClient::connect(endpoint).await.unwrap();
            let (tx, rx) = mpsc::channel(8);
            let hello = pb::Hello {
                agent_id: "twice-1".into(),
                version: "sim".into(),
                incarnation: "7777".into(),
                features: vec!["fleet-tests".into(), "run-now".into()],
                ..Default::default()
            };
            tx.send(agent_msg(pb::agent_message::Msg::Hello(hello)))
                .await
                .unwrap();
            let mut inbound = client
                .stream(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            assert!(matches!(
                next(&mut inbound).await,
                pb::collector_message::Msg::Welcome(_)
            ));
            let runs = runs.clone();
            tokio::spawn(async move {
                let _tx = tx;
                while let Ok(Some(m)) = inbound.message().await {
                    if let Some(pb::collector_message::Msg::RunNow(_)) = m.msg {
                        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let run = run_now(&db, "anything", &["twice-1"]);
    wait_for(WAIT, "the run sent", || {
        (states(&db, run) == [("twice-1".to_string(), "sent".to_string())]).then_some(())
    });
    // Both collectors heard the notification; give the loser time to (wrongly) send.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let sent = |c: &Collector| {
        metric(
            &c.metrics(),
            "edgeprobe_run_now_requests_total{state=\"sent\"}",
        )
    };
    assert_eq!(sent(&a) + sent(&b), 1.0);
    drop(rt);
}

#[test]
fn an_agent_refuses_more_tests_than_it_may_run_once_and_keeps_delivering() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let mut a = Agent::new(
        dir.path(),
        "many-1",
        &collector.endpoint(),
        &http_test(&target.url(), "1s"),
    );
    a.start();
    connected(&db, &["many-1"]);
    // 4,100 small tests: under the push's byte bound, so the collector sends them; over
    // the tests one agent may run, so the agent refuses them.
    insert_mesh(&db, 1, 4_100);
    let error: String = wait_for(WAIT, "the agent's refusal recorded", || {
        db.client()
            .query_one(
                "SELECT fleet_error FROM agents WHERE agent_id = 'many-1' AND fleet_refused_version = 1",
                &[],
            )
            .ok()
            .and_then(|r| r.get(0))
    });
    assert_eq!(
        error,
        "4100 fleet tests beside 1 local tests, at most 4096 tests on one agent"
    );
    let delivered = results_of(&db, "many-1", "web");
    wait_for(WAIT, "the local test still delivering", || {
        (results_of(&db, "many-1", "web") >= delivered + 5).then_some(())
    });
    assert_eq!(results_of(&db, "many-1", "mesh-0001"), 0);
    // A reconnect is not pushed the refused version again.
    a.stop();
    a.start();
    wait_for(WAIT, "the agent's second session", || {
        (collector.proc.log_text().matches("agent connected").count() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let log = collector.proc.log_text();
    assert_eq!(
        log.matches("the agent refused the fleet tests").count(),
        1,
        "{log}"
    );
    assert_eq!(
        metric(&collector.metrics(), "edgeprobe_fleet_refused_total"),
        1.0
    );
}
