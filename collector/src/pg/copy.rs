//! PostgreSQL's binary COPY format for result rows, written straight into byte buffers.
//!
//! The store's hot path: every committed result passes through `Encoder::row` once.
//! Writing the format by hand costs a few appends per column, where the generic
//! `ToSql` route dispatches dynamically per value and renders the labels' JSON per row;
//! here a batch's shared labels are rendered once (`domain::Labels`).
//!
//! Invariants: the column list in `COPY_SQL` and the order of the fields in `row` are the
//! same (76 columns, checked by a test); values are already validated by `domain.rs`
//! (no NUL in text), so encoding cannot fail. Whether PostgreSQL accepts them (the
//! server's encoding, constraints) is the store's concern, row by row if need be.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::domain::ResultRow;

pub const COPY_SQL: &str = "COPY results (agent_id, seq, test, kind, target, started_at, duration_seconds, \
    success, error_class, error_message, labels, \
    download_bits_per_second, upload_bits_per_second, idle_latency_seconds, jitter_seconds, \
    download_loaded_latency_seconds, upload_loaded_latency_seconds, bytes_downloaded, bytes_uploaded, \
    sent, received, loss_ratio, rtt_min_seconds, rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds, \
    connect_seconds, tls_seconds, status_code, dns_seconds, ttfb_seconds, transfer_seconds, body_bytes, \
    tls_cert_expiry_seconds, resolve_seconds, answers, rcode, \
    incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at, \
    on_demand, run_id, \
    reached, hop_count, path_id, path_changed, path_loss_ratio, path_protocol, hops, \
    responsiveness_rpm, download_responsiveness_rpm, upload_responsiveness_rpm, \
    loaded_latency_seconds, load_connections, stable, rating, \
    forward_lost, reverse_lost, forward_loss_ratio, reverse_loss_ratio, duplicates, reordered, \
    forward_delay_min_seconds, forward_delay_avg_seconds, forward_delay_max_seconds, \
    reverse_delay_min_seconds, reverse_delay_avg_seconds, reverse_delay_max_seconds, mos, \
    download_loaded_loss_ratio, upload_loaded_loss_ratio, \
    ip_family, local_address, interface) \
    FROM STDIN (FORMAT binary)";

const COLUMNS: i16 = 76;
/// Bytes handed to the connection at a time.
const CHUNK: usize = 256 * 1024;
/// PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
const PG_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

/// Builds one COPY stream: a header, rows, a trailer, cut into chunks of about `CHUNK`.
pub struct Encoder {
    buf: BytesMut,
}

impl Encoder {
    pub fn new() -> Encoder {
        let mut buf = BytesMut::with_capacity(CHUNK + 4096);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        Encoder { buf }
    }

    /// Appends a row with its `path_changed` (decided by the store, NULL for other
    /// kinds); returns a full chunk to send when one is ready.
    pub fn row(&mut self, r: &ResultRow, path_changed: Option<bool>) -> Option<Bytes> {
        let b = &mut self.buf;
        let m = &r.measures;
        b.put_i16(COLUMNS);
        text(b, Some(&r.agent_id));
        int8(b, Some(r.seq));
        text(b, Some(&r.test));
        text(b, Some(r.kind.name()));
        text(b, Some(&r.target));
        timestamptz(b, Some(r.started_at));
        float8(b, Some(r.duration_seconds));
        boolean(b, r.success);
        text(b, r.error_class.as_deref());
        text(b, r.error_message.as_deref());
        jsonb(b, Some(r.labels.json()));
        // speed
        float8(b, m.download_bits_per_second);
        float8(b, m.upload_bits_per_second);
        float8(b, m.idle_latency_seconds);
        float8(b, m.jitter_seconds);
        float8(b, m.download_loaded_latency_seconds);
        float8(b, m.upload_loaded_latency_seconds);
        int8(b, m.bytes_downloaded);
        int8(b, m.bytes_uploaded);
        // icmp
        int4(b, m.sent);
        int4(b, m.received);
        float8(b, m.loss_ratio);
        float8(b, m.rtt_min_seconds);
        float8(b, m.rtt_avg_seconds);
        float8(b, m.rtt_max_seconds);
        float8(b, m.rtt_mdev_seconds);
        // tcp, http
        float8(b, m.connect_seconds);
        float8(b, m.tls_seconds);
        int4(b, m.status_code);
        float8(b, m.dns_seconds);
        float8(b, m.ttfb_seconds);
        float8(b, m.transfer_seconds);
        int8(b, m.body_bytes);
        float8(b, m.tls_cert_expiry_seconds);
        // dns
        float8(b, m.resolve_seconds);
        int4(b, m.answers);
        text(b, m.rcode.as_deref());
        // time model, truncation
        text(b, Some(&r.incarnation));
        boolean(b, r.clock_unsynced);
        boolean(b, r.clock_corrected);
        boolean(b, r.error_truncated);
        timestamptz(b, r.reported_started_at);
        // run-now
        boolean(b, r.run_id.is_some());
        int8(b, r.run_id);
        // path
        match m.reached {
            Some(v) => boolean(b, v),
            None => b.put_i32(NULL),
        }
        int4(b, m.hop_count);
        text(b, m.path_id.as_deref());
        match path_changed {
            Some(v) => boolean(b, v),
            None => b.put_i32(NULL),
        }
        float8(b, m.path_loss_ratio);
        text(b, m.path_protocol.as_deref());
        // A `json` column: its binary format is the text.
        text(b, m.hops.as_deref());
        // responsiveness
        float8(b, m.responsiveness_rpm);
        float8(b, m.download_responsiveness_rpm);
        float8(b, m.upload_responsiveness_rpm);
        float8(b, m.loaded_latency_seconds);
        int4(b, m.load_connections);
        match m.stable {
            Some(v) => boolean(b, v),
            None => b.put_i32(NULL),
        }
        text(b, m.rating.as_deref());
        // stamp, and the speed test's loaded loss
        int4(b, m.forward_lost);
        int4(b, m.reverse_lost);
        float8(b, m.forward_loss_ratio);
        float8(b, m.reverse_loss_ratio);
        int4(b, m.duplicates);
        int4(b, m.reordered);
        float8(b, m.forward_delay_min_seconds);
        float8(b, m.forward_delay_avg_seconds);
        float8(b, m.forward_delay_max_seconds);
        float8(b, m.reverse_delay_min_seconds);
        float8(b, m.reverse_delay_avg_seconds);
        float8(b, m.reverse_delay_max_seconds);
        float8(b, m.mos);
        float8(b, m.download_loaded_loss_ratio);
        float8(b, m.upload_loaded_loss_ratio);
        // the link (schema 9)
        text(b, r.link.ip_family.map(|f| f.name()));
        text(b, r.link.local_address.as_deref());
        text(b, r.link.interface.as_deref());
        (b.len() >= CHUNK).then(|| b.split().freeze())
    }

    /// The trailer and whatever is left: the last chunk of the stream.
    pub fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

const NULL: i32 = -1;

fn text(b: &mut BytesMut, v: Option<&str>) {
    match v {
        Some(s) => {
            b.put_i32(s.len() as i32);
            b.put_slice(s.as_bytes());
        }
        None => b.put_i32(NULL),
    }
}

/// jsonb's binary format: a version byte, then the JSON text.
fn jsonb(b: &mut BytesMut, v: Option<&str>) {
    match v {
        Some(json) => {
            b.put_i32(json.len() as i32 + 1);
            b.put_u8(1);
            b.put_slice(json.as_bytes());
        }
        None => b.put_i32(NULL),
    }
}

fn boolean(b: &mut BytesMut, v: bool) {
    b.put_i32(1);
    b.put_u8(v as u8);
}

fn timestamptz(b: &mut BytesMut, v: Option<SystemTime>) {
    match v {
        Some(t) => {
            b.put_i32(8);
            b.put_i64(pg_micros(t));
        }
        None => b.put_i32(NULL),
    }
}

fn int4(b: &mut BytesMut, v: Option<i32>) {
    match v {
        Some(x) => {
            b.put_i32(4);
            b.put_i32(x);
        }
        None => b.put_i32(NULL),
    }
}

fn int8(b: &mut BytesMut, v: Option<i64>) {
    match v {
        Some(x) => {
            b.put_i32(8);
            b.put_i64(x);
        }
        None => b.put_i32(NULL),
    }
}

fn float8(b: &mut BytesMut, v: Option<f64>) {
    match v {
        Some(x) => {
            b.put_i32(8);
            b.put_f64(x);
        }
        None => b.put_i32(NULL),
    }
}

/// Microseconds since PostgreSQL's epoch, truncated like `postgres-types` does.
fn pg_micros(t: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECONDS);
    match t.duration_since(epoch) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{IpFamily, Kind, Labels, Link, Measures};
    use std::sync::Arc;

    fn row() -> ResultRow {
        ResultRow {
            agent_id: "a1".into(),
            incarnation: Arc::from("c0ffee"),
            seq: 7,
            test: "web".into(),
            kind: Kind::Http,
            target: "http://x/".into(),
            started_at: UNIX_EPOCH + Duration::from_micros(1_790_000_000_123_456),
            reported_started_at: Some(UNIX_EPOCH),
            duration_seconds: 0.25,
            success: true,
            error_class: None,
            error_message: None,
            labels: Arc::new(Labels::new([("site".into(), "b\"x".into())].into())),
            measures: Measures {
                status_code: Some(200),
                ..Default::default()
            },
            clock_unsynced: true,
            clock_corrected: false,
            error_truncated: true,
            run_id: Some(9),
            link: Link::default(),
        }
    }

    #[test]
    fn column_list_matches_the_row() {
        let listed = COPY_SQL
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(cols, _)| cols.split(',').count())
            .unwrap();
        assert_eq!(listed, COLUMNS as usize);
    }

    #[test]
    fn encodes_header_row_and_trailer() {
        let mut e = Encoder::new();
        assert!(e.row(&row(), None).is_none());
        let out = e.finish();
        assert_eq!(&out[..11], b"PGCOPY\n\xff\r\n\0");
        let body = &out[19..];
        assert_eq!(&body[..2], &COLUMNS.to_be_bytes());
        // agent_id: length 2, "a1"; seq: length 8, 7.
        assert_eq!(&body[2..8], b"\0\0\0\x02a1");
        assert_eq!(&body[8..20], b"\0\0\0\x08\0\0\0\0\0\0\0\x07");
        assert_eq!(&out[out.len() - 2..], &(-1i16).to_be_bytes());
        // 2026-09-21 ... in microseconds from 2000-01-01.
        let ts = (1_790_000_000_123_456i64) - 946_684_800 * 1_000_000;
        let at = out
            .windows(8)
            .position(|w| w == ts.to_be_bytes())
            .expect("timestamp present");
        assert_eq!(&out[at - 4..at], &8i32.to_be_bytes());
        let json = br#"{"site":"b\"x"}"#;
        let j = out.windows(json.len()).position(|w| w == json).unwrap();
        assert_eq!(out[j - 1], 1, "jsonb version byte");
    }

    #[test]
    fn a_row_has_exactly_the_listed_columns() {
        let mut e = Encoder::new();
        e.row(&row(), None);
        let mut path = row();
        path.kind = Kind::Path;
        path.measures = Measures {
            reached: Some(true),
            hop_count: Some(2),
            path_id: Some("ab12".into()),
            path_loss_ratio: Some(0.25),
            path_protocol: Some("udp".into()),
            hops: Some("[[1]]".into()),
            ..Default::default()
        };
        e.row(&path, Some(true));
        let mut resp = row();
        resp.kind = Kind::Responsiveness;
        resp.measures = Measures {
            responsiveness_rpm: Some(412.0),
            download_responsiveness_rpm: Some(380.0),
            upload_responsiveness_rpm: Some(444.0),
            loaded_latency_seconds: Some(0.125),
            load_connections: Some(6),
            stable: Some(false),
            rating: Some("fair".into()),
            ..Default::default()
        };
        e.row(&resp, None);
        let mut stamp = row();
        stamp.kind = Kind::Stamp;
        stamp.measures = Measures {
            sent: Some(100),
            received: Some(95),
            forward_lost: Some(3),
            reverse_lost: Some(2),
            forward_loss_ratio: Some(0.03),
            reverse_loss_ratio: Some(2.0 / 97.0),
            duplicates: Some(1),
            reordered: Some(4),
            forward_delay_min_seconds: Some(0.001),
            forward_delay_avg_seconds: Some(0.002),
            forward_delay_max_seconds: Some(0.003),
            reverse_delay_min_seconds: Some(-0.0001),
            reverse_delay_avg_seconds: Some(0.0005),
            reverse_delay_max_seconds: Some(0.0009),
            mos: Some(4.2),
            ..Default::default()
        };
        e.row(&stamp, None);
        let mut speed = row();
        speed.kind = Kind::Speed;
        speed.measures = Measures {
            download_loaded_loss_ratio: Some(0.01),
            upload_loaded_loss_ratio: Some(0.5),
            ..Default::default()
        };
        e.row(&speed, None);
        let mut linked = row();
        linked.link = Link {
            ip_family: Some(IpFamily::Ipv6),
            local_address: Some("2001:db8::10".into()),
            interface: Some("wwan0".into()),
        };
        e.row(&linked, None);
        let out = e.finish();
        let mut at = 19; // signature, flags, header extension length
        let i16_at = |at: usize| i16::from_be_bytes([out[at], out[at + 1]]);
        let mut rows: Vec<Vec<Option<&[u8]>>> = Vec::new();
        for _ in 0..6 {
            assert_eq!(i16_at(at), COLUMNS);
            at += 2;
            let mut columns: Vec<Option<&[u8]>> = Vec::new();
            for _ in 0..COLUMNS {
                let len = i32::from_be_bytes(out[at..at + 4].try_into().unwrap());
                at += 4;
                columns.push((len >= 0).then(|| &out[at..at + len as usize]));
                at += len.max(0) as usize;
            }
            rows.push(columns);
        }
        assert_eq!(i16_at(at), -1, "the trailer follows the last column");
        assert_eq!(at + 2, out.len());
        let (columns, path, resp) = (&rows[0], &rows[1], &rows[2]);
        let (stamp, speed, linked) = (&rows[3], &rows[4], &rows[5]);
        // The columns of schema 8, last in the list and in the row: NULL for other kinds.
        let f = |v: f64| Some(v.to_be_bytes().to_vec());
        let i = |v: i32| Some(v.to_be_bytes().to_vec());
        let owned = |r: &[Option<&[u8]>]| -> Vec<Option<Vec<u8>>> {
            r.iter().map(|c| c.map(<[u8]>::to_vec)).collect()
        };
        // The columns of schema 9, last: the link, NULL where the agent sent none.
        let m = COLUMNS as usize;
        for r in &rows[..5] {
            assert_eq!(r[m - 3..], [None; 3]);
        }
        let link_tail: [Option<&[u8]>; 3] = [Some(b"ipv6"), Some(b"2001:db8::10"), Some(b"wwan0")];
        assert_eq!(linked[m - 3..], link_tail);
        assert_eq!(linked[..m - 3], columns[..m - 3]);
        let m = m - 3;
        assert_eq!(columns[m - 15..m], [None; 15]);
        assert_eq!(resp[m - 15..m], [None; 15]);
        let stamp_tail = vec![
            i(3),
            i(2),
            f(0.03),
            f(2.0 / 97.0),
            i(1),
            i(4),
            f(0.001),
            f(0.002),
            f(0.003),
            f(-0.0001),
            f(0.0005),
            f(0.0009),
            f(4.2),
            None,
            None,
        ];
        assert_eq!(owned(&stamp[m - 15..m]), stamp_tail);
        // sent and received are icmp's columns.
        assert_eq!(owned(&stamp[19..21]), vec![i(100), i(95)]);
        let mut speed_tail = vec![None; 13];
        speed_tail.extend([f(0.01), f(0.5)]);
        assert_eq!(owned(&speed[m - 15..m]), speed_tail);
        let n = m - 15;
        // The columns of schema 7, last in the list and in the row: NULL for other kinds.
        assert_eq!(columns[n - 7..n], [None; 7]);
        assert_eq!(path[n - 7..n], [None; 7]);
        let resp_tail: [Option<&[u8]>; 7] = [
            Some(&412.0f64.to_be_bytes()),
            Some(&380.0f64.to_be_bytes()),
            Some(&444.0f64.to_be_bytes()),
            Some(&0.125f64.to_be_bytes()),
            Some(&6i32.to_be_bytes()),
            Some(&[0]),
            Some(b"fair"),
        ];
        assert_eq!(resp[n - 7..n], resp_tail);
        // The columns of schema 5, before them: NULL for other kinds.
        assert_eq!(columns[n - 14..n - 7], [None; 7]);
        assert_eq!(resp[n - 14..n - 7], [None; 7]);
        let path_tail: [Option<&[u8]>; 7] = [
            Some(&[1]),
            Some(&2i32.to_be_bytes()),
            Some(b"ab12"),
            Some(&[1]),
            Some(&0.25f64.to_be_bytes()),
            Some(b"udp"),
            Some(b"[[1]]"),
        ];
        assert_eq!(path[n - 14..n - 7], path_tail);
        // The columns added by schemas 3 and 4, before them.
        let epoch_micros = -(PG_EPOCH_UNIX_SECONDS as i64) * 1_000_000;
        let tail: [Option<&[u8]>; 7] = [
            Some(b"c0ffee"),
            Some(&[1]),
            Some(&[0]),
            Some(&[1]),
            Some(&epoch_micros.to_be_bytes()),
            Some(&[1]),
            Some(&9i64.to_be_bytes()),
        ];
        assert_eq!(columns[n - 21..n - 14], tail);
        assert!(COPY_SQL.contains(
            "rcode, incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at, \
    on_demand, run_id, \
    reached, hop_count, path_id, path_changed, path_loss_ratio, path_protocol, hops, \
    responsiveness_rpm, download_responsiveness_rpm, upload_responsiveness_rpm, \
    loaded_latency_seconds, load_connections, stable, rating, \
    forward_lost, reverse_lost, forward_loss_ratio, reverse_loss_ratio, duplicates, reordered, \
    forward_delay_min_seconds, forward_delay_avg_seconds, forward_delay_max_seconds, \
    reverse_delay_min_seconds, reverse_delay_avg_seconds, reverse_delay_max_seconds, mos, \
    download_loaded_loss_ratio, upload_loaded_loss_ratio, \
    ip_family, local_address, interface)"
        ));
    }

    #[test]
    fn cuts_chunks() {
        let mut e = Encoder::new();
        let r = row();
        let chunks = (0..10_000).filter_map(|_| e.row(&r, None)).count();
        assert!(chunks >= 2, "{chunks}");
    }
}
