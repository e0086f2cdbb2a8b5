//! A worker made slow: its daemon's processes held to a CPU quota from the host.
//!
//! A quota set inside a container had no effect on these machines; the host's cgroup v1
//! `cpu` controller works (docs/TESTBED.md). Children forked later (distccd's compilers)
//! inherit the cgroup, so the daemon's whole work is held.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};

use crate::Worker;

const CPU_HIERARCHY: &str = "/sys/fs/cgroup/cpu";

/// The quota; dropping it moves the processes back and removes the cgroup.
pub struct CpuQuota {
    cgroup: PathBuf,
}

impl CpuQuota {
    /// Holds every process named `comm` in `worker` (and what they start later) to
    /// `percent` of one CPU.
    pub fn apply(worker: &Worker, comm: &str, percent: u32) -> Result<CpuQuota> {
        ensure!(
            (1..=100).contains(&percent),
            "a CPU quota is 1-100 %, not {percent}"
        );
        let cgroup = PathBuf::from(format!("{CPU_HIERARCHY}/{}-{comm}", worker.netns()));
        if !cgroup.exists() {
            std::fs::create_dir(&cgroup).with_context(|| {
                format!(
                    "cannot create {} (needs the cgroup v1 cpu controller)",
                    cgroup.display()
                )
            })?;
        }
        let quota = CpuQuota { cgroup };
        std::fs::write(quota.cgroup.join("cpu.cfs_period_us"), "100000")?;
        std::fs::write(
            quota.cgroup.join("cpu.cfs_quota_us"),
            (percent * 1000).to_string(),
        )?;
        let pids = worker.host_pids_of(comm)?;
        ensure!(!pids.is_empty(), "no {comm} runs in {}", worker.name());
        for pid in pids {
            // A process may exit between listing and moving: fine.
            let _ = std::fs::write(quota.cgroup.join("cgroup.procs"), pid.to_string());
        }
        Ok(quota)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = std::fs::write(format!("{CPU_HIERARCHY}/cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}
