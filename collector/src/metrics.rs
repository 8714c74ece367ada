//! Every metric of the collector, declared once, registered in one registry, updated
//! where the event happens; the kernel's listen counters, which no event of ours sees, are
//! read at scrape time. Names follow Prometheus rules: `edgeprobe_` prefix, base units,
//! `_total` for counters.
//!
//! Cardinality: result metrics are labelled by test, kind, site and outcome only (never
//! by agent id or target), so series grow with tests x sites, not with agents.

use std::collections::HashMap;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::{IpFamily, Kind, Measures, ResultRow};

pub struct Metrics {
    registry: Registry,
    /// Results by what happened to them at ingest: committed, duplicate, rejected
    /// (quarantined in rejected_results), invalid (in a batch that closed its stream).
    pub ingest_results: IntCounterVec,
    pub ingest_batches: IntCounter,
    pub ingest_transactions: IntCounter,
    /// Errors by stage: store, validate, permission, protocol.
    pub ingest_errors: IntCounterVec,
    /// PostgreSQL errors by class: transient (retried), permanent (classes 22 and 23,
    /// isolated to the rows that cause them).
    pub store_errors: IntCounterVec,
    /// Hellos refused because another incarnation of the same agent id was connected.
    /// No agent label (cardinality); the id is in the log and `agents.identity_conflicts`.
    pub identity_conflicts: IntCounter,
    /// Sessions closed because a newer session of the same agent id replaced them.
    pub sessions_replaced: IntCounter,
    /// The current fleet tests version (0: none applied yet).
    pub fleet_version: IntGauge,
    /// Connected agents speaking fleet-tests whose applied version is below the current.
    pub fleet_agents_behind: IntGauge,
    /// Fleet versions refused by an agent (TestsApplied with an error), or not sent to it
    /// because its push passes the bounds.
    pub fleet_refused: IntCounter,
    /// Run-now requests by the state this collector set: sent, refused, rate_limited,
    /// undeliverable, and the agents' answers started, waiting, refused, done.
    pub run_now_requests: IntCounterVec,
    pub commit_seconds: Histogram,
    pub rows_per_transaction: Histogram,
    pub in_flight_batches: IntGauge,
    pub agents_connected: IntGauge,
    pub postgres_up: IntGauge,
    /// 1 for the host (`host:port`) the health check found writable; no series when none.
    pub postgres_primary: IntGaugeVec,
    /// Results committed, by test, kind, site, IP family (ipv4, ipv6, "" when the run had
    /// none) and outcome (success/failure). The family has at most three values; the
    /// interface is not a label (free text per host: the dashboards split by it in SQL).
    pub results: IntCounterVec,
    pub info: IntGaugeVec,
    /// Latency of each result's main round trip, by test, kind and site: speed idle
    /// latency, icmp rtt avg, tcp connect, http time to first byte, dns resolve, path rtt
    /// avg at the destination, responsiveness loaded latency, stamp rtt avg.
    pub latency: HistogramVec,
    /// Speed test goodput by test, site and direction (download, upload).
    pub speed: HistogramVec,
    /// Speed test latency under load by test, site and direction.
    pub loaded_latency: HistogramVec,
    pub icmp_sent: IntCounterVec,
    pub icmp_received: IntCounterVec,
    /// HTTP responses by test, site and status class (2xx, 3xx, 4xx, 5xx).
    pub http_responses: IntCounterVec,
    /// Seconds until the certificate of the latest HTTPS result expires, by test and site.
    pub tls_expiry: GaugeVec,
    /// Path results whose path differs from the previous one of the agent and test
    /// (`results.path_changed`), by test and site.
    pub path_changes: IntCounterVec,
    /// Loss that persists to the destination of each path result that reached it, by test
    /// and site.
    pub path_loss: HistogramVec,
    /// Overall RPM (round trips per minute under working conditions) of each successful
    /// responsiveness result, by test and site; buckets around the rating bands.
    pub responsiveness: HistogramVec,
    /// Speed test UDP loss under load (the target's STAMP reflector) by test, site and
    /// direction (download, upload); results against targets without one add nothing.
    pub speed_loaded_loss: HistogramVec,
    /// One-way loss of each stamp result by test, site and direction (forward: to the
    /// reflector, reverse: back).
    pub stamp_loss: HistogramVec,
    /// Mean one-way delay of each stamp result that has one (both clocks synchronised), by
    /// test, site and direction.
    pub stamp_delay: HistogramVec,
    /// E-model MOS estimate of each stamp result, by test and site.
    pub stamp_mos: HistogramVec,
    /// Fleet state, one series per agent (bounded by the fleet size).
    pub agent_backlog: IntGaugeVec,
    pub agent_dropped: IntGaugeVec,
    pub agent_last_seen: GaugeVec,
    /// TLS handshakes that failed, by reason (no_client_cert, bad_client_cert, protocol,
    /// timeout, io).
    pub tls_handshake_errors: IntCounterVec,
    /// Certificate reload attempts that found changed files, by outcome (ok, error).
    pub tls_reloads: IntCounterVec,
    /// notAfter of the collector's serving certificate, Unix seconds.
    pub tls_cert_expiry: IntGauge,
    /// The kernel's `TcpExtListenOverflows` and `TcpExtListenDrops` of the collector's
    /// network namespace, read at scrape time (`render`): connections dropped because an
    /// accept queue was full. Counted for every listener of the namespace, not only ours.
    pub listen_overflows: IntCounter,
    pub listen_drops: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let commit_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        // Loss ratios: fine steps below the 1 % a voice call tolerates.
        let loss_buckets = vec![
            0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
        ];
        let metrics = Metrics {
            ingest_results: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_ingest_results_total",
                        "Results received from agents, by outcome (committed, duplicate, rejected: quarantined in rejected_results, invalid: in a batch that closed its stream).",
                    ),
                    &["outcome"],
                )
                .unwrap(),
            ),
            ingest_batches: reg(
                &registry,
                IntCounter::new(
                    "edgeprobe_ingest_batches_total",
                    "Result batches committed and acknowledged.",
                )
                .unwrap(),
            ),
            ingest_transactions: reg(
                &registry,
                IntCounter::new(
                    "edgeprobe_ingest_transactions_total",
                    "PostgreSQL transactions committed by the writers.",
                )
                .unwrap(),
            ),
            ingest_errors: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_ingest_errors_total",
                        "Ingest errors by stage (store, validate, permission, protocol, ack_stall: a stream closed because its peer read no ack for 60 s).",
                    ),
                    &["stage"],
                )
                .unwrap(),
            ),
            store_errors: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_store_errors_total",
                        "PostgreSQL errors by class: transient (retried with backoff), permanent (SQLSTATE classes 22 and 23, isolated to the offending rows).",
                    ),
                    &["class"],
                )
                .unwrap(),
            ),
            identity_conflicts: reg(
                &registry,
                IntCounter::new(
                    "edgeprobe_agent_identity_conflicts_total",
                    "Sessions refused because another incarnation of the same agent id was connected (two hosts with one id, e.g. a cloned image).",
                )
                .unwrap(),
            ),
            sessions_replaced: reg(
                &registry,
                IntCounter::new(
                    "edgeprobe_agent_sessions_replaced_total",
                    "Sessions closed because a newer session of the same agent id replaced them (one live session per agent id).",
                )
                .unwrap(),
            ),
            fleet_version: reg(
                &registry,
                IntGauge::new(
                    "edgeprobe_fleet_version",
                    "The current fleet tests version (0: none yet).",
                )
                .unwrap(),
            ),
            fleet_agents_behind: reg(
                &registry,
                IntGauge::new(
                    "edgeprobe_fleet_agents_behind",
                    "Agents connected here that speak fleet-tests and have not applied the current version.",
                )
                .unwrap(),
            ),
            fleet_refused: reg(
                &registry,
                IntCounter::new(
                    "edgeprobe_fleet_refused_total",
                    "Fleet tests versions refused by an agent, or not sent to it for passing the push bounds (the reason is in agents.fleet_error and the log).",
                )
                .unwrap(),
            ),
            run_now_requests: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_run_now_requests_total",
                        "Run-now requests for agents connected here, by state.",
                    ),
                    &["state"],
                )
                .unwrap(),
            ),
            commit_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "edgeprobe_ingest_commit_duration_seconds",
                        "Time to write and commit one writer transaction.",
                    )
                    .buckets(commit_buckets),
                )
                .unwrap(),
            ),
            rows_per_transaction: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "edgeprobe_ingest_transaction_rows",
                        "Result rows written per writer transaction.",
                    )
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 10).unwrap()),
                )
                .unwrap(),
            ),
            in_flight_batches: reg(
                &registry,
                IntGauge::new(
                    "edgeprobe_ingest_in_flight_batches",
                    "Batches received and not yet committed.",
                )
                .unwrap(),
            ),
            agents_connected: reg(
                &registry,
                IntGauge::new(
                    "edgeprobe_agents_connected",
                    "Agent streams currently open on this collector.",
                )
                .unwrap(),
            ),
            postgres_up: reg(
                &registry,
                IntGauge::new(
                    "edgeprobe_postgres_up",
                    "1 when the last PostgreSQL health check succeeded.",
                )
                .unwrap(),
            ),
            postgres_primary: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "edgeprobe_postgres_primary_info",
                        "1 for the database host (host:port) the health check reached as writable, the first in the URL's order.",
                    ),
                    &["host"],
                )
                .unwrap(),
            ),
            results: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_results_total",
                        "Results committed, by test, kind, site, IP family (ipv4, ipv6, empty when the run used none) and outcome (success, failure).",
                    ),
                    &["test", "kind", "site", "ip_family", "outcome"],
                )
                .unwrap(),
            ),
            info: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "edgeprobe_collector_info",
                        "Collector build and mode; insecure=\"true\" means plaintext gRPC.",
                    ),
                    &["version", "insecure"],
                )
                .unwrap(),
            ),
            latency: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_latency_seconds",
                        "Main round trip of each successful result: speed idle latency, icmp rtt avg, tcp connect, http time to first byte, dns resolve, path rtt avg at the destination, responsiveness round trip under load, stamp rtt avg.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5, 5.0, 10.0,
                    ]),
                    &["test", "kind", "site"],
                )
                .unwrap(),
            ),
            speed: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_speed_bits_per_second",
                        "Speed test goodput by direction (download, upload).",
                    )
                    .buckets(vec![
                        1e6, 2e6, 5e6, 1e7, 2e7, 5e7, 1e8, 2e8, 5e8, 1e9, 2e9, 5e9, 1e10,
                    ]),
                    &["test", "site", "direction"],
                )
                .unwrap(),
            ),
            loaded_latency: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_speed_loaded_latency_seconds",
                        "Speed test latency under load (bufferbloat) by direction.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                    &["test", "site", "direction"],
                )
                .unwrap(),
            ),
            icmp_sent: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_icmp_sent_packets_total",
                        "ICMP echo requests sent by icmp tests.",
                    ),
                    &["test", "site"],
                )
                .unwrap(),
            ),
            icmp_received: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_icmp_received_packets_total",
                        "ICMP echo replies received by icmp tests.",
                    ),
                    &["test", "site"],
                )
                .unwrap(),
            ),
            http_responses: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_http_responses_total",
                        "HTTP responses seen by http tests, by status class.",
                    ),
                    &["test", "site", "code"],
                )
                .unwrap(),
            ),
            tls_expiry: reg(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "edgeprobe_tls_cert_expiry_seconds",
                        "Seconds until the server certificate seen by the latest HTTPS result of a test expires.",
                    ),
                    &["test", "site"],
                )
                .unwrap(),
            ),
            path_changes: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_path_changes_total",
                        "Path results whose path (path_id: the responding addresses by TTL) differs from the previous result of the same agent and test.",
                    ),
                    &["test", "site"],
                )
                .unwrap(),
            ),
            path_loss: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_path_loss_ratio",
                        "Loss that persists to the destination (path_loss_ratio) of path results that reached it; rate-limited hops do not count.",
                    )
                    .buckets(vec![0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]),
                    &["test", "site"],
                )
                .unwrap(),
            ),
            responsiveness: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_responsiveness_rpm",
                        "Round trips per minute under working conditions (responsiveness_rpm) of each successful responsiveness result; the rating bands are poor below 300, fair below 1000, good below 6000, excellent from 6000.",
                    )
                    .buckets(vec![
                        50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 4000.0, 6000.0,
                        10000.0, 20000.0,
                    ]),
                    &["test", "site"],
                )
                .unwrap(),
            ),
            speed_loaded_loss: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_speed_loaded_loss_ratio",
                        "Speed test UDP loss while the direction was saturated (download_loaded_loss_ratio, upload_loaded_loss_ratio), from a STAMP stream to the target's reflector; targets without one add nothing.",
                    )
                    .buckets(loss_buckets.clone()),
                    &["test", "site", "direction"],
                )
                .unwrap(),
            ),
            stamp_loss: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_stamp_loss_ratio",
                        "One-way loss of each stamp result by direction: forward (to the reflector, forward_loss_ratio), reverse (back, reverse_loss_ratio).",
                    )
                    .buckets(loss_buckets),
                    &["test", "site", "direction"],
                )
                .unwrap(),
            ),
            stamp_delay: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_stamp_one_way_delay_seconds",
                        "Mean one-way delay of each stamp result by direction (forward_delay_avg_seconds, reverse_delay_avg_seconds); only results whose two clocks were synchronised have one.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5,
                        1.0,
                    ]),
                    &["test", "site", "direction"],
                )
                .unwrap(),
            ),
            stamp_mos: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edgeprobe_stamp_mos",
                        "ITU-T G.107 E-model MOS estimate for a G.711 voice call of each stamp result (1 to 4.5); the G.107 user-satisfaction bands start at 2.58 (R 50), 3.1 (R 60), 3.6 (R 70), 4.03 (R 80) and 4.34 (R 90).",
                    )
                    .buckets(vec![1.5, 2.0, 2.58, 3.1, 3.6, 4.03, 4.34, 4.5]),
                    &["test", "site"],
                )
                .unwrap(),
            ),
            agent_backlog: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "edgeprobe_agent_backlog_results",
                        "Results buffered on the agent and not yet acknowledged (last heartbeat).",
                    ),
                    &["agent"],
                )
                .unwrap(),
            ),
            agent_dropped: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "edgeprobe_agent_dropped_results",
                        "Results the agent dropped because its buffer was full, since its buffer was created (last heartbeat).",
                    ),
                    &["agent"],
                )
                .unwrap(),
            ),
            agent_last_seen: reg(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "edgeprobe_agent_last_seen_timestamp_seconds",
                        "Unix time of the agent's last heartbeat or committed batch.",
                    ),
                    &["agent"],
                )
                .unwrap(),
            ),
            tls_handshake_errors: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_tls_handshake_errors_total",
                        "gRPC TLS handshakes that failed, by reason (no_client_cert, bad_client_cert, protocol, timeout, io).",
                    ),
                    &["reason"],
                )
                .unwrap(),
            ),
            tls_reloads: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_tls_reloads_total",
                        "Reloads of changed TLS files, by outcome (ok, error: the old certificates stay).",
                    ),
                    &["outcome"],
                )
                .unwrap(),
            ),
            tls_cert_expiry: reg(
                &registry,
                IntGauge::new(
                    "edgeprobe_tls_certificate_expiry_timestamp_seconds",
                    "notAfter of the certificate the collector serves, as a Unix timestamp.",
                )
                .unwrap(),
            ),
            listen_overflows: reg(
                &registry,
                IntCounter::new(
                    "edgeprobe_listen_overflows_total",
                    "Connections the kernel dropped because a listener's accept queue was full (TcpExtListenOverflows in /proc/net/netstat, read at scrape time). Host-wide: counts every listener of the collector's network namespace, not only the gRPC port; a collector restart does not reset it.",
                )
                .unwrap(),
            ),
            listen_drops: reg(
                &registry,
                IntCounter::new(
                    "edgeprobe_listen_drops_total",
                    "Incoming connections the kernel dropped at any listener, accept queue overflows included (TcpExtListenDrops in /proc/net/netstat, read at scrape time). Host-wide like edgeprobe_listen_overflows_total.",
                )
                .unwrap(),
            ),
            registry,
        };
        // Series that alerts and rates read exist from the start, at 0.
        for outcome in ["committed", "duplicate", "rejected", "invalid"] {
            metrics.ingest_results.with_label_values(&[outcome]);
        }
        for class in ["transient", "permanent"] {
            metrics.store_errors.with_label_values(&[class]);
        }
        metrics
    }

    /// Updates the result aggregates with newly committed rows. Rows are grouped by
    /// (test, kind, site) first so each label lookup happens once per group.
    pub fn observe_results<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a ResultRow>,
        site_label: &str,
    ) {
        let mut groups: HashMap<(&str, Kind, &str), Vec<&ResultRow>> = HashMap::new();
        for r in rows {
            let site = r.labels.get(site_label).unwrap_or("");
            groups.entry((&r.test, r.kind, site)).or_default().push(r);
        }
        for ((test, kind, site), rows) in groups {
            // [no family, ipv4, ipv6] x [success, failure]
            let mut counts = [[0u64; 2]; 3];
            for r in &rows {
                let family = match r.link.ip_family {
                    None => 0,
                    Some(IpFamily::Ipv4) => 1,
                    Some(IpFamily::Ipv6) => 2,
                };
                counts[family][usize::from(!r.success)] += 1;
            }
            for (family, outcomes) in ["", "ipv4", "ipv6"].into_iter().zip(counts) {
                for (outcome, n) in ["success", "failure"].into_iter().zip(outcomes) {
                    if n > 0 {
                        self.results
                            .with_label_values(&[test, kind.name(), site, family, outcome])
                            .inc_by(n);
                    }
                }
            }
            let latency = self.latency.with_label_values(&[test, kind.name(), site]);
            for r in rows.iter().filter(|r| r.success) {
                let m = &r.measures;
                let main = match kind {
                    Kind::Speed => m.idle_latency_seconds,
                    Kind::Icmp => m.rtt_avg_seconds,
                    Kind::Tcp => m.connect_seconds,
                    Kind::Http => m.ttfb_seconds,
                    Kind::Dns => m.resolve_seconds,
                    Kind::Path => m.rtt_avg_seconds,
                    Kind::Responsiveness => m.loaded_latency_seconds,
                    Kind::Stamp => m.rtt_avg_seconds,
                };
                if let Some(v) = main {
                    latency.observe(v);
                }
            }
            match kind {
                Kind::Speed => {
                    type Pick = fn(&Measures) -> Option<f64>;
                    let directions: [(&str, Pick, Pick); 2] = [
                        (
                            "download",
                            |m| m.download_bits_per_second,
                            |m| m.download_loaded_latency_seconds,
                        ),
                        (
                            "upload",
                            |m| m.upload_bits_per_second,
                            |m| m.upload_loaded_latency_seconds,
                        ),
                    ];
                    for (direction, rate, loaded) in directions {
                        let speed = self.speed.with_label_values(&[test, site, direction]);
                        let bloat = self
                            .loaded_latency
                            .with_label_values(&[test, site, direction]);
                        for r in &rows {
                            if let Some(v) = rate(&r.measures) {
                                speed.observe(v);
                            }
                            if let Some(v) = loaded(&r.measures) {
                                bloat.observe(v);
                            }
                        }
                    }
                    let loaded_loss: [(&str, Pick); 2] = [
                        ("download", |m| m.download_loaded_loss_ratio),
                        ("upload", |m| m.upload_loaded_loss_ratio),
                    ];
                    for (direction, loss) in loaded_loss {
                        // No series for a test whose target reflects no STAMP.
                        let mut values = rows.iter().filter_map(|r| loss(&r.measures)).peekable();
                        if values.peek().is_none() {
                            continue;
                        }
                        let h = self
                            .speed_loaded_loss
                            .with_label_values(&[test, site, direction]);
                        values.for_each(|v| h.observe(v));
                    }
                }
                Kind::Icmp => {
                    let sent: i64 = rows
                        .iter()
                        .filter_map(|r| r.measures.sent)
                        .map(i64::from)
                        .sum();
                    let received: i64 = rows
                        .iter()
                        .filter_map(|r| r.measures.received)
                        .map(i64::from)
                        .sum();
                    self.icmp_sent
                        .with_label_values(&[test, site])
                        .inc_by(sent as u64);
                    self.icmp_received
                        .with_label_values(&[test, site])
                        .inc_by(received as u64);
                }
                Kind::Http => {
                    for r in &rows {
                        if let Some(code) = r.measures.status_code {
                            let class = match code / 100 {
                                1 => "1xx",
                                2 => "2xx",
                                3 => "3xx",
                                4 => "4xx",
                                _ => "5xx",
                            };
                            self.http_responses
                                .with_label_values(&[test, site, class])
                                .inc();
                        }
                    }
                    if let Some(v) = rows
                        .iter()
                        .rev()
                        .find_map(|r| r.measures.tls_cert_expiry_seconds)
                    {
                        self.tls_expiry.with_label_values(&[test, site]).set(v);
                    }
                }
                Kind::Path => {
                    let loss = self.path_loss.with_label_values(&[test, site]);
                    for r in &rows {
                        if let Some(v) = r.measures.path_loss_ratio {
                            loss.observe(v);
                        }
                    }
                }
                Kind::Responsiveness => {
                    let rpm = self.responsiveness.with_label_values(&[test, site]);
                    for r in rows.iter().filter(|r| r.success) {
                        if let Some(v) = r.measures.responsiveness_rpm {
                            rpm.observe(v);
                        }
                    }
                }
                Kind::Stamp => {
                    type Pick = fn(&Measures) -> Option<f64>;
                    let directions: [(&str, Pick, Pick); 2] = [
                        (
                            "forward",
                            |m| m.forward_loss_ratio,
                            |m| m.forward_delay_avg_seconds,
                        ),
                        (
                            "reverse",
                            |m| m.reverse_loss_ratio,
                            |m| m.reverse_delay_avg_seconds,
                        ),
                    ];
                    // Loss counts whether or not the run succeeded: a run that lost every
                    // packet is the loss an operator most needs to see.
                    for (direction, loss, delay) in directions {
                        let l = self.stamp_loss.with_label_values(&[test, site, direction]);
                        let mut delays = Vec::new();
                        for r in &rows {
                            if let Some(v) = loss(&r.measures) {
                                l.observe(v);
                            }
                            delays.extend(delay(&r.measures));
                        }
                        if !delays.is_empty() {
                            let d = self.stamp_delay.with_label_values(&[test, site, direction]);
                            delays.into_iter().for_each(|v| d.observe(v));
                        }
                    }
                    let mut scores = rows.iter().filter_map(|r| r.measures.mos).peekable();
                    if scores.peek().is_some() {
                        let mos = self.stamp_mos.with_label_values(&[test, site]);
                        scores.for_each(|v| mos.observe(v));
                    }
                }
                Kind::Tcp | Kind::Dns => {}
            }
        }
    }

    /// Counts committed path results whose `path_changed` is true, by test and site.
    pub fn observe_path_changes<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a ResultRow>,
        site_label: &str,
    ) {
        let mut counts: HashMap<(&str, &str), u64> = HashMap::new();
        for r in rows {
            let site = r.labels.get(site_label).unwrap_or("");
            *counts.entry((&r.test, site)).or_default() += 1;
        }
        for ((test, site), n) in counts {
            self.path_changes.with_label_values(&[test, site]).inc_by(n);
        }
    }

    /// Marks an agent as seen now.
    pub fn seen(&self, agent: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.agent_last_seen.with_label_values(&[agent]).set(now);
    }

    /// The text exposition format.
    /// The writable host the health check reached, or none.
    pub fn set_postgres_primary(&self, host: Option<&str>) {
        self.postgres_primary.reset();
        if let Some(host) = host {
            self.postgres_primary.with_label_values(&[host]).set(1);
        }
    }

    pub fn render(&self) -> String {
        self.read_listen_counters();
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Metrics {
    /// Brings the listen counters up to the kernel's values. They are cumulative since the
    /// namespace was created, so the first scrape of a new process jumps to the total.
    fn read_listen_counters(&self) {
        let Ok(text) = std::fs::read_to_string(NETSTAT) else {
            return;
        };
        for (counter, name) in [
            (&self.listen_overflows, "ListenOverflows"),
            (&self.listen_drops, "ListenDrops"),
        ] {
            if let Some(value) = tcp_ext(&text, name) {
                counter.inc_by(value.saturating_sub(counter.get()));
            }
        }
    }
}

const NETSTAT: &str = "/proc/net/netstat";

/// One `TcpExt` counter of /proc/net/netstat: a line of names, then a line of values.
fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_counters_come_from_the_kernel() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                    TcpExt: 3 11302 11310\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(tcp_ext(text, "ListenOverflows"), Some(11302));
        assert_eq!(tcp_ext(text, "ListenDrops"), Some(11310));
        assert_eq!(tcp_ext(text, "InNoRoutes"), None);

        let kernel = std::fs::read_to_string(NETSTAT).unwrap();
        let before = tcp_ext(&kernel, "ListenOverflows").unwrap();
        let metrics = Metrics::new();
        let rendered = metrics.render();
        let line = rendered
            .lines()
            .find_map(|l| l.strip_prefix("edgeprobe_listen_overflows_total "))
            .expect("the series is exported");
        assert!(line.parse::<u64>().unwrap() >= before, "{line} < {before}");
        assert!(rendered.contains("edgeprobe_listen_drops_total "));
    }
}
