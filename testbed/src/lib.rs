//! A whole distcc cluster of real systemd machines on one host, for integration tests.
//!
//! Each worker is a `systemd-nspawn` container booting a cached Debian rootfs (systemd,
//! D-Bus, polkit, distcc, gcc) with a private tmpfs overlay, in its own network namespace
//! attached by a veth to a bridge in the root namespace. The root namespace plays the
//! builder and reaches the workers directly at 198.18.N.x (RFC 2544 benchmarking
//! addresses; nothing leaves the host: workers have no default route).
//!
//! ```no_run
//! use distcc_testbed::{Rootfs, Testbed, WorkerSpec};
//! # fn main() -> anyhow::Result<()> {
//! let _rootfs = Rootfs::ensure()?; // cached; the first call builds it (about 1.5 minutes)
//! let bed = Testbed::create()?;    // bridge br-dcctbN, 198.18.N.1/24
//! let w1 = bed.boot_worker(
//!     WorkerSpec::new("w1").bind_ro("/path/to/distcc-agent", "/usr/bin/distcc-agent"),
//! )?;
//! w1.exec_ok(&["systemctl", "is-system-running"])?;
//! w1.write_file("/etc/distcc-agent/agent.toml", b"listen = \"0.0.0.0:7000\"\n", 0o644)?;
//! println!("{} at {} in {}", w1.name(), w1.ip(), bed.subnet());
//! w1.set_link(false)?; // now silently unreachable
//! drop(bed); // powers off w1 and deletes bridge, namespaces and veths
//! # Ok(()) }
//! ```
//!
//! Everything needs root. Leftovers of test processes that died without cleaning up are
//! deleted by the next [`Testbed::create`], or by [`cleanup_all`]
//! (`distcc-testbed cleanup`). See docs/TESTBED.md.

mod agent;
mod builder_node;
mod cmd;
mod cpu;
mod cxx_project;
mod flood;
pub mod fuzz_corpus;
mod kernel;
mod packages;
mod pki;
mod rootfs;
mod sweep;
mod testbed;

use anyhow::{Result, bail};

pub use agent::{
    AGENT_CERT, AGENT_PORT, AgentInstall, TEST_READ_TOKEN, TEST_TOKEN, agent_config,
    test_tokens_file, tokens_file, write_secret,
};
pub use builder_node::{
    BUILD_GROUP, BUILDER_CONFIG, BUILDER_SERVICE, BUILDER_SOCKET, BUILDER_USER, BuilderInstall,
    BuilderNode, SESSION_SOCKET, SYSTEM_HOSTS_FILE, Spawned, USER_WORKSPACES, builder_node_config,
};
pub use cpu::{CpuBudget, CpuQuota, CpuStat, MilliCpus, prefixed};
pub use cxx_project::{
    CXX_COMPILER, CXX_FLAGS_RELEASE, CXX_OBJECTS, CXX_PACKAGE, CXX_SOURCE_DOWNLOAD, CxxBuild,
    cxx_launcher, cxx_source, cxx_source_in,
};
pub use flood::{IdleConnections, process_cpu};
pub use kernel::{KERNEL_TARBALL, REPRODUCIBLE_BUILD_ENV, kernel_source};
pub use packages::{REPO_IN_WORKER, build_repository};
pub use pki::{CertifiedKey, TestPki};
pub use rootfs::{
    BASE_PACKAGES, CACHE_ENV, DEFAULT_CACHE_DIR, DEFAULT_MIRROR, EXTRA_PACKAGES, MIRROR_ENV,
    ROOTFS_VERSION, Rootfs, SUITE, cache_dir,
};
pub use testbed::{BareHost, EXEC_TIMEOUT, Testbed, Worker, WorkerSpec};

/// Deletes every leftover testbed object on this host (containers, network namespaces,
/// veths, bridges, owner records) whose owning process is gone. Testbeds of live
/// processes are left alone. Returns the indexes cleaned up.
pub fn cleanup_all() -> Result<Vec<u8>> {
    require_root()?;
    let lock = sweep::RunLock::acquire()?;
    let (removed, live) = sweep::sweep(&lock)?;
    if !live.is_empty() {
        tracing::info!(?live, "testbeds of live processes left alone");
    }
    Ok(removed)
}

/// Network namespaces, bridges and containers need root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("distcc-testbed needs root (network namespaces, bridges, systemd-nspawn)");
    }
    Ok(())
}
