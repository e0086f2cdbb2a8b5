//! Case 8's builder: a build node container (`distcc_testbed::BuilderNode`) on the
//! bench's bridge, where an ordinary user builds the kernel in `builderctl enter` through
//! the builder daemon.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use distcc_testbed::{
    BuilderInstall, BuilderNode, REPRODUCIBLE_BUILD_ENV, USER_WORKSPACES, Worker, WorkerSpec,
    builder_node_config,
};

use crate::Bench;
use crate::builds::{CHECKSUM_OBJECTS, objects_of};

/// The ordinary user who builds (in `distcc-build`).
const USER: &str = "alice";

pub struct UserNode {
    node: BuilderNode,
    source: String,
}

impl UserNode {
    /// Boots the node for the bench's three workers with the kernel tree `source` bound
    /// read-only at the same path, makes the user and mounts her workspace (her first
    /// `enter`); `knobs` are more builder.toml lines (`local_slots`, `lzo`).
    pub fn boot(bench: &Bench, source: &Path, knobs: &str) -> Result<UserNode> {
        let workers: Vec<&Worker> = bench.workers.iter().collect();
        let install = BuilderInstall {
            binary: bench.builderctl.clone(),
            units: bench.repo.join("systemd"),
        };
        // A tinyconfig build needs a few hundred MB; the host's build tmpfs has 4G too.
        let config = builder_node_config(&workers, &format!("tmpfs_size = \"4G\"\n{knobs}"));
        let node = bench
            .bed
            .boot_builder_node(
                WorkerSpec::new("builder").bind_ro(source, source),
                &install,
                &config,
            )
            .context("booting the build node")?;
        node.add_user(USER, true)?;
        node.run_as_ok(USER, &["builderctl", "enter", "--", "true"])
            .context("the user's first session (mounts her workspace)")?;
        let source = source
            .to_str()
            .context("the kernel source path is not UTF-8")?
            .to_owned();
        Ok(UserNode { node, source })
    }

    pub fn worker(&self) -> &Worker {
        self.node.worker()
    }

    /// The build directory, in the user's workspace.
    fn dir() -> String {
        format!("{USER_WORKSPACES}/{USER}/kbuild")
    }

    /// `env KBUILD_…=… PROGRAM ARGS`: the reproducible-build identity, as the host's
    /// builds get it.
    fn with_build_env(argv: &[&str]) -> Vec<String> {
        let mut full = vec!["env".to_owned()];
        full.extend(
            REPRODUCIBLE_BUILD_ENV
                .iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
        full.extend(argv.iter().map(|a| (*a).to_owned()));
        full
    }

    /// An empty build directory and `make tinyconfig` in it, as the user (not timed).
    pub fn configure(&self) -> Result<()> {
        let dir = Self::dir();
        self.node
            .run_as_ok(USER, &["sh", "-c", &format!("rm -rf {dir} && mkdir {dir}")])?;
        let out_dir = format!("O={dir}");
        let argv =
            Self::with_build_env(&["make", "-s", "-C", &self.source, &out_dir, "tinyconfig"]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.node
            .run_as_ok(USER, &argv)
            .context("make tinyconfig in the build node")?;
        Ok(())
    }

    /// The timed build: `builderctl enter -- make -C SOURCE O=DIR -jJOBS CC="distcc gcc"`
    /// as the user, the session's steering log kept in her home.
    pub fn command(&self, jobs: u32) -> Result<Command> {
        let keep = format!(
            "make \"$@\"; rc=$?; cp \"$DISTCC_DIR/steering.log\" /home/{USER}/steering.log 2>/dev/null; exit $rc"
        );
        let out_dir = format!("O={}", Self::dir());
        let jobs = format!("-j{jobs}");
        let argv = Self::with_build_env(&[
            "builderctl",
            "enter",
            "--",
            "sh",
            "-c",
            &keep,
            "make",
            "-C",
            &self.source,
            &out_dir,
            &jobs,
            "CC=distcc gcc",
        ]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.node.command_as(USER, &argv)
    }

    /// Copies the last session's steering log out of the node to `to` (best effort).
    pub fn keep_steering_log(&self, to: &Path) {
        let path = format!("/home/{USER}/steering.log");
        if let Ok(log) = self.node.exec_ok(&["cat", &path]) {
            let _ = std::fs::write(to, log);
        }
        let _ = self.node.exec(&["rm", "-f", &path]);
    }

    /// The build's objects, checksummed inside the node the way the host's are.
    pub fn objects(&self) -> Result<BTreeMap<String, String>> {
        let dir = Self::dir();
        let out = self
            .node
            .exec(&["bash", "-c", CHECKSUM_OBJECTS, "checksum", &dir])?;
        let vmlinux = self
            .node
            .exec(&["test", "-e", &format!("{dir}/vmlinux")])?
            .status
            .success();
        objects_of(&out, vmlinux)
    }
}

impl Drop for UserNode {
    fn drop(&mut self) {
        let _ = self.node.run_as(USER, &["builderctl", "leave"]);
    }
}
