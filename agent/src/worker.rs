//! The worker: what every RPC does, independent of gRPC plumbing. Generic over
//! [`UnitControl`] so its logic runs against real systemd in the test-bed and against a
//! fake in unit tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use distcc_proto::v1 as pb;
use thiserror::Error;
use tokio::sync::{Mutex, watch};

use crate::capacity::Capacity;
use crate::compilers::CompilerCatalog;
use crate::config::AgentConfig;
use crate::confinement::{Confinement, check_filter, needs_restart};
use crate::distccd_log::{DISTCCD_LOG_SOCKET, read_tail};
use crate::listening::{PortOwner, holders, port_owner};
use crate::settings::{DistccdSettings, InvalidSetting};
use crate::settings_store::{Persisted, SettingsStore, StoreError};
use crate::stats::DistccdStats;
use crate::unit_control::{UnitControl, UnitError, UnitState};

const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Compilers a worker must offer for kernel builds; checked by Validate.
pub const REQUIRED_COMPILERS: [&str; 2] = ["gcc", "g++"];
/// Validate warns below this much free space in distccd's TMPDIR.
pub const MIN_FREE_TMP_BYTES: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Configure named a settings generation that is no longer the one in effect.
    #[error(
        "expected_generation: the settings are at generation {current}, not {expected}; another change came first. Read Status and retry"
    )]
    StaleGeneration { expected: u64, current: u64 },
    /// distccd does not start at boot. The package enabled it at install, so an operator
    /// turned it off; the agent cannot (and must not be able to) enable unit files.
    #[error(
        "{unit} is not enabled at boot (UnitFileState={unit_file_state}): run `{}` as root, then Bootstrap again",
        enable_command(unit, unit_file_state)
    )]
    NotEnabled {
        unit: String,
        unit_file_state: String,
    },
    /// distccd did not come up with the new settings; the previous ones are back.
    #[error(
        "{reason}; restored the previous settings ({restored}). distccd's last log lines:\n{journal}"
    )]
    RolledBack {
        reason: String,
        restored: String,
        journal: String,
    },
}

/// Summary of a successful Configure.
#[derive(Debug, Clone)]
pub struct ConfigureOutcome {
    pub previous: DistccdSettings,
    pub applied: DistccdSettings,
    /// The settings generation now persisted.
    pub generation: u64,
    pub changed: bool,
    pub unit: UnitState,
}

pub struct Worker<U: UnitControl> {
    unit: U,
    config: RwLock<Arc<AgentConfig>>,
    store: SettingsStore,
    catalog: CompilerCatalog,
    /// Serialises operations that change distccd, so two Configures cannot interleave
    /// their write-restart-rollback sequences.
    ops: Mutex<()>,
    state: watch::Sender<UnitState>,
    hostname: String,
    jobs_running: JobsRunning,
}

/// Compiles in flight, counted from `/proc/net/tcp{,6}`. Producing those files walks the
/// kernel's whole TCP hash (3-17 ms measured, see docs/BENCHMARKS.md), so the count is
/// reused for up to a second: a burst of Status calls pays for one walk, and an idle agent
/// pays nothing.
#[derive(Default)]
struct JobsRunning {
    last: std::sync::Mutex<Option<(Instant, u16, u32)>>,
}

impl JobsRunning {
    const MAX_AGE: Duration = Duration::from_secs(1);

    fn get(&self, port: u16) -> u32 {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some((at, p, count)) if p == port && at.elapsed() < Self::MAX_AGE => count,
            _ => {
                let count =
                    u32::try_from(crate::listening::established_to(port)).unwrap_or(u32::MAX);
                *last = Some((Instant::now(), port, count));
                count
            }
        }
    }
}

impl<U: UnitControl> Worker<U> {
    pub fn new(unit: U, config: AgentConfig) -> Self {
        let store = SettingsStore::new(config.state_dir.clone()).with_policy(config.policy.clone());
        Self {
            unit,
            config: RwLock::new(Arc::new(config)),
            store,
            catalog: CompilerCatalog::default(),
            ops: Mutex::new(()),
            state: watch::Sender::new(UnitState::default()),
            jobs_running: JobsRunning::default(),
            hostname: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    pub fn config(&self) -> Arc<AgentConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn unit(&self) -> &U {
        &self.unit
    }

    /// Latest unit state seen, updated by [`Self::refresh_state`].
    pub fn subscribe_state(&self) -> watch::Receiver<UnitState> {
        self.state.subscribe()
    }

    /// Re-read the unit state from systemd and publish it when it changed.
    pub async fn refresh_state(&self) -> Result<UnitState, UnitError> {
        let state = self.unit.state().await?;
        self.state.send_if_modified(|old| {
            let changed = *old != state;
            *old = state.clone();
            changed
        });
        Ok(state)
    }

    /// The settings in effect: persisted ones, else the config's defaults.
    pub fn current_settings(&self) -> Result<DistccdSettings, StoreError> {
        self.settings_and_persisted().map(|(settings, _)| settings)
    }

    /// The settings in effect and their generation (0: none persisted yet).
    pub fn current_settings_generation(&self) -> Result<(DistccdSettings, u64), StoreError> {
        self.settings_and_persisted()
            .map(|(settings, persisted)| (settings, persisted.unwrap_or(0)))
    }

    /// Whether an allowlist is configured at all (the shipped default config has none).
    pub fn has_allowlist(&self) -> bool {
        self.current_settings().is_ok_and(|s| !s.allow.is_empty())
    }

    /// First start of the agent on this host: persist the configured settings and
    /// bootstrap distccd. Later starts leave distccd alone, so restarting or upgrading
    /// the agent never interrupts compiles.
    pub async fn first_start(&self) -> Result<bool, WorkerError> {
        if let Some(persisted) = self.store.load()? {
            // A crash between writing the settings and rendering distccd's file from them
            // must not leave distccd to start with other settings next time.
            if self.store.ensure_env_rendered(&persisted.settings)? {
                tracing::warn!(
                    "distccd's environment file did not match the persisted settings; re-rendered it"
                );
            }
            return Ok(false);
        }
        let defaults = self.config().distccd.clone();
        if defaults.allow.is_empty() {
            return Ok(false);
        }
        let _guard = self.ops.lock().await;
        // Checked before anything is written: a refused first start stays a first start.
        self.require_enabled().await?;
        self.store.save(&defaults, None)?;
        self.unit.confine(&self.confinement_for(&defaults)).await?;
        self.unit.start().await?;
        self.wait_serving(&defaults)
            .await
            .map_err(WorkerError::Precondition)?;
        Ok(true)
    }

    /// Swap in a re-read config file. When its `[distccd]` defaults changed, they are
    /// applied like a Configure, since that is what the operator edited them for.
    pub async fn reload(&self, new: AgentConfig) -> Result<Option<ConfigureOutcome>, WorkerError> {
        let old = self.config();
        let defaults_changed = old.distccd != new.distccd;
        let distccd = new.distccd.clone();
        // distccd's --allow (rendered into its env file) is the policy's bound.
        self.store.set_policy(new.policy.clone());
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
        if !defaults_changed || distccd.allow.is_empty() {
            return Ok(None);
        }
        // The operator just set the first allowlist (the package ships none): this is
        // the bootstrap the first start could not do.
        if self.first_start().await? {
            let unit = self.unit.state().await?;
            return Ok(Some(ConfigureOutcome {
                previous: old.distccd.clone(),
                applied: distccd,
                generation: 1,
                changed: true,
                unit,
            }));
        }
        let _guard = self.ops.lock().await;
        let (previous, persisted) = self.settings_and_persisted()?;
        self.apply(previous, persisted, distccd).await.map(Some)
    }

    /// Apply a Configure request's fields over the settings in effect, validate the result
    /// against the policy, persist it, restart distccd and wait until it serves; on failure
    /// restore the previous settings. `expected_generation`, when set, must be the
    /// generation in effect: two admins cannot silently overwrite each other's change.
    pub async fn configure(
        &self,
        request: &pb::ConfigureRequest,
    ) -> Result<ConfigureOutcome, WorkerError> {
        let _guard = self.ops.lock().await;
        let (previous, persisted) = self.settings_and_persisted()?;
        if let Some(expected) = request.expected_generation {
            let current = persisted.unwrap_or(0);
            if expected != current {
                return Err(WorkerError::StaleGeneration { expected, current });
            }
        }
        let next = previous.patched(request)?;
        self.apply(previous, persisted, next).await
    }

    /// The kernel filter and bounds distccd.service gets with `settings`.
    fn confinement_for(&self, settings: &DistccdSettings) -> Confinement {
        Confinement::new(settings, self.config().confinement)
    }

    /// On every agent start: set the unit's filter and bounds from the settings in
    /// effect. systemd keeps them across reboots already; this repairs a drop-in deleted
    /// or edited by hand and applies changed `[confinement]`. No restart.
    pub async fn enforce_confinement(&self) -> Result<(), WorkerError> {
        let _guard = self.ops.lock().await;
        let settings = self.current_settings()?;
        if settings.allow.is_empty() {
            return Ok(());
        }
        self.unit.confine(&self.confinement_for(&settings)).await?;
        Ok(())
    }

    /// The settings in effect, and the generation of the persisted file they come from
    /// (`None`: the config's defaults, nothing persisted yet): one read of the file.
    fn settings_and_persisted(&self) -> Result<(DistccdSettings, Option<u64>), StoreError> {
        Ok(match self.store.load()? {
            Some(Persisted {
                generation,
                settings,
            }) => (settings, Some(generation)),
            None => (self.config().distccd.clone(), None),
        })
    }

    /// Apply `next` over `previous` (of generation `persisted`); callers hold `ops`.
    async fn apply(
        &self,
        previous: DistccdSettings,
        persisted: Option<u64>,
        next: DistccdSettings,
    ) -> Result<ConfigureOutcome, WorkerError> {
        next.validate(&self.config().policy)?;
        let unit_before = self.unit.state().await?;
        if let Some(generation) = persisted
            && next == previous
            && unit_before.is_active()
        {
            return Ok(ConfigureOutcome {
                previous: previous.clone(),
                applied: next,
                generation,
                changed: false,
                unit: unit_before,
            });
        }
        let running = if unit_before.is_active() {
            self.unit.running_args().await.unwrap_or(None)
        } else {
            None
        };
        let restart = needs_restart(running.as_deref(), &next.to_args(&self.config().policy));
        let saved = self.store.save(&next, persisted)?;
        let outcome = async {
            // The filter first: a restarted distccd comes up behind the new list.
            self.unit
                .confine(&self.confinement_for(&next))
                .await
                .map_err(|e| e.to_string())?;
            if restart {
                self.unit.restart().await.map_err(|e| e.to_string())?;
            }
            self.wait_serving(&next).await
        }
        .await;
        match outcome {
            Ok(unit) => {
                if restart {
                    tracing::info!(settings = ?next, generation = saved.generation, "distccd restarted with new settings");
                } else {
                    tracing::info!(settings = ?next, generation = saved.generation, "allowlist applied to the kernel filter; distccd kept running");
                }
                Ok(ConfigureOutcome {
                    previous,
                    applied: next,
                    generation: saved.generation,
                    changed: true,
                    unit,
                })
            }
            Err(reason) => {
                let previous = Persisted {
                    generation: persisted.unwrap_or(0),
                    settings: previous,
                };
                Err(self.roll_back(&previous, reason, restart).await)
            }
        }
    }

    /// Put back exactly what was persisted before (same generation: the failed change
    /// never happened as far as other admins are concerned). Settings that were never
    /// persisted (generation 0) are restored as the first generation. The kernel filter
    /// goes back too; distccd is restarted only when the failed change had restarted it.
    async fn roll_back(
        &self,
        previous: &Persisted,
        reason: String,
        restarted: bool,
    ) -> WorkerError {
        let journal = self.distccd_log_tail().await;
        tracing::warn!(%reason, "distccd did not come up with the new settings; rolling back");
        let restored = async {
            self.store.restore(previous).map_err(|e| e.to_string())?;
            self.unit
                .confine(&self.confinement_for(&previous.settings))
                .await
                .map_err(|e| e.to_string())?;
            if restarted {
                // A failed unit refuses nothing, but its restart counter and result would
                // confuse the next reader; start from a clean slate.
                let _ = self.unit.reset_failed().await;
                self.unit.restart().await.map_err(|e| e.to_string())?;
            }
            self.wait_serving(&previous.settings).await
        }
        .await;
        let restored = match restored {
            Ok(state) => format!("distccd {}", state.describe()),
            Err(e) => format!("but distccd did not come back either: {e}"),
        };
        WorkerError::RolledBack {
            reason,
            restored,
            journal,
        }
    }

    /// Wait until distccd is active and serving on its port (the listener is distccd's,
    /// not whatever else holds the port), or has failed. A failure names the port's
    /// holder when another program has it.
    async fn wait_serving(&self, settings: &DistccdSettings) -> Result<UnitState, String> {
        let deadline = Instant::now() + self.config().job_timeout;
        loop {
            let state = self.refresh_state().await.map_err(|e| e.to_string())?;
            let owner = if state.is_active() {
                port_owner(settings.port.get(), state.main_pid)
            } else {
                PortOwner::Nobody
            };
            if owner == PortOwner::Distccd {
                return Ok(state);
            }
            let failed = state.has_failed();
            if failed || Instant::now() >= deadline {
                let held = match owner {
                    PortOwner::Others(listeners) => listeners,
                    // distccd failed and its listener (if any) is gone: look again.
                    _ => crate::listening::listeners_on(settings.port.get()),
                };
                let held = match holders(&held).as_slice() {
                    [] => String::new(),
                    holders => {
                        let names: Vec<String> = holders.iter().map(ToString::to_string).collect();
                        format!(
                            "; port {} is held by {}, not distccd",
                            settings.port,
                            names.join(", ")
                        )
                    }
                };
                return Err(if failed {
                    format!(
                        "distccd failed to start ({}, result {}){held}",
                        state.describe(),
                        state.result
                    )
                } else {
                    format!(
                        "distccd is not serving on port {} after {:?} ({}){held}",
                        settings.port,
                        self.config().job_timeout,
                        state.describe()
                    )
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What distccd runs, against the persisted settings.
    fn runtime(&self, unit: &UnitState, settings: &DistccdSettings) -> pb::RuntimeSettings {
        if !unit.is_active() || unit.main_pid == 0 {
            return pb::RuntimeSettings {
                error: format!("distccd is {}", unit.describe()),
                ..Default::default()
            };
        }
        match crate::runtime::read_cmdline(unit.main_pid) {
            Ok(argv) => pb::RuntimeSettings {
                pid: unit.main_pid,
                drift: crate::runtime::drift(&argv, &settings.to_args(&self.config().policy)),
                argv,
                error: String::new(),
            },
            Err(e) => pb::RuntimeSettings {
                pid: unit.main_pid,
                error: format!("/proc/{}/cmdline: {e}", unit.main_pid),
                ..Default::default()
            },
        }
    }

    /// distccd's last log lines, for error reports (see [`crate::distccd_log`]).
    pub async fn distccd_log_tail(&self) -> String {
        read_tail(std::path::Path::new(DISTCCD_LOG_SOCKET))
            .await
            .unwrap_or_else(|e| format!("(distccd's log lines are not available: {e})"))
    }

    /// Fails with [`WorkerError::NotEnabled`] unless distccd starts at boot.
    async fn require_enabled(&self) -> Result<(), WorkerError> {
        let state = self.refresh_state().await?;
        if state.is_enabled() {
            Ok(())
        } else {
            Err(WorkerError::NotEnabled {
                unit: self.unit.unit_name().to_owned(),
                unit_file_state: state.unit_file_state,
            })
        }
    }

    /// Start, stop, restart or reset distccd. Returns the steps taken.
    pub async fn control(
        &self,
        action: pb::ControlAction,
    ) -> Result<(UnitState, Vec<String>), WorkerError> {
        let _guard = self.ops.lock().await;
        let mut steps = Vec::new();
        let needs_allowlist = !matches!(action, pb::ControlAction::Stop);
        if needs_allowlist && !self.has_allowlist() {
            return Err(WorkerError::Precondition(
                "no allowlist configured: set [distccd] allow in the agent config or call Configure".to_owned(),
            ));
        }
        match action {
            pb::ControlAction::Unspecified => {
                return Err(WorkerError::Invalid(InvalidSetting::new(
                    "action",
                    "must be set",
                )));
            }
            pb::ControlAction::Start => {
                self.ensure_persisted()?;
                self.unit.start().await?;
                steps.push("started".to_owned());
            }
            pb::ControlAction::Stop => {
                self.unit.stop().await?;
                steps.push("stopped".to_owned());
            }
            pb::ControlAction::Restart => {
                self.ensure_persisted()?;
                self.unit.restart().await?;
                steps.push("restarted".to_owned());
            }
            pb::ControlAction::Reset => {
                self.ensure_persisted()?;
                self.unit.stop().await?;
                // distccd.service has PrivateTmp=: systemd deleted its TMPDIR on stop.
                steps.push("stopped (systemd removed distccd's private TMPDIR)".to_owned());
                self.unit.reset_failed().await?;
                steps.push("reset failed state".to_owned());
                self.unit.start().await?;
                steps.push("started".to_owned());
            }
        }
        let state = if matches!(action, pb::ControlAction::Stop) {
            self.refresh_state().await?
        } else {
            self.wait_serving(&self.current_settings()?)
                .await
                .map_err(WorkerError::Precondition)?
        };
        Ok((state, steps))
    }

    /// Start distccd, after checking that it starts at boot (the package enabled it).
    pub async fn bootstrap(&self) -> Result<(UnitState, Vec<String>), WorkerError> {
        let _guard = self.ops.lock().await;
        let settings = self.current_settings()?;
        if settings.allow.is_empty() {
            return Err(WorkerError::Precondition(
                "no allowlist configured: set [distccd] allow in the agent config first".to_owned(),
            ));
        }
        let mut steps = Vec::new();
        self.require_enabled().await?;
        steps.push(format!("{} is enabled at boot", self.unit.unit_name()));
        if self.store.load()?.is_none() {
            self.store.save(&settings, None)?;
            steps.push(format!("wrote {}", self.store.settings_path().display()));
        }
        self.unit.confine(&self.confinement_for(&settings)).await?;
        steps.push("kernel filter set".to_owned());
        self.unit.start().await?;
        steps.push("started".to_owned());
        let state = self
            .wait_serving(&settings)
            .await
            .map_err(WorkerError::Precondition)?;
        Ok((state, steps))
    }

    /// distccd.service refuses to start without its environment file; write the
    /// settings in effect if nothing was persisted yet.
    fn ensure_persisted(&self) -> Result<(), StoreError> {
        if self.store.load()?.is_none() {
            self.store.save(&self.config().distccd, None)?;
        }
        Ok(())
    }

    /// Fetch distccd's statistics page, when stats are on.
    pub async fn stats(&self, settings: &DistccdSettings) -> pb::DistccdStats {
        if !settings.stats {
            return pb::DistccdStats {
                error: "stats are off (Configure stats=true)".to_owned(),
                ..Default::default()
            };
        }
        let addr = SocketAddr::new(settings.agent_connect_addr(), settings.stats_port.get());
        match DistccdStats::fetch(addr, STATS_TIMEOUT).await {
            Ok(stats) => pb::DistccdStats {
                jobs_running: self.jobs_running.get(settings.port.get()),
                ..stats_to_proto(&stats)
            },
            Err(e) => pb::DistccdStats {
                error: e.to_string(),
                ..Default::default()
            },
        }
    }

    /// A full status snapshot. Compilers are run only when `refresh_compilers` or when
    /// not seen before; otherwise cached results are used.
    pub async fn status(&self, refresh_compilers: bool) -> Result<pb::WorkerStatus, WorkerError> {
        let config = self.config();
        let unit = self.refresh_state().await?;
        let (settings, settings_generation) = self.current_settings_generation()?;
        let stats = if unit.is_active() {
            self.stats(&settings).await
        } else {
            pb::DistccdStats {
                error: format!("distccd is {}", unit.describe()),
                ..Default::default()
            }
        };
        let compilers = self
            .catalog
            .describe(&config.masquerade_dir, refresh_compilers)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|c| pb::Compiler {
                name: c.name,
                path: c.path.display().to_string(),
                version: c.version,
                target: c.target,
                fingerprint: c.fingerprint,
                error: c.error,
            })
            .collect();
        let capacity = Capacity::read(&config.distccd_tmpdir);
        let runtime = self.runtime(&unit, &settings);
        Ok(pb::WorkerStatus {
            runtime: Some(runtime),
            hostname: self.hostname.clone(),
            agent_version: crate::VERSION.to_owned(),
            unit: Some(unit_to_proto(&unit)),
            effective_allow: settings.effective_allow().to_strings(),
            settings: Some((&settings).into()),
            settings_generation,
            capacity: Some(pb::Capacity {
                online_cpus: capacity.online_cpus,
                load1: capacity.load[0],
                load5: capacity.load[1],
                load15: capacity.load[2],
                mem_total_bytes: capacity.mem_total_bytes,
                mem_available_bytes: capacity.mem_available_bytes,
                tmpdir: config.distccd_tmpdir.display().to_string(),
                tmpdir_free_bytes: capacity.tmpdir_free_bytes,
            }),
            stats: Some(stats),
            compilers,
            distcc_version: self
                .catalog
                .version_of("distccd")
                .await
                .unwrap_or_else(|e| format!("unknown ({e})")),
            taken_at_usec: now_usec(),
        })
    }

    /// The one-line summary for `systemctl status distcc-agent` (sd-notify STATUS=).
    pub async fn status_line(&self) -> String {
        let line = self.distccd_status_line().await;
        match self.config().transport_warning() {
            Some(warning) => format!("{warning}; {line}"),
            None => line,
        }
    }

    async fn distccd_status_line(&self) -> String {
        if !self.has_allowlist() {
            return format!(
                "waiting for an allowlist: set [distccd] allow in {} and run systemctl reload distcc-agent",
                crate::config::DEFAULT_CONFIG_PATH
            );
        }
        let state = self.state.borrow().clone();
        if !state.is_active() {
            return format!("distccd {}", state.describe());
        }
        let settings = self.current_settings().unwrap_or_default();
        let stats = self.stats(&settings).await;
        let line = if stats.available {
            format!(
                "distccd active, {} jobs running, {} slots",
                stats.jobs_running, stats.max_kids
            )
        } else {
            format!("distccd active ({})", stats.error)
        };
        match self.runtime(&state, &settings).drift.as_slice() {
            [] => line,
            drift => format!(
                "{line}; distccd does not run the persisted settings ({})",
                drift.join("; ")
            ),
        }
    }

    /// The named checks of the old validate playbook, plus the agent's own.
    pub async fn validate(&self) -> pb::ValidateResponse {
        let config = self.config();
        let mut checks = Vec::new();
        let mut check = |name: &str, result: Result<String, (String, String)>| {
            checks.push(match result {
                Ok(reason) => pb::Check {
                    name: name.to_owned(),
                    passed: true,
                    reason,
                    hint: String::new(),
                },
                Err((reason, hint)) => pb::Check {
                    name: name.to_owned(),
                    passed: false,
                    reason,
                    hint,
                },
            });
        };

        check(
            "distccd-installed",
            self.catalog.version_of("distccd").await.map_err(|e| {
                (
                    format!("distccd --version: {e}"),
                    "apt-get install distcc".to_owned(),
                )
            }),
        );

        let unit = self.refresh_state().await;
        let unit_name = self.unit.unit_name().to_owned();
        check(
            "unit-loaded",
            match &unit {
                Ok(s) if s.load_state == "loaded" => {
                    Ok(format!("{unit_name} loaded ({})", s.unit_file_state))
                }
                Ok(s) => Err((
                    format!("{unit_name} is {}", s.load_state),
                    format!(
                        "install {unit_name} (package distcc-agent) and run systemctl daemon-reload"
                    ),
                )),
                Err(e) => Err((e.to_string(), "is systemd reachable over D-Bus?".to_owned())),
            },
        );
        check(
            "unit-active",
            match &unit {
                Ok(s) if s.is_active() => {
                    Ok(format!("{unit_name} {} (pid {})", s.describe(), s.main_pid))
                }
                Ok(s) => Err((
                    format!("{unit_name} is {}", s.describe()),
                    format!("builderctl bootstrap, or see journalctl -u {unit_name}"),
                )),
                Err(e) => Err((e.to_string(), String::new())),
            },
        );

        let settings = self.current_settings();
        let port = settings.as_ref().map_or(3632, |s| s.port.get());
        check(
            "port-listening",
            match port_owner(port, unit.as_ref().map_or(0, |s| s.main_pid)) {
                PortOwner::Distccd => Ok(format!("distccd listens on TCP port {port}")),
                PortOwner::Nobody => Err((
                    format!("nothing listens on TCP port {port}"),
                    "start distccd (Control START)".to_owned(),
                )),
                PortOwner::Others(listeners) => {
                    let names: Vec<String> = holders(&listeners)
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    Err((
                        format!(
                            "TCP port {port} is held by {}, not distccd",
                            names.join(", ")
                        ),
                        "stop that program, or Configure distccd to another port".to_owned(),
                    ))
                }
            },
        );
        check(
            "allowlist-sane",
            match &settings {
                Ok(s) => s
                    .validate(&config.policy)
                    .map(|()| format!("allow {}", s.allow))
                    .map_err(|e| {
                        (
                            e.to_string(),
                            "set [distccd] allow to the builders' networks".to_owned(),
                        )
                    }),
                Err(e) => Err((
                    e.to_string(),
                    "fix or remove the file; the agent rewrites it".to_owned(),
                )),
            },
        );

        let confinement = self.unit.confinement().await;
        let active = unit.as_ref().is_ok_and(UnitState::is_active);
        check(
            "kernel-filter",
            match (&settings, &confinement) {
                (Ok(s), Ok(state)) => check_filter(&self.confinement_for(s), state, active)
                    .map_err(|reason| {
                        (
                            reason,
                            "the agent sets IPAddressAllow= on every start and Configure; \
                             BPF firewalling needs cgroup v2 and bpf(2) for systemd"
                                .to_owned(),
                        )
                    }),
                (Err(e), _) => Err((e.to_string(), String::new())),
                (_, Err(e)) => Err((e.to_string(), "is systemd reachable over D-Bus?".to_owned())),
            },
        );

        let links = crate::compilers::masquerade_links(&config.masquerade_dir).unwrap_or_default();
        let missing: Vec<&str> = REQUIRED_COMPILERS
            .iter()
            .copied()
            .filter(|c| !links.iter().any(|l| l == c))
            .collect();
        check(
            "masquerade-links",
            if missing.is_empty() {
                Ok(format!(
                    "{} links in {}",
                    links.len(),
                    config.masquerade_dir.display()
                ))
            } else {
                Err((
                    format!(
                        "no link for {} in {}",
                        missing.join(", "),
                        config.masquerade_dir.display()
                    ),
                    "run update-distcc-symlinks (as root)".to_owned(),
                ))
            },
        );

        let compilers = self
            .catalog
            .describe(&config.masquerade_dir, true)
            .await
            .unwrap_or_default();
        let broken: Vec<String> = compilers
            .iter()
            .filter(|c| !c.error.is_empty())
            .map(|c| format!("{}: {}", c.name, c.error))
            .collect();
        check(
            "compilers-run",
            if compilers.is_empty() {
                Err((
                    "no compilers found".to_owned(),
                    "apt-get install gcc g++".to_owned(),
                ))
            } else if broken.is_empty() {
                let versions: std::collections::BTreeSet<&str> =
                    compilers.iter().map(|c| c.version.as_str()).collect();
                Ok(format!(
                    "{} compilers run: {}",
                    compilers.len(),
                    versions.into_iter().collect::<Vec<_>>().join(", ")
                ))
            } else {
                Err((
                    broken.join("; "),
                    "reinstall the compiler or run update-distcc-symlinks".to_owned(),
                ))
            },
        );

        let free = crate::capacity::free_bytes(&config.distccd_tmpdir).unwrap_or(0);
        check(
            "tmpdir-space",
            if free >= MIN_FREE_TMP_BYTES {
                Ok(format!(
                    "{} MiB free in {}",
                    free >> 20,
                    config.distccd_tmpdir.display()
                ))
            } else {
                Err((
                    format!(
                        "only {} MiB free in {}",
                        free >> 20,
                        config.distccd_tmpdir.display()
                    ),
                    "free disk space; distccd keeps preprocessed sources and objects there"
                        .to_owned(),
                ))
            },
        );

        let foreign = foreign_distccd_pids(&unit_name);
        check(
            "no-foreign-distccd",
            if foreign.is_empty() {
                Ok(format!("only {unit_name} runs distccd"))
            } else {
                Err((
                    format!("distccd processes outside {unit_name}: {foreign:?}"),
                    "systemctl disable --now distcc (Debian's SysV service) and set STARTDISTCC=false in /etc/default/distcc".to_owned(),
                ))
            },
        );

        // Last, so the playbook's checks keep their order.
        check(
            "transport-private",
            match (&config.transport, config.transport_warning()) {
                (_, Some(warning)) => Err((
                    warning,
                    "remove insecure_plaintext from agent.toml: the agent serves TLS with its own \
                     certificate by default (builders: builderctl trust)"
                        .to_owned(),
                )),
                (crate::config::Transport::Plaintext { .. }, None) => Ok(format!(
                    "plaintext on the loopback address {} only",
                    config.listen
                )),
                (crate::config::Transport::Tls { client_ca, .. }, None) => Ok(format!(
                    "TLS{}",
                    if client_ca.is_some() {
                        ", client certificates required"
                    } else {
                        ""
                    }
                )),
            },
        );
        let all_passed = checks.iter().all(|c| c.passed);
        pb::ValidateResponse { checks, all_passed }
    }
}

/// distccd processes not in `unit`'s cgroup: Debian's SysV `distcc` service or a manual one
/// would fight ours for the port.
fn foreign_distccd_pids(unit: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let proc_dir = Path::new("/proc").join(pid.to_string());
            std::fs::read_to_string(proc_dir.join("comm")).is_ok_and(|c| c.trim() == "distccd")
                && std::fs::read_to_string(proc_dir.join("cgroup"))
                    .is_ok_and(|cg| !cg.lines().any(|l| l.ends_with(&format!("/{unit}"))))
        })
        .collect()
}

/// The command that makes `unit` start at boot again, given its `UnitFileState`.
fn enable_command(unit: &str, unit_file_state: &str) -> String {
    let name = unit.strip_suffix(".service").unwrap_or(unit);
    if unit_file_state.starts_with("masked") {
        format!("systemctl unmask {name} && systemctl enable {name}")
    } else {
        format!("systemctl enable {name}")
    }
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn unit_to_proto(s: &UnitState) -> pb::UnitState {
    pb::UnitState {
        load_state: s.load_state.clone(),
        active_state: s.active_state.clone(),
        sub_state: s.sub_state.clone(),
        main_pid: s.main_pid,
        state_since_usec: s.state_since_usec,
        unit_file_state: s.unit_file_state.clone(),
        n_restarts: s.n_restarts,
        result: s.result.clone(),
    }
}

fn stats_to_proto(s: &DistccdStats) -> pb::DistccdStats {
    pb::DistccdStats {
        available: true,
        error: String::new(),
        values: s.values.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        compile_ok: s.counter("dcc_compile_ok"),
        compile_error: s.counter("dcc_compile_error"),
        compile_timeout: s.counter("dcc_compile_timeout"),
        tcp_accept: s.counter("dcc_tcp_accept"),
        rej_overload: s.counter("dcc_rej_overload"),
        current_load: s.counter("dcc_current_load"),
        max_kids: s.counter("dcc_max_kids"),
        longest_job: s.text.get("dcc_longest_job").cloned().unwrap_or_default(),
        free_space_mb: s.counter("dcc_free_space"),
        jobs_running: 0,
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
