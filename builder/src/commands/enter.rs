//! Builder mode: `builderctl preflight`, `enter` and `leave`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use distcc_builder::cluster::Probe;
use distcc_builder::host_list::{HostList, write_atomically};
use distcc_builder::session::{self, LocalFacts, PreflightCheck, SESSION_VAR};
use distcc_builder::steer::{self, CutPolicy, SlowCuts, SteeringConfig, SteeringEvent};
use distcc_builder::workspace;

use super::{BuilderSetup, exit_for};

/// `builderctl preflight`.
pub async fn preflight(setup: &BuilderSetup) -> anyhow::Result<ExitCode> {
    let (checks, _, _, _) = check(setup).await;
    print!("{}", session::render_checklist(&checks));
    Ok(exit_for(checks.iter().all(|c| c.passed)))
}

/// `builderctl leave`.
pub fn leave(setup: &BuilderSetup) -> anyhow::Result<ExitCode> {
    workspace::leave(&setup.config.workspace)?;
    println!("unmounted {}", setup.config.workspace.display());
    Ok(ExitCode::SUCCESS)
}

async fn check(setup: &BuilderSetup) -> (Vec<PreflightCheck>, LocalFacts, Vec<Probe>, HostList) {
    let facts = LocalFacts::gather(
        &setup.config.compilers,
        setup.config.masquerade_dir.as_deref(),
        &setup.config.workspace,
    );
    let local = facts.compilers.clone().unwrap_or_default();
    let (probes, list) = setup.survey(&local).await;
    let checks = session::preflight(&facts, &probes, &list, setup.policy.allow_mismatch);
    (checks, facts, probes, list)
}

/// `builderctl enter`: preflight, workspace, session DISTCC_DIR, then the shell or
/// command, steering the hosts file until it exits.
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
    let (checks, facts, probes, list) = check(setup).await;
    eprint!("{}", session::render_checklist(&checks));
    if !checks.iter().all(|c| c.passed) {
        eprintln!("builderctl: preflight failed; not entering builder mode");
        return Ok(ExitCode::FAILURE);
    }
    let (Some(masquerade), Ok(local)) = (facts.masquerade_dir.clone(), facts.compilers.clone())
    else {
        bail!("preflight passed without a masquerade dir or compilers"); // checked above
    };
    let workspace_path = &setup.config.workspace;
    match workspace::prepare(workspace_path, &setup.config.tmpfs_size)? {
        workspace::Prepared::Mounted => eprintln!(
            "builderctl: mounted a {} tmpfs at {}",
            setup.config.tmpfs_size,
            workspace_path.display()
        ),
        workspace::Prepared::Reused => {
            eprintln!(
                "builderctl: reusing the tmpfs at {}",
                workspace_path.display()
            )
        }
    }
    let session_dir = tempfile::Builder::new()
        .prefix("builderctl-session-")
        .tempdir()
        .context("creating the session's DISTCC_DIR")?;
    let distcc_dir = session_dir.path().to_owned();
    let hosts_file = distcc_dir.join("hosts");
    write_atomically(&hosts_file, &list.render())
        .with_context(|| format!("writing {}", hosts_file.display()))?;
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
        .current_dir(workspace_path)
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
    let log_path = distcc_dir.join("steering.log");
    let steering = steer::steer(
        SteeringConfig {
            access: setup.config.access.clone(),
            deadline: setup.config.deadline,
            interval: Duration::from_secs(1),
            local,
            policy: setup.policy.clone(),
            hosts_file,
            // Compiles in flight on a lost or slow worker fall back to local ones at once.
            cuts: CutPolicy {
                lost: true,
                slow: SlowCuts::All,
            },
            survey: None,
        },
        probes,
        move |event| log_event(&log_path, &event),
    );
    tokio::pin!(steering);
    let status = loop {
        tokio::select! {
            status = running.wait() => break status.context("waiting for the session's command")?,
            () = &mut steering => {} // ends only if no worker is configured
            _ = interrupts.recv() => {}
            _ = quits.recv() => {}
        }
    };
    drop(session_dir);
    if leave {
        match workspace::leave(workspace_path) {
            Ok(()) => eprintln!("builderctl: unmounted {}", workspace_path.display()),
            Err(e) => eprintln!("builderctl: kept the workspace: {e}"),
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

/// One line per event in `$DISTCC_DIR/steering.log`, stamped with Unix seconds.
fn log_event(log_path: &Path, event: &SteeringEvent<'_>) {
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
        for line in event.describe() {
            let _ = writeln!(log, "{stamp} {line}");
        }
    }
    for line in event.describe() {
        tracing::info!(kind = event.kind(), "{line}");
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
