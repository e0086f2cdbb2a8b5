//! The packaging entry points: `completions` and `man` work without any configuration
//! (packaging runs them at build time) and print what their consumers expect.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

const BUILDERCTL: &str = env!("CARGO_BIN_EXE_builderctl");

fn run(args: &[&str]) -> Output {
    // A config path that cannot exist: proves neither command reads one.
    Command::new(BUILDERCTL)
        .args(["--config", "/nonexistent/builder.toml"])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn completion_scripts_for_each_shell_name_every_subcommand() {
    let bash = stdout(&run(&["completions", "bash"]));
    assert!(bash.contains("complete -F _builderctl"), "{bash}");
    let zsh = stdout(&run(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef builderctl"), "{zsh}");
    let fish = stdout(&run(&["completions", "fish"]));
    assert!(fish.contains("complete -c builderctl"), "{fish}");
    for script in [&bash, &zsh, &fish] {
        for sub in ["status", "enter", "daemon", "smoketest", "completions"] {
            assert!(script.contains(sub), "{sub} missing");
        }
    }
    let out = run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_page_is_roff_for_builderctl_1_and_hidden_from_help() {
    let page = stdout(&run(&["man"]));
    assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page}");
    assert!(page.contains(".TH builderctl 1"), "{page}");
    for sub in ["enter", "status", "daemon"] {
        assert!(
            page.contains(&format!("builderctl\\-{sub}")),
            "{sub} in {page}"
        );
    }
    let help = stdout(&run(&["--help"]));
    assert!(help.contains("completions"), "{help}");
    assert!(!help.contains("\n  man "), "{help}");
}
