//! `builderctl monitor`: what `distccmon-text 1` shows, plus each worker's own load.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use distcc_builder::state_files;

use super::{BuilderSetup, survey_views};

pub async fn run(
    setup: &BuilderSetup,
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
        let (workers, _) = survey_views(setup, &[]).await?;
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
        for w in workers {
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
