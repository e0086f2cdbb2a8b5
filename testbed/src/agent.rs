//! Workers running the project's agent, installed the way the package installs it: the
//! binary, the unit files, the polkit rule and the sysusers/tmpfiles snippets from the
//! repository's `systemd/` folder, a config and a token. Shared by the agent's and the
//! builder's tests and the demo.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::testbed::{Testbed, Worker, WorkerSpec};

/// The admin token the test-bed's agents accept (id `testbed-admin`).
pub const TEST_TOKEN: &str = "testbed-token-0123456789abcdef";
/// A read-only token the test-bed's agents accept (id `testbed-read`).
pub const TEST_READ_TOKEN: &str = "testbed-read-token-0123456789abcdef";

/// Write a secret (a token in clear) the way the configs demand: mode 0600.
pub fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The agents' tokens file: only hashes of [`TEST_TOKEN`] and [`TEST_READ_TOKEN`], as
/// `distcc-agent token new` writes it.
pub fn test_tokens_file() -> String {
    tokens_file(&[
        ("admin", "testbed-admin", TEST_TOKEN),
        ("read", "testbed-read", TEST_READ_TOKEN),
    ])
}

/// An agent tokens file (`ROLE ID sha256:HEX` lines) for `(role, id, token)`.
pub fn tokens_file(entries: &[(&str, &str, &str)]) -> String {
    use sha2::Digest;
    entries
        .iter()
        .map(|(role, id, token)| {
            let hash: String = sha2::Sha256::digest(token.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{role} {id} sha256:{hash}\n")
        })
        .collect()
}
/// The agent's gRPC port.
pub const AGENT_PORT: u16 = 3634;

/// Where the agent's files come from.
#[derive(Debug, Clone)]
pub struct AgentInstall {
    /// The `distcc-agent` binary.
    pub binary: PathBuf,
    /// The repository root (its `systemd/` folder is installed).
    pub repo: PathBuf,
}

impl AgentInstall {
    /// The binary from `$DISTCC_AGENT_BIN`, else `target/{release,debug}/distcc-agent` of
    /// the workspace `repo` (whichever is newer).
    pub fn from_workspace(repo: &Path) -> Result<Self> {
        Ok(Self {
            binary: workspace_binary(repo, "distcc-agent", "DISTCC_AGENT_BIN", "distcc-agent")?,
            repo: repo.to_owned(),
        })
    }

    /// The files to bind into a worker, as `(host, container)`.
    pub fn binds(&self) -> Vec<(PathBuf, PathBuf)> {
        let systemd = self.repo.join("systemd");
        [
            (self.binary.clone(), "/usr/bin/distcc-agent"),
            (
                systemd.join("distcc-agent.service"),
                "/etc/systemd/system/distcc-agent.service",
            ),
            (
                systemd.join("distccd.service"),
                "/etc/systemd/system/distccd.service",
            ),
            (
                systemd.join("distccd-log/distccd-log.socket"),
                "/etc/systemd/system/distccd-log.socket",
            ),
            (
                systemd.join("distccd-log/distccd-log@.service"),
                "/etc/systemd/system/distccd-log@.service",
            ),
            (
                systemd.join("distcc-agent.rules"),
                "/etc/polkit-1/rules.d/50-distcc-agent.rules",
            ),
            (
                systemd.join("distcc-agent.sysusers"),
                "/etc/sysusers.d/distcc-agent.conf",
            ),
            (
                systemd.join("distcc-agent.tmpfiles"),
                "/etc/tmpfiles.d/distcc-agent.conf",
            ),
        ]
        .into_iter()
        .map(|(host, container)| (host, PathBuf::from(container)))
        .collect()
    }
}

/// `$ENV_VAR` if set, else the newer of `target/{release,debug}/NAME` of the workspace
/// `repo`: the binary a test or the bench installs (`package` names what to build).
pub(crate) fn workspace_binary(
    repo: &Path,
    name: &str,
    env_var: &str,
    package: &str,
) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    ["release", "debug"]
        .iter()
        .map(|profile| repo.join("target").join(profile).join(name))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .with_context(|| format!("no target/*/{name}: run `cargo build -p {package}` first"))
}

/// The certificate the agent generates at its first start (its key is next to it).
pub const AGENT_CERT: &str = "/var/lib/distcc-agent/tls/cert.pem";

impl Worker {
    /// The agent's certificate as PEM: what a client that trusts this one worker uses
    /// as its root (the certificate is self-signed and names the worker's address).
    pub fn agent_certificate(&self) -> Result<String> {
        self.exec_ok(&["cat", AGENT_CERT])
    }

    /// `distcc-agent --fingerprint`, run on the worker: what an operator compares with
    /// what `builderctl trust` shows.
    pub fn agent_fingerprint(&self) -> Result<String> {
        Ok(self
            .exec_ok(&["distcc-agent", "--fingerprint"])?
            .trim()
            .to_owned())
    }
}

/// An agent config admitting the test-bed's subnet, with `jobs` slots. No `[tls]`: the
/// agent serves TLS with the certificate it generates, as a fresh install does.
pub fn agent_config(bed: &Testbed, jobs: u32) -> String {
    format!(
        "listen = \"0.0.0.0:{AGENT_PORT}\"\ntokens_file = \"/etc/distcc-agent/tokens\"\n\
         job_timeout_secs = 15\n\
         [policy]\nallow_within = [\"{subnet}\"]\n\
         [distccd]\nallow = [\"{subnet}\"]\njobs = {jobs}\nnice = 10\nlisten = \"0.0.0.0\"\nport = 3632\n",
        subnet = bed.subnet()
    )
}

impl Testbed {
    /// Boot a worker with the agent installed, enable distccd and start
    /// `distccd-log.socket` as the package's maintainer scripts do, write `config` and the
    /// test token, and `systemctl start distcc-agent` (which returns once the agent said
    /// READY=1). `customize` may add binds to the spec.
    pub fn boot_agent_worker(
        &self,
        name: &str,
        install: &AgentInstall,
        config: &str,
        customize: impl FnOnce(WorkerSpec) -> WorkerSpec,
    ) -> Result<Worker> {
        let mut spec = WorkerSpec::new(name);
        for (host, container) in install.binds() {
            spec = spec.bind_ro(host, container);
        }
        let worker = self.boot_worker(customize(spec))?;
        worker.write_file("/etc/distcc-agent/tokens", test_tokens_file(), 0o640)?;
        worker.exec_ok(&["chgrp", "distcc-agent", "/etc/distcc-agent/tokens"])?;
        worker.write_file("/etc/distcc-agent/agent.toml", config, 0o644)?;
        // The package enables distccd at install (deb-systemd-helper; the agent itself
        // may not enable unit files) and starts the socket that serves distccd's log
        // lines to the agent.
        worker.exec_ok(&["systemctl", "enable", "distccd.service"])?;
        worker.exec_ok(&["systemctl", "enable", "--now", "distccd-log.socket"])?;
        worker
            .exec_ok(&["systemctl", "start", "distcc-agent"])
            .with_context(|| {
                format!(
                    "starting distcc-agent on {name}:\n{}",
                    worker.journal("distcc-agent.service", 40)
                )
            })?;
        Ok(worker)
    }
}
