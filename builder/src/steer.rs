//! Live steering: follow every worker's `WatchStatus` stream and rewrite the session's
//! hosts file whenever the host list changes, so a running build stops sending work to a
//! worker that went away and uses it again when it comes back (distcc re-reads the file
//! on every compile). Each worker's decisions are its [`Track`]'s; this module runs the
//! I/O they ask for (port checks, cuts) and the streams.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distcc_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

use crate::cluster::{Client, Probe, WorkerView, connect, source_address, status_text, views};
use crate::config::AgentAccess;
use crate::failover::{
    CutScope, MachinePorts, PortCheck, check_machine, cut_connections, cut_one, list_connections,
};
use crate::host_list::{
    HostEntry, HostList, LocalCompiler, Policy, endpoint_host, write_atomically,
};
use crate::host_list::{Others, Verdict};
use crate::pace::slowness;
use crate::snapshot::WorkerSnapshot;
use crate::straggler::{Redo, Stragglers, WorkerLoad};
use crate::track::{CutCause, SendPeriod, Track, TrackAction, TrackEvent, TrackReport};

/// How the session follows the workers.
#[derive(Debug, Clone)]
pub struct SteeringConfig {
    pub access: AgentAccess,
    /// Bound on connecting and on one RPC; also how long the machine's ports may take to
    /// answer before a worker whose stream broke counts as lost.
    pub deadline: Duration,
    /// The interval asked of the agents' status streams (they send one at least this
    /// often when idle; the stale bound follows what they really do, see
    /// [`crate::track::SendPeriod`]).
    pub interval: Duration,
    pub local: Vec<LocalCompiler>,
    pub policy: Policy,
    pub hosts_file: PathBuf,
    /// Which connections to abort, so compiles in flight there fall back to local ones at
    /// once.
    pub cuts: CutPolicy,
    /// Where to publish every worker's latest status and the host list, after each batch
    /// of events (the daemon answers users' `status`/`hosts` from it).
    pub survey: Option<watch::Sender<Arc<Survey>>>,
}

/// When steering aborts this builder's connections to a worker.
#[derive(Debug, Clone)]
pub struct CutPolicy {
    /// On a confirmed loss (see [`crate::failover`]): every connection to it.
    pub lost: bool,
    /// When the worker was just judged slow (see [`crate::pace`]).
    pub slow: SlowCuts,
}

impl CutPolicy {
    /// Cut nothing: steer new compiles only.
    pub fn never() -> Self {
        Self {
            lost: false,
            slow: SlowCuts::Never,
        }
    }
}

/// Whose connections to a worker just judged slow are aborted.
#[derive(Debug, Clone)]
pub enum SlowCuts {
    Never,
    /// Every connection (a root session owns the builds on its machine).
    All,
    /// Only sockets of these uids, as the set is at the moment of the cut (the daemon
    /// updates it as sessions that asked for slow cuts come and go); empty cuts nothing.
    OwnedBy(watch::Receiver<BTreeSet<u32>>),
}

impl SlowCuts {
    /// What to cut now, if anything.
    fn scope(&self) -> Option<CutScope> {
        match self {
            SlowCuts::Never => None,
            SlowCuts::All => Some(CutScope::All),
            SlowCuts::OwnedBy(uids) => {
                let uids = uids.borrow().clone();
                (!uids.is_empty()).then_some(CutScope::OwnedBy(uids))
            }
        }
    }
}

/// Every worker's latest status and the host list made from them.
#[derive(Debug, Clone)]
pub struct Survey {
    /// In configuration order.
    pub probes: Vec<Probe>,
    pub list: HostList,
}

impl Survey {
    /// One row per worker, as `status --json` writes it.
    pub fn views(&self) -> Vec<WorkerView> {
        views(&self.probes, &self.list)
    }
}

/// What steering did, for the session's log or the daemon's journal.
#[derive(Debug)]
pub enum SteeringEvent<'a> {
    /// The hosts file was rewritten.
    HostsChanged {
        before: &'a HostList,
        after: &'a HostList,
    },
    /// A worker was confirmed lost and its connections aborted (or that failed).
    ConnectionsCut {
        endpoint: &'a str,
        distccd: SocketAddr,
        /// Why the agent's stream counts as broken.
        stream: &'a str,
        /// What the machine's ports said ([`crate::failover::MachinePorts::describe`]).
        port: &'a str,
        /// How many connections `ss` aborted, or why it could not.
        result: &'a Result<usize, String>,
    },
    /// A worker was judged slow (see [`crate::pace`]) and this builder's connections to
    /// it aborted, so its compiles in flight are redone locally instead of waited for.
    SlowCut {
        endpoint: &'a str,
        distccd: SocketAddr,
        /// Why it counts as slow.
        reason: &'a str,
        result: &'a Result<usize, String>,
    },
    /// A worker's stream broke while its distccd answers: kept, connections untouched.
    AgentAway {
        endpoint: &'a str,
        distccd: SocketAddr,
        why: &'a str,
    },
    /// Statuses again after [`SteeringEvent::AgentAway`].
    AgentBack { endpoint: &'a str },
    /// A worker's stream broke and distccd's port is silent, but the machine answers on
    /// the agent's port: left out of the host list, connections untouched.
    MachineUp {
        endpoint: &'a str,
        why: &'a str,
        ports: &'a str,
    },
    /// A compile running long on a slow worker while faster slots stood idle: its
    /// connection aborted, so the client redoes it here (see [`crate::straggler`]).
    StragglerRedo {
        endpoint: &'a str,
        distccd: SocketAddr,
        /// How long it had run there.
        age: Duration,
        /// How many times slower the worker is ([`crate::pace::slowness`]).
        slowness: f64,
        result: &'a Result<usize, String>,
    },
}

impl SteeringEvent<'_> {
    /// A stable name for the event's kind, for clients that decide on it (never on the
    /// text).
    pub fn kind(&self) -> &'static str {
        match self {
            SteeringEvent::HostsChanged { .. } => "hosts_changed",
            SteeringEvent::ConnectionsCut { .. } => "lost",
            SteeringEvent::SlowCut { .. } => "slow_cut",
            SteeringEvent::AgentAway { .. } => "agent_away",
            SteeringEvent::AgentBack { .. } => "agent_back",
            SteeringEvent::MachineUp { .. } => "machine_up",
            SteeringEvent::StragglerRedo { .. } => "straggler_redo",
        }
    }

    /// One line per fact, for logs.
    pub fn describe(&self) -> Vec<String> {
        match self {
            SteeringEvent::HostsChanged { before, after } => describe_change(before, after),
            SteeringEvent::ConnectionsCut {
                endpoint,
                stream,
                port,
                result,
                ..
            } => vec![match result {
                Ok(n) => {
                    format!("{endpoint}: lost ({stream}; {port}): aborted {n} connections to it")
                }
                Err(e) => format!(
                    "{endpoint}: lost ({stream}; {port}): could not abort its connections: {e}"
                ),
            }],
            SteeringEvent::SlowCut {
                endpoint,
                distccd,
                reason,
                result,
            } => vec![match result {
                Ok(n) => format!(
                    "{endpoint}: {reason}: aborted {n} connections to {distccd} (their compiles are redone here)"
                ),
                Err(e) => format!(
                    "{endpoint}: {reason}: could not abort the connections to {distccd}: {e}"
                ),
            }],
            SteeringEvent::AgentAway {
                endpoint,
                distccd,
                why,
            } => vec![format!(
                "{endpoint}: agent away ({why}); distcc port {distccd} answers: kept in the host list, connections left alone"
            )],
            SteeringEvent::AgentBack { endpoint } => vec![format!("{endpoint}: agent back")],
            SteeringEvent::MachineUp {
                endpoint,
                why,
                ports,
            } => vec![format!(
                "{endpoint}: agent stream broke ({why}); {ports}: the machine answers (distccd's accept queue may be full): left out, connections left alone"
            )],
            SteeringEvent::StragglerRedo {
                endpoint,
                distccd,
                age,
                slowness,
                result,
            } => vec![match result {
                Ok(n) => format!(
                    "{endpoint}: straggler: a compile ran {:.0} s on this worker ({slowness:.1} times slower) while faster slots were idle: aborted {n} connection to {distccd} (redone here)",
                    age.as_secs_f64()
                ),
                Err(e) => format!(
                    "{endpoint}: straggler: could not abort a compile's connection to {distccd}: {e}"
                ),
            }],
        }
    }
}

/// Follow the workers forever (until dropped; it never returns, even with no worker),
/// starting from `probes`, reporting each rewrite of the hosts file and each fact of
/// [`SteeringEvent`].
pub async fn steer(
    config: SteeringConfig,
    probes: Vec<Probe>,
    mut report: impl FnMut(SteeringEvent<'_>),
) {
    let config = Arc::new(config);
    let (events, mut received) = mpsc::channel::<(usize, TrackEvent)>(64);
    let (loads, loads_seen) = watch::channel(Vec::<TrackLoad>::new());
    let (redone, mut redone_seen) = mpsc::channel::<(Redo, Result<usize, String>)>(16);
    let mut followers: Vec<_> = probes
        .iter()
        .enumerate()
        .map(|(index, probe)| {
            tokio::spawn(follow(
                index,
                probe.endpoint.clone(),
                config.clone(),
                events.clone(),
            ))
        })
        .collect();
    followers.push(tokio::spawn(watch_stragglers(
        loads_seen,
        config.cuts.slow.clone(),
        redone,
    )));
    // Abort the followers (and the straggler watch) when this future is dropped.
    let _abort = AbortOnDrop(followers);
    if probes.is_empty() {
        // No worker configured: nothing to follow, but the caller's select! must not see
        // an end (a finished future must not be polled again).
        std::future::pending::<()>().await;
    }
    let mut tracks: Vec<Track> = probes.into_iter().map(Track::new).collect();
    let (mut current, _) = judge(&tracks, &config);
    for (track, verdict) in tracks.iter_mut().zip(&current.workers) {
        // Nothing was included before: no action.
        let _ = track.on(TrackEvent::Judged(verdict.verdict.clone()));
    }
    let mut written = current.render();
    // The agent-away grace is counted on ticks.
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            Some(event) = received.recv() => batch.push(event),
            _ = ticks.tick() => {
                let now = Instant::now();
                batch.extend((0..tracks.len()).map(|i| (i, TrackEvent::Tick(now))));
            }
            Some((redo, result)) = redone_seen.recv() => {
                report(SteeringEvent::StragglerRedo {
                    endpoint: &redo.endpoint,
                    distccd: redo.connection.peer,
                    age: redo.age,
                    slowness: redo.slowness,
                    result: &result,
                });
                continue;
            }
        }
        // Drain what else is queued: one rewrite for a burst of updates.
        while let Ok(event) = received.try_recv() {
            batch.push(event);
        }
        for (index, event) in batch {
            let actions = tracks[index].on(event);
            act(index, actions, &tracks, &config, &events, &mut report);
        }
        let (next, next_loads) = judge(&tracks, &config);
        loads.send_replace(next_loads);
        for (index, verdict) in next.workers.iter().enumerate() {
            let actions = tracks[index].on(TrackEvent::Judged(verdict.verdict.clone()));
            act(index, actions, &tracks, &config, &events, &mut report);
        }
        if let Some(survey) = &config.survey {
            survey.send_replace(Arc::new(Survey {
                probes: tracks.iter().map(Track::probe).collect(),
                list: next.clone(),
            }));
        }
        let text = next.render();
        if text != written {
            if let Err(e) = write_atomically(&config.hosts_file, &text) {
                // Keep the old file (still valid) and retry on the next update.
                tracing::warn!("cannot rewrite {}: {e}", config.hosts_file.display());
                continue;
            }
            report(SteeringEvent::HostsChanged {
                before: &current,
                after: &next,
            });
            written = text;
            current = next;
        }
    }
}

/// The host list from every track, with each worker's measured pace, and the load of
/// each included worker for the straggler watch.
fn judge(tracks: &[Track], config: &SteeringConfig) -> (HostList, Vec<TrackLoad>) {
    let now_usec = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let inputs: Vec<_> = tracks.iter().map(|t| t.input(now_usec)).collect();
    let list = HostList::compute(&inputs, &config.local, &config.policy);
    let loads = list
        .workers
        .iter()
        .enumerate()
        .filter_map(|(i, verdict)| {
            let others = Others::of(&inputs, i);
            Some(TrackLoad {
                endpoint: verdict.endpoint.clone(),
                entry: verdict.entry()?.clone(),
                slowness: slowness(
                    inputs[i].busy_secs_per_compile,
                    others.busy_secs_per_compile,
                ),
                mean_job_secs: inputs[i].mean_job_secs,
            })
        })
        .collect();
    (list, loads)
}

/// An included worker as the straggler watch needs it; its distccd is resolved there.
#[derive(Debug, Clone)]
struct TrackLoad {
    endpoint: String,
    entry: HostEntry,
    slowness: Option<f64>,
    mean_job_secs: Option<f64>,
}

/// Once a second, while some worker in the list is slow and this builder's cuts allow
/// it: list this namespace's connections and abort those [`Stragglers`] picks.
async fn watch_stragglers(
    loads: watch::Receiver<Vec<TrackLoad>>,
    cuts: SlowCuts,
    redone: mpsc::Sender<(Redo, Result<usize, String>)>,
) {
    let mut stragglers = Stragglers::default();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(scope) = cuts.scope() else {
            continue;
        };
        let pending = loads.borrow().clone();
        // Nothing to resolve or list on the usual tick, with no worker slow.
        if !pending
            .iter()
            .any(|l| crate::straggler::is_slow(l.slowness))
        {
            continue;
        }
        let mut workers = Vec::with_capacity(pending.len());
        for load in pending {
            if let Some(distccd) = distccd_address(&load.entry).await {
                workers.push(WorkerLoad {
                    endpoint: load.endpoint,
                    distccd,
                    slots: load.entry.slots,
                    slowness: load.slowness,
                    mean_job_secs: load.mean_job_secs,
                });
            }
        }
        if !Stragglers::worth_listing(&workers) {
            continue;
        }
        let connections = match list_connections().await {
            Ok(connections) => connections,
            Err(e) => {
                tracing::warn!("cannot list connections for the straggler watch: {e}");
                continue;
            }
        };
        for redo in stragglers.observe(Instant::now(), &workers, &connections, &scope) {
            let result = cut_one(redo.connection.peer, redo.connection.local)
                .await
                .map_err(|e| e.to_string());
            if redone.send((redo, result)).await.is_err() {
                return;
            }
        }
    }
}

/// Run one track's actions: I/O is spawned and answers as a [`TrackEvent`] on `events`.
fn act(
    index: usize,
    actions: Vec<TrackAction>,
    tracks: &[Track],
    config: &Arc<SteeringConfig>,
    events: &mpsc::Sender<(usize, TrackEvent)>,
    report: &mut impl FnMut(SteeringEvent<'_>),
) {
    let endpoint = tracks[index].endpoint();
    for action in actions {
        tracing::debug!(endpoint, ?action, "steering");
        match action {
            TrackAction::CheckPorts { distccd } => {
                let (endpoint, events, deadline) =
                    (endpoint.to_owned(), events.clone(), config.deadline);
                tokio::spawn(async move {
                    let ports = check_ports(&distccd, &endpoint, deadline).await;
                    let at = Instant::now();
                    let _ = events
                        .send((index, TrackEvent::PortsChecked { ports, at }))
                        .await;
                });
            }
            TrackAction::Cut { distccd, cause } => {
                let scope = match &cause {
                    CutCause::Lost { .. } => config.cuts.lost.then_some(CutScope::All),
                    CutCause::Slow { .. } => config.cuts.slow.scope(),
                };
                let Some(scope) = scope else {
                    tracing::info!(endpoint, ?cause, "not aborting connections (not asked to)");
                    continue;
                };
                let events = events.clone();
                tokio::spawn(async move {
                    let (distccd, result) = match distccd_address(&distccd).await {
                        Some(addr) => (
                            addr,
                            cut_connections(addr, &scope)
                                .await
                                .map_err(|e| e.to_string()),
                        ),
                        None => (
                            unspecified(distccd.port),
                            Err(format!("{} does not resolve", distccd.host)),
                        ),
                    };
                    let done = TrackEvent::CutDone {
                        cause,
                        distccd,
                        result,
                    };
                    let _ = events.send((index, done)).await;
                });
            }
            TrackAction::Report(fact) => {
                let event = match &fact {
                    TrackReport::AgentAway { why, distccd } => SteeringEvent::AgentAway {
                        endpoint,
                        distccd: *distccd,
                        why,
                    },
                    TrackReport::AgentBack => SteeringEvent::AgentBack { endpoint },
                    TrackReport::MachineUp { why, ports } => SteeringEvent::MachineUp {
                        endpoint,
                        why,
                        ports: &ports.describe(),
                    },
                    TrackReport::Lost { why, ports, result } => SteeringEvent::ConnectionsCut {
                        endpoint,
                        distccd: ports.distccd,
                        stream: why,
                        port: &ports.describe(),
                        result,
                    },
                    TrackReport::SlowCut {
                        why,
                        distccd,
                        result,
                    } => SteeringEvent::SlowCut {
                        endpoint,
                        distccd: *distccd,
                        reason: &why.to_string(),
                        result,
                    },
                };
                report(event);
            }
        }
    }
}

/// The address of a hosts-file entry's distccd (what `ss -K` matches and the port check
/// asks), if its name resolves.
async fn distccd_address(entry: &HostEntry) -> Option<SocketAddr> {
    first_address(&entry.host, entry.port).await
}

/// The agent's address, from its endpoint `host:port`, if it resolves.
async fn agent_address(endpoint: &str) -> Option<SocketAddr> {
    let port = endpoint.rsplit_once(':')?.1.parse().ok()?;
    first_address(endpoint_host(endpoint), port).await
}

async fn first_address(host: &str, port: u16) -> Option<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
}

/// Ask the machine's two ports; a name that no longer resolves reaches nobody: silent.
async fn check_ports(entry: &HostEntry, endpoint: &str, bound: Duration) -> MachinePorts {
    match (distccd_address(entry).await, agent_address(endpoint).await) {
        (Some(distccd), Some(agent)) => check_machine(distccd, agent, bound).await,
        (distccd, agent) => {
            let unresolved = || PortCheck::Silent("the name does not resolve".to_owned());
            MachinePorts {
                distccd: distccd.unwrap_or_else(|| unspecified(entry.port)),
                distccd_check: unresolved(),
                agent: agent.unwrap_or_else(|| unspecified(0)),
                agent_check: unresolved(),
            }
        }
    }
}

fn unspecified(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Follow one worker: (re)connect, watch, report every status or failure.
async fn follow(
    index: usize,
    endpoint: String,
    config: Arc<SteeringConfig>,
    events: mpsc::Sender<(usize, TrackEvent)>,
) {
    let interval_ms = u32::try_from(config.interval.as_millis()).unwrap_or(u32::MAX);
    let mut period = SendPeriod::default();
    loop {
        let why = match tokio::time::timeout(
            config.deadline,
            connect(&endpoint, &config.access, config.deadline),
        )
        .await
        {
            Err(_) => format!("no answer within {:?}", config.deadline),
            Ok(Err(e)) => e,
            Ok(Ok(client)) => {
                let stream = Stream {
                    index,
                    endpoint: &endpoint,
                    config: &config,
                    events: &events,
                };
                stream.watch(client, interval_ms, &mut period).await
            }
        };
        tracing::debug!(endpoint, why, "status stream broke");
        if events
            .send((index, TrackEvent::StreamBroke { why }))
            .await
            .is_err()
        {
            return;
        }
        // Retry soon: a worker that comes back should be used again within seconds.
        tokio::time::sleep(config.interval).await;
    }
}

/// One status stream of one worker.
struct Stream<'a> {
    index: usize,
    endpoint: &'a str,
    config: &'a SteeringConfig,
    events: &'a mpsc::Sender<(usize, TrackEvent)>,
}

impl Stream<'_> {
    /// Report statuses until the stream fails; returns why.
    async fn watch(&self, mut client: Client, interval_ms: u32, period: &mut SendPeriod) -> String {
        let config = self.config;
        let request = pb::WatchStatusRequest { interval_ms };
        let mut stream =
            match tokio::time::timeout(config.deadline, client.watch_status(request)).await {
                Err(_) => return format!("no answer within {:?}", config.deadline),
                Ok(Err(status)) => return status_text(&status),
                Ok(Ok(response)) => response.into_inner(),
            };
        period.restart();
        let mut builder_addr = None;
        loop {
            let started = Instant::now();
            let stale_after = period.stale_after(config.interval, config.deadline);
            let mut status = match tokio::time::timeout(stale_after, stream.message()).await {
                Err(_) => return format!("no status for {stale_after:?}"),
                Ok(Err(status)) => return status_text(&status),
                Ok(Ok(None)) => return "the agent ended the status stream".to_owned(),
                Ok(Ok(Some(status))) => status,
            };
            period.observe(Instant::now());
            // The stream does not run compilers; a compiler it has not described yet (new
            // or changed binary) is described by one full Status call.
            if needs_compiler_refresh(&status, &config.local) {
                let full = client.status(pb::StatusRequest {
                    skip_compilers: false,
                });
                if let Ok(Ok(response)) = tokio::time::timeout(config.deadline, full).await {
                    status = response.into_inner();
                }
            }
            let snapshot = WorkerSnapshot::new(status);
            if builder_addr.is_none() {
                builder_addr = source_address(self.endpoint, snapshot.distccd_port_to_try()).await;
            }
            let probe = Probe {
                endpoint: self.endpoint.to_owned(),
                status: Ok(snapshot),
                latency: started.elapsed(),
                builder_addr,
            };
            if self
                .events
                .send((self.index, TrackEvent::Status(Box::new(probe))))
                .await
                .is_err()
            {
                return "session ended".to_owned();
            }
        }
    }
}

/// Whether a configured compiler appears without a fingerprint and without an error.
pub fn needs_compiler_refresh(status: &pb::WorkerStatus, local: &[LocalCompiler]) -> bool {
    local.iter().any(|mine| {
        status
            .compilers
            .iter()
            .any(|c| c.name == mine.name && c.fingerprint.is_empty() && c.error.is_empty())
    })
}

/// One line per worker whose place in the host list changed.
pub fn describe_change(before: &HostList, after: &HostList) -> Vec<String> {
    after
        .workers
        .iter()
        .filter_map(|now| {
            let was = before.verdict(&now.endpoint);
            // An exclusion whose figures changed ("slow: compiles take 19.0 s here, 1.5 s
            // ...") is the same decision: one line per change of kind, not per status.
            if was.map(|w| (w.entry(), w.excluded_kind()))
                == Some((now.entry(), now.excluded_kind()))
            {
                return None;
            }
            Some(match &now.verdict {
                Verdict::Included { entry, .. } => {
                    format!("{}: in, {}", now.endpoint, entry.render())
                }
                Verdict::Excluded(why) => format!("{}: out, {why}", now.endpoint),
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn slow_cuts_follow_the_owner_set_of_the_moment() {
        let (owners, rx) = watch::channel(BTreeSet::new());
        let slow = SlowCuts::OwnedBy(rx);
        assert_eq!(slow.scope(), None, "nobody asked: no cut");
        owners.send_replace(BTreeSet::from([1000, 1001]));
        assert_eq!(
            slow.scope(),
            Some(CutScope::OwnedBy(BTreeSet::from([1000, 1001])))
        );
        assert_eq!(SlowCuts::All.scope(), Some(CutScope::All));
        assert_eq!(SlowCuts::Never.scope(), None);
    }

    fn list_with(verdict: Verdict) -> HostList {
        HostList {
            workers: vec![crate::host_list::WorkerVerdict {
                endpoint: "198.18.3.12:3634".into(),
                verdict,
            }],
            local_slots: 2,
        }
    }

    #[test]
    fn changes_are_lines_per_kind_not_per_figure() {
        use crate::exclusion::Exclusion;
        let slow = |mean_secs| {
            list_with(Verdict::Excluded(Exclusion::Slow {
                mean_secs,
                others_secs: 1.5,
            }))
        };
        assert_eq!(
            describe_change(&slow(19.0), &slow(25.0)),
            Vec::<String>::new()
        );
        let overloaded = list_with(Verdict::Excluded(Exclusion::Overloaded {
            running: 9,
            slots: 3,
        }));
        assert_eq!(
            describe_change(&slow(19.0), &overloaded),
            ["198.18.3.12:3634: out, overloaded: distccd has 9 compiles in flight for 3 slots"]
        );
        let back = list_with(Verdict::Included {
            entry: HostEntry {
                host: "198.18.3.12".into(),
                port: 3632,
                slots: 3,
                lzo: true,
            },
            warnings: vec!["agent away (...)".into()],
        });
        assert_eq!(
            describe_change(&overloaded, &back),
            ["198.18.3.12:3634: in, 198.18.3.12:3632/3,lzo"]
        );
    }

    #[test]
    fn refresh_only_for_undescribed_configured_compilers() {
        let local = vec![LocalCompiler {
            name: "gcc".into(),
            version: String::new(),
            target: String::new(),
            fingerprint: "ab".into(),
        }];
        let mut status = pb::WorkerStatus {
            compilers: vec![pb::Compiler {
                name: "gcc".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(needs_compiler_refresh(&status, &local));
        status.compilers[0].fingerprint = "ab".into();
        assert!(!needs_compiler_refresh(&status, &local));
        status.compilers[0].fingerprint.clear();
        status.compilers[0].error = "no such compiler installed".into();
        assert!(!needs_compiler_refresh(&status, &local));
    }
}
