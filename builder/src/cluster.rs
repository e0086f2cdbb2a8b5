//! Talking to every worker agent at once, each call bounded by a deadline so a dead
//! worker costs at most that deadline, never a hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use distcc_proto::v1 as pb;
use distcc_proto::v1::distcc_agent_client::DistccAgentClient;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{AgentAccess, Transport, Trust};
use crate::exclusion::{Exclusion, ExclusionKind};
use crate::host_list::{
    HostList, LocalCompiler, Policy, WorkerInput, WorkerVerdict, endpoint_host,
};
use crate::snapshot::{DEFAULT_DISTCCD_PORT, WorkerSnapshot, saturating_u32};
use crate::trust::{CertificateCapture, KnownWorkers};
use crate::untrusted::{self, printable};

/// One worker as the builder sees it. Serialised as the stable JSON of `status --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// The reason's kind ([`ExclusionKind`], snake_case); null when included.
    pub excluded_kind: Option<ExclusionKind>,
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

/// A worker's status and how this builder reaches it, gathered within a deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub endpoint: String,
    pub status: Result<WorkerSnapshot, String>,
    pub latency: Duration,
    /// The source address the builder uses towards the worker (what distccd sees).
    pub builder_addr: Option<IpAddr>,
}

impl Probe {
    pub fn input(&self) -> WorkerInput<'_> {
        WorkerInput {
            endpoint: &self.endpoint,
            status: self.status.as_ref().map_err(String::as_str),
            builder_addr: self.builder_addr,
            mean_job_secs: None,
            busy_secs_per_compile: None,
            agent_away: None,
        }
    }
}

/// The host list from a set of probes.
pub fn host_list(probes: &[Probe], local: &[LocalCompiler], policy: &Policy) -> HostList {
    let inputs: Vec<WorkerInput<'_>> = probes.iter().map(Probe::input).collect();
    HostList::compute(&inputs, local, policy)
}

/// One view per probe, each with its verdict in `list`.
pub fn views(probes: &[Probe], list: &HostList) -> Vec<WorkerView> {
    probes
        .iter()
        .map(|p| view(p, list.verdict(&p.endpoint)))
        .collect()
}

/// The builder's view of one worker, with the host list's verdict on it.
pub fn view(probe: &Probe, verdict: Option<&WorkerVerdict>) -> WorkerView {
    let rpc_latency_ms = probe.latency.as_secs_f64() * 1000.0;
    let (slots, exclusion) = match verdict {
        Some(v) => (v.entry().map_or(0, |e| e.slots), v.exclusion().cloned()),
        None => (0, Some(Exclusion::NotInList)),
    };
    let excluded_reason = exclusion.as_ref().map(Exclusion::to_string);
    let excluded_kind = exclusion.as_ref().map(Exclusion::kind);
    let snapshot = match &probe.status {
        Ok(snapshot) => snapshot,
        Err(_) => {
            return WorkerView {
                endpoint: probe.endpoint.clone(),
                reachable: false,
                distccd_state: None,
                slots: 0,
                excluded_reason,
                excluded_kind,
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
    let status = snapshot.status();
    let stats = snapshot.stats().cloned().unwrap_or_default();
    let mut compilers: Vec<String> = snapshot
        .compilers()
        .iter()
        .filter(|c| c.name == "gcc" || c.name == "g++")
        .map(|c| format!("{}: {}", c.name, c.version))
        .collect();
    compilers.sort();
    WorkerView {
        endpoint: probe.endpoint.clone(),
        reachable: true,
        distccd_state: Some(snapshot.unit_state().0.to_owned()),
        slots,
        excluded_reason,
        excluded_kind,
        hostname: Some(status.hostname.clone()),
        agent_version: Some(status.agent_version.clone()),
        jobs_running: stats.available.then_some(stats.jobs_running),
        max_slots: stats.available.then_some(saturating_u32(stats.max_kids)),
        load1: status.capacity.as_ref().map(|c| c.load1),
        compile_ok: stats.available.then_some(stats.compile_ok),
        compile_error: stats.available.then_some(stats.compile_error),
        compilers,
        rpc_latency_ms,
    }
}

/// An authenticated client of one agent.
pub type Client = DistccAgentClient<InterceptedService<Channel, AddToken>>;
pub type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;

/// Connect to an agent within `deadline`: over TLS when `[tls]` is configured (then every
/// RPC, stream or not, goes through it), plain HTTP/2 otherwise.
pub async fn connect(
    endpoint: &str,
    access: &AgentAccess,
    deadline: Duration,
) -> Result<Client, String> {
    let bearer: MetadataValue<_> = format!("Bearer {}", access.token)
        .parse()
        .map_err(|_| "token is not valid ASCII".to_owned())?;
    let tls = match &access.transport {
        Transport::Tls(tls) => Some(tls),
        Transport::Plaintext => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut channel = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(deadline)
        // A cut link must not leave a stream waiting forever for bytes.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(deadline)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new();
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        channel = match &tls.trust {
            Trust::Ca(pem) => channel.tls_config(config.ca_certificate(Certificate::from_pem(pem))),
            Trust::Pinned(file) => {
                let pins = KnownWorkers::load(file).map_err(|e| e.to_string())?;
                if pins.get(endpoint).is_none() {
                    // Refused before dialling: nothing to verify the worker against.
                    let unknown = crate::trust::PinError::Unknown {
                        endpoint: endpoint.to_owned(),
                        file: file.display().to_string(),
                    };
                    return Err(unknown.to_string());
                }
                channel.tls_config_with_verifier(config, Arc::new(pins.verifier(endpoint)))
            }
        }
        .map_err(|e| format!("tls: {}", error_chain(&e)))?;
    }
    let channel = channel
        .connect()
        .await
        .map_err(|e| format!("connect: {}", error_chain(&e)))?;
    let add_token: AddToken = Box::new(move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        Ok(request)
    });
    Ok(DistccAgentClient::with_interceptor(channel, add_token))
}

/// The fingerprint of the certificate the agent at `endpoint` presents, for `builderctl
/// trust`. The handshake is ended as soon as the certificate is seen: no token or request
/// is sent to a worker that is not trusted yet.
pub async fn presented_fingerprint(
    endpoint: &str,
    tls: &crate::config::TlsSettings,
    deadline: Duration,
) -> Result<String, String> {
    let capture = Arc::new(CertificateCapture::new());
    let mut config = ClientTlsConfig::new();
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    let channel = Endpoint::from_shared(format!("https://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(deadline)
        .tls_config_with_verifier(config, capture.clone())
        .map_err(|e| format!("tls: {}", error_chain(&e)))?;
    let outcome = tokio::time::timeout(deadline, channel.connect()).await;
    match (capture.presented(), outcome) {
        (Some(der), _) => Ok(distcc_proto::certificate_fingerprint(&der)),
        (None, Err(_)) => Err(format!("no TLS handshake within {deadline:?}")),
        (None, Ok(Err(e))) => Err(format!("connect: {}", error_chain(&e))),
        (None, Ok(Ok(_))) => Err("the handshake ended without a certificate".to_owned()),
    }
}

/// An error with its sources, on one line ("transport error: tcp connect error: ...").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// A gRPC status as one line; the message is the agent's, so it is made printable.
pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), printable(status.message()))
}

/// Run `call` against one agent within `deadline`, connection included; connecting alone
/// is bounded by `connect_deadline` (the per-RPC deadline), so a dead worker costs that,
/// not a long operation's deadline.
pub async fn call_within<T, F, Fut>(
    endpoint: &str,
    access: &AgentAccess,
    connect_deadline: Duration,
    deadline: Duration,
    call: F,
) -> Result<T, String>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let work = async {
        let client = connect(endpoint, access, connect_deadline.min(deadline)).await?;
        call(client).await
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| format!("no answer within {deadline:?}"))?
}

/// Status of one worker within `deadline` (connect and call together). Compilers are
/// described (the agent caches them per binary), since the host list compares them.
pub async fn fetch_status(
    endpoint: &str,
    access: &AgentAccess,
    deadline: Duration,
) -> Result<pb::WorkerStatus, String> {
    call_within(
        endpoint,
        access,
        deadline,
        deadline,
        |mut client| async move {
            client
                .status(pb::StatusRequest {
                    skip_compilers: false,
                })
                .await
                .map(|response| untrusted::cleaned(response.into_inner()))
                .map_err(|s| status_text(&s))
        },
    )
    .await
}

/// The source address this host uses to reach `endpoint`'s host: a UDP "connect" only
/// asks the kernel for a route and sends nothing.
pub async fn source_address(endpoint: &str, port: u16) -> Option<IpAddr> {
    let host = endpoint_host(endpoint);
    let target = tokio::net::lookup_host((host, port)).await.ok()?.next()?;
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
    socket.connect(target).await.ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// Probe one worker: status and route, within `deadline`.
pub async fn probe(endpoint: &str, access: &AgentAccess, deadline: Duration) -> Probe {
    let started = Instant::now();
    let status = fetch_status(endpoint, access, deadline)
        .await
        .map(WorkerSnapshot::new);
    let latency = started.elapsed();
    let port = status
        .as_ref()
        .map_or(DEFAULT_DISTCCD_PORT, WorkerSnapshot::distccd_port_to_try);
    Probe {
        endpoint: endpoint.to_owned(),
        builder_addr: source_address(endpoint, port).await,
        status,
        latency,
    }
}

/// Probe every worker, in parallel, in configuration order.
pub async fn probe_all(workers: &[String], access: &AgentAccess, deadline: Duration) -> Vec<Probe> {
    futures_util::future::join_all(workers.iter().map(|e| probe(e, access, deadline))).await
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
    fn max_slots_saturate_and_a_view_without_verdict_says_so() {
        let probe = probe_of(Ok(status("active", u64::MAX, 0, 2)));
        let view = view(&probe, None);
        assert_eq!(view.max_slots, Some(u32::MAX));
        assert_eq!(view.excluded_kind, Some(ExclusionKind::NotInList));
        assert_eq!(
            view.excluded_reason.as_deref(),
            Some("not in the host list")
        );
    }

    fn probe_of(status: Result<pb::WorkerStatus, String>) -> Probe {
        Probe {
            endpoint: "198.18.3.11:3634".into(),
            status: status.map(WorkerSnapshot::new),
            latency: Duration::ZERO,
            builder_addr: Some("198.18.3.1".parse().unwrap()),
        }
    }

    #[test]
    fn views_carry_the_host_lists_verdict() {
        let policy = Policy {
            allow_mismatch: false,
            local_slots: 0,
            lzo: true,
        };
        let mut active = status("active", 3, 0, 2);
        active.effective_allow = vec!["198.18.3.0/24".into()];
        let probes = [
            probe_of(Ok(status("failed", 0, 4, 2))),
            probe_of(Err("connect: refused".into())),
            probe_of(Ok(active)),
        ];
        let list = host_list(&probes, &[], &policy);
        // All three share one endpoint: each takes its own verdict.
        let views: Vec<WorkerView> = probes
            .iter()
            .zip(&list.workers)
            .map(|(p, v)| view(p, Some(v)))
            .collect();
        assert_eq!((views[0].reachable, views[0].slots), (true, 0));
        assert_eq!(views[0].distccd_state.as_deref(), Some("failed"));
        assert!(views[0].excluded_reason.clone().unwrap().contains("failed"));
        let v = &views[1];
        assert_eq!(
            (v.reachable, v.slots, v.distccd_state.clone()),
            (false, 0, None)
        );
        let json = serde_json::to_value(v).unwrap();
        assert_eq!(json["distccd_state"], serde_json::Value::Null);
        assert_eq!(json["excluded_kind"], "unreachable");
        assert_eq!(
            serde_json::to_value(&views[0]).unwrap()["excluded_kind"],
            "inactive"
        );
        assert_eq!(
            serde_json::to_value(&views[2]).unwrap()["excluded_kind"],
            serde_json::Value::Null
        );
        assert_eq!(
            json["excluded_reason"],
            "agent unreachable: connect: refused"
        );
        assert_eq!(
            (views[2].slots, views[2].excluded_reason.clone()),
            (3, None)
        );
    }
}
