//! distccd's settings on disk. `settings.json` holds the settings and their generation
//! (the source of truth); `distccd.env` is rendered from it for `distccd.service`
//! (`DISTCCD_OPTS`, which `ExecStart=` expands) and never read back. Both are written
//! atomically (temp file in the same directory, fsync, rename, fsync the directory), so a
//! reader sees the old or the new file, never half of one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::atomic_file::write_atomically;
use crate::settings::{AllowPolicy, DistccdSettings};

const PUBLIC: u32 = 0o644;

pub const SETTINGS_FILE: &str = "settings.json";
pub const ENV_FILE: &str = "distccd.env";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The persisted settings. `generation` counts the changes since the first one: a
/// Configure can name the generation it was based on, so a stale change is refused instead
/// of silently overwriting another admin's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persisted {
    pub generation: u64,
    pub settings: DistccdSettings,
}

#[derive(Debug, Clone)]
pub struct SettingsStore {
    dir: PathBuf,
    /// The operator's policy: distccd's own `--allow` in the rendered env file is its
    /// bound (see [`crate::confinement`]). Replaced when the config is reloaded.
    policy: Arc<RwLock<AllowPolicy>>,
}

impl SettingsStore {
    /// The store in the agent's state directory. Without a policy, distccd's `--allow` is
    /// the allowlist itself.
    pub fn new(dir: PathBuf) -> Self {
        let policy = AllowPolicy {
            allow_within: Default::default(),
            permit_public: false,
            max_allow_entries: AllowPolicy::DEFAULT_MAX_ALLOW_ENTRIES,
        };
        Self {
            dir,
            policy: Arc::new(RwLock::new(policy)),
        }
    }

    pub fn with_policy(self, policy: AllowPolicy) -> Self {
        self.set_policy(policy);
        self
    }

    /// Render later env files with `policy`'s bound.
    pub fn set_policy(&self, policy: AllowPolicy) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    fn env_file_text(&self, settings: &DistccdSettings) -> String {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        env_file_text(settings, &policy)
    }

    pub fn settings_path(&self) -> PathBuf {
        self.dir.join(SETTINGS_FILE)
    }

    /// The file `distccd.service` reads (`EnvironmentFile=`).
    pub fn env_path(&self) -> PathBuf {
        self.dir.join(ENV_FILE)
    }

    /// The persisted settings, or `None` when nothing was persisted yet. Settings persisted
    /// by agent 0.1 (only an environment file, one variable per setting) are migrated.
    pub fn load(&self) -> Result<Option<Persisted>, StoreError> {
        let path = self.settings_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.migrate_v1(),
            Err(source) => return Err(io(&path, source)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Parse {
                path: path.display().to_string(),
                line: e.line(),
                column: e.column(),
                message: e.to_string(),
            })
    }

    /// Persist `settings` as the next generation after `previous` (`None`: the first), then
    /// render distccd's environment file from them. Returns what was persisted.
    pub fn save(
        &self,
        settings: &DistccdSettings,
        previous: Option<u64>,
    ) -> Result<Persisted, StoreError> {
        let persisted = Persisted {
            generation: previous.map_or(1, |g| g.saturating_add(1)),
            settings: settings.clone(),
        };
        self.write(&persisted)?;
        Ok(persisted)
    }

    fn write(&self, persisted: &Persisted) -> Result<(), StoreError> {
        let mut json = serde_json::to_string_pretty(persisted).map_err(|e| StoreError::Parse {
            path: self.settings_path().display().to_string(),
            line: 0,
            column: 0,
            message: e.to_string(),
        })?;
        json.push('\n');
        write_atomically(&self.settings_path(), json.as_bytes(), PUBLIC, None)
            .map_err(|e| io(&self.settings_path(), e))?;
        self.render_env(&persisted.settings)
    }

    /// Put back exactly `persisted` (a rolled-back change). Generation 0 (nothing was
    /// persisted before) is written as the first generation.
    pub fn restore(&self, persisted: &Persisted) -> Result<(), StoreError> {
        if persisted.generation == 0 {
            return self.save(&persisted.settings, None).map(|_| ());
        }
        self.write(persisted)
    }

    /// Rewrite distccd's environment file when it does not match `settings` (it is only
    /// ever derived from them; a crash between the two writes of [`Self::save`] leaves it
    /// behind). Returns whether it was rewritten. distccd reads it on its next start.
    pub fn ensure_env_rendered(&self, settings: &DistccdSettings) -> Result<bool, StoreError> {
        let wanted = self.env_file_text(settings);
        match std::fs::read_to_string(self.env_path()) {
            Ok(text) if text == wanted => Ok(false),
            _ => self.render_env(settings).map(|()| true),
        }
    }

    /// Agent 0.1 kept the settings in the environment file as `DISTCCD_ALLOW="..."`,
    /// `DISTCCD_JOBS="..."`... Their values go through the same deserialization as
    /// settings.json, so they are checked the same way.
    fn migrate_v1(&self) -> Result<Option<Persisted>, StoreError> {
        let path = self.env_path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let mut fields = serde_json::Map::new();
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once('=') else {
                continue;
            };
            let Some(field) = key.strip_prefix("DISTCCD_") else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            let field = field.to_ascii_lowercase();
            let json = match field.as_str() {
                "opts" => continue,
                "allow" => serde_json::json!(value.split_whitespace().collect::<Vec<_>>()),
                "listen" => serde_json::json!(value),
                "stats" => serde_json::json!(value == "1"),
                "job_lifetime" => {
                    fields.insert("job_lifetime_secs".into(), number(value));
                    continue;
                }
                _ => number(value),
            };
            fields.insert(field, json);
        }
        if !fields.contains_key("allow") {
            return Ok(None);
        }
        let settings: DistccdSettings =
            serde_json::from_value(fields.into()).map_err(|e| StoreError::Parse {
                path: path.display().to_string(),
                line: 0,
                column: 0,
                message: format!("migrating agent 0.1 settings: {e}"),
            })?;
        tracing::info!(from = %path.display(), "migrated agent 0.1 settings to {SETTINGS_FILE}");
        self.save(&settings, None).map(Some)
    }

    fn render_env(&self, settings: &DistccdSettings) -> Result<(), StoreError> {
        // distccd's user reads it; the settings hold no secret, only the allowlist and limits.
        write_atomically(
            &self.env_path(),
            self.env_file_text(settings).as_bytes(),
            PUBLIC,
            None,
        )
        .map_err(|e| io(&self.env_path(), e))
    }
}

/// A number as JSON, or the text itself (which then fails deserialization, named).
fn number(value: &str) -> serde_json::Value {
    value
        .parse::<i64>()
        .map_or_else(|_| serde_json::json!(value), |n| serde_json::json!(n))
}

fn env_file_text(settings: &DistccdSettings, policy: &AllowPolicy) -> String {
    format!(
        "# Written by distcc-agent from {SETTINGS_FILE}; change settings with its Configure RPC\n\
         # or in /etc/distcc-agent/agent.toml. Edits here are overwritten.\n\
         DISTCCD_OPTS=\"{}\"\n",
        settings.to_args(policy).join(" ")
    )
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::settings::Jobs;
    use std::os::unix::fs::PermissionsExt;

    fn settings(jobs: i64) -> DistccdSettings {
        DistccdSettings {
            allow: ["198.18.0.0/24".parse().unwrap()].into_iter().collect(),
            jobs: Jobs::try_from(jobs).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn save_then_load_counts_generations_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettingsStore::new(dir.path().join("state"));
        assert_eq!(store.load().unwrap(), None);
        let first = store.save(&settings(3), None).unwrap();
        assert_eq!(first.generation, 1);
        assert_eq!(store.load().unwrap(), Some(first.clone()));
        let second = store.save(&settings(9), Some(first.generation)).unwrap();
        assert_eq!(second.generation, 2);
        assert_eq!(store.load().unwrap().unwrap().settings, settings(9));
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec![ENV_FILE, SETTINGS_FILE]);
        for path in [store.env_path(), store.settings_path()] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }

    #[test]
    fn the_env_file_is_rendered_from_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettingsStore::new(dir.path().to_owned());
        store.save(&settings(7), None).unwrap();
        let env = std::fs::read_to_string(store.env_path()).unwrap();
        assert!(
            env.contains("DISTCCD_OPTS=\"--allow 198.18.0.0/24 --allow 127.0.0.1/32 --jobs 7 "),
            "{env}"
        );
        assert!(!store.ensure_env_rendered(&settings(7)).unwrap());
        // Left behind by a crash between the two writes, or edited by hand: re-rendered.
        std::fs::write(store.env_path(), "DISTCCD_OPTS=\"--allow 0.0.0.0/0\"\n").unwrap();
        assert!(store.ensure_env_rendered(&settings(7)).unwrap());
        assert_eq!(std::fs::read_to_string(store.env_path()).unwrap(), env);
    }

    #[test]
    fn settings_of_agent_0_1_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettingsStore::new(dir.path().to_owned());
        std::fs::write(
            store.env_path(),
            "# Written by distcc-agent.\nDISTCCD_ALLOW=\"198.18.0.0/24\"\nDISTCCD_JOBS=\"7\"\n\
             DISTCCD_NICE=\"10\"\nDISTCCD_LISTEN=\"0.0.0.0\"\nDISTCCD_PORT=\"3632\"\n\
             DISTCCD_STATS=\"1\"\nDISTCCD_STATS_PORT=\"3633\"\nDISTCCD_JOB_LIFETIME=\"0\"\n\
             DISTCCD_OPTS=\"--allow 198.18.0.0/24 --jobs 7\"\n",
        )
        .unwrap();
        let migrated = store.load().unwrap().unwrap();
        assert_eq!(
            migrated,
            Persisted {
                generation: 1,
                settings: settings(7)
            }
        );
        assert_eq!(store.load().unwrap(), Some(migrated));
        // A file without an allowlist was never written by the agent: nothing to migrate.
        let empty = tempfile::tempdir().unwrap();
        let store = SettingsStore::new(empty.path().to_owned());
        std::fs::write(store.env_path(), "DISTCCD_OPTS=\"\"\n").unwrap();
        assert_eq!(store.load().unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettingsStore::new(dir.path().to_owned());
        std::fs::write(
            store.settings_path(),
            "{\"generation\": 1,\n \"settings\": {\"port\": 99999}}\n",
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("settings.json:2:"), "{err}");
        assert!(err.contains("99999 is outside 1..=65535"), "{err}");
    }
}
