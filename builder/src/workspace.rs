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
    #[error("{user:?} is not a user name a workspace can be made for")]
    BadUserName { user: String },
    #[error("no user {user} on this machine")]
    NoSuchUser { user: String },
    #[error("no group {group} on this machine")]
    NoSuchGroup { group: String },
    #[error("{user} is not a member of {group}: no workspace for them")]
    NotInGroup { user: String, group: String },
    #[error("{path} must be a directory owned by root and writable by root alone")]
    Unsafe { path: String },
    #[error("{path} is a tmpfs of uid {owner}, not of {user}")]
    NotTheirs {
        path: String,
        owner: u32,
        user: String,
    },
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

/// What `prepare` did (`"mounted"`/`"reused"` on the session socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// A user's workspace: `USER` in the `user_workspaces` directory.
pub fn user_workspace(root: &Path, user: &str) -> PathBuf {
    root.join(user)
}

/// Who a user workspace is for, checked (the mount helper's refusals): a valid name of an
/// existing user who is a member of `group` (primary or supplementary, per the group
/// database). A polkit or unit mistake must not mount for anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceOwner {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

impl WorkspaceOwner {
    pub fn check(user: &str, group: &str) -> Result<Self, WorkspaceError> {
        if !crate::config::valid_user_name(user) {
            return Err(WorkspaceError::BadUserName {
                user: user.to_owned(),
            });
        }
        let found = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| WorkspaceError::NoSuchUser {
                user: user.to_owned(),
            })?;
        let gid =
            crate::session_socket::group_id(group).ok_or_else(|| WorkspaceError::NoSuchGroup {
                group: group.to_owned(),
            })?;
        if !crate::session_socket::groups_of(user, found.gid.as_raw()).contains(&gid) {
            return Err(WorkspaceError::NotInGroup {
                user: user.to_owned(),
                group: group.to_owned(),
            });
        }
        Ok(Self {
            user: user.to_owned(),
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
        })
    }
}

/// A directory root made (mode 0755) or found: a real directory (no symlink), owned by
/// root, writable by root alone.
fn root_directory(path: &Path) -> Result<(), WorkspaceError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let shown = || path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(path)
                .map_err(|source| WorkspaceError::Io {
                    action: "creating",
                    path: shown(),
                    source,
                })?;
            // The umask may have taken bits; the mode is the contract.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| WorkspaceError::Io {
                    action: "setting the mode of",
                    path: shown(),
                    source,
                },
            )
        }
        Err(source) => Err(WorkspaceError::Io {
            action: "looking at",
            path: shown(),
            source,
        }),
        Ok(meta) if meta.is_dir() && meta.uid() == 0 && meta.mode() & 0o022 == 0 => Ok(()),
        Ok(_) => Err(WorkspaceError::Unsafe { path: shown() }),
    }
}

/// `builderctl workspace mount USER` (run as root by `distcc-workspace@USER.service`):
/// a tmpfs of `size` at `root/USER`, owned by the user, mode 0700, nosuid, nodev; an
/// existing tmpfs of that user there is reused. `root` and `root/USER` are made 0755 root
/// when missing; never mounts over a non-empty directory.
pub fn mount_user_workspace(
    root: &Path,
    owner: &WorkspaceOwner,
    size: &str,
) -> Result<(PathBuf, Prepared), WorkspaceError> {
    use std::os::unix::fs::MetadataExt;
    if let Some(parent) = root.parent() {
        std::fs::create_dir_all(parent).map_err(|source| WorkspaceError::Io {
            action: "creating",
            path: parent.display().to_string(),
            source,
        })?;
    }
    root_directory(root)?;
    let path = user_workspace(root, &owner.user);
    let shown = path.display().to_string();
    match mounted_fstype(&path)? {
        Some(fstype) if fstype == "tmpfs" => {
            let meta = std::fs::symlink_metadata(&path).map_err(|source| WorkspaceError::Io {
                action: "looking at",
                path: shown.clone(),
                source,
            })?;
            if meta.uid() != owner.uid {
                return Err(WorkspaceError::NotTheirs {
                    path: shown,
                    owner: meta.uid(),
                    user: owner.user.clone(),
                });
            }
            return Ok((path, Prepared::Reused));
        }
        Some(fstype) => {
            return Err(WorkspaceError::NotTmpfs {
                path: shown,
                fstype,
            });
        }
        None => {}
    }
    root_directory(&path)?;
    refuse_non_empty(&path)?;
    nix::mount::mount(
        Some("tmpfs"),
        &path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("size={size},mode=0700,uid={},gid={}", owner.uid, owner.gid).as_str()),
    )
    .map_err(|source| WorkspaceError::Sys {
        action: "mounting a tmpfs on",
        path: shown,
        source,
    })?;
    Ok((path, Prepared::Mounted))
}

/// `builderctl workspace unmount USER`: unmount `root/USER` if nothing uses it (no
/// MNT_DETACH: the kernel refuses while anything does).
pub fn unmount_user_workspace(root: &Path, user: &str) -> Result<PathBuf, WorkspaceError> {
    if !crate::config::valid_user_name(user) {
        return Err(WorkspaceError::BadUserName {
            user: user.to_owned(),
        });
    }
    let path = user_workspace(root, user);
    let shown = path.display().to_string();
    if mounted_fstype(&path)?.as_deref() != Some("tmpfs") {
        return Err(WorkspaceError::NotMounted { path: shown });
    }
    // The unit has CAP_SYS_ADMIN only, so it cannot see other users' open files in /proc;
    // the kernel's refusal (EBUSY) is the authority.
    match nix::mount::umount2(&path, MntFlags::empty()) {
        Ok(()) => Ok(path),
        Err(nix::Error::EBUSY) => Err(WorkspaceError::InUse {
            path: shown,
            users: "a process (the kernel refuses to unmount it)".to_owned(),
        }),
        Err(source) => Err(WorkspaceError::Sys {
            action: "unmounting",
            path: shown,
            source,
        }),
    }
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
    fn the_mount_helper_refuses_wrong_users() {
        for (user, group) in [
            ("../etc", "root"),
            ("Alice", "root"),
            ("", "root"),
            ("no-such-user-here", "root"),
            ("root", "no-such-group-here"),
        ] {
            let err = WorkspaceOwner::check(user, group).unwrap_err();
            assert!(
                matches!(
                    err,
                    WorkspaceError::BadUserName { .. }
                        | WorkspaceError::NoSuchUser { .. }
                        | WorkspaceError::NoSuchGroup { .. }
                ),
                "{user} {group}: {err}"
            );
        }
        // root is a member of its own primary group, and of no group it was not put in.
        assert_eq!(WorkspaceOwner::check("root", "root").unwrap().uid, 0);
        let outsider = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
            .ok()
            .flatten()
            .map(|g| g.name);
        if let Some(group) = outsider
            && !crate::session_socket::groups_of("root", 0).contains(&65534)
        {
            assert!(matches!(
                WorkspaceOwner::check("root", &group).unwrap_err(),
                WorkspaceError::NotInGroup { .. }
            ));
        }
    }

    #[test]
    fn the_mount_helper_never_mounts_over_files_nor_in_an_unsafe_directory() {
        use std::os::unix::fs::PermissionsExt;
        let owner = WorkspaceOwner {
            user: "alice".into(),
            uid: 1000,
            gid: 1000,
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(root.join("alice")).unwrap();
        std::fs::write(root.join("alice/precious.txt"), "data").unwrap();
        if nix::unistd::geteuid().is_root() {
            let err = mount_user_workspace(&root, &owner, "16M").unwrap_err();
            assert!(matches!(err, WorkspaceError::NotEmpty { .. }), "{err}");
            assert_eq!(
                std::fs::read_to_string(root.join("alice/precious.txt")).unwrap(),
                "data"
            );
        }
        // A directory others may write to could hold a planted symlink: refused.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = mount_user_workspace(&root, &owner, "16M").unwrap_err();
        assert!(matches!(err, WorkspaceError::Unsafe { .. }), "{err}");
        assert!(matches!(
            unmount_user_workspace(&root, "../x").unwrap_err(),
            WorkspaceError::BadUserName { .. }
        ));
        assert!(matches!(
            unmount_user_workspace(&root, "bob").unwrap_err(),
            WorkspaceError::NotMounted { .. }
        ));
    }

    /// Root only (it mounts): the user's tmpfs, reused, refused to unmount while in use.
    #[test]
    fn the_mount_helper_mounts_a_private_tmpfs_and_unmounts_it_when_unused() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        let owner = WorkspaceOwner {
            user: "alice".into(),
            uid: 4242,
            gid: 4343,
        };
        let (path, how) = mount_user_workspace(&root, &owner, "4M").unwrap();
        assert_eq!(how, Prepared::Mounted);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (4242, 4343, 0o700)
        );
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(
            mount_user_workspace(&root, &owner, "4M").unwrap().1,
            Prepared::Reused
        );
        // Someone else's tmpfs there is not reused for this user.
        let other = WorkspaceOwner {
            uid: 4244,
            ..owner.clone()
        };
        assert!(matches!(
            mount_user_workspace(&root, &other, "4M").unwrap_err(),
            WorkspaceError::NotTheirs { .. }
        ));
        let open = std::fs::File::create(path.join("busy")).unwrap();
        let err = unmount_user_workspace(&root, "alice").unwrap_err();
        assert!(matches!(err, WorkspaceError::InUse { .. }), "{err}");
        drop(open);
        unmount_user_workspace(&root, "alice").unwrap();
        assert_eq!(mounted_fstype(&path).unwrap(), None);
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
