//! Whether a TCP port is listening on this host, and who holds it, read from
//! `/proc/net/tcp{,6}` so that checking costs distccd nothing (a probe connection would
//! show up as a bad request). "Something listens on 3632" is not "distccd serves": the
//! agent's own port, sshd's or any other program's would pass that test.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

const LISTEN: &str = "0A";
const ESTABLISHED: &str = "01";

fn tables() -> impl Iterator<Item = String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
}

/// True when some socket in this network namespace listens on `port`.
pub fn is_listening(port: u16) -> bool {
    tables().any(|table| local_ports(&table, LISTEN).contains(&port))
}

/// Connections established to local `port`: for distccd's port, the compiles in flight
/// (distccd's own `dcc_current_load` counts runnable processes on the host instead).
pub fn established_to(port: u16) -> usize {
    tables()
        .map(|table| {
            local_ports(&table, ESTABLISHED)
                .iter()
                .filter(|p| **p == port)
                .count()
        })
        .sum()
}

/// Local ports of the sockets in `state` (`0A` LISTEN, `01` ESTABLISHED) in a
/// `/proc/net/tcp` table.
pub fn local_ports(table: &str, state: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            if fields.nth(1)? != state {
                return None;
            }
            let port = local.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// One listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub local: SocketAddr,
    /// The uid that opened the socket.
    pub uid: u32,
    /// The socket's inode: `/proc/PID/fd/N` links to `socket:[INODE]` in its holders.
    pub inode: u64,
}

/// An address in `/proc/net/tcp{,6}`: the kernel prints the bytes of each 32-bit word in
/// host (little-endian) order.
fn parse_address(hex: &str) -> Option<IpAddr> {
    let word = |chunk: &str| u32::from_str_radix(chunk, 16).ok().map(u32::to_le_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, out) in bytes.chunks_mut(4).enumerate() {
                out.copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// The listening sockets of a `/proc/net/tcp{,6}` table.
pub fn parse_listeners(table: &str) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let (addr, port) = fields.get(1)?.rsplit_once(':')?;
            Some(Listener {
                local: SocketAddr::new(parse_address(addr)?, u16::from_str_radix(port, 16).ok()?),
                uid: fields.get(7)?.parse().ok()?,
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The sockets listening on `port` in this network namespace.
pub fn listeners_on(port: u16) -> Vec<Listener> {
    tables()
        .flat_map(|table| parse_listeners(&table))
        .filter(|l| l.local.port() == port)
        .collect()
}

/// What the agent can learn about distccd's process: its uid always (`/proc/PID/status`
/// is world-readable), its sockets only where `/proc/PID/fd` is readable (same user or
/// root: not for the unprivileged agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSockets {
    pub uid: u32,
    /// `/proc/PID/comm`. Until the exec, systemd's forked child is still root and named
    /// `(distccd)`: Type=simple makes the unit active before distccd runs.
    pub comm: String,
    pub inodes: Option<HashSet<u64>>,
}

/// distccd's command name, once it runs.
pub const DISTCCD_COMM: &str = "distccd";

impl ProcessSockets {
    pub fn of(pid: u32) -> Option<Self> {
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .nth(1)? // effective
            .parse()
            .ok()?;
        let comm = std::fs::read_to_string(proc_dir.join("comm")).ok()?;
        Some(Self {
            uid,
            comm: comm.trim().to_owned(),
            inodes: socket_inodes(&proc_dir),
        })
    }

    /// Whether `listener` is one of this process's sockets: by inode where the agent can
    /// see the process's descriptors, else by the uid that opened it, once distccd runs
    /// (another program of distccd's user is indistinguishable then).
    pub fn holds(&self, listener: &Listener) -> bool {
        match &self.inodes {
            Some(inodes) => inodes.contains(&listener.inode),
            None => listener.uid == self.uid && self.comm == DISTCCD_COMM,
        }
    }
}

/// The socket inodes among a process's descriptors; `None` when they cannot be read.
fn socket_inodes(proc_dir: &Path) -> Option<HashSet<u64>> {
    let entries = std::fs::read_dir(proc_dir.join("fd")).ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|target| {
                let target = target.to_str()?;
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect(),
    )
}

/// Who holds a port, as far as the agent can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub local: SocketAddr,
    pub uid: u32,
    /// pid and command name, when the holder's descriptors are readable.
    pub process: Option<(u32, String)>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = nix::unistd::User::from_uid(self.uid.into())
            .ok()
            .flatten()
            .map_or_else(|| self.uid.to_string(), |u| u.name);
        match &self.process {
            Some((pid, comm)) => write!(f, "{comm} (pid {pid}, user {user}) on {}", self.local),
            None => write!(f, "a process of user {user} on {}", self.local),
        }
    }
}

/// Who serves `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortOwner {
    /// One of distccd's sockets listens there.
    Distccd,
    Nobody,
    /// Only other programs listen there.
    Others(Vec<Listener>),
}

/// Decide who serves: pure, so the rule is tested without processes.
pub fn owner(listeners: Vec<Listener>, distccd: Option<&ProcessSockets>) -> PortOwner {
    if distccd.is_some_and(|d| listeners.iter().any(|l| d.holds(l))) {
        PortOwner::Distccd
    } else if listeners.is_empty() {
        PortOwner::Nobody
    } else {
        PortOwner::Others(listeners)
    }
}

/// Who serves `port`, with distccd's main process `pid`.
pub fn port_owner(port: u16, pid: u32) -> PortOwner {
    let distccd = (pid > 0).then(|| ProcessSockets::of(pid)).flatten();
    owner(listeners_on(port), distccd.as_ref())
}

/// The holders of `listeners`, with pid and command name where visible.
pub fn holders(listeners: &[Listener]) -> Vec<Holder> {
    let wanted: HashSet<u64> = listeners.iter().map(|l| l.inode).collect();
    let mut found: std::collections::HashMap<u64, (u32, String)> = Default::default();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for pid in entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let proc_dir = Path::new("/proc").join(pid.to_string());
            let Some(inodes) = socket_inodes(&proc_dir) else {
                continue;
            };
            for inode in inodes.intersection(&wanted) {
                let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
                found
                    .entry(*inode)
                    .or_insert_with(|| (pid, comm.trim().to_owned()));
            }
        }
    }
    listeners
        .iter()
        .map(|l| Holder {
            local: l.local,
            uid: l.uid,
            process: found.get(&l.inode).cloned(),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
        0: 00000000:0E30 00000000:0000 0A 00000000:00000000 00:00000000 00000000   110        0 1001 1 0 100 0 0 10 0\n   \
        1: 0100007F:0E32 00000000:0000 0A 00000000:00000000 00:00000000 00000000   995        0 1002 1 0 100 0 0 10 0\n   \
        2: 0100007F:0E31 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   110        0 1003 1 0 20 4 30 10 -1\n";

    #[test]
    fn parses_listeners_with_owner_and_inode() {
        let listeners = parse_listeners(TABLE);
        assert_eq!(
            listeners,
            vec![
                Listener {
                    local: "0.0.0.0:3632".parse().unwrap(),
                    uid: 110,
                    inode: 1001
                },
                Listener {
                    local: "127.0.0.1:3634".parse().unwrap(),
                    uid: 995,
                    inode: 1002
                },
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0 100 0 0 10 0\n";
        assert_eq!(
            parse_listeners(v6),
            vec![Listener {
                local: "[::1]:22".parse().unwrap(),
                uid: 0,
                inode: 77
            }]
        );
    }

    #[test]
    fn only_distccds_own_socket_counts() {
        let on = |uid, inode| Listener {
            local: "0.0.0.0:3632".parse().unwrap(),
            uid,
            inode,
        };
        let by_inode = ProcessSockets {
            uid: 110,
            comm: "distccd".into(),
            inodes: Some(HashSet::from([7])),
        };
        let by_uid = ProcessSockets {
            uid: 110,
            comm: "distccd".into(),
            inodes: None,
        };
        // systemd's child before the exec: still root, not yet distccd.
        let before_exec = ProcessSockets {
            uid: 0,
            comm: "(distccd)".into(),
            inodes: None,
        };
        assert_eq!(
            owner(vec![on(0, 9)], Some(&before_exec)),
            PortOwner::Others(vec![on(0, 9)])
        );
        assert_eq!(owner(vec![on(110, 7)], Some(&by_inode)), PortOwner::Distccd);
        // Same uid, another socket: where the descriptors are visible, that is not distccd's.
        assert_eq!(
            owner(vec![on(110, 8)], Some(&by_inode)),
            PortOwner::Others(vec![on(110, 8)])
        );
        assert_eq!(owner(vec![on(110, 8)], Some(&by_uid)), PortOwner::Distccd);
        assert_eq!(
            owner(vec![on(0, 9)], Some(&by_uid)),
            PortOwner::Others(vec![on(0, 9)])
        );
        assert_eq!(owner(vec![], Some(&by_uid)), PortOwner::Nobody);
        // distccd not running: whoever listens is someone else.
        assert_eq!(
            owner(vec![on(110, 7)], None),
            PortOwner::Others(vec![on(110, 7)])
        );
    }

    #[test]
    fn names_the_holder_of_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        let PortOwner::Others(found) = port_owner(port, 0) else {
            panic!("our listener on {port} is someone else's when distccd is not running");
        };
        assert_eq!(port_owner(port, me), PortOwner::Distccd, "our own socket");
        let holders = holders(&found);
        assert_eq!(holders.len(), 1);
        let (pid, _comm) = holders[0]
            .process
            .clone()
            .expect("our own fds are readable");
        assert_eq!(pid, me);
        assert!(
            holders[0].to_string().contains(&format!("pid {me}")),
            "{}",
            holders[0]
        );
    }

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 00000000:0E30 00000000:0000 0A 00000000:00000000 00:00000000 00000000   110        0 1 1 0 100 0 0 10 0\n   \
            1: 0100007F:0E31 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   110        0 2 1 0 20 4 30 10 -1\n";
        assert_eq!(local_ports(table, LISTEN), vec![3632]);
        assert_eq!(local_ports(table, ESTABLISHED), vec![3633]);
    }

    #[test]
    fn sees_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(is_listening(port));
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server_side, _) = listener.accept().unwrap();
        assert_eq!(established_to(port), 1);
        drop(client);
        drop(listener);
        assert!(!is_listening(port));
    }
}
