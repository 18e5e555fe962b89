//! End to end, on every backend: a relay behind 1:1 NAT (`relay.external`, issue 15). It binds its
//! relay sockets on the private address (here 127.0.0.1) and tells clients the public one (here
//! 198.51.99.7, which no interface carries). Two relayed clients reach each other at their *public*
//! relayed addresses, as their ICE candidates name them: the relay sends to the private address behind
//! it (no NAT hairpin needed), and the receiver sees the sender's public relayed address, which is what
//! it permitted. Every other port of the public address is refused.
//!
//! That first test needs no NAT in the path. The second puts a real one there: three network namespaces
//! the test creates (root only; skipped with a message otherwise), client ─ NAT ─ relay, where the NAT
//! namespace has an nftables DNAT rule (public → private) and the SNAT for the way back, as a cloud
//! VM's 1:1 NAT does. The client and the peer reach the relay only at the public address. No namespace
//! has a route out. Needs the `nft` binary (Debian's nftables; scripts/test.sh installs it).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::{IpAddr, SocketAddr};

use common::netns::{ip, Netns};
use common::*;
use turnpike::wire::{Attribute, ChannelData, Message, Method};

const PUBLIC: &str = "198.51.99.7";

#[test]
fn behind_one_to_one_nat_clients_see_and_reach_the_public_relayed_address() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 2, 45000 + 1000 * i as u16);
        let public: IpAddr = PUBLIC.parse().unwrap();
        s.server.external = vec![(s.server.relay_ips[0], public)];
        // No explicit allow: a public address is judged as the private one behind it (the datagram
        // goes there), so the loopback allow of the test settings would open both.
        s.server.peer_policy = turnpike::policy::PeerPolicy::new();
        let relay = start(s);
        let server = relay.listen_addrs()[0];
        let mut alice = Client::new(server, "alice", "alice-pass");
        let mut bob = Client::new(server, "bob", "bob-pass");
        let alice_relay = alice.allocate();
        let bob_relay = bob.allocate();
        assert_eq!(
            (alice_relay.ip(), bob_relay.ip()),
            (public, public),
            "{backend:?}"
        );

        alice.permit(bob_relay);
        bob.bind(0x4001, alice_relay);
        // Alice → bob's public relayed address, arriving on bob's channel from alice's.
        alice.send_indication(bob_relay, b"hi bob");
        let got = bob.recv();
        let cd = ChannelData::parse(&got).unwrap();
        assert_eq!(
            (cd.channel(), cd.payload()),
            (0x4001, &b"hi bob"[..]),
            "{backend:?}"
        );
        // Bob → alice over his channel, arriving as a Data indication from bob's public address.
        bob.send_channel(0x4001, b"hi alice");
        let got = alice.recv();
        let m = Message::parse(&got).unwrap();
        assert_eq!(m.message_type().method, Method::DATA);
        assert_eq!(
            (m.attrs.xor_peer_address, m.attrs.data),
            (Some(bob_relay), Some(&b"hi alice"[..])),
            "{backend:?}"
        );

        // The public address is the relay's own: no other port of it (nor the listener's) is a peer.
        for port in [53, server.port(), bob_relay.port().wrapping_add(500)] {
            let target = SocketAddr::new(public, port);
            let r = alice.authed(
                Method::CREATE_PERMISSION,
                &[Attribute::XorPeerAddress(target)],
            );
            assert_eq!(Client::error_code(&r), Some(403), "{backend:?}: {target}");
        }
        relay.stop().unwrap();
    }
}

/// The relay's private address, on its side of the NAT.
const PRIVATE: &str = "192.168.50.2";
/// The public address the NAT translates to it (documentation range: no interface carries it).
const NAT_PUBLIC: &str = "203.0.113.77";
/// The client's and the peer's addresses, on the public side of the NAT.
const CLIENT: &str = "198.18.1.2";
const PEER: &str = "198.18.1.3";

#[test]
fn through_a_dnat_rule_a_client_allocates_sees_the_public_address_and_relays_both_ways() {
    let id = std::process::id();
    let Some(client_ns) = Netns::create(&format!("tp-natc-{id}")) else {
        return;
    };
    let (Some(nat), Some(relay_ns)) = (
        Netns::create(&format!("tp-natn-{id}")),
        Netns::create(&format!("tp-natr-{id}")),
    ) else {
        return;
    };
    client_ns.link("c0", "198.18.1.2/24", &nat, "n0", "198.18.1.1/24");
    ip(&[
        "-n",
        &client_ns.0,
        "addr",
        "add",
        "198.18.1.3/24",
        "dev",
        "c0",
    ])
    .unwrap();
    nat.link("n1", "192.168.50.1/24", &relay_ns, "r0", "192.168.50.2/24");
    // The client side knows the public address only as "behind the NAT"; the relay side routes the
    // client network back through it. No default route anywhere.
    ip(&[
        "-n",
        &client_ns.0,
        "route",
        "add",
        "203.0.113.77/32",
        "via",
        "198.18.1.1",
    ])
    .unwrap();
    ip(&[
        "-n",
        &relay_ns.0,
        "route",
        "add",
        "198.18.1.0/24",
        "via",
        "192.168.50.1",
    ])
    .unwrap();
    nat.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"], "")
        .unwrap();
    let rules = format!(
        "table ip tpnat {{\n\
           chain pre {{ type nat hook prerouting priority dstnat; ip daddr {NAT_PUBLIC} dnat to {PRIVATE}; }}\n\
           chain post {{ type nat hook postrouting priority srcnat; ip saddr {PRIVATE} oifname \"n0\" snat to {NAT_PUBLIC}; }}\n\
         }}\n"
    );
    if let Err(e) = nat.exec("nft", &["-f", "-"], &rules) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nftables is needed in CI: {e}"
        );
        eprintln!("SKIPPED: cannot load the NAT rules: {e}");
        return;
    }
    let (relay_name, client_name) = (relay_ns.0.clone(), client_ns.0.clone());
    std::thread::spawn(move || {
        turnpike::sys::enter_netns(&relay_name).unwrap();
        for (i, backend) in backends().into_iter().enumerate() {
            behind_the_nat(
                &client_name,
                backend,
                3478 + i as u16,
                40000 + 1000 * i as u16,
            );
        }
    })
    .join()
    .unwrap();
}

/// One backend: the relay (in the relay namespace, this thread's) against a client and a peer whose
/// sockets are made in the client namespace.
fn behind_the_nat(
    client_ns: &str,
    backend: turnpike::dataplane::BackendKind,
    port: u16,
    base: u16,
) {
    let private: IpAddr = PRIVATE.parse().unwrap();
    let public: IpAddr = NAT_PUBLIC.parse().unwrap();
    let mut s = settings(backend, 2, base);
    s.server.relay_ips = vec![private];
    s.server.external = vec![(private, public)];
    s.server.peer_policy =
        turnpike::policy::PeerPolicy::new().with_allow(vec!["198.18.0.0/15".parse().unwrap()]);
    s.listen = vec![SocketAddr::new(private, port)];
    let relay = start(s);
    let server = SocketAddr::new(public, port);
    let ns = client_ns.to_string();
    let (mut c, peer) = std::thread::spawn(move || {
        turnpike::sys::enter_netns(&ns).unwrap();
        (
            Client::new_on(CLIENT, server, "alice", "alice-pass"),
            peer_on(PEER.parse().unwrap()),
        )
    })
    .join()
    .unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // `Client::recv` asserts that every answer comes from the public address it sent to.
    let relayed = c.allocate();
    assert_eq!(relayed.ip(), public, "{backend:?}: XOR-RELAYED-ADDRESS");
    c.permit(peer_addr);
    c.send_indication(peer_addr, b"through the nat");
    let mut buf = [0u8; 64];
    let (len, from) = peer.recv_from(&mut buf).unwrap();
    // The NAT rewrote the relay socket's private source to the public one, port kept.
    assert_eq!(
        (&buf[..len], from),
        (&b"through the nat"[..], relayed),
        "{backend:?}"
    );
    // The peer answers the public relayed address; the DNAT rule brings it to the relay socket.
    peer.send_to(b"and back", relayed).unwrap();
    let m = c.recv();
    let m = Message::parse(&m).unwrap();
    assert_eq!(m.message_type().method, Method::DATA, "{backend:?}");
    assert_eq!(
        (m.attrs.xor_peer_address, m.attrs.data),
        (Some(peer_addr), Some(&b"and back"[..])),
        "{backend:?}"
    );
    // And over a channel, both ways.
    c.bind(0x4002, peer_addr);
    c.send_channel(0x4002, b"cd out");
    let (len, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..len], from),
        (&b"cd out"[..], relayed),
        "{backend:?}"
    );
    peer.send_to(b"cd back", relayed).unwrap();
    let got = c.recv();
    let cd = ChannelData::parse(&got).unwrap();
    assert_eq!(
        (cd.channel(), cd.payload()),
        (0x4002, &b"cd back"[..]),
        "{backend:?}"
    );
    relay.stop().unwrap();
}
