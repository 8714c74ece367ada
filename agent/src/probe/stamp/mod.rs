//! stamp probe (SPEC section 17): a STAMP Session-Sender in unauthenticated mode (RFC
//! 8762) against a stateful Session-Reflector (our `serve-target`, a router, another
//! agent). docs/PROBES.md has the method.
//!
//! One run: resolve the target (port 862 unless given); a connected UDP socket marked with
//! `dscp` (IP_TOS / IPV6_TCLASS); `count` test packets (`packet.rs`, padded with zeros to
//! `packet_size`) every `interval`; then up to `STAMP_WAIT` for late reflections (less
//! when every packet is back). Partial figures are published every `PUBLISH_EVERY`.
//!
//! Figures (`Session::fields`):
//! - `received`: distinct sender sequence numbers reflected; `duplicates`: further copies;
//!   `reordered` (RFC 4737 section 3): a reflection whose sender sequence number is below
//!   the highest seen before it.
//! - Loss by direction: the reflector numbers the packets of a session as they reach it
//!   (RFC 8762 section 4.3.1), so among the packets up to the last one reflected, those
//!   that reached it are its sequence number + 1 (a fresh session starts at 0: our socket
//!   has a fresh port); the rest were lost forward, and reached-but-not-reflected were
//!   lost on the way back. Packets after the last reflected one (the tail) cannot be told
//!   apart: they count as forward loss. `forward_loss_ratio` is of the packets sent,
//!   `reverse_loss_ratio` of those that reached the reflector.
//! - Round trip (T4 - T1) - (T3 - T2): the reflector's hold time is removed. T1 and T4 are
//!   the sender's: the send time's wall clock and the monotonic time to the reception.
//! - One-way delays T2 - T1 (forward) and T4 - T3 (reverse) only when this host's kernel
//!   says its clock is synchronised (at the start and the end) and every reflection's
//!   error estimate has its S bit: else `None`, never a made-up figure.
//! - Jitter: RFC 3550 section 6.4.1 over the reflections in arrival order, transit
//!   T4 - T1 (the sender's clock alone, so clock offsets cancel out).
//! - MOS: `emodel.rs`, from the worse direction's one-way delay (half the average round
//!   trip when one-way delays are unknown), the jitter and the worse direction's loss.
//!
//! Failures: nothing reflected is `loss`, or `refused` when the reflector's host answered
//! ICMP port unreachable; a name that does not resolve is `dns`; a send the kernel refuses
//! is classed by its errno.

pub mod emodel;
pub mod packet;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::{addr, ErrorClass, Fields, Measured, Partial, ProbeError, ProbeSpec, StampFields};
use edgeprobe_proto::testdef::defaults;

/// How often the figures so far are published to `Partial`.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let mut fields = StampFields::default();
    partial.publish(Fields::Stamp(fields.clone()), "resolving the target");
    let error = measure(spec, &mut fields, partial).await.err();
    (Fields::Stamp(fields), error)
}

async fn measure(
    spec: &ProbeSpec,
    fields: &mut StampFields,
    partial: &Partial,
) -> Result<(), ProbeError> {
    let o = &spec.options;
    let count = o.count.unwrap_or(defaults::STAMP_COUNT).max(1);
    let interval = o.interval.unwrap_or(defaults::STAMP_INTERVAL);
    let size = o.packet_size.unwrap_or(defaults::STAMP_PACKET_SIZE) as usize;
    let (host, port) = edgeprobe_proto::testdef::stamp_host_port(spec.target.trim())
        .map_err(|e| ProbeError::new(ErrorClass::Local, e))?;
    let dest = addr::resolve(host, port, &spec.link).await?;
    let mut session = Session::open(dest, o.dscp.unwrap_or(0), size, &spec.link)?;
    partial.publish(Fields::Stamp(session.fields()), "sending test packets");

    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    let mut send_error = None;
    while session.sent() < count {
        // `receive` is cancel safe (tokio's `recv`); sending happens outside the select.
        let due = tokio::select! {
            _ = tick.tick() => true,
            () = session.receive() => false,
            _ = publish.tick() => {
                partial.publish(Fields::Stamp(session.fields()), "sending test packets");
                false
            }
        };
        if due {
            if let Err(e) = session.send().await {
                send_error = Some(e);
                break;
            }
        }
    }
    if send_error.is_none() {
        partial.publish(Fields::Stamp(session.fields()), "waiting for reflections");
        let wait_until = tokio::time::Instant::now() + defaults::STAMP_WAIT;
        // A port unreachable and nothing back: no reflector to wait for.
        while !(session.all_back() || session.refused && session.received == 0) {
            tokio::select! {
                () = session.receive() => {}
                () = tokio::time::sleep_until(wait_until) => break,
                _ = publish.tick() => {
                    partial.publish(Fields::Stamp(session.fields()), "waiting for reflections");
                }
            }
        }
    }
    *fields = session.fields();
    if let Some(e) = send_error {
        if !(session.refused && e.kind() == io::ErrorKind::ConnectionRefused) {
            return Err(ProbeError::new(
                ErrorClass::of_io(&e),
                format!("cannot send to {dest}: {e}"),
            ));
        }
    }
    if fields.received == 0 {
        return Err(if session.refused {
            ProbeError::new(
                ErrorClass::Refused,
                format!("{dest} answered port unreachable: no STAMP reflector there"),
            )
        } else {
            ProbeError::new(
                ErrorClass::Loss,
                format!("no reflection of {} test packets from {dest}", fields.sent),
            )
        });
    }
    Ok(())
}

/// The speed test's loaded-loss stream (SPEC section 17): packets per second at most.
pub const LOADED_RATE: u32 = 50;
/// How long the speed test waits for a reflection when it asks whether its target
/// reflects STAMP, the test packets it sends at most and their spacing.
const DETECT_WAIT: Duration = Duration::from_millis(600);
const DETECT_PACKETS: u32 = 5;
const DETECT_GAP: Duration = Duration::from_millis(50);
/// How long a loaded-loss stream waits for late reflections after it stops sending.
const LOADED_WAIT: Duration = Duration::from_millis(500);

/// Whether a STAMP reflector answers at `dest`: up to `DETECT_PACKETS` test packets
/// `DETECT_GAP` apart until one is reflected, waiting at most `DETECT_WAIT` in all (so a
/// lossy path is not taken for no reflector).
pub async fn reflects(dest: SocketAddr, link: &addr::Link) -> bool {
    let Ok(mut session) = Session::open(dest, 0, packet::BASE_LEN, link) else {
        return false;
    };
    let until = tokio::time::Instant::now() + DETECT_WAIT;
    let mut tick = tokio::time::interval(DETECT_GAP);
    while session.received == 0 && !session.refused {
        let due = tokio::select! {
            _ = tick.tick(), if session.sent() < DETECT_PACKETS => true,
            () = session.receive() => false,
            () = tokio::time::sleep_until(until) => break,
        };
        if due && session.send().await.is_err() {
            return false;
        }
    }
    session.received > 0
}

/// A light stream (`rate` packets of 44 bytes per second, 1 to `LOADED_RATE`) to the
/// reflector at `dest` until `stop`, then `LOADED_WAIT` for late reflections: the forward
/// and reverse loss ratios of the stream (`None` when it could not run).
pub async fn loaded_stream(
    dest: SocketAddr,
    link: addr::Link,
    rate: u32,
    stop: tokio_util::sync::CancellationToken,
) -> (Option<f64>, Option<f64>) {
    let Ok(mut session) = Session::open(dest, 0, packet::BASE_LEN, &link) else {
        return (None, None);
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.clamp(1, LOADED_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => true,
            () = session.receive() => false,
        };
        if due && session.send().await.is_err() {
            return (None, None);
        }
    }
    let until = tokio::time::Instant::now() + LOADED_WAIT;
    while !session.all_back() {
        tokio::select! {
            () = session.receive() => {}
            () = tokio::time::sleep_until(until) => break,
        }
    }
    if session.sent() == 0 {
        return (None, None);
    }
    session.loss_ratios()
}

/// A packet as sent: T1 in NTP format and the monotonic time it left.
struct Sent {
    timestamp: u64,
    at: Instant,
}

/// What the first reflection of a packet told.
#[derive(Debug, Clone, Copy)]
struct Reflected {
    reflector_seq: u32,
    rtt: f64,
    forward: f64,
    reverse: f64,
    reflector_synchronised: bool,
}

/// One STAMP session of a Session-Sender: its socket, what was sent and what came back.
/// Also used by the speed test for its loaded-loss stream.
pub struct Session {
    socket: UdpSocket,
    dest: SocketAddr,
    size: usize,
    estimate: u16,
    synchronised_at_start: bool,
    sent: Vec<Sent>,
    reflected: Vec<Option<Reflected>>,
    received: u32,
    duplicates: u32,
    reordered: u32,
    highest: Option<u32>,
    last_transit: Option<f64>,
    jitter: Option<f64>,
    /// ICMP port unreachable came back (ECONNREFUSED on the connected socket).
    pub refused: bool,
    buf: Vec<u8>,
}

impl Session {
    /// A connected UDP socket to `dest` over the link with the DSCP set; packets of `size`
    /// bytes.
    pub fn open(
        dest: SocketAddr,
        dscp: u8,
        size: usize,
        link: &addr::Link,
    ) -> Result<Session, ProbeError> {
        let local = |e: io::Error| {
            ProbeError::new(ErrorClass::Local, format!("STAMP socket to {dest}: {e}"))
        };
        let socket = Socket::new(Domain::for_address(dest), Type::DGRAM, Some(Protocol::UDP))
            .map_err(local)?;
        link.bind(socket2::SockRef::from(&socket), dest)?;
        let tos = u32::from(dscp.min(63)) << 2;
        if tos != 0 {
            match dest {
                SocketAddr::V4(_) => socket.set_tos_v4(tos).map_err(local)?,
                SocketAddr::V6(_) => socket.set_tclass_v6(tos).map_err(local)?,
            }
        }
        socket.connect(&dest.into()).map_err(|e| {
            ProbeError::new(ErrorClass::of_io(&e), format!("cannot reach {dest}: {e}"))
        })?;
        link.note_local(socket.local_addr().ok().and_then(|a| a.as_socket()));
        socket.set_nonblocking(true).map_err(local)?;
        let socket = UdpSocket::from_std(socket.into()).map_err(local)?;
        let status = crate::clock::kernel_time_status();
        Ok(Session {
            socket,
            dest,
            size: size.max(packet::BASE_LEN),
            estimate: packet::local_error_estimate(),
            synchronised_at_start: status.synchronised,
            sent: Vec::new(),
            reflected: Vec::new(),
            received: 0,
            duplicates: 0,
            reordered: 0,
            highest: None,
            last_transit: None,
            jitter: None,
            refused: false,
            buf: vec![0; 2048],
        })
    }

    pub fn sent(&self) -> u32 {
        self.sent.len() as u32
    }

    /// Every packet sent has its reflection.
    pub fn all_back(&self) -> bool {
        self.received as usize == self.sent.len()
    }

    /// Sends the next test packet. An ICMP port unreachable reported on this send (from
    /// an earlier packet) is noted and the packet counts as sent.
    pub async fn send(&mut self) -> io::Result<()> {
        let seq = self.sent.len() as u32;
        let mut out = vec![0u8; self.size];
        let at = Instant::now();
        let timestamp = packet::ntp(SystemTime::now());
        packet::write_sender(&mut out, seq, timestamp, self.estimate);
        self.sent.push(Sent { timestamp, at });
        self.reflected.push(None);
        match self.socket.send(&out).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                self.refused = true;
                Ok(())
            }
            Err(e) => {
                self.sent.pop();
                self.reflected.pop();
                Err(e)
            }
        }
    }

    /// Waits for one datagram and takes it in; never returns an error (an ICMP port
    /// unreachable is noted in `refused`).
    pub async fn receive(&mut self) {
        match self.socket.recv(&mut self.buf).await {
            Ok(n) => {
                let at = Instant::now();
                let Some(p) = packet::read_reflector(&self.buf[..n]) else {
                    return;
                };
                self.take(&p, at);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => self.refused = true,
            Err(e) => {
                tracing::debug!(dest = %self.dest, error = %e, "STAMP receive failed");
                // Not a busy loop on a persistent error.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    fn take(&mut self, p: &packet::ReflectorPacket, at: Instant) {
        let seq = p.sender.seq;
        // Ours only: a sequence number we sent, with the timestamp we sent it with.
        let Some(sent) = self.sent.get(seq as usize) else {
            return;
        };
        if sent.timestamp != p.sender.timestamp {
            return;
        }
        if self.reflected[seq as usize].is_some() {
            self.duplicates += 1;
            return;
        }
        let elapsed = at.saturating_duration_since(sent.at);
        let t4 = sent.timestamp.wrapping_add(packet::ntp_duration(elapsed));
        let hold =
            packet::ntp_diff(p.timestamp, p.receive_timestamp).clamp(0.0, elapsed.as_secs_f64());
        let transit = elapsed.as_secs_f64();
        let reflected = Reflected {
            reflector_seq: p.seq,
            rtt: transit - hold,
            forward: packet::ntp_diff(p.receive_timestamp, sent.timestamp),
            reverse: packet::ntp_diff(t4, p.timestamp),
            reflector_synchronised: packet::synchronised(p.estimate),
        };
        self.reflected[seq as usize] = Some(reflected);
        self.received += 1;
        match self.highest {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
        // RFC 3550 section 6.4.1: J += (|D(i-1,i)| - J) / 16.
        if let Some(last) = self.last_transit {
            let d = (transit - last).abs();
            let j = self.jitter.unwrap_or(0.0);
            self.jitter = Some(j + (d - j) / 16.0);
        }
        self.last_transit = Some(transit);
    }

    /// Sent and lost per direction (forward, reverse) as the module documents.
    pub fn losses(&self) -> (u32, u32) {
        let sent = self.sent();
        let lost = sent - self.received;
        let mut first: Option<(u32, u32)> = None;
        let mut last: Option<(u32, u32)> = None;
        for (s, r) in self.reflected.iter().enumerate() {
            if let Some(r) = r {
                let pair = (s as u32, r.reflector_seq);
                first.get_or_insert(pair);
                last = Some(pair);
            }
        }
        let (Some((s_lo, r_lo)), Some((s_hi, r_hi))) = (first, last) else {
            return (lost, 0);
        };
        // Packets that reached the reflector among those up to `s_hi`: a fresh session
        // numbers from 0; one that was not (r_lo > s_lo) is counted from `s_lo` on.
        let reached = if r_lo <= s_lo {
            u64::from(r_hi) + 1
        } else {
            u64::from(r_hi.wrapping_sub(r_lo)) + 1 + u64::from(s_lo)
        };
        let forward_to_hi = (u64::from(s_hi) + 1).saturating_sub(reached);
        let tail = u64::from(sent - (s_hi + 1));
        let forward = (forward_to_hi + tail).min(u64::from(lost)) as u32;
        (forward, lost - forward)
    }

    /// (forward, reverse) loss ratios: of the packets sent, of those that reached the
    /// reflector.
    pub fn loss_ratios(&self) -> (Option<f64>, Option<f64>) {
        let sent = self.sent();
        let (forward, reverse) = self.losses();
        let reached = sent - forward;
        (
            (sent > 0).then(|| f64::from(forward) / f64::from(sent)),
            (reached > 0).then(|| f64::from(reverse) / f64::from(reached)),
        )
    }

    /// The figures so far.
    pub fn fields(&self) -> StampFields {
        let (forward_lost, reverse_lost) = self.losses();
        let (forward_loss_ratio, reverse_loss_ratio) = self.loss_ratios();
        let got: Vec<Reflected> = self.reflected.iter().flatten().copied().collect();
        let mut f = StampFields {
            sent: self.sent(),
            received: self.received,
            forward_lost,
            reverse_lost,
            forward_loss_ratio,
            reverse_loss_ratio,
            duplicates: self.duplicates,
            reordered: self.reordered,
            jitter_seconds: self.jitter,
            ..StampFields::default()
        };
        if got.is_empty() {
            return f;
        }
        let rtt = Stats::of(got.iter().map(|g| g.rtt));
        f.rtt_min_seconds = Some(rtt.min);
        f.rtt_avg_seconds = Some(rtt.avg);
        f.rtt_max_seconds = Some(rtt.max);
        f.rtt_mdev_seconds = Some(rtt.mdev);
        let synchronised = self.synchronised_at_start
            && crate::clock::kernel_synchronised()
            && got.iter().all(|g| g.reflector_synchronised);
        if synchronised {
            let fw = Stats::of(got.iter().map(|g| g.forward));
            let rv = Stats::of(got.iter().map(|g| g.reverse));
            f.forward_delay_min_seconds = Some(fw.min);
            f.forward_delay_avg_seconds = Some(fw.avg);
            f.forward_delay_max_seconds = Some(fw.max);
            f.reverse_delay_min_seconds = Some(rv.min);
            f.reverse_delay_avg_seconds = Some(rv.avg);
            f.reverse_delay_max_seconds = Some(rv.max);
        }
        let one_way = match (f.forward_delay_avg_seconds, f.reverse_delay_avg_seconds) {
            (Some(fw), Some(rv)) => fw.max(rv),
            _ => rtt.avg / 2.0,
        };
        let loss = forward_loss_ratio
            .unwrap_or(0.0)
            .max(reverse_loss_ratio.unwrap_or(0.0));
        f.mos = Some(emodel::mos(one_way, self.jitter.unwrap_or(0.0), loss));
        f
    }
}

struct Stats {
    min: f64,
    avg: f64,
    max: f64,
    /// sqrt(mean(x^2) - mean(x)^2), as iputils ping and the icmp probe.
    mdev: f64,
}

impl Stats {
    fn of(values: impl Iterator<Item = f64>) -> Stats {
        let (mut min, mut max, mut sum, mut sq, mut n) = (f64::MAX, f64::MIN, 0.0, 0.0, 0.0);
        for v in values {
            min = min.min(v);
            max = max.max(v);
            sum += v;
            sq += v * v;
            n += 1.0;
        }
        let avg = sum / n;
        Stats {
            min,
            avg,
            max,
            mdev: (sq / n - avg * avg).max(0.0).sqrt(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session whose packets were "sent" and reflected as `reflections` lists:
    /// (sender seq, reflector seq), in arrival order.
    async fn session(sent: u32, reflections: &[(u32, u32)]) -> Session {
        let mut s = Session::open(
            "127.0.0.1:9".parse().unwrap(),
            0,
            44,
            &addr::Link::default(),
        )
        .unwrap();
        let now = Instant::now();
        for i in 0..sent {
            s.sent.push(Sent {
                timestamp: u64::from(i) << 20,
                at: now,
            });
            s.reflected.push(None);
        }
        for &(seq, r) in reflections {
            let p = packet::ReflectorPacket {
                seq: r,
                timestamp: 2,
                estimate: 0,
                receive_timestamp: 1,
                sender: packet::SenderPacket {
                    seq,
                    timestamp: u64::from(seq) << 20,
                    estimate: 0,
                },
                sender_ttl: 64,
            };
            s.take(&p, now + Duration::from_millis(1));
        }
        s
    }

    #[tokio::test]
    async fn loss_by_direction() {
        // 10 sent; 2 and 5 lost forward (the reflector numbered 8 arrivals), 7 lost back.
        let r = [(0, 0), (1, 1), (3, 2), (4, 3), (6, 4), (8, 6), (9, 7)];
        let s = session(10, &r).await;
        assert_eq!(s.losses(), (2, 1));
        let (fw, rv) = s.loss_ratios();
        assert_eq!(fw, Some(0.2));
        assert_eq!(rv, Some(1.0 / 8.0));
        // The tail after the last reflection counts as forward loss.
        let s = session(10, &r[..5]).await;
        assert_eq!(s.losses(), (2 + 3, 0));
        // Nothing back: all forward.
        let s = session(4, &[]).await;
        assert_eq!(s.losses(), (4, 0));
        assert_eq!(s.fields().rtt_avg_seconds, None);
    }

    #[tokio::test]
    async fn duplicates_and_reordering() {
        let s = session(5, &[(0, 0), (2, 2), (1, 1), (2, 2), (3, 3), (4, 4)]).await;
        let f = s.fields();
        assert_eq!((f.received, f.duplicates, f.reordered), (5, 1, 1));
        assert_eq!((f.forward_lost, f.reverse_lost), (0, 0));
        // Hold time (T3 - T2 = 2 - 1 NTP units) is removed from the 1 ms round trip.
        let rtt = f.rtt_avg_seconds.unwrap();
        assert!(
            (rtt - (1e-3 - 1.0 / 4_294_967_296.0)).abs() < 1e-12,
            "{rtt}"
        );
        // The reflector's S bit is 0: no one-way figures.
        assert_eq!(f.forward_delay_avg_seconds, None);
        assert!(f.mos.unwrap() > 4.0);
    }
}
