//! Installing the project's packages in workers with apt, from a local repository made by
//! `packaging/build-debs` and `packaging/apt-repo`. The workers have no route to any
//! mirror, so apt is pointed at the local repository only.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::testbed::Worker;

/// Where [`Worker::use_local_repo`] expects the repository inside the worker.
pub const REPO_IN_WORKER: &str = "/srv/distcc-repo";
const SOURCE_LIST: &str = "/etc/apt/sources.list.d/distcc-local.list";

/// Build the packages (optionally as `version`) and turn them into an apt repository in
/// `dir`, using the project's own scripts.
pub fn build_repository(repo_root: &Path, version: Option<&str>, dir: &Path) -> Result<()> {
    let debian = repo_root.join("target/debian");
    if debian.exists() {
        std::fs::remove_dir_all(&debian)
            .with_context(|| format!("cleaning {}", debian.display()))?;
    }
    let mut build = Command::new(repo_root.join("packaging/build-debs"));
    build.args(version);
    let status = build.status().context("running packaging/build-debs")?;
    ensure!(status.success(), "packaging/build-debs failed: {status}");
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(&debian)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            let name = path.file_name().context("a .deb has a name")?;
            std::fs::copy(&path, dir.join(name))?;
        }
    }
    let status = Command::new(repo_root.join("packaging/apt-repo"))
        .arg(dir)
        .status()
        .context("running packaging/apt-repo")?;
    ensure!(status.success(), "packaging/apt-repo failed: {status}");
    Ok(())
}

impl Worker {
    /// Make the repository bound at [`REPO_IN_WORKER`] apt's only source and update.
    pub fn use_local_repo(&self) -> Result<()> {
        self.write_file(
            SOURCE_LIST,
            format!("deb [trusted=yes] file:{REPO_IN_WORKER} ./\n"),
            0o644,
        )?;
        self.apt(&["update"]).map(drop)
    }

    /// `apt-get -y ARGS` non-interactively, with only the local repository as a source.
    pub fn apt(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec![
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "-y",
            "-o",
            concat!(
                "Dir::Etc::sourcelist=",
                "/etc/apt/sources.list.d/distcc-local.list"
            ),
            "-o",
            "Dir::Etc::sourceparts=-",
            "-o",
            "APT::Get::List-Cleanup=0",
        ];
        argv.extend_from_slice(args);
        self.exec_ok(&argv)
            .with_context(|| format!("apt-get {}", args.join(" ")))
    }
}
