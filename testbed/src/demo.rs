//! `distcc-testbed demo`: the project's main job. Three worker containers get distcc-agent
//! from the project's own .deb packages through apt; the root namespace is the builder and
//! builds the Linux kernel's tinyconfig (Debian's linux-source-6.1) through them inside
//! `builderctl enter`. `--quick` builds a small C project instead of the kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use distcc_testbed::{AGENT_PORT, REPO_IN_WORKER, Testbed, Worker, WorkerSpec};

const WORKERS: [&str; 3] = ["w1", "w2", "w3"];
const SLOTS_PER_WORKER: u32 = 2;
/// The same read token on every worker, as an operator would distribute it: the builder
/// only builds, so it needs no admin role.
const DEMO_TOKEN: &str = "demo-token-0123456789abcdef0123456789";

fn step(text: &str) {
    println!("\n==> {text}");
}

pub fn run(repo: &Path, quick: bool) -> Result<()> {
    let started = Instant::now();
    let cache = distcc_testbed::cache_dir();

    step("building the packages and a local apt repository (packaging/build-debs, apt-repo)");
    let apt_repo = cache.join("demo-repo");
    if apt_repo.exists() {
        std::fs::remove_dir_all(&apt_repo)?;
    }
    distcc_testbed::build_repository(repo, None, &apt_repo)?;
    let builderctl = repo.join("target/release/builderctl");

    step("root filesystem for the workers (built once, then cached)");
    let rootfs = distcc_testbed::Rootfs::ensure()?;
    println!("{}", rootfs.path().display());

    step("three worker containers: apt-get install distcc-agent, set the allowlist");
    let bed = Testbed::with_rootfs(rootfs)?;
    let workers: Vec<Worker> = std::thread::scope(|scope| {
        let handles: Vec<_> = WORKERS
            .iter()
            .map(|name| scope.spawn(|| install_worker(&bed, name, &apt_repo)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    for w in &workers {
        let status = w.exec_ok(&["systemctl", "show", "-P", "StatusText", "distcc-agent"])?;
        println!("{} {}  distcc-agent: {}", w.name(), w.ip(), status.trim());
    }

    let dir = tempfile::tempdir().context("temp dir")?;
    let builder_toml = write_builder_config(dir.path(), &workers)?;
    let builder = |args: &[&str]| {
        Command::new(&builderctl)
            .arg("--config")
            .arg(&builder_toml)
            .args(args)
            .status()
    };
    // The agents serve TLS with certificates they made at install; the builder pins them
    // (an operator compares them with `distcc-agent --fingerprint` on each worker).
    step("builderctl trust --yes (pin each worker's TLS certificate)");
    let trusted = builder(&["trust", "--yes"])?;
    anyhow::ensure!(trusted.success(), "builderctl trust failed: {trusted}");
    step("builderctl status (gRPC over TLS to every agent, in parallel)");
    builder(&["status"])?;

    let build_started = Instant::now();
    let status = if quick {
        step("builderctl enter -- make: a small C project through the cluster");
        let project = dir.path().join("project");
        write_project(&project)?;
        builder(&[
            "enter",
            "--",
            "sh",
            "-c",
            &format!(
                "make -s -C {p} -j\"$DISTCC_SLOTS\" && {p}/demo",
                p = project.display()
            ),
        ])?
    } else {
        let source = distcc_testbed::kernel_source()?;
        step("builderctl enter -- make tinyconfig && make: Linux 6.1 through the cluster");
        builder(&[
            "enter",
            "--",
            "sh",
            "-c",
            &format!(
                "echo \"builder mode: CC=$CC, $DISTCC_SLOTS slots, hosts: $(grep -v '^#' \"$DISTCC_DIR/hosts\" | tr '\\n' ' ')\" && \
                 make -s -C {src} O=\"$PWD/linux\" tinyconfig && \
                 make -C {src} O=\"$PWD/linux\" -j\"$DISTCC_SLOTS\" && ls -l \"$PWD/linux/arch/x86/boot/bzImage\"",
                src = source.display()
            ),
        ])?
    };
    ensure!(status.success(), "the build failed ({status})");
    println!(
        "build finished in {:.0} s",
        build_started.elapsed().as_secs_f64()
    );
    for w in &workers {
        let log = w.journal("distccd.service", 2000);
        println!(
            "{}: {} compiles ran here",
            w.name(),
            log.matches("COMPILE_OK").count()
        );
    }

    step("builderctl status after the build");
    builder(&["status"])?;
    builder(&["leave"])?;

    step("tearing down");
    drop(workers);
    bed.shutdown()?;
    println!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A worker as an operator sets one up: the package from apt, the cluster's token, the
/// builders' network in the allowlist, `systemctl reload`.
fn install_worker(bed: &Testbed, name: &str, apt_repo: &Path) -> Result<Worker> {
    let w = bed.boot_worker(WorkerSpec::new(name).bind_ro(apt_repo, REPO_IN_WORKER))?;
    w.use_local_repo()?;
    w.apt(&["install", "distcc-agent"])?;
    // Its hash beside the two tokens the package made: `echo TOKEN | distcc-agent token hash`.
    let tokens = w.exec_ok(&["cat", "/etc/distcc-agent/tokens"])?;
    let tokens = tokens + &distcc_testbed::tokens_file(&[("read", "demo-builders", DEMO_TOKEN)]);
    w.write_file("/etc/distcc-agent/tokens", tokens, 0o640)?;
    w.exec_ok(&["chgrp", "distcc-agent", "/etc/distcc-agent/tokens"])?;
    let config = w.exec_ok(&["cat", "/etc/distcc-agent/agent.toml"])?;
    let edited = config
        .replace("allow = []", &format!("allow = [\"{}\"]", bed.subnet()))
        .replace("jobs = 0 ", &format!("jobs = {SLOTS_PER_WORKER} "));
    w.write_file("/etc/distcc-agent/agent.toml", edited, 0o644)?;
    w.exec_ok(&["systemctl", "reload", "distcc-agent"])?;
    // Reload bootstraps distccd in the background of the reload; wait for it to serve.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while w.exec_ok(&["systemctl", "is-active", "distccd"]).is_err() {
        ensure!(
            Instant::now() < deadline,
            "{name}: distccd did not start\n{}",
            w.journal("distcc-agent", 30)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(w)
}

fn write_builder_config(dir: &Path, workers: &[Worker]) -> Result<PathBuf> {
    let token = dir.join("token");
    distcc_testbed::write_secret(&token, &format!("{DEMO_TOKEN}\n"))?;
    let endpoints: Vec<String> = workers
        .iter()
        .map(|w| format!("\"{}:{AGENT_PORT}\"", w.ip()))
        .collect();
    let path = dir.join("builder.toml");
    std::fs::write(
        &path,
        format!(
            "workers = [{}]\ntoken_file = \"{}\"\nworkspace = \"/tmp/kernel-build\"\ntmpfs_size = \"2G\"\n\
             known_workers = \"{}\"\n",
            endpoints.join(", "),
            token.display(),
            dir.join("known_workers").display()
        ),
    )?;
    Ok(path)
}

/// A small C program of many translation units and a Makefile (for `--quick`).
fn write_project(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut objects = Vec::new();
    let mut decls = String::new();
    let mut sum = String::from("0");
    for i in 0..24 {
        std::fs::write(
            dir.join(format!("part{i}.c")),
            format!(
                "static int table[256];\nint part{i}(void) {{ int s = 0; for (int k = 0; k < 256; k++) {{ table[k] = k * {i}; s += table[k] % 7; }} return s; }}\n"
            ),
        )?;
        objects.push(format!("part{i}.o"));
        decls.push_str(&format!("int part{i}(void);\n"));
        sum.push_str(&format!(" + part{i}()"));
    }
    std::fs::write(
        dir.join("main.c"),
        format!(
            "#include <stdio.h>\n{decls}int main(void) {{ printf(\"sum=%d\\n\", {sum}); return 0; }}\n"
        ),
    )?;
    std::fs::write(
        dir.join("Makefile"),
        format!(
            "demo: main.o {objs}\n\t$(CC) -o $@ $^\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n",
            objs = objects.join(" ")
        ),
    )?;
    Ok(())
}
