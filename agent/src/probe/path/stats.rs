//! The pure part of the path probe: per-hop statistics as `mtr --report` computes them,
//! the reading rule that tells rate limiting from path loss, and the path's identity.
//!
//! - Per hop (mtr `net.c`): `sent` counts the probes that were answered or given up (a
//!   probe still in flight is not counted, as mtr's `xmit - transit`); `loss_ratio =
//!   1 - received / sent`; RTT best/avg/worst; `rtt_mdev_seconds` is mtr's StDev, the
//!   sample standard deviation `sqrt(sum((rtt - avg)^2) / (received - 1))` kept with
//!   Welford's update (`avg += (x - avg_old) / n; ssd += (x - avg_old) * (x - avg)`), 0 for
//!   a single answer.
//! - Addresses: every address that answered at a TTL, most frequent first (the first seen
//!   wins a tie); the hop's `address` is the first of them.
//! - Rate limiting (mtr's reading rule: loss that does not carry on to the hops after it
//!   is the router limiting its ICMP, not loss on the path): a hop is `rate_limited` when
//!   its loss ratio exceeds that of some later hop by more than two standard errors of
//!   the difference (a two-proportion z-test with the pooled ratio), so one unlucky
//!   probe out of ten does not cry wolf while a router that answers 70 % of the time
//!   over 200 rounds is marked.
//! - `path_id`: 16 lowercase hex digits of the 64-bit FNV-1a hash of the string
//!   `"1=ADDR;2=ADDR;...;N=ADDR;"` over TTLs 1 to `hop_count`, each with its main address
//!   as `IpAddr` displays it (`*` for a hop where nothing answered). It depends on
//!   nothing else (not the protocol, not the agent version), so equal paths hash equal
//!   across runs, agents and releases; no hops hash to the empty string.

use std::net::IpAddr;

use edgeprobe_proto::bounds;

use crate::probe::PathHop;

/// Addresses counted per hop; further ones (a hop answering from dozens of addresses)
/// are not tracked. Above `bounds::MAX_HOP_ADDRESSES`, which is what a result keeps.
const TRACKED_ADDRESSES: usize = 4 * bounds::MAX_HOP_ADDRESSES;

/// One TTL's tally over a run, mtr's `struct nethost`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HopStats {
    /// Probes answered or given up.
    pub sent: u32,
    pub received: u32,
    best: f64,
    worst: f64,
    avg: f64,
    /// Sum of squared differences from the running mean.
    ssd: f64,
    /// Responders with their answer counts, in order of first answer.
    addresses: Vec<(IpAddr, u32)>,
}

impl HopStats {
    /// A probe at this TTL went unanswered until its deadline.
    pub fn lost(&mut self) {
        self.sent += 1;
    }

    /// A probe at this TTL was answered by `from` after `rtt` seconds.
    pub fn answered(&mut self, from: IpAddr, rtt: f64) {
        self.sent += 1;
        if self.received == 0 {
            self.best = rtt;
            self.worst = rtt;
            self.avg = 0.0;
            self.ssd = 0.0;
        }
        self.best = self.best.min(rtt);
        self.worst = self.worst.max(rtt);
        self.received += 1;
        let old = self.avg;
        self.avg += (rtt - old) / f64::from(self.received);
        self.ssd += (rtt - old) * (rtt - self.avg);
        if let Some(seen) = self.addresses.iter_mut().find(|(a, _)| *a == from) {
            seen.1 += 1;
        } else if self.addresses.len() < TRACKED_ADDRESSES {
            self.addresses.push((from, 1));
        }
    }

    pub fn loss_ratio(&self) -> Option<f64> {
        (self.sent > 0).then(|| 1.0 - f64::from(self.received) / f64::from(self.sent))
    }

    /// mtr's StDev: the sample standard deviation, 0 for one answer.
    pub fn mdev(&self) -> Option<f64> {
        match self.received {
            0 => None,
            1 => Some(0.0),
            n => Some((self.ssd / (f64::from(n) - 1.0)).max(0.0).sqrt()),
        }
    }

    /// The responders, most frequent first; a tie keeps the order of first answer.
    pub fn ranked(&self) -> Vec<IpAddr> {
        let mut ranked = self.addresses.clone();
        // A stable sort keeps first-seen order among equal counts.
        ranked.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        ranked.into_iter().map(|(a, _)| a).collect()
    }

    /// The hop as a result reports it (`rate_limited` is decided over the whole path).
    pub fn hop(&self, ttl: u32) -> PathHop {
        let ranked = self.ranked();
        let some = |v: f64| (self.received > 0).then_some(v);
        PathHop {
            ttl,
            address: ranked.first().map(ToString::to_string),
            addresses: ranked
                .iter()
                .take(bounds::MAX_HOP_ADDRESSES)
                .map(ToString::to_string)
                .collect(),
            sent: self.sent,
            received: self.received,
            loss_ratio: self.loss_ratio(),
            rtt_min_seconds: some(self.best),
            rtt_avg_seconds: some(self.avg),
            rtt_max_seconds: some(self.worst),
            rtt_mdev_seconds: self.mdev(),
            rate_limited: false,
        }
    }
}

/// Marks the hops whose loss does not carry on: loss above some later hop's by more than
/// two standard errors of the difference (pooled two-proportion z-test).
pub fn mark_rate_limited(hops: &mut [PathHop]) {
    let n = hops.len();
    for i in 0..n {
        let (Some(loss_i), sent_i) = (hops[i].loss_ratio, f64::from(hops[i].sent)) else {
            continue;
        };
        let limited = hops[i + 1..].iter().any(|later| {
            let (Some(loss_j), sent_j) = (later.loss_ratio, f64::from(later.sent)) else {
                return false;
            };
            if sent_j == 0.0 || loss_i <= loss_j {
                return false;
            }
            let pooled = (loss_i * sent_i + loss_j * sent_j) / (sent_i + sent_j);
            let se = (pooled * (1.0 - pooled) * (1.0 / sent_i + 1.0 / sent_j)).sqrt();
            loss_i - loss_j > 2.0 * se
        });
        hops[i].rate_limited = limited;
    }
}

/// The path's identity: FNV-1a 64 of `"1=ADDR;2=*;..."`, as 16 hex digits ("" without
/// hops).
pub fn path_id(hops: &[PathHop]) -> String {
    if hops.is_empty() {
        return String::new();
    }
    let mut text = String::new();
    for hop in hops {
        text.push_str(&format!(
            "{}={};",
            hop.ttl,
            hop.address.as_deref().unwrap_or("*")
        ));
    }
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hop_statistics_are_mtrs() {
        // RTTs 10, 12, 20 ms and two lost of five: mtr shows Loss% 40.0, Snt 5,
        // Best 10, Avg 14, Wrst 20, StDev sqrt(((10-14)^2 + (12-14)^2 + (20-14)^2) / 2)
        // = sqrt(28) = 5.29 ms.
        let mut h = HopStats::default();
        h.answered(ip("10.0.0.1"), 0.010);
        h.lost();
        h.answered(ip("10.0.0.1"), 0.012);
        h.lost();
        h.answered(ip("10.0.0.1"), 0.020);
        let hop = h.hop(3);
        assert_eq!((hop.ttl, hop.sent, hop.received), (3, 5, 3));
        assert!(close(hop.loss_ratio.unwrap(), 0.4));
        assert!(close(hop.rtt_min_seconds.unwrap(), 0.010));
        assert!(close(hop.rtt_avg_seconds.unwrap(), 0.014));
        assert!(close(hop.rtt_max_seconds.unwrap(), 0.020));
        assert!(close(hop.rtt_mdev_seconds.unwrap(), 28e-6f64.sqrt()));
        assert_eq!(hop.address.as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn one_answer_has_no_spread_and_none_has_no_rtt() {
        let mut h = HopStats::default();
        h.answered(ip("10.0.0.1"), 0.005);
        assert_eq!(h.mdev(), Some(0.0));
        let mut silent = HopStats::default();
        silent.lost();
        silent.lost();
        let hop = silent.hop(2);
        assert_eq!(hop.loss_ratio, Some(1.0));
        assert_eq!(hop.address, None);
        assert!(hop.addresses.is_empty());
        assert_eq!(hop.rtt_avg_seconds, None);
        assert_eq!(hop.rtt_mdev_seconds, None);
        assert_eq!(HopStats::default().loss_ratio(), None, "nothing sent yet");
    }

    #[test]
    fn addresses_most_frequent_first_ties_first_seen() {
        let mut h = HopStats::default();
        for a in [
            "10.0.0.2", "10.0.0.3", "10.0.0.3", "10.0.0.4", "10.0.0.2", "10.0.0.3",
        ] {
            h.answered(ip(a), 0.001);
        }
        h.answered(ip("10.0.0.5"), 0.001);
        h.answered(ip("10.0.0.4"), 0.001);
        let hop = h.hop(1);
        assert_eq!(hop.address.as_deref(), Some("10.0.0.3"));
        assert_eq!(
            hop.addresses,
            ["10.0.0.3", "10.0.0.2", "10.0.0.4", "10.0.0.5"]
        );
        let mut many = HopStats::default();
        for i in 0..200u32 {
            many.answered(IpAddr::from(std::net::Ipv4Addr::from(i)), 0.001);
        }
        assert_eq!(many.hop(1).addresses.len(), bounds::MAX_HOP_ADDRESSES);
    }

    fn hop_with(ttl: u32, sent: u32, received: u32) -> PathHop {
        PathHop {
            ttl,
            sent,
            received,
            loss_ratio: Some(1.0 - f64::from(received) / f64::from(sent)),
            address: (received > 0).then(|| format!("10.0.{ttl}.1")),
            ..PathHop::default()
        }
    }

    #[test]
    fn loss_that_does_not_carry_on_is_rate_limiting() {
        // 200 rounds: hop 2 answers 70 %, the rest every time.
        let mut hops = vec![
            hop_with(1, 200, 200),
            hop_with(2, 200, 140),
            hop_with(3, 200, 200),
            hop_with(4, 200, 199),
        ];
        mark_rate_limited(&mut hops);
        let marks: Vec<bool> = hops.iter().map(|h| h.rate_limited).collect();
        assert_eq!(marks, [false, true, false, false]);

        // Loss from hop 3 on (a lossy link) is path loss: nothing marked, even with the
        // noise of 23 % vs 19 % at the destination.
        let mut hops = vec![
            hop_with(1, 100, 100),
            hop_with(2, 100, 100),
            hop_with(3, 100, 77),
            hop_with(4, 100, 81),
        ];
        mark_rate_limited(&mut hops);
        assert!(hops.iter().all(|h| !h.rate_limited), "{hops:?}");

        // One probe of ten lost at hop 1 is chance; a silent hop before answering ones is
        // not path loss.
        let mut hops = vec![hop_with(1, 10, 9), hop_with(2, 10, 0), hop_with(3, 10, 10)];
        mark_rate_limited(&mut hops);
        let marks: Vec<bool> = hops.iter().map(|h| h.rate_limited).collect();
        assert_eq!(marks, [false, true, false]);
    }

    #[test]
    fn path_id_is_stable_and_follows_the_addresses() {
        let hops = vec![hop_with(1, 10, 10), hop_with(2, 10, 0), hop_with(3, 10, 10)];
        // FNV-1a 64 of "1=10.0.1.1;2=*;3=10.0.3.1;", fixed forever: a change here
        // breaks path-change detection across agent versions.
        assert_eq!(
            path_id(&hops),
            format!("{:016x}", fnv1a64(b"1=10.0.1.1;2=*;3=10.0.3.1;"))
        );
        assert_eq!(path_id(&hops), "870826a02039bba3");
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            fnv1a64(b"a"),
            0xaf63_dc4c_8601_ec8c,
            "the published FNV-1a test vector"
        );
        let mut other = hops.clone();
        other[2].address = Some("10.0.9.1".into());
        assert_ne!(path_id(&hops), path_id(&other));
        let mut same = hops.clone();
        same[0].sent = 3;
        same[0].rtt_avg_seconds = Some(1.0);
        assert_eq!(
            path_id(&hops),
            path_id(&same),
            "only addresses by TTL count"
        );
        assert_eq!(path_id(&[]), "");
    }
}
