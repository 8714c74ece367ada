//! The hop table of `probe path` without `--json`, laid out as `mtr --report`: one line
//! per TTL with Loss%, Snt, Last... mtr's Last is left out (a result keeps no single
//! probe), so the columns are Loss%, Snt, Rcv, Avg, Best, Wrst, StDev in milliseconds;
//! `!` after the loss marks a hop whose loss is rate limiting (it does not carry on),
//! further addresses of a hop follow on their own lines.

use crate::probe::{PathFields, ProbeError};

/// The table, its header naming the target and protocol, the error after it.
pub fn render(target: &str, fields: &PathFields, error: Option<&ProbeError>) -> String {
    let width = fields
        .hops
        .iter()
        .filter_map(|h| h.address.as_ref().map(String::len))
        .max()
        .unwrap_or(3)
        .max(4);
    let mut out = format!(
        "path to {target} ({}), {} hops, {}\n",
        fields.protocol,
        fields.hop_count,
        if fields.reached {
            "reached"
        } else {
            "not reached"
        }
    );
    out.push_str(&format!(
        "{:>3}  {:<width$}  {:>7} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8}\n",
        "TTL", "Host", "Loss%", "Snt", "Rcv", "Avg", "Best", "Wrst", "StDev"
    ));
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.2}", s * 1e3));
    for hop in &fields.hops {
        let loss = hop.loss_ratio.map_or("-".to_string(), |l| {
            format!(
                "{:.1}%{}",
                l * 100.0,
                if hop.rate_limited { "!" } else { "" }
            )
        });
        out.push_str(&format!(
            "{:>3}. {:<width$}  {:>7} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8}\n",
            hop.ttl,
            hop.address.as_deref().unwrap_or("???"),
            loss,
            hop.sent,
            hop.received,
            ms(hop.rtt_avg_seconds),
            ms(hop.rtt_min_seconds),
            ms(hop.rtt_max_seconds),
            ms(hop.rtt_mdev_seconds),
        ));
        for other in hop.addresses.iter().skip(1) {
            out.push_str(&format!("     {other}\n"));
        }
    }
    if fields.hops.iter().any(|h| h.rate_limited) {
        out.push_str("! loss at this hop does not carry on to later hops: the router rate-limits its ICMP, not path loss\n");
    }
    if let Some(loss) = fields.path_loss_ratio {
        out.push_str(&format!("path loss {:.1}%", loss * 100.0));
        if let Some(rtt) = fields.rtt_avg_seconds {
            out.push_str(&format!(", RTT {:.2} ms", rtt * 1e3));
        }
        out.push('\n');
    }
    out.push_str(&format!("path id {}\n", fields.path_id));
    if let Some(e) = error {
        out.push_str(&format!("error {}: {}\n", e.class, e.message));
    }
    out
}
