//! Builder mode: `builderctl preflight`, `enter` and `leave`.
//!
//! Who runs it decides how (docs/BUILDER-NODE.md): root without a reachable daemon steers
//! its own hosts file and cuts connections itself, as before; everyone else (root with a
//! daemon, users in the build group) opens a session with the builder daemon, which
//! steers for the whole machine; users get their workspace from the daemon too.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, bail};
use distcc_builder::cluster::Probe;
use distcc_builder::daemon::failover_readiness;
use distcc_builder::host_list::{HostList, write_atomically};
use distcc_builder::session::{self, DaemonReach, LocalFacts, PreflightCheck, Runner, SESSION_VAR};
use distcc_builder::session_socket::{
    self, Client, ClientError, ErrorKind, Failover, SessionOpened,
};
use distcc_builder::steer::{self, CutPolicy, SlowCuts, SteeringEvent};
use distcc_builder::workspace::{self, Mountable, Prepared};

use super::{BuilderSetup, exit_for};

/// Whether this process runs as root (its own workspace; steering by itself when no
/// daemon is reachable).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn runner() -> Runner {
    if is_root() {
        Runner::Root {
            net_admin: failover_readiness() == Failover::Armed,
        }
    } else {
        Runner::User
    }
}

/// The name of the user running this, for fixes shown to them.
fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::geteuid().to_string(), |u| u.name)
}

/// How the session goes, once the daemon was asked.
enum Steering {
    /// Root without a daemon: its own streams, hosts file and cuts.
    Own { probes: Vec<Probe> },
    /// The daemon steers; this connection is the session.
    Daemon {
        opened: SessionOpened,
        session: session_socket::Session,
    },
}

/// Open a session with the daemon, and what the checklist says about it.
async fn reach_daemon(
    setup: &BuilderSetup,
) -> (
    DaemonReach,
    Option<(SessionOpened, session_socket::Session)>,
) {
    let socket = setup.config.daemon_socket.clone();
    let refused = |listed: bool| DaemonReach::NotInGroup {
        user: user_name(),
        group: setup.config.build_group.clone(),
        listed,
    };
    let opened = match Client::connect(&socket).await {
        Ok(client) => client.open_session(true).await,
        Err(e) => Err(e),
    };
    match opened {
        Ok((opened, session)) => (
            DaemonReach::Reached {
                socket,
                failover: opened.failover.clone(),
            },
            Some((opened, session)),
        ),
        Err(e @ ClientError::Unreachable { .. }) => (
            DaemonReach::Unreachable {
                why: match &e {
                    ClientError::Unreachable { source, .. } => source.to_string(),
                    _ => e.to_string(),
                },
                socket,
            },
            None,
        ),
        Err(ClientError::PermissionDenied { .. }) => (refused(listed_in_group(setup)), None),
        Err(e) if e.kind() == Some(ErrorKind::NotInGroup) => {
            (refused(listed_in_group(setup)), None)
        }
        Err(e) => (
            DaemonReach::Failed {
                socket,
                why: e.to_string(),
            },
            None,
        ),
    }
}

/// Whether the group database lists this user in the build group (then only this login
/// predates it).
fn listed_in_group(setup: &BuilderSetup) -> bool {
    let Some(gid) = session_socket::group_id(&setup.config.build_group) else {
        return false;
    };
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .is_some_and(|u| session_socket::groups_of(&u.name, u.gid.as_raw()).contains(&gid))
}

/// The user's workspace (the daemon's `user_workspaces/USER`) as preflight sees it.
fn user_workspace_check(path: &Path) -> Result<Mountable, String> {
    match workspace::mounted_fstype(path) {
        Ok(Some(t)) if t == "tmpfs" => Ok(Mountable::AlreadyMounted),
        Ok(_) => Ok(Mountable::WillMount),
        Err(e) => Err(e.to_string()),
    }
}

fn user_workspace_path(setup: &BuilderSetup) -> PathBuf {
    workspace::user_workspace(&setup.config.user_workspaces, &user_name())
}

/// Preflight: the checklist, and how steering would go.
async fn check(
    setup: &BuilderSetup,
) -> anyhow::Result<(Vec<PreflightCheck>, LocalFacts, HostList, Option<Steering>)> {
    let runner = runner();
    let (reach, session) = reach_daemon(setup).await;
    let own_workspace = matches!(runner, Runner::Root { .. });
    let workspace_path = if own_workspace {
        setup.config.workspace.clone()
    } else {
        user_workspace_path(setup)
    };
    let mut facts = LocalFacts::gather(
        &setup.config.compilers,
        setup.config.masquerade_dir.as_deref(),
        &workspace_path,
    );
    if !own_workspace {
        // The daemon mounts it (distcc-workspace@USER.service); this user cannot.
        facts.workspace_check = user_workspace_check(&workspace_path);
    }
    let local = facts.compilers.clone().unwrap_or_default();
    let (checks, list, steering) = match session {
        Some((opened, session)) => {
            let list = opened.host_list.clone();
            let mut checks = session::preflight(&facts, &[], &list, setup.policy.allow_mismatch);
            for c in checks
                .iter_mut()
                .filter(|c| c.name == "compilers match workers")
            {
                c.detail = "compared by the builder daemon (builderctl hosts shows each worker)"
                    .to_owned();
            }
            (checks, list, Some(Steering::Daemon { opened, session }))
        }
        None if own_workspace && matches!(reach, DaemonReach::Unreachable { .. }) => {
            let (probes, list) = setup.survey(&local).await?;
            let checks = session::preflight(&facts, &probes, &list, setup.policy.allow_mismatch);
            (checks, list, Some(Steering::Own { probes }))
        }
        None => {
            // No session possible: the toolchain checks and what is missing.
            let list = HostList {
                workers: Vec::new(),
                local_slots: setup.policy.local_slots,
            };
            let checks = session::preflight(&facts, &[], &list, setup.policy.allow_mismatch)
                .into_iter()
                .filter(|c| c.name != "workers ready" && c.name != "compilers match workers")
                .collect();
            (checks, list, None)
        }
    };
    let mut checks: Vec<PreflightCheck> = checks;
    checks.extend(session::daemon_checks(&reach, runner));
    Ok((checks, facts, list, steering))
}

/// `builderctl preflight`.
pub async fn preflight(setup: &BuilderSetup) -> anyhow::Result<ExitCode> {
    let (checks, _, _, _) = check(setup).await?;
    print!("{}", session::render_checklist(&checks));
    Ok(exit_for(checks.iter().all(|c| c.passed)))
}

/// `builderctl leave`.
pub async fn leave(setup: &BuilderSetup) -> anyhow::Result<ExitCode> {
    let path = leave_workspace(setup).await?;
    println!("unmounted {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// Root unmounts its own `workspace`; a user asks the daemon for its own one, after
/// checking that none of its processes uses it (the daemon cannot see them).
async fn leave_workspace(setup: &BuilderSetup) -> anyhow::Result<PathBuf> {
    if is_root() {
        let path = setup.config.workspace.clone();
        workspace::leave(&path)?;
        return Ok(path);
    }
    let path = user_workspace_path(setup);
    let users = workspace::users_of(&path);
    if !users.is_empty() {
        bail!(
            "{} is in use by {}; leave those shells first",
            path.display(),
            users.join(", ")
        );
    }
    let mut client = Client::connect(&setup.config.daemon_socket).await?;
    match client.leave().await {
        Ok(left) => Ok(left.path),
        Err(e) if e.kind() == Some(ErrorKind::NotMounted) => {
            bail!("{} is not mounted", path.display())
        }
        Err(e) => Err(e.into()),
    }
}

/// `builderctl enter`: preflight, workspace, session DISTCC_DIR, then the shell or
/// command, steering the hosts file (or following the daemon's) until it exits.
pub async fn run(
    setup: &BuilderSetup,
    leave: bool,
    command: Vec<String>,
) -> anyhow::Result<ExitCode> {
    if let Some(session) = std::env::var_os(SESSION_VAR) {
        bail!(
            "already in a builder session (DISTCC_DIR {}); exit that shell first",
            Path::new(&session).display()
        );
    }
    let (checks, facts, list, steering) = check(setup).await?;
    eprint!("{}", session::render_checklist(&checks));
    let (true, Some(steering)) = (checks.iter().all(|c| c.passed), steering) else {
        eprintln!("builderctl: preflight failed; not entering builder mode");
        return Ok(ExitCode::FAILURE);
    };
    let (Some(masquerade), Ok(local)) = (facts.masquerade_dir.clone(), facts.compilers.clone())
    else {
        bail!("preflight passed without a masquerade dir or compilers"); // checked above
    };
    let workspace_path = if is_root() {
        let path = setup.config.workspace.clone();
        let prepared = workspace::prepare(&path, &setup.config.tmpfs_size)?;
        report_workspace(&path, prepared, &setup.config.tmpfs_size);
        path
    } else {
        let mut client = Client::connect(&setup.config.daemon_socket).await?;
        let ready = client
            .workspace()
            .await
            .context("asking the builder daemon for this user's workspace")?;
        report_workspace(&ready.path, ready.mounted, &setup.config.tmpfs_size);
        ready.path
    };
    let session_dir = tempfile::Builder::new()
        .prefix("builderctl-session-")
        .tempdir()
        .context("creating the session's DISTCC_DIR")?;
    let distcc_dir = session_dir.path().to_owned();
    let hosts_file = distcc_dir.join("hosts");
    let log_path = distcc_dir.join("steering.log");
    match &steering {
        Steering::Own { .. } => write_atomically(&hosts_file, &list.render())
            .with_context(|| format!("writing {}", hosts_file.display()))?,
        Steering::Daemon { opened, .. } => {
            session::link_daemon_hosts(&distcc_dir, &opened.hosts_file).with_context(|| {
                format!(
                    "linking {} to {}",
                    hosts_file.display(),
                    opened.hosts_file.display()
                )
            })?
        }
    }
    let vars = session::session_env(
        &masquerade,
        &distcc_dir,
        &list,
        &std::env::var("PATH").unwrap_or_default(),
    );
    let mut child = if command.is_empty() {
        shell_command(&distcc_dir, list.total_slots())?
    } else {
        let mut c = tokio::process::Command::new(&command[0]);
        c.args(&command[1..]);
        c
    };
    child
        .current_dir(&workspace_path)
        .envs(vars.iter().map(|(k, v)| (k, v)));
    eprintln!(
        "builderctl: builder mode: {} slots, DISTCC_DIR={}",
        list.total_slots(),
        distcc_dir.display()
    );
    // Ctrl-C belongs to the shell or the build; this process keeps steering until its
    // child exits. (Handlers are reset on exec, so the child sees default dispositions.)
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("handling SIGINT")?;
    let mut quits = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit())
        .context("handling SIGQUIT")?;
    let mut running = child.spawn().with_context(|| {
        format!(
            "starting {}",
            command.first().map_or("the shell", String::as_str)
        )
    })?;
    let mut steering: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> = match steering {
        Steering::Own { probes } => {
            let log_path = log_path.clone();
            Box::pin(steer::steer(
                // Compiles in flight on a lost or slow worker fall back to local ones at
                // once.
                setup.steering(
                    local,
                    hosts_file,
                    CutPolicy {
                        lost: true,
                        slow: SlowCuts::All,
                    },
                    None,
                )?,
                probes,
                move |event| log_event(&log_path, &event),
            ))
        }
        Steering::Daemon { session, .. } => Box::pin(follow_daemon(
            setup.config.daemon_socket.clone(),
            session,
            log_path.clone(),
        )),
    };
    let status = loop {
        tokio::select! {
            status = running.wait() => break status.context("waiting for the session's command")?,
            () = &mut steering => {} // ends only if no worker is configured
            _ = interrupts.recv() => {}
            _ = quits.recv() => {}
        }
    };
    drop(steering); // closes the daemon session before the workspace is left
    drop(session_dir);
    if leave {
        match leave_workspace(setup).await {
            Ok(path) => eprintln!("builderctl: unmounted {}", path.display()),
            Err(e) => eprintln!("builderctl: kept the workspace: {e:#}"),
        }
    }
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => {
            use std::os::unix::process::ExitStatusExt;
            ExitCode::from(128 + u8::try_from(status.signal().unwrap_or(1)).unwrap_or(1))
        }
    })
}

fn report_workspace(path: &Path, prepared: Prepared, size: &str) {
    match prepared {
        Prepared::Mounted => eprintln!("builderctl: mounted a {size} tmpfs at {}", path.display()),
        Prepared::Reused => eprintln!("builderctl: reusing the tmpfs at {}", path.display()),
    }
}

/// The daemon's steering lines into the session's log, for as long as the session runs,
/// across restarts of the daemon (see [`session_socket::follow`]).
async fn follow_daemon(socket: PathBuf, session: session_socket::Session, log_path: PathBuf) {
    session_socket::follow(&socket, session, true, |line| {
        log_lines(&log_path, &[line]);
    })
    .await;
}

/// One line per event in `$DISTCC_DIR/steering.log`, stamped with Unix seconds.
fn log_event(log_path: &Path, event: &SteeringEvent<'_>) {
    log_lines(log_path, &event.describe());
    for line in event.describe() {
        tracing::info!(kind = event.kind(), "{line}");
    }
}

fn log_lines(log_path: &Path, lines: &[String]) {
    use std::io::Write;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // A log that cannot be written must not disturb the session.
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
    {
        for line in lines {
            let _ = writeln!(log, "{stamp} {line}");
        }
    }
}

/// `$SHELL` with a visible prompt marker: bash gets an rc file that sources the user's
/// and prefixes PS1 (an exported PS1 would be overwritten by ~/.bashrc).
fn shell_command(distcc_dir: &Path, slots: u32) -> anyhow::Result<tokio::process::Command> {
    let shell = std::env::var("SHELL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".to_owned());
    let marker = format!("(distcc {slots}) ");
    let mut command = tokio::process::Command::new(&shell);
    if Path::new(&shell).file_name().is_some_and(|n| n == "bash") {
        let rc = distcc_dir.join("bashrc");
        std::fs::write(
            &rc,
            format!(
                "[ -f ~/.bashrc ] && . ~/.bashrc\nPS1={}\"$PS1\"\n",
                session::shell_quote(&marker)
            ),
        )
        .with_context(|| format!("writing {}", rc.display()))?;
        command.arg("--rcfile").arg(rc).arg("-i");
    } else {
        let ps1 = std::env::var("PS1").unwrap_or_else(|_| "$ ".to_owned());
        command.env("PS1", format!("{marker}{ps1}"));
    }
    Ok(command)
}
