//! In-flight failover: when a worker is lost for certain, abort this builder's TCP
//! connections to its distccd so the compiles on them fail now and the distcc client
//! compiles them locally (`DISTCC_FALLBACK`, on by default), instead of each waiting out
//! distcc's 300 s IO timeout.
//!
//! "For certain" is independent signs: the agent's status stream broke (error, end, or
//! silence past the steering's stale bound) AND neither distccd's port nor the agent's
//! answers at all within a short bound ([`MachinePorts::confirm_loss`]). A refused
//! connection is an answer: the machine is up, and the kernel resets the connections of
//! a distccd that went away by itself. A full accept queue drops SYNs on distccd's port
//! silently, but the agent's port still answers. What each outcome means for the worker
//! is [`crate::track`]'s decision.
//!
//! Aborting is `ss -K` (iproute2, SOCK_DESTROY; needs CAP_NET_ADMIN): the client's
//! blocked read or write fails with ECONNABORTED at once. The distcc client writes the
//! object only after a whole result arrived, and a local fallback compile replaces the
//! output file, so no object is lost or half-written.

use std::collections::BTreeSet;
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

impl std::fmt::Display for PortCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortCheck::Answers => f.write_str("answers"),
            PortCheck::Refused(why) => write!(f, "refused: {why}"),
            PortCheck::Silent(why) => write!(f, "silent: {why}"),
        }
    }
}

/// What a machine's ports said, one connection attempt each within the same bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePorts {
    pub distccd: SocketAddr,
    pub distccd_check: PortCheck,
    pub agent: SocketAddr,
    pub agent_check: PortCheck,
}

impl MachinePorts {
    /// A loss is confirmed only when the machine answers on none of its ports: a full
    /// accept queue drops SYNs on distccd's port without a word, but then the agent's
    /// port still answers (or refuses, while the agent restarts).
    pub fn confirm_loss(&self) -> bool {
        self.distccd_check.confirms_loss() && self.agent_check.confirms_loss()
    }

    /// For log lines: `distcc port A: silent: ...; agent port B: refused: ...`.
    pub fn describe(&self) -> String {
        format!(
            "distcc port {}: {}; agent port {}: {}",
            self.distccd, self.distccd_check, self.agent, self.agent_check
        )
    }
}

/// Ask distccd's port and the agent's port at once, each within `bound`.
pub async fn check_machine(
    distccd: SocketAddr,
    agent: SocketAddr,
    bound: Duration,
) -> MachinePorts {
    let (distccd_check, agent_check) =
        tokio::join!(check_port(distccd, bound), check_port(agent, bound));
    MachinePorts {
        distccd,
        distccd_check,
        agent,
        agent_check,
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

/// Which of this network namespace's connections to a distccd to abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutScope {
    /// Every one: the worker is lost, whoever's compile it was is stuck.
    All,
    /// Only sockets owned by these uids (the sessions that asked for slow cuts); other
    /// users' compiles on a slow but live worker are left to finish.
    OwnedBy(BTreeSet<u32>),
}

/// A TCP connection as `ss -e` lists it: its local end and the uid owning the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSocket {
    pub local: SocketAddr,
    pub uid: u32,
}

fn ss_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// `ss` arguments that kill every TCP socket of this network namespace connected to
/// `addr` (established or still connecting).
pub fn ss_kill_args(addr: SocketAddr) -> Vec<String> {
    let host = ss_host(addr.ip());
    let port = format!(":{}", addr.port());
    strings(&["-K", "-H", "-n", "-t", "dst", &host, "dport", "=", &port])
}

/// `ss` arguments that kill the one socket from `local` to `addr`.
pub fn ss_kill_one_args(addr: SocketAddr, local: SocketAddr) -> Vec<String> {
    let mut args = ss_kill_args(addr);
    let (src, sport) = (ss_host(local.ip()), format!(":{}", local.port()));
    args.extend(strings(&["src", &src, "sport", "=", &sport]));
    args
}

/// `ss` arguments that list the sockets connected to `addr` with their owners (`-e`).
pub fn ss_list_args(addr: SocketAddr) -> Vec<String> {
    let host = ss_host(addr.ip());
    let port = format!(":{}", addr.port());
    strings(&["-H", "-n", "-t", "-e", "dst", &host, "dport", "=", &port])
}

/// The sockets in `ss -H -n -t -e` output: the 4th column is the local address, and
/// `uid:N` names the owner; ss leaves the field out for uid 0.
pub fn parse_owned_sockets(text: &str) -> Vec<OwnedSocket> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(3)?.parse().ok()?;
            let uid = fields
                .iter()
                .find_map(|f| f.strip_prefix("uid:"))
                .map_or(Some(0), |n| n.parse().ok())?;
            Some(OwnedSocket { local, uid })
        })
        .collect()
}

/// Abort the connections to `addr` in `scope`; returns how many `ss` reports closed.
/// `OwnedBy` an empty set aborts nothing and runs nothing.
pub async fn cut_connections(addr: SocketAddr, scope: &CutScope) -> Result<usize, CutError> {
    match scope {
        CutScope::All => run_ss_kill(ss_kill_args(addr)).await,
        CutScope::OwnedBy(uids) if uids.is_empty() => Ok(0),
        CutScope::OwnedBy(uids) => {
            let listed = run_ss(ss_list_args(addr)).await?;
            let mut cut = 0;
            for socket in parse_owned_sockets(&String::from_utf8_lossy(&listed.stdout)) {
                if uids.contains(&socket.uid) {
                    cut += run_ss_kill(ss_kill_one_args(addr, socket.local)).await?;
                }
            }
            Ok(cut)
        }
    }
}

/// Every TCP connection of this network namespace with its owner (for
/// [`crate::straggler`]).
pub async fn list_connections() -> Result<Vec<crate::straggler::Connection>, CutError> {
    let listed = run_ss(strings(&["-H", "-n", "-t", "-e"])).await?;
    Ok(crate::straggler::parse_connections(
        &String::from_utf8_lossy(&listed.stdout),
    ))
}

/// Abort the one connection from `local` to `addr`; returns how many `ss` closed (0: it
/// had ended by itself).
pub async fn cut_one(addr: SocketAddr, local: SocketAddr) -> Result<usize, CutError> {
    run_ss_kill(ss_kill_one_args(addr, local)).await
}

async fn run_ss(args: Vec<String>) -> Result<std::process::Output, CutError> {
    // root's usual PATH has it, a service's may not: try iproute2's places first.
    let ss = ["/usr/bin/ss", "/bin/ss", "/usr/sbin/ss", "/sbin/ss"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("ss");
    let output = tokio::process::Command::new(ss)
        .args(args)
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
    Ok(output)
}

async fn run_ss_kill(args: Vec<String>) -> Result<usize, CutError> {
    let output = run_ss(args).await?;
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

    #[test]
    fn kill_one_names_the_four_tuple() {
        assert_eq!(
            ss_kill_one_args(
                "198.18.3.12:3632".parse().unwrap(),
                "198.18.3.1:44632".parse().unwrap()
            )
            .join(" "),
            "-K -H -n -t dst 198.18.3.12 dport = :3632 src 198.18.3.1 sport = :44632"
        );
    }

    #[test]
    fn owners_are_read_from_ss_e_lines() {
        // Captured from `ss -H -n -t -e dst ... dport = :PORT` (iproute2 6.1): root's
        // sockets carry no uid field; a SYN-SENT one has a timer; IPv6 in brackets.
        let text = "\
ESTAB    0      0      127.0.0.1:44624 127.0.0.1:46449 ino:13316 sk:3 cgroup:/ <->
SYN-SENT 0      1      127.0.0.1:44632 127.0.0.1:46449 timer:(on,496ms,0) ino:13317 sk:4 cgroup:/ <->
ESTAB 0      0      127.0.0.1:55294 127.0.0.1:36219 uid:65534 ino:11909 sk:2 cgroup:/ <->
ESTAB 0      0      [::1]:46066 [::1]:54555 uid:1000 ino:11998 sk:1001 cgroup:/ <->

garbage line
";
        assert_eq!(
            parse_owned_sockets(text),
            [
                OwnedSocket {
                    local: "127.0.0.1:44624".parse().unwrap(),
                    uid: 0
                },
                OwnedSocket {
                    local: "127.0.0.1:44632".parse().unwrap(),
                    uid: 0
                },
                OwnedSocket {
                    local: "127.0.0.1:55294".parse().unwrap(),
                    uid: 65534
                },
                OwnedSocket {
                    local: "[::1]:46066".parse().unwrap(),
                    uid: 1000
                },
            ]
        );
    }

    #[tokio::test]
    async fn an_empty_owner_set_cuts_nothing() {
        let scope = CutScope::OwnedBy(BTreeSet::new());
        assert_eq!(
            cut_connections("127.0.0.1:9".parse().unwrap(), &scope)
                .await
                .unwrap(),
            0
        );
    }

    /// Real sockets on loopback: `OwnedBy` leaves other owners' connections alone and
    /// aborts the owner's. Needs CAP_NET_ADMIN (root), as the cut itself does.
    #[tokio::test]
    async fn owned_by_cuts_only_the_owners_sockets() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: SOCK_DESTROY needs root");
            return;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server_side, _) = listener.accept().await.unwrap();
        let others = CutScope::OwnedBy(BTreeSet::from([65534]));
        assert_eq!(cut_connections(addr, &others).await.unwrap(), 0);
        let root = CutScope::OwnedBy(BTreeSet::from([0]));
        assert_eq!(cut_connections(addr, &root).await.unwrap(), 1);
        // The aborted client's end is gone: the server reads end of stream or a reset.
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let read = server_side.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(client);
    }

    /// A listener whose accept queue is full: further SYNs are dropped without an answer.
    async fn swamped_listener() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // Linux queues backlog + 1 connections.
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        while let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            queued.push(stream);
            assert!(queued.len() < 16, "the accept queue never filled");
        }
        (listener, queued)
    }

    #[tokio::test]
    async fn a_full_backlog_with_a_live_agent_port_is_no_loss() {
        let (swamped, _queued) = swamped_listener().await;
        let distccd = swamped.local_addr().unwrap();
        let bound = Duration::from_millis(500);
        assert!(matches!(
            check_port(distccd, bound).await,
            PortCheck::Silent(_)
        ));
        // The agent restarting: its port refuses.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = closed.local_addr().unwrap();
        drop(closed);
        let ports = check_machine(distccd, agent, bound).await;
        assert!(
            matches!(ports.agent_check, PortCheck::Refused(_)),
            "{ports:?}"
        );
        assert!(!ports.confirm_loss(), "{}", ports.describe());
        // The agent serving: its port answers.
        let serving = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ports = check_machine(distccd, serving.local_addr().unwrap(), bound).await;
        assert_eq!(ports.agent_check, PortCheck::Answers);
        assert!(!ports.confirm_loss());
        // Silent on both ports: that is a loss.
        let (also_swamped, _also_queued) = swamped_listener().await;
        let ports = check_machine(distccd, also_swamped.local_addr().unwrap(), bound).await;
        assert!(ports.confirm_loss(), "{}", ports.describe());
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
