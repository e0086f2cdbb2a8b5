//! Live steering: follow every worker's `WatchStatus` stream and rewrite the session's
//! hosts file whenever the host list changes, so a running build stops sending work to a
//! worker that went away and uses it again when it comes back (distcc re-reads the file
//! on every compile).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distcc_proto::v1 as pb;
use std::collections::BTreeSet;

use tokio::sync::{mpsc, watch};

use crate::cluster::{
    Client, Probe, WorkerView, connect, host_list, source_address, status_text, view,
};
use crate::config::AgentAccess;
use crate::failover::{CutScope, PortCheck, check_port, cut_connections};
use crate::host_list::{HostEntry, HostList, LocalCompiler, Policy, WorkerInput, write_atomically};
use crate::pace::PaceTracker;
use crate::untrusted;

/// How the session follows the workers.
#[derive(Debug, Clone)]
pub struct SteeringConfig {
    pub access: AgentAccess,
    /// Bound on connecting and on one RPC; also how long distccd's port may take to
    /// answer before a worker whose stream broke counts as lost.
    pub deadline: Duration,
    /// The agents send a status at least this often.
    pub interval: Duration,
    pub local: Vec<LocalCompiler>,
    pub policy: Policy,
    pub hosts_file: PathBuf,
    /// Which connections to abort, so compiles in flight there fall back to local ones at
    /// once.
    pub cuts: CutPolicy,
    /// Where to publish every worker's latest status and the host list, after each batch
    /// of statuses (the daemon answers users' `status`/`hosts` from it).
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
        self.probes
            .iter()
            .map(|p| view(p, self.list.verdict(&p.endpoint)))
            .collect()
    }
}

impl SteeringConfig {
    /// A stream silent for this long is treated as a dead worker (a cut link sends
    /// nothing, not even an error).
    fn stale_after(&self) -> Duration {
        (self.interval * 3).max(self.deadline)
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
        /// What the distcc port said.
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
}

impl SteeringEvent<'_> {
    /// A stable name for the event's kind, for clients that decide on it (never on the
    /// text).
    pub fn kind(&self) -> &'static str {
        match self {
            SteeringEvent::HostsChanged { .. } => "hosts_changed",
            SteeringEvent::ConnectionsCut { .. } => "lost",
            SteeringEvent::SlowCut { .. } => "slow_cut",
        }
    }

    /// One line per fact, for logs.
    pub fn describe(&self) -> Vec<String> {
        match self {
            SteeringEvent::HostsChanged { before, after } => describe_change(before, after),
            SteeringEvent::ConnectionsCut {
                endpoint,
                distccd,
                stream,
                port,
                result,
            } => vec![match result {
                Ok(n) => format!(
                    "{endpoint}: lost ({stream}; distcc port {distccd}: {port}): aborted {n} connections to it"
                ),
                Err(e) => format!(
                    "{endpoint}: lost ({stream}; distcc port {distccd}: {port}): could not abort its connections: {e}"
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
        }
    }
}

/// The outcome of one confirm-and-cut attempt on a worker.
struct Cut {
    index: usize,
    distccd: SocketAddr,
    stream: String,
    port: PortCheck,
    result: Option<Result<usize, String>>,
}

/// Follow the workers forever (until dropped; it never returns, even with no worker),
/// starting from `probes`, reporting each rewrite of the hosts file and each cut.
pub async fn steer(
    config: SteeringConfig,
    mut probes: Vec<Probe>,
    mut report: impl FnMut(SteeringEvent<'_>),
) {
    let config = Arc::new(config);
    let (updates, mut received) = mpsc::channel::<(usize, Probe)>(64);
    let (cut_done, mut cuts) = mpsc::channel::<Cut>(16);
    let (slow_done, mut slow_cuts) = mpsc::channel::<SlowCut>(16);
    let followers: Vec<_> = probes
        .iter()
        .enumerate()
        .map(|(index, probe)| {
            tokio::spawn(follow(
                index,
                probe.endpoint.clone(),
                config.clone(),
                updates.clone(),
            ))
        })
        .collect();
    // Abort the followers when this future is dropped.
    let _abort = AbortOnDrop(followers);
    drop(updates);
    let mut current = host_list(&probes, &config.local, &config.policy);
    // How fast each worker turns compiles around, to leave stragglers out.
    let mut paces = vec![PaceTracker::default(); probes.len()];
    let mut written = current.render();
    // Where each worker's distccd was last seen serving: what to cut if it is lost.
    let mut last_entries: Vec<Option<HostEntry>> =
        current.workers.iter().map(|w| w.entry.clone()).collect();
    let mut cutting = vec![false; probes.len()];
    // One log line per loss, plus one per cut that found connections.
    let mut loss_reported = vec![false; probes.len()];
    loop {
        let (index, probe) = tokio::select! {
            update = received.recv() => match update {
                Some(update) => update,
                None => break,
            },
            Some(cut) = cuts.recv() => {
                cutting[cut.index] = false;
                if let Some(result) = cut.result {
                    let found = matches!(result, Ok(n) if n > 0);
                    if found || !loss_reported[cut.index] {
                        loss_reported[cut.index] = true;
                        report(SteeringEvent::ConnectionsCut {
                            endpoint: &probes[cut.index].endpoint,
                            distccd: cut.distccd,
                            stream: &cut.stream,
                            port: &port_text(&cut.port),
                            result: &result,
                        });
                    }
                }
                continue;
            }
            Some(cut) = slow_cuts.recv() => {
                report(SteeringEvent::SlowCut {
                    endpoint: &probes[cut.index].endpoint,
                    distccd: cut.distccd,
                    reason: &cut.reason,
                    result: &cut.result,
                });
                continue;
            }
        };
        let mut batch = vec![(index, probe)];
        // Drain what else is queued: one rewrite for a burst of updates.
        while let Ok(update) = received.try_recv() {
            batch.push(update);
        }
        for (index, probe) in batch {
            if let Err(why) = &probe.status {
                if config.cuts.lost
                    && !cutting[index]
                    && let Some(entry) = &last_entries[index]
                {
                    cutting[index] = true;
                    tokio::spawn(confirm_and_cut(
                        index,
                        entry.clone(),
                        why.clone(),
                        config.deadline,
                        cut_done.clone(),
                    ));
                }
            } else {
                loss_reported[index] = false;
            }
            if let Ok(status) = &probe.status {
                paces[index].observe(status);
            }
            probes[index] = probe;
        }
        let next = paced_host_list(&probes, &paces, &config);
        if let Some(survey) = &config.survey {
            survey.send_replace(Arc::new(Survey {
                probes: probes.clone(),
                list: next.clone(),
            }));
        }
        for (index, (was, now)) in current.workers.iter().zip(&next.workers).enumerate() {
            if let (Some(entry), Some(reason)) = (&was.entry, &now.excluded_reason)
                && reason.starts_with("slow:")
                && let Some(scope) = config.cuts.slow.scope()
            {
                tokio::spawn(cut_slow(
                    index,
                    entry.clone(),
                    reason.clone(),
                    scope,
                    slow_done.clone(),
                ));
            }
        }
        for (last, verdict) in last_entries.iter_mut().zip(&next.workers) {
            if verdict.entry.is_some() {
                last.clone_from(&verdict.entry);
            }
        }
        let text = next.render();
        if text != written {
            if let Err(e) = write_atomically(&config.hosts_file, &text) {
                // Keep the old file (still valid) and retry on the next update.
                eprintln!(
                    "builderctl: cannot rewrite {}: {e}",
                    config.hosts_file.display()
                );
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
    // No worker configured: nothing to follow, but the caller's select! must not see an
    // end (a finished future must not be polled again).
    std::future::pending::<()>().await;
}

/// The host list with each worker's measured pace (see [`crate::pace`]).
fn paced_host_list(probes: &[Probe], paces: &[PaceTracker], config: &SteeringConfig) -> HostList {
    let now_usec = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let inputs: Vec<WorkerInput<'_>> = probes
        .iter()
        .zip(paces)
        .map(|(probe, pace)| WorkerInput {
            mean_job_secs: pace.mean_job_secs(now_usec),
            ..probe.input()
        })
        .collect();
    HostList::compute(&inputs, &config.local, &config.policy)
}

fn port_text(check: &PortCheck) -> String {
    match check {
        PortCheck::Answers => "answers".to_owned(),
        PortCheck::Refused(why) => format!("refused: {why}"),
        PortCheck::Silent(why) => format!("silent: {why}"),
    }
}

/// A worker's agent stream broke: if its distcc port is silent too, abort the builder's
/// connections to it. Runs again on every failed reconnect while the worker stays lost,
/// which also catches compiles that started connecting before the hosts file changed.
async fn confirm_and_cut(
    index: usize,
    entry: HostEntry,
    stream: String,
    bound: Duration,
    done: mpsc::Sender<Cut>,
) {
    let Some(distccd) = distccd_address(&entry).await else {
        let _ = done
            .send(Cut {
                index,
                distccd: SocketAddr::from(([0, 0, 0, 0], entry.port)),
                stream,
                port: PortCheck::Silent("name does not resolve".to_owned()),
                result: None,
            })
            .await;
        return;
    };
    let port = check_port(distccd, bound).await;
    let result = if port.confirms_loss() {
        Some(
            cut_connections(distccd, &CutScope::All)
                .await
                .map_err(|e| e.to_string()),
        )
    } else {
        None
    };
    let _ = done
        .send(Cut {
            index,
            distccd,
            stream,
            port,
            result,
        })
        .await;
}

/// The address of a hosts-file entry's distccd (what `ss -K` matches), if it resolves.
async fn distccd_address(entry: &HostEntry) -> Option<SocketAddr> {
    tokio::net::lookup_host((entry.host.as_str(), entry.port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
}

/// The outcome of aborting the connections to a worker judged slow.
struct SlowCut {
    index: usize,
    distccd: SocketAddr,
    reason: String,
    result: Result<usize, String>,
}

/// A worker just left the host list as slow: abort this builder's connections to it, so
/// the compiles in flight there fail over to local ones (as for a lost worker) instead of
/// holding the build back. The worker itself is fine; it only finishes late.
async fn cut_slow(
    index: usize,
    entry: HostEntry,
    reason: String,
    scope: CutScope,
    done: mpsc::Sender<SlowCut>,
) {
    let Some(distccd) = distccd_address(&entry).await else {
        return;
    };
    let result = cut_connections(distccd, &scope)
        .await
        .map_err(|e| e.to_string());
    let _ = done
        .send(SlowCut {
            index,
            distccd,
            reason,
            result,
        })
        .await;
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
    updates: mpsc::Sender<(usize, Probe)>,
) {
    let interval_ms = u32::try_from(config.interval.as_millis()).unwrap_or(u32::MAX);
    loop {
        let started = Instant::now();
        let failure = match tokio::time::timeout(
            config.deadline,
            connect(&endpoint, &config.access, config.deadline),
        )
        .await
        {
            Err(_) => format!("no answer within {:?}", config.deadline),
            Ok(Err(e)) => e,
            Ok(Ok(client)) => watch(index, &endpoint, client, interval_ms, &config, &updates).await,
        };
        let probe = Probe {
            endpoint: endpoint.clone(),
            status: Err(failure),
            latency: started.elapsed(),
            builder_addr: None,
        };
        if updates.send((index, probe)).await.is_err() {
            return;
        }
        // Retry soon: a worker that comes back should be used again within seconds.
        tokio::time::sleep(config.interval).await;
    }
}

/// Report statuses until the stream fails; returns why.
async fn watch(
    index: usize,
    endpoint: &str,
    mut client: Client,
    interval_ms: u32,
    config: &SteeringConfig,
    updates: &mpsc::Sender<(usize, Probe)>,
) -> String {
    let request = pb::WatchStatusRequest { interval_ms };
    let mut stream = match tokio::time::timeout(config.deadline, client.watch_status(request)).await
    {
        Err(_) => return format!("no answer within {:?}", config.deadline),
        Ok(Err(status)) => return status_text(&status),
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut builder_addr = None;
    loop {
        let started = Instant::now();
        let mut status = match tokio::time::timeout(config.stale_after(), stream.message()).await {
            Err(_) => return format!("no status for {:?}", config.stale_after()),
            Ok(Err(status)) => return status_text(&status),
            Ok(Ok(None)) => return "the agent ended the status stream".to_owned(),
            Ok(Ok(Some(status))) => untrusted::cleaned(status),
        };
        // The stream does not run compilers; a compiler it has not described yet (new or
        // changed binary) is described by one full Status call.
        if needs_compiler_refresh(&status, &config.local) {
            let full = client.status(pb::StatusRequest {
                skip_compilers: false,
            });
            if let Ok(Ok(response)) = tokio::time::timeout(config.deadline, full).await {
                status = untrusted::cleaned(response.into_inner());
            }
        }
        let port = status
            .settings
            .as_ref()
            .and_then(|s| u16::try_from(s.port).ok())
            .filter(|p| *p != 0)
            .unwrap_or(3632);
        if builder_addr.is_none() {
            builder_addr = source_address(endpoint, port).await;
        }
        let probe = Probe {
            endpoint: endpoint.to_owned(),
            status: Ok(status),
            latency: started.elapsed(),
            builder_addr,
        };
        if updates.send((index, probe)).await.is_err() {
            return "session ended".to_owned();
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
            // A reason whose figures changed ("slow: compiles take 19.0 s here, 1.5 s
            // ...") is the same decision: one line per change of kind, not per status.
            let kind = |reason: &Option<String>| {
                reason
                    .as_deref()
                    .map(|r| r.split(':').next().unwrap_or(r).to_owned())
            };
            if was.map(|w| (&w.entry, kind(&w.excluded_reason)))
                == Some((&now.entry, kind(&now.excluded_reason)))
            {
                return None;
            }
            Some(match (&now.entry, &now.excluded_reason) {
                (Some(entry), _) => format!("{}: in, {}", now.endpoint, entry.render()),
                (None, Some(reason)) => format!("{}: out, {reason}", now.endpoint),
                (None, None) => format!("{}: out", now.endpoint),
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
