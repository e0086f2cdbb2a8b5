//! `/etc/distcc-builder/builder.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use distcc_config_file::ConfigFile;
use serde::Deserialize;
use toml::Spanned;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/distcc-builder/builder.toml";

#[derive(Debug, Clone, PartialEq)]
pub struct BuilderConfig {
    /// Agent endpoints, `host:port`, as configured.
    pub workers: Vec<String>,
    /// How every RPC reaches the agents: token, and TLS when configured.
    pub access: AgentAccess,
    pub workspace: PathBuf,
    pub tmpfs_size: String,
    /// Per-worker bound on one RPC: a dead worker costs at most this.
    pub deadline: Duration,
    /// Per-worker bound on slow operations (reset, bootstrap, validate, smoketest), which
    /// wait for systemd jobs or run a compiler.
    pub operation_deadline: Duration,
    /// Compilers whose links and fingerprints must match between builder and workers.
    pub compilers: Vec<String>,
    /// `localhost/N` in the host list; 0 leaves the builder out.
    pub local_slots: u32,
    /// `,lzo` on remote hosts: compress sources and objects in transit.
    pub lzo: bool,
    /// distcc's masquerade directory; `None`: the first of `/usr/lib/distcc`,
    /// `/usr/lib/distcc/bin` that holds a `gcc` link.
    pub masquerade_dir: Option<PathBuf>,
    /// Include workers whose compilers differ (`--allow-mismatch` sets it too).
    pub allow_mismatch: bool,
}

/// What every RPC to an agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAccess {
    /// Sent as `authorization: Bearer TOKEN`: `token_file`'s, which a builder that only
    /// builds holds with the agents' read role.
    pub token: String,
    /// `admin_token_file`'s: needed only for what changes a worker (reset, bootstrap).
    pub admin_token: Option<String>,
    pub transport: Transport,
}

/// How the builder reaches the agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TLS, the agents' default.
    Tls(TlsSettings),
    /// `insecure_plaintext = true`: for agents that serve plaintext (their own opt-in).
    Plaintext,
}

/// Who vouches for the agents' certificates.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// `[tls] ca`: the cluster CA that signed them (names checked as with any CA).
    Ca(Vec<u8>),
    /// No CA: each worker's certificate is pinned in this file (`known_workers`,
    /// written by `builderctl trust`), read at every connection.
    Pinned(PathBuf),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ca(pem) => write!(f, "Ca({} bytes)", pem.len()),
            Self::Pinned(path) => write!(f, "Pinned({})", path.display()),
        }
    }
}

/// Why a command that changes workers cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this changes workers and needs the agents' admin role: set admin_token_file in the builder config (a token made with `distcc-agent token new admin NAME`)"
)]
pub struct NoAdminToken;

impl AgentAccess {
    /// The same access with the admin token, for commands that change workers.
    pub fn admin(&self) -> Result<AgentAccess, NoAdminToken> {
        let token = self.admin_token.clone().ok_or(NoAdminToken)?;
        Ok(AgentAccess {
            token,
            ..self.clone()
        })
    }
}

/// `[tls]`: the PEM files are read when the configuration is loaded, so a missing file is
/// a configuration error naming its key, not a failure of every RPC later.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub trust: Trust,
    /// `cert` and `key`: this builder's client certificate, for agents that require one
    /// (mTLS, the agent's `[tls] client_ca`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// `domain`: the name the agents' certificates carry, when it is not the host of the
    /// endpoint (e.g. endpoints by address, certificates by name).
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsSettings {
    // The key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("trust", &self.trust)
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<Spanned<PathBuf>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
    domain: Option<Spanned<String>>,
}

pub use distcc_config_file::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workers: Vec<Spanned<String>>,
    token_file: Spanned<PathBuf>,
    admin_token_file: Option<Spanned<PathBuf>>,
    workspace: Option<PathBuf>,
    tmpfs_size: Option<Spanned<String>>,
    deadline_ms: Option<Spanned<u64>>,
    operation_deadline_ms: Option<Spanned<u64>>,
    compilers: Option<Vec<Spanned<String>>>,
    local_slots: Option<Spanned<u32>>,
    lzo: Option<bool>,
    masquerade_dir: Option<PathBuf>,
    allow_mismatch: Option<bool>,
    tls: Option<Spanned<RawTls>>,
    known_workers: Option<PathBuf>,
    insecure_plaintext: Option<bool>,
}

impl BuilderConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = ConfigFile::read(path)?;
        Self::parse(&file, |file| std::fs::read(file))
    }

    /// Validate `file`. `read_file` reads the files it names (the token, the PEM files), so
    /// the parser runs in tests and under fuzzing without them.
    pub fn parse(
        file: &ConfigFile,
        read_file: impl Fn(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Self, ConfigError> {
        let invalid =
            |offset: usize, key: &str, message: String| file.error_at(offset, key, message);
        let raw: RawConfig = file.parse()?;
        for (i, worker) in raw.workers.iter().enumerate() {
            let ok = worker
                .get_ref()
                .rsplit_once(':')
                .is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                });
            if !ok {
                return Err(invalid(
                    worker.span().start,
                    &format!("workers[{i}]"),
                    format!("{:?} is not host:port", worker.get_ref()),
                ));
            }
        }
        let read_token = |file: &Spanned<PathBuf>, key: &str| {
            read_token(file.get_ref()).map_err(|m| invalid(file.span().start, key, m))
        };
        let token = read_token(&raw.token_file, "token_file")?;
        let admin_token = raw
            .admin_token_file
            .as_ref()
            .map(|file| read_token(file, "admin_token_file"))
            .transpose()?;
        let known_workers = raw
            .known_workers
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::trust::DEFAULT_KNOWN_WORKERS));
        // Errors in the pins file surface now, naming its line, not at every RPC.
        let pinned = || {
            crate::trust::KnownWorkers::load(&known_workers)
                .map(|_| Trust::Pinned(known_workers.clone()))
                .map_err(|e| file.error("known_workers", e.to_string()))
        };
        let transport = match (&raw.tls, raw.insecure_plaintext == Some(true)) {
            (Some(tls), true) => {
                return Err(invalid(
                    tls.span().start,
                    "tls",
                    "[tls] and insecure_plaintext = true exclude each other; remove one".to_owned(),
                ));
            }
            (None, true) => Transport::Plaintext,
            (None, false) => Transport::Tls(TlsSettings {
                trust: pinned()?,
                identity: None,
                domain: None,
            }),
            (Some(tls), false) => {
                let read = |file: &Spanned<PathBuf>, key: &str| {
                    read_file(file.get_ref()).map_err(|e| {
                        invalid(
                            file.span().start,
                            key,
                            format!("cannot read {}: {e}", file.get_ref().display()),
                        )
                    })
                };
                let tls_ref = tls.get_ref();
                let identity = match (&tls_ref.cert, &tls_ref.key) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => {
                        Some((read(cert, "tls.cert")?, read(key, "tls.key")?))
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(invalid(
                            tls.span().start,
                            "tls",
                            "`cert` and `key` go together (a client certificate needs both)"
                                .to_owned(),
                        ));
                    }
                };
                if let Some(domain) = tls_ref.domain.as_ref().filter(|d| {
                    d.get_ref().is_empty()
                        || !d
                            .get_ref()
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
                }) {
                    return Err(invalid(
                        domain.span().start,
                        "tls.domain",
                        format!("{:?} is not a DNS name", domain.get_ref()),
                    ));
                }
                let trust = match &tls_ref.ca {
                    Some(ca) => Trust::Ca(read(ca, "tls.ca")?),
                    None => pinned()?,
                };
                Transport::Tls(TlsSettings {
                    trust,
                    identity,
                    domain: tls_ref.domain.as_ref().map(|d| d.get_ref().clone()),
                })
            }
        };
        let deadline = match &raw.deadline_ms {
            None => Duration::from_millis(1000),
            Some(v) if (50..=60_000).contains(v.get_ref()) => Duration::from_millis(*v.get_ref()),
            Some(v) => {
                return Err(invalid(
                    v.span().start,
                    "deadline_ms",
                    format!("{} is outside 50..=60000", v.get_ref()),
                ));
            }
        };
        let operation_deadline = match &raw.operation_deadline_ms {
            None => Duration::from_secs(60),
            Some(v) if (100..=3_600_000).contains(v.get_ref()) => {
                Duration::from_millis(*v.get_ref())
            }
            Some(v) => {
                return Err(invalid(
                    v.span().start,
                    "operation_deadline_ms",
                    format!("{} is outside 100..=3600000", v.get_ref()),
                ));
            }
        };
        let compilers = match raw.compilers {
            None => vec!["gcc".to_owned(), "g++".to_owned()],
            Some(names) => {
                for (i, name) in names.iter().enumerate() {
                    let ok = !name.get_ref().is_empty()
                        && name
                            .get_ref()
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c));
                    if !ok {
                        return Err(invalid(
                            name.span().start,
                            &format!("compilers[{i}]"),
                            format!("{:?} is not a compiler name", name.get_ref()),
                        ));
                    }
                }
                names.into_iter().map(Spanned::into_inner).collect()
            }
        };
        let local_slots = match &raw.local_slots {
            None => 2,
            Some(v) if *v.get_ref() <= 256 => *v.get_ref(),
            Some(v) => {
                return Err(invalid(
                    v.span().start,
                    "local_slots",
                    format!("{} is more than 256", v.get_ref()),
                ));
            }
        };
        if let Some(size) = raw
            .tmpfs_size
            .as_ref()
            .filter(|size| !valid_tmpfs_size(size.get_ref()))
        {
            return Err(invalid(
                size.span().start,
                "tmpfs_size",
                format!(
                    "{:?} is not a size like \"2G\", \"512M\" or \"25%\"",
                    size.get_ref()
                ),
            ));
        }
        Ok(Self {
            operation_deadline,
            compilers,
            local_slots,
            lzo: raw.lzo.unwrap_or(true),
            masquerade_dir: raw.masquerade_dir,
            allow_mismatch: raw.allow_mismatch.unwrap_or(false),
            workers: raw.workers.into_iter().map(Spanned::into_inner).collect(),
            access: AgentAccess {
                token,
                admin_token,
                transport,
            },
            workspace: raw
                .workspace
                .unwrap_or_else(|| PathBuf::from("/tmp/kernel-build")),
            tmpfs_size: raw
                .tmpfs_size
                .map_or_else(|| "2G".to_owned(), Spanned::into_inner),
            deadline,
        })
    }
}

/// A token in clear: the file must not be readable by others (the agents' tokens give
/// whoever holds them the workers' read or admin role).
fn read_token(path: &Path) -> Result<String, String> {
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    distcc_config_file::check_secret_file(&metadata, false)
        .map_err(|m| format!("{}: {m}", path.display()))?;
    Ok(std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .trim()
        .to_owned())
}

/// tmpfs's `size=`: a number with an optional k/m/g suffix, or a percentage of RAM.
fn valid_tmpfs_size(size: &str) -> bool {
    let digits = size
        .strip_suffix(['k', 'K', 'm', 'M', 'g', 'G', '%'])
        .unwrap_or(size);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) && digits != "0"
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn write_secret(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn token_files_must_be_private_and_admin_is_separate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let read = dir.path().join("read");
        let admin = dir.path().join("admin");
        write_secret(&read, "read-0123456789abcdef\n");
        write_secret(&admin, "admin-0123456789abcdef\n");
        let path = dir.path().join("builder.toml");
        let text = format!(
            "workers = []\ntoken_file = \"{}\"\nadmin_token_file = \"{}\"\n",
            read.display(),
            admin.display()
        );
        std::fs::write(&path, &text).unwrap();
        let c = BuilderConfig::load(&path).unwrap();
        assert_eq!(c.access.token, "read-0123456789abcdef");
        assert_eq!(c.access.admin().unwrap().token, "admin-0123456789abcdef");
        std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o644)).unwrap();
        match BuilderConfig::load(&path).unwrap_err() {
            ConfigError::Invalid {
                line, key, message, ..
            } => {
                assert_eq!((line, key.as_str()), (3, "admin_token_file"));
                assert!(message.contains("chmod 0640"), "{message}");
            }
            e => panic!("{e}"),
        }
        std::fs::write(
            &path,
            format!("workers = []\ntoken_file = \"{}\"\n", read.display()),
        )
        .unwrap();
        let c = BuilderConfig::load(&path).unwrap();
        assert_eq!(c.access.admin(), Err(NoAdminToken));
    }

    fn load(body: &str) -> Result<BuilderConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        write_secret(&dir.path().join("token"), "0123456789abcdef\n");
        let path = dir.path().join("builder.toml");
        std::fs::write(
            &path,
            format!(
                "token_file = \"{}\"\n{body}",
                dir.path().join("token").display()
            ),
        )
        .unwrap();
        BuilderConfig::load(&path)
    }

    #[test]
    fn documented_keys_parse() {
        let c = load("workers = [\"198.18.0.11:3634\", \"198.18.0.12:3634\"]\nworkspace = \"/tmp/kernel-build\"\ntmpfs_size = \"2G\"\n").unwrap();
        assert_eq!(c.workers, ["198.18.0.11:3634", "198.18.0.12:3634"]);
        assert_eq!(c.access.token, "0123456789abcdef");
        // TLS by default, the workers' certificates pinned in the default file.
        assert_eq!(
            c.access.transport,
            Transport::Tls(TlsSettings {
                trust: Trust::Pinned(PathBuf::from(crate::trust::DEFAULT_KNOWN_WORKERS)),
                identity: None,
                domain: None,
            })
        );
        assert_eq!(c.deadline, Duration::from_secs(1));
        assert_eq!(c.compilers, ["gcc", "g++"]);
        assert_eq!(c.local_slots, 2);
        assert!(c.lzo);
    }

    #[test]
    fn optional_keys_are_checked() {
        let c = load("workers = []\ncompilers = [\"gcc\"]\nlocal_slots = 0\noperation_deadline_ms = 5000\nallow_mismatch = true\nlzo = false\n").unwrap();
        assert_eq!(
            (c.compilers.len(), c.local_slots, c.allow_mismatch, c.lzo),
            (1, 0, true, false)
        );
        for (body, key) in [
            ("workers = []\ntmpfs_size = \"lots\"\n", "tmpfs_size"),
            ("workers = []\ncompilers = [\"gcc; rm\"]\n", "compilers[0]"),
            ("workers = []\nlocal_slots = 9999\n", "local_slots"),
        ] {
            match load(body).unwrap_err() {
                ConfigError::Invalid { line, key: k, .. } => {
                    assert_eq!((line, k.as_str()), (3, key))
                }
                e => panic!("{e}"),
            }
        }
    }

    #[test]
    fn tls_keys_load_the_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("ca.pem", "CA"), ("cert.pem", "CERT"), ("key.pem", "KEY")] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let path = |name: &str| dir.path().join(name).display().to_string();
        let c = load(&format!(
            "workers = []\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ndomain = \"w1.example\"\n",
            path("ca.pem"),
            path("cert.pem"),
            path("key.pem")
        ))
        .unwrap();
        let Transport::Tls(tls) = c.access.transport else {
            panic!("TLS expected")
        };
        assert_eq!(tls.trust, Trust::Ca(b"CA".to_vec()));
        assert_eq!(tls.identity, Some((b"CERT".to_vec(), b"KEY".to_vec())));
        assert_eq!(tls.domain.as_deref(), Some("w1.example"));
        assert!(
            !format!("{tls:?}").contains("KEY"),
            "the key stays out of Debug"
        );
        let c = load(&format!(
            "workers = []\n[tls]\nca = \"{}\"\n",
            path("ca.pem")
        ))
        .unwrap();
        assert!(matches!(
            c.access.transport,
            Transport::Tls(TlsSettings { identity: None, .. })
        ));
        for (body, key) in [
            (
                format!("workers = []\n[tls]\nca = \"{}\"\n", path("missing.pem")),
                "tls.ca",
            ),
            (
                format!(
                    "workers = []\n[tls]\nca = \"{}\"\ncert = \"{}\"\n",
                    path("ca.pem"),
                    path("cert.pem")
                ),
                "tls",
            ),
            (
                format!(
                    "workers = []\n[tls]\nca = \"{}\"\ndomain = \"a b\"\n",
                    path("ca.pem")
                ),
                "tls.domain",
            ),
            // serde names the table that misses its `ca`.
            ("workers = []\n[tls]\ncert = \"x\"\n".to_owned(), "tls"),
        ] {
            match load(&body).unwrap_err() {
                ConfigError::Invalid {
                    key: k, message, ..
                } => {
                    assert_eq!(k, key, "{message}");
                }
                e => panic!("{e}"),
            }
        }
    }

    #[test]
    fn errors_name_line_and_key() {
        match load("workers = [\n  \"198.18.0.11:3634\",\n  \"nohost\"]\n").unwrap_err() {
            ConfigError::Invalid { line, key, .. } => {
                assert_eq!((line, key.as_str()), (4, "workers[1]"))
            }
            e => panic!("{e}"),
        }
        match load("workers = []\nworkerz = 1\n").unwrap_err() {
            ConfigError::Invalid { line, message, .. } => {
                assert_eq!(line, 3);
                assert!(message.contains("workerz"), "{message}");
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn plaintext_needs_the_explicit_opt_in_and_pins_are_checked() {
        let c = load("workers = []\ninsecure_plaintext = true\n").unwrap();
        assert_eq!(c.access.transport, Transport::Plaintext);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "CA").unwrap();
        let err = load(&format!(
            "workers = []\ninsecure_plaintext = true\n[tls]\nca = \"{}\"\n",
            dir.path().join("ca.pem").display()
        ))
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { ref key, .. } if key == "tls"),
            "{err}"
        );
        // A bad pins file is a configuration error naming its own line.
        let pins = dir.path().join("known_workers");
        std::fs::write(&pins, "w1:3634 not-a-fingerprint\n").unwrap();
        let err = load(&format!(
            "workers = []\nknown_workers = \"{}\"\n",
            pins.display()
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains(&format!("{}:1:", pins.display())),
            "{err}"
        );
    }
}
