//! End to end, on every backend: the relay's own addresses as peers (issue 10, findings 1 and 2).
//!
//! Finding 1 runs on loopback: the relay IP is 127.0.0.1, which the test config allows explicitly (as the
//! loopback demo does), so only the relay port range rule is left to refuse an ordinary socket there.
//!
//! Finding 2 runs in a network namespace the test creates (root only; skipped with a message otherwise):
//! a veth pair inside it with addresses in 198.18.0.0/15, a public relay IP outside every built-in deny
//! range, one more public interface address, and no route out, so nothing leaves the machine. On
//! loopback it would pass by accident, because 127.0.0.0/8 is denied anyway.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::netns::Netns;
use common::*;
use turnpike::policy::PeerPolicy;
use turnpike::wire::{Attribute, Message, Method};

/// The data of the Data indication `bytes`, with its peer.
fn data_indication(bytes: &[u8]) -> (SocketAddr, Vec<u8>) {
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

const CLIENT_IP: &str = "198.18.0.1";
const LISTEN_IP: &str = "198.18.0.2";
/// Public addresses (the built-in table allows them as peers): the relay IP and one more interface
/// address that no configuration names.
const RELAY_IP: &str = "203.0.114.10";
const OTHER_IF_IP: &str = "203.0.114.99";

#[test]
fn the_relays_own_addresses_are_denied_peers_in_a_namespace() {
    let name = format!("tp-own-{}", std::process::id());
    let Some(ns) = Netns::with_veth_pair(
        &name,
        &["198.18.0.1/15", "203.0.114.99/32"],
        &["198.18.0.2/15", "203.0.114.10/32"],
    ) else {
        return;
    };
    let relay_ip: std::net::IpAddr = RELAY_IP.parse().unwrap();
    assert!(
        PeerPolicy::new()
            .check(SocketAddr::new(relay_ip, 53))
            .is_ok(),
        "the relay IP is outside every built-in deny range"
    );
    let name = ns.0.clone();
    // The whole scenario runs on a thread inside the namespace; the relay's threads inherit it.
    std::thread::spawn(move || {
        turnpike::sys::enter_netns(&name).unwrap();
        for (i, backend) in backends().into_iter().enumerate() {
            in_namespace(backend, 38000 + 1000 * i as u16);
        }
    })
    .join()
    .unwrap();
}

fn in_namespace(backend: turnpike::dataplane::BackendKind, base: u16) {
    let mut s = settings(backend, 1, base);
    s.server.relay_ips = vec![RELAY_IP.parse().unwrap()];
    // The clients and the test peer live in the benchmarking range: allow it, as an operator would
    // allow an internal network. The relay IP and the other interface address are not allowed.
    s.server.peer_policy = PeerPolicy::new().with_allow(vec!["198.18.0.0/15".parse().unwrap()]);
    s.listen = vec![SocketAddr::new(LISTEN_IP.parse().unwrap(), 0)];
    let relay = start(s);
    let server = relay.listen_addrs()[0];
    // Services bound to 0.0.0.0, as DNS or memcached would be: they answer on every own address.
    let services: Vec<UdpSocket> = [53, 11211]
        .iter()
        .map(|p| UdpSocket::bind(("0.0.0.0", *p)).unwrap())
        .collect();
    for svc in &services {
        svc.set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
    }
    let peer = UdpSocket::bind((CLIENT_IP, 6000)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();

    let mut c = Client::new_on(CLIENT_IP, server, "alice", "alice-pass");
    let relayed = c.allocate();
    assert_eq!(relayed.ip().to_string(), RELAY_IP);
    for ip in [RELAY_IP, OTHER_IF_IP, LISTEN_IP] {
        for port in [53, 123, 161, 11211] {
            let target: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            let r = c.authed(
                Method::CREATE_PERMISSION,
                &[Attribute::XorPeerAddress(target)],
            );
            let code = Client::error_code(&r);
            // The listen IP is in the allowed range, so only its service ports stay closed there.
            if ip == LISTEN_IP && port != server.port() {
                continue;
            }
            assert_eq!(code, Some(403), "{backend:?}: CreatePermission {target}");
            let r = c.authed(
                Method::CHANNEL_BIND,
                &[
                    Attribute::ChannelNumber(0x4000),
                    Attribute::XorPeerAddress(target),
                ],
            );
            assert_eq!(
                Client::error_code(&r),
                Some(403),
                "{backend:?}: ChannelBind {target}"
            );
        }
    }
    // The listener itself is a service port on an allowed IP: refused too.
    let r = c.authed(
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(server)],
    );
    assert_eq!(
        Client::error_code(&r),
        Some(403),
        "{backend:?}: the listener"
    );

    // Send indications to the services are dropped; an allowed peer gets its data (the setup works).
    for port in [53, 11211] {
        c.send_indication(format!("{RELAY_IP}:{port}").parse().unwrap(), b"leak");
    }
    c.permit(peer.local_addr().unwrap());
    c.send_indication(peer.local_addr().unwrap(), b"fine");
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"fine"[..], relayed));
    for svc in &services {
        assert!(
            svc.recv_from(&mut buf).is_err(),
            "{backend:?}: a service got data"
        );
    }
    relay.stop().unwrap();
}
