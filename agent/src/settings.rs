//! distccd's settings: one type, [`DistccdSettings`], made of validated newtypes. The same
//! type is read from the `[distccd]` table of agent.toml, patched by a Configure request,
//! persisted as JSON (`settings_store`) and reported in Status; only distccd's command line
//! is rendered from it. Adding a setting touches this file, the proto and the README.
//!
//! Each value is checked where it is made (a `Nice` is always 0..=19); what depends on
//! several values or on the operator's policy is checked by [`DistccdSettings::validate`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use distcc_proto::v1 as pb;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A value outside its setting's range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{value} is outside {min}..={max}")]
pub struct OutOfRange {
    pub value: i64,
    pub min: i64,
    pub max: i64,
}

/// Deserializes an integer through `T`'s own range check. The check runs inside the
/// deserializer (not after it, as `#[serde(try_from)]` would), so a TOML error still knows
/// where the value is and can name its line and key.
pub(crate) struct IntegerVisitor<T>(std::marker::PhantomData<T>);

impl<T> IntegerVisitor<T> {
    pub(crate) fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T: TryFrom<i64, Error = OutOfRange>> serde::de::Visitor<'_> for IntegerVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<T, E> {
        T::try_from(value).map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<T, E> {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        T::try_from(value).map_err(E::custom)
    }
}

/// Deserializes a string through `T`'s `FromStr`, inside the deserializer (see
/// [`IntegerVisitor`]).
struct TextVisitor<T>(std::marker::PhantomData<T>);

impl<T: FromStr<Err = String>> serde::de::Visitor<'_> for TextVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
        text.parse().map_err(E::custom)
    }
}

/// Declares an integer setting that only ever holds values in `MIN..=MAX`; serde and
/// `FromStr` go through the same check.
macro_rules! bounded_setting {
    ($(#[$doc:meta])* $name:ident($inner:ty) in $min:literal..=$max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ::serde::Serialize)]
        #[serde(into = "i64")]
        pub struct $name($inner);

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_i64($crate::settings::IntegerVisitor::<Self>::new())
            }
        }

        impl $name {
            pub const MIN: $inner = $min;
            pub const MAX: $inner = $max;

            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl TryFrom<i64> for $name {
            type Error = $crate::settings::OutOfRange;
            fn try_from(value: i64) -> Result<Self, $crate::settings::OutOfRange> {
                <$inner>::try_from(value)
                    .ok()
                    .filter(|v| (Self::MIN..=Self::MAX).contains(v))
                    .map(Self)
                    .ok_or($crate::settings::OutOfRange {
                        value,
                        min: i64::from(Self::MIN),
                        max: i64::from(Self::MAX),
                    })
            }
        }

        impl From<$name> for i64 {
            fn from(value: $name) -> i64 {
                i64::from(value.0)
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                let value: i64 = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("{text:?} is not a number"))?;
                Self::try_from(value).map_err(|e| e.to_string())
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
pub(crate) use bounded_setting;

bounded_setting!(
    /// Maximum concurrent jobs; 0 leaves distccd's default (cores + 2).
    Jobs(u32) in 0..=1024
);
bounded_setting!(
    /// Niceness of compiles (distccd runs unprivileged and cannot go below 0).
    Nice(u8) in 0..=19
);
bounded_setting!(
    /// A TCP port.
    Port(u16) in 1..=65535
);
bounded_setting!(
    /// Kill compiles running longer than this many seconds; 0 means no limit.
    JobLifetimeSecs(u32) in 0..=604_800
);

/// One allowlist entry: a network without host bits. A bare address means that host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor(std::marker::PhantomData))
    }
}

impl Cidr {
    pub fn net(self) -> IpNet {
        self.0
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            if net.trunc() != net {
                return Err(format!(
                    "{text:?} has host bits set; did you mean {}?",
                    net.trunc()
                ));
            }
            return Ok(Self(net));
        }
        text.parse::<IpAddr>()
            .map(|addr| Self(IpNet::from(addr)))
            .map_err(|_| {
                format!("{text:?} is not a CIDR network (like 198.18.0.0/24) or an IP address")
            })
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> String {
        cidr.to_string()
    }
}

impl From<IpAddr> for Cidr {
    fn from(addr: IpAddr) -> Self {
        Self(IpNet::from(addr))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Networks, in the order given, each once: a repeated entry is folded into its first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<Cidr>", into = "Vec<Cidr>")]
pub struct Allowlist(Vec<Cidr>);

impl Allowlist {
    pub fn iter(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.0.iter().map(|c| c.net())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether some entry contains all of `net`.
    pub fn covers(&self, net: &IpNet) -> bool {
        self.iter().any(|outer| outer.contains(net))
    }

    /// Parse request entries; an error names the entry as `field[i]`.
    pub fn parse_entries<S: AsRef<str>>(
        entries: &[S],
        field: &str,
    ) -> Result<Self, InvalidSetting> {
        entries
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.as_ref()
                    .parse::<Cidr>()
                    .map_err(|m| InvalidSetting::new(format!("{field}[{i}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::from)
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl From<Vec<Cidr>> for Allowlist {
    fn from(entries: Vec<Cidr>) -> Self {
        let mut folded: Vec<Cidr> = Vec::with_capacity(entries.len());
        for entry in entries {
            if !folded.contains(&entry) {
                folded.push(entry);
            }
        }
        Self(folded)
    }
}

impl From<Allowlist> for Vec<Cidr> {
    fn from(list: Allowlist) -> Self {
        list.0
    }
}

impl FromIterator<IpNet> for Allowlist {
    fn from_iter<I: IntoIterator<Item = IpNet>>(nets: I) -> Self {
        Self::from(nets.into_iter().map(Cidr).collect::<Vec<_>>())
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_strings().join(", "))
    }
}

/// The settings of distccd that the agent manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistccdSettings {
    /// Networks admitted to send compiles. Never empty once validated: distccd without
    /// `--allow` admits every private network, which is wider than any operator asked for.
    pub allow: Allowlist,
    pub jobs: Jobs,
    pub nice: Nice,
    /// Address distccd binds.
    pub listen: IpAddr,
    pub port: Port,
    /// Serve distccd's `--stats` page (the agent reads its statistics there).
    pub stats: bool,
    pub stats_port: Port,
    pub job_lifetime_secs: JobLifetimeSecs,
}

impl Default for DistccdSettings {
    fn default() -> Self {
        Self {
            allow: Allowlist::default(),
            jobs: Jobs(0),
            nice: Nice(10),
            listen: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: Port(3632),
            stats: true,
            stats_port: Port(3633),
            job_lifetime_secs: JobLifetimeSecs(0),
        }
    }
}

/// What requests may set the allowlist to. Comes from the agent's config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowPolicy {
    /// Every allowlist entry must lie inside one of these networks.
    pub allow_within: Allowlist,
    /// Whether networks outside the private, loopback, link-local and benchmarking
    /// ranges may be admitted at all.
    pub permit_public: bool,
    /// At most this many allowlist entries (after folding duplicates).
    pub max_allow_entries: usize,
}

impl AllowPolicy {
    pub const DEFAULT_MAX_ALLOW_ENTRIES: usize = 64;
}

/// A setting that cannot be applied; `field` names it as the RPC and config do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct InvalidSetting {
    pub field: String,
    pub message: String,
}

impl InvalidSetting {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Networks that are not reachable from the public internet. An allowlist entry outside
/// all of them admits strangers, which needs `permit_public`.
fn non_public_ranges() -> [IpNet; 10] {
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "198.18.0.0/15",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    ]
    .map(|net| net.parse().expect("constant network parses"))
}

/// True when `net` lies inside the private, loopback, link-local, CGNAT or benchmarking
/// ranges.
pub fn is_non_public(net: &IpNet) -> bool {
    non_public_ranges().iter().any(|range| range.contains(net))
}

impl AllowPolicy {
    /// Check that the policy itself is sane: no public ceiling unless permitted.
    pub fn validate(&self, field: &str) -> Result<(), InvalidSetting> {
        for (i, net) in self.allow_within.iter().enumerate() {
            check_not_public(&net, self.permit_public, &format!("{field}[{i}]"))?;
        }
        Ok(())
    }

    /// Check one allowlist; `field` prefixes the index of a bad entry.
    pub fn check_allow(&self, allow: &Allowlist, field: &str) -> Result<(), InvalidSetting> {
        if allow.len() > self.max_allow_entries {
            return Err(InvalidSetting::new(
                field,
                format!(
                    "{} entries (duplicates folded) is more than the {} the agent's policy permits (max_allow_entries)",
                    allow.len(),
                    self.max_allow_entries
                ),
            ));
        }
        for (i, net) in allow.iter().enumerate() {
            let at = format!("{field}[{i}]");
            check_not_public(&net, self.permit_public, &at)?;
            if !self.allow_within.covers(&net) {
                return Err(InvalidSetting::new(
                    at,
                    format!(
                        "{net} is wider than the agent's policy permits (allow_within = [{}])",
                        self.allow_within
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn check_not_public(net: &IpNet, permit_public: bool, field: &str) -> Result<(), InvalidSetting> {
    // A dual-stack socket shows IPv4 clients as `::ffff:a.b.c.d`: an IPv6 network holding
    // all of ::ffff:0:0/96 (`::/80`, `::/1`...) admits every IPv4 address (found by the
    // allow_policy fuzz target).
    let all_ipv4_mapped: IpNet = "::ffff:0:0/96".parse().expect("constant network parses");
    if net.prefix_len() == 0 || net.contains(&all_ipv4_mapped) {
        return Err(InvalidSetting::new(
            field,
            format!("{net} admits the whole internet; distccd would run compilers for anyone"),
        ));
    }
    if !permit_public && !is_non_public(net) {
        return Err(InvalidSetting::new(
            field,
            format!(
                "{net} is a public range; set [policy] permit_public = true in the agent config to allow it"
            ),
        ));
    }
    Ok(())
}

/// `value` into the setting type `T`, or an error naming `field`.
fn setting<T: TryFrom<i64, Error = OutOfRange>>(
    value: impl Into<i64>,
    field: &str,
) -> Result<T, InvalidSetting> {
    T::try_from(value.into()).map_err(|e| InvalidSetting::new(field, e.to_string()))
}

impl DistccdSettings {
    /// The checks no single value can make: a non-empty allowlist inside `policy`, and
    /// distinct ports.
    pub fn validate(&self, policy: &AllowPolicy) -> Result<(), InvalidSetting> {
        if self.allow.is_empty() {
            return Err(InvalidSetting::new(
                "allow",
                "is empty; distccd would then admit every private network. Name the builders' networks",
            ));
        }
        policy.check_allow(&self.allow, "allow")?;
        if self.stats && self.stats_port == self.port {
            return Err(InvalidSetting::new(
                "stats_port",
                format!("{} is also distccd's compile port", self.stats_port),
            ));
        }
        Ok(())
    }

    /// These settings with a Configure request's fields applied; unset fields keep their
    /// value. Errors name the request's field. Not yet checked against the policy.
    pub fn patched(&self, request: &pb::ConfigureRequest) -> Result<Self, InvalidSetting> {
        let mut next = self.clone();
        if let Some(allow) = &request.allow {
            next.allow = Allowlist::parse_entries(&allow.cidrs, "allow")?;
        }
        if let Some(jobs) = request.jobs {
            next.jobs = setting(jobs, "jobs")?;
        }
        if let Some(nice) = request.nice {
            next.nice = setting(nice, "nice")?;
        }
        if let Some(listen) = &request.listen {
            next.listen = listen.parse().map_err(|_| {
                InvalidSetting::new("listen", format!("{listen:?} is not an IP address"))
            })?;
        }
        if let Some(port) = request.port {
            next.port = setting(port, "port")?;
        }
        if let Some(stats) = request.stats {
            next.stats = stats;
        }
        if let Some(port) = request.stats_port {
            next.stats_port = setting(port, "stats_port")?;
        }
        if let Some(secs) = request.job_lifetime_secs {
            next.job_lifetime_secs = setting(secs, "job_lifetime_secs")?;
        }
        Ok(next)
    }

    /// The allowlist distccd gets: the operator's plus the worker's own address the agent
    /// connects from to read the stats page (loopback, or the listen address itself).
    pub fn effective_allow(&self) -> Allowlist {
        let mut allow: Vec<IpNet> = self.allow.iter().collect();
        if self.stats {
            let own = IpNet::from(self.agent_connect_addr());
            if !self.allow.covers(&own) {
                allow.push(own);
            }
        }
        allow.into_iter().collect()
    }

    /// Where the agent reaches distccd on this host.
    pub fn agent_connect_addr(&self) -> IpAddr {
        match self.listen {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            addr => addr,
        }
    }

    /// distccd's arguments after `--no-detach --daemon --log-stderr`. Its `--allow` is the
    /// policy bound, not the allowlist: the kernel filter narrows it (see
    /// [`crate::confinement`]), so allowlist changes inside the policy need no restart.
    pub fn to_args(&self, policy: &AllowPolicy) -> Vec<String> {
        let mut args = Vec::new();
        for net in crate::confinement::distccd_allow_bound(self, policy) {
            args.push("--allow".to_owned());
            args.push(net.to_string());
        }
        if self.jobs.get() > 0 {
            args.extend(["--jobs".to_owned(), self.jobs.to_string()]);
        }
        args.extend(["--nice".to_owned(), self.nice.to_string()]);
        args.extend(["--listen".to_owned(), self.listen.to_string()]);
        args.extend(["--port".to_owned(), self.port.to_string()]);
        if self.stats {
            args.push("--stats".to_owned());
            args.extend(["--stats-port".to_owned(), self.stats_port.to_string()]);
        }
        if self.job_lifetime_secs.get() > 0 {
            args.extend([
                "--job-lifetime".to_owned(),
                self.job_lifetime_secs.to_string(),
            ]);
        }
        args
    }
}

impl From<&DistccdSettings> for pb::DistccdSettings {
    fn from(s: &DistccdSettings) -> Self {
        pb::DistccdSettings {
            allow: s.allow.to_strings(),
            jobs: s.jobs.get(),
            nice: i32::from(s.nice.get()),
            listen: s.listen.to_string(),
            port: u32::from(s.port.get()),
            stats: s.stats,
            stats_port: u32::from(s.stats_port.get()),
            job_lifetime_secs: s.job_lifetime_secs.get(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Allowlist {
        list.iter().map(|s| net(s)).collect()
    }

    fn policy() -> AllowPolicy {
        AllowPolicy {
            allow_within: nets(&["198.18.0.0/15"]),
            permit_public: false,
            max_allow_entries: AllowPolicy::DEFAULT_MAX_ALLOW_ENTRIES,
        }
    }

    fn valid() -> DistccdSettings {
        DistccdSettings {
            allow: nets(&["198.18.0.0/24"]),
            jobs: Jobs(4),
            ..Default::default()
        }
    }

    #[test]
    fn valid_settings_pass() {
        valid().validate(&policy()).unwrap();
    }

    #[test]
    fn empty_allowlist_is_refused() {
        let s = DistccdSettings {
            allow: Allowlist::default(),
            ..valid()
        };
        assert_eq!(s.validate(&policy()).unwrap_err().field, "allow");
    }

    #[test]
    fn whole_internet_is_refused_even_when_public_is_permitted() {
        let policy = AllowPolicy {
            allow_within: nets(&["0.0.0.0/0"]),
            permit_public: true,
            ..policy()
        };
        let err = policy.validate("policy.allow_within").unwrap_err();
        assert_eq!(err.field, "policy.allow_within[0]");
        let s = DistccdSettings {
            allow: nets(&["0.0.0.0/0"]),
            ..valid()
        };
        assert_eq!(s.validate(&policy).unwrap_err().field, "allow[0]");
    }

    #[test]
    fn every_ipv4_address_as_mapped_ipv6_is_the_whole_internet_too() {
        for wide in ["::ffff:0:0/96", "::/80", "::/1"] {
            let policy = AllowPolicy {
                allow_within: nets(&[wide]),
                permit_public: true,
                ..policy()
            };
            let err = policy.validate("policy.allow_within").unwrap_err();
            assert!(err.message.contains("whole internet"), "{wide}: {err}");
        }
        // A mapped subnet is one IPv4 range like any other (public: needs permission).
        let mapped = AllowPolicy {
            allow_within: nets(&["::ffff:203.0.113.0/120"]),
            permit_public: true,
            ..policy()
        };
        mapped.validate("policy.allow_within").unwrap();
    }

    #[test]
    fn public_range_needs_permission() {
        let wide = AllowPolicy {
            allow_within: nets(&["8.8.8.0/24"]),
            ..policy()
        };
        assert!(wide.validate("policy.allow_within").is_err());
        let permitted = AllowPolicy {
            permit_public: true,
            ..wide
        };
        permitted.validate("policy.allow_within").unwrap();
        let s = DistccdSettings {
            allow: nets(&["8.8.8.0/25"]),
            ..valid()
        };
        s.validate(&permitted).unwrap();
    }

    #[test]
    fn allowlist_cannot_leave_the_policy() {
        let s = DistccdSettings {
            allow: nets(&["198.18.0.0/24", "10.0.0.0/8"]),
            ..valid()
        };
        let err = s.validate(&policy()).unwrap_err();
        assert_eq!(err.field, "allow[1]");
        assert!(err.message.contains("wider than"), "{err}");
    }

    #[test]
    fn duplicates_are_folded_and_the_count_is_capped() {
        let many: Vec<String> = (0..2000).map(|_| "198.18.0.7".to_owned()).collect();
        let folded = Allowlist::parse_entries(&many, "allow").unwrap();
        assert_eq!(folded, nets(&["198.18.0.7/32"]));
        let distinct: Vec<String> = (0..65).map(|i| format!("198.18.0.{i}")).collect();
        let s = DistccdSettings {
            allow: Allowlist::parse_entries(&distinct, "allow").unwrap(),
            ..valid()
        };
        let err = s.validate(&policy()).unwrap_err();
        assert_eq!(err.field, "allow");
        assert!(err.message.contains("max_allow_entries"), "{err}");
    }

    #[test]
    fn values_are_checked_where_they_are_made() {
        assert_eq!(
            Nice::try_from(20).unwrap_err(),
            OutOfRange {
                value: 20,
                min: 0,
                max: 19
            }
        );
        assert!(Nice::try_from(-1).is_err());
        assert!(Port::try_from(0).is_err());
        assert!(Port::try_from(65536).is_err());
        assert!(Jobs::try_from(1025).is_err());
        assert_eq!("19".parse::<Nice>().unwrap().get(), 19);
        assert_eq!(
            "lots".parse::<Nice>().unwrap_err(),
            "\"lots\" is not a number"
        );
        let same_ports = DistccdSettings {
            stats_port: Port(3632),
            ..valid()
        };
        assert_eq!(
            same_ports.validate(&policy()).unwrap_err().field,
            "stats_port"
        );
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            "198.18.0.7".parse::<Cidr>().unwrap().net(),
            net("198.18.0.7/32")
        );
        assert!(
            "198.18.0.7/24"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("198.18.0.0/24")
        );
        assert!("nonsense".parse::<Cidr>().is_err());
        assert!("198.18.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn a_request_patches_only_what_it_sets() {
        let request = pb::ConfigureRequest {
            jobs: Some(8),
            allow: Some(pb::AllowList {
                cidrs: vec!["198.18.0.0/25".into()],
            }),
            ..Default::default()
        };
        let next = valid().patched(&request).unwrap();
        assert_eq!(next.jobs, Jobs(8));
        assert_eq!(next.allow, nets(&["198.18.0.0/25"]));
        assert_eq!(next.nice, valid().nice);
        for (request, field) in [
            (
                pb::ConfigureRequest {
                    nice: Some(40),
                    ..Default::default()
                },
                "nice",
            ),
            (
                pb::ConfigureRequest {
                    port: Some(70000),
                    ..Default::default()
                },
                "port",
            ),
            (
                pb::ConfigureRequest {
                    listen: Some("nowhere".into()),
                    ..Default::default()
                },
                "listen",
            ),
            (
                pb::ConfigureRequest {
                    allow: Some(pb::AllowList {
                        cidrs: vec!["198.18.0.0/24".into(), "bogus".into()],
                    }),
                    ..Default::default()
                },
                "allow[1]",
            ),
        ] {
            assert_eq!(valid().patched(&request).unwrap_err().field, field);
        }
    }

    #[test]
    fn command_line_includes_own_address_for_stats() {
        let args = valid().to_args(&policy()).join(" ");
        assert_eq!(
            args,
            "--allow 198.18.0.0/15 --allow 127.0.0.1/32 --jobs 4 --nice 10 --listen 0.0.0.0 \
             --port 3632 --stats --stats-port 3633",
            "distccd's own --allow is the policy's bound (allow_within), not the allowlist"
        );
        let specific = DistccdSettings {
            listen: "198.18.0.11".parse().unwrap(),
            ..valid()
        };
        // The listen address is inside the allowlist already: nothing is added.
        assert_eq!(specific.effective_allow(), nets(&["198.18.0.0/24"]));
        let no_stats = DistccdSettings {
            stats: false,
            job_lifetime_secs: JobLifetimeSecs(60),
            jobs: Jobs(0),
            ..valid()
        };
        assert_eq!(
            no_stats.to_args(&policy()).join(" "),
            "--allow 198.18.0.0/15 --nice 10 --listen 0.0.0.0 --port 3632 --job-lifetime 60"
        );
    }

    #[test]
    fn json_round_trips_and_rejects_bad_values() {
        let s = DistccdSettings {
            allow: nets(&["198.18.0.0/24", "10.1.0.0/16"]),
            jobs: Jobs(7),
            nice: Nice(3),
            listen: "198.18.0.11".parse().unwrap(),
            port: Port(4000),
            stats: false,
            stats_port: Port(4001),
            job_lifetime_secs: JobLifetimeSecs(120),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<DistccdSettings>(&json).unwrap(), s);
        let err = serde_json::from_str::<DistccdSettings>(r#"{"nice": 40}"#).unwrap_err();
        assert!(err.to_string().contains("40 is outside 0..=19"), "{err}");
        assert!(serde_json::from_str::<DistccdSettings>(r#"{"nicenes": 4}"#).is_err());
    }
}
