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

/// Where a compiler name (`gcc`, a masquerade link's name) is looked up, in order, as
/// distccd's PATH finds it. Part of the contract: agent and builder resolve names the same
/// way, so `gcc` means the same binary on both sides.
pub const COMPILER_SEARCH_PATH: [&str; 5] = [
    "/usr/local/bin",
    "/usr/bin",
    "/bin",
    "/usr/local/sbin",
    "/usr/sbin",
];

/// The real compiler binary `name` stands for, symlinks resolved.
pub fn resolve_compiler(name: &str) -> Option<std::path::PathBuf> {
    COMPILER_SEARCH_PATH
        .iter()
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
        .and_then(|found| std::fs::canonicalize(found).ok())
}

/// `Compiler.fingerprint`: the sha256 of a compiler binary, lowercase hex. Part of the
/// contract: the agent reports it for each worker compiler and the builder computes it for
/// its own to decide whether a worker's compiler matches.
pub fn compiler_fingerprint(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A TLS certificate's fingerprint as operators see and compare it: `SHA256:` and the
/// lowercase hex sha256 of the certificate's DER bytes. Part of the contract: the agent
/// prints it (`distcc-agent --fingerprint`), `builderctl trust` shows and pins it.
pub fn certificate_fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(der);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}
