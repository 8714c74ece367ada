//! `edgeprobe-agent run`, `buffer` and `check` against a real state directory: the buffer
//! can be inspected while the agent runs (without advice to move it aside), and `check`
//! refuses a configuration whose results the collector would refuse.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Proc, BIN};

/// A port nothing listens on: results are failed tcp probes, the uplink never connects.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let port = closed_port();
    let path = dir.join("agent.toml");
    let text = format!(
        r#"[agent]
id = "it-state"
state_dir = "{state}"

[collector]
endpoints = ["http://127.0.0.1:{port}"]
insecure = true

[[test]]
name = "closed"
kind = "tcp"
target = "127.0.0.1:{port}"
every = "100ms"
{extra}"#,
        state = dir.join("state").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn agent(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run edgeprobe-agent")
}

/// The backlog line of `buffer`'s output.
fn backlog(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("backlog"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no backlog in:\n{stdout}"))
}

fn field<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"))
}

#[test]
fn buffer_shows_the_running_agents_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let config_arg = config.to_str().unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut run = Proc(
        Command::new(BIN)
            .args(["run", "--config", config_arg])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start edgeprobe-agent run"),
    );

    // `buffer` before the agent has opened its buffer would open it itself (and hold
    // sled's lock for a moment): wait for the agent to be up first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(dir.path().join("agent.log"))
        .unwrap_or_default()
        .contains("edgeprobe-agent starting")
    {
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent publishes every 5 s: wait until a published status shows a backlog.
    let (stdout, running_backlog) = loop {
        let out = agent(&["buffer", "--config", config_arg]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "stdout:\n{stdout}\nstderr:\n{stderr}"
        );
        for text in [&stdout, &stderr] {
            assert!(
                !text.contains("move") && !text.contains("mv ") && !text.contains("corrupt"),
                "advice to move a live buffer aside:\n{text}"
            );
        }
        assert!(
            stdout.contains("published by the running agent"),
            "{stdout}"
        );
        let n = backlog(&stdout);
        if n >= 5 {
            break (stdout, n);
        }
        assert!(Instant::now() < deadline, "no backlog published:\n{stdout}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let incarnation = field(&stdout, "incarnation").to_string();
    assert_eq!(incarnation.len(), 32, "{stdout}");
    // `--json`: the same counters as one object, with the age of the published ones.
    let json = |args: &[&str]| -> serde_json::Value {
        let out = agent(args);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    let v = json(&["buffer", "--json", "--config", config_arg]);
    assert_eq!(v["incarnation"], incarnation.as_str(), "{v}");
    assert!(v["backlog"].as_u64().unwrap() >= running_backlog, "{v}");
    assert!(v["published_seconds_ago"].is_u64(), "{v}");
    assert!(v["fleet_tests"].is_null(), "{v}");

    // Stopped, the buffer opens directly: the same incarnation, at least that backlog.
    let pid = run.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = run.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let out = agent(&["buffer", "--config", config_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!stdout.contains("published by"), "{stdout}");
    assert_eq!(field(&stdout, "incarnation"), incarnation);
    assert!(backlog(&stdout) >= running_backlog, "{stdout}");
    let v = json(&["buffer", "--json", "--config", config_arg]);
    assert_eq!(v["incarnation"], incarnation.as_str(), "{v}");
    assert_eq!(v["backlog"].as_u64(), Some(backlog(&stdout)), "{v}");
    assert!(v["published_seconds_ago"].is_null(), "{v}");
}

#[test]
fn check_refuses_labels_the_collector_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let agent_labels: Vec<String> = (0..20).map(|i| format!("a{i} = \"x\"")).collect();
    let test_labels: Vec<String> = (0..20).map(|i| format!("t{i} = \"y\"")).collect();
    let config = write_config(
        dir.path(),
        &format!("labels = {{ {} }}\n", test_labels.join(", ")),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "id = \"it-state\"",
        &format!(
            "id = \"it-state\"\nlabels = {{ {} }}",
            agent_labels.join(", ")
        ),
    );
    std::fs::write(&config, text).unwrap();
    let out = agent(&["check", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "{}:15:10: test `closed`: 40 labels after merging [agent] labels, at most 32",
            config.display()
        )
    );
}

/// `edgeprobe-agent buffer | head`: a reader that has gone is no reason to panic (print!
/// panics on EPIPE, exit 101), whether the buffer is read directly or, while an agent
/// holds it, from the status the agent publishes.
#[test]
fn buffer_survives_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let config_arg = config.to_str().unwrap();
    let closed_pipe = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let buffer_into_closed_pipe = || {
        Command::new(BIN)
            .args(["buffer", "--config", config_arg])
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .expect("run edgeprobe-agent buffer")
    };

    let out = buffer_into_closed_pipe();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "direct: {stderr}");
    assert!(!stderr.contains("panicked"), "direct: {stderr}");

    // Held, as by a running agent, with its published status.
    let state = dir.path().join("state");
    let held = edgeprobe_agent::buffer::Buffer::open(&state, 1 << 20).unwrap();
    let stats = edgeprobe_agent::buffer::Stats {
        backlog: 3,
        ..Default::default()
    };
    std::fs::write(
        edgeprobe_agent::run::status_path(&state),
        edgeprobe_agent::report::buffer_json(&stats, &state).to_string(),
    )
    .unwrap();
    let shown = agent(&["buffer", "--config", config_arg]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("published by the running agent"),
        "{shown:?}"
    );
    let out = buffer_into_closed_pipe();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "published: {stderr}");
    assert!(!stderr.contains("panicked"), "published: {stderr}");
    held.close();
}
