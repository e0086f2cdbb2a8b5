//! The builder side of the distcc cluster: `builderctl`.
//!
//! One module per concern: the configuration, talking to the agents, the host list, the
//! builder's own toolchain, the tmpfs workspace, the live session and distcc's state
//! files.

pub mod cluster;
pub mod config;
pub mod daemon;
pub mod exclusion;
pub mod failover;
pub mod fuzzing;
pub mod host_list;
pub mod local;
pub mod ops;
pub mod pace;
pub mod session;
pub mod session_socket;
pub mod snapshot;
pub mod state_files;
pub mod steer;
pub mod straggler;
pub mod track;
pub mod trust;
pub mod untrusted;
pub mod workspace;
