//! Integration tests of edgeprobe: real collector and agent processes, a real PostgreSQL,
//! real sockets. One test binary for the crate (see STYLE.md).

mod api;
mod bounds;
mod check;
mod compat;
mod config_errors;
mod controller;
mod dashboards;
mod durability;
mod failover;
mod fleet;
mod fleet_cli;
mod fleet_push;
mod links;
mod manpages;
mod migrate_log;
mod never_stall;
mod operator;
mod paths;
mod paths_e2e;
mod pg_tls;
mod responsiveness;
mod security;
mod shutdown;
mod spine;
mod stamp;
mod store_errors;
mod storm;
mod support;
mod upkeep;
