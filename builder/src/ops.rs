//! Cluster operations: validate, smoketest, reset, bootstrap. Each runs on all workers in
//! parallel (or one at a time with `rolling`), each worker bounded by a deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use distcc_proto::v1 as pb;
use serde::Serialize;
use thiserror::Error;

use crate::cluster::{Probe, call_within, fetch_status, status_text};
use crate::config::AgentAccess;
use crate::host_list::{HostList, LocalCompiler, admits, compiler_mismatches, endpoint_host};
use crate::snapshot::WorkerSnapshot;
use crate::untrusted::printable;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("{0:?} is not a configured worker (give its endpoint or host)")]
    Unknown(String),
}

/// The configured workers named by `names` (endpoint or host part), in configuration
/// order; all of them when `names` is empty.
pub fn select_workers(all: &[String], names: &[String]) -> Result<Vec<String>, SelectError> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    for name in names {
        if !all.iter().any(|e| e == name || endpoint_host(e) == name) {
            return Err(SelectError::Unknown(name.clone()));
        }
    }
    Ok(all
        .iter()
        .filter(|e| names.iter().any(|n| *e == n || endpoint_host(e) == n))
        .cloned()
        .collect())
}

/// One named check, the agent's or the builder's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub reason: String,
    /// How to fix it; empty when passed.
    pub hint: String,
}

impl CheckResult {
    fn new(name: &str, passed: bool, reason: impl Into<String>, hint: &str) -> Self {
        Self {
            name: name.to_owned(),
            passed,
            reason: reason.into(),
            hint: if passed {
                String::new()
            } else {
                hint.to_owned()
            },
        }
    }
}

/// The checks of one worker.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerChecks {
    pub endpoint: String,
    pub passed: bool,
    pub checks: Vec<CheckResult>,
}

/// The builder's own checks of one worker, from a probe (pure).
pub fn builder_checks(
    probe: &Probe,
    local: &[LocalCompiler],
    distcc_port_open: Option<Result<(), String>>,
) -> Vec<CheckResult> {
    let mut checks = Vec::new();
    let snapshot = match &probe.status {
        Ok(snapshot) => snapshot,
        Err(why) => {
            checks.push(CheckResult::new(
                "agent-reachable",
                false,
                why.clone(),
                "check the worker is up, the agent running (systemctl status distcc-agent) and the token",
            ));
            return checks;
        }
    };
    checks.push(CheckResult::new(
        "agent-reachable",
        true,
        format!("answered in {:.1} ms", probe.latency.as_secs_f64() * 1000.0),
        "",
    ));
    if let Some(open) = distcc_port_open {
        let port = snapshot.distccd_port_to_try();
        checks.push(match open {
            Ok(()) => CheckResult::new("distcc-port-reachable", true, format!("port {port} accepts connections"), ""),
            Err(e) => CheckResult::new(
                "distcc-port-reachable",
                false,
                format!("port {port}: {e}"),
                "start distccd (builderctl reset WORKER) and check firewalls between builder and worker",
            ),
        });
    }
    let allow = snapshot.allow();
    checks.push(match probe.builder_addr {
        None => CheckResult::new(
            "allowlist-admits-builder",
            false,
            "no route to the worker",
            "check the builder's routes",
        ),
        Some(addr) if admits(allow, addr) => CheckResult::new(
            "allowlist-admits-builder",
            true,
            format!("{addr} is inside [{}]", allow.join(", ")),
            "",
        ),
        Some(addr) => CheckResult::new(
            "allowlist-admits-builder",
            false,
            format!("{addr} is outside [{}]", allow.join(", ")),
            "add the builder's network to [distccd] allow in the worker's agent.toml",
        ),
    });
    let mismatches: Vec<String> = compiler_mismatches(snapshot, local)
        .iter()
        .map(ToString::to_string)
        .collect();
    checks.push(if mismatches.is_empty() {
        CheckResult::new(
            "compilers-match",
            true,
            local
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
                + " identical",
            "",
        )
    } else {
        CheckResult::new(
            "compilers-match",
            false,
            mismatches.join("; "),
            "install the builder's compiler version on the worker (or the worker's on the builder)",
        )
    });
    checks
}

/// Whether a TCP connection to `host:port` opens within `deadline`.
pub async fn tcp_open(host: &str, port: u16, deadline: Duration) -> Result<(), String> {
    match tokio::time::timeout(deadline, tokio::net::TcpStream::connect((host, port))).await {
        Err(_) => Err(format!("no answer within {deadline:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// The agent's checks plus the builder's, for one worker.
pub async fn validate_one(
    probe: &Probe,
    access: &AgentAccess,
    local: &[LocalCompiler],
    deadline: Duration,
    operation_deadline: Duration,
) -> WorkerChecks {
    let mut checks = Vec::new();
    if let Ok(snapshot) = &probe.status {
        let agent = call_within(
            &probe.endpoint,
            access,
            deadline,
            operation_deadline,
            |mut client| async move {
                client
                    .validate(pb::ValidateRequest {})
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| status_text(&s))
            },
        )
        .await;
        match agent {
            Ok(response) => checks.extend(response.checks.into_iter().map(|c| CheckResult {
                name: printable(&c.name).into_owned(),
                passed: c.passed,
                reason: printable(&c.reason).into_owned(),
                hint: printable(&c.hint).into_owned(),
            })),
            Err(e) => checks.push(CheckResult::new(
                "agent-validate",
                false,
                e,
                "see the agent's journal",
            )),
        }
        let open = tcp_open(
            endpoint_host(&probe.endpoint),
            snapshot.distccd_port_to_try(),
            deadline,
        )
        .await;
        checks.extend(builder_checks(probe, local, Some(open)));
    } else {
        checks.extend(builder_checks(probe, local, None));
    }
    WorkerChecks {
        endpoint: probe.endpoint.clone(),
        passed: checks.iter().all(|c| c.passed),
        checks,
    }
}

/// What a smoketest found on one worker.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeResult {
    pub endpoint: String,
    pub passed: bool,
    /// What happened, one line.
    pub detail: String,
    pub compile_ok_before: Option<u64>,
    pub compile_ok_after: Option<u64>,
}

/// Compile a small C file on the worker through distcc with no local fallback, and prove
/// from the worker's statistics that it ran there.
pub async fn smoketest_one(
    endpoint: &str,
    access: &AgentAccess,
    deadline: Duration,
    operation_deadline: Duration,
) -> SmokeResult {
    let started = Instant::now();
    let result = |passed, detail: String, before, after| SmokeResult {
        endpoint: endpoint.to_owned(),
        passed,
        detail,
        compile_ok_before: before,
        compile_ok_after: after,
    };
    let before = match fetch_status(endpoint, access, deadline).await {
        Ok(status) => WorkerSnapshot::new(status),
        Err(e) => return result(false, format!("agent unreachable: {e}"), None, None),
    };
    let stats_ok = |s: &WorkerSnapshot| s.stats().map(|s| s.compile_ok);
    let ok_before = stats_ok(&before);
    let port = before.distccd_port_to_try();
    let host = format!("{}:{port}/1", endpoint_host(endpoint));
    let compiled = compile_remotely(&host, operation_deadline).await;
    if let Err(e) = compiled {
        return result(
            false,
            format!("compile on {host} failed: {e}"),
            ok_before,
            None,
        );
    }
    let Some(ok_before) = ok_before else {
        return result(
            false,
            "compiled, but the worker's statistics are unavailable (stats off?)".to_owned(),
            None,
            None,
        );
    };
    // distccd counts a job when its child reports back to the parent, just after the
    // client got its result: poll briefly.
    let mut ok_after = None;
    while started.elapsed() < operation_deadline {
        ok_after = fetch_status(endpoint, access, deadline)
            .await
            .ok()
            .map(WorkerSnapshot::new)
            .as_ref()
            .and_then(stats_ok);
        if ok_after.is_some_and(|after| after > ok_before) {
            return result(
                true,
                format!(
                    "compiled on {host} in {:.1} s",
                    started.elapsed().as_secs_f64()
                ),
                Some(ok_before),
                ok_after,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    result(
        false,
        format!("compiled, but {endpoint}'s compile_ok did not increase: it did not run there"),
        Some(ok_before),
        ok_after,
    )
}

const SMOKE_SOURCE: &str = "int builderctl_smoketest(int x) { return x * 7 + 1; }\n";

async fn compile_remotely(host: &str, deadline: Duration) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("builderctl-smoke-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let source = dir.path().join("smoke.c");
    std::fs::write(&source, SMOKE_SOURCE).map_err(|e| e.to_string())?;
    // Its own DISTCC_DIR: no backoff memory or state shared with builds.
    let distcc_dir = dir.path().join("distcc");
    std::fs::create_dir(&distcc_dir).map_err(|e| e.to_string())?;
    let object = dir.path().join("smoke.o");
    let run = tokio::process::Command::new("distcc")
        .args(["gcc", "-O2", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .env("DISTCC_HOSTS", host)
        .env("DISTCC_FALLBACK", "0")
        .env("DISTCC_DIR", &distcc_dir)
        .env_remove("DISTCC_VERBOSE")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(deadline, run)
        .await
        .map_err(|_| format!("no result within {deadline:?}"))?
        .map_err(|e| format!("running distcc: {e}"))?;
    if output.status.success() && object_exists(&object) {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{}: {}",
            output.status,
            stderr.trim().replace('\n', " | ")
        ))
    }
}

fn object_exists(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.len() > 0)
}

/// The result of a control operation on one worker.
#[derive(Debug, Clone, Serialize)]
pub struct ControlResult {
    pub endpoint: String,
    pub passed: bool,
    /// distccd's state afterwards, when known.
    pub distccd_state: Option<String>,
    pub steps: Vec<String>,
    pub error: Option<String>,
}

/// Which control operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Reset,
    Bootstrap,
}

pub async fn control_one(
    endpoint: &str,
    access: &AgentAccess,
    operation: Operation,
    connect_deadline: Duration,
    deadline: Duration,
) -> ControlResult {
    let response = call_within(
        endpoint,
        access,
        connect_deadline,
        deadline,
        |mut client| async move {
            let reply = match operation {
                Operation::Reset => {
                    client
                        .control(pb::ControlRequest {
                            action: pb::ControlAction::Reset as i32,
                        })
                        .await
                }
                Operation::Bootstrap => client.bootstrap(pb::BootstrapRequest {}).await,
            };
            reply
                .map(tonic::Response::into_inner)
                .map_err(|s| status_text(&s))
        },
    )
    .await;
    match response {
        Ok(reply) => {
            let state = reply.unit.map(|u| printable(&u.active_state).into_owned());
            ControlResult {
                endpoint: endpoint.to_owned(),
                passed: state.as_deref() == Some("active"),
                error: (state.as_deref() != Some("active")).then(|| {
                    format!(
                        "distccd is {} afterwards",
                        state.as_deref().unwrap_or("unknown")
                    )
                }),
                distccd_state: state,
                steps: reply
                    .steps
                    .iter()
                    .map(|step| printable(step).into_owned())
                    .collect(),
            }
        }
        Err(e) => ControlResult {
            endpoint: endpoint.to_owned(),
            passed: false,
            distccd_state: None,
            steps: Vec::new(),
            error: Some(e),
        },
    }
}

/// Run `operation` on `workers`: all at once, or one at a time stopping at the first
/// failure (the rest are reported as skipped).
pub async fn control_all(
    workers: &[String],
    access: &AgentAccess,
    operation: Operation,
    connect_deadline: Duration,
    deadline: Duration,
    rolling: bool,
) -> Vec<ControlResult> {
    if !rolling {
        return futures_util::future::join_all(
            workers
                .iter()
                .map(|w| control_one(w, access, operation, connect_deadline, deadline)),
        )
        .await;
    }
    let mut results = Vec::new();
    let mut failed = false;
    for worker in workers {
        if failed {
            results.push(ControlResult {
                endpoint: worker.clone(),
                passed: false,
                distccd_state: None,
                steps: Vec::new(),
                error: Some("skipped: an earlier worker failed (--rolling)".to_owned()),
            });
            continue;
        }
        let result = control_one(worker, access, operation, connect_deadline, deadline).await;
        failed = !result.passed;
        results.push(result);
    }
    results
}

/// Whether any worker of `list` is usable.
pub fn any_ready(list: &HostList) -> bool {
    list.included().next().is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_selected_by_endpoint_or_host() {
        let all = ["198.18.0.11:3634".to_owned(), "198.18.0.12:3634".to_owned()];
        assert_eq!(select_workers(&all, &[]).unwrap(), all);
        assert_eq!(
            select_workers(&all, &["198.18.0.12".into()]).unwrap(),
            ["198.18.0.12:3634"]
        );
        assert_eq!(
            select_workers(&all, &["198.18.0.11:3634".into(), "198.18.0.12".into()]).unwrap(),
            all
        );
        assert_eq!(
            select_workers(&all, &["w9".into()]).unwrap_err(),
            SelectError::Unknown("w9".into())
        );
    }

    #[test]
    fn builder_checks_explain_failures() {
        let probe = Probe {
            endpoint: "198.18.0.11:3634".into(),
            status: Ok(WorkerSnapshot::new(pb::WorkerStatus {
                effective_allow: vec!["198.18.9.0/24".into()],
                ..Default::default()
            })),
            latency: Duration::from_millis(3),
            builder_addr: Some("198.18.0.1".parse().unwrap()),
        };
        let checks = builder_checks(&probe, &[], Some(Err("connection refused".into())));
        let failed: Vec<&str> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            failed,
            ["distcc-port-reachable", "allowlist-admits-builder"]
        );
        assert!(checks.iter().all(|c| c.passed == c.hint.is_empty()));
        let down = Probe {
            status: Err("connect: timed out".into()),
            ..probe
        };
        let checks = builder_checks(&down, &[], None);
        assert_eq!((checks.len(), checks[0].passed), (1, false));
    }
}
