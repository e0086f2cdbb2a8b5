//! The agent against real systemd, D-Bus, polkit and distccd: each test boots a
//! systemd-nspawn worker in its own network namespace (see `distcc-testbed`), installs
//! the agent binary and the project's unit files, polkit rule, sysusers and tmpfiles
//! snippets, and drives it over gRPC from the root namespace, which acts as the builder.
//!
//! Needs root (namespaces, nspawn). Run with `cargo test -p distcc-agent --test worker_in_container`.

// A failed step should fail the test loudly, with the value that was not there.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{AgentWorker, TOKEN, bed, eventually, remote_compile};
use distcc_proto::v1 as pb;
use distcc_proto::v1::distcc_agent_client::DistccAgentClient;
use distcc_testbed::{
    AGENT_PORT, AgentInstall, TEST_READ_TOKEN, TEST_TOKEN, agent_config, tokens_file,
};
use tonic::Code;
use tonic::transport::Channel;

/// Read and admin roles, two admins racing, the audit trail in the journal, and a token
/// revoked by `systemctl reload` while its WatchStatus stream is open.
#[tokio::test(flavor = "multi_thread")]
async fn roles_generations_audit_and_rotation() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    let read = || w.client_with(Some(TEST_READ_TOKEN));

    // The read role reads...
    let status = read()
        .status(pb::StatusRequest::default())
        .await
        .expect("Status with the read token")
        .into_inner();
    read()
        .validate(pb::ValidateRequest {})
        .await
        .expect("Validate with the read token");
    // ...and changes nothing.
    let jobs = pb::ConfigureRequest {
        jobs: Some(7),
        ..Default::default()
    };
    let err = read().configure(jobs.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let err = read()
        .control(pb::ControlRequest {
            action: pb::ControlAction::Restart as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert_eq!(w.status().await.settings.unwrap().jobs, 3);

    // Two admins who both read the same generation: the first wins, the second is told.
    let generation = status.settings_generation;
    assert!(generation >= 1, "persisted at first start: {generation}");
    let first = w
        .client()
        .configure(pb::ConfigureRequest {
            expected_generation: Some(generation),
            ..jobs.clone()
        })
        .await
        .expect("Configure at the current generation")
        .into_inner();
    assert_eq!(first.generation, generation + 1);
    let err = w
        .client()
        .configure(pb::ConfigureRequest {
            jobs: Some(2),
            expected_generation: Some(generation),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let after = w.status().await;
    assert_eq!(
        (after.settings.unwrap().jobs, after.settings_generation),
        (7, generation + 1)
    );

    // Every admin action is in the journal with who asked, as fields of their own.
    let audit = || {
        w.container
            .exec_ok(&[
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
                "--output-fields=MESSAGE,TOKEN_ID,PEER,OUTCOME",
                "-u",
                "distcc-agent.service",
                "AUDIT=Configure",
                "TOKEN_ID=testbed-admin",
            ])
            .unwrap_or_default()
    };
    eventually("the audit trail has both Configures", || {
        let text = audit();
        async move { text.matches("Configure by testbed-admin").count() >= 2 }
    })
    .await;
    let text = audit();
    assert!(text.contains("jobs=7") && text.contains("failed"), "{text}");
    assert!(
        text.contains(&bed.host_ip().to_string()),
        "the peer address: {text}"
    );
    assert!(!text.contains(TEST_TOKEN), "never the token: {text}");

    // Rotation: a stream opened with the read token ends once the token is revoked.
    let mut stream = read()
        .watch_status(pb::WatchStatusRequest { interval_ms: 1000 })
        .await
        .expect("WatchStatus with the read token")
        .into_inner();
    stream.message().await.expect("first status").expect("some");
    w.container
        .write_file(
            "/etc/distcc-agent/tokens",
            tokens_file(&[("admin", "testbed-admin", TEST_TOKEN)]),
            0o640,
        )
        .unwrap();
    w.container
        .exec_ok(&["chgrp", "distcc-agent", "/etc/distcc-agent/tokens"])
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "reload", "distcc-agent"])
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream of a revoked token ends");
    assert_eq!(ended.unwrap_err().code(), Code::Unauthenticated);
    let err = read()
        .status(pb::StatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    w.status().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_auth_compile_and_validate() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;

    // The shipped units pass systemd's own verifier (no man pages in the container).
    w.container
        .exec_ok(&[
            "systemd-analyze",
            "verify",
            "--man=no",
            "/etc/systemd/system/distcc-agent.service",
            "/etc/systemd/system/distccd.service",
        ])
        .expect("systemd-analyze verify");

    // sd-notify: READY reached (systemctl start returned) and a readable STATUS= line.
    let status_text = w
        .container
        .exec_ok(&["systemctl", "show", "-P", "StatusText", "distcc-agent"])
        .unwrap();
    assert!(status_text.starts_with("distccd active"), "{status_text}");
    // The agent runs as its own unprivileged user.
    let user = w
        .container
        .exec_ok(&["systemctl", "show", "-P", "User", "distcc-agent"])
        .unwrap();
    assert_eq!(user.trim(), "distcc-agent");

    // No token, wrong token: Unauthenticated. Health needs none.
    for token in [None, Some("wrong-token-0123456789abcdef")] {
        let err = w
            .client_with(token)
            .status(pb::StatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err}");
    }
    assert_eq!(
        w.health().await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // First start bootstrapped distccd with the configured settings.
    let status = w.status().await;
    let unit = status.unit.clone().unwrap();
    assert_eq!(
        (unit.active_state.as_str(), unit.sub_state.as_str()),
        ("active", "running")
    );
    assert_eq!(unit.unit_file_state, "enabled");
    assert!(unit.main_pid > 0 && unit.state_since_usec > 0);
    assert_eq!(status.hostname, "w1");
    assert_eq!(status.agent_version, distcc_agent::VERSION);
    assert!(
        status.distcc_version.starts_with("distccd 3.4"),
        "{}",
        status.distcc_version
    );
    let settings = status.settings.clone().unwrap();
    assert_eq!(settings.allow, vec![bed.subnet().to_string()]);
    assert_eq!((settings.jobs, settings.nice, settings.port), (3, 10, 3632));
    let capacity = status.capacity.clone().unwrap();
    assert!(
        capacity.online_cpus >= 1 && capacity.mem_total_bytes > 0 && capacity.tmpdir_free_bytes > 0
    );
    let gcc = status
        .compilers
        .iter()
        .find(|c| c.name == "gcc")
        .expect("gcc masquerade link");
    assert!(gcc.version.contains("12."), "{gcc:?}");
    assert_eq!(gcc.target, "x86_64-linux-gnu");
    assert_eq!(gcc.fingerprint.len(), 64);
    let stats = status.stats.clone().unwrap();
    assert!(stats.available, "{}", stats.error);
    assert_eq!(stats.max_kids, 3);
    let cmdline = w.distccd_cmdline(unit.main_pid);
    assert!(
        cmdline.contains(&format!("--allow {}", bed.subnet())),
        "{cmdline}"
    );
    assert!(
        cmdline.contains("--jobs 3") && cmdline.contains("--nice 10"),
        "{cmdline}"
    );

    // A real compile from the builder, and distccd's statistics count it.
    remote_compile(w.container.ip()).expect("remote compile");
    let stats = w.status().await.stats.unwrap();
    assert_eq!(stats.compile_ok, 1, "{stats:?}");

    // Validate: every check passes on a healthy worker, by name.
    let report = w
        .client()
        .validate(pb::ValidateRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "distccd-installed",
            "unit-loaded",
            "unit-active",
            "port-listening",
            "allowlist-sane",
            "kernel-filter",
            "masquerade-links",
            "compilers-run",
            "tmpdir-space",
            "no-foreign-distccd",
            "transport-private"
        ]
    );
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.passed).collect();
    assert!(report.all_passed && failed.is_empty(), "{failed:?}");

    // Debian's own SysV distcc running beside ours is caught.
    w.container
        .exec_ok(&[
            "systemd-run",
            "--unit=rogue-distcc",
            "distccd",
            "--no-detach",
            "--daemon",
            "--port",
            "3700",
            "--allow",
            "127.0.0.1",
        ])
        .unwrap();
    let report = w
        .client()
        .validate(pb::ValidateRequest {})
        .await
        .unwrap()
        .into_inner();
    let foreign = report
        .checks
        .iter()
        .find(|c| c.name == "no-foreign-distccd")
        .unwrap();
    assert!(!foreign.passed && !report.all_passed, "{foreign:?}");
    assert!(!foreign.hint.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn configure_applies_validates_and_rolls_back() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    let mut client = w.client();
    let before = w.status().await.unit.unwrap().main_pid;

    // Narrow the allowlist to the builder alone: distccd restarts with it.
    let builder = format!("{}/32", bed.host_ip());
    let response = client
        .configure(pb::ConfigureRequest {
            allow: Some(pb::AllowList {
                cidrs: vec![builder.clone()],
            }),
            jobs: Some(2),
            ..Default::default()
        })
        .await
        .expect("Configure")
        .into_inner();
    assert!(response.changed);
    assert_eq!(
        response.applied.as_ref().unwrap().allow,
        vec![builder.clone()]
    );
    let unit = response.unit.unwrap();
    assert_eq!(unit.active_state, "active");
    assert_ne!(unit.main_pid, before, "distccd was restarted");
    let cmdline = w.distccd_cmdline(unit.main_pid);
    // distccd's own --allow is the policy's bound; the kernel filter has the allowlist.
    assert!(
        cmdline.contains(&format!("--allow {}", bed.subnet())) && cmdline.contains("--jobs 2"),
        "{cmdline}"
    );
    let filter = w
        .container
        .exec_ok(&["systemctl", "show", "-P", "IPAddressAllow", "distccd"])
        .unwrap();
    let mut filter: Vec<&str> = filter.split_whitespace().collect();
    filter.sort_unstable();
    assert_eq!(filter, ["127.0.0.0/8", builder.as_str(), "::1/128"]);
    remote_compile(w.container.ip()).expect("the builder is still admitted");

    // The same request again changes nothing and restarts nothing.
    let again = client
        .configure(pb::ConfigureRequest {
            allow: Some(pb::AllowList {
                cidrs: vec![builder.clone()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.changed);
    assert_eq!(again.unit.unwrap().main_pid, unit.main_pid);

    // Invalid arguments name the field; nothing changes.
    for (request, field) in [
        (
            pb::ConfigureRequest {
                allow: Some(pb::AllowList {
                    cidrs: vec!["10.0.0.0/8".into()],
                }),
                ..Default::default()
            },
            "allow[0]",
        ),
        (
            pb::ConfigureRequest {
                allow: Some(pb::AllowList {
                    cidrs: vec!["0.0.0.0/0".into()],
                }),
                ..Default::default()
            },
            "allow[0]",
        ),
        (
            pb::ConfigureRequest {
                allow: Some(pb::AllowList { cidrs: vec![] }),
                ..Default::default()
            },
            "allow",
        ),
        (
            pb::ConfigureRequest {
                nice: Some(40),
                ..Default::default()
            },
            "nice",
        ),
        (
            pb::ConfigureRequest {
                port: Some(70000),
                ..Default::default()
            },
            "port",
        ),
        (
            pb::ConfigureRequest {
                listen: Some("not-an-ip".into()),
                ..Default::default()
            },
            "listen",
        ),
    ] {
        let err = client.configure(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    assert_eq!(w.status().await.unit.unwrap().main_pid, unit.main_pid);

    // A setting distccd cannot live with (an address this host does not have): the agent
    // restores the previous settings and distccd keeps serving.
    let bogus = format!(
        "{}",
        std::net::Ipv4Addr::from(u32::from(bed.host_ip()) + 200)
    );
    let err = client
        .configure(pb::ConfigureRequest {
            listen: Some(bogus.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert!(
        err.message().contains("restored the previous settings"),
        "{}",
        err.message()
    );
    // distccd's own words from the journal, not just ours.
    assert!(
        err.message().contains("dcc_listen_by_addr") && err.message().contains(&bogus),
        "journal lines: {}",
        err.message()
    );
    let status = w.status().await;
    assert_eq!(status.settings.unwrap().listen, "0.0.0.0");
    assert_eq!(status.unit.as_ref().unwrap().active_state, "active");
    let env = w
        .container
        .exec_ok(&["cat", "/var/lib/distcc-agent/distccd.env"])
        .unwrap();
    assert!(!env.contains(&bogus), "{env}");
    remote_compile(w.container.ip()).expect("distccd serves again after the rollback");
}

#[tokio::test(flavor = "multi_thread")]
async fn control_crash_recovery_and_agent_restart() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    let mut client = w.client();
    use tonic_health::pb::health_check_response::ServingStatus;

    // Stop: health says NOT_SERVING; start brings it back.
    let stopped = w.control(pb::ControlAction::Stop).await;
    assert_eq!(stopped.unit.unwrap().active_state, "inactive");
    eventually("health NOT_SERVING", || async {
        w.health().await == ServingStatus::NotServing as i32
    })
    .await;
    assert!(
        remote_compile(w.container.ip()).is_err(),
        "no distccd, no compile"
    );
    let started = w.control(pb::ControlAction::Start).await;
    assert_eq!(started.unit.unwrap().active_state, "active");
    eventually("health SERVING", || async {
        w.health().await == ServingStatus::Serving as i32
    })
    .await;

    // Reset: stop, reset-failed, start; distccd's private TMPDIR does not survive it.
    let pid = w.status().await.unit.unwrap().main_pid;
    let leftover = format!("/proc/{pid}/root/tmp/leftover-from-a-crashed-compile");
    w.container.exec_ok(&["touch", &leftover]).unwrap();
    let find_leftover = || {
        w.container
            .exec_ok(&[
                "sh",
                "-c",
                "ls -d /tmp/systemd-private-*-distccd.service-*/tmp/leftover-* 2>/dev/null || true",
            ])
            .unwrap()
    };
    assert!(
        !find_leftover().trim().is_empty(),
        "the file is in distccd's private /tmp"
    );
    let reset = w.control(pb::ControlAction::Reset).await;
    assert_eq!(reset.steps.len(), 3, "{:?}", reset.steps);
    assert_eq!(reset.unit.as_ref().unwrap().active_state, "active");
    assert_ne!(reset.unit.as_ref().unwrap().main_pid, pid);
    assert_eq!(
        find_leftover().trim(),
        "",
        "reset cleared distccd's temporary state"
    );
    remote_compile(w.container.ip()).expect("compile after reset");

    let err = client
        .control(pb::ControlRequest { action: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("action"), "{}", err.message());

    // distccd killed with SIGKILL: systemd restarts it, and the status stream reports it
    // (driven by D-Bus signals; the interval is long so only a change can explain it).
    let pid = w.status().await.unit.unwrap().main_pid;
    let mut stream = client
        .watch_status(pb::WatchStatusRequest {
            interval_ms: 600_000,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.unit.unwrap().main_pid, pid);
    w.container
        .exec_ok(&["kill", "-9", &pid.to_string()])
        .unwrap();
    let restarted = loop {
        let status = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("a status within a minute")
            .unwrap()
            .expect("stream open");
        let unit = status.unit.unwrap();
        if unit.active_state == "active" && unit.main_pid != 0 && unit.main_pid != pid {
            break unit;
        }
    };
    assert_eq!(restarted.n_restarts, 1, "{restarted:?}");
    // Active is not yet listening: give the new distccd a moment to bind.
    eventually("compiles work after the crash", || async {
        remote_compile(w.container.ip()).is_ok()
    })
    .await;
    // Still the first restart: the new distccd did not crash-loop.
    let unit = w.status().await.unit.unwrap();
    assert_eq!((unit.main_pid, unit.n_restarts), (restarted.main_pid, 1));

    // Restarting the agent leaves distccd alone: same PID, compiles in flight survive.
    w.container
        .exec_ok(&["systemctl", "restart", "distcc-agent"])
        .unwrap();
    let after = w.status().await.unit.unwrap();
    assert_eq!(
        after.main_pid, restarted.main_pid,
        "agent restart must not restart distccd"
    );

    // SIGHUP (systemctl reload) re-reads the config; a changed [distccd] is applied.
    let config = w
        .container
        .exec_ok(&["cat", "/etc/distcc-agent/agent.toml"])
        .unwrap();
    w.container
        .write_file(
            "/etc/distcc-agent/agent.toml",
            config.replace("jobs = 3", "jobs = 5").as_bytes(),
            0o644,
        )
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "reload", "distcc-agent"])
        .unwrap();
    eventually("reload applied jobs = 5", || async {
        w.status().await.settings.unwrap().jobs == 5
    })
    .await;
    // A broken config on reload is refused and the running one kept.
    w.container
        .write_file("/etc/distcc-agent/agent.toml", b"bogus_key = 1\n", 0o644)
        .unwrap();
    w.container
        .exec_ok(&["systemctl", "reload", "distcc-agent"])
        .unwrap();
    assert_eq!(w.status().await.settings.unwrap().jobs, 5);
    let journal = w.container.journal("distcc-agent.service", 20);
    assert!(
        journal.contains("reload refused") && journal.contains("bogus_key"),
        "{journal}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_persist_across_reboot() {
    let bed = bed();
    let state = tempfile::tempdir().unwrap();
    // The state dir belongs to the agent's user inside the container.
    {
        let w = AgentWorker::start(&bed, "w1", Some(state.path())).await;
        w.client()
            .configure(pb::ConfigureRequest {
                jobs: Some(7),
                ..Default::default()
            })
            .await
            .expect("Configure");
        w.container.exec_ok(&["systemctl", "poweroff"]).ok();
    }
    let w = AgentWorker::start(&bed, "w1", Some(state.path())).await;
    let status = w.status().await;
    assert_eq!(
        status.settings.unwrap().jobs,
        7,
        "the configured value, not the config file's 3"
    );
    let unit = status.unit.unwrap();
    // The agent found persisted settings: it did not bootstrap again. distccd runs with the
    // persisted settings when started.
    w.control(pb::ControlAction::Start).await;
    let cmdline = w.distccd_cmdline(w.status().await.unit.unwrap().main_pid);
    assert!(
        cmdline.contains("--jobs 7"),
        "{cmdline} (unit was {unit:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_and_graceful_stop() {
    let bed = bed();
    let w = AgentWorker::start(&bed, "w1", None).await;
    let show = |property: &str| {
        w.container
            .exec_ok(&["systemctl", "show", "-P", property, "distcc-agent"])
            .unwrap()
            .trim()
            .to_owned()
    };
    // The watchdog is armed and fed: its timestamp moves while the agent runs.
    assert_eq!(show("WatchdogUSec"), "30s");
    let first = show("WatchdogTimestampMonotonic");
    eventually("a watchdog ping", || async {
        show("WatchdogTimestampMonotonic") != first
    })
    .await;

    // SIGTERM: open streams end cleanly, the agent exits with success, distccd keeps running.
    let distccd_pid = w.status().await.unit.unwrap().main_pid;
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
        .exec_ok(&["systemctl", "stop", "distcc-agent"])
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("stream ends");
    assert!(matches!(end, Ok(None)), "the stream ended cleanly: {end:?}");
    assert_eq!(
        (show("Result").as_str(), show("ExecMainStatus").as_str()),
        ("success", "0")
    );
    let journal = w.container.journal("distcc-agent.service", 20);
    assert!(
        journal.contains("stopping: finishing in-flight requests"),
        "{journal}"
    );
    let main_pid = w
        .container
        .exec_ok(&["systemctl", "show", "-P", "MainPID", "distccd"])
        .unwrap();
    assert_eq!(
        main_pid.trim(),
        distccd_pid.to_string(),
        "stopping the agent leaves distccd alone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_client_certificates() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let bed = bed();
    let ip = std::net::Ipv4Addr::from(u32::from(bed.host_ip()) + 10); // w1 is .11
    let pki = distcc_testbed::TestPki::generate("w1", ip).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [
        ("ca.pem", &pki.ca),
        ("cert.pem", &pki.server.cert),
        ("key.pem", &pki.server.key),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let config = format!(
        "{}[tls]\ncert = \"/etc/distcc-agent/tls/cert.pem\"\nkey = \"/etc/distcc-agent/tls/key.pem\"\n\
         client_ca = \"/etc/distcc-agent/tls/ca.pem\"\n",
        agent_config(&bed, 3)
    );
    let install = AgentInstall {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_distcc-agent")),
        repo: Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    let container = bed
        .boot_agent_worker("w1", &install, &config, |spec| {
            spec.bind_ro(dir.path(), "/etc/distcc-agent/tls")
        })
        .unwrap();
    assert_eq!(container.ip(), ip);
    let url = format!("https://{ip}:{AGENT_PORT}");
    let connect = |tls: Option<ClientTlsConfig>| {
        let url = url.clone();
        async move {
            let mut endpoint = Channel::from_shared(url)
                .unwrap()
                .connect_timeout(Duration::from_secs(5));
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls).unwrap();
            }
            let channel = endpoint.connect().await?;
            let mut client = DistccAgentClient::new(channel);
            let mut request = tonic::Request::new(pb::StatusRequest {
                skip_compilers: true,
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
            client
                .status(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| anyhow_free(s.to_string()))
        }
    };
    let server_only = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("w1");
    // Plain text, and TLS without a client certificate: refused.
    assert!(
        connect(None).await.is_err(),
        "plain text must not reach the agent"
    );
    assert!(
        connect(Some(server_only.clone())).await.is_err(),
        "a client certificate is required"
    );
    // With a certificate signed by the configured CA: served.
    let mutual = server_only.identity(Identity::from_pem(&pki.client.cert, &pki.client.key));
    let status = connect(Some(mutual)).await.expect("mTLS Status");
    assert_eq!(status.unit.unwrap().active_state, "active");
}

/// Connection errors and statuses as one boxed error type for the test's closures.
fn anyhow_free(message: String) -> Box<dyn std::error::Error + Send + Sync> {
    message.into()
}

/// `insecure_plaintext = true`: served, and warned about in `systemctl status` (the
/// STATUS= line) and by Validate.
#[tokio::test(flavor = "multi_thread")]
async fn insecure_plaintext_is_warned_about() {
    let bed = bed();
    let install = AgentInstall {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_distcc-agent")),
        repo: Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    let config = format!("insecure_plaintext = true\n{}", agent_config(&bed, 3));
    let container = bed
        .boot_agent_worker("w1", &install, &config, |spec| spec)
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}:{AGENT_PORT}", container.ip()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("plaintext, as configured");
    let worker = AgentWorker { container, channel };
    let status_text = || {
        worker
            .container
            .exec_ok(&["systemctl", "show", "-P", "StatusText", "distcc-agent"])
            .unwrap()
    };
    assert!(
        status_text().starts_with("INSECURE: gRPC on 0.0.0.0:3634 is plaintext"),
        "{}",
        status_text()
    );
    let checks = worker
        .client()
        .validate(pb::ValidateRequest {})
        .await
        .unwrap()
        .into_inner();
    let transport = checks
        .checks
        .iter()
        .find(|c| c.name == "transport-private")
        .expect("a transport check");
    assert!(!transport.passed, "{transport:?}");
    assert!(transport.reason.contains("plaintext"), "{transport:?}");
    assert!(!checks.all_passed);
    assert!(
        worker
            .container
            .journal("distcc-agent.service", 40)
            .contains("INSECURE"),
        "the agent's log says it too"
    );
}
