//! Names of the kernel objects a testbed creates, who owns them, and how to delete them,
//! including the leftovers of test processes that died without running their destructors
//! (SIGKILL, Ctrl-C, a crashed CI job). Processes die with their parent's session, but
//! network namespaces, veths and bridges are kernel objects that stay until deleted, and a
//! `systemd-nspawn` whose parent died keeps its container running.
//!
//! Naming, for testbed index N (1..=250) and worker number k (1..=240):
//! - bridge `br-dcctbN` with 198.18.N.1/24, in the root network namespace;
//! - network namespace and nspawn machine `dcctbN-NAME` (/run/netns/dcctbN-NAME);
//! - veth `dcctbNvK` on the bridge (interface names are limited to 15 bytes, so the
//!   worker's number, not its name); its peer is `eth0` inside the namespace;
//! - owner record /run/distcc-testbed/N.pid: "PID STARTTIME" of the owning process.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::cmd::run_ok;

/// Directory of owner records and the global lock (tmpfs: a reboot clears it, as it
/// clears every object it describes).
pub(crate) const RUN_DIR: &str = "/run/distcc-testbed";
/// Highest testbed index: 198.18.N.0/24 for N in 1..=250.
pub(crate) const MAX_INDEX: u8 = 250;
const IP_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn bridge_name(n: u8) -> String {
    format!("br-dcctb{n}")
}

/// Network namespace name, also used as the nspawn machine name.
pub(crate) fn ns_name(n: u8, worker: &str) -> String {
    format!("dcctb{n}-{worker}")
}

pub(crate) fn veth_name(n: u8, k: u8) -> String {
    format!("dcctb{n}v{k}")
}

/// Splits "123rest" into (123, "rest") for a valid testbed index.
fn leading_index(s: &str) -> Option<(u8, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let n: u8 = s[..digits].parse().ok()?;
    (1..=MAX_INDEX).contains(&n).then_some((n, &s[digits..]))
}

fn index_of_bridge(name: &str) -> Option<u8> {
    leading_index(name.strip_prefix("br-dcctb")?)
        .filter(|(_, rest)| rest.is_empty())
        .map(|(n, _)| n)
}

fn index_of_ns(name: &str) -> Option<u8> {
    leading_index(name.strip_prefix("dcctb")?)
        .filter(|(_, rest)| rest.len() > 1 && rest.starts_with('-'))
        .map(|(n, _)| n)
}

fn index_of_veth(name: &str) -> Option<u8> {
    let (n, rest) = leading_index(name.strip_prefix("dcctb")?)?;
    let k = rest.strip_prefix('v')?;
    (!k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())).then_some(n)
}

/// Exclusive lock over index allocation and sweeping, shared by all processes.
pub(crate) struct RunLock {
    _lock: Flock<File>,
}

impl RunLock {
    pub(crate) fn acquire() -> Result<RunLock> {
        fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
        let path = Path::new(RUN_DIR).join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(RunLock { _lock: lock })
    }
}

/// A process identity that survives pid reuse: pid plus its start time in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pid: i32,
    start: u64,
}

impl Owner {
    pub(crate) fn current() -> Result<Owner> {
        let pid = std::process::id() as i32;
        let stat = proc_stat(pid).context("cannot read /proc/self/stat")?;
        Ok(Owner {
            pid,
            start: stat.start,
        })
    }

    fn parse(s: &str) -> Option<Owner> {
        let mut it = s.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        Some(Owner { pid, start })
    }

    fn alive(&self) -> bool {
        proc_stat(self.pid).is_some_and(|s| s.start == self.start && s.state != 'Z')
    }
}

pub(crate) fn pid_file(n: u8) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{n}.pid"))
}

/// Writes the owner record ("PID STARTTIME\nTEMPDIR\n") atomically, so a sweeping process
/// never reads half a record and takes a live testbed for a dead one. The temporary
/// directory is recorded so that a sweep deletes exactly that one.
pub(crate) fn write_owner(n: u8, owner: Owner, dir: &Path) -> Result<()> {
    let path = pid_file(n);
    let tmp = path.with_extension("pid.tmp");
    fs::write(
        &tmp,
        format!("{} {}\n{}\n", owner.pid, owner.start, dir.display()),
    )
    .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// (owner, temporary directory) of index `n`.
fn read_owner(n: u8) -> (Option<Owner>, Option<PathBuf>) {
    let text = fs::read_to_string(pid_file(n)).unwrap_or_default();
    let mut lines = text.lines();
    let owner = lines.next().and_then(Owner::parse);
    let dir = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
    (owner, dir)
}

struct ProcStat {
    ppid: i32,
    state: char,
    start: u64,
}

/// Fields of /proc/PID/stat (the command name may contain spaces and parentheses, so the
/// fields are counted from its last ')').
fn proc_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), so field k is f[k - 3].
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn process_gone(pid: i32) -> bool {
    // A zombie is dead for our purposes: it holds no namespace and its parent reaps it.
    proc_stat(pid).is_none_or(|s| s.state == 'Z')
}

/// The container's init: the child of `nspawn` that is PID 1 in its own pid namespace.
/// (Right after start, nspawn's first child is an intermediate process that is not.)
pub(crate) fn container_init_of(nspawn: i32) -> Option<i32> {
    all_pids().into_iter().find(|&pid| {
        proc_stat(pid).is_some_and(|s| s.ppid == nspawn)
            && fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .is_some_and(|ids| {
                        ids.split_whitespace().count() > 1
                            && ids.split_whitespace().last() == Some("1")
                    })
            })
    })
}

/// Running `systemd-nspawn` processes with a testbed machine name: (pid, machine).
fn nspawn_machines() -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for pid in all_pids() {
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .first()
            .is_none_or(|a| a.rsplit('/').next() != Some("systemd-nspawn"))
        {
            continue;
        }
        let machine = args.iter().enumerate().find_map(|(i, a)| {
            if a == "-M" || a == "--machine" {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix("--machine=")
                    .or_else(|| a.strip_prefix("-M").filter(|m| !m.is_empty()))
                    .map(str::to_owned)
            }
        });
        if let Some(m) = machine.filter(|m| index_of_ns(m).is_some()) {
            found.push((pid, m));
        }
    }
    found
}

/// Processes whose network namespace is the one bound at `ns_path`.
pub(crate) fn pids_in_netns(ns_path: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(ns_path) else {
        return Vec::new();
    };
    let want = format!("net:[{}]", meta.ino());
    all_pids()
        .into_iter()
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.as_os_str() == want.as_str())
        })
        .collect()
}

pub(crate) fn sigkill(pid: i32) {
    if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL) {
        debug!(pid, "SIGKILL: {e}");
    }
}

/// Waits until all `pids` have exited; false on timeout.
pub(crate) fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| process_gone(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// `ip link del`, tolerating a link that is already gone (a veth also disappears with
/// its peer's namespace).
pub(crate) fn delete_link(name: &str) -> Result<()> {
    if !link_exists(name) {
        return Ok(());
    }
    match run_ok(Command::new("ip").args(["link", "del", name]), IP_TIMEOUT) {
        Err(_) if !link_exists(name) => Ok(()),
        r => r
            .map(drop)
            .with_context(|| format!("cannot delete network interface {name}")),
    }
}

/// `ip netns del`, tolerating a namespace that is already gone. Processes still inside
/// keep the namespace itself alive: kill them first.
pub(crate) fn delete_netns(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    match run_ok(Command::new("ip").args(["netns", "del", name]), IP_TIMEOUT) {
        Err(_) if !netns_path(name).exists() => Ok(()),
        r => r
            .map(drop)
            .with_context(|| format!("cannot delete network namespace {name}")),
    }
}

/// Network namespace names under /run/netns.
fn netns_names() -> Vec<String> {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

fn link_names() -> Vec<String> {
    let Ok(dir) = fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// nspawn's per-machine directory for `machinectl bind`; a killed nspawn leaves it behind.
const PROPAGATE_DIR: &str = "/run/systemd/nspawn/propagate";

/// Removes the (empty) propagation directory of `machine`, if any. Never recursive: if
/// something is mounted or left in it, it is not ours to delete.
pub(crate) fn remove_propagate_dir(machine: &str) {
    let dir = Path::new(PROPAGATE_DIR).join(machine);
    match fs::remove_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            warn!(dir = %dir.display(), "cannot remove: {e}")
        }
        _ => {}
    }
}

fn propagate_names() -> Vec<String> {
    let Ok(dir) = fs::read_dir(PROPAGATE_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// Indexes that have any object (record, bridge, veth, namespace, container) on this host.
fn indexes_present() -> BTreeSet<u8> {
    let mut set = BTreeSet::new();
    if let Ok(dir) = fs::read_dir(RUN_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".pid").and_then(|s| s.parse().ok()) {
                set.insert(n);
            }
        }
    }
    for name in link_names() {
        set.extend(index_of_bridge(&name).or_else(|| index_of_veth(&name)));
    }
    set.extend(netns_names().iter().filter_map(|n| index_of_ns(n)));
    set.extend(nspawn_machines().iter().filter_map(|(_, m)| index_of_ns(m)));
    set.extend(propagate_names().iter().filter_map(|m| index_of_ns(m)));
    set
}

/// Deletes every object of index `n`: containers (SIGKILL; the owner is gone, nobody waits
/// for a clean shutdown), namespaces, veths, bridge, owner record.
fn teardown_index(n: u8, dir: Option<&Path>) -> Result<()> {
    let mut victims = Vec::new();
    for (pid, machine) in nspawn_machines() {
        if index_of_ns(&machine) == Some(n) {
            info!(pid, machine, "killing a leftover container");
            // Killing nspawn alone would orphan the container, which keeps running.
            victims.extend(container_init_of(pid));
            victims.push(pid);
        }
    }
    let namespaces: Vec<String> = netns_names()
        .into_iter()
        .filter(|ns| index_of_ns(ns) == Some(n))
        .collect();
    for ns in &namespaces {
        // Also finds containers whose nspawn is already dead, and strays like `ip netns exec`.
        victims.extend(pids_in_netns(&netns_path(ns)));
    }
    for &pid in &victims {
        sigkill(pid);
    }
    if !wait_gone(&victims, Duration::from_secs(10)) {
        warn!(
            index = n,
            "some leftover processes did not exit within 10 s"
        );
    }
    let mut first_err = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            warn!("{e:#}");
            first_err.get_or_insert(e);
        }
    };
    // veths first: deleting one deletes its peer at once, while a dead namespace releases
    // its interfaces asynchronously.
    for link in link_names() {
        if index_of_veth(&link) == Some(n) {
            note(delete_link(&link));
        }
    }
    for ns in &namespaces {
        note(delete_netns(ns));
    }
    note(delete_link(&bridge_name(n)));
    for machine in propagate_names() {
        if index_of_ns(&machine) == Some(n) {
            remove_propagate_dir(&machine);
        }
    }
    if let Some(root) = cgroup_root()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for e in entries.flatten() {
            if index_of_ns(&e.file_name().to_string_lossy()) == Some(n) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    crate::cpu::remove_leftover_budgets(|name| index_of_ns(name) == Some(n));
    // The dead owner's console logs. Only a directory we named: the record is a file in
    // /run that root could have edited, and this is a recursive delete.
    let ours = |d: &&Path| {
        d.is_absolute()
            && d.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("distcc-testbed-"))
            && d.is_dir()
    };
    if let Some(dir) = dir.filter(ours)
        && let Err(e) = fs::remove_dir_all(dir)
    {
        warn!(dir = %dir.display(), "cannot remove: {e}");
    }
    match fs::remove_file(pid_file(n)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            note(Err(e).with_context(|| format!("cannot remove {}", pid_file(n).display())));
        }
        _ => {}
    }
    first_err.map_or(Ok(()), Err)
}

/// Where each container gets a cgroup v2 subtree of its own. Without a host systemd to
/// delegate one, nspawn would leave every container at the root of the host's cgroup v2
/// hierarchy, and all containers would share `/system.slice/distccd.service`: one
/// container's systemd would then see the others' processes in its units (as pid 0) and
/// fail to kill them ("Failed to kill control group ...: Input/output error").
pub(crate) fn cgroup_root() -> Option<PathBuf> {
    // Hybrid hosts mount the v2 hierarchy here; pure v2 hosts at /sys/fs/cgroup.
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
        .map(|p| p.join("distcc-testbed"))
}

/// The cgroup of container `machine` (e.g. `dcctb3-w1`).
pub(crate) fn machine_cgroup(machine: &str) -> Option<PathBuf> {
    cgroup_root().map(|root| root.join(machine))
}

/// Removes a cgroup and everything below it (children first; cgroups are removed with
/// rmdir, and only once empty). Processes still inside are killed first.
pub(crate) fn remove_cgroup_tree(path: &Path) {
    if !path.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let pids: Vec<i32> = fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for &pid in &pids {
        sigkill(pid);
    }
    wait_gone(&pids, Duration::from_secs(5));
    if let Err(e) = fs::remove_dir(path) {
        warn!(cgroup = %path.display(), "cannot remove: {e}");
    }
}

/// Tears down every index without a live owner. Returns (indexes torn down, indexes
/// still owned by live processes). Must be called under the [`RunLock`].
pub(crate) fn sweep(_lock: &RunLock) -> Result<(Vec<u8>, BTreeSet<u8>)> {
    let mut removed = Vec::new();
    let mut live = BTreeSet::new();
    for n in indexes_present() {
        match read_owner(n) {
            (Some(owner), _) if owner.alive() => {
                live.insert(n);
            }
            (owner, dir) => {
                info!(
                    index = n,
                    ?owner,
                    "removing leftovers of a testbed whose owner is gone"
                );
                teardown_index(n, dir.as_deref())
                    .with_context(|| format!("cannot remove the leftovers of testbed {n}"))?;
                removed.push(n);
            }
        }
    }
    Ok((removed, live))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_to_their_index() {
        for n in [1u8, 9, 10, 99, 100, 250] {
            assert_eq!(index_of_bridge(&bridge_name(n)), Some(n));
            assert_eq!(index_of_ns(&ns_name(n, "w1")), Some(n));
            assert_eq!(index_of_veth(&veth_name(n, 240)), Some(n));
            assert!(
                veth_name(n, 240).len() <= 15,
                "interface names are at most 15 bytes"
            );
        }
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "br-dcctb",
            "br-dcctb0",
            "br-dcctb251",
            "br-dcctb1x",
            "dcctb1",
            "dcctb1-",
            "dcctb1v",
            "eth0",
            "dcctbv1",
            "br-dcc",
        ] {
            assert_eq!(
                index_of_bridge(name)
                    .or(index_of_ns(name))
                    .or(index_of_veth(name)),
                None,
                "{name}"
            );
        }
    }

    #[test]
    fn stat_is_parsed_after_the_command_name() {
        let line =
            "42 (a) b (c)) S 7 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 200";
        let s = parse_stat(line).expect("valid stat");
        assert_eq!((s.state, s.ppid, s.start), ('S', 7, 123456));
    }

    #[test]
    fn the_current_process_is_a_live_owner_and_a_wrong_start_time_is_not() -> Result<()> {
        let me = Owner::current()?;
        assert!(me.alive());
        let forged = Owner::parse(&format!("{} {}", me.pid, me.start + 1)).expect("parses");
        assert!(!forged.alive(), "a reused pid must not count as the owner");
        assert_eq!(Owner::parse("garbage"), None);
        Ok(())
    }
}
