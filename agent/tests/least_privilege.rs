//! The agent is not root-equivalent: proof against real systemd 252, D-Bus and polkit in a
//! test-bed worker installed from the repository's `systemd/` folder.
//!
//! Every probe runs as a process with the agent's user AND the agent unit's confinement
//! (the `[Service]` settings of `systemd/distcc-agent.service`, given to `systemd-run`),
//! so a capability or group added to the unit later is tested too. Keep this test: any
//! widening of `systemd/distcc-agent.rules` or of the unit must fail it.
//!
//! Needs root. Run with `cargo test -p distcc-agent --test least_privilege`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use distcc_testbed::{AgentInstall, Rootfs, Testbed, Worker, agent_config};

const AGENT_USER: &str = "distcc-agent";
/// An unrelated running service, installed by the test; the agent must not touch it.
const PROBE_UNIT: &str = "privilege-probe.service";
/// A unit file in the agent's own writable state directory, as a taken-over agent would
/// write one to get code run as root at the next boot.
const PLANTED_UNIT: &str = "/var/lib/distcc-agent/planted.service";

/// Settings of the agent's `[Service]` section that are about starting and supervising
/// the agent, not about what it may do; everything else is applied to the probes.
const LIFECYCLE_KEYS: &[&str] = &[
    "Type",
    "NotifyAccess",
    "ExecStartPre",
    "ExecStart",
    "ExecReload",
    "WatchdogSec",
    "Restart",
    "RestartSec",
    "TimeoutStopSec",
];

/// Every confinement setting (`KEY=VALUE`) of the agent's unit file: `User=`, `Group=`,
/// `CapabilityBoundingSet=`, `NoNewPrivileges=`, the syscall filter and all.
fn agent_confinement(unit_file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(unit_file).unwrap();
    let mut in_service = false;
    let mut args = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, _) = line.split_once('=').expect("KEY=VALUE");
        if !LIFECYCLE_KEYS.contains(&key) {
            args.push(line.to_owned());
        }
    }
    assert!(
        args.iter().any(|a| a == "User=distcc-agent")
            && args.iter().any(|a| a == "CapabilityBoundingSet="),
        "the agent's unit lost its user or its empty capability set: {args:?}"
    );
    args
}

struct Probe {
    worker: Worker,
    confinement: Vec<String>,
}

impl Probe {
    /// Run `argv` in the worker as a transient service with the agent's confinement,
    /// but as `user` (the agent's, or another one for contrast).
    fn run_as(&self, user: &str, argv: &[&str]) -> Output {
        let user_setting = format!("User={user}");
        let mut command: Vec<&str> =
            vec!["systemd-run", "--quiet", "--collect", "--pipe", "--wait"];
        for setting in &self.confinement {
            // Group= names the agent's group, which another user is not in, and
            // StateDirectory= would hand the agent's directory to that user.
            if user != AGENT_USER
                && ["Group=", "StateDirectory"]
                    .iter()
                    .any(|k| setting.starts_with(k))
            {
                continue;
            }
            command.push("-p");
            command.push(if setting.starts_with("User=") {
                &user_setting
            } else {
                setting
            });
        }
        command.push("--");
        command.extend_from_slice(argv);
        self.worker.exec(&command).unwrap()
    }

    fn as_agent(&self, argv: &[&str]) -> Output {
        self.run_as(AGENT_USER, argv)
    }

    /// A systemd Manager method called over D-Bus with busctl as the agent.
    fn manager_call(&self, method: &str, signature: &str, args: &[&str]) -> Output {
        let mut argv = vec![
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            method,
            signature,
        ];
        argv.extend_from_slice(args);
        self.as_agent(&argv)
    }

    fn show(&self, unit: &str, property: &str) -> String {
        self.worker
            .exec_ok(&["systemctl", "show", "-P", property, unit])
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Poll until `unit`'s ActiveState is `state`; the bound only keeps a broken build
    /// from hanging CI.
    fn wait_active_state(&self, unit: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.show(unit, "ActiveState");
            if now == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{unit} stayed {now}, never {state}:\n{}",
                self.worker.journal(unit, 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `pkcheck` as root about the running agent process: exit status 0 means authorised.
    fn pkcheck(&self, agent_pid: &str, action: &str, details: &[(&str, &str)]) -> Output {
        let mut argv = vec!["pkcheck", "--action-id", action, "--process", agent_pid];
        for (key, value) in details {
            argv.extend_from_slice(&["--detail", key, value]);
        }
        self.worker.exec(&argv).unwrap()
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Refused by polkit (not failed for another reason, such as a malformed call).
#[track_caller]
fn assert_refused(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && (stderr.contains("Interactive authentication required")
                || stderr.contains("Access denied")),
        "{what} was not refused as unauthorised: {}",
        text(out)
    );
}

#[track_caller]
fn assert_ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed: {}", text(out));
}

fn boot() -> (Testbed, Probe) {
    Rootfs::ensure().expect("test-bed root filesystem");
    let bed = Testbed::create().expect("test-bed network");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let install = AgentInstall {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_distcc-agent")),
        repo: repo.clone(),
    };
    let worker = bed
        .boot_agent_worker("w1", &install, &agent_config(&bed, 2), |spec| spec)
        .expect("boot a worker running the agent");
    let confinement = agent_confinement(&repo.join("systemd/distcc-agent.service"));
    (
        bed,
        Probe {
            worker,
            confinement,
        },
    )
}

#[test]
fn the_agent_user_manages_distccd_and_nothing_else() {
    let (_bed, p) = boot();
    let w = &p.worker;
    let agent_pid = p.show("distcc-agent.service", "MainPID");

    // The running agent: no root, no capability, no privilege gain, no journal group.
    let status = w
        .exec_ok(&["cat", &format!("/proc/{agent_pid}/status")])
        .unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(field("Uid").iter().all(|uid| uid != "0"), "{status}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps}: {status}");
    }
    assert_eq!(field("NoNewPrivs"), ["1"]);
    let journal_gid = w
        .exec_ok(&["getent", "group", "systemd-journal"])
        .unwrap()
        .split(':')
        .nth(2)
        .unwrap()
        .to_owned();
    assert!(
        !field("Groups").contains(&journal_gid),
        "the agent is in systemd-journal: {status}"
    );

    // Install an unrelated service (running) and plant a unit file where the agent can
    // write, then try what a taken-over agent would.
    w.write_file(
        format!("/etc/systemd/system/{PROBE_UNIT}"),
        "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
        0o644,
    )
    .unwrap();
    w.exec_ok(&["systemctl", "daemon-reload"]).unwrap();
    w.exec_ok(&["systemctl", "start", PROBE_UNIT]).unwrap();
    w.write_file(
        PLANTED_UNIT,
        "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
        0o644,
    )
    .unwrap();
    w.exec_ok(&["chown", AGENT_USER, PLANTED_UNIT]).unwrap();
    let default_target = w.exec_ok(&["systemctl", "get-default"]).unwrap();
    let distccd_pid = p.show("distccd.service", "MainPID");

    for (method, signature, args) in [
        (
            "LinkUnitFiles",
            "asbb",
            &["1", PLANTED_UNIT, "false", "false"][..],
        ),
        (
            "EnableUnitFiles",
            "asbb",
            &["1", PLANTED_UNIT, "false", "false"],
        ),
        (
            "EnableUnitFiles",
            "asbb",
            &["1", PROBE_UNIT, "false", "false"],
        ),
        (
            "MaskUnitFiles",
            "asbb",
            &["1", PROBE_UNIT, "false", "false"],
        ),
        (
            "DisableUnitFiles",
            "asb",
            &["1", "distccd.service", "false"],
        ),
        ("SetDefaultTarget", "sb", &["rescue.target", "true"]),
        ("Reload", "", &[]),
        ("StopUnit", "ss", &[PROBE_UNIT, "replace"]),
        ("RestartUnit", "ss", &[PROBE_UNIT, "replace"]),
        ("StartUnit", "ss", &["rescue.target", "replace"]),
        (
            "SetUnitProperties",
            "sba(sv)",
            &[PROBE_UNIT, "true", "1", "CPUWeight", "t", "50"],
        ),
        // A transient unit runs whatever it is given, as root.
        (
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            &[
                "planted-transient.service",
                "fail",
                "1",
                "ExecStart",
                "a(sasb)",
                "1",
                "/bin/true",
                "1",
                "/bin/true",
                "false",
                "0",
            ],
        ),
        // On distccd itself, only the verbs the agent uses.
        ("KillUnit", "ssi", &["distccd.service", "all", "9"]),
        ("ReloadOrRestartUnit", "ss", &["distccd.service", "replace"]),
    ] {
        let out = p.manager_call(method, signature, args);
        assert_refused(&format!("{method} {args:?}"), &out);
    }
    // Nothing changed.
    assert_eq!(p.show(PROBE_UNIT, "ActiveState"), "active");
    assert_eq!(p.show(PROBE_UNIT, "UnitFileState"), "disabled");
    assert_eq!(p.show("planted.service", "LoadState"), "not-found");
    assert_eq!(
        p.show("planted-transient.service", "LoadState"),
        "not-found"
    );
    assert_eq!(
        w.exec_ok(&["systemctl", "get-default"]).unwrap(),
        default_target
    );
    assert_eq!(p.show("distccd.service", "UnitFileState"), "enabled");
    assert_eq!(p.show("distccd.service", "MainPID"), distccd_pid);

    // polkit's own verdict about the running agent process.
    for action in [
        "org.freedesktop.systemd1.manage-unit-files",
        "org.freedesktop.systemd1.reload-daemon",
    ] {
        let out = p.pkcheck(&agent_pid, action, &[]);
        assert!(!out.status.success(), "{action} authorised: {}", text(&out));
    }
    for (unit, verb, authorised) in [
        ("distccd.service", "start", true),
        ("distccd.service", "stop", true),
        ("distccd.service", "restart", true),
        ("distccd.service", "reset-failed", true),
        ("distccd.service", "set-property", true),
        ("distccd.service", "kill", false),
        ("distccd.service", "clean", false),
        ("distccd.service", "reload-or-restart", false),
        (PROBE_UNIT, "start", false),
        (PROBE_UNIT, "stop", false),
        ("distcc-agent.service", "restart", false),
    ] {
        let out = p.pkcheck(
            &agent_pid,
            "org.freedesktop.systemd1.manage-units",
            &[("unit", unit), ("verb", verb)],
        );
        assert_eq!(
            out.status.success(),
            authorised,
            "manage-units {unit} {verb}: {}",
            text(&out)
        );
    }

    // Every distccd operation the agent uses still works, as the agent's user, over D-Bus.
    let distccd = "distccd.service";
    assert_ok(
        "StopUnit distccd",
        &p.manager_call("StopUnit", "ss", &[distccd, "replace"]),
    );
    p.wait_active_state(distccd, "inactive");
    assert_ok(
        "ResetFailedUnit distccd",
        &p.manager_call("ResetFailedUnit", "s", &[distccd]),
    );
    assert_ok(
        "StartUnit distccd",
        &p.manager_call("StartUnit", "ss", &[distccd, "replace"]),
    );
    p.wait_active_state(distccd, "active");
    let started_pid = p.show(distccd, "MainPID");
    assert_ok(
        "RestartUnit distccd",
        &p.manager_call("RestartUnit", "ss", &[distccd, "replace"]),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.show(distccd, "MainPID") == started_pid || p.show(distccd, "ActiveState") != "active" {
        assert!(
            Instant::now() < deadline,
            "RestartUnit did not restart distccd"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ok(
        "SetUnitProperties distccd",
        &p.manager_call(
            "SetUnitProperties",
            "sba(sv)",
            &[distccd, "true", "1", "CPUWeight", "t", "50"],
        ),
    );
    assert_eq!(p.show(distccd, "CPUWeight"), "50");

    // The rule is the agent's alone: another unprivileged user is refused the same call.
    let out = p.run_as(
        "nobody",
        &[
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "RestartUnit",
            "ss",
            distccd,
            "replace",
        ],
    );
    assert_refused("RestartUnit distccd as nobody", &out);
}

#[test]
fn the_agent_reads_distccd_log_lines_but_not_the_journal() {
    let (_bed, p) = boot();
    let w = &p.worker;

    // The system journal is closed to the agent's user: the agent's own start message,
    // which root sees, is not shown to it.
    let own_log = [
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "-u",
        "distcc-agent.service",
    ];
    let as_root = w.exec_ok(&own_log).unwrap();
    assert!(as_root.contains("first start"), "{as_root}");
    let as_agent = p.as_agent(&own_log);
    let shown = String::from_utf8_lossy(&as_agent.stdout);
    assert!(
        !shown.contains("first start"),
        "the agent reads the journal: {shown}"
    );

    // distccd's own lines come through distccd-log.socket, to the agent's user only.
    let read_socket = [
        "perl",
        "-MIO::Socket::UNIX",
        "-e",
        "my $s = IO::Socket::UNIX->new(Peer => '/run/distccd-log.sock') or die \"connect: $!\\n\"; print while <$s>;",
    ];
    let out = p.as_agent(&read_socket);
    assert_ok("reading distccd-log.socket as the agent", &out);
    let lines = String::from_utf8_lossy(&out.stdout);
    assert!(lines.contains("Started distccd.service"), "{lines}");
    assert!(
        lines.lines().count() <= 16 && !lines.contains("distcc-agent["),
        "more than distccd's last lines: {lines}"
    );
    let out = p.run_as("nobody", &read_socket);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "another user read distccd's log: {}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_checks_that_distccd_is_enabled_and_never_enables_it() {
    use distcc_proto::v1 as pb;
    use distcc_proto::v1::distcc_agent_client::DistccAgentClient;
    use distcc_testbed::TEST_TOKEN;

    let (_bed, p) = boot();
    let channel = common::AgentWorker::connect(&p.worker).await;
    let mut client =
        DistccAgentClient::with_interceptor(channel, |mut request: tonic::Request<()>| {
            let value = format!("Bearer {TEST_TOKEN}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
            Ok(request)
        });

    // An operator turned distccd off at boot: Bootstrap says how to undo that, and
    // leaves the unit file state alone (it could not change it anyway).
    p.worker
        .exec_ok(&["systemctl", "disable", "distccd.service"])
        .unwrap();
    let err = client.bootstrap(pb::BootstrapRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("`systemctl enable distccd`"),
        "{}",
        err.message()
    );
    assert_eq!(p.show("distccd.service", "UnitFileState"), "disabled");

    // Enabled again by the operator: Bootstrap checks, starts, and says so.
    p.worker
        .exec_ok(&["systemctl", "enable", "distccd.service"])
        .unwrap();
    p.worker
        .exec_ok(&["systemctl", "stop", "distccd.service"])
        .unwrap();
    let response = client
        .bootstrap(pb::BootstrapRequest {})
        .await
        .expect("Bootstrap")
        .into_inner();
    assert_eq!(response.unit.unwrap().active_state, "active");
    assert!(
        response
            .steps
            .iter()
            .any(|s| s == "distccd.service is enabled at boot"),
        "{:?}",
        response.steps
    );
}
