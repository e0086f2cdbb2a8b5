//! distccd's last log lines, for rollback reports. They come from `distccd-log.socket`
//! (systemd/distccd-log/): each connection runs one fixed `journalctl -u distccd.service`
//! and only the agent's user may connect, so the agent itself needs no read access to the
//! system journal (the `systemd-journal` group would give it every unit's logs).
//! The command is fixed in the unit, so the lines are distccd.service's whatever the
//! agent's `unit` setting says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Where `distccd-log.socket` listens.
pub const DISTCCD_LOG_SOCKET: &str = "/run/distccd-log.sock";
/// The helper sends about 15 lines; anything much longer is cut, never buffered whole.
const MAX_BYTES: u64 = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum LogTailError {
    #[error("connecting to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading from {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} did not answer within {} s", path.display(), TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
}

/// Everything the socket at `path` sends (at most [`MAX_BYTES`]) until it closes.
pub async fn read_tail(path: &Path) -> Result<String, LogTailError> {
    let read = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| LogTailError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let mut bytes = Vec::new();
        stream
            .take(MAX_BYTES)
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| LogTailError::Read {
                path: path.to_owned(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&bytes).trim_end().to_owned())
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .map_err(|_| LogTailError::Timeout {
            path: path.to_owned(),
        })?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn reads_what_the_socket_sends_and_bounds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut short, _) = listener.accept().await.unwrap();
            short.write_all(b"line 1\nline 2\n").await.unwrap();
            drop(short);
            let (mut long, _) = listener.accept().await.unwrap();
            // Longer than the bound: the reader stops at MAX_BYTES instead of waiting.
            let chunk = vec![b'x'; 16 * 1024];
            for _ in 0..8 {
                if long.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        assert_eq!(read_tail(&path).await.unwrap(), "line 1\nline 2");
        let long = read_tail(&path).await.unwrap();
        assert_eq!(long.len() as u64, MAX_BYTES);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_tail(&dir.path().join("absent.sock"))
            .await
            .unwrap_err();
        assert!(matches!(err, LogTailError::Connect { .. }), "{err}");
    }
}
