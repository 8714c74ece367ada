//! Domain types of the collector and the one place where wire messages become them.
//!
//! Invariants:
//! - Every bound is checked here, against `edgeprobe_proto::bounds` (the limits `check`
//!   and the agent use too), before anything reaches the store; the store never sees
//!   protobuf types and can trust what it gets (lengths, label counts, enum values,
//!   finite numbers, no NUL).
//! - A batch is refused as a whole (the stream closes) only for what a bad peer sends:
//!   another agent's result, seq 0 or past i64, seqs not increasing, too many results.
//!   A result that fails its bounds is not a reason to stall a stream: it becomes a
//!   `Rejected` (reason and raw bytes) that the store quarantines and the ack covers.
//! - Time is never a reason to refuse. A start time that is not plausible (before 2020,
//!   more than a day ahead) is stored as the collector's receive time, the claim kept in
//!   `reported_started_at` and the row flagged `clock_unsynced`.
//! - Validation checks by reference first (`ResultRow::check`) and builds by move
//!   (`ResultRow::build`, infallible): valid results are never copied, refused ones are
//!   encoded once for the quarantine.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::bounds::{self, rpm_rating as rating_of, OutOfBounds, MAX_LOAD_CONNECTIONS};
use edgeprobe_proto::v1 as pb;

/// Raw bytes of a quarantined result kept at most.
pub const MAX_RAW_BYTES: usize = 64 * 1024;

/// Why a message or a result was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(msg.into()))
}

impl From<OutOfBounds> for Invalid {
    fn from(e: OutOfBounds) -> Self {
        Invalid(e.0)
    }
}

/// Why a whole batch is refused and its stream closed: the peer, not one result, is wrong.
#[derive(Debug, PartialEq)]
pub enum BatchRefused {
    /// A result of another agent: PERMISSION_DENIED.
    Permission(String),
    /// Malformed as a batch: INVALID_ARGUMENT.
    Invalid(String),
}

/// The kinds of test: the one enum of the test definition.
pub use edgeprobe_proto::testdef::Kind;

/// An agent's introduction.
#[derive(Debug, Clone)]
pub struct AgentHello {
    pub agent_id: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    /// The buffer's incarnation id; '' from agents and buffers older than incarnations.
    pub incarnation: String,
    /// Controller features the agent speaks ("fleet-tests", "run-now"); empty from old agents.
    pub features: Vec<String>,
    /// Names of the tests in the agent's own config.
    pub local_tests: Vec<String>,
}

/// Agent buffer state from a heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct BufferState {
    pub backlog: i64,
    pub dropped: i64,
    pub oldest: Option<SystemTime>,
}

/// One validated result, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub agent_id: String,
    /// Shared by every result of a session.
    pub incarnation: Arc<str>,
    pub seq: i64,
    pub test: String,
    pub kind: Kind,
    pub target: String,
    /// The agent's start time, or the collector's receive time when that was implausible.
    pub started_at: SystemTime,
    /// The agent's implausible start time, when `started_at` replaced it.
    pub reported_started_at: Option<SystemTime>,
    pub duration_seconds: f64,
    pub success: bool,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    /// Shared by the consecutive results of a batch that carry the same labels.
    pub labels: Arc<Labels>,
    pub measures: Measures,
    pub clock_unsynced: bool,
    pub clock_corrected: bool,
    pub error_truncated: bool,
    /// The run-now request that asked for this result (stored with on_demand = true).
    pub run_id: Option<i64>,
    /// The link the result was taken on (the wire's empty strings are `None`).
    pub link: Link,
}

/// The link a result was taken on: the family it used, the local address of its sockets
/// and the interface its test is bound to (options `family`, `source`, `interface`).
/// `None` is NULL: not known, not bound, or an agent before these fields.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Link {
    pub ip_family: Option<IpFamily>,
    pub local_address: Option<String>,
    pub interface: Option<String>,
}

/// The IP family of a result, as stored in `results.ip_family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

impl IpFamily {
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
        }
    }

    /// The family of a wire `ip_family` (checked by `bounds::result_link`); `None` for "".
    fn of_wire(s: &str) -> Option<IpFamily> {
        match s {
            "ipv4" => Some(IpFamily::Ipv4),
            "ipv6" => Some(IpFamily::Ipv6),
            _ => None,
        }
    }
}

/// The link columns of `results` (migration 9), in table order: exports list them after
/// every kind's figures, run-now results carry them beside the figures.
pub const LINK_COLUMNS: &[&str] = &["ip_family", "local_address", "interface"];

/// A result's validated labels with their JSON rendering, made once per distinct label
/// set in a batch: an agent sends the same labels with almost every result, and the store
/// writes the JSON for every row.
#[derive(Debug, PartialEq)]
pub struct Labels {
    map: BTreeMap<String, String>,
    json: String,
}

impl Labels {
    pub fn new(map: BTreeMap<String, String>) -> Labels {
        let json = serde_json::to_string(&map).expect("a map of strings serializes");
        Labels { map, json }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// The labels as a JSON object, e.g. `{"site":"berlin"}`.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// True when `wire` holds exactly these labels.
    fn same_as(&self, wire: &HashMap<String, String>) -> bool {
        wire.len() == self.map.len() && wire.iter().all(|(k, v)| self.map.get(k) == Some(v))
    }
}

/// Typed columns; `None` is NULL. Names are the column names.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Measures {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_bits_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_bits_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_latency_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_loaded_latency_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_loaded_latency_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_downloaded: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_uploaded: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_min_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_avg_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_max_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_mdev_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfb_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_expiry_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answers: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hop_count: Option<i32>,
    /// NULL when nothing answered (an empty `path_id` on the wire).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_loss_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_protocol: Option<String>,
    /// Round trips per minute under working conditions (SPEC section 16): overall and per
    /// direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub responsiveness_rpm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_responsiveness_rpm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_responsiveness_rpm: Option<f64>,
    /// Round trip under load of a responsiveness run (60 / responsiveness_rpm).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_latency_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_connections: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable: Option<bool>,
    /// poor, fair, good or excellent; NULL when the agent gave none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rating: Option<String>,
    /// STAMP (SPEC section 17): test packets lost on the way to the reflector and on the
    /// way back, and their ratios. `sent`, `received`, `rtt_*` and `jitter_seconds` are
    /// shared with the other kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_lost: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse_lost: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_loss_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse_loss_ratio: Option<f64>,
    /// Extra copies received, and packets that arrived after a later one (RFC 4737).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reordered: Option<i32>,
    /// One-way delays; NULL unless both clocks were synchronised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_delay_min_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_delay_avg_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_delay_max_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse_delay_min_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse_delay_avg_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse_delay_max_seconds: Option<f64>,
    /// ITU-T G.107 E-model estimate for a voice call, `MOS_MIN..=MOS_MAX`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mos: Option<f64>,
    /// Speed: UDP loss while each direction was saturated (the target's STAMP reflector);
    /// NULL against targets without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_loaded_loss_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_loaded_loss_ratio: Option<f64>,
    /// The hops as the JSON stored in `results.hops`, rendered once by `check`
    /// (`ResultRow::to_json` embeds it as JSON).
    #[serde(skip)]
    pub hops: Option<String>,
}

/// The figure columns of `results`, every kind's, in table order: the fields of
/// [`Measures`] (but `hops`, which has its own view) and `path_changed`, which the writer
/// decides. Run-now and exports read exactly these, so a new kind's columns are listed
/// once (a test holds this list to `Measures`).
pub const FIGURE_COLUMNS: &[&str] = &[
    "download_bits_per_second",
    "upload_bits_per_second",
    "idle_latency_seconds",
    "jitter_seconds",
    "download_loaded_latency_seconds",
    "upload_loaded_latency_seconds",
    "bytes_downloaded",
    "bytes_uploaded",
    "sent",
    "received",
    "loss_ratio",
    "rtt_min_seconds",
    "rtt_avg_seconds",
    "rtt_max_seconds",
    "rtt_mdev_seconds",
    "connect_seconds",
    "tls_seconds",
    "status_code",
    "dns_seconds",
    "ttfb_seconds",
    "transfer_seconds",
    "body_bytes",
    "tls_cert_expiry_seconds",
    "resolve_seconds",
    "answers",
    "rcode",
    "reached",
    "hop_count",
    "path_id",
    "path_changed",
    "path_loss_ratio",
    "path_protocol",
    "responsiveness_rpm",
    "download_responsiveness_rpm",
    "upload_responsiveness_rpm",
    "loaded_latency_seconds",
    "load_connections",
    "stable",
    "rating",
    "forward_lost",
    "reverse_lost",
    "forward_loss_ratio",
    "reverse_loss_ratio",
    "duplicates",
    "reordered",
    "forward_delay_min_seconds",
    "forward_delay_avg_seconds",
    "forward_delay_max_seconds",
    "reverse_delay_min_seconds",
    "reverse_delay_avg_seconds",
    "reverse_delay_max_seconds",
    "mos",
    "download_loaded_loss_ratio",
    "upload_loaded_loss_ratio",
];

/// How a quarantined result's raw bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFormat {
    /// The wire `Result` as received (refused by validation).
    Protobuf,
    /// The row PostgreSQL refused, as JSON (the store never sees protobuf).
    Json,
}

impl RawFormat {
    pub fn name(self) -> &'static str {
        match self {
            RawFormat::Protobuf => "protobuf",
            RawFormat::Json => "json",
        }
    }
}

/// A result that cannot be stored, on its way to the quarantine (`rejected_results`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub seq: i64,
    pub reason: String,
    /// Set when PostgreSQL refused the row.
    pub sqlstate: Option<String>,
    /// At most `MAX_RAW_BYTES`.
    pub raw: Vec<u8>,
    pub raw_format: RawFormat,
    pub raw_truncated: bool,
}

impl Rejected {
    /// A result refused by validation: the wire bytes, encoded once.
    fn of_wire(r: &pb::Result, seq: i64, reason: String) -> Rejected {
        let (raw, raw_truncated) = cut(prost::Message::encode_to_vec(r));
        Rejected {
            seq,
            reason,
            sqlstate: None,
            raw,
            raw_format: RawFormat::Protobuf,
            raw_truncated,
        }
    }

    /// A row PostgreSQL refused with `sqlstate`: the row as JSON.
    pub fn of_row(row: &ResultRow, sqlstate: &str, message: &str) -> Rejected {
        let (raw, raw_truncated) = cut(row.to_json());
        Rejected {
            seq: row.seq,
            reason: format!("SQLSTATE {sqlstate}: {message}"),
            sqlstate: Some(sqlstate.to_string()),
            raw,
            raw_format: RawFormat::Json,
            raw_truncated,
        }
    }
}

fn cut(mut raw: Vec<u8>) -> (Vec<u8>, bool) {
    let truncated = raw.len() > MAX_RAW_BYTES;
    raw.truncate(MAX_RAW_BYTES);
    (raw, truncated)
}

/// One validated batch of one agent's incarnation, in seq order.
#[derive(Debug)]
pub struct Batch {
    pub agent_id: String,
    pub incarnation: Arc<str>,
    /// Results to store.
    pub rows: Vec<ResultRow>,
    /// Results to quarantine.
    pub rejected: Vec<Rejected>,
    /// The highest seq of the batch (stored or quarantined): the watermark after it.
    pub last_seq: i64,
}

impl Batch {
    /// Results in the batch.
    pub fn len(&self) -> usize {
        self.rows.len() + self.rejected.len()
    }

    /// Validates a wire batch of `agent_id`'s stream. Results that fail their bounds are
    /// quarantined (`rejected`); only what a bad peer sends refuses the whole batch.
    pub fn from_wire(
        batch: pb::ResultBatch,
        agent_id: &str,
        incarnation: &Arc<str>,
        now: SystemTime,
    ) -> Result<Batch, BatchRefused> {
        if batch.results.len() > bounds::MAX_BATCH_RESULTS {
            return Err(BatchRefused::Invalid(format!(
                "batch of {} results, at most {}",
                batch.results.len(),
                bounds::MAX_BATCH_RESULTS
            )));
        }
        let mut rows: Vec<ResultRow> = Vec::with_capacity(batch.results.len());
        let mut rejected = Vec::new();
        let mut last = 0i64;
        for r in batch.results {
            if r.agent_id != agent_id {
                return Err(BatchRefused::Permission(format!(
                    "batch holds a result of agent `{}` on the stream of `{agent_id}`",
                    r.agent_id.chars().take(128).collect::<String>(),
                )));
            }
            if r.seq == 0 || r.seq > i64::MAX as u64 {
                return Err(BatchRefused::Invalid(format!("seq {} out of range", r.seq)));
            }
            let seq = r.seq as i64;
            if seq <= last {
                return Err(BatchRefused::Invalid(
                    "seqs in a batch must increase".into(),
                ));
            }
            last = seq;
            match ResultRow::check(&r) {
                Ok(checked) => {
                    let previous = rows.last().map(|p| &p.labels);
                    rows.push(ResultRow::build(r, checked, incarnation, previous, now));
                }
                Err(e) => rejected.push(Rejected::of_wire(&r, seq, e.0)),
            }
        }
        Ok(Batch {
            agent_id: agent_id.to_string(),
            incarnation: incarnation.clone(),
            rows,
            rejected,
            last_seq: last,
        })
    }
}

fn labels(map: &HashMap<String, String>) -> Result<(), Invalid> {
    Ok(bounds::labels(map.iter())?)
}

/// A finite, non-negative measurement (seconds, bits/s, ratios).
fn measure(field: &str, v: Option<f64>) -> Result<Option<f64>, Invalid> {
    match v {
        Some(x) if !x.is_finite() || x < 0.0 => {
            invalid(format!("{field} = {x} is not a finite non-negative number"))
        }
        other => Ok(other),
    }
}

/// Finite, may be negative (an expired certificate).
fn signed(field: &str, v: Option<f64>) -> Result<Option<f64>, Invalid> {
    match v {
        Some(x) if !x.is_finite() => invalid(format!("{field} is not finite")),
        other => Ok(other),
    }
}

fn count(field: &str, v: u64) -> Result<i64, Invalid> {
    i64::try_from(v).map_err(|_| Invalid(format!("{field} out of range")))
}

/// Nanoseconds since the Unix epoch, negative ones included.
fn from_unix_nanos(nanos: i64) -> SystemTime {
    if nanos >= 0 {
        UNIX_EPOCH + Duration::from_nanos(nanos as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())
    }
}

fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

use bounds::{MAX_AGENT_TESTS as MAX_HELLO_LOCAL_TESTS, MAX_HELLO_FEATURES, MAX_HELLO_NAME_LEN};

impl TryFrom<pb::Hello> for AgentHello {
    type Error = Invalid;
    fn try_from(h: pb::Hello) -> Result<Self, Invalid> {
        bounds::agent_id(&h.agent_id)?;
        bounds::text("version", &h.version, bounds::MAX_VERSION_LEN)?;
        labels(&h.labels)?;
        if !h.incarnation.is_empty() {
            bounds::name("incarnation", &h.incarnation, bounds::MAX_INCARNATION_LEN)?;
        }
        if h.features.len() > MAX_HELLO_FEATURES {
            return invalid(format!(
                "{} features, at most {MAX_HELLO_FEATURES}",
                h.features.len()
            ));
        }
        for f in &h.features {
            bounds::text("feature", f, MAX_HELLO_NAME_LEN)?;
        }
        if h.local_tests.len() > MAX_HELLO_LOCAL_TESTS {
            return invalid(format!(
                "{} local tests, at most {MAX_HELLO_LOCAL_TESTS}",
                h.local_tests.len()
            ));
        }
        for t in &h.local_tests {
            bounds::text("local test name", t, MAX_HELLO_NAME_LEN)?;
        }
        Ok(AgentHello {
            agent_id: h.agent_id,
            version: h.version,
            labels: h.labels.into_iter().collect(),
            incarnation: h.incarnation,
            features: h.features,
            local_tests: h.local_tests,
        })
    }
}

impl TryFrom<pb::Heartbeat> for BufferState {
    type Error = Invalid;
    fn try_from(h: pb::Heartbeat) -> Result<Self, Invalid> {
        let oldest = match h.oldest_unix_seconds {
            0 => None,
            s if s > 0 => Some(UNIX_EPOCH + Duration::from_secs(s as u64)),
            _ => return invalid("oldest_unix_seconds is negative"),
        };
        Ok(BufferState {
            backlog: count("backlog", h.backlog)?,
            dropped: count("dropped", h.dropped)?,
            oldest,
        })
    }
}

/// What `ResultRow::check` found out, handed to `build`.
pub struct Checked {
    kind: Kind,
    measures: Measures,
}

/// Checks a result's link (`ip_family`, `local_address`, `interface`) against the shared
/// bounds; a local address, when there is one, must be an IP address (an IPv6 one may carry
/// a zone), as the agent writes it. The family and the address are not held to each other:
/// the family is the first destination's and the address the first bound socket's.
fn link(r: &pb::Result) -> Result<(), Invalid> {
    bounds::result_link(&r.ip_family, &r.local_address, &r.interface)?;
    if !r.local_address.is_empty() {
        hop_address("local_address", &r.local_address)?;
    }
    Ok(())
}

/// The highest TTL an IP packet can carry: bounds a hop's `ttl` and a path's `hop_count`.
const MAX_TTL: u32 = 255;

/// A ratio (loss): finite, 0..=1.
fn ratio(field: &str, v: Option<f64>) -> Result<Option<f64>, Invalid> {
    match measure(field, v)? {
        Some(x) if x > 1.0 => invalid(format!("{field} = {x} is above 1")),
        other => Ok(other),
    }
}

/// A counter stored as `integer`.
fn int4(field: &str, v: u32) -> Result<i32, Invalid> {
    i32::try_from(v).map_err(|_| Invalid(format!("{field} = {v} out of range")))
}

/// A hop address: an IPv4 or IPv6 address, an IPv6 one with a zone (`fe80::1%eth0`), at
/// most `MAX_HOP_ADDRESS_LEN` bytes.
fn hop_address(field: &str, a: &str) -> Result<(), Invalid> {
    use std::net::{IpAddr, Ipv6Addr};
    if a.len() > bounds::MAX_HOP_ADDRESS_LEN {
        return invalid(format!(
            "{field} is {} bytes, at most {}",
            a.len(),
            bounds::MAX_HOP_ADDRESS_LEN
        ));
    }
    let shown: String = a.chars().take(bounds::MAX_HOP_ADDRESS_LEN).collect();
    let ok = match a.split_once('%') {
        Some((ip, zone)) => {
            ip.parse::<Ipv6Addr>().is_ok()
                && !zone.is_empty()
                && zone
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => a.parse::<IpAddr>().is_ok(),
    };
    if ok {
        Ok(())
    } else {
        invalid(format!(
            "{field} `{}` is not an IP address",
            shown.escape_debug()
        ))
    }
}

/// One hop as stored in `results.hops`: a JSON array, positional (migration 0005; the
/// view `path_hops` names the fields): ttl, address, addresses, sent, received,
/// loss_ratio, rtt_min_seconds, rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds,
/// rate_limited. Arrays, not objects: PostgreSQL checks them on input at a fraction of
/// the cost (docs/BENCHMARKS.md).
type HopJson<'a> = (
    u32,
    Option<&'a str>,
    Vec<&'a str>,
    u32,
    u32,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    bool,
);

/// Checks a path result's fields (SPEC section 15) into `m`, the hops rendered as JSON.
fn path_fields(p: &pb::PathFields, m: &mut Measures) -> Result<(), Invalid> {
    if p.hops.len() > bounds::MAX_PATH_HOPS {
        return invalid(format!(
            "{} hops, at most {}",
            p.hops.len(),
            bounds::MAX_PATH_HOPS
        ));
    }
    if p.hop_count > MAX_TTL {
        return invalid(format!("hop_count {} above {MAX_TTL}", p.hop_count));
    }
    if !p.path_id.is_empty() {
        bounds::name("path_id", &p.path_id, bounds::MAX_PATH_ID_LEN)?;
    }
    let protocol = match p.protocol.as_str() {
        "" => None,
        "icmp" | "udp" | "tcp" => Some(p.protocol.clone()),
        other => {
            let shown: String = other.chars().take(16).collect();
            return invalid(format!(
                "protocol `{}` is not icmp, udp or tcp",
                shown.escape_debug()
            ));
        }
    };
    let mut hops = Vec::with_capacity(p.hops.len());
    let mut last_ttl = 0;
    for h in &p.hops {
        let at = |field: &str| format!("hop {}: {field}", h.ttl);
        if h.ttl == 0 || h.ttl > MAX_TTL {
            return invalid(format!("hop ttl {} outside 1..={MAX_TTL}", h.ttl));
        }
        if h.ttl <= last_ttl {
            return invalid(format!(
                "hop ttl {} after {last_ttl}: hops must be in ascending ttl order",
                h.ttl
            ));
        }
        last_ttl = h.ttl;
        if h.addresses.len() > bounds::MAX_HOP_ADDRESSES {
            return invalid(format!(
                "hop {}: {} addresses, at most {}",
                h.ttl,
                h.addresses.len(),
                bounds::MAX_HOP_ADDRESSES
            ));
        }
        if !h.address.is_empty() {
            hop_address(&at("address"), &h.address)?;
        }
        for a in &h.addresses {
            hop_address(&at("address"), a)?;
        }
        if h.received > h.sent {
            return invalid(format!(
                "hop {}: received {} > sent {}",
                h.ttl, h.received, h.sent
            ));
        }
        int4(&at("sent"), h.sent)?;
        let mut addresses: Vec<&str> = h.addresses.iter().map(String::as_str).collect();
        if addresses.is_empty() && !h.address.is_empty() {
            addresses.push(&h.address);
        }
        let hop: HopJson = (
            h.ttl,
            (!h.address.is_empty()).then_some(h.address.as_str()),
            addresses,
            h.sent,
            h.received,
            ratio(&at("loss_ratio"), h.loss_ratio)?,
            measure(&at("rtt_min_seconds"), h.rtt_min_seconds)?,
            measure(&at("rtt_avg_seconds"), h.rtt_avg_seconds)?,
            measure(&at("rtt_max_seconds"), h.rtt_max_seconds)?,
            measure(&at("rtt_mdev_seconds"), h.rtt_mdev_seconds)?,
            h.rate_limited,
        );
        hops.push(hop);
    }
    m.reached = Some(p.reached);
    m.hop_count = Some(p.hop_count as i32);
    m.path_id = (!p.path_id.is_empty()).then(|| p.path_id.clone());
    m.path_loss_ratio = ratio("path_loss_ratio", p.path_loss_ratio)?;
    m.rtt_avg_seconds = measure("rtt_avg_seconds", p.rtt_avg_seconds)?;
    m.path_protocol = protocol;
    m.hops =
        Some(serde_json::to_string(&hops).expect("hops of numbers and checked strings serialize"));
    Ok(())
}

/// The highest RPM a responsiveness result may carry: a 0.1 ms loaded round trip, far
/// beyond any real link (a LAN under load is around 20,000).
pub const MAX_RPM: f64 = 600_000.0;

/// An RPM: finite, 0..=`MAX_RPM`.
fn rpm(field: &str, v: Option<f64>) -> Result<Option<f64>, Invalid> {
    match measure(field, v)? {
        Some(x) if x > MAX_RPM => invalid(format!("{field} = {x} is above {MAX_RPM}")),
        other => Ok(other),
    }
}

/// Checks a responsiveness result's fields (SPEC section 16) into `m`: RPMs bounded, the
/// rating one of the draft's bands and the band of `responsiveness_rpm`.
fn responsiveness_fields(r: &pb::ResponsivenessFields, m: &mut Measures) -> Result<(), Invalid> {
    m.responsiveness_rpm = rpm("responsiveness_rpm", r.responsiveness_rpm)?;
    m.download_responsiveness_rpm =
        rpm("download_responsiveness_rpm", r.download_responsiveness_rpm)?;
    m.upload_responsiveness_rpm = rpm("upload_responsiveness_rpm", r.upload_responsiveness_rpm)?;
    m.download_bits_per_second = measure("download_bits_per_second", r.download_bits_per_second)?;
    m.upload_bits_per_second = measure("upload_bits_per_second", r.upload_bits_per_second)?;
    m.idle_latency_seconds = measure("idle_latency_seconds", r.idle_latency_seconds)?;
    m.loaded_latency_seconds = measure("loaded_latency_seconds", r.loaded_latency_seconds)?;
    if r.load_connections > MAX_LOAD_CONNECTIONS {
        return invalid(format!(
            "load_connections = {}, at most {MAX_LOAD_CONNECTIONS}",
            r.load_connections
        ));
    }
    m.load_connections = Some(r.load_connections as i32);
    m.stable = Some(r.stable);
    m.rating = match r.rating.as_str() {
        "" => None,
        "poor" | "fair" | "good" | "excellent" => {
            let Some(overall) = m.responsiveness_rpm else {
                return invalid(format!(
                    "rating `{}` without a responsiveness_rpm",
                    r.rating
                ));
            };
            let band = rating_of(overall);
            if band != r.rating {
                return invalid(format!(
                    "rating `{}` does not match responsiveness_rpm = {overall} (band {band})",
                    r.rating
                ));
            }
            Some(r.rating.clone())
        }
        other => {
            let shown: String = other.chars().take(16).collect();
            return invalid(format!(
                "rating `{}` is not poor, fair, good or excellent",
                shown.escape_debug()
            ));
        }
    };
    Ok(())
}

/// The largest round trip or one-way delay (either sign) a stamp result may report: the
/// sender waits 2 s (`defaults::STAMP_WAIT`) for the last reflection, so a figure of a
/// minute is already a broken clock or a broken sender, not a network.
pub const MAX_STAMP_DELAY_SECONDS: f64 = 60.0;

/// Seconds of a stamp result: finite, within `lowest..=MAX_STAMP_DELAY_SECONDS`.
fn stamp_seconds(field: &str, v: Option<f64>, lowest: f64) -> Result<Option<f64>, Invalid> {
    match v {
        Some(x) if !x.is_finite() || x < lowest || x > MAX_STAMP_DELAY_SECONDS => invalid(format!(
            "{field} = {x} is outside {lowest}..={MAX_STAMP_DELAY_SECONDS} seconds"
        )),
        other => Ok(other),
    }
}

/// A (min, avg, max) triple of a stamp result, each bounded, in that order when present.
fn stamp_triple(
    name: &str,
    [min, avg, max]: [Option<f64>; 3],
    lowest: f64,
) -> Result<[Option<f64>; 3], Invalid> {
    let min = stamp_seconds(&format!("{name}_min_seconds"), min, lowest)?;
    let avg = stamp_seconds(&format!("{name}_avg_seconds"), avg, lowest)?;
    let max = stamp_seconds(&format!("{name}_max_seconds"), max, lowest)?;
    let present: Vec<f64> = [min, avg, max].into_iter().flatten().collect();
    if present.windows(2).any(|w| w[0] > w[1]) {
        return invalid(format!(
            "{name} min/avg/max = {min:?}/{avg:?}/{max:?} are not in order"
        ));
    }
    Ok([min, avg, max])
}

/// Checks a stamp result's fields (SPEC section 17) into `m`. What contradicts itself is
/// refused: more received or lost than sent (a packet received is not lost), ratios outside
/// 0..=1, duplicates or reordered packets beyond the packets sent, delays out of order or
/// beyond `MAX_STAMP_DELAY_SECONDS`, a MOS outside the E-model's range, and one-way delays
/// from an agent whose own clock is unsynchronised (they must be null then).
///
/// One-way delays may be negative: they are differences of two clocks, each synchronised
/// only to within its error, and on a short path the error can exceed the delay. They are
/// stored as measured, never clamped.
fn stamp_fields(
    st: &pb::StampFields,
    clock_unsynced: bool,
    m: &mut Measures,
) -> Result<(), Invalid> {
    if st.sent > bounds::MAX_STAMP_COUNT {
        return invalid(format!(
            "sent = {}, at most {}",
            st.sent,
            bounds::MAX_STAMP_COUNT
        ));
    }
    if st.received > st.sent {
        return invalid(format!("received = {} > sent = {}", st.received, st.sent));
    }
    let lost = u64::from(st.forward_lost) + u64::from(st.reverse_lost);
    if lost > u64::from(st.sent - st.received) {
        return invalid(format!(
            "forward_lost + reverse_lost = {} + {} > sent - received = {} - {}",
            st.forward_lost, st.reverse_lost, st.sent, st.received
        ));
    }
    for (field, v) in [("duplicates", st.duplicates), ("reordered", st.reordered)] {
        if v > st.sent {
            return invalid(format!("{field} = {v} > sent = {}", st.sent));
        }
    }
    m.sent = Some(st.sent as i32);
    m.received = Some(st.received as i32);
    m.forward_lost = Some(st.forward_lost as i32);
    m.reverse_lost = Some(st.reverse_lost as i32);
    m.duplicates = Some(st.duplicates as i32);
    m.reordered = Some(st.reordered as i32);
    m.forward_loss_ratio = ratio("forward_loss_ratio", st.forward_loss_ratio)?;
    m.reverse_loss_ratio = ratio("reverse_loss_ratio", st.reverse_loss_ratio)?;
    [m.rtt_min_seconds, m.rtt_avg_seconds, m.rtt_max_seconds] = stamp_triple(
        "rtt",
        [st.rtt_min_seconds, st.rtt_avg_seconds, st.rtt_max_seconds],
        0.0,
    )?;
    m.rtt_mdev_seconds = stamp_seconds("rtt_mdev_seconds", st.rtt_mdev_seconds, 0.0)?;
    m.jitter_seconds = stamp_seconds("jitter_seconds", st.jitter_seconds, 0.0)?;
    let lowest = -MAX_STAMP_DELAY_SECONDS;
    [
        m.forward_delay_min_seconds,
        m.forward_delay_avg_seconds,
        m.forward_delay_max_seconds,
    ] = stamp_triple(
        "forward_delay",
        [
            st.forward_delay_min_seconds,
            st.forward_delay_avg_seconds,
            st.forward_delay_max_seconds,
        ],
        lowest,
    )?;
    [
        m.reverse_delay_min_seconds,
        m.reverse_delay_avg_seconds,
        m.reverse_delay_max_seconds,
    ] = stamp_triple(
        "reverse_delay",
        [
            st.reverse_delay_min_seconds,
            st.reverse_delay_avg_seconds,
            st.reverse_delay_max_seconds,
        ],
        lowest,
    )?;
    let one_way = [
        m.forward_delay_min_seconds,
        m.forward_delay_avg_seconds,
        m.forward_delay_max_seconds,
        m.reverse_delay_min_seconds,
        m.reverse_delay_avg_seconds,
        m.reverse_delay_max_seconds,
    ];
    if clock_unsynced && one_way.iter().any(Option::is_some) {
        return invalid("one-way delays from an agent whose clock is unsynchronised");
    }
    m.mos = match st.mos {
        Some(x) if !(bounds::MOS_MIN..=bounds::MOS_MAX).contains(&x) => {
            return invalid(format!(
                "mos = {x} is outside {}..={}",
                bounds::MOS_MIN,
                bounds::MOS_MAX
            ))
        }
        other => other,
    };
    Ok(())
}

impl ResultRow {
    /// Checks one wire result against every bound except the batch's (agent id, seq),
    /// without taking it apart. Its start time is never a reason to refuse.
    pub fn check(r: &pb::Result) -> Result<Checked, Invalid> {
        use pb::result::Fields as F;
        let Ok(kind) = Kind::try_from(r.kind) else {
            return invalid(format!("kind {} is not a known kind", r.kind));
        };
        bounds::test_name(&r.test)?;
        bounds::target(&r.target)?;
        if !r.duration_seconds.is_finite()
            || !(0.0..=bounds::MAX_DURATION_SECONDS).contains(&r.duration_seconds)
        {
            return invalid(format!(
                "duration_seconds outside 0..{}",
                bounds::MAX_DURATION_SECONDS
            ));
        }
        if r.success != r.error_class.is_empty() {
            return invalid("error_class must be empty exactly when success is true");
        }
        if !r.error_class.is_empty() {
            bounds::name("error class", &r.error_class, bounds::MAX_ERROR_CLASS_LEN)?;
        }
        bounds::text("error message", &r.error_message, bounds::MAX_ERROR_LEN)?;
        labels(&r.labels)?;
        link(r)?;
        let mut m = Measures::default();
        match (kind, &r.fields) {
            (Kind::Speed, Some(F::Speed(s))) => {
                m.download_bits_per_second =
                    measure("download_bits_per_second", s.download_bits_per_second)?;
                m.upload_bits_per_second =
                    measure("upload_bits_per_second", s.upload_bits_per_second)?;
                m.idle_latency_seconds = measure("idle_latency_seconds", s.idle_latency_seconds)?;
                m.jitter_seconds = measure("jitter_seconds", s.jitter_seconds)?;
                m.download_loaded_latency_seconds = measure(
                    "download_loaded_latency_seconds",
                    s.download_loaded_latency_seconds,
                )?;
                m.upload_loaded_latency_seconds = measure(
                    "upload_loaded_latency_seconds",
                    s.upload_loaded_latency_seconds,
                )?;
                m.bytes_downloaded = Some(count("bytes_downloaded", s.bytes_downloaded)?);
                m.bytes_uploaded = Some(count("bytes_uploaded", s.bytes_uploaded)?);
                m.download_loaded_loss_ratio =
                    ratio("download_loaded_loss_ratio", s.download_loaded_loss_ratio)?;
                m.upload_loaded_loss_ratio =
                    ratio("upload_loaded_loss_ratio", s.upload_loaded_loss_ratio)?;
            }
            (Kind::Icmp, Some(F::Icmp(i))) => {
                if i.received > i.sent {
                    return invalid("icmp received > sent");
                }
                m.sent = Some(i.sent.min(i32::MAX as u32) as i32);
                m.received = Some(i.received.min(i32::MAX as u32) as i32);
                m.loss_ratio = measure("loss_ratio", i.loss_ratio)?;
                if m.loss_ratio.is_some_and(|l| l > 1.0) {
                    return invalid("loss_ratio above 1");
                }
                m.rtt_min_seconds = measure("rtt_min_seconds", i.rtt_min_seconds)?;
                m.rtt_avg_seconds = measure("rtt_avg_seconds", i.rtt_avg_seconds)?;
                m.rtt_max_seconds = measure("rtt_max_seconds", i.rtt_max_seconds)?;
                m.rtt_mdev_seconds = measure("rtt_mdev_seconds", i.rtt_mdev_seconds)?;
            }
            (Kind::Tcp, Some(F::Tcp(t))) => {
                m.connect_seconds = measure("connect_seconds", t.connect_seconds)?;
                m.tls_seconds = measure("tls_seconds", t.tls_seconds)?;
            }
            (Kind::Http, Some(F::Http(h))) => {
                m.status_code = match h.status_code {
                    Some(c) if (100..=999).contains(&c) => Some(c as i32),
                    Some(c) => return invalid(format!("status_code {c} out of range")),
                    None => None,
                };
                m.dns_seconds = measure("dns_seconds", h.dns_seconds)?;
                m.connect_seconds = measure("connect_seconds", h.connect_seconds)?;
                m.tls_seconds = measure("tls_seconds", h.tls_seconds)?;
                m.ttfb_seconds = measure("ttfb_seconds", h.ttfb_seconds)?;
                m.transfer_seconds = measure("transfer_seconds", h.transfer_seconds)?;
                m.body_bytes = Some(count("body_bytes", h.body_bytes)?);
                m.tls_cert_expiry_seconds =
                    signed("tls_cert_expiry_seconds", h.tls_cert_expiry_seconds)?;
            }
            (Kind::Dns, Some(F::Dns(d))) => {
                m.resolve_seconds = measure("resolve_seconds", d.resolve_seconds)?;
                m.answers = Some(d.answers.min(i32::MAX as u32) as i32);
                if !d.rcode.is_empty() {
                    bounds::name("rcode", &d.rcode, bounds::MAX_RCODE_LEN)?;
                    m.rcode = Some(d.rcode.clone());
                }
            }
            (Kind::Path, Some(F::Path(p))) => path_fields(p, &mut m)?,
            (Kind::Responsiveness, Some(F::Responsiveness(r))) => responsiveness_fields(r, &mut m)?,
            (Kind::Stamp, Some(F::Stamp(st))) => stamp_fields(st, r.clock_unsynced, &mut m)?,
            (_, None) => {}
            (kind, Some(_)) => return invalid(format!("fields do not match kind {}", kind.name())),
        }
        Ok(Checked { kind, measures: m })
    }

    /// Builds the row of a checked result, moving its strings. `previous` is the labels
    /// of the result before it in the batch: when this one carries the same, they are
    /// shared instead of rebuilt. `now` is the receive time.
    pub fn build(
        r: pb::Result,
        checked: Checked,
        incarnation: &Arc<str>,
        previous: Option<&Arc<Labels>>,
        now: SystemTime,
    ) -> ResultRow {
        let (started_at, reported_started_at, clock_unsynced) =
            if bounds::plausible_start(r.started_at_unix_nanos, now) {
                (
                    from_unix_nanos(r.started_at_unix_nanos),
                    None,
                    r.clock_unsynced,
                )
            } else {
                // Stored by arrival: today's partition, retention by receive time.
                (now, Some(from_unix_nanos(r.started_at_unix_nanos)), true)
            };
        let labels = match previous {
            Some(p) if p.same_as(&r.labels) => p.clone(),
            _ => Arc::new(Labels::new(r.labels.into_iter().collect())),
        };
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        ResultRow {
            agent_id: r.agent_id,
            incarnation: incarnation.clone(),
            seq: r.seq as i64,
            test: r.test,
            kind: checked.kind,
            target: r.target,
            started_at,
            reported_started_at,
            duration_seconds: r.duration_seconds,
            success: r.success,
            error_class: nonempty(r.error_class),
            error_message: nonempty(r.error_message),
            labels,
            measures: checked.measures,
            clock_unsynced,
            clock_corrected: r.clock_corrected,
            error_truncated: r.error_truncated,
            run_id: (r.run_id > 0).then_some(r.run_id.min(i64::MAX as u64) as i64),
            link: Link {
                ip_family: IpFamily::of_wire(&r.ip_family),
                local_address: nonempty(r.local_address),
                interface: nonempty(r.interface),
            },
        }
    }

    /// The row as JSON, for the quarantine of a row PostgreSQL refused. Times are Unix
    /// nanoseconds.
    pub fn to_json(&self) -> Vec<u8> {
        let value = serde_json::json!({
            "agent_id": self.agent_id,
            "incarnation": &*self.incarnation,
            "seq": self.seq,
            "test": self.test,
            "kind": self.kind.name(),
            "target": self.target,
            "started_at_unix_nanos": unix_nanos(self.started_at),
            "reported_started_at_unix_nanos": self.reported_started_at.map(unix_nanos),
            "duration_seconds": self.duration_seconds,
            "success": self.success,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "labels": self.labels.map,
            "measures": self.measures,
            "hops": self.measures.hops.as_deref().and_then(|h| serde_json::from_str::<serde_json::Value>(h).ok()),
            "clock_unsynced": self.clock_unsynced,
            "clock_corrected": self.clock_corrected,
            "error_truncated": self.error_truncated,
            "run_id": self.run_id,
            "ip_family": self.link.ip_family,
            "local_address": self.link.local_address,
            "interface": self.link.interface,
        });
        serde_json::to_vec(&value).expect("a JSON value serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_columns_are_the_measures_and_path_changed() {
        let all = Measures {
            download_bits_per_second: Some(1.0),
            upload_bits_per_second: Some(1.0),
            idle_latency_seconds: Some(1.0),
            jitter_seconds: Some(1.0),
            download_loaded_latency_seconds: Some(1.0),
            upload_loaded_latency_seconds: Some(1.0),
            bytes_downloaded: Some(1),
            bytes_uploaded: Some(1),
            sent: Some(1),
            received: Some(1),
            loss_ratio: Some(1.0),
            rtt_min_seconds: Some(1.0),
            rtt_avg_seconds: Some(1.0),
            rtt_max_seconds: Some(1.0),
            rtt_mdev_seconds: Some(1.0),
            connect_seconds: Some(1.0),
            tls_seconds: Some(1.0),
            status_code: Some(1),
            dns_seconds: Some(1.0),
            ttfb_seconds: Some(1.0),
            transfer_seconds: Some(1.0),
            body_bytes: Some(1),
            tls_cert_expiry_seconds: Some(1.0),
            resolve_seconds: Some(1.0),
            answers: Some(1),
            rcode: Some("NOERROR".into()),
            reached: Some(true),
            hop_count: Some(1),
            path_id: Some("x".into()),
            path_loss_ratio: Some(0.0),
            path_protocol: Some("icmp".into()),
            responsiveness_rpm: Some(1.0),
            download_responsiveness_rpm: Some(1.0),
            upload_responsiveness_rpm: Some(1.0),
            loaded_latency_seconds: Some(1.0),
            load_connections: Some(1),
            stable: Some(true),
            rating: Some("poor".into()),
            forward_lost: Some(1),
            reverse_lost: Some(1),
            forward_loss_ratio: Some(0.0),
            reverse_loss_ratio: Some(0.0),
            duplicates: Some(1),
            reordered: Some(1),
            forward_delay_min_seconds: Some(1.0),
            forward_delay_avg_seconds: Some(1.0),
            forward_delay_max_seconds: Some(1.0),
            reverse_delay_min_seconds: Some(1.0),
            reverse_delay_avg_seconds: Some(1.0),
            reverse_delay_max_seconds: Some(1.0),
            mos: Some(4.4),
            download_loaded_loss_ratio: Some(0.0),
            upload_loaded_loss_ratio: Some(0.0),
            hops: Some("[]".into()),
        };
        let serde_json::Value::Object(fields) = serde_json::to_value(&all).unwrap() else {
            panic!("Measures serialises to an object");
        };
        let mut measures: Vec<&str> = fields.keys().map(String::as_str).collect();
        measures.push("path_changed");
        measures.sort_unstable();
        let mut listed = FIGURE_COLUMNS.to_vec();
        listed.sort_unstable();
        assert_eq!(listed, measures);
    }

    const NOW_NANOS: i64 = 1_790_000_000_000_000_000;

    fn now() -> SystemTime {
        from_unix_nanos(NOW_NANOS)
    }

    pub fn good(seq: u64) -> pb::Result {
        pb::Result {
            agent_id: "a1".into(),
            seq,
            test: "web".into(),
            kind: pb::Kind::Http as i32,
            target: "http://x/".into(),
            started_at_unix_nanos: NOW_NANOS - 1_000_000_000,
            duration_seconds: 0.1,
            success: true,
            labels: [("site".to_string(), "lab".to_string())].into(),
            fields: Some(pb::result::Fields::Http(pb::HttpFields {
                status_code: Some(200),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn batch(results: Vec<pb::Result>) -> Result<Batch, BatchRefused> {
        Batch::from_wire(pb::ResultBatch { results }, "a1", &Arc::from("inc"), now())
    }

    #[test]
    fn bad_results_are_quarantined_with_their_reason_and_bytes() {
        type Case = (fn(&mut pb::Result), &'static str);
        let cases: &[Case] = &[
            (|r| r.kind = 99, "kind 99 is not a known kind"),
            (|r| r.test = "x".repeat(1000), "test name is 1000 bytes"),
            (|r| r.duration_seconds = f64::NAN, "duration_seconds"),
            (|r| r.success = false, "error_class must be empty"),
            (
                |r| r.labels = (0..40).map(|i| (i.to_string(), "v".into())).collect(),
                "40 labels, at most 32",
            ),
            (
                |r| r.labels = [("site".into(), "a\0b".into())].into(),
                "control characters",
            ),
            (
                |r| {
                    r.success = false;
                    r.error_class = "timeout".into();
                    r.error_message = "e".repeat(5000);
                },
                "error message is 5000 bytes, at most 4096",
            ),
            (
                |r| r.fields = Some(pb::result::Fields::Dns(Default::default())),
                "fields do not match",
            ),
        ];
        for (i, (case, reason)) in cases.iter().enumerate() {
            let mut bad = good(2);
            case(&mut bad);
            let b = batch(vec![good(1), bad.clone(), good(3)]).unwrap();
            assert_eq!(
                b.rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
                [1, 3],
                "case {i}"
            );
            assert_eq!(b.last_seq, 3);
            assert_eq!(b.rejected.len(), 1, "case {i}");
            let q = &b.rejected[0];
            assert_eq!(q.seq, 2);
            assert!(q.reason.contains(reason), "case {i}: {}", q.reason);
            assert_eq!(q.raw_format, RawFormat::Protobuf);
            assert_eq!(
                q.raw,
                prost::Message::encode_to_vec(&bad),
                "case {i}: raw bytes are the result"
            );
        }
    }

    #[test]
    fn links_are_stored_empty_as_null_and_bad_ones_quarantined() {
        let mut v6 = good(1);
        v6.ip_family = "ipv6".into();
        v6.local_address = "2001:db8::10".into();
        v6.interface = "wwan0".into();
        let mut zoned = good(2);
        zoned.ip_family = "ipv6".into();
        zoned.local_address = "fe80::1%eth0".into();
        let mut v4 = good(3);
        v4.ip_family = "ipv4".into();
        v4.local_address = "192.0.2.7".into();
        let none = good(4);
        type Case = (fn(&mut pb::Result), &'static str);
        let cases: &[Case] = &[
            (|r| r.ip_family = "ip6".into(), "ip_family is `ip6`"),
            (
                |r| r.ip_family = "IPv4".into(),
                "must be ipv4, ipv6 or empty",
            ),
            (
                |r| r.interface = "a-very-long-ifname".into(),
                "interface is 18 bytes, at most 15",
            ),
            (|r| r.interface = "wan\0".into(), "interface contains NUL"),
            (
                |r| r.local_address = "1".repeat(65),
                "local_address is 65 bytes, at most 64",
            ),
            (
                |r| r.local_address = "192.0.2.7:443".into(),
                "is not an IP address",
            ),
            (|r| r.local_address = "wwan0".into(), "is not an IP address"),
        ];
        let bad: Vec<pb::Result> = cases
            .iter()
            .zip(5..)
            .map(|((case, _), seq)| {
                let mut r = good(seq);
                case(&mut r);
                r
            })
            .collect();
        let b = batch([vec![v6, zoned, v4, none], bad].concat()).unwrap();
        let links: Vec<&Link> = b.rows.iter().map(|r| &r.link).collect();
        assert_eq!(
            links,
            [
                &Link {
                    ip_family: Some(IpFamily::Ipv6),
                    local_address: Some("2001:db8::10".into()),
                    interface: Some("wwan0".into()),
                },
                &Link {
                    ip_family: Some(IpFamily::Ipv6),
                    local_address: Some("fe80::1%eth0".into()),
                    interface: None,
                },
                &Link {
                    ip_family: Some(IpFamily::Ipv4),
                    local_address: Some("192.0.2.7".into()),
                    interface: None,
                },
                &Link::default(),
            ]
        );
        assert_eq!(b.rejected.len(), cases.len());
        for (q, (_, reason)) in b.rejected.iter().zip(cases) {
            assert!(q.reason.contains(reason), "{}: {}", q.seq, q.reason);
        }
        let json: serde_json::Value = serde_json::from_slice(&b.rows[0].to_json()).unwrap();
        assert_eq!(json["ip_family"], "ipv6");
        assert_eq!(json["local_address"], "2001:db8::10");
        assert_eq!(json["interface"], "wwan0");
    }

    #[test]
    fn huge_raw_results_are_cut() {
        let mut bad = good(1);
        bad.test = "t".repeat(100_000);
        let b = batch(vec![bad]).unwrap();
        assert_eq!(b.rejected[0].raw.len(), MAX_RAW_BYTES);
        assert!(b.rejected[0].raw_truncated);
        assert_eq!(b.last_seq, 1);
    }

    #[test]
    fn a_bad_peer_refuses_the_whole_batch() {
        let mut other = good(1);
        other.agent_id = "a2".into();
        assert!(matches!(
            batch(vec![other]),
            Err(BatchRefused::Permission(_))
        ));
        for seqs in [vec![0], vec![u64::MAX], vec![2, 1], vec![1, 1]] {
            let results = seqs.iter().map(|&s| good(s)).collect();
            assert!(
                matches!(batch(results), Err(BatchRefused::Invalid(_))),
                "{seqs:?}"
            );
        }
        let many = (1..=10_001).map(good).collect();
        assert!(matches!(batch(many), Err(BatchRefused::Invalid(_))));
    }

    #[test]
    fn implausible_start_times_are_stored_by_arrival_and_flagged() {
        for claimed in [
            0,
            -5_000_000_000,
            1_559_390_400_000_000_000, // 2019-06-01
            NOW_NANOS + 7 * 86_400_000_000_000,
        ] {
            let mut r = good(1);
            r.started_at_unix_nanos = claimed;
            let b = batch(vec![r]).unwrap();
            let row = &b.rows[0];
            assert_eq!(row.started_at, now());
            assert_eq!(row.reported_started_at, Some(from_unix_nanos(claimed)));
            assert!(row.clock_unsynced);
        }
        let mut r = good(1);
        r.clock_unsynced = true;
        r.clock_corrected = true;
        r.error_truncated = true;
        let row = &batch(vec![r]).unwrap().rows[0];
        assert_eq!(row.started_at, from_unix_nanos(NOW_NANOS - 1_000_000_000));
        assert_eq!(row.reported_started_at, None);
        assert!(row.clock_unsynced && row.clock_corrected && row.error_truncated);
        assert!(!batch(vec![good(1)]).unwrap().rows[0].clock_unsynced);
    }

    #[test]
    fn consecutive_equal_labels_are_shared() {
        let b = batch(vec![good(1), good(2)]).unwrap();
        assert!(Arc::ptr_eq(&b.rows[0].labels, &b.rows[1].labels));
        assert_eq!(&*b.rows[0].incarnation, "inc");
    }

    #[test]
    fn refused_rows_render_as_json() {
        let row = batch(vec![good(1)]).unwrap().rows.remove(0);
        let q = Rejected::of_row(&row, "22P05", "no equivalent in LATIN1");
        assert_eq!(q.reason, "SQLSTATE 22P05: no equivalent in LATIN1");
        let v: serde_json::Value = serde_json::from_slice(&q.raw).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["labels"]["site"], "lab");
        assert_eq!(v["measures"]["status_code"], 200);
        assert_eq!(v["incarnation"], "inc");
    }

    fn good_path(seq: u64) -> pb::Result {
        let hop = |ttl: u32, address: &str| pb::PathHop {
            ttl,
            address: address.into(),
            addresses: if address.is_empty() {
                vec![]
            } else {
                vec![address.into()]
            },
            sent: 10,
            received: if address.is_empty() { 0 } else { 10 },
            loss_ratio: Some(if address.is_empty() { 1.0 } else { 0.0 }),
            rtt_avg_seconds: (!address.is_empty()).then_some(0.004),
            ..Default::default()
        };
        pb::Result {
            kind: pb::Kind::Path as i32,
            target: "192.0.2.9".into(),
            fields: Some(pb::result::Fields::Path(pb::PathFields {
                reached: true,
                hop_count: 3,
                path_id: "9f2c41aa".into(),
                path_loss_ratio: Some(0.0),
                rtt_avg_seconds: Some(0.012),
                protocol: "icmp".into(),
                hops: vec![hop(1, "fe80::1%eth0"), hop(2, ""), hop(3, "192.0.2.9")],
            })),
            ..good(seq)
        }
    }

    fn path_of(r: &mut pb::Result) -> &mut pb::PathFields {
        match &mut r.fields {
            Some(pb::result::Fields::Path(p)) => p,
            _ => unreachable!("a path result"),
        }
    }

    #[test]
    fn path_results_are_checked_hop_by_hop() {
        let row = batch(vec![good_path(1)]).unwrap().rows.remove(0);
        let m = &row.measures;
        assert_eq!(m.path_id.as_deref(), Some("9f2c41aa"));
        assert_eq!((m.reached, m.hop_count), (Some(true), Some(3)));
        assert_eq!(m.rtt_avg_seconds, Some(0.012));
        assert_eq!(m.path_protocol.as_deref(), Some("icmp"));
        let hops: serde_json::Value = serde_json::from_str(m.hops.as_deref().unwrap()).unwrap();
        assert_eq!(
            hops[0],
            serde_json::json!([
                1,
                "fe80::1%eth0",
                ["fe80::1%eth0"],
                10,
                10,
                0.0,
                null,
                0.004,
                null,
                null,
                false
            ])
        );
        assert_eq!(hops[1][1], serde_json::Value::Null);
        assert_eq!(hops[1][2], serde_json::json!([]));
        assert_eq!(hops[2][4], 10);
        let json: serde_json::Value = serde_json::from_slice(&row.to_json()).unwrap();
        assert_eq!(json["hops"][2][1], "192.0.2.9");

        type Case = (fn(&mut pb::PathFields), &'static str);
        let cases: &[Case] = &[
            (
                |p| {
                    p.hops = (1..=65)
                        .map(|t| pb::PathHop {
                            ttl: t,
                            ..Default::default()
                        })
                        .collect()
                },
                "65 hops, at most 64",
            ),
            (|p| p.hops[1].ttl = 1, "ascending ttl"),
            (|p| p.hops[0].ttl = 0, "outside 1..=255"),
            (|p| p.hops[2].ttl = 256, "outside 1..=255"),
            (
                |p| p.hops[0].address = "router.example".into(),
                "not an IP address",
            ),
            (
                |p| p.hops[0].addresses.push("10.0.0.300".into()),
                "not an IP address",
            ),
            (
                |p| p.hops[0].address = "10.0.0.1%eth0".into(),
                "not an IP address",
            ),
            (
                |p| p.hops[0].address = "fe80::1%".into(),
                "not an IP address",
            ),
            (
                |p| p.hops[0].addresses = vec!["10.0.0.1".into(); 9],
                "9 addresses, at most 8",
            ),
            (
                |p| p.hops[0].address = format!("fe80::1%{}", "e".repeat(60)),
                "at most 64",
            ),
            (|p| p.hops[2].received = 11, "received 11 > sent 10"),
            (|p| p.hops[2].loss_ratio = Some(1.5), "above 1"),
            (
                |p| p.hops[2].rtt_max_seconds = Some(f64::INFINITY),
                "not a finite",
            ),
            (
                |p| p.hops[2].rtt_min_seconds = Some(-0.001),
                "not a finite non-negative",
            ),
            (
                |p| p.path_id = "x".repeat(65),
                "path_id is 65 bytes, at most 64",
            ),
            (|p| p.path_id = "ab\ncd".into(), "control characters"),
            (|p| p.path_loss_ratio = Some(f64::NAN), "path_loss_ratio"),
            (|p| p.rtt_avg_seconds = Some(-1.0), "rtt_avg_seconds"),
            (|p| p.protocol = "sctp".into(), "not icmp, udp or tcp"),
            (|p| p.hop_count = 300, "hop_count 300"),
        ];
        for (i, (case, reason)) in cases.iter().enumerate() {
            let mut bad = good_path(2);
            case(path_of(&mut bad));
            let b = batch(vec![good_path(1), bad, good_path(3)]).unwrap();
            assert_eq!(b.rows.len(), 2, "case {i}");
            assert_eq!(b.rejected.len(), 1, "case {i}");
            assert!(
                b.rejected[0].reason.contains(reason),
                "case {i}: {}",
                b.rejected[0].reason
            );
        }
        // Nothing answered: no path id, stored as NULL.
        let mut empty = good_path(1);
        let p = path_of(&mut empty);
        p.path_id.clear();
        p.reached = false;
        p.path_loss_ratio = None;
        let row = batch(vec![empty]).unwrap().rows.remove(0);
        assert_eq!(row.measures.path_id, None);
        // Path fields on another kind are refused.
        let mut other = good_path(1);
        other.kind = pb::Kind::Icmp as i32;
        assert!(batch(vec![other]).unwrap().rejected[0]
            .reason
            .contains("fields do not match kind icmp"));
    }

    fn good_responsiveness(seq: u64) -> pb::Result {
        pb::Result {
            kind: pb::Kind::Responsiveness as i32,
            target: "https://nq.example.net/.well-known/nq".into(),
            fields: Some(pb::result::Fields::Responsiveness(
                pb::ResponsivenessFields {
                    responsiveness_rpm: Some(412.0),
                    download_responsiveness_rpm: Some(380.0),
                    upload_responsiveness_rpm: Some(444.0),
                    download_bits_per_second: Some(19.1e6),
                    upload_bits_per_second: Some(18.7e6),
                    idle_latency_seconds: Some(0.004),
                    loaded_latency_seconds: Some(60.0 / 412.0),
                    load_connections: 6,
                    stable: true,
                    rating: "fair".into(),
                },
            )),
            ..good(seq)
        }
    }

    fn responsiveness_of(r: &mut pb::Result) -> &mut pb::ResponsivenessFields {
        match &mut r.fields {
            Some(pb::result::Fields::Responsiveness(f)) => f,
            _ => unreachable!("a responsiveness result"),
        }
    }

    #[test]
    fn responsiveness_results_are_checked_against_the_rating_bands() {
        let row = batch(vec![good_responsiveness(1)]).unwrap().rows.remove(0);
        let m = &row.measures;
        assert_eq!(m.responsiveness_rpm, Some(412.0));
        assert_eq!(m.download_responsiveness_rpm, Some(380.0));
        assert_eq!(m.upload_responsiveness_rpm, Some(444.0));
        assert_eq!(m.download_bits_per_second, Some(19.1e6));
        assert_eq!(m.idle_latency_seconds, Some(0.004));
        assert_eq!(m.load_connections, Some(6));
        assert_eq!(m.stable, Some(true));
        assert_eq!(m.rating.as_deref(), Some("fair"));
        let json: serde_json::Value = serde_json::from_slice(&row.to_json()).unwrap();
        assert_eq!(json["measures"]["rating"], "fair");

        // Every band and its edges, as the agent rates them.
        for (rpm, rating) in [
            (0.0, "poor"),
            (299.9, "poor"),
            (300.0, "fair"),
            (999.9, "fair"),
            (1000.0, "good"),
            (5999.0, "good"),
            (6000.0, "excellent"),
            (MAX_RPM, "excellent"),
        ] {
            let mut r = good_responsiveness(1);
            let f = responsiveness_of(&mut r);
            f.responsiveness_rpm = Some(rpm);
            f.rating = rating.into();
            let b = batch(vec![r]).unwrap();
            assert_eq!(b.rows.len(), 1, "{rpm} {rating}: {:?}", b.rejected);
        }
        // No RPM (a failed run): no rating, stored as NULL.
        let mut failed = good_responsiveness(1);
        failed.success = false;
        failed.error_class = "timeout".into();
        let f = responsiveness_of(&mut failed);
        f.responsiveness_rpm = None;
        f.rating.clear();
        let row = batch(vec![failed]).unwrap().rows.remove(0);
        assert_eq!(row.measures.rating, None);

        type Case = (fn(&mut pb::ResponsivenessFields), &'static str);
        let cases: &[Case] = &[
            (
                |f| f.rating = "good".into(),
                "rating `good` does not match responsiveness_rpm = 412 (band fair)",
            ),
            (
                |f| {
                    f.responsiveness_rpm = Some(299.0);
                    f.rating = "fair".into();
                },
                "band poor",
            ),
            (
                |f| f.rating = "meh".into(),
                "not poor, fair, good or excellent",
            ),
            (
                |f| f.rating = "Fair".into(),
                "not poor, fair, good or excellent",
            ),
            (
                |f| f.responsiveness_rpm = None,
                "rating `fair` without a responsiveness_rpm",
            ),
            (
                |f| f.responsiveness_rpm = Some(-5.0),
                "responsiveness_rpm = -5 is not a finite non-negative number",
            ),
            (
                |f| f.download_responsiveness_rpm = Some(f64::NAN),
                "download_responsiveness_rpm",
            ),
            (
                |f| f.upload_responsiveness_rpm = Some(f64::INFINITY),
                "upload_responsiveness_rpm",
            ),
            (
                |f| f.upload_responsiveness_rpm = Some(600_001.0),
                "above 600000",
            ),
            (
                |f| f.loaded_latency_seconds = Some(-0.1),
                "loaded_latency_seconds",
            ),
            (
                |f| f.download_bits_per_second = Some(f64::NAN),
                "download_bits_per_second",
            ),
            (
                |f| f.load_connections = 65,
                "load_connections = 65, at most 64",
            ),
        ];
        for (i, (case, reason)) in cases.iter().enumerate() {
            let mut bad = good_responsiveness(2);
            case(responsiveness_of(&mut bad));
            let b = batch(vec![good_responsiveness(1), bad, good_responsiveness(3)]).unwrap();
            assert_eq!(b.rows.len(), 2, "case {i}");
            assert_eq!(b.rejected.len(), 1, "case {i}");
            assert!(
                b.rejected[0].reason.contains(reason),
                "case {i}: {}",
                b.rejected[0].reason
            );
        }
        // Responsiveness fields on another kind are refused.
        let mut other = good_responsiveness(1);
        other.kind = pb::Kind::Speed as i32;
        assert!(batch(vec![other]).unwrap().rejected[0]
            .reason
            .contains("fields do not match kind speed"));
    }

    fn good_stamp(seq: u64) -> pb::Result {
        pb::Result {
            kind: pb::Kind::Stamp as i32,
            target: "192.0.2.7:862".into(),
            duration_seconds: 4.1,
            fields: Some(pb::result::Fields::Stamp(pb::StampFields {
                sent: 1000,
                received: 962,
                forward_lost: 31,
                reverse_lost: 7,
                forward_loss_ratio: Some(0.031),
                reverse_loss_ratio: Some(7.0 / 969.0),
                duplicates: 2,
                reordered: 5,
                rtt_min_seconds: Some(0.010),
                rtt_avg_seconds: Some(0.012),
                rtt_max_seconds: Some(0.030),
                rtt_mdev_seconds: Some(0.002),
                forward_delay_min_seconds: Some(0.007),
                forward_delay_avg_seconds: Some(0.008),
                forward_delay_max_seconds: Some(0.020),
                reverse_delay_min_seconds: Some(-0.0002),
                reverse_delay_avg_seconds: Some(0.004),
                reverse_delay_max_seconds: Some(0.010),
                jitter_seconds: Some(0.001),
                mos: Some(3.9),
            })),
            ..good(seq)
        }
    }

    fn stamp_of(r: &mut pb::Result) -> &mut pb::StampFields {
        match &mut r.fields {
            Some(pb::result::Fields::Stamp(f)) => f,
            _ => unreachable!("a stamp result"),
        }
    }

    #[test]
    fn stamp_results_are_checked_for_contradictions() {
        let row = batch(vec![good_stamp(1)]).unwrap().rows.remove(0);
        let m = &row.measures;
        assert_eq!((m.sent, m.received), (Some(1000), Some(962)));
        assert_eq!((m.forward_lost, m.reverse_lost), (Some(31), Some(7)));
        assert_eq!(m.forward_loss_ratio, Some(0.031));
        assert_eq!((m.duplicates, m.reordered), (Some(2), Some(5)));
        assert_eq!(m.rtt_avg_seconds, Some(0.012));
        assert_eq!(m.forward_delay_avg_seconds, Some(0.008));
        assert_eq!(
            m.reverse_delay_min_seconds,
            Some(-0.0002),
            "stored as measured"
        );
        assert_eq!(m.jitter_seconds, Some(0.001));
        assert_eq!(m.mos, Some(3.9));
        let json: serde_json::Value = serde_json::from_slice(&row.to_json()).unwrap();
        assert_eq!(json["measures"]["forward_lost"], 31);

        // An unsynchronised clock: no one-way delays, the rest stands.
        let mut unsynced = good_stamp(1);
        unsynced.clock_unsynced = true;
        let f = stamp_of(&mut unsynced);
        f.forward_delay_min_seconds = None;
        f.forward_delay_avg_seconds = None;
        f.forward_delay_max_seconds = None;
        f.reverse_delay_min_seconds = None;
        f.reverse_delay_avg_seconds = None;
        f.reverse_delay_max_seconds = None;
        let row = batch(vec![unsynced]).unwrap().rows.remove(0);
        assert_eq!(row.measures.forward_delay_avg_seconds, None);
        assert_eq!(row.measures.rtt_avg_seconds, Some(0.012));
        // The edges: every packet lost forward, MOS at both ends of its range.
        let mut edges = good_stamp(1);
        let f = stamp_of(&mut edges);
        (f.received, f.forward_lost, f.reverse_lost) = (0, 1000, 0);
        f.forward_loss_ratio = Some(1.0);
        f.mos = Some(bounds::MOS_MIN);
        assert_eq!(batch(vec![edges]).unwrap().rows.len(), 1);
        let mut best = good_stamp(1);
        stamp_of(&mut best).mos = Some(bounds::MOS_MAX);
        assert_eq!(batch(vec![best]).unwrap().rows.len(), 1);

        type Case = (fn(&mut pb::StampFields), &'static str);
        let cases: &[Case] = &[
            (|f| f.received = 1001, "received = 1001 > sent = 1000"),
            (
                |f| f.forward_lost = 990,
                "forward_lost + reverse_lost = 990 + 7 > sent - received = 1000 - 962",
            ),
            (
                |f| (f.forward_lost, f.reverse_lost) = (u32::MAX, 2),
                "forward_lost + reverse_lost",
            ),
            (
                |f| f.forward_loss_ratio = Some(-0.01),
                "forward_loss_ratio = -0.01 is not a finite non-negative number",
            ),
            (
                |f| f.reverse_loss_ratio = Some(1.5),
                "reverse_loss_ratio = 1.5 is above 1",
            ),
            (|f| f.mos = Some(7.0), "mos = 7 is outside 1..=4.5"),
            (|f| f.mos = Some(0.5), "mos = 0.5 is outside"),
            (|f| f.mos = Some(f64::NAN), "mos = NaN is outside"),
            (|f| f.duplicates = 1001, "duplicates = 1001 > sent = 1000"),
            (|f| f.reordered = 5000, "reordered = 5000 > sent = 1000"),
            (|f| f.sent = 100_001, "sent = 100001, at most 100000"),
            (
                |f| f.rtt_min_seconds = Some(-0.001),
                "rtt_min_seconds = -0.001 is outside 0..=60 seconds",
            ),
            (|f| f.rtt_max_seconds = Some(61.0), "rtt_max_seconds = 61"),
            (|f| f.rtt_avg_seconds = Some(0.5), "rtt min/avg/max"),
            (
                |f| f.forward_delay_max_seconds = Some(0.001),
                "forward_delay min/avg/max",
            ),
            (
                |f| f.reverse_delay_avg_seconds = Some(f64::INFINITY),
                "reverse_delay_avg_seconds = inf",
            ),
            (
                |f| f.reverse_delay_min_seconds = Some(-61.0),
                "reverse_delay_min_seconds = -61 is outside -60..=60",
            ),
            (|f| f.jitter_seconds = Some(-0.001), "jitter_seconds"),
            (|f| f.rtt_mdev_seconds = Some(f64::NAN), "rtt_mdev_seconds"),
        ];
        for (i, (case, reason)) in cases.iter().enumerate() {
            let mut bad = good_stamp(2);
            case(stamp_of(&mut bad));
            let b = batch(vec![good_stamp(1), bad, good_stamp(3)]).unwrap();
            assert_eq!(b.rows.len(), 2, "case {i}");
            assert_eq!(b.rejected.len(), 1, "case {i}");
            assert!(
                b.rejected[0].reason.contains(reason),
                "case {i}: {}",
                b.rejected[0].reason
            );
        }
        // One-way delays from an agent that says its clock is unsynchronised.
        let mut made_up = good_stamp(2);
        made_up.clock_unsynced = true;
        let b = batch(vec![made_up]).unwrap();
        assert!(b.rejected[0].reason.contains("clock is unsynchronised"));
        // Stamp fields on another kind are refused.
        let mut other = good_stamp(1);
        other.kind = pb::Kind::Icmp as i32;
        assert!(batch(vec![other]).unwrap().rejected[0]
            .reason
            .contains("fields do not match kind icmp"));
    }

    #[test]
    fn speed_loaded_loss_is_a_ratio() {
        let speed = |down: Option<f64>, up: Option<f64>| pb::Result {
            kind: pb::Kind::Speed as i32,
            fields: Some(pb::result::Fields::Speed(pb::SpeedFields {
                download_bits_per_second: Some(9e7),
                download_loaded_loss_ratio: down,
                upload_loaded_loss_ratio: up,
                ..Default::default()
            })),
            ..good(1)
        };
        let row = batch(vec![speed(Some(0.02), Some(0.0))])
            .unwrap()
            .rows
            .remove(0);
        assert_eq!(row.measures.download_loaded_loss_ratio, Some(0.02));
        assert_eq!(row.measures.upload_loaded_loss_ratio, Some(0.0));
        let row = batch(vec![speed(None, None)]).unwrap().rows.remove(0);
        assert_eq!(row.measures.download_loaded_loss_ratio, None);
        for (down, up, reason) in [
            (
                Some(1.2),
                None,
                "download_loaded_loss_ratio = 1.2 is above 1",
            ),
            (None, Some(-0.1), "upload_loaded_loss_ratio = -0.1"),
            (Some(f64::NAN), None, "download_loaded_loss_ratio = NaN"),
        ] {
            let b = batch(vec![speed(down, up)]).unwrap();
            assert!(
                b.rejected[0].reason.contains(reason),
                "{}",
                b.rejected[0].reason
            );
        }
    }

    #[test]
    fn hellos_are_bounded() {
        let hello = |f: fn(&mut pb::Hello)| {
            let mut h = pb::Hello {
                agent_id: "a1".into(),
                version: "1".into(),
                incarnation: "00ff".into(),
                ..Default::default()
            };
            f(&mut h);
            AgentHello::try_from(h)
        };
        assert_eq!(hello(|_| {}).unwrap().incarnation, "00ff");
        assert!(hello(|h| h.incarnation = String::new()).is_ok());
        assert!(hello(|h| h.incarnation = "x".repeat(65)).is_err());
        assert!(hello(|h| h.agent_id = String::new()).is_err());
        assert!(
            hello(|h| h.labels = (0..33).map(|i| (i.to_string(), "v".into())).collect()).is_err()
        );
        let features = hello(|h| h.features = vec!["fleet-tests".into(), "run-now".into()]);
        assert_eq!(features.unwrap().features, ["fleet-tests", "run-now"]);
        assert!(hello(|h| h.features = vec!["f".into(); 33]).is_err());
        assert!(hello(|h| h.local_tests = vec!["x".repeat(257)]).is_err());
        assert!(hello(|h| h.local_tests = vec!["t".into(); 4097]).is_err());
    }
}
