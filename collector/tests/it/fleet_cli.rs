//! The operator commands `tests apply|diff|list|versions|rollback` and `run-now` with the
//! real binary on a real PostgreSQL (agents are rows here; run-now with live agents is in
//! the end-to-end controller tests).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;

const FLEET: &str = r#"# the fleet's tests
[[test]]
name = "web"
kind = "http"
target = "https://example.net/"
every = "30s"
select = { site = "berlin" }

[[test]]
name = "resolver"
kind = "dns"
target = "example.net"
schedule = "0 */5 * * * *"
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `edgeprobe-collector ARGS... --database-url URL`.
fn cli(db: &TestDb, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = args.to_vec();
    all.extend(["--database-url", &db.url]);
    collector_cmd(&all)
}

/// A database at the current schema with three agents: b1 and b2 in Berlin (b2 has a
/// local test `ping`), p1 in Paris with a local test `web`.
fn fleet_db() -> TestDb {
    let db = TestDb::new();
    migrate(&db);
    db.client()
        .batch_execute(
            r#"INSERT INTO agents (agent_id, labels, features, local_tests) VALUES
               ('b1', '{"site":"berlin"}', '{fleet-tests,run-now}', '{}'),
               ('b2', '{"site":"berlin","role":"edge"}', '{fleet-tests,run-now}', '{ping}'),
               ('p1', '{"site":"paris"}', '{fleet-tests,run-now}', '{web}')"#,
        )
        .unwrap();
    db
}

#[test]
fn apply_list_diff_and_an_identical_apply_makes_no_version() {
    let dir = tempfile::tempdir().unwrap();
    let db = fleet_db();
    let file = write(dir.path(), "fleet.toml", FLEET);

    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &file]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("version 1 applied: +2 ~0 -0 tests; selects 3 of 3 known agents"),
        "{out}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);
    assert_eq!(
        db.scalar("SELECT count(*) FROM fleet_tests WHERE version = 1"),
        2
    );
    let row = db
        .client()
        .query_one(
            "SELECT origin, source, created_by <> '' FROM fleet_versions WHERE version = 1",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), file);
    assert_eq!(row.get::<_, String>(1), FLEET);
    assert!(row.get::<_, bool>(2));
    let spec: String = db
        .client()
        .query_one(
            "SELECT spec_toml FROM fleet_tests WHERE name = 'web' AND select_labels = '{\"site\":\"berlin\"}'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!spec.contains("select"), "{spec}");

    // The same set again: no new version.
    let (code, out, _) = cli(&db, &["tests", "apply", "--file", &file]);
    assert_eq!(code, Some(0));
    assert!(out.contains("no change, version 1 stays"), "{out}");
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);

    let (code, out, err) = cli(&db, &["tests", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("version 1 by "), "{out}");
    let web = out.lines().find(|l| l.starts_with("web ")).unwrap();
    assert!(
        web.contains("every 30s") && web.contains("site=berlin") && web.ends_with(" 2"),
        "{out}"
    );
    let resolver = out.lines().find(|l| l.starts_with("resolver ")).unwrap();
    assert!(
        resolver.contains("all agents") && resolver.ends_with(" 3"),
        "{out}"
    );
    assert!(
        out.contains("agents: 3 known, 0 applied, 3 behind, 0 refused"),
        "{out}"
    );

    // One agent applied, one refused: list --json says so.
    db.client()
        .batch_execute(
            "UPDATE agents SET fleet_version = 1 WHERE agent_id = 'b1';
             UPDATE agents SET fleet_refused_version = 1, fleet_error = 'too many labels'
              WHERE agent_id = 'b2'",
        )
        .unwrap();
    let (code, out, _) = cli(&db, &["tests", "list", "--json"]);
    assert_eq!(code, Some(0));
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["current"]["version"], 1);
    assert_eq!(l["applied"], 1);
    assert_eq!(l["behind"], 1);
    assert_eq!(l["refused"][0]["agent_id"], "b2");
    assert_eq!(l["refused"][0]["error"], "too many labels");
    assert_eq!(l["tests"].as_array().unwrap().len(), 2);

    // diff: web changed, resolver removed, edge added; nothing stored.
    let changed = FLEET.replace("every = \"30s\"", "every = \"60s\"");
    let changed = changed[..changed.find("[[test]]\nname = \"resolver\"").unwrap()].to_string()
        + "[[test]]\nname = \"edge\"\nkind = \"tcp\"\ntarget = \"example.net:443\"\nevery = \"1m\"\nagents = [\"b2\"]\n";
    let file2 = write(dir.path(), "fleet2.toml", &changed);
    let (code, out, err) = cli(&db, &["tests", "diff", "--file", &file2]);
    assert_eq!(code, Some(0), "{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .unwrap_or_else(|| panic!("{name} in {out}"))
            .to_string()
    };
    assert!(
        line("web").starts_with("~ changed") && line("web").ends_with(" 2"),
        "{out}"
    );
    assert!(line("resolver").starts_with("- removed"), "{out}");
    assert!(
        line("edge").starts_with("+ added") && line("edge").ends_with(" 1"),
        "{out}"
    );
    assert!(
        out.contains("against version 1: +1 ~1 -1 tests (0 unchanged)"),
        "{out}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);

    let (code, out, _) = cli(&db, &["tests", "apply", "--file", &file2]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("version 2 applied: +1 ~1 -1 tests; selects 2 of 3 known agents"),
        "{out}"
    );
    let (code, out, _) = cli(&db, &["tests", "versions"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("2 "), "{out}");
}

#[test]
fn a_bad_file_exits_2_located_and_a_dry_run_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = fleet_db();
    let bad = write(
        dir.path(),
        "bad.toml",
        &FLEET.replace("every = \"30s\"", "every = \"30 parsecs\""),
    );
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &bad]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.starts_with(&format!("{bad}:6:9: invalid duration")),
        "{err}"
    );
    let both = write(
        dir.path(),
        "both.toml",
        &FLEET.replace(
            "select = { site = \"berlin\" }",
            "select = { site = \"berlin\" }\nagents = [\"b1\"]",
        ),
    );
    let (code, _, err) = cli(&db, &["tests", "diff", "--file", &both]);
    assert_eq!(code, Some(2));
    assert!(err.starts_with(&format!("{both}:8:10: ")), "{err}");
    assert!(err.contains("both `select` and `agents`"), "{err}");

    let good = write(dir.path(), "fleet.toml", FLEET);
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &good, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("dry run: would make version 1: +2 ~0 -0 tests"),
        "{out}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_tests"), 0);
}

#[test]
fn a_name_clash_with_a_local_test_of_a_selected_agent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = fleet_db();
    // `web` selects Berlin: p1's local `web` is no clash.
    let ok = write(dir.path(), "ok.toml", FLEET);
    assert_eq!(cli(&db, &["tests", "apply", "--file", &ok]).0, Some(0));
    // To Paris, it is: refused at the test's name, nothing stored.
    let clash = write(
        dir.path(),
        "clash.toml",
        &FLEET.replace("\"berlin\"", "\"paris\""),
    );
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &clash]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.starts_with(&format!("{clash}:3:8: fleet test `web`")),
        "{err}"
    );
    assert!(err.contains("agent p1"), "{err}");
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);
    // Selected by id too.
    let by_id = write(
        dir.path(),
        "byid.toml",
        "[[test]]\nname = \"ping\"\nkind = \"icmp\"\ntarget = \"192.0.2.1\"\nevery = \"1m\"\nagents = [\"b1\", \"b2\"]\n",
    );
    let (code, _, err) = cli(&db, &["tests", "apply", "--file", &by_id]);
    assert_eq!(code, Some(2));
    assert!(err.contains("local test of agent b2"), "{err}");
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);
}

#[test]
fn rollback_makes_a_new_version_with_the_old_tests() {
    let dir = tempfile::tempdir().unwrap();
    let db = fleet_db();
    let v1 = write(dir.path(), "v1.toml", FLEET);
    let v2 = write(
        dir.path(),
        "v2.toml",
        &FLEET.replace("example.net/", "example.org/"),
    );
    assert_eq!(cli(&db, &["tests", "apply", "--file", &v1]).0, Some(0));
    assert_eq!(cli(&db, &["tests", "apply", "--file", &v2]).0, Some(0));
    let (code, out, err) = cli(&db, &["tests", "rollback", "1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("version 3 applied (the tests of version 1): +0 ~1 -0"),
        "{out}"
    );
    let row = db
        .client()
        .query_one(
            "SELECT origin, rolled_back_to FROM fleet_versions WHERE version = 3",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "rollback");
    assert_eq!(row.get::<_, Option<i64>>(1), Some(1));
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM fleet_tests a JOIN fleet_tests b USING (name, kind, target, select_labels, spec_toml)
              WHERE a.version = 1 AND b.version = 3"
        ),
        2
    );
    let (code, _, err) = cli(&db, &["tests", "rollback", "7"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no fleet version 7"), "{err}");
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 3);
}

#[test]
fn a_schema_older_than_the_controller_is_refused_clearly() {
    let db = TestDb::new();
    let (code, _, err) = cli(&db, &["tests", "list"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("run `edgeprobe-collector migrate`"), "{err}");
}

#[test]
fn run_now_reports_offline_agents_and_exits() {
    let db = fleet_db();
    let start = Instant::now();
    let (code, out, err) = cli(
        &db,
        &[
            "run-now",
            "--select",
            "site=berlin",
            "--kind",
            "icmp",
            "--target",
            "192.0.2.1",
            "--option",
            "count=2",
            "--json",
        ],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "waited for the timeout"
    );
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["offline"], serde_json::json!(["b1", "b2"]));
    assert_eq!(doc["results"], serde_json::json!([]));
    let run_id = doc["run_id"].as_i64().unwrap();
    let row = db
        .client()
        .query_one(
            "SELECT test, kind, target, spec_toml, created_by FROM runs WHERE run_id = $1",
            &[&run_id],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "run-now");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("icmp"));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("192.0.2.1")
    );
    assert!(row.get::<_, String>(3).contains("count = 2"));
    assert!(!row.get::<_, String>(4).is_empty());
    assert_eq!(
        db.scalar("SELECT count(*) FROM run_agents WHERE state = 'pending'"),
        2
    );

    // By id, a named test that only p1 has locally; an unknown id is reported.
    let (code, out, err) = cli(
        &db,
        &[
            "run-now",
            "--agent",
            "p1",
            "--agent",
            "ghost",
            "--test",
            "web",
            "--timeout",
            "10s",
        ],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("not asked): ghost"), "{err}");
    assert!(out.contains("offline (no session within 5s): p1"), "{out}");
    assert!(out.contains("0 of 1 agents returned a result"), "{out}");

    // Bad requests: exit 2, no run.
    let runs = db.scalar("SELECT count(*) FROM runs");
    for args in [
        &["run-now", "--agent", "b1", "--test", "nope"][..],
        &[
            "run-now",
            "--agent",
            "b1",
            "--kind",
            "icmp",
            "--target",
            "192.0.2.1",
            "--option",
            "streams=4",
        ],
        &[
            "run-now",
            "--select",
            "site=mars",
            "--kind",
            "tcp",
            "--target",
            "example.net:443",
        ],
    ] {
        let (code, _, err) = cli(&db, args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
    assert_eq!(db.scalar("SELECT count(*) FROM runs"), runs);
}

/// `n` mesh tests selecting Berlin, each block about 200 bytes (as in the field report:
/// 5,600 of them encode to 1.1 MB for one agent).
fn mesh(n: usize) -> String {
    let zone = format!("{}.{}.example.net", "a".repeat(60), "b".repeat(40));
    (1..=n)
        .map(|i| {
            format!(
                "[[test]]\nname = \"mesh-{i:04}\"\nkind = \"icmp\"\ntarget = \"mesh-{i:04}.{zone}\"\nevery = \"1m\"\nselect = {{ site = \"berlin\" }}\n\n"
            )
        })
        .collect()
}

#[test]
fn a_version_over_what_one_push_may_carry_is_refused_located_and_nothing_applied() {
    let dir = tempfile::tempdir().unwrap();
    let db = fleet_db();
    let text = mesh(5_600);
    let file = write(dir.path(), "mesh.toml", &text);
    for args in [
        &["tests", "apply", "--file", &file][..],
        &["tests", "apply", "--file", &file, "--dry-run"],
        &["tests", "diff", "--file", &file],
    ] {
        let (code, out, err) = cli(&db, args);
        eprintln!("{args:?}: exit {code:?}: {err}");
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        // Located at the test where the push passes the bound, naming agent, size, limit.
        let rest = err.strip_prefix(&format!("{file}:")).expect(&err);
        let (line, rest) = rest.split_once(':').unwrap();
        let name = rest.split('`').nth(1).unwrap();
        let line: usize = line.parse().unwrap();
        assert_eq!(
            text.lines().nth(line - 1),
            Some(format!("name = \"{name}\"").as_str()),
            "{err}"
        );
        assert!(
            err.contains("the fleet tests selecting agent b")
                && err.contains(" bytes (5600 tests), over the 1000000 bytes one push may carry")
                && err.contains("(1 more known agent is over it too)"),
            "{err}"
        );
        let bytes: usize = err
            .split(" bytes (5600 tests)")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .expect(&err);
        assert!(bytes > 1_000_000, "{err}");
    }
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_tests"), 0);

    // Half of it fits: applied.
    let half = write(dir.path(), "half.toml", &mesh(2_800));
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &half]);
    assert_eq!(code, Some(0), "{out}{err}");

    // More tests than one agent may run (small blocks, under the byte bound): refused too.
    let many: String = (1..=4_100)
        .map(|i| {
            format!("[[test]]\nname = \"t{i}\"\nkind = \"tcp\"\ntarget = \"h:1\"\nevery = \"1m\"\n")
        })
        .collect();
    let many = write(dir.path(), "many.toml", &many);
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &many]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("would run 4100 fleet tests beside its")
            && err.contains("over the 4096 tests one agent may run"),
        "{err}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 1);

    // A stored version over the bound (made past apply, by an older collector): a
    // rollback to it is refused the same way.
    db.client()
        .batch_execute(
            "INSERT INTO fleet_versions (version, created_by, origin) VALUES (2, 'it', 'old');
             INSERT INTO fleet_tests (version, name, kind, target, select_labels, agents, spec_toml)
             VALUES (2, 'huge', 'tcp', 'h:1', '{}', NULL, repeat('#', 1100000));",
        )
        .unwrap();
    let (code, out, err) = cli(&db, &["tests", "rollback", "2"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.starts_with("fleet version 2, test `huge`: the fleet tests selecting agent b1 are 1100000 bytes (1 test), over the 1000000 bytes"),
        "{err}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 2);
}
