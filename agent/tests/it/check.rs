//! `edgeprobe-agent check` refuses, before the agent starts, what the agent would fail on
//! at run time (issue 25 items 6 and 8): option values a probe cannot honour.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::BIN;

/// An agent file with one test of `kind` to `target` whose `[test.options]` are `options`.
fn config_with_test(dir: &Path, kind: &str, target: &str, options: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        r#"[agent]
id = "it-check"
state_dir = "{state}"

[collector]
endpoints = ["http://127.0.0.1:9"]
insecure = true

[[test]]
name = "probe-1"
kind = "{kind}"
target = "{target}"
every = "1m"

[test.options]
{options}
"#,
        state = dir.join("state").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn check(config: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// icmp `count = 0` used to pass and send one echo; a dns `server` that is a name, an
/// unknown `record_type`, an http method with a space, a status of 600 and zero streams
/// passed `check` and failed (or were bent) at every run. Each is refused at the options'
/// place in the file, exit 2; a good value of each passes.
#[test]
fn check_refuses_option_values_a_probe_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, target, options, why) in [
        (
            "icmp",
            "192.0.2.1",
            "count = 0",
            "`count` must be at least 1",
        ),
        (
            "icmp",
            "192.0.2.1",
            "interval = \"0s\"",
            "`interval` must be more than 0s",
        ),
        (
            "speed",
            "http://127.0.0.1:9/",
            "streams = 65",
            "`streams` is 65, it must be 1 to 64",
        ),
        (
            "speed",
            "http://127.0.0.1:9/",
            "upload_streams = 0",
            "`upload_streams` is 0",
        ),
        (
            "speed",
            "http://127.0.0.1:9/",
            "pings = 0",
            "`pings` must be at least 1",
        ),
        (
            "dns",
            "example.com",
            "server = \"ns1.example\"",
            "`server` is `ns1.example`, it must be an IP address",
        ),
        (
            "dns",
            "example.com",
            "record_type = \"AAAAA\"",
            "`record_type` `AAAAA` is not one the dns probe asks for",
        ),
        (
            "http",
            "http://127.0.0.1:9/",
            "method = \"GET /\"",
            "`method` `GET /` is not an HTTP method name",
        ),
        (
            "http",
            "http://127.0.0.1:9/",
            "expect_status = 600",
            "`expect_status` is 600, it must be 100 to 599",
        ),
    ] {
        let config = config_with_test(dir.path(), kind, target, options);
        let (code, _, stderr) = check(&config);
        assert_eq!(code, Some(2), "{kind} {options}: {stderr}");
        assert!(
            stderr.starts_with(&format!("{}:15:1: test `probe-1`: {why}", config.display())),
            "{kind} {options}: {stderr}"
        );
    }
    for (kind, target, options) in [
        ("icmp", "192.0.2.1", "count = 1"),
        ("speed", "http://127.0.0.1:9/", "streams = 64\npings = 1"),
        (
            "dns",
            "example.com",
            "server = \"[2001:db8::53]:5353\"\nrecord_type = \"https\"",
        ),
        (
            "http",
            "http://127.0.0.1:9/",
            "method = \"PROPFIND\"\nexpect_status = 207",
        ),
    ] {
        let config = config_with_test(dir.path(), kind, target, options);
        let (code, stdout, stderr) = check(&config);
        assert_eq!(code, Some(0), "{kind} {options}: {stderr}");
        assert!(stdout.contains(": ok (agent it-check"), "{stdout}");
    }
}

/// Every record type `check` accepts is one the probe's DNS library can ask for.
#[test]
fn every_accepted_record_type_is_one_the_probe_can_ask() {
    use std::str::FromStr;
    for t in edgeprobe_proto::testdef::DNS_RECORD_TYPES {
        hickory_proto::rr::RecordType::from_str(t).unwrap_or_else(|e| panic!("{t}: {e}"));
    }
}
