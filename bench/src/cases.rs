//! The cases. Each returns a markdown section: a heading with date and commit, a table of
//! medians and ratios against its baseline, and notes on method.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use distcc_proto::v1 as pb;
use distcc_proto::v1::distcc_agent_client::DistccAgentClient;
use distcc_testbed::{AGENT_PORT, TEST_TOKEN, Worker};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::Bench;
use crate::run::{
    BuilderConfig, CpuClock, DEADLINE_MS, children_cpu, clock_ticks, median, percentile, text,
    timed,
};

/// A case's result, ready for the document.
pub struct Section {
    pub markdown: String,
}

/// One row: a measurement of ours against its baseline.
struct Row {
    what: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: String,
}

struct Table {
    title: String,
    ours: &'static str,
    baseline: &'static str,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Table {
    fn new(title: &str, ours: &'static str, baseline: &'static str) -> Table {
        Table {
            title: title.to_owned(),
            ours,
            baseline,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn row(&mut self, what: impl Into<String>, ours: String, baseline: String, ratio: String) {
        self.rows.push(Row {
            what: what.into(),
            ours,
            baseline,
            ratio,
            target: String::new(),
            verdict: String::new(),
        });
    }

    /// Sets the target of the last row and whether it is met.
    fn target(&mut self, target: &str, met: bool) {
        if let Some(r) = self.rows.last_mut() {
            r.target = target.to_owned();
            r.verdict = if met { "met" } else { "**missed**" }.to_owned();
        }
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn render(&self, bench: &Bench) -> Section {
        let mut md = String::new();
        let _ = writeln!(md, "### {}\n", self.title);
        let _ = writeln!(md, "{}\n", run_stamp(bench));
        let _ = writeln!(
            md,
            "| measurement | {} | {} | ratio | target | |",
            self.ours, self.baseline
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | --- | --- |");
        for r in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                r.what, r.ours, r.baseline, r.ratio, r.target, r.verdict
            );
        }
        if !self.notes.is_empty() {
            md.push('\n');
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        Section { markdown: md }
    }
}

/// "Measured 2026-11-22 01:23 UTC at 8978574 (+ uncommitted changes)".
pub fn run_stamp(bench: &Bench) -> String {
    let out = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let date = out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let commit =
        out(Command::new("git")
            .arg("-C")
            .arg(&bench.repo)
            .args(["rev-parse", "--short", "HEAD"]));
    let dirty = !out(Command::new("git").arg("-C").arg(&bench.repo).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_empty();
    format!(
        "Measured {date} at commit {commit}{}, {} cores, by `sudo bench/run`.",
        if dirty {
            " (+ uncommitted changes)"
        } else {
            ""
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn fmt_ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.2} ms")
    }
}

pub fn ratio(ours: f64, baseline: f64) -> String {
    if baseline > 0.0 && ours > 0.0 {
        let r = ours / baseline;
        if r < 0.1 {
            format!("{r:.3} (1/{:.0})", baseline / ours)
        } else {
            format!("{r:.2}")
        }
    } else {
        "n/a".to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// Case 1: fleet operations against Ansible.

const STATUS_PLAYBOOK: &str = r#"# The old way: service state, distccd version and a port check on every worker.
- name: distcc cluster status
  hosts: workers
  gather_facts: false
  tasks:
    - name: distccd service state
      ansible.builtin.command: systemctl is-active distccd
      register: state
      changed_when: false
      failed_when: false
    - name: distccd version
      ansible.builtin.command: distccd --version
      register: version
      changed_when: false
    - name: distccd port
      ansible.builtin.wait_for:
        port: 3632
        timeout: 2
    - name: report
      ansible.builtin.debug:
        msg: "{{ inventory_hostname }}: {{ state.stdout }}, {{ version.stdout_lines[0] }}"
"#;

const RESET_PLAYBOOK: &str = r#"# The old way: restart distccd and wait for its port.
- name: distcc cluster reset
  hosts: workers
  gather_facts: false
  tasks:
    - name: restart distccd
      ansible.builtin.systemd:
        name: distccd
        state: restarted
    - name: distccd port
      ansible.builtin.wait_for:
        port: 3632
        timeout: 30
"#;

/// A worker cut off silently: its link down and a permanent neighbour entry for it on the
/// bridge, so connects time out every time (as to a dead host behind a router) instead of
/// failing with "No route to host" once ARP gives up on it. Undone on drop.
pub struct LinkGuard<'a> {
    worker: &'a Worker,
    bridge: String,
    /// A container that builds too (the build node): its own neighbour entry.
    seen_from: Option<&'a Worker>,
}

impl<'a> LinkGuard<'a> {
    pub fn cut(worker: &'a Worker, bridge: String) -> Result<LinkGuard<'a>> {
        Self::cut_seen_from(worker, bridge, None)
    }

    /// [`LinkGuard::cut`], with the permanent neighbour entry also inside `seen_from`'s
    /// namespace (on its eth0): a builder container's connects time out the same way.
    pub fn cut_seen_from(
        worker: &'a Worker,
        bridge: String,
        seen_from: Option<&'a Worker>,
    ) -> Result<LinkGuard<'a>> {
        let mac = worker.exec_ok(&["cat", "/sys/class/net/eth0/address"])?;
        let guard = LinkGuard {
            worker,
            bridge,
            seen_from,
        };
        let ip = worker.ip().to_string();
        for (netns, dev) in guard.neighbour_tables() {
            let mut cmd = Command::new("ip");
            if let Some(ns) = &netns {
                cmd.args(["-n", ns]);
            }
            cmd.args([
                "neigh",
                "replace",
                &ip,
                "lladdr",
                mac.trim(),
                "dev",
                &dev,
                "nud",
                "permanent",
            ]);
            let (_, out) = timed(&mut cmd, Duration::from_secs(10))?;
            ensure!(out.status.success(), "ip neigh replace: {}", text(&out));
        }
        worker.set_link(false)?;
        Ok(guard)
    }

    /// `(namespace, device)` of every neighbour table that gets the entry.
    fn neighbour_tables(&self) -> Vec<(Option<String>, String)> {
        let mut tables = vec![(None, self.bridge.clone())];
        if let Some(node) = self.seen_from {
            tables.push((Some(node.netns().to_owned()), "eth0".to_owned()));
        }
        tables
    }
}

impl Drop for LinkGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.worker.set_link(true) {
            tracing::warn!("cannot bring {}'s link back up: {e:#}", self.worker.name());
        }
        let ip = self.worker.ip().to_string();
        for (netns, dev) in self.neighbour_tables() {
            let mut cmd = Command::new("ip");
            if let Some(ns) = &netns {
                cmd.args(["-n", ns]);
            }
            cmd.args(["neigh", "del", &ip, "dev", &dev]);
            let _ = timed(&mut cmd, Duration::from_secs(10));
        }
    }
}

struct Ansible {
    dir: std::path::PathBuf,
    runs: usize,
}

impl Ansible {
    fn setup(bench: &Bench) -> Result<Ansible> {
        ensure!(
            bench.with_ssh,
            "case 1 needs the openssh-server rootfs variant"
        );
        let dir = bench.tmp.path().join("ansible");
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("id_ed25519");
        let (_, out) = timed(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "distcc-bench", "-f"])
                .arg(&key),
            Duration::from_secs(30),
        )?;
        ensure!(out.status.success(), "ssh-keygen: {}", text(&out));
        let public = std::fs::read(dir.join("id_ed25519.pub"))?;
        let mut inventory = String::from("[workers]\n");
        for w in &bench.workers {
            w.write_file("/root/.ssh/authorized_keys", &public, 0o600)?;
            w.exec_ok(&["chmod", "700", "/root/.ssh"])?;
            w.exec_ok(&["systemctl", "start", "ssh"])?;
            let _ = writeln!(inventory, "{} ansible_host={}", w.name(), w.ip());
        }
        inventory.push_str(
            "[workers:vars]\nansible_user=root\nansible_python_interpreter=/usr/bin/python3\n",
        );
        std::fs::write(dir.join("inventory.ini"), inventory)?;
        std::fs::write(
            dir.join("ansible.cfg"),
            format!(
                "[defaults]\ninventory = {d}/inventory.ini\nprivate_key_file = {d}/id_ed25519\n\
                 host_key_checking = False\nretry_files_enabled = False\ntimeout = 10\nforks = 5\n\
                 local_tmp = {d}/tmp\n\
                 [ssh_connection]\nssh_args = -o ControlMaster=auto -o ControlPersist=60s \
                 -o StrictHostKeyChecking=no -o UserKnownHostsFile={d}/known_hosts -o IdentitiesOnly=yes\n",
                d = dir.display()
            ),
        )?;
        std::fs::write(dir.join("status.yml"), STATUS_PLAYBOOK)?;
        std::fs::write(dir.join("reset.yml"), RESET_PLAYBOOK)?;
        Ok(Ansible { dir, runs: 0 })
    }

    /// One `ansible-playbook` run with fresh SSH connections (its own ControlPath
    /// directory; the masters are closed afterwards, so a later run cannot reuse one).
    fn run(&mut self, playbook: &str) -> Result<(Duration, std::process::Output)> {
        self.runs += 1;
        let cp = self.dir.join(format!("cp-{}", self.runs));
        std::fs::create_dir_all(&cp)?;
        let result = timed(
            Command::new("ansible-playbook")
                .arg(self.dir.join(playbook))
                .env("ANSIBLE_CONFIG", self.dir.join("ansible.cfg"))
                .env("ANSIBLE_SSH_CONTROL_PATH_DIR", &cp)
                .env("ANSIBLE_NOCOLOR", "1")
                .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3"),
            Duration::from_secs(180),
        );
        for socket in std::fs::read_dir(&cp)?.flatten() {
            let _ = timed(
                Command::new("ssh")
                    .arg("-o")
                    .arg(format!("ControlPath={}", socket.path().display()))
                    .args(["-O", "exit", "placeholder"]),
                Duration::from_secs(5),
            );
        }
        result
    }
}

pub fn fleet(bench: &Bench) -> Result<Section> {
    let mut ansible = Ansible::setup(bench)?;
    let refs: Vec<&Worker> = bench.workers.iter().collect();
    let builder = BuilderConfig::new(
        bench.tmp.path(),
        "fleet",
        &bench.builderctl,
        &Bench::endpoints(&refs),
    )?;
    // Warm-up (page cache, Python bytecode, first SSH handshakes), and proof that both
    // ways work on a healthy cluster.
    for playbook in ["status.yml", "reset.yml"] {
        let (_, out) = ansible.run(playbook)?;
        ensure!(
            out.status.success(),
            "ansible-playbook {playbook}: {}",
            text(&out)
        );
    }
    for args in [&["status"][..], &["reset"]] {
        let (_, out) = builder.timed(args)?;
        ensure!(out.status.success(), "builderctl {args:?}: {}", text(&out));
    }

    let n = bench.args.slow_repeats;
    let mut table = Table::new(
        "Case 1: fleet operations, `builderctl` against `ansible-playbook` (3 workers)",
        "builderctl",
        "Ansible",
    );
    let scenarios: [(&str, &str, &str, bool); 4] = [
        ("status, 3 healthy", "status.yml", "status", false),
        ("reset, 3 healthy", "reset.yml", "reset", false),
        ("status, 1 of 3 unreachable", "status.yml", "status", true),
        ("reset, 1 of 3 unreachable", "reset.yml", "reset", true),
    ];
    let lost = &bench.workers[2];
    let mut guard = None;
    for (what, playbook, command, unreachable) in scenarios {
        if unreachable && guard.is_none() {
            guard = Some(LinkGuard::cut(lost, bench.bed.bridge())?);
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut a_codes, mut b_codes) = (Vec::new(), Vec::new());
        let mut how_unreachable = std::collections::BTreeMap::<&str, usize>::new();
        for i in 0..n {
            let (t, out) = ansible.run(playbook)?;
            if !unreachable {
                ensure!(out.status.success(), "ansible {what}: {}", text(&out));
            }
            a.push(ms(t));
            a_codes.push(out.status.code().unwrap_or(-1));
            let said = String::from_utf8_lossy(&out.stdout);
            for kind in ["timed out", "No route to host", "Connection refused"] {
                if said.contains(kind) {
                    *how_unreachable.entry(kind).or_default() += 1;
                }
            }
            let (t, out) = builder.timed(&[command])?;
            if !unreachable {
                ensure!(out.status.success(), "builderctl {what}: {}", text(&out));
            }
            b.push(ms(t));
            b_codes.push(out.status.code().unwrap_or(-1));
            tracing::info!(
                "case 1 {what} #{i}: ansible {:.0} ms, builderctl {:.0} ms",
                a[i],
                b[i]
            );
        }
        let (ma, mb) = (median(&a), median(&b));
        table.row(what, fmt_ms(mb), fmt_ms(ma), ratio(mb, ma));
        match (command, unreachable) {
            ("status", false) => table.target("≥ 30× faster than Ansible", ma / mb >= 30.0),
            ("status", true) => {
                table.target("≤ ~1 s (its deadline)", mb <= 1.1 * DEADLINE_MS as f64)
            }
            _ => {}
        }
        if unreachable {
            table.note(format!(
                "{what}: exit codes Ansible {a_codes:?}, builderctl {b_codes:?} (both report the lost worker); \
                 Ansible's SSH error per run: {how_unreachable:?}."
            ));
        }
    }
    drop(guard);
    table.note(format!(
        "{n} pairs per row, Ansible and builderctl alternating; medians. Ratio = builderctl / Ansible."
    ));
    table.note(format!(
        "Ansible: Debian's `ansible` on the host, `openssh-server` + `python3` in the workers (rootfs \
         variant), `gather_facts: false`, defaults otherwise (5 forks, 10 s SSH connect timeout, \
         ControlPersist); every run starts with fresh SSH connections. Status playbook: `systemctl is-active \
         distccd`, `distccd --version`, `wait_for` port 3632; reset playbook: `systemd state=restarted` + \
         `wait_for` port. builderctl: `deadline_ms = {DEADLINE_MS}`; reset is the agents' Control RESET \
         (waits for distccd active). Unreachable = `worker.set_link(false)` plus a permanent \
         neighbour entry for it on the bridge: connects time out every time, like a powered-off host \
         behind a router (without it, ARP gives up after about 50 s and connects fail in 3 s with \
         \"No route to host\")."
    ));
    Ok(table.render(bench))
}

// ---------------------------------------------------------------------------------------
// Case 2: fan-out.

pub fn fanout(bench: &mut Bench) -> Result<Section> {
    let max = bench.args.max_workers;
    let names: Vec<String> = (4..=max).map(|i| format!("w{i}")).collect();
    let started = Instant::now();
    let extra = bench.boot(&names, 8)?;
    let boot_secs = started.elapsed().as_secs_f64();
    bench.extra = extra;
    let all: Vec<&Worker> = bench.workers.iter().chain(&bench.extra).collect();
    let sizes: Vec<usize> = [3, 10, max]
        .into_iter()
        .filter(|n| *n <= max)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let configs = sizes
        .iter()
        .map(|n| {
            BuilderConfig::new(
                bench.tmp.path(),
                &format!("fanout-{n}"),
                &bench.builderctl,
                &Bench::endpoints(&all[..*n]),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    for (n, c) in sizes.iter().zip(&configs) {
        // Also waits for all workers to be ready: a freshly booted agent may still be
        // bootstrapping distccd.
        let limit = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, out) = c.timed(&["status"])?;
            if out.status.success() {
                break;
            }
            if Instant::now() > limit {
                bail!("status of {n} workers never succeeded: {}", text(&out));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    // CPU milliseconds per call: the whole machine's (builderctl, every agent, their
    // systemd and distccd) and builderctl's own.
    let mut machine_cpu: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut client_cpu: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    for i in 0..bench.args.repeats {
        for (k, c) in configs.iter().enumerate() {
            let (clock, client) = (CpuClock::now()?, children_cpu()?);
            let (t, out) = c.timed(&["status"])?;
            machine_cpu[k].push(clock.secs_since()? * 1000.0);
            client_cpu[k].push(ms(children_cpu()?.saturating_sub(client)));
            ensure!(
                out.status.success(),
                "status of {} workers: {}",
                sizes[k],
                text(&out)
            );
            times[k].push(ms(t));
        }
        tracing::info!(
            "case 2 round {i}: {:?} ms",
            times.iter().map(|t| t[i].round()).collect::<Vec<_>>()
        );
    }
    let medians: Vec<f64> = times.iter().map(|t| median(t)).collect();
    let mut table = Table::new(
        "Case 2: fan-out, `builderctl status` against N workers",
        "N workers",
        "3 workers",
    );
    for (k, n) in sizes.iter().enumerate() {
        table.row(
            format!("status, {n} workers"),
            fmt_ms(medians[k]),
            fmt_ms(medians[0]),
            ratio(medians[k], medians[0]),
        );
        if *n == max && max > 3 {
            table.target("< 2× the time of 3", medians[k] < 2.0 * medians[0]);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    for (k, n) in sizes.iter().enumerate() {
        let (machine, client) = (median(&machine_cpu[k]), median(&client_cpu[k]));
        table.row(
            format!("CPU per status, {n} workers: whole machine / builderctl's own"),
            format!("{machine:.0} ms / {client:.0} ms"),
            format!(
                "{:.0} ms / {:.0} ms",
                median(&machine_cpu[0]),
                median(&client_cpu[0])
            ),
            ratio(machine, median(&machine_cpu[0])),
        );
    }
    table.note(format!(
        "CPU per status: busy time of all {cores} cores during the call (/proc/stat, 10 ms ticks, median of the rounds) and builderctl's own user+system time (getrusage of the child). Every agent, its systemd and its distccd run on these same cores, so a status of N workers cannot take less wall time than the machine's CPU for it divided by {cores}; on separate worker machines only builderctl's own share and the slowest worker's answer would add up."
    ));
    if let (Some(first), Some(last)) = (medians.first(), medians.last())
        && max > 3
    {
        table.note(format!(
            "Growth: {:.1} ms per added worker from 3 to {max} ((t{max} − t3) / {}).",
            (last - first) / (max - 3) as f64,
            max - 3
        ));
    }
    table.note(format!(
        "{} rounds, sizes alternating (3, 10, {max}, 3, ...); medians. All {max} containers run during \
         every round (idle agents and distccd on the same 2 cores). Booting the {} extra workers in parallel \
         (8 at a time) took {boot_secs:.0} s.",
        bench.args.repeats,
        max - 3
    ));
    Ok(table.render(bench))
}

// ---------------------------------------------------------------------------------------
// Case 3: enter.

/// Whether `path` is a mount point (from /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let target = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(4) == Some(target.as_ref()))
        })
        .unwrap_or(false)
}

pub fn enter(bench: &Bench) -> Result<Section> {
    let refs: Vec<&Worker> = bench.workers.iter().collect();
    let builder = BuilderConfig::new(
        bench.tmp.path(),
        "enter",
        &bench.builderctl,
        &Bench::endpoints(&refs),
    )?;
    let env_dir = bench.tmp.path().join("enter-env");
    std::fs::create_dir_all(&env_dir)?;
    let env_dir_s = env_dir.to_string_lossy().into_owned();
    // The first enter mounts the workspace; the measured ones find it mounted.
    let (first, out) = builder.timed(&["enter", "--", "true"])?;
    ensure!(out.status.success(), "builderctl enter: {}", text(&out));
    ensure!(
        is_mounted(&builder.workspace),
        "the workspace {} is not mounted after enter",
        builder.workspace.display()
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..bench.args.repeats {
        let (t, out) = builder.timed(&["env", "--distcc-dir", &env_dir_s])?;
        ensure!(out.status.success(), "builderctl env: {}", text(&out));
        a.push(ms(t));
        let (t, out) = builder.timed(&["enter", "--", "true"])?;
        ensure!(out.status.success(), "builderctl enter: {}", text(&out));
        b.push(ms(t));
        tracing::info!("case 3 #{i}: env {:.0} ms, enter {:.0} ms", a[i], b[i]);
    }
    let (_, out) = builder.timed(&["leave"])?;
    if !out.status.success() {
        tracing::warn!("builderctl leave: {}", text(&out));
    }
    let (ma, mb) = (median(&a), median(&b));
    let mut table = Table::new(
        "Case 3: `builderctl enter -- true`, time to prompt (3 workers, workspace mounted)",
        "enter -- true",
        "env",
    );
    table.row("time to prompt", fmt_ms(mb), fmt_ms(ma), ratio(mb, ma));
    table.target("< 200 ms", mb < 200.0);
    table.note(format!(
        "{} pairs, alternating; medians. Baseline: `builderctl env --distcc-dir DIR` (the same status \
         fan-out and hosts file, no preflight, no session), so the ratio is the cost of the session itself. \
         The first enter of the run (it mounted the tmpfs workspace) took {}, not counted.",
        bench.args.repeats,
        fmt_ms(ms(first))
    ));
    Ok(table.render(bench))
}

// ---------------------------------------------------------------------------------------
// Case 4: agent footprint.

/// CPU time and RSS of one process inside a worker.
#[derive(Debug, Clone, Copy)]
struct ProcSample {
    ticks: u64,
    rss_kib: u64,
}

fn main_pid(worker: &Worker, unit: &str) -> Result<u32> {
    let out = worker.exec_ok(&["systemctl", "show", "-p", "MainPID", "--value", unit])?;
    let pid: u32 = out
        .trim()
        .parse()
        .with_context(|| format!("MainPID of {unit}: {out:?}"))?;
    ensure!(pid != 0, "{unit} is not running in {}", worker.name());
    Ok(pid)
}

/// From /proc inside the container (its pid namespace: MainPID is valid there).
fn sample(worker: &Worker, pid: u32) -> Result<ProcSample> {
    let out = worker.exec_ok(&[
        "sh",
        "-c",
        &format!("cat /proc/{pid}/stat && grep '^VmRSS:' /proc/{pid}/status"),
    ])?;
    let mut lines = out.lines();
    let stat = lines.next().context("no stat line")?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("bad stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    let rss_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no VmRSS")?
        .parse()?;
    Ok(ProcSample {
        ticks: utime + stime,
        rss_kib,
    })
}

/// Entries of /proc/net/tcp in the worker's network namespace (TIME_WAIT included): every
/// Status opens a connection to distccd's stats port and then reads this whole table.
fn tcp_sockets(worker: &Worker) -> Result<usize> {
    let out = worker.exec_ok(&["cat", "/proc/net/tcp"])?;
    Ok(out.lines().count().saturating_sub(1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Check,
    Status,
}

#[derive(Clone)]
struct Clients {
    agent: DistccAgentClient<Channel>,
    health: HealthClient<Channel>,
    auth: MetadataValue<Ascii>,
}

impl Clients {
    async fn call(&mut self, rpc: Rpc) -> Result<(), tonic::Status> {
        match rpc {
            Rpc::Status => {
                // What builderctl sends.
                let mut request = tonic::Request::new(pb::StatusRequest {
                    skip_compilers: false,
                });
                request
                    .metadata_mut()
                    .insert("authorization", self.auth.clone());
                self.agent.status(request).await.map(drop)
            }
            Rpc::Check => self
                .health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(drop),
        }
    }
}

/// Sequential calls, at most `count` and `limit`; latencies in ms.
async fn latencies(clients: &Clients, rpc: Rpc, count: usize, limit: Duration) -> Result<Vec<f64>> {
    let mut c = clients.clone();
    let started = Instant::now();
    let mut out = Vec::with_capacity(count);
    while out.len() < count && started.elapsed() < limit {
        let t = Instant::now();
        c.call(rpc).await.with_context(|| format!("{rpc:?} RPC"))?;
        out.push(ms(t.elapsed()));
    }
    Ok(out)
}

/// `concurrency` callers sharing at most `count` calls and `limit`; calls per second.
async fn throughput(
    clients: &Clients,
    rpc: Rpc,
    count: usize,
    concurrency: usize,
    limit: Duration,
) -> Result<f64> {
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (mut c, issued) = (clients.clone(), issued.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            while issued.fetch_add(1, Ordering::Relaxed) < count && started.elapsed() < limit {
                c.call(rpc).await?;
                done += 1;
            }
            Ok::<usize, tonic::Status>(done)
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.context("a load task panicked")??;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

const LOAD_CONCURRENCY: usize = 16;

pub fn footprint(bench: &Bench) -> Result<Section> {
    let idle = Duration::from_secs(bench.args.idle_secs);
    let tck = clock_ticks() as f64;
    let mut daemons = vec!["distcc-agent", "distccd"];
    if bench.with_ssh {
        daemons.push("ssh");
        for w in &bench.workers {
            w.exec_ok(&["systemctl", "start", "ssh"])?;
        }
    }
    // Let the agents settle after boot (first status, compiler versions) before the window.
    std::thread::sleep(Duration::from_secs(5));
    let mut pids = Vec::new();
    for w in &bench.workers {
        for d in &daemons {
            pids.push((w, *d, main_pid(w, d)?));
        }
    }
    tracing::info!(secs = idle.as_secs(), "case 4: idle window");
    let start: Vec<(ProcSample, Instant)> = pids
        .iter()
        .map(|(w, _, pid)| Ok((sample(w, *pid)?, Instant::now())))
        .collect::<Result<_>>()?;
    let mut max_rss = vec![0u64; pids.len()];
    let window_end = Instant::now() + idle;
    while Instant::now() < window_end {
        std::thread::sleep(Duration::from_secs(5).min(window_end - Instant::now()));
        for (k, (w, _, pid)) in pids.iter().enumerate() {
            max_rss[k] = max_rss[k].max(sample(w, *pid)?.rss_kib);
        }
    }
    let mut cpu = std::collections::BTreeMap::<&str, Vec<f64>>::new();
    let mut rss = std::collections::BTreeMap::<&str, Vec<f64>>::new();
    let mut rss_max = std::collections::BTreeMap::<&str, f64>::new();
    for (k, (w, d, pid)) in pids.iter().enumerate() {
        let end = sample(w, *pid)?;
        let secs = start[k].1.elapsed().as_secs_f64();
        let pct = (end.ticks - start[k].0.ticks) as f64 / tck / secs * 100.0;
        cpu.entry(d).or_default().push(pct);
        rss.entry(d).or_default().push(end.rss_kib as f64 / 1024.0);
        let m = rss_max.entry(d).or_default();
        *m = m.max(max_rss[k].max(end.rss_kib) as f64 / 1024.0);
    }

    // RPC load against w1, from the root namespace over the test-bed's bridge.
    let target = &bench.workers[0];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let repeats = bench.args.repeats;
    let count = bench.args.rpc_count;
    let tcp_before = tcp_sockets(target)?;
    // Who does the work of a Status: CPU ticks of these processes in w1, summed over the
    // Status latency rounds only (the health Check rounds between them are left out).
    let servers: Vec<(&str, u32)> = vec![
        ("distcc-agent", main_pid(target, "distcc-agent")?),
        ("systemd (PID 1)", 1),
        ("dbus-daemon", main_pid(target, "dbus")?),
        ("distccd (main process)", main_pid(target, "distccd")?),
    ];
    let server_ticks = |servers: &[(&str, u32)]| -> Result<Vec<u64>> {
        servers
            .iter()
            .map(|(_, pid)| Ok(sample(target, *pid)?.ticks))
            .collect()
    };
    let mut status_ticks = vec![0u64; servers.len()];
    let mut status_calls = 0usize;
    let (lat, thr) = runtime.block_on(async {
        // TLS, the agents' default: the worker's own certificate is the one root.
        let cert = target.agent_certificate()?;
        let channel = Channel::from_shared(format!("https://{}:{AGENT_PORT}", target.ip()))?
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(cert)))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .context("connecting to the agent")?;
        let clients = Clients {
            agent: DistccAgentClient::new(channel.clone()),
            health: HealthClient::new(channel),
            auth: format!("Bearer {TEST_TOKEN}").parse()?,
        };
        // Warm-up: connection, compiler cache, allocator.
        latencies(&clients, Rpc::Status, 200, Duration::from_secs(10)).await?;
        latencies(&clients, Rpc::Check, 200, Duration::from_secs(10)).await?;
        let limit = Duration::from_secs(30);
        let mut lat: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
        for i in 0..repeats {
            for (k, rpc) in [Rpc::Check, Rpc::Status].into_iter().enumerate() {
                let before = server_ticks(&servers)?;
                let mut l = latencies(&clients, rpc, count, limit).await?;
                if rpc == Rpc::Status {
                    for (total, (b, a)) in status_ticks
                        .iter_mut()
                        .zip(before.iter().zip(server_ticks(&servers)?))
                    {
                        *total += a.saturating_sub(*b);
                    }
                    status_calls += l.len();
                }
                l.sort_by(f64::total_cmp);
                let total: f64 = l.iter().sum();
                lat[k].push((
                    percentile(&l, 50.0),
                    percentile(&l, 99.0),
                    l.len() as f64 / (total / 1000.0),
                ));
            }
            tracing::info!(
                "case 4 latency round {i}: check {:?} status {:?}",
                lat[0][i],
                lat[1][i]
            );
        }
        let mut thr: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for i in 0..repeats.min(5) {
            for (k, rpc) in [Rpc::Check, Rpc::Status].into_iter().enumerate() {
                thr[k].push(
                    throughput(
                        &clients,
                        rpc,
                        count * 4,
                        LOAD_CONCURRENCY,
                        Duration::from_secs(20),
                    )
                    .await?,
                );
            }
            tracing::info!(
                "case 4 throughput round {i}: check {:.0}/s status {:.0}/s",
                thr[0][i],
                thr[1][i]
            );
        }
        Ok::<_, anyhow::Error>((lat, thr))
    })?;
    let tcp_after = tcp_sockets(target)?;
    let agent_pid = main_pid(target, "distcc-agent")?;
    let after_load = sample(target, agent_pid)?.rss_kib as f64 / 1024.0;

    let baseline_daemon = if bench.with_ssh { "ssh" } else { "distccd" };
    let mut table = Table::new(
        "Case 4: agent footprint and Status RPC",
        "distcc-agent",
        "baseline",
    );
    let med = |m: &std::collections::BTreeMap<&str, Vec<f64>>, d: &str| {
        m.get(d).map_or(f64::NAN, |v| median(v))
    };
    let (a_rss, b_rss) = (med(&rss, "distcc-agent"), med(&rss, baseline_daemon));
    table.row(
        format!("idle RSS (vs `{baseline_daemon}d`'s listener)").replace("distccdd", "distccd"),
        format!("{a_rss:.1} MiB"),
        format!("{b_rss:.1} MiB"),
        ratio(a_rss, b_rss),
    );
    table.target("< 15 MiB", a_rss < 15.0);
    let (a_cpu, b_cpu) = (med(&cpu, "distcc-agent"), med(&cpu, baseline_daemon));
    table.row(
        format!("idle CPU over {} s", idle.as_secs()),
        format!("{a_cpu:.3} %"),
        format!("{b_cpu:.3} %"),
        ratio(a_cpu, b_cpu),
    );
    table.target("< 0.1 %", a_cpu < 0.1);
    if bench.with_ssh {
        let (d_rss, d_cpu) = (med(&rss, "distccd"), med(&cpu, "distccd"));
        table.row(
            "idle RSS / CPU of distccd's main process (context)",
            format!("{a_rss:.1} MiB / {a_cpu:.3} %"),
            format!("{d_rss:.1} MiB / {d_cpu:.3} %"),
            ratio(a_rss, d_rss),
        );
    }
    let pick = |k: usize, f: fn(&(f64, f64, f64)) -> f64| {
        median(&lat[k].iter().map(f).collect::<Vec<_>>())
    };
    let (c50, s50) = (pick(0, |t| t.0), pick(1, |t| t.0));
    let (c99, s99) = (pick(0, |t| t.1), pick(1, |t| t.1));
    let (cseq, sseq) = (pick(0, |t| t.2), pick(1, |t| t.2));
    table.row(
        "Status latency p50 (vs health Check)",
        fmt_ms(s50),
        fmt_ms(c50),
        ratio(s50, c50),
    );
    table.row(
        "Status latency p99 (vs health Check)",
        fmt_ms(s99),
        fmt_ms(c99),
        ratio(s99, c99),
    );
    table.target("< 5 ms", s99 < 5.0);
    table.row(
        "Status throughput, 1 in flight",
        format!("{sseq:.0}/s"),
        format!("{cseq:.0}/s"),
        ratio(sseq, cseq),
    );
    let per_call = |ticks: u64| ticks as f64 / tck / status_calls.max(1) as f64 * 1e6;
    let split: Vec<String> = servers
        .iter()
        .zip(&status_ticks)
        .map(|((name, _), ticks)| format!("{name} {:.0} µs", per_call(*ticks)))
        .collect();
    table.note(format!(
        "CPU per sequential Status call on w1, by process (ticks of each process's /proc/PID/stat over the {status_calls} calls of the Status latency rounds, one warm connection): {}. The agent reads 8 unit properties with one D-Bus Get each (fresh values after jobs; see agent/src/systemd.rs), which is what systemd and dbus-daemon spend here.",
        split.join(", ")
    ));
    let (ct, st) = (median(&thr[0]), median(&thr[1]));
    table.row(
        format!("Status throughput, {LOAD_CONCURRENCY} in flight"),
        format!("{st:.0}/s"),
        format!("{ct:.0}/s"),
        ratio(st, ct),
    );
    table.row(
        "agent RSS after the load",
        format!("{after_load:.1} MiB"),
        String::new(),
        String::new(),
    );
    table.row(
        "TCP sockets in w1's namespace, before / after the RPC load",
        format!("{tcp_before} / {tcp_after}"),
        String::new(),
        String::new(),
    );
    let max_agent = rss_max.get("distcc-agent").copied().unwrap_or(f64::NAN);
    table.note(format!(
        "Idle: the MainPID of each unit in each of the 3 workers, from /proc inside the container \
         (utime+stime over a {} s window with nothing calling the agent, VmRSS; RSS sampled every 5 s, \
         highest seen {max_agent:.1} MiB); medians over the 3 workers. Baseline: {}.",
        idle.as_secs(),
        if bench.with_ssh {
            "`sshd`, the daemon every worker ran for the Ansible way"
        } else {
            "distccd's main process"
        }
    ));
    table.note(format!(
        "RPCs: a tonic client in the root namespace calls w1's agent over the test-bed bridge (198.18.N.x, \
         one HTTP/2 connection). Status as builderctl sends it (`skip_compilers: false`; compiler versions \
         are cached per binary), baseline the agent's own `grpc.health.v1` Check (same server, no work). \
         Latency: {repeats} rounds of {count} sequential calls per RPC, alternating; p50/p99 per round, \
         medians of rounds. Throughput: {} rounds of {} calls with {LOAD_CONCURRENCY} in flight (bounded 20 s). \
         Client and agent share the 2 cores.",
        repeats.min(5),
        count * 4
    ));
    Ok(table.render(bench))
}

// ---------------------------------------------------------------------------------------
// Case 7: the agent under a connection flood (issue 10, section 4).

/// Idle TCP connections and WatchStatus streams of the flood.
const FLOOD_IDLE: usize = 1100;
const FLOOD_STREAMS: usize = 200;
/// Status calls per phase, each on a fresh connection (the builder's way).
const FLOOD_CALLS: usize = 20;

/// One Status on a fresh connection, deadline 1 s (connect included), as builderctl does.
async fn fresh_status(endpoint: &str, auth: &MetadataValue<Ascii>) -> Result<Duration> {
    let started = Instant::now();
    let deadline = Duration::from_millis(DEADLINE_MS);
    let call = async {
        let channel = Channel::from_shared(format!("http://{endpoint}"))?
            .connect_timeout(deadline)
            .connect()
            .await?;
        let mut request = tonic::Request::new(pb::StatusRequest {
            skip_compilers: false,
        });
        request.metadata_mut().insert("authorization", auth.clone());
        DistccAgentClient::new(channel).status(request).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {deadline:?}"))??;
    Ok(started.elapsed())
}

/// WatchStatus streams at 1 s (what `builderctl enter` asks), each on its own connection,
/// drained by a task each; open once their first status arrived.
async fn open_streams(
    endpoint: &str,
    auth: &MetadataValue<Ascii>,
    count: usize,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut streams = Vec::new();
    for i in 0..count {
        let channel = Channel::from_shared(format!("http://{endpoint}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut request = tonic::Request::new(pb::WatchStatusRequest { interval_ms: 1000 });
        request.metadata_mut().insert("authorization", auth.clone());
        let mut stream = DistccAgentClient::new(channel)
            .watch_status(request)
            .await
            .with_context(|| format!("WatchStatus {i}"))?
            .into_inner();
        stream.message().await?.context("stream ended")?;
        streams.push(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
        }));
    }
    Ok(streams)
}

/// One phase: Status latencies (ms) and the agent's CPU (% of a core) over the calls.
async fn flood_phase(
    endpoint: &str,
    auth: &MetadataValue<Ascii>,
    pid: u32,
) -> Result<(Vec<f64>, f64)> {
    let cpu_before = distcc_testbed::process_cpu(pid)?;
    let started = Instant::now();
    let mut latencies = Vec::new();
    for _ in 0..FLOOD_CALLS {
        latencies.push(ms(fresh_status(endpoint, auth).await?));
        // Paced like a builder's status loop, so the window is not only our own calls.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = distcc_testbed::process_cpu(pid)? - cpu_before;
    Ok((
        latencies,
        100.0 * cpu.as_secs_f64() / started.elapsed().as_secs_f64(),
    ))
}

pub fn flood(bench: &Bench) -> Result<Section> {
    let target = &bench.workers[0];
    let endpoint = format!("{}:{AGENT_PORT}", target.ip());
    let addr: std::net::SocketAddr = endpoint.parse()?;
    let pid = *target
        .host_pids_of("distcc-agent")?
        .first()
        .context("w1 runs no distcc-agent")?;
    let auth: MetadataValue<Ascii> = format!("Bearer {TEST_TOKEN}").parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (mut idle_lat, mut flood_lat) = (Vec::new(), Vec::new());
    let (mut idle_cpu, mut flood_cpu, mut open_secs) = (Vec::new(), Vec::new(), Vec::new());
    let rounds = bench.args.repeats.min(5);
    for round in 0..rounds {
        tracing::info!(round, "case 7: idle, then flooded");
        runtime.block_on(async {
            let (lat, cpu) = flood_phase(&endpoint, &auth, pid).await?;
            idle_lat.extend(lat);
            idle_cpu.push(cpu);

            let opening = Instant::now();
            let held = distcc_testbed::IdleConnections::open(addr, FLOOD_IDLE)?;
            let streams = open_streams(&endpoint, &auth, FLOOD_STREAMS).await?;
            open_secs.push(opening.elapsed().as_secs_f64());
            let (lat, cpu) = flood_phase(&endpoint, &auth, pid).await?;
            flood_lat.extend(lat);
            flood_cpu.push(cpu);
            ensure!(
                held.closed_by_peer() == 0,
                "the agent closed idle connections during the measurement"
            );
            for s in &streams {
                s.abort();
            }
            drop(held);
            anyhow::Ok(())
        })?;
    }
    let p = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        percentile(v, q)
    };
    let (idle_p50, flood_p50) = (p(&mut idle_lat, 50.0), p(&mut flood_lat, 50.0));
    let (idle_max, flood_max) = (p(&mut idle_lat, 100.0), p(&mut flood_lat, 100.0));
    let (idle_cpu, flood_cpu) = (median(&idle_cpu), median(&flood_cpu));
    let mut t = Table::new(
        "Case 7: Status under a connection flood (1,100 idle TCP connections + 200 WatchStatus streams)",
        "flooded",
        "idle",
    );
    t.row(
        "Status p50, fresh connection each",
        fmt_ms(flood_p50),
        fmt_ms(idle_p50),
        ratio(flood_p50, idle_p50),
    );
    t.row(
        "Status slowest of all rounds",
        fmt_ms(flood_max),
        fmt_ms(idle_max),
        ratio(flood_max, idle_max),
    );
    t.target(
        &format!("< {DEADLINE_MS} ms (the builder's deadline)"),
        flood_max < DEADLINE_MS as f64,
    );
    t.row(
        "agent CPU during the calls (% of a core)",
        format!("{flood_cpu:.1} %"),
        format!("{idle_cpu:.1} %"),
        ratio(flood_cpu, idle_cpu),
    );
    t.note(format!(
        "{} rounds against w1, each an idle phase then a flooded one: {FLOOD_CALLS} Status calls \
         (`skip_compilers: false`, a new HTTP/2 connection per call, 1 s deadline, 100 ms apart) \
         per phase; the flood is {FLOOD_IDLE} TCP connections that never send a byte plus \
         {FLOOD_STREAMS} WatchStatus streams at `interval_ms: 1000`, each on its own connection, \
         all from the root namespace, held through the flooded phase (opening them took {:.1} s, \
         median). Agent CPU: utime+stime of its process (/proc/PID/stat) over each phase. \
         The agent runs with the default `[limits]` and the shipped unit (`LimitNOFILE=8192`).",
        rounds,
        median(&open_secs)
    ));
    t.note(
        "Before the fix (commit 65c0fea, default LimitNOFILE 1024): every Status under 1,100 idle \
         connections waited out its 1 s deadline and the agent spun in accept(2) failing with \
         EMFILE (84,057 failed accept4 calls in 4 s, `strace -c -f -p`): 38 % of a core over 24 s, \
         strace attached for 4 s of them (builder/tests/flood.rs's scenario with the old binary).",
    );
    Ok(t.render(bench))
}
