//! `edgeprobe-collector run`: starts the HTTP endpoints, migrates (retrying while
//! Postgres is away, so /healthz answers meanwhile), starts the store and the gRPC server
//! (its listener and accept thread in `listen.rs`), keeps partitions, and shuts down in
//! order when the caller's token is cancelled (main cancels it on SIGTERM or SIGINT).
//!
//! Shutdown order, and why: the token stops the accept thread and every stream's reader;
//! the gRPC server drains (the connections still open end with their sessions); then
//! every session's task is awaited, also of peers that left, since a session ends only
//! after its committer has had its last write answered (and acked, if the peer is
//! there). Only then is the store's own token cancelled: its writers finish the group
//! they hold and the jobs still queued (heartbeats, conflicts), and return, so none is
//! dropped inside a transaction. Every other task `run` spawns (writers, health check,
//! controller, HTTP and API servers, partition upkeep, TLS watch) is on one
//! `TaskTracker`. Both waits share one `GRACE` deadline; `run` returns when everything
//! has finished, or logs what had not when the grace is spent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgeprobe_proto::bounds::MAX_MESSAGE_BYTES;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::http::{self, Readiness};
use crate::ingest::IngestService;
use crate::listen;
use crate::metrics::Metrics;
use crate::pg;
use crate::pg::Target;
use crate::schema;
use crate::store::Store;
use crate::tls::{self, ServerTls, TlsFiles};
use crate::wire::IngestServer;

/// Concurrent gRPC streams one HTTP/2 connection may hold. An agent needs one; a few more
/// let a reconnect overlap its half-dead predecessor. A client past this waits (its h2
/// layer queues the stream) or, if it ignores the setting, has the stream refused.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4;
const PARTITION_EVERY: Duration = Duration::from_secs(3600);
/// Start-up's retry delays while PostgreSQL is not up yet (jittered, `backoff`).
const MIGRATE_RETRY_BASE: Duration = Duration::from_millis(500);
const MIGRATE_RETRY_CAP: Duration = Duration::from_secs(10);
/// How long the tasks may take to finish after the gRPC server has drained.
const GRACE: Duration = Duration::from_secs(10);
/// How often the TLS files are checked for changes (SIGHUP reloads at once).
const TLS_POLL: Duration = Duration::from_secs(10);

pub async fn migrate_once(
    target: &Target,
    retention: Option<Duration>,
) -> anyhow::Result<Vec<i32>> {
    let mut client = target
        .connect()
        .await
        .context("cannot connect to postgres")?;
    let applied = schema::migrate(&mut client)
        .await
        .context("migration failed")?;
    schema::maintain_partitions(&client, retention, schema::ATTEMPTS)
        .await
        .context("creating partitions")?;
    Ok(applied)
}

/// Runs the collector until `shutdown` is cancelled, then drains (see the module's doc).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let session_tasks = TaskTracker::new();
    // Cancelled after the sessions have ended, never before: the writers must outlive
    // the committers that wait for them.
    let store_stop = CancellationToken::new();
    let result = serve(&config, &shutdown, &store_stop, &tasks, &session_tasks).await;
    shutdown.cancel();
    let deadline = tokio::time::Instant::now() + GRACE;
    session_tasks.close();
    let sessions_ended = tokio::time::timeout_at(deadline, session_tasks.wait())
        .await
        .is_ok();
    store_stop.cancel();
    tasks.close();
    let tasks_ended = tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_ok();
    if !(sessions_ended && tasks_ended) {
        tracing::warn!(
            grace_s = GRACE.as_secs(),
            sessions_ended,
            tasks_ended,
            "still running after the grace period; exiting without them"
        );
    }
    tracing::info!("stopped");
    result
}

/// Everything of `run` up to the gRPC server's drain.
async fn serve(
    config: &Config,
    shutdown: &CancellationToken,
    store_stop: &CancellationToken,
    tasks: &TaskTracker,
    session_tasks: &TaskTracker,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    metrics
        .info
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            &config.server.insecure.to_string(),
        ])
        .set(1);
    // Checked by `Config::finish` already; parsed again here to load the TLS files.
    let target = Target::parse(config.database_url())?;
    if target.unverified_remote() {
        tracing::warn!(
            sslmode = target.mode().name(),
            "the database is on another host and its certificate is not checked: use sslmode=verify-full with sslrootcert (docs/SECURITY.md)"
        );
    } else {
        tracing::info!(sslmode = target.mode().name(), "database tls");
    }
    // TLS files are checked before anything starts: a typo fails fast, not on first agent.
    let tls = if config.server.insecure {
        tracing::warn!(
            "server.insecure = true: gRPC is PLAINTEXT and agents are NOT authenticated; local demos only"
        );
        None
    } else {
        Some(server_tls(config, metrics.clone())?)
    };

    let store = Store::start(
        &target,
        config.database.writers,
        config.metrics.site_label.clone(),
        metrics.clone(),
        store_stop.clone(),
        tasks,
    );
    let readiness = Arc::new(Readiness {
        migrated: false.into(),
        postgres: Box::new({
            let store = store.clone();
            move || store.primary()
        }),
    });
    let http_listener = http::bind(config.server.http_listen)
        .await
        .with_context(|| format!("cannot listen on {} (http)", config.server.http_listen))?;
    tasks.spawn(http::serve(
        http_listener,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));
    tracing::info!(addr = %config.server.http_listen, "serving /metrics, /healthz, /readyz");
    // The operators' API: bound now so a taken port fails the start, served once migrated.
    let api = match (&config.api, &tls) {
        (Some(section), Some(tls)) => Some((
            crate::api::bind(section.listen)
                .await
                .with_context(|| format!("cannot listen on {} (api)", section.listen))?,
            tls.clone(),
        )),
        _ => None,
    };

    // Migrate before accepting agents; wait for Postgres if it is not up yet.
    let mut backoff = Backoff::new(MIGRATE_RETRY_BASE, MIGRATE_RETRY_CAP);
    loop {
        match tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = migrate_once_at_start(&target, config.database.retention) => r,
        } {
            Ok(()) => break,
            Err(e) => {
                let delay = backoff.next();
                tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "database not ready: {e:#}"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if let Some((listener, tls)) = api {
        tracing::info!(addr = %listener.local_addr()?, "serving the operators' api (mTLS, operator certificates only)");
        let (target, shutdown) = (target.clone(), shutdown.clone());
        let stale_after = config.fleet.stale_after;
        tasks.spawn(async move {
            if let Err(e) = crate::api::serve(listener, tls, target, stale_after, shutdown).await {
                tracing::error!("api server: {e}");
            }
        });
    }
    tasks.spawn(keep_partitions(
        target.clone(),
        config.database.retention,
        shutdown.clone(),
    ));

    let hello_timeout = hello_timeout();
    let sessions: Arc<crate::sessions::Sessions> = Default::default();
    let controller = crate::controller::start(
        target.clone(),
        sessions.clone(),
        metrics.clone(),
        crate::controller::RateLimit::default(),
        shutdown.clone(),
        tasks,
    );
    let service = ingest_route(IngestService {
        store,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            crate::ingest::MAX_IN_FLIGHT_UNITS,
        )),
        hello_timeout,
        ack_stall: ack_stall(),
        require_identity: tls.is_some(),
        sessions,
        controller,
        session_tasks: session_tasks.clone(),
    });

    // TCP_NODELAY is set by the accept thread (the builder's applies only to its own bind).
    let builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(service);
    let listener = listen::bind(config.server.grpc_listen, config.server.listen_backlog)
        .with_context(|| format!("cannot listen on {} (grpc)", config.server.grpc_listen))?;
    let backlog = listener.backlog;
    let accepted =
        listen::accept(listener, shutdown.clone()).context("starting the accept thread")?;
    // Ready only once agents can connect: /readyz said ready between the migration and
    // this bind, and a balancer (or a test) that trusted it found the gRPC port closed.
    readiness.migrated.store(true, Ordering::Relaxed);
    let signalled = shutdown.clone().cancelled_owned();
    tracing::info!(
        addr = %config.server.grpc_listen,
        listen_backlog = backlog,
        tls = tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "edgeprobe-collector accepting agents"
    );
    let grpc = match tls {
        Some(tls) => {
            tasks.spawn(tls::watch(tls.clone(), TLS_POLL, shutdown.clone()));
            let incoming = tls::incoming(accepted, tls, hello_timeout, shutdown.clone());
            tokio::spawn(builder.serve_with_incoming_shutdown(incoming, signalled))
        }
        None => {
            // Without a handler SIGHUP would kill the process; there is nothing to reload.
            let mut hup = tls::hangups();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        h = hup.recv() => match h {
                            Some(()) => tracing::info!("sighup: insecure mode, no certificates to reload"),
                            None => return,
                        },
                    }
                }
            });
            tokio::spawn(builder.serve_with_incoming_shutdown(accepted, signalled))
        }
    };
    grpc.await
        .context("grpc server task")?
        .context("grpc server")?;
    Ok(())
}

/// The Ingest route with one message bound for both directions, the one the agent's
/// client applies (`bounds::MAX_MESSAGE_BYTES`): nothing is sent that an agent refuses to
/// decode, which would end its stream. An ack may name up to 10,000 quarantined results
/// with their reasons.
pub fn ingest_route<T: edgeprobe_proto::v1::ingest_server::Ingest>(service: T) -> IngestServer<T> {
    IngestServer::new(service, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES)
}

async fn migrate_once_at_start(target: &Target, retention: Duration) -> anyhow::Result<()> {
    let mut client = target
        .connect()
        .await
        .context("cannot connect to postgres")?;
    schema::migrate(&mut client)
        .await
        .context("migration failed")?;
    warn_unless_utf8(&client).await;
    // One attempt per step: today's partitions exist before agents are accepted, but a long
    // reader of `results` defers upkeep to the background rounds instead of delaying start.
    if let Err(e) = schema::maintain_partitions(&client, Some(retention), 1).await {
        warn_upkeep(&e);
    }
    Ok(())
}

/// A least-privilege runtime role may not own `results`; then `migrate --retention` run by
/// the owner keeps the partitions, and the default partition catches the rest.
fn warn_upkeep(e: &tokio_postgres::Error) {
    tracing::warn!(
        "cannot maintain partitions (run `edgeprobe-collector migrate --retention` as the owner): {}",
        pg::describe(e)
    );
}

/// Agents send UTF-8; a database in another encoding refuses what it cannot hold (those
/// results are quarantined with SQLSTATE 22P05), which an operator should know up front.
async fn warn_unless_utf8(client: &tokio_postgres::Client) {
    match client.query_one("SHOW server_encoding", &[]).await {
        Ok(row) => {
            let encoding: String = row.get(0);
            if encoding != "UTF8" {
                tracing::warn!(
                    %encoding,
                    "the database is not UTF8: results with characters it cannot hold (labels, names, messages) are quarantined in rejected_results; create the database with ENCODING 'UTF8'"
                );
            }
        }
        Err(e) => tracing::warn!("cannot read server_encoding: {}", pg::describe(&e)),
    }
}

async fn keep_partitions(target: Target, retention: Duration, shutdown: CancellationToken) {
    // The first round runs at once, to finish what start-up's single attempts deferred.
    let mut ticks = tokio::time::interval(upkeep_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let result = async {
            let client = target.connect().await?;
            schema::maintain_partitions(&client, Some(retention), schema::ATTEMPTS).await
        }
        .await;
        if let Err(e) = result {
            warn_upkeep(&e);
        }
    }
}

fn server_tls(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<ServerTls>> {
    let path = |p: &Option<std::path::PathBuf>, what: &str| {
        p.clone()
            .with_context(|| format!("[server] {what} is not set"))
    };
    let files = TlsFiles {
        cert: path(&config.server.tls_cert, "tls_cert")?,
        key: path(&config.server.tls_key, "tls_key")?,
        client_ca: path(&config.server.client_ca, "client_ca")?,
    };
    Ok(ServerTls::load(files, metrics)?)
}

/// How often partitions are kept. `EDGEPROBE_UPKEEP_INTERVAL_MS` overrides the hourly
/// default for tests; it is not a knob.
fn upkeep_interval() -> Duration {
    std::env::var("EDGEPROBE_UPKEEP_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(PARTITION_EVERY, Duration::from_millis)
}

/// How long a new connection may take for its TLS handshake, and then its stream for the
/// hello. `EDGEPROBE_HELLO_TIMEOUT_MS` overrides the default for tests; it is not a knob.
fn hello_timeout() -> Duration {
    std::env::var("EDGEPROBE_HELLO_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(crate::ingest::HELLO_TIMEOUT, Duration::from_millis)
}

/// How long a peer may read no ack before its stream is closed. `EDGEPROBE_ACK_STALL_MS`
/// overrides the default for tests; it is not a knob.
fn ack_stall() -> Duration {
    std::env::var("EDGEPROBE_ACK_STALL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(crate::ingest::ACK_STALL, Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use edgeprobe_proto::v1 as pb;
    use futures::Stream;
    use prost::Message;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// Answers every stream with `messages`, whatever the agent sends.
    struct Sends(Vec<pb::CollectorMessage>);

    #[tonic::async_trait]
    impl edgeprobe_proto::v1::ingest_server::Ingest for Sends {
        type StreamStream =
            Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send + 'static>>;

        async fn stream(
            &self,
            _: Request<Streaming<pb::AgentMessage>>,
        ) -> Result<Response<Self::StreamStream>, Status> {
            let messages = self.0.clone().into_iter().map(Ok);
            Ok(Response::new(Box::pin(futures::stream::iter(messages))))
        }
    }

    /// A push whose whole message encodes to `bytes`.
    fn push_of(bytes: usize) -> pb::CollectorMessage {
        let mut len = bytes - 16;
        loop {
            let m = pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::FleetTests(pb::FleetTests {
                    version: 1,
                    tests_toml: "#".repeat(len),
                })),
            };
            match m.encoded_len().cmp(&bytes) {
                std::cmp::Ordering::Equal => return m,
                std::cmp::Ordering::Less => len += 1,
                std::cmp::Ordering::Greater => len -= 1,
            }
        }
    }

    /// The collector's route (this module's `ingest_route`) sends up to the shared bound,
    /// `bounds::MAX_MESSAGE_BYTES`, and never more; the agent's client decodes up to the
    /// same bound (its own test in `uplink.rs`).
    #[tokio::test]
    async fn the_route_sends_the_largest_message_the_bound_allows_and_no_larger() {
        let largest = push_of(MAX_MESSAGE_BYTES);
        let over = push_of(MAX_MESSAGE_BYTES + 1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .add_service(ingest_route(Sends(vec![largest.clone(), over])))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
        let mut inbound = pb::ingest_client::IngestClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        match inbound.message().await {
            Ok(Some(m)) => assert_eq!(m, largest),
            other => panic!("the largest message did not arrive: {other:?}"),
        }
        // One byte more is refused by the collector's encoder: it never leaves.
        let e = inbound.message().await.unwrap_err();
        assert!(
            e.message().contains("too large") || e.message().contains("exceed"),
            "{e}"
        );
    }
}
