//! Builder mode: the preflight checklist and the environment of a session.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cluster::Probe;
use crate::host_list::{HostList, LocalCompiler, compiler_mismatches};
use crate::local;
use crate::workspace::{self, Mountable};

/// Set inside a session; `enter` refuses to run when it is set (entering twice would nest
/// shells and steering processes).
pub const SESSION_VAR: &str = "BUILDERCTL_SESSION";

/// One line of the preflight checklist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreflightCheck {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
    /// What to do about a failure; empty when passed.
    pub fix: String,
}

impl PreflightCheck {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            passed: true,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    /// Passed, but worth a fix (shown as `[warn]`).
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            passed: true,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            passed: false,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

/// What the preflight found on the builder itself (gathered by the caller).
#[derive(Debug, Clone)]
pub struct LocalFacts {
    pub distcc: Option<PathBuf>,
    pub masquerade_dir: Option<PathBuf>,
    pub missing_links: Vec<String>,
    pub compilers: Result<Vec<LocalCompiler>, String>,
    pub workspace: PathBuf,
    pub workspace_check: Result<Mountable, String>,
}

impl LocalFacts {
    /// Look at this machine.
    pub fn gather(
        compilers: &[String],
        masquerade_dir: Option<&Path>,
        workspace_path: &Path,
    ) -> Self {
        let dir = local::masquerade_dir(masquerade_dir);
        Self {
            distcc: local::which("distcc"),
            missing_links: dir
                .as_deref()
                .map(|d| local::missing_links(d, compilers))
                .unwrap_or_default(),
            masquerade_dir: dir,
            compilers: compilers
                .iter()
                .map(|name| local::describe(name).map_err(|e| e.to_string()))
                .collect(),
            workspace: workspace_path.to_owned(),
            workspace_check: workspace::check(workspace_path).map_err(|e| e.to_string()),
        }
    }
}

/// The checklist (pure): the builder's toolchain and workspace, the workers' compilers,
/// and whether any worker is ready.
pub fn preflight(
    facts: &LocalFacts,
    probes: &[Probe],
    list: &HostList,
    allow_mismatch: bool,
) -> Vec<PreflightCheck> {
    let mut checks = Vec::new();
    checks.push(match &facts.distcc {
        Some(path) => PreflightCheck::pass("distcc installed", path.display().to_string()),
        None => PreflightCheck::fail(
            "distcc installed",
            "no `distcc` on PATH",
            "apt-get install distcc",
        ),
    });
    checks.push(
        match (&facts.masquerade_dir, facts.missing_links.is_empty()) {
            (Some(dir), true) => {
                PreflightCheck::pass("masquerade links", dir.display().to_string())
            }
            (Some(dir), false) => PreflightCheck::fail(
                "masquerade links",
                format!(
                    "{} has no link for {}",
                    dir.display(),
                    facts.missing_links.join(", ")
                ),
                "run update-distcc-symlinks (Debian) or link them to ../../bin/distcc",
            ),
            (None, _) => PreflightCheck::fail(
                "masquerade links",
                format!(
                    "none of {} holds a gcc link",
                    local::MASQUERADE_CANDIDATES.join(", ")
                ),
                "install distcc, run update-distcc-symlinks, or set masquerade_dir in builder.toml",
            ),
        },
    );
    checks.push(match &facts.compilers {
        Ok(compilers) => PreflightCheck::pass(
            "local compilers",
            compilers
                .iter()
                .map(|c| format!("{}: {}", c.name, c.version))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Err(e) => PreflightCheck::fail(
            "local compilers",
            e.clone(),
            "install the configured compilers, or change `compilers` in builder.toml",
        ),
    });
    let local = facts.compilers.as_deref().unwrap_or(&[]);
    let mismatched: Vec<String> = probes
        .iter()
        .filter_map(|p| {
            let snapshot = p.status.as_ref().ok()?;
            let problems: Vec<String> = compiler_mismatches(snapshot, local)
                .iter()
                .map(ToString::to_string)
                .collect();
            (!problems.is_empty()).then(|| format!("{}: {}", p.endpoint, problems.join("; ")))
        })
        .collect();
    checks.push(if mismatched.is_empty() {
        PreflightCheck::pass(
            "compilers match workers",
            "every reachable worker has the same compilers",
        )
    } else if allow_mismatch {
        PreflightCheck::pass(
            "compilers match workers",
            format!("mismatches allowed: {}", mismatched.join(" | ")),
        )
    } else {
        // Those workers are left out; it fails only when none is left (the next check).
        PreflightCheck {
            name: "compilers match workers",
            passed: true,
            detail: format!("left out: {}", mismatched.join(" | ")),
            fix: "install the builder's compiler on those workers, or pass --allow-mismatch"
                .to_owned(),
        }
    });
    checks.push(match &facts.workspace_check {
        Ok(Mountable::AlreadyMounted) => PreflightCheck::pass(
            "tmpfs workspace",
            format!("{} is mounted; shared", facts.workspace.display()),
        ),
        Ok(Mountable::WillMount) => PreflightCheck::pass(
            "tmpfs workspace",
            format!("{} will be mounted", facts.workspace.display()),
        ),
        Err(e) => PreflightCheck::fail(
            "tmpfs workspace",
            e.clone(),
            "empty the directory or set `workspace` in builder.toml to an empty one; run as root",
        ),
    });
    let ready: Vec<&str> = list
        .workers
        .iter()
        .filter(|w| w.entry().is_some())
        .map(|w| w.endpoint.as_str())
        .collect();
    checks.push(if ready.is_empty() {
        PreflightCheck::fail(
            "workers ready",
            format!(
                "none of {} workers is usable: {}",
                list.workers.len(),
                list.workers
                    .iter()
                    .filter_map(|w| Some(format!("{}: {}", w.endpoint, w.exclusion()?)))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
            "builderctl status shows why; builderctl reset / bootstrap restart distccd",
        )
    } else {
        PreflightCheck::pass(
            "workers ready",
            format!(
                "{} of {} ({} slots)",
                ready.len(),
                list.workers.len(),
                list.remote_slots()
            ),
        )
    });
    checks
}

/// How this session reaches the builder daemon, as found by the caller (see
/// [`daemon_checks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonReach {
    /// Connected and authorised; the daemon says whether it can abort connections.
    Reached {
        socket: PathBuf,
        failover: crate::session_socket::Failover,
    },
    /// Nothing answers at the socket (no daemon, socket unit not enabled).
    Unreachable { socket: PathBuf, why: String },
    /// Refused: not a member of the build group (by the daemon, or by the socket's
    /// mode). `listed`: the group database lists the user (added, but this login
    /// predates it).
    NotInGroup {
        user: String,
        group: String,
        listed: bool,
    },
    /// The daemon answered but failed (its message).
    Failed { socket: PathBuf, why: String },
}

/// Who runs the session: root steers and cuts by itself when no daemon is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// Root, with whether it has CAP_NET_ADMIN (what `ss -K` needs).
    Root {
        net_admin: bool,
    },
    User,
}

/// The `builder daemon` and `failover` lines of the checklist (pure).
pub fn daemon_checks(reach: &DaemonReach, runner: Runner) -> Vec<PreflightCheck> {
    use crate::session_socket::Failover;
    const DAEMON: &str = "builder daemon";
    const FAILOVER: &str = "failover";
    let own_failover = |net_admin: bool| {
        if net_admin {
            PreflightCheck::pass(
                FAILOVER,
                "armed (this root session aborts connections to a lost worker itself)",
            )
        } else {
            // As before: the build works, a lost worker costs distcc's time-out.
            PreflightCheck::warn(
                FAILOVER,
                "NOT armed: this session lacks CAP_NET_ADMIN to abort connections",
                "run as root with CAP_NET_ADMIN, or enable the builder daemon: systemctl enable --now distcc-builder.socket",
            )
        }
    };
    match (reach, runner) {
        (DaemonReach::Reached { socket, failover }, _) => vec![
            PreflightCheck::pass(
                DAEMON,
                format!("{} (steering shared by this machine)", socket.display()),
            ),
            match failover {
                Failover::Armed => PreflightCheck::pass(
                    FAILOVER,
                    "armed (the builder daemon aborts connections to a lost worker)",
                ),
                // The build works; a lost worker costs distcc's time-out. Said, not fatal.
                Failover::NotArmed(why) => PreflightCheck::warn(
                    FAILOVER,
                    format!("NOT armed: {why}"),
                    "give distcc-builder.service AmbientCapabilities=CAP_NET_ADMIN (as packaged) and restart it",
                ),
            },
        ],
        (DaemonReach::Unreachable { socket, why }, Runner::Root { net_admin }) => vec![
            PreflightCheck::pass(
                DAEMON,
                format!(
                    "not reachable at {} ({why}); this root session steers by itself",
                    socket.display()
                ),
            ),
            own_failover(net_admin),
        ],
        (DaemonReach::Unreachable { socket, why }, Runner::User) => vec![
            PreflightCheck::fail(
                DAEMON,
                format!(
                    "builder daemon not reachable at {} ({why})",
                    socket.display()
                ),
                "systemctl enable --now distcc-builder.socket (as root)",
            ),
            PreflightCheck::fail(
                FAILOVER,
                "not armed: no builder daemon",
                "systemctl enable --now distcc-builder.socket (as root)",
            ),
        ],
        (
            DaemonReach::NotInGroup {
                user,
                group,
                listed,
            },
            _,
        ) => vec![
            PreflightCheck::fail(
                DAEMON,
                if *listed {
                    format!("you ({user}) were added to the {group} group after this login")
                } else {
                    format!("you are not in the {group} group")
                },
                if *listed {
                    "log in again (or run `newgrp distcc-build`)".replace("distcc-build", group)
                } else {
                    format!("adduser {user} {group} (as root), then log in again")
                },
            ),
            PreflightCheck::fail(
                FAILOVER,
                "not armed: the builder daemon refuses this user",
                format!("adduser {user} {group} (as root), then log in again"),
            ),
        ],
        (DaemonReach::Failed { socket, why }, _) => vec![
            PreflightCheck::fail(
                DAEMON,
                format!("{}: {why}", socket.display()),
                "journalctl -u distcc-builder.service shows why",
            ),
            PreflightCheck::fail(FAILOVER, "not armed: the builder daemon failed", ""),
        ],
    }
}

/// The checklist as a person reads it.
pub fn render_checklist(checks: &[PreflightCheck]) -> String {
    let mut text = String::new();
    for c in checks {
        text.push_str(&format!(
            "[{}] {:<24} {}\n",
            match (c.passed, c.fix.is_empty()) {
                (true, true) => " ok ",
                (true, false) => "warn",
                (false, _) => "FAIL",
            },
            c.name,
            c.detail
        ));
        if !c.fix.is_empty() {
            text.push_str(&format!("       {:<24} fix: {}\n", "", c.fix));
        }
    }
    text
}

/// The environment of a session.
pub fn session_env(
    masquerade_dir: &Path,
    distcc_dir: &Path,
    list: &HostList,
    inherited_path: &str,
) -> Vec<(String, String)> {
    // First, once: `eval $(builderctl env)` run twice must not grow PATH.
    let masquerade = masquerade_dir.display().to_string();
    let path = std::iter::once(masquerade.as_str())
        .chain(
            inherited_path
                .split(':')
                .filter(|dir| !dir.is_empty() && *dir != masquerade),
        )
        .collect::<Vec<_>>()
        .join(":");
    vec![
        ("PATH".to_owned(), path),
        ("CC".to_owned(), "distcc gcc".to_owned()),
        ("CXX".to_owned(), "distcc g++".to_owned()),
        ("DISTCC_DIR".to_owned(), distcc_dir.display().to_string()),
        ("DISTCC_SLOTS".to_owned(), list.total_slots().to_string()),
        (SESSION_VAR.to_owned(), distcc_dir.display().to_string()),
    ]
}

/// A session's DISTCC_DIR when the daemon steers: `hosts` links to the daemon's hosts
/// file (distcc re-reads it on every compile, so the link follows every rewrite).
pub fn link_daemon_hosts(distcc_dir: &Path, hosts_file: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(hosts_file, distcc_dir.join("hosts"))
}

/// `export NAME='value'` lines for `eval`.
pub fn export_lines(env: &[(String, String)]) -> String {
    env.iter()
        .map(|(name, value)| format!("export {name}={}\n", shell_quote(value)))
        .collect()
}

/// POSIX shell single-quoting.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::exclusion::Exclusion;
    use crate::host_list::Verdict;
    use crate::host_list::{HostEntry, WorkerVerdict};

    fn list(included: bool) -> HostList {
        HostList {
            workers: vec![WorkerVerdict {
                endpoint: "198.18.0.11:3634".into(),
                verdict: if included {
                    Verdict::Included {
                        entry: HostEntry {
                            host: "198.18.0.11".into(),
                            port: 3632,
                            slots: 3,
                            lzo: true,
                        },
                        warnings: Vec::new(),
                    }
                } else {
                    Verdict::Excluded(Exclusion::Inactive {
                        active_state: "failed".into(),
                        sub_state: "failed".into(),
                    })
                },
            }],
            local_slots: 2,
        }
    }

    fn facts() -> LocalFacts {
        LocalFacts {
            distcc: Some("/usr/bin/distcc".into()),
            masquerade_dir: Some("/usr/lib/distcc".into()),
            missing_links: Vec::new(),
            compilers: Ok(Vec::new()),
            workspace: "/tmp/kernel-build".into(),
            workspace_check: Ok(Mountable::WillMount),
        }
    }

    #[test]
    fn daemon_lines_say_what_is_missing_and_how_to_fix_it() {
        use crate::session_socket::Failover;
        let socket = PathBuf::from("/run/distcc-builder/session.sock");
        let names = |checks: &[PreflightCheck]| -> Vec<(&str, bool)> {
            checks.iter().map(|c| (c.name, c.passed)).collect()
        };
        let reached = daemon_checks(
            &DaemonReach::Reached {
                socket: socket.clone(),
                failover: Failover::Armed,
            },
            Runner::User,
        );
        assert_eq!(
            names(&reached),
            [("builder daemon", true), ("failover", true)]
        );
        let away = daemon_checks(
            &DaemonReach::Unreachable {
                socket: socket.clone(),
                why: "No such file or directory".into(),
            },
            Runner::User,
        );
        assert_eq!(
            names(&away),
            [("builder daemon", false), ("failover", false)]
        );
        assert_eq!(
            away[0].detail,
            "builder daemon not reachable at /run/distcc-builder/session.sock (No such file or directory)"
        );
        assert!(
            away[0]
                .fix
                .contains("systemctl enable --now distcc-builder.socket")
        );
        // Root without a daemon steers and cuts by itself, as before.
        let root = daemon_checks(
            &DaemonReach::Unreachable {
                socket: socket.clone(),
                why: "refused".into(),
            },
            Runner::Root { net_admin: true },
        );
        assert_eq!(names(&root), [("builder daemon", true), ("failover", true)]);
        let outsider = daemon_checks(
            &DaemonReach::NotInGroup {
                user: "bob".into(),
                group: "distcc-build".into(),
                listed: false,
            },
            Runner::User,
        );
        assert_eq!(outsider[0].detail, "you are not in the distcc-build group");
        assert_eq!(
            outsider[0].fix,
            "adduser bob distcc-build (as root), then log in again"
        );
        let added = daemon_checks(
            &DaemonReach::NotInGroup {
                user: "bob".into(),
                group: "distcc-build".into(),
                listed: true,
            },
            Runner::User,
        );
        assert!(added[0].fix.starts_with("log in again"), "{}", added[0].fix);
        let unarmed = daemon_checks(
            &DaemonReach::Reached {
                socket,
                failover: Failover::NotArmed("no CAP_NET_ADMIN".into()),
            },
            Runner::User,
        );
        assert_eq!(unarmed[1].detail, "NOT armed: no CAP_NET_ADMIN");
        assert!(unarmed[1].passed, "said, but the build may go on");
        assert!(render_checklist(&unarmed).contains("[warn] failover"));
    }

    #[test]
    fn env_puts_the_masquerade_dir_first_and_counts_slots() {
        let env = session_env(
            Path::new("/usr/lib/distcc"),
            Path::new("/run/s"),
            &list(true),
            "/usr/bin:/bin",
        );
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert_eq!(get("PATH"), "/usr/lib/distcc:/usr/bin:/bin");
        let again = session_env(
            Path::new("/usr/lib/distcc"),
            Path::new("/run/s"),
            &list(true),
            get("PATH"),
        );
        assert_eq!(again[0].1, "/usr/lib/distcc:/usr/bin:/bin");
        assert_eq!(get("CC"), "distcc gcc");
        assert_eq!(get("DISTCC_SLOTS"), "5");
        let text = export_lines(&env);
        assert!(text.contains("export CXX='distcc g++'\n"), "{text}");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn checklist_fails_with_a_fix_when_no_worker_is_ready() {
        let checks = preflight(&facts(), &[], &list(false), false);
        let failed: Vec<&PreflightCheck> = checks.iter().filter(|c| !c.passed).collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].name, "workers ready");
        assert!(failed[0].detail.contains("distccd is failed"));
        assert!(render_checklist(&checks).contains("fix: builderctl status"));
        let mut no_distcc = facts();
        no_distcc.distcc = None;
        no_distcc.workspace_check = Err("not empty".into());
        let checks = preflight(&no_distcc, &[], &list(true), false);
        let failed: Vec<&str> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect();
        assert_eq!(failed, ["distcc installed", "tmpfs workspace"]);
    }
}
