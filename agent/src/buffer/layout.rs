//! The buffer's keys and value encoding (module doc of `buffer`: layout).

use std::time::{SystemTime, UNIX_EPOCH};

pub(super) const RESULTS_START: &[u8] = b"r";
pub(super) const RESULTS_END: &[u8] = b"s";
pub(super) const NEXT_SEQ: &[u8] = b"m:next_seq";
pub(super) const BYTES: &[u8] = b"m:bytes";
pub(super) const COUNT: &[u8] = b"m:count";
pub(super) const DROPPED: &[u8] = b"m:dropped";
pub(super) const ACKED: &[u8] = b"m:acked";
pub(super) const QUARANTINED: &[u8] = b"m:quarantined";
pub(super) const INCARNATION: &[u8] = b"m:incarnation";
pub(super) const RENUMBER: &[u8] = b"m:renumber";
/// Bytes of bookkeeping per stored result counted against the cap (key + timestamp).
pub(super) const OVERHEAD: u64 = 9 + 8;

pub(super) fn key_seq(key: &[u8]) -> u64 {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Bytes a stored value counts against the cap.
pub(super) fn stored_size(value: &[u8]) -> u64 {
    (value.len() as u64).saturating_sub(8) + OVERHEAD
}

pub(super) fn result_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'r';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, sled::Error> {
    Ok(tree
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

pub(super) fn decode_entry_time(value: &[u8]) -> i64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0) as i64
}

pub(super) fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
