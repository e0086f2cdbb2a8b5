//! The distcc worker agent: manages distccd through systemd over D-Bus and serves the
//! `distcc.agent.v1` gRPC API. `main.rs` only parses options and calls [`daemon::run`].

pub mod atomic_file;
pub mod capacity;
pub mod compilers;
pub mod config;
pub mod confinement;
pub mod connections;
pub mod daemon;
pub mod distccd_log;
pub mod fuzzing;
pub mod identity;
pub mod limits;
pub mod listening;
pub mod logging;
pub mod runtime;
pub mod service;
pub mod settings;
pub mod settings_store;
pub mod stats;
pub mod status_share;
pub mod systemd;
pub mod tokens;
pub mod unit_control;
pub mod worker;

/// The agent's version: the package version when built by packaging/build-debs (which
/// sets `DISTCC_CLUSTER_VERSION`), else the crate's.
pub const VERSION: &str = match option_env!("DISTCC_CLUSTER_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};
