//! The agent's configuration file, `/etc/distcc-agent/agent.toml`.
//!
//! Parsed strictly (unknown keys are errors) into a raw form that keeps every value's
//! position, then validated into [`AgentConfig`]; every error names file, line and key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::settings::{AllowPolicy, DistccdSettings, parse_cidr};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/distcc-agent/agent.toml";
pub const DEFAULT_TOKEN_FILE: &str = "/etc/distcc-agent/token";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/distcc-agent";
pub const DEFAULT_UNIT: &str = "distccd.service";

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The bearer token every RPC but the health service must present.
    pub token: String,
    pub token_file: PathBuf,
    pub tls: Option<TlsConfig>,
    /// Where the agent writes distccd's environment file.
    pub state_dir: PathBuf,
    /// The systemd unit that runs distccd.
    pub unit: String,
    /// How often WatchStatus sends a status when nothing changes.
    pub status_interval: Duration,
    /// Bound on waiting for a systemd job and for distccd to come up.
    pub job_timeout: Duration,
    /// Where distccd's compiler masquerade links are.
    pub masquerade_dir: PathBuf,
    /// Where distccd's temporary files live, for free-space reports. distccd.service has
    /// a private /tmp, on the filesystem of the host's /tmp.
    pub distccd_tmpdir: PathBuf,
    pub policy: AllowPolicy,
    /// Settings distccd gets when the agent has none persisted yet.
    pub distccd: DistccdSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
    state_dir: Option<PathBuf>,
    unit: Option<Spanned<String>>,
    status_interval_secs: Option<Spanned<u64>>,
    job_timeout_secs: Option<Spanned<u64>>,
    masquerade_dir: Option<PathBuf>,
    distccd_tmpdir: Option<PathBuf>,
    tls: Option<RawTls>,
    policy: Option<RawPolicy>,
    distccd: Option<RawDistccd>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    allow_within: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    permit_public: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistccd {
    allow: Option<Vec<Spanned<String>>>,
    jobs: Option<Spanned<i64>>,
    nice: Option<Spanned<i64>>,
    listen: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    stats: Option<bool>,
    stats_port: Option<Spanned<i64>>,
    job_lifetime_secs: Option<Spanned<i64>>,
}

/// Turns spans into `file:line: key:` errors.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            line: self.line_of(offset),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.error(value.span().start, key, message)
    }

    fn int_in<T: TryFrom<i64>>(
        &self,
        value: &Spanned<i64>,
        key: &str,
        min: i64,
        max: i64,
    ) -> Result<T, ConfigError> {
        let v = *value.get_ref();
        if v < min || v > max {
            return Err(self.at(value, key, format!("{v} is outside {min}..={max}")));
        }
        T::try_from(v).map_err(|_| self.at(value, key, format!("{v} is out of range")))
    }

    fn cidrs(&self, list: &[Spanned<String>], key: &str) -> Result<Vec<IpNet>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, entry)| {
                parse_cidr(entry.get_ref()).map_err(|m| self.at(entry, &format!("{key}[{i}]"), m))
            })
            .collect()
    }
}

impl AgentConfig {
    /// Read and validate the config file, and the token file it names.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validate `text` as if read from `path`; also reads the token file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let src = Source { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let offset = err.span().map_or(0, |span| span.start);
            // toml's message already says what is wrong; name the key when it knows one.
            let message = err.message().trim().to_owned();
            let key = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
                .unwrap_or("")
                .to_owned();
            src.error(offset, &key, message)
        })?;

        let listen = match &raw.listen {
            None => SocketAddr::from(([0, 0, 0, 0], distcc_proto::DEFAULT_AGENT_PORT)),
            Some(value) => value.get_ref().parse().map_err(|_| {
                src.at(
                    value,
                    "listen",
                    format!("{:?} is not an address like 0.0.0.0:3634", value.get_ref()),
                )
            })?,
        };

        let (token_file, token_offset) = match &raw.token_file {
            None => (PathBuf::from(DEFAULT_TOKEN_FILE), 0),
            Some(value) => (value.get_ref().clone(), value.span().start),
        };
        let token = std::fs::read_to_string(&token_file)
            .map_err(|e| {
                src.error(
                    token_offset,
                    "token_file",
                    format!("cannot read {}: {e}", token_file.display()),
                )
            })?
            .trim()
            .to_owned();
        if token.len() < 16 {
            return Err(src.error(
                token_offset,
                "token_file",
                format!(
                    "{} holds a token shorter than 16 characters",
                    token_file.display()
                ),
            ));
        }

        let unit = match &raw.unit {
            None => DEFAULT_UNIT.to_owned(),
            Some(value) if value.get_ref().ends_with(".service") => value.get_ref().clone(),
            Some(value) => return Err(src.at(value, "unit", "must name a .service unit")),
        };
        let seconds = |value: &Option<Spanned<u64>>, key: &str, default: u64| match value {
            None => Ok(Duration::from_secs(default)),
            Some(v) if (1..=3600).contains(v.get_ref()) => Ok(Duration::from_secs(*v.get_ref())),
            Some(v) => Err(src.at(v, key, format!("{} is outside 1..=3600", v.get_ref()))),
        };
        let status_interval = seconds(&raw.status_interval_secs, "status_interval_secs", 10)?;
        let job_timeout = seconds(&raw.job_timeout_secs, "job_timeout_secs", 30)?;

        let mut distccd = DistccdSettings::default();
        let mut allow_key_offset = 0;
        if let Some(d) = &raw.distccd {
            if let Some(allow) = &d.allow {
                allow_key_offset = allow.first().map_or(0, |e| e.span().start);
                distccd.allow = src.cidrs(allow, "distccd.allow")?;
            }
            if let Some(v) = &d.jobs {
                distccd.jobs =
                    src.int_in(v, "distccd.jobs", 0, i64::from(crate::settings::MAX_JOBS))?;
            }
            if let Some(v) = &d.nice {
                distccd.nice = src.int_in(v, "distccd.nice", 0, 19)?;
            }
            if let Some(v) = &d.listen {
                distccd.listen = v.get_ref().parse::<IpAddr>().map_err(|_| {
                    src.at(
                        v,
                        "distccd.listen",
                        format!("{:?} is not an IP address", v.get_ref()),
                    )
                })?;
            }
            if let Some(v) = &d.port {
                distccd.port = src.int_in(v, "distccd.port", 1, 65535)?;
            }
            if let Some(v) = d.stats {
                distccd.stats = v;
            }
            if let Some(v) = &d.stats_port {
                distccd.stats_port = src.int_in(v, "distccd.stats_port", 1, 65535)?;
            }
            if let Some(v) = &d.job_lifetime_secs {
                distccd.job_lifetime_secs = src.int_in(
                    v,
                    "distccd.job_lifetime_secs",
                    0,
                    i64::from(crate::settings::MAX_JOB_LIFETIME_SECS),
                )?;
            }
        }

        // The ceiling for allowlists set over RPC: explicit, or what the operator wrote in
        // [distccd] allow. Requests can narrow it, never widen it.
        let permit_public = raw.policy.as_ref().is_some_and(|p| p.permit_public);
        let within = raw.policy.as_ref().and_then(|p| p.allow_within.as_ref());
        let policy = AllowPolicy {
            allow_within: match within {
                Some(list) => src.cidrs(list, "policy.allow_within")?,
                None => distccd.allow.clone(),
            },
            permit_public,
        };
        if let (Err(e), Some(list)) = (policy.validate("policy.allow_within"), within) {
            let offset = list.first().map_or(0, |e| e.span().start);
            return Err(src.error(offset, &e.field, e.message));
        }
        if !distccd.allow.is_empty() {
            distccd.validate(&policy).map_err(|e| {
                let key = format!("distccd.{}", e.field);
                let offset = raw
                    .distccd
                    .as_ref()
                    .and_then(|d| spanned_offset(d, &e.field))
                    .unwrap_or(allow_key_offset);
                src.error(offset, &key, e.message)
            })?;
        }

        Ok(Self {
            listen,
            token,
            token_file,
            tls: raw.tls.map(|t| TlsConfig {
                cert: t.cert,
                key: t.key,
                client_ca: t.client_ca,
            }),
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            unit,
            status_interval,
            job_timeout,
            masquerade_dir: raw
                .masquerade_dir
                .unwrap_or_else(|| PathBuf::from("/usr/lib/distcc")),
            distccd_tmpdir: raw.distccd_tmpdir.unwrap_or_else(|| PathBuf::from("/tmp")),
            policy,
            distccd,
        })
    }

    /// Where the agent persists distccd's settings (read by `distccd.service`).
    pub fn env_file(&self) -> PathBuf {
        self.state_dir.join("distccd.env")
    }
}

/// The position of the `[distccd]` value a validation error names (`allow[2]`, `nice`...).
fn spanned_offset(d: &RawDistccd, field: &str) -> Option<usize> {
    let start = |v: &Option<Spanned<i64>>| v.as_ref().map(|v| v.span().start);
    match field {
        "jobs" => start(&d.jobs),
        "nice" => start(&d.nice),
        "port" => start(&d.port),
        "stats_port" => start(&d.stats_port).or_else(|| start(&d.port)),
        "job_lifetime_secs" => start(&d.job_lifetime_secs),
        _ => {
            let index: usize = field
                .strip_prefix("allow[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            d.allow.as_ref()?.get(index).map(|e| e.span().start)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("token"), "0123456789abcdef0123\n").unwrap();
            Self { dir }
        }

        fn parse(&self, body: &str) -> Result<AgentConfig, ConfigError> {
            let text = format!(
                "token_file = \"{}\"\n{body}",
                self.dir.path().join("token").display()
            );
            let path = self.dir.path().join("agent.toml");
            std::fs::File::create(&path)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            AgentConfig::load(&path)
        }
    }

    fn invalid(err: ConfigError) -> (usize, String, String) {
        match err {
            ConfigError::Invalid {
                line, key, message, ..
            } => (line, key, message),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn documented_example_parses() {
        let f = Fixture::new();
        let cfg = f
            .parse(
                "listen = \"0.0.0.0:3634\"\n[distccd]\nallow = [\"198.18.0.0/24\"]\njobs = 4\n\
                 nice = 10\nlisten = \"0.0.0.0\"\nport = 3632\n",
            )
            .unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:3634".parse().unwrap());
        assert_eq!(cfg.token, "0123456789abcdef0123");
        assert_eq!(
            cfg.distccd.allow,
            vec!["198.18.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            (cfg.distccd.jobs, cfg.distccd.nice, cfg.distccd.port),
            (4, 10, 3632)
        );
        // Without [policy], requests may only narrow the operator's allowlist.
        assert_eq!(cfg.policy.allow_within, cfg.distccd.allow);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let f = Fixture::new();
        let (line, key, _) = invalid(f.parse("[distccd]\njobs = 4\nnicenes = 3\n").unwrap_err());
        assert_eq!((line, key.as_str()), (4, "nicenes"));
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let f = Fixture::new();
        let (line, key, msg) = invalid(
            f.parse("[distccd]\nallow = [\"198.18.0.0/24\",\n  \"bogus\"]\n")
                .unwrap_err(),
        );
        assert_eq!((line, key.as_str()), (4, "distccd.allow[1]"), "{msg}");
        let (line, key, _) = invalid(f.parse("\n[distccd]\nnice = 40\n").unwrap_err());
        assert_eq!((line, key.as_str()), (4, "distccd.nice"));
        let (line, key, _) = invalid(f.parse("listen = \"nowhere\"\n").unwrap_err());
        assert_eq!((line, key.as_str()), (2, "listen"));
    }

    #[test]
    fn whole_internet_allowlist_is_refused() {
        let f = Fixture::new();
        let (line, key, msg) =
            invalid(f.parse("[distccd]\nallow = [\"0.0.0.0/0\"]\n").unwrap_err());
        assert_eq!((line, key.as_str()), (3, "distccd.allow[0]"), "{msg}");
        // Even with permit_public.
        let err = f
            .parse("[policy]\npermit_public = true\n[distccd]\nallow = [\"0.0.0.0/0\"]\n")
            .unwrap_err();
        assert!(err.to_string().contains("whole internet"), "{err}");
    }

    #[test]
    fn public_allowlist_needs_permission() {
        let f = Fixture::new();
        assert!(f.parse("[distccd]\nallow = [\"8.8.8.0/24\"]\n").is_err());
        f.parse("[policy]\npermit_public = true\n[distccd]\nallow = [\"8.8.8.0/24\"]\n")
            .unwrap();
    }

    #[test]
    fn missing_or_short_token_is_an_error() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("token"), "short").unwrap();
        let (line, key, _) = invalid(f.parse("").unwrap_err());
        assert_eq!((line, key.as_str()), (1, "token_file"));
        std::fs::remove_file(f.dir.path().join("token")).unwrap();
        assert!(f.parse("").unwrap_err().to_string().contains("cannot read"));
    }

    #[test]
    fn empty_allowlist_is_accepted_but_leaves_distccd_unconfigured() {
        let f = Fixture::new();
        let cfg = f.parse("").unwrap();
        assert!(cfg.distccd.allow.is_empty());
        assert!(cfg.policy.allow_within.is_empty());
    }
}
