//! Load for the agent's bounds (issue 10, section 4), shared by the flood test and the
//! benchmark: many idle TCP connections held open, and a process's CPU time.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

/// `count` TCP connections to `addr` that never send a byte, held until dropped.
pub struct IdleConnections {
    pub streams: Vec<TcpStream>,
}

impl IdleConnections {
    /// Open them one after the other (each connect bounded by 5 s). Needs `count` free
    /// descriptors in this process (`ulimit -n`).
    pub fn open(addr: SocketAddr, count: usize) -> Result<Self> {
        let streams = (0..count)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .with_context(|| format!("idle connection {i} of {count} to {addr}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { streams })
    }

    /// How many of them the peer has closed (end of file or an error); does not block.
    /// Whatever the peer sent (an HTTP/2 server speaks first: SETTINGS) is read and
    /// dropped.
    pub fn closed_by_peer(&self) -> usize {
        self.streams.iter().filter(|s| is_closed_by_peer(s)).count()
    }
}

fn is_closed_by_peer(mut stream: &TcpStream) -> bool {
    use std::io::Read;
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// User + system CPU time of host process `pid` so far (/proc/PID/stat).
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // After "pid (comm) ", fields start at 3 (state); utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("bad stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("field {} of /proc/{pid}/stat", i + 3))?
            .parse()
            .context("not a number")
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|hz| u64::try_from(hz).ok())
        .unwrap_or(100);
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 1000 / hz))
}
