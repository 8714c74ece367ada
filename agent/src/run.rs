//! `edgeprobe-agent run`: wires buffer, scheduler and uplink together and shuts them down
//! in order on SIGTERM or SIGINT: stop firing, let runs in progress record their results,
//! stop the uplink, close the buffer. SIGHUP reloads the configuration file: tests are
//! rescheduled, the uplink restarts if its settings changed, and a file that does not
//! check keeps the running configuration. A clock watch asks the kernel every
//! `CLOCK_CHECK_EVERY` whether its clock is synchronised and corrects buffered results
//! when something vouches for the clock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::clock::Clock;
use crate::config::Config;
use crate::schedule::Scheduler;
use crate::uplink::Uplink;

/// Time given to runs in progress at shutdown.
const GRACE: Duration = Duration::from_secs(5);

pub async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let agent_id = config.agent_id();
    let buffer = open_buffer(&config).await?;
    let stats = buffer.stats();
    let clock = Clock::new();
    tracing::info!(
        agent_id = %agent_id,
        version = env!("CARGO_PKG_VERSION"),
        incarnation = %stats.incarnation,
        backlog = stats.backlog,
        next_seq = stats.next_seq,
        tests = config.tests.len(),
        clock_synchronised = clock.base().is_some(),
        "edgeprobe-agent starting"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(watch_clock(
        clock.clone(),
        buffer.clone(),
        shutdown.child_token(),
    ));
    let mut uplink = start_uplink(&config, &buffer, &clock, &shutdown);
    let mut scheduler = Scheduler::start(
        &config,
        buffer.clone(),
        clock.clone(),
        shutdown.child_token(),
    )
    .await
    .context("starting the scheduler")?;
    tokio::spawn(publish_status(
        buffer.clone(),
        config.agent.state_dir.clone(),
        shutdown.child_token(),
    ));

    let mut config = config;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangups.recv() => {
                // Reload: a bad file keeps the running configuration.
                let new = match Config::load(&path) {
                    Ok(new) => new,
                    Err(e) => {
                        tracing::error!("reload refused, keeping the running configuration: {e}");
                        continue;
                    }
                };
                if new.agent.state_dir != config.agent.state_dir
                    || new.agent.buffer_max_bytes != config.agent.buffer_max_bytes
                {
                    tracing::warn!("state_dir and buffer_max_bytes take effect at the next restart");
                }
                scheduler.stop(GRACE).await;
                if new.agent_id() != config.agent_id()
                    || new.agent.labels != config.agent.labels
                    || format!("{:?}", new.collector) != format!("{:?}", config.collector)
                {
                    uplink.0.cancel();
                    let _ = tokio::time::timeout(GRACE, uplink.1).await;
                    uplink = start_uplink(&new, &buffer, &clock, &shutdown);
                }
                scheduler = Scheduler::start(&new, buffer.clone(), clock.clone(), shutdown.child_token())
                    .await
                    .context("restarting the scheduler")?;
                tracing::info!(tests = new.tests.len(), "configuration reloaded");
                config = new;
            }
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    scheduler.stop(GRACE).await;
    let _ = tokio::time::timeout(GRACE, uplink.1).await;
    tokio::task::spawn_blocking(move || buffer.close())
        .await
        .context("closing the buffer")?;
    tracing::info!("stopped");
    Ok(())
}

/// Opens the buffer, waiting up to `LOCK_WAIT` while another process holds its lock: an
/// `edgeprobe-agent buffer` run at the moment the agent starts holds it for a moment, and
/// must not make the start fail. Another running agent still fails the start after that.
async fn open_buffer(config: &Config) -> Result<Buffer, crate::buffer::BufferError> {
    const LOCK_WAIT: Duration = Duration::from_secs(10);
    let start = std::time::Instant::now();
    loop {
        match Buffer::open(&config.agent.state_dir, config.agent.buffer_max_bytes) {
            Err(crate::buffer::BufferError::Locked { .. }) if start.elapsed() < LOCK_WAIT => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// Starts the uplink with its own token, so a reload can replace it alone.
fn start_uplink(
    config: &Config,
    buffer: &Buffer,
    clock: &Clock,
    shutdown: &CancellationToken,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = shutdown.child_token();
    let uplink = Uplink {
        agent_id: config.agent_id(),
        labels: config.agent.labels.clone(),
        collector: config.collector.clone(),
        buffer: buffer.clone(),
        clock: clock.clone(),
    };
    (token.clone(), tokio::spawn(uplink.run(token)))
}

/// How often the kernel is asked whether its clock is synchronised.
const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Asks the kernel about its clock every few seconds and corrects buffered results once
/// something vouches for the clock (the kernel here, a collector's welcome in the uplink).
async fn watch_clock(clock: Clock, buffer: Buffer, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(CLOCK_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // One adjtimex call: cheap enough for an async worker.
        if clock.check_kernel() {
            crate::uplink::correct_in_background(clock.clone(), buffer.clone()).await;
        }
    }
}

/// How often the running agent publishes its buffer stats for `edgeprobe-agent buffer`.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

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

/// Installs the SIGTERM and SIGINT handlers now, so that a signal arriving during start-up
/// is handled rather than fatal, and returns a future that resolves on the first of them.
/// Must be called inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("cannot install the SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
