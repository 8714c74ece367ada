//! `edgeprobe-agent run`: wires buffer, scheduler and uplink together and shuts them down
//! in order on SIGTERM or SIGINT: stop firing, let runs in progress record their results,
//! stop the uplink, close the buffer.

use std::path::{Path, PathBuf};
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
    tokio::spawn(publish_status(
        buffer.clone(),
        config.agent.state_dir.clone(),
        shutdown.child_token(),
    ));

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

/// How often the running agent publishes its buffer stats for `edgeprobe-agent buffer`.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The file `edgeprobe-agent buffer` reads while sled is locked by this process.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("buffer.status")
}

/// Writes the buffer stats to `status_path` every few seconds (atomically, by rename).
async fn publish_status(buffer: Buffer, state_dir: PathBuf, shutdown: CancellationToken) {
    let path = status_path(&state_dir);
    let tmp = path.with_extension("status.tmp");
    let mut ticks = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let text = buffer.stats().render(&state_dir);
        let written = async {
            tokio::fs::write(&tmp, text).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), "cannot write buffer status: {e}");
        }
    }
    // Stale once the agent stops: the buffer itself can be opened then.
    let _ = tokio::fs::remove_file(&path).await;
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
