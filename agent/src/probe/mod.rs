//! Probes: one run of one test, turned into an `Outcome`.
//!
//! Invariant: `run` always returns an `Outcome`; a failed probe is a value with an
//! `ErrorClass` and a message, never an `Err` or a panic. Probes know nothing about the
//! buffer, seq numbers or gRPC; `record.rs` turns an outcome into a stored result.
//! Every probe is bounded by its `timeout`, and a run cut off by it keeps what was
//! measured: probes publish their fields to a `Partial` after each phase, and the timeout
//! path reports the last published fields (class `timeout`, the phase it was in).

pub mod addr;
pub mod body;
pub mod dns;
pub(crate) mod errqueue;
pub mod http;
pub mod icmp;
pub mod path;
pub mod responsiveness;
pub mod speed;
pub mod stamp;
pub mod tcp;
pub mod tls;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::{Kind, TestOptions};

/// What to probe: the part of a test that a probe needs.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub kind: Kind,
    pub target: String,
    pub options: TestOptions,
    /// The link of one run: made afresh from `options` by [`run`], which records what it
    /// used.
    pub link: addr::Link,
}

impl ProbeSpec {
    pub fn new(kind: Kind, target: String, options: TestOptions) -> ProbeSpec {
        let link = addr::Link::of(&options);
        ProbeSpec {
            kind,
            target,
            options,
            link,
        }
    }

    /// The runs of one test: one, or with `family = "both"` one per family (IPv4 first),
    /// each recorded as a result of its own.
    pub fn runs(&self) -> Vec<ProbeSpec> {
        match self.options.family.unwrap_or_default() {
            addr::IpFamily::Both => [addr::IpFamily::Ipv4, addr::IpFamily::Ipv6]
                .into_iter()
                .map(|family| {
                    let mut options = self.options.clone();
                    options.family = Some(family);
                    ProbeSpec::new(self.kind, self.target.clone(), options)
                })
                .collect(),
            _ => vec![self.clone()],
        }
    }
}

/// Why a probe failed: a small closed set, stored as text in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The run exceeded its time limit.
    Timeout,
    /// The peer refused or reset the connection.
    Refused,
    /// The name did not resolve.
    Dns,
    /// TLS handshake or certificate failure.
    Tls,
    /// HTTP status other than the expected one.
    HttpStatus,
    /// Response body did not match.
    Mismatch,
    /// The network is unreachable or no route.
    Unreachable,
    /// The target answered "busy" (a speed target at its cap).
    Busy,
    /// ICMP echo answers lost (all of them).
    Loss,
    /// Protocol violation by the peer.
    Protocol,
    /// Local problem: permissions, sockets, configuration.
    Local,
    /// Anything else.
    Other,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Timeout => "timeout",
            ErrorClass::Refused => "refused",
            ErrorClass::Dns => "dns",
            ErrorClass::Tls => "tls",
            ErrorClass::HttpStatus => "http_status",
            ErrorClass::Mismatch => "mismatch",
            ErrorClass::Unreachable => "unreachable",
            ErrorClass::Busy => "busy",
            ErrorClass::Loss => "loss",
            ErrorClass::Protocol => "protocol",
            ErrorClass::Local => "local",
            ErrorClass::Other => "other",
        }
    }

    /// Classifies an I/O error from a socket operation.
    pub fn of_io(e: &std::io::Error) -> ErrorClass {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused | K::ConnectionReset | K::ConnectionAborted => ErrorClass::Refused,
            K::TimedOut => ErrorClass::Timeout,
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                ErrorClass::Unreachable
            }
            K::PermissionDenied => ErrorClass::Local,
            _ => ErrorClass::Other,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeError {
    pub class: ErrorClass,
    pub message: String,
}

impl ProbeError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ProbeError {
            class,
            message: message.into(),
        }
    }
}

/// The typed measurements of one run. Fields that could not be measured are `None`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Fields {
    Speed(SpeedFields),
    Icmp(IcmpFields),
    Tcp(TcpFields),
    Http(HttpFields),
    Dns(DnsFields),
    Path(PathFields),
    Responsiveness(ResponsivenessFields),
    Stamp(StampFields),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpeedFields {
    pub download_bits_per_second: Option<f64>,
    pub upload_bits_per_second: Option<f64>,
    pub idle_latency_seconds: Option<f64>,
    pub jitter_seconds: Option<f64>,
    pub download_loaded_latency_seconds: Option<f64>,
    pub upload_loaded_latency_seconds: Option<f64>,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    /// UDP loss of a light STAMP stream to the target's reflector while each direction was
    /// saturated (SPEC section 17); `None` when the target reflects no STAMP.
    pub download_loaded_loss_ratio: Option<f64>,
    pub upload_loaded_loss_ratio: Option<f64>,
    /// Streams that broke while the others carried on (JSON only: the wire has no field).
    pub streams_failed: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IcmpFields {
    pub sent: u32,
    pub received: u32,
    pub loss_ratio: Option<f64>,
    pub rtt_min_seconds: Option<f64>,
    pub rtt_avg_seconds: Option<f64>,
    pub rtt_max_seconds: Option<f64>,
    pub rtt_mdev_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TcpFields {
    pub connect_seconds: Option<f64>,
    pub tls_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HttpFields {
    pub status_code: Option<u16>,
    pub dns_seconds: Option<f64>,
    pub connect_seconds: Option<f64>,
    pub tls_seconds: Option<f64>,
    pub ttfb_seconds: Option<f64>,
    pub transfer_seconds: Option<f64>,
    pub body_bytes: u64,
    pub tls_cert_expiry_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DnsFields {
    pub resolve_seconds: Option<f64>,
    pub answers: u32,
    pub rcode: String,
}

/// A path run (SPEC section 15), per hop as `mtr --report` reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PathFields {
    pub protocol: String,
    pub reached: bool,
    pub hop_count: u32,
    pub path_id: String,
    pub path_loss_ratio: Option<f64>,
    pub rtt_avg_seconds: Option<f64>,
    pub hops: Vec<PathHop>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PathHop {
    pub ttl: u32,
    /// The address that answered most often; `None` when nothing answered.
    pub address: Option<String>,
    /// Every address that answered, most frequent first.
    pub addresses: Vec<String>,
    pub sent: u32,
    pub received: u32,
    pub loss_ratio: Option<f64>,
    pub rtt_min_seconds: Option<f64>,
    pub rtt_avg_seconds: Option<f64>,
    pub rtt_max_seconds: Option<f64>,
    pub rtt_mdev_seconds: Option<f64>,
    /// Loss here does not carry on to later hops: the router rate-limits its ICMP.
    pub rate_limited: bool,
}

/// A responsiveness run (SPEC section 16): RPM under working conditions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResponsivenessFields {
    pub responsiveness_rpm: Option<f64>,
    pub download_responsiveness_rpm: Option<f64>,
    pub upload_responsiveness_rpm: Option<f64>,
    pub download_bits_per_second: Option<f64>,
    pub upload_bits_per_second: Option<f64>,
    pub idle_latency_seconds: Option<f64>,
    pub loaded_latency_seconds: Option<f64>,
    pub load_connections: u32,
    pub stable: bool,
    /// "poor", "fair", "good" or "excellent"; empty when no RPM was measured.
    pub rating: String,
    /// The trimmed means the RPM comes from, averaged over both directions (JSON only: the
    /// wire has no field): foreign probes' TCP handshake, TLS handshake (per round trip;
    /// `None` over plain HTTP) and GET of the small object, and self probes' GET.
    pub foreign_tcp_seconds: Option<f64>,
    pub foreign_tls_seconds: Option<f64>,
    pub foreign_http_seconds: Option<f64>,
    pub self_http_seconds: Option<f64>,
}

/// A STAMP run (SPEC section 17; RFC 8762): loss per direction, one-way delay when both
/// clocks are synchronised (else `None`), RFC 3550 jitter and a voice MOS estimate.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StampFields {
    pub sent: u32,
    pub received: u32,
    pub forward_lost: u32,
    pub reverse_lost: u32,
    pub forward_loss_ratio: Option<f64>,
    pub reverse_loss_ratio: Option<f64>,
    pub duplicates: u32,
    pub reordered: u32,
    pub rtt_min_seconds: Option<f64>,
    pub rtt_avg_seconds: Option<f64>,
    pub rtt_max_seconds: Option<f64>,
    pub rtt_mdev_seconds: Option<f64>,
    pub forward_delay_min_seconds: Option<f64>,
    pub forward_delay_avg_seconds: Option<f64>,
    pub forward_delay_max_seconds: Option<f64>,
    pub reverse_delay_min_seconds: Option<f64>,
    pub reverse_delay_avg_seconds: Option<f64>,
    pub reverse_delay_max_seconds: Option<f64>,
    pub jitter_seconds: Option<f64>,
    pub mos: Option<f64>,
}

/// The result of one probe run, before it gets an agent id and a seq.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub started_at: SystemTime,
    /// The kernel's boot-time clock (CLOCK_BOOTTIME, nanoseconds) read with `started_at`:
    /// lets the start be corrected later in the same boot when the wall clock was wrong.
    pub boottime_nanos: i64,
    pub duration: Duration,
    /// `None` on success.
    pub error: Option<ProbeError>,
    pub fields: Fields,
    /// The family the run used ("ipv4", "ipv6"; "" when it opened no socket).
    pub ip_family: String,
    /// The local address of the run's sockets ("" when none was known).
    pub local_address: String,
    /// The interface the test is bound to ("" when it is not).
    pub interface: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.error.is_none()
    }
}

/// What a probe implementation returns: its fields (possibly partial) and maybe an error.
pub type Measured = (Fields, Option<ProbeError>);

/// What a probe has measured so far and what it is waiting for: written by the probe
/// after each phase, read by `run` when the limit cuts the probe off.
#[derive(Debug, Clone)]
pub struct Partial(Arc<Mutex<(Fields, String)>>);

impl Partial {
    fn new(kind: Kind) -> Partial {
        Partial(Arc::new(Mutex::new((empty_fields(kind), String::new()))))
    }

    /// Records the fields measured so far and, for the timeout message, what comes next
    /// (e.g. "waiting for the response").
    pub fn publish(&self, fields: Fields, waiting_for: impl Into<String>) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *slot = (fields, waiting_for.into());
    }

    fn take(&self) -> (Fields, String) {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.clone()
    }
}

/// Runs one probe. Never fails and never panics outward: every failure is in the outcome.
pub async fn run(spec: &ProbeSpec) -> Outcome {
    let (started_at, boottime_nanos) = crate::clock::now();
    let start = Instant::now();
    let limit = spec.options.timeout_for(spec.kind);
    // A fresh link per run: what it used is this run's.
    let mut spec_owned = spec.clone();
    spec_owned.link = addr::Link::of(&spec.options);
    let link = spec_owned.link.clone();
    let partial = Partial::new(spec.kind);
    let progress = partial.clone();
    // Spawned so that a panic inside a probe (a bug) becomes a failed result, not a crash.
    let task = tokio::spawn(async move {
        let partial = &progress;
        match spec_owned.kind {
            Kind::Speed => speed::run(&spec_owned, partial).await,
            Kind::Icmp => icmp::run(&spec_owned, partial).await,
            Kind::Tcp => tcp::run(&spec_owned, partial).await,
            Kind::Http => http::run(&spec_owned, partial).await,
            Kind::Dns => dns::run(&spec_owned, partial).await,
            Kind::Path => path::run(&spec_owned, partial).await,
            Kind::Responsiveness => responsiveness::run(&spec_owned, partial).await,
            Kind::Stamp => stamp::run(&spec_owned, partial).await,
        }
    });
    let abort = task.abort_handle();
    let (fields, error) = match tokio::time::timeout(limit, task).await {
        Ok(Ok(measured)) => measured,
        Ok(Err(join)) => (
            partial.take().0,
            Some(ProbeError::new(
                ErrorClass::Other,
                format!("probe failed internally: {join}"),
            )),
        ),
        Err(_) => {
            abort.abort();
            let (fields, waiting_for) = partial.take();
            let within = humantime::format_duration(limit);
            let message = if waiting_for.is_empty() {
                format!("no result within {within}")
            } else {
                format!("no result within {within}: {waiting_for}")
            };
            (fields, Some(ProbeError::new(ErrorClass::Timeout, message)))
        }
    };
    Outcome {
        started_at,
        boottime_nanos,
        duration: start.elapsed(),
        error,
        fields,
        ip_family: link.used_family().to_string(),
        local_address: link.used_local(),
        interface: link.interface.clone().unwrap_or_default(),
    }
}

pub fn empty_fields(kind: Kind) -> Fields {
    match kind {
        Kind::Speed => Fields::Speed(SpeedFields::default()),
        Kind::Icmp => Fields::Icmp(IcmpFields::default()),
        Kind::Tcp => Fields::Tcp(TcpFields::default()),
        Kind::Http => Fields::Http(HttpFields::default()),
        Kind::Dns => Fields::Dns(DnsFields::default()),
        Kind::Path => Fields::Path(PathFields::default()),
        Kind::Responsiveness => Fields::Responsiveness(ResponsivenessFields::default()),
        Kind::Stamp => Fields::Stamp(StampFields::default()),
    }
}

/// Seconds of a duration as f64, the unit of every result.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `family = "both"` is two runs, IPv4 then IPv6, each with its own link; any other
    /// family is the one run as configured.
    #[test]
    fn family_both_is_one_run_per_family() {
        let options = TestOptions {
            family: Some(addr::IpFamily::Both),
            interface: Some("wwan0".into()),
            ..TestOptions::default()
        };
        let spec = ProbeSpec::new(Kind::Tcp, "dual.test:443".into(), options);
        let runs = spec.runs();
        let families: Vec<_> = runs.iter().map(|r| r.link.family).collect();
        assert_eq!(families, [addr::IpFamily::Ipv4, addr::IpFamily::Ipv6]);
        assert!(runs
            .iter()
            .all(|r| r.link.interface.as_deref() == Some("wwan0")));
        let one = ProbeSpec::new(Kind::Tcp, "dual.test:443".into(), TestOptions::default());
        assert_eq!(one.runs().len(), 1);
        assert_eq!(one.runs()[0].link.family, addr::IpFamily::Any);
    }
}
