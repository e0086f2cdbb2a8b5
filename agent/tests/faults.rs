//! Faults the agent survives (issue 10, section 6), each against real systemd, D-Bus and
//! distccd in a test-bed worker: the bus restarted under it, the agent SIGKILLed in the
//! middle of a Configure, a Configure to a port another program holds or to an address
//! the worker does not have, a wedged bus starving the watchdog, SIGTERM during a reload.
//!
//! Needs root. Run with `cargo test -p distcc-agent --test faults`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{AgentWorker, bed, eventually, eventually_within, remote_compile};
use distcc_proto::v1 as pb;
use distcc_testbed::Worker as Container;
use tonic::Code;

fn show(container: &Container, unit: &str, property: &str) -> String {
    container
        .exec_ok(&["systemctl", "show", "-P", property, unit])
        .unwrap()
        .trim()
        .to_owned()
}

/// CPU time (user + system) the process `pid` of the container has used so far.
fn cpu_time(container: &Container, pid: &str) -> Duration {
    let stat = container
        .exec_ok(&["cat", &format!("/proc/{pid}/stat")])
        .unwrap();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / per_sec)
}

/// A drop-in that holds distccd's start in `ExecStartPre` until `/run/distccd-go` exists,
/// so a test can act while a restart job is pending (a gate, not a delay).
fn gate_distccd_start(container: &Container) {
    container
        .write_file(
            "/etc/systemd/system/distccd.service.d/gate.conf",
            "[Service]\nExecStartPre=/bin/sh -c 'while [ ! -e /run/distccd-go ]; do sleep 0.1; done'\n",
            0o644,
        )
        .unwrap();
    container.exec_ok(&["systemctl", "daemon-reload"]).unwrap();
}

/// Poll until distccd's restart job is held at the gate.
async fn distccd_held_at_gate(container: &Container) {
    eventually("distccd held in ExecStartPre", || async {
        show(container, "distccd", "ActiveState") == "activating"
            && show(container, "distccd", "SubState") == "start-pre"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_dbus_restart_without_exit_or_busy_loop() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    let agent_pid = show(&w.container, "distcc-agent", "MainPID");
    let distccd_pid = w.status().await.unit.unwrap().main_pid;
    let cpu_before = cpu_time(&w.container, &agent_pid);
    let restarted_at = Instant::now();

    w.container
        .exec_ok(&["systemctl", "restart", "dbus"])
        .unwrap();

    // Status is right again within 10 s: the unit's state read over a new connection.
    eventually_within(
        Duration::from_secs(10),
        "a correct Status after the bus restart",
        || async {
            let Ok(status) = w
                .client()
                .status(pb::StatusRequest {
                    skip_compilers: true,
                })
                .await
            else {
                return false;
            };
            let unit = status.into_inner().unit.unwrap();
            unit.active_state == "active" && unit.main_pid == distccd_pid
        },
    )
    .await;
    let recovered_after = restarted_at.elapsed();

    // The change stream was re-subscribed: a killed distccd shows up in WatchStatus first
    // as the restart in progress (RestartSec=2s), which a D-Bus signal reports at once;
    // without signals only the monitor's 10 s tick would, and mostly after the restart.
    let mut stream = w
        .client()
        .watch_status(pb::WatchStatusRequest {
            interval_ms: 600_000,
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("first status");
    w.container
        .exec_ok(&["kill", "-9", &distccd_pid.to_string()])
        .unwrap();
    let transition = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let unit = stream
                .message()
                .await
                .unwrap()
                .expect("stream open")
                .unit
                .unwrap();
            if unit.main_pid != distccd_pid {
                return unit;
            }
        }
    })
    .await
    .expect("a status change within 30 s");
    assert_ne!(
        transition.active_state, "active",
        "the first change seen is the restart in progress, from a signal: {transition:?}"
    );
    drop(stream);
    eventually("distccd active again", || async {
        w.status().await.unit.unwrap().active_state == "active"
    })
    .await;
    // An observation window, not a wait for anything: a spinning loop (the old agent's,
    // at 83 % of a CPU) shows in a few seconds of CPU time; Status stays right meanwhile.
    let observe_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < observe_until {
        let status = w.status().await;
        assert_eq!(status.unit.unwrap().active_state, "active");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu_used = cpu_time(&w.container, &agent_pid).saturating_sub(cpu_before);
    let window = restarted_at.elapsed();

    // Same process (no exit, no restart loop), and no busy loop: before the fix the agent
    // spun at 83 % of a CPU. A generous bound: the agent also served the test's calls.
    assert_eq!(show(&w.container, "distcc-agent", "MainPID"), agent_pid);
    assert_eq!(show(&w.container, "distcc-agent", "NRestarts"), "0");
    assert!(
        cpu_used < window / 4,
        "the agent used {cpu_used:?} of CPU in {window:?} (recovered after {recovered_after:?})"
    );
    let journal = w.container.journal("distcc-agent.service", 40);
    assert!(
        journal.contains("reconnected to the system bus"),
        "{journal}"
    );
    eprintln!(
        "recovered {recovered_after:?} after `systemctl restart dbus`; agent CPU {cpu_used:?} over {window:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_configure_leaves_one_set_and_drift_is_reported() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    let agent_pid = show(&w.container, "distcc-agent", "MainPID");
    let status = w.status().await;
    let runtime = status.runtime.unwrap();
    assert!(runtime.error.is_empty(), "{runtime:?}");
    assert_eq!(runtime.pid, status.unit.unwrap().main_pid);
    assert!(runtime.drift.is_empty(), "{:?}", runtime.drift);
    assert!(runtime.argv.iter().any(|a| a == "--allow"), "{runtime:?}");

    // Configure jobs = 5, and SIGKILL the agent while distccd's restart job is pending.
    gate_distccd_start(&w.container);
    let mut client = w.client();
    let configure = tokio::spawn(async move {
        client
            .configure(pb::ConfigureRequest {
                jobs: Some(5),
                ..Default::default()
            })
            .await
    });
    distccd_held_at_gate(&w.container).await;
    w.container.exec_ok(&["kill", "-9", &agent_pid]).unwrap();
    let answer = configure.await.unwrap();
    assert!(
        answer.is_err(),
        "the killed agent cannot have answered: {answer:?}"
    );
    w.container.exec_ok(&["touch", "/run/distccd-go"]).unwrap();

    // systemd restarts the agent; distccd runs one consistent set: the persisted one.
    eventually("the agent restarted and distccd active", || async {
        let pid = show(&w.container, "distcc-agent", "MainPID");
        if pid == agent_pid || pid == "0" {
            return false;
        }
        match w
            .client()
            .status(pb::StatusRequest {
                skip_compilers: true,
            })
            .await
        {
            Ok(s) => s.into_inner().unit.unwrap().active_state == "active",
            Err(_) => false,
        }
    })
    .await;
    assert_eq!(show(&w.container, "distcc-agent", "NRestarts"), "1");
    let status = w.status().await;
    let runtime = status.runtime.unwrap();
    assert_eq!(status.settings.unwrap().jobs, 5);
    assert!(runtime.drift.is_empty(), "{:?}", runtime.drift);
    let cmdline = w.distccd_cmdline(runtime.pid);
    assert!(cmdline.contains("--jobs 5"), "{cmdline}");
    assert_eq!(runtime.argv.join(" "), cmdline.trim_end());
    remote_compile(w.container.ip()).expect("distccd serves after the agent's restart");

    // distccd started with something else than the persisted settings (here an operator's
    // drop-in; equally a Configure killed between writing and restarting): Status says so.
    w.container
        .write_file(
            "/etc/systemd/system/distccd.service.d/operator.conf",
            "[Service]\nExecStart=\nExecStart=/usr/bin/distccd --no-detach --daemon --log-stderr $DISTCCD_OPTS --jobs 9\n",
            0o644,
        )
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "daemon-reload"])
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "restart", "distccd"])
        .unwrap();
    eventually("Status reports the drift", || async {
        w.status().await.runtime.unwrap().drift == ["--jobs: distccd runs 9, persisted 5"]
    })
    .await;
    // And so does `systemctl status distcc-agent` (its STATUS= line, set by the monitor).
    eventually("the STATUS= line reports the drift", || async {
        show(&w.container, "distcc-agent", "StatusText").ends_with(
            "distccd does not run the persisted settings (--jobs: distccd runs 9, persisted 5)",
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn configure_to_a_held_port_or_a_foreign_address_rolls_back() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    let mut client = w.client();
    // Another program holding a port: a root-owned listener.
    w.container
        .exec_ok(&[
            "systemd-run",
            "--unit=squatter",
            "systemd-socket-activate",
            "--listen=0.0.0.0:3700",
            "/bin/cat",
        ])
        .unwrap();
    eventually("the squatter listens on 3700", || async {
        w.container
            .exec_ok(&["cat", "/proc/net/tcp"])
            .unwrap()
            .lines()
            .any(|l| l.contains(":0E74 00000000:0000 0A"))
    })
    .await;

    for (request, holder) in [
        // The agent's own gRPC port: the holder is visible by pid and name.
        (
            pb::ConfigureRequest {
                port: Some(3634),
                ..Default::default()
            },
            Some("distcc-agent (pid "),
        ),
        // A root process's: the unprivileged agent sees its user only.
        (
            pb::ConfigureRequest {
                port: Some(3700),
                ..Default::default()
            },
            Some("a process of user root on 0.0.0.0:3700"),
        ),
        // An address the worker does not have (documentation range; distccd only fails
        // to bind it, nothing is sent there).
        (
            pb::ConfigureRequest {
                listen: Some("203.0.113.9".to_owned()),
                ..Default::default()
            },
            None,
        ),
    ] {
        let err = match client.configure(request.clone()).await {
            Err(err) => err,
            Ok(ok) => panic!(
                "{request:?} answered OK: {ok:?}\n{}\n{}",
                w.container
                    .exec_ok(&[
                        "sh",
                        "-c",
                        "cat /proc/net/tcp /proc/net/tcp6; ps -eo pid,user,comm,args"
                    ])
                    .unwrap(),
                w.container.journal("distccd.service", 20)
            ),
        };
        assert_eq!(err.code(), Code::Aborted, "{request:?}: {err}");
        let message = err.message();
        assert!(
            message.contains("restored the previous settings"),
            "{message}"
        );
        if let Some(holder) = holder {
            assert!(
                message.contains(&format!("is held by {holder}"))
                    && message.contains("not distccd"),
                "{message}"
            );
        }
        // Rolled back: the old settings, distccd serving on the old port.
        let status = w.status().await;
        let settings = status.settings.unwrap();
        assert_eq!((settings.port, settings.listen.as_str()), (3632, "0.0.0.0"));
        assert_eq!(status.unit.unwrap().active_state, "active");
        assert!(status.runtime.unwrap().drift.is_empty());
        eventually("a remote compile on the old port", || async {
            remote_compile(w.container.ip()).is_ok()
        })
        .await;
    }

    // Validate's port check counts distccd's own listener only.
    let report = w
        .client()
        .validate(pb::ValidateRequest {})
        .await
        .unwrap()
        .into_inner();
    let port = report
        .checks
        .iter()
        .find(|c| c.name == "port-listening")
        .unwrap();
    assert!(
        port.passed && port.reason.starts_with("distccd listens"),
        "{port:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_restarts_an_agent_whose_monitor_is_wedged() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    // A short watchdog for the test; the shipped unit has 30 s.
    w.container
        .write_file(
            "/etc/systemd/system/distcc-agent.service.d/watchdog.conf",
            "[Service]\nWatchdogSec=4s\n",
            0o644,
        )
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "daemon-reload"])
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "restart", "distcc-agent"])
        .unwrap();
    assert_eq!(show(&w.container, "distcc-agent", "WatchdogUSec"), "4s");
    let agent_pid = show(&w.container, "distcc-agent", "MainPID");

    // Healthy: fed, repeatedly, for longer than one watchdog period.
    let pings = std::sync::Mutex::new(Vec::new());
    eventually("six watchdog pings", || async {
        let stamp = show(&w.container, "distcc-agent", "WatchdogTimestampMonotonic");
        let mut pings = pings.lock().unwrap();
        if pings.last() != Some(&stamp) {
            pings.push(stamp);
        }
        pings.len() > 6
    })
    .await;
    assert_eq!(show(&w.container, "distcc-agent", "MainPID"), agent_pid);

    // Freeze the bus: the agent's process, server and signal loop live on, but its monitor
    // can no longer complete a round trip. It must stop feeding, and systemd restart it.
    let dbus = show(&w.container, "dbus", "MainPID");
    w.container.exec_ok(&["kill", "-STOP", &dbus]).unwrap();
    eventually("systemd's watchdog restarted the agent", || async {
        show(&w.container, "distcc-agent", "NRestarts") != "0"
    })
    .await;
    w.container.exec_ok(&["kill", "-CONT", &dbus]).unwrap();
    let journal = w.container.journal("distcc-agent.service", 80);
    assert!(
        journal.contains("not feeding the watchdog") && journal.contains("Watchdog timeout"),
        "{journal}"
    );

    // With the bus back, a fresh agent serves.
    eventually("the restarted agent serves", || async {
        show(&w.container, "distcc-agent", "ActiveState") == "active"
            && w.client()
                .status(pb::StatusRequest {
                    skip_compilers: true,
                })
                .await
                .is_ok()
    })
    .await;
    assert_ne!(show(&w.container, "distcc-agent", "MainPID"), agent_pid);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_reload_exits_cleanly_within_timeout_stop() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    gate_distccd_start(&w.container);
    // A changed [distccd] section: the reload restarts distccd, which waits at the gate.
    // Its job timeout (60 s) is longer than TimeoutStopSec, so an agent that finished the
    // reload before stopping would be killed at the timeout.
    let config = w
        .container
        .exec_ok(&["cat", "/etc/distcc-agent/agent.toml"])
        .unwrap();
    w.container
        .write_file(
            "/etc/distcc-agent/agent.toml",
            config
                .replace("jobs = 3", "jobs = 5")
                .replace("job_timeout_secs = 15", "job_timeout_secs = 60")
                .as_bytes(),
            0o644,
        )
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "reload", "--no-block", "distcc-agent"])
        .unwrap();
    distccd_held_at_gate(&w.container).await;

    let stop_started = Instant::now();
    w.container
        .exec_ok(&["systemctl", "stop", "distcc-agent"])
        .unwrap();
    let took = stop_started.elapsed();
    let timeout_stop = show(&w.container, "distcc-agent", "TimeoutStopUSec");
    assert_eq!(timeout_stop, "30s");
    assert!(took < Duration::from_secs(30), "stop took {took:?}");
    // Exited by itself with success: not killed at the timeout (Result would be "timeout").
    assert_eq!(
        (
            show(&w.container, "distcc-agent", "Result").as_str(),
            show(&w.container, "distcc-agent", "ExecMainStatus").as_str()
        ),
        ("success", "0")
    );
    let journal = w.container.journal("distcc-agent.service", 30);
    assert!(journal.contains("stopping anyway"), "{journal}");

    // The restart job the reload issued completes in systemd; distccd then runs the
    // persisted settings, and a started agent finds no drift.
    w.container.exec_ok(&["touch", "/run/distccd-go"]).unwrap();
    w.container
        .exec_ok(&["systemctl", "start", "distcc-agent"])
        .unwrap();
    eventually("distccd active with the reloaded settings", || async {
        let status = w.status().await;
        status.unit.unwrap().active_state == "active" && status.settings.unwrap().jobs == 5
    })
    .await;
    let runtime = w.status().await.runtime.unwrap();
    assert!(runtime.drift.is_empty(), "{:?}", runtime.drift);
    assert!(
        runtime.argv.join(" ").contains("--jobs 5"),
        "{:?}",
        runtime.argv
    );
}
