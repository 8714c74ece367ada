//! STAMP results in the collector (issue 24, collector half), against a real collector
//! process and a real PostgreSQL, fed by simulated agents over the real gRPC stream: stamp
//! results land exactly once with their columns (also over a redelivery), results that
//! contradict themselves (more lost than sent, a MOS of 7, a negative loss ratio) are
//! quarantined while the rest land, the speed test's loss under load lands in its columns,
//! and the histograms count one-way loss, delay and MOS by direction, site and test. The
//! dashboard panels and the alert rule run in dashboards.rs.

use std::time::Duration;

use edgeprobe_proto::v1 as pb;

use crate::support::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A recent start time, whole milliseconds, a few minutes ago plus `seq` ms (a redelivery
/// repeats it exactly).
fn at(seq: u64) -> i64 {
    (now_nanos() - 300_000_000_000) / 1_000_000 * 1_000_000 + seq as i64 * 1_000_000
}

/// A successful stamp result of agent `id`, test `voice`, labels site=`site`: 1,000 packets,
/// `forward_lost` of them lost on the way to the reflector and `reverse_lost` on the way
/// back, one-way delays of 8 ms out and 4 ms back (both clocks synchronised).
fn stamp_result(
    id: &str,
    seq: u64,
    site: &str,
    forward_lost: u32,
    reverse_lost: u32,
    mos: f64,
) -> pb::Result {
    let sent = 1000;
    let reached = sent - forward_lost;
    pb::Result {
        agent_id: id.to_string(),
        seq,
        test: "voice".into(),
        kind: pb::Kind::Stamp as i32,
        target: "192.0.2.7:862".into(),
        started_at_unix_nanos: at(seq),
        duration_seconds: 22.1,
        success: true,
        labels: [("site".to_string(), site.to_string())].into(),
        fields: Some(pb::result::Fields::Stamp(pb::StampFields {
            sent,
            received: sent - forward_lost - reverse_lost,
            forward_lost,
            reverse_lost,
            forward_loss_ratio: Some(f64::from(forward_lost) / f64::from(sent)),
            reverse_loss_ratio: Some(f64::from(reverse_lost) / f64::from(reached)),
            duplicates: 1,
            reordered: 3,
            rtt_min_seconds: Some(0.0115),
            rtt_avg_seconds: Some(0.0125),
            rtt_max_seconds: Some(0.031),
            rtt_mdev_seconds: Some(0.0011),
            forward_delay_min_seconds: Some(0.0075),
            forward_delay_avg_seconds: Some(0.008),
            forward_delay_max_seconds: Some(0.021),
            reverse_delay_min_seconds: Some(0.0038),
            reverse_delay_avg_seconds: Some(0.004),
            reverse_delay_max_seconds: Some(0.009),
            jitter_seconds: Some(0.0009),
            mos: Some(mos),
        })),
        ..Default::default()
    }
}

fn stamp_fields(r: &mut pb::Result) -> &mut pb::StampFields {
    match &mut r.fields {
        Some(pb::result::Fields::Stamp(f)) => f,
        _ => panic!("not a stamp result"),
    }
}

/// A speed result whose loss under load is `down` / `up` (None: a target without a STAMP
/// reflector).
fn speed_result(id: &str, seq: u64, site: &str, down: Option<f64>, up: Option<f64>) -> pb::Result {
    pb::Result {
        agent_id: id.to_string(),
        seq,
        test: "speed".into(),
        kind: pb::Kind::Speed as i32,
        target: "https://speed.example.test/".into(),
        started_at_unix_nanos: at(seq),
        duration_seconds: 21.0,
        success: true,
        labels: [("site".to_string(), site.to_string())].into(),
        fields: Some(pb::result::Fields::Speed(pb::SpeedFields {
            download_bits_per_second: Some(94e6),
            upload_bits_per_second: Some(38e6),
            idle_latency_seconds: Some(0.011),
            jitter_seconds: Some(0.001),
            download_loaded_latency_seconds: Some(0.045),
            upload_loaded_latency_seconds: Some(0.120),
            bytes_downloaded: 235_000_000,
            bytes_uploaded: 95_000_000,
            download_loaded_loss_ratio: down,
            upload_loaded_loss_ratio: up,
        })),
        ..Default::default()
    }
}

/// Before: every stamp result was quarantined ("fields do not match kind stamp" before the
/// kind existed in the collector, and speed's loaded loss was dropped on the floor). After:
/// they land once with every column, over a redelivery on a new session too; the three
/// contradicting ones are quarantined with a reason an operator can act on.
#[test]
fn stamp_results_land_exactly_once_and_contradicting_ones_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let rt = runtime();
    let id = "hh1";
    let mut batch = vec![
        // 3 % lost on the way out, nothing on the way back.
        stamp_result(id, 1, "hamburg", 30, 0, 3.9),
        // Clean, but the agent's clock is unsynchronised: no one-way delays.
        stamp_result(id, 2, "hamburg", 0, 0, 4.4),
        // Contradictions: more lost than sent, a MOS of 7, a negative loss ratio.
        stamp_result(id, 3, "hamburg", 0, 0, 4.4),
        stamp_result(id, 4, "hamburg", 0, 0, 7.0),
        stamp_result(id, 5, "hamburg", 0, 0, 4.4),
        // The reflector stopped answering: every packet lost, a failed run.
        stamp_result(id, 6, "hamburg", 0, 0, 1.0),
        // Loss under load against a target with a reflector, and against one without.
        speed_result(id, 7, "hamburg", Some(0.021), Some(0.0)),
        speed_result(id, 8, "hamburg", None, None),
        // Lost on the way back only.
        stamp_result(id, 9, "hamburg", 0, 12, 4.1),
    ];
    {
        let r = &mut batch[1];
        r.clock_unsynced = true;
        let f = stamp_fields(r);
        f.forward_delay_min_seconds = None;
        f.forward_delay_avg_seconds = None;
        f.forward_delay_max_seconds = None;
        f.reverse_delay_min_seconds = None;
        f.reverse_delay_avg_seconds = None;
        f.reverse_delay_max_seconds = None;
    }
    {
        let f = stamp_fields(&mut batch[2]);
        f.forward_lost = 600;
        f.reverse_lost = 500;
    }
    stamp_fields(&mut batch[4]).forward_loss_ratio = Some(-0.02);
    {
        let r = &mut batch[5];
        r.success = false;
        r.error_class = "timeout".into();
        r.error_message = "no reflected packet within 2s of the last test packet".into();
        let f = stamp_fields(r);
        f.received = 0;
        f.forward_lost = 1000;
        f.forward_loss_ratio = Some(1.0);
        f.reverse_loss_ratio = None;
        f.duplicates = 0;
        f.reordered = 0;
        f.rtt_min_seconds = None;
        f.rtt_avg_seconds = None;
        f.rtt_max_seconds = None;
        f.rtt_mdev_seconds = None;
        f.forward_delay_min_seconds = None;
        f.forward_delay_avg_seconds = None;
        f.forward_delay_max_seconds = None;
        f.reverse_delay_min_seconds = None;
        f.reverse_delay_avg_seconds = None;
        f.reverse_delay_max_seconds = None;
        f.jitter_seconds = None;
        f.mos = None;
    }
    let berlin: Vec<pb::Result> = [(1, 5, 4.3), (2, 0, 4.4)]
        .into_iter()
        .map(|(seq, lost, mos)| stamp_result("be1", seq, "berlin", lost, 0, mos))
        .collect();
    rt.block_on(async {
        let mut s = AgentStream::open(&collector.endpoint(), id, "hamburg", "i1").await;
        let ack = s.batch(batch.clone()).await;
        assert_eq!(ack.seq, 9);
        assert_eq!(
            ack.rejected.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        drop(s);
        // The ack was lost: the agent sends the same batch again on a new session.
        let mut s = AgentStream::open(&collector.endpoint(), id, "hamburg", "i1").await;
        assert_eq!(s.welcome.committed_seq, 9);
        assert_eq!(s.batch(batch.clone()).await.seq, 9);
        let mut b = AgentStream::open(&collector.endpoint(), "be1", "berlin", "i1").await;
        assert_eq!(b.batch(berlin).await.seq, 2);
    });

    let count = |sql: &str| -> i64 { db.client().query_one(sql, &[&id]).unwrap().get(0) };
    assert_eq!(
        count("SELECT count(*) FROM results WHERE agent_id = $1 AND kind = 'stamp'"),
        4
    );
    assert_eq!(
        count("SELECT count(DISTINCT seq) FROM stamp_results WHERE agent_id = $1"),
        4
    );
    assert_eq!(
        count("SELECT count(*) FROM speed_results WHERE agent_id = $1"),
        2
    );
    let mut c = db.client();
    let reasons: Vec<(i64, String)> = c
        .query(
            "SELECT seq, reason FROM rejected_results WHERE agent_id = $1 ORDER BY seq",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        reasons.iter().map(|r| r.0).collect::<Vec<_>>(),
        [3, 4, 5],
        "{reasons:?}"
    );
    for (i, reason) in [
        "forward_lost + reverse_lost = 600 + 500 > sent - received = 1000 - 1000",
        "mos = 7 is outside 1..=4.5",
        "forward_loss_ratio = -0.02 is not a finite non-negative number",
    ]
    .into_iter()
    .enumerate()
    {
        assert!(reasons[i].1.contains(reason), "{reasons:?}");
    }

    // Every column as the agent sent it.
    let mut row = |seq: i64| {
        c.query_one(
            "SELECT sent, received, forward_lost, reverse_lost, forward_loss_ratio,
                    reverse_loss_ratio, duplicates, reordered, rtt_min_seconds, rtt_avg_seconds,
                    rtt_max_seconds, rtt_mdev_seconds, forward_delay_min_seconds,
                    forward_delay_avg_seconds, forward_delay_max_seconds,
                    reverse_delay_min_seconds, reverse_delay_avg_seconds,
                    reverse_delay_max_seconds, jitter_seconds, mos, success, error_class,
                    clock_unsynced, target, labels->>'site'
               FROM stamp_results WHERE agent_id = 'hh1' AND seq = $1",
            &[&seq],
        )
        .unwrap()
    };
    let r1 = row(1);
    let ints: Vec<Option<i32>> = [0, 1, 2, 3, 6, 7].iter().map(|&i| r1.get(i)).collect();
    assert_eq!(
        ints,
        [Some(1000), Some(970), Some(30), Some(0), Some(1), Some(3)]
    );
    let floats: Vec<Option<f64>> = (8..20).map(|i| r1.get(i)).collect();
    assert_eq!(
        floats,
        [
            Some(0.0115),
            Some(0.0125),
            Some(0.031),
            Some(0.0011),
            Some(0.0075),
            Some(0.008),
            Some(0.021),
            Some(0.0038),
            Some(0.004),
            Some(0.009),
            Some(0.0009),
            Some(3.9),
        ]
    );
    assert_eq!(r1.get::<_, Option<f64>>(4), Some(0.03));
    assert_eq!(r1.get::<_, Option<f64>>(5), Some(0.0));
    assert!(r1.get::<_, bool>(20));
    assert_eq!(r1.get::<_, String>(23), "192.0.2.7:862");
    assert_eq!(r1.get::<_, String>(24), "hamburg");
    // Unsynchronised: the round trip without one-way delays.
    let r2 = row(2);
    assert!(r2.get::<_, bool>(22));
    assert_eq!(r2.get::<_, Option<f64>>(9), Some(0.0125));
    for i in 12..18 {
        assert_eq!(r2.get::<_, Option<f64>>(i), None, "column {i}");
    }
    let r6 = row(6);
    assert!(!r6.get::<_, bool>(20));
    assert_eq!(r6.get::<_, Option<String>>(21).as_deref(), Some("timeout"));
    assert_eq!(r6.get::<_, Option<i32>>(1), Some(0));
    assert_eq!(r6.get::<_, Option<f64>>(4), Some(1.0));
    assert_eq!(r6.get::<_, Option<f64>>(19), None);
    let r9 = row(9);
    assert_eq!(r9.get::<_, Option<i32>>(3), Some(12));
    assert_eq!(r9.get::<_, Option<f64>>(5), Some(0.012));
    // The speed test's loss under load, NULL against a target without a reflector.
    let loaded: Vec<(i64, Option<f64>, Option<f64>)> = c
        .query(
            "SELECT seq, download_loaded_loss_ratio, upload_loaded_loss_ratio
               FROM speed_results WHERE agent_id = 'hh1' ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(loaded, [(7, Some(0.021), Some(0.0)), (8, None, None)]);
    // Other kinds have no stamp columns.
    let other: (Option<i32>, Option<f64>) = c
        .query_one(
            "SELECT forward_lost, mos FROM results WHERE agent_id = 'hh1' AND kind = 'speed'
              AND seq = 7",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(other, (None, None));

    // /metrics: one-way loss by direction, site and test (the failed run's total loss too),
    // one-way delay only where both clocks were synchronised, MOS, the round trip in the
    // latency histogram; the quarantined results and the redelivery not at all.
    let m = wait_for(Duration::from_secs(10), "berlin's stamp results", || {
        let m = collector.metrics();
        (metric(
            &m,
            "edgeprobe_stamp_loss_ratio_count{direction=\"forward\",site=\"berlin\",test=\"voice\"}",
        ) == 2.0)
            .then_some(m)
    });
    let series = |name: &str, labels: &str| metric(&m, &format!("{name}{{{labels}}}"));
    let loss = |suffix: &str, labels: &str| {
        series(&format!("edgeprobe_stamp_loss_ratio_{suffix}"), labels)
    };
    let hh = |dir: &str| format!("direction=\"{dir}\",site=\"hamburg\",test=\"voice\"");
    let hh_le = |dir: &str, le: &str| format!("{},le=\"{le}\"", hh(dir));
    // Forward: 0.03, 0 (unsynced), 1.0 (failed), 0 (seq 9).
    assert_eq!(loss("count", &hh("forward")), 4.0);
    assert!((loss("sum", &hh("forward")) - 1.03).abs() < 1e-9);
    assert_eq!(loss("bucket", &hh_le("forward", "0")), 2.0);
    assert_eq!(loss("bucket", &hh_le("forward", "0.01")), 2.0);
    assert_eq!(loss("bucket", &hh_le("forward", "0.05")), 3.0);
    assert_eq!(loss("bucket", &hh_le("forward", "0.5")), 3.0);
    assert_eq!(loss("bucket", &hh_le("forward", "1")), 4.0);
    // Reverse: 0, 0, (none: failed run), 0.012.
    assert_eq!(loss("count", &hh("reverse")), 3.0);
    assert!((loss("sum", &hh("reverse")) - 0.012).abs() < 1e-9);
    assert_eq!(loss("bucket", &hh_le("reverse", "0.01")), 2.0);
    assert_eq!(loss("bucket", &hh_le("reverse", "0.02")), 3.0);
    let be = "direction=\"forward\",site=\"berlin\",test=\"voice\"";
    assert!((loss("sum", be) - 0.005).abs() < 1e-9);
    // One-way delay: seqs 1 and 9 (seq 2's clock was unsynchronised, seq 6 failed).
    let delay = |suffix: &str, labels: &str| {
        series(
            &format!("edgeprobe_stamp_one_way_delay_seconds_{suffix}"),
            labels,
        )
    };
    assert_eq!(delay("count", &hh("forward")), 2.0);
    assert!((delay("sum", &hh("forward")) - 0.016).abs() < 1e-12);
    assert_eq!(delay("count", &hh("reverse")), 2.0);
    assert_eq!(delay("bucket", &hh_le("reverse", "0.0025")), 0.0);
    assert_eq!(delay("bucket", &hh_le("reverse", "0.005")), 2.0);
    assert_eq!(delay("bucket", &hh_le("forward", "0.005")), 0.0);
    assert_eq!(delay("bucket", &hh_le("forward", "0.01")), 2.0);
    // MOS: 3.9, 4.4, 4.1 (the failed run has none).
    let mos = |suffix: &str, labels: &str| series(&format!("edgeprobe_stamp_mos_{suffix}"), labels);
    let hh_mos = "site=\"hamburg\",test=\"voice\"";
    assert_eq!(mos("count", hh_mos), 3.0);
    assert!((mos("sum", hh_mos) - 12.4).abs() < 1e-9);
    assert_eq!(mos("bucket", &format!("{hh_mos},le=\"4.03\"")), 1.0);
    assert_eq!(mos("bucket", &format!("{hh_mos},le=\"4.34\"")), 2.0);
    assert_eq!(mos("count", "site=\"berlin\",test=\"voice\""), 2.0);
    // The latency histogram takes the round trip of each successful run.
    assert_eq!(
        series(
            "edgeprobe_latency_seconds_count",
            "kind=\"stamp\",site=\"hamburg\",test=\"voice\""
        ),
        3.0
    );
    // The speed test's loss under load, only from the run whose target reflects.
    let speed = |dir: &str, suffix: &str| {
        series(
            &format!("edgeprobe_speed_loaded_loss_ratio_{suffix}"),
            &format!("direction=\"{dir}\",site=\"hamburg\",test=\"speed\""),
        )
    };
    assert_eq!(speed("download", "count"), 1.0);
    assert!((speed("download", "sum") - 0.021).abs() < 1e-12);
    assert_eq!(speed("upload", "count"), 1.0);
    assert_eq!(speed("upload", "sum"), 0.0);
    assert_eq!(
        metric(&m, "edgeprobe_ingest_results_total{outcome=\"duplicate\"}"),
        9.0
    );
    assert_eq!(
        metric(&m, "edgeprobe_ingest_results_total{outcome=\"rejected\"}"),
        3.0
    );
    // The series keep Prometheus' naming rules.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(m.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    // One finding is known and deliberate: SPEC fixes speed in bits per second, promtool's
    // lint prefers bytes for edgeprobe_speed_bits_per_second. Anything else fails.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.trim().is_empty()
                && *l
                    != "edgeprobe_speed_bits_per_second use base unit \"bytes\" instead of \"bits\""
        })
        .collect();
    assert!(
        findings.is_empty() && (out.status.success() || text.contains("speed_bits_per_second")),
        "promtool check metrics: {text}"
    );
}
