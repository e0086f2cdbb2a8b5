//! `distcc-bench`: the benchmark suite of issue 5. Boots a test-bed cluster (real systemd
//! containers running the real agent), runs each case side by side with its baseline
//! (A B A B ...), and writes a table of medians and ratios per case into
//! docs/BENCHMARKS.md, between `<!-- bench:caseN:begin -->` and `<!-- bench:caseN:end -->`.
//!
//! Run it through `bench/run` (root): that script installs Ansible, builds the release
//! binaries and passes its arguments here. Not run by CI.

mod builds;
mod cases;
mod doc;
mod icecream;
mod miniature;
mod run;
mod user_node;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use distcc_testbed::{AgentInstall, MilliCpus, Rootfs, Testbed, Worker, agent_config};

/// Extra packages the workers need for the Ansible baseline (case 1).
const SSH_PACKAGES: &[&str] = &["openssh-server", "python3"];

/// Benchmark cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Case {
    /// 1: builderctl status/reset against ansible-playbook over SSH.
    Fleet,
    /// 2: builderctl status against 3, 10 and 30 workers.
    Fanout,
    /// 3: builderctl enter -- true time-to-prompt.
    Enter,
    /// 4: agent idle RSS/CPU and Status RPC latency/throughput.
    Footprint,
    /// 5: kernel builds, raw distcc against builderctl enter.
    Builds,
    /// 6: the same builds with icecream as the peer.
    Icecream,
    /// 7: Status latency and agent CPU under a connection flood, against idle.
    Flood,
    /// 8: kernel builds by an ordinary user on a build node (through the daemon), healthy
    /// and with a worker lost, beside root's `builderctl enter` on the host.
    UserBuilds,
    /// 9: a cluster in miniature: every node with its own CPU budget, kernel and C++
    /// builds, raw distcc / icecream / builderctl enter, five scenarios, resumable.
    Miniature,
}

impl Case {
    fn from_number(n: u32) -> Result<Case> {
        Ok(match n {
            1 => Case::Fleet,
            2 => Case::Fanout,
            3 => Case::Enter,
            4 => Case::Footprint,
            5 => Case::Builds,
            6 => Case::Icecream,
            7 => Case::Flood,
            8 => Case::UserBuilds,
            9 => Case::Miniature,
            _ => bail!("no case {n}: cases are 1-9"),
        })
    }

    pub fn number(self) -> u32 {
        match self {
            Case::Fleet => 1,
            Case::Fanout => 2,
            Case::Enter => 3,
            Case::Footprint => 4,
            Case::Builds => 5,
            Case::Icecream => 6,
            Case::Flood => 7,
            Case::UserBuilds => 8,
            Case::Miniature => 9,
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "The distcc cluster benchmark suite (issue 5). Needs root; use bench/run.")]
pub struct Args {
    /// Cases to run, comma-separated: 1 fleet vs Ansible, 2 fan-out, 3 enter, 4 agent
    /// footprint, 7 Status under a connection flood (about 14 minutes together); 5 kernel
    /// builds vs raw distcc, 6 vs icecream (about 75 minutes together); 8 kernel builds
    /// by an ordinary user on a build node, beside root's (about 25 minutes).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,7")]
    pub cases: Vec<u32>,
    /// Paired repeats of every build of cases 5 and 6.
    #[arg(long, default_value_t = 3)]
    pub build_repeats: usize,
    /// A build still running after this many seconds is killed and not repeated.
    #[arg(long, default_value_t = 600)]
    pub build_limit_secs: u64,
    /// Scenarios of cases 5, 6 and 8, comma-separated (default all: healthy,dead,slow,lost;
    /// healthy,lost when case 8 runs without 5 and 6).
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Option<Vec<String>>,
    /// Run the local `make -j2` reference once per repeat (its vmlinux is the one every
    /// build must reproduce).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub local_reference: bool,
    /// Tools of cases 5, 6 and 8, comma-separated (default all: raw, ours, icecc, user;
    /// icecc only with case 6, user only with case 8).
    #[arg(long, value_delimiter = ',')]
    pub tools: Option<Vec<String>>,
    /// `local_slots` of the builderctl configuration in cases 5 and 6 (default: the
    /// builder's own default, 2).
    #[arg(long)]
    pub local_slots: Option<u32>,
    /// `lzo` of the builderctl configuration in cases 5 and 6 (default: the builder's
    /// own default).
    #[arg(long)]
    pub lzo: Option<bool>,
    /// Pairs of runs for the fast cases (2, 3 and the RPC rounds of 4).
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Pairs of runs for the slow case (1: every Ansible run takes seconds).
    #[arg(long, default_value_t = 5)]
    pub slow_repeats: usize,
    /// Idle window of case 4, in seconds.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
    /// Sequential RPCs per latency round of case 4.
    #[arg(long, default_value_t = 1000)]
    pub rpc_count: usize,
    /// Workers of the largest fan-out of case 2 (at most 200).
    #[arg(long, default_value_t = 30)]
    pub max_workers: usize,
    /// The builderctl binary (default: target/release/builderctl, else target/debug).
    #[arg(long)]
    pub builderctl: Option<PathBuf>,
    /// Case 9: workloads, comma-separated (default kernel,cxx).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Option<Vec<String>>,
    /// Case 9: the builder's CPU budget (CPUs, or millicpus with an m: 400m).
    #[arg(long, default_value = "0.4")]
    pub builder_cpus: MilliCpus,
    /// Case 9: each worker's CPU budget (w1, w2, w3).
    #[arg(long, default_value = "0.4")]
    pub worker_cpus: MilliCpus,
    /// Case 9: the slow worker's budget in the slow scenario (w3; restored after).
    #[arg(long, default_value = "0.08")]
    pub slow_cpus: MilliCpus,
    /// Case 9: the second builder's budget (two-builders scenario).
    #[arg(long, default_value = "0.4")]
    pub builder2_cpus: MilliCpus,
    /// Case 9: the store of finished runs (JSON lines); runs stored for this commit are
    /// skipped and every stored run of it goes into the tables.
    #[arg(long, default_value = "/var/cache/distcc-testbed/bench-case9.jsonl")]
    pub store: PathBuf,
    /// Case 9: ignore the stored runs (they stay in the file).
    #[arg(long)]
    pub fresh: bool,
    /// The document to write the tables into.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub doc: PathBuf,
    /// Print the tables only; leave the document alone.
    #[arg(long)]
    pub no_write: bool,
}

/// Everything the cases share: the test-bed, its first three workers, the binaries.
pub struct Bench {
    pub args: Args,
    pub repo: PathBuf,
    pub builderctl: PathBuf,
    pub install: AgentInstall,
    pub bed: Testbed,
    /// w1, w2, w3; case 2 boots more into `extra`.
    pub workers: Vec<Worker>,
    pub extra: Vec<Worker>,
    pub with_ssh: bool,
    pub tmp: tempfile::TempDir,
}

impl Bench {
    /// `host:3634` of each worker.
    pub fn endpoints(workers: &[&Worker]) -> Vec<String> {
        workers
            .iter()
            .map(|w| format!("{}:{}", w.ip(), distcc_testbed::AGENT_PORT))
            .collect()
    }

    /// Boot workers `names` in parallel (at most `parallel` at a time), agent running.
    pub fn boot(&self, names: &[String], parallel: usize) -> Result<Vec<Worker>> {
        let config = agent_config(&self.bed, 3);
        let mut booted = Vec::new();
        for chunk in names.chunks(parallel.max(1)) {
            let results: Vec<Result<Worker>> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|name| {
                        let (config, install, bed) = (&config, &self.install, &self.bed);
                        scope.spawn(move || bed.boot_agent_worker(name, install, config, |s| s))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("a boot thread panicked")))
                    })
                    .collect()
            });
            for r in results {
                booted.push(r?);
            }
        }
        Ok(booted)
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn find_builderctl(repo: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    ["release", "debug"]
        .iter()
        .map(|profile| repo.join("target").join(profile).join("builderctl"))
        .find(|p| p.is_file())
        .context(
            "no target/{release,debug}/builderctl: run `cargo build --release -p distcc-builder`",
        )
}

/// Prints a case's section and, unless `--no-write`, puts it into the document.
fn publish(bench: &Bench, case: Case, section: &cases::Section) -> Result<()> {
    println!("{}", section.markdown);
    if !bench.args.no_write {
        let path = bench.repo.join(&bench.args.doc);
        doc::replace_section(&path, case.number(), &section.markdown)?;
        tracing::info!(doc = %path.display(), case = case.number(), "table written");
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cases = args
        .cases
        .iter()
        .map(|n| Case::from_number(*n))
        .collect::<Result<Vec<_>>>()?;
    cases.sort();
    cases.dedup();
    anyhow::ensure!(
        (3..=200).contains(&args.max_workers),
        "--max-workers must be 3..=200"
    );
    anyhow::ensure!(
        args.repeats >= 3 && args.slow_repeats >= 3 && args.build_repeats >= 1,
        "at least 3 repeats"
    );

    let repo = repo_root().canonicalize()?;
    let builderctl = find_builderctl(&repo, args.builderctl.as_deref())?;
    let install = AgentInstall::from_workspace(&repo)?;
    // sshd is case 1's transport and case 4's baseline (the daemon the Ansible way needs
    // on every worker).
    let with_ssh = cases.contains(&Case::Fleet) || cases.contains(&Case::Footprint);
    let mut packages: Vec<&str> = Vec::new();
    if with_ssh {
        packages.extend(SSH_PACKAGES);
    }
    if cases.contains(&Case::Icecream) || cases.contains(&Case::Miniature) {
        packages.push("icecc");
    }
    // Case 8 builds the kernel inside the build node container.
    if cases.contains(&Case::UserBuilds) {
        packages.extend(builds::KERNEL_BUILD_PACKAGES);
    }
    let rootfs = if packages.is_empty() {
        Rootfs::ensure()?
    } else {
        Rootfs::ensure_with(&packages)?
    };
    tracing::info!(rootfs = %rootfs.path().display(), builderctl = %builderctl.display(),
        agent = %install.binary.display(), "booting the test-bed");
    let bed = Testbed::with_rootfs(rootfs)?;
    let mut bench = Bench {
        args,
        repo,
        builderctl,
        install,
        bed,
        workers: Vec::new(),
        extra: Vec::new(),
        with_ssh,
        tmp: tempfile::Builder::new().prefix("distcc-bench-").tempdir()?,
    };
    let names: Vec<String> = (1..=3).map(|i| format!("w{i}")).collect();
    bench.workers = bench.boot(&names, 3)?;

    // Quietest first: the idle footprint before anything else has run, the fan-out with
    // its 27 extra containers last.
    let order = [
        Case::Footprint,
        Case::Enter,
        Case::Fleet,
        Case::Flood,
        Case::Fanout,
    ];
    for case in order.into_iter().filter(|c| cases.contains(c)) {
        tracing::info!(case = case.number(), "running");
        let section = match case {
            Case::Footprint => cases::footprint(&bench),
            Case::Enter => cases::enter(&bench),
            Case::Fleet => cases::fleet(&bench),
            Case::Fanout => cases::fanout(&mut bench),
            Case::Flood => cases::flood(&bench),
            Case::Builds | Case::Icecream | Case::UserBuilds | Case::Miniature => {
                unreachable!("run below")
            }
        }
        .with_context(|| format!("case {}", case.number()))?;
        publish(&bench, case, &section)?;
    }
    // The builds last, on a quiet machine: the fan-out's extra workers go first.
    let extra = std::mem::take(&mut bench.extra);
    drop(extra);
    let build_cases: Vec<Case> = cases
        .iter()
        .copied()
        .filter(|c| matches!(c, Case::Builds | Case::Icecream | Case::UserBuilds))
        .collect();
    if !build_cases.is_empty() {
        tracing::info!(cases = ?build_cases, "running the builds");
        for (case, section) in builds::builds(&bench, &build_cases).context("the build cases")? {
            publish(&bench, case, &section)?;
        }
    }
    // Last: it boots w1-w3 again, each in its CPU budget.
    if cases.contains(&Case::Miniature) {
        tracing::info!("running case 9, the cluster in miniature");
        let section = miniature::miniature(&mut bench).context("case 9")?;
        publish(&bench, Case::Miniature, &section)?;
    }
    let workers = std::mem::take(&mut bench.workers);
    drop(workers);
    bench.bed.shutdown()?;
    Ok(())
}
