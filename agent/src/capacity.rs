//! What the worker can take on: CPUs, load, memory and distccd's temporary space.

use std::path::Path;

use nix::sys::statvfs::statvfs;
use nix::unistd::{SysconfVar, sysconf};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capacity {
    pub online_cpus: u32,
    pub load: [f64; 3],
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub tmpdir_free_bytes: u64,
}

impl Capacity {
    /// Read the current figures; a figure that cannot be read stays 0.
    pub fn read(tmpdir: &Path) -> Self {
        let online_cpus = sysconf(SysconfVar::_NPROCESSORS_ONLN)
            .ok()
            .flatten()
            .map_or(0, |n| u32::try_from(n).unwrap_or(0));
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|text| parse_loadavg(&text))
            .unwrap_or_default();
        let (mem_total_bytes, mem_available_bytes) = std::fs::read_to_string("/proc/meminfo")
            .map(|text| parse_meminfo(&text))
            .unwrap_or_default();
        Self {
            online_cpus,
            load,
            mem_total_bytes,
            mem_available_bytes,
            tmpdir_free_bytes: free_bytes(tmpdir).unwrap_or(0),
        }
    }
}

/// Bytes available to unprivileged users on the filesystem holding `path`; the nearest
/// existing ancestor counts when `path` itself does not exist yet (distccd's cache
/// directory appears only when the unit first starts).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let stat = statvfs(existing).ok()?;
    Some(stat.blocks_available() * stat.fragment_size())
}

fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
    ]
}

/// MemTotal and MemAvailable in bytes.
fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_loadavg("0.63 0.67 0.30 2/345 17363\n"),
            [0.63, 0.67, 0.30]
        );
        let meminfo =
            "MemTotal:       24608532 kB\nMemFree:         1 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(meminfo), (24608532 * 1024, 20000000 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }

    #[test]
    fn reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let c = Capacity::read(&dir.path().join("not-yet-created"));
        assert!(c.online_cpus >= 1);
        assert!(c.mem_total_bytes >= c.mem_available_bytes && c.mem_available_bytes > 0);
        assert!(c.tmpdir_free_bytes > 0);
    }
}
