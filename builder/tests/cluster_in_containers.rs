//! `builderctl` against real workers: three systemd-nspawn containers running the real
//! agent (see `distcc-testbed`), the root namespace acting as the builder. One test boots
//! the cluster once and walks through healthy, stopped and unreachable workers, since
//! booting is the slow part.
//!
//! Needs root. Run with `cargo build -p distcc-agent && cargo test -p distcc-builder`.

// A failed step should fail the test loudly, with the value that was not there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Builder, DEADLINE, boot_cluster, by_endpoint, eventually, json, text};
use distcc_testbed::{Rootfs, Testbed};
use serde_json::Value;

/// compile_ok of every worker, from `status --json`.
fn compiles(builder: &Builder, endpoints: &[String]) -> Vec<u64> {
    let doc = json(&builder.run(&["status", "--json"]));
    endpoints
        .iter()
        .map(|e| by_endpoint(&doc, e)["compile_ok"].as_u64().unwrap_or(0))
        .collect()
}

/// A small multi-file C project: 12 translation units and a main.
fn write_project(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut objects = Vec::new();
    let mut calls = String::new();
    for i in 0..12 {
        std::fs::write(
            dir.join(format!("part{i}.c")),
            format!("int part{i}(int x) {{ int s = 0; for (int k = 0; k < x; k++) s += k * {i}; return s; }}\n"),
        )
        .unwrap();
        objects.push(format!("part{i}.o"));
        calls.push_str(&format!("int part{i}(int);\n"));
    }
    let sum: Vec<String> = (0..12).map(|i| format!("part{i}(10)")).collect();
    std::fs::write(
        dir.join("main.c"),
        format!(
            "#include <stdio.h>\n{calls}int main(void) {{ printf(\"sum=%d\\n\", {}); return 0; }}\n",
            sum.join(" + ")
        ),
    )
    .unwrap();
    // Compiles go through $(CC) (distcc); the link runs plain gcc, locally.
    std::fs::write(
        dir.join("Makefile"),
        format!(
            "prog: main.o {objs}\n\tgcc -o $@ $^\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n",
            objs = objects.join(" ")
        ),
    )
    .unwrap();
}

#[test]
fn builderctl_against_a_three_worker_cluster() {
    Rootfs::ensure().expect("test-bed root filesystem");
    let bed = Testbed::create().expect("test-bed network");
    let workers = boot_cluster(&bed);
    let endpoints: Vec<String> = workers.iter().map(|w| format!("{}:3634", w.ip())).collect();
    let builder = Builder::trusting(&endpoints, None);

    // All healthy: every worker in the host list, with slots, and exit status 0.
    let out = builder.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let doc = json(&out);
    for e in &endpoints {
        let w = by_endpoint(&doc, e);
        assert_eq!(w["reachable"], true, "{w}");
        assert_eq!(w["distccd_state"], "active", "{w}");
        assert_eq!(w["slots"], 3, "{w}");
        assert_eq!(w["excluded_reason"], Value::Null, "{w}");
    }
    let out = builder.run(&["hosts"]);
    assert!(out.status.success(), "{}", text(&out));
    for w in &workers {
        let line = format!("{}:3632/3", w.ip());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&line),
            "{}",
            text(&out)
        );
    }

    // `env` prints what `eval` needs.
    let out = builder.run(&[
        "env",
        "--distcc-dir",
        builder.dir.path().join("envdir").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let exports = String::from_utf8_lossy(&out.stdout).into_owned();
    for want in [
        "export CC='distcc gcc'",
        "export CXX='distcc g++'",
        "export DISTCC_SLOTS='11'",
        "export PATH='/usr/lib/distcc:",
    ] {
        assert!(exports.contains(want), "{want} in {exports}");
    }
    let hosts = std::fs::read_to_string(builder.dir.path().join("envdir/hosts")).unwrap();
    assert!(hosts.trim_end().ends_with("localhost/2"), "{hosts}");

    // A real build through the cluster, no local fallback; compiles spread over workers.
    let source = builder.dir.path().join("project");
    write_project(&source);
    let before = compiles(&builder, &endpoints);
    let script = format!(
        "set -e; cp {src}/* .; [ \"$PWD\" = {ws} ]; make -s -j\"$DISTCC_SLOTS\"; ./prog",
        src = source.display(),
        ws = builder.workspace.display()
    );
    let out = builder
        .command(&["enter", "--", "sh", "-c", &script])
        .env("DISTCC_FALLBACK", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sum="),
        "{}",
        text(&out)
    );
    let after = compiles(&builder, &endpoints);
    let per_worker: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        per_worker.iter().all(|n| *n >= 1),
        "compiles per worker: {per_worker:?}"
    );
    assert!(
        per_worker.iter().sum::<u64>() >= 7,
        "compiles per worker: {per_worker:?}"
    );

    // The exit status of the command is the session's; entering twice is refused.
    let out = builder.run(&["enter", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let out = builder
        .command(&["enter", "--", "true"])
        .env("BUILDERCTL_SESSION", "/somewhere")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in a builder session"));

    // Smoketest: a compile on each worker, proven by its statistics.
    let out = builder.run(&["smoketest", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    for e in &endpoints {
        let r = by_endpoint(&json(&out), e).clone();
        assert!(
            r["compile_ok_after"].as_u64() > r["compile_ok_before"].as_u64(),
            "{r}"
        );
    }

    // Live steering: cut w3's link while a session runs; the hosts file drops it within
    // seconds and takes it back when the link returns.
    let marks = builder.dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let w3_ip = workers[2].ip();
    let steering_script = format!(
        "echo \"$DISTCC_DIR\" > {m}/dir.tmp && mv {m}/dir.tmp {m}/dir\n\
         i=0; until grep -q '^# excluded {w3_ip}:' \"$DISTCC_DIR/hosts\"; do sleep 0.1; i=$((i+1)); [ $i -lt 300 ] || exit 3; done\n\
         touch {m}/dropped\n\
         i=0; until grep -q ' *{w3_ip}:3632/3' \"$DISTCC_DIR/hosts\"; do sleep 0.1; i=$((i+1)); [ $i -lt 600 ] || exit 4; done\n",
        m = marks.display()
    );
    let mut session = builder
        .command(&["enter", "--", "sh", "-c", &steering_script])
        .spawn()
        .unwrap();
    eventually("the session started", Duration::from_secs(30), || {
        marks.join("dir").exists()
    });
    workers[2].set_link(false).unwrap();
    let dropped_after = eventually(
        "w3 dropped from the hosts file",
        Duration::from_secs(30),
        || marks.join("dropped").exists(),
    );
    assert!(
        dropped_after < Duration::from_secs(10),
        "took {dropped_after:?}"
    );
    workers[2].set_link(true).unwrap();
    let status = session.wait().unwrap();
    assert!(status.success(), "steering session: {status}");

    // Another compiler behind `gcc` on w1 (agents resolve /usr/local/bin first): left out,
    // with the reason in `hosts` and `status`; included with --allow-mismatch; back once
    // the compiler is the same again.
    workers[0]
        .write_file(
            "/usr/local/bin/gcc",
            "#!/bin/sh\nexec /usr/bin/gcc-12 \"$@\"\n",
            0o755,
        )
        .unwrap();
    let doc = json(&builder.run(&["status", "--json"]));
    let reason = by_endpoint(&doc, &endpoints[0])["excluded_reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("`gcc` differs"), "{doc}");
    let out = builder.run(&["hosts"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("`gcc` differs"),
        "{}",
        text(&out)
    );
    let doc = json(&builder.run(&["--allow-mismatch", "hosts", "--json"]));
    let w1 = by_endpoint(&doc, &endpoints[0]);
    assert_eq!(w1["entry"]["slots"], 3, "{doc}");
    assert!(
        w1["warnings"][0]
            .as_str()
            .unwrap()
            .contains("`gcc` differs"),
        "{doc}"
    );
    workers[0].exec_ok(&["rm", "/usr/local/bin/gcc"]).unwrap();
    let doc = json(&builder.run(&["hosts", "--json"]));
    assert_eq!(
        by_endpoint(&doc, &endpoints[0])["excluded_reason"],
        Value::Null,
        "{doc}"
    );

    // A stopped distccd and an unreachable worker.
    workers[1]
        .exec_ok(&["systemctl", "stop", "distccd"])
        .unwrap();
    let out = builder.run(&["hosts", "--json"]);
    let doc = json(&out);
    let w2 = by_endpoint(&doc, &endpoints[1]);
    assert_eq!(w2["entry"], Value::Null, "{doc}");
    assert!(
        w2["excluded_reason"]
            .as_str()
            .unwrap()
            .contains("distccd is inactive"),
        "{doc}"
    );
    let out = builder.run(&["hosts"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("excluded: distccd is inactive"),
        "{}",
        text(&out)
    );

    workers[2].set_link(false).unwrap();
    let started = Instant::now();
    let out = builder.run(&["status", "--json"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Parallel, each bounded: one dead worker costs one deadline (plus process start-up).
    assert!(took < DEADLINE * 3, "status took {took:?}");
    let doc = json(&out);
    let (w1, w2, w3) = (
        by_endpoint(&doc, &endpoints[0]),
        by_endpoint(&doc, &endpoints[1]),
        by_endpoint(&doc, &endpoints[2]),
    );
    assert_eq!(
        (
            w1["reachable"].clone(),
            w1["slots"].clone(),
            w1["excluded_reason"].clone()
        ),
        (Value::Bool(true), 3.into(), Value::Null)
    );
    assert_eq!(w2["reachable"], true);
    assert_eq!(w2["distccd_state"], "inactive");
    assert_eq!(w2["slots"], 0);
    assert!(w2["excluded_reason"].is_string(), "{w2}");
    assert_eq!(w3["reachable"], false);
    assert_eq!(w3["distccd_state"], Value::Null);
    assert_eq!(w3["slots"], 0);
    assert!(
        w3["excluded_reason"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{w3}"
    );

    // Smoketest and validate fail on the broken workers only.
    let out = builder.run(&["smoketest", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json(&out);
    let passed: Vec<bool> = endpoints
        .iter()
        .map(|e| by_endpoint(&doc, e)["passed"] == true)
        .collect();
    assert_eq!(passed, [true, false, false], "{doc}");
    let out = builder.run(&["validate", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json(&out);
    assert_eq!(by_endpoint(&doc, &endpoints[2])["passed"], false);
    let w2_failed: Vec<String> = by_endpoint(&doc, &endpoints[1])["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        w2_failed.contains(&"distcc-port-reachable".to_owned()),
        "{doc}"
    );

    // Rolling reset stops at the unreachable worker; w2 comes back on the way.
    let out = builder.run(&["reset", "--rolling", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json(&out);
    assert_eq!(by_endpoint(&doc, &endpoints[0])["passed"], true, "{doc}");
    assert_eq!(
        by_endpoint(&doc, &endpoints[1])["distccd_state"],
        "active",
        "{doc}"
    );
    assert_eq!(by_endpoint(&doc, &endpoints[2])["passed"], false, "{doc}");
    // Named workers only; bootstrap of the reachable ones succeeds.
    let out = builder.run(&["bootstrap", &workers[0].ip().to_string(), &endpoints[1]]);
    assert!(out.status.success(), "{}", text(&out));
    let out = builder.run(&["reset", "w9"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // Leave: unmounts the workspace now that no session uses it.
    let out = builder.run(&["leave"]);
    assert!(out.status.success(), "{}", text(&out));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&format!(" {} ", builder.workspace.display())));
}

#[test]
fn enter_refuses_to_mount_over_a_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("precious");
    std::fs::create_dir(&workspace).unwrap();
    std::fs::write(workspace.join("notes.txt"), "keep me").unwrap();
    let builder = Builder::new(&[], Some(&workspace));
    let out = builder.run(&["enter", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not empty") && stderr.contains("notes.txt"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(workspace.join("notes.txt")).unwrap(),
        "keep me"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&format!(" {} ", workspace.display())));
    // And `leave` does not pretend to unmount what is not mounted.
    let out = builder.run(&["leave"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn daemon_keeps_a_hosts_file_fresh() {
    Rootfs::ensure().expect("test-bed root filesystem");
    let bed = Testbed::create().expect("test-bed network");
    let install = distcc_testbed::AgentInstall::from_workspace(&common::repo_root()).unwrap();
    let config = distcc_testbed::agent_config(&bed, 3);
    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|name| {
            bed.boot_agent_worker(name, &install, &config, |s| s)
                .unwrap()
        })
        .collect();
    let endpoints: Vec<String> = workers.iter().map(|w| format!("{}:3634", w.ip())).collect();
    let builder = Builder::trusting(&endpoints, None);
    let hosts_file = builder.dir.path().join("etc-distcc-hosts");
    let stderr = std::fs::File::create(builder.dir.path().join("daemon.log")).unwrap();
    let mut daemon = builder
        .command(&["daemon", "--hosts-file", hosts_file.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let hosts = || std::fs::read_to_string(&hosts_file).unwrap_or_default();
    let entry = |w: usize| format!("{}:3632/3", workers[w].ip());
    let log = || std::fs::read_to_string(builder.dir.path().join("daemon.log")).unwrap();
    eventually(
        "both workers in the hosts file",
        Duration::from_secs(30),
        || {
            let h = hosts();
            h.contains(&entry(0)) && h.contains(&entry(1))
        },
    );

    // Root's session with the daemon reachable uses it: no streams of its own, the hosts
    // file is the daemon's, the steering log comes from the daemon's events.
    let ready = builder.dir.path().join("session-ready");
    let script = format!(
        "readlink \"$DISTCC_DIR/hosts\"; touch {ready}; \
         timeout 30 sh -c 'until grep -q \"out, distccd is inactive\" \"$DISTCC_DIR/steering.log\" 2>/dev/null; do sleep 0.1; done'; \
         cat \"$DISTCC_DIR/steering.log\"",
        ready = ready.display()
    );
    let session = builder
        .command(&["enter", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the session started", Duration::from_secs(30), || {
        ready.exists()
    });

    workers[1]
        .exec_ok(&["systemctl", "stop", "distccd"])
        .unwrap();
    let session = session.wait_with_output().unwrap();
    assert!(session.status.success(), "{}", text(&session));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&session.stdout),
        String::from_utf8_lossy(&session.stderr),
    );
    assert!(
        stdout.starts_with(&format!("{}\n", hosts_file.display())),
        "{}",
        text(&session)
    );
    assert!(
        stdout.contains(&format!("{}: out, distccd is inactive", endpoints[1])),
        "{}",
        text(&session)
    );
    assert!(
        stderr.contains("[ ok ] builder daemon"),
        "{}",
        text(&session)
    );
    assert!(stderr.contains("[ ok ] failover"), "{}", text(&session));
    assert!(log().contains("session opened"), "{}", log());

    let dropped = eventually(
        "the stopped worker dropped",
        Duration::from_secs(30),
        || {
            let h = hosts();
            !h.contains(&entry(1))
                && h.contains(&format!("# excluded {}: distccd is inactive", endpoints[1]))
                && h.contains(&entry(0))
        },
    );
    assert!(
        dropped < Duration::from_secs(10),
        "took {dropped:?}:\n{}",
        log()
    );

    workers[1]
        .exec_ok(&["systemctl", "start", "distccd"])
        .unwrap();
    eventually("the restarted worker back", Duration::from_secs(30), || {
        let h = hosts();
        h.contains(&entry(1)) && !h.contains("# excluded")
    });
    assert!(
        log().contains(&format!("{}: out, distccd is inactive", endpoints[1])),
        "{}",
        log()
    );

    // SIGTERM ends it cleanly (systemd's stop).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    assert!(status.success(), "daemon: {status}\n{}", log());
}

#[test]
fn tls_and_client_certificates_for_every_rpc() {
    Rootfs::ensure().expect("test-bed root filesystem");
    let bed = Testbed::create().expect("test-bed network");
    let ip = std::net::Ipv4Addr::from(u32::from(bed.host_ip()) + 10); // w1 is .11
    let pki = distcc_testbed::TestPki::generate("w1", ip).unwrap();
    let (ca, server, client) = (&pki.ca, &pki.server, &pki.client);
    let pem = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("ca.pem", ca),
        ("cert.pem", &server.cert),
        ("key.pem", &server.key),
        ("client.pem", &client.cert),
        ("client.key", &client.key),
    ] {
        std::fs::write(pem.path().join(name), text).unwrap();
    }
    let config = format!(
        "{}[tls]\ncert = \"/etc/distcc-agent/tls/cert.pem\"\nkey = \"/etc/distcc-agent/tls/key.pem\"\n\
         client_ca = \"/etc/distcc-agent/tls/ca.pem\"\n",
        distcc_testbed::agent_config(&bed, 3)
    );
    let install = distcc_testbed::AgentInstall::from_workspace(&common::repo_root()).unwrap();
    let w1 = bed
        .boot_agent_worker("w1", &install, &config, |spec| {
            spec.bind_ro(pem.path(), "/etc/distcc-agent/tls")
        })
        .unwrap();
    assert_eq!(w1.ip(), ip);
    let endpoint = format!("{ip}:3634");
    let builder = Builder::new(std::slice::from_ref(&endpoint), None);
    let toml = builder.dir.path().join("builder.toml");
    let plain = std::fs::read_to_string(&toml).unwrap();
    let path = |name: &str| pem.path().join(name).display().to_string();

    // Plain text (the builder's explicit opt-in): the agent does not answer it.
    std::fs::write(&toml, format!("{plain}insecure_plaintext = true\n")).unwrap();
    let doc = json(&builder.run(&["status", "--json"]));
    assert_eq!(by_endpoint(&doc, &endpoint)["reachable"], false, "{doc}");

    // TLS without a client certificate: refused by an agent that requires one.
    std::fs::write(
        &toml,
        format!("{plain}[tls]\nca = \"{}\"\n", path("ca.pem")),
    )
    .unwrap();
    let doc = json(&builder.run(&["status", "--json"]));
    assert_eq!(by_endpoint(&doc, &endpoint)["reachable"], false, "{doc}");

    // mTLS, verifying the certificate's name instead of the address: served, for the
    // one-shot RPCs and for the session's status stream alike.
    std::fs::write(
        &toml,
        format!(
            "{plain}[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ndomain = \"w1\"\n",
            path("ca.pem"),
            path("client.pem"),
            path("client.key")
        ),
    )
    .unwrap();
    let out = builder.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        by_endpoint(&json(&out), &endpoint)["distccd_state"],
        "active"
    );
    let out = builder.run(&["smoketest"]);
    assert!(out.status.success(), "{}", text(&out));
    let script = "sleep 3; grep -v '^#' \"$DISTCC_DIR/hosts\"; cat \"$DISTCC_DIR/steering.log\" 2>/dev/null; true";
    let out = builder.run(&["enter", "--", "sh", "-c", script]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The stream kept w1 in: no steering change logged, the entry still there.
    assert!(stdout.contains(&format!("{ip}:3632/3 ")), "{}", text(&out));
    assert!(!stdout.contains("out,"), "{}", text(&out));
}

/// The default transport end to end: a fresh agent makes its own key and certificate,
/// `builderctl trust` shows and pins the fingerprint, every later connection verifies
/// the pin, and a replaced certificate is refused with both fingerprints shown.
#[test]
fn trust_pins_each_worker_and_refuses_a_changed_certificate() {
    Rootfs::ensure().expect("test-bed root filesystem");
    let bed = Testbed::create().expect("test-bed network");
    let install = distcc_testbed::AgentInstall::from_workspace(&common::repo_root()).unwrap();
    let w1 = bed
        .boot_agent_worker(
            "w1",
            &install,
            &distcc_testbed::agent_config(&bed, 3),
            |s| s,
        )
        .unwrap();
    let endpoint = format!("{}:3634", w1.ip());

    // The identity was made on the worker, readable by the agent alone.
    let modes = w1
        .exec_ok(&[
            "stat",
            "-c",
            "%a %U",
            "/var/lib/distcc-agent/tls",
            "/var/lib/distcc-agent/tls/key.pem",
        ])
        .unwrap();
    assert_eq!(modes.trim(), "700 distcc-agent\n600 distcc-agent");
    let first = w1.agent_fingerprint().unwrap();
    assert!(
        w1.journal("distcc-agent.service", 50)
            .contains("generated this agent's TLS certificate"),
        "{}",
        w1.journal("distcc-agent.service", 50)
    );

    // Not trusted yet, no CA: refused, saying what to run.
    let builder = Builder::new(std::slice::from_ref(&endpoint), None);
    let doc = json(&builder.run(&["status", "--json"]));
    let row = by_endpoint(&doc, &endpoint);
    assert_eq!(row["reachable"], false, "{doc}");
    assert!(
        row["excluded_reason"]
            .as_str()
            .unwrap()
            .contains(&format!("run `builderctl trust {endpoint}`")),
        "{doc}"
    );

    // Without a terminal and without --yes: shows the fingerprint, records nothing.
    let out = builder.run(&["trust"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&first),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--yes"),
        "{}",
        text(&out)
    );
    assert!(!builder.known_workers().exists(), "nothing recorded");

    // --yes records exactly the certificate the agent serves; status works over it.
    let out = builder.run(&["trust", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    let pins = std::fs::read_to_string(builder.known_workers()).unwrap();
    assert!(
        pins.lines().any(|l| l == format!("{endpoint} {first}")),
        "{pins}"
    );
    let out = builder.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        by_endpoint(&json(&out), &endpoint)["distccd_state"],
        "active"
    );
    let again = builder.run(&["trust"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already trusted"),
        "{}",
        text(&again)
    );

    // The worker's certificate is replaced: refused, with both fingerprints.
    w1.exec_ok(&["rm", "-r", "/var/lib/distcc-agent/tls"])
        .unwrap();
    w1.exec_ok(&["systemctl", "restart", "distcc-agent"])
        .unwrap();
    let second = w1.agent_fingerprint().unwrap();
    assert_ne!(first, second, "a new key and certificate");
    let out = builder.run(&["status", "--json"]);
    assert!(!out.status.success(), "{}", text(&out));
    let doc = json(&out);
    let reason = by_endpoint(&doc, &endpoint)["excluded_reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("CHANGED") && reason.contains(&first) && reason.contains(&second),
        "{reason}"
    );
    // A builder talking plaintext (its own opt-in) does not reach a TLS agent either.
    let toml = builder.dir.path().join("builder.toml");
    let config = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("{config}insecure_plaintext = true\n")).unwrap();
    let doc = json(&builder.run(&["status", "--json"]));
    assert_eq!(by_endpoint(&doc, &endpoint)["reachable"], false, "{doc}");
}
