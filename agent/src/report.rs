//! What the agent shows people: one probe outcome for people (`probe`) or machines
//! (`probe --json`), with the field names of SPEC section 9 and the target redacted
//! (`user:***@`); and the buffer's counters (`buffer`, and the status file a running
//! agent publishes for it). Presentation only: nothing here reads or changes state.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::buffer::{buffer_dir, Stats};
use crate::probe::{addr, Fields, Outcome, ProbeSpec};

/// The buffer's counters as `edgeprobe-agent buffer --json` prints them (and as a running
/// agent publishes them, `run::status_path`): counts, bytes, seqs; `oldest_unix_seconds`
/// null when the buffer is empty.
pub fn buffer_json(stats: &Stats, state_dir: &Path) -> Value {
    json!({
        "buffer": buffer_dir(state_dir).display().to_string(),
        "incarnation": stats.incarnation,
        "backlog": stats.backlog,
        "oldest_unix_seconds": (stats.oldest_unix_seconds != 0).then_some(stats.oldest_unix_seconds),
        "stored_bytes": stats.bytes,
        "size_on_disk_bytes": stats.size_on_disk,
        "dropped": stats.dropped,
        "quarantined": stats.quarantined,
        "acked_seq": stats.acked,
        "next_seq": stats.next_seq,
    })
}

/// The counters back from [`buffer_json`]; `None` when `v` is not such an object.
pub fn stats_from_json(v: &Value) -> Option<Stats> {
    let n = |key: &str| v.get(key).and_then(Value::as_u64);
    Some(Stats {
        incarnation: v.get("incarnation")?.as_str()?.to_string(),
        backlog: n("backlog")?,
        bytes: n("stored_bytes")?,
        dropped: n("dropped")?,
        acked: n("acked_seq")?,
        quarantined: n("quarantined")?,
        next_seq: n("next_seq")?,
        oldest_unix_seconds: v
            .get("oldest_unix_seconds")
            .and_then(Value::as_i64)
            .unwrap_or(0),
        size_on_disk: n("size_on_disk_bytes")?,
    })
}

/// The buffer's counters as `edgeprobe-agent buffer` prints them, one per line.
pub fn buffer_status(stats: &Stats, state_dir: &Path) -> String {
    let oldest = if stats.oldest_unix_seconds == 0 {
        "-".to_string()
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let age = Duration::from_secs((now - stats.oldest_unix_seconds).max(0) as u64);
        format!("{} ago", humantime::format_duration(age))
    };
    let incarnation = if stats.incarnation.is_empty() {
        "- (created before incarnations)"
    } else {
        &stats.incarnation
    };
    format!(
        "buffer        {}\n\
         incarnation   {incarnation}\n\
         backlog       {} results\n\
         oldest        {oldest}\n\
         stored bytes  {}\n\
         size on disk  {}\n\
         dropped       {}\n\
         quarantined   {}\n\
         acked seq     {}\n\
         next seq      {}\n",
        buffer_dir(state_dir).display(),
        stats.backlog,
        stats.bytes,
        stats.size_on_disk,
        stats.dropped,
        stats.quarantined,
        stats.acked,
        stats.next_seq
    )
}

/// One JSON object: kind, target, success, error, started_at, duration_seconds and the
/// kind's fields.
pub fn json(spec: &ProbeSpec, outcome: &Outcome) -> Value {
    let mut object = Map::new();
    object.insert("kind".into(), json!(spec.kind.name()));
    object.insert("target".into(), json!(addr::redact(&spec.target)));
    object.insert("success".into(), json!(outcome.success()));
    object.insert(
        "error".into(),
        match &outcome.error {
            Some(e) => json!({ "class": e.class.name(), "message": e.message }),
            None => Value::Null,
        },
    );
    object.insert("started_at".into(), json!(rfc3339(outcome.started_at)));
    object.insert(
        "duration_seconds".into(),
        json!(outcome.duration.as_secs_f64()),
    );
    object.insert("ip_family".into(), json!(outcome.ip_family));
    object.insert("local_address".into(), json!(outcome.local_address));
    if !outcome.interface.is_empty() {
        object.insert("interface".into(), json!(outcome.interface));
    }
    if let Ok(Value::Object(fields)) = serde_json::to_value(&outcome.fields) {
        object.extend(fields);
    }
    Value::Object(object)
}

/// Aligned `name: value` lines; a path run as its hop table.
pub fn human(spec: &ProbeSpec, outcome: &Outcome) -> String {
    if let Fields::Path(path) = &outcome.fields {
        let target = addr::redact(&spec.target);
        return crate::probe::path::table::render(&target, path, outcome.error.as_ref());
    }
    let value = json(spec, outcome);
    let mut out = String::new();
    let Value::Object(map) = value else {
        return out;
    };
    // A figure shown in another unit than its key's (ms for `_seconds`, Mbit/s for
    // `_bits_per_second`) is shown under the key without the unit, so name and unit agree.
    let rows: Vec<(String, String)> = map
        .into_iter()
        .map(|(key, value)| match value {
            // Named as it would be with a value, so a row keeps its name across runs.
            Value::Null => (shown_name(&key).to_string(), "-".to_string()),
            Value::String(s) => (key, s),
            Value::Object(o) => {
                let shown = o
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{k}={}",
                            v.as_str().map(str::to_string).unwrap_or(v.to_string())
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                (key, shown)
            }
            Value::Number(n) if key.ends_with("_rpm") => {
                (key, format!("{:.0} RPM", n.as_f64().unwrap_or(0.0)))
            }
            Value::Number(n) if key.ends_with("_bits_per_second") => (
                shown_name(&key).to_string(),
                format!("{:.2} Mbit/s", n.as_f64().unwrap_or(0.0) / 1e6),
            ),
            Value::Number(n) if key.ends_with("_seconds") && key != "tls_cert_expiry_seconds" => (
                shown_name(&key).to_string(),
                format!("{:.3} ms", n.as_f64().unwrap_or(0.0) * 1e3),
            ),
            other => (key, other.to_string()),
        })
        .collect();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, shown) in rows {
        out.push_str(&format!("{key:width$}  {shown}\n"));
    }
    out
}

/// The name a figure is shown under in the table for people: without the base unit it is
/// not shown in (`_seconds` shown in ms, `_bits_per_second` in Mbit/s).
fn shown_name(key: &str) -> &str {
    if key == "tls_cert_expiry_seconds" {
        return key;
    }
    key.strip_suffix("_bits_per_second")
        .or_else(|| key.strip_suffix("_seconds"))
        .unwrap_or(key)
}

/// RFC 3339 UTC timestamp with microseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}
