//! The subcommands of `builderctl`, one module each (or one per family). They glue the
//! library together and report with `anyhow`; decisions live in the library.

pub mod daemon;
pub mod docs;
pub mod enter;
pub mod env;
pub mod fleet;
pub mod hosts;
pub mod monitor;
pub mod status;
pub mod trust;
pub mod workspace;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use distcc_builder::cluster::{Probe, WorkerView, host_list, probe_all, views};
use distcc_builder::config::{AgentAccess, BuilderConfig};
use distcc_builder::host_list::{HostList, LocalCompiler, Policy};
use distcc_builder::local;
use distcc_builder::steer::{CutPolicy, SteeringConfig, Survey};

/// What every command that talks to the cluster starts from: the builder's configuration
/// and the operator's host-list policy (configuration plus command-line flags).
pub struct BuilderSetup {
    pub config: BuilderConfig,
    pub policy: Policy,
    /// The agents' access, read from the token file at first use (see [`Self::access`]).
    access: std::sync::OnceLock<AgentAccess>,
}

impl BuilderSetup {
    pub fn load(path: &Path, allow_mismatch: bool) -> anyhow::Result<Self> {
        let config = BuilderConfig::load(path)?;
        let policy = Policy {
            allow_mismatch: allow_mismatch || config.allow_mismatch,
            local_slots: config.local_slots,
            lzo: config.lzo,
        };
        Ok(Self {
            config,
            policy,
            access: std::sync::OnceLock::new(),
        })
    }

    /// The agents' access (the read token), for commands that talk to them themselves.
    pub fn access(&self) -> anyhow::Result<&AgentAccess> {
        if let Some(access) = self.access.get() {
            return Ok(access);
        }
        let access = self.config.access().context(
            "reading the agents' token (users without it go through the builder daemon: \
             systemctl enable --now distcc-builder.socket)",
        )?;
        Ok(self.access.get_or_init(|| access))
    }

    /// How this builder follows the workers: its access, deadline and host-list policy,
    /// a status every second (the pace failover needs), and the caller's cuts.
    pub fn steering(
        &self,
        local: Vec<LocalCompiler>,
        hosts_file: std::path::PathBuf,
        cuts: CutPolicy,
        survey: Option<tokio::sync::watch::Sender<std::sync::Arc<Survey>>>,
    ) -> anyhow::Result<SteeringConfig> {
        Ok(SteeringConfig {
            access: self.access()?.clone(),
            deadline: self.config.deadline,
            interval: std::time::Duration::from_secs(1),
            local,
            policy: self.policy.clone(),
            hosts_file,
            cuts,
            survey,
        })
    }

    /// The configured compilers as found on this builder.
    pub fn local_compilers(&self) -> anyhow::Result<Vec<LocalCompiler>> {
        self.config
            .compilers
            .iter()
            .map(|name| {
                local::describe(name).with_context(|| format!("describing the local {name}"))
            })
            .collect()
    }

    /// Every worker's status, in parallel, and the host list it makes.
    pub async fn survey(&self, local: &[LocalCompiler]) -> anyhow::Result<(Vec<Probe>, HostList)> {
        let probes = probe_all(&self.config.workers, self.access()?, self.config.deadline).await;
        let list = host_list(&probes, local, &self.policy);
        Ok((probes, list))
    }
}

/// The workers and the host list for `status`, `hosts` and `monitor`: root asks the
/// agents itself; a user asks the builder daemon (which holds the token), and only
/// without one reachable reads the token itself.
pub async fn survey_views(
    setup: &BuilderSetup,
    local: &[LocalCompiler],
) -> anyhow::Result<(Vec<WorkerView>, HostList)> {
    use distcc_builder::session_socket::{Client, ClientError};
    if !nix::unistd::geteuid().is_root() {
        let snapshot = match Client::connect(&setup.config.daemon_socket).await {
            Ok(mut client) => client.snapshot().await,
            Err(e) => Err(e),
        };
        match snapshot {
            Ok(snapshot) => return Ok((snapshot.workers, snapshot.host_list)),
            // No daemon, or not allowed to use it: this user's own token, if any.
            Err(ClientError::Unreachable { .. } | ClientError::PermissionDenied { .. }) => {}
            Err(e) => return Err(e).context("asking the builder daemon"),
        }
    }
    let (probes, list) = setup.survey(local).await?;
    Ok((views(&probes, &list), list))
}

pub fn exit_for(all_fine: bool) -> ExitCode {
    if all_fine {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `{"workers": [...]}`, the stable JSON shape of every per-worker report.
pub fn print_workers_json(workers: &impl serde::Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "workers": workers }))?
    );
    Ok(())
}
