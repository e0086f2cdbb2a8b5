//! `builderctl trust [WORKER...]`: show each worker's certificate fingerprint and pin it
//! in the known-workers file, SSH `known_hosts` style.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use distcc_builder::cluster::{connect, presented_fingerprint};
use distcc_builder::config::{Transport, Trust};
use distcc_builder::ops;
use distcc_builder::trust::KnownWorkers;

use super::BuilderSetup;

/// What a worker presented, against what is pinned for it.
enum Seen {
    New(String),
    Same(String),
    Changed { pinned: String, presented: String },
}

pub async fn run(setup: &BuilderSetup, names: &[String], yes: bool) -> anyhow::Result<ExitCode> {
    let Transport::Tls(tls) = &setup.config.transport else {
        bail!(
            "insecure_plaintext = true: this builder does not use TLS, there is nothing to trust"
        );
    };
    let Trust::Pinned(file) = &tls.trust else {
        bail!(
            "[tls] ca is set: the workers are verified by that CA and pins are not used; \
             remove `ca` from [tls] to pin certificates instead"
        );
    };
    let workers = ops::select_workers(&setup.config.workers, names)?;
    if workers.is_empty() {
        bail!("no workers: list them in `workers` in the builder's configuration");
    }
    let mut pins = KnownWorkers::load(file)?;
    let presented = futures_util::future::join_all(
        workers
            .iter()
            .map(|w| presented_fingerprint(w, tls, setup.config.deadline)),
    )
    .await;

    let mut failed = false;
    let mut to_record = Vec::new();
    for (endpoint, fingerprint) in workers.iter().zip(presented) {
        let fingerprint = match fingerprint {
            Ok(f) => f,
            Err(e) => {
                failed = true;
                println!("{endpoint:<22} unreachable: {e}");
                continue;
            }
        };
        let seen = match pins.get(endpoint) {
            None => Seen::New(fingerprint),
            Some(pinned) if pinned == fingerprint => Seen::Same(fingerprint),
            Some(pinned) => Seen::Changed {
                pinned: pinned.to_owned(),
                presented: fingerprint,
            },
        };
        match seen {
            Seen::Same(f) => println!("{endpoint:<22} {f} (already trusted)"),
            Seen::New(f) => {
                println!("{endpoint:<22} {f} (new)");
                to_record.push((endpoint.clone(), f));
            }
            Seen::Changed { pinned, presented } => {
                println!(
                    "{endpoint:<22} {presented} CHANGED: {pinned} is pinned. Record the new one \
                     only if the worker's certificate was replaced on purpose."
                );
                to_record.push((endpoint.clone(), presented));
            }
        }
    }
    if to_record.is_empty() {
        return Ok(super::exit_for(!failed));
    }
    println!(
        "Compare with `distcc-agent --fingerprint` on each worker (a console, not this network)."
    );
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "not recording {} fingerprint(s): standard input is not a terminal to confirm \
                 on; check them and re-run with --yes",
                to_record.len()
            );
        }
        print!(
            "Trust {} worker(s) and record them in {}? [y/N] ",
            to_record.len(),
            pins.path().display()
        );
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing recorded");
            return Ok(ExitCode::FAILURE);
        }
    }
    for (endpoint, fingerprint) in &to_record {
        pins.set(endpoint, fingerprint);
    }
    pins.save()
        .with_context(|| format!("recording the pins in {}", pins.path().display()))?;
    println!(
        "recorded {} pin(s) in {}",
        to_record.len(),
        pins.path().display()
    );

    // A full handshake through the pinned verifier: the worker holds the certificate's key.
    for (endpoint, _) in &to_record {
        if let Err(e) = connect(endpoint, setup.access()?, setup.config.deadline).await {
            failed = true;
            println!("{endpoint:<22} pinned, but the verified connection failed: {e}");
        }
    }
    Ok(super::exit_for(!failed))
}
