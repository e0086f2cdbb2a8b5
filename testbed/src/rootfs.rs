//! The Debian root filesystem that every worker container boots from (read-only, shared;
//! each container writes to its own tmpfs overlay).

use std::fs::{self, File};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use crate::cmd::{run_logged, run_ok};

/// Debian release of the rootfs: the same as the hosts of this project, so binaries built
/// on the host run unchanged inside the containers.
pub const SUITE: &str = "bookworm";

/// Bump whenever anything that ends up in the rootfs changes (package lists, the
/// customisation in `customise`): the cache directory name carries it, so a stale cache
/// is never used and old and new test runs do not fight over one directory.
pub const ROOTFS_VERSION: u32 = 2;

/// Installed by debootstrap itself (`--include`).
pub const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "distcc",
    "gcc",
    "g++",
    "libc6-dev",
    "iproute2",
    "ca-certificates",
    // ps/pgrep inside a worker, for tests and for debugging by hand.
    "procps",
    // The builder node container (`BuilderNode`) runs its users' builds with make.
    "make",
];

/// Installed afterwards with `chroot ROOTFS apt-get install`: debootstrap cannot resolve
/// polkitd's `default-logind | logind` dependency and leaves it unconfigured ("iU") when it
/// is put in `--include`; apt resolves it through libpam-systemd.
pub const EXTRA_PACKAGES: &[&str] = &["polkitd"];

/// Units masked in the rootfs: they are useless in a throwaway container and some would
/// try to reach the network (apt-daily), which has no route out of a worker anyway.
const MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
];

/// Default cache directory; override with the environment variable [`CACHE_ENV`].
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/distcc-testbed";
/// Environment variable naming another cache directory.
pub const CACHE_ENV: &str = "DISTCC_TESTBED_CACHE";
/// Environment variable naming another Debian mirror (for example a local apt cache).
pub const MIRROR_ENV: &str = "DISTCC_TESTBED_MIRROR";
/// The Debian mirror debootstrap and apt use while building the rootfs.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const APT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A finished, cached root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    path: PathBuf,
}

impl Rootfs {
    /// Returns the cached rootfs, building it first if needed (about 1.5 minutes and
    /// 700 MB, once per cache directory and [`ROOTFS_VERSION`]).
    ///
    /// The cache directory is `$DISTCC_TESTBED_CACHE` or `/var/cache/distcc-testbed`.
    /// Safe to call from parallel test processes: the build runs under an exclusive file
    /// lock, in a temporary directory that is renamed into place only when complete.
    pub fn ensure() -> Result<Rootfs> {
        Self::ensure_in(&cache_dir())
    }

    /// [`Rootfs::ensure`] with an explicit cache directory.
    pub fn ensure_in(cache: &Path) -> Result<Rootfs> {
        Self::ensure_variant(cache, &[])
    }

    /// A variant of the rootfs with `packages` (Debian package names) installed on top of
    /// the default lists, for benchmarks that need more on the workers than the tests do
    /// (for example `openssh-server` and `python3` for an Ansible baseline). Cached like
    /// [`Rootfs::ensure`], under a name derived from the sorted package list
    /// (`rootfs-bookworm-vV+openssh-server+python3`); an empty list is the default rootfs.
    pub fn ensure_with(packages: &[&str]) -> Result<Rootfs> {
        Self::ensure_variant(&cache_dir(), packages)
    }

    /// [`Rootfs::ensure_with`] with an explicit cache directory.
    pub fn ensure_with_in(cache: &Path, packages: &[&str]) -> Result<Rootfs> {
        Self::ensure_variant(cache, packages)
    }

    fn ensure_variant(cache: &Path, packages: &[&str]) -> Result<Rootfs> {
        let packages = variant_packages(packages)?;
        let name = variant_dir_name(&packages);
        let path = cache.join(&name);
        // Fast path without the lock: the directory only ever appears by an atomic rename
        // of a finished build, so its existence means it is complete.
        if path.is_dir() {
            return Ok(Rootfs { path });
        }
        crate::require_root()?;
        fs::create_dir_all(cache).with_context(|| {
            format!(
                "cannot create the rootfs cache directory {}",
                cache.display()
            )
        })?;
        let lock_path = cache.join(".rootfs.lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                info!(lock = %lock_path.display(), "another process is building the rootfs; waiting for it");
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, e)| e)
                    .with_context(|| format!("cannot lock {}", lock_path.display()))?
            }
            Err((_, e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        };
        // Whoever held the lock before us may have finished the job.
        if path.is_dir() {
            return Ok(Rootfs { path });
        }
        remove_stale_builds(cache)?;
        build(cache, &path, &name, &packages)?;
        drop(lock);
        Ok(Rootfs { path })
    }

    /// The root directory, for `systemd-nspawn -D`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `$DISTCC_TESTBED_CACHE` or the default.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

fn dir_name() -> String {
    format!("rootfs-{SUITE}-v{ROOTFS_VERSION}")
}

/// The extra packages of a variant: sorted, deduplicated, minus those every rootfs has,
/// each a valid Debian package name (they end up in a directory name and an apt command).
fn variant_packages(packages: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for p in packages {
        ensure!(
            p.len() >= 2
                && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c)),
            "{p:?} is not a Debian package name"
        );
        if !BASE_PACKAGES.contains(p) && !EXTRA_PACKAGES.contains(p) {
            out.push((*p).to_owned());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `rootfs-bookworm-vV` for the default rootfs, `rootfs-bookworm-vV+pkg1+pkg2` for a variant.
fn variant_dir_name(packages: &[String]) -> String {
    let mut name = dir_name();
    for p in packages {
        name.push('+');
        name.push_str(p);
    }
    name
}

fn mirror() -> String {
    std::env::var(MIRROR_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_owned())
}

/// Deletes half-built rootfs directories of interrupted builds. Only called while holding
/// the build lock, so no live build owns them.
fn remove_stale_builds(cache: &Path) -> Result<()> {
    for entry in fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", cache.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".rootfs-") && name.contains(".tmp-") {
            warn!(dir = %entry.path().display(), "removing an interrupted rootfs build");
            remove_tree(&entry.path())?;
        }
    }
    Ok(())
}

fn build(cache: &Path, dest: &Path, name: &str, variant: &[String]) -> Result<()> {
    let started = Instant::now();
    let log = cache.join(format!("{name}.build.log"));
    let _ = fs::remove_file(&log);
    let tmp = tempfile::Builder::new()
        // Starts with ".rootfs-" and contains ".tmp-": what `remove_stale_builds` deletes.
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(cache)
        .with_context(|| format!("cannot create a build directory in {}", cache.display()))?
        // We delete it ourselves with `remove_tree`: tempfile's recursive delete would
        // descend into whatever an interrupted debootstrap left mounted inside.
        .keep();
    info!(
        dest = %dest.display(), log = %log.display(),
        "building the worker rootfs with debootstrap (once; about 1.5 minutes)"
    );
    let result = debootstrap(&tmp, &log).and_then(|()| customise(&tmp, &log, variant));
    if let Err(e) = result {
        if let Err(cleanup) = remove_tree(&tmp) {
            warn!(dir = %tmp.display(), "cannot remove the failed build: {cleanup:#}");
        }
        return Err(e.context(format!(
            "building the rootfs {} failed (log: {})",
            dest.display(),
            log.display()
        )));
    }
    fs::rename(&tmp, dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    info!(dest = %dest.display(), secs = started.elapsed().as_secs(), "worker rootfs ready");
    Ok(())
}

fn debootstrap(dir: &Path, log: &Path) -> Result<()> {
    run_logged(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", BASE_PACKAGES.join(",")))
            .arg(SUITE)
            .arg(dir)
            .arg(mirror()),
        log,
        DEBOOTSTRAP_TIMEOUT,
    )
    .context(
        "debootstrap failed (is the package `debootstrap` installed and the mirror reachable?)",
    )?;
    // debootstrap deletes its /debootstrap work directory only when it succeeded.
    ensure!(
        !dir.join("debootstrap").exists(),
        "debootstrap left {}/debootstrap behind: incomplete",
        dir.display()
    );
    Ok(())
}

fn chroot(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("chroot");
    c.arg(dir)
        .args(args)
        // Nothing of the host's environment (locale, proxies of a developer's shell)
        // should leak into the build.
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C.UTF-8");
    c
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    // remove first: the target may be a dangling symlink (resolv.conf often is).
    let _ = fs::remove_file(path);
    fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

fn customise(dir: &Path, log: &Path, variant: &[String]) -> Result<()> {
    let etc = dir.join("etc");
    // apt inside the chroot needs a resolver; the host's one is good for the build only.
    let host_resolv = fs::read_to_string("/etc/resolv.conf")
        .context("cannot read the host's /etc/resolv.conf")?;
    write(&etc.join("resolv.conf"), &host_resolv, 0o644)?;
    // Keep package scripts from starting daemons inside the chroot.
    let policy = dir.join("usr/sbin/policy-rc.d");
    write(&policy, "#!/bin/sh\nexit 101\n", 0o755)?;

    {
        // Package scripts need /proc: polkitd's postinst runs systemd-tmpfiles, which
        // refuses to work without it (and the postinst hides that with `|| true`).
        let _proc = ProcMount::new(dir)?;
        if !EXTRA_PACKAGES.is_empty() || !variant.is_empty() {
            run_logged(&mut chroot(dir, &["apt-get", "update"]), log, APT_TIMEOUT)?;
            let mut install = vec!["apt-get", "install", "-y", "--no-install-recommends"];
            install.extend_from_slice(EXTRA_PACKAGES);
            install.extend(variant.iter().map(String::as_str));
            run_logged(&mut chroot(dir, &install), log, APT_TIMEOUT)?;
        }
        run_logged(&mut chroot(dir, &["apt-get", "clean"]), log, APT_TIMEOUT)?;
        // Every package must be configured: an "iU" polkitd is how a wrong package list
        // shows up (the build "succeeds", polkit rules silently do nothing).
        let audit = run_ok(&mut chroot(dir, &["dpkg", "--audit"]), APT_TIMEOUT)?;
        ensure!(
            audit.trim().is_empty(),
            "dpkg --audit reports broken packages:\n{audit}"
        );
    }
    fs::remove_file(&policy).with_context(|| format!("cannot remove {}", policy.display()))?;

    // No DNS inside workers: they only reach 198.18.N.0/24, and a copied host resolver
    // address would be an address outside our namespaces.
    write(
        &etc.join("resolv.conf"),
        "# distcc-testbed: no DNS; workers only reach their own 198.18.N.0/24 network\n",
        0o644,
    )?;
    // systemd in the container sets the hostname from /etc/hostname (debootstrap copied the
    // host's name there), overriding nspawn's --hostname=w1. Without the file it keeps w1.
    let _ = fs::remove_file(etc.join("hostname"));
    // An empty machine-id makes systemd take the random UUID nspawn hands to each container,
    // so workers get distinct machine ids instead of all sharing the one debootstrap made.
    // The dbus copy must go too, or systemd initialises the machine id from it.
    write(&etc.join("machine-id"), "", 0o444)?;
    let dbus_id = dir.join("var/lib/dbus/machine-id");
    let _ = fs::remove_file(&dbus_id);
    if dbus_id.parent().is_some_and(Path::is_dir) {
        symlink("/etc/machine-id", &dbus_id)
            .with_context(|| format!("cannot create {}", dbus_id.display()))?;
    }
    for unit in MASKED_UNITS {
        let link = etc.join("systemd/system").join(unit);
        let _ = fs::remove_file(&link);
        symlink("/dev/null", &link).with_context(|| format!("cannot mask {unit}"))?;
    }
    write(
        &etc.join("distcc-testbed-release"),
        &format!(
            "ROOTFS_VERSION={ROOTFS_VERSION}\nSUITE={SUITE}\nBASE_PACKAGES=\"{}\"\nEXTRA_PACKAGES=\"{}\"\nVARIANT_PACKAGES=\"{}\"\n",
            BASE_PACKAGES.join(" "),
            EXTRA_PACKAGES.join(" "),
            variant.join(" ")
        ),
        0o644,
    )?;
    for needed in [
        "usr/lib/systemd/systemd",
        "usr/bin/distccd",
        "usr/bin/gcc",
        "usr/bin/busctl",
    ] {
        ensure!(
            dir.join(needed).exists(),
            "the built rootfs lacks /{needed}"
        );
    }
    ensure!(
        mounts_under(dir)?.is_empty(),
        "something is still mounted inside {}",
        dir.display()
    );
    Ok(())
}

/// /proc mounted inside the chroot for as long as it lives. (If the process dies first,
/// `remove_tree` unmounts it when it deletes the interrupted build.)
struct ProcMount(PathBuf);

impl ProcMount {
    fn new(root: &Path) -> Result<ProcMount> {
        let target = root.join("proc");
        fs::create_dir_all(&target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        nix::mount::mount(
            Some("proc"),
            &target,
            Some("proc"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("cannot mount proc on {}", target.display()))?;
        Ok(ProcMount(target))
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            warn!(path = %self.0.display(), "cannot unmount: {e}");
        }
    }
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Recursively deletes a (half-built) rootfs after unmounting anything mounted inside it.
/// An interrupted debootstrap can leave /proc, /sys or even a bind mount of the host's /dev
/// mounted in the target; a plain recursive delete would then delete host device nodes.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    for _ in 0..3 {
        let mounts = mounts_under(&dir)?;
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            warn!(mount = %m.display(), "unmounting a leftover mount inside a rootfs build");
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                warn!(mount = %m.display(), "umount failed: {e}");
            }
        }
    }
    let left = mounts_under(&dir)?;
    if !left.is_empty() {
        bail!(
            "refusing to delete {}: still mounted below it: {left:?}",
            dir.display()
        );
    }
    fs::remove_dir_all(&dir).with_context(|| format!("cannot delete {}", dir.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn dir_name_carries_suite_and_version() {
        assert_eq!(dir_name(), format!("rootfs-bookworm-v{ROOTFS_VERSION}"));
    }

    #[test]
    fn variants_are_named_by_their_sorted_extra_packages() -> Result<()> {
        let p = variant_packages(&["python3", "openssh-server", "python3", "gcc"])?;
        assert_eq!(p, ["openssh-server", "python3"]);
        assert_eq!(
            variant_dir_name(&p),
            format!("rootfs-bookworm-v{ROOTFS_VERSION}+openssh-server+python3")
        );
        assert_eq!(variant_dir_name(&variant_packages(&["gcc"])?), dir_name());
        assert!(variant_packages(&["../etc"]).is_err());
        assert!(variant_packages(&["a b"]).is_err());
        Ok(())
    }

    #[test]
    fn a_cached_variant_is_returned_without_building() -> Result<()> {
        let cache = tempfile::tempdir()?;
        let name = format!("rootfs-bookworm-v{ROOTFS_VERSION}+openssh-server");
        fs::create_dir(cache.path().join(&name))?;
        let r = Rootfs::ensure_with_in(cache.path(), &["openssh-server"])?;
        assert_eq!(r.path(), cache.path().join(name));
        Ok(())
    }

    #[test]
    fn a_cached_rootfs_is_returned_without_building() -> Result<()> {
        let cache = tempfile::tempdir()?;
        fs::create_dir(cache.path().join(dir_name()))?;
        let r = Rootfs::ensure_in(cache.path())?;
        assert_eq!(r.path(), cache.path().join(dir_name()));
        Ok(())
    }

    #[test]
    fn remove_tree_unmounts_before_deleting() -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return Ok(());
        }
        let d = tempfile::tempdir()?;
        let t = d.path().join(".rootfs-x.tmp-1");
        let mnt = t.join("proc");
        fs::create_dir_all(&mnt)?;
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )?;
        fs::write(mnt.join("inside-the-mount"), "x")?;
        assert_eq!(mounts_under(&t.canonicalize()?)?.len(), 1);
        remove_stale_builds(d.path())?;
        assert!(!t.exists());
        assert!(mounts_under(&d.path().canonicalize()?)?.is_empty());
        Ok(())
    }

    #[test]
    fn remove_tree_deletes_plain_trees() -> Result<()> {
        let d = tempfile::tempdir()?;
        let t = d.path().join("t");
        fs::create_dir_all(t.join("a/b"))?;
        fs::write(t.join("a/b/f"), "x")?;
        remove_tree(&t)?;
        assert!(!t.exists());
        Ok(())
    }
}
