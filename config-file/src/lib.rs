//! The cluster's config files (`agent.toml`, `builder.toml`): TOML deserialized with serde
//! into the crates' own types, with every error naming file, line and key
//! (`/etc/distcc-agent/agent.toml:7: distccd.allow[1]: "bogus" is not a CIDR network`).
//!
//! serde reports where a bad value is (a byte span) but not which key holds it; this crate
//! turns spans into dotted key paths (and back, for errors found after parsing, such as a
//! value that is fine alone but conflicts with another).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use thiserror::Error;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

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

/// One config file's text, kept so that errors can point into it.
pub struct ConfigFile {
    path: PathBuf,
    text: String,
    /// Every key and array element with the span of its key and of its value, in document
    /// order; empty when the text is not valid TOML.
    locations: Vec<Location>,
}

struct Location {
    path: String,
    key: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::new(path, text))
    }

    /// `text` as if read from `path`.
    pub fn new(path: &Path, text: impl Into<String>) -> Self {
        let text = text.into();
        let mut locations = Vec::new();
        if let Ok(root) = DeTable::parse(&text) {
            collect_table(root.get_ref(), "", &mut locations);
        }
        Self {
            path: path.to_owned(),
            text,
            locations,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deserialize the whole file; a bad value or an unknown key is an error naming its line
    /// and key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|err| {
            let offset = err.span().map_or(0, |span| span.start);
            let message = err.message().trim();
            // An unknown key's span is its key; its path is then known even though the
            // key is not one of ours.
            self.error_at(offset, &self.key_at(offset), message)
        })
    }

    /// An error about the value at dotted `key` (`distccd.allow[2]`), found after parsing.
    /// When the key is not in the file (a default was used), the line of the nearest
    /// enclosing key that is, else line 1.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.error_at(self.offset_of(key), key, message)
    }

    /// An error about the value at byte `offset` (a `toml::Spanned` value's span start).
    pub fn error_at(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            line: self.line_of(offset),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// The dotted path of the innermost key or array element whose key or value spans
    /// `offset`; empty when none does.
    pub fn key_at(&self, offset: usize) -> String {
        self.locations
            .iter()
            .filter(|l| l.key.contains(&offset) || l.value.contains(&offset))
            // A child's path extends its parent's: the innermost is the longest.
            .max_by_key(|l| l.path.len())
            .map(|l| l.path.clone())
            .unwrap_or_default()
    }

    /// Where `key` (or its nearest enclosing key present in the file) starts; 0 otherwise.
    fn offset_of(&self, key: &str) -> usize {
        let mut key = key;
        loop {
            if let Some(l) = self.locations.iter().find(|l| l.path == key) {
                return l.value.start;
            }
            match key.rfind(['.', '[']) {
                Some(cut) => key = &key[..cut],
                None => return 0,
            }
        }
    }

    /// The line (from 1) of byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }
}

/// A file holding a secret (token, token hashes): owned by root or the running user, not
/// writable by group or others and not readable by others. `refuse_group_read` refuses
/// group read too (a token in clear). The error says how to fix it.
pub fn check_secret_file(
    metadata: &std::fs::Metadata,
    refuse_group_read: bool,
) -> Result<(), String> {
    let owner = metadata.uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner != 0 && owner != me {
        return Err(format!(
            "owned by uid {owner}, not root: fix with chown root FILE"
        ));
    }
    let mode = metadata.mode() & 0o777;
    let forbidden = if refuse_group_read { 0o077 } else { 0o027 };
    if mode & forbidden != 0 {
        let wanted = if refuse_group_read { "0600" } else { "0640" };
        return Err(format!(
            "mode {mode:04o} lets others read or change it: fix with chmod {wanted} FILE"
        ));
    }
    Ok(())
}

fn collect_table(table: &DeTable<'_>, prefix: &str, out: &mut Vec<Location>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        collect_value(value, path, key.span(), out);
    }
}

fn collect_value(
    value: &Spanned<DeValue<'_>>,
    path: String,
    key: std::ops::Range<usize>,
    out: &mut Vec<Location>,
) {
    match value.get_ref() {
        DeValue::Table(table) => collect_table(table, &path, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_value(item, format!("{path}[{i}]"), item.span(), out);
            }
        }
        _ => {}
    }
    out.push(Location {
        path,
        key,
        value: value.span(),
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: Option<String>,
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        ports: Option<Vec<u16>>,
        nice: Option<u8>,
    }

    fn invalid(err: ConfigError) -> (usize, String, String) {
        match err {
            ConfigError::Invalid {
                line, key, message, ..
            } => (line, key, message),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    fn parse(text: &str) -> Result<Doc, ConfigError> {
        ConfigFile::new(Path::new("t.toml"), text).parse()
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let (line, key, _) = invalid(parse("name = \"x\"\n[inner]\nnice = 300\n").unwrap_err());
        assert_eq!((line, key.as_str()), (3, "inner.nice"));
        let (line, key, _) = invalid(parse("[inner]\nports = [1,\n 2,\n 70000]\n").unwrap_err());
        assert_eq!((line, key.as_str()), (4, "inner.ports[2]"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let (line, key, message) =
            invalid(parse("name = \"x\"\n\n[inner]\nnicenes = 3\n").unwrap_err());
        assert_eq!((line, key.as_str()), (4, "inner.nicenes"), "{message}");
        let (line, key, _) = invalid(parse("bogus = 1\n").unwrap_err());
        assert_eq!((line, key.as_str()), (1, "bogus"));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let (line, key, _) = invalid(parse("name = \"x\"\n[inner\n").unwrap_err());
        assert_eq!((line, key.as_str()), (2, ""));
    }

    #[test]
    fn errors_after_parsing_point_at_the_key_or_its_parent() {
        let file = ConfigFile::new(
            Path::new("t.toml"),
            "name = \"x\"\n[inner]\nports = [1, 2]\n",
        );
        let (line, key, _) = invalid(file.error("inner.ports[1]", "taken"));
        assert_eq!((line, key.as_str()), (3, "inner.ports[1]"));
        // Not in the file: the table it would be in.
        let (line, key, _) = invalid(file.error("inner.nice", "needed"));
        assert_eq!((line, key.as_str()), (2, "inner.nice"));
        let (line, _, _) = invalid(file.error("elsewhere", "needed"));
        assert_eq!(line, 1);
        assert_eq!(
            file.error("inner.ports[1]", "taken").to_string(),
            "t.toml:3: inner.ports[1]: taken"
        );
    }
}
