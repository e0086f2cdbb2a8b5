//! `distcc-testbed cleanup` | `distcc-testbed rootfs`

use std::path::PathBuf;
use std::process::ExitCode;

mod demo;

/// The workspace this binary was built from (the demo installs its agent and units).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const USAGE: &str = "usage: distcc-testbed <command>

commands:
  cleanup   delete leftover testbed containers, network namespaces, veths and bridges
            of test processes that are gone (a CI pre-step)
  rootfs    build the cached worker rootfs if needed and print its path
  demo [--quick]
            the main job: three workers get distcc-agent from the project's packages via
            apt, the root namespace builds Linux tinyconfig through them in
            `builderctl enter` (--quick: a small C project), then everything is torn down

environment:
  DISTCC_TESTBED_CACHE   rootfs cache directory (default /var/cache/distcc-testbed)
  DISTCC_TESTBED_MIRROR  Debian mirror for the rootfs build
  RUST_LOG               log filter (default info)";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["cleanup"] => distcc_testbed::cleanup_all().map(|removed| {
            println!(
                "removed leftovers of {} testbed(s){}",
                removed.len(),
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(": {removed:?}")
                }
            );
        }),
        ["rootfs"] => distcc_testbed::Rootfs::ensure().map(|r| println!("{}", r.path().display())),
        ["demo"] => demo::run(&repo_root(), false),
        ["demo", "--quick"] => demo::run(&repo_root(), true),
        ["help" | "-h" | "--help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distcc-testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
