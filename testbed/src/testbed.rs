//! A testbed (one bridge, one /24) and its workers (one systemd container each).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::cmd::{self, check, describe, lock, run, run_ok, tail};
use crate::cpu::{CpuBudget, MilliCpus};
use crate::rootfs::Rootfs;
use crate::sweep::{self, Owner, RunLock};

/// Booting to `running` takes well under a second here; 60 s leaves room for a loaded CI.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// A clean poweroff after SIGTERM takes 0.1-0.4 s (about 2 s when systemd-shutdown has to
/// kill processes outside units); after this we SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Default bound for [`Worker::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
const IP_TIMEOUT: Duration = Duration::from_secs(30);
/// Worker k gets 198.18.N.(10+k).
const MAX_WORKERS: u8 = 240;
/// PATH inside the containers (nsenter would otherwise pass the host's).
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to boot one worker: its name and the host files to hand in.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    name: String,
    binds: Vec<(PathBuf, PathBuf, bool)>,
    bpf: bool,
    /// Capabilities added to nspawn's default bounding set (`--capability=`).
    capabilities: Vec<String>,
    cpu_budget: Option<MilliCpus>,
}

impl WorkerSpec {
    /// A worker named `name`: its hostname inside the container, and part of the namespace
    /// and machine names. Lower-case letters, digits and '-', at most 32, starting with a
    /// letter or digit.
    pub fn new(name: impl Into<String>) -> WorkerSpec {
        WorkerSpec {
            name: name.into(),
            binds: Vec::new(),
            bpf: true,
            capabilities: Vec::new(),
            cpu_budget: None,
        }
    }

    /// Bind-mounts host path `host` read-only at `container` (a built binary, a unit file,
    /// a directory of packages). `host` must exist when the worker boots.
    pub fn bind_ro(
        mut self,
        host: impl Into<PathBuf>,
        container: impl Into<PathBuf>,
    ) -> WorkerSpec {
        self.binds.push((host.into(), container.into(), true));
        self
    }

    /// Like [`WorkerSpec::bind_ro`], but writable: the container's writes reach the host.
    pub fn bind(mut self, host: impl Into<PathBuf>, container: impl Into<PathBuf>) -> WorkerSpec {
        self.binds.push((host.into(), container.into(), false));
        self
    }

    /// Boot without bpf(2) for the container's systemd (nspawn's default): like a host
    /// without cgroup BPF, systemd then runs units "WITHOUT firewalling" (IPAddressDeny=
    /// and IPAddressAllow= silently not enforced).
    pub fn without_bpf(mut self) -> WorkerSpec {
        self.bpf = false;
        self
    }

    /// Adds capability `name` (e.g. `CAP_NET_ADMIN`) to the container's bounding set.
    /// nspawn's default set lacks CAP_NET_ADMIN even with a network namespace of the
    /// container's own (`--network-namespace-path=`): without it no process inside, root
    /// included, can abort sockets (`ss -K`) or gain it through `AmbientCapabilities=`
    /// (systemd drops what the bounding set lacks, silently).
    pub fn capability(mut self, name: impl Into<String>) -> WorkerSpec {
        self.capabilities.push(name.into());
        self
    }

    /// Boots the whole container (nspawn, its systemd and every descendant: agent,
    /// distccd, compilers) inside a host CPU budget of `millis`, the group
    /// `dcctbN-NAME` (see [`CpuBudget`]); [`Worker::cpu_budget`] reads and changes it.
    pub fn cpu_budget(mut self, millis: MilliCpus) -> WorkerSpec {
        self.cpu_budget = Some(millis);
        self
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn validate_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-'),
        "invalid worker name {name:?}: use 1 to 32 of [a-z0-9-], not starting with '-' \
         (it becomes a hostname and part of namespace and machine names)"
    );
    Ok(())
}

/// nspawn's `--bind=SRC:DST` syntax: ':' inside a path is written `\:`.
fn bind_arg(host: &Path, container: &Path, read_only: bool) -> String {
    let esc = |p: &Path| p.to_string_lossy().replace('\\', r"\\").replace(':', r"\:");
    format!(
        "--bind{}={}:{}",
        if read_only { "-ro" } else { "" },
        esc(host),
        esc(container)
    )
}

/// Worker names of a testbed and their numbers k (address 198.18.N.(10+k), veth dcctbNvK).
/// A name is free again once its worker is stopped, and booting it again reuses its number,
/// so a "rebooted" worker keeps its address (the builder's host list stays valid).
#[derive(Default)]
struct Names {
    /// name -> (k, a worker with this name is booted)
    by_name: BTreeMap<String, (u8, bool)>,
}

impl Names {
    fn take(&mut self, name: &str, index: u8) -> Result<u8> {
        if let Some((k, busy)) = self.by_name.get_mut(name) {
            ensure!(
                !*busy,
                "testbed {index} already has a running worker {name:?}"
            );
            *busy = true;
            return Ok(*k);
        }
        let k = u8::try_from(self.by_name.len() + 1)
            .ok()
            .filter(|k| *k <= MAX_WORKERS);
        let k = k.with_context(|| format!("testbed {index} has {MAX_WORKERS} workers already"))?;
        self.by_name.insert(name.to_owned(), (k, true));
        Ok(k)
    }

    fn release(&mut self, name: &str) {
        if let Some((_, busy)) = self.by_name.get_mut(name) {
            *busy = false;
        }
    }
}

/// Shared between a [`Testbed`] and its [`Worker`]s.
struct BedInner {
    index: u8,
    rootfs: Rootfs,
    dir: Mutex<Option<tempfile::TempDir>>,
    dir_path: PathBuf,
    /// Names in use and the next worker number.
    names: Mutex<Names>,
    workers: Mutex<Vec<Weak<WorkerInner>>>,
    shut_down: Mutex<bool>,
}

/// One distcc cluster network on this host: bridge `br-dcctbN` with 198.18.N.1/24 in the
/// root network namespace (the builder side), and workers attached to it.
///
/// Dropping it (also while a test panics) powers off every worker it booted, including
/// ones whose [`Worker`] handle is still alive, and deletes the bridge, namespaces and
/// veths. When dropped during a panic, its directory of console logs is kept and its path
/// printed.
pub struct Testbed {
    inner: Arc<BedInner>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("index", &self.inner.index)
            .field("dir", &self.inner.dir_path)
            .finish()
    }
}

impl Testbed {
    /// Ensures the cached rootfs ([`Rootfs::ensure`]) and creates a testbed on it.
    pub fn create() -> Result<Testbed> {
        crate::require_root()?;
        let rootfs = Rootfs::ensure()?;
        Testbed::with_rootfs(rootfs)
    }

    /// Creates a testbed whose workers boot `rootfs`. First deletes the leftovers of
    /// testbeds whose owning process is gone, then takes the lowest free index.
    pub fn with_rootfs(rootfs: Rootfs) -> Result<Testbed> {
        crate::require_root()?;
        let started = Instant::now();
        let run_lock = RunLock::acquire()?;
        let (removed, live) = sweep::sweep(&run_lock)?;
        if !removed.is_empty() {
            info!(?removed, "removed leftovers of dead testbeds");
        }
        let index = (1..=sweep::MAX_INDEX)
            .find(|n| !live.contains(n))
            .context("all 250 testbed indexes are in use by live processes")?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("distcc-testbed-{index}-"))
            .tempdir()
            .context("cannot create the testbed's temporary directory")?;
        let dir_path = dir.path().to_owned();
        sweep::write_owner(index, Owner::current()?, &dir_path)?;
        let bridge = sweep::bridge_name(index);
        let setup = || -> Result<()> {
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            ip(&[
                "addr",
                "add",
                &format!("198.18.{index}.1/24"),
                "dev",
                &bridge,
            ])?;
            ip(&["link", "set", &bridge, "up"])
        };
        if let Err(e) = setup() {
            let _ = sweep::delete_link(&bridge);
            let _ = fs::remove_file(sweep::pid_file(index));
            return Err(e.context(format!("cannot create bridge {bridge}")));
        }
        drop(run_lock);
        let bed = Testbed {
            inner: Arc::new(BedInner {
                index,
                rootfs,
                dir: Mutex::new(Some(dir)),
                dir_path,
                names: Mutex::new(Names::default()),
                workers: Mutex::new(Vec::new()),
                shut_down: Mutex::new(false),
            }),
        };
        info!(index, bridge, dir = %bed.dir().display(), ms = started.elapsed().as_millis() as u64, "testbed created");
        Ok(bed)
    }

    /// Boots a worker and waits (at most 60 s) until its systemd reports `running` or
    /// `degraded`. Safe to call from several threads at once to boot workers in parallel.
    ///
    /// The worker gets network namespace `dcctbN-NAME`, address 198.18.N.(10+k) for the
    /// k-th worker of this testbed, and no default route: it reaches only this /24.
    pub fn boot_worker(&self, mut spec: WorkerSpec) -> Result<Worker> {
        let started = Instant::now();
        let bed = &self.inner;
        validate_name(&spec.name)?;
        ensure!(!*lock(&bed.shut_down), "testbed {} is shut down", bed.index);
        for (host, container, _) in &mut spec.binds {
            // Absolute and checked now, rather than an obscure nspawn failure at boot.
            *host = host
                .canonicalize()
                .with_context(|| format!("bind source {}", host.display()))?;
            ensure!(
                container.is_absolute(),
                "bind target {} is not absolute",
                container.display()
            );
        }
        let k = lock(&bed.names).take(&spec.name, bed.index)?;
        let inner = Arc::new(WorkerInner {
            name: spec.name.clone(),
            ip: Ipv4Addr::new(198, 18, bed.index, 10 + k),
            netns: sweep::ns_name(bed.index, &spec.name),
            veth: sweep::veth_name(bed.index, k),
            log: bed.dir_path.join(format!("{}.console.log", spec.name)),
            pid1: Mutex::new(0),
            state: Mutex::new(State::Preparing),
            budget: OnceLock::new(),
            bed: Arc::downgrade(&self.inner),
        });
        lock(&bed.workers).push(Arc::downgrade(&inner));
        // From here on, an error drops `worker`, whose Drop deletes whatever was created.
        let worker = Worker { inner };
        worker
            .inner
            .setup_network(bed.index)
            .with_context(|| format!("cannot set up the network of worker {}", spec.name))?;
        worker
            .inner
            .boot(bed, &spec)
            .with_context(|| format!("cannot boot worker {}", spec.name))?;
        info!(
            worker = spec.name, ip = %worker.ip(), pid1 = worker.pid1(),
            ms = started.elapsed().as_millis() as u64, "worker running"
        );
        Ok(worker)
    }

    /// A network namespace on the bridge with no container in it (address and names as a
    /// worker's): for programs that must run on the host's filesystem but see only the
    /// test-bed's network, e.g. daemons that announce themselves by broadcast.
    pub fn add_bare_host(&self, name: &str) -> Result<BareHost> {
        let bed = &self.inner;
        validate_name(name)?;
        ensure!(!*lock(&bed.shut_down), "testbed {} is shut down", bed.index);
        let k = lock(&bed.names).take(name, bed.index)?;
        let host = BareHost {
            name: name.to_owned(),
            ip: Ipv4Addr::new(198, 18, bed.index, 10 + k),
            netns: sweep::ns_name(bed.index, name),
            veth: sweep::veth_name(bed.index, k),
            bed: Arc::downgrade(&self.inner),
        };
        setup_network(bed.index, &host.netns, &host.veth, host.ip)
            .with_context(|| format!("cannot set up the network of bare host {name}"))?;
        Ok(host)
    }

    /// This testbed's index N (1..=250): its network is 198.18.N.0/24.
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// The root namespace's address on the bridge, 198.18.N.1: the builder's address as
    /// the workers see it.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.inner.index, 1)
    }

    /// "198.18.N.0/24", e.g. for `distccd --allow`.
    pub fn subnet(&self) -> String {
        format!("198.18.{}.0/24", self.inner.index)
    }

    /// The bridge's interface name, `br-dcctbN`.
    pub fn bridge(&self) -> String {
        sweep::bridge_name(self.inner.index)
    }

    /// The testbed's temporary directory: console logs (`NAME.console.log`) and room for
    /// a test's own files. Deleted on drop, unless dropped during a panic.
    pub fn dir(&self) -> &Path {
        &self.inner.dir_path
    }

    /// The rootfs the workers boot.
    pub fn rootfs(&self) -> &Rootfs {
        &self.inner.rootfs
    }

    /// Powers off all workers (in parallel: SIGTERM to every nspawn first, then wait,
    /// SIGKILL after 15 s) and deletes all network objects. Dropping does the same but can
    /// only log errors; this returns the first one.
    pub fn shutdown(self) -> Result<()> {
        self.inner.shutdown()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.inner.shutdown() {
            warn!("testbed {} shutdown: {e:#}", self.inner.index);
        }
    }
}

impl BedInner {
    fn shutdown(&self) -> Result<()> {
        {
            let mut done = lock(&self.shut_down);
            if *done {
                return Ok(());
            }
            *done = true;
        }
        let workers: Vec<Arc<WorkerInner>> = lock(&self.workers)
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for w in &workers {
            w.begin_stop();
        }
        let mut first_err: Option<anyhow::Error> = None;
        for w in &workers {
            if let Err(e) = w.finish_stop() {
                warn!(worker = w.name, "{e:#}");
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = sweep::delete_link(&sweep::bridge_name(self.index)) {
            warn!("{e:#}");
            first_err.get_or_insert(e);
        }
        // Last, so that a concurrent sweep never sees objects without a live owner record.
        if let Err(e) = fs::remove_file(sweep::pid_file(self.index)) {
            let e = anyhow::Error::new(e).context(format!(
                "cannot remove {}",
                sweep::pid_file(self.index).display()
            ));
            warn!("{e:#}");
            first_err.get_or_insert(e);
        }
        let dir = lock(&self.dir).take();
        if let Some(dir) = dir
            && std::thread::panicking()
        {
            let kept = dir.keep();
            eprintln!(
                "distcc-testbed: test failed; console logs kept in {}",
                kept.display()
            );
        }
        info!(index = self.index, "testbed shut down");
        first_err.map_or(Ok(()), Err)
    }
}

enum State {
    /// Network being set up, nspawn not started yet.
    Preparing,
    Running {
        nspawn: Child,
    },
    /// SIGTERM sent.
    Stopping {
        nspawn: Child,
        deadline: Instant,
    },
    /// nspawn is gone (exited by itself, e.g. `systemctl poweroff` inside), network not
    /// torn down yet.
    Exited,
    /// Everything deleted, name released.
    Stopped,
}

struct WorkerInner {
    /// To give the name back when stopped.
    bed: Weak<BedInner>,
    name: String,
    ip: Ipv4Addr,
    netns: String,
    veth: String,
    log: PathBuf,
    pid1: Mutex<i32>,
    state: Mutex<State>,
    /// Set at boot when the spec asks for one; removed when the worker stops.
    budget: OnceLock<CpuBudget>,
}

/// A booted worker: a systemd container in its own network namespace.
///
/// Dropping it powers it off (SIGTERM to nspawn, SIGKILL after 15 s) and deletes its
/// namespace and veth. A handle that outlives its [`Testbed`] refers to a stopped worker:
/// its methods return errors.
pub struct Worker {
    inner: Arc<WorkerInner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.inner.name)
            .field("ip", &self.inner.ip)
            .finish()
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), IP_TIMEOUT).map(drop)
}

/// A network namespace `ns` with `eth0` at `addr`/24, joined to testbed `index`'s bridge
/// by the veth `veth`.
fn setup_network(index: u8, ns: &str, veth: &str, addr: Ipv4Addr) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&[
        "link",
        "set",
        veth,
        "master",
        &sweep::bridge_name(index),
        "up",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// Kills whatever still runs in `ns` (it would keep the namespace alive), then deletes
/// the veth and the namespace.
fn teardown_network(ns: &str, veth: &str) -> Result<()> {
    let strays: Vec<i32> = {
        let path = sweep::netns_path(ns);
        if path.exists() {
            sweep::pids_in_netns(&path)
        } else {
            Vec::new()
        }
    };
    for &p in &strays {
        sweep::sigkill(p);
    }
    sweep::wait_gone(&strays, Duration::from_secs(5));
    // The veth first: deleting it removes its peer synchronously, whereas a namespace's
    // interfaces are released asynchronously after the namespace is gone.
    sweep::delete_link(veth)?;
    sweep::delete_netns(ns)
}

impl WorkerInner {
    fn setup_network(&self, index: u8) -> Result<()> {
        setup_network(index, &self.netns, &self.veth, self.ip)
    }

    fn boot(&self, bed: &BedInner, spec: &WorkerSpec) -> Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        // Appended: a worker booted again under the same name keeps its earlier boots' log.
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        writeln!(log, "==== distcc-testbed: booting {} ====", self.name)
            .with_context(|| format!("cannot write {}", self.log.display()))?;
        let log_err = log.try_clone().context("dup of the console log fd")?;
        // nspawn runs in a cgroup of its own (see sweep::cgroup_root): a shell puts itself
        // there, then execs nspawn.
        let cgroup = sweep::machine_cgroup(&self.netns)
            .context("no cgroup v2 hierarchy on this host (needed to isolate containers)")?;
        sweep::remove_cgroup_tree(&cgroup);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        // The budget's groups too, before nspawn runs: everything the container starts is
        // born inside them.
        let mut enter_budget = String::new();
        if let Some(millis) = spec.cpu_budget {
            let budget = CpuBudget::create(&self.netns, millis)?;
            for file in budget.procs_files() {
                enter_budget.push_str(&format!("echo $$ > '{}' && ", file.display()));
            }
            if self.budget.set(budget).is_err() {
                bail!("worker {} booted twice", self.name);
            }
        }
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!(
                r#"{enter_budget}echo $$ > "$0/cgroup.procs" && exec "$@""#
            ))
            .arg(&cgroup)
            .arg("systemd-nspawn");
        cmd.arg("-q")
            .arg("-D")
            .arg(bed.rootfs.path())
            // Private tmpfs overlay: all workers share the read-only rootfs and start clean.
            .arg("--volatile=overlay")
            .args(["-M", &self.netns])
            .arg(format!("--hostname={}", self.name))
            .arg(format!(
                "--network-namespace-path={}",
                sweep::netns_path(&self.netns).display()
            ))
            // Required without a host systemd: otherwise nspawn asks systemd-machined and
            // systemd (over D-Bus) to register and place the container, and fails.
            .args(["--register=no", "--keep-unit"])
            // Ignore any /etc/systemd/nspawn/*.nspawn of the host; do not symlink journals
            // into the host's /var/log/journal.
            .args(["--settings=no", "--link-journal=no"])
            // Boot output to our log, never to the terminal of whoever runs the tests.
            .arg("--console=read-only");
        if spec.bpf {
            // systemd's IPAddressAllow=/IPAddressDeny= (distccd's kernel-enforced
            // allowlist) load cgroup BPF programs. nspawn's seccomp filter refuses bpf(2)
            // by default (EPERM for every BPF_PROG_LOAD, even with CAP_SYS_ADMIN), and
            // systemd then silently runs units WITHOUT the firewall (see docs/TESTBED.md).
            cmd.arg("--capability=CAP_BPF")
                .arg("--system-call-filter=bpf");
        }
        for capability in &spec.capabilities {
            cmd.arg(format!("--capability={capability}"));
        }
        for (host, container, ro) in &spec.binds {
            cmd.arg(bind_arg(host, container, *ro));
        }
        cmd.arg("-b")
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            // Give the container a pure cgroup v2 hierarchy. With the host's hybrid layout
            // mirrored inside, the container's systemd cannot kill a unit's cgroup
            // ("Failed to kill control group ...: Input/output error"): after its main
            // process is SIGKILLed, distccd's children keep the port and every restart
            // fails with "Address already in use".
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        debug!(cmd = describe(&cmd), "starting container");
        let nspawn = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let nspawn_pid = nspawn.id() as i32;
        *lock(&self.state) = State::Running { nspawn };

        // PID 1 appears a few ms after nspawn starts.
        let pid1 = loop {
            self.ensure_nspawn_alive()?;
            if let Some(pid) = sweep::container_init_of(nspawn_pid) {
                break pid;
            }
            if Instant::now() >= deadline {
                bail!(
                    "no container init appeared within {BOOT_TIMEOUT:?}\n{}",
                    self.console_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        *lock(&self.pid1) = pid1;

        let mut last;
        loop {
            self.ensure_nspawn_alive()?;
            // Early in boot systemctl cannot connect yet and says "offline".
            let out = self.exec(
                &["systemctl", "is-system-running"],
                None,
                Duration::from_secs(10),
            )?;
            last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match last.as_str() {
                "running" => return Ok(()),
                "degraded" => {
                    let failed = self
                        .exec(
                            &["systemctl", "--failed", "--no-legend", "--plain"],
                            None,
                            Duration::from_secs(10),
                        )
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    warn!(
                        worker = self.name,
                        failed = failed.trim(),
                        "worker booted degraded"
                    );
                    return Ok(());
                }
                "maintenance" | "stopping" => break,
                _ => {}
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "systemd did not reach running (last state {last:?}) within {BOOT_TIMEOUT:?}\n{}",
            self.console_tail()
        )
    }

    fn console_tail(&self) -> String {
        format!(
            "last lines of the console log {}:\n{}",
            self.log.display(),
            tail(&self.log, 40)
        )
    }

    /// Errors (with the console log) if nspawn is not running.
    fn ensure_nspawn_alive(&self) -> Result<()> {
        let mut state = lock(&self.state);
        match &mut *state {
            State::Running { nspawn } => {
                match nspawn.try_wait().context("waitpid on systemd-nspawn")? {
                    None => Ok(()),
                    Some(status) => {
                        *state = State::Exited;
                        drop(state);
                        bail!(
                            "worker {}: systemd-nspawn exited ({status})\n{}",
                            self.name,
                            self.console_tail()
                        )
                    }
                }
            }
            State::Preparing => bail!("worker {} is not booted", self.name),
            State::Stopping { .. } | State::Exited | State::Stopped => {
                bail!("worker {} is stopped", self.name)
            }
        }
    }

    fn exec(&self, argv: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
        let mut cmd = self.command(argv)?;
        run(&mut cmd, stdin, timeout)
            .with_context(|| format!("worker {}: running {argv:?}", self.name))
    }

    /// `nsenter` into the container running `argv`, not started yet.
    fn command(&self, argv: &[&str]) -> Result<Command> {
        ensure!(!argv.is_empty(), "empty command");
        self.ensure_nspawn_alive()?;
        let pid1 = *lock(&self.pid1);
        let mut cmd = Command::new("nsenter");
        // All of PID 1's namespaces; entering its mount namespace also puts us at the
        // container's root directory.
        cmd.args(["-t", &pid1.to_string(), "-a", "--"])
            .args(argv)
            // The host environment (RUST_LOG, CARGO_*, a developer's locale) does not belong
            // in the container.
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0");
        Ok(cmd)
    }

    fn begin_stop(&self) {
        // Before the state changes: the dump runs commands in the still-running container.
        if std::thread::panicking() && matches!(*lock(&self.state), State::Running { .. }) {
            self.dump_for_failed_test();
        }
        let mut state = lock(&self.state);
        let taken = std::mem::replace(&mut *state, State::Stopped);
        *state = match taken {
            State::Running { nspawn } => {
                // nspawn turns SIGTERM into a clean poweroff of the container.
                if let Err(e) = kill(Pid::from_raw(nspawn.id() as i32), Signal::SIGTERM) {
                    debug!(worker = self.name, "SIGTERM to nspawn: {e}");
                }
                State::Stopping {
                    nspawn,
                    deadline: Instant::now() + STOP_TIMEOUT,
                }
            }
            other => other,
        };
    }

    /// A panicking test wants to know what the worker was doing.
    fn dump_for_failed_test(&self) {
        let journal = self
            .exec(
                &["journalctl", "-n", "60", "--no-pager"],
                None,
                Duration::from_secs(5),
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("<journal unavailable: {e:#}>"));
        eprintln!(
            "---- distcc-testbed: worker {} ({}) journal, last 60 lines ----\n{journal}",
            self.name, self.ip
        );
    }

    fn finish_stop(&self) -> Result<()> {
        let mut state = lock(&self.state);
        match &mut *state {
            State::Stopped => return Ok(()),
            State::Stopping { nspawn, deadline } => {
                if cmd::wait_until(nspawn, *deadline)?.is_none() {
                    warn!(
                        worker = self.name,
                        "no clean poweroff within {STOP_TIMEOUT:?}; killing"
                    );
                    // Killing nspawn alone would orphan the container; its init takes the
                    // whole pid namespace down with it.
                    let pid1 = *lock(&self.pid1);
                    if pid1 > 0 {
                        sweep::sigkill(pid1);
                    }
                    let _ = nspawn.kill();
                    nspawn.wait().context("waitpid on systemd-nspawn")?;
                }
            }
            // Not reachable through begin_stop; handled for completeness.
            State::Running { nspawn } => {
                let _ = nspawn.kill();
                nspawn.wait().context("waitpid on systemd-nspawn")?;
            }
            State::Preparing | State::Exited => {}
        }
        // Held across the teardown so that a concurrent stop waits instead of racing it.
        *state = State::Exited;
        if let Some(cgroup) = sweep::machine_cgroup(&self.netns) {
            sweep::remove_cgroup_tree(&cgroup);
        }
        if let Some(budget) = self.budget.get() {
            budget.remove();
        }
        self.teardown_network()?;
        *state = State::Stopped;
        drop(state);
        if let Some(bed) = self.bed.upgrade() {
            lock(&bed.names).release(&self.name);
        }
        Ok(())
    }

    fn teardown_network(&self) -> Result<()> {
        teardown_network(&self.netns, &self.veth)?;
        // nspawn removes it on a clean exit, not when killed.
        sweep::remove_propagate_dir(&self.netns);
        Ok(())
    }

    fn stop(&self) -> Result<()> {
        self.begin_stop();
        self.finish_stop()
    }
}

impl Worker {
    /// The worker's name (its hostname).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// 198.18.N.(10+k).
    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    /// The container's PID 1 (systemd) as seen from the host.
    pub fn pid1(&self) -> i32 {
        *lock(&self.inner.pid1)
    }

    /// The worker's network namespace name, `dcctbN-NAME` (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// The CPU budget the whole container runs in, when booted with
    /// [`WorkerSpec::cpu_budget`].
    pub fn cpu_budget(&self) -> Option<&CpuBudget> {
        self.inner.budget.get()
    }

    /// Runs `argv` inside the container (all of its namespaces, as root, with a clean
    /// environment), waiting at most [`EXEC_TIMEOUT`]. A non-zero exit is not an error
    /// here: inspect the returned status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        self.inner.exec(argv, None, EXEC_TIMEOUT)
    }

    /// The command [`Worker::exec`] runs, not started: for a long-running process a test
    /// spawns and waits for itself (a build). It enters all of the container's namespaces
    /// with a clean environment, but stays in the host's cgroup: give it a process group
    /// of its own and kill that when done (the container's systemd does not supervise it).
    pub fn command(&self, argv: &[&str]) -> Result<Command> {
        self.inner.command(argv)
    }

    /// Established TCP connections between this worker's `port` and `peer` (any port of
    /// it), as `ss` inside the worker counts them: how many streams a builder holds open
    /// to the agent, or how many compiles it has in flight on distccd.
    pub fn connections_from(&self, peer: Ipv4Addr, port: u16) -> Result<usize> {
        let sport = format!(":{port}");
        let peer = peer.to_string();
        let out = self.exec_ok(&[
            "ss",
            "-H",
            "-n",
            "-t",
            "state",
            "established",
            "sport",
            "=",
            &sport,
            "dst",
            &peer,
        ])?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    }

    /// [`Worker::exec`] that returns stdout, and an error carrying the exit status, stdout
    /// and stderr when the command fails.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        check(&format!("{argv:?} in worker {}", self.inner.name), &out)
    }

    /// Writes `contents` to `path` inside the container (its private overlay), creating
    /// parent directories, atomically (temporary file + rename), with permission bits `mode`.
    pub fn write_file(
        &self,
        path: impl AsRef<Path>,
        contents: impl AsRef<[u8]>,
        mode: u32,
    ) -> Result<()> {
        let path = path.as_ref();
        ensure!(
            path.is_absolute(),
            "{} is not an absolute path",
            path.display()
        );
        let path_s = path
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        // Inside the container rather than via /proc/PID/root: there, absolute symlinks in
        // the container's tree would resolve against the HOST's root.
        let script = r#"set -e; mkdir -p -- "$(dirname -- "$1")"; t=$(mktemp -- "$1.XXXXXX"); cat > "$t"; chmod "$2" "$t"; mv -f -- "$t" "$1""#;
        let mode_s = format!("{mode:o}");
        let argv = ["sh", "-c", script, "sh", path_s, &mode_s];
        let out = self
            .inner
            .exec(&argv, Some(contents.as_ref()), EXEC_TIMEOUT)?;
        check(
            &format!("writing {path_s} in worker {}", self.inner.name),
            &out,
        )
        .map(drop)
    }

    /// Brings the worker's eth0 down (`false`: it becomes silently unreachable, connections
    /// time out, like a powered-off machine) or up again (`true`).
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&[
            "-n",
            &self.inner.netns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ])
        .with_context(|| {
            format!(
                "cannot set the link of worker {} {}",
                self.inner.name,
                if up { "up" } else { "down" }
            )
        })
    }

    /// Host PIDs of the processes named `comm` (as in /proc/PID/comm) in this worker.
    pub fn host_pids_of(&self, comm: &str) -> Result<Vec<u32>> {
        let ns = fs::read_link(format!("/proc/{}/ns/pid", self.pid1()))
            .with_context(|| format!("worker {} is not running", self.inner.name))?;
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let same_ns = fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|l| l == ns);
            if same_ns
                && fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|name| name.trim_end() == comm)
            {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// The last `lines` journal lines of `unit`, for assertions and failure messages.
    /// Never fails: an error is returned as text.
    pub fn journal(&self, unit: &str, lines: usize) -> String {
        let n = lines.to_string();
        match self.exec_ok(&[
            "journalctl",
            "-u",
            unit,
            "-n",
            &n,
            "--no-pager",
            "-o",
            "short-precise",
        ]) {
            Ok(s) => s,
            Err(e) => format!("<journal of {unit} unavailable: {e:#}>"),
        }
    }

    /// nspawn's console output (the boot messages) so far.
    pub fn console_log(&self) -> String {
        tail(&self.inner.log, usize::MAX)
    }

    /// Powers the worker off now (what dropping does), returning errors instead of
    /// logging them.
    pub fn stop(&self) -> Result<()> {
        self.inner.stop()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Err(e) = self.inner.stop() {
            warn!(worker = self.inner.name, "stopping: {e:#}");
        }
    }
}

/// A network namespace on a testbed's bridge without a container (see
/// [`Testbed::add_bare_host`]). Dropping it kills what still runs in it and deletes the
/// namespace and veth.
pub struct BareHost {
    name: String,
    ip: Ipv4Addr,
    netns: String,
    veth: String,
    bed: Weak<BedInner>,
}

impl BareHost {
    /// 198.18.N.(10+k), like a worker's.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `program` to run in this namespace (`ip netns exec NS program`), on the host's
    /// filesystem.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }
}

impl Drop for BareHost {
    fn drop(&mut self) {
        if let Err(e) = teardown_network(&self.netns, &self.veth) {
            warn!("bare host {}: {e:#}", self.name);
        }
        if let Some(bed) = self.bed.upgrade() {
            lock(&bed.names).release(&self.name);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_must_be_usable_as_hostnames() {
        for ok in ["w1", "worker-2", "a", "0abc"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "W1", "w_1", "-w", "w 1", "w/1", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_keep_their_number_and_are_exclusive_while_booted() -> Result<()> {
        let mut n = Names::default();
        assert_eq!(n.take("w1", 1)?, 1);
        assert_eq!(n.take("w2", 1)?, 2);
        assert!(n.take("w1", 1).is_err(), "w1 is booted");
        n.release("w1");
        assert_eq!(n.take("w1", 1)?, 1, "a rebooted worker keeps its address");
        assert_eq!(n.take("w3", 1)?, 3);
        Ok(())
    }

    #[test]
    fn handles_can_be_shared_across_threads_and_tasks() {
        fn send_sync_static<T: Send + Sync + 'static>() {}
        send_sync_static::<Testbed>();
        send_sync_static::<Worker>();
    }

    #[test]
    fn bind_args_escape_colons() {
        assert_eq!(
            bind_arg(Path::new("/a:b"), Path::new("/c"), true),
            r"--bind-ro=/a\:b:/c"
        );
        assert_eq!(
            bind_arg(Path::new("/a"), Path::new("/c"), false),
            "--bind=/a:/c"
        );
    }
}
