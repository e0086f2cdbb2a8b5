//! Why a worker is left out of the host list, typed: decisions (what to log, when to
//! cut) are taken on the kind, the text is only for people.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Why a worker is not in the host list. `Display` is the reason people read (and the
/// `excluded_reason` of the JSON); [`Exclusion::kind`] is what programs decide on.
#[derive(Debug, Clone, PartialEq)]
pub enum Exclusion {
    /// No status: the agent could not be reached, or its stream broke.
    Unreachable {
        why: String,
    },
    /// distccd's unit is not active.
    Inactive {
        active_state: String,
        sub_state: String,
    },
    BadListen(ListenProblem),
    /// The worker reports a distccd port outside 1..=65535.
    BadPort {
        port: u32,
    },
    /// The kernel has no route from this builder to the worker.
    NoRoute {
        host: String,
    },
    /// distccd's allowlist does not admit the address this builder reaches it from.
    NotAdmitted {
        allow: Vec<String>,
        builder: IpAddr,
    },
    CompilerMismatch(CompilerProblem),
    /// distccd reports no capacity.
    NoSlots,
    /// Other clients fill the worker: this builder's share rounds to 0.
    Overloaded {
        running: u32,
        slots: u32,
    },
    /// Compiles take far longer here than on the other workers ([`crate::pace`]).
    Slow {
        mean_secs: f64,
        others_secs: f64,
    },
    /// A view without a verdict (the worker is not in the host list it was judged with).
    NotInList,
    /// Judged by another builderctl (the builder daemon, over the session socket): its
    /// kind and text as it sent them.
    Reported {
        kind: ExclusionKind,
        reason: String,
    },
}

/// [`Exclusion`] without its figures: `excluded_kind` in the JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExclusionKind {
    Unreachable,
    Inactive,
    BadListen,
    BadPort,
    NoRoute,
    NotAdmitted,
    CompilerMismatch,
    NoSlots,
    Overloaded,
    Slow,
    NotInList,
}

impl Exclusion {
    pub fn kind(&self) -> ExclusionKind {
        match self {
            Exclusion::Unreachable { .. } => ExclusionKind::Unreachable,
            Exclusion::Inactive { .. } => ExclusionKind::Inactive,
            Exclusion::BadListen(_) => ExclusionKind::BadListen,
            Exclusion::BadPort { .. } => ExclusionKind::BadPort,
            Exclusion::NoRoute { .. } => ExclusionKind::NoRoute,
            Exclusion::NotAdmitted { .. } => ExclusionKind::NotAdmitted,
            Exclusion::CompilerMismatch(_) => ExclusionKind::CompilerMismatch,
            Exclusion::NoSlots => ExclusionKind::NoSlots,
            Exclusion::Overloaded { .. } => ExclusionKind::Overloaded,
            Exclusion::Slow { .. } => ExclusionKind::Slow,
            Exclusion::NotInList => ExclusionKind::NotInList,
            Exclusion::Reported { kind, .. } => *kind,
        }
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Unreachable { why } => write!(f, "agent unreachable: {why}"),
            Exclusion::Inactive {
                active_state,
                sub_state,
            } => write!(
                f,
                "distccd is {} ({})",
                or_unknown(active_state),
                or_unknown(sub_state)
            ),
            Exclusion::BadListen(problem) => problem.fmt(f),
            Exclusion::BadPort { port } => {
                write!(f, "reports distccd port {port}, which is not a TCP port")
            }
            Exclusion::NoRoute { host } => write!(f, "no route from this builder to {host}"),
            Exclusion::NotAdmitted { allow, builder } => write!(
                f,
                "distccd's allowlist [{}] does not admit this builder ({builder})",
                allow.join(", ")
            ),
            Exclusion::CompilerMismatch(problem) => problem.fmt(f),
            Exclusion::NoSlots => f.write_str("no slots: distccd reports no capacity"),
            Exclusion::Overloaded { running, slots } => write!(
                f,
                "overloaded: distccd has {running} compiles in flight for {slots} slots"
            ),
            Exclusion::Slow {
                mean_secs,
                others_secs,
            } => write!(
                f,
                "slow: compiles take {mean_secs:.1} s here, {others_secs:.1} s on the other workers"
            ),
            Exclusion::NotInList => f.write_str("not in the host list"),
            Exclusion::Reported { reason, .. } => f.write_str(reason),
        }
    }
}

/// distccd listens where this builder must not, or cannot, send compiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenProblem {
    /// The listen address is no IP address (cut to 64 characters).
    NotAnAddress { listen: String },
    /// Loopback only, on a worker that is not this machine.
    LoopbackOnly { ip: IpAddr },
    /// Another address than the configured endpoint's.
    OtherAddress { ip: IpAddr, endpoint_host: String },
    /// One address, and the endpoint is a name: whether it is the worker's cannot be told.
    EndpointIsAName { ip: IpAddr, name: String },
}

impl fmt::Display for ListenProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenProblem::NotAnAddress { listen } => write!(
                f,
                "reports distccd listen address {listen:?}, which is not an IP address"
            ),
            ListenProblem::LoopbackOnly { ip } => write!(
                f,
                "distccd listens on {ip} only, which this builder cannot reach"
            ),
            ListenProblem::OtherAddress { ip, endpoint_host } => write!(
                f,
                "distccd listens on {ip}, not on {endpoint_host} (the configured endpoint): not used, \
                 a worker cannot redirect compiles to another address"
            ),
            ListenProblem::EndpointIsAName { ip, name } => write!(
                f,
                "distccd listens on {ip} only, and the endpoint is the name {name}: not used, \
                 the builder cannot tell that address is this worker's (configure the worker by \
                 address, or let distccd listen on 0.0.0.0)"
            ),
        }
    }
}

/// A configured compiler the worker lacks or has in another build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompilerProblem {
    Missing {
        name: String,
    },
    /// The worker has not fingerprinted it (yet, or it failed).
    Unknown {
        name: String,
        why: String,
    },
    /// Same version and target, another binary.
    OtherBinary {
        name: String,
        version: String,
        here: String,
        there: String,
    },
    OtherVersion {
        name: String,
        theirs: (String, String),
        mine: (String, String),
    },
}

impl fmt::Display for CompilerProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompilerProblem::Missing { name } => write!(
                f,
                "no `{name}` masquerade link on the worker (distccd would refuse it)"
            ),
            CompilerProblem::Unknown { name, why } => {
                write!(
                    f,
                    "cannot compare `{name}`: the worker's is unknown ({why})"
                )
            }
            CompilerProblem::OtherBinary {
                name,
                version,
                here,
                there,
            } => write!(
                f,
                "`{name}` differs: same version {version:?} but another binary (sha256 {here} here, {there} there)"
            ),
            CompilerProblem::OtherVersion { name, theirs, mine } => write!(
                f,
                "`{name}` differs: worker has {:?} for {}, builder has {:?} for {}",
                theirs.0,
                or_unknown(&theirs.1),
                mine.0,
                or_unknown(&mine.1)
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_snake_case_in_json() {
        let slow = Exclusion::Slow {
            mean_secs: 95.0,
            others_secs: 1.94,
        };
        assert_eq!(
            slow.to_string(),
            "slow: compiles take 95.0 s here, 1.9 s on the other workers"
        );
        assert_eq!(serde_json::to_value(slow.kind()).unwrap(), "slow");
        let kind = Exclusion::CompilerMismatch(CompilerProblem::Missing { name: "gcc".into() });
        assert_eq!(
            serde_json::to_value(kind.kind()).unwrap(),
            "compiler_mismatch"
        );
        assert_eq!(
            serde_json::to_value(ExclusionKind::NotAdmitted).unwrap(),
            "not_admitted"
        );
    }
}
