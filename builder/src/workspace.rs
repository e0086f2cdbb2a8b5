//! The tmpfs workspace builds run in: mounted once, shared by sessions, never mounted
//! over data, unmounted only when nothing uses it.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WorkspaceError {
    #[error(
        "{path} is not empty ({entries}): mounting a tmpfs there would hide those files; \
         empty it, or set `workspace` to another directory"
    )]
    NotEmpty { path: String, entries: String },
    #[error("{path} is already a mount point of a {fstype} file system, not a tmpfs")]
    NotTmpfs { path: String, fstype: String },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: String },
    #[error("mounting a tmpfs needs root (or CAP_SYS_ADMIN)")]
    NotRoot,
    #[error("{path} is not mounted")]
    NotMounted { path: String },
    #[error("{path} is in use by {users}; leave those shells first")]
    InUse { path: String, users: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{action} {path}: {source}")]
    Sys {
        action: &'static str,
        path: String,
        source: nix::Error,
    },
}

/// What `prepare` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    Mounted,
    Reused,
}

/// What `check` found: whether `prepare` would succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mountable {
    AlreadyMounted,
    WillMount,
}

/// One line of `/proc/self/mountinfo`, the fields we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// Parse `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            // Optional fields end with "-", then fstype.
            let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = field
            .get(i + 1..i + 4)
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let (b'\\', Some(code)) = (bytes[i], code) {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file system type mounted at exactly `path` (the topmost one), if any.
pub fn mounted_fstype(path: &Path) -> Result<Option<String>, WorkspaceError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| WorkspaceError::Io {
            action: "reading",
            path: "/proc/self/mountinfo".to_owned(),
            source,
        })?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
        .map(|m| m.fstype))
}

fn canonical(path: &Path) -> Result<PathBuf, WorkspaceError> {
    std::fs::canonicalize(path).map_err(|source| WorkspaceError::Io {
        action: "resolving",
        path: path.display().to_string(),
        source,
    })
}

/// Whether `prepare(path)` would work, without changing anything.
pub fn check(path: &Path) -> Result<Mountable, WorkspaceError> {
    if path.exists() {
        let path = canonical(path)?;
        if !path.is_dir() {
            return Err(WorkspaceError::NotADirectory {
                path: path.display().to_string(),
            });
        }
        match mounted_fstype(&path)? {
            Some(fstype) if fstype == "tmpfs" => return Ok(Mountable::AlreadyMounted),
            Some(fstype) => {
                return Err(WorkspaceError::NotTmpfs {
                    path: path.display().to_string(),
                    fstype,
                });
            }
            None => refuse_non_empty(&path)?,
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(WorkspaceError::NotRoot);
    }
    Ok(Mountable::WillMount)
}

fn refuse_non_empty(path: &Path) -> Result<(), WorkspaceError> {
    let entries: Vec<String> = std::fs::read_dir(path)
        .map_err(|source| WorkspaceError::Io {
            action: "listing",
            path: path.display().to_string(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let mut shown: Vec<&str> = entries.iter().take(3).map(String::as_str).collect();
    shown.sort_unstable();
    let more = entries.len().saturating_sub(shown.len());
    Err(WorkspaceError::NotEmpty {
        path: path.display().to_string(),
        entries: if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        },
    })
}

/// Mount a tmpfs of `size` at `path`, or reuse the one already there. Refuses to mount
/// over a non-empty directory and leaves it untouched.
pub fn prepare(path: &Path, size: &str) -> Result<Prepared, WorkspaceError> {
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(|source| WorkspaceError::Io {
            action: "creating",
            path: path.display().to_string(),
            source,
        })?;
    }
    if check(path)? == Mountable::AlreadyMounted {
        return Ok(Prepared::Reused);
    }
    let path = canonical(path)?;
    nix::mount::mount(
        Some("tmpfs"),
        &path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("size={size},mode=0755").as_str()),
    )
    .map_err(|source| WorkspaceError::Sys {
        action: "mounting a tmpfs on",
        path: path.display().to_string(),
        source,
    })?;
    Ok(Prepared::Mounted)
}

/// Processes whose cwd, root or open files lie in `path`, as "pid (comm)".
pub fn users_of(path: &Path) -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut users = Vec::new();
    for entry in procs.filter_map(Result::ok) {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) || pid == me {
            continue;
        }
        let dir = entry.path();
        let inside = |link: &Path| std::fs::read_link(link).is_ok_and(|t| t.starts_with(path));
        let uses = inside(&dir.join("cwd"))
            || inside(&dir.join("root"))
            || std::fs::read_dir(dir.join("fd"))
                .is_ok_and(|fds| fds.filter_map(Result::ok).any(|fd| inside(&fd.path())));
        if uses {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            users.push(format!("{pid} ({})", comm.trim()));
        }
    }
    users.sort();
    users
}

/// Unmount the workspace if no process uses it.
pub fn leave(path: &Path) -> Result<(), WorkspaceError> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(WorkspaceError::NotMounted { path: shown });
    }
    let path = canonical(path)?;
    if mounted_fstype(&path)?.as_deref() != Some("tmpfs") {
        return Err(WorkspaceError::NotMounted { path: shown });
    }
    let users = users_of(&path);
    if !users.is_empty() {
        return Err(WorkspaceError::InUse {
            path: shown,
            users: users.join(", "),
        });
    }
    // No MNT_DETACH: the kernel refuses (EBUSY) if something started using it meanwhile.
    nix::mount::umount2(&path, MntFlags::empty()).map_err(|source| match source {
        nix::Error::EBUSY => WorkspaceError::InUse {
            path: shown.clone(),
            users: "a process that just started".to_owned(),
        },
        source => WorkspaceError::Sys {
            action: "unmounting",
            path: shown.clone(),
            source,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
                    90 22 0:50 / /tmp/kernel\\040build rw master:1 shared:2 - tmpfs tmpfs rw,size=2G\n\
                    91 22 0:51 / /mnt/x rw - ext4 /dev/sda1 rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].mount_point, Path::new("/tmp/kernel build"));
        assert_eq!(mounts[1].fstype, "tmpfs");
        assert_eq!(mounts[2].fstype, "ext4");
    }

    #[test]
    fn a_non_empty_directory_is_refused_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), "data").unwrap();
        let err = prepare(dir.path(), "16M").unwrap_err();
        assert!(matches!(err, WorkspaceError::NotEmpty { .. }), "{err}");
        assert!(err.to_string().contains("precious.txt"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
            "data"
        );
        assert_eq!(
            mounted_fstype(&canonical(dir.path()).unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn leave_refuses_what_is_not_mounted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            leave(dir.path()).unwrap_err(),
            WorkspaceError::NotMounted { .. }
        ));
    }
}
