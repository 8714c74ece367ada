//! Turns a probe `Outcome` into the wire `Result` stored in the buffer, and corrects the
//! start time of stored results once the clock can be trusted.
//!
//! The stored payload is a protobuf `edgeprobe.v1.Result` without `agent_id` and `seq`:
//! the buffer assigns the seq as the key, and the uplink fills both in when it sends.
//!
//! Invariant: a recorded result is within `edgeprobe_proto::bounds` (the collector's),
//! given a configuration that passed `check` (names, targets, labels): an over-long error
//! message is cut and flagged `error_truncated`, a measurement that is not a finite
//! non-negative number is left out, the duration is capped. Its start time is never a
//! reason to refuse it: it carries the boot-time clock and the sync flag (`clock.rs`).

use std::collections::BTreeMap;

use edgeprobe_proto::bounds;
use edgeprobe_proto::v1 as pb;
use prost::Message;

use crate::buffer::{Buffer, BufferError};
use crate::clock::{self, Clock};
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
    /// Non-zero for a run asked by run-now: the result carries it (stored as on_demand).
    pub run_id: u64,
}

/// The encoded payload for the buffer.
pub fn encode(test: &TestInfo, outcome: &Outcome, clock: &Clock) -> Vec<u8> {
    to_wire(test, outcome, clock).encode_to_vec()
}

pub fn to_wire(test: &TestInfo, outcome: &Outcome, clock: &Clock) -> pb::Result {
    let (error_class, error_message, error_truncated) = match &outcome.error {
        Some(e) => {
            let (message, cut) = bounds::fit_error_message(&e.message);
            (e.class.name().to_string(), message, cut)
        }
        None => (String::new(), String::new(), false),
    };
    let mut r = pb::Result {
        agent_id: String::new(),
        seq: 0,
        test: test.name.clone(),
        kind: pb::Kind::from(test.kind) as i32,
        // A URL's password never reaches the buffer, the collector or its database.
        target: crate::probe::addr::redact(&test.target).into_owned(),
        started_at_unix_nanos: clock::unix_nanos(outcome.started_at),
        duration_seconds: outcome
            .duration
            .as_secs_f64()
            .min(bounds::MAX_DURATION_SECONDS),
        success: outcome.success(),
        error_class,
        error_message,
        error_truncated,
        labels: test
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        fields: Some(fields_to_wire(&outcome.fields)),
        boottime_nanos: outcome.boottime_nanos,
        run_id: test.run_id,
        ip_family: outcome.ip_family.clone(),
        local_address: outcome.local_address.clone(),
        interface: outcome.interface.clone(),
        ..Default::default()
    };
    clock.stamp(&mut r);
    if r.clock_unsynced {
        drop_one_way_delays(&mut r);
    }
    r
}

/// One-way delays are differences of two clocks: a result whose own clock cannot vouch for
/// itself carries none (the probe checked the kernel's sync status when it measured, and the
/// clock model may disagree by the time the result is recorded; the collector refuses one-way
/// delays on an unsynchronised result, and the rest of the result stands without them).
fn drop_one_way_delays(r: &mut pb::Result) {
    if let Some(pb::result::Fields::Stamp(s)) = r.fields.as_mut() {
        s.forward_delay_min_seconds = None;
        s.forward_delay_avg_seconds = None;
        s.forward_delay_max_seconds = None;
        s.reverse_delay_min_seconds = None;
        s.reverse_delay_avg_seconds = None;
        s.reverse_delay_max_seconds = None;
    }
}

/// The corrected payload of a stored result, when the clock corrects it (see
/// `Clock::correct`); `None` leaves it as it is. Idempotent.
pub fn correct_payload(clock: &Clock, payload: &[u8]) -> Option<Vec<u8>> {
    let mut r = pb::Result::decode(payload).ok()?;
    clock.correct(&mut r).then(|| r.encode_to_vec())
}

/// Corrects, in the buffer, the start time of results recorded before anything vouched
/// for the clock, when one may be there (`Clock::mark_dirty`) and a base is known.
/// Returns how many changed.
pub async fn correct_buffered(clock: &Clock, buffer: &Buffer) -> Result<u64, BufferError> {
    if !clock.take_dirty() {
        return Ok(0);
    }
    let c = clock.clone();
    let result = buffer
        .rewrite("correcting the start time", move |p| correct_payload(&c, p))
        .await;
    if result.is_err() {
        clock.mark_dirty();
    }
    result
}

/// A measurement the collector takes: finite and not negative, else left out.
fn measure(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite() && *x >= 0.0)
}

fn fields_to_wire(fields: &Fields) -> pb::result::Fields {
    use pb::result::Fields as F;
    let m = measure;
    match fields {
        Fields::Speed(s) => F::Speed(pb::SpeedFields {
            download_bits_per_second: m(s.download_bits_per_second),
            upload_bits_per_second: m(s.upload_bits_per_second),
            idle_latency_seconds: m(s.idle_latency_seconds),
            jitter_seconds: m(s.jitter_seconds),
            download_loaded_latency_seconds: m(s.download_loaded_latency_seconds),
            upload_loaded_latency_seconds: m(s.upload_loaded_latency_seconds),
            bytes_downloaded: s.bytes_downloaded,
            bytes_uploaded: s.bytes_uploaded,
            download_loaded_loss_ratio: m(s.download_loaded_loss_ratio).map(|l| l.min(1.0)),
            upload_loaded_loss_ratio: m(s.upload_loaded_loss_ratio).map(|l| l.min(1.0)),
        }),
        Fields::Icmp(i) => F::Icmp(pb::IcmpFields {
            sent: i.sent,
            received: i.received.min(i.sent),
            loss_ratio: m(i.loss_ratio).map(|l| l.min(1.0)),
            rtt_min_seconds: m(i.rtt_min_seconds),
            rtt_avg_seconds: m(i.rtt_avg_seconds),
            rtt_max_seconds: m(i.rtt_max_seconds),
            rtt_mdev_seconds: m(i.rtt_mdev_seconds),
        }),
        Fields::Tcp(t) => F::Tcp(pb::TcpFields {
            connect_seconds: m(t.connect_seconds),
            tls_seconds: m(t.tls_seconds),
        }),
        Fields::Http(h) => F::Http(pb::HttpFields {
            status_code: h
                .status_code
                .map(u32::from)
                .filter(|c| (100..=999).contains(c)),
            dns_seconds: m(h.dns_seconds),
            connect_seconds: m(h.connect_seconds),
            tls_seconds: m(h.tls_seconds),
            ttfb_seconds: m(h.ttfb_seconds),
            transfer_seconds: m(h.transfer_seconds),
            body_bytes: h.body_bytes,
            tls_cert_expiry_seconds: h.tls_cert_expiry_seconds.filter(|x| x.is_finite()),
        }),
        Fields::Dns(d) => F::Dns(pb::DnsFields {
            resolve_seconds: m(d.resolve_seconds),
            answers: d.answers,
            rcode: fit_rcode(&d.rcode),
        }),
        Fields::Path(p) => F::Path(pb::PathFields {
            reached: p.reached,
            hop_count: p.hop_count,
            path_id: p.path_id.clone(),
            path_loss_ratio: m(p.path_loss_ratio).map(|l| l.min(1.0)),
            rtt_avg_seconds: m(p.rtt_avg_seconds),
            protocol: p.protocol.clone(),
            hops: p
                .hops
                .iter()
                .take(bounds::MAX_PATH_HOPS)
                .map(|h| pb::PathHop {
                    ttl: h.ttl,
                    address: h.address.clone().unwrap_or_default(),
                    addresses: h
                        .addresses
                        .iter()
                        .take(bounds::MAX_HOP_ADDRESSES)
                        .cloned()
                        .collect(),
                    sent: h.sent,
                    received: h.received.min(h.sent),
                    loss_ratio: m(h.loss_ratio).map(|l| l.min(1.0)),
                    rtt_min_seconds: m(h.rtt_min_seconds),
                    rtt_avg_seconds: m(h.rtt_avg_seconds),
                    rtt_max_seconds: m(h.rtt_max_seconds),
                    rtt_mdev_seconds: m(h.rtt_mdev_seconds),
                    rate_limited: h.rate_limited,
                })
                .collect(),
        }),
        Fields::Responsiveness(r) => F::Responsiveness(pb::ResponsivenessFields {
            responsiveness_rpm: m(r.responsiveness_rpm),
            download_responsiveness_rpm: m(r.download_responsiveness_rpm),
            upload_responsiveness_rpm: m(r.upload_responsiveness_rpm),
            download_bits_per_second: m(r.download_bits_per_second),
            upload_bits_per_second: m(r.upload_bits_per_second),
            idle_latency_seconds: m(r.idle_latency_seconds),
            loaded_latency_seconds: m(r.loaded_latency_seconds),
            load_connections: r.load_connections,
            stable: r.stable,
            rating: r.rating.clone(),
        }),
        Fields::Stamp(t) => F::Stamp(pb::StampFields {
            sent: t.sent,
            received: t.received.min(t.sent),
            forward_lost: t.forward_lost,
            reverse_lost: t.reverse_lost,
            forward_loss_ratio: m(t.forward_loss_ratio).map(|l| l.min(1.0)),
            reverse_loss_ratio: m(t.reverse_loss_ratio).map(|l| l.min(1.0)),
            duplicates: t.duplicates,
            reordered: t.reordered,
            rtt_min_seconds: m(t.rtt_min_seconds),
            rtt_avg_seconds: m(t.rtt_avg_seconds),
            rtt_max_seconds: m(t.rtt_max_seconds),
            rtt_mdev_seconds: m(t.rtt_mdev_seconds),
            forward_delay_min_seconds: m(t.forward_delay_min_seconds),
            forward_delay_avg_seconds: m(t.forward_delay_avg_seconds),
            forward_delay_max_seconds: m(t.forward_delay_max_seconds),
            reverse_delay_min_seconds: m(t.reverse_delay_min_seconds),
            reverse_delay_avg_seconds: m(t.reverse_delay_avg_seconds),
            reverse_delay_max_seconds: m(t.reverse_delay_max_seconds),
            jitter_seconds: m(t.jitter_seconds),
            mos: m(t.mos),
        }),
    }
}

/// DNS rcodes are short names; anything else would be refused by the collector.
fn fit_rcode(rcode: &str) -> String {
    if rcode.is_empty() || bounds::name("rcode", rcode, bounds::MAX_RCODE_LEN).is_ok() {
        rcode.to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::probe::{DnsFields, ErrorClass, ProbeError};

    fn test_info() -> TestInfo {
        TestInfo {
            name: "resolver".into(),
            kind: Kind::Dns,
            target: "example.net".into(),
            labels: [("site".to_string(), "berlin".to_string())].into(),
            run_id: 0,
        }
    }

    #[test]
    fn one_way_delays_only_on_a_result_whose_clock_vouches_for_it() {
        let clock = Clock::new();
        let fields = crate::probe::StampFields {
            sent: 10,
            received: 10,
            forward_delay_avg_seconds: Some(0.004),
            reverse_delay_avg_seconds: Some(0.003),
            rtt_avg_seconds: Some(0.007),
            ..Default::default()
        };
        let outcome = Outcome {
            started_at: SystemTime::now(),
            boottime_nanos: clock::boottime_nanos(),
            duration: Duration::from_secs(1),
            error: None,
            fields: Fields::Stamp(fields),
            ip_family: String::new(),
            local_address: String::new(),
            interface: String::new(),
        };
        let mut info = test_info();
        info.kind = Kind::Stamp;
        let r = to_wire(&info, &outcome, &clock);
        let Some(pb::result::Fields::Stamp(s)) = &r.fields else {
            panic!("not a stamp result: {:?}", r.fields);
        };
        assert_eq!(s.rtt_avg_seconds, Some(0.007));
        if r.clock_unsynced {
            assert_eq!(
                (s.forward_delay_avg_seconds, s.reverse_delay_avg_seconds),
                (None, None)
            );
        } else {
            assert_eq!(s.forward_delay_avg_seconds, Some(0.004));
        }
        // Whatever this host's clock says: a flagged result loses them, and only them.
        let mut flagged = r.clone();
        flagged.clock_unsynced = true;
        drop_one_way_delays(&mut flagged);
        let Some(pb::result::Fields::Stamp(s)) = &flagged.fields else {
            unreachable!()
        };
        assert_eq!(
            (s.forward_delay_avg_seconds, s.rtt_avg_seconds),
            (None, Some(0.007))
        );
    }

    #[test]
    fn results_fit_the_collectors_bounds() {
        let outcome = Outcome {
            started_at: SystemTime::now(),
            boottime_nanos: clock::boottime_nanos(),
            duration: Duration::from_secs(200_000),
            error: Some(ProbeError::new(
                ErrorClass::Dns,
                format!("{}\0", "é".repeat(bounds::MAX_ERROR_LEN)),
            )),
            fields: Fields::Dns(DnsFields {
                resolve_seconds: Some(f64::NAN),
                answers: 0,
                rcode: "SERVFAIL\u{7}WITH-A-VERY-LONG-TAIL".into(),
            }),
            ip_family: "ipv6".into(),
            local_address: "2001:db8::10".into(),
            interface: "wwan0".into(),
        };
        let clock = Clock::new();
        let r = to_wire(&test_info(), &outcome, &clock);
        assert!(r.error_truncated);
        assert!(bounds::text("error message", &r.error_message, bounds::MAX_ERROR_LEN).is_ok());
        assert_eq!(r.duration_seconds, bounds::MAX_DURATION_SECONDS);
        let Some(pb::result::Fields::Dns(d)) = &r.fields else {
            panic!("dns fields")
        };
        assert_eq!((d.resolve_seconds, d.rcode.as_str()), (None, ""));
        assert_eq!(r.boottime_nanos, outcome.boottime_nanos);
        assert_eq!(r.boot_id, clock::boot_id());
        assert!(bounds::labels(test_info().labels.iter()).is_ok());
        assert_eq!(
            (
                r.ip_family.as_str(),
                r.local_address.as_str(),
                r.interface.as_str()
            ),
            ("ipv6", "2001:db8::10", "wwan0")
        );
        assert!(bounds::result_link(&r.ip_family, &r.local_address, &r.interface).is_ok());

        let ok = Outcome {
            error: Some(ProbeError::new(ErrorClass::Dns, "short")),
            ..outcome
        };
        let r = to_wire(&test_info(), &ok, &clock);
        assert!(!r.error_truncated);
        assert_eq!(r.error_message, "short");
    }

    #[test]
    fn stored_targets_carry_no_password() {
        let test = TestInfo {
            kind: Kind::Http,
            target: "https://monitor:s3cret@example.net/health".into(),
            ..test_info()
        };
        let outcome = Outcome {
            started_at: SystemTime::now(),
            boottime_nanos: clock::boottime_nanos(),
            duration: Duration::from_millis(5),
            error: None,
            fields: Fields::Http(Default::default()),
            ip_family: String::new(),
            local_address: String::new(),
            interface: String::new(),
        };
        let r = to_wire(&test, &outcome, &Clock::new());
        assert_eq!(r.target, "https://monitor:***@example.net/health");
    }

    #[test]
    fn stored_payloads_are_corrected_once() {
        let clock = Clock::new();
        let mut r = pb::Result {
            started_at_unix_nanos: 5,
            boottime_nanos: 1_000,
            boot_id: clock.boot_id().to_string(),
            clock_unsynced: true,
            ..Default::default()
        };
        let payload = r.encode_to_vec();
        if clock.base().is_none() {
            assert_eq!(
                correct_payload(&clock, &payload),
                None,
                "no base, no change"
            );
            clock.observe_collector(1_750_000_000_000_000_000, Duration::ZERO);
        }
        let fixed = correct_payload(&clock, &payload).expect("corrected");
        let decoded = pb::Result::decode(fixed.as_slice()).unwrap();
        assert!(decoded.clock_corrected && !decoded.clock_unsynced);
        assert_eq!(correct_payload(&clock, &fixed), None, "idempotent");
        r.boot_id = "another boot".into();
        assert_eq!(correct_payload(&clock, &r.encode_to_vec()), None);
    }
}
