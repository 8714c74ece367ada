//! Protocol compatibility between adjacent versions (issue 15): the previous release's
//! agent with this collector, and this agent with the previous release's collector, keep
//! delivering every result exactly once, and the controller's messages never reach a peer
//! that did not list the feature.
//!
//! The previous release is built by `scripts/test-compat.sh` (from the git history) and
//! handed over in EDGEPROBE_OLD_AGENT and EDGEPROBE_OLD_COLLECTOR; these tests are ignored
//! otherwise, and fail when run without those binaries.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn old_binary(var: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run scripts/test-compat.sh"));
    assert!(path.exists(), "{var}={} does not exist", path.display());
    path
}

/// A fleet tests file selecting every agent, applied with this collector's CLI.
fn apply_fleet(dir: &std::path::Path, db: &TestDb, target: &str, every: &str) {
    let file = dir.join(format!("fleet-{every}.toml"));
    std::fs::write(
        &file,
        format!("[[test]]\nname = \"fleet-web\"\nkind = \"http\"\ntarget = \"{target}\"\nevery = \"{every}\"\n"),
    )
    .unwrap();
    let (code, out, err) = collector_cmd(&[
        "tests",
        "apply",
        "--file",
        file.to_str().unwrap(),
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "tests apply: {out}{err}");
}

#[test]
#[ignore = "needs the previous release's binaries: scripts/test-compat.sh"]
fn compat_an_old_agent_keeps_delivering_to_a_new_collector() {
    let old_agent = old_binary("EDGEPROBE_OLD_AGENT");
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let target = HttpTarget::start("ok");
    let collector = Collector::start(dir.path(), &db);
    // A fleet version exists before the old agent connects, and another is applied while
    // it is connected: neither may reach it.
    apply_fleet(dir.path(), &db, &target.url(), "100ms");
    let mut agent = Agent::new(
        dir.path(),
        "old-agent",
        &collector.endpoint(),
        &http_test(&target.url(), "100ms"),
    );
    let mut cmd = Command::new(&old_agent);
    cmd.arg("run").arg("--config").arg(&agent.config);
    agent.proc = Some(Proc::spawn(cmd, agent.config.with_extension("log")));
    wait_for(Duration::from_secs(30), "the old agent's results", || {
        (results_of(&db, "old-agent", "web") >= 10).then_some(())
    });
    apply_fleet(dir.path(), &db, &target.url(), "200ms");
    let before = results_of(&db, "old-agent", "web");
    wait_for(
        Duration::from_secs(30),
        "more results after the apply",
        || (results_of(&db, "old-agent", "web") >= before + 20).then_some(()),
    );
    let log = agent.proc.as_ref().unwrap().log_text();
    assert_eq!(
        log.matches("connected to collector").count(),
        1,
        "the old agent kept its one session:\n{log}"
    );
    assert!(!log.contains("unexpected message"), "{log}");

    // A run-now for it is refused by the collector, never sent.
    let (code, out, err) = collector_cmd(&[
        "run-now",
        "--agent",
        "old-agent",
        "--kind",
        "tcp",
        "--target",
        &collector.http.to_string(),
        "--json",
        "--timeout",
        "10s",
        "--database-url",
        &db.url,
    ]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(out.contains("too old"), "run-now output: {out}{err}");

    let log_path = agent.config.with_extension("log");
    assert_eq!(
        agent.stop(),
        Some(0),
        "the old agent stops cleanly: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let row = db
        .client()
        .query_one(
            "SELECT features, fleet_version FROM agents WHERE agent_id = 'old-agent'",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, Vec<String>>(0).is_empty());
    assert_eq!(row.get::<_, Option<i64>>(1), None);
    assert_eq!(results_of(&db, "old-agent", "fleet-web"), 0);
    // The drain runs this release's agent on the old buffer: an empty fleet set keeps it
    // from adding fleet results of its own (removing every test is meant: --force).
    let empty = dir.path().join("fleet-empty.toml");
    std::fs::write(&empty, "# no fleet tests\n").unwrap();
    let (code, out, err) = collector_cmd(&[
        "tests",
        "apply",
        "--file",
        empty.to_str().unwrap(),
        "--force",
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "tests apply: {out}{err}");
    let last = drain(&mut agent, &db, "old-agent");
    assert_exactly_once(&db, "old-agent", last);
}

#[test]
#[ignore = "needs the previous release's binaries: scripts/test-compat.sh"]
fn compat_a_new_agent_keeps_delivering_to_an_old_collector() {
    let old_collector = old_binary("EDGEPROBE_OLD_COLLECTOR");
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let target = HttpTarget::start("ok");
    let (grpc, http) = (free_addr(), free_addr());
    let config = dir.path().join("old-collector.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ninsecure = true\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\n\n[database]\nurl = \"{}\"\n",
            db.url
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&old_collector);
    cmd.arg("run").arg("--config").arg(&config);
    let mut collector = Proc::spawn(cmd, dir.path().join("old-collector.log"));
    wait_for(Duration::from_secs(30), "the old collector /readyz", || {
        assert!(collector.is_running(), "{}", collector.log_text());
        http_get(http, "/readyz").filter(|(s, _)| *s == 200)
    });

    let mut agent = Agent::new(
        dir.path(),
        "new-agent",
        &format!("http://{grpc}"),
        &http_test(&target.url(), "100ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "the new agent's results", || {
        (results_of(&db, "new-agent", "web") >= 30).then_some(())
    });
    let log = agent.proc.as_ref().unwrap().log_text();
    assert_eq!(
        log.matches("connected to collector").count(),
        1,
        "the new agent kept its one session:\n{log}"
    );
    let collector_log = collector.log_text();
    assert!(
        !collector_log.contains("unexpected message"),
        "{collector_log}"
    );
    agent.stop();
    let last = drain(&mut agent, &db, "new-agent");
    assert_exactly_once(&db, "new-agent", last);
    collector.stop();
}
