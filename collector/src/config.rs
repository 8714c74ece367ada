//! Collector configuration: the TOML file of SPEC section 9, with command-line and
//! environment overrides, parsed once and checked once.
//!
//! Unknown keys are errors, every error is located (`file:line:col: reason`), and the
//! database URL is never printed (it may carry a password).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeprobe_proto::testdef::line_col;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub database: DatabaseSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The operators' HTTP API (`api.rs`); absent: no API listener at all.
    pub api: Option<ApiSection>,
    #[serde(default)]
    pub fleet: FleetSection,
}

/// `[fleet]`: how the operator commands and the API judge the fleet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// An agent not heard from for longer than this is shown as stale (gone, or cut off
    /// for long), not as behind on the fleet tests.
    #[serde(default = "default_stale_after", deserialize_with = "de_duration")]
    pub stale_after: Duration,
}

impl Default for FleetSection {
    fn default() -> Self {
        FleetSection {
            stale_after: default_stale_after(),
        }
    }
}

/// An agent unheard of for a day is stale unless configured otherwise.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(86_400);

fn default_stale_after() -> Duration {
    DEFAULT_STALE_AFTER
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    edgeprobe_proto::testdef::parse_duration(&s).map_err(serde::de::Error::custom)
}

/// `[api]`: the HTTP API's own listener. It uses `[server]`'s certificate and key and
/// requires a client certificate from `client_ca` with the operator role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// Plaintext gRPC without client certificates. Local demos only.
    #[serde(default)]
    pub insecure: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Length of the gRPC listener's accept queue; `None` takes the kernel's
    /// `net.core.somaxconn`, which also caps any value given here.
    pub listen_backlog: Option<u32>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            grpc_listen: default_grpc_listen(),
            http_listen: default_http_listen(),
            insecure: false,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            listen_backlog: None,
        }
    }
}

fn default_grpc_listen() -> SocketAddr {
    "0.0.0.0:7443".parse().expect("valid literal")
}

fn default_http_listen() -> SocketAddr {
    "127.0.0.1:9464".parse().expect("valid literal")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    pub url: Option<String>,
    /// Results older than this are dropped with their daily partition; at least
    /// [`MIN_RETENTION`].
    #[serde(default = "default_retention", deserialize_with = "de_retention")]
    pub retention: Duration,
    /// Concurrent Postgres writer connections.
    #[serde(default = "default_writers")]
    pub writers: usize,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        DatabaseSection {
            url: None,
            retention: default_retention(),
            writers: default_writers(),
        }
    }
}

fn default_retention() -> Duration {
    Duration::from_secs(90 * 86_400)
}

fn default_writers() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// The agent label that result aggregates are grouped by.
    #[serde(default = "default_site_label")]
    pub site_label: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            site_label: default_site_label(),
        }
    }
}

fn default_site_label() -> String {
    "site".to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {reason}")]
    Invalid {
        path: String,
        line: usize,
        col: usize,
        reason: String,
    },
    #[error("{0}")]
    Other(String),
}

impl Config {
    /// Reads and checks a config file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config {
                server: ServerSection::default(),
                database: DatabaseSection::default(),
                metrics: MetricsSection::default(),
                api: None,
                fleet: FleetSection::default(),
            });
        };
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        Config::parse(&text, &origin)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, col) = line_col(text, e.span().map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: origin.to_string(),
                line,
                col,
                reason: e.message().trim().replace('\n', " "),
            }
        })?;
        // Here rather than in `finish`, so `check` refuses it too.
        if config.server.insecure && config.api.is_some() {
            return Err(ConfigError::Other(format!(
                "{origin}: [api] needs mTLS (operator certificates) and cannot run with `insecure = true`; remove [api] or the insecure mode"
            )));
        }
        Ok(config)
    }

    /// Applies overrides and fills the database URL from the environment, then checks the
    /// combination.
    pub fn finish(
        mut self,
        database_url: Option<String>,
        grpc_listen: Option<SocketAddr>,
        http_listen: Option<SocketAddr>,
    ) -> Result<Config, ConfigError> {
        // `run` gets the environment file from its unit (EnvironmentFile=), not from here.
        self.database.url =
            self::database_url(database_url, self.database.url.take(), &[]).map(|(_, url)| url);
        if let Some(a) = grpc_listen {
            self.server.grpc_listen = a;
        }
        if let Some(a) = http_listen {
            self.server.http_listen = a;
        }
        if self.database.url.is_none() {
            return Err(ConfigError::Other(
                "no database URL: set [database] url, --database-url, EDGEPROBE_DATABASE_URL or DATABASE_URL"
                    .into(),
            ));
        }
        // The TLS settings of the URL and the files they name are checked here, so a typo
        // fails at start-up with exit 2.
        crate::pg::Target::parse(self.database_url())
            .map_err(|e| ConfigError::Other(e.to_string()))?;
        if self.database.writers == 0 || self.database.writers > 64 {
            return Err(ConfigError::Other(
                "[database] writers must be 1..=64".into(),
            ));
        }
        if self.server.listen_backlog == Some(0) {
            return Err(ConfigError::Other(
                "[server] listen_backlog must be at least 1".into(),
            ));
        }
        if !self.server.insecure {
            for (name, value) in [
                ("tls_cert", &self.server.tls_cert),
                ("tls_key", &self.server.tls_key),
                ("client_ca", &self.server.client_ca),
            ] {
                if value.is_none() {
                    return Err(ConfigError::Other(format!(
                        "[server] needs `{name}` (mTLS is the default); set `insecure = true` only for local demos"
                    )));
                }
            }
        }
        Ok(self)
    }

    pub fn database_url(&self) -> &str {
        self.database.url.as_deref().unwrap_or_default()
    }
}

/// Where a database URL came from (for messages; the URL itself is never printed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlSource {
    /// `--database-url`.
    Flag,
    /// The configuration file's `[database] url`.
    File,
    /// An environment variable, by name.
    Env(&'static str),
    /// A variable of the environment file beside the configuration, by name.
    EnvFile(&'static str),
}

impl std::fmt::Display for UrlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlSource::Flag => f.write_str("--database-url"),
            UrlSource::File => f.write_str("the file"),
            UrlSource::Env(var) => write!(f, "${var}"),
            UrlSource::EnvFile(var) => write!(f, "{var} in {ENV_FILE_NAME}"),
        }
    }
}

/// The variables a database URL is taken from, in order, when neither the flag nor the
/// file gives one (the systemd unit's EnvironmentFile sets them).
pub const URL_VARIABLES: [&str; 2] = ["EDGEPROBE_DATABASE_URL", "DATABASE_URL"];

/// The packaged configuration: what the operator commands read without `--config`.
pub const DEFAULT_CONFIG: &str = "/etc/edgeprobe/collector.toml";

/// The environment file beside a configuration file, as the packaged unit reads it
/// (`EnvironmentFile=-/etc/edgeprobe/collector.env`): where the database URL with its
/// password usually is.
pub const ENV_FILE_NAME: &str = "collector.env";

/// The environment file that belongs to the configuration at `config`.
pub fn env_file_of(config: &Path) -> PathBuf {
    config.with_file_name(ENV_FILE_NAME)
}

/// The variables of a systemd environment file (`KEY=VALUE` lines, `#` and `;`
/// comments, values optionally in single or double quotes). A missing file has none;
/// one that exists but cannot be read is an error (a root-only file read by another
/// user, say), so the reason is not a puzzling "no database URL".
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect())
}

/// The one resolution of the database URL, used by `run`, `check`, `migrate` and the
/// operator commands: the flag, else the file's `[database] url`, else
/// EDGEPROBE_DATABASE_URL, else DATABASE_URL from the environment, else from `env_file`
/// (the variables of the configuration's `collector.env`, for commands run from a shell;
/// `run` gets them from its unit). `None` when none is set; each caller says which of
/// these it offers in its error.
pub fn database_url(
    flag: Option<String>,
    file: Option<String>,
    env_file: &[(String, String)],
) -> Option<(UrlSource, String)> {
    flag.map(|url| (UrlSource::Flag, url))
        .or_else(|| file.map(|url| (UrlSource::File, url)))
        .or_else(|| {
            URL_VARIABLES
                .into_iter()
                .find_map(|v| std::env::var(v).ok().map(|url| (UrlSource::Env(v), url)))
        })
        .or_else(|| {
            URL_VARIABLES.into_iter().find_map(|v| {
                env_file
                    .iter()
                    .find(|(k, _)| k == v)
                    .map(|(_, url)| (UrlSource::EnvFile(v), url.clone()))
            })
        })
}

/// The shortest retention accepted: partitions are whole UTC days, so anything shorter
/// would drop yesterday's partition while it still receives late results (an agent that
/// was offline, a buffer drained after midnight), and the dashboards' "last 24 h" would
/// lose rows at every upkeep.
pub const MIN_RETENTION: Duration = Duration::from_secs(2 * 86_400);

/// Parses a retention (`90d`), refusing one below [`MIN_RETENTION`]; the message says why.
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration `{s}` ({e}); use e.g. \"90d\""))?;
    if d < MIN_RETENTION {
        return Err(format!(
            "retention `{s}` is below the minimum of 2d: partitions are whole days, and a shorter retention would drop yesterday's partition while late results still land in it"
        ));
    }
    Ok(d)
}

fn de_retention<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_retention(&s).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec_example_and_locates_errors() {
        let text = r#"
[server]
grpc_listen = "0.0.0.0:7443"
http_listen = "127.0.0.1:9464"
tls_cert = "/etc/edgeprobe/tls/collector.pem"
tls_key = "/etc/edgeprobe/tls/collector.key"
client_ca = "/etc/edgeprobe/tls/ca.pem"

[database]
url = "postgres://edgeprobe@localhost/edgeprobe"
retention = "90d"

[metrics]
site_label = "site"
"#;
        let c = Config::parse(text, "c.toml")
            .unwrap()
            .finish(None, None, None)
            .unwrap();
        assert_eq!(c.database.retention, Duration::from_secs(90 * 86_400));
        let e = Config::parse(
            &text.replace("retention = \"90d\"", "retention = \"90 moons\""),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c.toml:11:13: invalid duration"), "{e}");
        // Below two days: refused, located, with the reason.
        for short in ["12h", "1d", "47h 59m"] {
            let e = Config::parse(
                &text.replace("retention = \"90d\"", &format!("retention = \"{short}\"")),
                "c.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("c.toml:11:13: retention") && e.contains("minimum of 2d"),
                "{e}"
            );
        }
        let c = Config::parse(&text.replace("\"90d\"", "\"2d\""), "c.toml").unwrap();
        assert_eq!(c.database.retention, MIN_RETENTION);
        let e = Config::parse(&text.replace("site_label", "site_lable"), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml:14:1: unknown field `site_lable`"),
            "{e}"
        );
        let c = Config::parse(
            &text.replace("[server]\n", "[server]\nlisten_backlog = 16384\n"),
            "c.toml",
        )
        .unwrap()
        .finish(None, None, None)
        .unwrap();
        assert_eq!(c.server.listen_backlog, Some(16384));
        let e = Config::parse(
            &text.replace("[server]\n", "[server]\nlisten_backlog = 0\n"),
            "c.toml",
        )
        .unwrap()
        .finish(None, None, None)
        .unwrap_err()
        .to_string();
        assert!(e.contains("listen_backlog must be at least 1"), "{e}");

        // [api]: absent by default, an address when given, never beside insecure mode.
        assert!(Config::parse(text, "c.toml").unwrap().api.is_none());
        let with_api = format!("{text}\n[api]\nlisten = \"127.0.0.1:9443\"\n");
        let c = Config::parse(&with_api, "c.toml")
            .unwrap()
            .finish(None, None, None)
            .unwrap();
        assert_eq!(
            c.api.unwrap().listen,
            "127.0.0.1:9443".parse::<SocketAddr>().unwrap()
        );
        let e = Config::parse(&with_api.replace("listen =", "listn ="), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:17:1: unknown field `listn`"), "{e}");
        let e = Config::parse(
            &with_api.replace("[server]\n", "[server]\ninsecure = true\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[api] needs mTLS"), "{e}");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Fragments of real config text, so random files get past the TOML parser often.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("[server]\n".to_string()),
            Just("[database]\n".to_string()),
            Just("[metrics]\n".to_string()),
            Just("[api]\n".to_string()),
            Just("[[server]]\n".to_string()),
            prop::sample::select(vec![
                "grpc_listen",
                "http_listen",
                "insecure",
                "tls_cert",
                "tls_key",
                "client_ca",
                "listen_backlog",
                "url",
                "retention",
                "writers",
                "site_label",
                "listen",
                "bogus",
            ])
            .prop_flat_map(|k| {
                prop_oneof![
                    "\"[^\"\\\\\n]{0,24}\"",
                    Just("\"127.0.0.1:0\"".to_string()),
                    Just("\"90d\"".to_string()),
                    any::<i64>().prop_map(|n| n.to_string()),
                    any::<bool>().prop_map(|b| b.to_string()),
                    Just("[1, \"a\"]".to_string()),
                    Just("{ a = 1 }".to_string()),
                ]
                .prop_map(move |v| format!("{k} = {v}\n"))
            }),
            "(?s).{0,12}",
        ]
    }

    proptest! {
        #[test]
        fn any_text_is_parsed_or_refused_with_a_location(text in "(?s).{0,300}") {
            let _ = Config::parse(&text, "c.toml");
        }

        #[test]
        fn config_shaped_text_never_panics(parts in prop::collection::vec(fragment(), 0..16)) {
            let text = parts.concat();
            match Config::parse(&text, "c.toml") {
                Ok(c) => {
                    let _ = c.finish(Some("postgres://u@h/d".into()), None, None);
                }
                Err(ConfigError::Invalid { line, col, .. }) => {
                    prop_assert!(line >= 1 && col >= 1);
                    prop_assert!(line <= text.lines().count().max(1) + 1);
                }
                Err(_) => {}
            }
        }

        #[test]
        fn line_col_takes_any_span(text in "(?s).{0,64}", start in 0usize..80) {
            let (line, col) = line_col(&text, start);
            prop_assert!(line >= 1 && col >= 1);
        }
    }
}
