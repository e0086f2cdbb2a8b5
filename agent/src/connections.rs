//! Accepting client connections within bounds. Wraps the listener stream handed to tonic:
//!
//! - at most `max_connections` accepted connections at once (TLS handshakes included, as
//!   tonic runs them on what this stream yields); one past the cap is closed as soon as it
//!   is accepted, so the backlog keeps draining and the refusal is immediate;
//! - a connection that sends nothing for `idle_timeout` is closed (read fails with
//!   `TimedOut`, hyper drops the connection): a client that opens a socket and never
//!   speaks holds its slot only that long; live clients answer the server's HTTP/2 pings;
//! - when `accept(2)` fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
//!   ENOMEM) it backs off before trying again. tonic's accept loop retries at once, and the
//!   pending connection stays in the backlog, so every retry fails the same way: that
//!   loop spun a CPU core with 1,100 idle connections held against a 1,024-descriptor
//!   limit, and no new client was ever accepted (docs/SECURITY.md, section 4).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::Stream;
use nix::errno::Errno;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Server, ServerTlsConfig};

use crate::limits::Limits;

/// tonic's server with the `[limits]` that HTTP/2 and tonic enforce: streams per
/// connection, request time, keepalive pings, and with TLS the handshake time. tonic
/// 0.14 runs each TLS handshake in a task of its own (a JoinSet in its accept stream), so
/// a slow handshake does not hold up accepting others; the timeout bounds how long one
/// may hold its connection slot.
pub fn bounded_server(
    limits: &Limits,
    tls: Option<ServerTlsConfig>,
) -> Result<Server, tonic::transport::Error> {
    let server = Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout));
    match tls {
        Some(tls) => server.tls_config(tls.timeout(limits.tls_handshake_timeout)),
        None => Ok(server),
    }
}

/// `listener` as the stream to hand to tonic's `serve_with_incoming_shutdown`, with at
/// most `max_connections` connections and `limits.idle_timeout`.
pub fn bounded_incoming(
    listener: TcpListener,
    limits: &Limits,
    max_connections: usize,
) -> BoundedIncoming<TcpIncoming> {
    // tonic applies its TCP_NODELAY default only to listeners it binds itself: without it
    // small responses wait on delayed ACKs (40 ms steps measured, docs/BENCHMARKS.md).
    // TCP keepalive finds builders that vanished while holding a status stream.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    BoundedIncoming::new(incoming, max_connections, limits.idle_timeout)
}

/// How long accepting pauses after the process ran out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this period about refused connections or failing accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What to do after `accept(2)` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// Out of descriptors or memory: retrying at once fails the same way.
    BackOff,
    /// That one connection failed (reset before accept, signal): accept the next.
    Retry,
}

/// Classify an accept error (pure).
pub fn classify_accept_error(error: &io::Error) -> AcceptFailure {
    match error.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM) => {
            AcceptFailure::BackOff
        }
        _ => AcceptFailure::Retry,
    }
}

/// Counters of the connection bounds, shared with whoever reports them.
#[derive(Debug)]
pub struct ConnectionStats {
    slots: Arc<Semaphore>,
    max: usize,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    accept_backoffs: AtomicU64,
}

impl ConnectionStats {
    /// Connections held now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }
    /// The cap in force.
    pub fn max(&self) -> usize {
        self.max
    }
    /// Connections closed at accept because the cap was reached, since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Connections closed because they sent nothing for the idle timeout, since start.
    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.load(Ordering::Relaxed)
    }
    /// Times accepting paused because the process was out of descriptors or memory.
    pub fn accept_backoffs(&self) -> u64 {
        self.accept_backoffs.load(Ordering::Relaxed)
    }
}

/// The listener stream, bounded. `S` is tonic's `TcpIncoming` (it sets TCP_NODELAY and
/// keepalive on each accepted socket).
pub struct BoundedIncoming<S> {
    inner: S,
    stats: Arc<ConnectionStats>,
    idle_timeout: Duration,
    backoff: Option<Pin<Box<Sleep>>>,
    last_warning: Option<Instant>,
}

impl<S> BoundedIncoming<S> {
    pub fn new(inner: S, max_connections: usize, idle_timeout: Duration) -> Self {
        let max = max_connections.max(1);
        Self {
            inner,
            stats: Arc::new(ConnectionStats {
                slots: Arc::new(Semaphore::new(max)),
                max,
                refused: AtomicU64::new(0),
                idle_closed: AtomicU64::new(0),
                accept_backoffs: AtomicU64::new(0),
            }),
            idle_timeout,
            backoff: None,
            last_warning: None,
        }
    }

    pub fn stats(&self) -> Arc<ConnectionStats> {
        self.stats.clone()
    }

    /// Whether a warning may be logged now (at most one per [`WARN_EVERY`]).
    fn may_warn(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            return false;
        }
        self.last_warning = Some(now);
        true
    }
}

impl<S> Stream for BoundedIncoming<S>
where
    S: Stream<Item = io::Result<TcpStream>> + Unpin,
{
    type Item = io::Result<BoundedConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(backoff) = this.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            // tokio's cooperative budget makes this poll return Pending after a burst,
            // so a flood of refused connections cannot monopolise the runtime.
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(stream)) => match this.stats.slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        return Poll::Ready(Some(Ok(BoundedConn::new(
                            stream,
                            slot,
                            this.idle_timeout,
                            this.stats.clone(),
                        ))));
                    }
                    Err(_) => {
                        this.stats.refused.fetch_add(1, Ordering::Relaxed);
                        if this.may_warn() {
                            tracing::warn!(
                                peer = ?stream.peer_addr().ok(),
                                max = this.stats.max,
                                refused = this.stats.refused(),
                                "connection limit reached (limits.max_connections): closing new connections"
                            );
                        }
                        drop(stream);
                    }
                },
                Some(Err(error)) => match classify_accept_error(&error) {
                    AcceptFailure::BackOff => {
                        this.stats.accept_backoffs.fetch_add(1, Ordering::Relaxed);
                        if this.may_warn() {
                            tracing::warn!(
                                %error,
                                open = this.stats.open(),
                                "accept failed; pausing {ACCEPT_BACKOFF:?} (raise LimitNOFILE= or lower limits.max_connections)"
                            );
                        }
                        this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    }
                    AcceptFailure::Retry => tracing::debug!(%error, "accept failed"),
                },
            }
        }
    }
}

/// An accepted connection holding one slot of the cap until it is dropped, and closed by
/// its reader when the client sends nothing for the idle timeout.
pub struct BoundedConn {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle_timeout: Duration,
    last_read: Instant,
    /// Fires at `last_read + idle_timeout` or earlier; re-armed lazily, so a read costs a
    /// clock reading, not a timer update.
    idle: Pin<Box<Sleep>>,
    stats: Arc<ConnectionStats>,
}

impl BoundedConn {
    fn new(
        io: TcpStream,
        slot: OwnedSemaphorePermit,
        idle_timeout: Duration,
        stats: Arc<ConnectionStats>,
    ) -> Self {
        let now = Instant::now();
        Self {
            io,
            _slot: slot,
            idle_timeout,
            last_read: now,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            stats,
        }
    }

    /// Pending while the client has sent something within the idle timeout; Ready once
    /// it has not. Registers the waker for the deadline.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.idle.as_mut().poll(cx));
            let deadline = self.last_read + self.idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(());
            }
            self.idle.as_mut().reset(deadline);
        }
    }
}

impl Connected for BoundedConn {
    // The same as a bare TcpStream's, so `Request::remote_addr()` keeps working.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for BoundedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_idle(cx) {
                Poll::Ready(()) => {
                    this.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        peer = ?this.io.peer_addr().ok(),
                        "closing a connection idle for {:?} (limits.idle_timeout_secs)",
                        this.idle_timeout
                    );
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client sent nothing within the idle timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for BoundedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn descriptor_exhaustion_backs_off_other_errors_retry() {
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            let e = io::Error::from_raw_os_error(errno as i32);
            assert_eq!(classify_accept_error(&e), AcceptFailure::BackOff, "{errno}");
        }
        for errno in [Errno::ECONNABORTED, Errno::EINTR, Errno::EPROTO] {
            let e = io::Error::from_raw_os_error(errno as i32);
            assert_eq!(classify_accept_error(&e), AcceptFailure::Retry, "{errno}");
        }
    }

    async fn bounded(
        max: usize,
        idle: Duration,
    ) -> (
        BoundedIncoming<impl Stream<Item = io::Result<TcpStream>> + Unpin>,
        std::net::SocketAddr,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        (BoundedIncoming::new(incoming, max, idle), addr)
    }

    /// Past the cap a connection is closed at once (the client reads EOF), and a slot
    /// freed by a closed connection is taken by the next client.
    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once() {
        let (mut incoming, addr) = bounded(2, Duration::from_secs(600)).await;
        let stats = incoming.stats();
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let s1 = incoming.next().await.unwrap().unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let _s2 = incoming.next().await.unwrap().unwrap();
        assert_eq!(stats.open(), 2);

        let mut c3 = TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn(async move {
            let conn = incoming.next().await.unwrap().unwrap();
            (incoming, conn)
        });
        let mut byte = [0u8; 1];
        assert_eq!(c3.read(&mut byte).await.unwrap(), 0, "refused: EOF at once");
        assert_eq!(stats.refused(), 1);

        drop(s1);
        let mut c4 = TcpStream::connect(addr).await.unwrap();
        let (_incoming, mut s4) = accepting.await.unwrap();
        assert_eq!(stats.open(), 2);
        c4.write_all(b"x").await.unwrap();
        s4.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
    }

    /// A connection that sends nothing is closed after the idle timeout; one that keeps
    /// sending more often than that is not, and its slot is released when it is closed.
    /// (The client's pauses are the behaviour under test, not synchronisation.)
    #[tokio::test]
    async fn silent_connections_time_out_talking_ones_do_not() {
        let idle = Duration::from_secs(1);
        let (mut incoming, addr) = bounded(8, idle).await;
        let stats = incoming.stats();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut silent_conn = incoming.next().await.unwrap().unwrap();
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut talker_conn = incoming.next().await.unwrap().unwrap();

        let silent = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let started = Instant::now();
            let err = silent_conn.read(&mut buf).await.unwrap_err();
            (err.kind(), started.elapsed())
        });
        let rounds = 8;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            for _ in 0..rounds {
                talker_conn.read_exact(&mut buf).await.unwrap();
            }
            talker_conn
        });
        for _ in 0..rounds {
            tokio::time::sleep(idle / 5).await;
            talker.write_all(b"p").await.unwrap();
        }
        // Talked for 1.6 idle timeouts, never silent for one: still open.
        let talker_conn = reader.await.unwrap();
        let (kind, after) = silent.await.unwrap();
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert!(after >= idle / 2, "{after:?}");
        assert_eq!(stats.idle_closed(), 1);
        assert_eq!(stats.open(), 1, "the silent connection's slot is free");
        drop(talker_conn);
        assert_eq!(stats.open(), 0);
    }
}
