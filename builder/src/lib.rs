//! The builder side of the distcc cluster: `builderctl`.
//!
//! So far: the configuration file and cluster-wide status. Builder mode (`enter`), the
//! host list and the other cluster operations follow (issue 3).

pub mod cluster;
pub mod config;
