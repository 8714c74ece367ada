//! speed probe: download and upload goodput over parallel HTTP streams, idle latency,
//! jitter and latency under load, against a LibreSpeed-protocol target (our
//! `serve-target` or a stock LibreSpeed backend). docs/PROBES.md has the methodology.
//!
//! One run: resolve once; find the endpoints (see `Layout`); `pings` round trips of
//! `GET empty` on a kept-alive connection give the idle latency (median) and jitter (mean
//! absolute difference of consecutive round trips); then each direction for `duration`:
//! `streams` connections each repeating `GET garbage?ckSize=100` (download) or
//! `POST empty` with an 8 MiB random body (upload), while the ping connection keeps
//! timing round trips (loaded latency, median). Goodput counts payload bytes only between
//! the end of the warm-up and the end of the direction: bits / seconds of that window.
//! Download bytes are counted as read; upload bytes as the peer acknowledged them
//! (`conn::Acked`). Every request carries `test=<random id of this run>`.
//!
//! Loss under load (SPEC section 17): when the target's host reflects STAMP (UDP 862: up to
//! five test packets after the idle latency, one reflection within 600 ms decides), a light
//! STAMP stream (`stamp::loaded_stream`: 44-byte packets paced to 0.5 % of the warm-up's
//! rate, 2 to 50 per second) runs from the end of each direction's warm-up:
//! `download_loaded_loss_ratio` is its reverse loss during the download (the saturated
//! direction is towards us), `upload_loaded_loss_ratio` its forward loss
//! during the upload; both `None` against a target without a reflector (stock LibreSpeed).
//!
//! Invariants: every stream and connection of a direction is gone before the next
//! direction starts; a 503 anywhere is `busy`; a download that ends short of what it asked
//! for is `protocol` with no rate (the target does not send data); a stream that breaks
//! is counted in `streams_failed` and the others carry on (the direction fails only when
//! none is left); an upload answered before its body was sent, whose connection then does
//! not take the rest, is such a broken stream (`protocol`), and its bytes after the
//! request began are not counted; a lost ping is no sample, and idle latency needs at least half of its
//! pings answered; a direction that moves no payload fails.

pub(crate) mod conn;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, SizeHint};
use hyper::Method;
use rand::RngCore;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use self::conn::{Conn, Endpoint, Use};
use super::{
    addr, secs, ErrorClass, Fields, Measured, Partial, ProbeError, ProbeSpec, SpeedFields,
};

pub const DEFAULT_DURATION: Duration = edgeprobe_proto::testdef::defaults::SPEED_DURATION;
pub const DEFAULT_DOWNLOAD_STREAMS: u32 = 6;
pub const DEFAULT_UPLOAD_STREAMS: u32 = 3;
/// Start of each direction excluded from the rate; at most half the duration.
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(2);
/// Idle round trips; also the floor.
pub const DEFAULT_PINGS: u32 = 10;
const MAX_PINGS: u32 = 1000;
const MAX_STREAMS: u32 = 64;
/// Time between loaded round trips, at least.
const LOADED_PING_INTERVAL: Duration = Duration::from_millis(100);
/// Time between loaded round trips, at most.
const LOADED_PING_MAX_INTERVAL: Duration = Duration::from_secs(1);
/// Wire bits of one round trip (request, answer and their ACKs with TCP/IP headers,
/// rounded up): the load the pings add to the link.
const PING_WIRE_BITS: f64 = 8.0 * 800.0;
/// Share of the link the loaded pings may take: they are traffic iperf3 does not send,
/// 10 per second would be over 2 % of a 1 Mbit/s link.
const PING_SHARE: f64 = 0.002;
/// Wire bits of one loaded-loss STAMP packet (44 bytes, UDP, IPv6 and Ethernet headers with
/// preamble and gap, rounded up); its reflection is as long the other way.
const LOSS_STREAM_WIRE_BITS: f64 = 8.0 * 140.0;
/// Share of the link the loaded-loss stream may take, each way.
const LOSS_STREAM_SHARE: f64 = 0.005;
/// Packets per second of the loaded-loss stream on the slowest links, whatever its share.
const LOSS_STREAM_MIN_RATE: u32 = 2;
/// One round trip longer than this is lost.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// `ckSize` of each download request, as LibreSpeed's client asks.
const DOWNLOAD_MIB: u32 = 100;
/// Bytes each download request asks for.
const DOWNLOAD_BYTES: u64 = (DOWNLOAD_MIB as u64) << 20;
/// Body of each upload request.
const UPLOAD_REQUEST_BYTES: u64 = 8 << 20;
/// Upload body frames, slices of one random buffer.
const UPLOAD_FRAME: usize = 64 * 1024;
const PROGRESS_TICK: Duration = Duration::from_millis(250);

static PROGRESS: AtomicBool = AtomicBool::new(false);

/// Shows a progress line on stderr during speed runs (the one-shot command on a terminal).
pub fn show_progress(on: bool) {
    PROGRESS.store(on, Ordering::Relaxed);
}

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let mut fields = SpeedFields::default();
    let error = measure(spec, &mut fields, partial).await.err();
    if PROGRESS.load(Ordering::Relaxed) {
        eprint!("\r\x1b[2K");
    }
    (Fields::Speed(fields), error)
}

/// Which URL layout the target uses, relative to the target URL's path.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    garbage: String,
    empty: String,
}

/// Candidates in order: ours (`/garbage`, `/empty`), LibreSpeed's default install
/// (`/backend/garbage.php`), and a LibreSpeed backend directory given as the URL
/// (`/garbage.php`). The first whose `empty` answers 2xx wins.
fn layouts(base: &str) -> [Layout; 3] {
    let base = base.trim_end_matches('/');
    let layout = |garbage: &str, empty: &str| Layout {
        garbage: format!("{base}{garbage}"),
        empty: format!("{base}{empty}"),
    };
    [
        layout("/garbage", "/empty"),
        layout("/backend/garbage.php", "/backend/empty.php"),
        layout("/garbage.php", "/empty.php"),
    ]
}

/// The target URL's scheme, host and address (resolved once per run). Parsed like the http
/// probe's targets (`addr::HttpUrl`): an IPv6 zone (`http://[fe80::2%25eth0]:8080`) is
/// kept for the connect, and `Host` carries host[:port] only, never credentials or zone.
async fn endpoint(spec: &ProbeSpec, url: &addr::HttpUrl) -> Result<Endpoint, ProbeError> {
    let port = url.port();
    let bare = url
        .url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Endpoint {
        https: url.https(),
        addr: addr::resolve(&url.host(), port, &spec.link).await?,
        link: spec.link.clone(),
        host: bare,
        authority: url.authority(),
        insecure_tls: spec.options.insecure_tls.unwrap_or(false),
        test_id: format!("{:016x}", rand::random::<u64>()),
    })
}

/// Publishes each direction's figures to `partial` as it ends, so a run cut off by its
/// whole-run limit keeps the idle latency and the download it measured.
async fn measure(
    spec: &ProbeSpec,
    fields: &mut SpeedFields,
    partial: &Partial,
) -> Result<(), ProbeError> {
    let o = &spec.options;
    let duration = o
        .duration
        .unwrap_or(DEFAULT_DURATION)
        .max(Duration::from_millis(200));
    let warmup = o.warmup.unwrap_or(DEFAULT_WARMUP).min(duration / 2);
    let down_streams = o
        .download_streams
        .or(o.streams)
        .unwrap_or(DEFAULT_DOWNLOAD_STREAMS);
    let up_streams = o
        .upload_streams
        .or(o.streams)
        .unwrap_or(DEFAULT_UPLOAD_STREAMS);
    let pings = o
        .pings
        .unwrap_or(DEFAULT_PINGS)
        .clamp(DEFAULT_PINGS, MAX_PINGS);

    let url =
        addr::HttpUrl::parse(&spec.target).map_err(|e| ProbeError::new(ErrorClass::Local, e))?;
    let endpoint = Arc::new(endpoint(spec, &url).await?);

    let mut pinger = Pinger::new(endpoint.clone());
    let layout = detect(&mut pinger, url.url.path()).await?;
    tracing::debug!(target = %spec.target, ?layout, "speed endpoints");

    progress(format_args!("idle latency"));
    let idle = idle_pings(&mut pinger, &layout.empty, pings).await;
    fields.idle_latency_seconds = median(&idle.rtts).map(secs);
    fields.jitter_seconds = jitter(&idle.rtts).map(secs);
    if let Some(e) = idle.error {
        return Err(e);
    }
    // Loss under load (SPEC section 17): a STAMP reflector on the target's host.
    let stamp_at = {
        let mut a = endpoint.addr;
        a.set_port(edgeprobe_proto::testdef::defaults::STAMP_PORT);
        a
    };
    let reflects = super::stamp::reflects(stamp_at, &spec.link).await;
    tracing::debug!(target = %spec.target, %stamp_at, reflects, "speed: STAMP reflector");
    partial.publish(Fields::Speed(fields.clone()), "measuring the download");

    let plan = Plan {
        endpoint: endpoint.clone(),
        duration,
        warmup,
        stamp: reflects.then(|| (stamp_at, spec.link.clone())),
    };
    let (down, error, back) = plan
        .direction(Direction::Download, down_streams, &layout, pinger)
        .await;
    // The saturated direction of a download is the way back.
    fields.download_loaded_loss_ratio = down.loss.and_then(|l| l.1);
    pinger = back;
    fields.streams_failed += down.streams_failed;
    fields.bytes_downloaded = down.bytes;
    fields.download_bits_per_second = down.bits_per_second;
    fields.download_loaded_latency_seconds = median(&down.loaded).map(secs);
    if let Some(e) = error {
        return Err(e);
    }
    partial.publish(Fields::Speed(fields.clone()), "measuring the upload");

    let (up, error, _) = plan
        .direction(Direction::Upload, up_streams, &layout, pinger)
        .await;
    // The saturated direction of an upload is the way out.
    fields.upload_loaded_loss_ratio = up.loss.and_then(|l| l.0);
    fields.streams_failed += up.streams_failed;
    fields.bytes_uploaded = up.bytes;
    fields.upload_bits_per_second = up.bits_per_second;
    fields.upload_loaded_latency_seconds = median(&up.loaded).map(secs);
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Idle {
    rtts: Vec<Duration>,
    error: Option<ProbeError>,
}

/// `pings` idle round trips. A lost one (no answer in time, a broken connection) is no
/// sample; fewer than half answered fails the run with what came back. An answer that is
/// not 2xx (busy, wrong status) fails it at once.
async fn idle_pings(pinger: &mut Pinger, empty: &str, pings: u32) -> Idle {
    let floor = pings.div_ceil(2) as usize;
    let mut rtts = Vec::with_capacity(pings as usize);
    let mut lost = Vec::new();
    for sent in 1..=pings as usize {
        match pinger.ping(empty).await {
            Ok(rtt) => rtts.push(rtt),
            Err(e) if lost_ping(&e) => {
                tracing::debug!(error = %e.message, "idle ping lost");
                lost.push(e);
            }
            Err(e) => {
                return Idle {
                    rtts,
                    error: Some(e),
                }
            }
        }
        if rtts.len() + (pings as usize - sent) < floor {
            break;
        }
    }
    let error = (rtts.len() < floor).then(|| {
        let last = lost.pop().expect("pings were lost");
        ProbeError::new(
            last.class,
            format!(
                "only {} of {pings} idle pings answered (at least {floor} needed); last: {}",
                rtts.len(),
                last.message
            ),
        )
    });
    Idle { rtts, error }
}

/// A ping whose failure says nothing about the target's answer: a sample lost.
fn lost_ping(e: &ProbeError) -> bool {
    matches!(
        e.class,
        ErrorClass::Timeout | ErrorClass::Refused | ErrorClass::Protocol | ErrorClass::Other
    )
}

/// Finds the layout whose `empty` endpoint answers; the answer also warms the ping
/// connection.
async fn detect(pinger: &mut Pinger, base: &str) -> Result<Layout, ProbeError> {
    let mut tried = Vec::new();
    for layout in layouts(base) {
        match pinger.ping(&layout.empty).await {
            Ok(_) => return Ok(layout),
            Err(e) if e.class == ErrorClass::HttpStatus => tried.push(e.message),
            Err(e) => return Err(e),
        }
    }
    Err(ProbeError::new(
        ErrorClass::HttpStatus,
        format!("no LibreSpeed endpoints found: {}", tried.join("; ")),
    ))
}

/// Round trips of `GET empty` on one kept-alive connection, reopened when needed (not
/// timed).
struct Pinger {
    endpoint: Arc<Endpoint>,
    conn: Option<Conn<Empty<Bytes>>>,
    /// A ping was cancelled mid-flight: its connection state is unknown.
    interrupted: bool,
    sent: u64,
}

impl Pinger {
    fn new(endpoint: Arc<Endpoint>) -> Self {
        Pinger {
            endpoint,
            conn: None,
            interrupted: false,
            sent: 0,
        }
    }

    async fn ping(&mut self, path: &str) -> Result<Duration, ProbeError> {
        let kept = self.conn.take().filter(|_| !self.interrupted);
        let mut conn = self.endpoint.reuse_or_open(kept, Use::Ping).await?;
        self.sent += 1;
        let path = format!("{path}?test={}&r={}", self.endpoint.test_id, self.sent);
        self.interrupted = true;
        let start = Instant::now();
        let round_trip = async {
            let response = conn
                .send(&self.endpoint, Method::GET, &path, Empty::new())
                .await?;
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| conn::hyper_error(&path, e))?;
            Ok::<_, ProbeError>(start.elapsed())
        };
        let took = timeout(PING_TIMEOUT, round_trip)
            .await
            .unwrap_or_else(|_| {
                Err(ProbeError::new(
                    ErrorClass::Timeout,
                    format!("GET {path}: no answer within {PING_TIMEOUT:?}"),
                ))
            })?;
        self.interrupted = false;
        self.conn = Some(conn);
        Ok(took)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    Download,
    Upload,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        }
    }
}

struct Plan {
    endpoint: Arc<Endpoint>,
    duration: Duration,
    warmup: Duration,
    /// The target host's STAMP reflector, when it has one: the loaded-loss stream's peer.
    stamp: Option<(std::net::SocketAddr, addr::Link)>,
}

#[derive(Default)]
struct DirectionResult {
    bits_per_second: Option<f64>,
    bytes: u64,
    loaded: Vec<Duration>,
    streams_failed: u32,
    /// The loaded-loss stream's (forward, reverse) loss ratios; `None` without a reflector
    /// or when the direction ended before its warm-up did.
    loss: Option<(Option<f64>, Option<f64>)>,
}

/// How a stream ended (streams run until aborted, so any end is a failure).
enum StreamEnd {
    /// This stream's connection broke (reset, cut body): the others carry on.
    Broken(ProbeError),
    /// The target answered something that ends the run (busy, a status, a short body).
    Fatal(ProbeError),
}

impl StreamEnd {
    /// A failure from a request: the target's answer is fatal, the connection's fate not.
    fn of(e: ProbeError) -> StreamEnd {
        match e.class {
            ErrorClass::Busy | ErrorClass::HttpStatus | ErrorClass::Tls | ErrorClass::Local => {
                StreamEnd::Fatal(e)
            }
            _ => StreamEnd::Broken(e),
        }
    }
}

/// Payload bytes of a direction so far: download bytes as read; upload bytes as the peer
/// acknowledged them, or as handed to hyper where the kernel does not say.
#[derive(Clone)]
struct Meter {
    counted: Arc<AtomicU64>,
    acked: Option<Arc<conn::Acked>>,
}

impl Meter {
    fn bytes(&self) -> u64 {
        self.acked
            .as_ref()
            .and_then(|a| a.total())
            .unwrap_or_else(|| self.counted.load(Ordering::Relaxed))
    }
}

impl Plan {
    /// One direction: streams for `duration`, loaded pings after the warm-up. Hands the
    /// pinger back for the next direction.
    async fn direction(
        &self,
        direction: Direction,
        streams: u32,
        layout: &Layout,
        pinger: Pinger,
    ) -> (DirectionResult, Option<ProbeError>, Pinger) {
        let counter = Arc::new(AtomicU64::new(0));
        let meter = Meter {
            counted: counter.clone(),
            acked: (direction == Direction::Upload).then(Arc::default),
        };
        let start = Instant::now();
        let warm_at = start + self.warmup;
        let end_at = start + self.duration;
        let payload = random_payload();
        let mut set = JoinSet::new();
        let streams = streams.clamp(1, MAX_STREAMS);
        for _ in 0..streams {
            let endpoint = self.endpoint.clone();
            let counter = counter.clone();
            match &meter.acked {
                None => set.spawn(download_stream(endpoint, layout.garbage.clone(), counter)),
                Some(acked) => set.spawn(upload_stream(
                    endpoint,
                    layout.empty.clone(),
                    counter,
                    acked.clone(),
                    payload.clone(),
                )),
            };
        }
        let stop_pings = CancellationToken::new();
        let mut pings = AbortOnDrop(tokio::spawn(loaded_pings(
            pinger,
            layout.empty.clone(),
            (start, warm_at),
            meter.clone(),
            stop_pings.clone(),
        )));

        let mut result = DirectionResult::default();
        let mut error = None;
        let mut first_broken = None;
        let mut warm: Option<(Instant, u64)> = None;
        // The loaded-loss stream: from the end of the warm-up, as the loaded pings, paced to
        // a share of the warm-up's rate.
        let stop_loss = CancellationToken::new();
        let mut loss_stream = None;
        let mut tick = tokio::time::interval(PROGRESS_TICK);
        loop {
            tokio::select! {
                Some(joined) = set.join_next() => {
                    let broken = match joined {
                        Ok(StreamEnd::Fatal(e)) => {
                            error = Some(e);
                            break;
                        }
                        Ok(StreamEnd::Broken(e)) => e,
                        Err(join) => ProbeError::new(
                            ErrorClass::Other,
                            format!("{} stream failed internally: {join}", direction.name()),
                        ),
                    };
                    result.streams_failed += 1;
                    tracing::info!(
                        direction = direction.name(),
                        error = %broken.message,
                        failed = result.streams_failed,
                        streams,
                        "speed stream broke; the others carry on",
                    );
                    let first = first_broken.get_or_insert(broken);
                    if result.streams_failed == streams {
                        error = Some(first.clone());
                        break;
                    }
                }
                _ = sleep_until(warm_at), if warm.is_none() => {
                    let now = Instant::now();
                    let bytes = meter.bytes();
                    warm = Some((now, bytes));
                    let warm_rate = bits_per_second(bytes, now - start);
                    loss_stream = self.stamp.as_ref().map(|(at, link)| {
                        AbortOnDrop(tokio::spawn(super::stamp::loaded_stream(
                            *at,
                            link.clone(),
                            loss_stream_rate(warm_rate),
                            stop_loss.clone(),
                        )))
                    });
                }
                _ = sleep_until(end_at) => {
                    let (warm_t, warm_bytes) = warm.unwrap_or((start, 0));
                    let bytes = meter.bytes().saturating_sub(warm_bytes);
                    let window = secs(Instant::now() - warm_t);
                    result.bits_per_second = Some(bytes as f64 * 8.0 / window);
                    if bytes == 0 {
                        error = Some(ProbeError::new(
                            ErrorClass::Timeout,
                            format!("{}: no payload moved in {:?}", direction.name(), self.duration),
                        ));
                    }
                    break;
                }
                _ = tick.tick(), if PROGRESS.load(Ordering::Relaxed) => {
                    let elapsed = start.elapsed();
                    let rate = bits_per_second(meter.bytes(), elapsed);
                    progress(format_args!(
                        "{:<8} {:>9.2} Mbit/s  {:>4.1}/{:.0} s",
                        direction.name(),
                        rate / 1e6,
                        secs(elapsed),
                        secs(self.duration),
                    ));
                }
            }
        }
        // Stop the streams and wait until their connections are gone.
        set.abort_all();
        while set.join_next().await.is_some() {}
        result.bytes = meter.bytes();
        stop_pings.cancel();
        let (pinger, loaded) = match (&mut pings.0).await {
            Ok(done) => done,
            Err(_) => (Pinger::new(self.endpoint.clone()), Vec::new()),
        };
        result.loaded = loaded;
        stop_loss.cancel();
        if let Some(mut stream) = loss_stream {
            result.loss = (&mut stream.0).await.ok();
        }
        (result, error, pinger)
    }
}

/// Aborts the task when dropped, so a run cut short by its time limit leaves nothing
/// running behind it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Repeats `GET garbage` until aborted, counting payload bytes; returns only on failure.
/// Each answer must carry the `ckSize` MiB asked for: a target that sends less (an HTML
/// page from a broken install, a captive portal) is not a slow link.
async fn download_stream(
    endpoint: Arc<Endpoint>,
    garbage: String,
    counter: Arc<AtomicU64>,
) -> StreamEnd {
    let mut conn: Option<Conn<Empty<Bytes>>> = None;
    for n in 0u64.. {
        let mut c = match endpoint.reuse_or_open(conn.take(), Use::Download).await {
            Ok(c) => c,
            Err(e) => return StreamEnd::of(e),
        };
        let path = format!(
            "{garbage}?ckSize={DOWNLOAD_MIB}&test={}&r={n}",
            endpoint.test_id
        );
        let response = match c.send(&endpoint, Method::GET, &path, Empty::new()).await {
            Ok(response) => response,
            Err(e) => return StreamEnd::of(e),
        };
        if let Some(length) = response.body().size_hint().exact() {
            if length < DOWNLOAD_BYTES {
                return StreamEnd::Fatal(short_download(&path, length, "announced"));
            }
        }
        let mut body = response.into_body();
        let mut got = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        got += data.len() as u64;
                        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                Err(e) => return StreamEnd::of(conn::hyper_error(&path, e)),
            }
        }
        if got < DOWNLOAD_BYTES {
            return StreamEnd::Fatal(short_download(&path, got, "sent"));
        }
        conn = Some(c);
    }
    unreachable!("the request counter does not run out")
}

fn short_download(path: &str, bytes: u64, how: &str) -> ProbeError {
    ProbeError::new(
        ErrorClass::Protocol,
        format!(
            "GET {path}: {how} {bytes} bytes, asked for {DOWNLOAD_MIB} MiB: \
             the target does not serve test data"
        ),
    )
}

/// Repeats `POST empty` with a sized random body until aborted; its connections count
/// into `acked`, and `counter` the bytes hyper took (where the kernel does not report
/// acknowledged bytes); returns only on failure.
async fn upload_stream(
    endpoint: Arc<Endpoint>,
    empty: String,
    counter: Arc<AtomicU64>,
    acked: Arc<conn::Acked>,
    payload: Bytes,
) -> StreamEnd {
    let mut conn: Option<Conn<Upload>> = None;
    for n in 0u64.. {
        let purpose = Use::Upload(acked.clone());
        let mut c = match endpoint.reuse_or_open(conn.take(), purpose).await {
            Ok(c) => c,
            Err(e) => return StreamEnd::of(e),
        };
        let path = format!("{empty}?test={}&r={n}", endpoint.test_id);
        let taken = Arc::new(AtomicU64::new(0));
        let body = Upload {
            payload: payload.clone(),
            remaining: UPLOAD_REQUEST_BYTES,
            counter: counter.clone(),
            taken: taken.clone(),
        };
        let mark = c.acked();
        let response = match c.send(&endpoint, Method::POST, &path, body).await {
            Ok(response) => response,
            Err(e) => return StreamEnd::of(e),
        };
        let status = response.status();
        let taken_at_answer = taken.load(Ordering::Relaxed);
        if let Err(e) = response.into_body().collect().await {
            return StreamEnd::of(conn::hyper_error(&path, e));
        }
        if taken_at_answer < UPLOAD_REQUEST_BYTES {
            // Answered before the body was sent. A target may still read the rest (the
            // request then completes on the connection); one that drops it has not
            // measured anything, whatever its kernel acknowledged.
            c.idle().await;
            if taken.load(Ordering::Relaxed) < UPLOAD_REQUEST_BYTES {
                if let Some(mark) = mark {
                    c.forfeit_after(mark);
                }
                return StreamEnd::Broken(early_answer(&path, status, taken_at_answer));
            }
        }
        conn = Some(c);
    }
    unreachable!("the request counter does not run out")
}

fn early_answer(path: &str, status: hyper::StatusCode, taken: u64) -> ProbeError {
    ProbeError::new(
        ErrorClass::Protocol,
        format!(
            "POST {path}: the target answered the upload before reading its body \
             ({status} after {taken} of {UPLOAD_REQUEST_BYTES} bytes) and did not take \
             the rest"
        ),
    )
}

/// `bytes` over `elapsed` in bits/s (a millisecond at least, so a rate read at the very
/// start is not infinite): the warm-up's rate the loaded pings and the loss stream are
/// paced by, and the progress line's.
fn bits_per_second(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / secs(elapsed).max(1e-3)
}

/// Packets per second of the loaded-loss stream for a link that carried `warmup_rate`
/// bits/s in the warm-up: `LOSS_STREAM_SHARE` of it, between `LOSS_STREAM_MIN_RATE` and
/// `stamp::LOADED_RATE`. At a fixed 50/s the stream took 3.4 % of a 1 Mbit/s link (86
/// bytes a packet as tbf counts it: IPv4 and Ethernet headers, each way) and the goodput
/// read that much below iperf3's.
fn loss_stream_rate(warmup_rate: f64) -> u32 {
    let rate = LOSS_STREAM_SHARE * warmup_rate / LOSS_STREAM_WIRE_BITS;
    (rate.floor() as u32).clamp(LOSS_STREAM_MIN_RATE, super::stamp::LOADED_RATE)
}

/// Loaded round trips from the end of the warm-up until stopped, spaced so they take at
/// most `PING_SHARE` of the rate seen during the warm-up; hands the pinger back.
async fn loaded_pings(
    mut pinger: Pinger,
    empty: String,
    (start, warm_at): (Instant, Instant),
    meter: Meter,
    stop: CancellationToken,
) -> (Pinger, Vec<Duration>) {
    let mut samples = Vec::new();
    tokio::select! {
        _ = stop.cancelled() => return (pinger, samples),
        _ = sleep_until(warm_at) => {}
    }
    let warmup_rate = bits_per_second(meter.bytes(), warm_at - start);
    let interval = Duration::from_secs_f64(PING_WIRE_BITS / (PING_SHARE * warmup_rate.max(1.0)))
        .clamp(LOADED_PING_INTERVAL, LOADED_PING_MAX_INTERVAL);
    loop {
        let next = Instant::now() + interval;
        tokio::select! {
            _ = stop.cancelled() => break,
            result = pinger.ping(&empty) => {
                // A lost loaded ping is no sample; the direction's goodput still counts.
                if let Ok(rtt) = result {
                    samples.push(rtt);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep_until(next) => {}
        }
    }
    (pinger, samples)
}

/// One random buffer shared by all upload bodies (incompressible, generated once).
fn random_payload() -> Bytes {
    let mut buf = vec![0u8; 1 << 20];
    rand::rng().fill_bytes(&mut buf);
    Bytes::from(buf)
}

/// A sized upload body of slices of `payload`, counted as hyper takes each frame.
struct Upload {
    payload: Bytes,
    remaining: u64,
    /// The direction's bytes handed to hyper.
    counter: Arc<AtomicU64>,
    /// This request's bytes handed to hyper.
    taken: Arc<AtomicU64>,
}

impl Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let offset = ((UPLOAD_REQUEST_BYTES - self.remaining) % self.payload.len() as u64) as usize;
        let len = (self.payload.len() - offset)
            .min(UPLOAD_FRAME)
            .min(self.remaining as usize);
        self.remaining -= len as u64;
        self.counter.fetch_add(len as u64, Ordering::Relaxed);
        self.taken.fetch_add(len as u64, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(
            self.payload.slice(offset..offset + len),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn median(samples: &[Duration]) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2
    })
}

/// Mean absolute difference of consecutive round trips (RFC 3550 style, unsmoothed).
fn jitter(samples: &[Duration]) -> Option<Duration> {
    if samples.len() < 2 {
        return None;
    }
    let total: Duration = samples.windows(2).map(|w| w[0].abs_diff(w[1])).sum();
    Some(total / (samples.len() - 1) as u32)
}

fn progress(line: std::fmt::Arguments<'_>) {
    if PROGRESS.load(Ordering::Relaxed) {
        eprint!("\r\x1b[2Kspeed: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    #[test]
    fn median_and_jitter() {
        assert_eq!(median(&ms(&[5, 1, 3])), Some(Duration::from_millis(3)));
        assert_eq!(
            median(&ms(&[4, 1, 3, 2])),
            Some(Duration::from_micros(2500))
        );
        assert_eq!(median(&[]), None);
        // |12-10| + |9-12| + |9-9| = 5 over 3 differences.
        let j = jitter(&ms(&[10, 12, 9, 9])).unwrap();
        assert_eq!(j.as_micros(), 1666);
        assert_eq!(jitter(&ms(&[10])), None);
    }

    #[test]
    fn layouts_under_the_target_path() {
        let [ours, backend, flat] = layouts("/");
        assert_eq!(
            (ours.garbage.as_str(), ours.empty.as_str()),
            ("/garbage", "/empty")
        );
        assert_eq!(backend.garbage, "/backend/garbage.php");
        assert_eq!(flat.empty, "/empty.php");
        let [ours, _, flat] = layouts("/speed/backend/");
        assert_eq!(ours.empty, "/speed/backend/empty");
        assert_eq!(flat.garbage, "/speed/backend/garbage.php");
    }

    #[test]
    fn upload_body_is_sized_and_counted() {
        let counter = Arc::new(AtomicU64::new(0));
        let body = Upload {
            payload: random_payload(),
            remaining: UPLOAD_REQUEST_BYTES,
            counter: counter.clone(),
            taken: Arc::default(),
        };
        assert_eq!(body.size_hint().exact(), Some(UPLOAD_REQUEST_BYTES));
        let collected = futures::executor::block_on(body.collect())
            .unwrap()
            .to_bytes();
        assert_eq!(collected.len() as u64, UPLOAD_REQUEST_BYTES);
        assert_eq!(counter.load(Ordering::Relaxed), UPLOAD_REQUEST_BYTES);
    }
}
