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

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use distcc_builder::cluster::{Probe, host_list, probe_all};
use distcc_builder::config::BuilderConfig;
use distcc_builder::host_list::{HostList, LocalCompiler, Policy};
use distcc_builder::local;

/// What every command that talks to the cluster starts from: the builder's configuration
/// and the operator's host-list policy (configuration plus command-line flags).
pub struct BuilderSetup {
    pub config: BuilderConfig,
    pub policy: Policy,
}

impl BuilderSetup {
    pub fn load(path: &Path, allow_mismatch: bool) -> anyhow::Result<Self> {
        let config = BuilderConfig::load(path)?;
        let policy = Policy {
            allow_mismatch: allow_mismatch || config.allow_mismatch,
            local_slots: config.local_slots,
            lzo: config.lzo,
        };
        Ok(Self { config, policy })
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
    pub async fn survey(&self, local: &[LocalCompiler]) -> (Vec<Probe>, HostList) {
        let probes = probe_all(
            &self.config.workers,
            &self.config.access,
            self.config.deadline,
        )
        .await;
        let list = host_list(&probes, local, &self.policy);
        (probes, list)
    }
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
