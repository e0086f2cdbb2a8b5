//! `builderctl env`: the session environment as `export` lines, for scripts and CI.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use distcc_builder::host_list::write_atomically;
use distcc_builder::local;
use distcc_builder::session::{self, SESSION_VAR};

use super::{BuilderSetup, exit_for};

pub async fn run(setup: &BuilderSetup, distcc_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let local = setup.local_compilers()?;
    let masquerade = local::masquerade_dir(setup.config.masquerade_dir.as_deref())
        .context("no distcc masquerade directory (install distcc, run update-distcc-symlinks)")?;
    let dir = match distcc_dir {
        Some(dir) => dir,
        None => default_dir()?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (_, list) = setup.survey(&local).await?;
    write_atomically(&dir.join("hosts"), &list.render())
        .with_context(|| format!("writing {}/hosts", dir.display()))?;
    let mut vars = session::session_env(
        &masquerade,
        &dir,
        &list,
        &std::env::var("PATH").unwrap_or_default(),
    );
    // `eval`ed in a script, not a session: no guard against entering.
    vars.retain(|(name, _)| name != SESSION_VAR);
    print!("{}", session::export_lines(&vars));
    Ok(exit_for(list.included().next().is_some()))
}

/// A private directory for the hosts file when no DISTCC_DIR is given.
fn default_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DISTCC_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let dir = std::env::temp_dir().join(format!("builderctl-env-{}", nix::unistd::geteuid()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // In a shared /tmp, someone else could have created it first: use it only if ours.
    let meta = std::fs::symlink_metadata(&dir).with_context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a private directory of this user; pass --distcc-dir",
            dir.display()
        );
    }
    Ok(dir)
}
