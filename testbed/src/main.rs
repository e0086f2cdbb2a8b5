//! `distcc-testbed cleanup` | `distcc-testbed rootfs`

use std::process::ExitCode;

const USAGE: &str = "usage: distcc-testbed <command>

commands:
  cleanup   delete leftover testbed containers, network namespaces, veths and bridges
            of test processes that are gone (a CI pre-step)
  rootfs    build the cached worker rootfs if needed and print its path

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
