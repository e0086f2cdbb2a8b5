//! A build node in the test-bed: a container on the workers' bridge (so their allowlists
//! admit it) with `builderctl` installed the way the `distcc-builder` package installs it
//! (docs/BUILDER-NODE.md): the binary, the units, the polkit rule and the sysusers snippet
//! from the repository's `systemd/` folder, `systemd-sysusers`, a config naming the
//! workers, tokens `root:distcc-builder 0640`, the workers' certificates pinned by
//! `builderctl trust --yes`, `/etc/distcc` group-writable by the daemon's user, and
//! `distcc-builder.socket` enabled. Tests create ordinary users in it and build as them.

use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::agent::{AGENT_PORT, TEST_READ_TOKEN, TEST_TOKEN, workspace_binary};
use crate::cmd::{check, wait_until};
use crate::testbed::{Testbed, Worker, WorkerSpec};

/// The daemon's user (`systemd/distcc-builder.sysusers`).
pub const BUILDER_USER: &str = "distcc-builder";
/// Who may build through the daemon.
pub const BUILD_GROUP: &str = "distcc-build";
/// The builder's configuration inside the node.
pub const BUILDER_CONFIG: &str = "/etc/distcc-builder/builder.toml";
/// The daemon's session socket (`distcc-builder.socket`).
pub const SESSION_SOCKET: &str = "/run/distcc-builder/session.sock";
/// Where the daemon mounts the users' workspaces (`user_workspaces`' default).
pub const USER_WORKSPACES: &str = "/run/distcc-workspaces";
/// The system-wide hosts file the daemon keeps (plain `distcc` reads it).
pub const SYSTEM_HOSTS_FILE: &str = "/etc/distcc/hosts";
/// The units of the package, as `systemctl` names them.
pub const BUILDER_SERVICE: &str = "distcc-builder.service";
pub const BUILDER_SOCKET: &str = "distcc-builder.socket";

/// PATH of an ordinary user's processes in the node.
const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where the builder's files come from.
#[derive(Debug, Clone)]
pub struct BuilderInstall {
    /// The `builderctl` binary.
    pub binary: PathBuf,
    /// The folder with the unit files, the polkit rule and the sysusers snippet: the
    /// repository's `systemd/`, or a test's scratch copy.
    pub units: PathBuf,
}

/// `(file in the units folder, where the package puts it)`.
const PACKAGE_FILES: &[(&str, &str)] = &[
    (
        "distcc-builder.service",
        "/etc/systemd/system/distcc-builder.service",
    ),
    (
        "distcc-builder.socket",
        "/etc/systemd/system/distcc-builder.socket",
    ),
    (
        "distcc-workspace@.service",
        "/etc/systemd/system/distcc-workspace@.service",
    ),
    (
        "distcc-builder.rules",
        "/etc/polkit-1/rules.d/50-distcc-builder.rules",
    ),
    (
        "distcc-builder.sysusers",
        "/etc/sysusers.d/distcc-builder.conf",
    ),
];

impl BuilderInstall {
    /// The binary from `$BUILDERCTL_BIN`, else the newer of `target/{release,debug}/
    /// builderctl` of the workspace `repo`; the units from `repo/systemd`.
    pub fn from_workspace(repo: &Path) -> Result<Self> {
        Ok(Self {
            binary: workspace_binary(repo, "builderctl", "BUILDERCTL_BIN", "distcc-builder")?,
            units: repo.join("systemd"),
        })
    }

    /// The same binary with the units from `dir` (a test's own versions).
    pub fn with_units(mut self, dir: impl Into<PathBuf>) -> Self {
        self.units = dir.into();
        self
    }

    /// The package's files the units folder lacks (what [`Testbed::boot_builder_node`]
    /// refuses to boot without).
    pub fn missing(&self) -> Vec<PathBuf> {
        PACKAGE_FILES
            .iter()
            .map(|(file, _)| self.units.join(file))
            .filter(|p| !p.is_file())
            .collect()
    }

    /// The files to bind into the node, as `(host, container)`.
    pub fn binds(&self) -> Vec<(PathBuf, PathBuf)> {
        std::iter::once((self.binary.clone(), PathBuf::from("/usr/bin/builderctl")))
            .chain(
                PACKAGE_FILES
                    .iter()
                    .map(|(file, target)| (self.units.join(file), PathBuf::from(target))),
            )
            .collect()
    }
}

/// The builder's configuration for `workers` (agent endpoints): the tokens and the pins
/// where the package keeps them, a 1 s RPC deadline as in the other container tests,
/// then `extra` (more `key = value` lines, e.g. `tmpfs_size`: the builder's default
/// otherwise).
pub fn builder_node_config(workers: &[&Worker], extra: &str) -> String {
    let endpoints: Vec<String> = workers
        .iter()
        .map(|w| format!("\"{}:{AGENT_PORT}\"", w.ip()))
        .collect();
    format!(
        "workers = [{}]\n\
         token_file = \"/etc/distcc-builder/token\"\n\
         admin_token_file = \"/etc/distcc-builder/admin-token\"\n\
         known_workers = \"/etc/distcc-builder/known_workers\"\n\
         deadline_ms = 1000\noperation_deadline_ms = 30000\n{extra}",
        endpoints.join(", ")
    )
}

/// A booted build node. It is a [`Worker`] (exec as root, write_file, journal, set_link
/// ...) with users in it.
pub struct BuilderNode {
    worker: Worker,
}

impl Deref for BuilderNode {
    type Target = Worker;

    fn deref(&self) -> &Worker {
        &self.worker
    }
}

impl std::fmt::Debug for BuilderNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BuilderNode").field(&self.worker).finish()
    }
}

impl Testbed {
    /// Boots `spec` (name, extra binds) as a build node for `workers` with `install`
    /// installed as the package does, `config` (see [`builder_node_config`]) at
    /// [`BUILDER_CONFIG`], the workers pinned, and `distcc-builder.socket` enabled and
    /// started and `distcc-builder.service` started (returns once it said READY=1).
    pub fn boot_builder_node(
        &self,
        spec: WorkerSpec,
        install: &BuilderInstall,
        config: &str,
    ) -> Result<BuilderNode> {
        let missing = install.missing();
        ensure!(
            missing.is_empty(),
            "the builder package's files are missing: {missing:?} (the units of \
             docs/BUILDER-NODE.md; BuilderInstall::with_units names another folder)"
        );
        // The daemon aborts connections to a lost worker (`ss -K`): a real build node's
        // root has CAP_NET_ADMIN, nspawn's default bounding set does not.
        let mut spec = spec.capability("CAP_NET_ADMIN");
        for (host, container) in install.binds() {
            spec = spec.bind_ro(host, container);
        }
        let node = BuilderNode {
            worker: self.boot_worker(spec)?,
        };
        node.install(config)?;
        node.start_daemon()?;
        Ok(node)
    }
}

impl BuilderNode {
    /// What the package's maintainer scripts do, minus starting the daemon.
    fn install(&self, config: &str) -> Result<()> {
        let w = &self.worker;
        // systemd-sysusers.service ran at boot with the snippet bound in already; the
        // package's postinst runs it again, as here.
        w.exec_ok(&["systemd-sysusers"])?;
        w.write_file(BUILDER_CONFIG, config, 0o644)?;
        for (file, token) in [("token", TEST_READ_TOKEN), ("admin-token", TEST_TOKEN)] {
            let path = format!("/etc/distcc-builder/{file}");
            w.write_file(&path, format!("{token}\n"), 0o640)?;
            w.exec_ok(&["chown", &format!("root:{BUILDER_USER}"), &path])?;
        }
        // The operator pins the workers' certificates once, as root.
        w.exec_ok(&["builderctl", "--config", BUILDER_CONFIG, "trust", "--yes"])
            .context("builderctl trust --yes in the build node")?;
        // dpkg-statoverride: the daemon replaces /etc/distcc/hosts atomically.
        w.exec_ok(&["chown", &format!("root:{BUILDER_USER}"), "/etc/distcc"])?;
        w.exec_ok(&["chmod", "0775", "/etc/distcc"])?;
        w.exec_ok(&["systemctl", "daemon-reload"])?;
        Ok(())
    }

    /// The node as a [`Worker`].
    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// `systemctl enable --now distcc-builder.socket`, then start the service (which
    /// returns once the daemon said READY=1).
    pub fn start_daemon(&self) -> Result<()> {
        self.worker
            .exec_ok(&["systemctl", "enable", "--now", BUILDER_SOCKET])
            .with_context(|| self.daemon_trouble("enabling distcc-builder.socket"))?;
        self.worker
            .exec_ok(&["systemctl", "start", BUILDER_SERVICE])
            .with_context(|| self.daemon_trouble("starting distcc-builder.service"))?;
        Ok(())
    }

    /// Stops the daemon and its socket (else a connection would activate it again): the
    /// node as it is when an operator never enabled the daemon.
    pub fn stop_daemon(&self) -> Result<()> {
        self.worker
            .exec_ok(&["systemctl", "stop", BUILDER_SOCKET, BUILDER_SERVICE])
            .map(drop)
    }

    fn daemon_trouble(&self, what: &str) -> String {
        format!(
            "{what} in the build node:\n{}\n{}",
            self.worker.journal(BUILDER_SOCKET, 20),
            self.worker.journal(BUILDER_SERVICE, 40)
        )
    }

    /// Creates the ordinary user `name` (home `/home/NAME`, own group, bash), in the
    /// [`BUILD_GROUP`] when `in_build_group`. Returns its uid.
    pub fn add_user(&self, name: &str, in_build_group: bool) -> Result<u32> {
        let mut argv = vec![
            "useradd",
            "--create-home",
            "--user-group",
            "--shell",
            "/bin/bash",
        ];
        if in_build_group {
            argv.extend(["--groups", BUILD_GROUP]);
        }
        argv.push(name);
        self.worker
            .exec_ok(&argv)
            .with_context(|| format!("adding user {name} in the build node"))?;
        self.uid(name)
    }

    /// Puts an existing user into the [`BUILD_GROUP`] (`adduser USER distcc-build`):
    /// processes started after it have the group.
    pub fn add_to_build_group(&self, name: &str) -> Result<()> {
        self.worker
            .exec_ok(&["usermod", "--append", "--groups", BUILD_GROUP, name])
            .map(drop)
    }

    /// `id -u NAME`.
    pub fn uid(&self, name: &str) -> Result<u32> {
        let out = self.worker.exec_ok(&["id", "-u", name])?;
        out.trim()
            .parse()
            .with_context(|| format!("id -u {name} said {out:?}"))
    }

    /// `argv` as `user` would run it from a login shell: uid, gid and supplementary groups
    /// from the user database (`setpriv --init-groups`, no PAM, no capabilities), a clean
    /// environment with HOME, USER, LOGNAME, SHELL, PATH and LANG, in the home directory.
    fn user_argv<'a>(user: &'a str, home: &'a str, argv: &[&'a str]) -> Vec<String> {
        let mut full: Vec<String> = [
            "setpriv",
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--",
            "env",
            "-i",
            "-C",
            home,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        full.extend([
            format!("HOME={home}"),
            format!("USER={user}"),
            format!("LOGNAME={user}"),
            "SHELL=/bin/bash".to_owned(),
            format!("PATH={USER_PATH}"),
            "LANG=C.UTF-8".to_owned(),
        ]);
        full.extend(argv.iter().map(|s| (*s).to_owned()));
        full
    }

    /// Runs `argv` as `user` (see [`BuilderNode::add_user`]) and waits for it (at most
    /// [`crate::EXEC_TIMEOUT`]). A non-zero exit is not an error: inspect the status.
    pub fn run_as(&self, user: &str, argv: &[&str]) -> Result<Output> {
        let home = format!("/home/{user}");
        let full = Self::user_argv(user, &home, argv);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.worker.exec(&full)
    }

    /// [`BuilderNode::run_as`] that returns stdout, and an error with status, stdout and
    /// stderr when the command fails.
    pub fn run_as_ok(&self, user: &str, argv: &[&str]) -> Result<String> {
        let out = self.run_as(user, argv)?;
        check(&format!("{argv:?} as {user} in the build node"), &out)
    }

    /// The command [`BuilderNode::run_as`] runs, not started (see [`Worker::command`]: a
    /// caller that spawns it kills its process group when done).
    pub fn command_as(&self, user: &str, argv: &[&str]) -> Result<std::process::Command> {
        let home = format!("/home/{user}");
        let full = Self::user_argv(user, &home, argv);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.worker.command(&full)
    }

    /// Starts `argv` as `user` in the background (a build), in a process group of its
    /// own; its output goes to files (read it with [`Spawned::wait`] or
    /// [`Spawned::output_so_far`]). Dropping the handle kills the group.
    pub fn spawn_as(&self, user: &str, argv: &[&str]) -> Result<Spawned> {
        use std::os::unix::process::CommandExt as _;
        let dir = tempfile::Builder::new()
            .prefix("distcc-testbed-spawned-")
            .tempdir()?;
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let mut cmd = self.command_as(user, argv)?;
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .process_group(0);
        let what = format!("{argv:?} as {user} in {}", self.worker.name());
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Spawned {
            child: Some(child),
            what,
            out,
            err,
            _dir: dir,
        })
    }

    /// The ordinary user's view of the daemon's socket: whether `user` can connect to
    /// [`SESSION_SOCKET`] (perl-base is the only Unix-socket client in the rootfs).
    pub fn can_connect_to_daemon(&self, user: &str) -> Result<bool> {
        let script = format!(
            "use IO::Socket::UNIX; exit(IO::Socket::UNIX->new(Peer => '{SESSION_SOCKET}') ? 0 : 1)"
        );
        Ok(self
            .run_as(user, &["perl", "-e", &script])?
            .status
            .success())
    }

    /// Established connections from this node to each of `workers`' agent port, counted
    /// inside each worker: the daemon's status streams (and any session's own).
    pub fn agent_streams(&self, workers: &[&Worker]) -> Result<Vec<usize>> {
        workers
            .iter()
            .map(|w| w.connections_from(self.ip(), AGENT_PORT))
            .collect()
    }

    /// This node's address on the bridge (the workers see its connections from it).
    pub fn address(&self) -> Ipv4Addr {
        self.worker.ip()
    }
}

/// A process started by [`BuilderNode::spawn_as`].
pub struct Spawned {
    child: Option<Child>,
    what: String,
    out: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// Its exit status once it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} was already waited for", self.what),
        }
    }

    /// Still running.
    pub fn running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// stdout and stderr written so far.
    pub fn output_so_far(&self) -> (String, String) {
        let read =
            |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        (read(&self.out), read(&self.err))
    }

    /// Waits at most `limit` for it to exit and returns its output; past the limit it
    /// kills the process group and returns an error with the output so far.
    pub fn wait(mut self, limit: Duration) -> Result<Output> {
        let Some(mut child) = self.child.take() else {
            bail!("{} was already waited for", self.what);
        };
        let status = wait_until(&mut child, Instant::now() + limit)?;
        let Some(status) = status else {
            kill_group(&mut child);
            let (out, err) = self.output_so_far();
            bail!(
                "{} still running after {limit:?}; killed\nstdout:\n{out}\nstderr:\n{err}",
                self.what
            );
        };
        // The group may have left something behind (a daemon started by the build).
        kill_group(&mut child);
        Ok(Output {
            status,
            stdout: std::fs::read(&self.out)?,
            stderr: std::fs::read(&self.err)?,
        })
    }
}

/// SIGKILL to the child's process group, then reap the child.
fn kill_group(child: &mut Child) {
    use nix::sys::signal::{Signal, killpg};
    let _ = killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGKILL,
    );
    let _ = child.wait();
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}
