//! Case 9: a cluster in miniature (issue 12). Every node has a CPU budget of its own (a
//! host cgroup: `distcc_testbed::CpuBudget`): the builder's whole build, each worker's
//! whole container, and in the two-builders scenario a second builder in a network
//! namespace of its own. The budgets add up to at most the machine's cores, so no node
//! borrows another's time and distribution can pay. Runs are paired (every tool back to
//! back per scenario and repeat) and each one is appended to a JSON-lines store as it
//! finishes, keyed by commit, workload, scenario, tool and repeat: a later run of the same
//! commit skips what is stored, and the tables are built from every stored run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use distcc_testbed::{BareHost, CpuBudget, MilliCpus, Worker, agent_config, prefixed};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::Bench;
use crate::builds::{
    KernelBuild, LOSE_AFTER, Tool, WORKER_JOBS, builder_knobs, distccd_log_since, recover,
    timed_build, unix_now,
};
use crate::cases::{LinkGuard, Section, run_stamp};
use crate::icecream::Icecream;
use crate::run::{BuilderConfig, median};

/// `make -j` of every distributed build: the workers' slots (3 x 3) and one more.
const MAKE_JOBS: u32 = 10;
/// The session's steering log, kept beside each `ours` run's DISTCC_DIR.
const STEERING_LOG: &str = "steering.log";
/// Where the two builders build (tmpfs each).
const BUILD_DIRS: [&str; 2] = ["/tmp/distcc-bench-mini1", "/tmp/distcc-bench-mini2"];

/// The node budgets (flags `--builder-cpus`, `--worker-cpus`, `--slow-cpus`,
/// `--builder2-cpus`; defaults and why in docs/TESTBED.md).
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub builder: MilliCpus,
    pub worker: MilliCpus,
    pub slow: MilliCpus,
    pub builder2: MilliCpus,
}

impl Budgets {
    fn describe(&self) -> String {
        format!(
            "builder {}, workers w1-w3 {} each, slow worker {}, second builder {}",
            self.builder.cpus(),
            self.worker.cpus(),
            self.slow.cpus(),
            self.builder2.cpus()
        )
    }

    /// What the whole healthy cluster can compute, over the builder's own budget.
    fn ideal_speedup(&self) -> f64 {
        (self.builder.cpus() + 3.0 * self.worker.cpus()) / self.builder.cpus()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    Healthy,
    Dead,
    Slow,
    Lost,
    Two,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Healthy,
        Scenario::Dead,
        Scenario::Slow,
        Scenario::Lost,
        Scenario::Two,
    ];

    fn key(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Dead => "dead",
            Scenario::Slow => "slow",
            Scenario::Lost => "lost",
            Scenario::Two => "two",
        }
    }

    fn parse(name: &str) -> Result<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|s| s.key() == name)
            .with_context(|| format!("no scenario {name:?}: healthy, dead, slow, lost, two"))
    }

    fn label(self, budgets: &Budgets) -> String {
        match self {
            Scenario::Healthy => "all healthy".to_owned(),
            Scenario::Dead => "w3 dead from the start".to_owned(),
            Scenario::Slow => format!("w3 slow ({} CPU)", budgets.slow.cpus()),
            Scenario::Lost => format!("w3 lost {} s in", LOSE_AFTER.as_secs()),
            Scenario::Two => "two builders at once (max / min)".to_owned(),
        }
    }
}

/// What gets built. Both run through the same runner: configure (untimed, empties the
/// build directory), a build command with the compiler wrapper, the object checksums.
pub enum Workload {
    Kernel(KernelBuild),
    Cxx(distcc_testbed::CxxBuild),
}

impl Workload {
    fn prepare(bench: &Bench, name: &str, dir: &Path) -> Result<Workload> {
        Ok(match name {
            "kernel" => Workload::Kernel(KernelBuild::prepare_in(bench, dir)?),
            "cxx" => {
                crate::builds::tmpfs_build_dir(dir)?;
                Workload::Cxx(distcc_testbed::CxxBuild::new(
                    distcc_testbed::cxx_source()?,
                    dir.to_owned(),
                ))
            }
            other => bail!("no workload {other:?}: kernel, cxx"),
        })
    }

    fn label(name: &str) -> &'static str {
        match name {
            "kernel" => "Linux 6.1 tinyconfig",
            _ => "abseil 20220623 (C++, CMake, 119 objects)",
        }
    }

    fn configure(&self) -> Result<()> {
        match self {
            Workload::Kernel(k) => k.configure(),
            Workload::Cxx(c) => c.configure(),
        }
    }

    /// `make -jJOBS` with the compilers behind `wrapper` ("distcc", "icecc"; "" = local).
    fn command(&self, jobs: u32, wrapper: &str) -> Command {
        let with = |compiler: &str| {
            if wrapper.is_empty() {
                compiler.to_owned()
            } else {
                format!("{wrapper} {compiler}")
            }
        };
        match self {
            Workload::Kernel(k) => {
                let mut cmd = k.make();
                // The kernel's Makefile sets CC itself: it goes on the command line.
                cmd.arg(format!("-j{jobs}"))
                    .arg(format!("CC={}", with("gcc")));
                cmd
            }
            // The compiler was fixed at configure time; the wrapper is make's launcher.
            Workload::Cxx(c) => c.build_command(jobs, &with("g++")),
        }
    }

    fn objects(&self) -> Result<BTreeMap<String, String>> {
        match self {
            Workload::Kernel(k) => k.objects(),
            Workload::Cxx(c) => c.objects(),
        }
    }
}

/// One finished (or killed) run, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub commit: String,
    pub workload: String,
    pub scenario: String,
    pub tool: String,
    pub repeat: usize,
    /// Wall time; None: killed at the limit.
    pub secs: Option<f64>,
    /// The second builder's, in the two-builders scenario.
    pub secs2: Option<f64>,
    /// sha256 over the object checksums (the local run's is the reference).
    pub digest: Option<String>,
    pub digest2: Option<String>,
    /// COMPILE_OK per worker (distccd's journal).
    pub per_worker: Vec<usize>,
    /// Median `time:NNNms` of those compiles per worker.
    pub compile_ms: Vec<Option<f64>>,
    /// CPU seconds (cpuacct) of each node during the build: builder, builder2, w1-w3.
    pub cpu_secs: BTreeMap<String, f64>,
    /// distccd's `dcc_rej_overload` summed over the workers during the build.
    pub rejections: Option<u64>,
    pub budgets: String,
    pub at: u64,
}

impl Record {
    fn key(&self) -> (String, String, String, usize) {
        (
            self.workload.clone(),
            self.scenario.clone(),
            self.tool.clone(),
            self.repeat,
        )
    }
}

/// The JSON-lines store.
pub struct Store {
    path: PathBuf,
    commit: String,
    records: Vec<Record>,
}

impl Store {
    /// The records of `commit` in `path` (none with `fresh`: they are then ignored, but
    /// kept in the file).
    pub fn open(path: &Path, commit: &str, fresh: bool) -> Result<Store> {
        let mut records = Vec::new();
        if path.exists() && !fresh {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Record>(&line) {
                    Ok(r) if r.commit == commit => {
                        // A key stored twice (a --fresh run): the later one counts.
                        records.retain(|o: &Record| o.key() != r.key());
                        records.push(r);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(line = n + 1, "{}: skipping: {e}", path.display()),
                }
            }
        }
        if fresh {
            tracing::info!("--fresh: stored runs of {commit} ignored (kept in the file)");
        }
        Ok(Store {
            path: path.to_owned(),
            commit: commit.to_owned(),
            records,
        })
    }

    fn has(&self, workload: &str, scenario: Scenario, tool: &str, repeat: usize) -> bool {
        self.records.iter().any(|r| {
            r.workload == workload
                && r.scenario == scenario.key()
                && r.tool == tool
                && r.repeat == repeat
        })
    }

    fn append(&mut self, record: Record) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        writeln!(file, "{}", serde_json::to_string(&record)?)?;
        self.records.retain(|r| r.key() != record.key());
        self.records.push(record);
        Ok(())
    }
}

/// `git rev-parse HEAD`, with "+dirty" when tracked files changed.
pub fn commit_key(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!("{head}{}", if dirty { "+dirty" } else { "" })
}

/// sha256 over the sorted `path sum` lines: equal digests, equal objects.
fn digest(objects: &BTreeMap<String, String>) -> String {
    let mut hasher = sha2::Sha256::new();
    for (path, sum) in objects {
        hasher.update(format!("{path} {sum}\n"));
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Median `time:NNNms` of the COMPILE_OK lines in a distccd log.
fn compile_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("COMPILE_OK"))
        .filter_map(|l| {
            let t = l.split("time:").nth(1)?;
            t.split("ms").next()?.trim().parse::<f64>().ok()
        })
        .collect()
}

/// distccd's overload rejections so far, from its stats page (port 3633).
fn rejections(worker: &Worker) -> Option<u64> {
    let mut stream = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from((worker.ip(), 3633)),
        Duration::from_secs(2),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    page.lines().find_map(|l| {
        l.strip_prefix("dcc_rej_overload ")
            .and_then(|v| v.trim().parse().ok())
    })
}

/// One builder: its budget, build tree, builderctl configuration and, for the second,
/// its network namespace.
struct Side {
    budget: CpuBudget,
    workload: Workload,
    config: BuilderConfig,
    netns: Option<BareHost>,
}

impl Side {
    /// The timed command of `tool` for this builder, inside its budget (and namespace).
    fn command(
        &self,
        tool: Tool,
        icecream: Option<&Icecream>,
        distcc_dir: &Path,
        hosts: &str,
    ) -> Result<Command> {
        let cmd = match tool {
            Tool::Raw => {
                let mut cmd = self.workload.command(MAKE_JOBS, "distcc");
                cmd.env("DISTCC_HOSTS", hosts).env("DISTCC_DIR", distcc_dir);
                cmd
            }
            Tool::Ours => {
                let inner = self.workload.command(MAKE_JOBS, "distcc");
                // The session's steering log (weighted slots, stragglers redone) outlives
                // the session: copied next to the run's DISTCC_DIR.
                let keep = format!(
                    "\"$@\"; rc=$?; cp \"$DISTCC_DIR/steering.log\" {} 2>/dev/null; exit $rc",
                    distcc_dir.join(STEERING_LOG).display()
                );
                let mut cmd = self
                    .config
                    .command(&["enter", "--", "sh", "-c", &keep, "sh"]);
                cmd.arg(inner.get_program());
                prefixed(cmd, &inner)
            }
            Tool::Icecc => {
                let ice = icecream.context("icecream is not set up")?;
                let mut cmd = self.workload.command(MAKE_JOBS, "icecc");
                ice.client_env(&mut cmd);
                if self.netns.is_some() {
                    // Its own namespaces, where its own iceccd's socket is.
                    return Ok(self.budget.wrap(&ice.second_client(&cmd)?));
                }
                cmd
            }
            Tool::User => bail!("case 9 has no user tool"),
        };
        let cmd = match &self.netns {
            Some(host) => prefixed(host.command(cmd.get_program()), &cmd),
            None => cmd,
        };
        Ok(self.budget.wrap(&cmd))
    }
}

/// The slow worker's budget lowered for a run, restored on drop.
struct Slowed<'a> {
    budget: &'a CpuBudget,
    normal: MilliCpus,
}

impl Drop for Slowed<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.budget.set(self.normal) {
            tracing::warn!("cannot restore the slow worker's budget: {e:#}");
        }
    }
}

/// Case 9.
pub fn miniature(bench: &mut Bench) -> Result<Section> {
    let budgets = Budgets {
        builder: bench.args.builder_cpus,
        worker: bench.args.worker_cpus,
        slow: bench.args.slow_cpus,
        builder2: bench.args.builder2_cpus,
    };
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let total = budgets.builder.cpus() + 3.0 * budgets.worker.cpus() + budgets.builder2.cpus();
    ensure!(
        total <= cores + 1e-9,
        "the budgets add up to {total} CPUs, more than the machine's {cores}: nodes would borrow time"
    );
    // The 2-core shared bed's workers go; w1-w3 boot again, each in its budget.
    let old = std::mem::take(&mut bench.workers);
    drop(old);
    let config = agent_config(&bench.bed, WORKER_JOBS);
    let mut workers = Vec::new();
    for name in ["w1", "w2", "w3"] {
        workers.push(
            bench
                .bed
                .boot_agent_worker(name, &bench.install, &config, |s| {
                    s.cpu_budget(budgets.worker)
                })?,
        );
    }
    bench.workers = workers;
    let bench = &*bench;

    let workloads: Vec<String> = bench
        .args
        .workloads
        .clone()
        .unwrap_or_else(|| vec!["kernel".to_owned(), "cxx".to_owned()]);
    let scenarios: Vec<Scenario> = match &bench.args.scenarios {
        Some(names) => names
            .iter()
            .map(|n| Scenario::parse(n))
            .collect::<Result<_>>()?,
        None => Scenario::ALL.to_vec(),
    };
    let mut tools = vec![Tool::Raw, Tool::Ours, Tool::Icecc];
    if let Some(only) = &bench.args.tools {
        tools.retain(|t| only.iter().any(|o| o == t.key()));
        ensure!(
            !tools.is_empty(),
            "--tools {only:?} selects none of raw, ours, icecc"
        );
    }
    let commit = commit_key(&bench.repo);
    let mut store = Store::open(&bench.args.store, &commit, bench.args.fresh)?;
    let limit = Duration::from_secs(bench.args.build_limit_secs);
    let workers: Vec<&Worker> = bench.workers.iter().collect();
    let victim = workers[2];
    let hosts: String = workers
        .iter()
        .map(|w| format!("{}/{WORKER_JOBS}", w.ip()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut icecream = if tools.contains(&Tool::Icecc) {
        Some(Icecream::start(bench)?)
    } else {
        None
    };
    let endpoints = Bench::endpoints(&workers);
    let knobs = builder_knobs(bench);
    let index = bench.bed.index();
    let side = |n: usize, workload: &str| -> Result<Side> {
        let (name, millis) = if n == 0 {
            (format!("dcctb{index}-builder"), budgets.builder)
        } else {
            (format!("dcctb{index}-builder2"), budgets.builder2)
        };
        let config = BuilderConfig::new(
            bench.tmp.path(),
            &format!("mini-{workload}-{n}"),
            &bench.builderctl,
            &endpoints,
        )?;
        config.append(&knobs)?;
        Ok(Side {
            budget: CpuBudget::create(&name, millis)?,
            workload: Workload::prepare(bench, workload, Path::new(BUILD_DIRS[n]))?,
            config,
            netns: if n == 0 {
                None
            } else {
                Some(bench.bed.add_bare_host("builder2")?)
            },
        })
    };
    if let Some(ice) = &icecream {
        // The builder's iceccd --no-remote is builder-side work: it joins the budget below.
        tracing::info!(pid = ice.builder_daemon_pid(), "icecream's builder daemon");
    }

    let mut serial = 0usize;
    for workload_name in &workloads {
        let mut sides = vec![side(0, workload_name)?];
        if scenarios.contains(&Scenario::Two) {
            sides.push(side(1, workload_name)?);
        }
        if let Some(ice) = &mut icecream {
            sides[0].budget.add_pid(ice.builder_daemon_pid())?;
            if let Some(builder2) = sides.get(1) {
                let host = builder2
                    .netns
                    .as_ref()
                    .context("the second builder has no namespace")?;
                builder2.budget.add_pid(ice.start_second_builder(host)?)?;
            }
        }
        let logs = bench.tmp.path().join("mini-logs");
        std::fs::create_dir_all(&logs)?;
        for repeat in 0..bench.args.build_repeats {
            // The local build at the builder's budget, once per repeat: the reference
            // objects and the speedup's denominator.
            if !store.has(workload_name, Scenario::Healthy, "local", repeat) {
                serial += 1;
                let s = &sides[0];
                s.workload.configure()?;
                let log = logs.join(format!("{serial:03}-local.log"));
                let cpu0 = s.budget.usage()?;
                let mut cmd = s.budget.wrap(&s.workload.command(2, ""));
                let (elapsed, finished) = timed_build(&mut cmd, &log, limit)?;
                let digest = finished
                    .then(|| s.workload.objects().map(|o| digest(&o)))
                    .transpose()?;
                let cpu = (s.budget.usage()? - cpu0).as_secs_f64();
                println!(
                    "case 9 {workload_name} local at {}: {:.1} s, builder CPU {cpu:.1} s",
                    budgets.builder,
                    elapsed.as_secs_f64()
                );
                store.append(Record {
                    commit: commit.clone(),
                    workload: workload_name.clone(),
                    scenario: Scenario::Healthy.key().to_owned(),
                    tool: "local".to_owned(),
                    repeat,
                    secs: finished.then_some(elapsed.as_secs_f64()),
                    secs2: None,
                    digest,
                    digest2: None,
                    per_worker: Vec::new(),
                    compile_ms: Vec::new(),
                    cpu_secs: BTreeMap::from([("builder".to_owned(), cpu)]),
                    rejections: None,
                    budgets: budgets.describe(),
                    at: unix_now(),
                })?;
            }
            let reference = store
                .records
                .iter()
                .find(|r| r.workload == *workload_name && r.tool == "local" && r.digest.is_some())
                .and_then(|r| r.digest.clone());
            for &scenario in &scenarios {
                for &tool in &tools {
                    if store.has(workload_name, scenario, tool.key(), repeat) {
                        tracing::info!(workload_name, ?scenario, ?tool, repeat, "stored, skipped");
                        continue;
                    }
                    serial += 1;
                    let builders = if scenario == Scenario::Two { 2 } else { 1 };
                    let mut cmds = Vec::new();
                    for (n, s) in sides.iter().enumerate().take(builders) {
                        s.workload.configure()?;
                        let dir = bench.tmp.path().join(format!("distcc-mini-{serial}-{n}"));
                        std::fs::create_dir_all(&dir)?;
                        cmds.push(s.command(tool, icecream.as_ref(), &dir, &hosts)?);
                    }
                    let since = unix_now();
                    let rej0: Option<u64> = workers.iter().map(|w| rejections(w)).sum();
                    let cpu0: Vec<Duration> = cpu_all(&sides, &workers)?;
                    let _slowed = if scenario == Scenario::Slow {
                        let budget = victim.cpu_budget().context("w3 has no budget")?;
                        budget.set(budgets.slow)?;
                        Some(Slowed {
                            budget,
                            normal: budgets.worker,
                        })
                    } else {
                        None
                    };
                    let _dead = (scenario == Scenario::Dead)
                        .then(|| LinkGuard::cut(victim, bench.bed.bridge()))
                        .transpose()?;
                    let outcomes = std::thread::scope(|scope| -> Result<Vec<(Duration, bool)>> {
                        let (stop, stopped) = std::sync::mpsc::channel::<()>();
                        let cutter = (scenario == Scenario::Lost).then(|| {
                            scope.spawn(move || -> Result<Option<LinkGuard<'_>>> {
                                match stopped.recv_timeout(LOSE_AFTER) {
                                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                        tracing::info!("cutting {}'s link", victim.name());
                                        Ok(Some(LinkGuard::cut(victim, bench.bed.bridge())?))
                                    }
                                    _ => Ok(None),
                                }
                            })
                        });
                        let builds: Vec<_> = cmds
                            .iter_mut()
                            .enumerate()
                            .map(|(n, cmd)| {
                                let log = logs.join(format!(
                                    "{serial:03}-{workload_name}-{tool:?}-{scenario:?}-{n}.log"
                                ));
                                scope.spawn(move || timed_build(cmd, &log, limit))
                            })
                            .collect();
                        let outcomes: Vec<Result<(Duration, bool)>> = builds
                            .into_iter()
                            .map(|b| {
                                b.join().unwrap_or_else(|_| {
                                    Err(anyhow::anyhow!("a build thread panicked"))
                                })
                            })
                            .collect();
                        let _ = stop.send(());
                        if let Some(cutter) = cutter {
                            let guard = cutter
                                .join()
                                .map_err(|_| anyhow::anyhow!("the link cutter panicked"))??;
                            drop(guard);
                        }
                        outcomes.into_iter().collect()
                    })?;
                    drop(_dead);
                    drop(_slowed);
                    let cpu1 = cpu_all(&sides, &workers)?;
                    if tool == Tool::Ours {
                        for s in sides.iter().take(builders) {
                            // A killed session leaves its workspace mounted.
                            let _ = s.config.command(&["leave"]).output();
                        }
                    }
                    let rej1: Option<u64> = workers.iter().map(|w| rejections(w)).sum();
                    let mut per_worker = Vec::new();
                    let mut compile_ms = Vec::new();
                    for w in &workers {
                        let log = distccd_log_since(w, since);
                        per_worker.push(log.matches("COMPILE_OK").count());
                        let times = compile_times(&log);
                        compile_ms.push((!times.is_empty()).then(|| median(&times)));
                    }
                    let mut digests = Vec::new();
                    for (s, (_, finished)) in sides.iter().zip(&outcomes) {
                        let d = if *finished {
                            Some(digest(&s.workload.objects()?))
                        } else {
                            None
                        };
                        if let (Some(d), Some(r)) = (&d, &reference)
                            && d != r
                        {
                            tracing::warn!(
                                workload_name,
                                ?scenario,
                                ?tool,
                                "objects differ from the local build's"
                            );
                        }
                        digests.push(d);
                    }
                    if scenario != Scenario::Healthy && scenario != Scenario::Two {
                        recover(victim, icecream.as_ref())?;
                    }
                    let names = ["builder", "builder2", "w1", "w2", "w3"];
                    let node_names: Vec<&str> = names[..sides.len()]
                        .iter()
                        .chain(&names[2..])
                        .copied()
                        .collect();
                    let cpu_secs: BTreeMap<String, f64> = node_names
                        .iter()
                        .zip(cpu0.iter().zip(&cpu1))
                        .map(|(n, (a, b))| ((*n).to_owned(), (*b - *a).as_secs_f64()))
                        .collect();
                    let secs = |n: usize| {
                        outcomes
                            .get(n)
                            .and_then(|(d, f)| f.then(|| d.as_secs_f64()))
                    };
                    let record = Record {
                        commit: commit.clone(),
                        workload: workload_name.clone(),
                        scenario: scenario.key().to_owned(),
                        tool: tool.key().to_owned(),
                        repeat,
                        secs: secs(0),
                        secs2: secs(1),
                        digest: digests.first().cloned().flatten(),
                        digest2: digests.get(1).cloned().flatten(),
                        per_worker,
                        compile_ms,
                        cpu_secs,
                        rejections: rej0.zip(rej1).map(|(a, b)| b.saturating_sub(a)),
                        budgets: budgets.describe(),
                        at: unix_now(),
                    };
                    println!("case 9 run: {}", verify_line(&record, reference.as_deref()));
                    if tool == Tool::Ours {
                        for n in 0..builders {
                            let log = bench
                                .tmp
                                .path()
                                .join(format!("distcc-mini-{serial}-{n}"))
                                .join(STEERING_LOG);
                            let text = std::fs::read_to_string(&log).unwrap_or_default();
                            let count =
                                |what: &str| text.lines().filter(|l| l.contains(what)).count();
                            println!(
                                "case 9 steering, builder {}: {} host-list entries changed (slots weighed), {} stragglers redone, {} slow cuts ({})",
                                n + 1,
                                count(": in, "),
                                count("straggler:"),
                                count(": slow: "),
                                log.display()
                            );
                        }
                    }
                    store.append(record)?;
                }
            }
        }
    }
    if let Some(ice) = icecream {
        ice.stop();
    }
    Ok(render(
        bench, &store, &budgets, &workloads, &scenarios, limit,
    ))
}

/// cpuacct of every node: the builders', then w1-w3's.
fn cpu_all(sides: &[Side], workers: &[&Worker]) -> Result<Vec<Duration>> {
    let mut v = Vec::new();
    for s in sides {
        v.push(s.budget.usage()?);
    }
    for w in workers {
        v.push(w.cpu_budget().context("a worker without budget")?.usage()?);
    }
    Ok(v)
}

/// The per-run verification line: time(s), objects, compiles and their median time per
/// worker, each node's CPU.
fn verify_line(r: &Record, reference: Option<&str>) -> String {
    let t = |s: Option<f64>| s.map_or("did not finish".to_owned(), |s| format!("{s:.1} s"));
    let objects = match (&r.digest, reference) {
        (Some(d), Some(rf)) if d == rf => "objects = local",
        (Some(_), Some(_)) => "OBJECTS DIFFER from local",
        _ => "objects not compared",
    };
    let ms: Vec<String> = r
        .compile_ms
        .iter()
        .map(|m| m.map_or("-".to_owned(), |m| format!("{m:.0}")))
        .collect();
    let cpu: Vec<String> = r
        .cpu_secs
        .iter()
        .map(|(n, s)| format!("{n} {s:.1}"))
        .collect();
    let slow = slow_ratio(r).map_or(String::new(), |x| format!(", w3/peers per compile {x:.1}x"));
    format!(
        "{} {} {} #{}: {}{}, {objects}, compiles {:?}, median ms {}{slow}, CPU s {}{}",
        r.workload,
        r.scenario,
        r.tool,
        r.repeat,
        t(r.secs),
        r.secs2
            .map_or(String::new(), |s| format!(" / builder2 {s:.1} s")),
        r.per_worker,
        ms.join("/"),
        cpu.join(", "),
        r.rejections
            .map_or(String::new(), |n| format!(", overload rejections {n}")),
    )
}

/// Median compile time on w3 over its peers' (the slow worker's emulation).
fn slow_ratio(r: &Record) -> Option<f64> {
    let slow = (*r.compile_ms.get(2)?)?;
    let peers: Vec<f64> = r.compile_ms.iter().take(2).flatten().copied().collect();
    (!peers.is_empty()).then(|| slow / median(&peers))
}

/// The tables, from every stored run of this commit.
fn render(
    bench: &Bench,
    store: &Store,
    budgets: &Budgets,
    workloads: &[String],
    scenarios: &[Scenario],
    limit: Duration,
) -> Section {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Case 9: a cluster in miniature, every node with its own CPU budget ({})\n",
        budgets.describe()
    );
    let _ = writeln!(md, "{}\n", run_stamp(bench));
    let runs = |w: &str, s: Scenario, t: &str| -> Vec<&Record> {
        let mut v: Vec<&Record> = store
            .records
            .iter()
            .filter(|r| r.workload == w && r.scenario == s.key() && r.tool == t)
            .collect();
        v.sort_by_key(|r| r.repeat);
        v
    };
    let secs_of = |r: &Record, s: Scenario| -> Option<f64> {
        if s == Scenario::Two {
            let (a, b) = (r.secs?, r.secs2?);
            Some(a.max(b) / a.min(b))
        } else {
            r.secs
        }
    };
    let med = |w: &str, s: Scenario, t: &str| -> Option<f64> {
        let v = runs(w, s, t);
        let secs: Vec<f64> = v.iter().filter_map(|r| secs_of(r, s)).collect();
        (!secs.is_empty() && secs.len() == v.len()).then(|| median(&secs))
    };
    // a / b within each repeat where both finished.
    let paired = |w: &str, a: (Scenario, &str), b: (Scenario, &str)| -> Option<f64> {
        let bs = runs(w, b.0, b.1);
        let ratios: Vec<f64> = runs(w, a.0, a.1)
            .iter()
            .filter_map(|ra| {
                let rb = bs.iter().find(|rb| rb.repeat == ra.repeat)?;
                Some(ra.secs? / rb.secs?)
            })
            .collect();
        (!ratios.is_empty()).then(|| median(&ratios))
    };
    let cell = |w: &str, s: Scenario, t: &str| -> String {
        let v = runs(w, s, t);
        if v.is_empty() {
            return "not run".to_owned();
        }
        let all: Vec<String> = v
            .iter()
            .map(|r| match (s, r.secs, r.secs2) {
                (Scenario::Two, Some(a), Some(b)) => format!("{a:.0}+{b:.0}"),
                (_, Some(a), _) => format!("{a:.0}"),
                _ => "killed".to_owned(),
            })
            .collect();
        match med(w, s, t) {
            Some(m) if s == Scenario::Two => format!("**{m:.2}** ({})", all.join(", ")),
            Some(m) => format!("**{m:.1} s** ({})", all.join(", ")),
            None => format!(
                "did not finish in {} s ({})",
                limit.as_secs(),
                all.join(", ")
            ),
        }
    };
    let verdict = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "",
    };
    let r2 = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{x:.2}"));
    let mut mismatches = Vec::new();
    for w in workloads {
        let _ = writeln!(md, "#### {}\n", Workload::label(w));
        let _ = writeln!(
            md,
            "| scenario | raw distcc | icecream | builderctl enter | ours / raw | ours / icecream | target | |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |");
        for &s in scenarios {
            let (vs_raw, vs_ice) = if s == Scenario::Two {
                (None, None)
            } else {
                (
                    paired(w, (s, "ours"), (s, "raw")),
                    paired(w, (s, "ours"), (s, "icecc")),
                )
            };
            let (target, met) = match s {
                Scenario::Healthy => (
                    "ours / raw <= 1.00; ours / icecream <= 1.00 (aim 0.90)",
                    vs_raw
                        .map(|r| r <= 1.0)
                        .zip(vs_ice.map(|r| r <= 1.0))
                        .map(|(a, b)| a && b),
                ),
                Scenario::Slow => (
                    "ours / raw <= 0.80; ours / icecream <= 1.00",
                    vs_raw
                        .map(|r| r <= 0.8)
                        .zip(vs_ice.map(|r| r <= 1.0))
                        .map(|(a, b)| a && b),
                ),
                Scenario::Lost => {
                    let lh = paired(w, (Scenario::Lost, "ours"), (Scenario::Healthy, "ours"));
                    (
                        "ours lost / ours healthy <= 1.10; ours / icecream <= 1.00",
                        lh.map(|r| r <= 1.10)
                            .zip(vs_ice.map(|r| r <= 1.0))
                            .map(|(a, b)| a && b),
                    )
                }
                Scenario::Dead => ("ours / icecream <= 1.00", vs_ice.map(|r| r <= 1.0)),
                Scenario::Two => (
                    "max / min <= 1.3 (ours)",
                    med(w, s, "ours").map(|r| r <= 1.3),
                ),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {target} | {} |",
                s.label(budgets),
                cell(w, s, "raw"),
                cell(w, s, "icecc"),
                cell(w, s, "ours"),
                r2(vs_raw),
                r2(vs_ice),
                verdict(met)
            );
        }
        if scenarios.contains(&Scenario::Lost) {
            let lh = paired(w, (Scenario::Lost, "ours"), (Scenario::Healthy, "ours"));
            let _ = writeln!(
                md,
                "| ours lost / ours healthy (paired) | | | {} | | | <= 1.10 | {} |",
                r2(lh),
                verdict(lh.map(|r| r <= 1.10))
            );
        }
        let local = med(w, Scenario::Healthy, "local");
        let _ = writeln!(
            md,
            "| reference: local `make -j2` at the builder's {} CPU | | | {} | | | | |\n",
            budgets.builder.cpus(),
            local.map_or("not run".to_owned(), |l| format!("{l:.1} s"))
        );
        // Verification and the speedup.
        let raw_h = med(w, Scenario::Healthy, "raw");
        let ours_h = med(w, Scenario::Healthy, "ours");
        let emul = local.zip(raw_h).map(|(l, r)| l / r);
        let ideal = budgets.ideal_speedup();
        let speed = local.zip(ours_h).map(|(l, o)| l / o);
        // Builder-only work (cpp, links, the clients): the builder's CPU in the healthy
        // distributed build over its CPU in the local build (all the work).
        let builder_cpu = |t: &str| {
            let v: Vec<f64> = runs(w, Scenario::Healthy, t)
                .iter()
                .filter_map(|r| r.cpu_secs.get("builder").copied())
                .collect();
            (!v.is_empty()).then(|| median(&v))
        };
        let serial_share = builder_cpu("ours")
            .zip(builder_cpu("local"))
            .map(|(d, l)| d / l);
        let amdahl = serial_share.map(|f| 1.0 / (f + (1.0 - f) / ideal));
        let slow: Vec<f64> = runs(w, Scenario::Slow, "raw")
            .iter()
            .chain(&runs(w, Scenario::Slow, "ours"))
            .filter_map(|r| slow_ratio(r))
            .collect();
        let slow = (!slow.is_empty()).then(|| median(&slow));
        let notes = [
            format!(
                "Emulation check (a): local build at the builder's budget / healthy raw distcc = {} (must be >= 2): {}.",
                r2(emul),
                verdict(emul.map(|e| e >= 2.0))
            ),
            format!(
                "Emulation check (b): median compile time on the slow w3 / its peers' (distccd's `time:NNNms`, slow runs of raw and ours) = {} (must be >= 4): {}.",
                r2(slow),
                verdict(slow.map(|s| s >= 4.0))
            ),
            format!(
                "Speedup of the healthy `builderctl enter` build over local: {} of the ideal {ideal:.1} (total budget / builder's) = {} (target >= 60 %: {}); less the builder-only work ({} of the builder's local CPU time still ran on the builder, its cpuacct), the ideal is {}.",
                r2(speed),
                speed.map_or("n/a".to_owned(), |s| format!("{:.0} %", 100.0 * s / ideal)),
                verdict(speed.map(|s| s / ideal >= 0.6)),
                serial_share.map_or("n/a".to_owned(), |f| format!("{:.0} %", 100.0 * f)),
                r2(amdahl)
            ),
        ];
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        let reference = runs(w, Scenario::Healthy, "local")
            .iter()
            .find_map(|r| r.digest.clone());
        for r in store
            .records
            .iter()
            .filter(|r| r.workload == *w && r.tool != "local")
        {
            for d in [&r.digest, &r.digest2].into_iter().flatten() {
                if reference.as_ref().is_some_and(|rf| rf != d) {
                    mismatches.push(format!("{w} {} {} #{}", r.scenario, r.tool, r.repeat));
                }
            }
        }
        let cpu: Vec<String> = ["raw", "ours", "icecc"]
            .iter()
            .filter_map(|t| {
                let r = runs(w, Scenario::Healthy, t).into_iter().next_back()?;
                let parts: Vec<String> = r
                    .cpu_secs
                    .iter()
                    .map(|(n, s)| format!("{n} {s:.0}"))
                    .collect();
                Some(format!("{t}: {}", parts.join(", ")))
            })
            .collect();
        if !cpu.is_empty() {
            let _ = writeln!(
                md,
                "- CPU seconds per node (cpuacct), last healthy run: {}.",
                cpu.join("; ")
            );
        }
        let rej: Vec<String> = runs(w, Scenario::Two, "ours")
            .iter()
            .chain(&runs(w, Scenario::Two, "raw"))
            .map(|r| {
                format!(
                    "{} #{}: {}",
                    r.tool,
                    r.repeat,
                    r.rejections.map_or("n/a".to_owned(), |n| n.to_string())
                )
            })
            .collect();
        if !rej.is_empty() {
            let _ = writeln!(
                md,
                "- Two builders: workers' overload rejections (distccd's `dcc_rej_overload`): {}.",
                rej.join(", ")
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "- Paired runs: each repeat runs every tool on a scenario back to back; medians, ratios are medians of each repeat's ratio. Runs come from the store ({}), every stored run of commit {}; a run past {} s is killed.",
        store.path.display(),
        store.commit,
        limit.as_secs()
    );
    let _ = writeln!(
        md,
        "- Budgets are host cgroups (v1 `cpu` quota per 100 ms + `cpuacct`): the builder's holds the timed command (make, cpp, distcc/icecc clients, local compiles, links, `builderctl enter`) and icecream's builder `iceccd --no-remote`; each worker's its whole container. `make -j{MAKE_JOBS}`, distccd `--jobs {WORKER_JOBS}`, raw `DISTCC_HOSTS` `w1/{WORKER_JOBS} w2/{WORKER_JOBS} w3/{WORKER_JOBS}`. Two builders with icecream: the second builder's `iceccd --no-remote` runs in its network namespace and a private mount namespace with its own /run/icecc (where the client finds its daemon), in its budget."
    );
    let _ = writeln!(
        md,
        "- Correctness: {}",
        if mismatches.is_empty() {
            "every finished build's objects match the local build's (debug sections stripped, banner objects left out, as in case 5), or no local build is stored to compare with.".to_owned()
        } else {
            format!(
                "**objects differ from the local build's** in {}",
                mismatches.join(", ")
            )
        }
    );
    Section { markdown: md }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_times_come_from_compile_ok_lines() {
        let log = "distccd[1] (dcc_job_summary) client: 1.2.3.4:5 COMPILE_OK exit:0 sig:0 core:0 ret:0 time:120ms gcc a.c\n\
                   distccd[1] (dcc_job_summary) client: 1.2.3.4:5 COMPILE_ERROR exit:1 time:5ms gcc b.c\n\
                   distccd[1] (dcc_job_summary) client: 1.2.3.4:5 COMPILE_OK exit:0 sig:0 core:0 ret:0 time:80ms gcc c.c\n";
        assert_eq!(compile_times(log), [120.0, 80.0]);
    }

    #[test]
    fn the_store_skips_stored_runs_of_the_same_commit_only() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.jsonl");
        let record = |commit: &str, repeat| Record {
            commit: commit.to_owned(),
            workload: "kernel".to_owned(),
            scenario: "healthy".to_owned(),
            tool: "ours".to_owned(),
            repeat,
            secs: Some(10.0),
            secs2: None,
            digest: None,
            digest2: None,
            per_worker: vec![1, 2, 3],
            compile_ms: vec![Some(1.0), None, Some(2.0)],
            cpu_secs: BTreeMap::new(),
            rejections: None,
            budgets: String::new(),
            at: 0,
        };
        let mut store = Store::open(&path, "a", false)?;
        store.append(record("a", 0))?;
        let mut other = Store::open(&path, "b", false)?;
        other.append(record("b", 1))?;
        let again = Store::open(&path, "a", false)?;
        assert!(again.has("kernel", Scenario::Healthy, "ours", 0));
        assert!(
            !again.has("kernel", Scenario::Healthy, "ours", 1),
            "b's run is not a's"
        );
        assert!(!again.has("kernel", Scenario::Healthy, "raw", 0));
        let fresh = Store::open(&path, "a", true)?;
        assert!(!fresh.has("kernel", Scenario::Healthy, "ours", 0));
        Ok(())
    }
}
