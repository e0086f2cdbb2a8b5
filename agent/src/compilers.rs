//! The compilers distccd may run: the masquerade links in `/usr/lib/distcc`, each resolved
//! to the real binary with its version, target and a fingerprint of the binary.
//!
//! Running a compiler takes milliseconds and a status is asked for often, so results are
//! cached per binary and recomputed only when the binary changes (size or mtime).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use distcc_proto::{compiler_fingerprint as fingerprint, resolve_compiler as resolve};

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompilerInfo {
    /// Name of the masquerade link (`gcc`, `x86_64-linux-gnu-g++-12`).
    pub name: String,
    /// The real compiler binary.
    pub path: PathBuf,
    pub version: String,
    pub target: String,
    /// sha256 of the binary, hex.
    pub fingerprint: String,
    /// Why the compiler could not be described; the other fields may be empty then.
    pub error: String,
}

#[derive(Clone, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        })
    }
}

/// Describes the compilers of one masquerade dir, caching per binary.
#[derive(Default)]
pub struct CompilerCatalog {
    cache: Mutex<HashMap<PathBuf, (Stamp, CompilerInfo)>>,
    versions: Mutex<HashMap<PathBuf, (Stamp, String)>>,
}

/// Names of the masquerade links in `dir` (symlinks only), sorted.
pub fn masquerade_links(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_symlink()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

impl CompilerCatalog {
    /// Describe every compiler in `dir`. With `refresh` false, compilers not seen before
    /// are listed with only their name and path (nothing is run).
    pub async fn describe(&self, dir: &Path, refresh: bool) -> std::io::Result<Vec<CompilerInfo>> {
        let mut out = Vec::new();
        for name in masquerade_links(dir)? {
            let Some(path) = resolve(&name) else {
                out.push(CompilerInfo {
                    name,
                    error: "no such compiler installed".to_owned(),
                    ..Default::default()
                });
                continue;
            };
            let stamp = match Stamp::of(&path) {
                Ok(stamp) => stamp,
                Err(e) => {
                    out.push(CompilerInfo {
                        name,
                        path,
                        error: e.to_string(),
                        ..Default::default()
                    });
                    continue;
                }
            };
            let cached = self
                .lock()
                .get(&path)
                .filter(|(s, _)| *s == stamp)
                .map(|(_, i)| i.clone());
            let info = match cached {
                Some(info) => info,
                None if !refresh => CompilerInfo {
                    path: path.clone(),
                    ..Default::default()
                },
                None => {
                    let info = describe_binary(&path).await;
                    self.lock().insert(path.clone(), (stamp, info.clone()));
                    info
                }
            };
            out.push(CompilerInfo { name, ..info });
        }
        Ok(out)
    }

    /// `program --version`'s first line, run again only when the binary changed.
    pub async fn version_of(&self, program: &str) -> Result<String, String> {
        let path = resolve(program).ok_or_else(|| format!("{program} is not installed"))?;
        let stamp = Stamp::of(&path).map_err(|e| e.to_string())?;
        let versions = || {
            self.versions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((_, version)) = versions().get(&path).filter(|(s, _)| *s == stamp) {
            return Ok(version.clone());
        }
        let version = first_line_of(&path, "--version").await?;
        versions().insert(path, (stamp, version.clone()));
        Ok(version)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (Stamp, CompilerInfo)>> {
        // The map holds plain data; a panic elsewhere cannot leave it inconsistent.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn describe_binary(path: &Path) -> CompilerInfo {
    let mut info = CompilerInfo {
        path: path.to_owned(),
        ..Default::default()
    };
    let mut errors = Vec::new();
    match first_line_of(path, "--version").await {
        Ok(line) => info.version = line,
        Err(e) => errors.push(format!("--version: {e}")),
    }
    match first_line_of(path, "-dumpmachine").await {
        Ok(line) => info.target = line,
        Err(e) => errors.push(format!("-dumpmachine: {e}")),
    }
    let hashed = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || fingerprint(&path)).await
    };
    match hashed {
        Ok(Ok(hex)) => info.fingerprint = hex,
        Ok(Err(e)) => errors.push(format!("fingerprint: {e}")),
        Err(e) => errors.push(format!("fingerprint: {e}")),
    }
    info.error = errors.join("; ");
    info
}

/// Run `program arg` and return the first line of its output.
pub async fn first_line_of(program: &Path, arg: &str) -> Result<String, String> {
    let output = tokio::time::timeout(
        RUN_TIMEOUT,
        tokio::process::Command::new(program)
            .arg(arg)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("no answer within {RUN_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!("exited with {}", output.status));
    }
    // distccd --version prints to stdout; some tools use stderr.
    let text = if output.stdout.is_empty() {
        output.stderr
    } else {
        output.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| "printed nothing".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn describes_the_host_compiler_through_a_masquerade_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/usr/bin/distcc", dir.path().join("gcc")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/distcc", dir.path().join("no-such-cc-9")).unwrap();
        std::fs::write(dir.path().join("README"), "not a link").unwrap();
        let catalog = CompilerCatalog::default();

        let cold = catalog.describe(dir.path(), false).await.unwrap();
        assert_eq!(cold.len(), 2, "{cold:?}");
        assert!(cold[1].version.is_empty(), "nothing is run without refresh");

        let all = catalog.describe(dir.path(), true).await.unwrap();
        let gcc = all.iter().find(|c| c.name == "gcc").unwrap();
        assert!(gcc.error.is_empty(), "{gcc:?}");
        assert!(gcc.version.contains("gcc"), "{gcc:?}");
        assert_eq!(gcc.target, "x86_64-linux-gnu");
        assert_eq!(gcc.fingerprint.len(), 64);
        assert_eq!(gcc.fingerprint, fingerprint(&gcc.path).unwrap());
        let missing = all.iter().find(|c| c.name == "no-such-cc-9").unwrap();
        assert_eq!(missing.error, "no such compiler installed");

        // Cached now: the same answer without refresh.
        let warm = catalog.describe(dir.path(), false).await.unwrap();
        assert_eq!(warm, all);
    }
}
