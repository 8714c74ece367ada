//! `edgeprobe-agent run`: wires buffer, scheduler and uplink together and shuts them down
//! in order on SIGTERM or SIGINT: stop firing, let runs in progress record their results,
//! stop the uplink, close the buffer.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::config::Config;
use crate::schedule::Scheduler;
use crate::uplink::Uplink;

/// Time given to runs in progress at shutdown.
const GRACE: Duration = Duration::from_secs(5);

pub async fn run(config: Config) -> anyhow::Result<()> {
    let agent_id = config.agent_id();
    let buffer = Buffer::open(&config.agent.state_dir, config.agent.buffer_max_bytes)?;
    let stats = buffer.stats();
    tracing::info!(
        agent_id = %agent_id,
        version = env!("CARGO_PKG_VERSION"),
        backlog = stats.backlog,
        next_seq = stats.next_seq,
        tests = config.tests.len(),
        "edgeprobe-agent starting"
    );

    let shutdown = CancellationToken::new();
    let uplink = Uplink {
        agent_id,
        labels: config.agent.labels.clone(),
        collector: config.collector.clone(),
        buffer: buffer.clone(),
    };
    let uplink = tokio::spawn(uplink.run(shutdown.child_token()));
    let scheduler = Scheduler::start(&config, buffer.clone(), shutdown.child_token())
        .await
        .context("starting the scheduler")?;

    shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    scheduler.stop(GRACE).await;
    let _ = tokio::time::timeout(GRACE, uplink).await;
    tokio::task::spawn_blocking(move || buffer.close())
        .await
        .context("closing the buffer")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
