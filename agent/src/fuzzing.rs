//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, nightly) and of the tests that
//! replay their seeds and regressions on stable (`tests/fuzz_regressions.rs`). Each takes
//! arbitrary bytes, must not panic, and panics when an invariant of what it parsed breaks
//! (libFuzzer reports a panic as a crash).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use distcc_config_file::ConfigError;
use distcc_proto::v1 as pb;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prost::Message;

use crate::config::AgentConfig;
use crate::settings::{AllowPolicy, Allowlist, Cidr, DistccdSettings};
use crate::settings_store::Persisted;
use crate::stats::{DistccdStats, StatsError};

/// distccd's `--stats` page of any content (as [`DistccdStats::fetch`] reads it: at most
/// 64 KiB, lossy UTF-8): parses or fails with a typed error; what parses has `dcc_` keys
/// without whitespace and finite numbers, and counters that are never negative.
pub fn stats_page(data: &[u8]) {
    let page = String::from_utf8_lossy(&data[..data.len().min(64 * 1024)]);
    match DistccdStats::parse(&page) {
        Ok(stats) => {
            for (key, value) in &stats.values {
                assert!(key.starts_with("dcc_") && !key.contains(char::is_whitespace));
                assert!(value.is_finite(), "{key} = {value}");
                let _ = stats.counter(key);
            }
            for key in stats.text.keys() {
                assert!(key.starts_with("dcc_") && !key.contains(char::is_whitespace));
            }
            // A key the page does not have reads as 0 (the page may have any key, so the
            // absent one is made up from the keys it has).
            let absent = format!("dcc_{}", stats.values.len() + stats.text.len());
            let absent = format!("{absent}{}", "_".repeat(page.len()));
            assert_eq!(stats.counter(&absent), 0);
        }
        Err(StatsError::BadLine { line, .. }) => {
            assert!(line >= 2 && line <= page.lines().count(), "line {line}");
        }
        Err(StatsError::NoSection | StatsError::Unterminated) => {}
        Err(e @ StatsError::Fetch { .. }) => panic!("parse cannot fail to fetch: {e}"),
    }
}

/// Reads fuzz bytes as a sequence of small values; past the end every read is 0.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    fn byte(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    /// An IPv4 or IPv6 network, host bits cleared (as [`Cidr`] admits them).
    fn net(&mut self) -> IpNet {
        let head = self.byte();
        let net = if head & 1 == 0 {
            let prefix = self.byte() % 33;
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(self.take::<4>()), prefix).expect("prefix <= 32"))
        } else {
            let prefix = self.byte() % 129;
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(self.take::<16>()), prefix).expect("prefix <= 128"),
            )
        };
        net.trunc()
    }
}

/// An address range in one 128-bit space: IPv6 as is, IPv4 as its IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`), which is how a dual-stack socket shows an IPv4 client.
/// Computed with integer masks only, independently of `ipnet`'s `contains`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    first: u128,
    last: u128,
}

const V4_MAPPED: u128 = 0xffff_u128 << 32;
/// Every IPv4 address, as mapped addresses.
const ALL_V4: Range = Range {
    first: V4_MAPPED,
    last: V4_MAPPED | 0xffff_ffff,
};
const ALL_V6: Range = Range {
    first: 0,
    last: u128::MAX,
};

impl Range {
    fn of(net: &IpNet) -> Self {
        let (bits, width, prefix, base) = match net {
            IpNet::V4(n) => (
                u128::from(u32::from(n.addr())),
                32,
                n.prefix_len(),
                V4_MAPPED,
            ),
            IpNet::V6(n) => (u128::from(n.addr()), 128, n.prefix_len(), 0),
        };
        let host_bits = u32::from(width - prefix);
        let host_mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        Self {
            first: base | (bits & !host_mask),
            last: base | bits | host_mask,
        }
    }

    fn v4(a: [u8; 4], prefix: u32) -> Self {
        let first = u128::from(u32::from_be_bytes(a));
        let size = 1u128 << (32 - prefix);
        Self {
            first: V4_MAPPED | first,
            last: V4_MAPPED | (first + size - 1),
        }
    }

    fn v6(top16: u16, prefix: u32) -> Self {
        let first = u128::from(top16) << 112;
        let size_minus_1 = (1u128 << (128 - prefix)) - 1;
        Self {
            first,
            last: first | size_minus_1,
        }
    }

    fn within(self, outer: Self) -> bool {
        outer.first <= self.first && self.last <= outer.last
    }
}

/// The ranges the policy treats as not public, written out independently of
/// `settings::is_non_public` (RFC 1918, loopback, link-local, CGNAT, RFC 2544, ULA,
/// IPv6 link-local and loopback).
fn non_public_oracle() -> [Range; 10] {
    [
        Range::v4([10, 0, 0, 0], 8),
        Range::v4([172, 16, 0, 0], 12),
        Range::v4([192, 168, 0, 0], 16),
        Range::v4([127, 0, 0, 0], 8),
        Range::v4([169, 254, 0, 0], 16),
        Range::v4([100, 64, 0, 0], 10),
        Range::v4([198, 18, 0, 0], 15),
        Range::v6(0xfc00, 7),
        Range::v6(0xfe80, 10),
        Range { first: 1, last: 1 },
    ]
}

/// Why the oracle refuses `net` as an allowlist entry or policy ceiling, if it does.
fn oracle_refuses(net: &IpNet, permit_public: bool) -> Option<&'static str> {
    let range = Range::of(net);
    if ALL_V4.within(range) || ALL_V6.within(range) {
        return Some("admits every IPv4 or every IPv6 address");
    }
    if !permit_public && !non_public_oracle().iter().any(|r| range.within(*r)) {
        return Some("public without permit_public");
    }
    None
}

/// The allowlist policy, differentially: networks from the fuzz bytes form an
/// `allow_within` ceiling and a requested allowlist; whenever the agent's validation
/// accepts them, an independent 128-bit range check must agree that every entry lies
/// inside the ceiling, admits neither the whole IPv4 nor the whole IPv6 internet (also
/// not through IPv4-mapped IPv6), and is non-public unless `permit_public`. Every
/// network's text also parses back to itself.
pub fn allow_policy(data: &[u8]) {
    let mut bytes = Bytes(data);
    let permit_public = bytes.byte() & 1 == 1;
    let (mut within, mut allow) = (Vec::new(), Vec::new());
    while !bytes.is_empty() && within.len() + allow.len() < 64 {
        let to_ceiling = bytes.byte() & 1 == 0;
        let net = bytes.net();
        let text = net.to_string();
        assert_eq!(
            text.parse::<Cidr>().map(Cidr::net),
            Ok(net),
            "{text} does not parse back"
        );
        if to_ceiling { &mut within } else { &mut allow }.push(net);
    }
    let allow: Allowlist = allow.into_iter().collect();
    let policy = AllowPolicy {
        allow_within: within.into_iter().collect(),
        permit_public,
        max_allow_entries: AllowPolicy::DEFAULT_MAX_ALLOW_ENTRIES,
    };
    if policy.validate("policy").is_err() || policy.check_allow(&allow, "allow").is_err() {
        return;
    }
    for net in policy.allow_within.iter() {
        if let Some(why) = oracle_refuses(&net, permit_public) {
            panic!("ceiling {net} accepted, but it {why} ({policy:?})");
        }
    }
    for net in allow.iter() {
        if let Some(why) = oracle_refuses(&net, permit_public) {
            panic!("allow {net} accepted, but it {why} ({policy:?})");
        }
        let range = Range::of(&net);
        assert!(
            policy
                .allow_within
                .iter()
                .any(|outer| range.within(Range::of(&outer))),
            "allow {net} accepted outside the ceiling {:?}",
            policy.allow_within
        );
    }
}

/// Settings persistence and the Configure patch: the fuzz bytes as a `ConfigureRequest`
/// (prost) patch a valid baseline; what validates (under a policy that admits its
/// allowlist) is persisted as `settings.json` is, read back equal, and renders distccd's
/// arguments. The same bytes as `settings.json` text either fail to parse or read as
/// settings that round-trip themselves.
pub fn settings_round_trip(data: &[u8]) {
    let baseline = DistccdSettings {
        allow: ["198.18.0.0/24".parse::<IpNet>().expect("constant network")]
            .into_iter()
            .collect(),
        ..DistccdSettings::default()
    };
    if let Ok(request) = pb::ConfigureRequest::decode(data)
        && let Ok(next) = baseline.patched(&request)
    {
        let policy = AllowPolicy {
            allow_within: next.allow.clone(),
            permit_public: true,
            max_allow_entries: usize::MAX,
        };
        if next.validate(&policy).is_ok() {
            let generation = request.expected_generation.unwrap_or(0);
            assert_round_trip(&Persisted {
                generation,
                settings: next.clone(),
            });
            let args = next.to_args(&policy);
            assert!(
                args.iter()
                    .all(|a| !a.is_empty() && !a.contains(char::is_whitespace))
            );
            let _ = pb::DistccdSettings::from(&next);
        }
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(persisted) = serde_json::from_str::<Persisted>(text)
    {
        assert_round_trip(&persisted);
    }
}

fn assert_round_trip(persisted: &Persisted) {
    let json = serde_json::to_string_pretty(persisted).expect("settings serialize");
    let read: Persisted = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("written settings do not read back: {e}\n{json}"));
    assert_eq!(&read, persisted, "{json}");
}

/// `agent.toml` text of any content: parses or fails with an error naming a line inside
/// the text; what parses holds a policy that validates and `[distccd]` settings inside it.
/// (The token files it names are read from disk: most inputs stop there, with an error.)
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match AgentConfig::parse(Path::new("agent.toml"), text) {
        Ok(config) => {
            config
                .policy
                .validate("policy.allow_within")
                .expect("a loaded policy validates");
            if !config.distccd.allow.is_empty() {
                config
                    .distccd
                    .validate(&config.policy)
                    .expect("loaded settings validate against the loaded policy");
            }
            assert!(config.unit.ends_with(".service"), "{}", config.unit);
        }
        Err(ConfigError::Invalid { line, message, .. }) => {
            assert!(line >= 1 && line <= text.lines().count() + 1, "line {line}");
            assert!(!message.is_empty());
        }
        Err(ConfigError::Read { .. }) => unreachable!("the text is given"),
    }
}
