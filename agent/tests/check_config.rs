//! `distcc-agent --check-config`, run as the real binary (as ExecStartPre= runs it).

use std::process::Command;

fn check(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123\n").expect("write token");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!("token_file = \"{}\"\n{config}", token.display()),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_distcc-agent"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run distcc-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "agent.toml"),
    )
}

#[test]
fn a_good_config_passes() {
    let (ok, stdout, _) = check("[distccd]\nallow = [\"198.18.0.0/24\"]\njobs = 4\n");
    assert!(ok);
    assert!(stdout.ends_with(": OK\n"), "{stdout}");
}

#[test]
fn errors_name_file_line_and_key() {
    let (ok, _, stderr) = check("[distccd]\nallow = [\"198.18.0.0/24\"]\njobs = -1\n");
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        "agent.toml:4: distccd.jobs: -1 is outside 0..=1024"
    );
    let (ok, _, stderr) = check("[distccd]\nallow = [\"0.0.0.0/0\"]\n");
    assert!(!ok);
    assert!(
        stderr.starts_with("agent.toml:3: distccd.allow[0]: 0.0.0.0/0 admits the whole internet"),
        "{stderr}"
    );
    let (ok, _, stderr) = check("[distcd]\nallow = []\n");
    assert!(!ok);
    assert!(stderr.starts_with("agent.toml:2: distcd:"), "{stderr}");
}

/// The shipped units stay hardened: `systemd-analyze security` rates each "OK" or better
/// (exposure at most 2.0 of 10). docs/BENCHMARKS.md records the current scores.
#[test]
fn units_stay_hardened() {
    let systemd = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for unit in [
        "distcc-agent.service",
        "distccd.service",
        "distcc-builder.service",
    ] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager", "--threshold=20"])
            .arg(systemd.join(unit))
            .output()
            .expect("systemd-analyze (package systemd) is installed");
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default().to_owned();
        assert!(out.status.success(), "{unit}: {last}");
        assert!(
            last.contains("OK") || last.contains("SAFE"),
            "{unit}: {last}"
        );
    }
}
