//! path probe (SPEC section 15): per-hop loss and latency to a target, as `mtr --report`
//! shows them, over `count` rounds `interval` apart, TTL 1 up to `max_hops`, with ICMP
//! echo (default), UDP or TCP SYN probes, IPv4 and IPv6 (zones as everywhere, `addr.rs`).
//!
//! - `session.rs`: sockets and the send/receive loop (privileges per protocol there);
//!   `packet.rs`: probes and answers, one flow identity per run (Paris traceroute);
//!   `stats.rs`: mtr's per-hop figures, rate limiting, `path_id`; `table.rs`: the hop
//!   table people read.
//! - A round sends every TTL up to the limit a few ms apart; once the destination has
//!   answered at TTL d, later rounds stop at d (and at the TTL of a destination-
//!   unreachable). Answers count within `reply_wait` of their probe:
//!   `defaults::PATH_PROBE_TIMEOUT` (3 s), less when the run's limit leaves less after
//!   the sending schedule, at least `MIN_REPLY_WAIT`.
//! - The result lists TTL 1 to `hop_count`: the destination's TTL when reached, else
//!   the TTL of a destination-unreachable, else the last TTL anything answered at.
//!   `path_loss_ratio` and `rtt_avg_seconds` are the destination hop's when reached (loss
//!   that persists to the destination), else null.
//! - Success means the destination answered. Otherwise the result is a failure with
//!   the hops seen, and the class says why (the rule, in order):
//!   1. `unreachable`: a destination-unreachable came back (the message names the
//!      router, the hop and the reason), or a probe could not be sent (no route,
//!      blackhole; a local firewall's EPERM is `local`);
//!   2. `unreachable`: the hop at `max_hops` still answered time-exceeded: the target is
//!      further than `max_hops` ("raise max_hops");
//!   3. `loss`: nothing answered past hop N (or nothing at all): the destination, or the
//!      path after hop N, drops the probes (as the icmp probe calls a silent host).
//! - The run stays within its limit: its own deadline is the limit less a margin, and
//!   the fields are published to `Partial` before every round, so a run cut off keeps
//!   the hops seen.

mod packet;
mod session;
mod stats;
pub mod table;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgeprobe_proto::bounds;
use edgeprobe_proto::testdef::{defaults, PathProtocol};

use super::{addr, icmp, ErrorClass, Fields, Measured, Partial, PathFields, ProbeError, ProbeSpec};
use session::{Plan, Session, Tally};

/// The shortest wait for an answer, when the run's limit leaves less after the sending
/// schedule (the last rounds are then cut off by the run's end instead).
const MIN_REPLY_WAIT: Duration = Duration::from_millis(500);
/// Rounds at most: sequence numbers are 16 bits, and 64 hops of 1,000 rounds already
/// wrap them once (a wrapped number is long answered or given up).
const MAX_COUNT: u32 = 10_000;

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let protocol = spec.options.protocol.unwrap_or_default();
    let fields = PathFields {
        protocol: protocol.name().to_string(),
        ..PathFields::default()
    };
    partial.publish(Fields::Path(fields.clone()), "resolving the target");
    match measure(spec, protocol, partial).await {
        Ok((fields, error)) => (Fields::Path(fields), error),
        Err(error) => (Fields::Path(fields), Some(error)),
    }
}

async fn measure(
    spec: &ProbeSpec,
    protocol: PathProtocol,
    partial: &Partial,
) -> Result<(PathFields, Option<ProbeError>), ProbeError> {
    let start = Instant::now();
    let options = &spec.options;
    let limit = options.timeout_for(spec.kind);
    let usable = limit.saturating_sub((limit / 10).min(Duration::from_millis(200)));
    let count = options
        .count
        .unwrap_or(defaults::PATH_COUNT)
        .clamp(1, MAX_COUNT);
    let interval = options.interval.unwrap_or(defaults::PATH_INTERVAL);
    let max_hops = options
        .max_hops
        .unwrap_or(defaults::PATH_MAX_HOPS)
        .clamp(1, bounds::MAX_PATH_HOPS as u32);
    let port = match protocol {
        PathProtocol::Icmp => 0,
        PathProtocol::Udp => options.port.unwrap_or(defaults::PATH_UDP_PORT),
        PathProtocol::Tcp => options.port.unwrap_or(defaults::PATH_TCP_PORT),
    };
    let dest = addr::resolve(spec.target.trim(), port, &spec.link).await?;
    let session = Session::open(protocol, dest, &spec.link)?;
    let schedule = interval.saturating_mul(count - 1);
    let reply_wait = usable
        .saturating_sub(schedule)
        .min(defaults::PATH_PROBE_TIMEOUT)
        .max(MIN_REPLY_WAIT);
    tracing::debug!(target = %spec.target, dest = %dest.ip(), sockets = session.describe(),
        ?reply_wait, "path run");
    let plan = Plan {
        count,
        interval,
        max_hops,
        reply_wait,
        start,
        deadline: start + usable,
    };
    let progress = partial.clone();
    let name = protocol.name();
    let tally = tokio::task::spawn_blocking(move || {
        session.run(plan, |tally| {
            let fields = summarize(tally, name);
            let waiting_for = format!(
                "{} of {count} rounds sent, {} hops seen",
                tally.rounds, fields.hop_count
            );
            progress.publish(Fields::Path(fields), waiting_for);
        })
    })
    .await
    .map_err(|e| ProbeError::new(ErrorClass::Other, format!("path session failed: {e}")))?;
    let fields = summarize(&tally, name);
    let error = verdict(&tally, &fields, dest, max_hops);
    Ok((fields, error))
}

/// The fields of a tally: hops 1 to `hop_count`, rate limiting, identity, the
/// destination's figures.
fn summarize(tally: &Tally, protocol: &str) -> PathFields {
    let answered = |ttl: &u32| tally.hops[*ttl as usize - 1].received > 0;
    let last = tally
        .reached_at
        .or(tally.unreachable.map(|(ttl, _, _)| ttl))
        .or_else(|| (1..=tally.hops.len() as u32).rev().find(answered))
        .unwrap_or(0);
    let mut hops: Vec<_> = (1..=last)
        .map(|ttl| tally.hops[ttl as usize - 1].hop(ttl))
        .collect();
    stats::mark_rate_limited(&mut hops);
    let reached = tally.reached_at.is_some();
    let destination = hops.last().filter(|_| reached);
    PathFields {
        protocol: protocol.to_string(),
        reached,
        hop_count: last,
        path_id: stats::path_id(&hops),
        path_loss_ratio: destination.and_then(|d| d.loss_ratio),
        rtt_avg_seconds: destination.and_then(|d| d.rtt_avg_seconds),
        hops,
    }
}

/// Why a run that did not reach its destination failed (module doc, in order).
fn verdict(
    tally: &Tally,
    fields: &PathFields,
    dest: SocketAddr,
    max_hops: u32,
) -> Option<ProbeError> {
    if fields.reached {
        return None;
    }
    let ip = dest.ip();
    if let Some((ttl, router, code)) = tally.unreachable {
        let mut error = icmp::unreachable_error(Some(router), ip, ip.is_ipv6(), code);
        error.message = format!("{} (hop {ttl})", error.message);
        return Some(error);
    }
    if let Some(error) = &tally.send_error {
        return Some(error.clone());
    }
    let sent: u32 = tally.hops.iter().map(|h| h.sent).sum();
    let Some(last) = fields.hops.last() else {
        return Some(ProbeError::new(
            ErrorClass::Loss,
            format!(
                "nothing answered: neither {ip} nor any router up to TTL {max_hops} \
                 ({sent} probes sent)"
            ),
        ));
    };
    let address = last.address.as_deref().unwrap_or("*");
    if last.ttl == max_hops {
        return Some(ProbeError::new(
            ErrorClass::Unreachable,
            format!(
                "{ip} not reached within max_hops = {max_hops}: hop {max_hops} ({address}) \
                 still forwards; raise max_hops"
            ),
        ));
    }
    let beyond: u32 = tally.hops[last.ttl as usize..].iter().map(|h| h.sent).sum();
    Some(ProbeError::new(
        ErrorClass::Loss,
        format!(
            "no answer from {ip}: nothing answered past hop {} ({address}); the destination \
             or the path after that hop drops the probes ({beyond} probes beyond it lost)",
            last.ttl
        ),
    ))
}
