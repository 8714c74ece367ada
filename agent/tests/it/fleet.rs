//! Fleet tests on a real agent with the collector unreachable: the set persisted in
//! `<state_dir>/fleet-tests.toml` runs from the start (an agent restarted while the
//! collector is away keeps its fleet tests), `buffer` shows its version, a corrupt file
//! does not stop the start, and a reload whose local file clashes with an applied fleet
//! test is refused.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeprobe_proto::v1 as pb;

use crate::util::{Proc, BIN};

fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn write_config(dir: &Path, local_name: &str) -> PathBuf {
    let port = closed_port();
    let path = dir.join("agent.toml");
    let text = format!(
        r#"[agent]
id = "it-fleet"
labels = {{ site = "berlin" }}
state_dir = "{state}"

[collector]
endpoints = ["http://127.0.0.1:{port}"]
insecure = true
reconnect_spread = "0s"

[[test]]
name = "{local_name}"
kind = "tcp"
target = "127.0.0.1:{port}"
every = "1h"
"#,
        state = dir.join("state").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn write_fleet(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(dir.join("state").join("fleet-tests.toml"), text).unwrap();
}

fn fleet_file(version: u64) -> String {
    format!(
        "# edgeprobe fleet tests, version {version}, received 2026-11-30T18:00:00Z\n\
         [[test]]\nname = \"fleet-closed\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:{}\"\nevery = \"100ms\"\n\
         labels = {{ from = \"fleet\" }}\n",
        closed_port()
    )
}

fn start(dir: &Path, config: &Path) -> Proc {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    Proc(
        Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start edgeprobe-agent run"),
    )
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

fn wait_log(dir: &Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = log(dir);
        if text.contains(what) {
            return text;
        }
        assert!(Instant::now() < deadline, "no `{what}` in the log:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

fn stop(mut run: Proc) {
    signal(&run.0, "TERM");
    let status = run.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// The results in the stopped agent's buffer.
fn buffered(dir: &Path) -> Vec<pb::Result> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let buffer = edgeprobe_agent::buffer::Buffer::open(&dir.join("state"), 256 << 20).unwrap();
        let entries = buffer.read_after(0, 100_000, 64 << 20).await.unwrap();
        buffer.close();
        entries
            .iter()
            .map(|e| prost::Message::decode(e.payload.as_slice()).unwrap())
            .collect()
    })
}

#[test]
fn persisted_fleet_tests_run_while_the_collector_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "local");
    write_fleet(dir.path(), &fleet_file(3));
    let run = start(dir.path(), &config);
    let text = wait_log(dir.path(), "fleet tests applied");
    let line = text
        .lines()
        .find(|l| l.contains("fleet tests applied"))
        .unwrap();
    assert!(line.contains("version=3"), "{line}");
    assert!(line.contains(r#"tests=["fleet-closed"]"#), "{line}");

    // `buffer` shows which fleet version runs, from the running agent too.
    wait_log(dir.path(), "edgeprobe-agent starting");
    let out = Command::new(BIN)
        .args(["buffer", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("fleet tests   version 3 (received 2026-11-30T18:00:00Z): fleet-closed"),
        "{stdout}"
    );

    std::thread::sleep(Duration::from_secs(1));
    stop(run);
    let results = buffered(dir.path());
    let fleet: Vec<_> = results
        .iter()
        .filter(|r| r.test == "fleet-closed")
        .collect();
    assert!(fleet.len() >= 3, "every 100 ms for a second: {results:?}");
    let r = fleet[0];
    assert_eq!(r.labels.get("site").map(String::as_str), Some("berlin"));
    assert_eq!(r.labels.get("from").map(String::as_str), Some("fleet"));
    assert_eq!(r.run_id, 0, "a scheduled run, not on demand");
    assert!(results.iter().any(|r| r.test == "local"), "{results:?}");
}

#[test]
fn a_corrupt_fleet_file_does_not_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "local");
    write_fleet(
        dir.path(),
        "# edgeprobe fleet tests, version 2\n[[test]]\nname = 3\n",
    );
    let run = start(dir.path(), &config);
    let text = wait_log(dir.path(), "edgeprobe-agent starting");
    assert!(
        text.contains("ignoring the persisted fleet tests"),
        "{text}"
    );
    assert!(!text.contains("fleet tests applied"), "{text}");
    std::thread::sleep(Duration::from_millis(500));
    stop(run);
    let results = buffered(dir.path());
    assert!(results.iter().any(|r| r.test == "local"), "{results:?}");
}

#[test]
fn a_reload_that_clashes_with_a_fleet_test_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "local");
    write_fleet(dir.path(), &fleet_file(5));
    let run = start(dir.path(), &config);
    wait_log(dir.path(), "fleet tests applied");
    wait_log(dir.path(), "scheduler started");

    // The local file now names a test like the fleet test: refused, the old set runs on.
    write_config(dir.path(), "fleet-closed");
    signal(&run.0, "HUP");
    let text = wait_log(dir.path(), "reload refused");
    let line = text.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(line.contains("own config file"), "{line}");
    assert!(line.contains("fleet_version=5"), "{line}");

    // A reload that fits is applied, keeping the unchanged fleet test's schedule.
    write_config(dir.path(), "local2");
    signal(&run.0, "HUP");
    let text = wait_log(dir.path(), "configuration reloaded");
    let line = text
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(line.contains("kept=1"), "{line}");
    stop(run);
}
