//! The agent's integration tests: one binary (link time on 2 cores), real processes, real
//! sockets on 127.0.0.1, real network namespaces for link tests (root). A test that needs
//! namespaces fails where it cannot create them (`util::cannot_run`), unless a developer
//! sets `EDGEPROBE_ALLOW_SKIP=1` outside CI.

mod chain;
mod check;
mod dns;
mod fleet;
mod footprint;
mod http;
mod icmp;
mod link;
mod links;
mod path;
mod probes;
mod responsiveness;
mod schedule;
mod speed;
mod stamp;
mod state;
mod target;
mod upload_link;
mod util;
mod zones;
