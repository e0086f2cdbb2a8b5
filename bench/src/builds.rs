//! Cases 5 and 6: Linux tinyconfig builds through the cluster, `builderctl enter` beside
//! raw distcc with a hand-written host list (case 5) and beside icecream (case 6), with
//! every worker healthy, one dead from the start, one slowed to 20% of a CPU, and one lost
//! 30 s into the build. Runs are paired (each repeat runs every tool on a scenario back to
//! back), every build's vmlinux is compared with a local build's, and a run that exceeds
//! the limit is killed, reported as "did not finish", and not repeated.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use distcc_testbed::{CpuQuota, REPRODUCIBLE_BUILD_ENV, Worker};

use crate::cases::{LinkGuard, Section, is_mounted, ratio, run_stamp};
use crate::icecream::Icecream;
use crate::run::{BuilderConfig, CpuClock, median};
use crate::user_node::UserNode;
use crate::{Bench, Case};

/// `make -j` of every distributed build (the issue's figure).
const MAKE_JOBS: u32 = 8;
/// distccd slots per worker (agent `jobs`), and the `/N` of the hand-written host list.
pub const WORKER_JOBS: u32 = 3;
/// When the lost worker's link is cut.
pub const LOSE_AFTER: Duration = Duration::from_secs(30);
/// CPU quota of the slow worker's distccd, in percent of one CPU.
const SLOW_PERCENT: u32 = 20;
/// Where every build goes (a tmpfs, the same path for all, so outputs compare).
const BUILD_DIR: &str = "/tmp/distcc-bench-kbuild";
/// What building Linux needs besides gcc and make (`testbed/setup-host --kernel` on the
/// host): the build node of case 8 boots a rootfs variant with them.
pub const KERNEL_BUILD_PACKAGES: &[&str] = &[
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tool {
    /// `make -j8 CC="distcc gcc"` with `DISTCC_HOSTS` written by hand.
    Raw,
    /// The same make inside `builderctl enter`.
    Ours,
    /// `make -j8 CC="icecc gcc"` with icecream's scheduler and daemons.
    Icecc,
    /// The same make inside `builderctl enter` run by an ordinary user on the build node
    /// container, through the builder daemon (case 8).
    User,
}

impl Tool {
    /// Its name on the command line (`--tools`).
    pub fn key(self) -> &'static str {
        match self {
            Tool::Raw => "raw",
            Tool::Ours => "ours",
            Tool::Icecc => "icecc",
            Tool::User => "user",
        }
    }

    /// The worker daemon that runs this tool's compiles (what the slow scenario throttles).
    fn worker_daemon(self) -> &'static str {
        match self {
            Tool::Raw | Tool::Ours | Tool::User => "distccd",
            Tool::Icecc => "iceccd",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Tool::Raw => "raw distcc",
            Tool::Ours => "builderctl enter",
            Tool::Icecc => "icecream",
            Tool::User => "ordinary user, build node",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    Healthy,
    Dead,
    Slow,
    Lost,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::Healthy,
        Scenario::Dead,
        Scenario::Slow,
        Scenario::Lost,
    ];

    fn label(self) -> String {
        match self {
            Scenario::Healthy => "all healthy".to_owned(),
            Scenario::Dead => "one worker dead from the start".to_owned(),
            Scenario::Slow => format!("one worker slowed to {SLOW_PERCENT}% CPU"),
            Scenario::Lost => format!("one worker lost {} s in", LOSE_AFTER.as_secs()),
        }
    }
}

/// One build's result.
#[derive(Debug, Clone)]
struct Run {
    elapsed: Duration,
    /// false: killed at the limit.
    finished: bool,
    /// Compiles each worker's distccd finished during the build (from its journal).
    per_worker: Vec<usize>,
    /// CPU time the whole machine spent during the build (all cores, every process:
    /// builder, workers, agents); against wall time, it shows whether the build kept the
    /// cores busy (it did, 93-98 %, so it is no steadier than wall time).
    cpu_secs: f64,
}

/// Everything measured, by scenario and tool.
#[derive(Default)]
struct Results {
    runs: BTreeMap<(Scenario, Tool), Vec<Run>>,
    local: Vec<Run>,
    /// The first finished build's objects (the local build's when it runs).
    reference: Option<BTreeMap<String, String>>,
    /// Builds checked against the reference.
    checked: usize,
    mismatches: Vec<String>,
}

impl Results {
    /// Compares a build's objects with the reference (the first build becomes it).
    fn check(&mut self, what: &str, objects: BTreeMap<String, String>) {
        match &self.reference {
            None => self.reference = Some(objects),
            Some(reference) => {
                self.checked += 1;
                let differ = differing(reference, &objects);
                if !differ.is_empty() {
                    tracing::warn!(what, ?differ, "objects differ from the reference");
                    self.mismatches.push(format!(
                        "{what}: {} objects differ ({})",
                        differ.len(),
                        differ
                            .iter()
                            .take(5)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
    }

    fn gave_up(&self, scenario: Scenario, tool: Tool) -> bool {
        self.runs
            .get(&(scenario, tool))
            .is_some_and(|runs| runs.iter().any(|r| !r.finished))
    }

    /// Median seconds of the finished runs, or None when any run did not finish.
    fn median(&self, scenario: Scenario, tool: Tool) -> Option<f64> {
        let runs = self.runs.get(&(scenario, tool))?;
        if runs.is_empty() || runs.iter().any(|r| !r.finished) {
            return None;
        }
        let secs: Vec<f64> = runs.iter().map(|r| r.elapsed.as_secs_f64()).collect();
        Some(median(&secs))
    }

    /// ours / baseline within each repeat where both finished. The tools of a repeat run
    /// back to back, so a slow spell of the shared machine hits both sides of a pair;
    /// the median of these is steadier than a ratio of medians.
    fn paired_ratios(&self, scenario: Scenario, baseline: Tool) -> Vec<f64> {
        self.paired((scenario, Tool::Ours), (scenario, baseline))
    }

    /// `a` / `b` within each repeat where both finished (see `paired_ratios`).
    fn paired(&self, a: (Scenario, Tool), b: (Scenario, Tool)) -> Vec<f64> {
        let (Some(ours), Some(base)) = (self.runs.get(&a), self.runs.get(&b)) else {
            return Vec::new();
        };
        ours.iter()
            .zip(base)
            .filter(|(o, b)| o.finished && b.finished)
            .map(|(o, b)| o.elapsed.as_secs_f64() / b.elapsed.as_secs_f64())
            .collect()
    }

    /// Lowest and highest share of the machine's cores kept busy during a build.
    fn busy_range(&self) -> Option<(f64, f64)> {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let shares: Vec<f64> = self
            .runs
            .values()
            .flatten()
            .chain(&self.local)
            .filter(|r| r.finished)
            .map(|r| r.cpu_secs / (r.elapsed.as_secs_f64() * cores as f64))
            .collect();
        let lowest = shares.iter().copied().reduce(f64::min)?;
        let highest = shares.iter().copied().reduce(f64::max)?;
        Some((lowest, highest))
    }

    fn cell(&self, scenario: Scenario, tool: Tool, limit: Duration) -> String {
        match self.runs.get(&(scenario, tool)) {
            None => "not run".to_owned(),
            Some(runs) if runs.iter().any(|r| !r.finished) => {
                format!("did not finish in {} s", limit.as_secs())
            }
            Some(runs) => {
                let all: Vec<String> = runs
                    .iter()
                    .map(|r| format!("{:.0}", r.elapsed.as_secs_f64()))
                    .collect();
                format!(
                    "**{:.1} s** ({})",
                    self.median(scenario, tool).unwrap_or(f64::NAN),
                    all.join(", ")
                )
            }
        }
    }

    fn spread(&self, scenario: Scenario, tool: Tool) -> String {
        if tool == Tool::Icecc {
            // iceccd keeps no per-job log we read.
            return "-".to_owned();
        }
        let Some(runs) = self.runs.get(&(scenario, tool)) else {
            return String::new();
        };
        let Some(last) = runs.last() else {
            return String::new();
        };
        last.per_worker
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// The kernel build every tool runs: the source, the build directory, how to configure.
pub struct KernelBuild {
    pub source: PathBuf,
    pub dir: PathBuf,
    pub logs: PathBuf,
}

impl KernelBuild {
    fn prepare(bench: &Bench) -> Result<KernelBuild> {
        Self::prepare_in(bench, Path::new(BUILD_DIR))
    }

    /// The build in `dir` (a tmpfs is mounted there; unmounted on drop).
    pub fn prepare_in(bench: &Bench, dir: &Path) -> Result<KernelBuild> {
        let source = distcc_testbed::kernel_source()?;
        let dir = dir.to_owned();
        tmpfs_build_dir(&dir)?;
        let logs = bench.tmp.path().join("build-logs");
        std::fs::create_dir_all(&logs)?;
        Ok(KernelBuild { source, dir, logs })
    }

    /// Empty the build directory and `make tinyconfig` in it (not timed).
    pub fn configure(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        let out = self
            .make()
            .arg("-s")
            .arg("tinyconfig")
            .output()
            .context("make tinyconfig")?;
        ensure!(
            out.status.success(),
            "make tinyconfig failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `make -C SOURCE O=DIR` with the reproducible-build environment.
    pub fn make(&self) -> Command {
        let mut cmd = Command::new("make");
        self.make_args(&mut cmd);
        cmd
    }

    fn make_args(&self, cmd: &mut Command) {
        cmd.arg("-C")
            .arg(&self.source)
            .arg(format!("O={}", self.dir.display()));
        for (k, v) in REPRODUCIBLE_BUILD_ENV {
            cmd.env(k, v);
        }
    }

    /// sha256 of every object file of the build, by path, debug sections stripped.
    ///
    /// Two things legitimately differ between a distributed and a local build, and are
    /// left out: debug info (arch/x86/boot is built with `-g`; a remote compile runs in
    /// distccd's or iceccd's temporary directory, which lands in `DW_AT_comp_dir`), and the
    /// kernel banner, which quotes `$(CC) --version`: `gcc` and `icecc gcc` say "gcc
    /// (Debian ...)", `distcc gcc` says "x86_64-linux-gnu-gcc (Debian ...)". The banner
    /// is in init/version*.o and vmlinux.o, compressed with all of vmlinux in
    /// arch/x86/boot/compressed/piggy.o, and its length in the setup header's sizes
    /// (arch/x86/boot/header.o). Everything else must be byte-identical.
    pub fn objects(&self) -> Result<BTreeMap<String, String>> {
        let out = Command::new("bash")
            .args(["-c", CHECKSUM_OBJECTS, "checksum"])
            .arg(&self.dir)
            .output()
            .context("checksumming the objects")?;
        objects_of(&out, self.dir.join("vmlinux").exists())
    }
}

/// `dir`, created and with a tmpfs mounted on it unless one is: builds start from memory,
/// not from whatever the disk is doing.
pub fn tmpfs_build_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    if !is_mounted(dir) {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4G", "distcc-bench-kbuild"])
            .arg(dir)
            .status()
            .context("mount")?;
        ensure!(
            status.success(),
            "cannot mount a tmpfs on {}",
            dir.display()
        );
    }
    Ok(())
}

/// `bash -c CHECKSUM_OBJECTS checksum DIR`: `SHA256  PATH` of every object file under
/// DIR, debug sections stripped (see `KernelBuild::objects`).
pub const CHECKSUM_OBJECTS: &str = r#"set -e
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    cd "$1"
    find . -name '*.o' -type f | sort | while read -r f; do
        strip --strip-debug -o "$tmp" "$f"
        printf '%s  %s\n' "$(sha256sum < "$tmp" | cut -d' ' -f1)" "${f#./}"
    done"#;

/// The objects [`CHECKSUM_OBJECTS`] printed, by path, without the ones that carry the
/// kernel banner; an error unless the build left a vmlinux and a real number of objects.
pub fn objects_of(
    out: &std::process::Output,
    has_vmlinux: bool,
) -> Result<BTreeMap<String, String>> {
    ensure!(
        out.status.success(),
        "cannot checksum the objects: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (sum, path) = line.split_once("  ")?;
            let banner = path.starts_with("init/version")
                || matches!(
                    path,
                    "vmlinux.o" | "arch/x86/boot/compressed/piggy.o" | "arch/x86/boot/header.o"
                );
            (!banner).then(|| (path.to_owned(), sum.to_owned()))
        })
        .collect();
    ensure!(
        has_vmlinux && objects.len() > 100,
        "the build left no vmlinux or too few objects ({})",
        objects.len()
    );
    Ok(objects)
}

/// Objects whose checksums differ between two builds (or that only one has).
pub fn differing(
    reference: &BTreeMap<String, String>,
    build: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut paths: Vec<String> = reference
        .iter()
        .filter(|(path, sum)| build.get(*path) != Some(*sum))
        .map(|(path, _)| path.clone())
        .collect();
    paths.extend(
        build
            .keys()
            .filter(|p| !reference.contains_key(*p))
            .cloned(),
    );
    paths
}

impl Drop for KernelBuild {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Compiles a worker's distccd logged as finished since `since` (Unix seconds).
pub fn compiles_since(worker: &Worker, since: u64) -> usize {
    distccd_log_since(worker, since)
        .matches("COMPILE_OK")
        .count()
}

/// distccd's journal since `since` (Unix seconds); empty when unreadable.
pub fn distccd_log_since(worker: &Worker, since: u64) -> String {
    worker
        .exec_ok(&[
            "journalctl",
            "-q",
            "-o",
            "cat",
            "-u",
            "distccd",
            "--since",
            &format!("@{since}"),
        ])
        .unwrap_or_default()
}

/// Runs `cmd` in its own process group, output to `log`; kills the whole group (make,
/// compilers, distcc clients) at `limit`. Returns the wall time and whether it finished.
pub fn timed_build(cmd: &mut Command, log: &Path, limit: Duration) -> Result<(Duration, bool)> {
    let file = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = started.elapsed();
            ensure!(
                status.success(),
                "{cmd:?} failed ({status}); log: {}\n{}",
                log.display(),
                tail(log, 30)
            );
            return Ok((elapsed, true));
        }
        if started.elapsed() >= limit {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            return Ok((started.elapsed(), false));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `local_slots` and `lzo` from the command line, as builder.toml lines (both the host's
/// configuration and the build node's get them).
pub fn builder_knobs(bench: &Bench) -> String {
    let mut knobs = String::new();
    if let Some(n) = bench.args.local_slots {
        knobs.push_str(&format!("local_slots = {n}\n"));
    }
    if let Some(lzo) = bench.args.lzo {
        knobs.push_str(&format!("lzo = {lzo}\n"));
    }
    knobs
}

/// Cases 5, 6 and/or 8 (`cases` says which), sharing the builderctl runs.
pub fn builds(bench: &Bench, cases: &[Case]) -> Result<Vec<(Case, Section)>> {
    let want_raw = cases.contains(&Case::Builds);
    let want_icecc = cases.contains(&Case::Icecream);
    let want_user = cases.contains(&Case::UserBuilds);
    let scenarios: Vec<Scenario> = match &bench.args.scenarios {
        Some(names) => names
            .iter()
            .map(|n| parse_scenario(n))
            .collect::<Result<_>>()?,
        // Case 8 alone: the issue's pair, a worker lost against healthy.
        None if !want_raw && !want_icecc => vec![Scenario::Healthy, Scenario::Lost],
        None => Scenario::ALL.to_vec(),
    };
    let limit = Duration::from_secs(bench.args.build_limit_secs);
    let kernel = KernelBuild::prepare(bench)?;
    let workers: Vec<&Worker> = bench.workers.iter().collect();
    ensure!(workers.len() == 3, "the build cases need w1, w2, w3");
    let victim = workers[2];
    let config = BuilderConfig::new(
        bench.tmp.path(),
        "builds",
        &bench.builderctl,
        &Bench::endpoints(&workers),
    )?;
    let knobs = builder_knobs(bench);
    config.append(&knobs)?;
    let raw_hosts: Vec<String> = workers
        .iter()
        .map(|w| format!("{}/{WORKER_JOBS}", w.ip()))
        .collect();
    let raw_hosts = raw_hosts.join(" ");
    let icecream = if want_icecc {
        Some(Icecream::start(bench)?)
    } else {
        None
    };
    let user_node = if want_user {
        Some(UserNode::boot(bench, &kernel.source, &knobs)?)
    } else {
        None
    };

    let mut tools = Vec::new();
    if want_raw {
        tools.push(Tool::Raw);
    }
    tools.push(Tool::Ours);
    if want_icecc {
        tools.push(Tool::Icecc);
    }
    if want_user {
        tools.push(Tool::User);
    }
    if let Some(only) = &bench.args.tools {
        tools.retain(|t| only.iter().any(|o| o == t.key()));
        ensure!(
            !tools.is_empty(),
            "--tools {only:?} selects none of raw, ours, icecc, user"
        );
    }

    let mut results = Results::default();
    let mut serial = 0;
    for repeat in 0..bench.args.build_repeats {
        // The reference, once per repeat: its vmlinux is what every build must produce.
        if bench.args.local_reference {
            serial += 1;
            kernel.configure()?;
            let log = kernel.logs.join(format!("{serial:03}-local.log"));
            let mut cmd = kernel.make();
            cmd.arg("-j2");
            let cpu = CpuClock::now()?;
            let (elapsed, finished) = timed_build(&mut cmd, &log, limit)?;
            let cpu_secs = cpu.secs_since()?;
            ensure!(finished, "the local build did not finish within {limit:?}");
            let objects = kernel.objects()?;
            tracing::info!(
                repeat,
                secs = elapsed.as_secs_f64(),
                objects = objects.len(),
                "local make -j2"
            );
            results.check(&format!("local build {serial}"), objects);
            results.local.push(Run {
                elapsed,
                finished,
                per_worker: Vec::new(),
                cpu_secs,
            });
        }
        for &scenario in &scenarios {
            for &tool in &tools {
                if results.gave_up(scenario, tool) {
                    continue;
                }
                serial += 1;
                match (tool, &user_node) {
                    (Tool::User, Some(node)) => node.configure()?,
                    _ => kernel.configure()?,
                }
                let log = kernel
                    .logs
                    .join(format!("{serial:03}-{tool:?}-{scenario:?}.log"));
                let distcc_dir = bench.tmp.path().join(format!("distcc-{serial}"));
                std::fs::create_dir_all(&distcc_dir)?;
                let mut cmd = match tool {
                    Tool::Raw => {
                        let mut cmd = kernel.make();
                        cmd.arg(format!("-j{MAKE_JOBS}"))
                            .arg("CC=distcc gcc")
                            .env("DISTCC_HOSTS", &raw_hosts)
                            .env("DISTCC_DIR", &distcc_dir);
                        cmd
                    }
                    Tool::Ours => {
                        // The session's steering log is kept beside the build log.
                        let keep = format!(
                            "make \"$@\"; rc=$?; cp \"$DISTCC_DIR/steering.log\" {} 2>/dev/null; exit $rc",
                            log.with_extension("steering.log").display()
                        );
                        let mut cmd = config.command(&["enter", "--", "sh", "-c", &keep, "make"]);
                        kernel.make_args(&mut cmd);
                        // The kernel's Makefile sets CC itself: pass the session's on the
                        // command line, exactly as the raw run does.
                        cmd.arg(format!("-j{MAKE_JOBS}")).arg("CC=distcc gcc");
                        cmd
                    }
                    Tool::Icecc => {
                        let Some(ice) = &icecream else {
                            bail!("icecream is not set up")
                        };
                        let mut cmd = kernel.make();
                        cmd.arg(format!("-j{MAKE_JOBS}")).arg("CC=icecc gcc");
                        ice.client_env(&mut cmd);
                        cmd
                    }
                    Tool::User => {
                        let Some(node) = &user_node else {
                            bail!("the build node is not booted")
                        };
                        node.command(MAKE_JOBS)?
                    }
                };
                // Where the victim's connects time out: the host's bridge for the host's
                // builds, and the build node too for its user's.
                let seen_from = match (tool, &user_node) {
                    (Tool::User, Some(node)) => Some(node.worker()),
                    _ => None,
                };
                let since = unix_now();
                let cpu = CpuClock::now()?;
                let run = {
                    let _throttle = match scenario {
                        Scenario::Slow => {
                            Some(CpuQuota::apply(victim, tool.worker_daemon(), SLOW_PERCENT)?)
                        }
                        _ => None,
                    };
                    let _dead = match scenario {
                        Scenario::Dead => Some(LinkGuard::cut_seen_from(
                            victim,
                            bench.bed.bridge(),
                            seen_from,
                        )?),
                        _ => None,
                    };
                    let outcome = std::thread::scope(|scope| -> Result<(Duration, bool)> {
                        let (stop, stopped) = std::sync::mpsc::channel::<()>();
                        let cutter = (scenario == Scenario::Lost).then(|| {
                            scope.spawn(move || -> Result<Option<LinkGuard<'_>>> {
                                match stopped.recv_timeout(LOSE_AFTER) {
                                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                        tracing::info!("cutting {}'s link", victim.name());
                                        Ok(Some(LinkGuard::cut_seen_from(
                                            victim,
                                            bench.bed.bridge(),
                                            seen_from,
                                        )?))
                                    }
                                    _ => Ok(None),
                                }
                            })
                        });
                        let outcome = timed_build(&mut cmd, &log, limit);
                        let _ = stop.send(());
                        if let Some(cutter) = cutter {
                            // The guard drops here: the link comes back after the build.
                            let guard = cutter
                                .join()
                                .map_err(|_| anyhow::anyhow!("the link cutter panicked"))??;
                            drop(guard);
                        }
                        outcome
                    })?;
                    let cpu_secs = cpu.secs_since()?;
                    let per_worker = workers.iter().map(|w| compiles_since(w, since)).collect();
                    Run {
                        elapsed: outcome.0,
                        finished: outcome.1,
                        per_worker,
                        cpu_secs,
                    }
                };
                if tool == Tool::Ours {
                    // A killed session leaves its workspace mounted and its state behind.
                    let _ = config.command(&["leave"]).output();
                }
                if let (Tool::User, Some(node)) = (tool, &user_node) {
                    node.keep_steering_log(&log.with_extension("steering.log"));
                }
                tracing::info!(
                    repeat, ?scenario, ?tool, secs = run.elapsed.as_secs_f64(),
                    cpu_secs = run.cpu_secs, finished = run.finished, per_worker = ?run.per_worker, "build"
                );
                if run.finished {
                    let what = format!("{} / {} (run {serial})", tool.label(), scenario.label());
                    let objects = match (tool, &user_node) {
                        (Tool::User, Some(node)) => node.objects()?,
                        _ => kernel.objects()?,
                    };
                    results.check(&what, objects);
                }
                if scenario != Scenario::Healthy {
                    recover(victim, icecream.as_ref())?;
                }
                results.runs.entry((scenario, tool)).or_default().push(run);
            }
        }
    }
    if let Some(ice) = icecream {
        ice.stop();
    }

    let mut sections = Vec::new();
    if want_raw {
        sections.push((
            Case::Builds,
            render(bench, &results, &scenarios, Tool::Raw, limit),
        ));
    }
    if want_icecc {
        sections.push((
            Case::Icecream,
            render(bench, &results, &scenarios, Tool::Icecc, limit),
        ));
    }
    if want_user {
        sections.push((
            Case::UserBuilds,
            render_user(bench, &results, &scenarios, limit),
        ));
    }
    Ok(sections)
}

fn parse_scenario(name: &str) -> Result<Scenario> {
    Ok(match name {
        "healthy" => Scenario::Healthy,
        "dead" => Scenario::Dead,
        "slow" => Scenario::Slow,
        "lost" => Scenario::Lost,
        other => bail!("no scenario {other:?}: healthy, dead, slow, lost"),
    })
}

/// After a fault: the victim's distccd may still hold connections of a build that is
/// gone (and the throttle's processes): restart it, and wait for its agent to see it
/// serve, so the next run starts from a healthy cluster.
pub fn recover(victim: &Worker, icecream: Option<&Icecream>) -> Result<()> {
    victim.exec_ok(&["systemctl", "restart", "distccd"])?;
    if let Some(ice) = icecream {
        ice.restart_daemon(victim)?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // bash, not sh: dash has no /dev/tcp.
        let probe = format!("exec 3<>/dev/tcp/{}/3632", victim.ip());
        let out = victim.exec(&["bash", "-c", &probe])?;
        if out.status.success() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{}: distccd does not serve after the restart",
            victim.name()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn render(
    bench: &Bench,
    results: &Results,
    scenarios: &[Scenario],
    baseline: Tool,
    limit: Duration,
) -> Section {
    let mut md = String::new();
    let case = if baseline == Tool::Raw { 5 } else { 6 };
    let _ = writeln!(
        md,
        "### Case {case}: Linux 6.1 tinyconfig, `make -j{MAKE_JOBS}`, {} beside `builderctl enter` (2-core shared bed)\n",
        baseline.label()
    );
    let _ = writeln!(md, "{}\n", run_stamp(bench));
    let base_healthy = results.median(Scenario::Healthy, baseline);
    let ours_healthy = results.median(Scenario::Healthy, Tool::Ours);
    let _ = writeln!(
        md,
        "| scenario | {b} | builderctl enter | ours / {b} (each repeat) | ours / {b} healthy | target | | compiles w1/w2/w3 ({b}; ours) |",
        b = baseline.label()
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |");
    for &scenario in scenarios {
        let ours = results.median(scenario, Tool::Ours);
        let base = results.median(scenario, baseline);
        let paired = results.paired_ratios(scenario, baseline);
        let same = match (ours, base) {
            (Some(_), Some(_)) if !paired.is_empty() => format!(
                "{:.2} ({})",
                median(&paired),
                paired
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (Some(o), Some(b)) => ratio(o, b),
            (Some(_), None) if results.gave_up(scenario, baseline) => {
                format!("< {}", ratio(ours.unwrap_or(0.0), limit.as_secs_f64()))
            }
            _ => "n/a".to_owned(),
        };
        let to_healthy = match (ours, base_healthy) {
            (Some(o), Some(b)) => ratio(o, b),
            _ => "n/a".to_owned(),
        };
        let (target, met) = target(
            scenario,
            baseline,
            (!paired.is_empty()).then(|| median(&paired)),
            ours,
            ours_healthy,
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {same} | {to_healthy} | {target} | {} | {}; {} |",
            scenario.label(),
            results.cell(scenario, baseline, limit),
            results.cell(scenario, Tool::Ours, limit),
            match met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            },
            results.spread(scenario, baseline),
            results.spread(scenario, Tool::Ours),
        );
    }
    if !results.local.is_empty() {
        let secs: Vec<f64> = results
            .local
            .iter()
            .map(|r| r.elapsed.as_secs_f64())
            .collect();
        let med = median(&secs);
        let _ = writeln!(
            md,
            "| reference: local `make -j2`, no distcc | {:.1} s | | | {} | | | |",
            med,
            base_healthy.map_or("n/a".to_owned(), |b| ratio(med, b)),
        );
    }
    md.push('\n');
    let notes = [
        format!(
            "Medians of {} paired repeats (each repeat runs the scenarios in order, every tool back to back); all runs in parentheses, in seconds. A run past {} s is killed, counted as not finished, and not repeated.",
            bench.args.build_repeats,
            limit.as_secs()
        ),
        format!(
            "Three worker containers with distccd `--jobs {WORKER_JOBS}` (through the agent); raw distcc's `DISTCC_HOSTS` is `w1/{WORKER_JOBS} w2/{WORKER_JOBS} w3/{WORKER_JOBS}`; `builderctl enter` writes its own hosts file from the agents' status (localhost/2 last, its default). All builds share this machine's cores, so distribution cannot beat local here: compare columns, not against local."
        ),
        format!(
            "Faults hit w3: dead = link down before the build (connects time out, as to a powered-off machine); slow = w3's distccd held to {SLOW_PERCENT}% of one CPU by a host cgroup v1 cpu quota; lost = link cut {} s into the build, back after it.",
            LOSE_AFTER.as_secs()
        ),
        match (&results.reference, results.mismatches.is_empty()) {
            (Some(objects), true) => format!(
                "Correctness: in each of the {} other finished builds, all {} object files are byte-identical to the first build's ({}; fixed KBUILD_BUILD_* identity; compared with debug sections stripped, since a remote compile's working directory lands in arch/x86/boot's `-g` debug info; init/version*.o, vmlinux.o, arch/x86/boot/compressed/piggy.o and header.o left out: they carry the banner or its length, which quotes `$(CC) --version`, and `distcc gcc` words it differently).",
                results.checked,
                objects.len(),
                if bench.args.local_reference { "the local make -j2" } else { "no local reference in this run" }
            ),
            (None, _) => "Correctness: no build finished, nothing compared.".to_owned(),
            (Some(_), false) => format!(
                "**Correctness: outputs differ**: {}",
                results.mismatches.join("; ")
            ),
        },
        match results.busy_range() {
            Some((low, high)) => format!(
                "The machine's cores were busy {:.0}-{:.0} % of every build's wall time (/proc/stat, all processes): the builds are CPU-bound, so busy CPU time tracks wall time and is no steadier a measure; the spread between repeats is the shared machine's (no hardware counters here: `perf stat` says not supported).",
                low * 100.0,
                high * 100.0
            ),
            None => String::new(),
        },
        "Compiles per worker: COMPILE_OK lines in each worker's distccd journal during the last run.".to_owned(),
    ];
    for n in notes {
        let _ = writeln!(md, "- {n}");
    }
    Section { markdown: md }
}

/// Case 8: the ordinary user's builds on the build node beside root's on the host, and
/// each one's lost / healthy (issue 11's target for the user: at most 1.10).
fn render_user(
    bench: &Bench,
    results: &Results,
    scenarios: &[Scenario],
    limit: Duration,
) -> Section {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Case 8: Linux 6.1 tinyconfig, `make -j{MAKE_JOBS}` in `builderctl enter`, an ordinary user on a build node beside root (2-core shared bed)\n"
    );
    let _ = writeln!(md, "{}\n", run_stamp(bench));
    let each = |ratios: &[f64]| {
        if ratios.is_empty() {
            "n/a".to_owned()
        } else {
            format!(
                "{:.2} ({})",
                median(ratios),
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    let _ = writeln!(
        md,
        "| scenario | root, host (no daemon) | user, build node (daemon) | user / root (each repeat) | target | | compiles w1/w2/w3 (root; user) |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | --- | --- | --- |");
    for &scenario in scenarios {
        let paired = results.paired((scenario, Tool::User), (scenario, Tool::Ours));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | | | {}; {} |",
            scenario.label(),
            results.cell(scenario, Tool::Ours, limit),
            results.cell(scenario, Tool::User, limit),
            each(&paired),
            results.spread(scenario, Tool::Ours),
            results.spread(scenario, Tool::User),
        );
    }
    if scenarios.contains(&Scenario::Healthy) && scenarios.contains(&Scenario::Lost) {
        let root = results.paired(
            (Scenario::Lost, Tool::Ours),
            (Scenario::Healthy, Tool::Ours),
        );
        let user = results.paired(
            (Scenario::Lost, Tool::User),
            (Scenario::Healthy, Tool::User),
        );
        let met = (!user.is_empty()).then(|| median(&user) <= 1.10);
        let _ = writeln!(
            md,
            "| **lost / healthy** (each repeat) | {} | {} | | user lost / user healthy <= 1.10 | {} | |",
            each(&root),
            each(&user),
            match met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            }
        );
    }
    md.push('\n');
    let notes = [
        format!(
            "Medians of {} paired repeats (each repeat runs the scenarios in order, root's and the user's build back to back); all runs in parentheses, in seconds. A run past {} s is killed, counted as not finished, and not repeated. Lost / healthy is the median of each repeat's ratio.",
            bench.args.build_repeats,
            limit.as_secs()
        ),
        "Root: `builderctl enter` as root in the host's namespace with no daemon (it steers and cuts by itself), as in case 5. User: `alice`, a member of `distcc-build` made by the bench in a build node container on the same bridge (`distcc_testbed::BuilderNode`: the package's units, polkit rule and sysusers, tokens `root:distcc-builder 0640` she cannot read), runs `builderctl enter` in her daemon-mounted tmpfs workspace; the daemon (`distcc-builder.service`, CAP_NET_ADMIN only) follows the workers and aborts the lost worker's connections. Both use the same workers, `make` line and kernel tree (bound read-only into the node at the same path).".to_owned(),
        format!(
            "Lost = w3's link cut {} s into the build (and a permanent neighbour entry for it where the builder runs, so connects time out), back after it.",
            LOSE_AFTER.as_secs()
        ),
        match (&results.reference, results.mismatches.is_empty()) {
            (Some(objects), true) => format!(
                "Correctness: in each of the {} other finished builds (root's and the user's), all {} object files are byte-identical to the first build's (debug sections stripped; the banner's objects left out, as in case 5).",
                results.checked,
                objects.len()
            ),
            (None, _) => "Correctness: no build finished, nothing compared.".to_owned(),
            (Some(_), false) => format!(
                "**Correctness: outputs differ**: {}",
                results.mismatches.join("; ")
            ),
        },
    ];
    for n in notes {
        let _ = writeln!(md, "- {n}");
    }
    Section { markdown: md }
}

/// The issue's target for a scenario, and whether it is met (None: no target or no data).
/// `paired`: the median of the repeats' ours / baseline ratios.
fn target(
    scenario: Scenario,
    baseline: Tool,
    paired: Option<f64>,
    ours: Option<f64>,
    ours_healthy: Option<f64>,
) -> (String, Option<bool>) {
    match (scenario, baseline) {
        (Scenario::Healthy, Tool::Raw) => {
            ("ours / raw <= 1.02".to_owned(), paired.map(|r| r <= 1.02))
        }
        (Scenario::Slow, Tool::Raw) => ("ours / raw <= 0.85".to_owned(), paired.map(|r| r <= 0.85)),
        (Scenario::Lost, _) => (
            "ours lost / ours healthy <= 1.25 (aim < 1.12)".to_owned(),
            ours.zip(ours_healthy).map(|(o, h)| o / h <= 1.25),
        ),
        _ => (String::new(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secs: u64, finished: bool) -> Run {
        Run {
            elapsed: Duration::from_secs(secs),
            finished,
            per_worker: Vec::new(),
            cpu_secs: 0.0,
        }
    }

    #[test]
    fn ratios_pair_runs_of_the_same_repeat_and_skip_unfinished_ones() {
        let mut results = Results::default();
        let healthy = Scenario::Healthy;
        results.runs.insert(
            (healthy, Tool::Raw),
            vec![run(100, true), run(80, true), run(90, false)],
        );
        results.runs.insert(
            (healthy, Tool::Ours),
            vec![run(110, true), run(72, true), run(90, true)],
        );
        assert_eq!(results.paired_ratios(healthy, Tool::Raw), [1.1, 0.9]);
        assert!(results.paired_ratios(Scenario::Slow, Tool::Raw).is_empty());
        // The healthy target is judged on the paired median, not on the ratio of medians.
        assert_eq!(
            target(healthy, Tool::Raw, Some(1.0), Some(200.0), None).1,
            Some(true)
        );
        assert_eq!(
            target(healthy, Tool::Raw, Some(1.05), Some(1.0), None).1,
            Some(false)
        );
    }
}
