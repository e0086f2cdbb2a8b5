//! Logs: to the journal with structured fields when systemd connected stderr to it (the
//! audit trail's `TOKEN_ID=`, `PEER=`... are then fields of their own, for `journalctl
//! TOKEN_ID=ops`), else as text on stderr. `DISTCC_AGENT_LOG` filters (default `info`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn init() {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("DISTCC_AGENT_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
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
        // journald adds its own timestamps.
        .without_time()
        .init();
}
