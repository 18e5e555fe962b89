//! End to end, on every backend: the relay's own addresses as peers (issue 10, findings 1 and 2).
//!
//! Finding 1 runs on loopback: the relay IP is 127.0.0.1, which the test config allows explicitly (as the
//! loopback demo does), so only the relay port range rule is left to refuse an ordinary socket there.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::ErrorKind;
use std::net::UdpSocket;

use common::*;
use turnpike::wire::{Message, Method};

/// The data of the Data indication `bytes`, with its peer.
fn data_indication(bytes: &[u8]) -> (std::net::SocketAddr, Vec<u8>) {
    let m = Message::parse(bytes).unwrap();
    assert_eq!(m.message_type().method, Method::DATA);
    (
        m.attrs.xor_peer_address.unwrap(),
        m.attrs.data.unwrap().to_vec(),
    )
}

#[test]
fn relay_to_relay_reaches_only_the_exact_relayed_address() {
    for (i, backend) in backends().into_iter().enumerate() {
        let base = 36000 + 1000 * i as u16;
        // An ordinary local socket on the relay IP, inside the relay port range, with no allocation.
        let squatter = UdpSocket::bind(("127.0.0.1", base + 999)).unwrap();
        squatter.set_nonblocking(true).unwrap();
        let relay = start(settings(backend, 1, base));
        let server = relay.listen_addrs()[0];
        let mut alice = Client::new(server, "alice", "alice-pass");
        let mut bob = Client::new(server, "bob", "bob-pass");
        let bob_relay = bob.allocate();
        let alice_relay = alice.allocate();
        assert_ne!(bob_relay, squatter.local_addr().unwrap());
        alice.permit(bob_relay);
        bob.permit(alice_relay);

        // Alice → the squatter (her permission covers the IP), then → bob's relayed address. The worker
        // handles them in order, so once bob has the second, the first was sent if it ever was.
        alice.send_indication(squatter.local_addr().unwrap(), b"leak");
        alice.send_indication(bob_relay, b"hi bob");
        assert_eq!(
            data_indication(&bob.recv()),
            (alice_relay, b"hi bob".to_vec())
        );
        let mut buf = [0u8; 64];
        let got = squatter.recv_from(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "{backend:?}: the squatter received {got:?}"
        );

        // The squatter → alice's relayed address (permitted IP), then bob → alice: alice's first
        // message must be bob's.
        squatter
            .send_to(b"spoof", alice_relay)
            .expect("send from the squatter");
        bob.send_indication(alice_relay, b"hi alice");
        assert_eq!(
            data_indication(&alice.recv()),
            (bob_relay, b"hi alice".to_vec())
        );
        relay.stop().unwrap();
    }
}
