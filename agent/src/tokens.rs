//! Who may call the agent: bearer tokens with a role, kept only as hashes.
//!
//! `/etc/distcc-agent/tokens` holds one line per token, `ROLE ID sha256:HEX`:
//!
//! ```text
//! # role  id         hash of the token
//! read    builders   sha256:5f1c...
//! admin   ops-2026   sha256:9a02...
//! ```
//!
//! The agent never stores a token itself, so its config directory yields no usable
//! credential. Tokens are 32 random bytes (`distcc-agent token new`), so a plain SHA-256 is
//! as good as a slow password hash here: there is nothing to guess from a dictionary.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub use distcc_config_file::check_secret_file;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// What a token may do. Admin includes read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Status, WatchStatus, Validate.
    Read,
    /// Also Configure, Control, Bootstrap: everything that changes the worker.
    Admin,
}

impl Role {
    pub fn permits(self, needed: Role) -> bool {
        self >= needed
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "read" => Ok(Self::Read),
            "admin" => Ok(Self::Admin),
            other => Err(format!("{other:?} is not a role (read or admin)")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Admin => "admin",
        })
    }
}

/// A token's name in logs and the tokens file: `[A-Za-z0-9._-]{1,64}`. Never the token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenId(String);

impl TokenId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TokenId {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let ok = (1..=64).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a token id (1-64 letters, digits, '.', '_', '-')"
            ))
        }
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SHA-256 of a token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.trim().as_bytes()).into())
    }

    fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for TokenHash {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{text:?} is not sha256:HEX"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{text:?} is not sha256: and 64 hex digits"));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("{text:?} is not hex"))?;
        }
        Ok(Self(bytes))
    }
}

/// One accepted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub role: Role,
    pub id: TokenId,
    pub hash: TokenHash,
}

/// The tokens the agent accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

/// A tokens file that cannot be used; names file and line (0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}:{line}: {message}")]
pub struct TokensError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

/// Shortest token `distcc-agent token new` would never make but an operator might paste.
pub const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    /// Read `path`, refusing a file others could read or anyone but root could change.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let err = |line, message: String| TokensError {
            path: path.display().to_string(),
            line,
            message,
        };
        let metadata = std::fs::metadata(path).map_err(|e| err(0, format!("cannot read: {e}")))?;
        check_secret_file(&metadata, false).map_err(|m| err(0, m))?;
        let text =
            std::fs::read_to_string(path).map_err(|e| err(0, format!("cannot read: {e}")))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, TokensError> {
        let mut entries: Vec<TokenEntry> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: String| TokensError {
                path: path.display().to_string(),
                line: index + 1,
                message,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, id, hash] = fields[..] else {
                return Err(err("expected `ROLE ID sha256:HEX`".to_owned()));
            };
            let entry = TokenEntry {
                role: role.parse().map_err(err)?,
                id: id.parse().map_err(err)?,
                hash: hash.parse().map_err(err)?,
            };
            if entries.iter().any(|e| e.id == entry.id) {
                return Err(err(format!("token id {} appears twice", entry.id)));
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }

    /// Add a token known in clear (the deprecated `token_file`).
    pub fn with(mut self, entry: TokenEntry) -> Self {
        self.entries.push(entry);
        self
    }

    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry `presented` belongs to. Compares against every entry in constant time.
    pub fn authenticate(&self, presented: &str) -> Option<&TokenEntry> {
        let hash = TokenHash::of(presented);
        let mut found = None;
        for entry in &self.entries {
            if entry.hash.matches(&hash) {
                found = Some(entry);
            }
        }
        found
    }

    /// Whether the token with `hash` is still accepted, with at least `role`.
    pub fn still_permits(&self, hash: &TokenHash, role: Role) -> bool {
        self.entries
            .iter()
            .any(|e| e.hash.matches(hash) && e.role.permits(role))
    }

    /// The file's text with `entry` added (for `distcc-agent token new`).
    pub fn render_with(text: &str, entry: &TokenEntry) -> String {
        let mut out = text.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("{} {} {}\n", entry.role, entry.id, entry.hash));
        out
    }
}

/// The agent's group, which may read the tokens file (`None` outside a packaged install).
fn agent_group() -> Option<nix::unistd::Gid> {
    nix::unistd::Group::from_name("distcc-agent")
        .ok()
        .flatten()
        .map(|g| g.gid)
}

/// The tokens file's text, or empty when it does not exist yet.
fn read_for_change(path: &Path) -> Result<String, TokensError> {
    let err = |message: String| TokensError {
        path: path.display().to_string(),
        line: 0,
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Tokens::parse(path, &text)?;
            Ok(text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(err(format!("cannot read: {e}"))),
    }
}

fn write_tokens_file(path: &Path, text: &str) -> Result<(), TokensError> {
    crate::atomic_file::write_atomically(path, text.as_bytes(), 0o640, agent_group()).map_err(|e| {
        TokensError {
            path: path.display().to_string(),
            line: 0,
            message: format!("cannot write: {e}"),
        }
    })
}

/// `distcc-agent token new ROLE ID`: make a token, add its hash to the tokens file
/// (atomically, mode 0640, group distcc-agent) and return the token, which is not kept.
pub fn add_new_token(path: &Path, role: Role, id: TokenId) -> Result<String, TokensError> {
    let text = read_for_change(path)?;
    let existing = Tokens::parse(path, &text)?;
    if existing.entries.iter().any(|e| e.id == id) {
        return Err(TokensError {
            path: path.display().to_string(),
            line: 0,
            message: format!("token id {id} exists; revoke it first or pick another id"),
        });
    }
    let token = generate().map_err(|e| TokensError {
        path: path.display().to_string(),
        line: 0,
        message: format!("no randomness: {e}"),
    })?;
    let entry = TokenEntry {
        role,
        id,
        hash: TokenHash::of(&token),
    };
    write_tokens_file(path, &Tokens::render_with(&text, &entry))?;
    Ok(token)
}

/// `distcc-agent token revoke ID`: drop its line. Takes effect at the next
/// `systemctl reload distcc-agent`.
pub fn revoke(path: &Path, id: &TokenId) -> Result<(), TokensError> {
    let text = read_for_change(path)?;
    let mut found = false;
    let kept: String = text
        .lines()
        .filter(|line| {
            let this = line.split_whitespace().nth(1) == Some(id.as_str())
                && !line.trim_start().starts_with('#');
            found |= this;
            !this
        })
        .map(|line| format!("{line}\n"))
        .collect();
    if !found {
        return Err(TokensError {
            path: path.display().to_string(),
            line: 0,
            message: format!("no token with id {id}"),
        });
    }
    write_tokens_file(path, &kept)
}

/// A new random token: 32 bytes from the kernel, hex.
pub fn generate() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const READ: &str = "read-token-0123456789abcdef";
    const ADMIN: &str = "admin-token-0123456789abcdef";

    fn tokens() -> Tokens {
        let text = format!(
            "# comment\nread builders {}\n\nadmin ops {}\n",
            TokenHash::of(READ),
            TokenHash::of(ADMIN)
        );
        Tokens::parse(Path::new("tokens"), &text).unwrap()
    }

    #[test]
    fn tokens_authenticate_with_their_role() {
        let t = tokens();
        let read = t.authenticate(READ).unwrap();
        assert_eq!((read.role, read.id.as_str()), (Role::Read, "builders"));
        assert_eq!(t.authenticate(ADMIN).unwrap().role, Role::Admin);
        assert!(t.authenticate("admin-token-0123456789abcdeX").is_none());
        assert!(Role::Admin.permits(Role::Read));
        assert!(!Role::Read.permits(Role::Admin));
        assert!(t.still_permits(&TokenHash::of(READ), Role::Read));
        assert!(!t.still_permits(&TokenHash::of(READ), Role::Admin));
    }

    #[test]
    fn bad_lines_are_named() {
        let hash = TokenHash::of(READ);
        for (text, line, words) in [
            ("reader x sha256:00\n".to_owned(), 1, "not a role"),
            (format!("\nread a b {hash}\n"), 2, "ROLE ID"),
            (format!("read bad/id {hash}\n"), 1, "token id"),
            ("read x md5:00\n".to_owned(), 1, "sha256:HEX"),
            (format!("read x {hash}\nadmin x {hash}\n"), 2, "twice"),
        ] {
            let err = Tokens::parse(Path::new("/etc/distcc-agent/tokens"), &text).unwrap_err();
            assert_eq!(err.line, line, "{err}");
            assert!(err.message.contains(words), "{err}");
        }
    }

    #[test]
    fn hashes_round_trip_and_never_show_the_token() {
        let hash = TokenHash::of(ADMIN);
        assert_eq!(hash.to_string().parse::<TokenHash>().unwrap(), hash);
        assert!(!format!("{hash:?}").contains(ADMIN));
        let entry = TokenEntry {
            role: Role::Read,
            id: "new".parse().unwrap(),
            hash: hash.clone(),
        };
        let text = Tokens::render_with("admin ops sha256:00", &entry);
        assert_eq!(text, format!("admin ops sha256:00\nread new {hash}\n"));
        let token = generate().unwrap();
        assert_eq!(token.len(), 64);
        assert_ne!(token, generate().unwrap());
    }

    #[test]
    fn new_tokens_are_added_and_revoked_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let admin = add_new_token(&path, Role::Admin, "ops".parse().unwrap()).unwrap();
        let read = add_new_token(&path, Role::Read, "builders".parse().unwrap()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&admin) && !text.contains(&read), "{text}");
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.authenticate(&admin).unwrap().role, Role::Admin);
        assert_eq!(tokens.authenticate(&read).unwrap().role, Role::Read);
        let again = add_new_token(&path, Role::Read, "ops".parse().unwrap()).unwrap_err();
        assert!(again.message.contains("exists"), "{again}");
        revoke(&path, &"ops".parse().unwrap()).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        assert!(tokens.authenticate(&admin).is_none());
        assert!(tokens.authenticate(&read).is_some());
        assert!(revoke(&path, &"ops".parse().unwrap()).is_err());
    }

    #[test]
    fn a_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("read x {}\n", TokenHash::of(READ))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Tokens::load(&path).unwrap_err();
        assert!(err.message.contains("chmod 0640"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(Tokens::load(&path).unwrap().entries().len(), 1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(Tokens::load(&path).is_err(), "group-writable");
        // A token in clear must not even be readable by the group.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        assert!(
            check_secret_file(&metadata, true)
                .unwrap_err()
                .contains("chmod 0600")
        );
    }
}
