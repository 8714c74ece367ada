//! Turns a probe `Outcome` into the wire `Result` stored in the buffer.
//!
//! The stored payload is a protobuf `edgeprobe.v1.Result` without `agent_id` and `seq`:
//! the buffer assigns the seq as the key, and the uplink fills both in when it sends.

use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

use edgeprobe_proto::v1 as pb;
use prost::Message;

use crate::config::Kind;
use crate::probe::{Fields, Outcome};

/// Test identity attached to every result of a test.
#[derive(Debug, Clone)]
pub struct TestInfo {
    pub name: String,
    pub kind: Kind,
    pub target: String,
    /// Agent labels overlaid with the test's own.
    pub labels: BTreeMap<String, String>,
}

pub fn kind_to_wire(kind: Kind) -> pb::Kind {
    match kind {
        Kind::Speed => pb::Kind::Speed,
        Kind::Icmp => pb::Kind::Icmp,
        Kind::Tcp => pb::Kind::Tcp,
        Kind::Http => pb::Kind::Http,
        Kind::Dns => pb::Kind::Dns,
    }
}

/// The encoded payload for the buffer.
pub fn encode(test: &TestInfo, outcome: &Outcome) -> Vec<u8> {
    to_wire(test, outcome).encode_to_vec()
}

pub fn to_wire(test: &TestInfo, outcome: &Outcome) -> pb::Result {
    let started = outcome
        .started_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let (error_class, error_message) = match &outcome.error {
        Some(e) => (e.class.name().to_string(), e.message.clone()),
        None => (String::new(), String::new()),
    };
    pb::Result {
        agent_id: String::new(),
        seq: 0,
        test: test.name.clone(),
        kind: kind_to_wire(test.kind) as i32,
        target: test.target.clone(),
        started_at_unix_nanos: started,
        duration_seconds: outcome.duration.as_secs_f64(),
        success: outcome.success(),
        error_class,
        error_message,
        labels: test
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        fields: Some(fields_to_wire(&outcome.fields)),
        ..Default::default()
    }
}

fn fields_to_wire(fields: &Fields) -> pb::result::Fields {
    use pb::result::Fields as F;
    match fields {
        Fields::Speed(s) => F::Speed(pb::SpeedFields {
            download_bits_per_second: s.download_bits_per_second,
            upload_bits_per_second: s.upload_bits_per_second,
            idle_latency_seconds: s.idle_latency_seconds,
            jitter_seconds: s.jitter_seconds,
            download_loaded_latency_seconds: s.download_loaded_latency_seconds,
            upload_loaded_latency_seconds: s.upload_loaded_latency_seconds,
            bytes_downloaded: s.bytes_downloaded,
            bytes_uploaded: s.bytes_uploaded,
        }),
        Fields::Icmp(i) => F::Icmp(pb::IcmpFields {
            sent: i.sent,
            received: i.received,
            loss_ratio: i.loss_ratio,
            rtt_min_seconds: i.rtt_min_seconds,
            rtt_avg_seconds: i.rtt_avg_seconds,
            rtt_max_seconds: i.rtt_max_seconds,
            rtt_mdev_seconds: i.rtt_mdev_seconds,
        }),
        Fields::Tcp(t) => F::Tcp(pb::TcpFields {
            connect_seconds: t.connect_seconds,
            tls_seconds: t.tls_seconds,
        }),
        Fields::Http(h) => F::Http(pb::HttpFields {
            status_code: h.status_code.map(u32::from),
            dns_seconds: h.dns_seconds,
            connect_seconds: h.connect_seconds,
            tls_seconds: h.tls_seconds,
            ttfb_seconds: h.ttfb_seconds,
            transfer_seconds: h.transfer_seconds,
            body_bytes: h.body_bytes,
            tls_cert_expiry_seconds: h.tls_cert_expiry_seconds,
        }),
        Fields::Dns(d) => F::Dns(pb::DnsFields {
            resolve_seconds: d.resolve_seconds,
            answers: d.answers,
            rcode: d.rcode.clone(),
        }),
    }
}
