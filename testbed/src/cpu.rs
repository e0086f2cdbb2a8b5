//! CPU budgets from the host: a worker made slow (`CpuQuota`, its daemon's processes) and
//! a node's whole CPU budget (`CpuBudget`, a container or the builder's build).
//!
//! A quota set inside a container had no effect on these machines; the host's cgroup v1
//! `cpu` controller works (docs/TESTBED.md). Children forked later (distccd's compilers)
//! inherit the cgroup, so the daemon's whole work is held.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::Worker;

const CPU_HIERARCHY: &str = "/sys/fs/cgroup/cpu";
const CPUACCT_HIERARCHY: &str = "/sys/fs/cgroup/cpuacct";
/// Where the budgets live in each v1 hierarchy (the v2 tree's is `sweep::cgroup_root`).
const BUDGET_DIR: &str = "distcc-testbed";
/// CFS period of every budget: 100 ms, the kernel's default.
const PERIOD_US: u64 = 100_000;

/// Thousandths of one CPU: 400 is 0.4 CPU, 2000 two whole cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MilliCpus(pub u32);

impl MilliCpus {
    /// The CFS quota per 100 ms period, in µs.
    pub fn quota_us(self) -> u64 {
        u64::from(self.0) * PERIOD_US / 1000
    }

    /// In CPUs (0.4).
    pub fn cpus(self) -> f64 {
        f64::from(self.0) / 1000.0
    }
}

impl fmt::Display for MilliCpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} CPU", self.cpus())
    }
}

impl std::str::FromStr for MilliCpus {
    type Err = anyhow::Error;

    /// "0.4" (CPUs) or "400m" (millicpus).
    fn from_str(s: &str) -> Result<Self> {
        let millis = match s.strip_suffix('m') {
            Some(m) => m.parse::<u32>().with_context(|| format!("{s:?}"))?,
            None => {
                let cpus: f64 = s
                    .parse()
                    .with_context(|| format!("{s:?} is not a number"))?;
                ensure!(cpus.is_finite() && cpus > 0.0, "{s:?}: not a CPU budget");
                (cpus * 1000.0).round() as u32
            }
        };
        ensure!(
            millis >= 10,
            "{s:?}: a budget below 0.01 CPU cannot run a compiler"
        );
        Ok(MilliCpus(millis))
    }
}

/// Throttling counters of a budget (`cpu.stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStat {
    /// Periods in which the group had runnable tasks.
    pub nr_periods: u64,
    /// Periods in which it ran out of quota.
    pub nr_throttled: u64,
    /// Time its tasks waited for the next period.
    pub throttled: Duration,
}

#[derive(Debug)]
enum Groups {
    /// cgroup v1: the quota in `cpu`, the usage in `cpuacct` (separate hierarchies here;
    /// the same directory where they are co-mounted).
    V1 { cpu: PathBuf, cpuacct: PathBuf },
    /// cgroup v2: one directory, `cpu.max` and `cpu.stat`. Not exercised on this
    /// project's hybrid machines.
    V2 { dir: PathBuf },
}

/// A node's CPU budget: a host cgroup holding a quota, which every process put into it
/// and all their descendants share (hierarchically: sub-cgroups created below it count
/// against it too). Dropping it moves what still runs in it back to the root and
/// removes the groups.
#[derive(Debug)]
pub struct CpuBudget {
    name: String,
    groups: Groups,
}

impl CpuBudget {
    /// Creates (or takes over) the budget `name` (e.g. `dcctb3-w1`) at `millis`.
    pub fn create(name: &str, millis: MilliCpus) -> Result<CpuBudget> {
        ensure!(
            !name.is_empty() && !name.contains('/') && !name.starts_with('.'),
            "bad budget name {name:?}"
        );
        let groups = if Path::new(CPU_HIERARCHY).join("cpu.cfs_quota_us").exists() {
            let cpu = Path::new(CPU_HIERARCHY).join(BUDGET_DIR).join(name);
            let cpuacct = Path::new(CPUACCT_HIERARCHY).join(BUDGET_DIR).join(name);
            for dir in [&cpu, &cpuacct] {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!("cannot create {} (cgroup v1 cpu/cpuacct)", dir.display())
                })?;
            }
            ensure!(
                cpuacct.join("cpuacct.usage").exists(),
                "{} has no cpuacct.usage: no cpuacct controller",
                cpuacct.display()
            );
            Groups::V1 { cpu, cpuacct }
        } else if let Some(root) = crate::sweep::cgroup_root() {
            // v2: the controller must be enabled on every level above the group.
            let top = root.parent().context("cgroup root has no parent")?;
            let controllers = std::fs::read_to_string(top.join("cgroup.controllers"))?;
            ensure!(
                controllers.split_whitespace().any(|c| c == "cpu"),
                "the cgroup v2 hierarchy has no cpu controller"
            );
            std::fs::create_dir_all(&root)?;
            for level in [top, root.as_path()] {
                std::fs::write(level.join("cgroup.subtree_control"), "+cpu").with_context(
                    || format!("cannot enable the cpu controller in {}", level.display()),
                )?;
            }
            let dir = root.join(name);
            std::fs::create_dir_all(&dir)?;
            Groups::V2 { dir }
        } else {
            bail!("no cgroup cpu controller on this host (neither v1 cpu nor v2 cpu.max)");
        };
        let budget = CpuBudget {
            name: name.to_owned(),
            groups,
        };
        budget.set(millis)?;
        Ok(budget)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Changes the quota; running processes are held to it from the next period on.
    pub fn set(&self, millis: MilliCpus) -> Result<()> {
        match &self.groups {
            Groups::V1 { cpu, .. } => {
                std::fs::write(cpu.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
                std::fs::write(cpu.join("cpu.cfs_quota_us"), millis.quota_us().to_string())
                    .with_context(|| format!("cannot set the quota of {}", cpu.display()))
            }
            Groups::V2 { dir } => std::fs::write(
                dir.join("cpu.max"),
                format!("{} {PERIOD_US}", millis.quota_us()),
            )
            .with_context(|| format!("cannot set cpu.max of {}", dir.display())),
        }
    }

    /// The quota now in force.
    pub fn get(&self) -> Result<MilliCpus> {
        let quota_us: u64 = match &self.groups {
            Groups::V1 { cpu, .. } => read_number(&cpu.join("cpu.cfs_quota_us"))?,
            Groups::V2 { dir } => {
                let text = std::fs::read_to_string(dir.join("cpu.max"))?;
                let first = text.split_whitespace().next().unwrap_or_default();
                first
                    .parse()
                    .with_context(|| format!("cpu.max: {text:?}"))?
            }
        };
        Ok(MilliCpus(u32::try_from(quota_us * 1000 / PERIOD_US)?))
    }

    /// The `cgroup.procs` files a process must be written to.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        match &self.groups {
            Groups::V1 { cpu, cpuacct } if cpu == cpuacct => vec![cpu.join("cgroup.procs")],
            Groups::V1 { cpu, cpuacct } => {
                vec![cpu.join("cgroup.procs"), cpuacct.join("cgroup.procs")]
            }
            Groups::V2 { dir } => vec![dir.join("cgroup.procs")],
        }
    }

    /// Moves process `pid` (its threads; later children are born inside) into the budget.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        for file in self.procs_files() {
            std::fs::write(&file, pid.to_string())
                .with_context(|| format!("cannot move pid {pid} into {}", file.display()))?;
        }
        Ok(())
    }

    /// `program` started inside the budget: a shell that moves itself into the groups and
    /// then execs it, so the process and everything it starts are held from their first
    /// instruction (the workspace forbids `unsafe`, so no `pre_exec`). Add arguments,
    /// environment and directory to it as to `Command::new(program)`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut script = String::new();
        for file in self.procs_files() {
            script.push_str(&format!("echo $$ > '{}' && ", file.display()));
        }
        script.push_str(r#"exec "$0" "$@""#);
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script).arg(program);
        cmd
    }

    /// `cmd` (program, arguments, environment changes, directory) started inside the
    /// budget, as [`CpuBudget::command`]. `env_clear` cannot be carried over (`Command`
    /// does not tell): build such commands with `command` instead.
    pub fn wrap(&self, cmd: &Command) -> Command {
        prefixed(self.command(cmd.get_program()), cmd)
    }

    /// Processes in the budget's own group (not those of sub-cgroups).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let file = &self.procs_files()[0];
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Every process in the budget, sub-cgroups included.
    pub fn all_pids(&self) -> Result<Vec<u32>> {
        let mut pids = Vec::new();
        let top = match &self.groups {
            Groups::V1 { cpu, .. } => cpu,
            Groups::V2 { dir } => dir,
        };
        collect_pids(top, &mut pids)?;
        Ok(pids)
    }

    /// CPU time the budget's processes used since it was created (sub-cgroups included).
    pub fn usage(&self) -> Result<Duration> {
        match &self.groups {
            Groups::V1 { cpuacct, .. } => Ok(Duration::from_nanos(read_number(
                &cpuacct.join("cpuacct.usage"),
            )?)),
            Groups::V2 { dir } => Ok(Duration::from_micros(
                stat_field(&dir.join("cpu.stat"), "usage_usec")?.unwrap_or(0),
            )),
        }
    }

    /// Throttling counters (`cpu.stat`).
    pub fn stat(&self) -> Result<CpuStat> {
        let (file, throttled_key, scale_ns) = match &self.groups {
            Groups::V1 { cpu, .. } => (cpu.join("cpu.stat"), "throttled_time", 1),
            Groups::V2 { dir } => (dir.join("cpu.stat"), "throttled_usec", 1000),
        };
        Ok(CpuStat {
            nr_periods: stat_field(&file, "nr_periods")?.unwrap_or(0),
            nr_throttled: stat_field(&file, "nr_throttled")?.unwrap_or(0),
            throttled: Duration::from_nanos(
                stat_field(&file, throttled_key)?.unwrap_or(0) * scale_ns,
            ),
        })
    }

    /// Moves what still runs in the budget back to the root groups and removes it (v1);
    /// on v2 the groups are removed with what runs in them killed, as a container's.
    /// Idempotent; dropping does it too.
    pub fn remove(&self) {
        match &self.groups {
            Groups::V1 { cpu, cpuacct } => {
                for (dir, root) in [(cpu, CPU_HIERARCHY), (cpuacct, CPUACCT_HIERARCHY)] {
                    if !dir.is_dir() {
                        continue;
                    }
                    if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                        for pid in pids.lines() {
                            // A process may exit between listing and moving: fine.
                            let _ = std::fs::write(Path::new(root).join("cgroup.procs"), pid);
                        }
                    }
                    if let Err(e) = std::fs::remove_dir(dir) {
                        tracing::warn!(cgroup = %dir.display(), "cannot remove: {e}");
                    }
                }
            }
            Groups::V2 { dir } => crate::sweep::remove_cgroup_tree(dir),
        }
    }
}

impl Drop for CpuBudget {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes the v1 budgets whose name `is_leftover` says belongs to a dead testbed.
pub(crate) fn remove_leftover_budgets(is_leftover: impl Fn(&str) -> bool) {
    for root in [CPU_HIERARCHY, CPUACCT_HIERARCHY] {
        let Ok(entries) = std::fs::read_dir(Path::new(root).join(BUDGET_DIR)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && is_leftover(&name) {
                let budget = CpuBudget {
                    name,
                    groups: Groups::V1 {
                        cpu: Path::new(CPU_HIERARCHY)
                            .join(BUDGET_DIR)
                            .join(e.file_name()),
                        cpuacct: Path::new(CPUACCT_HIERARCHY)
                            .join(BUDGET_DIR)
                            .join(e.file_name()),
                    },
                };
                drop(budget);
            }
        }
    }
}

/// `cmd`'s arguments, environment changes and directory added to `prefix` (e.g. `ip
/// netns exec NS PROGRAM`): the same command run through another. `env_clear` is not
/// carried over (`Command` does not tell).
pub fn prefixed(mut prefix: Command, cmd: &Command) -> Command {
    prefix.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => prefix.env(key, v),
            None => prefix.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        prefix.current_dir(dir);
    }
    prefix
}

fn read_number(path: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: {text:?}", path.display()))
}

/// `key VALUE` of a flat-keyed cgroup file; None when the key is absent.
fn stat_field(path: &Path, key: &str) -> Result<Option<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(parse_field(&text, key))
}

fn parse_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("cannot read {}", dir.join("cgroup.procs").display()))?;
    pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&e.path(), pids)?;
        }
    }
    Ok(())
}

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_as_cpus_or_millicpus() {
        assert_eq!("0.4".parse::<MilliCpus>().unwrap(), MilliCpus(400));
        assert_eq!("80m".parse::<MilliCpus>().unwrap(), MilliCpus(80));
        assert_eq!("2".parse::<MilliCpus>().unwrap(), MilliCpus(2000));
        assert!("0".parse::<MilliCpus>().is_err());
        assert!("5m".parse::<MilliCpus>().is_err());
        assert!("x".parse::<MilliCpus>().is_err());
        assert_eq!(MilliCpus(400).quota_us(), 40_000);
        assert_eq!(MilliCpus(80).quota_us(), 8_000);
    }

    #[test]
    fn cpu_stat_fields_are_found_by_key() {
        let stat = "nr_periods 53\nnr_throttled 51\nthrottled_time 3900000000\n";
        assert_eq!(parse_field(stat, "nr_throttled"), Some(51));
        assert_eq!(parse_field(stat, "nr_periods"), Some(53));
        assert_eq!(parse_field(stat, "nr_bursts"), None);
    }
}
