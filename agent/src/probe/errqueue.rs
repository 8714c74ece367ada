//! The error queue of a datagram socket (IP_RECVERR, IPV6_RECVERR): the ICMP errors
//! about what the socket sent, with the router that sent them (`SO_EE_OFFENDER`), as
//! tracepath reads them. Shared by the icmp probe (ping sockets, which without it drop
//! the errors about their requests) and the path probe (ping sockets and unprivileged
//! UDP: time-exceeded from each router, port-unreachable from the destination).
//!
//! Unsafe code: `set_recverr` (setsockopt with a `c_int`) and `read` (recvmsg with
//! MSG_ERRQUEUE into buffers we own); neither socket2 nor rustix wraps them.

use std::io;
use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

/// `sock_extended_err.ee_origin` of an ICMP (ICMPv6) error.
const ORIGIN_ICMP: u8 = 2;
const ORIGIN_ICMP6: u8 = 3;
/// Destination unreachable (RFC 792; RFC 4443 for ICMPv6).
const UNREACHABLE_V4: u8 = 3;
const UNREACHABLE_V6: u8 = 1;

/// What a `sock_extended_err` says: the ICMP type and code (when the network sent the
/// error) and who sent it.
pub type Extended = (Option<(u8, u8)>, Option<IpAddr>);

/// One ICMP error from the queue.
#[derive(Debug, PartialEq)]
pub struct Queued {
    /// What the error quotes of the datagram it is about, from the transport payload on
    /// (a ping socket: the ICMP header and data as sent; a UDP socket: the UDP payload).
    pub request: Vec<u8>,
    /// The ICMP (ICMPv6) type and code when the error came from the network; `None` for
    /// the kernel's own errors.
    pub icmp: Option<(u8, u8)>,
    /// Who sent the error (`SO_EE_OFFENDER`).
    pub offender: Option<IpAddr>,
}

impl Queued {
    /// The code of a destination-unreachable; `None` for other errors.
    pub fn unreachable(&self, v6: bool) -> Option<u8> {
        let unreachable = if v6 { UNREACHABLE_V6 } else { UNREACHABLE_V4 };
        match self.icmp {
            Some((kind, code)) if kind == unreachable => Some(code),
            _ => None,
        }
    }
}

pub fn set_recverr(socket: &impl AsRawFd, v6: bool) -> io::Result<()> {
    if v6 {
        enable(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        enable(socket, libc::IPPROTO_IP, libc::IP_RECVERR)
    }
}

/// Turns on an int socket option (`level`, `name`) that socket2 has no setter for: the
/// error queue here, the received TTL in the STAMP reflector.
#[allow(unsafe_code)]
pub fn enable(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is open (borrowed from `socket`) and the option value is
    // a live c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes one error from the queue without blocking; `None` when it is empty.
#[allow(unsafe_code)]
pub fn read(socket: &impl AsRawFd, v6: bool) -> Option<Queued> {
    let mut data = [0u8; 2048];
    // u64s: aligned for the kernel's cmsghdr, read back as bytes.
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all zeroes is valid (no name, no
    // buffers); the iovec and control buffer it then points to outlive the call, and
    // their lengths are the buffers' sizes.
    let (n, control_len) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 64]>() as _;
        let n = libc::recvmsg(
            socket.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        );
        (n, msg.msg_controllen as usize)
    };
    let n = usize::try_from(n).ok()?;
    let control: Vec<u8> = control.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let control = control.get(..control_len)?;
    let (icmp, offender) = extended_error(control, v6)?;
    Some(Queued {
        request: data[..n.min(data.len())].to_vec(),
        icmp,
        offender,
    })
}

/// The `sock_extended_err` in the control messages: the ICMP type and code (if the
/// network sent it) and the offender's address.
pub fn extended_error(control: &[u8], v6: bool) -> Option<Extended> {
    let (level, kind) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::SOL_IP, libc::IP_RECVERR)
    };
    let header = size_of::<libc::cmsghdr>();
    let align = |len: usize| len.div_ceil(size_of::<usize>()) * size_of::<usize>();
    let mut rest = control;
    while rest.len() >= header {
        let len = uint(rest, offset_of!(libc::cmsghdr, cmsg_len), cmsg_len_size())?;
        let cmsg_level = uint(rest, offset_of!(libc::cmsghdr, cmsg_level), 4)? as i32;
        let cmsg_type = uint(rest, offset_of!(libc::cmsghdr, cmsg_type), 4)? as i32;
        if len < header || len > rest.len() {
            return None;
        }
        if cmsg_level == level && cmsg_type == kind {
            return Some(sock_extended_err(&rest[align(header)..len], v6));
        }
        rest = rest.get(align(len)..)?;
    }
    None
}

/// `struct sock_extended_err` (errno u32, origin, type, code, pad, info u32, data u32)
/// followed by the offender's `sockaddr_in`/`sockaddr_in6`.
fn sock_extended_err(ee: &[u8], v6: bool) -> Extended {
    let (origin, kind, code) = match ee.get(4..7) {
        Some(&[origin, kind, code]) => (origin, kind, code),
        _ => return (None, None),
    };
    let icmp = match (origin, v6) {
        (ORIGIN_ICMP, false) | (ORIGIN_ICMP6, true) => Some((kind, code)),
        _ => None,
    };
    let offender = ee.get(16..).and_then(|sa| {
        let family = i32::from(u16::from_ne_bytes([*sa.first()?, *sa.get(1)?]));
        if family == libc::AF_INET {
            let octets: [u8; 4] = sa.get(4..8)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        } else if family == libc::AF_INET6 {
            let octets: [u8; 16] = sa.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        } else {
            None
        }
    });
    (icmp, offender)
}

/// The size of `cmsg_len`: size_t with glibc, socklen_t with musl.
fn cmsg_len_size() -> usize {
    fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
        size_of::<F>()
    }
    size_of_field(|h: &libc::cmsghdr| &h.cmsg_len)
}

/// A native-endian unsigned integer of `size` bytes at `at`.
fn uint(bytes: &[u8], at: usize, size: usize) -> Option<usize> {
    let b = bytes.get(at..at + size)?;
    Some(match size {
        4 => u32::from_ne_bytes(b.try_into().ok()?) as usize,
        8 => u64::from_ne_bytes(b.try_into().ok()?) as usize,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control buffer holding one IP_RECVERR message: errno 113, origin ICMP, the given
    /// type and code, offender 10.77.0.2.
    fn control(kind: u8, code: u8) -> Vec<u8> {
        let header = size_of::<libc::cmsghdr>();
        let mut control = Vec::new();
        let len = header + 16 + 16;
        if header == 16 {
            control.extend_from_slice(&(len as u64).to_ne_bytes());
        } else {
            control.extend_from_slice(&(len as u32).to_ne_bytes());
        }
        control.extend_from_slice(&libc::SOL_IP.to_ne_bytes());
        control.extend_from_slice(&libc::IP_RECVERR.to_ne_bytes());
        control.resize(header, 0);
        // errno, origin ICMP, type, code, pad, info, data.
        control.extend_from_slice(&113u32.to_ne_bytes());
        control.extend_from_slice(&[ORIGIN_ICMP, kind, code, 0]);
        control.extend_from_slice(&[0; 8]);
        control.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        control.extend_from_slice(&[0, 0, 10, 77, 0, 2]);
        control.extend_from_slice(&[0; 8]);
        control
    }

    #[test]
    fn queued_unreachable_names_the_router() {
        let control = control(UNREACHABLE_V4, 1);
        let router = Some("10.77.0.2".parse().unwrap());
        assert_eq!(
            extended_error(&control, false),
            Some((Some((UNREACHABLE_V4, 1)), router))
        );
        assert_eq!(extended_error(&control, true), None, "v6 level");
        let header = size_of::<libc::cmsghdr>();
        assert_eq!(
            extended_error(&control[..header + 3], false),
            None,
            "cut short"
        );
        let queued = Queued {
            request: Vec::new(),
            icmp: Some((UNREACHABLE_V4, 1)),
            offender: router,
        };
        assert_eq!(queued.unreachable(false), Some(1));
    }

    #[test]
    fn queued_time_exceeded_is_not_unreachable() {
        let (icmp, offender) = extended_error(&control(11, 0), false).unwrap();
        assert_eq!(icmp, Some((11, 0)));
        let queued = Queued {
            request: Vec::new(),
            icmp,
            offender,
        };
        assert_eq!(queued.unreachable(false), None);
    }
}
