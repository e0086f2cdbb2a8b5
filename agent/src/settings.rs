//! distccd's settings: validation against the operator's policy, the command line they
//! become, and the environment file `distccd.service` reads them from.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::IpNet;
use thiserror::Error;

/// The settings of distccd that the agent manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistccdSettings {
    /// Networks admitted to send compiles. Never empty once validated: distccd without
    /// `--allow` admits every private network, which is wider than any operator asked for.
    pub allow: Vec<IpNet>,
    /// Maximum concurrent jobs; 0 leaves distccd's default (cores + 2).
    pub jobs: u32,
    /// Niceness of compiles, 0..=19 (distccd runs unprivileged and cannot go below 0).
    pub nice: i32,
    /// Address distccd binds.
    pub listen: IpAddr,
    pub port: u16,
    /// Serve distccd's `--stats` page (the agent reads its statistics there).
    pub stats: bool,
    pub stats_port: u16,
    /// Kill compiles running longer than this; 0 means no limit.
    pub job_lifetime_secs: u32,
}

impl Default for DistccdSettings {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            jobs: 0,
            nice: 10,
            listen: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 3632,
            stats: true,
            stats_port: 3633,
            job_lifetime_secs: 0,
        }
    }
}

/// What requests may set the allowlist to. Comes from the agent's config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowPolicy {
    /// Every allowlist entry must lie inside one of these networks.
    pub allow_within: Vec<IpNet>,
    /// Whether networks outside the private, loopback, link-local and benchmarking
    /// ranges may be admitted at all.
    pub permit_public: bool,
}

pub const MAX_JOBS: u32 = 1024;
pub const MAX_JOB_LIFETIME_SECS: u32 = 7 * 24 * 3600;

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

/// Parse one allowlist entry. A bare address means just that host.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("{text:?} is not a CIDR network (like 198.18.0.0/24) or an IP address")
    })
}

impl AllowPolicy {
    /// Check that the policy itself is sane: no public ceiling unless permitted.
    pub fn validate(&self, field: &str) -> Result<(), InvalidSetting> {
        for (i, net) in self.allow_within.iter().enumerate() {
            check_not_public(net, self.permit_public, &format!("{field}[{i}]"))?;
        }
        Ok(())
    }

    /// Check one allowlist; `field` prefixes the index of a bad entry.
    pub fn check_allow(&self, allow: &[IpNet], field: &str) -> Result<(), InvalidSetting> {
        for (i, net) in allow.iter().enumerate() {
            let at = format!("{field}[{i}]");
            check_not_public(net, self.permit_public, &at)?;
            if !self.allow_within.iter().any(|outer| outer.contains(net)) {
                let within: Vec<String> =
                    self.allow_within.iter().map(ToString::to_string).collect();
                return Err(InvalidSetting::new(
                    at,
                    format!(
                        "{net} is wider than the agent's policy permits (allow_within = [{}])",
                        within.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn check_not_public(net: &IpNet, permit_public: bool, field: &str) -> Result<(), InvalidSetting> {
    if net.prefix_len() == 0 {
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

impl DistccdSettings {
    /// Validate every setting; `allow` against `policy`.
    pub fn validate(&self, policy: &AllowPolicy) -> Result<(), InvalidSetting> {
        if self.allow.is_empty() {
            return Err(InvalidSetting::new(
                "allow",
                "is empty; distccd would then admit every private network. Name the builders' networks",
            ));
        }
        policy.check_allow(&self.allow, "allow")?;
        if self.jobs > MAX_JOBS {
            return Err(InvalidSetting::new(
                "jobs",
                format!("{} is above {MAX_JOBS}", self.jobs),
            ));
        }
        if !(0..=19).contains(&self.nice) {
            return Err(InvalidSetting::new(
                "nice",
                format!(
                    "{} is outside 0..=19 (distccd runs unprivileged)",
                    self.nice
                ),
            ));
        }
        if self.port == 0 {
            return Err(InvalidSetting::new("port", "must be 1..=65535"));
        }
        if self.stats {
            if self.stats_port == 0 {
                return Err(InvalidSetting::new("stats_port", "must be 1..=65535"));
            }
            if self.stats_port == self.port {
                return Err(InvalidSetting::new(
                    "stats_port",
                    format!("{} is also distccd's compile port", self.stats_port),
                ));
            }
        }
        if self.job_lifetime_secs > MAX_JOB_LIFETIME_SECS {
            return Err(InvalidSetting::new(
                "job_lifetime_secs",
                format!(
                    "{} is above {MAX_JOB_LIFETIME_SECS}",
                    self.job_lifetime_secs
                ),
            ));
        }
        Ok(())
    }

    /// The allowlist distccd gets: the operator's plus the worker's own address the agent
    /// connects from to read the stats page (loopback, or the listen address itself).
    pub fn effective_allow(&self) -> Vec<IpNet> {
        let mut allow = self.allow.clone();
        if self.stats {
            let own = IpNet::from(self.agent_connect_addr());
            if !allow.iter().any(|net| net.contains(&own)) {
                allow.push(own);
            }
        }
        allow
    }

    /// Where the agent reaches distccd on this host.
    pub fn agent_connect_addr(&self) -> IpAddr {
        match self.listen {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            addr => addr,
        }
    }

    /// distccd's arguments after `--no-detach --daemon --log-stderr`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for net in self.effective_allow() {
            args.push("--allow".to_owned());
            args.push(net.to_string());
        }
        if self.jobs > 0 {
            args.push("--jobs".to_owned());
            args.push(self.jobs.to_string());
        }
        args.extend(["--nice".to_owned(), self.nice.to_string()]);
        args.extend(["--listen".to_owned(), self.listen.to_string()]);
        args.extend(["--port".to_owned(), self.port.to_string()]);
        if self.stats {
            args.push("--stats".to_owned());
            args.extend(["--stats-port".to_owned(), self.stats_port.to_string()]);
        }
        if self.job_lifetime_secs > 0 {
            args.extend([
                "--job-lifetime".to_owned(),
                self.job_lifetime_secs.to_string(),
            ]);
        }
        args
    }

    /// The environment file `distccd.service` reads. Each setting has its own variable, so
    /// the agent can read the file back; `DISTCCD_OPTS` is what `ExecStart=` expands.
    pub fn to_env_file(&self) -> String {
        let allow: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
        let mut out = String::from(
            "# Written by distcc-agent. Change settings with its Configure RPC or in\n\
             # /etc/distcc-agent/agent.toml; edits here are overwritten.\n",
        );
        let mut var = |key: &str, value: String| {
            let _ = writeln!(out, "{key}=\"{value}\"");
        };
        var(ENV_ALLOW, allow.join(" "));
        var(ENV_JOBS, self.jobs.to_string());
        var(ENV_NICE, self.nice.to_string());
        var(ENV_LISTEN, self.listen.to_string());
        var(ENV_PORT, self.port.to_string());
        var(ENV_STATS, if self.stats { "1" } else { "0" }.to_owned());
        var(ENV_STATS_PORT, self.stats_port.to_string());
        var(ENV_JOB_LIFETIME, self.job_lifetime_secs.to_string());
        var(ENV_OPTS, self.to_args().join(" "));
        out
    }

    /// Read settings back from [`Self::to_env_file`]'s output. Errors name the line and key.
    pub fn from_env_file(path: &Path, text: &str) -> Result<Self, EnvFileError> {
        let mut vars: BTreeMap<&str, (usize, String)> = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let err = |message: String| EnvFileError {
                path: path.display().to_string(),
                line: index + 1,
                key: String::new(),
                message,
            };
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err("expected KEY=\"value\"".to_owned()))?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            vars.insert(key.trim(), (index + 1, value.to_owned()));
        }
        let mut settings = DistccdSettings::default();
        let field = |key: &'static str| -> Result<Option<(usize, &str)>, EnvFileError> {
            Ok(vars.get(key).map(|(line, value)| (*line, value.as_str())))
        };
        let bad = |key: &str, line: usize, message: String| EnvFileError {
            path: path.display().to_string(),
            line,
            key: key.to_owned(),
            message,
        };
        let number = |key: &'static str| -> Result<Option<i64>, EnvFileError> {
            match field(key)? {
                None => Ok(None),
                Some((line, value)) => value
                    .parse::<i64>()
                    .map(Some)
                    .map_err(|_| bad(key, line, format!("{value:?} is not a number"))),
            }
        };
        let in_range = |key: &'static str, value: i64, max: i64| -> Result<i64, EnvFileError> {
            if (0..=max).contains(&value) {
                Ok(value)
            } else {
                let line = vars.get(key).map_or(0, |(line, _)| *line);
                Err(bad(key, line, format!("{value} is outside 0..={max}")))
            }
        };
        if let Some((line, value)) = field(ENV_ALLOW)? {
            settings.allow = value
                .split_whitespace()
                .map(|cidr| parse_cidr(cidr).map_err(|message| bad(ENV_ALLOW, line, message)))
                .collect::<Result<_, _>>()?;
        }
        if let Some(jobs) = number(ENV_JOBS)? {
            settings.jobs = in_range(ENV_JOBS, jobs, i64::from(MAX_JOBS))? as u32;
        }
        if let Some(nice) = number(ENV_NICE)? {
            settings.nice = in_range(ENV_NICE, nice, 19)? as i32;
        }
        if let Some((line, value)) = field(ENV_LISTEN)? {
            settings.listen = value
                .parse()
                .map_err(|_| bad(ENV_LISTEN, line, format!("{value:?} is not an IP address")))?;
        }
        if let Some(port) = number(ENV_PORT)? {
            settings.port = in_range(ENV_PORT, port, 65535)? as u16;
        }
        if let Some(stats) = number(ENV_STATS)? {
            settings.stats = in_range(ENV_STATS, stats, 1)? == 1;
        }
        if let Some(port) = number(ENV_STATS_PORT)? {
            settings.stats_port = in_range(ENV_STATS_PORT, port, 65535)? as u16;
        }
        if let Some(secs) = number(ENV_JOB_LIFETIME)? {
            settings.job_lifetime_secs =
                in_range(ENV_JOB_LIFETIME, secs, i64::from(MAX_JOB_LIFETIME_SECS))? as u32;
        }
        Ok(settings)
    }
}

const ENV_ALLOW: &str = "DISTCCD_ALLOW";
const ENV_JOBS: &str = "DISTCCD_JOBS";
const ENV_NICE: &str = "DISTCCD_NICE";
const ENV_LISTEN: &str = "DISTCCD_LISTEN";
const ENV_PORT: &str = "DISTCCD_PORT";
const ENV_STATS: &str = "DISTCCD_STATS";
const ENV_STATS_PORT: &str = "DISTCCD_STATS_PORT";
const ENV_JOB_LIFETIME: &str = "DISTCCD_JOB_LIFETIME";
const ENV_OPTS: &str = "DISTCCD_OPTS";

/// The persisted settings file could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}:{line}: {key}: {message}")]
pub struct EnvFileError {
    pub path: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn policy() -> AllowPolicy {
        AllowPolicy {
            allow_within: vec![net("198.18.0.0/15")],
            permit_public: false,
        }
    }

    fn valid() -> DistccdSettings {
        DistccdSettings {
            allow: vec![net("198.18.0.0/24")],
            jobs: 4,
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
            allow: vec![],
            ..valid()
        };
        assert_eq!(s.validate(&policy()).unwrap_err().field, "allow");
    }

    #[test]
    fn whole_internet_is_refused_even_when_public_is_permitted() {
        let policy = AllowPolicy {
            allow_within: vec![net("0.0.0.0/0")],
            permit_public: true,
        };
        let err = policy.validate("policy.allow_within").unwrap_err();
        assert_eq!(err.field, "policy.allow_within[0]");
        let s = DistccdSettings {
            allow: vec![net("0.0.0.0/0")],
            ..valid()
        };
        assert_eq!(s.validate(&policy).unwrap_err().field, "allow[0]");
    }

    #[test]
    fn public_range_needs_permission() {
        let wide = AllowPolicy {
            allow_within: vec![net("8.8.8.0/24")],
            permit_public: false,
        };
        assert!(wide.validate("policy.allow_within").is_err());
        let permitted = AllowPolicy {
            permit_public: true,
            ..wide
        };
        permitted.validate("policy.allow_within").unwrap();
        let s = DistccdSettings {
            allow: vec![net("8.8.8.0/25")],
            ..valid()
        };
        s.validate(&permitted).unwrap();
    }

    #[test]
    fn allowlist_cannot_leave_the_policy() {
        let s = DistccdSettings {
            allow: vec![net("198.18.0.0/24"), net("10.0.0.0/8")],
            ..valid()
        };
        let err = s.validate(&policy()).unwrap_err();
        assert_eq!(err.field, "allow[1]");
        assert!(err.message.contains("wider than"), "{err}");
    }

    #[test]
    fn ranges_are_checked() {
        let p = policy();
        assert_eq!(
            DistccdSettings {
                nice: 20,
                ..valid()
            }
            .validate(&p)
            .unwrap_err()
            .field,
            "nice"
        );
        assert_eq!(
            DistccdSettings {
                nice: -1,
                ..valid()
            }
            .validate(&p)
            .unwrap_err()
            .field,
            "nice"
        );
        assert_eq!(
            DistccdSettings { port: 0, ..valid() }
                .validate(&p)
                .unwrap_err()
                .field,
            "port"
        );
        assert_eq!(
            DistccdSettings {
                stats_port: 3632,
                ..valid()
            }
            .validate(&p)
            .unwrap_err()
            .field,
            "stats_port"
        );
        assert_eq!(
            DistccdSettings {
                jobs: MAX_JOBS + 1,
                ..valid()
            }
            .validate(&p)
            .unwrap_err()
            .field,
            "jobs"
        );
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("198.18.0.7").unwrap(), net("198.18.0.7/32"));
        assert!(
            parse_cidr("198.18.0.7/24")
                .unwrap_err()
                .contains("198.18.0.0/24")
        );
        assert!(parse_cidr("nonsense").is_err());
        assert!(parse_cidr("198.18.0.0/33").is_err());
    }

    #[test]
    fn command_line_includes_own_address_for_stats() {
        let args = valid().to_args().join(" ");
        assert_eq!(
            args,
            "--allow 198.18.0.0/24 --allow 127.0.0.1/32 --jobs 4 --nice 10 --listen 0.0.0.0 \
             --port 3632 --stats --stats-port 3633"
        );
        let specific = DistccdSettings {
            listen: "198.18.0.11".parse().unwrap(),
            ..valid()
        };
        // The listen address is inside the allowlist already: nothing is added.
        assert_eq!(specific.effective_allow(), vec![net("198.18.0.0/24")]);
        let no_stats = DistccdSettings {
            stats: false,
            job_lifetime_secs: 60,
            jobs: 0,
            ..valid()
        };
        assert_eq!(
            no_stats.to_args().join(" "),
            "--allow 198.18.0.0/24 --nice 10 --listen 0.0.0.0 --port 3632 --job-lifetime 60"
        );
    }

    #[test]
    fn env_file_round_trips() {
        let s = DistccdSettings {
            allow: vec![net("198.18.0.0/24"), net("10.1.0.0/16")],
            jobs: 7,
            nice: 3,
            listen: "198.18.0.11".parse().unwrap(),
            port: 4000,
            stats: false,
            stats_port: 4001,
            job_lifetime_secs: 120,
        };
        let text = s.to_env_file();
        assert_eq!(
            DistccdSettings::from_env_file(Path::new("x"), &text).unwrap(),
            s
        );
        assert!(text.contains("DISTCCD_OPTS=\"--allow 198.18.0.0/24 --allow 10.1.0.0/16 --jobs 7"));
    }

    #[test]
    fn env_file_errors_name_line_and_key() {
        let text = "# c\nDISTCCD_ALLOW=\"198.18.0.0/24\"\nDISTCCD_NICE=\"lots\"\n";
        let err = DistccdSettings::from_env_file(Path::new("/s/distccd.env"), text).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (3, "DISTCCD_NICE"));
        assert_eq!(
            err.to_string(),
            "/s/distccd.env:3: DISTCCD_NICE: \"lots\" is not a number"
        );
        let err = DistccdSettings::from_env_file(Path::new("f"), "garbage\n").unwrap_err();
        assert_eq!(err.line, 1);
    }
}
