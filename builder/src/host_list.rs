//! Which workers this builder sends compiles to, and why the others are left out.
//!
//! Pure: the caller gathers each worker's status, the source address the builder uses to
//! reach it and the local compilers; [`HostList::compute`] decides, and
//! [`HostList::render`] writes distcc's hosts-file syntax (`HOST:PORT/LIMIT,lzo`).

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::exclusion::{CompilerProblem, Exclusion, ExclusionKind, ListenProblem};
use crate::pace::{median, slow_share, slowness, speed_share};
use crate::snapshot::WorkerSnapshot;
use crate::untrusted::printable;

/// The most slots one worker gets, whatever it claims: the agent's own ceiling on
/// distccd's `--jobs`. `make -j` is the sum over the workers, so a worker announcing
/// billions of slots must not make the builder fork that many compiles.
pub const MAX_WORKER_SLOTS: u32 = 1024;

/// Longest excluded reason written into the hosts file (a worker's allowlist or compiler
/// strings can be long); the full reason is in `builderctl hosts`.
const MAX_REASON_CHARS: usize = 300;

/// A compiler on the builder, described the way the agent describes a worker's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalCompiler {
    /// Masquerade name, e.g. `gcc`.
    pub name: String,
    /// First line of `--version`.
    pub version: String,
    /// `-dumpmachine`.
    pub target: String,
    /// sha256 of the real binary, hex.
    pub fingerprint: String,
}

/// What the builder knows about one worker.
#[derive(Debug, Clone)]
pub struct WorkerInput<'a> {
    /// The agent endpoint as configured (`host:port`).
    pub endpoint: &'a str,
    /// The worker's status, or why it could not be had.
    pub status: Result<&'a WorkerSnapshot, &'a str>,
    /// The source address this builder uses to reach the worker (what distccd's allowlist
    /// sees); `None` when there is no route.
    pub builder_addr: Option<IpAddr>,
    /// Mean seconds a compile spends at this worker, when steering has measured it
    /// ([`crate::pace`]); compared with the other workers' to leave stragglers out.
    pub mean_job_secs: Option<f64>,
    /// Busy seconds per finished compile ([`crate::pace`]): the worker's throughput,
    /// compared with the other workers' to weigh its slots.
    pub busy_secs_per_compile: Option<f64>,
    /// Set when `status` is the last one before the agent's stream broke while distccd
    /// still serves (see [`crate::track`]): the worker is judged on it, with this warning.
    pub agent_away: Option<&'a str>,
}

/// Choices that are the operator's, not the workers'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Include workers whose compilers differ from the builder's (with a warning).
    pub allow_mismatch: bool,
    /// Slots for `localhost` (compiles on the builder itself); 0 leaves it out.
    pub local_slots: u32,
    /// Compress in transit to remote workers (never to loopback ones).
    pub lzo: bool,
}

/// One line of the hosts file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// Address or name distcc connects to.
    pub host: String,
    pub port: u16,
    pub slots: u32,
    /// Compress with LZO: pays on a real network, only costs CPU on loopback.
    pub lzo: bool,
}

impl HostEntry {
    /// distcc's syntax: `HOST:PORT/LIMIT[,lzo]`.
    pub fn render(&self) -> String {
        let mut line = format!("{}:{}/{}", self.host, self.port, self.slots);
        if self.lzo {
            line.push_str(",lzo");
        }
        line
    }
}

/// In the host list (with what is worth knowing) or out, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Included {
        entry: HostEntry,
        /// Included despite something worth knowing (a compiler mismatch with
        /// `allow_mismatch`, fewer slots than distccd has...).
        warnings: Vec<String>,
    },
    Excluded(Exclusion),
}

/// The decision about one worker. Serialised flat, as `hosts --json` writes it:
/// `endpoint`, `entry` (null when excluded), `excluded_reason` and `excluded_kind` (null
/// when included), `warnings`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerVerdict {
    pub endpoint: String,
    pub verdict: Verdict,
}

impl WorkerVerdict {
    /// The hosts-file entry; `None` when excluded.
    pub fn entry(&self) -> Option<&HostEntry> {
        match &self.verdict {
            Verdict::Included { entry, .. } => Some(entry),
            Verdict::Excluded(_) => None,
        }
    }

    /// Why the worker is excluded; `None` when included.
    pub fn exclusion(&self) -> Option<&Exclusion> {
        match &self.verdict {
            Verdict::Included { .. } => None,
            Verdict::Excluded(why) => Some(why),
        }
    }

    pub fn excluded_kind(&self) -> Option<ExclusionKind> {
        self.exclusion().map(Exclusion::kind)
    }

    /// The text of [`Self::exclusion`].
    pub fn excluded_reason(&self) -> Option<String> {
        self.exclusion().map(Exclusion::to_string)
    }

    pub fn warnings(&self) -> &[String] {
        match &self.verdict {
            Verdict::Included { warnings, .. } => warnings,
            Verdict::Excluded(_) => &[],
        }
    }
}

impl Serialize for WorkerVerdict {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Flat<'a> {
            endpoint: &'a str,
            entry: Option<&'a HostEntry>,
            excluded_reason: Option<String>,
            excluded_kind: Option<ExclusionKind>,
            warnings: &'a [String],
        }
        Flat {
            endpoint: &self.endpoint,
            entry: self.entry(),
            excluded_reason: self.excluded_reason(),
            excluded_kind: self.excluded_kind(),
            warnings: self.warnings(),
        }
        .serialize(serializer)
    }
}

/// The flat form back (what the builder daemon sends over the session socket): an
/// excluded worker's verdict is [`Exclusion::Reported`], with the kind and text as sent.
impl<'de> Deserialize<'de> for WorkerVerdict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Flat {
            endpoint: String,
            entry: Option<HostEntry>,
            excluded_reason: Option<String>,
            excluded_kind: Option<ExclusionKind>,
            #[serde(default)]
            warnings: Vec<String>,
        }
        let flat = Flat::deserialize(deserializer)?;
        let verdict = match (flat.entry, flat.excluded_kind) {
            (Some(entry), None) => Verdict::Included {
                entry,
                warnings: flat.warnings,
            },
            (None, Some(kind)) => Verdict::Excluded(Exclusion::Reported {
                kind,
                reason: flat.excluded_reason.unwrap_or_default(),
            }),
            (Some(_), Some(_)) => {
                return Err(serde::de::Error::custom(
                    "a worker both in (entry) and out (excluded_kind)",
                ));
            }
            (None, None) => {
                return Err(serde::de::Error::custom(
                    "a worker neither in (entry) nor out (excluded_kind)",
                ));
            }
        };
        Ok(WorkerVerdict {
            endpoint: flat.endpoint,
            verdict,
        })
    }
}

/// The host list of one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostList {
    /// In configuration order.
    pub workers: Vec<WorkerVerdict>,
    pub local_slots: u32,
}

impl HostList {
    pub fn compute(inputs: &[WorkerInput<'_>], local: &[LocalCompiler], policy: &Policy) -> Self {
        let workers = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| (input, Others::of(inputs, i)))
            .map(|(input, others)| WorkerVerdict {
                endpoint: input.endpoint.to_owned(),
                verdict: match decide(input, local, policy, &others) {
                    Ok((entry, warnings)) => Verdict::Included { entry, warnings },
                    Err(why) => Verdict::Excluded(why),
                },
            })
            .collect();
        Self {
            workers,
            local_slots: policy.local_slots,
        }
    }

    pub fn included(&self) -> impl Iterator<Item = &HostEntry> {
        self.workers.iter().filter_map(WorkerVerdict::entry)
    }

    /// Remote slots only: what `make -j` should use (local compiles are preprocessing's
    /// competition, not extra capacity).
    pub fn remote_slots(&self) -> u32 {
        self.included()
            .fold(0, |sum: u32, e| sum.saturating_add(e.slots))
    }

    /// All slots, `localhost` included.
    pub fn total_slots(&self) -> u32 {
        self.remote_slots().saturating_add(self.local_slots)
    }

    pub fn verdict(&self, endpoint: &str) -> Option<&WorkerVerdict> {
        self.workers.iter().find(|w| w.endpoint == endpoint)
    }

    /// The hosts file: a comment per excluded worker, then the workers (distcc fills slot 0
    /// of every host before slot 1, so order matters little), then `localhost/N` last so
    /// local compiles only take what the workers leave.
    pub fn render(&self) -> String {
        let mut text = String::from("# written by builderctl; rewritten as workers change\n");
        for w in &self.workers {
            if let Some(reason) = w.excluded_reason() {
                text.push_str(&format!(
                    "# excluded {}: {}\n",
                    printable(&w.endpoint),
                    bounded(&printable(&reason), MAX_REASON_CHARS)
                ));
            }
        }
        let mut hosts: Vec<String> = self.included().map(HostEntry::render).collect();
        if self.local_slots > 0 {
            hosts.push(format!("localhost/{}", self.local_slots));
        }
        text.push_str(&hosts.join(" "));
        text.push('\n');
        text
    }

    /// For people: like `distcc --show-hosts`, with the reason for each worker left out.
    pub fn explain(&self) -> String {
        let mut text = String::new();
        for w in &self.workers {
            match &w.verdict {
                Verdict::Included { entry, warnings } => {
                    text.push_str(&format!("{:<28} # {}\n", entry.render(), w.endpoint));
                    for warning in warnings {
                        text.push_str(&format!("{:<28} #   warning: {}\n", "", printable(warning)));
                    }
                }
                Verdict::Excluded(why) => text.push_str(&format!(
                    "{:<28} # {} excluded: {}\n",
                    "-",
                    w.endpoint,
                    printable(&why.to_string())
                )),
            }
        }
        if self.local_slots > 0 {
            text.push_str(&format!(
                "{:<28} # this builder\n",
                format!("localhost/{}", self.local_slots)
            ));
        }
        text.push_str(&format!("# {} slots in total\n", self.total_slots()));
        text
    }
}

/// At most `max` characters of `text`, with an ellipsis when cut.
fn bounded(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}...", &text[..cut]),
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn endpoint_host(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// What one worker is compared with: the medians of the other reachable workers' pace
/// figures (see [`crate::pace`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Others {
    pub mean_job_secs: Option<f64>,
    pub busy_secs_per_compile: Option<f64>,
}

impl Others {
    /// The medians over every reachable worker but `index`.
    pub fn of(inputs: &[WorkerInput<'_>], index: usize) -> Self {
        let median_of = |figure: fn(&WorkerInput<'_>) -> Option<f64>| {
            let mut others: Vec<f64> = inputs
                .iter()
                .enumerate()
                .filter(|(j, other)| *j != index && other.status.is_ok())
                .filter_map(|(_, other)| figure(other))
                .filter(|m| *m > 0.0)
                .collect();
            median(&mut others)
        };
        Self {
            mean_job_secs: median_of(|w| w.mean_job_secs),
            busy_secs_per_compile: median_of(|w| w.busy_secs_per_compile),
        }
    }
}

fn decide(
    input: &WorkerInput<'_>,
    local: &[LocalCompiler],
    policy: &Policy,
    others: &Others,
) -> Result<(HostEntry, Vec<String>), Exclusion> {
    let worker = input.status.map_err(|why| Exclusion::Unreachable {
        why: why.to_owned(),
    })?;
    let (active_state, sub_state) = worker.unit_state();
    if active_state != "active" {
        return Err(Exclusion::Inactive {
            active_state: active_state.to_owned(),
            sub_state: sub_state.to_owned(),
        });
    }
    let host = distcc_host(input.endpoint, worker.listen()).map_err(Exclusion::BadListen)?;
    let port = worker
        .distccd_port()
        .map_err(|port| Exclusion::BadPort { port })?;
    let builder_addr = input
        .builder_addr
        .ok_or_else(|| Exclusion::NoRoute { host: host.clone() })?;
    let allow = worker.allow();
    if !admits(allow, builder_addr) {
        return Err(Exclusion::NotAdmitted {
            allow: allow.to_vec(),
            builder: builder_addr,
        });
    }
    let mut warnings = Vec::new();
    if let Some(why) = input.agent_away {
        warnings.push(format!(
            "agent away ({why}); distccd still answers: judged on its last status"
        ));
    }
    for problem in compiler_mismatches(worker, local) {
        if policy.allow_mismatch {
            warnings.push(problem.to_string());
        } else {
            return Err(Exclusion::CompilerMismatch(problem));
        }
    }
    let slots = worker.slots();
    if slots == 0 {
        return Err(Exclusion::NoSlots);
    }
    let slots = if slots > MAX_WORKER_SLOTS {
        warnings.push(format!(
            "reports {slots} slots; using at most {MAX_WORKER_SLOTS}"
        ));
        MAX_WORKER_SLOTS
    } else {
        slots
    };
    let running = worker.jobs_running();
    let slots = match overload_share(slots, running) {
        share if share == slots => slots,
        0 => return Err(Exclusion::Overloaded { running, slots }),
        share => {
            warnings.push(format!(
                "overloaded: {running} compiles in flight for {slots} slots; using {share}"
            ));
            share
        }
    };
    let slots = match (input.mean_job_secs, others.mean_job_secs) {
        (Some(mean), Some(others)) => match slow_share(slots, mean, others) {
            share if share == slots => slots,
            0 => {
                return Err(Exclusion::Slow {
                    mean_secs: mean,
                    others_secs: others,
                });
            }
            share => {
                warnings.push(format!(
                    "slow: compiles take {mean:.1} s here, {others:.1} s on the other workers; using {share} of {slots} slots"
                ));
                share
            }
        },
        _ => slots,
    };
    let slots = match slowness(input.busy_secs_per_compile, others.busy_secs_per_compile) {
        Some(times) => match speed_share(slots, times) {
            share if share == slots => slots,
            share => {
                warnings.push(format!(
                    "slower: {times:.1} times the other workers' busy seconds per compile; using {share} of {slots} slots"
                ));
                share
            }
        },
        None => slots,
    };
    let lzo = policy.lzo && !is_loopback_host(&host);
    Ok((
        HostEntry {
            host,
            port,
            slots,
            lzo,
        },
        warnings,
    ))
}

/// The slots to use on a worker whose distccd has `running` compiles in flight (open
/// client connections) for `slots` slots. More connections than slots means other clients
/// (other builders, builds outside this session) share it and compiles queue there: this
/// builder then takes its proportional share, `slots * slots / running`, which settles
/// where everyone's compiles fit, and recovers on its own as the queue drains. A builder's
/// own compiles never exceed `slots` (distcc's client honours the hosts-file limit), so a
/// worker used by this builder alone is never lowered. Load averages are not used: they
/// lag by a minute, count this builder's own compiles, and containers share the kernel's.
pub fn overload_share(slots: u32, running: u32) -> u32 {
    if running <= slots {
        slots
    } else {
        u32::try_from(u64::from(slots) * u64::from(slots) / u64::from(running)).unwrap_or(0)
    }
}

/// Where distcc connects: always the host of the configured endpoint, never an address
/// the worker names. The worker's listen address only decides whether distccd can be
/// reached there: all addresses (empty: an old agent, distccd's default), or exactly the
/// endpoint's. Any other address is a worker steering this builder's sources elsewhere
/// (or a misconfiguration that would refuse every compile), so the worker is excluded.
fn distcc_host(endpoint: &str, listen: &str) -> Result<String, ListenProblem> {
    let agent_host = endpoint_host(endpoint);
    if listen.is_empty() {
        return Ok(agent_host.to_owned());
    }
    let Ok(ip) = listen.parse::<IpAddr>() else {
        return Err(ListenProblem::NotAnAddress {
            listen: bounded(listen, 64),
        });
    };
    let endpoint_ip = agent_host.parse::<IpAddr>().ok();
    if ip.is_unspecified()
        || endpoint_ip == Some(ip)
        || (ip.is_loopback() && agent_host == "localhost")
    {
        return Ok(agent_host.to_owned());
    }
    if ip.is_loopback() && !is_loopback_host(agent_host) {
        return Err(ListenProblem::LoopbackOnly { ip });
    }
    Err(match endpoint_ip {
        Some(_) => ListenProblem::OtherAddress {
            ip,
            endpoint_host: agent_host.to_owned(),
        },
        None => ListenProblem::EndpointIsAName {
            ip,
            name: agent_host.to_owned(),
        },
    })
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether one of the CIDRs (or plain addresses) admits `addr`. Unparsable entries admit
/// nothing: the agent validates them, so one here means a newer format we do not know.
pub fn admits(allow: &[String], addr: IpAddr) -> bool {
    // An IPv4 address reaching an IPv6 socket may show as ::ffff:a.b.c.d; compare plainly.
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    allow.iter().any(|entry| {
        entry
            .parse::<IpNet>()
            .map(|net| net.contains(&addr))
            .or_else(|_| entry.parse::<IpAddr>().map(|ip| ip == addr))
            .unwrap_or(false)
    })
}

/// One problem per configured compiler the worker lacks or has in another build.
pub fn compiler_mismatches(
    worker: &WorkerSnapshot,
    local: &[LocalCompiler],
) -> Vec<CompilerProblem> {
    let mut problems = Vec::new();
    for mine in local {
        let name = mine.name.clone();
        let Some(theirs) = worker.compilers().iter().find(|c| c.name == mine.name) else {
            problems.push(CompilerProblem::Missing { name });
            continue;
        };
        if theirs.fingerprint.is_empty() {
            let why = if theirs.error.is_empty() {
                "not described yet"
            } else {
                theirs.error.as_str()
            };
            problems.push(CompilerProblem::Unknown {
                name,
                why: why.to_owned(),
            });
        } else if theirs.fingerprint != mine.fingerprint {
            problems.push(
                if theirs.version == mine.version && theirs.target == mine.target {
                    CompilerProblem::OtherBinary {
                        name,
                        version: mine.version.clone(),
                        here: short(&mine.fingerprint).to_owned(),
                        there: short(&theirs.fingerprint).to_owned(),
                    }
                } else {
                    CompilerProblem::OtherVersion {
                        name,
                        theirs: (theirs.version.clone(), theirs.target.clone()),
                        mine: (mine.version.clone(), mine.target.clone()),
                    }
                },
            );
        }
    }
    problems
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

/// Replace `path` with `text` so that a concurrent reader (every distcc invocation reads
/// the hosts file) sees the old or the new file, never a partial one, even after a crash.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".hosts.")
        .tempfile_in(dir)?;
    temp.write_all(text.as_bytes())?;
    temp.as_file().sync_all()?;
    // tempfile creates 0600; distcc may run as another user sharing the session.
    std::fs::set_permissions(
        temp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    temp.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use distcc_proto::v1 as pb;

    const GCC_SUM: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn gcc(version: &str, fingerprint: &str) -> pb::Compiler {
        pb::Compiler {
            name: "gcc".into(),
            path: "/usr/bin/x86_64-linux-gnu-gcc-12".into(),
            version: version.into(),
            target: "x86_64-linux-gnu".into(),
            fingerprint: fingerprint.into(),
            error: String::new(),
        }
    }

    fn local() -> Vec<LocalCompiler> {
        vec![LocalCompiler {
            name: "gcc".into(),
            version: "gcc (Debian 12.2.0-14) 12.2.0".into(),
            target: "x86_64-linux-gnu".into(),
            fingerprint: GCC_SUM.into(),
        }]
    }

    fn healthy(jobs: u32) -> pb::WorkerStatus {
        pb::WorkerStatus {
            unit: Some(pb::UnitState {
                active_state: "active".into(),
                sub_state: "running".into(),
                ..Default::default()
            }),
            settings: Some(pb::DistccdSettings {
                allow: vec!["198.18.3.0/24".into()],
                jobs,
                listen: "0.0.0.0".into(),
                port: 3632,
                ..Default::default()
            }),
            effective_allow: vec!["198.18.3.0/24".into(), "127.0.0.1/32".into()],
            capacity: Some(pb::Capacity {
                online_cpus: 2,
                ..Default::default()
            }),
            compilers: vec![gcc("gcc (Debian 12.2.0-14) 12.2.0", GCC_SUM)],
            ..Default::default()
        }
    }

    fn builder() -> Option<IpAddr> {
        Some("198.18.3.1".parse().unwrap())
    }

    fn policy() -> Policy {
        Policy {
            allow_mismatch: false,
            local_slots: 2,
            lzo: true,
        }
    }

    /// A worker's input; the snapshot is leaked so tests can hold statuses by value.
    fn input(endpoint: &'static str, status: &pb::WorkerStatus) -> WorkerInput<'static> {
        let snapshot = Box::leak(Box::new(WorkerSnapshot::new(status.clone())));
        WorkerInput {
            endpoint,
            status: Ok(snapshot),
            builder_addr: builder(),
            mean_job_secs: None,
            busy_secs_per_compile: None,
            agent_away: None,
        }
    }

    fn reason(list: &HostList, endpoint: &str) -> String {
        list.verdict(endpoint)
            .unwrap()
            .excluded_reason()
            .unwrap_or_else(|| panic!("{endpoint} was included"))
    }

    #[test]
    fn healthy_workers_render_in_distcc_syntax_with_localhost_last() {
        let (a, b) = (healthy(3), healthy(0));
        let list = HostList::compute(
            &[input("198.18.3.11:3634", &a), input("198.18.3.12:3634", &b)],
            &local(),
            &policy(),
        );
        // jobs = 0 falls back to CPUs + 2.
        assert_eq!(list.remote_slots(), 3 + 4);
        assert_eq!(list.total_slots(), 9);
        let text = list.render();
        assert_eq!(
            text.lines().last().unwrap(),
            "198.18.3.11:3632/3,lzo 198.18.3.12:3632/4,lzo localhost/2"
        );
        assert!(!text.contains("excluded"));
    }

    #[test]
    fn lzo_off_leaves_remote_hosts_uncompressed() {
        let status = healthy(3);
        let list = HostList::compute(
            &[input("198.18.3.11:3634", &status)],
            &local(),
            &Policy {
                lzo: false,
                ..policy()
            },
        );
        assert_eq!(
            list.render().lines().last().unwrap(),
            "198.18.3.11:3632/3 localhost/2"
        );
    }

    #[test]
    fn each_exclusion_carries_its_reason() {
        let mut stopped = healthy(3);
        stopped.unit.as_mut().unwrap().active_state = "inactive".into();
        stopped.unit.as_mut().unwrap().sub_state = "dead".into();
        let mut narrow = healthy(3);
        narrow.effective_allow = vec!["198.18.9.0/24".into(), "127.0.0.1/32".into()];
        let mut other_gcc = healthy(3);
        other_gcc.compilers = vec![gcc(
            "gcc (Debian 11.3.0-12) 11.3.0",
            "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        )];
        let mut no_gcc = healthy(3);
        no_gcc.compilers.clear();
        let good = healthy(3);
        let inputs = [
            WorkerInput {
                endpoint: "198.18.3.11:3634",
                status: Err("connect: timed out"),
                builder_addr: builder(),
                mean_job_secs: None,
                busy_secs_per_compile: None,
                agent_away: None,
            },
            input("198.18.3.12:3634", &stopped),
            input("198.18.3.13:3634", &narrow),
            input("198.18.3.14:3634", &other_gcc),
            input("198.18.3.15:3634", &no_gcc),
            WorkerInput {
                builder_addr: None,
                ..input("198.18.3.16:3634", &good)
            },
            input("198.18.3.17:3634", &good),
        ];
        let list = HostList::compute(&inputs, &local(), &policy());
        assert!(reason(&list, "198.18.3.11:3634").contains("unreachable: connect: timed out"));
        assert_eq!(
            reason(&list, "198.18.3.12:3634"),
            "distccd is inactive (dead)"
        );
        let r = reason(&list, "198.18.3.13:3634");
        assert!(
            r.contains("does not admit this builder (198.18.3.1)"),
            "{r}"
        );
        let r = reason(&list, "198.18.3.14:3634");
        assert!(r.contains("`gcc` differs") && r.contains("11.3.0"), "{r}");
        assert!(reason(&list, "198.18.3.15:3634").contains("no `gcc` masquerade link"));
        assert!(reason(&list, "198.18.3.16:3634").contains("no route"));
        assert_eq!(
            list.included().map(HostEntry::render).collect::<Vec<_>>(),
            ["198.18.3.17:3632/3,lzo"]
        );
        // Every excluded worker is explained in the file itself.
        let text = list.render();
        assert_eq!(text.matches("# excluded").count(), 6, "{text}");
        // JSON for scripts: null reason when included.
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(
            json["workers"][6]["excluded_reason"],
            serde_json::Value::Null
        );
        // Each reason's kind beside it, for programs; null when included.
        let kinds: Vec<serde_json::Value> = (0..7)
            .map(|i| json["workers"][i]["excluded_kind"].clone())
            .collect();
        assert_eq!(
            kinds,
            [
                "unreachable",
                "inactive",
                "not_admitted",
                "compiler_mismatch",
                "compiler_mismatch",
                "no_route",
            ]
            .map(serde_json::Value::from)
            .into_iter()
            .chain([serde_json::Value::Null])
            .collect::<Vec<_>>()
        );
        assert_eq!(
            json["workers"][6]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            [
                "endpoint",
                "entry",
                "excluded_kind",
                "excluded_reason",
                "warnings"
            ]
        );
    }

    #[test]
    fn allow_mismatch_includes_with_a_warning() {
        let mut other_gcc = healthy(3);
        other_gcc.compilers = vec![gcc("gcc (Debian 12.2.0-14) 12.2.0", "cc")];
        let list = HostList::compute(
            &[input("198.18.3.11:3634", &other_gcc)],
            &local(),
            &Policy {
                allow_mismatch: true,
                local_slots: 0,
                lzo: true,
            },
        );
        let verdict = list.verdict("198.18.3.11:3634").unwrap();
        assert!(verdict.entry().is_some());
        assert!(
            verdict.warnings()[0].contains("same version"),
            "{verdict:?}"
        );
        assert_eq!(
            list.render().lines().last().unwrap(),
            "198.18.3.11:3632/3,lzo"
        );
    }

    #[test]
    fn unknown_worker_compiler_is_not_a_match() {
        let mut cold = healthy(3);
        cold.compilers[0].fingerprint.clear();
        let list = HostList::compute(&[input("w:3634", &cold)], &local(), &policy());
        assert!(reason(&list, "w:3634").contains("not described yet"));
    }

    #[test]
    fn slots_follow_measured_throughput() {
        let status = healthy(3);
        let timed = |endpoint: &'static str, busy: Option<f64>| WorkerInput {
            busy_secs_per_compile: busy,
            ..input(endpoint, &status)
        };
        // Five times the others' busy seconds per compile: a fifth of the slots (at least
        // one); under twice: job-mix noise, all of them; unmeasured: all of them.
        let list = HostList::compute(
            &[
                timed("198.18.3.11:3634", Some(1.0)),
                timed("198.18.3.12:3634", Some(1.2)),
                timed("198.18.3.13:3634", Some(5.5)),
                timed("198.18.3.14:3634", Some(1.9)),
                timed("198.18.3.15:3634", None),
            ],
            &local(),
            &policy(),
        );
        let slots: Vec<u32> = list.included().map(|e| e.slots).collect();
        assert_eq!(slots, [3, 3, 1, 3, 3]);
        let slow = list.verdict("198.18.3.13:3634").unwrap();
        assert!(
            slow.warnings()[0].starts_with("slower: 4.6 times"),
            "{slow:?}"
        );
        assert!(
            list.verdict("198.18.3.11:3634")
                .unwrap()
                .warnings()
                .is_empty()
        );
    }

    #[test]
    fn stragglers_get_fewer_slots_or_none() {
        let status = healthy(3);
        let paced = |endpoint: &'static str, mean: Option<f64>| WorkerInput {
            mean_job_secs: mean,
            busy_secs_per_compile: None,
            ..input(endpoint, &status)
        };
        // One lucky worker (0.2 s: the tiny compiles) does not make the others slow; a
        // worker at 9 times the median of the others is out.
        let list = HostList::compute(
            &[
                paced("198.18.3.11:3634", Some(0.2)),
                paced("198.18.3.12:3634", Some(1.8)),
                paced("198.18.3.13:3634", Some(18.0)),
                paced("198.18.3.14:3634", Some(2.2)),
                paced("198.18.3.15:3634", None),
            ],
            &local(),
            &policy(),
        );
        let slots: Vec<u32> = list
            .workers
            .iter()
            .map(|w| w.entry().map_or(0, |e| e.slots))
            .collect();
        assert_eq!(slots, [3, 3, 0, 3, 3]);
        assert_eq!(
            reason(&list, "198.18.3.13:3634"),
            "slow: compiles take 18.0 s here, 1.8 s on the other workers"
        );
        // With 16 slots, 8 times as slow keeps 2 of them.
        let many = healthy(16);
        let list = HostList::compute(
            &[
                paced("198.18.3.11:3634", Some(1.0)),
                WorkerInput {
                    mean_job_secs: Some(8.0),
                    busy_secs_per_compile: None,
                    ..input("198.18.3.14:3634", &many)
                },
            ],
            &local(),
            &policy(),
        );
        assert_eq!(list.workers[1].entry().unwrap().slots, 2);
        assert!(list.workers[1].warnings()[0].contains("using 2 of 16 slots"));
    }

    #[test]
    fn loopback_workers_get_no_lzo_and_listen_address_is_respected() {
        let mut status = healthy(2);
        status.effective_allow = vec!["127.0.0.0/8".into()];
        let list = HostList::compute(
            &[WorkerInput {
                builder_addr: Some("127.0.0.1".parse().unwrap()),
                ..input("127.0.0.1:3634", &status)
            }],
            &local(),
            &policy(),
        );
        assert_eq!(
            list.render().lines().last().unwrap(),
            "127.0.0.1:3632/2 localhost/2"
        );
        let mut local_only = healthy(2);
        local_only.settings.as_mut().unwrap().listen = "127.0.0.1".into();
        let list = HostList::compute(
            &[input("198.18.3.11:3634", &local_only)],
            &local(),
            &policy(),
        );
        assert!(reason(&list, "198.18.3.11:3634").contains("listens on 127.0.0.1 only"));
    }

    #[test]
    fn a_worker_cannot_redirect_compiles_to_another_address() {
        let listening = |listen: &str| {
            let mut status = healthy(3);
            status.settings.as_mut().unwrap().listen = listen.into();
            status
        };
        let (elsewhere, own, garbage, any6, by_name) = (
            listening("203.0.113.9"),
            listening("198.18.3.13"),
            listening("198.18.3.12\n203.0.113.9:3632/64"),
            listening("::"),
            listening("198.18.3.11"),
        );
        let list = HostList::compute(
            &[
                input("198.18.3.11:3634", &elsewhere),
                input("w1.example:3634", &by_name),
                input("198.18.3.12:3634", &garbage),
                input("198.18.3.13:3634", &own),
                input("198.18.3.14:3634", &any6),
            ],
            &local(),
            &policy(),
        );
        let r = reason(&list, "198.18.3.11:3634");
        assert!(
            r.contains("listens on 203.0.113.9, not on 198.18.3.11"),
            "{r}"
        );
        // By name, a specific address cannot be checked: excluded, and says how to fix.
        let r = reason(&list, "w1.example:3634");
        assert!(r.contains("endpoint is the name w1.example"), "{r}");
        let r = reason(&list, "198.18.3.12:3634");
        assert!(r.contains("not an IP address"), "{r}");
        // The worker's own address, or all addresses: used, under the configured host.
        let text = list.render();
        assert_eq!(
            text.lines().last().unwrap(),
            "198.18.3.13:3632/3,lzo 198.18.3.14:3632/3,lzo localhost/2"
        );
        // The address the worker named appears in comments only.
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn a_port_that_is_no_tcp_port_excludes_the_worker() {
        let mut status = healthy(3);
        status.settings.as_mut().unwrap().port = 65536 + 22;
        let list = HostList::compute(&[input("w:3634", &status)], &local(), &policy());
        assert!(reason(&list, "w:3634").contains("port 65558, which is not a TCP port"));
    }

    #[test]
    fn worker_strings_reach_the_hosts_file_without_control_characters() {
        let mut status = healthy(3);
        // A hostile worker tries to end the comment line and add a host of its own.
        status.unit.as_mut().unwrap().active_state = "failed\n203.0.113.9:3632/64\r".into();
        status.unit.as_mut().unwrap().sub_state = "\x1b]0;owned\x07x".repeat(100);
        let list = HostList::compute(&[input("w:3634", &status)], &local(), &policy());
        let text = list.render();
        assert_eq!(text.lines().count(), 3, "{text}");
        let comment = text.lines().nth(1).unwrap();
        assert!(comment.starts_with("# excluded w:3634: distccd is failed203.0.113.9:3632/64 ("));
        assert!(
            !text.chars().any(|c| c != '\n' && c.is_control()),
            "{text:?}"
        );
        // Long reasons are cut in the file.
        assert!(comment.len() < MAX_REASON_CHARS + 40, "{}", comment.len());
        assert!(comment.ends_with("..."));
        assert_eq!(text.lines().last().unwrap(), "localhost/2");
        let explained = list.explain();
        assert!(!explained.chars().any(|c| c != '\n' && c.is_control()));
    }

    #[test]
    fn slot_arithmetic_saturates_and_a_worker_gets_at_most_the_cap() {
        let boastful = |max_kids: u64| {
            let mut status = healthy(0);
            status.stats = Some(pb::DistccdStats {
                available: true,
                max_kids,
                ..Default::default()
            });
            status
        };
        let (huge, wrapping) = (boastful(u64::MAX), boastful(1 << 32));
        let mut cpus = healthy(0);
        cpus.capacity.as_mut().unwrap().online_cpus = u32::MAX;
        let list = HostList::compute(
            &[
                input("198.18.3.11:3634", &huge),
                input("198.18.3.12:3634", &wrapping),
                input("198.18.3.13:3634", &cpus),
            ],
            &local(),
            &Policy {
                local_slots: u32::MAX,
                ..policy()
            },
        );
        for w in &list.workers {
            assert_eq!(w.entry().unwrap().slots, MAX_WORKER_SLOTS, "{w:?}");
            assert!(w.warnings()[0].contains("using at most 1024"), "{w:?}");
        }
        // 2^32 is not truncated to 0 slots (and so to the job setting).
        assert!(list.workers[1].warnings()[0].starts_with("reports 4294967295 slots"));
        assert_eq!(list.remote_slots(), 3 * MAX_WORKER_SLOTS);
        assert_eq!(list.total_slots(), u32::MAX);
        let many = HostList {
            workers: (0..5)
                .map(|i| WorkerVerdict {
                    endpoint: format!("w{i}:3634"),
                    verdict: Verdict::Included {
                        entry: HostEntry {
                            host: format!("w{i}"),
                            port: 3632,
                            slots: u32::MAX / 2,
                            lzo: false,
                        },
                        warnings: Vec::new(),
                    },
                })
                .collect(),
            local_slots: 1,
        };
        assert_eq!(many.remote_slots(), u32::MAX);
        assert_eq!(many.total_slots(), u32::MAX);
    }

    #[test]
    fn overloaded_workers_get_their_share_then_recover() {
        assert_eq!(overload_share(3, 0), 3);
        assert_eq!(
            overload_share(3, 3),
            3,
            "this builder alone fills it: no change"
        );
        assert_eq!(overload_share(4, 8), 2, "twice the slots in flight: half");
        assert_eq!(overload_share(3, 10), 0);
        let busy = |running: u32| {
            let mut status = healthy(4);
            status.stats = Some(pb::DistccdStats {
                available: true,
                max_kids: 4,
                jobs_running: running,
                ..Default::default()
            });
            status
        };
        let (crowded, swamped, calm) = (busy(8), busy(17), busy(4));
        let list = HostList::compute(
            &[
                input("198.18.3.11:3634", &crowded),
                input("198.18.3.12:3634", &swamped),
                input("198.18.3.13:3634", &calm),
            ],
            &local(),
            &policy(),
        );
        let crowded = list.verdict("198.18.3.11:3634").unwrap();
        assert_eq!(crowded.entry().unwrap().slots, 2);
        assert!(crowded.warnings()[0].contains("8 compiles in flight for 4 slots; using 2"));
        assert_eq!(
            reason(&list, "198.18.3.12:3634"),
            "overloaded: distccd has 17 compiles in flight for 4 slots"
        );
        assert_eq!(
            list.verdict("198.18.3.13:3634")
                .unwrap()
                .entry()
                .unwrap()
                .slots,
            4
        );
        // Stats unavailable: nothing to judge by, the slots stand.
        let mut blind = busy(17);
        blind.stats.as_mut().unwrap().available = false;
        let list = HostList::compute(&[input("w:3634", &blind)], &local(), &policy());
        assert_eq!(list.verdict("w:3634").unwrap().entry().unwrap().slots, 4);
    }

    #[test]
    fn allowlist_matching() {
        let allow = [
            "10.0.0.0/8".to_owned(),
            "192.168.1.7".to_owned(),
            "junk".to_owned(),
        ];
        assert!(admits(&allow, "10.1.2.3".parse().unwrap()));
        assert!(admits(&allow, "192.168.1.7".parse().unwrap()));
        assert!(admits(&allow, "::ffff:10.0.0.1".parse().unwrap()));
        assert!(!admits(&allow, "192.168.1.8".parse().unwrap()));
        assert!(!admits(&[], "10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn endpoint_hosts() {
        assert_eq!(endpoint_host("198.18.0.11:3634"), "198.18.0.11");
        assert_eq!(endpoint_host("[::1]:3634"), "::1");
        assert_eq!(endpoint_host("w1.example:3634"), "w1.example");
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        write_atomically(&path, "a\n").unwrap();
        write_atomically(&path, "b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b\n");
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
