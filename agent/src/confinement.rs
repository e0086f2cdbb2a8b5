//! distccd's kernel-enforced confinement, as pure decisions: which addresses the unit's
//! cgroup BPF filter admits (`IPAddressAllow=`, over `IPAddressDeny=any` in the unit
//! file), its task and memory bounds, whether a settings change needs a restart of
//! distccd, and whether what systemd reports is the confinement asked for.
//!
//! The split that lets an allowlist change apply without dropping compiles: distccd's own
//! `--allow` is the operator's POLICY bound (`[policy] allow_within` plus the agent's own
//! address), fixed while the policy is; the kernel filter carries the EFFECTIVE list
//! (`[distccd] allow` or Configure's, plus loopback) and systemd swaps it on the running
//! unit. Narrowing or widening the allowlist inside the policy touches only the filter.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::settings::{AllowPolicy, DistccdSettings};

/// The kernel filter and resource bounds of distccd.service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// `IPAddressAllow=`: the effective allowlist, the agent's own address and loopback.
    pub ip_allow: Vec<IpNet>,
    /// `TasksMax=`.
    pub tasks_max: u64,
    /// `MemoryMax=`, bytes.
    pub memory_max_bytes: u64,
}

/// Bounds on distccd's processes and memory (`[confinement]` in the agent config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub tasks_max: u64,
    pub memory_max_bytes: u64,
}

/// Lower bound of `[confinement] tasks_max`: distccd's parent, its preforked children and one
/// compiler pipeline (gcc, cc1, as) need about a dozen.
pub const MIN_TASKS_MAX: u64 = 32;
/// Lower bound of `[confinement] memory_max_mib`.
pub const MIN_MEMORY_MAX_MIB: u64 = 256;

impl Limits {
    /// Defaults from the machine's size: every slot (CPUs + 2, distccd's default) runs a
    /// pipeline of about four processes; 16 per CPU plus 64 leaves room for that and
    /// for jobs set higher. Three quarters of the RAM leaves the rest of the worker (the
    /// agent, sshd) room when compiles balloon.
    pub fn for_machine(online_cpus: u32, mem_total_bytes: u64) -> Self {
        let mem = if mem_total_bytes == 0 {
            1 << 30
        } else {
            mem_total_bytes
        };
        Self {
            tasks_max: 64 + 16 * u64::from(online_cpus.max(1)),
            memory_max_bytes: (mem / 4 * 3).max(MIN_MEMORY_MAX_MIB << 20),
        }
    }
}

/// Loopback, always admitted: the agent reads distccd's stats page from it.
pub fn loopback() -> [IpNet; 2] {
    [
        IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("constant prefix"),
        IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128).expect("constant prefix"),
    ]
}

/// Append `net` unless a listed network already covers it.
fn push_uncovered(list: &mut Vec<IpNet>, net: IpNet) {
    if !list.iter().any(|outer| outer.contains(&net)) {
        list.push(net);
    }
}

impl Confinement {
    pub fn new(settings: &DistccdSettings, limits: Limits) -> Self {
        let candidates: Vec<IpNet> = settings
            .effective_allow()
            .iter()
            .chain(loopback())
            .collect();
        // Leave out entries inside another (the agent's 127.0.0.1/32 inside 127.0.0.0/8).
        let mut ip_allow: Vec<IpNet> = Vec::new();
        for net in &candidates {
            let covered = candidates.iter().any(|o| o != net && o.contains(net));
            if !covered && !ip_allow.contains(net) {
                ip_allow.push(*net);
            }
        }
        Self {
            ip_allow,
            tasks_max: limits.tasks_max,
            memory_max_bytes: limits.memory_max_bytes,
        }
    }
}

/// distccd's own `--allow` list: the policy's networks and the agent's own address. The
/// kernel filter narrows this to the effective allowlist; distccd's check stays as a
/// second line should the filter ever be missing.
pub fn distccd_allow_bound(settings: &DistccdSettings, policy: &AllowPolicy) -> Vec<IpNet> {
    let mut bound = Vec::new();
    // An empty policy cannot occur in a validated config (it defaults to the allowlist);
    // fall back to the allowlist rather than to distccd's "every private network".
    let outer = if policy.allow_within.is_empty() {
        &settings.allow
    } else {
        &policy.allow_within
    };
    for net in outer.iter() {
        push_uncovered(&mut bound, net);
    }
    if settings.stats {
        push_uncovered(&mut bound, IpNet::from(settings.agent_connect_addr()));
    }
    bound
}

/// One `IPAddressAllow=` entry as systemd's D-Bus API takes it: `(iayu)`, address family
/// (AF_INET 2, AF_INET6 10), address bytes, prefix length.
pub fn to_dbus_entry(net: &IpNet) -> (i32, Vec<u8>, u32) {
    match net {
        IpNet::V4(v4) => (2, v4.addr().octets().to_vec(), u32::from(v4.prefix_len())),
        IpNet::V6(v6) => (10, v6.addr().octets().to_vec(), u32::from(v6.prefix_len())),
    }
}

/// The inverse of [`to_dbus_entry`]; `None` for a family or length systemd never sends.
pub fn from_dbus_entry(family: i32, bytes: &[u8], prefix: u32) -> Option<IpNet> {
    let prefix = u8::try_from(prefix).ok()?;
    let addr = match (family, bytes.len()) {
        (2, 4) => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        (10, 16) => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    IpNet::new(addr, prefix).ok()
}

/// What systemd reports for the unit's confinement (`org.freedesktop.systemd1.Service`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfinementState {
    pub ip_allow: Vec<IpNet>,
    pub ip_deny: Vec<IpNet>,
    /// `IPIngressBytes`: `None` when systemd has no data (`u64::MAX`), which with
    /// `IPAccounting=yes` on an active unit means no cgroup BPF program is attached: the
    /// kernel filter is not in force either.
    pub ip_ingress_bytes: Option<u64>,
    pub tasks_max: u64,
    pub memory_max_bytes: u64,
}

/// Whether the filter asked for is the one in force. `Err` says what is wrong.
pub fn check_filter(
    expected: &Confinement,
    state: &ConfinementState,
    unit_active: bool,
) -> Result<String, String> {
    let denies_all = |net: &IpNet| net.prefix_len() == 0;
    if !(state
        .ip_deny
        .iter()
        .any(|n| n.addr().is_ipv4() && denies_all(n))
        && state
            .ip_deny
            .iter()
            .any(|n| n.addr().is_ipv6() && denies_all(n)))
    {
        return Err(format!(
            "IPAddressDeny= is {:?}, not any: distccd.service is not the unit this agent ships",
            state.ip_deny
        ));
    }
    let mut want: Vec<String> = expected.ip_allow.iter().map(ToString::to_string).collect();
    let mut have: Vec<String> = state.ip_allow.iter().map(ToString::to_string).collect();
    want.sort();
    have.sort();
    if want != have {
        return Err(format!(
            "IPAddressAllow= is [{}], expected [{}]",
            have.join(", "),
            want.join(", ")
        ));
    }
    if unit_active && state.ip_ingress_bytes.is_none() {
        return Err(
            "systemd reports no IP accounting for the active unit: cgroup BPF is unavailable \
             and systemd runs distccd WITHOUT its IP firewall (\"Proceeding WITHOUT \
             firewalling in effect\"); only distccd's own --allow (the policy) applies"
                .to_owned(),
        );
    }
    Ok(format!(
        "kernel admits only {} (IPAddressDeny=any)",
        want.join(", ")
    ))
}

/// The settings arguments of a distccd command line (as [`crate::runtime::read_cmdline`]
/// reads it): what follows the fixed `distccd --no-detach --daemon --log-stderr` of
/// distccd.service.
pub fn distccd_args_from_cmdline(argv: Vec<String>) -> Vec<String> {
    let fixed = ["--no-detach", "--daemon", "--log-stderr"];
    argv.into_iter()
        .skip(1)
        .skip_while(|a| fixed.contains(&a.as_str()))
        .collect()
}

/// Whether applying new settings needs distccd restarted: only when its command line
/// changes (or it is not running, or what it runs cannot be read). An allowlist change
/// inside the policy changes only the kernel filter, which systemd swaps on the running
/// unit: no compile in flight is dropped.
pub fn needs_restart(running_args: Option<&[String]>, next_args: &[String]) -> bool {
    running_args != Some(next_args)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn settings(allow: &[&str]) -> DistccdSettings {
        DistccdSettings {
            allow: allow.iter().map(|s| net(s)).collect(),
            ..Default::default()
        }
    }

    fn policy(within: &[&str]) -> AllowPolicy {
        AllowPolicy {
            allow_within: within.iter().map(|s| net(s)).collect(),
            permit_public: false,
            max_allow_entries: AllowPolicy::DEFAULT_MAX_ALLOW_ENTRIES,
        }
    }

    const LIMITS: Limits = Limits {
        tasks_max: 96,
        memory_max_bytes: 1 << 30,
    };

    #[test]
    fn filter_is_the_allowlist_plus_loopback() {
        let c = Confinement::new(&settings(&["198.18.0.5/32", "10.1.0.0/16"]), LIMITS);
        let got: Vec<String> = c.ip_allow.iter().map(ToString::to_string).collect();
        // 127.0.0.1/32 (the agent's stats address) is folded into 127.0.0.0/8.
        assert_eq!(
            got,
            ["198.18.0.5/32", "10.1.0.0/16", "127.0.0.0/8", "::1/128"]
        );
    }

    #[test]
    fn distccd_allow_is_the_policy_not_the_allowlist() {
        let s = settings(&["198.18.0.5/32"]);
        let bound = distccd_allow_bound(&s, &policy(&["198.18.0.0/24"]));
        assert_eq!(bound, vec![net("198.18.0.0/24"), net("127.0.0.1/32")]);
        // Narrowing the allowlist inside the policy leaves distccd's command line alone.
        let narrower = settings(&["198.18.0.6/32"]);
        assert_eq!(
            narrower.to_args(&policy(&["198.18.0.0/24"])),
            s.to_args(&policy(&["198.18.0.0/24"]))
        );
    }

    #[test]
    fn restart_only_when_the_command_line_changes() {
        let p = policy(&["198.18.0.0/24"]);
        let a = settings(&["198.18.0.5/32"]);
        let b = settings(&["198.18.0.6/32"]);
        let running = a.to_args(&p);
        assert!(!needs_restart(Some(&running), &b.to_args(&p)));
        // Not running, or its command line unreadable.
        assert!(needs_restart(None, &b.to_args(&p)));
        let other_port = DistccdSettings {
            port: crate::settings::Port::try_from(4000).unwrap(),
            ..b
        };
        assert!(needs_restart(Some(&running), &other_port.to_args(&p)));
        // A policy change changes distccd's own --allow.
        assert!(needs_restart(
            Some(&running),
            &a.to_args(&policy(&["198.18.0.0/23"]))
        ));
    }

    #[test]
    fn running_args_come_from_the_command_line() {
        let argv =
            "/usr/bin/distccd --no-detach --daemon --log-stderr --allow 198.18.0.0/24 --port 3632"
                .split(' ')
                .map(str::to_owned)
                .collect();
        assert_eq!(
            distccd_args_from_cmdline(argv),
            ["--allow", "198.18.0.0/24", "--port", "3632"]
        );
    }

    #[test]
    fn dbus_entries_round_trip() {
        for text in ["198.18.0.0/24", "127.0.0.0/8", "::1/128", "fd00::/8"] {
            let (family, bytes, prefix) = to_dbus_entry(&net(text));
            assert_eq!(from_dbus_entry(family, &bytes, prefix), Some(net(text)));
        }
        assert_eq!(to_dbus_entry(&net("10.0.0.0/8")), (2, vec![10, 0, 0, 0], 8));
        assert_eq!(from_dbus_entry(2, &[1, 2, 3], 8), None);
        assert_eq!(from_dbus_entry(7, &[1, 2, 3, 4], 8), None);
    }

    fn in_force(c: &Confinement) -> ConfinementState {
        ConfinementState {
            ip_allow: c.ip_allow.iter().rev().copied().collect(),
            ip_deny: vec![net("0.0.0.0/0"), net("::/0")],
            ip_ingress_bytes: Some(0),
            tasks_max: c.tasks_max,
            memory_max_bytes: c.memory_max_bytes,
        }
    }

    #[test]
    fn filter_check_passes_only_when_in_force() {
        let c = Confinement::new(&settings(&["198.18.0.0/24"]), LIMITS);
        let ok = in_force(&c);
        check_filter(&c, &ok, true).unwrap();

        let no_bpf = ConfinementState {
            ip_ingress_bytes: None,
            ..ok.clone()
        };
        assert!(
            check_filter(&c, &no_bpf, true)
                .unwrap_err()
                .contains("WITHOUT")
        );
        // A stopped unit has no accounting data either: not a sign of missing BPF.
        check_filter(&c, &no_bpf, false).unwrap();

        let wider = ConfinementState {
            ip_allow: vec![net("198.18.0.0/16")],
            ..ok.clone()
        };
        assert!(
            check_filter(&c, &wider, true)
                .unwrap_err()
                .contains("IPAddressAllow")
        );
        let no_deny = ConfinementState {
            ip_deny: vec![],
            ..ok
        };
        assert!(
            check_filter(&c, &no_deny, true)
                .unwrap_err()
                .contains("IPAddressDeny")
        );
    }

    #[test]
    fn limits_scale_with_the_machine() {
        let small = Limits::for_machine(2, 4 << 30);
        assert_eq!(small.tasks_max, 96);
        assert_eq!(small.memory_max_bytes, 3 << 30);
        assert_eq!(Limits::for_machine(64, 256 << 30).tasks_max, 1088);
        // Unknown sizes still give sane bounds.
        let unknown = Limits::for_machine(0, 0);
        assert!(unknown.tasks_max >= MIN_TASKS_MAX);
        assert!(unknown.memory_max_bytes >= MIN_MEMORY_MAX_MIB << 20);
    }
}
