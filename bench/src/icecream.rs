//! Icecream (Debian's `icecc` 1.4), the peer of case 6: its scheduler and the builder's
//! own `iceccd` run on this host's filesystem in a bare network namespace on the test-bed
//! bridge (icecream finds and announces schedulers by broadcast; in the root namespace
//! that would reach the host's real network), and one `iceccd` per worker container as a
//! transient systemd unit, all on a private network name.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use distcc_testbed::{BareHost, Worker};

use crate::Bench;
use crate::builds::WORKER_JOBS;

/// Icecream's network name: only daemons and schedulers of this name talk to each other.
const NETNAME: &str = "distccbench";
const UNIT: &str = "bench-iceccd";

pub struct Icecream {
    host: BareHost,
    scheduler: Child,
    daemon: Child,
    dir: PathBuf,
    /// A second builder's daemon (case 9's two builders), in that builder's namespace.
    second: Option<Child>,
}

impl Icecream {
    pub fn start(bench: &Bench) -> Result<Icecream> {
        for program in ["icecc-scheduler", "iceccd", "icecc"] {
            ensure!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {program}")])
                    .stdout(Stdio::null())
                    .status()?
                    .success(),
                "{program} is missing: run testbed/setup-host --icecc"
            );
        }
        let dir = bench.tmp.path().join("icecream");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all("/run/icecc")?;
        let host = bench.bed.add_bare_host("ice")?;
        // Both log to stderr unless they daemonize (-l applies only with -d).
        let log = |name: &str| std::fs::File::create(dir.join(name));
        let scheduler = host
            .command("icecc-scheduler")
            .args(["-n", NETNAME, "-vvv"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("scheduler.log")?)
            .spawn()
            .context("starting icecc-scheduler")?;
        // The builder's daemon: it hands this host's jobs out and takes none from others.
        let daemon = host
            .command("iceccd")
            .args(["-n", NETNAME, "-s", &host.ip().to_string(), "--no-remote"])
            // Its environments go to the package's /var/cache/icecc: iceccd writes there
            // as the icecc user, which cannot enter our private temporary directory.
            .args(["-N", "builder", "-vv"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("builder-iceccd.log")?)
            .spawn()
            .context("starting the builder's iceccd")?;
        let ice = Icecream {
            host,
            scheduler,
            daemon,
            dir,
            second: None,
        };
        for w in &bench.workers {
            ice.restart_daemon(w)?;
        }
        ice.wait_for_logins(
            bench
                .workers
                .iter()
                .map(|w| w.name().to_owned())
                .chain(["builder".to_owned()]),
        )?;
        Ok(ice)
    }

    /// (Re)starts `worker`'s iceccd: a transient unit, pointed at our scheduler.
    pub fn restart_daemon(&self, worker: &Worker) -> Result<()> {
        // The package's own init-script daemon, if the generator started one, is not ours.
        let _ = worker.exec(&["systemctl", "stop", "iceccd", "icecc-scheduler", UNIT]);
        let _ = worker.exec(&["systemctl", "reset-failed", UNIT]);
        worker.exec_ok(&[
            "systemd-run",
            &format!("--unit={UNIT}"),
            "/usr/sbin/iceccd",
            "-n",
            NETNAME,
            "-s",
            &self.host.ip().to_string(),
            "-m",
            &WORKER_JOBS.to_string(),
            "-N",
            worker.name(),
        ])?;
        Ok(())
    }

    /// Waits until the scheduler has seen every daemon in `nodes` log in.
    fn wait_for_logins(&self, nodes: impl Iterator<Item = String>) -> Result<()> {
        let nodes: Vec<String> = nodes.collect();
        let log = self.dir.join("scheduler.log");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let missing: Vec<&String> = nodes
                .iter()
                .filter(|n| !text.contains(&format!("login {n} ")))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "icecream daemons {missing:?} did not log in to the scheduler within 60 s; {}:\n{}",
                log.display(),
                text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The builder's `iceccd --no-remote` (builder-side work: case 9 puts it in the
    /// builder's CPU budget).
    pub fn builder_daemon_pid(&self) -> u32 {
        self.daemon.id()
    }

    /// The client's environment: nothing beyond finding the local daemon's socket, which
    /// iceccd (as root) makes at /run/icecc/iceccd.socket.
    pub fn client_env(&self, cmd: &mut Command) {
        cmd.env_remove("ICECC_VERSION");
    }

    /// A second builder's `iceccd --no-remote`, in `builder2`'s network namespace and a
    /// private mount namespace with its own /run/icecc: the client finds its local
    /// daemon at /run/icecc/iceccd.socket, a path both builders share on this host.
    /// Returns its pid (for the second builder's budget); run its clients through
    /// [`Icecream::second_client`].
    pub fn start_second_builder(&mut self, builder2: &BareHost) -> Result<u32> {
        self.stop_second_builder();
        // As for the first: iceccd drops to the icecc user for its environments.
        let envs = "/var/cache/icecc-builder2";
        std::fs::create_dir_all(envs)?;
        let chown = Command::new("chown").args(["icecc:icecc", envs]).status()?;
        ensure!(chown.success(), "cannot chown {envs} to icecc");
        let script = format!(
            "mount -t tmpfs icecc-builder2 /run/icecc && exec iceccd -n {NETNAME} -s {} --no-remote -N builder2 -b {envs} -vv",
            self.host.ip()
        );
        let daemon = builder2
            .command("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("builder2-iceccd.log"))?)
            .spawn()
            .context("starting the second builder's iceccd")?;
        let pid = daemon.id();
        self.second = Some(daemon);
        self.wait_for_logins(["builder2".to_owned()].into_iter())?;
        Ok(pid)
    }

    /// Stops the second builder's daemon, if one runs.
    pub fn stop_second_builder(&mut self) {
        if let Some(mut second) = self.second.take() {
            let _ = second.kill();
            let _ = second.wait();
        }
    }

    /// `cmd` run in the second builder's daemon's network and mount namespaces.
    pub fn second_client(&self, cmd: &Command) -> Result<Command> {
        let daemon = self
            .second
            .as_ref()
            .context("the second builder's iceccd is not started")?;
        let mut nsenter = Command::new("nsenter");
        nsenter
            .arg("-t")
            .arg(daemon.id().to_string())
            .args(["-m", "-n", "--"])
            .arg(cmd.get_program());
        Ok(distcc_testbed::prefixed(nsenter, cmd))
    }

    pub fn stop(mut self) {
        self.stop_second_builder();
        let _ = self.daemon.kill();
        let _ = self.scheduler.kill();
        let _ = self.daemon.wait();
        let _ = self.scheduler.wait();
    }
}
