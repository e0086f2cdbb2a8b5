//! distccd confined by the kernel, proven in real systemd containers (see
//! `distcc-testbed`): the allowlist is a cgroup BPF filter the agent swaps on the running
//! unit (no compile dropped, distccd not restarted, a removed client refused by the
//! kernel), and a compile that runs arbitrary code (`gcc -wrapper`) from an admitted
//! client cannot connect out, read the agent's secrets, write outside its scratch space,
//! run what it wrote, or fork without bound.
//!
//! Needs root. Run with `cargo test -p distcc-agent --test distccd_confinement`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use distcc_proto::v1 as pb;
use distcc_proto::v1::distcc_agent_client::DistccAgentClient;
use distcc_testbed::{AGENT_PORT, AgentInstall, Rootfs, TEST_TOKEN, Testbed, Worker, WorkerSpec};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = DistccAgentClient<InterceptedService<Channel, AddToken>>;

/// The tests run one at a time: distccd's LimitNPROC counts every process of the distccd
/// user on the machine (all containers share the kernel and the rootfs's uid), so the fork
/// bomb of one test would starve the other test's compiles.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the probe wrapper is installed in the worker: root-owned, under /usr (the only
/// tree distccd.service may execute from), read-only for distccd.
const PROBE: &str = "/usr/local/lib/distcc-probe/probe.sh";

/// The agent config: policy = the test-bed's subnet, allowlist = `allow`.
fn config(bed: &Testbed, allow: &[String]) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "listen = \"0.0.0.0:{AGENT_PORT}\"\ntokens_file = \"/etc/distcc-agent/tokens\"\n\
         job_timeout_secs = 15\n\
         [policy]\nallow_within = [\"{subnet}\"]\n\
         [distccd]\nallow = [{allow}]\njobs = 4\nnice = 10\n",
        subnet = bed.subnet(),
        allow = allow.join(", ")
    )
}

fn bed() -> Testbed {
    Rootfs::ensure().expect("test-bed root filesystem");
    Testbed::create().expect("test-bed network")
}

async fn boot(bed: &Testbed, allow: &[String]) -> (Worker, Client) {
    boot_with(bed, allow, |spec| spec).await
}

async fn boot_with(
    bed: &Testbed,
    allow: &[String],
    customize: impl FnOnce(WorkerSpec) -> WorkerSpec,
) -> (Worker, Client) {
    let install = AgentInstall {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_distcc-agent")),
        repo: Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    let worker = bed
        .boot_agent_worker("w1", &install, &config(bed, allow), customize)
        .expect("boot a worker running the agent");
    let channel = common::AgentWorker::connect(&worker).await;
    let interceptor: AddToken = Box::new(|mut request: tonic::Request<()>| {
        let value: MetadataValue<_> = format!("Bearer {TEST_TOKEN}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    });
    (
        worker,
        DistccAgentClient::with_interceptor(channel, interceptor),
    )
}

async fn status(client: &mut Client) -> pb::WorkerStatus {
    client
        .status(pb::StatusRequest::default())
        .await
        .expect("Status")
        .into_inner()
}

async fn set_allow(client: &mut Client, allow: &[String]) -> pb::ConfigureResponse {
    client
        .configure(pb::ConfigureRequest {
            allow: Some(pb::AllowList {
                cidrs: allow.to_vec(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("Configure allow={allow:?}: {e}"))
        .into_inner()
}

async fn kernel_filter_check(client: &mut Client) -> pb::Check {
    let report = client
        .validate(pb::ValidateRequest {})
        .await
        .unwrap()
        .into_inner();
    report
        .checks
        .into_iter()
        .find(|c| c.name == "kernel-filter")
        .expect("Validate has a kernel-filter check")
}

/// Poll until `check` holds; the bound only keeps a broken build from hanging CI.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A compile on `worker` through distcc with no local fallback: success means it ran
/// there. `command` is where distcc runs (the root namespace or a bare host's).
fn distcc(mut command: Command, dir: &Path, worker: Ipv4Addr, args: &[&str]) -> Output {
    // A fresh DISTCC_DIR per compile: distcc remembers a refused host for 60 s there
    // (and with DISTCC_BACKOFF_PERIOD=0 it retries a dropped host forever).
    let distcc_dir = tempfile::tempdir_in(dir).unwrap();
    command
        .arg("gcc")
        .args(args)
        .current_dir(dir)
        .env("DISTCC_HOSTS", worker.to_string())
        .env("DISTCC_FALLBACK", "0")
        .env("DISTCC_DIR", distcc_dir.path())
        .output()
        .expect("run distcc")
}

/// A source that keeps cc1 busy for a while at -O2, so compiles overlap.
fn heavy_source(functions: usize) -> String {
    let mut text = String::new();
    for i in 0..functions {
        text.push_str(&format!(
            "int f{i}(int *a, int n) {{ int s = 0; for (int j = 0; j < n; j++) \
             s += a[j] * {i} ^ (s >> 3); return s; }}\n"
        ));
    }
    text
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The probe: gcc runs it around cc1 (`-wrapper PROBE,IP,PORT`); for cc1 it tries each
/// escape and reports `PROBE <name>: ALLOWED|refused` on stderr, which distccd returns to
/// the client. `control-*` probes must be ALLOWED: they show the probe itself works.
const PROBE_SCRIPT: &str = r#"#!/bin/sh
ip=$1; port=$2; shift 2
case "$1" in *cc1) ;; *) exec "$@" ;; esac
try() { name=$1; shift
  if "$@" >/dev/null 2>&1; then echo "PROBE $name: ALLOWED" >&2; else echo "PROBE $name: refused" >&2; fi; }
try connect-builder bash -c "exec 3<>/dev/tcp/$ip/$port"
try connect-loopback-agent bash -c "exec 3<>/dev/tcp/127.0.0.1/3634"
try read-agent-config cat /etc/distcc-agent/agent.toml
try read-agent-tokens cat /etc/distcc-agent/tokens
try list-agent-dir ls /etc/distcc-agent
try read-agent-state cat /var/lib/distcc-agent/distccd.env
for dir in /etc /var/lib/distcc-agent /usr/local/lib/distcc-probe /var/lib /var/cache /run /dev/shm /home /root; do
  try "write-$dir" sh -c "echo x > $dir/written-by-a-compile"
done
try control-write-scratch sh -c 'echo x > /tmp/scratch-file'
try control-exec-usr /usr/bin/true
cp /usr/bin/true /tmp/payload && chmod 755 /tmp/payload
try exec-tmp /tmp/payload
cp /usr/bin/true /var/tmp/payload && chmod 755 /var/tmp/payload
try exec-var-tmp /var/tmp/payload
# Fork without bound (up to 5000): count how many processes it got before fork failed.
( n=0; while [ $n -lt 5000 ]; do sleep 60 & echo $! >> /tmp/bomb.pids; n=$((n+1)); echo $n > /tmp/bomb.count; done ) 2>/dev/null
# Builtins only until the sleeps are gone: every fork slot is taken.
read n < /tmp/bomb.count
while read p; do kill $p 2>/dev/null; done < /tmp/bomb.pids
rm -f /tmp/bomb.pids /tmp/bomb.count
if [ "$n" -lt 5000 ]; then echo "PROBE fork-bomb: refused (after $n)" >&2; else echo "PROBE fork-bomb: ALLOWED ($n)" >&2; fi
exec "$@"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_compile_cannot_escape_distccd_confinement() {
    let _serial = SERIAL.lock().await;
    let bed = bed();
    let (worker, mut client) = boot(&bed, &[bed.subnet()]).await;
    worker
        .write_file(PROBE, PROBE_SCRIPT, 0o755)
        .expect("install the probe");
    // What the probe must not read is there (for root): a refusal is the unit's doing.
    for secret in [
        "/etc/distcc-agent/agent.toml",
        "/etc/distcc-agent/tokens",
        "/var/lib/distcc-agent/distccd.env",
    ] {
        worker.exec_ok(&["test", "-s", secret]).expect(secret);
    }
    let pid_before = status(&mut client).await.unit.unwrap().main_pid;

    // The builder listens on its bridge address; nothing from the worker may reach it.
    let listener = TcpListener::bind((bed.host_ip(), 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("unit.c"),
        "int twice(int x) { return 2 * x; }\n",
    )
    .unwrap();
    // Preprocessed here, so distcc sends it as is and the wrapper runs only on the worker.
    let cpp = Command::new("gcc")
        .args(["-E", "unit.c", "-o", "unit.i"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(cpp.status.success(), "{}", stderr(&cpp));

    let wrapper_arg = format!("{PROBE},{},{port}", bed.host_ip());
    let out = distcc(
        Command::new("distcc"),
        dir.path(),
        worker.ip(),
        &["-wrapper", &wrapper_arg, "-c", "unit.i", "-o", "probed.o"],
    );
    let report = stderr(&out);
    assert!(
        out.status.success(),
        "the probed compile itself must still work: {report}\n{}",
        worker.journal("distccd.service", 30)
    );
    let probes: Vec<(&str, &str)> = report
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE "))
        .filter_map(|l| l.split_once(": "))
        .collect();
    let expected = [
        "connect-builder",
        "connect-loopback-agent",
        "read-agent-config",
        "read-agent-tokens",
        "list-agent-dir",
        "read-agent-state",
        "write-/etc",
        "write-/var/lib/distcc-agent",
        "write-/usr/local/lib/distcc-probe",
        "write-/var/lib",
        "write-/var/cache",
        "write-/run",
        "write-/dev/shm",
        "write-/home",
        "write-/root",
        "control-write-scratch",
        "control-exec-usr",
        "exec-tmp",
        "exec-var-tmp",
        "fork-bomb",
    ];
    let names: Vec<&str> = probes.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, expected, "every probe ran and reported: {report}");
    for (name, result) in &probes {
        if name.starts_with("control-") {
            assert_eq!(*result, "ALLOWED", "{name} (the probe works): {report}");
        } else {
            assert!(result.starts_with("refused"), "{name}: {result}\n{report}");
        }
    }
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the builder's listener saw a connection from a compile"
    );

    // A compile whose wrapper is what an earlier compile wrote into the scratch space:
    // gcc cannot execute it, the compile fails.
    let out = distcc(
        Command::new("distcc"),
        dir.path(),
        worker.ip(),
        &[
            "-wrapper",
            "/tmp/payload",
            "-c",
            "unit.i",
            "-o",
            "payload.o",
        ],
    );
    assert!(
        !out.status.success() && stderr(&out).contains("Permission denied"),
        "a file written to /tmp ran as the wrapper: {}",
        stderr(&out)
    );

    // distccd kept serving, unrestarted: an ordinary compile works.
    let out = distcc(
        Command::new("distcc"),
        dir.path(),
        worker.ip(),
        &["-c", "unit.c", "-o", "plain.o"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let after = status(&mut client).await.unit.unwrap();
    assert_eq!(
        (after.active_state.as_str(), after.main_pid),
        ("active", pid_before)
    );
    let check = kernel_filter_check(&mut client).await;
    assert!(check.passed, "{check:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn allowlist_changes_apply_without_restart_or_dropped_compiles() {
    let _serial = SERIAL.lock().await;
    let bed = bed();
    let other = bed
        .add_bare_host("c2")
        .expect("a second client on the bridge");
    let builder = format!("{}/32", bed.host_ip());
    let second = format!("{}/32", other.ip());
    let both = [builder.clone(), second.clone()];
    let (worker, mut client) = boot(&bed, &both).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("heavy.c"), heavy_source(150)).unwrap();
    std::fs::write(
        dir.path().join("unit.c"),
        "int twice(int x) { return 2 * x; }\n",
    )
    .unwrap();
    let compile_from_second = || {
        distcc(
            other.command("distcc"),
            dir.path(),
            worker.ip(),
            &["-c", "unit.c", "-o", "second.o"],
        )
    };
    let out = compile_from_second();
    assert!(out.status.success(), "c2 admitted: {}", stderr(&out));

    let before = status(&mut client).await.unit.unwrap();
    let cmdline_before = worker
        .exec_ok(&["cat", &format!("/proc/{}/cmdline", before.main_pid)])
        .unwrap()
        .replace('\0', " ");
    // distccd itself admits the whole policy; only the kernel filter narrows it.
    assert!(
        cmdline_before.contains(&format!("--allow {}", bed.subnet())),
        "{cmdline_before}"
    );

    // A build through the worker: 6 compilers in a loop (4 slots, so always some in
    // flight and some queued), while the allowlist changes under it.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut builders = Vec::new();
    for k in 0..6 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (dir, ip) = (dir.path().to_owned(), worker.ip());
        builders.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let object = format!("heavy-{k}-{n}.o");
                let out = distcc(
                    Command::new("distcc"),
                    &dir,
                    ip,
                    &["-O2", "-c", "heavy.c", "-o", &object],
                );
                if out.status.success() && dir.join(&object).exists() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.lock().unwrap().push(stderr(&out));
                }
                n += 1;
            }
        }));
    }
    // Let the build get going: compiles in flight before the first change.
    eventually("compiles in flight", || ok.load(Ordering::Relaxed) >= 6);
    let mut in_flight = Vec::new();
    // Seven changes, from both clients to the builder alone and back, ending narrowed.
    for round in 0..7 {
        let allow: &[String] = if round % 2 == 0 {
            std::slice::from_ref(&builder)
        } else {
            &both
        };
        let response = set_allow(&mut client, allow).await;
        assert!(response.changed);
        assert_eq!(
            response.unit.unwrap().main_pid,
            before.main_pid,
            "round {round}"
        );
        in_flight.push(status(&mut client).await.stats.unwrap().jobs_running);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for b in builders {
        b.join().unwrap();
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    println!(
        "allowlist changed 7 times during the build: {} compiles ok, {} failed, in flight at \
         each change: {in_flight:?}",
        ok.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(failed.is_empty(), "compiles failed: {failed:?}");
    assert!(in_flight.iter().any(|n| *n > 0), "{in_flight:?}");
    let after = status(&mut client).await.unit.unwrap();
    assert_eq!(
        (after.main_pid, after.n_restarts),
        (before.main_pid, before.n_restarts),
        "distccd was not restarted"
    );

    // The last change left the builder alone: c2 is refused by the kernel (its SYN is
    // dropped, the connect times out) although distccd's own --allow admits it.
    let connect = other
        .command("timeout")
        .args(["3", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{}/3632", worker.ip()))
        .output()
        .unwrap();
    assert_eq!(
        connect.status.code(),
        Some(124),
        "c2's connect was not dropped: {}",
        stderr(&connect)
    );
    let out = compile_from_second();
    assert!(!out.status.success(), "c2 compiled after its removal");
    let out = distcc(
        Command::new("distcc"),
        dir.path(),
        worker.ip(),
        &["-c", "unit.c", "-o", "builder.o"],
    );
    assert!(
        out.status.success(),
        "the builder still compiles: {}",
        stderr(&out)
    );
    let check = kernel_filter_check(&mut client).await;
    assert!(check.passed, "{check:?}");

    // Kept for boot: systemd wrote the filter under /etc/systemd/system.control, and it
    // survives a daemon-reload.
    worker.exec_ok(&["systemctl", "daemon-reload"]).unwrap();
    let filter = worker
        .exec_ok(&["systemctl", "show", "-P", "IPAddressAllow", "distccd"])
        .unwrap();
    let mut filter: Vec<&str> = filter.split_whitespace().collect();
    filter.sort_unstable();
    assert_eq!(filter, ["127.0.0.0/8", builder.as_str(), "::1/128"]);
    let dropin = worker
        .exec_ok(&[
            "cat",
            "/etc/systemd/system.control/distccd.service.d/50-IPAddressAllow.conf",
        ])
        .unwrap();
    assert!(
        dropin.contains(&format!("IPAddressAllow={builder}")),
        "{dropin}"
    );
}

/// Where systemd cannot load cgroup BPF programs (here: a container whose seccomp filter
/// refuses bpf(2)), it runs distccd WITHOUT the filter, and here (systemd 252) logs nothing
/// about it. The agent's Validate must say it loudly; distccd's own --allow (the policy)
/// still applies.
#[tokio::test(flavor = "multi_thread")]
async fn validate_says_when_the_kernel_filter_is_not_in_force() {
    let _serial = SERIAL.lock().await;
    let bed = bed();
    let builder = format!("{}/32", bed.host_ip());
    let (worker, mut client) = boot_with(
        &bed,
        std::slice::from_ref(&builder),
        WorkerSpec::without_bpf,
    )
    .await;
    let check = kernel_filter_check(&mut client).await;
    assert!(
        !check.passed && check.reason.contains("WITHOUT"),
        "{check:?}"
    );
    // The unit's properties say IPAddressDeny=any all the same: only the accounting tells.
    let deny = worker
        .exec_ok(&["systemctl", "show", "-P", "IPAddressDeny", "distccd"])
        .unwrap();
    // systemd lists them in no fixed order (see docs/TESTBED.md): compare as a set.
    let mut deny: Vec<&str> = deny.split_whitespace().collect();
    deny.sort_unstable();
    assert_eq!(deny, ["0.0.0.0/0", "::/0"]);
}
