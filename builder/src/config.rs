//! `/etc/distcc-builder/builder.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/distcc-builder/builder.toml";

#[derive(Debug, Clone, PartialEq)]
pub struct BuilderConfig {
    /// Agent endpoints, `host:port`, as configured.
    pub workers: Vec<String>,
    pub token: String,
    pub workspace: PathBuf,
    pub tmpfs_size: String,
    /// Per-worker bound on one RPC: a dead worker costs at most this.
    pub deadline: Duration,
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
    workers: Vec<Spanned<String>>,
    token_file: Spanned<PathBuf>,
    workspace: Option<PathBuf>,
    tmpfs_size: Option<String>,
    deadline_ms: Option<Spanned<u64>>,
}

impl BuilderConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |offset: usize, key: &str, message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            line: text[..offset.min(text.len())].matches('\n').count() + 1,
            key: key.to_owned(),
            message,
        };
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            invalid(
                e.span().map_or(0, |s| s.start),
                "",
                e.message().trim().to_owned(),
            )
        })?;
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
        let token_path = raw.token_file.get_ref();
        let token = std::fs::read_to_string(token_path)
            .map_err(|e| {
                invalid(
                    raw.token_file.span().start,
                    "token_file",
                    format!("cannot read {}: {e}", token_path.display()),
                )
            })?
            .trim()
            .to_owned();
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
        Ok(Self {
            workers: raw.workers.into_iter().map(Spanned::into_inner).collect(),
            token,
            workspace: raw
                .workspace
                .unwrap_or_else(|| PathBuf::from("/tmp/kernel-build")),
            tmpfs_size: raw.tmpfs_size.unwrap_or_else(|| "2G".to_owned()),
            deadline,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn load(body: &str) -> Result<BuilderConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "0123456789abcdef\n").unwrap();
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
        assert_eq!(c.token, "0123456789abcdef");
        assert_eq!(c.deadline, Duration::from_secs(1));
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
}
