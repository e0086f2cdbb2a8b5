//! End-to-end: real systemd workers, a real remote compile, a cut link, clean teardown.
//! Needs root (like everything in this crate). The first run builds the rootfs cache.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use distcc_testbed::{Rootfs, Testbed, Worker, WorkerSpec};

const DISTCCD_PORT: u16 = 3632;

/// distccd as a systemd service, the way the agent will run it (Debian ships only a SysV
/// script). `--log-stderr` puts one line per job into the journal.
fn distccd_unit(subnet: &str) -> String {
    format!(
        "[Unit]\nDescription=distccd for the testbed\n\n[Service]\n\
         ExecStart=/usr/bin/distccd --no-detach --daemon --log-stderr --allow {subnet} --listen 0.0.0.0\n\
         User=distccd\n"
    )
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Waits until `addr` accepts TCP connections (a started service is not listening at once).
fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("{addr} not listening"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn start_distccd(w: &Worker, subnet: &str) -> Result<()> {
    w.write_file(
        "/etc/systemd/system/distccd.service",
        distccd_unit(subnet),
        0o644,
    )?;
    w.exec_ok(&["systemctl", "daemon-reload"])?;
    w.exec_ok(&["systemctl", "start", "distccd.service"])?;
    wait_listening(
        SocketAddr::from((w.ip(), DISTCCD_PORT)),
        Duration::from_secs(10),
    )
}

/// Compiles a C file in the root namespace (the builder) on `worker` only.
fn remote_compile(worker: &Worker, dir: &Path) -> Result<()> {
    let src = dir.join("t.c");
    let obj = dir.join("t.o");
    std::fs::write(
        &src,
        format!(
            "int on_{}(int x) {{ return x * 2 + 1; }}\n",
            worker.name().replace('-', "_")
        ),
    )?;
    let distcc_dir = dir.join("distcc");
    std::fs::create_dir_all(&distcc_dir)?;
    let out = Command::new("distcc")
        .args(["gcc", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .current_dir(dir)
        .env("DISTCC_HOSTS", worker.ip().to_string())
        // Fail instead of quietly compiling locally: proves the compile ran remotely.
        .env("DISTCC_FALLBACK", "0")
        .env("DISTCC_DIR", &distcc_dir)
        .output()
        .context("cannot run distcc (is the package distcc installed on the host?)")?;
    ensure!(
        out.status.success(),
        "distcc on {} failed ({}): {}\n{}",
        worker.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        worker.journal("distccd.service", 30)
    );
    let len = std::fs::metadata(&obj)
        .with_context(|| format!("{} missing", obj.display()))?
        .len();
    ensure!(len > 0, "{} is empty", obj.display());
    Ok(())
}

/// Names of network namespaces and links on the host.
fn net_objects() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let out = Command::new("ip").args(args).output()?;
        ensure!(out.status.success(), "ip {args:?} failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "dcctb3-w1 (id: 0)" or "7: dcctb3v1@if2: <...>"
            let name = if args[0] == "netns" {
                line.split_whitespace().next()
            } else {
                line.split(": ")
                    .nth(1)
                    .map(|n| n.split('@').next().unwrap_or(n))
            };
            names.extend(name.map(str::to_owned));
        }
    }
    Ok(names)
}

fn ours(names: &BTreeSet<String>, index: u8) -> Vec<String> {
    let (bridge, ns, veth) = (
        format!("br-dcctb{index}"),
        format!("dcctb{index}-"),
        format!("dcctb{index}v"),
    );
    names
        .iter()
        .filter(|n| **n == bridge || n.starts_with(&ns) || n.starts_with(&veth))
        .cloned()
        .collect()
}

#[test]
fn two_workers_compile_remotely_and_a_cut_link_times_out() -> Result<()> {
    init_logging();
    let t0 = Instant::now();
    let rootfs = Rootfs::ensure()?;
    assert_eq!(Rootfs::ensure()?, rootfs, "the cached rootfs is reused");
    let t_rootfs = t0.elapsed();

    let bed = Testbed::create()?;
    let index = bed.index();
    assert_eq!(bed.host_ip().to_string(), format!("198.18.{index}.1"));
    assert_eq!(bed.subnet(), format!("198.18.{index}.0/24"));

    let t1 = Instant::now();
    let (w1, w2) = std::thread::scope(|s| {
        let a = s.spawn(|| bed.boot_worker(WorkerSpec::new("w1")));
        let b = s.spawn(|| bed.boot_worker(WorkerSpec::new("w2")));
        (
            a.join().expect("boot thread w1"),
            b.join().expect("boot thread w2"),
        )
    });
    let (w1, w2) = (w1?, w2?);
    let t_boot = t1.elapsed();
    assert_ne!(w1.ip(), w2.ip());
    for w in [&w1, &w2] {
        assert!(w.ip().to_string().starts_with(&format!("198.18.{index}.")));
        // The hostname comes from the spec, not from the rootfs.
        assert_eq!(w.exec_ok(&["hostname"])?.trim(), w.name());
        let state = w.exec_ok(&["systemctl", "is-system-running"])?;
        assert!(matches!(state.trim(), "running" | "degraded"), "{state}");
        // A real system bus (the agent talks to systemd over D-Bus).
        assert!(
            w.exec_ok(&["busctl", "--system", "list"])?
                .contains("org.freedesktop.systemd1")
        );
    }
    assert_ne!(
        w1.exec_ok(&["cat", "/etc/machine-id"])?,
        w2.exec_ok(&["cat", "/etc/machine-id"])?,
        "each worker has its own machine id"
    );

    // exec_ok reports failures with status and output.
    let err = w1
        .exec_ok(&["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"])
        .expect_err("exit 7");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("exit status: 7") && msg.contains("to-stdout") && msg.contains("to-stderr"),
        "{msg}"
    );

    // write_file: contents, mode, parent directories.
    w1.write_file("/etc/distcc-agent/probe.toml", b"a = 1\n", 0o640)?;
    assert_eq!(
        w1.exec_ok(&["cat", "/etc/distcc-agent/probe.toml"])?,
        "a = 1\n"
    );
    assert_eq!(
        w1.exec_ok(&["stat", "-c", "%a", "/etc/distcc-agent/probe.toml"])?
            .trim(),
        "640"
    );
    // Overlays are private: w2 does not see w1's file.
    assert!(
        !w2.exec(&["test", "-e", "/etc/distcc-agent/probe.toml"])?
            .status
            .success()
    );

    // distccd as a systemd service in both workers, started in parallel.
    let t2 = Instant::now();
    let subnet = bed.subnet();
    std::thread::scope(|s| -> Result<()> {
        let a = s.spawn(|| start_distccd(&w1, &subnet));
        let b = s.spawn(|| start_distccd(&w2, &subnet));
        a.join().expect("distccd thread w1")?;
        b.join().expect("distccd thread w2")
    })?;
    let t_distccd = t2.elapsed();

    // The root namespace is the builder: one compile on each worker.
    let t3 = Instant::now();
    for w in [&w1, &w2] {
        let dir = bed.dir().join(format!("build-{}", w.name()));
        std::fs::create_dir_all(&dir)?;
        remote_compile(w, &dir)?;
        let journal = w.journal("distccd.service", 50);
        assert!(
            journal.contains("COMPILE_OK") && journal.contains(&bed.host_ip().to_string()),
            "{} did not log the job from the builder:\n{journal}",
            w.name()
        );
    }
    let t_compile = t3.elapsed();

    // A cut link: w2 becomes silently unreachable (connect times out), w1 is unaffected.
    let t4 = Instant::now();
    w2.set_link(false)?;
    let w2_addr = SocketAddr::from((w2.ip(), DISTCCD_PORT));
    let start = Instant::now();
    let res = TcpStream::connect_timeout(&w2_addr, Duration::from_secs(2));
    let took = start.elapsed();
    assert!(
        res.is_err(),
        "connect to a worker with its link down must fail"
    );
    assert!(
        took < Duration::from_secs(4),
        "connect failure took {took:?}"
    );
    TcpStream::connect_timeout(
        &SocketAddr::from((w1.ip(), DISTCCD_PORT)),
        Duration::from_secs(2),
    )
    .context("w1 must stay reachable")?;
    // And back.
    w2.set_link(true)?;
    wait_listening(w2_addr, Duration::from_secs(10))
        .context("w2 must be reachable again after set_link(true)")?;
    let t_link = t4.elapsed();

    // A worker powered off from inside can be booted again under its name and address;
    // a name that is running cannot be booted twice.
    let t6 = Instant::now();
    assert!(
        bed.boot_worker(WorkerSpec::new("w1")).is_err(),
        "w1 is already running"
    );
    let w2_ip = w2.ip();
    let _ = w2.exec(&["systemctl", "poweroff"]); // may lose its connection: not checked
    drop(w2);
    let w2 = bed.boot_worker(WorkerSpec::new("w2"))?;
    assert_eq!(w2.ip(), w2_ip, "a rebooted worker keeps its address");
    assert_eq!(w2.exec_ok(&["hostname"])?.trim(), "w2");
    let t_reboot = t6.elapsed();

    // Teardown, both ways: drop a worker, then drop the testbed while w1's handle lives.
    let t5 = Instant::now();
    let (pid1_w1, pid1_w2) = (w1.pid1(), w2.pid1());
    let bed_dir = bed.dir().to_owned();
    drop(w2);
    assert!(
        !Path::new(&format!("/proc/{pid1_w2}")).exists(),
        "w2's container is gone"
    );
    assert!(
        !ours(&net_objects()?, index)
            .iter()
            .any(|n| n.ends_with("-w2")),
        "w2's namespace is gone"
    );
    drop(bed);
    let t_down = t5.elapsed();
    assert!(
        !Path::new(&format!("/proc/{pid1_w1}")).exists(),
        "dropping the testbed stops w1 too"
    );
    assert!(
        w1.exec(&["true"]).is_err(),
        "a handle outliving its testbed is inert"
    );
    drop(w1);
    let left = ours(&net_objects()?, index);
    assert!(left.is_empty(), "leftover network objects: {left:?}");
    assert!(
        !Path::new(&format!("/run/distcc-testbed/{index}.pid")).exists(),
        "owner record removed"
    );
    assert!(!bed_dir.exists(), "temporary directory removed");

    eprintln!(
        "timings: rootfs {t_rootfs:?}, boot 2 workers {t_boot:?}, distccd {t_distccd:?}, \
         2 compiles {t_compile:?}, link down/up {t_link:?}, reboot {t_reboot:?}, teardown {t_down:?}, total {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// A test process killed mid-test leaves a running container, a namespace, a veth and a
/// bridge behind. Simulated by leaking a testbed and forging its owner record as dead.
#[test]
fn leftovers_of_a_dead_owner_are_removed() -> Result<()> {
    init_logging();
    let bed = Testbed::create()?;
    let index = bed.index();
    let w = bed.boot_worker(WorkerSpec::new("orphan"))?;
    let pid1 = w.pid1();
    let dir = bed.dir().to_owned();
    assert!(!ours(&net_objects()?, index).is_empty());
    // No destructors, as after SIGKILL.
    std::mem::forget(w);
    std::mem::forget(bed);
    // Record format "PID STARTTIME\nTEMPDIR\n". A pid that cannot exist (above the
    // kernel's maximum of 4194304): the owner is dead.
    let record_path = format!("/run/distcc-testbed/{index}.pid");
    let record = std::fs::read_to_string(&record_path)?;
    let (_, rest) = record
        .split_once('\n')
        .context("owner record has two lines")?;
    assert_eq!(
        rest.trim(),
        dir.to_string_lossy(),
        "the record names the temporary directory"
    );
    std::fs::write(&record_path, format!("999999999 1\n{rest}"))?;

    let removed = distcc_testbed::cleanup_all()?;
    assert!(
        removed.contains(&index),
        "cleanup_all removed {removed:?}, expected {index}"
    );
    // The container was our child: it is a zombie now, which counts as gone.
    let stat = std::fs::read_to_string(format!("/proc/{pid1}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "container init still alive: {stat}"
    );
    let left = ours(&net_objects()?, index);
    assert!(left.is_empty(), "leftover network objects: {left:?}");
    assert!(!Path::new(&format!("/run/distcc-testbed/{index}.pid")).exists());
    assert!(
        !Path::new(&format!(
            "/run/systemd/nspawn/propagate/dcctb{index}-orphan"
        ))
        .exists()
    );
    assert!(
        !dir.exists(),
        "the dead owner's temporary directory is removed"
    );
    Ok(())
}

/// A worker booted with a CPU budget runs entirely inside it: the container's systemd,
/// the units it starts (in cgroups of its own inside the container) and their children
/// are held by the host group, and a busy loop in the container is throttled to it.
#[test]
fn a_cpu_budget_holds_the_whole_container() -> Result<()> {
    init_logging();
    let bed = Testbed::create()?;
    let millis = distcc_testbed::MilliCpus(200);
    let w1 = bed.boot_worker(WorkerSpec::new("w1").cpu_budget(millis))?;
    start_distccd(&w1, &bed.subnet())?;
    let budget = w1.cpu_budget().context("booted with a budget")?;
    assert_eq!(budget.get()?, millis);

    let inside = budget.all_pids()?;
    let pid1 = u32::try_from(w1.pid1())?;
    assert!(
        inside.contains(&pid1),
        "the container's systemd {pid1} in {inside:?}"
    );
    let distccd = w1.host_pids_of("distccd")?;
    assert!(!distccd.is_empty(), "distccd runs");
    for pid in &distccd {
        assert!(
            inside.contains(pid),
            "distccd {pid} (a unit's process, {}) is in the budget {inside:?}",
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?.replace('\n', " ")
        );
    }

    // A unit started by the container's systemd, spinning for 2 s.
    w1.exec_ok(&["cp", "/bin/sh", "/tmp/busyloop"])?;
    let (usage0, stat0) = (budget.usage()?, budget.stat()?);
    let started = Instant::now();
    let mut spin = w1
        .command(&[
            "systemd-run",
            "--wait",
            "--quiet",
            "--unit=busyloop",
            "timeout",
            "2",
            "/tmp/busyloop",
            "-c",
            "while :; do :; done",
        ])?
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let spinner = loop {
        if let Some(&pid) = w1.host_pids_of("busyloop")?.first() {
            break pid;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the busy loop never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        budget.all_pids()?.contains(&spinner),
        "the busy loop {spinner} is in the budget"
    );
    spin.wait()?;
    let wall = started.elapsed();
    let used = budget.usage()? - usage0;
    let stat = budget.stat()?;
    // Generous: the loop must have run, and cannot have had much more than its budget.
    assert!(
        used >= Duration::from_millis(100),
        "used {used:?} in {wall:?}"
    );
    assert!(
        used.as_secs_f64() <= millis.cpus() * wall.as_secs_f64() * 1.5 + 0.1,
        "used {used:?} in {wall:?} at {millis}"
    );
    assert!(
        stat.nr_throttled >= stat0.nr_throttled + 5,
        "throttled in {} periods before, {} after",
        stat0.nr_throttled,
        stat.nr_throttled
    );
    eprintln!(
        "budget {millis}: busy loop used {used:?} in {wall:?}, throttled {} of {} periods",
        stat.nr_throttled - stat0.nr_throttled,
        stat.nr_periods - stat0.nr_periods
    );

    // The slow scenario's knob: the quota changes live.
    budget.set(distcc_testbed::MilliCpus(50))?;
    assert_eq!(budget.get()?, distcc_testbed::MilliCpus(50));
    let name = budget.name().to_owned();
    drop(w1);
    assert!(
        !Path::new("/sys/fs/cgroup/cpu/distcc-testbed")
            .join(&name)
            .exists(),
        "the budget's group is removed with the worker"
    );
    Ok(())
}
