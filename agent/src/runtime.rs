//! What distccd actually runs: its command line, read from `/proc/MAINPID/cmdline`, and
//! how it differs from the persisted settings. They can differ after an agent killed in
//! the middle of a Configure (settings written, restart never issued), or when someone
//! started distccd by hand or changed its unit. The agent reports the difference; it does
//! not restart distccd to fix it (restarting the agent must never drop compiles).

use std::collections::{BTreeMap, BTreeSet};

/// The options the agent manages that take a value (see `DistccdSettings::to_args`).
const VALUED: [&str; 7] = [
    "--allow",
    "--jobs",
    "--nice",
    "--listen",
    "--port",
    "--stats-port",
    "--job-lifetime",
];
/// The managed options that are flags.
const FLAGS: [&str; 1] = ["--stats"];
/// The one managed option that may repeat (popt keeps the last of the others).
const REPEATED: &str = "--allow";

/// distccd's command line as the kernel has it (NUL-separated arguments).
pub fn read_cmdline(pid: u32) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    if raw.is_empty() {
        // A zombie or a kernel thread: no command line to compare.
        return Err(std::io::Error::other(format!(
            "pid {pid} has no command line"
        )));
    }
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// The managed options of a command line: each to its values (flags to none; options
/// other than `--allow` to their last value). Unmanaged options are ignored.
fn managed_options(args: &[String]) -> BTreeMap<&str, Vec<String>> {
    let mut options: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        if let Some(name) = VALUED.iter().find(|v| **v == name) {
            let Some(value) = inline.or_else(|| args.next().cloned()) else {
                continue;
            };
            let values = options.entry(name).or_default();
            if *name != REPEATED {
                values.clear();
            }
            values.push(value);
        } else if let Some(name) = FLAGS.iter().find(|f| **f == name) {
            options.entry(name).or_default();
        }
    }
    options
}

/// Every difference between the managed options of distccd's command line (`running`)
/// and those the persisted settings render to (`persisted`), one line each; empty when
/// distccd runs the persisted settings.
pub fn drift(running: &[String], persisted: &[String]) -> Vec<String> {
    let running = managed_options(running);
    let persisted = managed_options(persisted);
    let names: BTreeSet<&str> = running.keys().chain(persisted.keys()).copied().collect();
    let mut out = Vec::new();
    for name in names {
        let (now, want) = (running.get(name), persisted.get(name));
        if name == REPEATED {
            let now: BTreeSet<&String> = now.into_iter().flatten().collect();
            let want: BTreeSet<&String> = want.into_iter().flatten().collect();
            for extra in now.difference(&want) {
                out.push(format!("{name} {extra}: distccd runs it, not persisted"));
            }
            for missing in want.difference(&now) {
                out.push(format!(
                    "{name} {missing}: persisted, distccd does not run it"
                ));
            }
            continue;
        }
        let show = |v: Option<&Vec<String>>| match v {
            None => "none".to_owned(),
            Some(values) if values.is_empty() => "set".to_owned(),
            Some(values) => values.join(" "),
        };
        if now != want {
            out.push(format!(
                "{name}: distccd runs {}, persisted {}",
                show(now),
                show(want)
            ));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_same_settings_have_no_drift() {
        let persisted = args(
            "--allow 198.18.0.0/24 --allow 127.0.0.1/32 --jobs 3 --nice 10 --listen 0.0.0.0 --port 3632 --stats --stats-port 3633",
        );
        let running = [
            args("/usr/bin/distccd --no-detach --daemon --log-stderr"),
            // order of the allowlist and the `=` form do not matter
            args("--allow 127.0.0.1/32 --allow=198.18.0.0/24 --jobs=3 --nice 10 --listen 0.0.0.0 --port 3632 --stats --stats-port 3633"),
        ]
        .concat();
        assert_eq!(drift(&running, &persisted), Vec::<String>::new());
    }

    #[test]
    fn each_difference_is_named() {
        let persisted =
            args("--allow 198.18.0.0/24 --jobs 5 --nice 10 --port 3632 --stats --stats-port 3633");
        let running = args(
            "distccd --allow 198.18.0.0/16 --jobs 3 --nice 10 --port 3632 --stats-port 3633 --jobs 9",
        );
        assert_eq!(
            drift(&running, &persisted),
            vec![
                "--allow 198.18.0.0/16: distccd runs it, not persisted",
                "--allow 198.18.0.0/24: persisted, distccd does not run it",
                "--jobs: distccd runs 9, persisted 5",
                "--stats: distccd runs none, persisted set",
            ]
        );
    }

    #[test]
    fn reads_a_real_command_line() {
        let argv = read_cmdline(std::process::id()).unwrap();
        assert!(!argv.is_empty());
        assert!(read_cmdline(u32::MAX).is_err());
    }
}
