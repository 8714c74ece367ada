//! Domain types of the collector and the one place where wire messages become them.
//!
//! Invariant: every bound of SPEC section 6 is checked here, in `ResultRow::from_wire` and
//! the `TryFrom<pb::…>` impls, before anything reaches the store; the store never sees
//! protobuf types and can trust what it gets (lengths, label counts, enum values, finite
//! numbers, sane timestamps).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::v1 as pb;

pub const MAX_ID_LEN: usize = 128;
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_TARGET_LEN: usize = 2048;
pub const MAX_ERROR_LEN: usize = 4096;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_LEN: usize = 128;
pub const MAX_VERSION_LEN: usize = 64;
pub const MAX_BATCH_RESULTS: usize = 10_000;
/// Oldest accepted start time: results from before 2020 come from a broken clock.
const MIN_STARTED_AT: u64 = 1_577_836_800;
/// Latest accepted start time relative to now.
const MAX_FUTURE: Duration = Duration::from_secs(86_400);

/// Why a message was refused; maps to INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Speed,
    Icmp,
    Tcp,
    Http,
    Dns,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Speed => "speed",
            Kind::Icmp => "icmp",
            Kind::Tcp => "tcp",
            Kind::Http => "http",
            Kind::Dns => "dns",
        }
    }
}

/// An agent's introduction.
#[derive(Debug, Clone)]
pub struct AgentHello {
    pub agent_id: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
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
    pub seq: i64,
    pub test: String,
    pub kind: Kind,
    pub target: String,
    pub started_at: SystemTime,
    pub duration_seconds: f64,
    pub success: bool,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    /// Shared by the consecutive results of a batch that carry the same labels.
    pub labels: Arc<Labels>,
    pub measures: Measures,
}

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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measures {
    pub download_bits_per_second: Option<f64>,
    pub upload_bits_per_second: Option<f64>,
    pub idle_latency_seconds: Option<f64>,
    pub jitter_seconds: Option<f64>,
    pub download_loaded_latency_seconds: Option<f64>,
    pub upload_loaded_latency_seconds: Option<f64>,
    pub bytes_downloaded: Option<i64>,
    pub bytes_uploaded: Option<i64>,
    pub sent: Option<i32>,
    pub received: Option<i32>,
    pub loss_ratio: Option<f64>,
    pub rtt_min_seconds: Option<f64>,
    pub rtt_avg_seconds: Option<f64>,
    pub rtt_max_seconds: Option<f64>,
    pub rtt_mdev_seconds: Option<f64>,
    pub connect_seconds: Option<f64>,
    pub tls_seconds: Option<f64>,
    pub status_code: Option<i32>,
    pub dns_seconds: Option<f64>,
    pub ttfb_seconds: Option<f64>,
    pub transfer_seconds: Option<f64>,
    pub body_bytes: Option<i64>,
    pub tls_cert_expiry_seconds: Option<f64>,
    pub resolve_seconds: Option<f64>,
    pub answers: Option<i32>,
    pub rcode: Option<String>,
}

/// Takes the wire string when it is within bounds (no copy on the hot path).
fn text(field: &str, value: String, max: usize) -> Result<String, Invalid> {
    if value.len() > max {
        return invalid(format!("{field} longer than {max} bytes"));
    }
    if value.as_bytes().contains(&0) {
        return invalid(format!("{field} contains NUL"));
    }
    Ok(value)
}

fn name(field: &str, value: String, max: usize) -> Result<String, Invalid> {
    if value.is_empty() {
        return invalid(format!("{field} is empty"));
    }
    // ASCII names (almost all) need no char decoding; C0 and DEL are the ASCII controls.
    let control = if value.is_ascii() {
        value.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        value.chars().any(char::is_control)
    };
    if control {
        return invalid(format!("{field} contains control characters"));
    }
    text(field, value, max)
}

pub fn labels(map: HashMap<String, String>) -> Result<BTreeMap<String, String>, Invalid> {
    if map.len() > MAX_LABELS {
        return invalid(format!("{} labels, at most {MAX_LABELS}", map.len()));
    }
    map.into_iter()
        .map(|(k, v)| {
            Ok((
                name("label key", k, MAX_LABEL_LEN)?,
                text("label value", v, MAX_LABEL_LEN)?,
            ))
        })
        .collect()
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

impl TryFrom<pb::Hello> for AgentHello {
    type Error = Invalid;
    fn try_from(h: pb::Hello) -> Result<Self, Invalid> {
        Ok(AgentHello {
            agent_id: name("agent_id", h.agent_id, MAX_ID_LEN)?,
            version: text("version", h.version, MAX_VERSION_LEN)?,
            labels: labels(h.labels)?,
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

impl ResultRow {
    /// Validates one wire result. `previous` is the labels of the result before it in the
    /// batch: when this one carries the same, they are shared instead of rebuilt.
    pub fn from_wire(r: pb::Result, previous: Option<&Arc<Labels>>) -> Result<Self, Invalid> {
        use pb::result::Fields as F;
        let kind = match pb::Kind::try_from(r.kind) {
            Ok(pb::Kind::Speed) => Kind::Speed,
            Ok(pb::Kind::Icmp) => Kind::Icmp,
            Ok(pb::Kind::Tcp) => Kind::Tcp,
            Ok(pb::Kind::Http) => Kind::Http,
            Ok(pb::Kind::Dns) => Kind::Dns,
            _ => return invalid(format!("kind {} is not a known kind", r.kind)),
        };
        if r.seq == 0 || r.seq > i64::MAX as u64 {
            return invalid(format!("seq {} out of range", r.seq));
        }
        let min = UNIX_EPOCH + Duration::from_secs(MIN_STARTED_AT);
        let max = SystemTime::now() + MAX_FUTURE;
        if r.started_at_unix_nanos < 0 {
            return invalid("started_at before 1970");
        }
        let started_at = UNIX_EPOCH + Duration::from_nanos(r.started_at_unix_nanos as u64);
        if started_at < min || started_at > max {
            return invalid("started_at outside 2020..now+1d");
        }
        if !r.duration_seconds.is_finite() || !(0.0..=86_400.0).contains(&r.duration_seconds) {
            return invalid("duration_seconds outside 0..86400");
        }
        if r.success != r.error_class.is_empty() {
            return invalid("error_class must be empty exactly when success is true");
        }
        let error_class = if r.error_class.is_empty() {
            None
        } else {
            Some(name("error_class", r.error_class, 32)?)
        };
        let error_message = if r.error_message.is_empty() {
            None
        } else {
            Some(text("error_message", r.error_message, MAX_ERROR_LEN)?)
        };
        let mut m = Measures::default();
        match (kind, r.fields) {
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
                m.rcode = if d.rcode.is_empty() {
                    None
                } else {
                    Some(name("rcode", d.rcode, 16)?)
                };
            }
            (_, None) => {}
            (kind, Some(_)) => return invalid(format!("fields do not match kind {}", kind.name())),
        }
        let labels = match previous {
            Some(p) if p.same_as(&r.labels) => p.clone(),
            _ => Arc::new(Labels::new(labels(r.labels)?)),
        };
        Ok(ResultRow {
            agent_id: name("agent_id", r.agent_id, MAX_ID_LEN)?,
            seq: r.seq as i64,
            test: name("test", r.test, MAX_NAME_LEN)?,
            kind,
            target: name("target", r.target, MAX_TARGET_LEN)?,
            started_at,
            duration_seconds: r.duration_seconds,
            success: r.success,
            error_class,
            error_message,
            labels,
            measures: m,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn good() -> pb::Result {
        pb::Result {
            agent_id: "a1".into(),
            seq: 1,
            test: "web".into(),
            kind: pb::Kind::Http as i32,
            target: "http://x/".into(),
            started_at_unix_nanos: 1_790_000_000_000_000_000,
            duration_seconds: 0.1,
            success: true,
            fields: Some(pb::result::Fields::Http(pb::HttpFields {
                status_code: Some(200),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_good_and_refuses_bad() {
        assert!(ResultRow::from_wire(good(), None).is_ok());
        let cases: &[fn(&mut pb::Result)] = &[
            |r| r.kind = 99,
            |r| r.seq = 0,
            |r| r.test = "x".repeat(1000),
            |r| r.duration_seconds = f64::NAN,
            |r| r.started_at_unix_nanos = 5,
            |r| r.success = false,
            |r| {
                r.labels = (0..40).map(|i| (i.to_string(), "v".into())).collect();
            },
            |r| r.fields = Some(pb::result::Fields::Dns(Default::default())),
            |r| r.agent_id = "a\0b".into(),
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut r = good();
            case(&mut r);
            assert!(ResultRow::from_wire(r, None).is_err(), "case {i} accepted");
        }
    }
}
