//! `distcc-agent`: the worker agent daemon (run by distcc-agent.service).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use distcc_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH};

/// Manage this worker's distccd through systemd and serve the cluster's gRPC API.
#[derive(Parser)]
#[command(version = distcc_agent::VERSION, about)]
struct Options {
    /// The agent's configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration file (and the token file it names), then exit.
    #[arg(long)]
    check_config: bool,
    /// Print the man page (roff) and exit; packaging/build-debs installs it.
    #[arg(long, hide = true)]
    print_man: bool,
}

fn main() -> ExitCode {
    let options = Options::parse();
    if options.print_man {
        let man = clap_mangen::Man::new(<Options as clap::CommandFactory>::command()).section("8");
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTCC_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // journald adds its own timestamps.
        .without_time()
        .init();

    if options.check_config {
        return match AgentConfig::load(&options.config) {
            Ok(_) => {
                println!("{}: OK", options.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(distcc_agent::daemon::run(options.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distcc-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
