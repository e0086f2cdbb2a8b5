//! The agent's configuration file, `/etc/distcc-agent/agent.toml`.
//!
//! Deserialized strictly (unknown keys are errors) with the settings' own types, then
//! checked as a whole into [`AgentConfig`]; every error names file, line and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use distcc_config_file::ConfigFile;
use serde::Deserialize;

use crate::identity::IdentityFiles;
use crate::limits::{Limits, RawLimits};
use crate::settings::{AllowPolicy, Allowlist, DistccdSettings, bounded_setting};
use crate::tokens::{MIN_TOKEN_LEN, Role, TokenEntry, TokenHash, Tokens, check_secret_file};

/// The deprecated `token_file`'s token. Its file must be private like any secret.
fn read_clear_token(path: &Path) -> Result<String, String> {
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_secret_file(&metadata, false).map_err(|m| format!("{}: {m}", path.display()))?;
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .trim()
        .to_owned();
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "{} holds a token shorter than {MIN_TOKEN_LEN} characters",
            path.display()
        ));
    }
    Ok(token)
}

pub const DEFAULT_CONFIG_PATH: &str = "/etc/distcc-agent/agent.toml";
pub const DEFAULT_TOKENS_FILE: &str = "/etc/distcc-agent/tokens";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/distcc-agent";
pub const DEFAULT_UNIT: &str = "distccd.service";

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The tokens every RPC but the health service must present one of, with their roles.
    pub tokens: Arc<Tokens>,
    pub tokens_file: PathBuf,
    /// What is accepted but should be fixed (a deprecated key...): printed by
    /// `--check-config` and logged at start.
    pub warnings: Vec<String>,
    /// TLS (the default) or, where the operator allowed it, plaintext.
    pub transport: Transport,
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
    /// distccd.service's `TasksMax=` and `MemoryMax=` (`[confinement]`; defaults from the
    /// machine's size).
    pub confinement: crate::confinement::Limits,
    /// Settings distccd gets when the agent has none persisted yet.
    pub distccd: DistccdSettings,
    /// Bounds on what clients may hold or cost (`[limits]`, see limits.rs).
    pub limits: Limits,
}

/// How the gRPC API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tls {
        /// `[tls] cert` and `key`; `None`: the agent's own generated identity
        /// ([`crate::identity`]).
        files: Option<IdentityFiles>,
        /// When set, clients must present a certificate signed by this CA (mTLS).
        client_ca: Option<PathBuf>,
    },
    /// `plaintext = true` on a loopback address, or `insecure_plaintext = true`.
    Plaintext {
        /// Reachable from other machines: tokens cross the network in clear.
        insecure: bool,
    },
}

impl AgentConfig {
    /// The certificate and key the agent serves: configured, or generated.
    pub fn identity_files(&self) -> Option<IdentityFiles> {
        match &self.transport {
            Transport::Tls { files, .. } => Some(
                files
                    .clone()
                    .unwrap_or_else(|| IdentityFiles::generated(&self.state_dir)),
            ),
            Transport::Plaintext { .. } => None,
        }
    }

    /// What `--check-config`, the STATUS= line and Validate warn about; `None` when the
    /// transport is private.
    pub fn transport_warning(&self) -> Option<String> {
        match self.transport {
            Transport::Plaintext { insecure: true } => Some(insecure_warning(self.listen)),
            _ => None,
        }
    }
}

fn insecure_warning(listen: SocketAddr) -> String {
    format!(
        "INSECURE: gRPC on {listen} is plaintext (insecure_plaintext = true): tokens and \
         every reply cross the network in clear"
    )
}

pub use distcc_config_file::ConfigError;

bounded_setting!(
    /// A duration in whole seconds, 1..=3600.
    Seconds(u32) in 1..=3600
);

impl Seconds {
    fn duration(self) -> Duration {
        Duration::from_secs(u64::from(self.get()))
    }
}

bounded_setting!(
    /// `[policy] max_allow_entries`.
    MaxAllowEntries(u32) in 1..=4096
);

bounded_setting!(
    /// `[confinement] tasks_max`: distccd.service's TasksMax=.
    TasksMax(u32) in 32..=4194304
);

bounded_setting!(
    /// `[confinement] memory_max_mib`: distccd.service's MemoryMax=, in MiB.
    MemoryMaxMib(u32) in 256..=16777216
);

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfinement {
    tasks_max: Option<TasksMax>,
    memory_max_mib: Option<MemoryMaxMib>,
}

/// A systemd service unit's name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceUnit(String);

impl<'de> Deserialize<'de> for ServiceUnit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        if name.ends_with(".service") && !name.contains('/') {
            Ok(Self(name))
        } else {
            Err(serde::de::Error::custom(format!(
                "{name:?} must name a .service unit"
            )))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<SocketAddr>,
    tokens_file: Option<PathBuf>,
    /// Deprecated (agent 0.1): one admin token in clear.
    token_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    unit: Option<ServiceUnit>,
    status_interval_secs: Option<Seconds>,
    job_timeout_secs: Option<Seconds>,
    masquerade_dir: Option<PathBuf>,
    distccd_tmpdir: Option<PathBuf>,
    plaintext: Option<bool>,
    insecure_plaintext: Option<bool>,
    tls: Option<RawTls>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    confinement: RawConfinement,
    #[serde(default)]
    distccd: DistccdSettings,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    allow_within: Option<Allowlist>,
    #[serde(default)]
    permit_public: bool,
    max_allow_entries: Option<MaxAllowEntries>,
}

impl AgentConfig {
    /// Read and validate the config file, and the token file it names.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&ConfigFile::read(path)?)
    }

    /// Validate `text` as if read from `path`; also reads the token file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::from_file(&ConfigFile::new(path, text))
    }

    fn from_file(file: &ConfigFile) -> Result<Self, ConfigError> {
        let raw: RawConfig = file.parse()?;
        let listen = raw
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], distcc_proto::DEFAULT_AGENT_PORT)));
        let transport = transport_of(file, &raw, listen)?;

        let mut warnings = Vec::new();
        let tokens_file = raw
            .tokens_file
            .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKENS_FILE));
        let mut tokens = match (tokens_file.exists(), &raw.token_file) {
            // Agent 0.1's layout: only the token in clear. Still served, with a warning.
            (false, Some(_)) => Tokens::default(),
            _ => {
                Tokens::load(&tokens_file).map_err(|e| file.error("tokens_file", e.to_string()))?
            }
        };
        if let Some(token_file) = &raw.token_file {
            let token = read_clear_token(token_file).map_err(|m| file.error("token_file", m))?;
            tokens = tokens.with(TokenEntry {
                role: Role::Admin,
                id: "token_file"
                    .parse()
                    .map_err(|m: String| file.error("token_file", m))?,
                hash: TokenHash::of(&token),
            });
            warnings.push(format!(
                "token_file is deprecated: the agent should keep only hashes of tokens. Run \
                 `distcc-agent token new admin NAME` (prints a new token, writes its hash to {}), \
                 give the token to the admins, then remove token_file and {}",
                tokens_file.display(),
                token_file.display()
            ));
        }
        if tokens.is_empty() {
            return Err(file.error(
                "tokens_file",
                format!(
                    "{} lists no token: nobody could call the agent. Run `distcc-agent token new admin NAME`",
                    tokens_file.display()
                ),
            ));
        }

        let limits = Limits::from_raw(&raw.limits)
            .map_err(|e| file.error(&format!("limits.{}", e.key), e.message))?;

        // The ceiling for allowlists set over RPC: explicit, or what the operator wrote in
        // [distccd] allow. Requests can narrow it, never widen it.
        let explicit_policy = raw.policy.allow_within.is_some();
        let policy = AllowPolicy {
            allow_within: raw
                .policy
                .allow_within
                .unwrap_or_else(|| raw.distccd.allow.clone()),
            permit_public: raw.policy.permit_public,
            max_allow_entries: raw
                .policy
                .max_allow_entries
                .map_or(AllowPolicy::DEFAULT_MAX_ALLOW_ENTRIES, |m| m.get() as usize),
        };
        // A ceiling copied from [distccd] allow is checked below, under its own key.
        if explicit_policy {
            policy
                .validate("policy.allow_within")
                .map_err(|e| file.error(&e.field, e.message))?;
        }
        if !raw.distccd.allow.is_empty() {
            raw.distccd
                .validate(&policy)
                .map_err(|e| file.error(&format!("distccd.{}", e.field), e.message))?;
        }

        let capacity = crate::capacity::Capacity::read(Path::new("/"));
        let mut confinement =
            crate::confinement::Limits::for_machine(capacity.online_cpus, capacity.mem_total_bytes);
        if let Some(tasks) = raw.confinement.tasks_max {
            confinement.tasks_max = u64::from(tasks.get());
        }
        if let Some(mib) = raw.confinement.memory_max_mib {
            confinement.memory_max_bytes = u64::from(mib.get()) << 20;
        }

        if transport == (Transport::Plaintext { insecure: true }) {
            warnings.push(insecure_warning(listen));
        }
        Ok(Self {
            listen,
            tokens: Arc::new(tokens),
            tokens_file,
            warnings,
            transport,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            unit: raw.unit.map_or_else(|| DEFAULT_UNIT.to_owned(), |u| u.0),
            status_interval: raw
                .status_interval_secs
                .map_or(Duration::from_secs(10), Seconds::duration),
            job_timeout: raw
                .job_timeout_secs
                .map_or(Duration::from_secs(30), Seconds::duration),
            masquerade_dir: raw
                .masquerade_dir
                .unwrap_or_else(|| PathBuf::from("/usr/lib/distcc")),
            distccd_tmpdir: raw.distccd_tmpdir.unwrap_or_else(|| PathBuf::from("/tmp")),
            policy,
            confinement,
            distccd: raw.distccd,
            limits,
        })
    }
}

/// TLS unless the operator asked for plaintext where it is allowed: on a loopback address
/// (`plaintext = true`), or anywhere with the explicit `insecure_plaintext = true`.
fn transport_of(
    file: &ConfigFile,
    raw: &RawConfig,
    listen: SocketAddr,
) -> Result<Transport, ConfigError> {
    let wants_plaintext = match (raw.plaintext, raw.insecure_plaintext) {
        (Some(false), Some(true)) => {
            return Err(file.error(
                "insecure_plaintext",
                "contradicts plaintext = false; remove one of them",
            ));
        }
        (Some(p), i) => p || i == Some(true),
        (None, i) => i == Some(true),
    };
    if !wants_plaintext {
        let Some(tls) = &raw.tls else {
            return Ok(Transport::Tls {
                files: None,
                client_ca: None,
            });
        };
        let files = match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => Some(IdentityFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(file.error(
                    "tls",
                    "`cert` and `key` go together; without both the agent serves its own \
                     generated certificate",
                ));
            }
        };
        return Ok(Transport::Tls {
            files,
            client_ca: tls.client_ca.clone(),
        });
    }
    if raw.tls.is_some() {
        return Err(file.error("tls", "[tls] and plaintext exclude each other; remove one"));
    }
    let loopback = listen.ip().is_loopback();
    match raw.insecure_plaintext {
        Some(true) => Ok(Transport::Plaintext {
            insecure: !loopback,
        }),
        _ if loopback => Ok(Transport::Plaintext { insecure: false }),
        _ => Err(file.error(
            "plaintext",
            format!(
                "plaintext gRPC on {listen} (not a loopback address) would send tokens in \
                 clear: remove it to serve TLS (the default), listen on 127.0.0.1, or set \
                 insecure_plaintext = true to accept that"
            ),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    const TOKEN: &str = "0123456789abcdef0123";

    fn write_private(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).unwrap();
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let tokens = format!("admin ops {}\n", TokenHash::of(TOKEN));
            write_private(&dir.path().join("tokens"), &tokens);
            Self { dir }
        }

        fn parse(&self, body: &str) -> Result<AgentConfig, ConfigError> {
            let text = format!(
                "tokens_file = \"{}\"\n{body}",
                self.dir.path().join("tokens").display()
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
        assert_eq!(cfg.tokens.authenticate(TOKEN).unwrap().role, Role::Admin);
        assert!(cfg.warnings.is_empty());
        assert_eq!(cfg.distccd.allow.to_strings(), ["198.18.0.0/24"]);
        assert_eq!(
            (
                cfg.distccd.jobs.get(),
                cfg.distccd.nice.get(),
                cfg.distccd.port.get()
            ),
            (4, 10, 3632)
        );
        // Without [policy], requests may only narrow the operator's allowlist.
        assert_eq!(cfg.policy.allow_within, cfg.distccd.allow);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let f = Fixture::new();
        let (line, key, _) = invalid(f.parse("[distccd]\njobs = 4\nnicenes = 3\n").unwrap_err());
        assert_eq!((line, key.as_str()), (4, "distccd.nicenes"));
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
    fn errors_found_after_parsing_name_their_key() {
        let f = Fixture::new();
        let (line, key, msg) = invalid(
            f.parse("[policy]\nallow_within = [\"198.18.0.0/24\"]\n[distccd]\nallow = [\"198.18.0.0/24\",\n \"10.0.0.0/8\"]\n")
                .unwrap_err(),
        );
        assert_eq!((line, key.as_str()), (6, "distccd.allow[1]"), "{msg}");
        let (line, key, _) = invalid(
            f.parse("[distccd]\nallow = [\"198.18.0.0/24\"]\nport = 4000\nstats_port = 4000\n")
                .unwrap_err(),
        );
        assert_eq!((line, key.as_str()), (5, "distccd.stats_port"));
        let (line, key, _) = invalid(f.parse("unit = \"distccd\"\n").unwrap_err());
        assert_eq!((line, key.as_str()), (2, "unit"));
        let (line, key, _) = invalid(f.parse("job_timeout_secs = 0\n").unwrap_err());
        assert_eq!((line, key.as_str()), (2, "job_timeout_secs"));
    }

    #[test]
    fn allowlist_duplicates_fold_and_the_cap_is_the_operators() {
        let f = Fixture::new();
        let cfg = f
            .parse("[distccd]\nallow = [\"198.18.0.0/24\", \"198.18.0.0/24\"]\n")
            .unwrap();
        assert_eq!(cfg.distccd.allow.len(), 1);
        let (line, key, msg) = invalid(
            f.parse("[policy]\nallow_within = [\"198.18.0.0/15\"]\nmax_allow_entries = 1\n[distccd]\nallow = [\"198.18.0.0/24\", \"198.18.1.0/24\"]\n")
                .unwrap_err(),
        );
        assert_eq!((line, key.as_str()), (6, "distccd.allow"), "{msg}");
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
    fn tokens_file_problems_are_errors_with_the_fix() {
        let f = Fixture::new();
        let tokens = f.dir.path().join("tokens");
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (line, key, message) = invalid(f.parse("").unwrap_err());
        assert_eq!((line, key.as_str()), (1, "tokens_file"));
        assert!(message.contains("chmod 0640"), "{message}");
        write_private(&tokens, "# nobody\n");
        let (_, key, message) = invalid(f.parse("").unwrap_err());
        assert_eq!(key, "tokens_file");
        assert!(message.contains("token new admin"), "{message}");
        std::fs::remove_file(&tokens).unwrap();
        assert!(f.parse("").unwrap_err().to_string().contains("cannot read"));
    }

    #[test]
    fn the_deprecated_token_file_is_an_admin_token_with_a_warning() {
        let f = Fixture::new();
        std::fs::remove_file(f.dir.path().join("tokens")).unwrap();
        let clear = f.dir.path().join("token");
        write_private(&clear, "legacy-token-0123456789\n");
        let body = format!("token_file = \"{}\"\n", clear.display());
        let cfg = f.parse(&body).unwrap();
        let entry = cfg.tokens.authenticate("legacy-token-0123456789").unwrap();
        assert_eq!((entry.role, entry.id.as_str()), (Role::Admin, "token_file"));
        assert!(cfg.warnings[0].contains("deprecated"), "{:?}", cfg.warnings);
        write_private(&clear, "short\n");
        let (line, key, _) = invalid(f.parse(&body).unwrap_err());
        assert_eq!((line, key.as_str()), (2, "token_file"));
    }

    #[test]
    fn limits_errors_name_line_and_key() {
        let f = Fixture::new();
        let cfg = f.parse("[limits]\nmax_connections = 100\n").unwrap();
        assert_eq!(cfg.limits.max_connections, 100);
        assert_eq!(f.parse("").unwrap().limits, Limits::default());
        let (line, key, msg) = invalid(f.parse("[limits]\n\nmax_watch_streams = 0\n").unwrap_err());
        assert_eq!(
            (line, key.as_str()),
            (4, "limits.max_watch_streams"),
            "{msg}"
        );
        assert!(msg.contains("outside"), "{msg}");
        let (line, key, _) = invalid(f.parse("[limits]\nmax_conns = 1\n").unwrap_err());
        assert_eq!((line, key.as_str()), (3, "limits.max_conns"));
        // A check across keys names the key it is about, on its line.
        let (line, key, msg) = invalid(
            f.parse("[limits]\nkeepalive_interval_secs = 50\nidle_timeout_secs = 40\n")
                .unwrap_err(),
        );
        assert_eq!(
            (line, key.as_str()),
            (4, "limits.idle_timeout_secs"),
            "{msg}"
        );
    }

    #[test]
    fn empty_allowlist_is_accepted_but_leaves_distccd_unconfigured() {
        let f = Fixture::new();
        let cfg = f.parse("").unwrap();
        assert!(cfg.distccd.allow.is_empty());
        assert!(cfg.policy.allow_within.is_empty());
    }

    #[test]
    fn tls_is_the_default_with_a_generated_identity() {
        let f = Fixture::new();
        let cfg = f.parse("").unwrap();
        assert_eq!(
            cfg.transport,
            Transport::Tls {
                files: None,
                client_ca: None
            }
        );
        assert_eq!(
            cfg.identity_files().unwrap(),
            IdentityFiles::generated(Path::new(DEFAULT_STATE_DIR))
        );
        assert_eq!(cfg.transport_warning(), None);
        // mTLS on top of the generated identity.
        let cfg = f.parse("[tls]\nclient_ca = \"/ca.pem\"\n").unwrap();
        assert!(matches!(
            cfg.transport,
            Transport::Tls {
                files: None,
                client_ca: Some(_)
            }
        ));
        let (line, key, _) = invalid(f.parse("\n[tls]\ncert = \"/c.pem\"\n").unwrap_err());
        assert_eq!((line, key.as_str()), (3, "tls"));
    }

    #[test]
    fn plaintext_only_on_loopback_or_with_the_explicit_opt_in() {
        let f = Fixture::new();
        let cfg = f
            .parse("listen = \"127.0.0.1:3634\"\nplaintext = true\n")
            .unwrap();
        assert_eq!(cfg.transport, Transport::Plaintext { insecure: false });
        assert_eq!(cfg.transport_warning(), None);
        let (line, key, message) = invalid(
            f.parse("listen = \"0.0.0.0:3634\"\nplaintext = true\n")
                .unwrap_err(),
        );
        assert_eq!((line, key.as_str()), (3, "plaintext"), "{message}");
        assert!(message.contains("insecure_plaintext = true"), "{message}");
        let cfg = f
            .parse("listen = \"0.0.0.0:3634\"\ninsecure_plaintext = true\n")
            .unwrap();
        assert_eq!(cfg.transport, Transport::Plaintext { insecure: true });
        assert!(cfg.transport_warning().unwrap().contains("INSECURE"));
        assert!(cfg.warnings.iter().any(|w| w.contains("INSECURE")));
        let (line, key, _) = invalid(
            f.parse("plaintext = false\ninsecure_plaintext = true\n")
                .unwrap_err(),
        );
        assert_eq!((line, key.as_str()), (3, "insecure_plaintext"));
        let (_, key, _) = invalid(
            f.parse("insecure_plaintext = true\n[tls]\nclient_ca = \"/ca.pem\"\n")
                .unwrap_err(),
        );
        assert_eq!(key, "tls");
    }
}
