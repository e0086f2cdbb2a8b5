//! [`UnitControl`] over the system bus: systemd's Manager, Unit and Service interfaces
//! through zbus. Never shells out to systemctl.

use std::time::Duration;

use futures_util::StreamExt;
use zbus::Connection;
use zbus::proxy::CacheProperties;
use zbus::{OwnedObjectPath, Variant};

use crate::unit_control::{ChangeStream, UnitControl, UnitError, UnitFuture, UnitState};

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<(String, String, String)>)>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Unit {
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state_change_timestamp(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn unit_file_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.DBus.Properties",
    default_service = "org.freedesktop.systemd1"
)]
pub trait UnitProperties {
    #[zbus(signal)]
    fn properties_changed(
        &self,
        interface: String,
        changed: std::collections::HashMap<String, Variant<'_>>,
        invalidated: Vec<String>,
    ) -> zbus::Result<()>;
}

/// One systemd service unit, controlled over the system bus.
pub struct SystemdUnit {
    name: String,
    manager: ManagerProxy<'static>,
    unit: UnitProxy<'static>,
    service: ServiceProxy<'static>,
    properties: UnitPropertiesProxy<'static>,
    job_timeout: Duration,
}

fn bus(err: zbus::Error) -> UnitError {
    UnitError::Bus(err.to_string())
}

/// A method error from systemd (access denied, no such unit) as opposed to a broken bus.
fn refused(operation: &str, err: zbus::Error) -> UnitError {
    match err {
        zbus::Error::MethodError(name, message, _) => UnitError::Refused {
            operation: operation.to_owned(),
            message: format!("{}: {}", name.as_str(), message.unwrap_or_default()),
        },
        other => bus(other),
    }
}

impl SystemdUnit {
    /// Connect to the system bus and subscribe to systemd's signals (without a subscriber
    /// systemd does not emit unit property changes).
    pub async fn connect(name: &str, job_timeout: Duration) -> Result<Self, UnitError> {
        let connection = Connection::system().await.map_err(bus)?;
        Self::on_connection(connection, name, job_timeout).await
    }

    pub async fn on_connection(
        connection: Connection,
        name: &str,
        job_timeout: Duration,
    ) -> Result<Self, UnitError> {
        let manager = ManagerProxy::new(&connection).await.map_err(bus)?;
        manager
            .subscribe()
            .await
            .map_err(|e| refused("Subscribe", e))?;
        let path = manager
            .load_unit(name)
            .await
            .map_err(|e| refused("LoadUnit", e))?;
        // Fresh reads every time: the cache would lag behind the job we just waited for.
        let unit = UnitProxy::builder(&connection)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(bus)?;
        let service = ServiceProxy::builder(&connection)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(bus)?;
        let properties = UnitPropertiesProxy::builder(&connection)
            .path(path)
            .build()
            .await
            .map_err(bus)?;
        Ok(Self {
            name: name.to_owned(),
            manager,
            unit,
            service,
            properties,
            job_timeout,
        })
    }

    /// Issue a job and wait for its JobRemoved signal. The signal subscription is made
    /// before the call, so a job that finishes at once cannot be missed.
    async fn run_job<F>(&self, operation: &str, call: F) -> Result<(), UnitError>
    where
        F: Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let mut removed = self.manager.receive_job_removed().await.map_err(bus)?;
        let job = call.await.map_err(|e| refused(operation, e))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let args = signal.args().map_err(bus)?;
                if args.job == job {
                    return Ok(args.result);
                }
            }
            Err(UnitError::Bus("signal stream ended".to_owned()))
        };
        let result = tokio::time::timeout(self.job_timeout, wait)
            .await
            .map_err(|_| UnitError::Timeout {
                operation: operation.to_owned(),
                seconds: self.job_timeout.as_secs(),
            })??;
        if result == "done" {
            Ok(())
        } else {
            Err(UnitError::JobFailed {
                operation: operation.to_owned(),
                result,
            })
        }
    }
}

impl UnitControl for SystemdUnit {
    fn unit_name(&self) -> &str {
        &self.name
    }

    fn start(&self) -> UnitFuture<'_, ()> {
        Box::pin(self.run_job("start", self.manager.start_unit(&self.name, "replace")))
    }

    fn stop(&self) -> UnitFuture<'_, ()> {
        Box::pin(self.run_job("stop", self.manager.stop_unit(&self.name, "replace")))
    }

    fn restart(&self) -> UnitFuture<'_, ()> {
        Box::pin(self.run_job("restart", self.manager.restart_unit(&self.name, "replace")))
    }

    fn reset_failed(&self) -> UnitFuture<'_, ()> {
        Box::pin(async move {
            match self.manager.reset_failed_unit(&self.name).await {
                // A stopped unit may already be unloaded (garbage-collected): nothing to reset.
                Err(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
                {
                    Ok(())
                }
                other => other.map_err(|e| refused("reset-failed", e)),
            }
        })
    }

    fn enable(&self) -> UnitFuture<'_, ()> {
        Box::pin(async move {
            self.manager
                .enable_unit_files(&[self.name.as_str()], false, false)
                .await
                .map(|_| ())
                .map_err(|e| refused("enable", e))
        })
    }

    fn state(&self) -> UnitFuture<'_, UnitState> {
        Box::pin(async move {
            let (load_state, active_state, sub_state, since, unit_file_state) = tokio::try_join!(
                self.unit.load_state(),
                self.unit.active_state(),
                self.unit.sub_state(),
                self.unit.state_change_timestamp(),
                self.unit.unit_file_state(),
            )
            .map_err(bus)?;
            let (main_pid, n_restarts, result) = tokio::try_join!(
                self.service.main_pid(),
                self.service.n_restarts(),
                self.service.result()
            )
            .map_err(bus)?;
            Ok(UnitState {
                load_state,
                active_state,
                sub_state,
                main_pid,
                state_since_usec: since,
                unit_file_state,
                n_restarts,
                result,
            })
        })
    }

    fn changes(&self) -> UnitFuture<'_, ChangeStream> {
        Box::pin(async move {
            let stream = self
                .properties
                .receive_properties_changed()
                .await
                .map_err(bus)?;
            Ok(Box::pin(stream.map(|_| ())) as ChangeStream)
        })
    }
}
