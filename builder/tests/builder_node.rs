//! Issue 11's proof: ordinary users build on a build node through the builder daemon,
//! against three real agent workers, in the test-bed. The node is a container on the
//! workers' bridge with builderctl installed as the package installs it (units, polkit
//! rule, sysusers, tokens the users cannot read; `distcc_testbed::BuilderNode`); the
//! users are made by the test and run as themselves (`setpriv --init-groups`).
//!
//! Needs root. Run with
//! `cargo build -p distcc-agent -p distcc-builder && cargo test -p distcc-builder --test builder_node`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{BUILDERCTL, UNITS, boot_cluster, eventually, repo_root, write_slow_project};
use distcc_testbed::{
    AGENT_PORT, BUILDER_SERVICE, BuilderInstall, BuilderNode, Rootfs, SESSION_SOCKET,
    SYSTEM_HOSTS_FILE, Spawned, Testbed, USER_WORKSPACES, Worker, WorkerSpec, builder_node_config,
};

/// The slow C project, read-only in the node; every build copies it.
const PROJECT: &str = "/srv/project";
/// distccd's port on the workers.
const DISTCC_PORT: u16 = 3632;
/// Catches a compile that waits out distcc's 300 s IO timeout; not a benchmark.
const BUILD_BOUND: Duration = Duration::from_secs(150);

/// Three agent workers and a build node for them with the slow project in it.
struct Cluster {
    node: BuilderNode,
    workers: Vec<Worker>,
    _project: tempfile::TempDir,
    _bed: Testbed,
}

impl Cluster {
    fn boot() -> Cluster {
        Rootfs::ensure().expect("test-bed root filesystem");
        let bed = Testbed::create().expect("test-bed network");
        let workers = boot_cluster(&bed);
        let project = tempfile::tempdir().unwrap();
        write_slow_project(project.path());
        // The builderctl cargo built for this test, the units from the repository.
        let install = BuilderInstall {
            binary: PathBuf::from(BUILDERCTL),
            units: repo_root().join("systemd"),
        };
        let refs: Vec<&Worker> = workers.iter().collect();
        let node = bed
            .boot_builder_node(
                WorkerSpec::new("builder").bind_ro(project.path(), PROJECT),
                &install,
                &builder_node_config(&refs, ""),
            )
            .expect("boot the build node");
        Cluster {
            node,
            workers,
            _project: project,
            _bed: bed,
        }
    }

    fn endpoint(worker: &Worker) -> String {
        format!("{}:{AGENT_PORT}", worker.ip())
    }

    /// Each worker's distccd `compile_ok`, from `builderctl status --json` as root.
    fn compile_ok(&self) -> Vec<u64> {
        let out = self.node.exec(&["builderctl", "status", "--json"]).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {}", text(&out)));
        self.workers
            .iter()
            .map(|w| {
                common::by_endpoint(&doc, &Self::endpoint(w))["compile_ok"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no compile_ok for {} in {doc}", w.ip()))
            })
            .collect()
    }

    fn file(&self, path: &str) -> Option<String> {
        let out = self.node.exec(&["cat", path]).unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn exists(&self, path: &str) -> bool {
        self.node
            .exec(&["test", "-e", path])
            .unwrap()
            .status
            .success()
    }

    /// Waits until `victim` has at least two compiles of this node in flight (counted in
    /// the worker), then cuts its link. Returns when it cut.
    fn cut_mid_build(&self, victim: &Worker) -> Instant {
        let node = self.node.address();
        eventually(
            &format!("compiles of the node in flight on {}", victim.name()),
            Duration::from_secs(60),
            || connections(victim, node, DISTCC_PORT) >= 2,
        );
        victim.set_link(false).unwrap();
        Instant::now()
    }

    /// Waits for `build`, started at `started`, during which `victim` was cut off at
    /// `cut_at`; brings the link back; the build must have succeeded far below distcc's
    /// IO timeout. Returns how long it took.
    fn finish_after_cut(
        &self,
        build: Spawned,
        started: Instant,
        cut_at: Instant,
        victim: &Worker,
        what: &str,
    ) -> Duration {
        let out = build.wait(Duration::from_secs(240)).unwrap();
        let took = started.elapsed();
        victim.set_link(true).unwrap();
        assert!(out.status.success(), "{what}: {}", text(&out));
        assert!(
            took < BUILD_BOUND,
            "{what} took {took:?} ({:?} after {} was cut): a compile waited for distcc's IO \
             timeout\n{}",
            cut_at.elapsed(),
            victim.name(),
            self.node.journal(BUILDER_SERVICE, 40)
        );
        eprintln!("{what}: {took:?}");
        took
    }
}

fn connections(worker: &Worker, peer: Ipv4Addr, port: u16) -> usize {
    worker.connections_from(peer, port).unwrap()
}

fn text(out: &Output) -> String {
    common::text(out)
}

/// One build of the project by `user` in a fresh directory `NAME` (in the session's
/// workspace, else the home directory), leaving its marks in `/home/USER/marks/NAME/`:
/// `dir` (the session's DISTCC_DIR, if any), `pwd`, `output` (the program's), `objects/`,
/// `steering.log` (the session's, if any), then `built`.
struct BuildRun {
    user: String,
    marks: String,
}

impl BuildRun {
    /// `make` is what builds (`make -s -j"$DISTCC_SLOTS"` in a session).
    fn script(node: &BuilderNode, user: &str, name: &str, make: &str) -> (BuildRun, String) {
        let marks = format!("/home/{user}/marks/{name}");
        node.run_as_ok(user, &["mkdir", "-p", &format!("{marks}/objects")])
            .unwrap();
        let script = format!(
            "set -e\n\
             [ -z \"$DISTCC_DIR\" ] || {{ echo \"$DISTCC_DIR\" > {m}/dir.tmp && mv {m}/dir.tmp {m}/dir; }}\n\
             mkdir {name} && cd {name}\n\
             pwd > {m}/pwd\n\
             cp {PROJECT}/* .\n\
             {make}\n\
             ./prog > {m}/output\n\
             cp *.o {m}/objects/\n\
             [ -z \"$DISTCC_DIR\" ] || cp \"$DISTCC_DIR/steering.log\" {m}/steering.log || true\n\
             touch {m}/built\n",
            m = marks,
        );
        (
            BuildRun {
                user: user.to_owned(),
                marks,
            },
            script,
        )
    }

    fn mark(&self, name: &str) -> String {
        format!("{}/{name}", self.marks)
    }

    /// The program's output equals the local build's, and every object is
    /// byte-identical to it.
    fn assert_same_as_local(&self, cluster: &Cluster) {
        let reference = reference();
        assert_eq!(
            cluster.file(&self.mark("output")).unwrap_or_default(),
            reference.output,
            "{}'s program prints something else than the local build's",
            self.user
        );
        let differing: Vec<String> = std::iter::once("main".to_owned())
            .chain((0..UNITS).map(|u| format!("u{u}")))
            .map(|unit| format!("{unit}.o"))
            .filter(|object| {
                let out = cluster
                    .node
                    .exec(&["cat", &self.mark(&format!("objects/{object}"))])
                    .unwrap();
                !out.status.success()
                    || out.stdout != std::fs::read(reference.dir.join(object)).unwrap()
            })
            .collect();
        assert!(
            differing.is_empty(),
            "objects of {}'s build differ from the local build's: {differing:?}",
            self.user
        );
    }

    fn steering_log(&self, cluster: &Cluster) -> String {
        cluster.file(&self.mark("steering.log")).unwrap_or_default()
    }
}

/// The project built on the host with plain `make CC=gcc`, once per test binary: what
/// every build in the node must reproduce (the workers' and the node's compilers are the
/// rootfs's, the same Debian packages as the host's; failover_in_containers.rs compares
/// the same way).
struct Reference {
    dir: PathBuf,
    /// What its program prints.
    output: String,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("builder_node-reference");
        let _ = std::fs::remove_dir_all(&dir);
        write_slow_project(&dir);
        let out = Command::new("make")
            .args(["-s", "-j2", "CC=gcc"])
            .current_dir(&dir)
            .env_remove("DISTCC_HOSTS")
            .output()
            .unwrap();
        assert!(out.status.success(), "the local build: {}", text(&out));
        let run = Command::new("./prog").current_dir(&dir).output().unwrap();
        assert!(
            run.status.success(),
            "the local build's program: {}",
            text(&run)
        );
        Reference {
            dir,
            output: String::from_utf8(run.stdout).unwrap(),
        }
    })
}

/// `builderctl enter -- sh -c SCRIPT` as `user`, with `env` (`K=V`) before it.
fn enter_argv<'a>(env: &[&'a str], script: &'a str) -> Vec<&'a str> {
    let mut argv = vec!["env"];
    argv.extend_from_slice(env);
    argv.extend(["builderctl", "enter", "--", "sh", "-c", script]);
    argv
}

/// The proof's first two items: a user's `enter` build spreads over the cluster with
/// fallback off, and the same user's build survives a worker lost mid-build.
#[test]
fn a_user_builds_through_the_cluster_and_survives_a_lost_worker() {
    let cluster = Cluster::boot();
    let node = &cluster.node;
    let alice = node.add_user("alice", true).unwrap();

    // Healthy, DISTCC_FALLBACK=0: a compile that failed remotely fails the build.
    let before = cluster.compile_ok();
    let (run, script) = BuildRun::script(node, "alice", "healthy", "make -s -j\"$DISTCC_SLOTS\"");
    let started = Instant::now();
    let out = node
        .run_as("alice", &enter_argv(&["DISTCC_FALLBACK=0"], &script))
        .unwrap();
    assert!(out.status.success(), "alice's build: {}", text(&out));
    eprintln!("alice's healthy build: {:?}", started.elapsed());
    let workspace = format!("{USER_WORKSPACES}/alice");
    assert_eq!(
        cluster.file(&run.mark("pwd")).unwrap().trim(),
        format!("{workspace}/healthy"),
        "the session did not run in alice's workspace"
    );
    let mount = node
        .exec_ok(&["findmnt", "-n", "-o", "FSTYPE,OPTIONS", &workspace])
        .unwrap();
    assert!(
        mount.starts_with("tmpfs")
            && mount.contains("mode=700")
            && mount.contains(&format!("uid={alice}")),
        "alice's workspace is not her private tmpfs: {mount}"
    );
    let after = cluster.compile_ok();
    for (k, w) in cluster.workers.iter().enumerate() {
        assert!(
            after[k] > before[k],
            "no compile ran on {} ({} -> {}): {}",
            w.name(),
            before[k],
            after[k],
            text(&out)
        );
    }
    eprintln!("compile_ok before {before:?}, after {after:?}");
    run.assert_same_as_local(&cluster);

    // The same user, w2 cut off while compiles are in flight there.
    let w2 = &cluster.workers[1];
    let (run, script) = BuildRun::script(node, "alice", "cut", "make -s -j\"$DISTCC_SLOTS\"");
    let started = Instant::now();
    let build = node.spawn_as("alice", &enter_argv(&[], &script)).unwrap();
    let cut_at = cluster.cut_mid_build(w2);
    cluster.finish_after_cut(build, started, cut_at, w2, "alice's build with w2 cut");
    let log = run.steering_log(&cluster);
    let w2_endpoint = Cluster::endpoint(w2);
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("{w2_endpoint}: lost (")) && l.contains("aborted")),
        "alice's steering log shows no aborted connections to w2:\n{log}"
    );
    run.assert_same_as_local(&cluster);
}

/// A plain `make CC="distcc gcc"` (cron, CI) never talks to the daemon, yet the daemon's
/// failover covers it: hosts from /etc/distcc/hosts, the lost worker's connections
/// aborted.
#[test]
fn a_plain_make_survives_a_lost_worker_with_the_daemon_running() {
    let cluster = Cluster::boot();
    let node = &cluster.node;
    // Not in the build group: it needs nothing from the daemon but its hosts file.
    node.add_user("ci", false).unwrap();
    node.run_as_ok("ci", &["mkdir", "-p", "/home/ci/.distcc"])
        .unwrap();
    let hosts = cluster.file(SYSTEM_HOSTS_FILE).unwrap();
    for w in &cluster.workers {
        assert!(
            hosts.contains(&format!("{}:{DISTCC_PORT}/", w.ip())),
            "{} is not in {SYSTEM_HOSTS_FILE}:\n{hosts}",
            w.name()
        );
    }
    let w2 = &cluster.workers[1];
    let (run, script) = BuildRun::script(node, "ci", "plain", "make -s -j8 CC=\"distcc gcc\"");
    let started = Instant::now();
    let build = node.spawn_as("ci", &["sh", "-c", &script]).unwrap();
    let cut_at = cluster.cut_mid_build(w2);
    eventually(
        &format!("w2 excluded from {SYSTEM_HOSTS_FILE}"),
        Duration::from_secs(30),
        || {
            cluster
                .file(SYSTEM_HOSTS_FILE)
                .is_some_and(|h| h.contains(&format!("# excluded {}", Cluster::endpoint(w2))))
        },
    );
    cluster.finish_after_cut(build, started, cut_at, w2, "the plain make with w2 cut");
    run.assert_same_as_local(&cluster);
}

/// Two users: neither can read, write, enter or unmount the other's workspace; `leave`
/// unmounts only one's own, and not while it is in use.
#[test]
fn workspaces_are_private_and_leave_unmounts_only_ones_own() {
    let cluster = Cluster::boot();
    let node = &cluster.node;
    node.add_user("alice", true).unwrap();
    node.add_user("bob", true).unwrap();
    let alice_ws = format!("{USER_WORKSPACES}/alice");
    let bob_ws = format!("{USER_WORKSPACES}/bob");
    for user in ["alice", "bob"] {
        let out = node
            .run_as(
                user,
                &[
                    "builderctl",
                    "enter",
                    "--",
                    "sh",
                    "-c",
                    "echo mine > secret",
                ],
            )
            .unwrap();
        assert!(out.status.success(), "{user}'s session: {}", text(&out));
    }
    let mounted = |path: &str| {
        node.exec(&["mountpoint", "-q", path])
            .unwrap()
            .status
            .success()
    };
    assert!(
        mounted(&alice_ws) && mounted(&bob_ws),
        "the workspaces are not mounted"
    );

    let attempts: [(&str, String); 5] = [
        ("read", format!("cat {alice_ws}/secret")),
        ("list", format!("ls {alice_ws}")),
        ("write", format!("echo x > {alice_ws}/planted")),
        ("enter", format!("cd {alice_ws}")),
        ("unmount", format!("umount {alice_ws}")),
    ];
    for (what, script) in &attempts {
        let out = node.run_as("bob", &["sh", "-c", script]).unwrap();
        assert!(
            !out.status.success(),
            "bob could {what} alice's workspace ({script}): {}",
            text(&out)
        );
    }
    assert!(!cluster.exists(&format!("{alice_ws}/planted")));
    assert_eq!(
        cluster.file(&format!("{alice_ws}/secret")).as_deref(),
        Some("mine\n")
    );

    // In use: a process of alice's inside it.
    let holder = node
        .spawn_as(
            "alice",
            &[
                "sh",
                "-c",
                &format!("cd {alice_ws} && touch held && until [ -e /tmp/release-alice ]; do sleep 0.1; done"),
            ],
        )
        .unwrap();
    eventually("alice holds her workspace", Duration::from_secs(20), || {
        cluster.exists(&format!("{alice_ws}/held"))
    });
    let out = node.run_as("alice", &["builderctl", "leave"]).unwrap();
    assert!(
        !out.status.success() && mounted(&alice_ws),
        "leave unmounted a workspace in use: {}",
        text(&out)
    );
    // bob's leave is about bob's workspace only.
    let out = node.run_as("bob", &["builderctl", "leave"]).unwrap();
    assert!(out.status.success(), "bob's leave: {}", text(&out));
    assert!(!mounted(&bob_ws), "bob's leave left his workspace mounted");
    assert!(
        mounted(&alice_ws),
        "bob's leave unmounted alice's workspace"
    );
    // Nothing of bob's is mounted now: his leave still never reaches alice's.
    let out = node.run_as("bob", &["builderctl", "leave"]).unwrap();
    assert!(
        mounted(&alice_ws),
        "bob's second leave unmounted alice's workspace: {}",
        text(&out)
    );

    node.write_file("/tmp/release-alice", "", 0o644).unwrap();
    let out = holder.wait(Duration::from_secs(20)).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = node.run_as("alice", &["builderctl", "leave"]).unwrap();
    assert!(out.status.success(), "alice's leave: {}", text(&out));
    assert!(!mounted(&alice_ws), "alice's leave left it mounted");
}

/// Restarting the agent on a worker mid-build is no loss: distccd keeps serving, so the
/// worker is never dropped as lost and none of its connections is aborted (with fallback
/// off, an aborted compile would fail the build).
#[test]
fn an_agent_restart_mid_build_aborts_nothing() {
    let cluster = Cluster::boot();
    let node = &cluster.node;
    node.add_user("alice", true).unwrap();
    let w1 = &cluster.workers[0];
    let (run, script) = BuildRun::script(node, "alice", "restart", "make -s -j\"$DISTCC_SLOTS\"");
    let build = node
        .spawn_as("alice", &enter_argv(&["DISTCC_FALLBACK=0"], &script))
        .unwrap();
    let node_ip = node.address();
    eventually("compiles in flight on w1", Duration::from_secs(60), || {
        connections(w1, node_ip, DISTCC_PORT) >= 1
    });
    w1.exec_ok(&["systemctl", "restart", "distcc-agent"])
        .unwrap();
    let out = build.wait(Duration::from_secs(240)).unwrap();
    assert!(out.status.success(), "alice's build: {}", text(&out));
    let w1_endpoint = Cluster::endpoint(w1);
    let log = run.steering_log(&cluster);
    let daemon_log = node.journal(BUILDER_SERVICE, 400);
    for (whose, lines) in [
        ("alice's steering log", &log),
        ("the daemon's journal", &daemon_log),
    ] {
        let bad: Vec<&str> = lines
            .lines()
            .filter(|l| l.contains(&w1_endpoint) && (l.contains(": lost") || l.contains("aborted")))
            .collect();
        assert!(
            bad.is_empty(),
            "the agent's restart on w1 was taken for a loss in {whose}:\n{}",
            bad.join("\n")
        );
    }
    run.assert_same_as_local(&cluster);
}

/// The daemon restarted mid-build: the session's build finishes, and failover is armed
/// again once the daemon is back (a worker lost after the restart costs no IO timeout).
#[test]
fn the_daemon_restarted_mid_build_and_failover_is_armed_again() {
    let cluster = Cluster::boot();
    let node = &cluster.node;
    node.add_user("alice", true).unwrap();
    let (run, script) = BuildRun::script(node, "alice", "daemon", "make -s -j\"$DISTCC_SLOTS\"");
    let started = Instant::now();
    let build = node.spawn_as("alice", &enter_argv(&[], &script)).unwrap();
    let node_ip = node.address();
    eventually("compiles in flight", Duration::from_secs(60), || {
        cluster
            .workers
            .iter()
            .any(|w| connections(w, node_ip, DISTCC_PORT) >= 1)
    });
    node.exec_ok(&["systemctl", "restart", BUILDER_SERVICE])
        .unwrap();
    let w2 = &cluster.workers[1];
    // Back: its stream to every worker is open again.
    eventually(
        "the daemon follows every worker again",
        Duration::from_secs(30),
        || {
            node.agent_streams(&cluster.workers.iter().collect::<Vec<_>>())
                .unwrap()
                .iter()
                .all(|n| *n >= 1)
        },
    );
    let cut_at = cluster.cut_mid_build(w2);
    cluster.finish_after_cut(
        build,
        started,
        cut_at,
        w2,
        "alice's build with w2 cut after the daemon's restart (failover armed again?)",
    );
    run.assert_same_as_local(&cluster);
    eprintln!("steering log:\n{}", run.steering_log(&cluster));
}

/// The `[FAIL]` line of preflight `check` and its fix, as `enter` prints them.
#[track_caller]
fn assert_preflight_failure(out: &Output, detail: &str, fix: &str) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "not a preflight failure: {}",
        text(out)
    );
    let lines: Vec<&str> = all.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("[FAIL]") && l.contains(detail))
        .unwrap_or_else(|| panic!("no [FAIL] line saying {detail:?}:\n{all}"));
    assert!(
        lines
            .get(at + 1)
            .is_some_and(|l| l.contains("fix:") && l.contains(fix)),
        "the failure's fix does not say {fix:?}:\n{all}"
    );
    assert!(
        all.contains("preflight failed; not entering builder mode"),
        "{all}"
    );
}

/// A user not in the group, and a user with the daemon stopped, are told exactly what is
/// missing and how to fix it; nothing runs.
#[test]
fn preflight_says_what_an_ordinary_user_lacks() {
    let cluster = Cluster::boot();
    let node = &cluster.node;
    node.add_user("carol", false).unwrap();
    node.add_user("alice", true).unwrap();
    assert!(!node.can_connect_to_daemon("carol").unwrap());
    assert!(node.can_connect_to_daemon("alice").unwrap());
    let run = ["builderctl", "enter", "--", "touch", "ran"];

    let out = node.run_as("carol", &run).unwrap();
    assert_preflight_failure(
        &out,
        "you are not in the distcc-build group",
        "adduser carol distcc-build",
    );
    assert!(!cluster.exists("/home/carol/ran"));

    node.stop_daemon().unwrap();
    let out = node.run_as("alice", &run).unwrap();
    assert_preflight_failure(
        &out,
        &format!("builder daemon not reachable at {SESSION_SOCKET}"),
        "systemctl enable --now distcc-builder.socket",
    );
    assert!(!cluster.exists("/home/alice/ran"));
}

/// N sessions on a node must not mean N streams per worker: two users' sessions open,
/// each worker sees exactly one connection from the node to its agent (the daemon's).
#[test]
fn two_sessions_share_one_stream_per_worker() {
    let cluster = Cluster::boot();
    let node = &cluster.node;
    let workers: Vec<&Worker> = cluster.workers.iter().collect();
    let mut sessions = Vec::new();
    for user in ["alice", "bob"] {
        node.add_user(user, true).unwrap();
        let script = "touch $HOME/in; until [ -e /tmp/release ]; do sleep 0.1; done";
        sessions.push(node.spawn_as(user, &enter_argv(&[], script)).unwrap());
    }
    eventually("both sessions are in", Duration::from_secs(30), || {
        cluster.exists("/home/alice/in") && cluster.exists("/home/bob/in")
    });
    // Five readings in a row, so that a session's stream that is being set up again
    // cannot slip between two of them.
    let mut in_a_row = 0;
    let mut last = Vec::new();
    eventually(
        "one stream per worker, five readings in a row",
        Duration::from_secs(20),
        || {
            last = node.agent_streams(&workers).unwrap();
            in_a_row = if last.iter().all(|n| *n == 1) {
                in_a_row + 1
            } else {
                0
            };
            assert!(
                last.iter().all(|n| *n <= 1),
                "more than one stream from the node to a worker's agent with two sessions: {last:?}"
            );
            in_a_row >= 5
        },
    );
    node.write_file("/tmp/release", "", 0o644).unwrap();
    for session in sessions {
        let out = session.wait(Duration::from_secs(20)).unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
}
