//! The C++ workload for real (about 6 minutes on 2 cores, so ignored by default: run with
//! `-- --ignored`; needs `testbed/setup-host --cxx`): a local `g++` build, the
//! same build again, and a `distcc g++` build against a distccd on loopback, all in one
//! build directory, with byte-identical objects.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use distcc_testbed::{CXX_OBJECTS, CxxBuild, cxx_source};

/// Port for the loopback distccd; not distccd's default 3632, which a host may use.
const PORT: u16 = 3682;

/// Stops the distccd it started when dropped: SIGTERM to its process group, since
/// SIGKILL to the parent alone leaves its pre-forked children serving (seen here).
struct Distccd(Child);

impl Drop for Distccd {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.0.wait();
    }
}

fn build(build: &CxxBuild, cxx: &str, env: &[(&str, &Path)]) -> Result<BTreeMap<String, String>> {
    build.configure()?;
    let mut cmd = build.build_command(2, cxx);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cxx} build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{cxx}: built in {:?}", started.elapsed());
    build.objects()
}

#[test]
#[ignore = "about 6 minutes on 2 cores: cargo test -p distcc-testbed --test cxx_project -- --ignored"]
fn local_and_distcc_builds_give_identical_objects() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cxx = CxxBuild::new(cxx_source()?, dir.path().join("build"));

    let local = build(&cxx, "g++", &[])?;
    assert!(local.len() >= CXX_OBJECTS, "{} objects", local.len());
    let again = build(&cxx, "g++", &[])?;
    assert_eq!(local, again, "two local builds differ");

    // distccd drops to `nobody`: its log lives in a directory anyone may write.
    let logs = dir.path().join("distccd");
    std::fs::create_dir(&logs)?;
    std::fs::set_permissions(&logs, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let log = logs.join("distccd.log");
    let daemon = Distccd(
        Command::new("distccd")
            .args([
                "--no-detach",
                "--daemon",
                "--allow",
                "127.0.0.1",
                "--listen",
                "127.0.0.1",
            ])
            .args([
                "--port",
                &PORT.to_string(),
                "--user",
                "nobody",
                "--log-level",
                "info",
            ])
            .arg("--log-file")
            .arg(&log)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting distccd")?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let hosts = format!("127.0.0.1:{PORT}/2");
    let distcc_dir = dir.path().join("distcc-dir");
    std::fs::create_dir(&distcc_dir)?;
    let mut cmd_env: Vec<(&str, &Path)> = vec![("DISTCC_DIR", &distcc_dir)];
    // No fallback: a compile distccd refused must fail the build, not run locally.
    cmd_env.push(("DISTCC_HOSTS", Path::new(&hosts)));
    cmd_env.push(("DISTCC_FALLBACK", Path::new("0")));
    let distributed = build(&cxx, "distcc g++", &cmd_env)?;
    drop(daemon);

    let compiles = std::fs::read_to_string(&log)?.matches("COMPILE_OK").count();
    eprintln!("distccd: {compiles} compiles");
    assert!(
        compiles >= CXX_OBJECTS,
        "distccd compiled only {compiles} of {} objects",
        local.len()
    );
    let differing: Vec<&String> = local
        .iter()
        .filter(|(path, sum)| distributed.get(*path) != Some(*sum))
        .map(|(path, _)| path)
        .collect();
    assert!(
        differing.is_empty() && local.len() == distributed.len(),
        "objects differ between the g++ and the distcc g++ build: {differing:?}"
    );
    Ok(())
}
