//! `builderctl daemon`, the one privileged part of the build node
//! (`distcc-builder.service`, user `distcc-builder` with CAP_NET_ADMIN only): it follows
//! every worker once for the whole machine (`crate::steer`), keeps `/etc/distcc/hosts`,
//! aborts the machine's connections to a worker confirmed lost (failover for every build,
//! `enter` or not), and serves sessions over the session socket
//! (`crate::session_socket`): their steering events, their workspace
//! (`distcc-workspace@USER.service`, started through systemd), a snapshot for `status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast, watch};

use crate::config::valid_user_name;
use crate::session_socket::{
    DaemonError, ErrorKind, EventKind, EventLine, Failover, Left, OpenedSession, Peer,
    SessionHandler, SessionOpened, Snapshot, WorkspaceReady,
};
use crate::steer::{SteeringEvent, Survey};
use crate::workspace::{self, Prepared};

/// How many steering lines a session may fall behind before it is told it missed some.
const EVENT_BACKLOG: usize = 256;

/// CAP_NET_ADMIN's bit in the capability sets (linux/capability.h).
pub const CAP_NET_ADMIN: u32 = 12;

/// Whether the capability set `CapEff:` of `/proc/PID/status` text has `bit`.
pub fn cap_eff_has(status: &str, bit: u32) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let set = u64::from_str_radix(hex, 16).ok()?;
    Some(set & (1u64 << bit) != 0)
}

/// Whether this process can abort connections (`ss -K` needs CAP_NET_ADMIN).
pub fn failover_readiness() -> Failover {
    match std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| cap_eff_has(&text, CAP_NET_ADMIN))
    {
        Some(true) => Failover::Armed,
        Some(false) => Failover::NotArmed(
            "the builder daemon lacks CAP_NET_ADMIN (AmbientCapabilities=CAP_NET_ADMIN in \
             distcc-builder.service), so it cannot abort connections to a lost worker"
                .to_owned(),
        ),
        None => Failover::NotArmed("cannot read CapEff in /proc/self/status".to_owned()),
    }
}

/// What the daemon serves, besides the steering itself.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// The hosts file the steering keeps.
    pub hosts_file: PathBuf,
    /// Where `distcc-workspace@USER.service` mounts USER's workspace.
    pub user_workspaces: PathBuf,
    /// Whether this daemon can abort connections (see [`failover_readiness`]).
    pub failover: Failover,
}

/// The daemon's shared state: sessions, their events, the latest survey of the workers.
pub struct Daemon {
    settings: DaemonSettings,
    events: broadcast::Sender<EventLine>,
    /// Every worker's latest status and the host list, published by the steering after
    /// each batch (`SteeringConfig::survey`): what sessions start from and what
    /// `snapshot` answers, without an RPC of its own.
    survey: watch::Sender<Arc<Survey>>,
    /// Open sessions per uid, and how many of them asked for slow-worker cuts.
    sessions: Mutex<BTreeMap<u32, SessionCount>>,
    /// The uids whose sessions asked for slow-worker cuts (for the steering's cut policy).
    slow_cut_uids: watch::Sender<std::collections::BTreeSet<u32>>,
    /// Signalled whenever the sessions or the host list change (sd-notify STATUS).
    changed: Notify,
}

#[derive(Debug, Default, Clone, Copy)]
struct SessionCount {
    open: usize,
    cut_slow: usize,
}

impl Daemon {
    /// `survey`: the workers as first probed (the steering updates it).
    pub fn new(settings: DaemonSettings, survey: Survey) -> Arc<Daemon> {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Arc::new(Daemon {
            settings,
            events,
            survey: watch::Sender::new(Arc::new(survey)),
            sessions: Mutex::new(BTreeMap::new()),
            slow_cut_uids: watch::Sender::new(Default::default()),
            changed: Notify::new(),
        })
    }

    /// Called by the steering for every event: the journal, every session, the STATUS.
    pub fn on_event(&self, event: &SteeringEvent<'_>) {
        let kind = event_kind(event);
        for line in event.describe() {
            tracing::info!(kind = event.kind(), "{line}");
            // No session open is not an error.
            let _ = self.events.send(EventLine { kind, line });
        }
        if let SteeringEvent::HostsChanged { .. } = event {
            self.changed.notify_one();
        }
    }

    /// Where the steering publishes its survey (`SteeringConfig::survey`).
    pub fn survey_sender(&self) -> watch::Sender<Arc<Survey>> {
        self.survey.clone()
    }

    /// The uids whose sessions asked for slow-worker cuts, as they change.
    pub fn slow_cut_uids(&self) -> watch::Receiver<std::collections::BTreeSet<u32>> {
        self.slow_cut_uids.subscribe()
    }

    /// Wait for a change of the sessions or of the host list.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    pub fn session_count(&self) -> usize {
        self.lock_sessions().values().map(|c| c.open).sum()
    }

    /// For sd-notify's STATUS and the journal.
    pub fn describe(&self) -> String {
        let survey = self.survey.borrow().clone();
        let list = &survey.list;
        let sessions = self.session_count();
        format!(
            "{} of {} workers, {} slots in {}; {} session{}; failover {}",
            list.included().count(),
            list.workers.len(),
            list.total_slots(),
            self.settings.hosts_file.display(),
            sessions,
            if sessions == 1 { "" } else { "s" },
            match &self.settings.failover {
                Failover::Armed => "armed",
                Failover::NotArmed(_) => "NOT armed",
            }
        )
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, SessionCount>> {
        // A panic elsewhere must not take the session table with it.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn session_started(self: &Arc<Self>, uid: u32, cut_slow: bool) -> SessionGuard {
        let mut sessions = self.lock_sessions();
        let count = sessions.entry(uid).or_default();
        count.open += 1;
        count.cut_slow += usize::from(cut_slow);
        self.publish_slow_cut_uids(&sessions);
        drop(sessions);
        self.changed.notify_one();
        SessionGuard {
            daemon: self.clone(),
            uid,
            cut_slow,
        }
    }

    fn session_ended(&self, uid: u32, cut_slow: bool) {
        let mut sessions = self.lock_sessions();
        if let Some(count) = sessions.get_mut(&uid) {
            count.open = count.open.saturating_sub(1);
            count.cut_slow = count.cut_slow.saturating_sub(usize::from(cut_slow));
            if count.open == 0 {
                sessions.remove(&uid);
            }
        }
        self.publish_slow_cut_uids(&sessions);
        drop(sessions);
        self.changed.notify_one();
    }

    fn publish_slow_cut_uids(&self, sessions: &BTreeMap<u32, SessionCount>) {
        let uids = sessions
            .iter()
            .filter(|(_, c)| c.cut_slow > 0)
            .map(|(uid, _)| *uid)
            .collect();
        self.slow_cut_uids.send_if_modified(|current| {
            let changed = *current != uids;
            *current = uids;
            changed
        });
    }

    /// The user a workspace request is for: the peer's, never a name from the request.
    fn workspace_user<'p>(&self, peer: &'p Peer) -> Result<&'p str, DaemonError> {
        if peer.uid == 0 {
            return Err(DaemonError::new(
                ErrorKind::NotApplicable,
                "root's sessions mount their own `workspace` (builder.toml)",
            ));
        }
        match peer.user.as_deref() {
            Some(name) if valid_user_name(name) => Ok(name),
            Some(name) => Err(DaemonError::new(
                ErrorKind::NotApplicable,
                format!("user name {name:?} cannot name a workspace unit"),
            )),
            None => Err(DaemonError::new(
                ErrorKind::NotApplicable,
                format!("uid {} has no user name", peer.uid),
            )),
        }
    }
}

/// The protocol's kind of a steering event (its serde name is `SteeringEvent::kind`).
pub fn event_kind(event: &SteeringEvent<'_>) -> EventKind {
    match event {
        SteeringEvent::HostsChanged { .. } => EventKind::HostsChanged,
        SteeringEvent::ConnectionsCut { .. } => EventKind::Lost,
        SteeringEvent::SlowCut { .. } => EventKind::SlowCut,
        SteeringEvent::AgentAway { .. } => EventKind::AgentAway,
        SteeringEvent::AgentBack { .. } => EventKind::AgentBack,
        SteeringEvent::MachineUp { .. } => EventKind::MachineUp,
        SteeringEvent::StragglerRedo { .. } => EventKind::StragglerRedo,
    }
}

/// Lives as long as one session's connection.
struct SessionGuard {
    daemon: Arc<Daemon>,
    uid: u32,
    cut_slow: bool,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.daemon.session_ended(self.uid, self.cut_slow);
    }
}

/// The workspace unit of `user` (the polkit rule allows exactly these names).
pub fn workspace_unit(user: &str) -> String {
    format!("distcc-workspace@{user}.service")
}

/// `systemctl --no-ask-password VERB UNIT`; stderr when it fails.
async fn systemctl(verb: &str, unit: &str) -> Result<(), String> {
    let output = tokio::process::Command::new("systemctl")
        .args(["--no-ask-password", verb, unit])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "systemctl {verb} {unit}: {} ({})",
            String::from_utf8_lossy(&output.stderr).trim(),
            output.status
        ))
    }
}

fn is_tmpfs(path: &Path) -> bool {
    workspace::mounted_fstype(path).is_ok_and(|t| t.as_deref() == Some("tmpfs"))
}

impl SessionHandler for Arc<Daemon> {
    async fn open_session(
        &self,
        peer: &Peer,
        cut_slow: bool,
    ) -> Result<OpenedSession, DaemonError> {
        // Subscribe before reading the host list: no change falls between the two.
        let events = self.events.subscribe();
        let guard = self.session_started(peer.uid, cut_slow);
        tracing::info!(
            uid = peer.uid,
            pid = peer.pid,
            cut_slow,
            "session opened ({})",
            self.describe()
        );
        Ok(OpenedSession {
            reply: SessionOpened {
                hosts_file: self.settings.hosts_file.clone(),
                failover: self.settings.failover.clone(),
                host_list: self.survey.borrow().list.clone(),
            },
            events,
            guard: Box::new(guard),
        })
    }

    async fn workspace(&self, peer: &Peer) -> Result<WorkspaceReady, DaemonError> {
        let user = self.workspace_user(peer)?;
        let path = self.settings.user_workspaces.join(user);
        let was_mounted = is_tmpfs(&path);
        systemctl("start", &workspace_unit(user))
            .await
            .map_err(|e| DaemonError::new(ErrorKind::MountFailed, e))?;
        // The unit's mount is the host's; this namespace sees it by propagation.
        if !is_tmpfs(&path) {
            return Err(DaemonError::new(
                ErrorKind::MountFailed,
                format!(
                    "{} started but {} is not a tmpfs (journalctl -u {})",
                    workspace_unit(user),
                    path.display(),
                    workspace_unit(user)
                ),
            ));
        }
        tracing::info!(uid = peer.uid, "workspace {} ready", path.display());
        Ok(WorkspaceReady {
            path,
            mounted: if was_mounted {
                Prepared::Reused
            } else {
                Prepared::Mounted
            },
        })
    }

    async fn leave(&self, peer: &Peer) -> Result<Left, DaemonError> {
        let user = self.workspace_user(peer)?;
        let path = self.settings.user_workspaces.join(user);
        if !is_tmpfs(&path) {
            return Err(DaemonError::new(
                ErrorKind::NotMounted,
                format!("{} is not mounted", path.display()),
            ));
        }
        // The unit's ExecStop unmounts without MNT_DETACH: the kernel refuses while
        // anything uses the workspace, and the mount stays (whatever systemctl says; the
        // unit is then failed). Started first, so that a unit left failed by such a stop
        // (inactive, its mount still there) runs its ExecStop again; starting an active
        // unit does nothing, and a start over the mount reuses it.
        let unit = workspace_unit(user);
        let stopped = match systemctl("start", &unit).await {
            Ok(()) => systemctl("stop", &unit).await,
            Err(e) => Err(e),
        };
        if is_tmpfs(&path) {
            return Err(DaemonError::new(
                ErrorKind::InUse,
                format!(
                    "{} is in use; leave the shells and builds in it first{}",
                    path.display(),
                    stopped.err().map(|e| format!(" ({e})")).unwrap_or_default()
                ),
            ));
        }
        tracing::info!(uid = peer.uid, "workspace {} unmounted", path.display());
        Ok(Left { path })
    }

    async fn snapshot(&self, _peer: &Peer) -> Result<Snapshot, DaemonError> {
        // The steering's latest: no RPC per request, one stream per worker in all.
        let survey = self.survey.borrow().clone();
        Ok(Snapshot {
            workers: survey.views(),
            host_list: survey.list.clone(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::cluster::Probe;
    use crate::host_list::HostList;
    use std::time::Duration;

    fn survey(local_slots: u32) -> Survey {
        Survey {
            probes: vec![Probe {
                endpoint: "198.18.0.12:3634".into(),
                status: Err("no answer within 1s".into()),
                latency: Duration::from_millis(1000),
                builder_addr: None,
            }],
            list: HostList {
                workers: Vec::new(),
                local_slots,
            },
        }
    }

    fn daemon() -> Arc<Daemon> {
        Daemon::new(
            DaemonSettings {
                hosts_file: "/etc/distcc/hosts".into(),
                user_workspaces: "/run/distcc-workspaces".into(),
                failover: Failover::Armed,
            },
            survey(2),
        )
    }

    #[test]
    fn net_admin_is_read_from_cap_eff() {
        let status = "Name:\tbuilderctl\nCapInh:\t0000000000000000\nCapPrm:\t0000000000001000\nCapEff:\t0000000000001000\n";
        assert_eq!(cap_eff_has(status, CAP_NET_ADMIN), Some(true));
        assert_eq!(
            cap_eff_has("CapEff:\t00000000a80425fb\n", CAP_NET_ADMIN),
            Some(false)
        );
        assert_eq!(
            cap_eff_has("CapEff:\t000001ffffffffff\n", CAP_NET_ADMIN),
            Some(true)
        );
        assert_eq!(cap_eff_has("Name:\tx\n", CAP_NET_ADMIN), None);
    }

    #[tokio::test]
    async fn sessions_are_counted_and_slow_cuts_follow_the_sessions_that_asked() {
        let d = daemon();
        let slow = d.slow_cut_uids();
        let peer = |uid| Peer {
            uid,
            gid: uid,
            pid: None,
            user: Some(format!("u{uid}")),
        };
        let a = d.open_session(&peer(1000), true).await.unwrap();
        let b = d.open_session(&peer(1000), false).await.unwrap();
        let c = d.open_session(&peer(1001), false).await.unwrap();
        assert_eq!(d.session_count(), 3);
        assert!(
            d.describe().contains("; 3 sessions; failover armed"),
            "{}",
            d.describe()
        );
        assert_eq!(*slow.borrow(), [1000].into());
        drop(a.guard);
        assert_eq!(*slow.borrow(), Default::default());
        drop((b, c));
        assert_eq!(d.session_count(), 0);
    }

    #[tokio::test]
    async fn events_reach_every_session_and_sessions_start_from_the_latest_survey() {
        let d = daemon();
        let peer = Peer {
            uid: 0,
            gid: 0,
            pid: None,
            user: None,
        };
        let snapshot = d.snapshot(&peer).await.unwrap();
        assert_eq!(snapshot.workers.len(), 1);
        assert!(!snapshot.workers[0].reachable);
        let mut one = d.open_session(&peer, false).await.unwrap();
        assert_eq!(one.reply.host_list.local_slots, 2);
        let result = Err("ss -K failed".to_owned());
        d.on_event(&SteeringEvent::ConnectionsCut {
            endpoint: "198.18.0.12:3634",
            distccd: "198.18.0.12:3632".parse().unwrap(),
            stream: "no status for 3s",
            port: "silent",
            result: &result,
        });
        let event = one.events.recv().await.unwrap();
        assert_eq!(event.kind, EventKind::Lost);
        assert!(
            event.line.starts_with("198.18.0.12:3634: lost"),
            "{}",
            event.line
        );
        // The protocol's names are the steering's own.
        let cut = SteeringEvent::ConnectionsCut {
            endpoint: "",
            distccd: "198.18.0.12:3632".parse().unwrap(),
            stream: "",
            port: "",
            result: &result,
        };
        let list = HostList {
            workers: Vec::new(),
            local_slots: 2,
        };
        let changed = SteeringEvent::HostsChanged {
            before: &list,
            after: &list,
        };
        let slow = SteeringEvent::SlowCut {
            endpoint: "",
            distccd: "198.18.0.12:3632".parse().unwrap(),
            reason: "",
            result: &result,
        };
        let away = SteeringEvent::AgentAway {
            endpoint: "",
            distccd: "198.18.0.12:3632".parse().unwrap(),
            why: "",
        };
        let back = SteeringEvent::AgentBack { endpoint: "" };
        let machine = SteeringEvent::MachineUp {
            endpoint: "",
            why: "",
            ports: "",
        };
        for event in [cut, changed, slow, away, back, machine] {
            assert_eq!(
                crate::session_socket::encode(&event_kind(&event)).trim(),
                format!("\"{}\"", event.kind())
            );
        }
        // A new session starts from the steering's latest survey.
        d.survey_sender().send_replace(Arc::new(survey(4)));
        let two = d.open_session(&peer, false).await.unwrap();
        assert_eq!(two.reply.host_list.local_slots, 4);
        assert_eq!(d.snapshot(&peer).await.unwrap().host_list.local_slots, 4);
    }

    #[test]
    fn workspaces_are_the_peers_own() {
        let d = daemon();
        let peer = |uid, user: Option<&str>| Peer {
            uid,
            gid: uid,
            pid: None,
            user: user.map(str::to_owned),
        };
        assert_eq!(
            d.workspace_user(&peer(1000, Some("alice"))).unwrap(),
            "alice"
        );
        for p in [
            peer(0, Some("root")),
            peer(1000, None),
            peer(1000, Some("Bad Name")),
        ] {
            assert_eq!(
                d.workspace_user(&p).unwrap_err().kind,
                ErrorKind::NotApplicable,
                "{p:?}"
            );
        }
        assert_eq!(workspace_unit("alice"), "distcc-workspace@alice.service");
    }
}
