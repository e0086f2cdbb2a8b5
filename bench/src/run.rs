//! Timing commands, statistics, and the builderctl configuration the cases share.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use distcc_testbed::TEST_TOKEN;

/// Runs `cmd` to completion, killing it after `limit`; returns its wall time and output.
pub fn timed(cmd: &mut Command, limit: Duration) -> Result<(Duration, Output)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let pid = child.id().to_string();
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    });
    let output = child.wait_with_output();
    let elapsed = started.elapsed();
    let _ = done.send(());
    let _ = watchdog.join();
    let output = output.context("waiting for a benchmarked command")?;
    anyhow::ensure!(
        elapsed < limit,
        "{cmd:?} did not finish within {limit:?} (killed)"
    );
    Ok((elapsed, output))
}

/// The machine's busy CPU time so far, from the first line of /proc/stat (every core,
/// idle and iowait left out).
pub struct CpuClock {
    busy_ticks: u64,
}

impl CpuClock {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().unwrap_or_default();
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("/proc/stat: {line:?}"))?;
        ensure!(fields.len() >= 5, "/proc/stat: {line:?}");
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let busy: u64 = fields.iter().take(8).sum::<u64>() - fields[3] - fields[4];
        Ok(Self { busy_ticks: busy })
    }

    /// CPU seconds spent since `self` was taken.
    pub fn secs_since(&self) -> Result<f64> {
        let ticks = Self::now()?.busy_ticks.saturating_sub(self.busy_ticks);
        Ok(ticks as f64 / clock_ticks() as f64)
    }
}

/// Ticks per second of /proc's CPU times (`CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|hz| u64::try_from(hz).ok())
        .unwrap_or(100)
}

/// CPU time (user + system) of this process's children that have been waited for; the
/// difference across one `timed` call is that command's own CPU time.
pub fn children_cpu() -> Result<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage")?;
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    Ok(micros(usage.user_time()) + micros(usage.system_time()))
}

/// stdout and stderr, for error messages.
pub fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Median of the values (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A builderctl configuration in its own directory: token, builder.toml, a workspace
/// path (unmounted on drop).
pub struct BuilderConfig {
    pub dir: PathBuf,
    pub workspace: PathBuf,
    builderctl: PathBuf,
}

/// The per-worker RPC deadline the benchmarks configure (the README's default).
pub const DEADLINE_MS: u64 = 1000;

impl BuilderConfig {
    pub fn new(parent: &Path, name: &str, builderctl: &Path, endpoints: &[String]) -> Result<Self> {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir)?;
        distcc_testbed::write_secret(&dir.join("token"), &format!("{TEST_TOKEN}\n"))?;
        let workspace = dir.join("ws");
        let workers: Vec<String> = endpoints.iter().map(|w| format!("{w:?}")).collect();
        std::fs::write(
            dir.join("builder.toml"),
            format!(
                "workers = [{}]\ntoken_file = \"{}\"\nworkspace = \"{}\"\ntmpfs_size = \"64M\"\n\
                 deadline_ms = {DEADLINE_MS}\noperation_deadline_ms = 30000\n\
                 known_workers = \"{}\"\n",
                workers.join(", "),
                dir.join("token").display(),
                workspace.display(),
                dir.join("known_workers").display(),
            ),
        )?;
        let config = BuilderConfig {
            dir,
            workspace,
            builderctl: builderctl.to_owned(),
        };
        // The agents serve TLS with their own certificates: pin them, as an operator does.
        if !endpoints.is_empty() {
            let (_, out) = config.timed(&["trust", "--yes"])?;
            anyhow::ensure!(
                out.status.success(),
                "builderctl trust --yes: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(config)
    }

    /// Adds `line` to builder.toml.
    pub fn append(&self, line: &str) -> Result<()> {
        use std::io::Write as _;
        let path = self.dir.join("builder.toml");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.write_all(line.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.builderctl);
        command
            .arg("--config")
            .arg(self.dir.join("builder.toml"))
            .args(args)
            .env_remove("BUILDERCTL_SESSION")
            .env_remove("DISTCC_HOSTS")
            .env_remove("DISTCC_DIR");
        command
    }

    /// Runs builderctl ARGS, timed, bounded by 60 s.
    pub fn timed(&self, args: &[&str]) -> Result<(Duration, Output)> {
        timed(&mut self.command(args), Duration::from_secs(60))
    }
}

impl Drop for BuilderConfig {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.workspace)
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&sorted, 100.0), 100.0);
    }
}
