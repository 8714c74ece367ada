//! Agent configuration: the TOML file of SPEC section 9, parsed once and checked once.
//!
//! Parsing uses `deny_unknown_fields` everywhere, so a typo is an error. Every error is
//! located: `file:line:col: reason`. Values that need more than a type check (durations,
//! sizes, cron expressions, targets) are checked during deserialization, so the TOML
//! parser attaches the span of the offending value. After `Config::load` returns, the
//! configuration is immutable.
//!
//! Invariant: a configuration that loads yields only results the collector accepts. Agent
//! id, test names, targets and labels are checked against `edgeprobe_proto::bounds`, the
//! collector's own bounds, including the label count after a test's labels are merged
//! over the agent's.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use edgeprobe_proto::bounds;
use edgeprobe_proto::testdef::units::{de_labels, de_opt_name, de_timezone};
use edgeprobe_proto::testdef::{
    check_test, from_toml, locate, parse_duration, AgentContext, FleetFile, Scheduling,
};
use serde::{Deserialize, Deserializer};

/// The test definition is shared with the collector (`edgeprobe_proto::testdef`).
pub use edgeprobe_proto::testdef::{ConfigError, Kind, TestConfig, TestOptions};

/// Default byte cap of the result buffer.
pub const DEFAULT_BUFFER_MAX_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSection,
    pub collector: CollectorSection,
    #[serde(default, rename = "test")]
    pub tests: Vec<TestConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Defaults to the host name.
    #[serde(default, deserialize_with = "de_opt_name")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "de_labels")]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_buffer_max", deserialize_with = "de_size")]
    pub buffer_max_bytes: u64,
    /// IANA time zone that `schedule`s are read in, unless a test sets its own.
    #[serde(default = "default_timezone", deserialize_with = "de_timezone")]
    pub timezone: Tz,
}

impl AgentSection {
    /// What the test checks know of this agent.
    pub fn context(&self) -> AgentContext<'_> {
        AgentContext {
            labels: &self.labels,
            timezone: self.timezone,
        }
    }
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            id: None,
            labels: BTreeMap::new(),
            state_dir: default_state_dir(),
            buffer_max_bytes: DEFAULT_BUFFER_MAX_BYTES,
            timezone: default_timezone(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/edgeprobe")
}

fn default_buffer_max() -> u64 {
    DEFAULT_BUFFER_MAX_BYTES
}

fn default_timezone() -> Tz {
    Tz::UTC
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSection {
    #[serde(deserialize_with = "de_endpoints")]
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Plaintext gRPC without certificates. Local demos only.
    #[serde(default)]
    pub insecure: bool,
    /// The first connect after a lost session (and at start on a host that just booted)
    /// waits a random time up to this long, so a fleet does not reconnect at once.
    #[serde(
        default = "default_reconnect_spread",
        deserialize_with = "de_reconnect_spread"
    )]
    pub reconnect_spread: Duration,
}

/// Default `reconnect_spread`: 10,000 agents at about 330 new sessions a second.
pub const DEFAULT_RECONNECT_SPREAD: Duration = Duration::from_secs(30);
const MAX_RECONNECT_SPREAD: Duration = Duration::from_secs(3600);

fn default_reconnect_spread() -> Duration {
    DEFAULT_RECONNECT_SPREAD
}

fn de_reconnect_spread<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let spread = parse_duration(&s).map_err(serde::de::Error::custom)?;
    if spread > MAX_RECONNECT_SPREAD {
        return Err(serde::de::Error::custom(format!(
            "reconnect_spread `{s}` is over 1h: results would wait that long after every lost session"
        )));
    }
    Ok(spread)
}

impl Config {
    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and checks config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = from_toml(text, origin)?;
        config
            .check()
            .map_err(|(span, reason)| locate(text, origin, span, reason))?;
        Ok(config)
    }

    /// Checks that need more than one field; returns the span to blame.
    fn check(&self) -> Result<(), (Option<Range<usize>>, String)> {
        if !self.collector.insecure {
            for (name, value) in [
                ("ca", &self.collector.ca),
                ("cert", &self.collector.cert),
                ("key", &self.collector.key),
            ] {
                if value.is_none() {
                    return Err((
                        None,
                        format!(
                            "[collector] needs `{name}` (mTLS is the default); set `insecure = true` only for local demos"
                        ),
                    ));
                }
            }
        }
        if self.agent.id.is_none() {
            // The host name stands in; it must fit like a configured id.
            bounds::agent_id(&self.agent_id()).map_err(|e| {
                (
                    None,
                    format!("[agent] id is not set and the host name does not fit: {e}; set `id`"),
                )
            })?;
        }
        if bounds::agent_tests(self.tests.len(), 0).is_err() {
            // The collector refuses the hello of an agent over the bound, and the agent
            // would never deliver a result: refuse the file at the first test too many.
            let first_over = &self.tests[bounds::MAX_AGENT_TESTS];
            return Err((
                Some(first_over.name.span()),
                format!(
                    "{} tests, at most {} on one agent (the collector refuses the hello of an agent with more)",
                    self.tests.len(),
                    bounds::MAX_AGENT_TESTS
                ),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for test in &self.tests {
            if let Some(select) = &test.select {
                return Err((Some(select.span()), FLEET_ONLY.replace("{key}", "select")));
            }
            if let Some(agents) = &test.agents {
                return Err((Some(agents.span()), FLEET_ONLY.replace("{key}", "agents")));
            }
            check_test(test, Some(self.agent.context()), Scheduling::Required)?;
            let name = test.name.get_ref();
            if !names.insert(name.clone()) {
                return Err((
                    Some(test.name.span()),
                    format!("duplicate test name `{name}`"),
                ));
            }
        }
        Ok(())
    }

    /// The agent id: configured, or the host name.
    pub fn agent_id(&self) -> String {
        self.agent.id.clone().unwrap_or_else(hostname)
    }

    /// What `run` needs of the mTLS files beyond the file's syntax (`check`): `ca`, `cert`
    /// and `key` exist, are readable and hold PEM certificates and a private key, the key
    /// belongs to the certificate, and `[agent] id` is the identity the collector reads
    /// from the certificate (its common name, else its first DNS subject alternative
    /// name; `collector/src/identity.rs`). Without this the agent starts and retries its
    /// session forever. Nothing to check with `insecure = true`.
    pub fn check_credentials(&self) -> Result<(), String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        if self.collector.insecure {
            return Ok(());
        }
        let file = |what: &str, path: &Option<PathBuf>| -> Result<(PathBuf, Vec<u8>), String> {
            let path = path
                .clone()
                .ok_or_else(|| format!("[collector] needs `{what}`"))?;
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("[collector] {what} {}: cannot read: {e}", path.display()))?;
            Ok((path, bytes))
        };
        let certs_in = |what: &str, path: &Path, pem: &[u8]| {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("[collector] {what} {}: not PEM: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "[collector] {what} {}: holds no PEM certificate",
                    path.display()
                ));
            }
            Ok(certs)
        };
        let (ca_path, ca) = file("ca", &self.collector.ca)?;
        certs_in("ca", &ca_path, &ca)?;
        let (cert_path, cert) = file("cert", &self.collector.cert)?;
        let certs = certs_in("cert", &cert_path, &cert)?;
        let (key_path, key) = file("key", &self.collector.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
            format!(
                "[collector] key {}: holds no PEM private key: {e}",
                key_path.display()
            )
        })?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
            format!(
                "[collector] key {}: not a usable private key: {e}",
                key_path.display()
            )
        })?;
        let leaf = certs[0].clone();
        rustls::sign::CertifiedKey::new(certs, signer)
            .keys_match()
            .map_err(|e| {
                format!(
                    "[collector] key {} does not belong to the certificate {} ({e}); \
                     use the key issued with that certificate",
                    key_path.display(),
                    cert_path.display()
                )
            })?;
        let id = self.agent_id();
        match certificate_agent_id(&leaf) {
            Some(named) if named == id => Ok(()),
            Some(named) => Err(format!(
                "[agent] id is `{id}` but the certificate {} names agent `{named}`; the \
                 collector would refuse every session: set `id = \"{named}\"` or issue a \
                 certificate for `{id}`",
                cert_path.display()
            )),
            None => Err(format!(
                "the certificate {} names no agent (no common name and no DNS subject \
                 alternative name); issue one with `edgeprobe-collector cert issue {id}`",
                cert_path.display()
            )),
        }
    }
}

/// The agent identity a certificate (DER) carries, as the collector reads it.
pub use edgeprobe_proto::identity::agent_id_of as certificate_agent_id;

const FLEET_ONLY: &str = "`{key}` chooses agents for a fleet test (`edgeprobe-collector tests \
     apply`); a test in the agent's own file runs on that agent only: remove `{key}`";

/// Parses the fleet tests pushed to this agent (`FleetTests.tests_toml`) and checks them
/// against the agent's own config: the merged label bound, and no name of a local test.
pub fn parse_pushed_tests(
    text: &str,
    origin: &str,
    config: &Config,
) -> Result<Vec<TestConfig>, ConfigError> {
    let file = FleetFile::parse(text, origin)?;
    let local: std::collections::HashSet<&str> = config
        .tests
        .iter()
        .map(|t| t.name.get_ref().as_str())
        .collect();
    let mut tests = Vec::with_capacity(file.tests.len());
    for t in file.tests {
        let located = |(span, reason)| locate(text, origin, span, reason);
        if t.config.select.is_some() || t.config.agents.is_some() {
            return Err(located((
                Some(t.config.name.span()),
                "a pushed test carries no `select` or `agents`".to_string(),
            )));
        }
        check_test(
            &t.config,
            Some(config.agent.context()),
            Scheduling::Required,
        )
        .map_err(located)?;
        let name = t.config.name.get_ref();
        if local.contains(name.as_str()) {
            return Err(located((
                Some(t.config.name.span()),
                format!("fleet test `{name}` has the name of a test in this agent's own config file; rename one of them"),
            )));
        }
        tests.push(t.config);
    }
    Ok(tests)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Parses "1048576", "512KiB", "256MiB", "1GiB", "10MB", "1kB".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size `{s}`; use e.g. \"256MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size unit `{other}` in `{s}`; use B, KiB, MiB, GiB, kB, MB or GB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn de_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let endpoints = Vec::<String>::deserialize(d)?;
    if endpoints.is_empty() {
        return Err(serde::de::Error::custom("at least one collector endpoint"));
    }
    for e in &endpoints {
        let uri: hyper::Uri = e
            .parse()
            .map_err(|err| serde::de::Error::custom(format!("endpoint `{e}`: {err}")))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(serde::de::Error::custom(format!(
                "endpoint `{e}` must look like https://host:port"
            )));
        }
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use edgeprobe_proto::testdef::parse_adhoc_test;

    use super::*;

    const GOOD: &str = r#"
[agent]
id = "branch-042"
labels = { site = "berlin", isp = "acme" }
state_dir = "/tmp/x"
buffer_max_bytes = "256MiB"

[collector]
endpoints = ["http://127.0.0.1:7443"]
insecure = true

[[test]]
name = "internet-speed"
kind = "speed"
target = "http://speed.example.net:8080"
schedule = "0 */30 * * * *"
options = { duration = "10s", streams = 4 }

[[test]]
name = "web"
kind = "http"
target = "https://example.net/"
every = "30s"
"#;

    #[test]
    fn parses_the_spec_example() {
        let c = Config::parse(GOOD, "agent.toml").unwrap();
        assert_eq!(c.agent_id(), "branch-042");
        assert_eq!(c.agent.buffer_max_bytes, 256 << 20);
        assert_eq!(c.tests.len(), 2);
        assert_eq!(
            c.tests[0].options.get_ref().duration,
            Some(Duration::from_secs(10))
        );
        assert_eq!(c.tests[1].every, Some(Duration::from_secs(30)));
        assert_eq!(c.collector.reconnect_spread, DEFAULT_RECONNECT_SPREAD);
    }

    #[test]
    fn reconnect_spread_is_a_duration_up_to_an_hour() {
        let with = |v: &str| {
            GOOD.replace(
                "insecure = true",
                &format!("insecure = true\nreconnect_spread = {v}"),
            )
        };
        let c = Config::parse(&with("\"0s\""), "agent.toml").unwrap();
        assert_eq!(c.collector.reconnect_spread, Duration::ZERO);
        let c = Config::parse(&with("\"2m\""), "agent.toml").unwrap();
        assert_eq!(c.collector.reconnect_spread, Duration::from_secs(120));
        let e = err(&with("\"2h\""));
        assert!(
            e.starts_with("agent.toml:11:20: reconnect_spread `2h` is over 1h"),
            "{e}"
        );
        let e = err(&with("30"));
        assert!(e.starts_with("agent.toml:11:20:"), "{e}");
    }

    fn err(text: &str) -> String {
        Config::parse(text, "agent.toml").unwrap_err().to_string()
    }

    #[test]
    fn located_errors() {
        let e = err(&GOOD.replace("state_dir", "state_dri"));
        assert!(
            e.starts_with("agent.toml:5:1: unknown field `state_dri`"),
            "{e}"
        );
        let e = err(&GOOD.replace("\"30s\"", "\"30 parsecs\""));
        assert!(e.starts_with("agent.toml:23:9: invalid duration"), "{e}");
        let e = err(&GOOD.replace("0 */30 * * * *", "0 */30 * *"));
        assert!(e.starts_with("agent.toml:16:12: invalid cron"), "{e}");
        let e = err(&GOOD.replace("streams = 4", "count = 4"));
        assert!(
            e.contains("option `count` does not apply to kind speed"),
            "{e}"
        );
        let e = err(&GOOD.replace("kind = \"http\"", "kind = \"htp\""));
        assert!(e.starts_with("agent.toml:21:8:"), "{e}");
    }

    #[test]
    fn time_zones() {
        let c = Config::parse(GOOD, "agent.toml").unwrap();
        assert_eq!(c.agent.timezone, Tz::UTC, "the default");
        assert_eq!(c.tests[0].timezone, None);
        let text = GOOD
            .replace(
                "state_dir =",
                "timezone = \"America/New_York\"\nstate_dir =",
            )
            .replace(
                "schedule = \"0 */30 * * * *\"",
                "schedule = \"0 */30 * * * *\"\ntimezone = \"Europe/Berlin\"",
            );
        let c = Config::parse(&text, "agent.toml").unwrap();
        assert_eq!(c.agent.timezone, chrono_tz::America::New_York);
        assert_eq!(c.tests[0].timezone, Some(chrono_tz::Europe::Berlin));
        let e = err(&text.replace("Europe/Berlin", "Mars/Olympus"));
        assert!(
            e.starts_with("agent.toml:18:12: unknown time zone `Mars/Olympus`"),
            "{e}"
        );
        let e = err(&text.replace("America/New_York", "CEST"));
        assert!(
            e.starts_with("agent.toml:5:12: unknown time zone `CEST`"),
            "{e}"
        );
        let e = err(&GOOD.replace("every = \"30s\"", "every = \"30s\"\ntimezone = \"UTC\""));
        assert!(
            e.starts_with("agent.toml:20:8: test `web`: `timezone` applies to `schedule` only"),
            "{e}"
        );
    }

    /// An agent file with more tests than one agent may run passed `check`, and then the
    /// collector refused every hello and nothing was ever delivered (issue 21).
    #[test]
    fn more_tests_than_an_agent_may_run_are_refused_at_the_first_too_many() {
        let block = |i: usize| {
            format!("[[test]]\nname = \"t{i}\"\nkind = \"tcp\"\ntarget = \"h:1\"\nevery = \"1h\"\n")
        };
        let head =
            "[agent]\nid = \"a\"\n[collector]\nendpoints = [\"http://c:1\"]\ninsecure = true\n";
        let all: String = (0..bounds::MAX_AGENT_TESTS).map(block).collect();
        Config::parse(&format!("{head}{all}"), "agent.toml").unwrap();
        let e = err(&format!("{head}{all}{}", block(bounds::MAX_AGENT_TESTS)));
        let line = 6 + 5 * bounds::MAX_AGENT_TESTS + 1;
        assert!(
            e.starts_with(&format!(
                "agent.toml:{line}:8: 4097 tests, at most 4096 on one agent"
            )),
            "{e}"
        );
    }

    /// Issue 28 case 6: schedules that can never fire passed `check` and fleet apply, and
    /// the running agent never ran them.
    #[test]
    fn a_schedule_that_can_never_fire_is_refused_at_its_location() {
        let never = [
            ("0 0 6 31 4,6,9,11 *", "can never fire"),
            ("0 0 0 30 2 *", "can never fire"),
            ("0 0 12 29 2 * 2027", "can never fire"),
            (
                "0 0 0 1 1 * 2019",
                "never fires again: its last time was 2019-01-01",
            ),
        ];
        for (cron, why) in never {
            let text = GOOD.replace("0 */30 * * * *", cron);
            let e = err(&text);
            assert!(
                e.starts_with(&format!(
                    "agent.toml:16:12: test `internet-speed`: schedule `{cron}` {why}"
                )),
                "{cron}: {e}"
            );
            let fleet = FLEET.replace("0 */30 * * * *", cron);
            let e = FleetFile::parse(&fleet, "fleet.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!(
                    "fleet.toml:6:12: test `berlin-speed`: schedule `{cron}` {why}"
                )),
                "{cron}: {e}"
            );
        }
        // Rare but real: every one of these fires (29 February every four years, the 31st
        // of the months that have one, a weekday or the 1st).
        for cron in [
            "0 0 0 29 2 *",
            "0 0 0 31 * *",
            "0 0 8 1 * MON",
            "0 0 12 29 2 * 2028",
            "0 0 0 29 2 MON",
            "0 0 0 L 2 *",
        ] {
            let text = GOOD.replace("0 */30 * * * *", cron);
            Config::parse(&text, "agent.toml").unwrap_or_else(|e| panic!("{cron}: {e}"));
        }
    }

    #[test]
    fn results_the_collector_would_refuse_are_refused_here() {
        let agent_labels: Vec<String> = (0..20).map(|i| format!("a{i} = \"x\"")).collect();
        let test_labels: Vec<String> = (0..20).map(|i| format!("t{i} = \"y\"")).collect();
        let text = GOOD
            .replace(
                "labels = { site = \"berlin\", isp = \"acme\" }",
                &format!("labels = {{ {} }}", agent_labels.join(", ")),
            )
            .replace(
                "every = \"30s\"",
                &format!("every = \"30s\"\nlabels = {{ {} }}", test_labels.join(", ")),
            );
        let e = err(&text);
        assert_eq!(
            e,
            "agent.toml:24:10: test `web`: 40 labels after merging [agent] labels, at most 32"
        );
        // The same keys overlay instead of adding up.
        let overlay = text.replace("t1 =", "a1 =").replace("t2 =", "a2 =");
        let e = err(&overlay);
        assert!(e.contains("38 labels after merging"), "{e}");

        let e = err(&GOOD.replace("\"berlin\"", "\"ber\\u0000lin\""));
        assert!(e.starts_with("agent.toml:4:10: label `site`"), "{e}");
        let e = err(&GOOD.replace("\"berlin\"", "\"ber\\tlin\""));
        assert!(e.contains("control characters"), "{e}");
        let e = err(&GOOD.replace("\"berlin\"", &format!("\"{}\"", "b".repeat(129))));
        assert!(e.contains("129 bytes, at most 128"), "{e}");
        let e = err(&GOOD.replace("name = \"web\"", "name = \"w\\neb\""));
        assert!(
            e.starts_with("agent.toml:20:8: test name contains control"),
            "{e}"
        );
        let long = format!("https://example.net/{}", "p".repeat(2048));
        let e = err(&GOOD.replace("https://example.net/", &long));
        assert!(e.starts_with("agent.toml:22:10: target is"), "{e}");
        let e = err(&GOOD.replace("\"branch-042\"", "\"branch\\u0007\""));
        assert!(
            e.starts_with("agent.toml:3:6: agent id contains control"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    const FLEET: &str = r#"
[[test]]
name = "berlin-speed"
kind = "speed"
target = "http://speed.example.net:8080"
schedule = "0 */30 * * * *"
select = { site = "berlin" }
options = { duration = "10s", streams = 4 }

[[test]]
name = "dns"
kind = "dns"
target = "example.net"
every = "1m"
agents = ["branch-042", "branch-043"]

[[test]]
name = "everywhere"
kind = "tcp"
target = "example.net:443"
every = "30s"
"#;

    #[test]
    fn a_fleet_file_selects_by_labels_or_ids_and_pushes_plain_tests() {
        let f = FleetFile::parse(FLEET, "fleet.toml").unwrap();
        assert_eq!(f.tests.len(), 3);
        let berlin: BTreeMap<_, _> = [("site".to_string(), "berlin".to_string())].into();
        let paris: BTreeMap<_, _> = [("site".to_string(), "paris".to_string())].into();
        let names = |id: &str, labels: &BTreeMap<String, String>| {
            // As the collector builds a push: the selected blocks, joined.
            let pushed = f
                .tests
                .iter()
                .filter(|t| t.selects(id, labels))
                .map(|t| t.spec_toml.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            let agent = Config::parse(&format!("[collector]\nendpoints = [\"http://c:1\"]\ninsecure = true\n[agent]\nid = \"{id}\"\n"), "a").unwrap();
            parse_pushed_tests(&pushed, "pushed", &agent)
                .unwrap()
                .iter()
                .map(|t| t.name.get_ref().clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names("branch-042", &berlin),
            ["berlin-speed", "dns", "everywhere"]
        );
        assert_eq!(names("branch-044", &paris), ["everywhere"]);
        assert_eq!(names("branch-043", &paris), ["dns", "everywhere"]);
        // The pushed block keeps the options and drops the selection.
        let spec = &f.tests[0].spec_toml;
        assert!(
            spec.contains("streams = 4") && !spec.contains("select"),
            "{spec}"
        );
    }

    #[test]
    fn fleet_file_errors_are_located_like_checks() {
        let err = |text: &str| {
            FleetFile::parse(text, "fleet.toml")
                .unwrap_err()
                .to_string()
        };
        let both = FLEET.replace(
            "every = \"1m\"\nagents",
            "every = \"1m\"\nselect = { a = \"b\" }\nagents",
        );
        assert!(
            err(&both).starts_with("fleet.toml:16:10: test `dns` sets both"),
            "{}",
            err(&both)
        );
        let bad_kind = FLEET.replace("kind = \"tcp\"", "kind = \"tcpx\"");
        assert!(
            err(&bad_kind).starts_with("fleet.toml:19:8:"),
            "{}",
            err(&bad_kind)
        );
        let no_schedule = FLEET.replace("every = \"30s\"\n", "");
        assert!(
            err(&no_schedule).contains("needs `schedule`"),
            "{}",
            err(&no_schedule)
        );
        assert!(err("[agent]\nid = \"x\"\n").contains("unknown field `agent`"));
        let dup = format!("{FLEET}\n[[test]]\nname = \"dns\"\nkind = \"dns\"\ntarget = \"x.net\"\nevery = \"1m\"\n");
        assert!(
            err(&dup).contains("duplicate test name `dns`"),
            "{}",
            err(&dup)
        );
    }

    #[test]
    fn a_pushed_test_may_not_take_a_local_name_or_bust_the_label_bound() {
        let agent = Config::parse(GOOD, "agent.toml").unwrap();
        let clash = "[[test]]\nname = \"internet-speed\"\nkind = \"tcp\"\ntarget = \"a:1\"\nevery = \"1m\"\n";
        let e = parse_pushed_tests(clash, "fleet v3", &agent)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("fleet v3:2:8: fleet test `internet-speed` has the name of a test in this agent's own config file"), "{e}");
        let labels: Vec<String> = (0..31).map(|i| format!("l{i} = \"v\"")).collect();
        let many = format!("[[test]]\nname = \"t\"\nkind = \"tcp\"\ntarget = \"a:1\"\nevery = \"1m\"\nlabels = {{ {} }}\n", labels.join(", "));
        let e = parse_pushed_tests(&many, "fleet v3", &agent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("33 labels after merging [agent] labels"), "{e}");
    }

    #[test]
    fn select_in_an_agent_file_points_to_the_fleet() {
        let text = GOOD.replace(
            "options = { duration",
            "select = { site = \"x\" }\noptions = { duration",
        );
        let e = Config::parse(&text, "agent.toml").unwrap_err().to_string();
        assert!(
            e.contains("`select` chooses agents for a fleet test"),
            "{e}"
        );
    }

    #[test]
    fn an_adhoc_test_has_no_schedule() {
        let t = parse_adhoc_test("[[test]]\nname = \"run-now\"\nkind = \"tcp\"\ntarget = \"a:1\"\noptions = { timeout = \"2s\" }\n", "run-now").unwrap();
        assert_eq!(t.kind, Kind::Tcp);
        let e = parse_adhoc_test(
            "[[test]]\nname = \"x\"\nkind = \"tcp\"\ntarget = \"a:1\"\nevery = \"1m\"\n",
            "run-now",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("runs once, now"), "{e}");
        let e = parse_adhoc_test(
            "[[test]]\nname = \"x\"\nkind = \"tcp\"\ntarget = \"nope\"\n",
            "run-now",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("run-now:4:10:"), "{e}");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use edgeprobe_proto::testdef::line_col;
    use proptest::prelude::*;

    /// Fragments of real agent config, so random files get past the TOML parser often
    /// and reach the checks after it.
    fn fragment() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            "\"[^\"\\\\\n]{0,24}\"",
            prop::sample::select(vec![
                "\"30s\"",
                "\"0s\"",
                "\"256MiB\"",
                "\"99999999999GiB\"",
                "\"* * * * * *\"",
                "\"* * * 30 * 2\"",
                "\"Europe/Berlin\"",
                "\"0 */30 * *\"",
                "\"http://127.0.0.1:1\"",
                "\"https://h:7443\"",
                "\"speed\"",
                "\"http\"",
                "\"icmp\"",
                "\"tcp\"",
                "\"dns\"",
                "[\"https://h:1\"]",
                "[]",
                "{ site = \"x\" }",
                "{ duration = \"1s\", streams = 0 }",
                "true",
                "-1",
                "1e400",
            ])
            .prop_map(String::from),
            any::<i64>().prop_map(|n| n.to_string()),
        ];
        prop_oneof![
            prop::sample::select(vec!["[agent]\n", "[collector]\n", "[[test]]\n", "[test]\n"])
                .prop_map(String::from),
            (
                prop::sample::select(vec![
                    "id",
                    "labels",
                    "state_dir",
                    "buffer_max_bytes",
                    "endpoints",
                    "ca",
                    "cert",
                    "key",
                    "insecure",
                    "name",
                    "kind",
                    "target",
                    "schedule",
                    "every",
                    "timezone",
                    "options",
                    "timeout",
                    "bogus",
                ]),
                value
            )
                .prop_map(|(k, v)| format!("{k} = {v}\n")),
            "(?s).{0,12}",
        ]
    }

    proptest! {
        #[test]
        fn any_text_is_parsed_or_refused(text in "(?s).{0,300}") {
            let _ = Config::parse(&text, "agent.toml");
        }

        #[test]
        fn config_shaped_text_never_panics(parts in prop::collection::vec(fragment(), 0..20)) {
            let text = parts.concat();
            if let Err(ConfigError::Invalid { line, col, .. }) = Config::parse(&text, "agent.toml") {
                prop_assert!(line >= 1 && col >= 1);
            }
        }

        #[test]
        fn line_col_takes_any_offset(text in "(?s).{0,64}", offset in 0usize..80) {
            let (line, col) = line_col(&text, offset);
            prop_assert!(line >= 1 && col >= 1);
        }

        #[test]
        fn sizes_and_durations_never_panic(s in "(?s).{0,24}", n in any::<u64>(), unit in "[A-Za-z]{0,4}") {
            let _ = parse_size(&s);
            let _ = parse_size(&format!("{n}{unit}"));
            let _ = parse_duration(&s);
        }
    }
}
