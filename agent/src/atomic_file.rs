//! Replacing a file so that a reader sees the old or the new one, never half of one, and a
//! crash leaves one of the two: temp file in the same directory, fsync, rename, fsync the
//! directory.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Replace `path` with `bytes`, mode `mode`, group `group` (owner unchanged: the caller's).
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    group: Option<nix::unistd::Gid>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temp = tempfile::Builder::new().prefix(".tmp.").tempfile_in(dir)?;
    temp.write_all(bytes)?;
    if let Some(gid) = group {
        nix::unistd::fchown(temp.as_file(), None, Some(gid)).map_err(std::io::Error::from)?;
    }
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}
