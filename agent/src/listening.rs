//! Whether a TCP port is listening on this host, read from `/proc/net/tcp{,6}` so that
//! checking costs distccd nothing (a probe connection would show up as a bad request).

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
