//! STAMP packets in unauthenticated mode (RFC 8762), shared by the Session-Sender (the
//! `stamp` probe, the speed test's loaded-loss stream) and the Session-Reflector of
//! `serve-target` (`target::reflector`).
//!
//! Session-Sender test packet, RFC 8762 section 4.2.1 (44 bytes, then zero padding up to
//! the packet size):
//!
//! ```text
//!  0: Sequence Number (4)   4: Timestamp (8, NTP)   12: Error Estimate (2)   14: MBZ (30)
//! ```
//!
//! Session-Reflector test packet, RFC 8762 section 4.3.1 (44 bytes, as long as the
//! packet it answers):
//!
//! ```text
//!  0: Sequence Number (4)  4: Timestamp (8, T3)  12: Error Estimate (2)  14: MBZ (2)
//! 16: Receive Timestamp (8, T2)  24: Session-Sender Sequence Number (4)
//! 28: Session-Sender Timestamp (8, T1)  36: Session-Sender Error Estimate (2)  38: MBZ (2)
//! 40: Ses-Sender TTL (1)  41: MBZ (3)
//! ```
//!
//! Timestamps are NTP's 64-bit format (RFC 5905 section 6: seconds since 1900 and a 32-bit
//! fraction). The error estimate is RFC 4656 section 4.1.2's: S (synchronised) | Z (0:
//! NTP format) | Scale (6 bits) | Multiplier (8 bits), error = Multiplier * 2^(Scale-32) s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Both packets' length without padding.
pub const BASE_LEN: usize = 44;
/// Seconds from 1900 (NTP's era 0) to 1970 (Unix).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// The NTP 64-bit timestamp of a wall-clock time.
pub fn ntp(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs().wrapping_add(NTP_UNIX_OFFSET);
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// The NTP timestamp of now.
pub fn ntp_now() -> u64 {
    ntp(SystemTime::now())
}

/// A duration in NTP units (2^-32 s).
pub fn ntp_duration(d: Duration) -> u64 {
    (d.as_secs() << 32) + ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// `a - b` in seconds, signed (timestamps of two clocks may be either way round).
pub fn ntp_diff(a: u64, b: u64) -> f64 {
    a.wrapping_sub(b) as i64 as f64 / 4_294_967_296.0
}

/// An RFC 4656 error estimate: `synchronised` is the S bit, `error` rounded up to the
/// next representable value (the multiplier is never 0).
pub fn error_estimate(synchronised: bool, error: Duration) -> u16 {
    let units = error.as_secs_f64() * 4_294_967_296.0;
    let mut scale = 0u16;
    while scale < 63 && (units / 2f64.powi(i32::from(scale))).ceil() > 255.0 {
        scale += 1;
    }
    let multiplier = (units / 2f64.powi(i32::from(scale))).ceil();
    let multiplier = (multiplier as u16).clamp(1, 255);
    (u16::from(synchronised) << 15) | (scale << 8) | multiplier
}

/// The S bit of an error estimate: the clock that took the timestamp was synchronised.
pub fn synchronised(estimate: u16) -> bool {
    estimate & 0x8000 != 0
}

/// The error an estimate states.
pub fn error_of(estimate: u16) -> Duration {
    let scale = i32::from((estimate >> 8) & 0x3f);
    let multiplier = f64::from(estimate & 0xff);
    Duration::from_secs_f64(multiplier * 2f64.powi(scale - 32))
}

/// The error estimate of this host's clock now, from the kernel (adjtimex): S set when
/// the kernel says it is synchronised, the estimated error an NTP daemon set (at least
/// 1 µs), or the maximum error when unsynchronised.
pub fn local_error_estimate() -> u16 {
    let status = crate::clock::kernel_time_status();
    let error = if status.synchronised {
        status.estimated_error
    } else {
        status.maximum_error
    };
    error_estimate(status.synchronised, error.max(Duration::from_micros(1)))
}

/// Writes a Session-Sender test packet into `buf` (at least `BASE_LEN` bytes; the rest is
/// zeroed: MBZ and padding).
pub fn write_sender(buf: &mut [u8], seq: u32, timestamp: u64, estimate: u16) {
    buf.fill(0);
    buf[0..4].copy_from_slice(&seq.to_be_bytes());
    buf[4..12].copy_from_slice(&timestamp.to_be_bytes());
    buf[12..14].copy_from_slice(&estimate.to_be_bytes());
}

/// A Session-Sender test packet as a reflector reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SenderPacket {
    pub seq: u32,
    pub timestamp: u64,
    pub estimate: u16,
}

pub fn read_sender(buf: &[u8]) -> Option<SenderPacket> {
    let b = buf.get(..BASE_LEN)?;
    Some(SenderPacket {
        seq: u32::from_be_bytes(b[0..4].try_into().ok()?),
        timestamp: u64::from_be_bytes(b[4..12].try_into().ok()?),
        estimate: u16::from_be_bytes(b[12..14].try_into().ok()?),
    })
}

/// A Session-Reflector test packet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReflectorPacket {
    pub seq: u32,
    /// T3: when the reflector sent it.
    pub timestamp: u64,
    pub estimate: u16,
    /// T2: when the reflector received the sender's packet.
    pub receive_timestamp: u64,
    pub sender: SenderPacket,
    /// The TTL (hop limit) the sender's packet arrived with.
    pub sender_ttl: u8,
}

/// Writes a reflector packet into `buf` (at least `BASE_LEN` bytes; the rest zeroed).
pub fn write_reflector(buf: &mut [u8], p: &ReflectorPacket) {
    buf.fill(0);
    buf[0..4].copy_from_slice(&p.seq.to_be_bytes());
    buf[4..12].copy_from_slice(&p.timestamp.to_be_bytes());
    buf[12..14].copy_from_slice(&p.estimate.to_be_bytes());
    buf[16..24].copy_from_slice(&p.receive_timestamp.to_be_bytes());
    buf[24..28].copy_from_slice(&p.sender.seq.to_be_bytes());
    buf[28..36].copy_from_slice(&p.sender.timestamp.to_be_bytes());
    buf[36..38].copy_from_slice(&p.sender.estimate.to_be_bytes());
    buf[40] = p.sender_ttl;
}

/// Writes T3 (the reflector's send time) into a reflector packet written before.
pub fn write_t3(buf: &mut [u8], timestamp: u64) {
    buf[4..12].copy_from_slice(&timestamp.to_be_bytes());
}

pub fn read_reflector(buf: &[u8]) -> Option<ReflectorPacket> {
    let b = buf.get(..BASE_LEN)?;
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    Some(ReflectorPacket {
        seq: u32_at(0),
        timestamp: u64_at(4),
        estimate: u16_at(12),
        receive_timestamp: u64_at(16),
        sender: SenderPacket {
            seq: u32_at(24),
            timestamp: u64_at(28),
            estimate: u16_at(36),
        },
        sender_ttl: b[40],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntp_timestamps() {
        // 1970-01-01 is 2208988800 s after 1900-01-01 (RFC 868).
        assert_eq!(ntp(UNIX_EPOCH), 2_208_988_800u64 << 32);
        let t = UNIX_EPOCH + Duration::from_millis(1500);
        assert_eq!(ntp(t), ((2_208_988_801u64) << 32) | (1u64 << 31));
        let a = ntp(t + Duration::from_micros(250));
        assert!((ntp_diff(a, ntp(t)) - 250e-6).abs() < 1e-9);
        assert!((ntp_diff(ntp(t), a) + 250e-6).abs() < 1e-9);
        assert_eq!(ntp_duration(Duration::from_millis(500)), 1u64 << 31);
    }

    #[test]
    fn error_estimates() {
        let e = error_estimate(true, Duration::from_micros(1));
        assert!(synchronised(e));
        assert_eq!(e & 0x4000, 0, "Z is 0: NTP format");
        assert!(error_of(e) >= Duration::from_micros(1));
        assert!(error_of(e) < Duration::from_nanos(1010));
        let e = error_estimate(false, Duration::from_secs(16));
        assert!(!synchronised(e));
        let back = error_of(e).as_secs_f64();
        assert!((16.0..16.0 * 1.01).contains(&back), "{back}");
        // The multiplier is never 0 (RFC 4656 section 4.1.2).
        assert_ne!(error_estimate(true, Duration::ZERO) & 0xff, 0);
    }

    #[test]
    fn packets_round_trip() {
        let mut buf = [0xffu8; 60];
        write_sender(&mut buf, 7, 0x0102_0304_0506_0708, 0x8001);
        assert_eq!(&buf[0..4], &[0, 0, 0, 7]);
        assert_eq!(&buf[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[12..14], &[0x80, 0x01]);
        assert!(buf[14..].iter().all(|b| *b == 0));
        let sender = read_sender(&buf).unwrap();
        let p = ReflectorPacket {
            seq: 3,
            timestamp: 11,
            estimate: 0x0102,
            receive_timestamp: 10,
            sender,
            sender_ttl: 63,
        };
        let mut out = [0xffu8; 60];
        write_reflector(&mut out, &p);
        assert_eq!(out[40], 63);
        assert!(out[14..16]
            .iter()
            .chain(&out[38..40])
            .chain(&out[41..])
            .all(|b| *b == 0));
        assert_eq!(read_reflector(&out), Some(p));
        assert_eq!(read_reflector(&out[..43]), None);
    }
}
