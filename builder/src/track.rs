//! One worker followed over time: a state and a pure step, `on(event) -> actions`.
//! [`crate::steer`] feeds it what the network said and runs the actions (port checks,
//! cuts, log lines); every decision is taken here, without I/O, so it is tested as events
//! in, actions out.
//!
//! No false failover. A broken status stream alone never aborts a worker's connections:
//! - distccd's port still answers: the agent is restarting or being upgraded while
//!   distccd serves. The worker stays in the host list on its last status
//!   ([`TrackState::AgentAway`]) for [`AGENT_AWAY_GRACE`], then leaves it as unreachable;
//!   its connections are never aborted.
//! - distccd refuses: the machine is up and distccd is gone (the kernel already reset
//!   its connections): out, nothing to abort.
//! - distccd is silent but the agent's port answers or refuses: the machine is up and
//!   distccd's accept queue is full (a full backlog drops SYNs without a word) or a
//!   firewall drops them: out, connections kept, they belong to a live distccd.
//! - Both ports silent: the machine is gone ([`TrackState::Lost`]): abort the
//!   connections, again on every failed reconnect while it stays so (which catches
//!   compiles that started connecting before the hosts file changed).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::cluster::Probe;
use crate::exclusion::Exclusion;
use crate::failover::{MachinePorts, PortCheck};
use crate::host_list::Verdict;
use crate::host_list::{HostEntry, WorkerInput};
use crate::pace::PaceTracker;

/// How long a worker whose agent went away stays in the host list while distccd answers
/// (an agent restart takes a few seconds; a package upgrade, longer).
pub const AGENT_AWAY_GRACE: Duration = Duration::from_secs(30);

/// Where a worker stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackState {
    /// Statuses arrive; the worker is judged on the latest.
    Following,
    /// The stream broke and the machine's ports are being asked; judged on the last
    /// status meanwhile (a check takes at most the RPC deadline).
    Checking { why: String },
    /// The stream broke but distccd answers: kept on the last status until
    /// `since + AGENT_AWAY_GRACE`; never cut.
    AgentAway { why: String, since: Instant },
    /// Out of the host list, connections kept: the agent does not answer and the
    /// machine does (or never did answer since steering started).
    Unreachable { why: String },
    /// Nothing answers on any of the machine's ports: out, connections aborted.
    Lost { why: String },
}

/// Why connections are to be aborted.
#[derive(Debug, Clone, PartialEq)]
pub enum CutCause {
    /// Confirmed lost: every connection to it.
    Lost { why: String, ports: MachinePorts },
    /// Just judged slow: the connections of whoever asked for slow cuts.
    Slow { why: Exclusion },
}

/// What happened to one worker.
#[derive(Debug, Clone, PartialEq)]
pub enum TrackEvent {
    /// A status arrived (the probe's status is `Ok`); boxed, a status is large.
    Status(Box<Probe>),
    /// The stream errored, ended or stayed silent past its stale bound, or a reconnect
    /// failed.
    StreamBroke { why: String },
    /// The answer to [`TrackAction::CheckPorts`].
    PortsChecked { ports: MachinePorts, at: Instant },
    /// The answer to [`TrackAction::Cut`]: how many connections were aborted, or why not.
    CutDone {
        cause: CutCause,
        distccd: SocketAddr,
        result: Result<usize, String>,
    },
    /// The host list was recomputed; this is the worker's verdict in it.
    Judged(Verdict),
    /// Time passes (for the agent-away grace).
    Tick(Instant),
}

/// What steering is to do for one worker.
#[derive(Debug, Clone, PartialEq)]
pub enum TrackAction {
    /// Ask distccd's port (at `distccd`, where it last served) and the agent's port.
    CheckPorts { distccd: HostEntry },
    /// Abort connections to `distccd` (whose, the cause and the steering's policy say).
    Cut { distccd: HostEntry, cause: CutCause },
    /// A line for the steering log.
    Report(TrackReport),
}

/// Facts worth a log line (host-list changes are logged by steering itself).
#[derive(Debug, Clone, PartialEq)]
pub enum TrackReport {
    /// The stream broke while distccd answers: kept in the host list.
    AgentAway { why: String, distccd: SocketAddr },
    /// Statuses again after [`TrackReport::AgentAway`].
    AgentBack,
    /// The stream broke and distccd's port is silent, but the agent's port answers.
    MachineUp { why: String, ports: MachinePorts },
    /// Confirmed lost and the cut's outcome (first time, and whenever a cut found any).
    Lost {
        why: String,
        ports: MachinePorts,
        result: Result<usize, String>,
    },
    /// Left out as slow and the cut's outcome.
    SlowCut {
        why: Exclusion,
        distccd: SocketAddr,
        result: Result<usize, String>,
    },
}

/// One worker's track.
#[derive(Debug, Clone)]
pub struct Track {
    state: TrackState,
    /// The latest status (or the first failure, for a worker never reached).
    probe: Probe,
    /// Where distccd last served this builder: what to check and cut.
    last_entry: Option<HostEntry>,
    /// Whether the last verdict included the worker (a slow cut is for a worker that
    /// just left the list).
    included: bool,
    checking: bool,
    loss_reported: bool,
    pace: PaceTracker,
}

impl Track {
    /// From the first probe of the session.
    pub fn new(probe: Probe) -> Self {
        let state = match &probe.status {
            Ok(_) => TrackState::Following,
            Err(why) => TrackState::Unreachable { why: why.clone() },
        };
        let mut pace = PaceTracker::default();
        if let Ok(snapshot) = &probe.status {
            pace.observe(snapshot);
        }
        Self {
            state,
            probe,
            last_entry: None,
            included: false,
            checking: false,
            loss_reported: false,
            pace,
        }
    }

    pub fn state(&self) -> &TrackState {
        &self.state
    }

    pub fn endpoint(&self) -> &str {
        &self.probe.endpoint
    }

    /// What the host list judges the worker on, as of `now_usec` (for the pace).
    pub fn input(&self, now_usec: u64) -> WorkerInput<'_> {
        let mut input = self.probe.input();
        input.mean_job_secs = self.pace.mean_job_secs(now_usec);
        input.busy_secs_per_compile = self.pace.busy_secs_per_compile(now_usec);
        match &self.state {
            TrackState::Following | TrackState::Checking { .. } => {}
            TrackState::AgentAway { why, .. } => input.agent_away = Some(why),
            TrackState::Unreachable { why } | TrackState::Lost { why } => {
                input.status = Err(why);
            }
        }
        input
    }

    /// The worker as `status` shows it: the last status while it counts, else why not.
    pub fn probe(&self) -> Probe {
        let mut probe = self.probe.clone();
        if let TrackState::Unreachable { why } | TrackState::Lost { why } = &self.state {
            probe.status = Err(why.clone());
        }
        probe
    }

    /// One step.
    pub fn on(&mut self, event: TrackEvent) -> Vec<TrackAction> {
        match event {
            TrackEvent::Status(probe) => self.on_status(*probe),
            TrackEvent::StreamBroke { why } => self.on_broken(why),
            TrackEvent::PortsChecked { ports, at } => self.on_ports(ports, at),
            TrackEvent::CutDone {
                cause,
                distccd,
                result,
            } => self.on_cut(cause, distccd, result),
            TrackEvent::Judged(verdict) => self.on_verdict(verdict),
            TrackEvent::Tick(now) => {
                if let TrackState::AgentAway { why, since } = &self.state
                    && now.duration_since(*since) >= AGENT_AWAY_GRACE
                {
                    self.state = TrackState::Unreachable {
                        why: format!(
                            "{why}; distccd answered, but no agent for {}s",
                            AGENT_AWAY_GRACE.as_secs()
                        ),
                    };
                }
                Vec::new()
            }
        }
    }

    fn on_status(&mut self, probe: Probe) -> Vec<TrackAction> {
        let Ok(snapshot) = &probe.status else {
            let why = probe.status.err().unwrap_or_default();
            return self.on_broken(why);
        };
        self.pace.observe(snapshot);
        self.probe = probe;
        self.loss_reported = false;
        let was = std::mem::replace(&mut self.state, TrackState::Following);
        match was {
            TrackState::AgentAway { .. } => vec![TrackAction::Report(TrackReport::AgentBack)],
            _ => Vec::new(),
        }
    }

    fn on_broken(&mut self, why: String) -> Vec<TrackAction> {
        // Never served this builder: nothing to keep in the list, nothing to cut.
        let Some(entry) = self.last_entry.clone() else {
            self.state = TrackState::Unreachable { why };
            return Vec::new();
        };
        match &mut self.state {
            TrackState::Following => self.state = TrackState::Checking { why },
            // Keep the first reason (and the grace's start); later ones are reconnects.
            TrackState::Checking { .. } | TrackState::AgentAway { .. } => {}
            TrackState::Unreachable { why: old } | TrackState::Lost { why: old } => *old = why,
        }
        if self.checking {
            return Vec::new();
        }
        self.checking = true;
        vec![TrackAction::CheckPorts { distccd: entry }]
    }

    fn on_ports(&mut self, ports: MachinePorts, at: Instant) -> Vec<TrackAction> {
        self.checking = false;
        let why = match &self.state {
            // A status arrived while the ports were asked: nothing to decide.
            TrackState::Following => return Vec::new(),
            TrackState::Checking { why }
            | TrackState::AgentAway { why, .. }
            | TrackState::Unreachable { why }
            | TrackState::Lost { why } => why.clone(),
        };
        if ports.confirm_loss() {
            self.state = TrackState::Lost { why: why.clone() };
            let Some(entry) = self.last_entry.clone() else {
                return Vec::new();
            };
            return vec![TrackAction::Cut {
                distccd: entry,
                cause: CutCause::Lost { why, ports },
            }];
        }
        match (&self.state, &ports.distccd_check) {
            (TrackState::Checking { .. }, PortCheck::Answers) => {
                self.state = TrackState::AgentAway {
                    why: why.clone(),
                    since: at,
                };
                vec![TrackAction::Report(TrackReport::AgentAway {
                    why,
                    distccd: ports.distccd,
                })]
            }
            // Still serving while the agent stays away (the grace runs on ticks); after
            // the grace, or once lost, it does not come back without its agent.
            (
                TrackState::Following
                | TrackState::AgentAway { .. }
                | TrackState::Unreachable { .. },
                PortCheck::Answers,
            ) => Vec::new(),
            (TrackState::Lost { .. }, PortCheck::Answers) | (_, PortCheck::Refused(_)) => {
                self.state = TrackState::Unreachable { why };
                Vec::new()
            }
            (state, PortCheck::Silent(_)) => {
                let first = !matches!(state, TrackState::Unreachable { .. });
                self.state = TrackState::Unreachable { why: why.clone() };
                if first {
                    vec![TrackAction::Report(TrackReport::MachineUp { why, ports })]
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn on_cut(
        &mut self,
        cause: CutCause,
        distccd: SocketAddr,
        result: Result<usize, String>,
    ) -> Vec<TrackAction> {
        match cause {
            CutCause::Lost { why, ports } => {
                let found = matches!(result, Ok(n) if n > 0);
                if !found && self.loss_reported {
                    return Vec::new();
                }
                self.loss_reported = true;
                vec![TrackAction::Report(TrackReport::Lost {
                    why,
                    ports,
                    result,
                })]
            }
            CutCause::Slow { why } => vec![TrackAction::Report(TrackReport::SlowCut {
                why,
                distccd,
                result,
            })],
        }
    }

    fn on_verdict(&mut self, verdict: Verdict) -> Vec<TrackAction> {
        let was_included = std::mem::replace(
            &mut self.included,
            matches!(verdict, Verdict::Included { .. }),
        );
        match verdict {
            Verdict::Included { entry, .. } => {
                self.last_entry = Some(entry);
                Vec::new()
            }
            Verdict::Excluded(why @ Exclusion::Slow { .. }) if was_included => {
                match self.last_entry.clone() {
                    Some(entry) => vec![TrackAction::Cut {
                        distccd: entry,
                        cause: CutCause::Slow { why },
                    }],
                    None => Vec::new(),
                }
            }
            Verdict::Excluded(_) => Vec::new(),
        }
    }
}

/// The agent's real send period, from the gaps between its statuses' arrivals: a gap is
/// the requested interval plus the time the agent took to produce the status (its
/// status lanes queue under load) plus the transit.
///
/// A stream counts as dead after `deadline + 2 × period`, where `period` is the longest
/// of the last [`GAPS_KEPT`] gaps, at least the requested interval and at most
/// [`MAX_PERIOD_INTERVALS`] intervals (one stalled status must not blind the bound for
/// long: a broken stream only leads to port checks, never to a cut by itself). Twice the
/// period: one status may be late by a whole period without tripping it. With an
/// interval of 1 s and a 1 s deadline that is 3 s on an idle agent, and grows with the
/// agent's load.
#[derive(Debug, Clone, Default)]
pub struct SendPeriod {
    last_arrival: Option<Instant>,
    gaps: VecDeque<Duration>,
}

/// Gaps kept for the period.
pub const GAPS_KEPT: usize = 16;
/// The period counted is at most this many requested intervals.
pub const MAX_PERIOD_INTERVALS: u32 = 5;

impl SendPeriod {
    /// A new stream: the gap across a reconnect says nothing about the send period.
    pub fn restart(&mut self) {
        self.last_arrival = None;
    }

    pub fn observe(&mut self, arrived: Instant) {
        if let Some(last) = self.last_arrival {
            if self.gaps.len() == GAPS_KEPT {
                self.gaps.pop_front();
            }
            self.gaps.push_back(arrived.saturating_duration_since(last));
        }
        self.last_arrival = Some(arrived);
    }

    /// How long to wait for the next status before counting the stream as broken.
    pub fn stale_after(&self, interval: Duration, deadline: Duration) -> Duration {
        let longest = self.gaps.iter().max().copied().unwrap_or_default();
        let period = longest.clamp(interval, interval * MAX_PERIOD_INTERVALS);
        deadline + period * 2
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::snapshot::WorkerSnapshot;
    use distcc_proto::v1 as pb;

    const DISTCCD: &str = "198.18.3.12:3632";
    const AGENT: &str = "198.18.3.12:3634";

    fn entry() -> HostEntry {
        HostEntry {
            host: "198.18.3.12".into(),
            port: 3632,
            slots: 3,
            lzo: true,
        }
    }

    fn status_probe() -> Probe {
        Probe {
            endpoint: AGENT.into(),
            status: Ok(WorkerSnapshot::new(pb::WorkerStatus::default())),
            latency: Duration::ZERO,
            builder_addr: None,
        }
    }

    fn included() -> TrackEvent {
        TrackEvent::Judged(Verdict::Included {
            entry: entry(),
            warnings: Vec::new(),
        })
    }

    /// A worker followed and in the host list.
    fn following() -> Track {
        let mut track = Track::new(status_probe());
        assert_eq!(track.on(included()), []);
        track
    }

    fn ports(distccd: PortCheck, agent: PortCheck) -> MachinePorts {
        MachinePorts {
            distccd: DISTCCD.parse().unwrap(),
            distccd_check: distccd,
            agent: AGENT.parse().unwrap(),
            agent_check: agent,
        }
    }

    fn silent() -> PortCheck {
        PortCheck::Silent("no answer within 1s".into())
    }

    fn refused() -> PortCheck {
        PortCheck::Refused("Connection refused".into())
    }

    fn broke(why: &str) -> TrackEvent {
        TrackEvent::StreamBroke { why: why.into() }
    }

    fn checked(track: &mut Track, ports: MachinePorts, at: Instant) -> Vec<TrackAction> {
        track.on(TrackEvent::PortsChecked { ports, at })
    }

    fn check_ports() -> Vec<TrackAction> {
        vec![TrackAction::CheckPorts { distccd: entry() }]
    }

    fn excluded(track: &Track) -> bool {
        track.input(0).status.is_err()
    }

    #[test]
    fn loss_confirmed_when_no_port_answers_and_cut_again_on_every_reconnect() {
        let mut track = following();
        let at = Instant::now();
        assert_eq!(track.on(broke("no status for 3s")), check_ports());
        assert!(
            !excluded(&track),
            "judged on the last status while checking"
        );
        // A second break while the check runs asks nothing more.
        assert_eq!(track.on(broke("connect: timed out")), []);
        let gone = ports(silent(), silent());
        let cut = vec![TrackAction::Cut {
            distccd: entry(),
            cause: CutCause::Lost {
                why: "no status for 3s".into(),
                ports: gone.clone(),
            },
        }];
        assert_eq!(checked(&mut track, gone.clone(), at), cut);
        assert!(matches!(track.state(), TrackState::Lost { .. }));
        assert!(excluded(&track));
        // The cut is reported the first time even when it found nothing...
        let done = |n: usize| TrackEvent::CutDone {
            cause: CutCause::Lost {
                why: "no status for 3s".into(),
                ports: gone.clone(),
            },
            distccd: DISTCCD.parse().unwrap(),
            result: Ok(n),
        };
        assert!(matches!(
            track.on(done(0)).as_slice(),
            [TrackAction::Report(TrackReport::Lost { result: Ok(0), .. })]
        ));
        // ... then only when it found connections.
        assert_eq!(track.on(broke("connect: timed out")), check_ports());
        let again = ports(silent(), silent());
        assert!(matches!(
            checked(&mut track, again, at).as_slice(),
            [TrackAction::Cut { .. }]
        ));
        assert_eq!(track.on(done(0)), []);
        assert!(matches!(
            track.on(done(2)).as_slice(),
            [TrackAction::Report(TrackReport::Lost { result: Ok(2), .. })]
        ));
    }

    #[test]
    fn a_full_backlog_is_not_a_loss_when_the_agent_port_answers() {
        let mut track = following();
        assert_eq!(track.on(broke("no status for 3s")), check_ports());
        let actions = checked(&mut track, ports(silent(), refused()), Instant::now());
        assert!(
            matches!(
                actions.as_slice(),
                [TrackAction::Report(TrackReport::MachineUp { .. })]
            ),
            "{actions:?}"
        );
        assert!(matches!(track.state(), TrackState::Unreachable { .. }));
        assert!(excluded(&track), "a swamped distccd gets no new compiles");
        // Reported once; no cut on later checks either.
        assert_eq!(track.on(broke("connect: timed out")), check_ports());
        let actions = checked(
            &mut track,
            ports(silent(), PortCheck::Answers),
            Instant::now(),
        );
        assert_eq!(actions, []);
    }

    #[test]
    fn distccd_refusing_is_down_not_lost() {
        let mut track = following();
        track.on(broke("Unavailable: transport error"));
        assert_eq!(
            checked(&mut track, ports(refused(), refused()), Instant::now()),
            []
        );
        assert!(matches!(track.state(), TrackState::Unreachable { .. }));
        assert!(excluded(&track));
    }

    #[test]
    fn an_agent_restart_keeps_the_worker_and_never_cuts() {
        let mut track = following();
        let at = Instant::now();
        assert_eq!(
            track.on(broke("the agent ended the status stream")),
            check_ports()
        );
        let serving = ports(PortCheck::Answers, refused());
        assert_eq!(
            checked(&mut track, serving.clone(), at),
            [TrackAction::Report(TrackReport::AgentAway {
                why: "the agent ended the status stream".into(),
                distccd: DISTCCD.parse().unwrap(),
            })]
        );
        let input = track.input(0);
        assert!(input.status.is_ok(), "kept in the host list");
        assert_eq!(input.agent_away, Some("the agent ended the status stream"));
        // Reconnects fail while it restarts: checked again, still kept, no report.
        assert_eq!(
            track.on(broke("connect: Connection refused")),
            check_ports()
        );
        assert_eq!(
            checked(&mut track, serving, at + Duration::from_secs(1)),
            []
        );
        assert_eq!(track.on(TrackEvent::Tick(at + Duration::from_secs(5))), []);
        assert!(matches!(track.state(), TrackState::AgentAway { .. }));
        // Back: following again, said once.
        assert_eq!(
            track.on(TrackEvent::Status(Box::new(status_probe()))),
            [TrackAction::Report(TrackReport::AgentBack)]
        );
        assert_eq!(track.state(), &TrackState::Following);
        assert!(track.input(0).agent_away.is_none());
    }

    #[test]
    fn an_agent_away_past_the_grace_leaves_without_a_cut() {
        let mut track = following();
        let at = Instant::now();
        track.on(broke("the agent ended the status stream"));
        checked(&mut track, ports(PortCheck::Answers, refused()), at);
        assert_eq!(track.on(TrackEvent::Tick(at + AGENT_AWAY_GRACE)), []);
        assert!(excluded(&track));
        let why = track.input(0).status.unwrap_err().to_owned();
        assert!(why.contains("no agent for 30s"), "{why}");
        // distccd keeps answering: no cut, no way back without the agent.
        track.on(broke("connect: Connection refused"));
        assert_eq!(
            checked(&mut track, ports(PortCheck::Answers, refused()), at),
            []
        );
        assert!(excluded(&track));
        // The machine goes silent afterwards: then it is lost.
        track.on(broke("connect: timed out"));
        assert!(matches!(
            checked(&mut track, ports(silent(), silent()), at).as_slice(),
            [TrackAction::Cut { .. }]
        ));
    }

    #[test]
    fn recovery_after_a_loss_stops_the_cuts() {
        let mut track = following();
        let at = Instant::now();
        track.on(broke("no status for 3s"));
        checked(&mut track, ports(silent(), silent()), at);
        assert!(matches!(track.state(), TrackState::Lost { .. }));
        assert_eq!(track.on(TrackEvent::Status(Box::new(status_probe()))), []);
        assert_eq!(track.state(), &TrackState::Following);
        assert!(!excluded(&track));
        // A check that was in flight when the status came decides nothing.
        track.on(broke("no status for 3s"));
        assert_eq!(track.on(TrackEvent::Status(Box::new(status_probe()))), []);
        assert_eq!(checked(&mut track, ports(silent(), silent()), at), []);
        assert_eq!(track.state(), &TrackState::Following);
    }

    #[test]
    fn a_worker_never_in_the_list_is_neither_checked_nor_cut() {
        let mut track = Track::new(Probe {
            status: Err("connect: refused".into()),
            ..status_probe()
        });
        assert!(excluded(&track));
        assert_eq!(track.on(broke("connect: refused")), []);
        assert_eq!(track.probe().status.unwrap_err(), "connect: refused");
    }

    #[test]
    fn leaving_as_slow_cuts_once() {
        let mut track = following();
        let slow = Exclusion::Slow {
            mean_secs: 95.0,
            others_secs: 1.9,
        };
        let judged_slow = || TrackEvent::Judged(Verdict::Excluded(slow.clone()));
        assert_eq!(
            track.on(judged_slow()),
            [TrackAction::Cut {
                distccd: entry(),
                cause: CutCause::Slow { why: slow.clone() },
            }]
        );
        assert_eq!(track.on(judged_slow()), [], "already out: no second cut");
        assert_eq!(track.on(included()), []);
        let other = TrackEvent::Judged(Verdict::Excluded(Exclusion::NoSlots));
        assert_eq!(track.on(other), [], "only a slow verdict cuts");
        let done = track.on(TrackEvent::CutDone {
            cause: CutCause::Slow { why: slow.clone() },
            distccd: DISTCCD.parse().unwrap(),
            result: Ok(3),
        });
        assert!(matches!(
            done.as_slice(),
            [TrackAction::Report(TrackReport::SlowCut {
                result: Ok(3),
                ..
            })]
        ));
    }

    #[test]
    fn the_stale_bound_follows_the_agents_real_period() {
        let (interval, deadline) = (Duration::from_secs(1), Duration::from_secs(1));
        let mut period = SendPeriod::default();
        assert_eq!(
            period.stale_after(interval, deadline),
            Duration::from_secs(3)
        );
        let start = Instant::now();
        let mut at = start;
        for gap_ms in [1000, 1010, 990] {
            at += Duration::from_millis(gap_ms);
            period.observe(at);
        }
        // The first arrival gives no gap; an idle agent keeps the 3 s.
        assert_eq!(
            period.stale_after(interval, deadline),
            Duration::from_millis(1000 + 2 * 1010)
        );
        // A loaded agent takes 1.8 s per status: 4.6 s.
        at += Duration::from_millis(1800);
        period.observe(at);
        assert_eq!(
            period.stale_after(interval, deadline),
            Duration::from_millis(4600)
        );
        // A reconnect's gap does not count; a huge gap is capped at 5 intervals.
        period.restart();
        period.observe(at + Duration::from_secs(60));
        assert_eq!(
            period.stale_after(interval, deadline),
            Duration::from_millis(4600)
        );
        period.observe(at + Duration::from_secs(120));
        assert_eq!(
            period.stale_after(interval, deadline),
            Duration::from_secs(11)
        );
        // Old gaps age out.
        let mut last = at + Duration::from_secs(120);
        for _ in 0..GAPS_KEPT {
            last += interval;
            period.observe(last);
        }
        assert_eq!(
            period.stale_after(interval, deadline),
            Duration::from_secs(3)
        );
    }
}
