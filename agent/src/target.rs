//! serve-target (built in the probe-suite issue).

use std::net::SocketAddr;

pub const DEFAULT_MAX_TESTS: usize = 4;

pub async fn serve(
    listen: SocketAddr,
    max_tests: usize,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let _ = (listen, max_tests);
    shutdown.await;
    Ok(())
}
