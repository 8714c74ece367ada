//! The STAMP Session-Reflector of `serve-target` (RFC 8762 section 4.3, unauthenticated,
//! stateful; SPEC section 17).
//!
//! - A session is the sender's address and port. Each has its own sequence number, counting
//!   the packets of the session that arrived (section 4.3.1), so the sender can tell
//!   forward from reverse loss. Sessions idle for `SESSION_IDLE` are forgotten; at most
//!   `max_sessions` are kept, the longest idle evicted (an eighth at a time) beyond that.
//! - The reflected packet (section 4.3.1 layout, `probe::stamp::packet`) carries T2 (taken
//!   when the packet is read), T3 (taken just before the send), this host's error estimate
//!   (S from the kernel's sync status, asked for each reflection), the sender's sequence
//!   number, timestamp and error estimate, and the TTL or hop limit the sender's packet
//!   arrived with (IP_RECVTTL / IPV6_RECVHOPLIMIT; 255 when the kernel gave none).
//! - Not an amplifier: a packet shorter than 44 bytes is dropped; the reflection is exactly
//!   as long as the packet it answers, never longer; each source address has a token
//!   bucket (`rate` packets per second, `burst`), and a packet beyond it is dropped. Drops
//!   are counters logged every `LOG_EVERY` when they changed, never a line per packet.
//!
//! Unsafe code: `set_recv_ttl` (setsockopt with a `c_int`) and `recv` (recvmsg into
//! buffers we own, for the TTL's control message); neither socket2 nor rustix wraps them.

use std::collections::HashMap;
use std::io;
use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::probe::errqueue;
use crate::probe::stamp::packet;

/// Sessions kept at most, by default.
pub const DEFAULT_MAX_SESSIONS: usize = 4096;
/// Packets per second each source address may have reflected, by default.
pub const DEFAULT_RATE: u32 = 1000;
/// Packets a source address may send at once beyond its rate, by default.
pub const DEFAULT_BURST: u32 = 100;
/// A session without packets for this long is forgotten.
const SESSION_IDLE: Duration = Duration::from_secs(60);
/// Housekeeping: expiry, counters.
const TICK: Duration = Duration::from_secs(1);
/// Counters are logged at most this often (when they changed).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Datagrams handled per readiness before the loop looks at its timers again.
const BATCH: usize = 256;
/// Largest datagram read; longer ones are truncated and dropped.
const MAX_PACKET: usize = 9216;

/// The reflector's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_sessions: usize,
    pub rate: u32,
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: DEFAULT_MAX_SESSIONS,
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

/// What the reflector did, as logged.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counters {
    pub received: u64,
    pub reflected: u64,
    pub dropped_short: u64,
    pub dropped_rate: u64,
    pub dropped_send: u64,
    pub sessions_evicted: u64,
}

pub struct Reflector {
    socket: UdpSocket,
    limits: Limits,
}

/// Binds the reflector's UDP socket (an IPv6 wildcard takes IPv4 too).
pub fn bind(listen: SocketAddr, limits: Limits) -> io::Result<Reflector> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        if listen.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        set_recv_ttl(&socket, true)?;
    }
    // On a dual-stack IPv6 socket this gives the TTL of IPv4 packets too.
    if let Err(e) = set_recv_ttl(&socket, false) {
        if listen.is_ipv4() {
            return Err(e);
        }
    }
    socket.bind(&listen.into())?;
    socket.set_nonblocking(true)?;
    Ok(Reflector {
        socket: UdpSocket::from_std(socket.into())?,
        limits,
    })
}

impl Reflector {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Reflects until `shutdown`; returns the counters.
    pub async fn run(self, shutdown: CancellationToken) -> Counters {
        let mut state = State {
            limits: self.limits,
            sessions: HashMap::new(),
            buckets: HashMap::new(),
            counters: Counters::default(),
        };
        let mut buf = vec![0u8; MAX_PACKET];
        let mut out = vec![0u8; MAX_PACKET];
        let mut tick = tokio::time::interval(TICK);
        let mut logged = Counters::default();
        let mut last_log = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    state.expire(Instant::now());
                    if state.counters != logged && last_log.elapsed() >= LOG_EVERY {
                        log(&state.counters, state.sessions.len());
                        logged = state.counters;
                        last_log = Instant::now();
                    }
                }
                ready = self.socket.readable() => {
                    if ready.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    for _ in 0..BATCH {
                        let got = self
                            .socket
                            .try_io(Interest::READABLE, || recv(&self.socket, &mut buf));
                        let (n, from, ttl) = match got {
                            Ok(got) => got,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // ICMP errors about earlier reflections, and the like.
                            Err(_) => continue,
                        };
                        let t2 = packet::ntp_now();
                        let Some(len) = state.reflect(&buf[..n], from, ttl, t2, &mut out) else {
                            continue;
                        };
                        packet::write_t3(&mut out, packet::ntp_now());
                        match self.socket.try_send_to(&out[..len], from) {
                            Ok(_) => state.counters.reflected += 1,
                            Err(_) => state.counters.dropped_send += 1,
                        }
                    }
                }
            }
        }
        log(&state.counters, state.sessions.len());
        state.counters
    }
}

fn log(c: &Counters, sessions: usize) {
    tracing::info!(
        received = c.received,
        reflected = c.reflected,
        dropped_short = c.dropped_short,
        dropped_rate = c.dropped_rate,
        dropped_send = c.dropped_send,
        sessions_evicted = c.sessions_evicted,
        sessions,
        "STAMP reflector counters"
    );
}

struct Session {
    next_seq: u32,
    last_seen: Instant,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct State {
    limits: Limits,
    sessions: HashMap<SocketAddr, Session>,
    buckets: HashMap<IpAddr, Bucket>,
    counters: Counters,
}

impl State {
    /// Writes the reflection of `packet` into `out` and returns its length, or `None` when
    /// the packet is dropped. T3 is written by the caller just before sending.
    fn reflect(
        &mut self,
        data: &[u8],
        from: SocketAddr,
        ttl: Option<u8>,
        t2: u64,
        out: &mut [u8],
    ) -> Option<usize> {
        self.counters.received += 1;
        let now = Instant::now();
        if !self.admit(from.ip(), now) {
            self.counters.dropped_rate += 1;
            return None;
        }
        let Some(sender) = packet::read_sender(data) else {
            self.counters.dropped_short += 1;
            return None;
        };
        if !self.sessions.contains_key(&from) && self.sessions.len() >= self.limits.max_sessions {
            self.evict();
        }
        let session = self.sessions.entry(from).or_insert(Session {
            next_seq: 0,
            last_seen: now,
        });
        let seq = session.next_seq;
        session.next_seq = seq.wrapping_add(1);
        session.last_seen = now;
        let len = data.len().min(out.len());
        packet::write_reflector(
            &mut out[..len],
            &packet::ReflectorPacket {
                seq,
                timestamp: 0,
                // Asked per reflection (one syscall, at most `rate` per source and
                // second): a status that just changed is never stale.
                estimate: packet::local_error_estimate(),
                receive_timestamp: t2,
                sender,
                sender_ttl: ttl.unwrap_or(255),
            },
        );
        Some(len)
    }

    /// The source's token bucket: `rate` per second, up to `burst`.
    fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        let (rate, burst) = (
            f64::from(self.limits.rate),
            f64::from(self.limits.burst.max(1)),
        );
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.limits.max_sessions {
            // Full buckets are the same as no bucket: forget those.
            self.buckets
                .retain(|_, b| b.tokens + rate * now.duration_since(b.at).as_secs_f64() < burst);
            if self.buckets.len() >= self.limits.max_sessions {
                return false;
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + rate * now.duration_since(b.at).as_secs_f64()).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets the longest-idle eighth of the sessions.
    fn evict(&mut self) {
        let mut idle: Vec<(Instant, SocketAddr)> = self
            .sessions
            .iter()
            .map(|(a, s)| (s.last_seen, *a))
            .collect();
        idle.sort_unstable();
        let n = (idle.len() / 8).max(1);
        for (_, a) in idle.into_iter().take(n) {
            self.sessions.remove(&a);
            self.counters.sessions_evicted += 1;
        }
    }

    fn expire(&mut self, now: Instant) {
        self.sessions
            .retain(|_, s| now.duration_since(s.last_seen) < SESSION_IDLE);
        let (rate, burst) = (
            f64::from(self.limits.rate),
            f64::from(self.limits.burst.max(1)),
        );
        self.buckets
            .retain(|_, b| b.tokens + rate * now.duration_since(b.at).as_secs_f64() < burst);
    }
}

/// Asks for the TTL (IPv4) or hop limit (IPv6) of each received packet.
fn set_recv_ttl(socket: &impl AsRawFd, v6: bool) -> io::Result<()> {
    if v6 {
        errqueue::enable(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT)
    } else {
        errqueue::enable(socket, libc::IPPROTO_IP, libc::IP_RECVTTL)
    }
}

/// One datagram without blocking: its length (truncated to `buf`), sender and TTL.
#[allow(unsafe_code)]
fn recv(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u8>)> {
    // u64s: aligned for the kernel's cmsghdr, read back as bytes.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr and sockaddr_storage are plain C structs for which all zeroes are
    // valid; the name, iovec and control buffers msghdr points to outlive the call and
    // their lengths are their sizes. The address is read as sockaddr_in/sockaddr_in6 only
    // when the kernel said that is its family, and sockaddr_storage is large and aligned
    // enough for both.
    unsafe {
        let mut name: libc::sockaddr_storage = std::mem::zeroed();
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 16]>() as _;
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let from = match i32::from(name.ss_family) {
            libc::AF_INET => {
                let a = &*(&name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let a = &*(&name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                ))
            }
            _ => return Err(io::Error::other("datagram from an unknown address family")),
        };
        let control_len = (msg.msg_controllen as usize).min(size_of::<[u64; 16]>());
        let bytes: Vec<u8> = control.iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok((n as usize, from, ttl_of(&bytes[..control_len])))
    }
}

/// The TTL (IP_TTL) or hop limit (IPV6_HOPLIMIT) control message's value.
fn ttl_of(control: &[u8]) -> Option<u8> {
    let header = size_of::<libc::cmsghdr>();
    let align = |len: usize| len.div_ceil(size_of::<usize>()) * size_of::<usize>();
    let len_size = {
        fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
            size_of::<F>()
        }
        size_of_field(|h: &libc::cmsghdr| &h.cmsg_len)
    };
    let uint = |b: &[u8], at: usize, size: usize| -> Option<usize> {
        let b = b.get(at..at + size)?;
        Some(match size {
            4 => u32::from_ne_bytes(b.try_into().ok()?) as usize,
            8 => u64::from_ne_bytes(b.try_into().ok()?) as usize,
            _ => return None,
        })
    };
    let mut rest = control;
    while rest.len() >= header {
        let len = uint(rest, offset_of!(libc::cmsghdr, cmsg_len), len_size)?;
        let level = uint(rest, offset_of!(libc::cmsghdr, cmsg_level), 4)? as i32;
        let kind = uint(rest, offset_of!(libc::cmsghdr, cmsg_type), 4)? as i32;
        if len < header || len > rest.len() {
            return None;
        }
        let ttl = (level == libc::IPPROTO_IP && kind == libc::IP_TTL)
            || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT);
        if ttl {
            let value = uint(rest, align(header), 4)?;
            return u8::try_from(value).ok();
        }
        rest = rest.get(align(len)..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflections_are_never_longer_and_sessions_count_on_their_own() {
        let mut state = State {
            limits: Limits::default(),
            sessions: HashMap::new(),
            buckets: HashMap::new(),
            counters: Counters::default(),
        };
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        let mut out = vec![0u8; MAX_PACKET];
        let mut sent = [0u8; 100];
        packet::write_sender(&mut sent, 9, 1234, 0x8001);
        assert_eq!(state.reflect(&sent[..43], a, Some(64), 1, &mut out), None);
        assert_eq!(state.reflect(&sent, a, Some(64), 1, &mut out), Some(100));
        let r = packet::read_reflector(&out).unwrap();
        assert_eq!(
            (r.seq, r.sender.seq, r.sender.timestamp, r.sender_ttl),
            (0, 9, 1234, 64)
        );
        assert_eq!(state.reflect(&sent[..44], a, None, 1, &mut out), Some(44));
        assert_eq!(packet::read_reflector(&out).unwrap().seq, 1);
        assert_eq!(state.reflect(&sent[..44], b, None, 1, &mut out), Some(44));
        assert_eq!(packet::read_reflector(&out).unwrap().seq, 0, "own session");
        assert_eq!(state.counters.dropped_short, 1);
    }

    #[test]
    fn the_longest_idle_sessions_are_evicted_when_full() {
        let mut state = State {
            limits: Limits {
                max_sessions: 16,
                rate: 1_000_000,
                burst: 1_000_000,
            },
            sessions: HashMap::new(),
            buckets: HashMap::new(),
            counters: Counters::default(),
        };
        let mut out = vec![0u8; 64];
        let mut sent = [0u8; 44];
        packet::write_sender(&mut sent, 0, 1, 1);
        let addr = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
        for port in 0..16 {
            state.reflect(&sent, addr(port), None, 1, &mut out);
        }
        // Port 0 is used again: now port 1 is the longest idle.
        state.reflect(&sent, addr(0), None, 1, &mut out);
        state.reflect(&sent, addr(100), None, 1, &mut out);
        assert!(state.sessions.len() <= 16);
        assert_eq!(state.counters.sessions_evicted, 2);
        assert!(state.sessions.contains_key(&addr(0)) && state.sessions.contains_key(&addr(100)));
        assert!(!state.sessions.contains_key(&addr(1)) && !state.sessions.contains_key(&addr(2)));
        assert_eq!(state.sessions[&addr(0)].next_seq, 2);
        // Idle sessions expire.
        state.expire(Instant::now() + SESSION_IDLE);
        assert!(state.sessions.is_empty());
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut state = State {
            limits: Limits {
                max_sessions: 4,
                rate: 10,
                burst: 5,
            },
            sessions: HashMap::new(),
            buckets: HashMap::new(),
            counters: Counters::default(),
        };
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let now = Instant::now();
        let admitted = (0..20).filter(|_| state.admit(ip, now)).count();
        assert_eq!(admitted, 5);
        assert!(state.admit(ip, now + Duration::from_millis(100)));
        assert!(!state.admit(ip, now + Duration::from_millis(100)));
    }
}
