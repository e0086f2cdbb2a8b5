//! `distcc-agent`: the worker agent daemon (run by distcc-agent.service).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use distcc_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH, DEFAULT_TOKENS_FILE};
use distcc_agent::tokens::{self, Role, TokenHash, TokenId};

/// Manage this worker's distccd through systemd and serve the cluster's gRPC API.
#[derive(Parser)]
#[command(version = distcc_agent::VERSION, about)]
struct Options {
    /// The agent's configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration file (and the tokens file it names), then exit.
    #[arg(long)]
    check_config: bool,
    /// Print the SHA-256 fingerprint of the certificate the agent serves (the one
    /// `builderctl trust` shows), then exit.
    #[arg(long)]
    fingerprint: bool,
    /// Print the man page (roff) and exit; packaging/build-debs installs it.
    #[arg(long, hide = true)]
    print_man: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the tokens the agent accepts (it keeps only their hashes). Changes take
    /// effect at `systemctl reload distcc-agent`.
    Token {
        /// The tokens file.
        #[arg(long, default_value = DEFAULT_TOKENS_FILE)]
        tokens_file: PathBuf,
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make a token with ROLE (read or admin), add its hash as ID, print the token once.
    New { role: Role, id: TokenId },
    /// Remove the token ID.
    Revoke { id: TokenId },
    /// List the tokens' roles and ids.
    List,
    /// Print the hash of a token read from standard input (to add it by hand).
    Hash,
}

fn token_command(tokens_file: &std::path::Path, action: TokenAction) -> Result<(), String> {
    match action {
        TokenAction::New { role, id } => {
            let token = tokens::add_new_token(tokens_file, role, id).map_err(|e| e.to_string())?;
            println!("{token}");
        }
        TokenAction::Revoke { id } => {
            tokens::revoke(tokens_file, &id).map_err(|e| e.to_string())?;
        }
        TokenAction::List => {
            let list = tokens::Tokens::load(tokens_file).map_err(|e| e.to_string())?;
            for entry in list.entries() {
                println!("{} {}", entry.role, entry.id);
            }
        }
        TokenAction::Hash => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .map_err(|e| format!("reading the token: {e}"))?;
            if token.trim().len() < tokens::MIN_TOKEN_LEN {
                return Err(format!(
                    "a token has at least {} characters",
                    tokens::MIN_TOKEN_LEN
                ));
            }
            println!("{}", TokenHash::of(&token));
        }
    }
    Ok(())
}

/// A panic in any thread or task ends the process. tokio would otherwise catch a spawned
/// task's panic and keep the rest running: an agent that answers health checks with a dead
/// monitor or server task is a ghost. `panic = "abort"` in the release profile does the
/// same for packaged builds; this hook covers every build (tests run debug binaries).
/// systemd (Restart=on-failure) then starts a whole agent again.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("panic, aborting: {info}");
        std::process::abort();
    }));
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
    if let Some(Command::Token {
        tokens_file,
        action,
    }) = options.command
    {
        return match token_command(&tokens_file, action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    distcc_agent::logging::init();
    abort_on_panic();

    if options.check_config {
        return match AgentConfig::load(&options.config) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {}: {warning}", options.config.display());
                }
                println!("{}: OK", options.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }

    if options.fingerprint {
        return print_fingerprint(&options.config);
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

fn print_fingerprint(config_path: &std::path::Path) -> ExitCode {
    let files = match AgentConfig::load(config_path) {
        Ok(config) => config.identity_files(),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(files) = files else {
        eprintln!("the agent serves plaintext: it has no certificate");
        return ExitCode::FAILURE;
    };
    match distcc_agent::identity::fingerprint_of(&files.cert) {
        Ok(fingerprint) => {
            println!("{fingerprint}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e} (the agent makes its certificate at its first start)");
            ExitCode::FAILURE
        }
    }
}
