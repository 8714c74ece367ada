//! The controller end to end, as an operator drives it: `tests apply`, `tests list`,
//! `tests rollback` and `run-now` (the real CLI) against a real collector, real agents and
//! a real PostgreSQL.

use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

fn cli(db: &TestDb, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--database-url", &db.url]);
    collector_cmd(&all)
}

fn versions_applied(db: &TestDb) -> Vec<(String, Option<i64>)> {
    db.client()
        .query(
            "SELECT agent_id, fleet_version FROM agents ORDER BY agent_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn wait_applied(db: &TestDb, ids: &[&str], version: i64) {
    wait_for(
        WAIT,
        &format!("every agent to apply version {version}"),
        || {
            let applied = versions_applied(db);
            ids.iter()
                .all(|id| applied.iter().any(|(a, v)| a == id && *v == Some(version)))
                .then_some(())
        },
    );
}

#[test]
fn fleet_tests_reach_the_selected_agents_only_and_survive_a_restart_without_the_collector() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let mut collector = Collector::start(dir.path(), &db);
    let target = HttpTarget::start("ok");
    let endpoint = collector.endpoint();
    let mut b1 = agent_at_site(dir.path(), "berlin-1", "berlin", &endpoint, "");
    let _b2 = agent_at_site(dir.path(), "berlin-2", "berlin", &endpoint, "");
    // paris-1 has a test of its own named `web`.
    let _p1 = agent_at_site(
        dir.path(),
        "paris-1",
        "paris",
        &endpoint,
        &http_test(&target.url(), "1h"),
    );
    let all = ["berlin-1", "berlin-2", "paris-1"];
    wait_for(WAIT, "three agents with their features", || {
        (db.scalar("SELECT count(*) FROM agents WHERE 'fleet-tests' = ANY(features)") == 3)
            .then_some(())
    });

    // Version 1: a tcp test for Berlin.
    let v1 = dir.path().join("fleet-v1.toml");
    std::fs::write(
        &v1,
        format!(
            "# Berlin's link\n[[test]]\nname = \"berlin-tcp\"\nkind = \"tcp\"\ntarget = \"{}\"\nevery = \"200ms\"\nselect = {{ site = \"berlin\" }}\n",
            collector.http
        ),
    )
    .unwrap();
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", v1.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("version 1"), "{out}");
    let applied_at = Instant::now();
    wait_for(WAIT, "berlin-tcp results from both Berlin agents", || {
        (results_of(&db, "berlin-1", "berlin-tcp") >= 3
            && results_of(&db, "berlin-2", "berlin-tcp") >= 3)
            .then_some(())
    });
    wait_applied(&db, &all, 1);
    eprintln!(
        "version 1 ran on both Berlin agents and was reported by all three after {:?}",
        applied_at.elapsed()
    );
    assert_eq!(
        results_of(&db, "paris-1", "berlin-tcp"),
        0,
        "Paris is not selected"
    );
    let (code, out, err) = cli(&db, &["tests", "list"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("berlin-tcp") && out.contains("version 1"),
        "{out}"
    );

    // A bad file and a name clash change nothing.
    let bad = dir.path().join("fleet-bad.toml");
    std::fs::write(
        &bad,
        "[[test]]\nname = \"x\"\nkind = \"tcp\"\ntarget = \"no-port\"\nevery = \"1s\"\n",
    )
    .unwrap();
    let (code, _, err) = cli(&db, &["tests", "apply", "--file", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{}:4:10:", bad.display())), "{err}");
    // A schedule that can never fire (issue 28 case 6) is refused at its place.
    std::fs::write(
        &bad,
        "[[test]]\nname = \"x\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:1\"\nschedule = \"0 0 0 30 2 *\"\n",
    )
    .unwrap();
    let (code, _, err) = cli(&db, &["tests", "apply", "--file", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}:5:12: test `x`: schedule `0 0 0 30 2 *` can never fire",
            bad.display()
        )),
        "{err}"
    );
    let clash = dir.path().join("fleet-clash.toml");
    std::fs::write(
        &clash,
        format!(
            "[[test]]\nname = \"web\"\nkind = \"tcp\"\ntarget = \"{}\"\nevery = \"1s\"\n",
            collector.http
        ),
    )
    .unwrap();
    let (code, _, err) = cli(&db, &["tests", "apply", "--file", clash.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("paris-1"), "the clash names the agent: {err}");
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);
    // A typo in an agent id is warned about (the dry run stores nothing).
    let typo = dir.path().join("fleet-typo.toml");
    std::fs::write(
        &typo,
        format!("[[test]]\nname = \"t\"\nkind = \"tcp\"\ntarget = \"{}\"\nevery = \"1s\"\nagents = [\"berlin-l\"]\n", collector.http),
    )
    .unwrap();
    let (code, _, err) = cli(
        &db,
        &[
            "tests",
            "apply",
            "--dry-run",
            "--file",
            typo.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: ") && err.contains("test `t` selects none of the 3 known agents"),
        "{err}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);
    // Applied for real, the typo is refused (issue 25): nothing changes.
    let (code, _, err) = cli(&db, &["tests", "apply", "--file", typo.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("names agents no collector has seen: berlin-l"),
        "{err}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);

    // Version 2 adds a test for Paris; a rollback to 1 takes it away again.
    let v2 = dir.path().join("fleet-v2.toml");
    let v1_text = std::fs::read_to_string(&v1).unwrap();
    std::fs::write(
        &v2,
        format!(
            "{v1_text}\n[[test]]\nname = \"paris-web\"\nkind = \"http\"\ntarget = \"{}\"\nevery = \"200ms\"\nselect = {{ site = \"paris\" }}\n",
            target.url()
        ),
    )
    .unwrap();
    let (code, out, err) = cli(
        &db,
        &[
            "tests",
            "apply",
            "--file",
            v2.to_str().unwrap(),
            "--by",
            "alice (via ansible)",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let by: String = db
        .client()
        .query_one(
            "SELECT created_by FROM fleet_versions WHERE version = 2",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(by, "alice (via ansible)");
    wait_for(WAIT, "paris-web results", || {
        (results_of(&db, "paris-1", "paris-web") >= 3).then_some(())
    });
    wait_applied(&db, &all, 2);
    let (code, out, err) = cli(&db, &["tests", "rollback", "1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_applied(&db, &all, 3);
    let persisted =
        std::fs::read_to_string(dir.path().join("paris-1-state/fleet-tests.toml")).unwrap();
    assert!(
        persisted.contains("version 3") && !persisted.contains("paris-web"),
        "{persisted}"
    );

    // berlin-1 restarted while the collector is down keeps running its fleet test.
    collector.proc.stop();
    b1.stop();
    let restarted = now_nanos();
    b1.start();
    std::thread::sleep(Duration::from_secs(2));
    collector.restart(dir.path());
    wait_for(WAIT, "results taken while the collector was down", || {
        let n: i64 = db
            .client()
            .query_one(
                "SELECT count(*) FROM results WHERE agent_id = 'berlin-1' AND test = 'berlin-tcp'
                 AND started_at >= to_timestamp($1::float8 / 1e9)",
                &[&(restarted as f64)],
            )
            .unwrap()
            .get(0);
        (n >= 5).then_some(())
    });
    let log = b1.proc.as_ref().unwrap().log_text();
    assert!(log.contains("fleet tests applied"), "{log}");
}

#[test]
fn run_now_on_three_agents_prints_three_on_demand_results() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let endpoint = collector.endpoint();
    let _agents: Vec<Agent> = ["lab-1", "lab-2", "lab-3"]
        .iter()
        .map(|id| agent_at_site(dir.path(), id, "lab", &endpoint, ""))
        .collect();
    let _other = agent_at_site(dir.path(), "elsewhere-1", "elsewhere", &endpoint, "");
    wait_for(WAIT, "four agents with their features", || {
        (db.scalar("SELECT count(*) FROM agents WHERE 'run-now' = ANY(features)") == 4)
            .then_some(())
    });
    let target = collector.http.to_string();
    let started = Instant::now();
    let (code, out, err) = cli(
        &db,
        &[
            "run-now", "--select", "site=lab", "--kind", "tcp", "--target", &target,
        ],
    );
    eprintln!("run-now took {:?}:\n{out}{err}", started.elapsed());
    assert_eq!(code, Some(0), "{out}{err}");
    for id in ["lab-1", "lab-2", "lab-3"] {
        assert!(
            out.lines().any(|l| l.starts_with(id) && l.contains(" ok ")),
            "a row for {id}: {out}"
        );
    }
    assert!(out.contains("3 of 3 agents returned a result"), "{out}");
    assert!(!out.contains("elsewhere-1"), "{out}");
    let row = db
        .client()
        .query_one(
            "SELECT count(*), count(DISTINCT agent_id), bool_and(on_demand), count(DISTINCT run_id)
             FROM results WHERE run_id IS NOT NULL",
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, bool>(2),
            row.get::<_, i64>(3)
        ),
        (3, 3, true, 1)
    );

    // At once again: the per-agent rate limit refuses it, and says so.
    let (code, out, err) = cli(
        &db,
        &[
            "run-now", "--agent", "lab-1", "--kind", "tcp", "--target", &target, "--json",
        ],
    );
    assert_ne!(code, Some(0), "{out}{err}");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let refused = json["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{json}");
    assert!(
        refused[0]["reason"].as_str().unwrap().contains("rate"),
        "{json}"
    );
    // And says when a retry is admitted: within the limit (10 s) of now.
    let reason = refused[0]["reason"].as_str().unwrap();
    let at = reason
        .split("retry after ")
        .nth(1)
        .unwrap_or_else(|| panic!("no retry time: {reason}"));
    let in_seconds: f64 = db
        .client()
        .query_one(
            "SELECT extract(epoch FROM $1::text::timestamptz - now())::float8",
            &[&at],
        )
        .unwrap()
        .get(0);
    assert!(
        (0.0..=11.0).contains(&in_seconds),
        "{reason}: in {in_seconds} s"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE run_id IS NOT NULL"),
        3
    );
}

#[test]
fn a_closed_stdout_pipe_ends_the_command_quietly() {
    let db = TestDb::new();
    migrate(&db);
    // `edgeprobe-collector tests versions --json | head -c 0`: the reader is gone before
    // the first write.
    let mut child = std::process::Command::new(collector_bin())
        .args(["tests", "versions", "--json", "--database-url", &db.url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
