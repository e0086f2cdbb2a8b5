//! `builderctl`: builder mode and cluster operations.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use distcc_builder::cluster::{Probe, WorkerView, host_list, probe_all, view};
use distcc_builder::config::{BuilderConfig, DEFAULT_CONFIG_PATH};
use distcc_builder::host_list::{HostList, LocalCompiler, Policy, write_atomically};
use distcc_builder::ops::{self, Operation};
use distcc_builder::session::{self, LocalFacts, SESSION_VAR};
use distcc_builder::steer::{self, SteeringConfig};
use distcc_builder::{local, state_files, workspace};

#[derive(Parser)]
#[command(
    version,
    about = "Builder mode and cluster operations for a distcc cluster"
)]
struct Options {
    /// The builder's configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Include workers whose compilers differ from this builder's.
    #[arg(long, global = true)]
    allow_mismatch: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One row per worker: reachable, distccd state, slots, load, compiles, and why a
    /// worker is left out of the host list. Exit status 0 only when every worker is usable.
    Status {
        /// Print the stable JSON form (`{"workers": [...]}`).
        #[arg(long)]
        json: bool,
        /// Refresh every 2 seconds until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// The host list this builder would use, and why each worker is in or out.
    Hosts {
        #[arg(long)]
        json: bool,
    },
    /// Print the session environment as `export` lines, for `eval` in scripts; writes the
    /// hosts file to DISTCC_DIR.
    Env {
        /// Where the hosts file goes (default: $DISTCC_DIR, else /tmp/builderctl-env-UID).
        #[arg(long)]
        distcc_dir: Option<PathBuf>,
    },
    /// The builder's checklist: distcc, masquerade links, compilers, workspace, workers.
    Preflight,
    /// Builder mode: preflight, tmpfs workspace, hosts file, then a shell (or COMMAND)
    /// in the workspace while the hosts file follows the workers live.
    Enter {
        /// Unmount the workspace afterwards if nothing else uses it.
        #[arg(long)]
        leave: bool,
        /// Run this instead of $SHELL and exit with its status.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Unmount the workspace, only when no session or process uses it.
    Leave,
    /// The agents' checks plus the builder's (distcc port, allowlist, compilers).
    Validate {
        #[arg(long)]
        json: bool,
    },
    /// A real compile on each worker through distcc, proven by its statistics.
    Smoketest {
        #[arg(long)]
        json: bool,
    },
    /// Reset distccd (stop, clear its TMPDIR, reset-failed, start) on the workers.
    Reset {
        /// Endpoints or hosts; all workers when none.
        workers: Vec<String>,
        /// One worker at a time, stopping at the first failure.
        #[arg(long)]
        rolling: bool,
        #[arg(long)]
        json: bool,
    },
    /// Enable distccd at boot and start it on the workers.
    Bootstrap {
        workers: Vec<String>,
        #[arg(long)]
        rolling: bool,
        #[arg(long)]
        json: bool,
    },
    /// Keep a hosts file (default /etc/distcc/hosts) fresh from live worker status, for
    /// builds that never enter builder mode (`distcc-builder.service`, Type=notify).
    Daemon {
        #[arg(long, default_value = "/etc/distcc/hosts")]
        hosts_file: PathBuf,
    },
    /// Live job distribution from the session's DISTCC_DIR/state files, plus each
    /// worker's load, refreshed every second.
    Monitor {
        /// The session's DISTCC_DIR (default: $DISTCC_DIR, else ~/.distcc).
        #[arg(long)]
        distcc_dir: Option<PathBuf>,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    match run(Options::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("builderctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn exit_for(all_fine: bool) -> ExitCode {
    if all_fine {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What several commands need: the configuration, the local compilers, the policy.
struct Context_ {
    config: BuilderConfig,
    policy: Policy,
}

impl Context_ {
    fn local_compilers(&self) -> anyhow::Result<Vec<LocalCompiler>> {
        self.config
            .compilers
            .iter()
            .map(|name| {
                local::describe(name).with_context(|| format!("describing the local {name}"))
            })
            .collect()
    }

    async fn survey(&self, local: &[LocalCompiler]) -> (Vec<Probe>, HostList) {
        let probes = probe_all(
            &self.config.workers,
            &self.config.token,
            self.config.deadline,
        )
        .await;
        let list = host_list(&probes, local, &self.policy);
        (probes, list)
    }
}

fn views(probes: &[Probe], list: &HostList) -> Vec<WorkerView> {
    probes
        .iter()
        .map(|p| view(p, list.verdict(&p.endpoint)))
        .collect()
}

fn run(options: Options) -> anyhow::Result<ExitCode> {
    let config = BuilderConfig::load(&options.config)?;
    let policy = Policy {
        allow_mismatch: options.allow_mismatch || config.allow_mismatch,
        local_slots: config.local_slots,
    };
    let cx = Context_ { config, policy };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match options.command {
        Command::Status { json, watch } => runtime.block_on(status(&cx, json, watch)),
        Command::Hosts { json } => runtime.block_on(hosts(&cx, json)),
        Command::Env { distcc_dir } => runtime.block_on(env(&cx, distcc_dir)),
        Command::Preflight => runtime.block_on(async {
            let (checks, _, _, _) = preflight(&cx).await;
            print!("{}", session::render_checklist(&checks));
            Ok(exit_for(checks.iter().all(|c| c.passed)))
        }),
        Command::Enter { leave, command } => runtime.block_on(enter(&cx, leave, command)),
        Command::Leave => {
            workspace::leave(&cx.config.workspace)?;
            println!("unmounted {}", cx.config.workspace.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { json } => runtime.block_on(validate(&cx, json)),
        Command::Smoketest { json } => runtime.block_on(smoketest(&cx, json)),
        Command::Reset {
            workers,
            rolling,
            json,
        } => runtime.block_on(control(&cx, Operation::Reset, &workers, rolling, json)),
        Command::Bootstrap {
            workers,
            rolling,
            json,
        } => runtime.block_on(control(&cx, Operation::Bootstrap, &workers, rolling, json)),
        Command::Monitor { distcc_dir, once } => runtime.block_on(monitor(&cx, distcc_dir, once)),
        Command::Daemon { hosts_file } => runtime.block_on(daemon(&cx, hosts_file)),
    }
}

async fn status(cx: &Context_, json: bool, watch: bool) -> anyhow::Result<ExitCode> {
    // Compilers are compared only when they can be described; status must work on a
    // builder without them, so a failure here just leaves the comparison out.
    let local = cx.local_compilers().unwrap_or_default();
    loop {
        let (probes, list) = cx.survey(&local).await;
        let workers = views(&probes, &list);
        if watch && std::io::stdout().is_terminal() {
            print!("\x1b[H\x1b[2J");
        }
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "workers": workers }))?
            );
        } else {
            print_status(&workers);
        }
        if !watch {
            return Ok(exit_for(
                workers.iter().all(|w| w.excluded_reason.is_none()),
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn print_status(workers: &[WorkerView]) {
    println!(
        "{:<22} {:<12} {:<9} {:<10} {:>7} {:>6} {:>13} {:>7}  {:<8} EXCLUDED",
        "WORKER", "HOST", "REACHABLE", "DISTCCD", "SLOTS", "LOAD", "OK/ERR", "RPC ms", "AGENT"
    );
    for w in workers {
        let slots = match (w.jobs_running, w.max_slots) {
            (Some(r), Some(m)) => format!("{r}/{m}"),
            _ => w.slots.to_string(),
        };
        let compiles = match (w.compile_ok, w.compile_error) {
            (Some(ok), Some(err)) => format!("{ok}/{err}"),
            _ => "-".to_owned(),
        };
        println!(
            "{:<22} {:<12} {:<9} {:<10} {:>7} {:>6} {:>13} {:>7.1}  {:<8} {}",
            w.endpoint,
            w.hostname.as_deref().unwrap_or("-"),
            if w.reachable { "yes" } else { "no" },
            w.distccd_state.as_deref().unwrap_or("-"),
            slots,
            w.load1.map_or("-".to_owned(), |l| format!("{l:.2}")),
            compiles,
            w.rpc_latency_ms,
            w.agent_version.as_deref().unwrap_or("-"),
            w.excluded_reason.as_deref().unwrap_or("-"),
        );
        if !w.compilers.is_empty() {
            println!("{:<22} {}", "", w.compilers.join("; "));
        }
    }
}

async fn hosts(cx: &Context_, json: bool) -> anyhow::Result<ExitCode> {
    let local = cx.local_compilers()?;
    let (_, list) = cx.survey(&local).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", explain(&list));
    }
    Ok(exit_for(list.included().next().is_some()))
}

/// Like `distcc --show-hosts`, with the reason for each worker left out.
fn explain(list: &HostList) -> String {
    let mut text = String::new();
    for w in &list.workers {
        match (&w.entry, &w.excluded_reason) {
            (Some(entry), _) => {
                text.push_str(&format!("{:<28} # {}\n", entry.render(), w.endpoint));
                for warning in &w.warnings {
                    text.push_str(&format!("{:<28} #   warning: {warning}\n", ""));
                }
            }
            (None, reason) => text.push_str(&format!(
                "{:<28} # {} excluded: {}\n",
                "-",
                w.endpoint,
                reason.as_deref().unwrap_or("unknown")
            )),
        }
    }
    if list.local_slots > 0 {
        text.push_str(&format!(
            "{:<28} # this builder\n",
            format!("localhost/{}", list.local_slots)
        ));
    }
    text.push_str(&format!("# {} slots in total\n", list.total_slots()));
    text
}

/// A private directory for `env`'s hosts file when no DISTCC_DIR is given.
fn default_env_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DISTCC_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let dir = std::env::temp_dir().join(format!("builderctl-env-{}", nix::unistd::geteuid()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // In a shared /tmp, someone else could have created it first: use it only if ours.
    let meta = std::fs::symlink_metadata(&dir).with_context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a private directory of this user; pass --distcc-dir",
            dir.display()
        );
    }
    Ok(dir)
}

use std::os::unix::fs::{DirBuilderExt, MetadataExt};

async fn env(cx: &Context_, distcc_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let local = cx.local_compilers()?;
    let masquerade = local::masquerade_dir(cx.config.masquerade_dir.as_deref())
        .context("no distcc masquerade directory (install distcc, run update-distcc-symlinks)")?;
    let dir = match distcc_dir {
        Some(dir) => dir,
        None => default_env_dir()?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (_, list) = cx.survey(&local).await;
    write_atomically(&dir.join("hosts"), &list.render())
        .with_context(|| format!("writing {}/hosts", dir.display()))?;
    let mut vars = session::session_env(
        &masquerade,
        &dir,
        &list,
        &std::env::var("PATH").unwrap_or_default(),
    );
    // `eval`ed in a script, not a session: no guard against entering.
    vars.retain(|(name, _)| name != SESSION_VAR);
    print!("{}", session::export_lines(&vars));
    Ok(exit_for(list.included().next().is_some()))
}

async fn preflight(
    cx: &Context_,
) -> (
    Vec<session::PreflightCheck>,
    LocalFacts,
    Vec<Probe>,
    HostList,
) {
    let facts = LocalFacts::gather(
        &cx.config.compilers,
        cx.config.masquerade_dir.as_deref(),
        &cx.config.workspace,
    );
    let local = facts.compilers.clone().unwrap_or_default();
    let (probes, list) = cx.survey(&local).await;
    let checks = session::preflight(&facts, &probes, &list, cx.policy.allow_mismatch);
    (checks, facts, probes, list)
}

async fn enter(cx: &Context_, leave: bool, command: Vec<String>) -> anyhow::Result<ExitCode> {
    if let Some(session) = std::env::var_os(SESSION_VAR) {
        bail!(
            "already in a builder session (DISTCC_DIR {}); exit that shell first",
            Path::new(&session).display()
        );
    }
    let (checks, facts, probes, list) = preflight(cx).await;
    eprint!("{}", session::render_checklist(&checks));
    if !checks.iter().all(|c| c.passed) {
        eprintln!("builderctl: preflight failed; not entering builder mode");
        return Ok(ExitCode::FAILURE);
    }
    let (Some(masquerade), Ok(local)) = (facts.masquerade_dir.clone(), facts.compilers.clone())
    else {
        bail!("preflight passed without a masquerade dir or compilers"); // checked above
    };
    let workspace_path = &cx.config.workspace;
    match workspace::prepare(workspace_path, &cx.config.tmpfs_size)? {
        workspace::Prepared::Mounted => eprintln!(
            "builderctl: mounted a {} tmpfs at {}",
            cx.config.tmpfs_size,
            workspace_path.display()
        ),
        workspace::Prepared::Reused => {
            eprintln!(
                "builderctl: reusing the tmpfs at {}",
                workspace_path.display()
            )
        }
    }
    let session_dir = tempfile::Builder::new()
        .prefix("builderctl-session-")
        .tempdir()
        .context("creating the session's DISTCC_DIR")?;
    let distcc_dir = session_dir.path().to_owned();
    let hosts_file = distcc_dir.join("hosts");
    write_atomically(&hosts_file, &list.render())
        .with_context(|| format!("writing {}", hosts_file.display()))?;
    let vars = session::session_env(
        &masquerade,
        &distcc_dir,
        &list,
        &std::env::var("PATH").unwrap_or_default(),
    );
    let mut child = if command.is_empty() {
        shell_command(&distcc_dir, list.total_slots())?
    } else {
        let mut c = tokio::process::Command::new(&command[0]);
        c.args(&command[1..]);
        c
    };
    child
        .current_dir(workspace_path)
        .envs(vars.iter().map(|(k, v)| (k, v)));
    eprintln!(
        "builderctl: builder mode: {} slots, DISTCC_DIR={}",
        list.total_slots(),
        distcc_dir.display()
    );
    // Ctrl-C belongs to the shell or the build; this process keeps steering until its
    // child exits. (Handlers are reset on exec, so the child sees default dispositions.)
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("handling SIGINT")?;
    let mut quits = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit())
        .context("handling SIGQUIT")?;
    let mut running = child.spawn().with_context(|| {
        format!(
            "starting {}",
            command.first().map_or("the shell", String::as_str)
        )
    })?;
    let log_path = distcc_dir.join("steering.log");
    let steering = steer::steer(
        SteeringConfig {
            token: cx.config.token.clone(),
            deadline: cx.config.deadline,
            interval: Duration::from_secs(1),
            local,
            policy: cx.policy.clone(),
            hosts_file,
        },
        probes,
        move |before, after| log_change(&log_path, before, after),
    );
    tokio::pin!(steering);
    let status = loop {
        tokio::select! {
            status = running.wait() => break status.context("waiting for the session's command")?,
            () = &mut steering => {} // ends only if no worker is configured
            _ = interrupts.recv() => {}
            _ = quits.recv() => {}
        }
    };
    drop(session_dir);
    if leave {
        match workspace::leave(workspace_path) {
            Ok(()) => eprintln!("builderctl: unmounted {}", workspace_path.display()),
            Err(e) => eprintln!("builderctl: kept the workspace: {e}"),
        }
    }
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => {
            use std::os::unix::process::ExitStatusExt;
            ExitCode::from(128 + u8::try_from(status.signal().unwrap_or(1)).unwrap_or(1))
        }
    })
}

fn log_change(log_path: &Path, before: &HostList, after: &HostList) {
    use std::io::Write;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let lines = steer::describe_change(before, after);
    // A log that cannot be written must not disturb the session.
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
    {
        for line in lines {
            let _ = writeln!(log, "{stamp} {line}");
        }
    }
}

/// `$SHELL` with a visible prompt marker: bash gets an rc file that sources the user's
/// and prefixes PS1 (an exported PS1 would be overwritten by ~/.bashrc).
fn shell_command(distcc_dir: &Path, slots: u32) -> anyhow::Result<tokio::process::Command> {
    let shell = std::env::var("SHELL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".to_owned());
    let marker = format!("(distcc {slots}) ");
    let mut command = tokio::process::Command::new(&shell);
    if Path::new(&shell).file_name().is_some_and(|n| n == "bash") {
        let rc = distcc_dir.join("bashrc");
        std::fs::write(
            &rc,
            format!(
                "[ -f ~/.bashrc ] && . ~/.bashrc\nPS1={}\"$PS1\"\n",
                session::shell_quote(&marker)
            ),
        )
        .with_context(|| format!("writing {}", rc.display()))?;
        command.arg("--rcfile").arg(rc).arg("-i");
    } else {
        let ps1 = std::env::var("PS1").unwrap_or_else(|_| "$ ".to_owned());
        command.env("PS1", format!("{marker}{ps1}"));
    }
    Ok(command)
}

async fn validate(cx: &Context_, json: bool) -> anyhow::Result<ExitCode> {
    let local = cx.local_compilers().unwrap_or_default();
    let (probes, _) = cx.survey(&local).await;
    let results = futures_util::future::join_all(probes.iter().map(|p| {
        ops::validate_one(
            p,
            &cx.config.token,
            &local,
            cx.config.deadline,
            cx.config.operation_deadline,
        )
    }))
    .await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "workers": results }))?
        );
    } else {
        for w in &results {
            println!("{} {}", w.endpoint, if w.passed { "ok" } else { "FAILED" });
            for c in &w.checks {
                println!(
                    "  [{}] {:<26} {}",
                    if c.passed { " ok " } else { "FAIL" },
                    c.name,
                    c.reason
                );
                if !c.hint.is_empty() {
                    println!("         {:<26} fix: {}", "", c.hint);
                }
            }
        }
    }
    Ok(exit_for(results.iter().all(|w| w.passed)))
}

async fn smoketest(cx: &Context_, json: bool) -> anyhow::Result<ExitCode> {
    let results = futures_util::future::join_all(cx.config.workers.iter().map(|w| {
        ops::smoketest_one(
            w,
            &cx.config.token,
            cx.config.deadline,
            cx.config.operation_deadline,
        )
    }))
    .await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "workers": results }))?
        );
    } else {
        for r in &results {
            println!(
                "[{}] {:<22} {}",
                if r.passed { " ok " } else { "FAIL" },
                r.endpoint,
                r.detail
            );
        }
    }
    Ok(exit_for(results.iter().all(|r| r.passed)))
}

async fn control(
    cx: &Context_,
    operation: Operation,
    names: &[String],
    rolling: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let workers = ops::select_workers(&cx.config.workers, names)?;
    let results = ops::control_all(
        &workers,
        &cx.config.token,
        operation,
        cx.config.operation_deadline,
        rolling,
    )
    .await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "workers": results }))?
        );
    } else {
        for r in &results {
            println!(
                "[{}] {:<22} {}",
                if r.passed { " ok " } else { "FAIL" },
                r.endpoint,
                r.error.clone().unwrap_or_else(|| format!(
                    "distccd {}",
                    r.distccd_state.as_deref().unwrap_or("?")
                ))
            );
            for step in &r.steps {
                println!("       {step}");
            }
        }
    }
    Ok(exit_for(results.iter().all(|r| r.passed)))
}

async fn monitor(
    cx: &Context_,
    distcc_dir: Option<PathBuf>,
    once: bool,
) -> anyhow::Result<ExitCode> {
    let dir = distcc_dir
        .or_else(|| std::env::var_os("DISTCC_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".distcc")))
        .context("no DISTCC_DIR: pass --distcc-dir")?;
    let tty = std::io::stdout().is_terminal();
    loop {
        let tasks = state_files::read_states(&dir, SystemTime::now())
            .with_context(|| format!("reading {}/state", dir.display()))?;
        let (probes, list) = cx.survey(&[]).await;
        if tty && !once {
            print!("\x1b[H\x1b[2J");
        }
        println!("{} jobs in {}/state", tasks.len(), dir.display());
        for t in &tasks {
            println!(
                "{:>7}  {:<10} {:<24}[{}] {}",
                t.pid,
                t.phase.name(),
                t.host,
                t.slot,
                t.file
            );
        }
        println!();
        for w in views(&probes, &list) {
            println!(
                "{:<22} {:<10} running {:>3}  load {:>5}",
                w.endpoint,
                w.distccd_state.as_deref().unwrap_or("unreachable"),
                w.jobs_running.map_or("-".to_owned(), |n| n.to_string()),
                w.load1.map_or("-".to_owned(), |l| format!("{l:.2}")),
            );
        }
        if once {
            return Ok(ExitCode::SUCCESS);
        }
        if !tty {
            println!("--");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn daemon(cx: &Context_, hosts_file: PathBuf) -> anyhow::Result<ExitCode> {
    let local = cx.local_compilers()?;
    let (probes, list) = cx.survey(&local).await;
    write_atomically(&hosts_file, &list.render())
        .with_context(|| format!("writing {}", hosts_file.display()))?;
    let describe = |list: &HostList| {
        format!(
            "{} of {} workers, {} slots in {}",
            list.included().count(),
            list.workers.len(),
            list.total_slots(),
            hosts_file.display()
        )
    };
    eprintln!("builderctl daemon: {}", describe(&list));
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&describe(&list)),
    ]);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    let steering = steer::steer(
        SteeringConfig {
            token: cx.config.token.clone(),
            deadline: cx.config.deadline,
            interval: Duration::from_secs(2),
            local,
            policy: cx.policy.clone(),
            hosts_file: hosts_file.clone(),
        },
        probes,
        |before, after| {
            for line in steer::describe_change(before, after) {
                eprintln!("builderctl daemon: {line}");
            }
            notify(&[sd_notify::NotifyState::Status(&describe(after))]);
        },
    );
    tokio::select! {
        () = steering => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    Ok(ExitCode::SUCCESS)
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd there is no NOTIFY_SOCKET and this does nothing.
    let _ = sd_notify::notify(states);
}
