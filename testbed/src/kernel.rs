//! The workload operators know: Linux 6.1 from Debian's `linux-source-6.1`, unpacked once
//! into the cache and built out of tree (`make O=DIR`), so many builds share one source.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// What `apt-get install linux-source-6.1` puts on the machine (`testbed/setup-host --kernel`).
pub const KERNEL_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Fixed build identity, so two builds of the same tree give a byte-identical vmlinux
/// (otherwise the banner carries the time, user and host of each build).
pub const REPRODUCIBLE_BUILD_ENV: &[(&str, &str)] = &[
    ("KBUILD_BUILD_TIMESTAMP", "Thu Jan  1 00:00:00 UTC 2026"),
    ("KBUILD_BUILD_USER", "distcc"),
    ("KBUILD_BUILD_HOST", "testbed"),
    ("KBUILD_BUILD_VERSION", "1"),
];

/// The unpacked kernel source in the test-bed cache (unpacked on the first call).
pub fn kernel_source() -> Result<PathBuf> {
    let cache = crate::cache_dir();
    let source = cache.join("linux-source-6.1");
    if source.join("Makefile").exists() {
        return Ok(source);
    }
    tracing::info!(
        tarball = KERNEL_TARBALL,
        "unpacking the kernel source (once)"
    );
    ensure!(
        Path::new(KERNEL_TARBALL).exists(),
        "{KERNEL_TARBALL} is missing: run testbed/setup-host --kernel (apt-get install linux-source-6.1)"
    );
    let partial = cache.join("linux-source-6.1.partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let status = Command::new("tar")
        .args(["xf", KERNEL_TARBALL, "--strip-components=1", "-C"])
        .arg(&partial)
        .status()
        .context("running tar")?;
    ensure!(status.success(), "unpacking {KERNEL_TARBALL} failed");
    std::fs::rename(&partial, &source)
        .with_context(|| format!("cannot rename {} into place", partial.display()))?;
    Ok(source)
}
