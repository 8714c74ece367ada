//! Fleet tests on the agent: the `[[test]]` blocks a collector pushes (`FleetTests`), kept
//! in `<state_dir>/fleet-tests.toml` so that an agent restarted while the collector is
//! away keeps running the last set it got.
//!
//! The file is a header comment `# edgeprobe fleet tests, version N, received <RFC3339>`
//! and then the pushed `tests_toml` as it came, written atomically (temporary file,
//! fsync, rename, fsync of the directory). At start it is checked like a push, against
//! the running configuration (`config::parse_pushed_tests`); a file that does not check
//! is logged and left out: the agent starts with its local tests alone, and says so in
//! `<state_dir>/fleet-tests.refused` (the version and the reason), which `buffer` shows
//! instead of claiming the persisted version runs. A set that loads or a push that is
//! saved removes that note.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use edgeprobe_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::config::{self, Config, ConfigError, TestConfig};

pub const FILE_NAME: &str = "fleet-tests.toml";
/// The note left when the persisted set was refused at start.
pub const REFUSED_NAME: &str = "fleet-tests.refused";
const HEADER: &str = "# edgeprobe fleet tests, version ";

/// A controller message from the uplink to the scheduler side (`run.rs`), with the
/// session's sender for the answer. The uplink forwards only what the collector's welcome
/// listed as a feature, so an answer may always be sent.
pub enum Inbound {
    FleetTests {
        push: pb::FleetTests,
        reply: mpsc::Sender<pb::AgentMessage>,
    },
    RunNow {
        run: pb::RunNow,
        reply: mpsc::Sender<pb::AgentMessage>,
    },
}

/// The applied fleet tests.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub version: u64,
    /// As pushed (the body of the persisted file).
    pub tests_toml: String,
    pub tests: Vec<TestConfig>,
}

impl Fleet {
    pub fn names(&self) -> Vec<String> {
        self.tests
            .iter()
            .map(|t| t.name.get_ref().clone())
            .collect()
    }

    /// Checks a push against `config`; the error is located in "fleet tests version N".
    pub fn parse(version: u64, tests_toml: &str, config: &Config) -> Result<Fleet, ConfigError> {
        let origin = format!("fleet tests version {version}");
        let tests = config::parse_pushed_tests(tests_toml, &origin, config)?;
        Ok(Fleet {
            version,
            tests_toml: tests_toml.to_string(),
            tests,
        })
    }

    /// The same set checked against another configuration (a reload).
    pub fn recheck(&self, config: &Config) -> Result<Fleet, ConfigError> {
        Fleet::parse(self.version, &self.tests_toml, config)
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Where the refusal of the persisted set at start is noted.
pub fn refused_path(state_dir: &Path) -> PathBuf {
    state_dir.join(REFUSED_NAME)
}

/// Notes (or, with `None`, clears the note) that the persisted set does not run. Best
/// effort: the note only serves `buffer`, and the start never fails on it.
fn note_refused(state_dir: &Path, refusal: Option<String>) {
    let path = refused_path(state_dir);
    let done = match refusal {
        Some(text) => std::fs::write(&path, text + "\n"),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    if let Err(e) = done {
        tracing::debug!(path = %path.display(), "cannot update the fleet refusal note: {e}");
    }
}

/// The persisted file's parts: version, received time (as written), tests_toml.
pub fn read(path: &Path) -> Result<(u64, String, String), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    split(&text)
}

fn split(text: &str) -> Result<(u64, String, String), String> {
    let (header, body) = text.split_once('\n').unwrap_or((text, ""));
    let rest = header
        .strip_prefix(HEADER)
        .ok_or_else(|| format!("the first line is not `{HEADER}N, received TIME`"))?;
    let (version, received) = rest.split_once(", received ").unwrap_or((rest, ""));
    let version: u64 = version
        .trim()
        .parse()
        .map_err(|_| format!("bad version `{version}` in the first line"))?;
    if version == 0 {
        return Err("version 0 is never pushed".to_string());
    }
    Ok((version, received.trim().to_string(), body.to_string()))
}

/// Loads the persisted fleet tests, checked against `config`. Missing: `None`. Corrupt
/// or not fitting the configuration: logged, `None` (the start never fails on it).
pub fn load(state_dir: &Path, config: &Config) -> Option<Fleet> {
    let path = path(state_dir);
    if !path.exists() {
        note_refused(state_dir, None);
        return None;
    }
    let shown = path.display().to_string();
    let (version, received, body) = match read(&path) {
        Ok(parts) => parts,
        Err(e) => {
            tracing::error!(path = %shown, "ignoring the persisted fleet tests: {e}; running the local tests alone until the collector pushes them again");
            note_refused(state_dir, Some(format!("unreadable: {e}")));
            return None;
        }
    };
    // Checked as the whole file (the header is a comment), so errors point at its lines.
    let text = format!("{HEADER}{version}, received {received}\n{body}");
    match config::parse_pushed_tests(&text, &shown, config) {
        Ok(tests) => {
            note_refused(state_dir, None);
            Some(Fleet {
                version,
                tests_toml: body,
                tests,
            })
        }
        Err(e) => {
            tracing::error!("ignoring the persisted fleet tests: {e}; running the local tests alone until the collector pushes them again");
            note_refused(
                state_dir,
                Some(format!("version {version} refused at start: {e}")),
            );
            None
        }
    }
}

/// `check`: whether the persisted fleet tests would load at start with `config` (a local
/// test named like a fleet test refuses the whole set). `Ok(None)` when none is persisted,
/// else the version that would run. Unlike [`load`] it leaves no note and logs nothing.
pub fn check_stored(state_dir: &Path, config: &Config) -> Result<Option<u64>, String> {
    let path = path(state_dir);
    if !path.exists() {
        return Ok(None);
    }
    let shown = path.display().to_string();
    let (version, received, body) =
        read(&path).map_err(|e| format!("{shown}: unreadable fleet tests: {e}"))?;
    let text = format!("{HEADER}{version}, received {received}\n{body}");
    config::parse_pushed_tests(&text, &shown, config)
        .map(|_| Some(version))
        .map_err(|e| {
            format!(
                "{e}\nthe stored fleet tests (version {version}) would be refused at start: the \
                 agent runs its local tests and delivers, but no fleet test runs until one of \
                 the two tests is renamed"
            )
        })
}

/// Persists `version` / `tests_toml` atomically.
pub fn save(
    state_dir: &Path,
    version: u64,
    tests_toml: &str,
    received: DateTime<Utc>,
) -> std::io::Result<()> {
    let path = path(state_dir);
    let tmp = path.with_extension("toml.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(
            f,
            "{HEADER}{version}, received {}",
            received.to_rfc3339_opts(SecondsFormat::Secs, true)
        )?;
        f.write_all(tests_toml.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(state_dir)?.sync_all()?;
    note_refused(state_dir, None);
    Ok(())
}

/// The fleet tests for `edgeprobe-agent buffer --json`: `{"version", "received",
/// "tests"}` of the persisted set, `{"refused": reason}` when it was refused at start,
/// `{"unreadable": reason}`, or null when none is persisted.
pub fn describe_json(state_dir: &Path) -> serde_json::Value {
    use serde_json::json;
    if let Ok(note) = std::fs::read_to_string(refused_path(state_dir)) {
        return json!({ "refused": note.trim() });
    }
    let path = path(state_dir);
    if !path.exists() {
        return serde_json::Value::Null;
    }
    match read(&path) {
        Ok((version, received, body)) => json!({
            "version": version,
            "received": received,
            "tests": test_names(&body),
        }),
        Err(e) => json!({ "unreadable": e }),
    }
}

fn test_names(body: &str) -> Vec<String> {
    toml::from_str::<toml::Table>(body)
        .ok()
        .and_then(|t| t.get("test").and_then(|v| v.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|t| t.get("name").and_then(|n| n.as_str()).map(String::from))
        .collect()
}

/// One line for `edgeprobe-agent buffer`: the applied fleet version and its tests, or
/// that the persisted set was refused at start (then no fleet test runs).
pub fn describe(state_dir: &Path) -> String {
    let path = path(state_dir);
    if let Ok(note) = std::fs::read_to_string(refused_path(state_dir)) {
        return format!(
            "fleet tests   none running: {} (the local tests run alone until the collector pushes a set that fits)\n",
            note.trim()
        );
    }
    if !path.exists() {
        return "fleet tests   none\n".to_string();
    }
    match read(&path) {
        Ok((version, received, body)) => {
            let names = test_names(&body);
            format!(
                "fleet tests   version {version} (received {received}): {}\n",
                if names.is_empty() {
                    "no tests".to_string()
                } else {
                    names.join(", ")
                }
            )
        }
        Err(e) => format!("fleet tests   unreadable ({}): {e}\n", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[agent]
id = "a1"
labels = { site = "berlin" }
[collector]
endpoints = ["http://127.0.0.1:1"]
insecure = true
[[test]]
name = "local"
kind = "tcp"
target = "127.0.0.1:1"
every = "1m"
"#;

    const PUSH: &str = r#"[[test]]
name = "fleet-tcp"
kind = "tcp"
target = "127.0.0.1:2"
every = "30s"
"#;

    fn config() -> Config {
        Config::parse(CONFIG, "agent.toml").unwrap()
    }

    #[test]
    fn a_push_is_persisted_and_loaded_back() {
        let dir = tempfile::tempdir().unwrap();
        let at = Utc::now();
        save(dir.path(), 7, PUSH, at).unwrap();
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        assert!(
            text.starts_with("# edgeprobe fleet tests, version 7, received 20"),
            "{text}"
        );
        assert!(!dir.path().join("fleet-tests.toml.tmp").exists());
        let fleet = load(dir.path(), &config()).expect("loads");
        assert_eq!(fleet.version, 7);
        assert_eq!(fleet.tests_toml, PUSH, "the body is the push as it came");
        assert_eq!(fleet.names(), ["fleet-tcp"]);
        assert!(describe(dir.path()).contains("version 7"));
        assert!(describe(dir.path()).contains("fleet-tcp"));
        // A second save replaces the first.
        save(dir.path(), 8, "", at).unwrap();
        let fleet = load(dir.path(), &config()).expect("loads");
        assert_eq!((fleet.version, fleet.tests.len()), (8, 0));
    }

    #[test]
    fn a_bad_persisted_file_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), &config()).is_none(), "none yet");
        for bad in [
            "garbage\n[[test]]\n".to_string(),
            format!("{HEADER}x, received now\n{PUSH}"),
            format!("{HEADER}3, received now\n[[test]]\nname = \"x\"\n"),
            // Clashes with the local test.
            format!(
                "{HEADER}3, received now\n{}",
                PUSH.replace("fleet-tcp", "local")
            ),
        ] {
            std::fs::write(path(dir.path()), &bad).unwrap();
            assert!(load(dir.path(), &config()).is_none(), "{bad}");
            // `buffer` does not claim the refused set runs.
            let shown = describe(dir.path());
            assert!(shown.starts_with("fleet tests   none running: "), "{shown}");
        }
        // The clash is named with its version; a set that loads clears the note.
        assert!(describe(dir.path()).contains("version 3 refused at start"));
        std::fs::write(path(dir.path()), format!("{HEADER}4, received now\n{PUSH}")).unwrap();
        assert!(load(dir.path(), &config()).is_some());
        assert!(
            describe(dir.path()).contains("version 4"),
            "{}",
            describe(dir.path())
        );
        assert!(!refused_path(dir.path()).exists());
    }

    #[test]
    fn a_push_that_clashes_with_a_local_test_is_refused_located() {
        let e = Fleet::parse(4, &PUSH.replace("fleet-tcp", "local"), &config()).unwrap_err();
        assert!(
            e.to_string().starts_with("fleet tests version 4:2:8:"),
            "{e}"
        );
        assert!(e.to_string().contains("own config file"), "{e}");
    }
}
