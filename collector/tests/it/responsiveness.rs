//! Responsiveness results in the collector (issue 23, collector half), against a real
//! collector process and a real PostgreSQL, fed by simulated agents over the real gRPC
//! stream: results land exactly once with their columns (also over a redelivery), a result
//! whose rating contradicts its RPM or whose RPM is negative is quarantined while the rest
//! land, and `edgeprobe_responsiveness_rpm` counts them by site and test. The dashboard
//! panel and the alert rule run in dashboards.rs.

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

/// Before: every responsiveness result was quarantined ("fields do not match kind
/// responsiveness"). After: they land once with every column, over a redelivery on a new
/// session too; the two bad ones are quarantined with a reason an operator can act on.
#[test]
fn responsiveness_results_land_exactly_once_and_bad_ones_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let rt = runtime();
    let id = "r1";
    let mut batch = vec![
        responsiveness_result(id, 1, at(1), "lab", 150.0),
        responsiveness_result(id, 2, at(2), "lab", 412.0),
        // The agent says "good", its RPM is fair: one of the two is wrong.
        responsiveness_result(id, 3, at(3), "lab", 412.0),
        responsiveness_result(id, 4, at(4), "lab", 800.0),
        responsiveness_result(id, 5, at(5), "lab", 7200.0),
        // The target stopped answering mid-run: no overall RPM, no rating.
        responsiveness_result(id, 6, at(6), "lab", 900.0),
        http_result(id, 7, at(7)),
    ];
    responsiveness_fields(&mut batch[2]).rating = "good".into();
    responsiveness_fields(&mut batch[3]).responsiveness_rpm = Some(-800.0);
    {
        let f = responsiveness_fields(&mut batch[4]);
        f.stable = false;
        f.load_connections = 12;
        f.upload_responsiveness_rpm = None;
    }
    {
        let r = &mut batch[5];
        r.success = false;
        r.error_class = "timeout".into();
        r.error_message = "the target stopped answering 6.1s into the download phase".into();
        let f = responsiveness_fields(r);
        f.responsiveness_rpm = None;
        f.upload_responsiveness_rpm = None;
        f.loaded_latency_seconds = None;
        f.stable = false;
        f.rating.clear();
    }
    let far: Vec<pb::Result> = [(1, 5200.0), (2, 90.0)]
        .into_iter()
        .map(|(seq, rpm)| responsiveness_result("r2", seq, at(seq), "far", rpm))
        .collect();
    rt.block_on(async {
        let mut s = AgentStream::open(&collector.endpoint(), id, "lab", "i1").await;
        let ack = s.batch(batch.clone()).await;
        assert_eq!(ack.seq, 7);
        assert_eq!(
            ack.rejected.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4]
        );
        drop(s);
        // The ack was lost: the agent sends the same batch again on a new session.
        let mut s = AgentStream::open(&collector.endpoint(), id, "lab", "i1").await;
        assert_eq!(s.welcome.committed_seq, 7);
        assert_eq!(s.batch(batch.clone()).await.seq, 7);
        let mut f = AgentStream::open(&collector.endpoint(), "r2", "far", "i1").await;
        assert_eq!(f.batch(far).await.seq, 2);
    });

    let count = |sql: &str| -> i64 { db.client().query_one(sql, &[&id]).unwrap().get(0) };
    assert_eq!(
        count("SELECT count(*) FROM results WHERE agent_id = $1 AND kind = 'responsiveness'"),
        4
    );
    assert_eq!(
        count("SELECT count(DISTINCT seq) FROM responsiveness_results WHERE agent_id = $1"),
        4
    );
    assert_eq!(
        count("SELECT count(*) FROM results WHERE agent_id = $1 AND kind = 'http'"),
        1
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
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, 3);
    assert!(
        reasons[0]
            .1
            .contains("rating `good` does not match responsiveness_rpm = 412 (band fair)"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, 4);
    assert!(
        reasons[1]
            .1
            .contains("responsiveness_rpm = -800 is not a finite non-negative number"),
        "{reasons:?}"
    );

    // Every column as the agent sent it.
    let mut row = |seq: i64| {
        c.query_one(
            "SELECT responsiveness_rpm, download_responsiveness_rpm, upload_responsiveness_rpm,
                    download_bits_per_second, upload_bits_per_second, idle_latency_seconds,
                    loaded_latency_seconds, load_connections, stable, rating, success,
                    error_class, target, labels->>'site'
               FROM responsiveness_results WHERE agent_id = 'r1' AND seq = $1",
            &[&seq],
        )
        .unwrap()
    };
    let r2 = row(2);
    assert_eq!(r2.get::<_, Option<f64>>(0), Some(412.0));
    assert_eq!(r2.get::<_, Option<f64>>(1), Some(412.0 * 0.9));
    assert_eq!(r2.get::<_, Option<f64>>(2), Some(412.0 * 1.1));
    assert_eq!(r2.get::<_, Option<f64>>(3), Some(19.2e6));
    assert_eq!(r2.get::<_, Option<f64>>(4), Some(18.6e6));
    assert_eq!(r2.get::<_, Option<f64>>(5), Some(0.0042));
    assert_eq!(r2.get::<_, Option<f64>>(6), Some(60.0 / 412.0));
    assert_eq!(r2.get::<_, Option<i32>>(7), Some(6));
    assert_eq!(r2.get::<_, Option<bool>>(8), Some(true));
    assert_eq!(r2.get::<_, Option<String>>(9).as_deref(), Some("fair"));
    assert!(r2.get::<_, bool>(10));
    assert_eq!(
        r2.get::<_, String>(12),
        "https://nq.example.test/.well-known/nq"
    );
    assert_eq!(r2.get::<_, String>(13), "lab");
    let r5 = row(5);
    assert_eq!(r5.get::<_, Option<String>>(9).as_deref(), Some("excellent"));
    assert_eq!(r5.get::<_, Option<f64>>(2), None);
    assert_eq!(r5.get::<_, Option<i32>>(7), Some(12));
    assert_eq!(r5.get::<_, Option<bool>>(8), Some(false));
    let r6 = row(6);
    assert!(!r6.get::<_, bool>(10));
    assert_eq!(r6.get::<_, Option<String>>(11).as_deref(), Some("timeout"));
    assert_eq!(r6.get::<_, Option<f64>>(0), None);
    assert_eq!(r6.get::<_, Option<f64>>(1), Some(900.0 * 0.9));
    assert_eq!(r6.get::<_, Option<String>>(9), None);
    // Other kinds have no responsiveness columns.
    let http: (Option<f64>, Option<String>) = c
        .query_one(
            "SELECT responsiveness_rpm, rating FROM results WHERE agent_id = 'r1' AND kind = 'http'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(http, (None, None));

    // /metrics: the successful runs by site and test, in the rating bands' buckets; the
    // failed run and the quarantined ones not at all.
    let m = wait_for(Duration::from_secs(10), "the far site's RPM", || {
        let m = collector.metrics();
        (metric(
            &m,
            "edgeprobe_responsiveness_rpm_count{site=\"far\",test=\"rpm\"}",
        ) == 2.0)
            .then_some(m)
    });
    let lab = |suffix: &str| {
        metric(
            &m,
            &format!("edgeprobe_responsiveness_rpm_{suffix}{{site=\"lab\",test=\"rpm\"}}"),
        )
    };
    assert_eq!(lab("count"), 3.0);
    assert_eq!(lab("sum"), 150.0 + 412.0 + 7200.0);
    let bucket = |site: &str, le: &str| {
        metric(
            &m,
            &format!(
                "edgeprobe_responsiveness_rpm_bucket{{site=\"{site}\",test=\"rpm\",le=\"{le}\"}}"
            ),
        )
    };
    // poor (150), fair (412), excellent (7200)
    assert_eq!(bucket("lab", "100"), 0.0);
    assert_eq!(bucket("lab", "300"), 1.0);
    assert_eq!(bucket("lab", "1000"), 2.0);
    assert_eq!(bucket("lab", "6000"), 2.0);
    assert_eq!(bucket("lab", "10000"), 3.0);
    assert_eq!(bucket("far", "100"), 1.0);
    assert_eq!(bucket("far", "6000"), 2.0);
    // The latency histogram takes the round trip under load.
    assert_eq!(
        metric(
            &m,
            "edgeprobe_latency_seconds_count{kind=\"responsiveness\",site=\"lab\",test=\"rpm\"}"
        ),
        3.0
    );
    let loaded_sum = metric(
        &m,
        "edgeprobe_latency_seconds_sum{kind=\"responsiveness\",site=\"lab\",test=\"rpm\"}",
    );
    let expected = 60.0 / 150.0 + 60.0 / 412.0 + 60.0 / 7200.0;
    assert!((loaded_sum - expected).abs() < 1e-9, "{loaded_sum}");
    assert_eq!(
        metric(
            &m,
            "edgeprobe_results_total{ip_family=\"\",kind=\"responsiveness\",outcome=\"failure\",site=\"lab\",test=\"rpm\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "edgeprobe_ingest_results_total{outcome=\"duplicate\"}"),
        7.0
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
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
