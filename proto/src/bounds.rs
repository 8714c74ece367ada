//! The bounds of everything an agent sends, and of what a collector sends it, defined once.
//!
//! `edgeprobe-agent check` refuses a configuration whose results would break them, the
//! agent makes every result it records fit them (an over-long error message is cut and
//! marked), and the collector validates what arrives against the same functions. A result
//! that still fails at the collector is quarantined, never a reason to stall a stream.
//!
//! The wire has one message bound for both directions (`MAX_MESSAGE_BYTES`): the
//! collector's server and the agent's client encode and decode up to it, so neither peer
//! sends a message the other refuses (a message over the decoder's limit ends the whole
//! stream, results and all). What one fleet push may carry (`MAX_PUSH_BYTES`) and how many
//! tests an agent may run (`MAX_AGENT_TESTS`) are bounded well inside it; `tests apply`
//! refuses a version that breaks them for an agent it selects, the collector checks a push
//! before it sends it, and the agent refuses (answers, keeps its stream) one that breaks them.
//!
//! Start times are not bounds: a result is never refused for its time. `plausible_start`
//! only says whether a start time can be stored as the time of the measurement.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Agent ids (also the client certificate's CN).
pub const MAX_ID_LEN: usize = 128;
/// Test names.
pub const MAX_NAME_LEN: usize = 128;
/// Targets (URLs, host:port, names).
pub const MAX_TARGET_LEN: usize = 2048;
/// Error messages; longer ones are cut by the agent and marked `error_truncated`.
pub const MAX_ERROR_LEN: usize = 4096;
/// Error classes ("timeout", "refused", ...).
pub const MAX_ERROR_CLASS_LEN: usize = 32;
/// DNS rcodes ("NOERROR", ...).
pub const MAX_RCODE_LEN: usize = 16;
/// Labels on one result, after the test's labels are merged over the agent's.
pub const MAX_LABELS: usize = 32;
/// Label keys and values, each.
pub const MAX_LABEL_LEN: usize = 128;
/// The agent's version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Buffer incarnation ids (hex).
pub const MAX_INCARNATION_LEN: usize = 64;
/// Results in one batch.
pub const MAX_BATCH_RESULTS: usize = 10_000;
/// One gRPC message, either direction, encoded: the collector's server and the agent's
/// client both encode and decode up to this.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// The `[[test]]` blocks of one fleet push (`FleetTests.tests_toml`, the tests selecting
/// one agent): under a quarter of a message, so a push always fits with room to spare,
/// also in the 1 MiB that agents before this bound decode.
pub const MAX_PUSH_BYTES: usize = 1_000_000;
/// Tests one agent runs: its local tests (`Hello.local_tests`) plus the fleet tests that
/// select it.
pub const MAX_AGENT_TESTS: usize = 4096;
/// Features one hello lists (`Hello.features`).
pub const MAX_HELLO_FEATURES: usize = 32;
/// A feature or local test name in a hello.
pub const MAX_HELLO_NAME_LEN: usize = 256;
/// One run-now ad-hoc `[[test]]` block (`RunNow.test_toml`).
pub const MAX_RUN_NOW_BYTES: usize = 64 << 10;
/// Hops in one path result (and the highest `max_hops` a path test may set).
pub const MAX_PATH_HOPS: usize = 64;
/// Addresses that answered at one hop of a path result, kept (most frequent first).
pub const MAX_HOP_ADDRESSES: usize = 8;
/// A hop address (an IPv6 address with a zone is the longest).
pub const MAX_HOP_ADDRESS_LEN: usize = 64;
/// A path result's `path_id` (hex).
pub const MAX_PATH_ID_LEN: usize = 64;
/// Test packets in one stamp run (SPEC section 17): the sender keeps a few words per packet.
pub const MAX_STAMP_COUNT: u32 = 100_000;
/// Shortest time between stamp test packets.
pub const MIN_STAMP_INTERVAL: Duration = Duration::from_millis(1);
/// A STAMP test packet's UDP payload: RFC 8762 section 4.2.1's unauthenticated packet, up
/// to what fits a 1500-byte IPv4 MTU without fragments.
pub const STAMP_MIN_PACKET_BYTES: u32 = 44;
pub const STAMP_MAX_PACKET_BYTES: u32 = 1472;
/// The range of an E-model MOS estimate (ITU-T G.107 Annex B: 1 at R <= 0, 4.5 at R = 100).
pub const MOS_MIN: f64 = 1.0;
pub const MOS_MAX: f64 = 4.5;
/// The most load-generating connections a responsiveness result may report (the draft's
/// MNP is 16; the bound leaves room for other clients' settings).
pub const MAX_LOAD_CONNECTIONS: u32 = 64;

/// The rating band of a responsiveness figure (draft-ietf-ippm-responsiveness; SPEC
/// section 16): poor below 300 RPM, fair below 1000, good below 6000, excellent from
/// 6000. The agent rates with it and the collector checks a result's rating against it.
pub fn rpm_rating(rpm: f64) -> &'static str {
    if rpm < 300.0 {
        "poor"
    } else if rpm < 1000.0 {
        "fair"
    } else if rpm < 6000.0 {
        "good"
    } else {
        "excellent"
    }
}

/// A result's `interface` (Linux's IFNAMSIZ less the NUL).
pub const MAX_INTERFACE_LEN: usize = 15;
/// A result's `local_address` (an IPv6 address with a zone is the longest).
pub const MAX_LOCAL_ADDRESS_LEN: usize = 64;
/// A result's `ip_family` ("ipv4", "ipv6" or empty).
pub const IP_FAMILIES: [&str; 3] = ["", "ipv4", "ipv6"];

/// Longest run of one test (`duration_seconds`).
pub const MAX_DURATION_SECONDS: f64 = 86_400.0;
/// Earliest start time taken as a real measurement time (2020-01-01): earlier ones come
/// from a clock that was never set (a box without a real-time clock boots in 1970).
pub const MIN_PLAUSIBLE_UNIX_SECONDS: u64 = 1_577_836_800;
/// Latest start time, ahead of the collector's clock, taken as a real measurement time.
pub const MAX_FUTURE: Duration = Duration::from_secs(86_400);

/// The link a result was taken on (`ip_family`, `local_address`, `interface`).
pub fn result_link(
    ip_family: &str,
    local_address: &str,
    interface: &str,
) -> Result<(), OutOfBounds> {
    if !IP_FAMILIES.contains(&ip_family) {
        return out(format!(
            "ip_family is `{ip_family}`, it must be ipv4, ipv6 or empty"
        ));
    }
    text("local_address", local_address, MAX_LOCAL_ADDRESS_LEN)?;
    text("interface", interface, MAX_INTERFACE_LEN)
}

/// A value outside its bound, with the reason (names the field and the limit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OutOfBounds(pub String);

fn out<T>(msg: String) -> Result<T, OutOfBounds> {
    Err(OutOfBounds(msg))
}

/// Free text (label values, targets, messages, versions): at most `max` bytes, no NUL.
/// PostgreSQL text cannot hold NUL.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), OutOfBounds> {
    if value.len() > max {
        return out(format!("{field} is {} bytes, at most {max}", value.len()));
    }
    if value.as_bytes().contains(&0) {
        return out(format!("{field} contains NUL"));
    }
    Ok(())
}

/// A name (agent id, test name, label key, target, error class): non-empty, at most `max`
/// bytes, no control characters.
pub fn name(field: &str, value: &str, max: usize) -> Result<(), OutOfBounds> {
    if value.is_empty() {
        return out(format!("{field} is empty"));
    }
    if has_control(value) {
        return out(format!("{field} contains control characters"));
    }
    text(field, value, max)
}

fn has_control(value: &str) -> bool {
    // ASCII (almost always) needs no char decoding; C0 and DEL are the ASCII controls.
    if value.is_ascii() {
        value.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        value.chars().any(char::is_control)
    }
}

/// One label: the key is a name, the value free text without control characters.
pub fn label(key: &str, value: &str) -> Result<(), OutOfBounds> {
    name("label key", key, MAX_LABEL_LEN)?;
    if has_control(value) {
        return out(format!("label `{key}`: value contains control characters"));
    }
    text(&format!("label `{key}` value"), value, MAX_LABEL_LEN)
}

/// The labels of one result (after merging): count and each label.
pub fn labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), OutOfBounds> {
    if labels.len() > MAX_LABELS {
        return out(format!("{} labels, at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        label(k, v)?;
    }
    Ok(())
}

/// A test's target.
pub fn target(value: &str) -> Result<(), OutOfBounds> {
    name("target", value, MAX_TARGET_LEN)
}

/// A test's name.
pub fn test_name(value: &str) -> Result<(), OutOfBounds> {
    name("test name", value, MAX_NAME_LEN)
}

/// An agent id.
pub fn agent_id(value: &str) -> Result<(), OutOfBounds> {
    name("agent id", value, MAX_ID_LEN)
}

/// What one fleet push carries for one agent: its `tests_toml` at most `MAX_PUSH_BYTES`.
pub fn fleet_push(tests_toml_bytes: usize) -> Result<(), OutOfBounds> {
    if tests_toml_bytes > MAX_PUSH_BYTES {
        return out(format!(
            "the fleet tests for this agent are {tests_toml_bytes} bytes, at most {MAX_PUSH_BYTES} in one push"
        ));
    }
    Ok(())
}

/// The tests one agent runs: local plus fleet, at most `MAX_AGENT_TESTS`.
pub fn agent_tests(local: usize, fleet: usize) -> Result<(), OutOfBounds> {
    if local.saturating_add(fleet) > MAX_AGENT_TESTS {
        return out(format!(
            "{fleet} fleet tests beside {local} local tests, at most {MAX_AGENT_TESTS} tests on one agent"
        ));
    }
    Ok(())
}

// A push (its blocks plus the version and framing) always fits in a message.
const _: () =
    assert!(MAX_PUSH_BYTES + 64 <= MAX_MESSAGE_BYTES / 2 && MAX_PUSH_BYTES + 64 <= 1 << 20);
const _: () = assert!(MAX_RUN_NOW_BYTES + MAX_NAME_LEN + 64 <= MAX_MESSAGE_BYTES / 2);

/// Makes an error message fit: NUL becomes U+FFFD and a message longer than
/// `MAX_ERROR_LEN` is cut at a character boundary. Returns the message and whether it was
/// cut.
pub fn fit_error_message(message: &str) -> (String, bool) {
    let clean = if message.as_bytes().contains(&0) {
        message.replace('\0', "\u{fffd}")
    } else {
        message.to_string()
    };
    if clean.len() <= MAX_ERROR_LEN {
        return (clean, false);
    }
    let mut end = MAX_ERROR_LEN;
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    (clean[..end].to_string(), true)
}

/// True when `started_at_unix_nanos` can be the time of a measurement seen at `now`:
/// not before 2020 and not more than `MAX_FUTURE` ahead.
pub fn plausible_start(started_at_unix_nanos: i64, now: SystemTime) -> bool {
    let Ok(nanos) = u64::try_from(started_at_unix_nanos) else {
        return false;
    };
    let t = UNIX_EPOCH + Duration::from_nanos(nanos);
    t >= UNIX_EPOCH + Duration::from_secs(MIN_PLAUSIBLE_UNIX_SECONDS) && t <= now + MAX_FUTURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        assert!(name("x", "ok", 10).is_ok());
        assert!(name("x", "", 10).is_err());
        assert!(name("x", "a\tb", 10).is_err());
        assert!(name("x", "a\u{85}b", 10).is_err());
        assert!(name("x", "elevenbytes", 10).is_err());
        assert!(label("site", "Zürich").is_ok());
        assert!(label("site", "a\0b").is_err());
        assert!(label("site", "a\nb").is_err());
        let many: std::collections::BTreeMap<String, String> =
            (0..33).map(|i| (i.to_string(), "v".to_string())).collect();
        let err = labels(many.iter()).unwrap_err();
        assert_eq!(err.to_string(), "33 labels, at most 32");
    }

    #[test]
    fn error_messages_are_cut_at_a_char_boundary() {
        let (m, cut) = fit_error_message("short\0");
        assert_eq!((m.as_str(), cut), ("short\u{fffd}", false));
        let long = "é".repeat(MAX_ERROR_LEN);
        let (m, cut) = fit_error_message(&long);
        assert!(cut && m.len() <= MAX_ERROR_LEN && m.len() >= MAX_ERROR_LEN - 1);
        assert!(text("error message", &m, MAX_ERROR_LEN).is_ok());
    }

    #[test]
    fn pushes_and_test_counts() {
        assert!(fleet_push(MAX_PUSH_BYTES).is_ok());
        let e = fleet_push(1_114_409).unwrap_err().to_string();
        assert_eq!(
            e,
            "the fleet tests for this agent are 1114409 bytes, at most 1000000 in one push"
        );
        assert!(agent_tests(96, 4000).is_ok());
        assert!(agent_tests(1, MAX_AGENT_TESTS).is_err());
    }

    #[test]
    fn plausible_start_times() {
        let now = SystemTime::now();
        let now_nanos = now.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
        assert!(plausible_start(now_nanos, now));
        assert!(!plausible_start(0, now));
        assert!(!plausible_start(-1, now));
        assert!(!plausible_start(1_559_390_400_000_000_000, now)); // 2019-06-01
        assert!(!plausible_start(now_nanos + 2 * 86_400_000_000_000, now));
    }
}
