//! Helpers shared by the container tests: a worker booted with the agent, a gRPC client
//! for it, polling with a bound, and a real remote compile from the builder.

// Each test file uses some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use distcc_proto::v1 as pb;
use distcc_proto::v1::distcc_agent_client::DistccAgentClient;
use distcc_testbed::{
    AGENT_PORT, AgentInstall, Rootfs, TEST_TOKEN, Testbed, Worker as Container, agent_config,
};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub const TOKEN: &str = TEST_TOKEN;

pub type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
pub type Client = DistccAgentClient<InterceptedService<Channel, AddToken>>;

/// A worker container running the agent, and a client for it.
pub struct AgentWorker {
    pub container: Container,
    pub channel: Channel,
}

impl AgentWorker {
    /// Boot a worker with the agent installed the way a package would install it, write
    /// its config and token, and start it with systemctl.
    pub async fn start(bed: &Testbed, name: &str, state_dir: Option<&Path>) -> AgentWorker {
        let install = AgentInstall {
            binary: PathBuf::from(env!("CARGO_BIN_EXE_distcc-agent")),
            repo: Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        };
        let container = bed
            .boot_agent_worker(
                name,
                &install,
                &agent_config(bed, 3),
                |spec| match state_dir {
                    // Survives the container: proves settings persist across a reboot.
                    Some(dir) => spec.bind(dir, "/var/lib/distcc-agent"),
                    None => spec,
                },
            )
            .expect("boot a worker running the agent");
        let channel = Self::connect(&container).await;
        AgentWorker { container, channel }
    }

    /// TLS, as every client must: the agent serves its generated certificate by
    /// default. Trusting that one certificate as the root also proves that it names the
    /// worker's address (the client checks the address it dialled against its SANs).
    pub async fn connect(container: &Container) -> Channel {
        let cert = container
            .agent_certificate()
            .expect("the agent's certificate");
        Channel::from_shared(format!("https://{}:{AGENT_PORT}", container.ip()))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(cert)))
            .unwrap()
            .connect()
            .await
            .expect("connect to the agent over TLS")
    }

    pub fn client_with(&self, token: Option<&'static str>) -> Client {
        let interceptor: AddToken = Box::new(move |mut request: tonic::Request<()>| {
            if let Some(token) = token {
                let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
                request.metadata_mut().insert("authorization", value);
            }
            Ok(request)
        });
        DistccAgentClient::with_interceptor(self.channel.clone(), interceptor)
    }

    pub fn client(&self) -> Client {
        self.client_with(Some(TOKEN))
    }

    /// Control `action`; panics when the agent refuses it.
    pub async fn control(&self, action: pb::ControlAction) -> pb::ControlResponse {
        self.client()
            .control(pb::ControlRequest {
                action: action as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("Control {action:?}: {e}"))
            .into_inner()
    }

    pub async fn status(&self) -> pb::WorkerStatus {
        self.client()
            .status(pb::StatusRequest::default())
            .await
            .expect("Status")
            .into_inner()
    }

    pub async fn health(&self) -> i32 {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let request = tonic_health::pb::HealthCheckRequest {
            service: distcc_proto::SERVICE_NAME.to_owned(),
        };
        health
            .check(request)
            .await
            .expect("health check needs no token")
            .into_inner()
            .status
    }

    /// distccd's command line inside the container.
    pub fn distccd_cmdline(&self, pid: u32) -> String {
        self.container
            .exec_ok(&["cat", &format!("/proc/{pid}/cmdline")])
            .expect("read cmdline")
            .replace('\0', " ")
    }
}

/// Poll until `check` holds; the bound only keeps a broken build from hanging CI.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(Duration::from_secs(60), what, check).await;
}

/// Poll until `check` holds, failing the test after `bound`.
pub async fn eventually_within<F, Fut>(bound: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "never happened within {bound:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Compile a small C file on `host` through distcc, from the root namespace, with no
/// fallback to a local compile: success proves the compile ran on the worker.
pub fn remote_compile(host: std::net::Ipv4Addr) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("unit.c");
    std::fs::write(&source, "int twice(int x) { return 2 * x; }\n").unwrap();
    let object = dir.path().join("unit.o");
    // A fresh DISTCC_DIR per compile: distcc's backoff memory must not leak between checks.
    std::fs::create_dir(dir.path().join("distcc")).unwrap();
    let output = Command::new("distcc")
        .args(["gcc", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .env("DISTCC_HOSTS", host.to_string())
        .env("DISTCC_FALLBACK", "0")
        .env("DISTCC_DIR", dir.path().join("distcc"))
        .output()
        .map_err(|e| format!("running distcc: {e}"))?;
    if output.status.success() && object.exists() {
        Ok(())
    } else {
        Err(format!(
            "distcc failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

pub fn bed() -> Testbed {
    Rootfs::ensure().expect("test-bed root filesystem");
    Testbed::create().expect("test-bed network")
}
