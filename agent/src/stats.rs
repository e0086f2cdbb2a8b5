//! distccd's `--stats` page: fetched over TCP, parsed into [`DistccdStats`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The statistics distccd reports about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DistccdStats {
    /// Every key whose value is a number, as distccd names it (`dcc_compile_ok`...).
    pub values: BTreeMap<String, f64>,
    /// Keys with text values (`dcc_longest_job`, `dcc_max_RSS_name`...).
    pub text: BTreeMap<String, String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StatsError {
    #[error("no <distccstats> section in the page")]
    NoSection,
    #[error("<distccstats> section is not closed")]
    Unterminated,
    #[error("line {line}: expected `key value`, got {text:?}")]
    BadLine { line: usize, text: String },
    #[error("cannot read stats from {addr}: {message}")]
    Fetch { addr: String, message: String },
}

impl DistccdStats {
    /// Parse the page: an HTTP/1.0 header, then `key value` lines between
    /// `<distccstats>` tags. Free space comes as `80251 MB`; its unit is dropped.
    pub fn parse(page: &str) -> Result<Self, StatsError> {
        let mut lines = page.lines().enumerate();
        lines
            .by_ref()
            .find(|(_, l)| l.trim() == "<distccstats>")
            .ok_or(StatsError::NoSection)?;
        let mut stats = DistccdStats::default();
        for (index, raw) in lines {
            let line = raw.trim();
            if line == "</distccstats>" {
                return Ok(stats);
            }
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(char::is_whitespace)
                .map(|(k, v)| (k, v.trim()))
                .filter(|(k, _)| k.starts_with("dcc_"))
                .ok_or_else(|| StatsError::BadLine {
                    line: index + 1,
                    text: raw.to_owned(),
                })?;
            let numeric = value.strip_suffix(" MB").unwrap_or(value);
            match numeric.parse::<f64>() {
                Ok(number) if number.is_finite() => {
                    stats.values.insert(key.to_owned(), number);
                }
                _ => {
                    stats.text.insert(key.to_owned(), value.to_owned());
                }
            }
        }
        Err(StatsError::Unterminated)
    }

    /// A counter; negative or missing values read as 0.
    pub fn counter(&self, key: &str) -> u64 {
        self.values
            .get(key)
            .map_or(0, |v| if *v > 0.0 { *v as u64 } else { 0 })
    }

    /// Fetch and parse the page from distccd's stats port.
    pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<Self, StatsError> {
        let fetch_err = |message: String| StatsError::Fetch {
            addr: addr.to_string(),
            message,
        };
        let read = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut page = Vec::new();
            // The page is a few hundred bytes; bound it so a wrong peer cannot flood us.
            (&mut stream).take(64 * 1024).read_to_end(&mut page).await?;
            Ok::<_, std::io::Error>(page)
        };
        let page = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| fetch_err(format!("no answer within {timeout:?}")))?
            .map_err(|e| fetch_err(e.to_string()))?;
        Self::parse(&String::from_utf8_lossy(&page))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const REAL_PAGE: &str = include_str!("../testdata/distccd-stats-3.4.txt");

    #[test]
    fn parses_a_real_page_from_distccd_3_4() {
        let stats = DistccdStats::parse(REAL_PAGE).unwrap();
        assert_eq!(stats.counter("dcc_compile_ok"), 1);
        assert_eq!(stats.counter("dcc_tcp_accept"), 1);
        assert_eq!(stats.counter("dcc_max_kids"), 3);
        assert_eq!(stats.counter("dcc_free_space"), 80251);
        assert_eq!(stats.values["dcc_load1"], 0.63);
        // dcc_io_rate is -1 when unknown: kept as a value, read as 0 as a counter.
        assert_eq!(stats.values["dcc_io_rate"], -1.0);
        assert_eq!(stats.counter("dcc_io_rate"), 0);
        assert_eq!(stats.text["dcc_longest_job"], "/tmp/t.c");
        assert_eq!(
            stats.text["dcc_longest_job_compiler"],
            "x86_64-linux-gnu-gcc"
        );
        assert_eq!(stats.values.len() + stats.text.len(), 27);
    }

    #[test]
    fn rejects_pages_without_the_section() {
        assert_eq!(
            DistccdStats::parse("HTTP/1.0 200 OK\r\n\r\nhello"),
            Err(StatsError::NoSection)
        );
        assert_eq!(DistccdStats::parse(""), Err(StatsError::NoSection));
    }

    #[test]
    fn rejects_a_truncated_page() {
        let cut = &REAL_PAGE[..REAL_PAGE.find("dcc_max_kids").unwrap()];
        assert_eq!(DistccdStats::parse(cut), Err(StatsError::Unterminated));
    }

    #[test]
    fn rejects_a_malformed_line_with_its_number() {
        let page = "<distccstats>\ndcc_compile_ok 1\nnot a stats line\n</distccstats>\n";
        assert_eq!(
            DistccdStats::parse(page),
            Err(StatsError::BadLine {
                line: 3,
                text: "not a stats line".to_owned()
            })
        );
    }

    #[tokio::test]
    async fn fetch_reports_a_closed_port() {
        // Bind then drop to get a port nobody listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = DistccdStats::fetch(addr, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, StatsError::Fetch { .. }), "{err}");
    }

    #[tokio::test]
    async fn fetch_reads_a_served_page() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 64];
            let _ = socket.read(&mut request).await;
            socket.write_all(REAL_PAGE.as_bytes()).await.unwrap();
        });
        let stats = DistccdStats::fetch(addr, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(stats.counter("dcc_compile_ok"), 1);
    }
}
