//! A test block (`[[test]]`): its typed form, its options by kind, the checks that need
//! more than one field, and the default whole-run limit of each kind.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::located::Blame;
use super::target::{check_target, parse_ip};
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
    // stamp
    /// DSCP of the test packets (0 to 63; RFC 2474), e.g. 46 (EF) as voice is marked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
    /// UDP payload of each test packet in bytes (RFC 8762 unauthenticated: 44 at least).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_size: Option<u32>,
    // every kind: which link and family a test leaves by
    /// The interface the test's sockets are bound to (SO_BINDTODEVICE), e.g. "wwan0".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The local address the test's sockets are bound to before they connect or send
    /// (an IPv6 address may carry `%zone`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The IP family the test resolves and connects in: ipv4, ipv6, any (default) or both
    /// (the test runs once per family and records two results).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<IpFamily>,
}

/// The IP family a test uses (`family`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv4,
    Ipv6,
    /// Whichever the resolver gives first (today's behaviour).
    #[default]
    Any,
    /// Once per family: two results.
    Both,
}

impl IpFamily {
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Any => "any",
            IpFamily::Both => "both",
        }
    }

    /// Whether an address of this family is taken (`any` and `both` take either).
    pub fn admits(self, ip: &std::net::IpAddr) -> bool {
        match self {
            IpFamily::Ipv4 => ip.is_ipv4(),
            IpFamily::Ipv6 => ip.is_ipv6(),
            IpFamily::Any | IpFamily::Both => true,
        }
    }
}

/// Linux's rule for an interface name (`dev_valid_name` in net/core/dev.c): 1 to 15
/// bytes, not "." or "..", no '/', ':' or whitespace (C isspace, so \v too).
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b == 0x0b || b.is_ascii_whitespace())
}

/// The `interface`, `source` and `family` options (every kind): syntax, and a `source`
/// of the family that `family` names.
pub fn check_link_options(name: &str, o: &TestOptions) -> Result<(), String> {
    if let Some(interface) = &o.interface {
        if !is_interface_name(interface) {
            return Err(format!(
                "test `{name}`: `interface` `{interface}` is not an interface name (1 to 15 \
                 bytes, no '/', ':' or whitespace)"
            ));
        }
    }
    if let Some(source) = &o.source {
        let Some((ip, _)) = parse_ip(source.trim()).filter(|_| !source.trim().starts_with('['))
        else {
            return Err(format!(
                "test `{name}`: `source` is `{source}`, it must be an IP address: 192.0.2.10, \
                 2001:db8::10 or fe80::10%eth0"
            ));
        };
        match o.family.unwrap_or_default() {
            IpFamily::Ipv4 if !ip.is_ipv4() => {
                return Err(format!(
                    "test `{name}`: `source` {source} is IPv6 but `family` is ipv4"
                ))
            }
            IpFamily::Ipv6 if !ip.is_ipv6() => {
                return Err(format!(
                    "test `{name}`: `source` {source} is IPv4 but `family` is ipv6"
                ))
            }
            IpFamily::Both => {
                return Err(format!(
                    "test `{name}`: `source` {source} has one family, `family` both needs two; \
                     use `interface`, or one test per family"
                ))
            }
            _ => {}
        }
    }
    Ok(())
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
            max_duration,
            dscp,
            packet_size,
            interface,
            source,
            family
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
                "interface",
                "source",
                "family",
            ],
            Kind::Icmp => &[
                "timeout",
                "count",
                "interval",
                "interface",
                "source",
                "family",
            ],
            Kind::Tcp => &[
                "timeout",
                "tls",
                "insecure_tls",
                "interface",
                "source",
                "family",
            ],
            Kind::Http => &[
                "timeout",
                "method",
                "expect_status",
                "body_match",
                "follow_redirects",
                "insecure_tls",
                "interface",
                "source",
                "family",
            ],
            Kind::Dns => &[
                "timeout",
                "record_type",
                "server",
                "interface",
                "source",
                "family",
            ],
            Kind::Path => &[
                "timeout",
                "count",
                "interval",
                "protocol",
                "port",
                "max_hops",
                "interface",
                "source",
                "family",
            ],
            Kind::Responsiveness => &[
                "timeout",
                "max_duration",
                "insecure_tls",
                "interface",
                "source",
                "family",
            ],
            Kind::Stamp => &[
                "timeout",
                "count",
                "interval",
                "dscp",
                "packet_size",
                "interface",
                "source",
                "family",
            ],
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
    /// STAMP: test packets per run (SPEC section 17).
    pub const STAMP_COUNT: u32 = 100;
    /// STAMP: time between test packets (a voice codec's 20 ms frame).
    pub const STAMP_INTERVAL: Duration = Duration::from_millis(20);
    /// STAMP: how long reflections of the last packet are waited for.
    pub const STAMP_WAIT: Duration = Duration::from_secs(2);
    /// STAMP: the reflector's UDP port (RFC 8762 section 4.1, IANA's 862).
    pub const STAMP_PORT: u16 = 862;
    /// STAMP: UDP payload of a test packet (RFC 8762 section 4.2.1, unauthenticated).
    pub const STAMP_PACKET_SIZE: u32 = 44;
}

impl TestOptions {
    /// The whole-run limit of a test of `kind` with these options: `timeout` when set, else
    /// the kind's default (speed: both directions plus 30 s; icmp: every request plus 5 s;
    /// tcp, http, dns: 10 s; path: every round plus 8 s; responsiveness: both directions
    /// plus 15 s; stamp: every packet plus the wait for the last reflection plus 5 s).
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
            Kind::Stamp => {
                self.interval.unwrap_or(defaults::STAMP_INTERVAL)
                    * self.count.unwrap_or(defaults::STAMP_COUNT)
                    + defaults::STAMP_WAIT
                    + Duration::from_secs(5)
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
    check_option_values(name, test.kind, test.options.get_ref())
        .map_err(|reason| (Some(test.options.span()), reason))?;
    Ok(())
}

/// Most parallel streams a speed test may open in one direction.
pub const MAX_SPEED_STREAMS: u32 = 64;

/// The DNS record types the dns probe asks for (`record_type`, any case).
pub const DNS_RECORD_TYPES: &[&str] = &[
    "A",
    "AAAA",
    "ANY",
    "CAA",
    "CDNSKEY",
    "CDS",
    "CERT",
    "CNAME",
    "CSYNC",
    "DNSKEY",
    "DS",
    "HINFO",
    "HTTPS",
    "KEY",
    "MX",
    "NAPTR",
    "NS",
    "NSEC",
    "NSEC3",
    "NSEC3PARAM",
    "NULL",
    "OPENPGPKEY",
    "PTR",
    "RRSIG",
    "SIG",
    "SOA",
    "SRV",
    "SSHFP",
    "SVCB",
    "TLSA",
    "TXT",
];

/// The value ranges of the options of a test of `kind` (`name` is the test's, for the
/// message): what a probe would otherwise silently bend (icmp `count = 0` sending one
/// echo) or fail on at every run (a dns `server` that is not an address). Options that do
/// not apply to `kind` are checked by [`check_test`] before this.
pub fn check_option_values(name: &str, kind: Kind, o: &TestOptions) -> Result<(), String> {
    if o.timeout == Some(Duration::ZERO) {
        return Err(format!("test `{name}`: `timeout` must be more than 0s"));
    }
    check_link_options(name, o)?;
    match kind {
        Kind::Icmp => {
            if o.count == Some(0) {
                return Err(format!("test `{name}`: `count` must be at least 1"));
            }
            if o.interval == Some(Duration::ZERO) {
                return Err(format!("test `{name}`: `interval` must be more than 0s"));
            }
        }
        Kind::Speed => {
            for (key, value) in [
                ("streams", o.streams),
                ("download_streams", o.download_streams),
                ("upload_streams", o.upload_streams),
            ] {
                if let Some(n) = value {
                    if n == 0 || n > MAX_SPEED_STREAMS {
                        return Err(format!(
                            "test `{name}`: `{key}` is {n}, it must be 1 to {MAX_SPEED_STREAMS}"
                        ));
                    }
                }
            }
            if o.pings == Some(0) {
                return Err(format!("test `{name}`: `pings` must be at least 1"));
            }
            if o.duration == Some(Duration::ZERO) {
                return Err(format!("test `{name}`: `duration` must be more than 0s"));
            }
        }
        Kind::Dns => {
            if let Some(server) = &o.server {
                if !is_dns_server(server) {
                    return Err(format!(
                        "test `{name}`: `server` is `{server}`, it must be an IP address with an \
                         optional port: 192.0.2.53, 192.0.2.53:5353, 2001:db8::53, \
                         [2001:db8::53]:5353 or fe80::1%eth0"
                    ));
                }
            }
            if let Some(rtype) = &o.record_type {
                if !DNS_RECORD_TYPES
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(rtype))
                {
                    return Err(format!(
                        "test `{name}`: `record_type` `{rtype}` is not one the dns probe asks \
                         for; it takes: {}",
                        DNS_RECORD_TYPES.join(", ")
                    ));
                }
            }
        }
        Kind::Http => {
            if let Some(method) = &o.method {
                if !is_http_token(method) {
                    return Err(format!(
                        "test `{name}`: `method` `{method}` is not an HTTP method name \
                         (letters, digits and !#$%&'*+-.^_`|~, no spaces)"
                    ));
                }
            }
            if let Some(status) = o.expect_status {
                if !(100..=599).contains(&status) {
                    return Err(format!(
                        "test `{name}`: `expect_status` is {status}, it must be 100 to 599"
                    ));
                }
            }
        }
        Kind::Path => check_path_options(name, o)?,
        Kind::Stamp => check_stamp_options(name, o)?,
        Kind::Responsiveness => {
            if let Some(d) = o.max_duration {
                if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&d) {
                    return Err(format!("test `{name}`: `max_duration` must be 2s to 300s"));
                }
            }
        }
        Kind::Tcp => {}
    }
    Ok(())
}

/// `ip`, `ip:port`, `[v6]:port`, each IPv6 with an optional `%zone` (the dns probe's
/// `server`); a port is 1 to 65535.
fn is_dns_server(s: &str) -> bool {
    let s = s.trim();
    if parse_ip(s).is_some() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = matches!(port.parse::<u16>(), Ok(p) if p > 0);
    let host_ok = if host.starts_with('[') {
        host.ends_with(']') && matches!(parse_ip(host), Some((ip, _)) if ip.is_ipv6())
    } else {
        // A bare IPv6 address with a port is ambiguous: it needs brackets.
        !host.contains(':') && matches!(parse_ip(host), Some((ip, _)) if ip.is_ipv4())
    };
    port_ok && host_ok
}

/// An HTTP method is a token (RFC 9110 section 5.6.2).
fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
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

/// The value ranges of a stamp test's options (SPEC section 17).
pub fn check_stamp_options(name: &str, o: &TestOptions) -> Result<(), String> {
    if let Some(n) = o.count {
        if n == 0 || n > bounds::MAX_STAMP_COUNT {
            return Err(format!(
                "test `{name}`: `count` is {n}, it must be 1 to {}",
                bounds::MAX_STAMP_COUNT
            ));
        }
    }
    if let Some(i) = o.interval {
        if i < bounds::MIN_STAMP_INTERVAL {
            return Err(format!(
                "test `{name}`: `interval` must be at least {}ms",
                bounds::MIN_STAMP_INTERVAL.as_millis()
            ));
        }
    }
    if let Some(d) = o.dscp {
        if d > 63 {
            return Err(format!("test `{name}`: `dscp` is {d}, it must be 0 to 63"));
        }
    }
    if let Some(size) = o.packet_size {
        if !(bounds::STAMP_MIN_PACKET_BYTES..=bounds::STAMP_MAX_PACKET_BYTES).contains(&size) {
            return Err(format!(
                "test `{name}`: `packet_size` is {size}, it must be {} to {} bytes (the UDP \
                 payload; RFC 8762's unauthenticated packet is {} bytes)",
                bounds::STAMP_MIN_PACKET_BYTES,
                bounds::STAMP_MAX_PACKET_BYTES,
                bounds::STAMP_MIN_PACKET_BYTES
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_option_values() {
        refused(Kind::Stamp, "count = 0", "must be 1 to");
        refused(Kind::Stamp, "count = 1000000", "must be 1 to");
        refused(Kind::Stamp, "dscp = 64", "0 to 63");
        refused(Kind::Stamp, "packet_size = 43", "44 to 1472");
        refused(Kind::Stamp, "packet_size = 9000", "44 to 1472");
        refused(Kind::Stamp, "interval = \"100us\"", "at least 1ms");
        assert!(opts(
            Kind::Stamp,
            "count = 1000\ninterval = \"10ms\"\ndscp = 46\npacket_size = 200"
        )
        .is_ok());
    }

    #[test]
    fn link_options_on_every_kind() {
        for kind in [
            Kind::Speed,
            Kind::Icmp,
            Kind::Tcp,
            Kind::Http,
            Kind::Dns,
            Kind::Path,
            Kind::Responsiveness,
            Kind::Stamp,
        ] {
            for key in ["interface", "source", "family"] {
                assert!(TestOptions::allowed(kind).contains(&key), "{kind} {key}");
            }
            opts(
                kind,
                "interface = \"wwan0\"\nsource = \"192.0.2.10\"\nfamily = \"ipv4\"",
            )
            .unwrap();
        }
        for bad in [
            "",
            "a/b",
            "eth0:1",
            "a b",
            "a\\u000bb",
            "0123456789abcdef",
            ".",
            "..",
        ] {
            refused(
                Kind::Tcp,
                &format!("interface = \"{bad}\""),
                "not an interface name",
            );
        }
        opts(Kind::Tcp, "interface = \"0123456789abcde\"").unwrap();
        for bad in [
            "host.example",
            "192.0.2.10:80",
            "[2001:db8::1]",
            "192.0.2.10%eth0",
        ] {
            refused(
                Kind::Tcp,
                &format!("source = \"{bad}\""),
                "must be an IP address",
            );
        }
        opts(Kind::Tcp, "source = \"fe80::1%eth0\"\nfamily = \"ipv6\"").unwrap();
        refused(
            Kind::Tcp,
            "source = \"2001:db8::1\"\nfamily = \"ipv4\"",
            "is IPv6",
        );
        refused(
            Kind::Tcp,
            "source = \"192.0.2.1\"\nfamily = \"ipv6\"",
            "is IPv4",
        );
        refused(
            Kind::Tcp,
            "source = \"192.0.2.1\"\nfamily = \"both\"",
            "needs two",
        );
        assert!(toml::from_str::<TestOptions>("family = \"ipv5\"").is_err());
        opts(Kind::Dns, "family = \"both\"").unwrap();
    }

    fn opts(kind: Kind, toml: &str) -> Result<(), String> {
        let o: TestOptions = toml::from_str(toml).expect("options parse");
        check_option_values("t", kind, &o)
    }

    fn refused(kind: Kind, toml: &str, why: &str) {
        match opts(kind, toml) {
            Err(e) => assert!(e.contains(why), "{toml}: {e}"),
            Ok(()) => panic!("{kind} {toml}: accepted"),
        }
    }

    #[test]
    fn icmp_count_and_interval() {
        refused(Kind::Icmp, "count = 0", "`count` must be at least 1");
        refused(
            Kind::Icmp,
            "interval = \"0s\"",
            "`interval` must be more than 0s",
        );
        opts(Kind::Icmp, "count = 1\ninterval = \"10ms\"").unwrap();
    }

    #[test]
    fn speed_streams_pings_duration() {
        for key in ["streams", "download_streams", "upload_streams"] {
            refused(Kind::Speed, &format!("{key} = 0"), "it must be 1 to 64");
            refused(Kind::Speed, &format!("{key} = 65"), "it must be 1 to 64");
            opts(Kind::Speed, &format!("{key} = 64")).unwrap();
            opts(Kind::Speed, &format!("{key} = 1")).unwrap();
        }
        refused(Kind::Speed, "pings = 0", "`pings` must be at least 1");
        refused(
            Kind::Speed,
            "duration = \"0s\"",
            "`duration` must be more than 0s",
        );
        opts(Kind::Speed, "pings = 1\nduration = \"1s\"").unwrap();
    }

    #[test]
    fn dns_server_and_record_type() {
        for good in [
            "192.0.2.53",
            "192.0.2.53:5353",
            "2001:db8::53",
            "[2001:db8::53]",
            "[2001:db8::53]:5353",
            "fe80::1%eth0",
            "[fe80::1%eth0]:53",
        ] {
            opts(Kind::Dns, &format!("server = \"{good}\"")).unwrap();
        }
        for bad in [
            "dns.example",
            "dns.example:53",
            "192.0.2.53:0",
            "192.0.2.53:x",
            "2001:db8::53:5353x",
            "192.0.2.53%eth0",
            "",
        ] {
            refused(
                Kind::Dns,
                &format!("server = \"{bad}\""),
                "must be an IP address",
            );
        }
        refused(
            Kind::Dns,
            "record_type = \"AAAAA\"",
            "is not one the dns probe asks for",
        );
        opts(Kind::Dns, "record_type = \"aaaa\"").unwrap();
        opts(Kind::Dns, "record_type = \"HTTPS\"").unwrap();
    }

    #[test]
    fn http_method_and_status() {
        refused(
            Kind::Http,
            "method = \"GET /\"",
            "is not an HTTP method name",
        );
        refused(Kind::Http, "method = \"\"", "is not an HTTP method name");
        refused(
            Kind::Http,
            "method = \"G\\u00c9T\"",
            "is not an HTTP method name",
        );
        opts(Kind::Http, "method = \"PROPFIND\"").unwrap();
        refused(Kind::Http, "expect_status = 99", "it must be 100 to 599");
        refused(Kind::Http, "expect_status = 600", "it must be 100 to 599");
        opts(Kind::Http, "expect_status = 599").unwrap();
        opts(Kind::Http, "expect_status = 100").unwrap();
    }

    #[test]
    fn zero_timeout() {
        refused(
            Kind::Tcp,
            "timeout = \"0s\"",
            "`timeout` must be more than 0s",
        );
    }

    /// The error is located at the options of the test, through the shared check.
    #[test]
    fn check_test_locates_the_options() {
        let text = "name = \"p\"\nkind = \"icmp\"\ntarget = \"192.0.2.1\"\nevery = \"1m\"\n\
                    [options]\ncount = 0\n";
        let test: TestConfig = toml::from_str(text).expect("test parses");
        let (span, why) = check_test(&test, None, Scheduling::Required).unwrap_err();
        assert!(why.contains("`count` must be at least 1"), "{why}");
        let (line, _) = super::super::line_col(text, span.expect("located").start);
        assert!(line >= 5, "located at line {line}");
    }
}
