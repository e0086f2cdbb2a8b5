//! Whether a TCP port is listening on this host, read from `/proc/net/tcp{,6}` so that
//! checking costs distccd nothing (a probe connection would show up as a bad request).

/// True when some socket in this network namespace listens on `port`.
pub fn is_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .any(|table| listening_ports(&table).contains(&port))
}

/// Local ports of LISTEN sockets (state `0A`) in a `/proc/net/tcp` table.
pub fn listening_ports(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let port = local.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 00000000:0E30 00000000:0000 0A 00000000:00000000 00:00000000 00000000   110        0 1 1 0 100 0 0 10 0\n   \
            1: 0100007F:0E31 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   110        0 2 1 0 20 4 30 10 -1\n";
        assert_eq!(listening_ports(table), vec![3632]);
    }

    #[test]
    fn sees_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(is_listening(port));
        drop(listener);
        assert!(!is_listening(port));
    }
}
