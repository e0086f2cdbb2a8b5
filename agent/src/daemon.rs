//! The long-running agent: D-Bus connection, gRPC server, state monitor, sd-notify and
//! signal handling. Shutdown is done once: SIGTERM flips a watch channel that ends the
//! streams, stops accepting, and lets in-flight RPCs finish.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use distcc_proto::v1::distcc_agent_server::DistccAgentServer;
use futures_util::StreamExt;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{AgentConfig, Transport};
use crate::connections::{bounded_incoming, bounded_server};
use crate::identity;
use crate::limits::Limits;
use crate::service::{AgentService, TokenAuth};
use crate::systemd::SystemdUnit;
use crate::unit_control::UnitControl;
use crate::worker::Worker;

/// How long in-flight RPCs may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a reload in progress may take to finish after SIGTERM. With the drain, the
/// stop stays under distcc-agent.service's TimeoutStopSec=30s.
const RELOAD_FINISH_TIMEOUT: Duration = Duration::from_secs(5);

fn notify(states: &[NotifyState<'_>]) {
    // Outside systemd there is no NOTIFY_SOCKET and this is a no-op.
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Run the agent until SIGTERM/SIGINT.
pub async fn run(config_path: PathBuf) -> Result<()> {
    let config = AgentConfig::load(&config_path).context("loading the agent config")?;
    for warning in &config.warnings {
        tracing::warn!("{}: {warning}", config_path.display());
    }
    let listen = config.listen;
    let tls = server_tls(&config).context("preparing TLS")?;
    let unit = SystemdUnit::connect(&config.unit, config.job_timeout)
        .await
        .with_context(|| format!("connecting to systemd over D-Bus for {}", config.unit))?;
    let worker = Arc::new(Worker::new(unit, config));
    worker
        .refresh_state()
        .await
        .context("reading distccd's unit state")?;

    match worker.first_start().await {
        Ok(true) => tracing::info!(
            "first start: persisted the configured settings and bootstrapped distccd"
        ),
        Ok(false) => {
            // systemd kept the filter across reboots; this repairs a hand-edited drop-in.
            if let Err(e) = worker.enforce_confinement().await {
                tracing::error!("setting distccd's kernel filter failed: {e}");
            }
        }
        // Keep serving: the operator needs Status and Validate to see what is wrong.
        Err(e) => tracing::error!("bootstrapping distccd failed: {e}"),
    }

    // Run every compiler once now, so the first Status that skips compilers has them.
    {
        let worker = worker.clone();
        tokio::spawn(async move { worker.status(true).await.ok() });
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    let heartbeat = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let mut monitor = tokio::spawn(monitor_unit(
        worker.clone(),
        health.clone(),
        heartbeat.clone(),
        started,
        shutdown_rx.clone(),
    ));

    let auth = {
        let worker = worker.clone();
        TokenAuth::new(move || worker.config().tokens.clone())
    };
    let limits = worker.config().limits.clone();
    let service = InterceptedService::new(
        DistccAgentServer::new(AgentService::new(worker.clone(), shutdown_rx.clone()))
            .max_decoding_message_size(limits.max_request_bytes),
        move |r| auth.check(r),
    );
    let health_service = health_service.max_decoding_message_size(limits.max_request_bytes);
    let tls_enabled = tls.is_some();
    let mut builder = bounded_server(&limits, tls).context("configuring TLS")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let max_connections = connection_cap(&limits);
    tracing::info!(%listen, tls = tls_enabled, max_connections, "serving gRPC");
    let incoming = bounded_incoming(listener, &limits, max_connections);
    let mut server_shutdown = shutdown_rx.clone();
    let mut server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = server_shutdown.wait_for(|stop| *stop).await;
            }),
    );

    // Listener bound and D-Bus connected: only now is the agent ready.
    let line = worker.status_line().await;
    notify(&[NotifyState::Ready, NotifyState::Status(&line)]);

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    // Fed from this loop, so a ping also proves the signal loop runs; and only while the
    // gRPC server and the monitor are alive and the monitor completes D-Bus round trips.
    let mut watchdog = watchdog_interval().map(|half| tokio::time::interval(half / 2));
    // A reload runs beside the loop (a [distccd] change restarts distccd, up to two job
    // timeouts with a rollback): signals and the watchdog are served meanwhile. A SIGHUP
    // during a reload waits for it (the guard leaves the signal pending).
    let mut reloading: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv(), if reloading.is_none() => {
                reloading = Some(Box::pin(reload(&worker, &config_path)));
            }
            () = async { if let Some(r) = reloading.as_mut() { r.await } }, if reloading.is_some() => {
                reloading = None;
            }
            _ = async { if let Some(w) = watchdog.as_mut() { w.tick().await; } }, if watchdog.is_some() => {
                let age = started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(heartbeat.load(Ordering::Relaxed)));
                if watchdog_may_feed(age, watchdog_interval()) {
                    notify(&[NotifyState::Watchdog]);
                } else {
                    tracing::warn!("monitor loop silent for {age:?}; not feeding the watchdog");
                }
            }
            // These end only with the process unless something broke: exit, and let
            // systemd (Restart=on-failure) start a whole agent again, not a ghost.
            joined = &mut server => {
                return Err(match joined {
                    Ok(Ok(())) => anyhow::anyhow!("the gRPC server stopped unexpectedly"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("gRPC server"),
                    Err(e) => anyhow::Error::new(e).context("gRPC server task"),
                });
            }
            joined = &mut monitor => {
                return Err(anyhow::anyhow!("the unit monitor stopped unexpectedly: {joined:?}"));
            }
        }
    }

    tracing::info!("stopping: finishing in-flight requests");
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing in-flight requests"),
    ]);
    if let Some(reload) = reloading {
        // Bounded, so the whole stop stays inside TimeoutStopSec. A restart job left
        // running completes in systemd; the settings file is written atomically, and the
        // next start reports any difference between it and what distccd runs.
        if tokio::time::timeout(RELOAD_FINISH_TIMEOUT, reload)
            .await
            .is_err()
        {
            tracing::warn!(
                "the reload in progress did not finish within {RELOAD_FINISH_TIMEOUT:?}; stopping anyway"
            );
        }
    }
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(joined) => joined.context("server task")?.context("gRPC server")?,
        Err(_) => tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}"),
    }
    monitor.abort();
    Ok(())
}

/// Whether the watchdog may be fed when the monitor last completed a round trip `age`
/// ago: only within one watchdog period (`half` is half of it).
fn watchdog_may_feed(age: Duration, half: Option<Duration>) -> bool {
    half.is_some_and(|half| age < half * 2)
}

async fn reload<U: UnitControl>(worker: &Worker<U>, path: &Path) {
    notify(&[NotifyState::Reloading]);
    match AgentConfig::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                tracing::warn!("{}: {warning}", path.display());
            }
            let revoked: Vec<String> = worker
                .config()
                .tokens
                .entries()
                .iter()
                .filter(|old| !config.tokens.entries().contains(old))
                .map(|old| old.id.to_string())
                .collect();
            if !revoked.is_empty() {
                tracing::info!(revoked = ?revoked, "tokens revoked or changed; their streams end");
            }
            if config.listen != worker.config().listen {
                tracing::warn!("listen address changed; it takes effect on restart");
            }
            if config.transport != worker.config().transport {
                tracing::warn!("transport ([tls], plaintext) changed; it takes effect on restart");
            }
            if config.limits != worker.config().limits {
                tracing::warn!(
                    "[limits] changed; the WatchStatus interval range applies now, the rest on restart"
                );
            }
            match worker.reload(config).await {
                Ok(Some(outcome)) => {
                    tracing::info!(settings = ?outcome.applied, "reloaded; applied new [distccd] settings")
                }
                Ok(None) => tracing::info!("reloaded {}", path.display()),
                Err(e) => tracing::error!("reloaded, but applying [distccd] failed: {e}"),
            }
        }
        Err(e) => tracing::error!("reload refused, keeping the running config: {e}"),
    }
    let line = worker.status_line().await;
    notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
}

/// Follows distccd's unit: on every D-Bus PropertiesChanged signal and at least every
/// few seconds it re-reads the state, publishes it to WatchStatus streams, updates the
/// health service and the STATUS= line, and records a heartbeat for the watchdog after
/// every completed D-Bus round trip.
async fn monitor_unit<U: UnitControl>(
    worker: Arc<Worker<U>>,
    health: HealthReporter,
    heartbeat: Arc<AtomicU64>,
    started: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let tick = watchdog_interval().map_or(worker.config().status_interval, |w| {
        w.min(worker.config().status_interval)
    });
    let mut changes = None;
    let mut follow_changes_at = Instant::now();
    let mut last_line = String::new();
    loop {
        // (Re)open the change stream, at most once per tick: a stream that ends at once
        // must not turn this loop into a busy loop (it did when the bus went away).
        if changes.is_none() && Instant::now() >= follow_changes_at {
            follow_changes_at = Instant::now() + tick;
            match worker.unit().changes().await {
                Ok(stream) => changes = Some(stream),
                Err(e) => tracing::error!("cannot follow unit changes, polling only: {e}"),
            }
        }
        match worker.refresh_state().await {
            Ok(state) => {
                heartbeat.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                let serving = if state.is_active() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health.set_service_status("", serving).await;
                health
                    .set_service_status(distcc_proto::SERVICE_NAME, serving)
                    .await;
                let line = worker.status_line().await;
                if line != last_line {
                    notify(&[NotifyState::Status(&line)]);
                    last_line = line;
                }
            }
            Err(e) => tracing::warn!("reading distccd's state: {e}"),
        }
        let next_change = async {
            match changes.as_mut() {
                Some(stream) => stream.next().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            open = next_change => if !open { changes = None },
            () = tokio::time::sleep(tick) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Half of WatchdogSec, when systemd asked for a watchdog.
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// The server's TLS: the configured certificate, or the agent's own (made now on its
/// first start); `None` for plaintext.
fn server_tls(config: &AgentConfig) -> Result<Option<ServerTlsConfig>> {
    let Transport::Tls { files, client_ca } = &config.transport else {
        return Ok(None);
    };
    if files.is_none() {
        let names = identity::SubjectNames::of_this_machine();
        if names.addresses.is_empty() {
            tracing::warn!(
                "found no interface addresses for the certificate: clients that check names \
                 must dial the hostname (pinned fingerprints do not depend on names)"
            );
        }
        let ensured = identity::ensure(&config.state_dir, &names)
            .context("making the agent's own certificate")?;
        if ensured.generated {
            tracing::info!(
                fingerprint = %ensured.fingerprint,
                hostname = %names.hostname,
                addresses = ?names.addresses,
                "generated this agent's TLS certificate; pin it on builders with `builderctl trust`"
            );
        } else {
            tracing::info!(fingerprint = %ensured.fingerprint, "serving the agent's own certificate");
        }
    }
    let Some(files) = config.identity_files() else {
        return Ok(None);
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// `limits.max_connections`, lowered to what the descriptor limit (`LimitNOFILE=`) leaves
/// room for: past it `accept` fails, and the connections the agent needs itself too.
fn connection_cap(limits: &Limits) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            let cap = limits.connections_within(soft);
            if cap < limits.max_connections {
                tracing::warn!(
                    nofile = soft,
                    "limits.max_connections {} needs a descriptor limit of at least {}; \
                     serving at most {cap} connections (raise LimitNOFILE=)",
                    limits.max_connections,
                    limits.max_connections as u64 + crate::limits::RESERVED_FDS
                );
            }
            cap
        }
        Err(e) => {
            tracing::warn!("cannot read RLIMIT_NOFILE ({e}); using limits.max_connections");
            limits.max_connections
        }
    }
}
