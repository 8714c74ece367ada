//! What one client can hold of a running collector (issue 16, gap 3), from outside over
//! mTLS: streams of one certificate that send batches and never read their acks, a
//! 4 MiB message of near-empty results, and the cap on streams per HTTP/2 connection.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use edgeprobe_proto::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
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

/// Sends bytes as they are (a message the test never builds in memory); decodes replies.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;
struct ReplyDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = pb::CollectorMessage;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ReplyDecoder {
    type Item = pb::CollectorMessage;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        pb::CollectorMessage::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

async fn channel(endpoint: &str, ca: &Path, cert: &Path, key: &Path, window: u32) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        // A small receive window: a client that reads nothing fills it with a few acks.
        .initial_stream_window_size(window)
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Opens a stream that sends what `rx` yields as raw message bytes.
async fn raw_stream(
    channel: Channel,
    rx: mpsc::Receiver<Bytes>,
) -> Result<Streaming<pb::CollectorMessage>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/edgeprobe.v1.Ingest/Stream");
    Ok(grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await?
        .into_inner())
}

fn encode(m: pb::agent_message::Msg) -> Bytes {
    pb::AgentMessage { msg: Some(m) }.encode_to_vec().into()
}

fn hello(id: &str) -> Bytes {
    encode(pb::agent_message::Msg::Hello(pb::Hello {
        agent_id: id.to_string(),
        version: "test".into(),
        incarnation: format!("{id}-incarnation"),
        ..Default::default()
    }))
}

fn result(id: &str, seq: u64) -> pb::Result {
    http_result(id, seq, now_nanos() - 60_000_000_000)
}

fn batch(results: Vec<pb::Result>) -> Bytes {
    encode(pb::agent_message::Msg::Batch(pb::ResultBatch { results }))
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// 4 MiB of empty results (2 bytes each on the wire, some hundreds decoded) is refused
/// from a scan of its bytes; the collector's peak memory barely moves.
#[test]
fn near_empty_results_are_refused_before_they_are_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    let (cert, key) = pki.agent("hoarder");
    let before = peak_rss(collector.proc.pid());

    // AgentMessage.batch (field 2) holding ~2 million empty ResultBatch.results (field 1).
    let count = (4 << 20) / 2 - 16;
    let mut inner = Vec::with_capacity(count * 2);
    for _ in 0..count {
        inner.extend_from_slice(&[0x0a, 0x00]);
    }
    let mut message = vec![0x12];
    prost::encoding::encode_varint(inner.len() as u64, &mut message);
    message.extend_from_slice(&inner);
    assert!(message.len() <= 4 << 20);

    let status = runtime().block_on(async {
        let ch = channel(
            &collector.tls_endpoint(),
            &pki.ca_pem(),
            &cert,
            &key,
            1 << 20,
        )
        .await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(hello("hoarder")).await.unwrap();
        let mut inbound = raw_stream(ch, rx).await.unwrap();
        let welcome = inbound.message().await.unwrap().unwrap();
        assert!(matches!(
            welcome.msg,
            Some(pb::collector_message::Msg::Welcome(_))
        ));
        tx.send(Bytes::from(message)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("an answer to the batch")
            .expect_err("the batch is refused")
    });
    let after = peak_rss(collector.proc.pid());
    let grew = after.saturating_sub(before);
    eprintln!(
        "peak RSS {} MiB -> {} MiB (+{} MiB) for a 4 MiB message of {count} empty results: {status:?}",
        before >> 20,
        after >> 20,
        grew >> 20
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("refused before decoding"),
        "{status:?}"
    );
    assert!(
        grew < 64 << 20,
        "the collector's peak RSS grew by {} MiB",
        grew >> 20
    );
    assert_eq!(db.scalar("SELECT count(*) FROM results"), 0);
    assert!(collector.metric("edgeprobe_ingest_errors_total{stage=\"validate\"}") >= 1.0);
}

/// Quarantined results: each ack names 16 with a 200-byte reason, so an ack or two fill
/// a 1 KiB receive window.
fn quarantined(id: &str, first: u64) -> Vec<pb::Result> {
    (first..first + 16)
        .map(|seq| {
            let mut r = result(id, seq);
            r.labels = (0..33)
                .map(|i| (format!("k{i}"), "v".repeat(200)))
                .collect();
            r
        })
        .collect()
}

/// 60 streams of one certificate, opened one after another, each sending batches until
/// the collector stops reading it and never reading an ack, while 10 other agents land
/// batches: the others keep landing (p99 of their acks under 1 s), every replaced session
/// is counted, and the in-flight budget is not held by the hoarder.
#[test]
fn streams_that_read_no_acks_hold_only_their_own_share() {
    const STREAMS: usize = 60;
    const AGENTS: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    let endpoint = collector.tls_endpoint();
    let (cert, key) = pki.agent("hoarder");
    let good: Vec<_> = (0..AGENTS)
        .map(|i| pki.agent(&format!("good{i}")))
        .collect();

    let rt = runtime();
    let (latencies, stuck) = rt.block_on(async {
        // The hoarder: each stream sends until its sends stop going through.
        let mut held = Vec::new();
        let mut stuck = 0;
        let mut seq = 1;
        for _ in 0..STREAMS {
            let ch = channel(&endpoint, &pki.ca_pem(), &cert, &key, 1024).await;
            let (tx, rx) = mpsc::channel(2);
            tx.send(hello("hoarder")).await.unwrap();
            let inbound =
                match tokio::time::timeout(Duration::from_secs(5), raw_stream(ch, rx)).await {
                    Ok(Ok(s)) => s,
                    _ => continue,
                };
            for _ in 0..2000 {
                let b = batch(quarantined("hoarder", seq));
                seq += 16;
                if tx
                    .send_timeout(b, Duration::from_millis(500))
                    .await
                    .is_err()
                {
                    stuck += 1;
                    break;
                }
            }
            held.push((tx, inbound));
        }

        // The fleet, while every hoarder stream is still open.
        let mut tasks = Vec::new();
        for (i, (cert, key)) in good.iter().enumerate() {
            let ch = channel(&endpoint, &pki.ca_pem(), cert, key, 1 << 20).await;
            let id = format!("good{i}");
            tasks.push(tokio::spawn(async move {
                let (tx, rx) = mpsc::channel(4);
                tx.send(hello(&id)).await.unwrap();
                let mut inbound = raw_stream(ch, rx).await.unwrap();
                inbound.message().await.unwrap().unwrap(); // welcome
                let mut latencies = Vec::new();
                let end = Instant::now() + Duration::from_secs(15);
                let mut seq = 1;
                while Instant::now() < end {
                    let results: Vec<_> = (seq..seq + 10).map(|s| result(&id, s)).collect();
                    seq += 10;
                    let sent = Instant::now();
                    tx.send(batch(results)).await.unwrap();
                    match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
                        Ok(Ok(Some(pb::CollectorMessage {
                            msg: Some(pb::collector_message::Msg::Ack(a)),
                        }))) => assert_eq!(a.seq, seq - 1),
                        other => panic!("{id}: no ack within 10 s: {other:?}"),
                    }
                    latencies.push(sent.elapsed());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        drop(held);
        (all, stuck)
    });

    let p = p99(latencies.clone());
    let replaced = collector.metric("edgeprobe_agent_sessions_replaced_total");
    eprintln!(
        "{STREAMS} hoarder streams ({stuck} stopped being read), {AGENTS} agents: {} acks, p99 {:?}, max {:?}; sessions replaced {replaced}",
        latencies.len(),
        p,
        latencies.iter().max().unwrap()
    );
    assert!(
        stuck >= STREAMS / 2,
        "only {stuck} hoarder streams filled up"
    );
    assert!(p < Duration::from_secs(1), "p99 {p:?}");
    assert!(latencies.len() >= AGENTS * 50, "{} acks", latencies.len());
    assert!(
        replaced >= (STREAMS - 1) as f64,
        "{replaced} sessions replaced"
    );
    for i in 0..AGENTS {
        let id = format!("good{i}");
        let n: i64 = db
            .client()
            .query_one("SELECT count(*) FROM results WHERE agent_id = $1", &[&id])
            .unwrap()
            .get(0);
        assert!(n >= 500, "{id}: {n} rows");
    }
}

/// The server's HTTP/2 SETTINGS as a client with `cert` sees them: (identifier, value).
async fn server_settings(
    addr: std::net::SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Vec<(u16, u32)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect(),
        PrivateKeyDer::from_pem_file(key).unwrap(),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    loop {
        let mut header = [0u8; 9];
        tls.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload).await.unwrap();
        // SETTINGS (type 4) without the ACK flag.
        if header[3] == 4 && header[4] & 1 == 0 {
            return payload
                .chunks(6)
                .map(|e| {
                    (
                        u16::from_be_bytes([e[0], e[1]]),
                        u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
                    )
                })
                .collect();
        }
    }
}

/// The collector announces its cap on concurrent streams per connection
/// (SETTINGS_MAX_CONCURRENT_STREAMS, identifier 3); h2 clients honour it and h2 refuses
/// the streams of one that does not.
#[test]
fn one_connection_may_hold_only_a_few_streams() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector = Collector::start_tls(dir.path(), &db, &pki, &[]);
    let (cert, key) = pki.agent("hoarder");
    let settings = runtime().block_on(server_settings(collector.grpc, &pki.ca_pem(), &cert, &key));
    eprintln!("server SETTINGS: {settings:?}");
    let max_streams = settings.iter().find(|(id, _)| *id == 3).map(|(_, v)| *v);
    assert_eq!(max_streams, Some(4), "{settings:?}");
}

/// A stream whose peer reads no ack holds its share only until the ack stall (2 s here,
/// 60 s by default): then it is closed and counted, and the budget is whole again.
#[test]
fn a_peer_that_reads_no_acks_is_closed_after_the_stall() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let collector =
        Collector::start_tls(dir.path(), &db, &pki, &[("EDGEPROBE_ACK_STALL_MS", "2000")]);
    let (cert, key) = pki.agent("hoarder");
    let in_flight = "edgeprobe_ingest_in_flight_batches";
    let rt = runtime();
    let (held, stuck_at) = rt.block_on(async {
        let ch = channel(&collector.tls_endpoint(), &pki.ca_pem(), &cert, &key, 1024).await;
        let (tx, rx) = mpsc::channel(2);
        tx.send(hello("hoarder")).await.unwrap();
        let inbound = raw_stream(ch, rx).await.unwrap();
        let mut seq = 1;
        let mut stuck_at = None;
        for _ in 0..2000 {
            let b = batch(quarantined("hoarder", seq));
            seq += 16;
            if tx
                .send_timeout(b, Duration::from_millis(500))
                .await
                .is_err()
            {
                stuck_at = Some(Instant::now());
                break;
            }
        }
        (
            (tx, inbound),
            stuck_at.expect("the collector stopped reading the stream"),
        )
    });
    // While stuck, the stream holds its share, and no more.
    let holding = collector.metric(in_flight);
    eprintln!("stuck stream holds {holding} batches");
    assert!(
        (1.0..=4.0).contains(&holding),
        "{holding} batches in flight"
    );
    let freed = wait_for(
        Duration::from_secs(20),
        "the stalled stream to be closed",
        || {
            (collector.metric("edgeprobe_ingest_errors_total{stage=\"ack_stall\"}") == 1.0
                && collector.metric(in_flight) == 0.0)
                .then(|| stuck_at.elapsed())
        },
    );
    eprintln!("closed {freed:?} after the stream stopped being read");
    drop(held);
}
