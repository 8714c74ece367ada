//! Security, from outside a running collector: mTLS with certificate identity, the fleet
//! CA commands, certificate reload, hostile input (spoofed ids, oversized and unbounded
//! messages, garbage, silence, 10,000 random malformed results). After each attack a real
//! `edgeprobe-agent` still delivers over mTLS and Postgres holds only valid rows.
//!
//! Oversized messages (over the 4 MiB limit) answer INVALID_ARGUMENT ("message too large"),
//! like every other bound; spoofed ids answer PERMISSION_DENIED.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::v1 as pb;
use edgeprobe_proto::v1::ingest_client::IngestClient;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

use crate::support::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn rows(db: &TestDb, agent: &str) -> i64 {
    db.client()
        .query_one(
            "SELECT count(*) FROM results WHERE agent_id = $1",
            &[&agent],
        )
        .unwrap()
        .get(0)
}

fn agents(db: &TestDb) -> Vec<String> {
    db.client()
        .query("SELECT agent_id FROM agents ORDER BY agent_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A real agent process over mTLS delivers at least 3 more results, then stops cleanly.
fn agent_delivers(dir: &Path, collector: &Collector, db: &TestDb, pki: &Pki, id: &str) {
    let target = HttpTarget::start("ok");
    let before = rows(db, id);
    let mut agent = Agent::new_tls(
        dir,
        id,
        &collector.tls_endpoint(),
        &http_test(&target.url(), "200ms"),
        pki,
    );
    agent.start();
    wait_for(
        Duration::from_secs(30),
        "a well-behaved agent to deliver over mTLS",
        || (rows(db, id) >= before + 3).then_some(()),
    );
    assert_eq!(agent.stop(), Some(0), "agent exit code");
    assert!(collector_alive(collector), "collector died");
}

fn collector_alive(c: &Collector) -> bool {
    http_get(c.http, "/healthz").is_some_and(|(s, _)| s == 200)
}

/// Every stored row is within the bounds the collector promises (SPEC section 6).
fn assert_only_valid_rows(db: &TestDb) {
    // Every kind this version knows is a valid kind: a new kind's results are stored.
    let kinds = edgeprobe_proto::testdef::Kind::ALL
        .iter()
        .map(|k| format!("'{}'", k.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let bad = db.scalar(&format!(
        "SELECT count(*) FROM results WHERE
              seq <= 0
           OR test = '' OR octet_length(test) > 128
           OR target = '' OR octet_length(target) > 2048
           OR octet_length(coalesce(error_message, '')) > 4096
           OR octet_length(coalesce(error_class, '')) > 32
           OR started_at < '2020-01-01' OR started_at > now() + interval '1 day'
           OR NOT (duration_seconds BETWEEN 0 AND 86400)
           OR kind NOT IN ({kinds})
           OR success = (error_class IS NOT NULL)
           OR (SELECT count(*) FROM jsonb_object_keys(labels)) > 32
           OR EXISTS (SELECT 1 FROM jsonb_each_text(labels) l
                       WHERE l.key = '' OR octet_length(l.key) > 128 OR octet_length(l.value) > 128)
           OR status_code NOT BETWEEN 100 AND 999
           OR loss_ratio NOT BETWEEN 0 AND 1 OR received > sent
           OR download_bits_per_second < 0 OR download_bits_per_second = 'NaN'
           OR upload_bits_per_second < 0 OR upload_bits_per_second = 'NaN'
           OR connect_seconds < 0 OR connect_seconds = 'NaN'
           OR path_loss_ratio NOT BETWEEN 0 AND 1 OR hop_count < 0
           OR responsiveness_rpm < 0 OR responsiveness_rpm = 'NaN'"
    ));
    assert_eq!(bad, 0, "rows outside the bounds in Postgres");
}

// ---------------------------------------------------------------------------------------
// A hand-written gRPC agent

async fn client(
    endpoint: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<IngestClient<Channel>, String> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .map_err(|e| format!("{e:?}"))?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(IngestClient::new(channel).max_encoding_message_size(64 << 20))
}

fn hello(id: &str) -> pb::Hello {
    pb::Hello {
        agent_id: id.to_string(),
        version: "test".into(),
        labels: [("site".to_string(), "lab".to_string())].into(),
        ..Default::default()
    }
}

/// A valid http result, started a minute ago.
fn result(id: &str, seq: u64) -> pb::Result {
    http_result(id, seq, now_nanos() - 60_000_000_000)
}

/// One open Ingest stream, past the welcome.
struct Session {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::CollectorMessage>,
    committed: u64,
    /// The seqs the last ack named as quarantined.
    rejected: Vec<u64>,
}

const REPLY_WAIT: Duration = Duration::from_secs(20);

async fn open(client: &mut IngestClient<Channel>, hello: pb::Hello) -> Result<Session, Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(agent_msg(pb::agent_message::Msg::Hello(hello)))
        .await
        .unwrap();
    let mut inbound = tokio::time::timeout(REPLY_WAIT, client.stream(ReceiverStream::new(rx)))
        .await
        .map_err(|_| Status::unknown("test: no response to the stream"))??
        .into_inner();
    match tokio::time::timeout(REPLY_WAIT, inbound.message()).await {
        Ok(Ok(Some(pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::Welcome(w)),
        }))) => Ok(Session {
            tx,
            inbound,
            committed: w.committed_seq,
            rejected: Vec::new(),
        }),
        Ok(Err(s)) => Err(s),
        other => Err(Status::unknown(format!(
            "test: expected a welcome, got {other:?}"
        ))),
    }
}

impl Session {
    /// Sends a batch; the ack's seq, or the status the stream ended with.
    async fn batch(&mut self, results: Vec<pb::Result>) -> Result<u64, Status> {
        self.send(agent_msg(pb::agent_message::Msg::Batch(pb::ResultBatch {
            results,
        })))
        .await
    }

    async fn send(&mut self, m: pb::AgentMessage) -> Result<u64, Status> {
        if self.tx.send(m).await.is_err() {
            return Err(Status::unknown("test: request stream already closed"));
        }
        match tokio::time::timeout(REPLY_WAIT, self.inbound.message()).await {
            Ok(Ok(Some(pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::Ack(a)),
            }))) => {
                self.rejected = a.rejected.iter().map(|r| r.seq).collect();
                Ok(a.seq)
            }
            Ok(Err(s)) => Err(s),
            other => Err(Status::unknown(format!(
                "test: expected an ack, got {other:?}"
            ))),
        }
    }
}

/// A stream of `id` that must be refused with `code` for `batch`.
async fn refused_batch(
    client: &mut IngestClient<Channel>,
    id: &str,
    batch: Vec<pb::Result>,
    code: Code,
    what: &str,
) {
    let mut s = open(client, hello(id)).await.expect("hello accepted");
    let status = s.batch(batch).await.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
}

// ---------------------------------------------------------------------------------------
// Raw sockets and rustls

fn rustls_client(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The leaf certificate the collector serves now.
async fn served_cert(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    conn.peer_certificates().unwrap()[0].to_vec()
}

/// Reads until the peer closes; the time that took, or None if it stayed open `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// An agent certificate signed by the fleet CA that expired yesterday.
fn expired_agent_cert(pki: &Pki, id: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.ca_dir().join("ca.key")).unwrap())
            .unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.ca_pem()).unwrap(), ca_key)
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, id);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k) = (dir.join(format!("{id}.pem")), dir.join(format!("{id}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// Writes `data` to `path` by rename, as rotation tooling should.
fn replace_file(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn handshake_refuses_missing_foreign_expired_and_misused_certificates_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    assert_eq!(
        collector.metric(&format!(
            "edgeprobe_collector_info{{insecure=\"false\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0,
        "{}",
        collector.metrics()
    );
    let endpoint = collector.tls_endpoint();
    let refused = |reason: &str| {
        collector.metric(&format!(
            "edgeprobe_tls_handshake_errors_total{{reason=\"{reason}\"}}"
        ))
    };

    // Another CA, with an agent certificate of the same name a real agent has.
    let other = dir.path().join("other");
    let (code, _, err) =
        collector_cmd(&["ca", "init", "--dir", other.join("ca").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = collector_cmd(&[
        "cert",
        "issue",
        "--ca",
        other.join("ca").to_str().unwrap(),
        "--name",
        "good-agent",
        "--out",
        other.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let expired = expired_agent_cert(&pki, "good-agent", dir.path());
    let (server_cert, server_key) = pki.server();

    let rt = runtime();
    rt.block_on(async {
        // No client certificate at all.
        let attempt = async {
            let mut c = client(&endpoint, &pki.ca_pem(), None).await?;
            open(&mut c, hello("good-agent"))
                .await
                .map_err(|s| s.to_string())
                .map(|_| ())
        };
        assert!(
            attempt.await.is_err(),
            "a client without a certificate got in"
        );

        for (what, cert, key) in [
            (
                "another CA",
                other.join("good-agent.pem"),
                other.join("good-agent.key"),
            ),
            (
                "an expired certificate",
                expired.0.clone(),
                expired.1.clone(),
            ),
            // The collector's own certificate (server-auth EKU only) cannot log in as an agent.
            (
                "a server certificate",
                server_cert.clone(),
                server_key.clone(),
            ),
        ] {
            let attempt = async {
                let mut c = client(&endpoint, &pki.ca_pem(), Some((&cert, &key))).await?;
                open(&mut c, hello("good-agent"))
                    .await
                    .map_err(|s| s.to_string())
                    .map(|_| ())
            };
            assert!(attempt.await.is_err(), "a client with {what} got in");
        }
    });
    assert!(refused("no_client_cert") >= 1.0, "{}", collector.metrics());
    assert!(refused("bad_client_cert") >= 3.0, "{}", collector.metrics());

    // Garbage instead of a ClientHello: closed at once, not after the handshake timeout.
    let mut s = TcpStream::connect(collector.grpc).unwrap();
    let garbage: Vec<u8> = (0..65_536).map(|_| rand::random::<u8>()).collect();
    let _ = s.write_all(&garbage);
    let took = closed_within(&mut s, Duration::from_secs(5)).expect("garbage connection left open");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    wait_for(Duration::from_secs(5), "the protocol error counted", || {
        (refused("protocol") >= 1.0).then_some(())
    });

    assert!(agents(&db).is_empty(), "a refused client reached the store");
    agent_delivers(dir.path(), &collector, &db, &pki, "good-agent");
    assert_eq!(agents(&db), ["good-agent"]);
    assert_only_valid_rows(&db);
}

#[test]
fn silent_clients_are_closed_after_the_hello_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(
        dir.path(),
        &db,
        &pki,
        &[("EDGEPROBE_HELLO_TIMEOUT_MS", "1500")],
    );

    // TCP connect, then nothing: no TLS handshake within the timeout.
    let mut silent = TcpStream::connect(collector.grpc).unwrap();
    // Meanwhile others are served: the silent one holds no one up.
    let rt = runtime();
    let (cert, key) = pki.agent("quiet");
    rt.block_on(async {
        let mut c = client(
            &collector.tls_endpoint(),
            &pki.ca_pem(),
            Some((&cert, &key)),
        )
        .await
        .unwrap();
        let mut s = open(&mut c, hello("quiet"))
            .await
            .expect("served while another is silent");
        assert_eq!(s.batch(vec![result("quiet", 1)]).await.unwrap(), 1);
    });
    let took = closed_within(&mut silent, Duration::from_secs(10))
        .expect("a silent TCP client was never closed");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    assert!(
        collector.metric("edgeprobe_tls_handshake_errors_total{reason=\"timeout\"}") >= 1.0,
        "{}",
        collector.metrics()
    );

    // A TLS client that opens a stream and never says hello.
    rt.block_on(async {
        let mut c = client(
            &collector.tls_endpoint(),
            &pki.ca_pem(),
            Some((&cert, &key)),
        )
        .await
        .unwrap();
        let (_tx, rx) = mpsc::channel::<pb::AgentMessage>(1);
        let start = Instant::now();
        let status =
            tokio::time::timeout(Duration::from_secs(10), c.stream(ReceiverStream::new(rx)))
                .await
                .expect("a stream without hello was never closed")
                .expect_err("a stream without hello was accepted");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            start.elapsed() >= Duration::from_millis(1000),
            "{:?}",
            start.elapsed()
        );
    });

    assert_eq!(rows(&db, "quiet"), 1);
    agent_delivers(dir.path(), &collector, &db, &pki, "good-agent");
    assert_only_valid_rows(&db);
}

#[test]
fn spoofed_agent_ids_are_denied_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    // The victim is a real agent with results in Postgres.
    agent_delivers(dir.path(), &collector, &db, &pki, "victim");
    let victim_rows = rows(&db, "victim");
    let victim_committed = db.scalar("SELECT committed_seq FROM agents WHERE agent_id = 'victim'");

    let (cert, key) = pki.agent("mallory");
    runtime().block_on(async {
        let mut c = client(
            &collector.tls_endpoint(),
            &pki.ca_pem(),
            Some((&cert, &key)),
        )
        .await
        .unwrap();
        // Hello claiming the victim's id.
        let status = open(&mut c, hello("victim"))
            .await
            .err()
            .expect("spoofed hello accepted");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

        // Its own hello, then a batch of the victim's results.
        let next = victim_committed as u64 + 1;
        refused_batch(
            &mut c,
            "mallory",
            vec![result("victim", next), result("victim", next + 1)],
            Code::PermissionDenied,
            "batch of another agent's results",
        )
        .await;
        // Mixed: its own results and one of the victim's; nothing of it is written.
        refused_batch(
            &mut c,
            "mallory",
            vec![
                result("mallory", 1),
                result("victim", next),
                result("mallory", 3),
            ],
            Code::PermissionDenied,
            "mixed batch",
        )
        .await;
        // The stream is closed after a refusal: a further batch gets no ack.
        let mut s = open(&mut c, hello("mallory")).await.unwrap();
        let status = s.batch(vec![result("victim", next)]).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            s.batch(vec![result("mallory", 1)]).await.is_err(),
            "stream stayed open"
        );
        // And its own results still go through on a new stream.
        let mut s = open(&mut c, hello("mallory")).await.unwrap();
        assert_eq!(s.committed, 0);
        assert_eq!(
            s.batch(vec![result("mallory", 1), result("mallory", 2)])
                .await
                .unwrap(),
            2
        );
    });

    assert_eq!(rows(&db, "victim"), victim_rows, "spoofed results written");
    assert_eq!(
        db.scalar("SELECT committed_seq FROM agents WHERE agent_id = 'victim'"),
        victim_committed
    );
    assert_eq!(rows(&db, "mallory"), 2);
    assert!(collector.metric("edgeprobe_ingest_errors_total{stage=\"permission\"}") >= 4.0);
    agent_delivers(dir.path(), &collector, &db, &pki, "victim");
    assert_only_valid_rows(&db);
}

#[test]
fn oversized_and_unbounded_input_is_refused_without_harming_other_streams() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    // A well-behaved agent streams throughout the attack.
    let target = HttpTarget::start("ok");
    let mut steady = Agent::new_tls(
        dir.path(),
        "steady",
        &collector.tls_endpoint(),
        &http_test(&target.url(), "200ms"),
        &pki,
    );
    steady.start();
    wait_for(Duration::from_secs(30), "steady to deliver", || {
        (rows(&db, "steady") >= 2).then_some(())
    });
    let steady_before = rows(&db, "steady");

    let id = "attacker";
    let (cert, key) = pki.agent(id);
    runtime().block_on(async {
        let mut c = client(
            &collector.tls_endpoint(),
            &pki.ca_pem(),
            Some((&cert, &key)),
        )
        .await
        .unwrap();
        // Hello with too many labels, and with a huge id.
        let mut h = hello(id);
        h.labels = (0..40)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let status = open(&mut c, h).await.err().expect("40 labels accepted");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = open(&mut c, hello(&"a".repeat(100_000)))
            .await
            .err()
            .unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // What a bad peer sends closes its stream and writes nothing.
        let with = |f: fn(&mut pb::Result)| {
            let mut r = result(id, 1);
            f(&mut r);
            vec![r]
        };
        let refused: Vec<(&str, Vec<pb::Result>)> = vec![
            ("seq 0", with(|r| r.seq = 0)),
            ("seq past i64", with(|r| r.seq = u64::MAX)),
            ("seqs not increasing", vec![result(id, 2), result(id, 1)]),
            (
                "10,001 results",
                (1..=10_001).map(|s| result(id, s)).collect(),
            ),
            // Over the 4 MiB message limit: refused before it is decoded.
            (
                "oversized message",
                with(|r| r.error_message = "x".repeat(5 << 20)),
            ),
        ];
        for (what, batch) in refused {
            refused_batch(&mut c, id, batch, Code::InvalidArgument, what).await;
        }

        // What a bad result holds is quarantined: acked, named in the ack, kept in
        // rejected_results, and the stream goes on. A start time is never refused.
        type Case = (&'static str, fn(&mut pb::Result));
        let quarantined: Vec<Case> = vec![
            ("too many labels", |r| {
                r.labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect()
            }),
            ("long label value", |r| {
                r.labels = [("k".into(), "v".repeat(129))].into()
            }),
            ("huge test name", |r| r.test = "t".repeat(100_000)),
            ("huge error message", |r| {
                r.success = false;
                r.error_class = "timeout".into();
                r.error_message = "e".repeat(1 << 20)
            }),
            ("NUL in target", |r| r.target = "http://x/\0".into()),
            ("invalid kind", |r| r.kind = 77),
            ("fields of another kind", |r| {
                r.fields = Some(pb::result::Fields::Dns(Default::default()))
            }),
            ("NaN duration", |r| r.duration_seconds = f64::NAN),
            ("negative measure", |r| {
                r.fields = Some(pb::result::Fields::Http(pb::HttpFields {
                    ttfb_seconds: Some(-1.0),
                    ..Default::default()
                }))
            }),
            ("status code 7", |r| {
                r.fields = Some(pb::result::Fields::Http(pb::HttpFields {
                    status_code: Some(7),
                    ..Default::default()
                }))
            }),
        ];
        let flagged: Vec<Case> = vec![
            ("started in 1999", |r| {
                r.started_at_unix_nanos = 915_148_800_000_000_000
            }),
            ("started next week", |r| {
                r.started_at_unix_nanos = now_nanos() + 7 * 86_400_000_000_000
            }),
        ];
        let mut s = open(&mut c, hello(id)).await.unwrap();
        let mut seq = 0;
        for (what, f) in &quarantined {
            seq += 1;
            let mut r = result(id, seq);
            f(&mut r);
            assert_eq!(s.batch(vec![r]).await.expect(what), seq, "{what}");
            assert_eq!(s.rejected, vec![seq], "{what} is named in the ack");
        }
        for (what, f) in &flagged {
            seq += 1;
            let mut r = result(id, seq);
            f(&mut r);
            assert_eq!(s.batch(vec![r]).await.expect(what), seq, "{what}");
            assert!(s.rejected.is_empty(), "{what} is stored, not quarantined");
        }
        // The attacker's own valid results still land afterwards, on the same stream.
        seq += 1;
        assert_eq!(s.batch(vec![result(id, seq)]).await.unwrap(), seq);
    });

    assert_eq!(
        db.scalar("SELECT count(*) FROM rejected_results WHERE agent_id = 'attacker'"),
        10,
        "every out-of-bounds result quarantined"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM results WHERE agent_id = 'attacker' AND clock_unsynced"),
        2,
        "implausible start times stored flagged"
    );
    assert_eq!(
        rows(&db, id),
        3,
        "the valid result and the two flagged ones"
    );
    wait_for(Duration::from_secs(20), "steady to keep delivering", || {
        (rows(&db, "steady") >= steady_before + 3).then_some(())
    });
    assert_eq!(steady.stop(), Some(0));
    let log = std::fs::read_to_string(steady.config.with_extension("log")).unwrap();
    assert!(
        !log.contains("collector session ended"),
        "the attack disturbed another stream: {log}"
    );
    let last = drain(&mut steady, &db, "steady");
    assert_exactly_once(&db, "steady", last);
    assert!(collector_alive(&collector));
    assert_only_valid_rows(&db);
}

// --- 10,000 random malformed results over real streams -----------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    AgentId(String),
    Seq(u64),
    Test(String),
    Kind(i32),
    Target(String),
    StartedAt(i64),
    Duration(f64),
    Success(bool),
    ErrorClass(String),
    ErrorMessage(String),
    Labels(HashMap<String, String>),
    Fields(Option<pb::result::Fields>),
}

/// Short strings of any chars (control, NUL, non-ASCII are likely), plausible names, and
/// lengths right around `max`, where the bounds are.
fn text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        3 => proptest::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        2 => "[a-z0-9._-]{1,12}",
        1 => (max.saturating_sub(4)..=max + 4).prop_map(|n| "x".repeat(n)),
        // Two bytes a char: within the bound in chars, maybe not in bytes.
        1 => (max / 2 - 2..=max / 2 + 2).prop_map(|n| "é".repeat(n)),
        1 => prop::sample::select(vec!["", "\0", "a\u{7}b", "tab\tname", "\u{202e}rtl", "'; DROP TABLE results; --"]).prop_map(String::from),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<f64> {
    prop_oneof![
        3 => 0.0..1_000.0f64,
        1 => proptest::num::f64::ANY,
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, -1.0, f64::MAX, 86_400.0, 86_400.1]),
    ]
    .boxed()
}

fn fields() -> BoxedStrategy<Option<pb::result::Fields>> {
    use pb::result::Fields as F;
    let o = || proptest::option::of(number());
    prop_oneof![
        Just(None),
        (o(), o(), o(), o(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d, e, f)| Some(
            F::Speed(pb::SpeedFields {
                download_bits_per_second: a,
                upload_bits_per_second: b,
                idle_latency_seconds: c,
                jitter_seconds: d,
                bytes_downloaded: e,
                bytes_uploaded: f,
                ..Default::default()
            })
        )),
        (0u32..20, 0u32..20, o(), o()).prop_map(|(s, r, l, a)| Some(F::Icmp(pb::IcmpFields {
            sent: s,
            received: r,
            loss_ratio: l,
            rtt_avg_seconds: a,
            ..Default::default()
        }))),
        (o(), o()).prop_map(|(c, t)| Some(F::Tcp(pb::TcpFields {
            connect_seconds: c,
            tls_seconds: t
        }))),
        (
            proptest::option::of(prop_oneof![0u32..1200, any::<u32>()]),
            o(),
            o(),
            any::<u64>(),
            o()
        )
            .prop_map(|(s, t, c, b, x)| Some(F::Http(pb::HttpFields {
                status_code: s,
                ttfb_seconds: t,
                connect_seconds: c,
                body_bytes: b,
                tls_cert_expiry_seconds: x,
                ..Default::default()
            }))),
        (o(), any::<u32>(), text(20)).prop_map(|(r, a, c)| Some(F::Dns(pb::DnsFields {
            resolve_seconds: r,
            answers: a,
            rcode: c
        }))),
    ]
    .boxed()
}

fn mutation() -> BoxedStrategy<Mutation> {
    let now_s = now_nanos() / 1_000_000_000;
    prop_oneof![
        1 => text(140).prop_map(Mutation::AgentId),
        1 => prop_oneof![Just(0u64), (i64::MAX as u64 + 1)..=u64::MAX].prop_map(Mutation::Seq),
        3 => text(140).prop_map(Mutation::Test),
        2 => prop_oneof![0i32..7, any::<i32>()].prop_map(Mutation::Kind),
        3 => text(2060).prop_map(Mutation::Target),
        2 => prop_oneof![any::<i64>(), (1_500_000_000i64..now_s + 200_000).prop_map(|s| s * 1_000_000_000)].prop_map(Mutation::StartedAt),
        2 => number().prop_map(Mutation::Duration),
        1 => any::<bool>().prop_map(Mutation::Success),
        2 => text(40).prop_map(Mutation::ErrorClass),
        1 => text(4100).prop_map(Mutation::ErrorMessage),
        3 => proptest::collection::hash_map(text(130), text(130), 0..36).prop_map(Mutation::Labels),
        4 => fields().prop_map(Mutation::Fields),
    ]
    .boxed()
}

fn mutate(r: &mut pb::Result, m: &Mutation) {
    match m.clone() {
        Mutation::AgentId(v) => r.agent_id = v,
        Mutation::Seq(v) => r.seq = v,
        Mutation::Test(v) => r.test = v,
        Mutation::Kind(v) => r.kind = v,
        Mutation::Target(v) => r.target = v,
        Mutation::StartedAt(v) => r.started_at_unix_nanos = v,
        Mutation::Duration(v) => r.duration_seconds = v,
        Mutation::Success(v) => r.success = v,
        Mutation::ErrorClass(v) => r.error_class = v,
        Mutation::ErrorMessage(v) => r.error_message = v,
        Mutation::Labels(v) => r.labels = v,
        Mutation::Fields(v) => r.fields = v,
    }
}

/// A batch: some untouched valid results and 1..=4 results with 0..3 random mutations.
fn batch_plan() -> impl Strategy<Value = (usize, Vec<Vec<Mutation>>)> {
    (
        0usize..3,
        proptest::collection::vec(proptest::collection::vec(mutation(), 0..3), 1..=4),
    )
}

const FUZZ_RESULTS: usize = 10_000;
const FUZZ_WORKERS: usize = 4;

/// What one batch was and what the collector said.
struct Sent {
    results: Vec<pb::Result>,
    acked: bool,
    /// Seqs the ack named as quarantined.
    rejected: Vec<u64>,
}

type Plan = (usize, Vec<Vec<Mutation>>);

/// Batch plans holding `FUZZ_RESULTS / FUZZ_WORKERS` random results, from `seed`.
fn plans(seed: u64) -> Vec<Plan> {
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        proptest::test_runner::Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = batch_plan();
    let mut plans = Vec::new();
    let mut wild = 0;
    while wild < FUZZ_RESULTS / FUZZ_WORKERS {
        let plan = strategy.new_tree(&mut runner).unwrap().current();
        wild += plan.1.len();
        plans.push(plan);
    }
    plans
}

async fn fuzz_worker(
    endpoint: String,
    ca: PathBuf,
    id: String,
    cert: (PathBuf, PathBuf),
    plans: Vec<Plan>,
) -> Vec<Sent> {
    let mut c = client(&endpoint, &ca, Some((&cert.0, &cert.1)))
        .await
        .unwrap();
    let mut session: Option<Session> = None;
    let mut next_seq = 1u64;
    let mut sent = Vec::new();
    for (valid, mutations) in plans {
        let mut results = Vec::new();
        for _ in 0..valid {
            results.push(result(&id, next_seq));
            next_seq += 1;
        }
        for ms in &mutations {
            let mut r = result(&id, next_seq);
            next_seq += 1;
            for m in ms {
                mutate(&mut r, m);
            }
            results.push(r);
        }
        let mut s = match session.take() {
            Some(s) => s,
            None => open(&mut c, hello(&id))
                .await
                .expect("hello of a fuzz agent"),
        };
        let last = results.last().unwrap().seq;
        match s.batch(results.clone()).await {
            Ok(ack) => {
                assert_eq!(ack, last, "ack of an accepted batch");
                let rejected = s.rejected.clone();
                session = Some(s);
                sent.push(Sent {
                    results,
                    acked: true,
                    rejected,
                });
            }
            Err(status)
                if matches!(
                    status.code(),
                    Code::InvalidArgument | Code::PermissionDenied
                ) =>
            {
                sent.push(Sent {
                    results,
                    acked: false,
                    rejected: Vec::new(),
                });
            }
            Err(status) => panic!("unexpected answer {status:?} to {results:?}"),
        }
    }
    sent
}

#[test]
fn random_malformed_results_are_refused_or_stored_valid_never_crash() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    let seed: u64 = std::env::var("EDGEPROBE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz seed: EDGEPROBE_FUZZ_SEED={seed}");

    let generating = Instant::now();
    // Generated in parallel up front: the strategies are neither Send nor fast unoptimized.
    let workers: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..FUZZ_WORKERS)
            .map(|w| scope.spawn(move || plans(seed.wrapping_add(w as u64))))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(w, h)| {
                let id = format!("fz-{w}");
                (id.clone(), pki.agent(&id), h.join().unwrap())
            })
            .collect()
    });
    eprintln!("fuzz: plans generated in {:?}", generating.elapsed());
    let started = Instant::now();
    let outcomes: Vec<(String, Vec<Sent>)> = runtime().block_on(async {
        let tasks: Vec<_> = workers
            .into_iter()
            .map(|(id, cert, plans)| {
                let endpoint = collector.tls_endpoint();
                let ca = pki.ca_pem();
                tokio::spawn(async move {
                    let sent = fuzz_worker(endpoint, ca, id.clone(), cert, plans).await;
                    (id, sent)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.expect("fuzz worker panicked"));
        }
        all
    });
    eprintln!(
        "fuzz: {FUZZ_RESULTS} random results sent in {:?}",
        started.elapsed()
    );

    let mut client = db.client();
    let (mut acked, mut refused, mut quarantined) = (0, 0, 0);
    for (id, sent) in &outcomes {
        let stored: HashMap<i64, (String, String)> = client
            .query(
                "SELECT seq, test, target FROM results WHERE agent_id = $1",
                &[id],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let kept: HashMap<i64, (Vec<u8>, String, bool)> = client
            .query(
                "SELECT seq, raw, raw_format, raw_truncated FROM rejected_results WHERE agent_id = $1",
                &[id],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect();
        let mut expected = 0;
        let mut expected_kept = 0;
        for batch in sent {
            for r in &batch.results {
                let row = i64::try_from(r.seq).ok().and_then(|s| stored.get(&s));
                if batch.acked && batch.rejected.contains(&r.seq) {
                    assert!(row.is_none(), "a quarantined result was stored: {r:?}");
                    let (raw, format, truncated) = kept
                        .get(&(r.seq as i64))
                        .unwrap_or_else(|| panic!("quarantined {r:?} not kept"));
                    assert_eq!(format, "protobuf");
                    if !truncated {
                        // Fields, not the whole message: NaN != NaN.
                        let back = pb::Result::decode(raw.as_slice()).expect("raw decodes");
                        assert_eq!(
                            (back.seq, &back.test, &back.target, &back.labels),
                            (r.seq, &r.test, &r.target, &r.labels),
                            "the raw bytes are the result as sent"
                        );
                    }
                    expected_kept += 1;
                    quarantined += 1;
                } else if batch.acked {
                    assert_eq!(
                        row,
                        Some(&(r.test.clone(), r.target.clone())),
                        "acked result {r:?} not stored as sent"
                    );
                    expected += 1;
                } else if r.seq > 0 && r.seq <= i64::MAX as u64 {
                    assert!(
                        row.is_none(),
                        "a result of a refused batch was stored: {r:?}"
                    );
                }
            }
            if batch.acked {
                acked += 1;
            } else {
                refused += 1;
            }
        }
        assert_eq!(stored.len(), expected, "rows of {id}");
        assert_eq!(kept.len(), expected_kept, "quarantined rows of {id}");
    }
    eprintln!(
        "fuzz: {acked} batches accepted, {refused} refused, {quarantined} results quarantined"
    );
    assert!(
        acked > 50 && refused > 50 && quarantined > 500,
        "fuzz too one-sided: {acked} accepted, {refused} refused, {quarantined} quarantined"
    );
    assert_only_valid_rows(&db);
    assert!(collector.metric("edgeprobe_ingest_errors_total{stage=\"validate\"}") > 0.0);
    agent_delivers(dir.path(), &collector, &db, &pki, "good-agent");
}

#[test]
fn certificates_reload_without_restart_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    let addr = collector.grpc;
    let (cert, key) = pki.agent("rotor");
    let tls = rustls_client(&pki.ca_pem(), Some((&cert, &key)));
    let rt = runtime();
    let served = || rt.block_on(served_cert(addr, tls.clone()));
    let expiry = || collector.metric("edgeprobe_tls_certificate_expiry_timestamp_seconds");
    let first = served();
    assert!(expiry() > 0.0);

    // A new collector certificate, picked up on SIGHUP.
    pki.issue(&[
        "--name",
        "localhost",
        "--server",
        "--san",
        "127.0.0.1",
        "--force",
    ]);
    collector.proc.signal("HUP");
    let second = wait_for(
        Duration::from_secs(10),
        "the new certificate served",
        || Some(served()).filter(|c| *c != first),
    );
    assert_eq!(
        collector.metric("edgeprobe_tls_reloads_total{outcome=\"ok\"}"),
        1.0
    );

    // A second CA joins the client CA bundle: its agents get in after the reload.
    let ca2 = dir.path().join("ca2");
    let (code, _, err) = collector_cmd(&["ca", "init", "--dir", ca2.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = collector_cmd(&[
        "cert",
        "issue",
        "--ca",
        ca2.to_str().unwrap(),
        "--name",
        "newcomer",
        "--out",
        ca2.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (nc, nk) = (ca2.join("newcomer.pem"), ca2.join("newcomer.key"));
    let endpoint = collector.tls_endpoint();
    let newcomer = || {
        rt.block_on(async {
            let mut c = client(&endpoint, &pki.ca_pem(), Some((&nc, &nk))).await?;
            open(&mut c, hello("newcomer"))
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        })
    };
    assert!(newcomer().is_err(), "an agent of an unknown CA got in");
    let mut bundle = std::fs::read(pki.ca_pem()).unwrap();
    bundle.extend(std::fs::read(ca2.join("ca.pem")).unwrap());
    replace_file(&pki.ca_pem(), &bundle);
    collector.proc.signal("HUP");
    wait_for(Duration::from_secs(10), "the CA bundle reloaded", || {
        newcomer().ok()
    });

    // A broken key: logged, counted, and the current certificates stay in service.
    let (_, server_key) = pki.server();
    let good_key = std::fs::read(&server_key).unwrap();
    replace_file(
        &server_key,
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    collector.proc.signal("HUP");
    wait_for(Duration::from_secs(10), "the reload error logged", || {
        collector
            .proc
            .log_text()
            .contains("tls reload failed")
            .then_some(())
    });
    assert_eq!(
        collector.metric("edgeprobe_tls_reloads_total{outcome=\"error\"}"),
        1.0
    );
    assert_eq!(
        served(),
        second,
        "a bad key replaced the serving certificate"
    );
    agent_delivers(dir.path(), &collector, &db, &pki, "rotor");
    replace_file(&server_key, &good_key);

    // Without a signal: the files are polled for changes.
    pki.issue(&[
        "--name",
        "localhost",
        "--server",
        "--san",
        "127.0.0.1",
        "--force",
    ]);
    wait_for(Duration::from_secs(25), "the polled reload", || {
        Some(served()).filter(|c| *c != second)
    });
    agent_delivers(dir.path(), &collector, &db, &pki, "rotor");
    assert_only_valid_rows(&db);
}

#[test]
fn ca_commands_make_distinct_certificates_with_safe_modes_and_refuse_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("fleet-ca");
    let out = dir.path().join("out");
    let (ca_s, out_s) = (ca.to_str().unwrap(), out.to_str().unwrap());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    let (code, stdout, err) = collector_cmd(&["ca", "init", "--dir", ca_s]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("ca.pem"), "{stdout}");
    assert_eq!(mode(&ca), 0o700);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let ca_pem = std::fs::read(ca.join("ca.pem")).unwrap();
    let (code, _, err) = collector_cmd(&["ca", "init", "--dir", ca_s]);
    assert_eq!(code, Some(2));
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(
        std::fs::read(ca.join("ca.pem")).unwrap(),
        ca_pem,
        "CA changed"
    );

    let issue = |extra: &[&str]| {
        let mut args = vec!["cert", "issue", "--ca", ca_s, "--out", out_s];
        args.extend_from_slice(extra);
        collector_cmd(&args)
    };
    assert_eq!(issue(&["--name", "branch-042"]).0, Some(0));
    assert_eq!(mode(&out.join("branch-042.key")), 0o600);
    assert_eq!(mode(&out.join("branch-042.pem")), 0o644);
    let (code, _, err) = issue(&["--name", "branch-042"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--force"), "{err}");
    let before = std::fs::read(out.join("branch-042.pem")).unwrap();
    assert_eq!(issue(&["--name", "branch-042", "--force"]).0, Some(0));
    assert_ne!(std::fs::read(out.join("branch-042.pem")).unwrap(), before);
    for bad in [
        vec!["--name", "../escape"],
        vec!["--name", "a b"],
        vec!["--name", "x", "--san", "y"],
        vec!["--name", "c.example", "--server", "--san", "not a name"],
        vec!["--name", "x", "--days", "0"],
    ] {
        let (code, _, err) = issue(&bad);
        assert_eq!(code, Some(2), "{bad:?}: {err}");
    }
    assert!(!dir.path().join("escape.pem").exists());
    assert_eq!(
        issue(&[
            "--name",
            "collector.example.net",
            "--server",
            "--san",
            "10.1.2.3",
            "--san",
            "collector"
        ])
        .0,
        Some(0)
    );

    let parse = |name: &str| std::fs::read(out.join(format!("{name}.pem"))).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let agent_pem = parse("branch-042");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&agent_pem).unwrap();
    let agent = pem.parse_x509().unwrap();
    assert_eq!(
        agent
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "branch-042"
    );
    let eku = agent.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!agent.is_ca());
    let days = (agent.validity().not_after.timestamp() - now) / 86_400;
    assert!((396..=397).contains(&days), "{days} days");

    let server_pem = parse("collector.example.net");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&server_pem).unwrap();
    let server = pem.parse_x509().unwrap();
    let eku = server.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    use x509_parser::extensions::GeneralName;
    let sans = &server
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(sans.len(), 3, "{sans:?}");
    assert!(
        sans.contains(&GeneralName::DNSName("collector.example.net")),
        "{sans:?}"
    );
    assert!(
        sans.contains(&GeneralName::IPAddress(&[10, 1, 2, 3])),
        "{sans:?}"
    );
    assert!(
        sans.contains(&GeneralName::DNSName("collector")),
        "{sans:?}"
    );

    let (_, pem) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
    let ca_cert = pem.parse_x509().unwrap();
    assert!(ca_cert.is_ca());
    assert_eq!(
        ca_cert
            .basic_constraints()
            .unwrap()
            .unwrap()
            .value
            .path_len_constraint,
        Some(0)
    );
    let ca_years = (ca_cert.validity().not_after.timestamp() - now) / (365 * 86_400);
    assert!((9..=10).contains(&ca_years), "{ca_years}");
}

#[test]
fn the_database_password_never_reaches_logs_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "Sup3r-Secret-Pw";
    let url = format!("postgres://edgeprobe:{secret}@127.0.0.1:1/edgeprobe");

    // `run` against an unreachable server: it retries and logs, without the URL.
    let (http, grpc) = (free_addr(), free_addr());
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[server]\ninsecure = true\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\n"),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(collector_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("EDGEPROBE_DATABASE_URL", &url)
        .env("RUST_LOG", "debug");
    let mut p = Proc::spawn(cmd, dir.path().join("run.log"));
    wait_for(Duration::from_secs(10), "the database error logged", || {
        p.log_text().contains("database not ready").then_some(())
    });
    p.kill9();
    let log = p.log_text();
    assert!(!log.contains(secret), "password in the log: {log}");

    for url in [
        url.clone(),
        format!("postgres://edgeprobe:{secret}@127.0.0.1:notaport/x"),
    ] {
        let (code, out, err) = collector_cmd(&["migrate", "--database-url", &url]);
        assert_ne!(code, Some(0));
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "password in: {out}{err}"
        );
    }
}
