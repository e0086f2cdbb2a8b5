//! Rollout with apt, for real: the project's .deb packages built by packaging/build-debs
//! (two versions), served from a local repository made by packaging/apt-repo, installed,
//! upgraded while a build runs through the worker, removed and purged in a worker
//! container with real systemd, dpkg and apt.
//!
//! Slow the first time (release build, cargo-deb); needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use distcc_testbed::{REPO_IN_WORKER, Testbed, Worker, WorkerSpec};

const OLD: &str = "0.1.0+rollout1";
const NEW: &str = "0.1.0+rollout2";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Both versions of the packages in one local apt repository.
fn build_repository(dir: &Path) {
    for version in [OLD, NEW] {
        distcc_testbed::build_repository(&repo_root(), Some(version), dir).unwrap();
    }
    // Debian's own checker: no errors and no warnings on either package.
    for entry in std::fs::read_dir(dir).unwrap() {
        let deb = entry.unwrap().path();
        if deb.extension().is_some_and(|e| e == "deb") {
            let out = Command::new("lintian")
                .args(["--tag-display-limit", "0", "--fail-on", "error,warning"])
                .arg(&deb)
                .output()
                .expect("lintian (testbed/setup-host installs it)");
            assert!(
                out.status.success(),
                "lintian {}:\n{}",
                deb.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

fn apt(w: &Worker, args: &[&str]) -> String {
    w.apt(args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn show(w: &Worker, unit: &str, property: &str) -> String {
    w.exec_ok(&["systemctl", "show", "-P", property, unit])
        .unwrap()
        .trim()
        .to_owned()
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `builderctl ARGS` from the root namespace (the builder), configured for the one
/// worker at `ip` with pins in `dir/known_workers`: (success, stdout).
fn builderctl(dir: &Path, ip: Ipv4Addr, token: &str, args: &[&str]) -> (bool, String) {
    let token_file = dir.join("builder-token");
    distcc_testbed::write_secret(&token_file, token).unwrap();
    let config = dir.join("builder.toml");
    std::fs::write(
        &config,
        format!(
            "workers = [\"{ip}:3634\"]\ntoken_file = \"{}\"\nknown_workers = \"{}\"\n",
            token_file.display(),
            dir.join("known_workers").display()
        ),
    )
    .unwrap();
    let out = Command::new(repo_root().join("target/release/builderctl"))
        .args(["--config"])
        .arg(&config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `builderctl status --json`.
fn builder_status(dir: &Path, ip: Ipv4Addr, token: &str) -> (bool, String) {
    builderctl(dir, ip, token, &["status", "--json"])
}

/// A C project big enough that its build spans a package upgrade, built through `ip`
/// only, with no local fallback.
fn start_build(dir: &Path, ip: Ipv4Addr) -> Child {
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    let mut objects = Vec::new();
    for i in 0..300 {
        let body: String = (0..40)
            .map(|k| format!("  s = s * {} + (x >> {}) + {k};\n", i + k + 3, k % 13))
            .collect();
        std::fs::write(
            project.join(format!("f{i}.c")),
            format!("unsigned f{i}(unsigned x) {{\n  unsigned s = {i};\n{body}  return s;\n}}\n"),
        )
        .unwrap();
        objects.push(format!("f{i}.o"));
    }
    std::fs::write(
        project.join("Makefile"),
        format!(
            "all: {}\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n",
            objects.join(" ")
        ),
    )
    .unwrap();
    let distcc_dir = dir.join("distcc");
    std::fs::create_dir_all(&distcc_dir).unwrap();
    Command::new("make")
        .args(["-s", "-j4", "CC=distcc gcc"])
        .current_dir(&project)
        .env("DISTCC_HOSTS", format!("{ip}/4"))
        .env("DISTCC_FALLBACK", "0")
        .env("DISTCC_DIR", &distcc_dir)
        .spawn()
        .unwrap()
}

#[test]
fn install_upgrade_during_a_build_remove_purge() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    build_repository(&repo);

    let bed = Testbed::create().unwrap();
    let w = bed
        .boot_worker(WorkerSpec::new("w1").bind_ro(&repo, REPO_IN_WORKER))
        .unwrap();
    w.use_local_repo().unwrap();

    // Install: the agent runs at once, safely idle until the operator sets an allowlist.
    apt(&w, &["install", &format!("distcc-agent={OLD}-1")]);
    assert_eq!(show(&w, "distcc-agent", "ActiveState"), "active");
    assert_eq!(show(&w, "distcc-agent", "UnitFileState"), "enabled");
    assert!(show(&w, "distcc-agent", "StatusText").starts_with("waiting for an allowlist"));
    assert_eq!(
        show(&w, "distccd", "ActiveState"),
        "inactive",
        "no allowlist, no distccd"
    );
    // The package enables distccd (the agent may only start it) and starts the socket
    // that serves distccd's log lines to the agent.
    assert_eq!(show(&w, "distccd", "UnitFileState"), "enabled");
    assert_eq!(show(&w, "distccd-log.socket", "ActiveState"), "active");
    // The agent keeps only hashes; the tokens themselves are root's alone.
    let mode = |path: &str| {
        w.exec_ok(&["stat", "-c", "%a %U %G", path])
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(mode("/etc/distcc-agent/tokens"), "640 root distcc-agent");
    assert_eq!(mode("/etc/distcc-agent/read.token"), "600 root root");
    assert_eq!(mode("/etc/distcc-agent/admin.token"), "600 root root");
    // A fresh install serves TLS with a key made on the worker, for the agent alone.
    let identity = w
        .exec_ok(&[
            "stat",
            "-c",
            "%a %U %G",
            "/var/lib/distcc-agent/tls",
            "/var/lib/distcc-agent/tls/key.pem",
        ])
        .unwrap();
    assert_eq!(
        identity.trim(),
        "700 distcc-agent distcc-agent\n600 distcc-agent distcc-agent"
    );
    let fingerprint = w.exec_ok(&["distcc-agent", "--fingerprint"]).unwrap();
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");

    // The operator sets the allowlist and reloads: distccd is bootstrapped.
    let config = w.exec_ok(&["cat", "/etc/distcc-agent/agent.toml"]).unwrap();
    let edited = config.replace("allow = []", &format!("allow = [\"{}\"]", bed.subnet()));
    assert_ne!(edited, config);
    w.write_file("/etc/distcc-agent/agent.toml", &edited, 0o644)
        .unwrap();
    w.exec_ok(&["systemctl", "reload", "distcc-agent"]).unwrap();
    eventually("distccd bootstrapped", || {
        show(&w, "distccd", "ActiveState") == "active"
    });
    assert_eq!(show(&w, "distccd", "UnitFileState"), "enabled");

    // The builder sees the worker ready.
    let token = w.exec_ok(&["cat", "/etc/distcc-agent/read.token"]).unwrap();
    let (trusted, out) = builderctl(tmp.path(), w.ip(), token.trim(), &["trust", "--yes"]);
    assert!(trusted, "{out}");
    assert!(
        out.contains(fingerprint.trim()),
        "trust shows {fingerprint}: {out}"
    );
    eventually("the builder sees the worker ready", || {
        builder_status(tmp.path(), w.ip(), token.trim()).0
    });
    let (_, json) = builder_status(tmp.path(), w.ip(), token.trim());
    assert!(
        json.contains(&format!("\"agent_version\": \"{OLD}\"")),
        "{json}"
    );

    // Upgrade while a build runs through this worker.
    let distccd_pid = show(&w, "distccd", "MainPID");
    let agent_pid = show(&w, "distcc-agent", "MainPID");
    let mut build = start_build(tmp.path(), w.ip());
    eventually("compiles arrive at the worker", || {
        w.journal("distccd.service", 50).contains("COMPILE_OK")
    });
    apt(&w, &["install", "--only-upgrade", "distcc-agent"]);
    assert!(
        build.try_wait().unwrap().is_none(),
        "the build was still running when the upgrade finished"
    );
    assert_ne!(
        show(&w, "distcc-agent", "MainPID"),
        agent_pid,
        "the agent was restarted"
    );
    assert_eq!(
        show(&w, "distccd", "MainPID"),
        distccd_pid,
        "distccd was not"
    );
    let status = build.wait().unwrap();
    assert!(status.success(), "the build survived the upgrade: {status}");
    let version = w
        .exec_ok(&["dpkg-query", "-W", "-f=${Version}", "distcc-agent"])
        .unwrap();
    assert_eq!(
        version,
        format!("{NEW}-1"),
        "build-debs adds the Debian revision"
    );
    eventually("the agent reports the new version", || {
        builder_status(tmp.path(), w.ip(), token.trim())
            .1
            .contains(&format!("\"agent_version\": \"{NEW}\""))
    });
    assert_eq!(
        w.exec_ok(&["distcc-agent", "--fingerprint"]).unwrap(),
        fingerprint,
        "the upgrade kept the worker's certificate (the builder's pin still holds)"
    );
    let config_after = w.exec_ok(&["cat", "/etc/distcc-agent/agent.toml"]).unwrap();
    assert_eq!(
        config_after, edited,
        "the operator's edit survived the upgrade"
    );

    // The builder package: its unit verifies, its completions and man page are in place.
    apt(&w, &["install", "distcc-builder"]);
    w.exec_ok(&[
        "systemd-analyze",
        "verify",
        "--man=no",
        "/usr/lib/systemd/system/distcc-builder.service",
    ])
    .unwrap();
    assert_eq!(
        show(&w, "distcc-builder", "UnitFileState"),
        "disabled",
        "off until configured"
    );
    for file in [
        "/usr/share/bash-completion/completions/builderctl",
        "/usr/share/zsh/vendor-completions/_builderctl",
        "/usr/share/man/man1/builderctl.1.gz",
        "/etc/distcc-builder/builder.toml",
    ] {
        assert!(
            w.exec(&["test", "-s", file]).unwrap().status.success(),
            "{file}"
        );
    }
    // The build node's daemon: its user and the builders' group exist, the session socket
    // is enabled and listening (users' sessions start the daemon through it), the token
    // directory's hosts file may be replaced by the daemon, the polkit rule and the
    // workspace template are in place.
    assert_eq!(
        show(&w, "distcc-builder.socket", "UnitFileState"),
        "enabled"
    );
    assert_eq!(show(&w, "distcc-builder.socket", "ActiveState"), "active");
    assert_eq!(
        w.exec_ok(&[
            "stat",
            "-c",
            "%a %U:%G %F",
            "/run/distcc-builder/session.sock"
        ])
        .unwrap()
        .trim(),
        "660 distcc-builder:distcc-build socket"
    );
    assert_eq!(
        w.exec_ok(&["stat", "-c", "%a %U:%G", "/etc/distcc"])
            .unwrap()
            .trim(),
        "775 root:distcc-builder"
    );
    for file in [
        "/usr/share/polkit-1/rules.d/50-distcc-builder.rules",
        "/usr/lib/systemd/system/distcc-workspace@.service",
        "/usr/lib/systemd/system/distcc-builder.socket",
        "/usr/lib/sysusers.d/distcc-builder.conf",
    ] {
        assert!(
            w.exec(&["test", "-s", file]).unwrap().status.success(),
            "{file}"
        );
    }
    w.exec_ok(&["getent", "passwd", "distcc-builder"]).unwrap();
    w.exec_ok(&["getent", "group", "distcc-build"]).unwrap();
    apt(&w, &["purge", "distcc-builder"]);
    assert!(
        !w.exec(&["getent", "passwd", "distcc-builder"])
            .unwrap()
            .status
            .success(),
        "purge removes the daemon's user"
    );
    assert!(
        !w.exec(&["dpkg-statoverride", "--list", "/etc/distcc"])
            .unwrap()
            .status
            .success(),
        "purge removes the statoverride"
    );

    // Remove stops both services; purge leaves no unit, state or user behind.
    apt(&w, &["remove", "distcc-agent"]);
    assert_eq!(show(&w, "distcc-agent", "ActiveState"), "inactive");
    assert_eq!(show(&w, "distccd", "ActiveState"), "inactive");
    assert_eq!(show(&w, "distccd-log.socket", "ActiveState"), "inactive");
    apt(&w, &["purge", "distcc-agent"]);
    for unit in ["distcc-agent", "distccd", "distccd-log.socket"] {
        assert_eq!(show(&w, unit, "LoadState"), "not-found", "{unit}");
    }
    for path in ["/var/lib/distcc-agent", "/etc/distcc-agent"] {
        assert!(
            w.exec(&["test", "-e", path]).unwrap().status.code() == Some(1),
            "{path} is gone"
        );
    }
    assert!(
        !w.exec(&["getent", "passwd", "distcc-agent"])
            .unwrap()
            .status
            .success(),
        "user removed"
    );
    assert!(
        !w.exec(&["pgrep", "-f", "distcc-agent|distccd --no-detach"])
            .unwrap()
            .status
            .success()
    );
}
