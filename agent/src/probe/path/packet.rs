//! Probe packets and what the network says about them, without sockets.
//!
//! One run keeps one flow identity (Paris traceroute, Augustin et al. 2006): every field
//! a per-flow load balancer hashes on is the same in every probe of the run, and the
//! probe is told apart by a field no balancer reads.
//! - ICMP echo: constant identifier; the probe is the sequence number. A balancer that
//!   hashes on the ICMP checksum sees a constant one too: a 16-bit word of the payload
//!   is chosen so that the message's one's-complement sum, hence its checksum, is the
//!   same whatever the sequence number.
//! - UDP: constant source and destination ports (one connected socket) and a constant
//!   UDP checksum (the same balancing word); the probe is told by a tag at the start of
//!   the payload (run token, sequence number), which the error queue hands back. A router
//!   that quotes only the 8 bytes RFC 792 requires leaves the tag out: such answers cannot
//!   be matched to a probe and count as lost (RFC 1812 routers, Linux among them, quote
//!   up to 576 bytes).
//! - TCP SYN: constant ports; the probe is the sequence number (run base plus probe
//!   number), which every ICMP error quotes (it is in the first 8 bytes) and a SYN-ACK or
//!   RST acknowledges (+1).
//!
//! Answers: ICMP time-exceeded (RFC 792 type 11, RFC 4443 type 3) from a router; the
//! destination's echo reply, port-unreachable (UDP), SYN-ACK or RST (TCP); any other
//! destination-unreachable ends the path at whoever sent it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use edgeprobe_proto::testdef::PathProtocol;

use crate::probe::errqueue::Queued;
use crate::probe::icmp;

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const UNREACHABLE_V4: u8 = 3;
const TIME_EXCEEDED_V4: u8 = 11;
const PORT_UNREACHABLE_V4: u8 = 3;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
const UNREACHABLE_V6: u8 = 1;
const TIME_EXCEEDED_V6: u8 = 3;
const PORT_UNREACHABLE_V6: u8 = 4;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_ICMPV6: u8 = 58;
/// The one's-complement sum every probe of a run is balanced to.
const BALANCED_SUM: u16 = 0x5a5a;
/// Where the balancing word sits: in an echo request after the header and the token;
/// in a UDP payload after the token and the sequence number.
const ECHO_BALANCE_AT: usize = 16;
const UDP_BALANCE_AT: usize = 6;
/// UDP payload bytes (tag, balance, filler).
const UDP_PAYLOAD_LEN: usize = 32;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What identifies this run's probes and their answers.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub protocol: PathProtocol,
    pub dest: IpAddr,
    /// ICMP: the echo identifier (raw sockets; a ping socket's kernel sets its own).
    pub ident: u16,
    /// A random token per run in every echo and UDP payload.
    pub token: u64,
    /// TCP: our source port and the target's port.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP: the sequence number of probe 0.
    pub tcp_base: u32,
    /// ICMP: the echo identifier is ours to check (raw socket), not the kernel's.
    pub raw: bool,
}

impl Flow {
    fn v6(&self) -> bool {
        self.dest.is_ipv6()
    }
}

/// What an answer says about the probe it is about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer {
    /// A router on the way: ICMP time exceeded in transit.
    TimeExceeded,
    /// The destination itself answered.
    Reached,
    /// A destination-unreachable with this code: the path ends at its sender.
    Unreachable(u8),
}

/// An answer matched to the probe with sequence number `seq`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heard {
    pub seq: u16,
    pub from: IpAddr,
    pub answer: Answer,
}

/// An echo request of this run (`icmp::echo_request`, the payload balanced so the
/// checksum is the same for every sequence number).
pub fn echo(flow: &Flow, seq: u16) -> Vec<u8> {
    let mut packet = icmp::echo_request(flow.v6(), flow.ident, seq, flow.token);
    packet[2..4].copy_from_slice(&[0, 0]);
    balance(&mut packet, ECHO_BALANCE_AT);
    // The kernel sums ICMPv6 (with its pseudo-header) and ping sockets; raw ICMPv4 is ours.
    if !flow.v6() {
        let sum = icmp::checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// A UDP payload of this run: token (32 bits), sequence number, balancing word, filler.
pub fn udp_payload(flow: &Flow, seq: u16) -> Vec<u8> {
    let mut payload = vec![0u8; UDP_PAYLOAD_LEN];
    payload[0..4].copy_from_slice(&(flow.token as u32).to_be_bytes());
    payload[4..6].copy_from_slice(&seq.to_be_bytes());
    for (i, byte) in payload[8..].iter_mut().enumerate() {
        *byte = 0x40 + i as u8;
    }
    balance(&mut payload, UDP_BALANCE_AT);
    payload
}

/// A TCP SYN (with an MSS option, as a real client's) from `source`, checksummed.
pub fn tcp_syn(flow: &Flow, seq: u16, source: IpAddr) -> Vec<u8> {
    let mut segment = vec![0u8; 24];
    segment[0..2].copy_from_slice(&flow.src_port.to_be_bytes());
    segment[2..4].copy_from_slice(&flow.dst_port.to_be_bytes());
    let number = flow.tcp_base.wrapping_add(u32::from(seq));
    segment[4..8].copy_from_slice(&number.to_be_bytes());
    segment[12] = 6 << 4;
    segment[13] = TCP_SYN;
    segment[14..16].copy_from_slice(&64240u16.to_be_bytes());
    segment[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    let mut pseudo = Vec::with_capacity(40 + segment.len());
    match (source, flow.dest) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, PROTO_TCP]);
            pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
        (s, d) => {
            pseudo.extend_from_slice(&v6_octets(s));
            pseudo.extend_from_slice(&v6_octets(d));
            pseudo.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTO_TCP]);
        }
    }
    pseudo.extend_from_slice(&segment);
    let sum = icmp::checksum(&pseudo);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    segment
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

/// Sets the 16-bit word at `at` so that the one's-complement sum of `data` is
/// `BALANCED_SUM`, whatever the other words are.
fn balance(data: &mut [u8], at: usize) {
    data[at..at + 2].copy_from_slice(&[0, 0]);
    let word = ones_add(BALANCED_SUM, !ones_sum(data));
    data[at..at + 2].copy_from_slice(&word.to_be_bytes());
}

fn ones_add(a: u16, b: u16) -> u16 {
    let sum = u32::from(a) + u32::from(b);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// The folded one's-complement sum of 16-bit big-endian words (RFC 1071, before the
/// final complement).
fn ones_sum(data: &[u8]) -> u16 {
    !icmp::checksum(data)
}

/// The kind of an ICMP error about one of our probes, from its type and code.
fn classify(flow: &Flow, kind: u8, code: u8, from: IpAddr) -> Option<Answer> {
    let (time_exceeded, unreachable, port_unreachable) = if flow.v6() {
        (TIME_EXCEEDED_V6, UNREACHABLE_V6, PORT_UNREACHABLE_V6)
    } else {
        (TIME_EXCEEDED_V4, UNREACHABLE_V4, PORT_UNREACHABLE_V4)
    };
    if kind == time_exceeded && code == 0 {
        Some(Answer::TimeExceeded)
    } else if kind == unreachable {
        if flow.protocol == PathProtocol::Udp && code == port_unreachable && from == flow.dest {
            Some(Answer::Reached)
        } else {
            Some(Answer::Unreachable(code))
        }
    } else {
        None
    }
}

/// What a raw ICMP socket received (IPv4 with its IP header, IPv6 without): an echo
/// reply to one of our requests, or an ICMP error quoting one of our probes (echo
/// request or TCP SYN).
pub fn parse_raw_icmp(packet: &[u8], from: IpAddr, flow: &Flow) -> Option<Heard> {
    let v6 = flow.v6();
    let message = if v6 {
        packet
    } else {
        packet.get(usize::from(packet.first()? & 0x0f) * 4..)?
    };
    let (kind, code) = (*message.first()?, *message.get(1)?);
    let echo_reply = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    if kind == echo_reply {
        if flow.protocol != PathProtocol::Icmp || from != flow.dest {
            return None;
        }
        let seq = our_echo(message, flow, echo_reply)?;
        return Some(Heard {
            seq,
            from,
            answer: Answer::Reached,
        });
    }
    let answer = classify(flow, kind, code, from)?;
    let (proto, dest, transport) = quoted(message.get(8..)?, v6)?;
    if dest != flow.dest {
        return None;
    }
    let seq = match (flow.protocol, proto) {
        (PathProtocol::Icmp, PROTO_ICMP | PROTO_ICMPV6) => {
            let request = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
            our_echo(transport, flow, request)?
        }
        (PathProtocol::Tcp, PROTO_TCP) => {
            if transport.get(0..2)? != flow.src_port.to_be_bytes()
                || transport.get(2..4)? != flow.dst_port.to_be_bytes()
            {
                return None;
            }
            let number = u32::from_be_bytes(transport.get(4..8)?.try_into().ok()?);
            probe_number(number.wrapping_sub(flow.tcp_base))?
        }
        _ => return None,
    };
    Some(Heard { seq, from, answer })
}

/// The sequence number of an echo message of type `kind` if it is ours: the identifier
/// (raw sockets) and, when the payload is there, the run's token.
fn our_echo(echo: &[u8], flow: &Flow, kind: u8) -> Option<u16> {
    if *echo.first()? != kind || echo.len() < 8 {
        return None;
    }
    if flow.raw && echo[4..6] != flow.ident.to_be_bytes() {
        return None;
    }
    if let Some(token) = echo.get(8..16) {
        if token != flow.token.to_be_bytes() {
            return None;
        }
    }
    Some(u16::from_be_bytes([echo[6], echo[7]]))
}

/// The protocol, destination and transport bytes of the packet an ICMP error quotes.
fn quoted(packet: &[u8], v6: bool) -> Option<(u8, IpAddr, &[u8])> {
    if v6 {
        if packet.first()? >> 4 != 6 {
            return None;
        }
        let dest: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
        Some((
            packet[6],
            IpAddr::V6(Ipv6Addr::from(dest)),
            packet.get(40..)?,
        ))
    } else {
        let first = *packet.first()?;
        if first >> 4 != 4 {
            return None;
        }
        let dest: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
        let header = usize::from(first & 0x0f) * 4;
        Some((
            *packet.get(9)?,
            IpAddr::V4(Ipv4Addr::from(dest)),
            packet.get(header..)?,
        ))
    }
}

/// A probe number within the 16 bits of a run's sequence numbers.
fn probe_number(offset: u32) -> Option<u16> {
    u16::try_from(offset).ok()
}

/// An echo reply on a ping socket (no IP header; the kernel matched the identifier).
pub fn parse_ping_reply(packet: &[u8], from: IpAddr, flow: &Flow) -> Option<Heard> {
    let echo_reply = if flow.v6() {
        ECHO_REPLY_V6
    } else {
        ECHO_REPLY_V4
    };
    if from != flow.dest {
        return None;
    }
    let seq = our_echo(packet, flow, echo_reply)?;
    Some(Heard {
        seq,
        from,
        answer: Answer::Reached,
    })
}

/// An ICMP error from a ping or UDP socket's error queue, about one of our probes.
pub fn parse_queued(queued: &Queued, flow: &Flow) -> Option<Heard> {
    let (kind, code) = queued.icmp?;
    let from = queued.offender?;
    let answer = classify(flow, kind, code, from)?;
    let request = &queued.request;
    let seq = match flow.protocol {
        PathProtocol::Icmp => {
            let echo_request = if flow.v6() {
                ECHO_REQUEST_V6
            } else {
                ECHO_REQUEST_V4
            };
            our_echo(request, flow, echo_request)?
        }
        PathProtocol::Udp => {
            if request.get(0..4)? != (flow.token as u32).to_be_bytes() {
                return None;
            }
            u16::from_be_bytes(request.get(4..6)?.try_into().ok()?)
        }
        PathProtocol::Tcp => return None,
    };
    Some(Heard { seq, from, answer })
}

/// A SYN-ACK or RST from the destination on a raw TCP socket (IPv4 with its IP header,
/// IPv6 without), acknowledging one of our SYNs.
pub fn parse_tcp(packet: &[u8], from: IpAddr, flow: &Flow) -> Option<Heard> {
    if from != flow.dest {
        return None;
    }
    let segment = if flow.v6() {
        packet
    } else {
        packet.get(usize::from(packet.first()? & 0x0f) * 4..)?
    };
    if segment.get(0..2)? != flow.dst_port.to_be_bytes()
        || segment.get(2..4)? != flow.src_port.to_be_bytes()
    {
        return None;
    }
    let flags = *segment.get(13)?;
    let syn_ack = flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    if !syn_ack && flags & TCP_RST == 0 {
        return None;
    }
    let ack = u32::from_be_bytes(segment.get(8..12)?.try_into().ok()?);
    let seq = probe_number(ack.wrapping_sub(1).wrapping_sub(flow.tcp_base))?;
    Some(Heard {
        seq,
        from,
        answer: Answer::Reached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(protocol: PathProtocol, dest: &str) -> Flow {
        Flow {
            protocol,
            dest: dest.parse().unwrap(),
            ident: 0x1234,
            token: 0x0102_0304_0506_0708,
            src_port: 40000,
            dst_port: 80,
            tcp_base: 0xffff_fff0,
            raw: true,
        }
    }

    fn ipv4_header(proto: u8, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 1, proto, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h
    }

    #[test]
    fn echo_checksum_is_the_same_for_every_sequence_number() {
        for dest in ["192.0.2.9", "2001:db8::9"] {
            let f = flow(PathProtocol::Icmp, dest);
            let first = echo(&f, 0);
            for seq in [1u16, 2, 255, 256, 4097, 65535] {
                let p = echo(&f, seq);
                assert_eq!(&p[2..6], &first[2..6], "checksum and identifier constant");
                assert_eq!(u16::from_be_bytes([p[6], p[7]]), seq);
                let mut zeroed = p.clone();
                zeroed[2..4].copy_from_slice(&[0, 0]);
                assert_eq!(ones_sum(&zeroed), BALANCED_SUM, "{dest} seq {seq}");
            }
            if !f.dest.is_ipv6() {
                assert_eq!(icmp::checksum(&first), 0, "a valid ICMPv4 checksum");
            }
        }
    }

    #[test]
    fn udp_payload_sum_is_constant_and_tagged() {
        let f = flow(PathProtocol::Udp, "192.0.2.9");
        for seq in [0u16, 7, 65535] {
            let p = udp_payload(&f, seq);
            assert_eq!(ones_sum(&p), BALANCED_SUM);
            assert_eq!(u16::from_be_bytes([p[4], p[5]]), seq);
        }
    }

    #[test]
    fn time_exceeded_quoting_our_echo_is_matched() {
        let f = flow(PathProtocol::Icmp, "192.0.2.9");
        let router: IpAddr = "10.0.0.1".parse().unwrap();
        let mut packet = ipv4_header(PROTO_ICMP, [10, 0, 0, 1], [10, 0, 0, 2]);
        packet.extend_from_slice(&[TIME_EXCEEDED_V4, 0, 0, 0, 0, 0, 0, 0]);
        packet.extend_from_slice(&ipv4_header(PROTO_ICMP, [10, 0, 0, 2], [192, 0, 2, 9]));
        packet.extend_from_slice(&echo(&f, 513));
        assert_eq!(
            parse_raw_icmp(&packet, router, &f),
            Some(Heard {
                seq: 513,
                from: router,
                answer: Answer::TimeExceeded
            })
        );
        // Only the 8 bytes RFC 792 requires: still ours by identifier.
        let short = &packet[..20 + 8 + 20 + 8];
        assert_eq!(parse_raw_icmp(short, router, &f).map(|h| h.seq), Some(513));
        let other = Flow { ident: 9, ..f };
        assert_eq!(
            parse_raw_icmp(&packet, router, &other),
            None,
            "other pinger"
        );
        let elsewhere = flow(PathProtocol::Icmp, "192.0.2.10");
        assert_eq!(
            parse_raw_icmp(&packet, router, &elsewhere),
            None,
            "other target"
        );
    }

    #[test]
    fn echo_reply_from_the_destination_reaches_it() {
        let f = flow(PathProtocol::Icmp, "2001:db8::9");
        let mut reply = echo(&f, 4);
        reply[0] = ECHO_REPLY_V6;
        let dest = f.dest;
        assert_eq!(
            parse_raw_icmp(&reply, dest, &f).map(|h| (h.seq, h.answer)),
            Some((4, Answer::Reached))
        );
        assert_eq!(
            parse_raw_icmp(&reply, "2001:db8::1".parse().unwrap(), &f),
            None
        );
        let ping = Flow {
            raw: false,
            ident: 77,
            ..f
        };
        assert_eq!(
            parse_ping_reply(&reply, dest, &ping).map(|h| h.seq),
            Some(4)
        );
    }

    #[test]
    fn unreachable_and_port_unreachable() {
        let f = flow(PathProtocol::Udp, "192.0.2.9");
        let dest = f.dest;
        let router: IpAddr = "10.0.0.1".parse().unwrap();
        let queued = |kind, code, from| Queued {
            request: udp_payload(&f, 3),
            icmp: Some((kind, code)),
            offender: Some(from),
        };
        let answer = |q: &Queued| parse_queued(q, &f).map(|h| (h.seq, h.answer));
        assert_eq!(
            answer(&queued(UNREACHABLE_V4, PORT_UNREACHABLE_V4, dest)),
            Some((3, Answer::Reached))
        );
        assert_eq!(
            answer(&queued(UNREACHABLE_V4, 1, router)),
            Some((3, Answer::Unreachable(1)))
        );
        assert_eq!(
            answer(&queued(TIME_EXCEEDED_V4, 0, router)),
            Some((3, Answer::TimeExceeded))
        );
        let mut foreign = queued(TIME_EXCEEDED_V4, 0, router);
        foreign.request[0] ^= 1;
        assert_eq!(answer(&foreign), None, "another run's token");
        foreign.request.truncate(0);
        assert_eq!(answer(&foreign), None, "quote without the tag");
    }

    #[test]
    fn tcp_probe_numbers_wrap_and_match() {
        let f = flow(PathProtocol::Tcp, "192.0.2.9");
        let source: IpAddr = "10.0.0.2".parse().unwrap();
        let syn = tcp_syn(&f, 20, source);
        // A valid checksum: the sum over pseudo-header and segment is 0xffff.
        let mut pseudo = vec![10, 0, 0, 2, 192, 0, 2, 9, 0, PROTO_TCP, 0, 24];
        pseudo.extend_from_slice(&syn);
        assert_eq!(icmp::checksum(&pseudo), 0);
        // Time exceeded quoting the SYN's first 8 bytes.
        let router: IpAddr = "10.0.0.1".parse().unwrap();
        let mut packet = ipv4_header(PROTO_ICMP, [10, 0, 0, 1], [10, 0, 0, 2]);
        packet.extend_from_slice(&[TIME_EXCEEDED_V4, 0, 0, 0, 0, 0, 0, 0]);
        packet.extend_from_slice(&ipv4_header(PROTO_TCP, [10, 0, 0, 2], [192, 0, 2, 9]));
        packet.extend_from_slice(&syn[..8]);
        assert_eq!(parse_raw_icmp(&packet, router, &f).map(|h| h.seq), Some(20));
        // The SYN-ACK acknowledges base + 20 + 1 (wrapped past 2^32).
        let mut syn_ack = ipv4_header(PROTO_TCP, [192, 0, 2, 9], [10, 0, 0, 2]);
        let mut segment = vec![0u8; 20];
        segment[0..2].copy_from_slice(&80u16.to_be_bytes());
        segment[2..4].copy_from_slice(&40000u16.to_be_bytes());
        let ack = f.tcp_base.wrapping_add(21);
        segment[8..12].copy_from_slice(&ack.to_be_bytes());
        segment[13] = TCP_SYN | TCP_ACK;
        syn_ack.extend_from_slice(&segment);
        assert_eq!(
            parse_tcp(&syn_ack, f.dest, &f).map(|h| (h.seq, h.answer)),
            Some((20, Answer::Reached))
        );
        let last = syn_ack.len() - 20 + 13;
        syn_ack[last] = TCP_ACK;
        assert_eq!(parse_tcp(&syn_ack, f.dest, &f), None, "a bare ACK");
        syn_ack[last] = TCP_RST | TCP_ACK;
        assert_eq!(parse_tcp(&syn_ack, f.dest, &f).map(|h| h.seq), Some(20));
    }
}
