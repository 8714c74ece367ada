//! The sockets of one path run and its send/receive loop, on a blocking thread (a
//! blocked `poll` wakes straight from the kernel; an async task would add the runtime's
//! wake-up to every round trip, as for the icmp probe).
//!
//! - icmp: the icmp probe's socket (`icmp::open`): raw with CAP_NET_RAW, else a ping
//!   socket, whose ICMP errors come from its error queue.
//! - udp: one UDP socket connected to the target (constant ports), IP_RECVERR: routers'
//!   time-exceeded and the destination's port-unreachable come from its error queue with
//!   the sender's address. No privileges (tracepath's method). A pending error fails the
//!   next send (the kernel reports it there), so the queue is drained before each send.
//! - tcp: SYNs on a raw TCP socket from a source port held by a bound (never connected)
//!   TCP socket, so no local connection can take it and the kernel answers the target's
//!   SYN-ACK with a RST; answers on the raw TCP socket and a raw ICMP socket
//!   (CAP_NET_RAW). A `connect()` per probe with IP_RECVERR would need no raw socket, but
//!   concurrent connects cannot share one source port, so it could not keep the flow.
//!
//! Each round sends TTL 1 up to the current limit (`max_hops`, or where the destination
//! or an unreachable answered), paced a few ms apart and receiving in between; a probe
//! counts as answered when its answer arrives within `reply_wait` of its send, as lost
//! after that. Answers of earlier rounds are still taken while later rounds go out (they
//! are matched by sequence number). The loop ends when every round is out and every
//! probe answered or given up, or at the run's deadline, whichever comes first.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use edgeprobe_proto::testdef::PathProtocol;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::packet::{self, Answer, Flow, Heard};
use super::stats::HopStats;
use crate::probe::icmp::{self, Mode};
use crate::probe::{addr, errqueue, secs, ErrorClass, ProbeError};

/// The longest single wait in `poll`: the kernel keeps short timeouts to a tick.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// The longest gap between two probes of a round ("a few ms"); shorter when the
/// interval is short, so a round fits in it.
const MAX_PACE: Duration = Duration::from_millis(5);

/// When to send and how long to wait.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub count: u32,
    pub interval: Duration,
    pub max_hops: u32,
    /// A probe not answered this long after its send is lost.
    pub reply_wait: Duration,
    pub start: Instant,
    /// The end of the whole exchange, whatever is still awaited.
    pub deadline: Instant,
}

/// Where a run stands.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Index `ttl - 1`, `max_hops` of them.
    pub hops: Vec<HopStats>,
    /// The lowest TTL at which the destination answered.
    pub reached_at: Option<u32>,
    /// The lowest TTL answered by a destination-unreachable: (ttl, sender, code).
    pub unreachable: Option<(u32, IpAddr, u8)>,
    /// Why a probe could not be sent (no route, firewall, ...).
    pub send_error: Option<ProbeError>,
    /// Rounds sent.
    pub rounds: u32,
}

impl Tally {
    fn new(max_hops: u32) -> Tally {
        Tally {
            hops: vec![HopStats::default(); max_hops as usize],
            reached_at: None,
            unreachable: None,
            send_error: None,
            rounds: 0,
        }
    }

    /// The highest TTL worth probing: nothing answers beyond the destination or an
    /// unreachable.
    fn limit(&self, max_hops: u32) -> u32 {
        let mut limit = max_hops;
        if let Some(at) = self.reached_at {
            limit = limit.min(at);
        }
        if let Some((at, _, _)) = self.unreachable {
            limit = limit.min(at);
        }
        limit
    }
}

/// The sockets of one run.
enum Sockets {
    Icmp {
        socket: UdpSocket,
        mode: Mode,
    },
    Udp {
        socket: UdpSocket,
    },
    Tcp {
        raw: UdpSocket,
        icmp: UdpSocket,
        /// Holds the source port for the run.
        _port: Socket,
        source: IpAddr,
    },
}

/// A probe in flight.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    ttl: u32,
    sent_at: Instant,
    deadline: Instant,
}

/// One run's sockets, flow and state.
pub struct Session {
    sockets: Sockets,
    flow: Flow,
    dest: SocketAddr,
    outstanding: HashMap<u16, Outstanding>,
    tally: Tally,
}

impl Session {
    /// Opens the sockets for `protocol` towards `dest` (its port is the target port of
    /// udp and tcp).
    pub fn open(
        protocol: PathProtocol,
        dest: SocketAddr,
        link: &addr::Link,
    ) -> Result<Session, ProbeError> {
        let v6 = dest.is_ipv6();
        let local = |what: &str, e: std::io::Error| {
            ProbeError::new(ErrorClass::Local, format!("cannot set up {what}: {e}"))
        };
        let mut flow = Flow {
            protocol,
            dest: dest.ip(),
            ident: rand::random(),
            token: rand::random(),
            src_port: 0,
            dst_port: dest.port(),
            tcp_base: rand::random(),
            raw: true,
        };
        let sockets = match protocol {
            PathProtocol::Icmp => {
                let (socket, mode) = icmp::open(dest, link)?;
                flow.raw = mode == Mode::Raw;
                socket
                    .set_nonblocking(true)
                    .map_err(|e| local("the ICMP socket", e))?;
                Sockets::Icmp { socket, mode }
            }
            PathProtocol::Udp => {
                let socket = connected_udp(dest, link)?;
                errqueue::set_recverr(&socket, v6).map_err(|e| local("the UDP socket", e))?;
                socket
                    .set_nonblocking(true)
                    .map_err(|e| local("the UDP socket", e))?;
                flow.src_port = socket.local_addr().map_or(0, |a| a.port());
                Sockets::Udp { socket }
            }
            PathProtocol::Tcp => {
                let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
                let raw = Socket::new(domain, Type::RAW, Some(Protocol::TCP)).map_err(|e| {
                    ProbeError::new(
                        ErrorClass::Local,
                        format!(
                            "cannot open a raw TCP socket for SYN probes: {e} (grant \
                             CAP_NET_RAW, e.g. AmbientCapabilities=CAP_NET_RAW in the systemd \
                             unit or `setcap cap_net_raw+ep edgeprobe-agent`, or use \
                             protocol = \"udp\", which needs no privileges)"
                        ),
                    )
                })?;
                let icmp_protocol = if v6 {
                    Protocol::ICMPV6
                } else {
                    Protocol::ICMPV4
                };
                let icmp = Socket::new(domain, Type::RAW, Some(icmp_protocol))
                    .map_err(|e| local("a raw ICMP socket", e))?;
                link.bind(SockRef::from(&raw), dest)?;
                link.bind(SockRef::from(&icmp), dest)?;
                // The source address the kernel picks towards the target, for the TCP
                // checksum's pseudo-header.
                let source = connected_udp(dest, link)?
                    .local_addr()
                    .map_err(|e| local("the source address", e))?
                    .ip();
                let port = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
                    .map_err(|e| local("the source port", e))?;
                port.bind(&SocketAddr::new(source, 0).into())
                    .map_err(|e| local("the source port", e))?;
                flow.src_port = port
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map_or(0, |a| a.port());
                for s in [&raw, &icmp] {
                    s.set_nonblocking(true)
                        .map_err(|e| local("a raw socket", e))?;
                }
                Sockets::Tcp {
                    raw: UdpSocket::from(raw),
                    icmp: UdpSocket::from(icmp),
                    _port: port,
                    source,
                }
            }
        };
        Ok(Session {
            sockets,
            flow,
            dest,
            outstanding: HashMap::new(),
            tally: Tally::new(0),
        })
    }

    /// Whether ICMP probes go out on a raw socket (for the log).
    pub fn describe(&self) -> &'static str {
        match &self.sockets {
            Sockets::Icmp {
                mode: Mode::Raw, ..
            } => "raw ICMP socket",
            Sockets::Icmp { .. } => "ICMP datagram (ping) socket",
            Sockets::Udp { .. } => "connected UDP socket with IP_RECVERR",
            Sockets::Tcp { .. } => "raw TCP and ICMP sockets",
        }
    }

    /// Runs the rounds of `plan`; `on_round` sees the tally before each round and
    /// whenever the run ends.
    pub fn run(mut self, plan: Plan, mut on_round: impl FnMut(&Tally)) -> Tally {
        self.tally = Tally::new(plan.max_hops);
        let mut seq: u16 = 0;
        let mut next_round = plan.start;
        let mut buf = vec![0u8; 4096];
        loop {
            let now = Instant::now();
            self.expire(now);
            let sending = self.tally.rounds < plan.count && next_round < plan.deadline;
            if sending && now >= next_round {
                on_round(&self.tally);
                let sent = self.send_round(&plan, &mut seq, &mut buf);
                self.tally.rounds += 1;
                next_round += plan.interval;
                if sent == 0 {
                    // Not one probe left: no route, a firewall. Later rounds would fail
                    // the same way.
                    self.tally.rounds = plan.count;
                }
                continue;
            }
            if (!sending && self.outstanding.is_empty()) || now >= plan.deadline {
                break;
            }
            let mut wake = plan.deadline;
            if sending {
                wake = wake.min(next_round);
            }
            if let Some(first) = self.outstanding.values().map(|o| o.deadline).min() {
                wake = wake.min(first);
            }
            self.receive(wake, &mut buf);
        }
        // What is still in flight at the deadline was given up.
        self.expire(Instant::now().max(plan.deadline));
        on_round(&self.tally);
        self.tally
    }

    /// Sends one round, TTL 1 up to the limit, receiving between probes; returns how
    /// many went out.
    fn send_round(&mut self, plan: &Plan, seq: &mut u16, buf: &mut [u8]) -> u32 {
        let mut sent = 0;
        let mut ttl = 1;
        while ttl <= self.tally.limit(plan.max_hops) {
            let top = self.tally.limit(plan.max_hops);
            let pace = (plan.interval / (top + 1)).min(MAX_PACE);
            if Instant::now() >= plan.deadline {
                break;
            }
            let this = *seq;
            *seq = seq.wrapping_add(1);
            let sent_at = Instant::now();
            match self.send(this, ttl, buf) {
                Ok(()) => {
                    sent += 1;
                    self.outstanding.insert(
                        this,
                        Outstanding {
                            ttl,
                            sent_at,
                            deadline: (sent_at + plan.reply_wait).min(plan.deadline),
                        },
                    );
                }
                Err(e) => {
                    self.tally.hops[ttl as usize - 1].lost();
                    let class = match e.kind() {
                        // EINVAL for a valid probe means a blackhole route.
                        ErrorKind::InvalidInput => ErrorClass::Unreachable,
                        _ => ErrorClass::of_io(&e),
                    };
                    self.tally.send_error = Some(ProbeError::new(
                        class,
                        format!("cannot send a probe to {} (TTL {ttl}): {e}", self.dest.ip()),
                    ));
                    break;
                }
            }
            let until = Instant::now() + pace;
            while Instant::now() < until {
                self.receive(until, buf);
            }
            ttl += 1;
        }
        sent
    }

    /// Sends probe `seq` with `ttl`. A datagram socket's pending error (an ICMP error
    /// queued since the last read) fails a send; the queue is read first, and once more
    /// when a send fails with something queued.
    fn send(&mut self, seq: u16, ttl: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let v6 = self.dest.is_ipv6();
        let mut retried = false;
        loop {
            self.drain_errqueue();
            let result = match &self.sockets {
                Sockets::Icmp { socket, .. } => {
                    set_ttl(socket, v6, ttl)?;
                    socket.send_to(&packet::echo(&self.flow, seq), self.dest)
                }
                Sockets::Udp { socket } => {
                    set_ttl(socket, v6, ttl)?;
                    socket.send(&packet::udp_payload(&self.flow, seq))
                }
                Sockets::Tcp { raw, source, .. } => {
                    set_ttl(raw, v6, ttl)?;
                    let to = SocketAddr::new(self.dest.ip(), 0);
                    let to = match (to, self.dest) {
                        (SocketAddr::V6(mut a), SocketAddr::V6(d)) => {
                            a.set_scope_id(d.scope_id());
                            SocketAddr::V6(a)
                        }
                        (a, _) => a,
                    };
                    raw.send_to(&packet::tcp_syn(&self.flow, seq, *source), to)
                }
            };
            match result {
                Ok(_) => return Ok(()),
                Err(e) if !retried && self.has_errqueue() => {
                    // An error queued between the drain and the send (it may be about a
                    // probe long given up): read it and send again; with nothing queued
                    // the send itself failed.
                    retried = true;
                    let drained = self.drain_errqueue();
                    self.receive_now(buf);
                    if drained == 0 {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn has_errqueue(&self) -> bool {
        matches!(
            self.sockets,
            Sockets::Udp { .. }
                | Sockets::Icmp {
                    mode: Mode::Datagram,
                    ..
                }
        )
    }

    /// Waits for answers until `until` (at most one slice) and takes what arrived.
    fn receive(&mut self, until: Instant, buf: &mut [u8]) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        let wait = (until - now).clamp(Duration::from_micros(1), WAIT_SLICE);
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: wait.subsec_nanos().into(),
        };
        let ready = {
            let mut fds: Vec<PollFd<'_>> = self
                .fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::IN))
                .collect();
            match poll(&mut fds, Some(&timeout)) {
                Ok(n) => n > 0,
                Err(_) => false,
            }
        };
        if ready {
            self.drain_errqueue();
            self.receive_now(buf);
        }
    }

    fn fds(&self) -> Vec<&UdpSocket> {
        match &self.sockets {
            Sockets::Icmp { socket, .. } | Sockets::Udp { socket } => vec![socket],
            Sockets::Tcp { raw, icmp, .. } => vec![raw, icmp],
        }
    }

    /// Reads every datagram waiting, without blocking.
    fn receive_now(&mut self, buf: &mut [u8]) {
        let mut heard = Vec::new();
        {
            let flow = &self.flow;
            let mut read_all =
                |socket: &UdpSocket, parse: &dyn Fn(&[u8], IpAddr) -> Option<Heard>| {
                    // Bounded: a flood of foreign ICMP must not keep the loop here.
                    for _ in 0..256 {
                        match socket.recv_from(buf) {
                            Ok((n, from)) => {
                                let at = Instant::now();
                                if let Some(h) = parse(&buf[..n], from.ip()) {
                                    heard.push((h, at));
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            // A pending socket error: the details are in the error queue.
                            Err(_) => continue,
                        }
                    }
                };
            match &self.sockets {
                Sockets::Icmp { socket, mode } => {
                    if *mode == Mode::Raw {
                        read_all(socket, &|p, from| packet::parse_raw_icmp(p, from, flow));
                    } else {
                        read_all(socket, &|p, from| packet::parse_ping_reply(p, from, flow));
                    }
                }
                Sockets::Udp { socket } => {
                    // Nothing but errors should arrive; read to keep the queue empty.
                    read_all(socket, &|_, _| None);
                }
                Sockets::Tcp { raw, icmp, .. } => {
                    read_all(raw, &|p, from| packet::parse_tcp(p, from, flow));
                    read_all(icmp, &|p, from| packet::parse_raw_icmp(p, from, flow));
                }
            }
        }
        for (h, at) in heard {
            self.apply(h, at);
        }
    }

    /// Reads the error queue of a ping or UDP socket; returns how many errors it held.
    fn drain_errqueue(&mut self) -> usize {
        if !self.has_errqueue() {
            return 0;
        }
        let v6 = self.dest.is_ipv6();
        let mut heard = Vec::new();
        let mut queued = 0;
        if let Sockets::Icmp { socket, .. } | Sockets::Udp { socket } = &self.sockets {
            for _ in 0..256 {
                let Some(error) = errqueue::read(socket, v6) else {
                    break;
                };
                queued += 1;
                let at = Instant::now();
                if let Some(h) = packet::parse_queued(&error, &self.flow) {
                    heard.push((h, at));
                }
            }
        }
        for (h, at) in heard {
            self.apply(h, at);
        }
        queued
    }

    /// Counts an answer for the probe it is about (a duplicate, or one past its
    /// deadline, counts for nothing more).
    fn apply(&mut self, heard: Heard, at: Instant) {
        let Some(probe) = self.outstanding.remove(&heard.seq) else {
            return;
        };
        let hop = &mut self.tally.hops[probe.ttl as usize - 1];
        if at > probe.deadline {
            hop.lost();
            return;
        }
        hop.answered(
            heard.from,
            secs(at.saturating_duration_since(probe.sent_at)),
        );
        match heard.answer {
            Answer::TimeExceeded => {}
            Answer::Reached => {
                let lowest = self
                    .tally
                    .reached_at
                    .map_or(probe.ttl, |t| t.min(probe.ttl));
                self.tally.reached_at = Some(lowest);
            }
            Answer::Unreachable(code) => {
                if self.tally.unreachable.is_none_or(|(t, _, _)| probe.ttl < t) {
                    self.tally.unreachable = Some((probe.ttl, heard.from, code));
                }
            }
        }
    }

    /// Gives up the probes whose deadline has passed.
    fn expire(&mut self, now: Instant) {
        let tally = &mut self.tally;
        self.outstanding.retain(|_, probe| {
            if probe.deadline <= now {
                tally.hops[probe.ttl as usize - 1].lost();
                false
            } else {
                true
            }
        });
    }
}

/// A UDP socket over the link connected to `dest`: the source the kernel picks, the
/// route's errors.
fn connected_udp(dest: SocketAddr, link: &addr::Link) -> Result<UdpSocket, ProbeError> {
    let socket = addr::udp_socket(dest, link)?;
    socket.connect(dest).map_err(|e| {
        let class = match e.kind() {
            ErrorKind::InvalidInput => ErrorClass::Unreachable,
            _ => ErrorClass::of_io(&e),
        };
        ProbeError::new(class, format!("no route to {}: {e}", dest.ip()))
    })?;
    link.note_local(socket.local_addr().ok());
    Ok(socket)
}

/// Sets the TTL (IPv4) or hop limit (IPv6) of the next packets.
fn set_ttl(socket: &impl AsFd, v6: bool, ttl: u32) -> std::io::Result<()> {
    let socket = SockRef::from(socket);
    if v6 {
        socket.set_unicast_hops_v6(ttl)
    } else {
        socket.set_ttl_v4(ttl)
    }
}
