//! [`UnitControl`] over the system bus: systemd's Manager, Unit and Service interfaces
//! through zbus. Never shells out to systemctl. The connection is supervised: when the
//! bus goes away (`systemctl restart dbus`) the next call reconnects, subscribes again,
//! reloads the unit and rebuilds the proxies and the change stream, with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{Mutex, mpsc, watch};
use zbus::Connection;
use zbus::proxy::CacheProperties;
use zbus::{OwnedObjectPath, Variant};

use crate::confinement::{Confinement, ConfinementState, from_dbus_entry, to_dbus_entry};
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
    /// systemd checks `manage-units` with verb `set-property` for the named unit.
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Variant<'_>)],
    ) -> zbus::Result<()>;

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
    #[zbus(property, name = "IPAddressAllow")]
    fn ip_address_allow(&self) -> zbus::Result<Vec<(i32, Vec<u8>, u32)>>;
    #[zbus(property, name = "IPAddressDeny")]
    fn ip_address_deny(&self) -> zbus::Result<Vec<(i32, Vec<u8>, u32)>>;
    #[zbus(property, name = "IPIngressBytes")]
    fn ip_ingress_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn tasks_max(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_max(&self) -> zbus::Result<u64>;
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

/// How long one D-Bus method call may take. systemd answers job calls at once (the job
/// itself is awaited through JobRemoved), so a call this slow means a wedged bus or
/// systemd; the connection is then treated as broken and the monitor stops feeding the
/// watchdog.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of the delay between reconnection attempts (doubling from the first).
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The proxies of one connection to the system bus, subscribed to systemd's signals.
/// Replaced as a whole when the bus goes away (`systemctl restart dbus`).
struct Link {
    connection: Connection,
    manager: ManagerProxy<'static>,
    unit: UnitProxy<'static>,
    service: ServiceProxy<'static>,
    properties: UnitPropertiesProxy<'static>,
}

impl Link {
    /// Connect, Subscribe (without a subscriber systemd emits no unit property changes),
    /// LoadUnit and build the proxies.
    async fn open(name: &str) -> Result<Self, UnitError> {
        let bus = |e: zbus::Error| UnitError::Bus(e.to_string());
        let connection = zbus::connection::Builder::system()
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
            .map_err(bus)?;
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
            connection,
            manager,
            unit,
            service,
            properties,
        })
    }
}

/// When the next reconnection may be tried: attempts back off so that a bus that stays
/// away costs the agent nothing (the old code spun at 83 % of a CPU).
#[derive(Debug)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    fn delay(failures: u32) -> Duration {
        RECONNECT_FIRST
            .saturating_mul(1u32 << failures.min(16))
            .min(RECONNECT_MAX)
    }

    fn failed(&mut self, now: Instant) -> Duration {
        let delay = Self::delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(now + delay);
        delay
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }
}

/// Owns the bus connection: hands out the current [`Link`], and opens a new one (with
/// backoff) after the old one broke. A bus error other than a method error from systemd
/// marks the link broken; so does the connection closing.
struct Supervisor {
    name: String,
    link: std::sync::RwLock<Option<Arc<Link>>>,
    /// Held while (re)connecting, so concurrent callers make one attempt, not many.
    reconnect: Mutex<Backoff>,
    /// Bumped on every new link; the change stream re-subscribes on it.
    generation: watch::Sender<u64>,
}

impl Supervisor {
    fn current(&self) -> Option<Arc<Link>> {
        let link = self
            .link
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        link.as_ref().filter(|l| !l.connection.is_closed()).cloned()
    }

    /// The working link, reconnecting when it broke. Within the backoff delay after a
    /// failed attempt this fails at once instead of trying again.
    async fn link(&self) -> Result<Arc<Link>, UnitError> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let mut backoff = self.reconnect.lock().await;
        if let Some(link) = self.current() {
            return Ok(link); // another caller reconnected meanwhile
        }
        if let Some(at) = backoff.not_before {
            let now = Instant::now();
            if now < at {
                return Err(UnitError::Bus(format!(
                    "not connected to the system bus; next attempt in {} ms",
                    (at - now).as_millis()
                )));
            }
        }
        let opened = tokio::time::timeout(CALL_TIMEOUT, Link::open(&self.name))
            .await
            .unwrap_or_else(|_| {
                Err(UnitError::Bus(format!(
                    "connecting to the system bus took longer than {CALL_TIMEOUT:?}"
                )))
            });
        match opened {
            Ok(link) => {
                let link = Arc::new(link);
                *self
                    .link
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(link.clone());
                backoff.succeeded();
                self.generation.send_modify(|g| *g += 1);
                if *self.generation.borrow() > 1 {
                    tracing::info!("reconnected to the system bus");
                }
                Ok(link)
            }
            Err(e) => {
                let delay = backoff.failed(Instant::now());
                tracing::warn!(
                    "connecting to the system bus failed (next attempt in {delay:?}): {e}"
                );
                Err(e)
            }
        }
    }

    /// Forget `link` if it is still the current one: the next call reconnects.
    fn broken(&self, link: &Arc<Link>, why: &zbus::Error) {
        let mut current = self
            .link
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, link)) {
            tracing::warn!("system bus connection broken: {why}");
            *current = None;
        }
    }

    /// A bus error from a call on `link`; marks the link broken unless systemd itself
    /// answered (a method error: refused, no such unit...).
    fn bus(&self, link: &Arc<Link>, err: zbus::Error) -> UnitError {
        if !matches!(err, zbus::Error::MethodError(..)) {
            self.broken(link, &err);
        }
        match err {
            zbus::Error::MethodError(..) => refused("call", err),
            other => UnitError::Bus(other.to_string()),
        }
    }

    fn refused(&self, link: &Arc<Link>, operation: &str, err: zbus::Error) -> UnitError {
        match err {
            zbus::Error::MethodError(..) => refused(operation, err),
            other => self.bus(link, other),
        }
    }
}

/// One systemd service unit, controlled over the system bus. Survives the bus going
/// away: see [`Supervisor`].
pub struct SystemdUnit {
    supervisor: Arc<Supervisor>,
    job_timeout: Duration,
}

/// A method error from systemd (access denied, no such unit) as opposed to a broken bus.
fn refused(operation: &str, err: zbus::Error) -> UnitError {
    match err {
        zbus::Error::MethodError(name, message, _) => UnitError::Refused {
            operation: operation.to_owned(),
            message: format!("{}: {}", name.as_str(), message.unwrap_or_default()),
        },
        other => UnitError::Bus(other.to_string()),
    }
}

impl SystemdUnit {
    /// Connect to the system bus and subscribe to systemd's signals. Fails when the first
    /// connection fails (systemd restarts the agent); later outages are reconnected.
    pub async fn connect(name: &str, job_timeout: Duration) -> Result<Self, UnitError> {
        let unit = Self {
            supervisor: Arc::new(Supervisor {
                name: name.to_owned(),
                link: std::sync::RwLock::new(None),
                reconnect: Mutex::new(Backoff {
                    failures: 0,
                    not_before: None,
                }),
                generation: watch::Sender::new(0),
            }),
            job_timeout,
        };
        unit.supervisor.link().await?;
        Ok(unit)
    }

    /// Issue a job and wait for its JobRemoved signal. The signal subscription is made
    /// before the call, so a job that finishes at once cannot be missed.
    async fn run_job<F, Fut>(&self, operation: &str, call: F) -> Result<(), UnitError>
    where
        F: FnOnce(Arc<Link>) -> Fut,
        Fut: Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let sup = &self.supervisor;
        let link = sup.link().await?;
        let mut removed = link
            .manager
            .receive_job_removed()
            .await
            .map_err(|e| sup.bus(&link, e))?;
        let job = call(link.clone())
            .await
            .map_err(|e| sup.refused(&link, operation, e))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let args = signal.args().map_err(|e| sup.bus(&link, e))?;
                if args.job == job {
                    return Ok(args.result);
                }
            }
            // The stream ends when the connection does: the job's outcome is unknown.
            sup.broken(
                &link,
                &zbus::Error::Failure("JobRemoved stream ended".to_owned()),
            );
            Err(UnitError::Bus(format!(
                "the system bus went away while waiting for the {operation} job"
            )))
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

    fn name(&self) -> &str {
        &self.supervisor.name
    }
}

/// Forwards the unit's PropertiesChanged signals across reconnections: on every new link
/// it subscribes again and yields once (the state may have changed while the bus was
/// away). Ends when the receiver is dropped.
async fn forward_changes(supervisor: Arc<Supervisor>, tx: mpsc::Sender<()>) {
    let mut generation = supervisor.generation.subscribe();
    loop {
        let link = match supervisor.link().await {
            Ok(link) => link,
            Err(_) => {
                // The supervisor logged it; wait out the backoff (or a reconnect by an RPC).
                let delay = supervisor
                    .reconnect
                    .lock()
                    .await
                    .not_before
                    .map_or(RECONNECT_FIRST, |at| {
                        at.saturating_duration_since(Instant::now())
                    });
                tokio::select! {
                    () = tokio::time::sleep(delay.max(RECONNECT_FIRST)) => {}
                    _ = generation.changed() => {}
                    () = tx.closed() => return,
                }
                continue;
            }
        };
        generation.mark_unchanged();
        let mut stream = match link.properties.receive_properties_changed().await {
            Ok(stream) => stream,
            Err(e) => {
                let _ = supervisor.bus(&link, e);
                continue;
            }
        };
        // Whatever happened while no stream was open, the reader should look again.
        let _ = tx.try_send(());
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    // A full channel already holds a wake-up: coalesce.
                    Some(_) => { let _ = tx.try_send(()); }
                    None => {
                        supervisor.broken(&link, &zbus::Error::Failure("signal stream ended".to_owned()));
                        break;
                    }
                },
                () = link.connection.closed() => {
                    supervisor.broken(&link, &zbus::Error::Failure("connection closed".to_owned()));
                    break;
                }
                _ = generation.changed() => break,
                () = tx.closed() => return,
            }
        }
    }
}

impl UnitControl for SystemdUnit {
    fn unit_name(&self) -> &str {
        self.name()
    }

    fn start(&self) -> UnitFuture<'_, ()> {
        Box::pin(self.run_job("start", move |link| async move {
            link.manager.start_unit(self.name(), "replace").await
        }))
    }

    fn stop(&self) -> UnitFuture<'_, ()> {
        Box::pin(self.run_job("stop", move |link| async move {
            link.manager.stop_unit(self.name(), "replace").await
        }))
    }

    fn restart(&self) -> UnitFuture<'_, ()> {
        Box::pin(self.run_job("restart", move |link| async move {
            link.manager.restart_unit(self.name(), "replace").await
        }))
    }

    fn reset_failed(&self) -> UnitFuture<'_, ()> {
        Box::pin(async move {
            let link = self.supervisor.link().await?;
            match link.manager.reset_failed_unit(self.name()).await {
                // A stopped unit may already be unloaded (garbage-collected): nothing to reset.
                Err(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
                {
                    Ok(())
                }
                other => other.map_err(|e| self.supervisor.refused(&link, "reset-failed", e)),
            }
        })
    }

    fn confine(&self, confinement: &Confinement) -> UnitFuture<'_, ()> {
        let allow: Vec<(i32, Vec<u8>, u32)> =
            confinement.ip_allow.iter().map(to_dbus_entry).collect();
        let tasks_max = confinement.tasks_max;
        let memory_max = confinement.memory_max_bytes;
        Box::pin(async move {
            let none: Vec<(i32, Vec<u8>, u32)> = Vec::new();
            // An empty list resets IPAddressAllow=, a non-empty one is appended: reset, then
            // set, in one call (systemd applies the whole call or none of it). Not
            // runtime: systemd writes the drop-in under /etc/systemd/system.control, so the
            // filter is in force from boot, before the agent starts.
            let properties = [
                ("IPAddressAllow", Variant::from(none)),
                ("IPAddressAllow", Variant::from(allow)),
                ("TasksMax", Variant::from(tasks_max)),
                ("MemoryMax", Variant::from(memory_max)),
            ];
            let link = self.supervisor.link().await?;
            link.manager
                .set_unit_properties(self.name(), false, &properties)
                .await
                .map_err(|e| self.supervisor.refused(&link, "set-property", e))
        })
    }

    fn confinement(&self) -> UnitFuture<'_, ConfinementState> {
        Box::pin(async move {
            let link = self.supervisor.link().await?;
            let (allow, deny, ingress, tasks_max, memory_max) = tokio::try_join!(
                link.service.ip_address_allow(),
                link.service.ip_address_deny(),
                link.service.ip_ingress_bytes(),
                link.service.tasks_max(),
                link.service.memory_max(),
            )
            .map_err(|e| self.supervisor.bus(&link, e))?;
            let nets = |list: Vec<(i32, Vec<u8>, u32)>| {
                list.into_iter()
                    .filter_map(|(family, bytes, prefix)| from_dbus_entry(family, &bytes, prefix))
                    .collect()
            };
            Ok(ConfinementState {
                ip_allow: nets(allow),
                ip_deny: nets(deny),
                ip_ingress_bytes: (ingress != u64::MAX).then_some(ingress),
                tasks_max,
                memory_max_bytes: memory_max,
            })
        })
    }

    fn running_args(&self) -> UnitFuture<'_, Option<Vec<String>>> {
        Box::pin(async move {
            let link = self.supervisor.link().await?;
            let pid = link
                .service
                .main_pid()
                .await
                .map_err(|e| self.supervisor.bus(&link, e))?;
            if pid == 0 {
                return Ok(None);
            }
            // Unreadable or empty (a zombie): not known, which means "restart to be sure".
            Ok(crate::runtime::read_cmdline(pid)
                .ok()
                .map(crate::confinement::distccd_args_from_cmdline))
        })
    }

    fn state(&self) -> UnitFuture<'_, UnitState> {
        Box::pin(async move {
            let link = self.supervisor.link().await?;
            let bus = |e| self.supervisor.bus(&link, e);
            let (load_state, active_state, sub_state, since, unit_file_state) = tokio::try_join!(
                link.unit.load_state(),
                link.unit.active_state(),
                link.unit.sub_state(),
                link.unit.state_change_timestamp(),
                link.unit.unit_file_state(),
            )
            .map_err(bus)?;
            let (main_pid, n_restarts, result) = tokio::try_join!(
                link.service.main_pid(),
                link.service.n_restarts(),
                link.service.result()
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
            // One wake-up pending is enough: the reader re-reads the whole state.
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(forward_changes(self.supervisor.clone(), tx));
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ChangeStream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_doubles_up_to_a_ceiling() {
        let delays: Vec<Duration> = (0..10).map(Backoff::delay).collect();
        assert_eq!(delays[0], RECONNECT_FIRST);
        assert_eq!(delays[1], RECONNECT_FIRST * 2);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(*delays.last().unwrap_or(&Duration::ZERO), RECONNECT_MAX);
        assert_eq!(Backoff::delay(u32::MAX), RECONNECT_MAX);
    }

    #[test]
    fn a_success_resets_the_backoff() {
        let mut backoff = Backoff {
            failures: 0,
            not_before: None,
        };
        let now = Instant::now();
        assert_eq!(backoff.failed(now), RECONNECT_FIRST);
        assert_eq!(backoff.failed(now), RECONNECT_FIRST * 2);
        assert_eq!(backoff.not_before, Some(now + RECONNECT_FIRST * 2));
        backoff.succeeded();
        assert_eq!((backoff.failures, backoff.not_before), (0, None));
        assert_eq!(backoff.failed(now), RECONNECT_FIRST);
    }
}
