//! icmp probe: `count` echo requests `interval` apart to one address of the target host;
//! sent, received, loss ratio and rtt min/avg/max/mdev (mdev as iputils ping computes it:
//! sqrt(mean(rtt^2) - mean(rtt)^2)).
//!
//! - Socket: a raw ICMP socket when the process has CAP_NET_RAW, else an unprivileged ICMP
//!   datagram ("ping") socket when the group is inside net.ipv4.ping_group_range, else a
//!   failed result of class `local` whose message names both fixes. IPv4 and IPv6.
//! - A reply counts when its type, identifier (raw sockets; the kernel demultiplexes
//!   datagram sockets), sequence and a per-run random token in the payload match, so other
//!   pingers on the host and duplicates cannot skew the figures.
//! - Each request waits for its reply until its own deadline, the same for every request:
//!   what the whole-run limit (`timeout`) leaves after the sending schedule,
//!   `timeout - margin - (count - 1) * interval` (at least `MIN_REPLY_WAIT`). A reply
//!   after its request's deadline is lost. So how long a reply may take does not depend on
//!   the request's position, and a longer `timeout` waits longer for every reply.
//! - The exchange runs on a blocking thread (a blocked `recvfrom` wakes straight from the
//!   kernel; an async task would add the runtime's wake-up to every round trip). It ends
//!   when every request has its reply (or an error from the network), or when the last
//!   request's deadline passes, and always just before the whole-run limit, so a partial
//!   run still reports what it measured.
//! - The target is an IP literal (IPv6 with a zone: `fe80::1%eth0`) or a name whose first
//!   address is used; a link-local address needs its zone (`addr.rs`).
//! - All replies lost is a failure: `unreachable` when the network said so (a send error
//!   or an ICMP destination-unreachable), `loss` otherwise. A raw socket reads the
//!   destination-unreachable itself; a ping socket gets it from its error queue
//!   (IP_RECVERR / IPV6_RECVERR, `sock_extended_err` with the offender's address), and
//!   both report it in the same words (`unreachable_error`).
//!
//!
//! The socket, the echo request and the words for a destination-unreachable are shared
//! with the path probe (`path`), the error queue with it too (`errqueue`).

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::{
    addr, errqueue, secs, ErrorClass, Fields, IcmpFields, Measured, Partial, ProbeError, ProbeSpec,
};
use socket2::{Domain, Protocol, Socket, Type};

pub const DEFAULT_COUNT: u32 = edgeprobe_proto::testdef::defaults::ICMP_COUNT;
pub const DEFAULT_INTERVAL: Duration = edgeprobe_proto::testdef::defaults::ICMP_INTERVAL;
/// The shortest wait for a reply, when `timeout` leaves less after the sending schedule
/// (the requests sent last are then cut off by the run's end instead).
const MIN_REPLY_WAIT: Duration = Duration::from_secs(1);
/// The longest single blocking receive: the kernel keeps short timeouts to a tick.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// Sequence numbers are 16 bits and each request keeps its send time.
const MAX_COUNT: u32 = 10_000;
/// ICMP payload after the header, as `ping`'s default 56 bytes.
const PAYLOAD_LEN: usize = 56;

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const UNREACHABLE_V4: u8 = 3;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
const UNREACHABLE_V6: u8 = 1;

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let mut fields = IcmpFields::default();
    partial.publish(Fields::Icmp(fields.clone()), "resolving the target");
    let error = measure(spec, &mut fields).await.err();
    (Fields::Icmp(fields), error)
}

/// Which kind of ICMP socket we got; it decides the reply format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Mode {
    /// Raw socket (CAP_NET_RAW): IPv4 replies come with their IP header and every echo
    /// reply on the host arrives, so the identifier is checked.
    Raw,
    /// Ping socket: the kernel sets the identifier and delivers only our replies.
    Datagram,
}

async fn measure(spec: &ProbeSpec, fields: &mut IcmpFields) -> Result<(), ProbeError> {
    let start = Instant::now();
    let limit = spec.options.timeout_for(spec.kind);
    let usable = limit.saturating_sub((limit / 10).min(Duration::from_millis(200)));
    let deadline = start + usable;
    let count = spec
        .options
        .count
        .unwrap_or(DEFAULT_COUNT)
        .clamp(1, MAX_COUNT);
    let interval = spec.options.interval.unwrap_or(DEFAULT_INTERVAL);
    let reply_wait = reply_wait(usable, count, interval);

    let dest = addr::resolve(spec.target.trim(), 0, &spec.link).await?;
    let ip = dest.ip();
    let (socket, mode) = open(dest, &spec.link)?;
    tracing::debug!(target = %spec.target, %ip, ?mode, ?reply_wait, "icmp socket open");
    let session = Session {
        socket,
        mode,
        dest,
        ident: rand::random(),
        token: rand::random(),
    };
    let plan = Plan {
        count,
        interval,
        reply_wait,
        start,
        deadline,
    };
    // A blocked thread wakes straight from the kernel; an async task would add the
    // runtime's wake-up latency to every round trip.
    let (rtts, network_said) = tokio::task::spawn_blocking(move || session.run(plan))
        .await
        .map_err(|e| ProbeError::new(ErrorClass::Other, format!("icmp session failed: {e}")))?;

    let sent = rtts.len() as u32;
    let samples: Vec<f64> = rtts.iter().flatten().map(|d| secs(*d)).collect();
    let received = samples.len() as u32;
    fields.sent = sent;
    fields.received = received;
    fields.loss_ratio = (sent > 0).then(|| 1.0 - f64::from(received) / f64::from(sent));
    if !samples.is_empty() {
        let n = samples.len() as f64;
        let avg = samples.iter().sum::<f64>() / n;
        let mean_sq = samples.iter().map(|r| r * r).sum::<f64>() / n;
        fields.rtt_min_seconds = samples.iter().copied().reduce(f64::min);
        fields.rtt_max_seconds = samples.iter().copied().reduce(f64::max);
        fields.rtt_avg_seconds = Some(avg);
        fields.rtt_mdev_seconds = Some((mean_sq - avg * avg).max(0.0).sqrt());
    }
    if received == 0 {
        return Err(network_said.unwrap_or_else(|| {
            ProbeError::new(
                ErrorClass::Loss,
                format!(
                    "no echo reply from {ip} ({sent} requests sent, each waited {})",
                    humantime::format_duration(reply_wait)
                ),
            )
        }));
    }
    Ok(())
}

/// How long each request waits for its reply: what the run's usable time leaves after
/// the sending schedule, so the last request waits as long as the first.
fn reply_wait(usable: Duration, count: u32, interval: Duration) -> Duration {
    let schedule = interval.saturating_mul(count.saturating_sub(1));
    usable.saturating_sub(schedule).max(MIN_REPLY_WAIT)
}

/// When to send and how long to wait.
struct Plan {
    count: u32,
    interval: Duration,
    /// Each request's deadline is its send time plus this.
    reply_wait: Duration,
    start: Instant,
    /// The end of the whole exchange, whatever is still awaited.
    deadline: Instant,
}

/// Where one request stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    /// Sent at this instant, no answer yet.
    Waiting(Instant),
    /// Answered after this round trip.
    Replied(Duration),
    /// The network said it will not be answered (send error, destination unreachable).
    Failed,
}

/// One run's echo exchange on a blocking socket.
struct Session {
    socket: std::net::UdpSocket,
    mode: Mode,
    /// The target, with its scope id when link-local.
    dest: SocketAddr,
    ident: u16,
    token: u64,
}

impl Session {
    /// Sends `count` requests `interval` apart from `start`; returns each request's round
    /// trip (`None`: lost) and what the network said about failures.
    fn run(self, plan: Plan) -> (Vec<Option<Duration>>, Option<ProbeError>) {
        let ip = self.dest.ip();
        let v6 = ip.is_ipv6();
        let dest = self.dest;
        let mut slots: Vec<Slot> = Vec::with_capacity(plan.count as usize);
        let mut network_said: Option<ProbeError> = None;
        let mut buf = vec![0u8; 2048];
        let mut next_send = plan.start;
        loop {
            let sent = slots.len() as u32;
            // Requests go out in order, so the last one still waiting has the latest
            // deadline.
            let last_waiting = slots.iter().rev().find_map(|slot| match slot {
                Slot::Waiting(at) => Some(*at),
                _ => None,
            });
            let sending = sent < plan.count && next_send < plan.deadline;
            if !sending && last_waiting.is_none() {
                break;
            }
            let now = Instant::now();
            if sending && now >= next_send {
                let packet = echo_request(v6, self.ident, sent as u16, self.token);
                slots.push(Slot::Waiting(Instant::now()));
                if let Err(e) = self.socket.send_to(&packet, dest) {
                    // EINVAL for a valid request means a blackhole route.
                    let class = match e.kind() {
                        ErrorKind::InvalidInput => ErrorClass::Unreachable,
                        _ => ErrorClass::of_io(&e),
                    };
                    network_said = Some(ProbeError::new(
                        class,
                        format!("cannot send echo request to {ip}: {e}"),
                    ));
                    slots[sent as usize] = Slot::Failed;
                }
                next_send += plan.interval;
                continue;
            }
            let wake = match last_waiting {
                _ if sending => next_send,
                Some(at) => (at + plan.reply_wait).min(plan.deadline),
                None => plan.deadline,
            };
            if now >= wake {
                if sending {
                    continue;
                }
                break;
            }
            // A zero timeout means "block forever" to the kernel, so never pass one; a long
            // one fires late (the timer wheel's slack grows with the timeout, 70 ms on 4 s
            // here), so wait in short slices.
            let wait = (wake - now).clamp(Duration::from_micros(1), WAIT_SLICE);
            if self.socket.set_read_timeout(Some(wait)).is_err() {
                break;
            }
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) => {
                    // A pending socket error (e.g. unreachable). A ping socket queues the
                    // ICMP error behind it, with the router's address and our request.
                    let mut said =
                        ProbeError::new(ErrorClass::of_io(&e), format!("echo to {ip}: {e}"));
                    if self.mode == Mode::Datagram {
                        while let Some(queued) = errqueue::read(&self.socket, v6) {
                            let Some(seq) =
                                ours(&queued.request, self.mode, self.ident, self.token, true)
                            else {
                                continue;
                            };
                            if let Some(code) = queued.unreachable(v6) {
                                said = unreachable_error(queued.offender, ip, v6, code);
                                fail(&mut slots, seq);
                            }
                        }
                    }
                    network_said = Some(said);
                    continue;
                }
            };
            let now = Instant::now();
            match parse(&buf[..n], v6, self.mode, self.ident, self.token) {
                Some(Reply::Echo(seq)) if from.ip() == ip => {
                    if let Some(slot) = slots.get_mut(usize::from(seq)) {
                        if let Slot::Waiting(at) = *slot {
                            let rtt = now - at;
                            // A reply after its request's deadline is lost, whenever the
                            // run happens to end.
                            if rtt <= plan.reply_wait {
                                *slot = Slot::Replied(rtt);
                            }
                        }
                    }
                }
                Some(Reply::Unreachable { seq, code }) => {
                    network_said = Some(unreachable_error(Some(from.ip()), ip, v6, code));
                    fail(&mut slots, seq);
                }
                _ => {}
            }
        }
        let rtts = slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Replied(rtt) => Some(rtt),
                _ => None,
            })
            .collect();
        (rtts, network_said)
    }
}

/// A request the network answered with an error: nothing more to wait for.
fn fail(slots: &mut [Slot], seq: u16) {
    if let Some(slot @ Slot::Waiting(_)) = slots.get_mut(usize::from(seq)) {
        *slot = Slot::Failed;
    }
}

/// An ICMP destination-unreachable about our request, in the same words whichever socket
/// saw it.
pub(super) fn unreachable_error(
    router: Option<IpAddr>,
    target: IpAddr,
    v6: bool,
    code: u8,
) -> ProbeError {
    let router = router.map_or_else(|| "the network".to_string(), |r| r.to_string());
    ProbeError::new(
        ErrorClass::Unreachable,
        format!(
            "{router} reports {target} unreachable: {} (code {code})",
            unreachable_reason(v6, code)
        ),
    )
}

/// The name of a destination-unreachable code (RFC 792 and 1812; RFC 4443 for ICMPv6).
pub(super) fn unreachable_reason(v6: bool, code: u8) -> &'static str {
    match (v6, code) {
        (false, 0) => "network unreachable",
        (false, 1) => "host unreachable",
        (false, 2) => "protocol unreachable",
        (false, 3) => "port unreachable",
        (false, 4) => "fragmentation needed",
        (false, 5) => "source route failed",
        (false, 6) => "destination network unknown",
        (false, 7) => "destination host unknown",
        (false, 9 | 10 | 13) => "administratively prohibited",
        (false, 11) => "network unreachable for the type of service",
        (false, 12) => "host unreachable for the type of service",
        (true, 0) => "no route to destination",
        (true, 1) => "administratively prohibited",
        (true, 2) => "beyond scope of source address",
        (true, 3) => "address unreachable",
        (true, 4) => "port unreachable",
        (true, 5) => "source address failed policy",
        (true, 6) => "reject route",
        _ => "unreachable",
    }
}

/// Opens a raw ICMP socket, else a ping socket, else explains both fixes; bound to the
/// run's link either way.
pub(super) fn open(
    dest: SocketAddr,
    link: &addr::Link,
) -> Result<(std::net::UdpSocket, Mode), ProbeError> {
    let v6 = dest.is_ipv6();
    let (domain, protocol, family) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6, "ICMPv6")
    } else {
        (Domain::IPV4, Protocol::ICMPV4, "ICMP")
    };
    let (socket, mode) = match Socket::new(domain, Type::RAW, Some(protocol)) {
        Ok(s) => (s, Mode::Raw),
        Err(raw) => match Socket::new(domain, Type::DGRAM, Some(protocol)) {
            Ok(s) => (s, Mode::Datagram),
            Err(dgram) => {
                return Err(ProbeError::new(
                    ErrorClass::Local,
                    format!(
                        "cannot open an {family} socket: raw socket: {raw} (grant CAP_NET_RAW, \
                         e.g. AmbientCapabilities=CAP_NET_RAW in the systemd unit or \
                         `setcap cap_net_raw+ep edgeprobe-agent`); datagram socket: {dgram} \
                         (allow the agent's group in sysctl net.ipv4.ping_group_range, \
                         e.g. \"0 2147483647\")"
                    ),
                ))
            }
        },
    };
    let local = |e: std::io::Error| {
        ProbeError::new(
            ErrorClass::Local,
            format!("cannot set up the {family} socket: {e}"),
        )
    };
    link.bind(socket2::SockRef::from(&socket), dest)?;
    // The source the route (or the binding) gives towards `dest`, for the result: a raw
    // socket does not learn it before it sends.
    if let Ok(probe) = addr::udp_socket(dest, link) {
        let mut discard = dest;
        discard.set_port(9);
        if probe.connect(discard).is_ok() {
            link.note_local(probe.local_addr().ok());
        }
    }
    socket.set_nonblocking(false).map_err(local)?;
    if mode == Mode::Datagram {
        // Without it a ping socket drops the ICMP errors about its requests.
        errqueue::set_recverr(&socket, v6).map_err(local)?;
    }
    // std's UdpSocket is only a safe handle here: its send_to/recv_from/read timeout map to
    // sendto/recvfrom/SO_RCVTIMEO, which is what both kinds of ICMP socket take.
    Ok((std::net::UdpSocket::from(socket), mode))
}

pub(super) fn echo_request(v6: bool, ident: u16, seq: u16, token: u64) -> Vec<u8> {
    let mut packet = vec![0u8; 8 + PAYLOAD_LEN];
    packet[0] = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
    packet[4..6].copy_from_slice(&ident.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..16].copy_from_slice(&token.to_be_bytes());
    for (i, byte) in packet[16..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    // The kernel computes ICMPv6 checksums (they cover a pseudo-header) and those of ping
    // sockets; raw ICMPv4 needs ours.
    if !v6 {
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// The Internet checksum (RFC 1071).
pub(super) fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Debug, PartialEq)]
enum Reply {
    /// An echo reply to our request with this sequence number.
    Echo(u16),
    /// Destination unreachable about our request with this sequence number.
    Unreachable { seq: u16, code: u8 },
}

/// Parses what the socket returned; `None` for anything not about our requests.
fn parse(packet: &[u8], v6: bool, mode: Mode, ident: u16, token: u64) -> Option<Reply> {
    // Raw IPv4 sockets return the IP header too; IPv6 and ping sockets do not.
    let icmp = if !v6 && mode == Mode::Raw {
        let header_len = usize::from(packet.first()? & 0x0f) * 4;
        packet.get(header_len..)?
    } else {
        packet
    };
    let (echo_reply, unreachable) = if v6 {
        (ECHO_REPLY_V6, UNREACHABLE_V6)
    } else {
        (ECHO_REPLY_V4, UNREACHABLE_V4)
    };
    let kind = *icmp.first()?;
    if kind == echo_reply {
        return ours(icmp, mode, ident, token, true).map(Reply::Echo);
    }
    if kind == unreachable && mode == Mode::Raw {
        // The error quotes our request: its IP header, then at least 8 bytes of ICMP.
        let quoted = icmp.get(8..)?;
        let quoted_icmp = if v6 {
            quoted.get(40..)?
        } else {
            quoted.get(usize::from(quoted.first()? & 0x0f) * 4..)?
        };
        let seq = ours(quoted_icmp, mode, ident, token, false)?;
        return Some(Reply::Unreachable { seq, code: icmp[1] });
    }
    None
}

/// The sequence number of an echo message (a reply, or our request quoted in an error)
/// if it is ours: its identifier (raw sockets; ping sockets set their own) and, when the
/// payload is there, the run's token.
fn ours(echo: &[u8], mode: Mode, ident: u16, token: u64, with_token: bool) -> Option<u16> {
    let id_ok = mode == Mode::Datagram || echo.get(4..6)? == ident.to_be_bytes();
    let token_ok = !with_token || echo.get(8..16)? == token.to_be_bytes();
    (id_ok && token_ok).then(|| u16::from_be_bytes([echo[6], echo[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_valid_packet_is_zero() {
        let packet = echo_request(false, 0x1234, 7, 42);
        assert_eq!(checksum(&packet), 0);
    }

    #[test]
    fn raw_v4_reply_with_ip_header_parses() {
        let mut reply = vec![0x45u8];
        reply.extend_from_slice(&[0; 19]);
        let mut icmp = echo_request(false, 9, 3, 77);
        icmp[0] = ECHO_REPLY_V4;
        reply.extend_from_slice(&icmp);
        assert_eq!(parse(&reply, false, Mode::Raw, 9, 77), Some(Reply::Echo(3)));
        assert_eq!(
            parse(&reply, false, Mode::Raw, 10, 77),
            None,
            "other identifier"
        );
        assert_eq!(parse(&reply, false, Mode::Raw, 9, 78), None, "other token");
        assert_eq!(
            parse(&icmp, false, Mode::Datagram, 1, 77),
            Some(Reply::Echo(3))
        );
    }

    #[test]
    fn unreachable_quoting_our_request_is_recognised() {
        let mut error = vec![UNREACHABLE_V4, 1, 0, 0, 0, 0, 0, 0, 0x45];
        error.extend_from_slice(&[0; 19]);
        error.extend_from_slice(&echo_request(false, 5, 0, 1)[..8]);
        assert_eq!(
            parse(&error, true, Mode::Raw, 5, 1),
            None,
            "v4 error on a v6 socket"
        );
        let mut raw = vec![0x45u8];
        raw.extend_from_slice(&[0; 19]);
        raw.extend_from_slice(&error);
        assert_eq!(
            parse(&raw, false, Mode::Raw, 5, 1),
            Some(Reply::Unreachable { seq: 0, code: 1 })
        );
    }

    #[test]
    fn every_request_waits_as_long_as_the_last() {
        let s = Duration::from_secs;
        // 5 x 1 s in the default limit (10 s less 0.2 s): 5.8 s each.
        assert_eq!(
            reply_wait(Duration::from_millis(9800), 5, s(1)),
            Duration::from_millis(5800)
        );
        assert_eq!(reply_wait(s(30), 1, s(1)), s(30));
        assert_eq!(
            reply_wait(s(3), 10, s(1)),
            MIN_REPLY_WAIT,
            "schedule over limit"
        );
    }
}
