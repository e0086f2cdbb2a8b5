//! `builderctl daemon`: a system-wide hosts file kept fresh (distcc-builder.service).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use distcc_builder::host_list::{HostList, write_atomically};
use distcc_builder::steer::{self, CutPolicy, SteeringConfig, SteeringEvent};

use super::BuilderSetup;

pub async fn run(setup: &BuilderSetup, hosts_file: PathBuf) -> anyhow::Result<ExitCode> {
    let local = setup.local_compilers()?;
    let (probes, list) = setup.survey(&local).await;
    write_atomically(&hosts_file, &list.render())
        .with_context(|| format!("writing {}", hosts_file.display()))?;
    let describe = |list: &HostList| {
        format!(
            "{} of {} workers, {} slots in {}",
            list.included().count(),
            list.workers.len(),
            list.total_slots(),
            hosts_file.display()
        )
    };
    tracing::info!("{}", describe(&list));
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&describe(&list)),
    ]);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    let steering = steer::steer(
        SteeringConfig {
            access: setup.config.access.clone(),
            deadline: setup.config.deadline,
            interval: Duration::from_secs(2),
            local,
            policy: setup.policy.clone(),
            hosts_file: hosts_file.clone(),
            // The daemon serves builds it does not own (other users, CI): it steers new
            // compiles but leaves their connections alone.
            cuts: CutPolicy::never(),
            survey: None,
        },
        probes,
        |event| {
            for line in event.describe() {
                tracing::info!(kind = event.kind(), "{line}");
            }
            if let SteeringEvent::HostsChanged { after, .. } = event {
                notify(&[sd_notify::NotifyState::Status(&describe(after))]);
            }
        },
    );
    tokio::select! {
        () = steering => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    Ok(ExitCode::SUCCESS)
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd there is no NOTIFY_SOCKET and this does nothing.
    let _ = sd_notify::notify(states);
}
