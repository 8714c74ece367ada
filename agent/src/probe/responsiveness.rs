//! responsiveness probe (SPEC section 16): responsiveness under working conditions, in
//! round trips per minute (RPM), as draft-ietf-ippm-responsiveness-09 measures it.
//! docs/PROBES.md has the method, its parameters with the draft's section numbers, and
//! where we differ from the draft.
//!
//! One run: fetch the networkQuality configuration (`nq`); `IDLE_PROBES` GETs of the small
//! object on one idle HTTP/2 connection (median: idle latency); then the download phase
//! and the upload phase, each (`phase`):
//! - load-generating connections: HTTP/2, each carrying one GET of the large object (or
//!   POST of an endless body), `INP` at the start and `INC` more at each interval of `ID`
//!   until goodput is saturated (at most `MNP`);
//! - goodput saturated: the standard deviation of the last `MAD` moving averages (each the
//!   bytes of the last `MAD` intervals over their time) is below `SDT` of the current one;
//! - probes from the start, interleaved, at most `MPS` pairs per second and within `PTC` of
//!   the measured goodput: foreign (new connection: TCP handshake, TLS handshake, GET of
//!   the small object) and self (GET of the small object as another HTTP/2 stream on a
//!   load-generating connection chosen at random);
//! - after saturation, at each interval, the responsiveness of the probes begun in the
//!   last `MAD` intervals (trimmed means at `TMP`): stable when the standard deviation of
//!   the last `MAD` values is below `SDT` of the current one; the phase ends then, or at
//!   `max_duration` (then `stable` is false and the last value is reported).
//!
//! Invariants: every connection of a phase is gone before the next phase starts; a
//! load-generating connection that fails aborts the run (draft section 5.4) with its
//! class; a 503 anywhere is `busy`; a phase in which no byte moves and no probe is
//! answered for `STALL` fails with `timeout` (the target stopped answering), well within
//! the run's limit.

mod net;
mod nq;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Body as _;
use hyper::Method;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{interval_at, timeout, Instant};

pub use self::net::Paced;
use self::net::{Foreign, ReqBody, Server, H2};
use super::addr::HttpUrl;
use super::{
    secs, ErrorClass, Fields, Measured, Partial, ProbeError, ProbeSpec, ResponsivenessFields,
};

/// Longest time of each direction, by default (`max_duration`).
pub const DEFAULT_MAX_DURATION: Duration =
    edgeprobe_proto::testdef::defaults::RESPONSIVENESS_MAX_DURATION;
/// MAD, moving average distance, in intervals (draft section 5.2).
const MAD: usize = 4;
/// ID, interval duration (draft section 5.2 says 5 s "for now"; Apple's and Cloudflare's
/// clients use 1 s, which lets a phase stabilise within the default 20 s).
const ID: Duration = Duration::from_secs(1);
/// TMP, trimmed mean percentage: the fastest 95 % of samples are kept (section 5.2).
const TMP: f64 = 0.95;
/// SDT, standard deviation tolerance (section 5.2).
const SDT: f64 = 0.05;
/// INP, initial load-generating connections (section 5.2).
const INP: usize = 1;
/// INC, connections added at each interval until goodput is saturated (section 5.2).
const INC: usize = 1;
/// MNP, most parallel load-generating connections (section 5.2).
const MNP: usize = 16;
/// MPS, most probe pairs per second (section 5.2).
const MPS: f64 = 100.0;
/// PTC, share of the measured goodput probes may use (section 5.2).
const PTC: f64 = 0.05;
/// Bits of one foreign and one self probe (section 5.3: about 5000 and 1000 bytes).
const PAIR_BITS: f64 = 8.0 * 6000.0;
/// Probe pairs per second before the first interval measured goodput.
const FIRST_RATE: f64 = 2.0;
/// A probe not answered within this is lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte moved and no probe answered for this long: the target stopped answering.
const STALL: Duration = Duration::from_secs(5);
/// Round trips timed on the idle connection.
const IDLE_PROBES: usize = 10;

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let mut fields = ResponsivenessFields::default();
    let error = measure(spec, &mut fields, partial).await.err();
    (Fields::Responsiveness(fields), error)
}

/// The draft's rating bands (`edgeprobe_proto::bounds::rpm_rating`, which the collector
/// checks results against).
pub use edgeprobe_proto::bounds::rpm_rating as rating;

async fn measure(
    spec: &ProbeSpec,
    fields: &mut ResponsivenessFields,
    partial: &Partial,
) -> Result<(), ProbeError> {
    let max = spec
        .options
        .max_duration
        .unwrap_or(DEFAULT_MAX_DURATION)
        .max(Duration::from_secs(2));
    let insecure = spec.options.insecure_tls.unwrap_or(false);

    let config_url = nq::config_url(&spec.target)?;
    partial.publish(
        Fields::Responsiveness(fields.clone()),
        format!(
            "fetching the networkQuality configuration {}",
            config_url.url
        ),
    );
    let config_server = Server::of(&config_url, None, insecure, &spec.link).await?;
    let (_, body) = net::get_new_connection(&config_server, &config_url)
        .await
        .map_err(|e| {
            ProbeError::new(
                e.class,
                format!("fetching the networkQuality configuration: {}", e.message),
            )
        })?;
    let config = nq::parse(config_url.url.as_str(), &body)?;
    let server = Arc::new(
        Server::of(
            &config.large,
            config.test_endpoint.as_deref(),
            insecure,
            &spec.link,
        )
        .await?,
    );
    tracing::debug!(?config, addr = %server.addr, "networkQuality configuration");

    partial.publish(
        Fields::Responsiveness(fields.clone()),
        "measuring the idle latency",
    );
    fields.idle_latency_seconds = Some(secs(idle_latency(&server, &config.small).await?));

    let mut phase = Phase {
        server: server.clone(),
        config: config.clone(),
        max,
    };
    partial.publish(
        Fields::Responsiveness(fields.clone()),
        "measuring download responsiveness",
    );
    let down = phase.run(Direction::Download).await?;
    fields.download_responsiveness_rpm = down.rpm;
    fields.download_bits_per_second = down.goodput;
    fields.load_connections = down.connections;
    partial.publish(
        Fields::Responsiveness(fields.clone()),
        "measuring upload responsiveness",
    );
    phase.max = max;
    let up = phase.run(Direction::Upload).await?;
    fields.upload_responsiveness_rpm = up.rpm;
    fields.upload_bits_per_second = up.goodput;
    fields.load_connections = fields.load_connections.max(up.connections);
    fields.stable = down.stable && up.stable;
    // Both directions weigh the same, as the draft weighs foreign and self probes
    // (section 5.3.1).
    let overall = match (down.rpm, up.rpm) {
        (Some(d), Some(u)) => Some((d + u) / 2.0),
        (one, other) => one.or(other),
    };
    fields.responsiveness_rpm = overall;
    let windows: Vec<Window> = [down.window, up.window].into_iter().flatten().collect();
    let mean = |f: &dyn Fn(&Window) -> Option<f64>| {
        let values: Vec<f64> = windows.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    fields.foreign_tcp_seconds = mean(&|w| Some(w.tcp));
    fields.foreign_tls_seconds = mean(&|w| w.tls);
    fields.foreign_http_seconds = mean(&|w| Some(w.http));
    fields.self_http_seconds = mean(&|w| Some(w.own));
    fields.loaded_latency_seconds = overall.map(|rpm| 60.0 / rpm);
    fields.rating = overall
        .map(|rpm| rating(rpm).to_string())
        .unwrap_or_default();
    if overall.is_none() {
        return Err(ProbeError::new(
            ErrorClass::Other,
            "no probe was answered under load: no responsiveness to report",
        ));
    }
    Ok(())
}

/// Median round trip of `IDLE_PROBES` GETs of the small object on one idle connection.
async fn idle_latency(server: &Server, small: &HttpUrl) -> Result<Duration, ProbeError> {
    let conn = timeout(PROBE_TIMEOUT, H2::open(server))
        .await
        .map_err(|_| {
            ProbeError::new(
                ErrorClass::Timeout,
                format!(
                    "{}: no HTTP/2 connection within {PROBE_TIMEOUT:?}",
                    server.origin
                ),
            )
        })??;
    let mut rtts = Vec::with_capacity(IDLE_PROBES);
    for _ in 0..IDLE_PROBES {
        let rtt = timeout(PROBE_TIMEOUT, conn.get_all(server, small))
            .await
            .map_err(|_| {
                ProbeError::new(
                    ErrorClass::Timeout,
                    format!("GET {}: no answer within {PROBE_TIMEOUT:?}", small.url),
                )
            })??;
        rtts.push(rtt);
    }
    rtts.sort();
    Ok(rtts[rtts.len() / 2])
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

struct Phase {
    server: Arc<Server>,
    config: nq::Config,
    max: Duration,
}

/// What one phase measured.
#[derive(Debug, Default)]
struct PhaseResult {
    rpm: Option<f64>,
    window: Option<Window>,
    goodput: Option<f64>,
    connections: u32,
    stable: bool,
}

enum Event {
    Foreign(Instant, Foreign),
    SelfProbe(Instant, Duration),
    ProbeFailed(ProbeError),
    LoadFailed(ProbeError),
}

/// The load-generating connections of a phase, for self probes.
type Loads = Arc<Mutex<Vec<H2>>>;

impl Phase {
    async fn run(&mut self, direction: Direction) -> Result<PhaseResult, ProbeError> {
        let start = Instant::now();
        let deadline = start + self.max;
        let bytes = Arc::new(AtomicU64::new(0));
        let loads: Loads = Arc::default();
        // Dropping the set at the end aborts every connection and probe of the phase.
        let mut tasks = JoinSet::new();
        let (events, mut inbox) = mpsc::unbounded_channel();
        let mut opened = 0;
        for _ in 0..INP {
            self.spawn_load(&mut tasks, direction, &bytes, &loads, &events);
            opened += 1;
        }
        // Probe pairs per second, in thousandths.
        let rate = Arc::new(AtomicU64::new((FIRST_RATE * 1000.0) as u64));
        tasks.spawn(prober(
            self.server.clone(),
            self.config.small.clone(),
            loads.clone(),
            rate.clone(),
            events.clone(),
        ));

        let mut tick = interval_at(start + ID, ID);
        let mut last_bytes = 0;
        let mut intervals: Vec<u64> = Vec::new();
        let mut averages: Vec<f64> = Vec::new();
        let mut rpms: Vec<f64> = Vec::new();
        let mut foreign: Vec<(Instant, Foreign)> = Vec::new();
        let mut selfs: Vec<(Instant, Duration)> = Vec::new();
        let mut saturated = false;
        let mut stable = false;
        let mut last_progress = start;
        let mut lost = 0u32;
        let mut last_window = None;
        loop {
            tokio::select! {
                now = tick.tick() => {
                    let total = bytes.load(Ordering::Relaxed);
                    let delta = total - last_bytes;
                    last_bytes = total;
                    intervals.push(delta);
                    if delta > 0 {
                        last_progress = now;
                    }
                    if now.duration_since(last_progress) >= STALL {
                        return Err(ProbeError::new(
                            ErrorClass::Timeout,
                            format!(
                                "the target stopped answering during the {}: no byte moved \
                                 and no probe was answered for {STALL:?}",
                                direction.name()
                            ),
                        ));
                    }
                    let span = intervals.len().min(MAD);
                    let moved: u64 = intervals[intervals.len() - span..].iter().sum();
                    let average = 8.0 * moved as f64 / (span as f64 * ID.as_secs_f64());
                    averages.push(average);
                    let pairs = (PTC * average / PAIR_BITS).clamp(1.0, MPS);
                    rate.store((pairs * 1000.0) as u64, Ordering::Relaxed);
                    if !saturated {
                        if averages.len() >= MAD && stable_within(&averages[averages.len() - MAD..], average) {
                            saturated = true;
                            tracing::debug!(direction = direction.name(), average, opened, "goodput saturated");
                        } else {
                            for _ in 0..INC {
                                if opened < MNP {
                                    self.spawn_load(&mut tasks, direction, &bytes, &loads, &events);
                                    opened += 1;
                                }
                            }
                        }
                    }
                    if saturated {
                        let since = now.checked_sub(ID * MAD as u32).unwrap_or(start);
                        if let Some(w) = window(&foreign, &selfs, since) {
                            let rpm = w.rpm;
                            last_window = Some(w);
                            rpms.push(rpm);
                            tracing::debug!(direction = direction.name(), rpm, "interval responsiveness");
                            if rpms.len() >= MAD && stable_within(&rpms[rpms.len() - MAD..], rpm) {
                                stable = true;
                                break;
                            }
                        }
                    }
                    if now >= deadline {
                        break;
                    }
                }
                Some(event) = inbox.recv() => match event {
                    Event::Foreign(at, f) => {
                        last_progress = Instant::now();
                        foreign.push((at, f));
                    }
                    Event::SelfProbe(at, took) => {
                        last_progress = Instant::now();
                        selfs.push((at, took));
                    }
                    Event::LoadFailed(e) => {
                        return Err(ProbeError::new(e.class, format!(
                            "{} load-generating connection failed: {}", direction.name(), e.message
                        )));
                    }
                    Event::ProbeFailed(e) => match e.class {
                        ErrorClass::Busy | ErrorClass::HttpStatus | ErrorClass::Tls => {
                            return Err(ProbeError::new(e.class, format!(
                                "{} probe: {}", direction.name(), e.message
                            )));
                        }
                        _ => {
                            lost += 1;
                            tracing::debug!(error = %e.message, "probe lost");
                        }
                    },
                }
            }
        }
        let last_window = last_window.or_else(|| {
            let since = Instant::now().checked_sub(ID * MAD as u32).unwrap_or(start);
            window(&foreign, &selfs, since)
        });
        let rpm = last_window.map(|w| w.rpm);
        tracing::debug!(
            direction = direction.name(),
            ?rpm,
            stable,
            saturated,
            connections = opened,
            foreign = foreign.len(),
            selfs = selfs.len(),
            lost,
            bytes = last_bytes,
            took = ?start.elapsed(),
            "phase done"
        );
        drop(tasks);
        Ok(PhaseResult {
            rpm,
            window: last_window,
            goodput: averages.last().copied(),
            connections: opened as u32,
            stable,
        })
    }

    fn spawn_load(
        &self,
        tasks: &mut JoinSet<()>,
        direction: Direction,
        bytes: &Arc<AtomicU64>,
        loads: &Loads,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        let server = self.server.clone();
        let url = match direction {
            Direction::Download => self.config.large.clone(),
            Direction::Upload => self.config.upload.clone(),
        };
        let bytes = bytes.clone();
        let loads = loads.clone();
        let events = events.clone();
        tasks.spawn(async move {
            if let Err(e) = load(&server, &url, direction, &bytes, &loads).await {
                let _ = events.send(Event::LoadFailed(e));
            }
        });
    }
}

/// One load-generating connection: the large object downloaded, or an endless body
/// uploaded, again and again should the server ever end one.
async fn load(
    server: &Server,
    url: &HttpUrl,
    direction: Direction,
    bytes: &Arc<AtomicU64>,
    loads: &Loads,
) -> Result<(), ProbeError> {
    let conn = H2::open(server).await?;
    loads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(conn.clone());
    loop {
        match direction {
            Direction::Download => {
                let response = conn.send(Method::GET, server, url, ReqBody::Empty).await?;
                let mut body = response.into_body();
                while let Some(frame) =
                    std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
                {
                    let frame = frame.map_err(|e| {
                        super::speed::conn::hyper_error(&format!("reading {}", url.url), e)
                    })?;
                    if let Some(data) = frame.data_ref() {
                        bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
            }
            Direction::Upload => {
                let response = conn
                    .send(Method::POST, server, url, ReqBody::endless(bytes.clone()))
                    .await?;
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            }
        }
    }
}

/// Launches a foreign and a self probe alternately at the current rate, each in its own
/// task (a slow probe does not hold up the next).
async fn prober(
    server: Arc<Server>,
    small: HttpUrl,
    loads: Loads,
    rate: Arc<AtomicU64>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut probes = JoinSet::new();
    let mut foreign_next = true;
    loop {
        let pairs = rate.load(Ordering::Relaxed).max(1) as f64 / 1000.0;
        let gap = Duration::from_secs_f64(1.0 / (2.0 * pairs));
        let server = server.clone();
        let small = small.clone();
        let events = events.clone();
        if foreign_next {
            probes.spawn(async move {
                let at = Instant::now();
                let event =
                    match timeout(PROBE_TIMEOUT, net::get_new_connection(&server, &small)).await {
                        Ok(Ok((f, _))) => Event::Foreign(at, f),
                        Ok(Err(e)) => Event::ProbeFailed(e),
                        Err(_) => Event::ProbeFailed(lost_probe("foreign", &small)),
                    };
                let _ = events.send(event);
            });
        } else {
            let conn = {
                let loads = loads.lock().unwrap_or_else(|e| e.into_inner());
                (!loads.is_empty()).then(|| loads[rand::random_range(0..loads.len())].clone())
            };
            if let Some(conn) = conn {
                probes.spawn(async move {
                    let at = Instant::now();
                    let event = match timeout(PROBE_TIMEOUT, conn.get_all(&server, &small)).await {
                        Ok(Ok(took)) => Event::SelfProbe(at, took),
                        Ok(Err(e)) => Event::ProbeFailed(e),
                        Err(_) => Event::ProbeFailed(lost_probe("self", &small)),
                    };
                    let _ = events.send(event);
                });
            }
        }
        foreign_next = !foreign_next;
        // Reap finished probe tasks so the set does not grow for the whole phase.
        while probes.try_join_next().is_some() {}
        tokio::time::sleep(gap).await;
    }
}

fn lost_probe(kind: &str, small: &HttpUrl) -> ProbeError {
    ProbeError::new(
        ErrorClass::Timeout,
        format!(
            "{kind} probe GET {}: no answer within {PROBE_TIMEOUT:?}",
            small.url
        ),
    )
}

/// True when the standard deviation of `values` is below `SDT` of `current`.
fn stable_within(values: &[f64], current: f64) -> bool {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    current > 0.0 && variance.sqrt() < SDT * current
}

/// Single-sided trimmed mean: the mean of the smallest `TMP` of the samples.
fn trimmed_mean(samples: &mut [f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let keep = ((samples.len() as f64 * TMP).ceil() as usize).clamp(1, samples.len());
    Some(samples[..keep].iter().sum::<f64>() / keep as f64)
}

/// The trimmed means of one window of probes, in seconds, and the RPM they give.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    tcp: f64,
    tls: Option<f64>,
    http: f64,
    own: f64,
    rpm: f64,
}

/// The probes begun since `since` (section 5.3.1 with TLS, 5.3.2 without): RPM is the
/// mean of the foreign responsiveness (60 over the mean of the trimmed means of its
/// phases) and the self responsiveness (60 over the trimmed mean of self probes).
fn window(
    foreign: &[(Instant, Foreign)],
    selfs: &[(Instant, Duration)],
    since: Instant,
) -> Option<Window> {
    let recent = foreign
        .iter()
        .filter(|(at, _)| *at >= since)
        .map(|(_, f)| f);
    let mut tcp: Vec<f64> = recent.clone().map(|f| secs(f.tcp)).collect();
    let mut tls: Vec<f64> = recent.clone().filter_map(|f| f.tls.map(secs)).collect();
    let mut http: Vec<f64> = recent.map(|f| secs(f.http)).collect();
    let mut own: Vec<f64> = selfs
        .iter()
        .filter(|(at, _)| *at >= since)
        .map(|(_, d)| secs(*d))
        .collect();
    let tcp = trimmed_mean(&mut tcp)?;
    let http = trimmed_mean(&mut http)?;
    let tls = trimmed_mean(&mut tls);
    let foreign_rtt = match tls {
        Some(tls) => (tcp + tls + http) / 3.0,
        None => (tcp + http) / 2.0,
    };
    let self_rtt = trimmed_mean(&mut own)?;
    if foreign_rtt <= 0.0 || self_rtt <= 0.0 {
        return None;
    }
    Some(Window {
        tcp,
        tls,
        http,
        own: self_rtt,
        rpm: (60.0 / foreign_rtt + 60.0 / self_rtt) / 2.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn responsiveness(
        foreign: &[(Instant, Foreign)],
        selfs: &[(Instant, Duration)],
        since: Instant,
    ) -> Option<f64> {
        window(foreign, selfs, since).map(|w| w.rpm)
    }

    #[test]
    fn rating_bands() {
        assert_eq!(rating(299.9), "poor");
        assert_eq!(rating(300.0), "fair");
        assert_eq!(rating(999.0), "fair");
        assert_eq!(rating(1000.0), "good");
        assert_eq!(rating(5999.0), "good");
        assert_eq!(rating(6000.0), "excellent");
    }

    #[test]
    fn trimmed_mean_drops_the_slowest_five_percent() {
        let mut samples: Vec<f64> = (1..=20).map(f64::from).collect();
        samples[19] = 1000.0;
        // 19 of 20 kept: 1..=19.
        assert_eq!(trimmed_mean(&mut samples), Some(10.0));
        assert_eq!(trimmed_mean(&mut [3.0]), Some(3.0));
        assert_eq!(trimmed_mean(&mut []), None);
    }

    #[test]
    fn responsiveness_weighs_foreign_and_self_equally() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let foreign = [(
            t,
            Foreign {
                tcp: ms(100),
                tls: None,
                http: ms(100),
            },
        )];
        let selfs = [(t, ms(200))];
        // Foreign 600 RPM, self 300 RPM.
        let rpm = responsiveness(&foreign, &selfs, t).unwrap();
        assert!((rpm - 450.0).abs() < 1e-6, "{rpm}");
        let with_tls = [(
            t,
            Foreign {
                tcp: ms(100),
                tls: Some(ms(400)),
                http: ms(100),
            },
        )];
        // Foreign (100 + 400 + 100) / 3 = 200 ms: 300 RPM.
        let rpm = responsiveness(&with_tls, &selfs, t).unwrap();
        assert!((rpm - 300.0).abs() < 1e-6, "{rpm}");
        assert!(responsiveness(&foreign, &[], t).is_none());
    }

    #[test]
    fn stability_is_the_drafts_tolerance() {
        assert!(stable_within(&[100.0, 101.0, 99.0, 100.0], 100.0));
        assert!(!stable_within(&[50.0, 80.0, 100.0, 100.0], 100.0));
        assert!(!stable_within(&[0.0; 4], 0.0));
    }
}
