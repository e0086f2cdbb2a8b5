//! What the agent needs from systemd for the one unit it manages, as a small trait so the
//! logic above it can be tested without systemd. [`crate::systemd::SystemdUnit`] is the
//! real implementation (D-Bus through zbus).

use std::future::Future;
use std::pin::Pin;

use futures_util::Stream;
use thiserror::Error;

use crate::confinement::{Confinement, ConfinementState};

/// systemd's view of the unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub main_pid: u32,
    /// `StateChangeTimestamp`, microseconds since the Unix epoch.
    pub state_since_usec: u64,
    pub unit_file_state: String,
    pub n_restarts: u32,
    pub result: String,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }

    /// Failed, or waiting to be restarted after a failure.
    pub fn has_failed(&self) -> bool {
        self.active_state == "failed" || self.sub_state == "auto-restart"
    }

    /// Whether systemd starts the unit at boot. The package enables distccd at install
    /// (deb-systemd-helper); the agent only checks, since enabling unit files needs
    /// polkit's `manage-unit-files`, which covers every unit. `enabled-runtime` does not
    /// count: it is gone at the next boot.
    pub fn is_enabled(&self) -> bool {
        self.unit_file_state == "enabled"
    }

    /// "active (running)", as systemctl shows it.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.active_state, self.sub_state)
    }
}

/// Why a unit operation did not succeed.
#[derive(Debug, Error)]
pub enum UnitError {
    #[error("D-Bus: {0}")]
    Bus(String),
    /// systemd refused the call (polkit, unit not found...).
    #[error("systemd refused {operation}: {message}")]
    Refused { operation: String, message: String },
    /// The job ran but did not finish with `done`.
    #[error("{operation} job finished with result {result:?}")]
    JobFailed { operation: String, result: String },
    #[error("{operation}: no answer from systemd within {seconds} s")]
    Timeout { operation: String, seconds: u64 },
}

pub type UnitFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, UnitError>> + Send + 'a>>;
pub type ChangeStream = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// Control of one systemd service. Every job-based operation returns once systemd has
/// finished the job (JobRemoved with result `done`), or fails.
pub trait UnitControl: Send + Sync + 'static {
    fn unit_name(&self) -> &str;
    fn start(&self) -> UnitFuture<'_, ()>;
    fn stop(&self) -> UnitFuture<'_, ()>;
    fn restart(&self) -> UnitFuture<'_, ()>;
    fn reset_failed(&self) -> UnitFuture<'_, ()>;
    /// Set the unit's kernel filter and resource bounds (`SetUnitProperties`, persistent).
    /// systemd applies them to the running unit: no restart.
    fn confine(&self, confinement: &Confinement) -> UnitFuture<'_, ()>;
    /// The filter and bounds systemd reports for the unit.
    fn confinement(&self) -> UnitFuture<'_, ConfinementState>;
    /// The arguments the running distccd was started with (after `--log-stderr`), or
    /// `None` when it is not running or they cannot be read.
    fn running_args(&self) -> UnitFuture<'_, Option<Vec<String>>>;
    fn state(&self) -> UnitFuture<'_, UnitState>;
    /// A stream that yields whenever systemd signals a change of the unit's properties.
    fn changes(&self) -> UnitFuture<'_, ChangeStream>;
}
