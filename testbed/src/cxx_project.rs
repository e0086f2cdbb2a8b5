//! The C++ workload beside the kernel: Debian's `abseil` source package (Abseil LTS
//! 20220623.1), built with its own CMake build system, tests off: 119 translation units,
//! about 110 s of CPU with `-O2` on this machine's cores, no build dependencies but cmake.
//!
//! The compiler is chosen by the build command alone, as `make CC=...` does for the
//! kernel: CMake bakes the compiler's path into its Makefiles at configure time, so
//! [`CxxBuild::configure`] fixes the compiler to `/usr/bin/g++` and sets the compiler
//! launcher to the make variable `$(CXX_LAUNCHER)` (CMake's Makefile generator copies
//! `$(VAR)` references through unescaped). [`CxxBuild::build_command`] sets that variable
//! to whatever precedes `g++` in `cxx`: nothing, `distcc` or `icecc`. One configure then
//! serves local, distcc and icecream builds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// Debian's source package (`apt-get source abseil`, bookworm: 20220623.1-1+deb12u2).
pub const CXX_PACKAGE: &str = "abseil";

/// Where `testbed/setup-host --cxx` downloads the source package, under the cache.
pub const CXX_SOURCE_DOWNLOAD: &str = "cxx-src";

/// Object files a complete build leaves (one per translation unit).
pub const CXX_OBJECTS: usize = 119;

/// The compiler every configure fixes; `cxx` in [`CxxBuild::build_command`] must name it.
pub const CXX_COMPILER: &str = "/usr/bin/g++";

/// Release flags without `-g`: no debug info, so no working directory in the objects
/// (a remote compile runs in distccd's temporary directory). `-O2` rather than CMake's
/// Release default `-O3`: what Debian's packages are built with.
pub const CXX_FLAGS_RELEASE: &str = "-O2 -DNDEBUG";

/// The unpacked source in the test-bed cache (`dpkg-source -x` of the downloaded
/// package, with Debian's patches, on the first call).
pub fn cxx_source() -> Result<PathBuf> {
    cxx_source_in(&crate::cache_dir())
}

/// [`cxx_source`] in another cache directory.
pub fn cxx_source_in(cache: &Path) -> Result<PathBuf> {
    let source = cache.join(CXX_PACKAGE);
    if source.join("CMakeLists.txt").exists() {
        return Ok(source);
    }
    let download = cache.join(CXX_SOURCE_DOWNLOAD);
    let dsc = find_dsc(&download)?;
    tracing::info!(dsc = %dsc.display(), "unpacking the C++ project's source (once)");
    // Unpacked beside its final name and renamed when complete, so an interrupted unpack
    // is never taken for a source tree (the marker file alone would not say it is whole).
    let partial = cache.join(format!("{CXX_PACKAGE}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot delete {}", partial.display()))?;
    }
    let out = Command::new("dpkg-source")
        .arg("-x")
        .arg(&dsc)
        .arg(&partial)
        .output()
        .context("running dpkg-source (package dpkg-dev; testbed/setup-host --cxx)")?;
    ensure!(
        out.status.success(),
        "dpkg-source -x {} failed: {}",
        dsc.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, &source)
        .with_context(|| format!("cannot rename {} into place", partial.display()))?;
    Ok(source)
}

/// The one `abseil_*.dsc` in `dir`; an error naming the fix when there is none.
fn find_dsc(dir: &Path) -> Result<PathBuf> {
    let fix = "run testbed/setup-host --cxx (apt-get source --download-only abseil)";
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} is missing: {fix}", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&format!("{CXX_PACKAGE}_")) && name.ends_with(".dsc") {
            found.push(path);
        }
    }
    match found.len() {
        0 => bail!("no {CXX_PACKAGE}_*.dsc in {}: {fix}", dir.display()),
        1 => Ok(found.remove(0)),
        _ => bail!(
            "several {CXX_PACKAGE}_*.dsc in {} ({found:?}): delete the directory and {fix}",
            dir.display()
        ),
    }
}

/// The launcher part of `cxx`: the words before the compiler, which must be `g++` (the
/// compiler configure fixed). `"g++"` -> `""`, `"distcc g++"` -> `"distcc"`.
pub fn cxx_launcher(cxx: &str) -> Result<String> {
    let words: Vec<&str> = cxx.split_whitespace().collect();
    let Some((compiler, launcher)) = words.split_last() else {
        bail!("no compiler in {cxx:?}");
    };
    let configured = Path::new(CXX_COMPILER).file_name().and_then(|n| n.to_str());
    ensure!(
        Some(*compiler) == configured || *compiler == CXX_COMPILER,
        "{cxx:?} does not end in g++: the build was configured for {CXX_COMPILER}"
    );
    Ok(launcher.join(" "))
}

/// One out-of-tree build of the project in `build_dir`.
#[derive(Debug, Clone)]
pub struct CxxBuild {
    source: PathBuf,
    build_dir: PathBuf,
}

impl CxxBuild {
    pub fn new(source: PathBuf, build_dir: PathBuf) -> CxxBuild {
        CxxBuild { source, build_dir }
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn build_dir(&self) -> &Path {
        &self.build_dir
    }

    /// Untimed: empties the build directory (keeping the directory itself, which may be a
    /// mount point) and runs cmake there, Unix Makefiles, Release with
    /// [`CXX_FLAGS_RELEASE`], tests off. The compiler is left to the build command.
    pub fn configure(&self) -> Result<()> {
        empty_dir(&self.build_dir)?;
        let out = self
            .configure_command()
            .output()
            .context("running cmake (testbed/setup-host --cxx installs it)")?;
        ensure!(
            out.status.success(),
            "cmake in {} failed: {}\n{}",
            self.build_dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The cmake invocation of [`configure`](Self::configure), not started.
    pub fn configure_command(&self) -> Command {
        let mut cmd = Command::new("cmake");
        cmd.args(["-G", "Unix Makefiles", "-S"])
            .arg(&self.source)
            .arg("-B")
            .arg(&self.build_dir)
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                &format!("-DCMAKE_CXX_FLAGS_RELEASE={CXX_FLAGS_RELEASE}"),
                // The build directory's path out of the objects, as reproducible builds
                // do: two builders building in two directories make the same objects.
                &format!(
                    "-DCMAKE_CXX_FLAGS=-ffile-prefix-map={}=.",
                    self.build_dir.display()
                ),
                // Tests would need googletest and triple the work.
                "-DBUILD_TESTING=OFF",
                "-DABSL_BUILD_TESTING=OFF",
                // An absolute path: a configure run with the distcc masquerade directory
                // first in PATH (builder mode) would otherwise bake in distcc's g++.
                &format!("-DCMAKE_CXX_COMPILER={CXX_COMPILER}"),
                // Expanded by make at build time; see the module's comment.
                "-DCMAKE_CXX_COMPILER_LAUNCHER=$(CXX_LAUNCHER)",
            ]);
        // Only the command line decides: no CXX/CXXFLAGS of the caller's environment.
        cmd.env_remove("CXX")
            .env_remove("CXXFLAGS")
            .env_remove("CMAKE_CXX_COMPILER_LAUNCHER");
        cmd
    }

    /// The timed step: `make -C BUILD_DIR -jJOBS CXX_LAUNCHER=...`, the launcher taken
    /// from `cxx` (`"g++"`, `"distcc g++"`, `"icecc g++"`). Set on make's command line,
    /// the variable reaches the recursive makes and beats any in the environment.
    ///
    /// # Panics
    /// If `cxx` does not end in `g++` (see [`cxx_launcher`]): the callers pass constants.
    pub fn build_command(&self, jobs: u32, cxx: &str) -> Command {
        let launcher = cxx_launcher(cxx).unwrap_or_else(|e| panic!("{e:#}"));
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(&self.build_dir)
            .arg(format!("-j{jobs}"))
            .arg(format!("CXX_LAUNCHER={launcher}"));
        cmd
    }

    /// sha256 of every object file under the build directory, by relative path, with
    /// debug sections stripped (there are none with these flags; stripped anyway so a
    /// `-g` in CXXFLAGS cannot make remote compiles differ by their working directory).
    /// An error if the build left fewer than [`CXX_OBJECTS`].
    pub fn objects(&self) -> Result<BTreeMap<String, String>> {
        use sha2::Digest;
        let mut paths = Vec::new();
        object_files(&self.build_dir, &mut paths)?;
        let tmp = tempfile::NamedTempFile::new().context("temporary file for strip")?;
        let mut objects = BTreeMap::new();
        for path in paths {
            let out = Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(tmp.path())
                .arg(&path)
                .output()
                .context("running strip")?;
            ensure!(
                out.status.success(),
                "strip {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let bytes = std::fs::read(tmp.path()).context("reading the stripped object")?;
            let sum: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let rel = path
                .strip_prefix(&self.build_dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            objects.insert(rel, sum);
        }
        check_object_count(objects.len())?;
        Ok(objects)
    }
}

/// A complete build has [`CXX_OBJECTS`] objects; fewer means it failed or was cut short.
fn check_object_count(found: usize) -> Result<()> {
    ensure!(
        found >= CXX_OBJECTS,
        "the C++ build left too few objects ({found}, expected {CXX_OBJECTS})"
    );
    Ok(())
}

/// Every `*.o` below `dir`, CMake's own scratch directories included (they hold none
/// after configure: try-compiles clean up after themselves).
fn object_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            object_files(&path, out)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "o") {
            out.push(path);
        }
    }
    Ok(())
}

/// Deletes everything inside `dir` (creating it if missing), not `dir` itself.
fn empty_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot delete {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_is_what_precedes_gxx() {
        assert_eq!(cxx_launcher("g++").unwrap(), "");
        assert_eq!(cxx_launcher("distcc g++").unwrap(), "distcc");
        assert_eq!(cxx_launcher("  icecc   g++ ").unwrap(), "icecc");
        assert_eq!(cxx_launcher("/usr/bin/g++").unwrap(), "");
        assert!(cxx_launcher("distcc clang++").is_err());
        assert!(cxx_launcher("").is_err());
        assert!(cxx_launcher("distcc").is_err());
    }

    #[test]
    fn build_command_passes_launcher_to_make() {
        let build = CxxBuild::new("/src".into(), "/b".into());
        let args = |cxx| -> Vec<String> {
            build
                .build_command(3, cxx)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            args("distcc g++"),
            ["-C", "/b", "-j3", "CXX_LAUNCHER=distcc"]
        );
        // Explicitly empty, so a CXX_LAUNCHER in the environment cannot leak in.
        assert_eq!(args("g++"), ["-C", "/b", "-j3", "CXX_LAUNCHER="]);
    }

    #[test]
    #[should_panic(expected = "does not end in g++")]
    fn build_command_refuses_another_compiler() {
        CxxBuild::new("/src".into(), "/b".into()).build_command(2, "clang++");
    }

    #[test]
    fn configure_leaves_the_compiler_to_make() {
        let build = CxxBuild::new("/src".into(), "/b".into());
        let cmd = build.configure_command();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"-DCMAKE_CXX_COMPILER_LAUNCHER=$(CXX_LAUNCHER)".to_owned()));
        assert!(args.contains(&"-DCMAKE_CXX_COMPILER=/usr/bin/g++".to_owned()));
        assert!(args.iter().any(|a| a.contains("-O2") && !a.contains("-g")));
        assert!(cmd.get_envs().any(|(k, v)| k == "CXX" && v.is_none()));
    }

    #[test]
    fn missing_download_names_the_fix() {
        let cache = tempfile::tempdir().unwrap();
        let err = cxx_source_in(cache.path()).unwrap_err().to_string();
        assert!(err.contains("testbed/setup-host --cxx"), "{err}");
        std::fs::create_dir(cache.path().join(CXX_SOURCE_DOWNLOAD)).unwrap();
        let err = cxx_source_in(cache.path()).unwrap_err().to_string();
        assert!(
            err.contains("no abseil_*.dsc") && err.contains("setup-host --cxx"),
            "{err}"
        );
    }

    #[test]
    fn unpacked_source_is_reused() {
        let cache = tempfile::tempdir().unwrap();
        let source = cache.path().join(CXX_PACKAGE);
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("CMakeLists.txt"), "").unwrap();
        assert_eq!(cxx_source_in(cache.path()).unwrap(), source);
    }

    #[test]
    fn too_few_objects_is_an_error() {
        assert!(check_object_count(CXX_OBJECTS).is_ok());
        let err = check_object_count(3).unwrap_err().to_string();
        assert!(err.contains("too few objects (3"), "{err}");
    }

    #[test]
    fn empty_dir_keeps_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/x.o"), "x").unwrap();
        std::fs::write(dir.path().join("top"), "y").unwrap();
        let mut found = Vec::new();
        object_files(dir.path(), &mut found).unwrap();
        assert_eq!(found, [dir.path().join("a/b/x.o")]);
        empty_dir(dir.path()).unwrap();
        assert!(dir.path().is_dir());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
