//! Running host programs (`ip`, `nsenter`, `debootstrap`, ...) with a time bound and
//! captured output, so a wedged command fails the test instead of hanging it.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long we keep reading a pipe after the process exited. A daemon started by the
/// command (`distccd --daemon`, `cmd &`) can inherit stdout and keep it open forever;
/// we must not wait for its EOF.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// `prog arg arg` for error messages and logs.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            let _ = write!(s, " '{}'", arg.replace('\'', r"'\''"));
        } else {
            let _ = write!(s, " {arg}");
        }
    }
    s
}

/// Reads one pipe on a thread into a shared buffer, so whatever arrived is available even
/// if the pipe never reaches EOF.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let thread = pipe.map(|mut pipe| {
            let buf = Arc::clone(&buf);
            thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => lock(&buf).extend_from_slice(&chunk[..n]),
                    }
                }
            })
        });
        Self { buf, thread }
    }

    /// What was read; waits for EOF until `deadline` at most (the thread is left behind
    /// if a background process still holds the pipe; it ends when that process does).
    fn finish(mut self, deadline: Instant) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                let mut out = lock(&self.buf).clone();
                out.extend_from_slice(b"\n[distcc-testbed: stopped reading; a background process still holds this pipe]\n");
                return out;
            }
        }
        lock(&self.buf).clone()
    }
}

/// Locks a mutex even if a panicking test thread poisoned it: the data (output bytes,
/// worker state) stays meaningful, and cleanup must still run during unwinding.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits for `child` until `deadline`, polling (std has no timed wait). Returns `None`
/// on timeout.
pub(crate) fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().context("waitpid failed")? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(25));
    }
}

/// Runs `cmd` to completion (or kills it after `timeout`), feeding it `stdin` and capturing
/// stdout and stderr. A non-zero exit is NOT an error here; see [`check`].
pub(crate) fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            // A thread, because a large input could fill the pipe while the child waits
            // for us to drain its stdout.
            Some(thread::spawn(move || pipe.write_all(&data)))
        }
        _ => None,
    };
    let out = Collector::start(child.stdout.take());
    let err = Collector::start(child.stderr.take());
    let status = wait_until(&mut child, Instant::now() + timeout)
        .with_context(|| format!("waiting for `{what}`"))?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let grace = Instant::now() + PIPE_GRACE;
        bail!(
            "`{what}` did not finish within {timeout:?} and was killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.finish(grace)),
            String::from_utf8_lossy(&err.finish(grace)),
        );
    };
    let grace = Instant::now() + PIPE_GRACE;
    let output = Output {
        status,
        stdout: out.finish(grace),
        stderr: err.finish(grace),
    };
    if let Some(w) = writer {
        match w.join() {
            // EPIPE: the program exited without reading all of stdin; its exit status
            // tells the caller what happened.
            Ok(Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(e).with_context(|| format!("writing stdin of `{what}`"));
            }
            _ => {}
        }
    }
    Ok(output)
}

/// Turns a finished command into its stdout, or an error carrying the exit status,
/// stdout and stderr (the three things one needs to see when a step fails).
pub(crate) fn check(what: &str, out: &Output) -> Result<String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    bail!(
        "`{what}` failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end(),
    )
}

/// [`run`] + [`check`].
pub(crate) fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let out = run(cmd, None, timeout)?;
    check(&describe(cmd), &out)
}

/// Runs a long command (debootstrap, apt-get) with stdout+stderr appended to `log`, so it
/// can be followed with `tail -f` while it runs. On failure the error carries the log's tail.
pub(crate) fn run_logged(cmd: &mut Command, log: &Path, timeout: Duration) -> Result<()> {
    let what = describe(cmd);
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open build log {}", log.display()))?;
    writeln!(file, "\n+ {what}").with_context(|| format!("writing {}", log.display()))?;
    let stderr = file.try_clone().context("dup of the build log fd")?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let status = match wait_until(&mut child, Instant::now() + timeout)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{what}` did not finish within {timeout:?}\n{}",
                tail(log, 30)
            );
        }
    };
    if !status.success() {
        bail!(
            "`{what}` failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail(log, 30)
        );
    }
    Ok(())
}

/// The last `lines` lines of a text file, for error messages; never fails.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_when_needed() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'x'", ""]);
        assert_eq!(describe(&c), r#"sh -c 'echo '\''x'\''' ''"#);
    }

    #[test]
    fn run_captures_output_status_and_stdin() -> Result<()> {
        let out = run(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            Some(b"hello"),
            Duration::from_secs(10),
        )?;
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
        let e = check("x", &out).expect_err("exit 3 must be an error");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("exit status: 3") && msg.contains("hello") && msg.contains("err"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn run_kills_on_timeout() {
        let start = Instant::now();
        let e = run(
            Command::new("sleep").arg("30"),
            None,
            Duration::from_millis(200),
        )
        .expect_err("must time out");
        assert!(format!("{e:#}").contains("did not finish"), "{e:#}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn run_does_not_wait_for_a_background_process_holding_stdout() -> Result<()> {
        let start = Instant::now();
        let out = run(
            Command::new("sh").args(["-c", "sleep 5 & echo started"]),
            None,
            Duration::from_secs(10),
        )?;
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("started"));
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
        Ok(())
    }
}
