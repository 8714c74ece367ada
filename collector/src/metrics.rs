//! Every metric of the collector, declared once, registered in one registry, updated
//! where the event happens. Names follow Prometheus rules: `edgeprobe_` prefix, base
//! units, `_total` for counters.
//!
//! Cardinality: result metrics are labelled by test, kind, site and outcome only (never
//! by agent id or target), so series grow with tests x sites, not with agents.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Results by what happened to them at ingest: committed, duplicate, invalid.
    pub ingest_results: IntCounterVec,
    pub ingest_batches: IntCounter,
    pub ingest_transactions: IntCounter,
    /// Errors by stage: store, validate, permission, protocol.
    pub ingest_errors: IntCounterVec,
    pub commit_seconds: Histogram,
    pub rows_per_transaction: Histogram,
    pub in_flight_batches: IntGauge,
    pub agents_connected: IntGauge,
    pub postgres_up: IntGauge,
    /// Results committed, by test, kind, site and outcome (success/failure).
    pub results: IntCounterVec,
    pub info: IntGaugeVec,
    /// TLS handshakes that failed, by reason (no_client_cert, bad_client_cert, protocol,
    /// timeout, io).
    pub tls_handshake_errors: IntCounterVec,
    /// Certificate reload attempts that found changed files, by outcome (ok, error).
    pub tls_reloads: IntCounterVec,
    /// notAfter of the collector's serving certificate, Unix seconds.
    pub tls_cert_expiry: IntGauge,
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
        Metrics {
            ingest_results: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_ingest_results_total",
                        "Results received from agents, by outcome (committed, duplicate, invalid).",
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
                        "Ingest errors by stage (store, validate, permission, protocol).",
                    ),
                    &["stage"],
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
            results: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "edgeprobe_results_total",
                        "Results committed, by test, kind, site and outcome (success, failure).",
                    ),
                    &["test", "kind", "site", "outcome"],
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
            registry,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
