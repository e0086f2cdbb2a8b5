//! The agent's server bounds in one process (no containers): tonic served through
//! `connections::bounded_server` and `bounded_incoming`, as daemon.rs serves it, over TLS.
//!
//! Run with `cargo test -p distcc-agent --test bounds`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use distcc_agent::connections::{bounded_incoming, bounded_server};
use distcc_agent::limits::Limits;
use distcc_testbed::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A TLS server with the health service and `limits`; returns its address and CA.
async fn serve_tls(limits: Limits) -> (SocketAddr, String) {
    let pki = TestPki::generate("w1", "127.0.0.1".parse().unwrap()).unwrap();
    let tls =
        ServerTlsConfig::new().identity(Identity::from_pem(&pki.server.cert, &pki.server.key));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let mut server = bounded_server(&limits, Some(tls)).unwrap();
    let incoming = bounded_incoming(listener, &limits, limits.max_connections);
    tokio::spawn(
        server
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, std::future::pending()),
    );
    (addr, pki.ca)
}

async fn health_over_tls(addr: SocketAddr, ca: &str) -> Result<(), String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("w1");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
        .map_err(|e| format!("check: {e:?}"))
}

/// A client that keeps sending a ClientHello one byte at a time (so the idle timeout never
/// fires) is cut off by the handshake timeout, and while it trickles, other clients
/// complete their handshakes and calls: a slow handshake does not block accepting.
#[tokio::test(flavor = "multi_thread")]
async fn a_trickled_tls_handshake_is_cut_off_and_blocks_no_one() {
    let limits = Limits {
        tls_handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let idle_timeout = limits.idle_timeout;
    let (addr, ca) = serve_tls(limits).await;

    let slow = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = slow.into_split();
    let started = Instant::now();
    // A TLS handshake record header announcing 512 bytes, then the bytes, slowly.
    let trickle = tokio::spawn(async move {
        let mut sent = 0usize;
        for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00]
            .into_iter()
            .chain(std::iter::repeat(0))
        {
            if writer.write_all(&[byte]).await.is_err() {
                return sent;
            }
            sent += 1;
            // The pace is the behaviour under test (slower than a handshake, faster
            // than the idle timeout), not synchronisation.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });

    // Meanwhile the server accepts and serves others.
    for _ in 0..3 {
        health_over_tls(addr, &ca)
            .await
            .expect("a TLS client during the slow handshake");
    }

    // The slow client is closed (EOF or reset) although it never went quiet.
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the trickling handshake was never cut off");
    assert!(
        started.elapsed() < idle_timeout,
        "closed by the handshake timeout, not the idle timeout"
    );
    trickle.abort();
}
