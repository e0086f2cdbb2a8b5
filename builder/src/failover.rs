//! In-flight failover: when a worker is lost for certain, abort this builder's TCP
//! connections to its distccd so the compiles on them fail now and the distcc client
//! compiles them locally (`DISTCC_FALLBACK`, on by default), instead of each waiting out
//! distcc's 300 s IO timeout.
//!
//! "For certain" is two independent signs: the agent's status stream broke (error, end,
//! or silence past the steering's stale bound) AND distccd's own port gives no answer at
//! all within a short bound. A refused connection is an answer: the machine is up, and
//! the kernel resets the connections of a distccd that went away by itself. A worker
//! whose agent restarts while distccd keeps serving is never touched.
//!
//! Aborting is `ss -K` (iproute2, SOCK_DESTROY; needs CAP_NET_ADMIN): the client's
//! blocked read or write fails with ECONNABORTED at once. The distcc client writes the
//! object only after a whole result arrived, and a local fallback compile replaces the
//! output file, so no object is lost or half-written.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use thiserror::Error;

/// What the distcc port said when asked for a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortCheck {
    /// A connection opened: distccd (or at least the machine's kernel) is there.
    Answers,
    /// Refused, reset: the machine is there, distccd is not.
    Refused(String),
    /// Nothing within the bound (or no route): the machine is gone from this network.
    Silent(String),
}

impl PortCheck {
    /// Whether this check, after a broken agent stream, confirms the worker is lost.
    pub fn confirms_loss(&self) -> bool {
        matches!(self, PortCheck::Silent(_))
    }
}

/// Ask `addr` for a TCP connection, within `bound`.
pub async fn check_port(addr: SocketAddr, bound: Duration) -> PortCheck {
    match tokio::time::timeout(bound, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => PortCheck::Silent(format!("no answer within {bound:?}")),
        Ok(Ok(_)) => PortCheck::Answers,
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => {
                PortCheck::Refused(e.to_string())
            }
            // EHOSTUNREACH, ENETUNREACH, timeouts: nobody there to answer.
            _ => PortCheck::Silent(e.to_string()),
        },
    }
}

#[derive(Debug, Error)]
pub enum CutError {
    #[error("cannot run ss (iproute2): {0}")]
    Spawn(std::io::Error),
    #[error("ss -K failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
}

/// `ss` arguments that kill every TCP socket of this network namespace connected to
/// `addr` (established or still connecting).
pub fn ss_kill_args(addr: SocketAddr) -> Vec<String> {
    let host = match addr.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    [
        "-K",
        "-H",
        "-n",
        "-t",
        "dst",
        &host,
        "dport",
        "=",
        &format!(":{}", addr.port()),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Abort the connections to `addr`; returns how many `ss` reports closed.
pub async fn cut_connections(addr: SocketAddr) -> Result<usize, CutError> {
    // root's usual PATH has it, a service's may not: try iproute2's places first.
    let ss = ["/usr/bin/ss", "/bin/ss", "/usr/sbin/ss", "/sbin/ss"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("ss");
    let output = tokio::process::Command::new(ss)
        .args(ss_kill_args(addr))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(CutError::Spawn)?;
    if !output.status.success() {
        return Err(CutError::Failed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    // Without CAP_NET_ADMIN the kernel refuses SOCK_DESTROY, and ss (iproute2 6.1) still
    // exits 0, printing "SOCK_DESTROY answers: Operation not permitted" on stderr and
    // nothing on stdout; that must not pass for "nothing to abort".
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("SOCK_DESTROY answers") {
        return Err(CutError::Failed {
            status: output.status.to_string(),
            stderr: stderr.trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_silence_confirms_a_loss() {
        assert!(PortCheck::Silent("no answer".into()).confirms_loss());
        assert!(!PortCheck::Refused("refused".into()).confirms_loss());
        assert!(!PortCheck::Answers.confirms_loss());
    }

    #[test]
    fn kill_filter_names_destination_and_port() {
        assert_eq!(
            ss_kill_args("198.18.3.12:3632".parse().unwrap()).join(" "),
            "-K -H -n -t dst 198.18.3.12 dport = :3632"
        );
        assert_eq!(
            ss_kill_args("[fd00::1]:3632".parse().unwrap()).join(" "),
            "-K -H -n -t dst [fd00::1] dport = :3632"
        );
    }

    #[tokio::test]
    async fn port_checks_tell_answers_from_refusals() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(
            check_port(addr, Duration::from_secs(2)).await,
            PortCheck::Answers
        );
        drop(listener);
        assert!(matches!(
            check_port(addr, Duration::from_secs(2)).await,
            PortCheck::Refused(_)
        ));
    }
}
