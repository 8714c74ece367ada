//! The agent's integration tests: one binary (link time on 2 cores), real processes, real
//! sockets on 127.0.0.1, real network namespaces for link tests (root; skipped with a
//! printed reason only when `ip netns add` fails).

mod dns;
mod fleet;
mod http;
mod icmp;
mod link;
mod probes;
mod schedule;
mod speed;
mod state;
mod target;
mod uplink;
mod util;
mod zones;
