//! `/etc/distcc-builder/builder.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use distcc_config_file::ConfigFile;
use serde::Deserialize;
use toml::Spanned;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/distcc-builder/builder.toml";
/// Where `builderctl daemon` serves sessions (`distcc-builder.socket`).
pub const DEFAULT_DAEMON_SOCKET: &str = "/run/distcc-builder/session.sock";
/// Where the per-user tmpfs workspaces are mounted (`distcc-workspace@USER.service`).
pub const DEFAULT_USER_WORKSPACES: &str = "/run/distcc-workspaces";
/// The group whose members may use the daemon (made by the package's sysusers file).
pub const DEFAULT_BUILD_GROUP: &str = "distcc-build";

#[derive(Debug, Clone, PartialEq)]
pub struct BuilderConfig {
    /// Agent endpoints, `host:port`, as configured.
    pub workers: Vec<String>,
    /// `token_file`: read only by [`BuilderConfig::access`], when a command talks to the
    /// agents itself (users load this file but never read a token; they go through the
    /// daemon).
    pub token_file: TokenFile,
    /// `admin_token_file`: read only by [`BuilderConfig::admin_access`].
    pub admin_token_file: Option<TokenFile>,
    /// How every RPC reaches the agents (TLS settings are read at load time).
    pub transport: Transport,
    /// `daemon_socket`: the daemon's session socket (Unix stream socket).
    pub daemon_socket: PathBuf,
    /// `user_workspaces`: the directory holding one tmpfs workspace per user.
    pub user_workspaces: PathBuf,
    /// `build_group`: who may use the daemon (and get a workspace) besides root.
    pub build_group: String,
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

/// A token file named by the configuration, with where it is named (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    pub path: PathBuf,
    key: &'static str,
    config: String,
    line: usize,
}

impl TokenFile {
    /// The token, checked to be private to root, the running user or the file's group
    /// (0640 `root:distcc-builder` for the daemon).
    pub fn read(&self) -> Result<String, ConfigError> {
        read_token(&self.path).map_err(|message| ConfigError::Invalid {
            path: self.config.clone(),
            line: self.line,
            key: self.key.to_owned(),
            message,
        })
    }
}

/// Why [`BuilderConfig::admin_access`] has no access.
#[derive(Debug, thiserror::Error)]
pub enum AdminAccessError {
    #[error(transparent)]
    NoAdminToken(#[from] NoAdminToken),
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    daemon_socket: Option<Spanned<PathBuf>>,
    user_workspaces: Option<Spanned<PathBuf>>,
    build_group: Option<Spanned<String>>,
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
        // Tokens are read later, by the commands that use them (see `access`).
        let token_file = |spanned: &Spanned<PathBuf>, key: &'static str| TokenFile {
            path: spanned.get_ref().clone(),
            key,
            config: file.path().display().to_string(),
            line: file.line_of(spanned.span().start),
        };
        let token_file_named = token_file(&raw.token_file, "token_file");
        let admin_token_file = raw
            .admin_token_file
            .as_ref()
            .map(|spanned| token_file(spanned, "admin_token_file"));
        let absolute = |value: &Option<Spanned<PathBuf>>, key: &str, default: &str| match value {
            None => Ok(PathBuf::from(default)),
            Some(path) if path.get_ref().is_absolute() => Ok(path.get_ref().clone()),
            Some(path) => Err(invalid(
                path.span().start,
                key,
                format!("{} is not an absolute path", path.get_ref().display()),
            )),
        };
        let daemon_socket = absolute(&raw.daemon_socket, "daemon_socket", DEFAULT_DAEMON_SOCKET)?;
        let user_workspaces = absolute(
            &raw.user_workspaces,
            "user_workspaces",
            DEFAULT_USER_WORKSPACES,
        )?;
        let build_group = match &raw.build_group {
            None => DEFAULT_BUILD_GROUP.to_owned(),
            Some(group) if valid_user_name(group.get_ref()) => group.get_ref().clone(),
            Some(group) => {
                return Err(invalid(
                    group.span().start,
                    "build_group",
                    format!("{:?} is not a group name", group.get_ref()),
                ));
            }
        };
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
            None => default_local_slots(),
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
            lzo: raw.lzo.unwrap_or(false),
            masquerade_dir: raw.masquerade_dir,
            allow_mismatch: raw.allow_mismatch.unwrap_or(false),
            workers: raw.workers.into_iter().map(Spanned::into_inner).collect(),
            token_file: token_file_named,
            admin_token_file,
            transport,
            daemon_socket,
            user_workspaces,
            build_group,
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

impl BuilderConfig {
    /// What an RPC to the agents needs, reading `token_file` now: for commands that talk to
    /// the agents themselves (not a user's session, which goes through the daemon).
    pub fn access(&self) -> Result<AgentAccess, ConfigError> {
        Ok(AgentAccess {
            token: self.token_file.read()?,
            admin_token: None,
            transport: self.transport.clone(),
        })
    }

    /// The access of the admin role (reset, bootstrap): `admin_token_file`'s token.
    pub fn admin_access(&self) -> Result<AgentAccess, AdminAccessError> {
        let token = self.admin_token_file.as_ref().ok_or(NoAdminToken)?.read()?;
        Ok(AgentAccess {
            token: token.clone(),
            admin_token: Some(token),
            transport: self.transport.clone(),
        })
    }
}

/// A user or group name as Debian's `adduser` and systemd accept it (also what the
/// polkit rule of `distcc-workspace@.service` matches).
pub fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
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

/// `local_slots` when the file does not say: 2, or 1 on a builder with a single CPU to run
/// on (counting a cgroup CPU quota, as `available_parallelism` does). Every distributed
/// compile is preprocessed here first; a builder that compiles more at once than it has
/// CPUs delays the cpp of every remote compile, while one local compile uses what cpp
/// leaves (measured on the bench's 0.4-CPU builder: cpp and links kept it under half busy).
pub fn default_local_slots() -> u32 {
    match std::thread::available_parallelism() {
        Ok(cpus) if cpus.get() < 2 => 1,
        _ => 2,
    }
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
        assert_eq!(c.access().unwrap().token, "read-0123456789abcdef");
        assert_eq!(c.access().unwrap().admin_token, None);
        assert_eq!(c.admin_access().unwrap().token, "admin-0123456789abcdef");
        // Group-readable (0640 root:distcc-builder, the daemon's): accepted.
        std::fs::set_permissions(&read, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(c.access().unwrap().token, "read-0123456789abcdef");
        // Readable by others: the configuration still loads (users load it), the token is
        // refused when read, naming file, line and key.
        std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = BuilderConfig::load(&path).unwrap();
        match c.admin_access().unwrap_err() {
            AdminAccessError::Config(ConfigError::Invalid {
                path: file,
                line,
                key,
                message,
            }) => {
                assert_eq!(file, path.display().to_string());
                assert_eq!((line, key.as_str()), (3, "admin_token_file"));
                assert!(message.contains("chmod 0640"), "{message}");
            }
            e => panic!("{e}"),
        }
        // A token that cannot be read does not stop the configuration from loading.
        std::fs::remove_file(&read).unwrap();
        let c = BuilderConfig::load(&path).unwrap();
        let err = c.access().unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { line: 2, key, .. } if key == "token_file"),
            "{err}"
        );
        std::fs::write(
            &path,
            format!("workers = []\ntoken_file = \"{}\"\n", read.display()),
        )
        .unwrap();
        let c = BuilderConfig::load(&path).unwrap();
        assert!(matches!(
            c.admin_access().unwrap_err(),
            AdminAccessError::NoAdminToken(NoAdminToken)
        ));
    }

    #[test]
    fn daemon_keys_have_defaults_and_are_checked() {
        let c = load("workers = []\n").unwrap();
        assert_eq!(c.daemon_socket, Path::new(DEFAULT_DAEMON_SOCKET));
        assert_eq!(c.user_workspaces, Path::new("/run/distcc-workspaces"));
        assert_eq!(c.build_group, "distcc-build");
        let c = load("workers = []\ndaemon_socket = \"/tmp/s.sock\"\nuser_workspaces = \"/srv/ws\"\nbuild_group = \"builders\"\n").unwrap();
        assert_eq!(
            (
                c.daemon_socket.as_path(),
                c.user_workspaces.as_path(),
                c.build_group.as_str()
            ),
            (Path::new("/tmp/s.sock"), Path::new("/srv/ws"), "builders")
        );
        for (body, key) in [
            (
                "workers = []\ndaemon_socket = \"run/s.sock\"\n",
                "daemon_socket",
            ),
            (
                "workers = []\nuser_workspaces = \"ws\"\n",
                "user_workspaces",
            ),
            (
                "workers = []\nbuild_group = \"Build Group\"\n",
                "build_group",
            ),
            ("workers = []\nbuild_group = \"\"\n", "build_group"),
        ] {
            match load(body).unwrap_err() {
                ConfigError::Invalid { line, key: k, .. } => {
                    assert_eq!((line, k.as_str()), (3, key), "{body}")
                }
                e => panic!("{e}"),
            }
        }
        assert!(valid_user_name("alice") && valid_user_name("_ci-2"));
        assert!(!valid_user_name("Alice") && !valid_user_name("-x") && !valid_user_name("a/b"));
        assert!(!valid_user_name(&"a".repeat(33)));
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
        assert!(c.token_file.path.ends_with("token"));
        // TLS by default, the workers' certificates pinned in the default file.
        assert_eq!(
            c.transport,
            Transport::Tls(TlsSettings {
                trust: Trust::Pinned(PathBuf::from(crate::trust::DEFAULT_KNOWN_WORKERS)),
                identity: None,
                domain: None,
            })
        );
        assert_eq!(c.deadline, Duration::from_secs(1));
        assert_eq!(c.compilers, ["gcc", "g++"]);
        assert_eq!(c.local_slots, default_local_slots());
        assert!(
            !c.lzo,
            "off unless asked: it costs the workers' CPU on fast links"
        );
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
        let Transport::Tls(tls) = c.transport else {
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
            c.transport,
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
        assert_eq!(c.transport, Transport::Plaintext);
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
