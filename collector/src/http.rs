//! The collector's HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`
//! (the process is up) and `/readyz` (migrated, the gRPC port listening and a writable
//! PostgreSQL reached: safe to send agents here; the body names the host reached).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/readyz` looks at.
pub struct Readiness {
    /// Migrated and the gRPC port listening.
    pub migrated: AtomicBool,
    /// The writable PostgreSQL host reached (`host:port`), none when none is.
    pub postgres: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let migrated = s.readiness.migrated.load(Ordering::Relaxed);
    match (s.readiness.postgres)() {
        Some(host) if migrated => (StatusCode::OK, format!("ready: postgres primary {host}\n")),
        host => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: migrated={migrated} postgres={}\n",
                host.as_deref().unwrap_or("no writable host reached")
            ),
        ),
    }
}
