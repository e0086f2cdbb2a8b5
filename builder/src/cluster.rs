//! Talking to every worker agent at once, each call bounded by a deadline so a dead
//! worker costs at most that deadline, never a hang.

use std::time::{Duration, Instant};

use distcc_proto::v1 as pb;
use distcc_proto::v1::distcc_agent_client::DistccAgentClient;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

/// One worker as the builder sees it. Serialised as the stable JSON of `status --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerView {
    /// The agent endpoint, as configured.
    pub endpoint: String,
    pub reachable: bool,
    /// systemd's ActiveState of distccd; null when unreachable.
    pub distccd_state: Option<String>,
    /// Slots this builder would use on the worker; 0 when excluded.
    pub slots: u32,
    /// Why the worker is not in the host list; null when it is.
    pub excluded_reason: Option<String>,
    pub hostname: Option<String>,
    pub agent_version: Option<String>,
    pub jobs_running: Option<u32>,
    pub max_slots: Option<u32>,
    pub load1: Option<f64>,
    pub compile_ok: Option<u64>,
    pub compile_error: Option<u64>,
    pub compilers: Vec<String>,
    pub rpc_latency_ms: f64,
}

/// Slots to use on a worker: distccd's own limit when known, else its job setting, else
/// distccd's default (CPUs + 2).
pub fn slots_of(status: &pb::WorkerStatus) -> u32 {
    let stats_kids = status
        .stats
        .as_ref()
        .filter(|s| s.available)
        .map_or(0, |s| s.max_kids as u32);
    let jobs = status.settings.as_ref().map_or(0, |s| s.jobs);
    let cpus = status.capacity.as_ref().map_or(0, |c| c.online_cpus);
    [stats_kids, jobs, cpus + 2]
        .into_iter()
        .find(|n| *n > 0)
        .unwrap_or(0)
}

/// The builder's view of one worker's status.
pub fn view(
    endpoint: &str,
    result: Result<pb::WorkerStatus, String>,
    latency: Duration,
) -> WorkerView {
    let rpc_latency_ms = latency.as_secs_f64() * 1000.0;
    let status = match result {
        Ok(status) => status,
        Err(reason) => {
            return WorkerView {
                endpoint: endpoint.to_owned(),
                reachable: false,
                distccd_state: None,
                slots: 0,
                excluded_reason: Some(format!("unreachable: {reason}")),
                hostname: None,
                agent_version: None,
                jobs_running: None,
                max_slots: None,
                load1: None,
                compile_ok: None,
                compile_error: None,
                compilers: Vec::new(),
                rpc_latency_ms,
            };
        }
    };
    let unit = status.unit.clone().unwrap_or_default();
    let stats = status.stats.clone().unwrap_or_default();
    let excluded_reason = if unit.active_state != "active" {
        Some(format!(
            "distccd is {} ({})",
            unit.active_state, unit.sub_state
        ))
    } else {
        None
    };
    let mut compilers: Vec<String> = status
        .compilers
        .iter()
        .filter(|c| c.name == "gcc" || c.name == "g++")
        .map(|c| format!("{}: {}", c.name, c.version))
        .collect();
    compilers.sort();
    WorkerView {
        endpoint: endpoint.to_owned(),
        reachable: true,
        distccd_state: Some(unit.active_state.clone()),
        slots: if excluded_reason.is_none() {
            slots_of(&status)
        } else {
            0
        },
        excluded_reason,
        hostname: Some(status.hostname.clone()),
        agent_version: Some(status.agent_version.clone()),
        jobs_running: stats.available.then_some(stats.jobs_running),
        max_slots: stats.available.then_some(stats.max_kids as u32),
        load1: status.capacity.as_ref().map(|c| c.load1),
        compile_ok: stats.available.then_some(stats.compile_ok),
        compile_error: stats.available.then_some(stats.compile_error),
        compilers,
        rpc_latency_ms,
    }
}

/// Status of one worker within `deadline` (connect and call together).
pub async fn fetch_status(
    endpoint: &str,
    token: &str,
    deadline: Duration,
) -> Result<pb::WorkerStatus, String> {
    let call = async {
        let channel = Endpoint::from_shared(format!("http://{endpoint}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(deadline)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let bearer: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| "token is not valid ASCII".to_owned())?;
        let mut client =
            DistccAgentClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
                Ok(request)
            });
        client
            .status(pb::StatusRequest {
                skip_compilers: true,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| format!("no answer within {deadline:?}"))?
}

/// Status of every worker, in parallel, in configuration order.
pub async fn status_all(workers: &[String], token: &str, deadline: Duration) -> Vec<WorkerView> {
    let calls = workers.iter().map(|endpoint| async move {
        let started = Instant::now();
        let result = fetch_status(endpoint, token, deadline).await;
        view(endpoint, result, started.elapsed())
    });
    futures_util::future::join_all(calls).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn status(active: &str, max_kids: u64, jobs: u32, cpus: u32) -> pb::WorkerStatus {
        pb::WorkerStatus {
            unit: Some(pb::UnitState {
                active_state: active.into(),
                sub_state: "running".into(),
                ..Default::default()
            }),
            settings: Some(pb::DistccdSettings {
                jobs,
                ..Default::default()
            }),
            capacity: Some(pb::Capacity {
                online_cpus: cpus,
                ..Default::default()
            }),
            stats: Some(pb::DistccdStats {
                available: max_kids > 0,
                max_kids,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn slots_prefer_distccd_then_jobs_then_cpus() {
        assert_eq!(slots_of(&status("active", 6, 4, 2)), 6);
        assert_eq!(slots_of(&status("active", 0, 4, 2)), 4);
        assert_eq!(slots_of(&status("active", 0, 0, 2)), 4);
    }

    #[test]
    fn inactive_or_unreachable_workers_are_excluded_with_a_reason() {
        let v = view("w:1", Ok(status("failed", 0, 4, 2)), Duration::ZERO);
        assert_eq!((v.reachable, v.slots), (true, 0));
        assert_eq!(v.distccd_state.as_deref(), Some("failed"));
        assert!(v.excluded_reason.unwrap().contains("failed"));
        let v = view("w:1", Err("connect: refused".into()), Duration::ZERO);
        assert_eq!(
            (v.reachable, v.slots, v.distccd_state.clone()),
            (false, 0, None)
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["distccd_state"], serde_json::Value::Null);
        assert_eq!(json["excluded_reason"], "unreachable: connect: refused");
        let v = view("w:1", Ok(status("active", 3, 0, 2)), Duration::ZERO);
        assert_eq!((v.slots, v.excluded_reason), (3, None));
    }
}
