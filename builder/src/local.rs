//! The builder's own toolchain: its compilers (described exactly the way the agent
//! describes a worker's, so fingerprints compare) and distcc's masquerade directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use distcc_proto::{
    COMPILER_SEARCH_PATH, compiler_fingerprint as fingerprint, resolve_compiler as resolve,
};
use thiserror::Error;

use crate::host_list::LocalCompiler;

/// distcc's masquerade directories: Debian's, then the upstream default.
pub const MASQUERADE_CANDIDATES: [&str; 2] = ["/usr/lib/distcc", "/usr/lib/distcc/bin"];

#[derive(Debug, Error)]
pub enum LocalError {
    #[error("`{0}` is not installed (looked in {path})", path = COMPILER_SEARCH_PATH.join(", "))]
    NotInstalled(String),
    #[error("{program} {arg}: {message}")]
    Run {
        program: String,
        arg: String,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Describe the local compiler `name`.
pub fn describe(name: &str) -> Result<LocalCompiler, LocalError> {
    let path = resolve(name).ok_or_else(|| LocalError::NotInstalled(name.to_owned()))?;
    Ok(LocalCompiler {
        name: name.to_owned(),
        version: first_line_of(&path, "--version")?,
        target: first_line_of(&path, "-dumpmachine")?,
        fingerprint: fingerprint(&path).map_err(|source| LocalError::Read {
            path: path.display().to_string(),
            source,
        })?,
    })
}

fn first_line_of(program: &Path, arg: &str) -> Result<String, LocalError> {
    let error = |message: String| LocalError::Run {
        program: program.display().to_string(),
        arg: arg.to_owned(),
        message,
    };
    let output = Command::new(program)
        .arg(arg)
        .output()
        .map_err(|e| error(e.to_string()))?;
    if !output.status.success() {
        return Err(error(format!("exited with {}", output.status)));
    }
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
        .ok_or_else(|| error("printed nothing".to_owned()))
}

/// The masquerade directory: `configured`, else the first candidate holding a `gcc` link.
pub fn masquerade_dir(configured: Option<&Path>) -> Option<PathBuf> {
    match configured {
        Some(dir) => dir.is_dir().then(|| dir.to_owned()),
        None => MASQUERADE_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|dir| dir.join("gcc").exists()),
    }
}

/// The compilers of `wanted` that have no link in `dir` (distcc would run them locally).
pub fn missing_links(dir: &Path, wanted: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|name| {
            !std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.file_type().is_symlink())
        })
        .cloned()
        .collect()
}

/// The first `program` on `$PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_sha256_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(
            fingerprint(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn missing_links_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../../bin/distcc", dir.path().join("gcc")).unwrap();
        std::fs::write(dir.path().join("g++"), "not a link").unwrap();
        assert_eq!(
            missing_links(dir.path(), &["gcc".into(), "g++".into(), "cc".into()]),
            ["g++", "cc"]
        );
    }
}
