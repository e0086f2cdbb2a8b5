//! `distcc-agent --check-config`, run as the real binary (as ExecStartPre= runs it).

use std::process::Command;

fn check(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    let (made, token, _) = token_command(&tokens, &["new", "admin", "ops"]);
    assert!(made && token.trim().len() == 64, "{token}");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!("tokens_file = \"{}\"\n{config}", tokens.display()),
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

fn token_command(tokens: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_distcc-agent"))
        .arg("token")
        .arg("--tokens-file")
        .arg(tokens)
        .args(args)
        .output()
        .expect("run distcc-agent token");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_token_command_keeps_only_hashes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    let (_, admin, _) = token_command(&tokens, &["new", "admin", "ops"]);
    let (_, read, _) = token_command(&tokens, &["new", "read", "builders"]);
    let text = std::fs::read_to_string(&tokens).expect("tokens file");
    assert!(
        !text.contains(admin.trim()) && !text.contains(read.trim()),
        "{text}"
    );
    let mode = std::fs::metadata(&tokens)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    let (_, list, _) = token_command(&tokens, &["list"]);
    assert_eq!(list, "admin ops\nread builders\n");
    // `token hash` gives the line an operator adds by hand for a token made elsewhere.
    let mut hash = Command::new(env!("CARGO_BIN_EXE_distcc-agent"))
        .args(["token", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run token hash");
    use std::io::Write;
    hash.stdin
        .take()
        .expect("stdin")
        .write_all(read.as_bytes())
        .expect("write");
    let out = hash.wait_with_output().expect("token hash");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("read builders {}", line.trim())),
        "{text} / {line}"
    );
    let (ok, _, _) = token_command(&tokens, &["revoke", "ops"]);
    assert!(ok);
    let (_, list, _) = token_command(&tokens, &["list"]);
    assert_eq!(list, "read builders\n");
    let (ok, _, stderr) = token_command(&tokens, &["new", "superuser", "x"]);
    assert!(!ok && stderr.contains("not a role"), "{stderr}");
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

#[test]
fn plaintext_off_loopback_is_refused_and_the_opt_in_warned_about() {
    let (ok, _, stderr) = check("listen = \"0.0.0.0:3634\"\nplaintext = true\n");
    assert!(!ok);
    assert!(
        stderr.starts_with("agent.toml:3: plaintext: plaintext gRPC on 0.0.0.0:3634"),
        "{stderr}"
    );
    // On loopback, plaintext is fine and nothing is warned about.
    let (ok, _, stderr) = check("listen = \"127.0.0.1:3634\"\nplaintext = true\n");
    assert!(ok, "{stderr}");
    assert_eq!(stderr, "");
    // The explicit opt-in passes, with a warning.
    let (ok, stdout, stderr) = check("listen = \"0.0.0.0:3634\"\ninsecure_plaintext = true\n");
    assert!(ok, "{stderr}");
    assert!(stdout.ends_with(": OK\n"), "{stdout}");
    assert!(
        stderr.starts_with("warning: agent.toml: INSECURE: gRPC on 0.0.0.0:3634 is plaintext"),
        "{stderr}"
    );
}

/// The shipped units stay hardened: `systemd-analyze security` rates each "OK" or better
/// (exposure at most 2.0 of 10). docs/BENCHMARKS.md records the current scores. The
/// workspace template runs as root with CAP_SYS_ADMIN and may not namespace its mounts
/// (they must be the host's), so its bar is "OK" at 5.0; what it must not use is checked
/// by name.
#[test]
fn units_stay_hardened() {
    let systemd = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    // systemd-analyze judges unit instances, not templates: the templates are analysed
    // as instances.
    let instances = tempfile::tempdir().expect("temp dir");
    let log_helper = instances.path().join("distccd-log@0.service");
    std::fs::copy(
        systemd.join("distccd-log/distccd-log@.service"),
        &log_helper,
    )
    .expect("copy the log helper unit");
    let workspace = instances.path().join("distcc-workspace@alice.service");
    std::fs::copy(systemd.join("distcc-workspace@.service"), &workspace)
        .expect("copy the workspace unit");
    for (unit, threshold) in [
        (systemd.join("distcc-agent.service"), 20),
        (systemd.join("distccd.service"), 20),
        (systemd.join("distcc-builder.service"), 20),
        (log_helper, 20),
        (workspace.clone(), 50),
    ] {
        let unit = unit.display().to_string();
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={threshold}"))
            .arg(&unit)
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
    // The workspace's tmpfs must land in the host's mount namespace, and the unit may
    // do nothing but mount.
    let text = std::fs::read_to_string(&workspace).expect("read the workspace unit");
    for namespacing in [
        "PrivateMounts=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "ReadWritePaths=",
        "ReadOnlyPaths=",
        "ProtectKernelModules=",
        "ProtectKernelLogs=",
        "ProtectKernelTunables=",
        "ProtectControlGroups=",
        "ProtectProc=",
        "MountFlags=",
    ] {
        assert!(
            !text.lines().any(|l| l.starts_with(namespacing)),
            "distcc-workspace@.service must not set {namespacing}"
        );
    }
    assert!(
        text.contains("\nCapabilityBoundingSet=CAP_SYS_ADMIN\n"),
        "{text}"
    );
    let builder = std::fs::read_to_string(systemd.join("distcc-builder.service"))
        .expect("read the builder unit");
    for line in [
        "User=distcc-builder",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "Requires=distcc-builder.socket",
    ] {
        assert!(builder.lines().any(|l| l == line), "{line} missing");
    }
}
