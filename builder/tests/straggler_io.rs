//! The straggler watch's I/O against the real kernel: `ss` lists this namespace's
//! connections with their owner, and aborting one by its 4-tuple fails the client's
//! blocked read at once while its neighbour lives on. Needs CAP_NET_ADMIN (root), as
//! the builder's failover does.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};

use distcc_builder::failover::{cut_one, list_connections};

#[tokio::test]
async fn a_listed_connection_is_aborted_alone() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let mut victim = TcpStream::connect(server).unwrap();
    let mut neighbour = TcpStream::connect(server).unwrap();
    let (_victim_peer, _) = listener.accept().unwrap();
    let (mut neighbour_peer, _) = listener.accept().unwrap();

    let listed = list_connections().await.unwrap();
    let ours: Vec<_> = listed.iter().filter(|c| c.peer == server).collect();
    assert_eq!(ours.len(), 2, "both client ends listed: {listed:?}");
    let me = nix::unistd::getuid().as_raw();
    assert!(
        ours.iter().all(|c| c.uid == me),
        "owner is this process's uid: {ours:?}"
    );
    assert!(ours.iter().any(|c| c.local == victim.local_addr().unwrap()));

    let cut = cut_one(server, victim.local_addr().unwrap()).await.unwrap();
    assert_eq!(cut, 1, "ss reports the one socket closed");
    let mut buf = [0u8; 1];
    let err = victim.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionAborted, "{err}");

    // The neighbour still carries data both ways.
    neighbour.write_all(b"x").unwrap();
    neighbour_peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"x");
    let after = list_connections().await.unwrap();
    assert!(
        !after
            .iter()
            .any(|c| c.local == victim.local_addr().unwrap() && c.peer == server),
        "the aborted connection is gone: {after:?}"
    );
}
