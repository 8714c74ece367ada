//! Bad configuration: exit 2 and `file:line:col: reason`, for `check` and `run`.

use std::process::Command;

use crate::support::*;

const GOOD: &str = r#"[agent]
id = "cfg"
state_dir = "/tmp/edgeprobe-cfg-test"

[collector]
endpoints = ["http://127.0.0.1:7443"]
insecure = true

[[test]]
name = "web"
kind = "http"
target = "http://127.0.0.1:1/"
schedule = "*/5 * * * * *"
options = { timeout = "2s" }
"#;

fn check(subcommand: &str, text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(agent_bin())
        .arg(subcommand)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let located = stderr.replace(&path.display().to_string(), "agent.toml");
    (
        out.status.code(),
        located,
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn good_config_passes_check() {
    let (code, err, out) = check("check", GOOD);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (agent cfg, 1 test, 1 endpoint)"), "{out}");
}

#[test]
fn unknown_key_bad_duration_bad_cron_exit_2_located() {
    let cases = [
        (
            GOOD.replace("state_dir", "statedir"),
            "agent.toml:3:1: unknown field `statedir`",
        ),
        (
            GOOD.replace("\"2s\"", "\"2 fortnights\""),
            "agent.toml:14:23: invalid duration `2 fortnights`",
        ),
        (
            GOOD.replace("*/5 * * * * *", "*/5 * * *"),
            "agent.toml:13:12: invalid cron `*/5 * * *`",
        ),
        (
            GOOD.replace("kind = \"http\"", "kind = \"htpp\""),
            "agent.toml:11:8: unknown variant `htpp`",
        ),
        (
            GOOD.replace("timeout = \"2s\"", "count = 3"),
            "agent.toml:14:11: option `count` does not apply to kind http",
        ),
    ];
    for (text, expected) in cases {
        for subcommand in ["check", "run"] {
            let (code, err, _) = check(subcommand, &text);
            assert_eq!(code, Some(2), "{subcommand}: {err}");
            assert!(
                err.starts_with(expected),
                "{subcommand}: expected `{expected}`, got `{err}`"
            );
        }
    }
}

#[test]
fn collector_config_errors_exit_2_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, "[server]\ninsecure = true\n\n[database]\nurl = \"postgres://x@127.0.0.1/x\"\nretension = \"9d\"\n").unwrap();
    for subcommand in ["run", "check"] {
        let out = Command::new(collector_bin())
            .arg(subcommand)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{subcommand}: {err}");
        assert!(
            err.starts_with(&format!(
                "{}:6:1: unknown field `retension`",
                path.display()
            )),
            "{subcommand}: {err}"
        );
    }
    std::fs::write(
        &path,
        "[server]
insecure = true
",
    )
    .unwrap();
    let out = Command::new(collector_bin())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
