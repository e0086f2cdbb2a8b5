//! `builderctl daemon` (distcc-builder.service): the machine's steering, failover and
//! session socket; the logic is `distcc_builder::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use distcc_builder::daemon::{Daemon, DaemonSettings, failover_readiness};
use distcc_builder::host_list::write_atomically;
use distcc_builder::session_socket::{self, Failover};
use distcc_builder::steer::{self, CutPolicy, SlowCuts, Survey};

use super::BuilderSetup;

/// The listening socket: systemd's (distcc-builder.socket), else `daemon_socket` bound
/// here. Runs before the async runtime starts (it clears LISTEN_FDS/LISTEN_PID).
pub struct Listener {
    socket: std::os::unix::net::UnixListener,
    /// Bound by this process (not activated): removed again on exit.
    bound: Option<PathBuf>,
}

pub fn listen(setup: &BuilderSetup) -> anyhow::Result<Listener> {
    let path = &setup.config.daemon_socket;
    let (socket, activated) = session_socket::listener(path)
        .with_context(|| format!("listening for sessions on {}", path.display()))?;
    Ok(Listener {
        socket,
        bound: (!activated).then(|| path.clone()),
    })
}

pub async fn run(
    setup: &BuilderSetup,
    hosts_file: PathBuf,
    listener: Listener,
) -> anyhow::Result<ExitCode> {
    // The daemon alone reads the token on a build node; users go through it.
    setup.access()?;
    let local = setup.local_compilers()?;
    let (probes, list) = setup.survey(&local).await?;
    write_atomically(&hosts_file, &list.render())
        .with_context(|| format!("writing {}", hosts_file.display()))?;
    let failover = failover_readiness();
    if let Failover::NotArmed(why) = &failover {
        tracing::warn!("failover NOT armed: {why}");
    }
    let daemon = Daemon::new(
        DaemonSettings {
            hosts_file: hosts_file.clone(),
            user_workspaces: setup.config.user_workspaces.clone(),
            failover,
        },
        Survey {
            probes: probes.clone(),
            list,
        },
    );
    let Listener { socket, bound } = listener;
    let socket =
        tokio::net::UnixListener::from_std(socket).context("serving the session socket")?;
    let server = session_socket::serve(
        socket,
        setup.config.build_group.clone(),
        Arc::new(daemon.clone()),
    );
    tracing::info!("{}", daemon.describe());
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&daemon.describe()),
    ]);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    let on_event = daemon.clone();
    let steering = steer::steer(
        // The daemon owns failover for every build: the same pace as a session's. A
        // confirmed loss is cut for every build on the machine; a slow verdict only for
        // the uids whose sessions asked for it. Sessions and users' status/hosts are
        // answered from the survey.
        setup.steering(
            local,
            hosts_file,
            CutPolicy {
                lost: true,
                slow: SlowCuts::OwnedBy(daemon.slow_cut_uids()),
            },
            Some(daemon.survey_sender()),
        )?,
        probes,
        move |event| on_event.on_event(&event),
    );
    tokio::pin!(steering);
    tokio::pin!(server);
    // SIGTERM (systemctl stop) ends it; Ctrl-C when run by hand does the same.
    let result = loop {
        tokio::select! {
            () = &mut steering => {}
            served = &mut server => break served.context("serving the session socket"),
            () = daemon.changed() => {
                notify(&[sd_notify::NotifyState::Status(&daemon.describe())]);
            }
            _ = terminate.recv() => break Ok(()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(path) = &bound {
        let _ = std::fs::remove_file(path);
    }
    result.map(|()| ExitCode::SUCCESS)
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd there is no NOTIFY_SOCKET and this does nothing.
    let _ = sd_notify::notify(states);
}
