//! Losing a worker while builds run, against three real agent workers in the test-bed:
//! the session's failover (hosts file plus aborted connections) and the daemon's hosts
//! file.
//!
//! Needs root. Run with `cargo build -p distcc-agent && cargo test -p distcc-builder`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Builder, UNITS, boot_cluster, eventually, text, write_slow_project};
use distcc_testbed::{CpuQuota, Rootfs, Testbed, Worker};

/// Established TCP connections from this (root) namespace to `ip:3632`.
fn connections_to(ip: &str) -> usize {
    let out = Command::new("ss")
        .args([
            "-H",
            "-n",
            "-t",
            "state",
            "established",
            "dst",
            ip,
            "dport",
            "=",
            ":3632",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// The project built in `dir` with plain gcc, no distcc: the program's run.
fn build_locally(source: &Path, dir: &Path) -> std::process::Output {
    let copy = Command::new("sh")
        .arg("-c")
        .arg(format!("cp {}/* {}", source.display(), dir.display()))
        .status()
        .unwrap();
    assert!(copy.success());
    let out = Command::new("make")
        .args(["-s", "-j2", "CC=gcc"])
        .current_dir(dir)
        .env_remove("DISTCC_HOSTS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    Command::new("./prog").current_dir(dir).output().unwrap()
}

/// Three agent workers, a builder configuration for them, the slow project written, and
/// a directory for the session's marks.
struct SlowProjectCluster {
    _bed: Testbed,
    workers: Vec<Worker>,
    builder: Builder,
    source: PathBuf,
    marks: PathBuf,
}

impl SlowProjectCluster {
    fn boot() -> SlowProjectCluster {
        Rootfs::ensure().expect("test-bed root filesystem");
        let bed = Testbed::create().expect("test-bed network");
        let workers = boot_cluster(&bed);
        let endpoints: Vec<String> = workers.iter().map(|w| format!("{}:3634", w.ip())).collect();
        let builder = Builder::trusting(&endpoints, None);
        let source = builder.dir.path().join("project");
        write_slow_project(&source);
        let marks = builder.dir.path().join("marks");
        SlowProjectCluster {
            _bed: bed,
            workers,
            builder,
            source,
            marks,
        }
    }
}

/// A session script: tell the test its `$DISTCC_DIR` (`marks/dir`), build the project,
/// keep its output and objects in `marks` (`output`, `objects/`, then `built`), stay until
/// the shell condition `until` holds (at most 60 s), and copy the steering log to `marks`.
fn build_then_wait(marks: &Path, source: &Path, until: &str) -> String {
    format!(
        "set -e\n\
         echo \"$DISTCC_DIR\" > {m}/dir.tmp && mv {m}/dir.tmp {m}/dir\n\
         cp {src}/* .\n\
         make -s -j\"$DISTCC_SLOTS\"\n\
         ./prog > {m}/output\n\
         cp *.o {m}/objects/\n\
         touch {m}/built\n\
         i=0; until {until}; do sleep 0.1; i=$((i+1)); [ $i -lt 600 ] || exit 4; done\n\
         cp \"$DISTCC_DIR/steering.log\" {m}/steering.log\n",
        m = marks.display(),
        src = source.display(),
    )
}

/// `builderctl enter -- sh -c SCRIPT` with distcc's default fallback; SCRIPT must first
/// write its `$DISTCC_DIR` to `marks/dir`. Returns the session and that directory.
fn start_session(builder: &Builder, marks: &Path, script: &str) -> (Child, PathBuf) {
    let session = builder
        .command(&["enter", "--", "sh", "-c", script])
        // distcc's default: a failed remote compile is redone locally.
        .env_remove("DISTCC_FALLBACK")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the session started", Duration::from_secs(30), || {
        marks.join("dir").exists()
    });
    let distcc_dir = std::fs::read_to_string(marks.join("dir")).unwrap();
    (session, PathBuf::from(distcc_dir.trim()))
}

/// The project built in `source` with plain gcc, without distcc, prints what the
/// session's build printed (`output`); its objects stay in `source`.
fn assert_local_build_prints_the_same(source: &Path, output: &Path) {
    let reference = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && make -s -j2 CC=gcc && ./prog",
            source.display()
        ))
        .env_remove("DISTCC_HOSTS")
        .output()
        .unwrap();
    assert!(reference.status.success(), "{}", text(&reference));
    assert_eq!(
        std::fs::read_to_string(output).unwrap(),
        String::from_utf8_lossy(&reference.stdout)
    );
}

/// Every object of the project in `ours` equals the one in `reference`.
fn assert_same_objects(ours: &Path, reference: &Path) {
    for unit in std::iter::once("main".to_owned()).chain((0..UNITS).map(|u| format!("u{u}"))) {
        let a = std::fs::read(ours.join(format!("{unit}.o"))).unwrap();
        let b = std::fs::read(reference.join(format!("{unit}.o"))).unwrap();
        assert!(a == b, "{unit}.o differs from the local build");
    }
}

#[test]
fn a_worker_lost_mid_build_fails_over_at_once_with_identical_objects() {
    let SlowProjectCluster {
        _bed,
        workers,
        builder,
        source,
        marks,
    } = SlowProjectCluster::boot();
    std::fs::create_dir_all(marks.join("objects")).unwrap();
    let w2 = workers[1].ip().to_string();

    // The session builds, keeps the result, then stays until its steering log says w2 is
    // back (the hosts file is rewritten before the line is logged: waiting on the file
    // could copy the log a moment too early).
    let script = build_then_wait(
        &marks,
        &source,
        &format!("grep -q '{w2}:3634: in, {w2}:3632/' \"$DISTCC_DIR/steering.log\""),
    );
    let started = Instant::now();
    let (session, distcc_dir) = start_session(&builder, &marks, &script);
    let hosts_file = distcc_dir.join("hosts");
    let steering_log = distcc_dir.join("steering.log");

    // Cut w2 off while compiles are in flight there: those would wait out distcc's 300 s
    // IO timeout unless the session aborts them.
    eventually("compiles in flight on w2", Duration::from_secs(60), || {
        connections_to(&w2) >= 2
    });
    workers[1].set_link(false).unwrap();
    let cut_at = Instant::now();
    let dropped_after = eventually(
        "w2 dropped from the session's hosts file",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&hosts_file)
                .is_ok_and(|h| h.contains(&format!("# excluded {w2}:3634")))
        },
    );
    assert!(
        dropped_after < Duration::from_secs(10),
        "took {dropped_after:?}"
    );
    eventually(
        "the session aborted w2's connections",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&steering_log).is_ok_and(|log| {
                log.lines()
                    .any(|l| l.contains(&format!("{w2}:3634: lost (")) && l.contains("aborted"))
            })
        },
    );
    // The bound proves the mechanism (no compile waited for the 300 s IO timeout); it is
    // not a benchmark.
    let built_after = eventually("the build finished", Duration::from_secs(240), || {
        marks.join("built").exists()
    });
    let built_at = Instant::now();
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "build took {:?} ({built_after:?} after the cut)",
        started.elapsed()
    );

    // The same project built locally, without distcc, while w2 comes back.
    let reference = builder.dir.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    let local_build = std::thread::spawn({
        let (source, reference) = (source.clone(), reference.clone());
        move || build_locally(&source, &reference)
    });
    workers[1].set_link(true).unwrap();
    let out = session.wait_with_output().unwrap();
    assert!(out.status.success(), "session: {}", text(&out));
    let back_after = cut_at.elapsed();
    let log = std::fs::read_to_string(marks.join("steering.log")).unwrap();
    let aborted: usize = log
        .lines()
        .filter(|l| l.contains(&format!("{w2}:3634: lost (")))
        .filter_map(|l| {
            l.split("aborted ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(aborted >= 1, "nothing aborted:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("{w2}:3634: in, {w2}:3632/"))),
        "w2 never came back:\n{log}"
    );
    let reference_run = local_build.join().unwrap();
    assert!(reference_run.status.success());
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(marks.join("output")).unwrap()),
        String::from_utf8_lossy(&reference_run.stdout),
    );
    assert_same_objects(&marks.join("objects"), &reference);
    eprintln!(
        "build {:?} in all, {built_after:?} after the cut, w2 dropped {dropped_after:?} after it, \
         {aborted} connections aborted, w2 back {back_after:?} after the cut",
        built_at.duration_since(started)
    );
}

#[test]
fn a_throttled_worker_leaves_the_session_as_slow_and_the_build_stays_correct() {
    let SlowProjectCluster {
        _bed,
        workers,
        builder,
        source,
        marks,
    } = SlowProjectCluster::boot();
    std::fs::create_dir_all(&marks).unwrap();
    let w3 = workers[2].ip().to_string();
    // w3's distccd (and the compilers it starts) get 10% of one CPU: its compiles take
    // many times as long as the others'.
    let _quota = CpuQuota::apply(&workers[2], "distccd", 10).unwrap();

    // Twice the project, so the session sees enough compiles finish on w3 to judge it.
    let script = format!(
        "set -e\n\
         for round in 1 2; do cp {src}/* .; make -s -j\"$DISTCC_SLOTS\" CC=\"$CC\"; ./prog > {m}/output; make -s clean; done\n\
         cp \"$DISTCC_DIR/steering.log\" {m}/steering.log\n",
        m = marks.display(),
        src = source.display(),
    );
    let out = builder
        .command(&["enter", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "session: {}", text(&out));
    let log = std::fs::read_to_string(marks.join("steering.log")).unwrap();
    eprintln!("steering log:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("{w3}:3634: out, slow: compiles take"))),
        "w3 was never judged slow:\n{log}"
    );
    // Its compiles in flight were taken back rather than waited for.
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("{w3}:3634: slow: ")) && l.contains(": aborted ")),
        "the session did not abort its connections to w3:\n{log}"
    );
    for fast in [&workers[0], &workers[1]] {
        assert!(
            !log.contains(&format!("{}:3634: out", fast.ip())),
            "a healthy worker was left out:\n{log}"
        );
    }
    assert_local_build_prints_the_same(&source, &marks.join("output"));
}

#[test]
fn restarting_a_workers_agent_mid_build_neither_drops_nor_cuts_it() {
    let SlowProjectCluster {
        _bed,
        workers,
        builder,
        source,
        marks,
    } = SlowProjectCluster::boot();
    std::fs::create_dir_all(marks.join("objects")).unwrap();
    let w1 = workers[0].ip().to_string();

    // The session builds, keeps the result, then waits for the test's word before it
    // copies its steering log and ends.
    let release = marks.join("release");
    let script = build_then_wait(&marks, &source, &format!("[ -e {} ]", release.display()));
    let (session, distcc_dir) = start_session(&builder, &marks, &script);
    let steering_log = distcc_dir.join("steering.log");

    eventually("compiles in flight on w1", Duration::from_secs(60), || {
        connections_to(&w1) >= 2
    });
    // Type=notify: returns once the new agent is ready. distccd is not restarted with it.
    workers[0]
        .exec_ok(&["systemctl", "restart", "distcc-agent"])
        .unwrap();
    let log_says = |what: &str| {
        std::fs::read_to_string(&steering_log).is_ok_and(|log| {
            log.lines()
                .any(|l| l.contains(&format!("{w1}:3634: {what}")))
        })
    };
    eventually(
        "the session saw w1's agent go",
        Duration::from_secs(30),
        || log_says("agent away ("),
    );
    eventually(
        "the session follows w1's agent again",
        Duration::from_secs(60),
        || log_says("agent back"),
    );
    eventually("the build finished", Duration::from_secs(240), || {
        marks.join("built").exists()
    });
    std::fs::write(&release, "").unwrap();
    let out = session.wait_with_output().unwrap();
    assert!(out.status.success(), "session: {}", text(&out));

    let log = std::fs::read_to_string(marks.join("steering.log")).unwrap();
    eprintln!("steering log:\n{log}");
    for line in log.lines().filter(|l| l.contains(&format!("{w1}:3634: "))) {
        assert!(
            !line.contains(": lost") && !line.contains("aborted") && !line.contains(": out"),
            "w1 was dropped or cut for an agent restart: {line}\n{log}"
        );
    }
    assert_local_build_prints_the_same(&source, &marks.join("output"));
    assert_same_objects(&marks.join("objects"), &source);
}

/// The daemon owns failover for every build on the machine: a plain `make CC="distcc
/// gcc"` that never ran `enter` (cron, CI), with the daemon's hosts file, survives w2's
/// link cut mid-build: the daemon drops w2, aborts the machine's connections to it, the
/// compiles fall back to local ones, and every object equals a local build's.
#[test]
fn a_plain_make_survives_a_lost_worker_through_the_daemon() {
    let SlowProjectCluster {
        _bed,
        workers,
        builder,
        source,
        marks,
    } = SlowProjectCluster::boot();
    let w2 = workers[1].ip().to_string();
    let daemon_hosts = builder.dir.path().join("etc-distcc-hosts");
    let daemon_log = builder.dir.path().join("daemon.log");
    let mut daemon = builder
        .command(&["daemon", "--hosts-file", daemon_hosts.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&daemon_log).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    eventually("the daemon's hosts file", Duration::from_secs(30), || {
        std::fs::read_to_string(&daemon_hosts).is_ok_and(|h| {
            workers
                .iter()
                .all(|w| h.contains(&format!("{}:3632/3", w.ip())))
        })
    });

    // What a cron job does: distcc reads the hosts file the daemon keeps (here through
    // DISTCC_DIR, to leave this machine's /etc/distcc alone).
    let build = builder.dir.path().join("plain");
    let distcc_dir = builder.dir.path().join("plain-distcc");
    std::fs::create_dir_all(&build).unwrap();
    std::fs::create_dir_all(&distcc_dir).unwrap();
    std::os::unix::fs::symlink(&daemon_hosts, distcc_dir.join("hosts")).unwrap();
    let copy = Command::new("sh")
        .arg("-c")
        .arg(format!("cp {}/* {}", source.display(), build.display()))
        .status()
        .unwrap();
    assert!(copy.success());
    let started = Instant::now();
    let make = Command::new("make")
        .args(["-s", "-j11", "CC=distcc gcc"])
        .current_dir(&build)
        .env("DISTCC_DIR", &distcc_dir)
        .env_remove("DISTCC_HOSTS")
        .env_remove("DISTCC_FALLBACK")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("compiles in flight on w2", Duration::from_secs(60), || {
        connections_to(&w2) >= 2
    });
    workers[1].set_link(false).unwrap();
    let cut_at = Instant::now();
    eventually(
        "the daemon aborted the machine's connections to w2",
        Duration::from_secs(30),
        || {
            log()
                .lines()
                .any(|l| l.contains(&format!("{w2}:3634: lost (")) && l.contains("aborted"))
        },
    );
    let out = make.wait_with_output().unwrap();
    assert!(out.status.success(), "make: {}\n{}", text(&out), log());
    let built_after = cut_at.elapsed();
    // No compile waited for distcc's 300 s IO timeout.
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "build took {:?} ({built_after:?} after the cut)\n{}",
        started.elapsed(),
        log()
    );
    workers[1].set_link(true).unwrap();

    let reference = builder.dir.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    let theirs = build_locally(&source, &reference);
    assert_same_objects(&build, &reference);
    let ours = Command::new("./prog").current_dir(&build).output().unwrap();
    assert!(theirs.status.success());
    assert_eq!(ours.stdout, theirs.stdout);
    let _ = marks;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success(), "{}", log());
    eprintln!(
        "plain make {:?} in all, {built_after:?} after the cut",
        started.elapsed()
    );
}
