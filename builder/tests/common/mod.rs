//! Helpers shared by the container tests: a builder configuration, running builderctl,
//! reading its JSON, bounded polling, booting three agent workers.

// Each test binary uses a different subset.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use distcc_testbed::{
    AgentInstall, TEST_READ_TOKEN, TEST_TOKEN, Testbed, Worker, agent_config, write_secret,
};
use serde_json::Value;

pub const BUILDERCTL: &str = env!("CARGO_BIN_EXE_builderctl");
/// The per-worker RPC deadline the tests configure.
pub const DEADLINE: Duration = Duration::from_millis(1000);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A builder configuration in a temporary directory, and the tmpfs workspace it names
/// (unmounted on drop, even when the test panics).
pub struct Builder {
    pub dir: tempfile::TempDir,
    pub workspace: PathBuf,
}

impl Builder {
    pub fn new(workers: &[String], workspace: Option<&Path>) -> Builder {
        let dir = tempfile::tempdir().unwrap();
        // What a builder holds: the read token for building, the admin one for reset and
        // bootstrap.
        write_secret(&dir.path().join("token"), &format!("{TEST_READ_TOKEN}\n")).unwrap();
        write_secret(&dir.path().join("admin-token"), &format!("{TEST_TOKEN}\n")).unwrap();
        let workspace = workspace.map_or_else(|| dir.path().join("ws"), Path::to_owned);
        let workers: Vec<String> = workers.iter().map(|w| format!("{w:?}")).collect();
        std::fs::write(
            dir.path().join("builder.toml"),
            format!(
                "workers = [{}]\ntoken_file = \"{}\"\nadmin_token_file = \"{}\"\nworkspace = \"{}\"\ntmpfs_size = \"64M\"\n\
                 deadline_ms = {}\noperation_deadline_ms = 30000\nknown_workers = \"{}\"\n\
                 daemon_socket = \"{}\"\n",
                workers.join(", "),
                dir.path().join("token").display(),
                dir.path().join("admin-token").display(),
                workspace.display(),
                DEADLINE.as_millis(),
                dir.path().join("known_workers").display(),
                // Each test's own: a root session finds a daemon only where its test
                // started one.
                dir.path().join("session.sock").display(),
            ),
        )
        .unwrap();
        Builder { dir, workspace }
    }

    /// A builder for `workers` that trusts them: `builderctl trust --yes`, as an operator
    /// runs it once (the agents serve TLS with their own certificates).
    pub fn trusting(workers: &[String], workspace: Option<&Path>) -> Builder {
        let builder = Builder::new(workers, workspace);
        let out = builder.run(&["trust", "--yes"]);
        assert!(
            out.status.success(),
            "builderctl trust --yes: {}",
            text(&out)
        );
        builder
    }

    pub fn known_workers(&self) -> PathBuf {
        self.dir.path().join("known_workers")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BUILDERCTL);
        command
            .arg("--config")
            .arg(self.dir.path().join("builder.toml"))
            .args(args)
            .env_remove("BUILDERCTL_SESSION")
            .env_remove("DISTCC_HOSTS")
            .env_remove("DISTCC_DIR");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run builderctl")
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        // Lazy: a panicking test may still have a shell in there.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.workspace)
            .output();
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(output)))
}

pub fn by_endpoint<'a>(doc: &'a Value, endpoint: &str) -> &'a Value {
    doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["endpoint"] == endpoint)
        .unwrap_or_else(|| panic!("{endpoint} missing in {doc}"))
}

/// Bounded polling: the bound only keeps a broken build from hanging CI.
pub fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

pub fn boot_cluster(bed: &Testbed) -> Vec<Worker> {
    let install = AgentInstall::from_workspace(&repo_root()).expect("agent binary");
    let config = agent_config(bed, 3);
    std::thread::scope(|scope| {
        let handles: Vec<_> = ["w1", "w2", "w3"]
            .into_iter()
            .map(|name| {
                let (install, config) = (&install, &config);
                scope.spawn(move || {
                    bed.boot_agent_worker(name, install, config, |spec| spec)
                        .expect("boot a worker running the agent")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Translation units of the project, and functions in each: about 0.5 s of gcc -O2 per
/// unit alone; the distributed build (11 compiles sharing this project's 2 cores) lasts
/// about 15 s, so a cut a few seconds in finds compiles in flight on the lost worker.
pub const UNITS: usize = 20;
const FUNCTIONS: usize = 350;

/// A C project slow enough to cut a worker off in the middle of it. The program prints
/// every unit's result, so a wrong object shows in its output as well as in `cmp`.
pub fn write_slow_project(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut objects = vec!["main.o".to_owned()];
    let mut declarations = String::new();
    let mut prints = String::new();
    for u in 0..UNITS {
        let mut code = String::new();
        for k in 0..FUNCTIONS {
            code.push_str(&format!(
                "static long f{k}(long x) {{ long s = {seed}; for (int i = 0; i < 64; i++) \
                 {{ s = s * 31 + (x ^ i) * {m}; if (s & 1) s ^= x << (i & 7); else s += i * {k}; }} \
                 return s; }}\n",
                seed = u * 1000 + k,
                m = k + 3 + u,
            ));
        }
        let calls: Vec<String> = (0..FUNCTIONS).map(|k| format!("f{k}(x)")).collect();
        code.push_str(&format!(
            "long unit{u}(long x) {{ return {}; }}\n",
            calls.join(" + ")
        ));
        std::fs::write(dir.join(format!("u{u}.c")), code).unwrap();
        objects.push(format!("u{u}.o"));
        declarations.push_str(&format!("long unit{u}(long);\n"));
        prints.push_str(&format!("  printf(\"unit{u} %ld\\n\", unit{u}(7));\n"));
    }
    std::fs::write(
        dir.join("main.c"),
        format!("#include <stdio.h>\n{declarations}int main(void) {{\n{prints}  return 0;\n}}\n"),
    )
    .unwrap();
    // Compiles go through $(CC) (distcc in a session); the link runs plain gcc, locally.
    std::fs::write(
        dir.join("Makefile"),
        format!(
            "prog: {objs}\n\tgcc -o $@ $^\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\nclean:\n\trm -f prog *.o\n",
            objs = objects.join(" ")
        ),
    )
    .unwrap();
}
