//! `completions` and `man`: generated from the command-line definition itself, so they
//! never drift from it. Packaging runs both at build time (no configuration needed).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap_complete::Shell;

pub fn completions(mut command: clap::Command, shell: Shell) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "builderctl", &mut out);
    write_stdout(&out)
}

pub fn man_page(command: clap::Command) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut out)
        .context("rendering the man page")?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    // Redirected into a file by packaging: a short write must fail the build, not pass.
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}
