//! `builderctl`: builder mode and cluster operations.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use distcc_builder::cluster::status_all;
use distcc_builder::config::{BuilderConfig, DEFAULT_CONFIG_PATH};

#[derive(Parser)]
#[command(
    version,
    about = "Builder mode and cluster operations for a distcc cluster"
)]
struct Options {
    /// The builder's configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One row per worker: reachable, distccd state, slots, load, compiles.
    /// Exit status 0 only when every worker is usable.
    Status {
        /// Print the stable JSON form (`{"workers": [...]}`).
        #[arg(long)]
        json: bool,
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

fn run(options: Options) -> anyhow::Result<ExitCode> {
    let config = BuilderConfig::load(&options.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match options.command {
        Command::Status { json } => {
            let workers =
                runtime.block_on(status_all(&config.workers, &config.token, config.deadline));
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "workers": workers }))?
                );
            } else {
                println!(
                    "{:<24} {:<9} {:<10} {:>5} {:>9} {:>6} {:>8}  EXCLUDED",
                    "WORKER", "REACHABLE", "DISTCCD", "SLOTS", "RUNNING", "LOAD", "RPC ms"
                );
                for w in &workers {
                    println!(
                        "{:<24} {:<9} {:<10} {:>5} {:>9} {:>6} {:>8.1}  {}",
                        w.endpoint,
                        if w.reachable { "yes" } else { "no" },
                        w.distccd_state.as_deref().unwrap_or("-"),
                        w.slots,
                        w.jobs_running.map_or("-".to_owned(), |n| n.to_string()),
                        w.load1.map_or("-".to_owned(), |l| format!("{l:.2}")),
                        w.rpc_latency_ms,
                        w.excluded_reason.as_deref().unwrap_or("-"),
                    );
                }
            }
            let all_fine = workers.iter().all(|w| w.excluded_reason.is_none());
            Ok(if all_fine {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
