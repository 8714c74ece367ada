//! The operator's view (issue 25): what `tests list`, `agents`, `results` and `run-now`
//! tell an operator about a real fleet (real collector, real agents, real PostgreSQL, the
//! API over mTLS), and that they reach the data the documented ways.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::api::{curl, operator, site_agent, ApiCollector};
use crate::support::*;

/// A fleet test for every agent, hourly (it matters that it is pushed, not that it runs).
const FLEET: &str =
    "[[test]]\nname = \"web\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:9\"\nevery = \"1h\"\n";

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

/// `edgeprobe-agent buffer --config CONFIG`'s output.
fn agent_buffer(agent: &Agent) -> String {
    let out = Command::new(agent_bin())
        .arg("buffer")
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 25, item 1: an agent that refuses the fleet set at its restart (a local test of
/// the same name) is shown refusing, with its reason, by `tests list` and the API, and
/// its own `buffer` does not claim the refused version runs. An agent unheard of for
/// longer than the stale threshold is stale, not behind.
#[test]
fn tests_list_names_the_refusing_behind_and_stale_agents_and_the_agent_never_claims_a_refused_set()
{
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    let _b1 = site_agent(dir.path(), &pki, "b1", "berlin", &c);
    let mut b2 = site_agent(dir.path(), &pki, "b2", "berlin", &c);
    wait_for(Duration::from_secs(30), "both agents known", || {
        (db.scalar("SELECT count(*) FROM agents WHERE 'fleet-tests' = ANY(features)") == 2)
            .then_some(())
    });
    let file = write(dir.path(), "fleet.toml", FLEET);
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &file]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_for(
        Duration::from_secs(20),
        "both agents to apply version 1",
        || (db.scalar("SELECT count(*) FROM agents WHERE fleet_version = 1") == 2).then_some(()),
    );
    assert!(agent_buffer(&b2).contains("fleet tests   version 1"));

    // b2 gets a local test named like the fleet test and restarts: it refuses version 1.
    b2.stop();
    let text = std::fs::read_to_string(&b2.config).unwrap();
    std::fs::write(
        &b2.config,
        format!("{text}\n{}", FLEET.replace("9\"", "7\"")),
    )
    .unwrap();
    b2.start();
    wait_for(Duration::from_secs(30), "b2 to refuse version 1", || {
        (db.scalar(
            "SELECT count(*) FROM agents WHERE agent_id = 'b2' AND fleet_refused_version = 1",
        ) == 1)
            .then_some(())
    });
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'b2' AND fleet_version IS NULL"),
        1,
        "b2 does not run version 1 any more"
    );

    let (code, out, err) = cli(&db, &["tests", "list"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(
            "agents: 2 known, 1 applied, 0 behind, 1 refused, 0 too old for fleet tests, 0 stale"
        ),
        "{out}"
    );
    assert!(
        out.contains("refused by b2 (runs no fleet tests): "),
        "{out}"
    );
    assert!(out.contains("own config file"), "the agent's reason: {out}");

    let l = curl(&c, Some(&alice), "GET", "/api/v1/tests", None).json();
    assert_eq!(l["applied"], 1, "{l}");
    assert_eq!(l["refused"][0]["agent_id"], "b2", "{l}");
    assert_eq!(
        l["refused"][0]["running_version"],
        serde_json::Value::Null,
        "{l}"
    );

    // The running agent's own view: no refused set claimed.
    let shown = agent_buffer(&b2);
    assert!(
        shown.contains("fleet tests   none running: version 1 refused at start"),
        "{shown}"
    );
    assert!(!shown.contains("fleet tests   version 1"), "{shown}");

    // An agent that has never answered is behind, by name; one gone for two days is stale.
    db.client()
        .batch_execute(
            "INSERT INTO agents (agent_id, labels, features, last_seen) VALUES
               ('quiet', '{\"site\":\"berlin\"}', '{fleet-tests,run-now}', now() - interval '10 seconds'),
               ('gone', '{\"site\":\"paris\"}', '{fleet-tests,run-now}', now() - interval '2 days')",
        )
        .unwrap();
    let (code, out, err) = cli(&db, &["tests", "list"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(
            "agents: 4 known, 1 applied, 1 behind, 1 refused, 0 too old for fleet tests, 1 stale"
        ),
        "{out}"
    );
    assert!(
        out.contains("behind: quiet (no version yet, seen "),
        "{out}"
    );
    assert!(
        out.contains("stale (not seen for over 1day; `agents retire ID`"),
        "{out}"
    );
    assert!(out.contains("): gone"), "{out}");
    // The threshold is the operator's: with three days, `gone` is merely behind.
    let (_, out, _) = cli(&db, &["tests", "list", "--stale-after", "3d", "--json"]);
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["behind"], 2, "{l}");
    assert_eq!(l["stale"], serde_json::json!([]), "{l}");
    let l = curl(&c, Some(&alice), "GET", "/api/v1/tests", None).json();
    assert_eq!(l["stale"], serde_json::json!(["gone"]), "{l}");
    assert_eq!(l["behind_agents"][0]["agent_id"], "quiet", "{l}");
    drop(c);
}
