//! Diagnostics through `tracing`: to the journal with structured fields when systemd
//! connected stderr to it (the daemon), else as text on stderr. Command output (tables,
//! JSON, checklists) does not go through here.
//!
//! Level: `-v` info, `-vv` debug, `-vvv` trace for builderctl's own messages; without
//! `-v`, warnings only, except `daemon`, which logs info (its journal is its record).
//! `BUILDERCTL_LOG` (an `EnvFilter` directive) overrides both.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn init(verbose: u8, daemon: bool) {
    let level = match (verbose, daemon) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    };
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("BUILDERCTL_LOG").unwrap_or_else(|_| {
            // Libraries (tonic, h2, rustls) stay at warn below -vvv.
            let libraries = if verbose >= 3 { "trace" } else { "warn" };
            tracing_subscriber::EnvFilter::new(format!(
                "{libraries},distcc_builder={level},builderctl={level}"
            ))
        })
    };
    // systemd sets JOURNAL_STREAM when stderr goes to the journal.
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter())
            .with(journald.with_field_prefix(None))
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        // No escape sequences in files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}
