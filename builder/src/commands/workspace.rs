//! `builderctl workspace mount|unmount USER` (hidden): run as root by
//! `distcc-workspace@USER.service`, which the builder daemon starts and stops.

use std::process::ExitCode;

use anyhow::Context;
use distcc_builder::workspace::{self, Prepared, WorkspaceOwner};

use super::BuilderSetup;

pub fn mount(setup: &BuilderSetup, user: &str) -> anyhow::Result<ExitCode> {
    let owner = WorkspaceOwner::check(user, &setup.config.build_group)
        .with_context(|| format!("refusing to mount a workspace for {user}"))?;
    let (path, prepared) = workspace::mount_user_workspace(
        &setup.config.user_workspaces,
        &owner,
        &setup.config.tmpfs_size,
    )?;
    match prepared {
        Prepared::Mounted => println!(
            "mounted a {} tmpfs for {user} at {}",
            setup.config.tmpfs_size,
            path.display()
        ),
        Prepared::Reused => println!("reusing the tmpfs of {user} at {}", path.display()),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unmount(setup: &BuilderSetup, user: &str) -> anyhow::Result<ExitCode> {
    let path = workspace::unmount_user_workspace(&setup.config.user_workspaces, user)?;
    println!("unmounted {}", path.display());
    Ok(ExitCode::SUCCESS)
}
