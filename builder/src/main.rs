//! `builderctl`: builder mode and cluster operations. This file only parses the command
//! line and dispatches; each command lives in `commands/`, the logic in the library.

mod commands;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use distcc_builder::config::DEFAULT_CONFIG_PATH;
use distcc_builder::ops::Operation;

use commands::BuilderSetup;

#[derive(Parser)]
#[command(
    name = "builderctl",
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
    /// More diagnostics on stderr (or the journal): -v info, -vv debug, -vvv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
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
    /// Show each worker's TLS certificate fingerprint and pin it in the known-workers
    /// file (SSH known_hosts style); later connections accept only the pinned certificate.
    Trust {
        /// Endpoints or hosts; all workers when none.
        workers: Vec<String>,
        /// Record without asking (for scripts); without it, a terminal must confirm.
        #[arg(long)]
        yes: bool,
    },
    /// The build node's daemon (`distcc-builder.service`, Type=notify): keeps a hosts
    /// file (default /etc/distcc/hosts) fresh from live worker status, aborts the
    /// machine's connections to a lost worker, and serves users' sessions on
    /// `daemon_socket` (socket activation, else bound here).
    Daemon {
        #[arg(long, default_value = "/etc/distcc/hosts")]
        hosts_file: PathBuf,
    },
    /// Mount or unmount a user's tmpfs workspace (run by distcc-workspace@USER.service).
    #[command(hide = true)]
    Workspace {
        #[command(subcommand)]
        action: WorkspaceAction,
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
    /// Print a completion script for SHELL on stdout (needs no configuration).
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the builderctl(1) man page as roff on stdout (for packaging).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
enum WorkspaceAction {
    /// Mount USER's workspace in `user_workspaces` (USER must be in `build_group`).
    Mount { user: String },
    /// Unmount USER's workspace, only when nothing uses it.
    Unmount { user: String },
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

fn run(options: Options) -> anyhow::Result<ExitCode> {
    logging::init(
        options.verbose,
        matches!(options.command, Command::Daemon { .. }),
    );
    match options.command {
        // Packaging runs these at build time, where no configuration exists.
        Command::Completions { shell } => commands::docs::completions(Options::command(), shell),
        Command::Man => commands::docs::man_page(Options::command()),
        command => {
            let setup = BuilderSetup::load(&options.config, options.allow_mismatch)?;
            dispatch(&setup, command)
        }
    }
}

fn dispatch(setup: &BuilderSetup, command: Command) -> anyhow::Result<ExitCode> {
    // Before any thread exists: taking systemd's socket clears LISTEN_FDS/LISTEN_PID.
    let listener = match &command {
        Command::Daemon { .. } => Some(commands::daemon::listen(setup)?),
        _ => None,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match command {
        Command::Status { json, watch } => {
            runtime.block_on(commands::status::run(setup, json, watch))
        }
        Command::Hosts { json } => runtime.block_on(commands::hosts::run(setup, json)),
        Command::Env { distcc_dir } => runtime.block_on(commands::env::run(setup, distcc_dir)),
        Command::Preflight => runtime.block_on(commands::enter::preflight(setup)),
        Command::Enter { leave, command } => {
            runtime.block_on(commands::enter::run(setup, leave, command))
        }
        Command::Leave => runtime.block_on(commands::enter::leave(setup)),
        Command::Validate { json } => runtime.block_on(commands::fleet::validate(setup, json)),
        Command::Smoketest { json } => runtime.block_on(commands::fleet::smoketest(setup, json)),
        Command::Reset {
            workers,
            rolling,
            json,
        } => runtime.block_on(commands::fleet::control(
            setup,
            Operation::Reset,
            &workers,
            rolling,
            json,
        )),
        Command::Bootstrap {
            workers,
            rolling,
            json,
        } => runtime.block_on(commands::fleet::control(
            setup,
            Operation::Bootstrap,
            &workers,
            rolling,
            json,
        )),
        Command::Trust { workers, yes } => {
            runtime.block_on(commands::trust::run(setup, &workers, yes))
        }
        Command::Monitor { distcc_dir, once } => {
            runtime.block_on(commands::monitor::run(setup, distcc_dir, once))
        }
        Command::Daemon { hosts_file } => {
            let listener = listener.context("the daemon's socket")?;
            runtime.block_on(commands::daemon::run(setup, hosts_file, listener))
        }
        Command::Workspace { action } => match action {
            WorkspaceAction::Mount { user } => commands::workspace::mount(setup, &user),
            WorkspaceAction::Unmount { user } => commands::workspace::unmount(setup, &user),
        },
        Command::Completions { shell } => commands::docs::completions(Options::command(), shell),
        Command::Man => commands::docs::man_page(Options::command()),
    }
}
