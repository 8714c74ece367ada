//! A test block (`[[test]]`): its typed form, its options by kind, the checks that need
//! more than one field, and the default whole-run limit of each kind.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::located::Blame;
use super::target::check_target;
use super::units::*;
use super::{CronSchedule, Kind};
use crate::bounds;

/// One `[[test]]` block: what runs, where, when, with which labels and options. Spans
/// locate checks in the text it came from; equality and serialisation ignore them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestConfig {
    pub name: Spanned<String>,
    pub kind: Kind,
    pub target: Spanned<String>,
    /// Cron with seconds: `sec min hour day-of-month month day-of-week`.
    #[serde(
        default,
        deserialize_with = "de_opt_cron",
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule: Option<Spanned<CronSchedule>>,
    /// Overrides `[agent] timezone` for this test's `schedule`.
    #[serde(
        default,
        deserialize_with = "de_opt_timezone",
        serialize_with = "ser_opt_timezone",
        skip_serializing_if = "Option::is_none"
    )]
    pub timezone: Option<Tz>,
    /// Fixed interval, e.g. "30s" or "30m".
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub every: Option<Duration>,
    /// Each run starts after a random delay in [0, spread).
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub spread: Option<Duration>,
    /// Merged over the agent's labels; the span locates a merged count over the bound.
    #[serde(
        default = "default_labels",
        deserialize_with = "de_spanned_labels",
        skip_serializing_if = "no_labels"
    )]
    pub labels: Spanned<BTreeMap<String, String>>,
    #[serde(default = "default_options", skip_serializing_if = "no_options")]
    pub options: Spanned<TestOptions>,
    /// Fleet tests only (`FleetFile`): the agents whose `[agent] labels` hold all of these.
    #[serde(
        default,
        deserialize_with = "de_opt_spanned_labels",
        skip_serializing_if = "Option::is_none"
    )]
    pub select: Option<Spanned<BTreeMap<String, String>>>,
    /// Fleet tests only (`FleetFile`): the agent ids this test runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Spanned<Vec<String>>>,
}

fn default_labels() -> Spanned<BTreeMap<String, String>> {
    Spanned::new(0..0, BTreeMap::new())
}

fn default_options() -> Spanned<TestOptions> {
    Spanned::new(0..0, TestOptions::default())
}

/// Options of a test. One struct for all kinds so unknown keys are located by the parser;
/// `Config::check` then refuses options that do not apply to the test's kind.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestOptions {
    /// Whole-run limit (all kinds).
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    // speed
    /// Measurement time per direction.
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub duration: Option<Duration>,
    /// Parallel streams for both directions (overridden by the per-direction keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_streams: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_streams: Option<u32>,
    /// Start of each direction excluded from the rate (TCP slow start).
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub warmup: Option<Duration>,
    /// Idle latency round trips.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pings: Option<u32>,
    // icmp
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    // tcp
    /// Also time a TLS handshake after connecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    // http
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_match: Option<String>,
    /// Redirects followed, at most (default 0: a 3xx is the answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow_redirects: Option<u32>,
    // tcp, http
    /// Accept any server certificate (still measured and reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_tls: Option<bool>,
    // dns
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    // path
    /// Probe packets: ICMP echo (default), UDP or TCP SYN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PathProtocol>,
    /// Destination port of UDP and TCP probes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Highest TTL (hop limit) probed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_hops: Option<u32>,
    // responsiveness
    /// Longest time each direction (download, upload) may take to reach stability.
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_duration: Option<Duration>,
}

/// The packets a path test probes with (SPEC section 15).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathProtocol {
    /// ICMP echo request (CAP_NET_RAW).
    #[default]
    Icmp,
    /// UDP datagrams, errors read with IP_RECVERR (no privileges).
    Udp,
    /// TCP SYN (CAP_NET_RAW).
    Tcp,
}

impl PathProtocol {
    pub fn name(self) -> &'static str {
        match self {
            PathProtocol::Icmp => "icmp",
            PathProtocol::Udp => "udp",
            PathProtocol::Tcp => "tcp",
        }
    }
}

impl TestOptions {
    /// The option keys that are set, for the per-kind applicability check.
    pub fn set_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        macro_rules! key {
            ($($f:ident),*) => { $( if self.$f.is_some() { keys.push(stringify!($f)); } )* };
        }
        key!(
            timeout,
            duration,
            streams,
            download_streams,
            upload_streams,
            warmup,
            pings,
            count,
            interval,
            tls,
            method,
            expect_status,
            body_match,
            follow_redirects,
            insecure_tls,
            record_type,
            server,
            protocol,
            port,
            max_hops,
            max_duration
        );
        keys
    }

    pub fn allowed(kind: Kind) -> &'static [&'static str] {
        match kind {
            Kind::Speed => &[
                "timeout",
                "duration",
                "streams",
                "download_streams",
                "upload_streams",
                "warmup",
                "pings",
            ],
            Kind::Icmp => &["timeout", "count", "interval"],
            Kind::Tcp => &["timeout", "tls", "insecure_tls"],
            Kind::Http => &[
                "timeout",
                "method",
                "expect_status",
                "body_match",
                "follow_redirects",
                "insecure_tls",
            ],
            Kind::Dns => &["timeout", "record_type", "server"],
            Kind::Path => &[
                "timeout", "count", "interval", "protocol", "port", "max_hops",
            ],
            Kind::Responsiveness => &["timeout", "max_duration", "insecure_tls"],
        }
    }
}

fn no_labels(labels: &Spanned<BTreeMap<String, String>>) -> bool {
    labels.get_ref().is_empty()
}

fn no_options(options: &Spanned<TestOptions>) -> bool {
    options.get_ref() == &TestOptions::default()
}

/// Defaults of the probes that the whole-run limit depends on.
pub mod defaults {
    use std::time::Duration;

    /// Speed: measurement time per direction.
    pub const SPEED_DURATION: Duration = Duration::from_secs(10);
    /// ICMP: echo requests per run.
    pub const ICMP_COUNT: u32 = 5;
    /// ICMP: time between echo requests.
    pub const ICMP_INTERVAL: Duration = Duration::from_secs(1);
    /// TCP, HTTP and DNS: the whole run.
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    /// Path: rounds per run.
    pub const PATH_COUNT: u32 = 10;
    /// Path: time between rounds.
    pub const PATH_INTERVAL: Duration = Duration::from_secs(1);
    /// Path: highest TTL probed.
    pub const PATH_MAX_HOPS: u32 = 30;
    /// Path: how long the last round's probes are waited for.
    pub const PATH_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
    /// Path: destination port of UDP probes (traceroute's base port).
    pub const PATH_UDP_PORT: u16 = 33434;
    /// Path: destination port of TCP SYN probes.
    pub const PATH_TCP_PORT: u16 = 80;
    /// Responsiveness: longest time of each direction (draft-ietf-ippm-responsiveness).
    pub const RESPONSIVENESS_MAX_DURATION: Duration = Duration::from_secs(20);
}

impl TestOptions {
    /// The whole-run limit of a test of `kind` with these options: `timeout` when set, else
    /// the kind's default (speed: both directions plus 30 s; icmp: every request plus 5 s;
    /// tcp, http, dns: 10 s; path: every round plus 8 s; responsiveness: both directions
    /// plus 15 s).
    pub fn timeout_for(&self, kind: Kind) -> Duration {
        self.timeout.unwrap_or_else(|| match kind {
            Kind::Speed => {
                self.duration.unwrap_or(defaults::SPEED_DURATION) * 2 + Duration::from_secs(30)
            }
            Kind::Icmp => {
                self.interval.unwrap_or(defaults::ICMP_INTERVAL)
                    * self.count.unwrap_or(defaults::ICMP_COUNT)
                    + Duration::from_secs(5)
            }
            Kind::Tcp | Kind::Http | Kind::Dns => defaults::TIMEOUT,
            Kind::Path => {
                self.interval.unwrap_or(defaults::PATH_INTERVAL)
                    * self.count.unwrap_or(defaults::PATH_COUNT)
                    + defaults::PATH_PROBE_TIMEOUT
                    + Duration::from_secs(5)
            }
            Kind::Responsiveness => {
                self.max_duration
                    .unwrap_or(defaults::RESPONSIVENESS_MAX_DURATION)
                    * 2
                    + Duration::from_secs(15)
            }
        })
    }
}

impl TestConfig {
    /// The whole-run limit of this test (see [`TestOptions::timeout_for`]).
    pub fn timeout(&self) -> Duration {
        self.options.get_ref().timeout_for(self.kind)
    }
}

/// Whether a test must have `schedule` or `every` (ad-hoc run-now tests have neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    Required,
    Forbidden,
}

/// What a check knows of the agent a test runs on.
#[derive(Debug, Clone, Copy)]
pub struct AgentContext<'a> {
    /// `[agent] labels`, which a test's labels are merged over.
    pub labels: &'a BTreeMap<String, String>,
    /// `[agent] timezone`, the zone of a schedule without its own.
    pub timezone: Tz,
}

/// The checks of one test that need more than one field, shared by the agent's file,
/// fleet tests files and ad-hoc tests. `agent` is `None` where the agent is not known (the
/// collector checking a fleet file): the merged label count is then checked by the agent
/// when the test reaches it, and a schedule without its own `timezone` is read in UTC.
pub fn check_test(
    test: &TestConfig,
    agent: Option<AgentContext<'_>>,
    schedule: Scheduling,
) -> Result<(), Blame> {
    let agent_labels = agent.map(|a| a.labels);
    let name = test.name.get_ref();
    bounds::test_name(name).map_err(|e| (Some(test.name.span()), e.to_string()))?;
    match (schedule, &test.schedule, &test.every) {
        (Scheduling::Required, Some(_), Some(_)) => {
            return Err((
                Some(test.name.span()),
                format!("test `{name}` sets both `schedule` and `every`; choose one"),
            ))
        }
        (Scheduling::Required, None, None) => {
            return Err((
                Some(test.name.span()),
                format!("test `{name}` needs `schedule` (cron with seconds) or `every`"),
            ))
        }
        (Scheduling::Forbidden, Some(_), _) | (Scheduling::Forbidden, _, Some(_)) => {
            return Err((
                Some(test.name.span()),
                format!("test `{name}` runs once, now: leave out `schedule` and `every`"),
            ))
        }
        _ => {}
    }
    if test.timezone.is_some() && test.schedule.is_none() {
        return Err((
            Some(test.name.span()),
            format!("test `{name}`: `timezone` applies to `schedule` only, not `every`"),
        ));
    }
    if let Some(cron) = &test.schedule {
        let tz = test
            .timezone
            .or(agent.map(|a| a.timezone))
            .unwrap_or(chrono_tz::UTC);
        cron.get_ref()
            .check_fires(tz, chrono::Utc::now())
            .map_err(|reason| (Some(cron.span()), format!("test `{name}`: {reason}")))?;
    }
    if let Some(every) = test.every {
        if every < Duration::from_millis(10) {
            return Err((
                Some(test.name.span()),
                format!("test `{name}`: `every` must be at least 10ms"),
            ));
        }
    }
    check_target(test.kind, test.target.get_ref())
        .map_err(|reason| (Some(test.target.span()), reason))?;
    if let Some(agent_labels) = agent_labels {
        let own = test.labels.get_ref();
        let merged = agent_labels.len()
            + own
                .keys()
                .filter(|k| !agent_labels.contains_key(*k))
                .count();
        if merged > bounds::MAX_LABELS {
            return Err((
                Some(test.labels.span()),
                format!(
                    "test `{name}`: {merged} labels after merging [agent] labels, at most {}",
                    bounds::MAX_LABELS
                ),
            ));
        }
    }
    let allowed = TestOptions::allowed(test.kind);
    for key in test.options.get_ref().set_keys() {
        if !allowed.contains(&key) {
            return Err((
                Some(test.options.span()),
                format!(
                    "option `{key}` does not apply to kind {}; it takes: {}",
                    test.kind,
                    allowed.join(", ")
                ),
            ));
        }
    }
    if test.kind == Kind::Responsiveness {
        if let Some(d) = test.options.get_ref().max_duration {
            if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&d) {
                return Err((
                    Some(test.options.span()),
                    format!("test `{name}`: `max_duration` must be 2s to 300s"),
                ));
            }
        }
    }
    if test.kind == Kind::Path {
        check_path_options(name, test.options.get_ref())
            .map_err(|reason| (Some(test.options.span()), reason))?;
    }
    Ok(())
}

/// The value ranges of a path test's options (`name` is the test's, for the message).
pub fn check_path_options(name: &str, o: &TestOptions) -> Result<(), String> {
    if let Some(hops) = o.max_hops {
        if hops == 0 || hops as usize > bounds::MAX_PATH_HOPS {
            return Err(format!(
                "test `{name}`: `max_hops` is {hops}, it must be 1 to {}",
                bounds::MAX_PATH_HOPS
            ));
        }
    }
    if o.count == Some(0) {
        return Err(format!("test `{name}`: `count` must be at least 1"));
    }
    if o.port == Some(0) {
        return Err(format!("test `{name}`: `port` must be 1 to 65535"));
    }
    if o.port.is_some() && o.protocol.unwrap_or_default() == PathProtocol::Icmp {
        return Err(format!(
            "test `{name}`: `port` applies to protocol udp or tcp, not icmp"
        ));
    }
    Ok(())
}
