//! distccd's settings on disk: the environment file `distccd.service` reads, written
//! atomically (temp file in the same directory, fsync, rename, fsync the directory) so
//! distccd never sees a half-written file and a crash leaves the old or the new one.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::settings::{DistccdSettings, EnvFileError};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Parse(#[from] EnvFileError),
}

#[derive(Debug, Clone)]
pub struct SettingsStore {
    path: PathBuf,
}

impl SettingsStore {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The persisted settings, or `None` when nothing was persisted yet.
    pub fn load(&self) -> Result<Option<DistccdSettings>, StoreError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(Some(DistccdSettings::from_env_file(&self.path, &text)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Replace the file atomically. Readable by distccd's user (mode 0644): it holds no
    /// secret, only the allowlist and limits.
    pub fn save(&self, settings: &DistccdSettings) -> Result<(), StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        let mut temp = tempfile::Builder::new()
            .prefix(".distccd.env.")
            .tempfile_in(dir)
            .map_err(|e| self.io(e))?;
        temp.write_all(settings.to_env_file().as_bytes())
            .map_err(|e| self.io(e))?;
        temp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| self.io(e))?;
        temp.as_file().sync_all().map_err(|e| self.io(e))?;
        temp.persist(&self.path).map_err(|e| self.io(e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_and_no_temp_files_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettingsStore::new(dir.path().join("state/distccd.env"));
        assert_eq!(store.load().unwrap(), None);
        let settings = DistccdSettings {
            allow: vec!["198.18.0.0/24".parse().unwrap()],
            jobs: 3,
            ..Default::default()
        };
        store.save(&settings).unwrap();
        assert_eq!(store.load().unwrap(), Some(settings.clone()));
        let changed = DistccdSettings {
            jobs: 9,
            ..settings
        };
        store.save(&changed).unwrap();
        assert_eq!(store.load().unwrap(), Some(changed));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["distccd.env"]);
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("distccd.env");
        std::fs::write(&path, "DISTCCD_PORT=\"99999\"\n").unwrap();
        let err = SettingsStore::new(path).load().unwrap_err();
        assert!(
            err.to_string()
                .ends_with(":1: DISTCCD_PORT: 99999 is outside 0..=65535"),
            "{err}"
        );
    }
}
