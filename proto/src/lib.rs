//! The gRPC contract of the distcc cluster, package `distcc.agent.v1`.
//!
//! The worker agent serves [`v1::distcc_agent_server::DistccAgent`]; the builder and the
//! tests use [`v1::distcc_agent_client::DistccAgentClient`].

pub mod v1 {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("distcc.agent.v1");
}

/// Default TCP port of the agent's gRPC service (distccd itself uses 3632, its stats 3633).
pub const DEFAULT_AGENT_PORT: u16 = 3634;

/// Fully qualified service name, as reported by the `grpc.health.v1` service.
pub const SERVICE_NAME: &str = "distcc.agent.v1.DistccAgent";
