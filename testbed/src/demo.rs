//! `distcc-testbed demo`: a local cluster of three worker containers running the agent,
//! driven from the root namespace (the builder) with builderctl and distcc.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use distcc_testbed::{AgentInstall, TEST_TOKEN, Testbed, Worker, agent_config};

const WORKERS: [&str; 3] = ["w1", "w2", "w3"];
const SOURCES: usize = 24;
const SLOTS_PER_WORKER: u32 = 2;

fn step(text: &str) {
    println!("\n==> {text}");
}

pub fn run(repo: &Path) -> Result<()> {
    let started = Instant::now();
    let install = AgentInstall::from_workspace(repo)?;
    let builderctl = install.binary.with_file_name("builderctl");
    ensure!(
        builderctl.exists(),
        "{} is missing: build the workspace first",
        builderctl.display()
    );

    step("root filesystem for the workers (built once, then cached)");
    let rootfs = distcc_testbed::Rootfs::ensure()?;
    println!("{}", rootfs.path().display());

    step("network and three worker containers running distcc-agent");
    let bed = Testbed::with_rootfs(rootfs)?;
    let config = agent_config(&bed, SLOTS_PER_WORKER);
    let workers: Vec<Worker> = std::thread::scope(|scope| {
        let handles: Vec<_> = WORKERS
            .iter()
            .map(|name| scope.spawn(|| bed.boot_agent_worker(name, &install, &config, |spec| spec)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("boot thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    for w in &workers {
        let status = w.exec_ok(&["systemctl", "show", "-P", "StatusText", "distcc-agent"])?;
        println!("{} {}  distcc-agent: {}", w.name(), w.ip(), status.trim());
    }

    let dir = tempfile::tempdir().context("temp dir")?;
    let builder_toml = write_builder_config(dir.path(), &workers)?;
    step("builderctl status (gRPC to every agent, in parallel)");
    run_builderctl(&builderctl, &builder_toml)?;

    step(&format!(
        "building {SOURCES} C files through the cluster (DISTCC_FALLBACK=0: remote or fail)"
    ));
    let project = dir.path().join("project");
    write_project(&project)?;
    let hosts: Vec<String> = workers
        .iter()
        .map(|w| format!("{}/{SLOTS_PER_WORKER}", w.ip()))
        .collect();
    let distcc_dir = dir.path().join("distcc");
    std::fs::create_dir_all(&distcc_dir)?;
    let build_started = Instant::now();
    let status = Command::new("make")
        .arg("-s")
        .arg(format!("-j{}", SLOTS_PER_WORKER as usize * WORKERS.len()))
        .arg("CC=distcc gcc")
        .current_dir(&project)
        .env("DISTCC_HOSTS", hosts.join(" "))
        .env("DISTCC_FALLBACK", "0")
        .env("DISTCC_DIR", &distcc_dir)
        .status()
        .context("running make")?;
    ensure!(status.success(), "the build failed: {status}");
    let output = Command::new(project.join("demo"))
        .output()
        .context("running the result")?;
    println!(
        "built in {:.1} s; ./demo prints: {}",
        build_started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stdout).trim()
    );

    for w in &workers {
        let log = w.journal("distccd.service", 200);
        println!(
            "{}: {} compiles (COMPILE_OK lines in its distccd journal)",
            w.name(),
            log.matches("COMPILE_OK").count()
        );
    }

    step("builderctl status after the build");
    run_builderctl(&builderctl, &builder_toml)?;

    step("tearing down");
    drop(workers);
    bed.shutdown()?;
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn write_builder_config(dir: &Path, workers: &[Worker]) -> Result<PathBuf> {
    let token = dir.join("token");
    std::fs::write(&token, format!("{TEST_TOKEN}\n"))?;
    let endpoints: Vec<String> = workers
        .iter()
        .map(|w| format!("\"{}:{}\"", w.ip(), distcc_testbed::AGENT_PORT))
        .collect();
    let path = dir.join("builder.toml");
    std::fs::write(
        &path,
        format!(
            "workers = [{}]\ntoken_file = \"{}\"\n",
            endpoints.join(", "),
            token.display()
        ),
    )?;
    Ok(path)
}

fn run_builderctl(builderctl: &Path, config: &Path) -> Result<()> {
    let status = Command::new(builderctl)
        .arg("--config")
        .arg(config)
        .arg("status")
        .status()
        .with_context(|| format!("running {}", builderctl.display()))?;
    ensure!(
        status.success(),
        "builderctl status reported a problem ({status})"
    );
    Ok(())
}

/// A small C program of `SOURCES` translation units and a Makefile.
fn write_project(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut objects = Vec::new();
    let mut decls = String::new();
    let mut sum = String::from("0");
    for i in 0..SOURCES {
        std::fs::write(
            dir.join(format!("part{i}.c")),
            format!(
                "/* enough work per file that distributing it is worth it */\n\
                 static int table[256];\nint part{i}(void) {{ int s = 0; for (int k = 0; k < 256; k++) {{ table[k] = k * {i}; s += table[k] % 7; }} return s; }}\n"
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
            "demo: main.o {objs}\n\tgcc -o $@ $^\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n",
            objs = objects.join(" ")
        ),
    )?;
    Ok(())
}
