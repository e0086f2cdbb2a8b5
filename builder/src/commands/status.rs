//! `builderctl status`: one row per worker.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use distcc_builder::cluster::WorkerView;

use super::{BuilderSetup, exit_for, print_workers_json, survey_views};

pub async fn run(setup: &BuilderSetup, json: bool, watch: bool) -> anyhow::Result<ExitCode> {
    // Compilers are compared only when they can be described; status must work on a
    // builder without them, so a failure here just leaves the comparison out.
    let local = setup.local_compilers().unwrap_or_default();
    loop {
        let (workers, _) = survey_views(setup, &local).await?;
        if watch && std::io::stdout().is_terminal() {
            print!("\x1b[H\x1b[2J");
        }
        if json {
            print_workers_json(&workers)?;
        } else {
            print_table(&workers);
        }
        if !watch {
            return Ok(exit_for(
                workers.iter().all(|w| w.excluded_reason.is_none()),
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn print_table(workers: &[WorkerView]) {
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
