//! End to end, on every backend: a relay behind 1:1 NAT (`relay.external`, issue 15). It binds its
//! relay sockets on the private address (here 127.0.0.1) and tells clients the public one (here
//! 198.51.99.7, which no interface carries). Two relayed clients reach each other at their *public*
//! relayed addresses, as their ICE candidates name them: the relay sends to the private address behind
//! it (no NAT hairpin needed), and the receiver sees the sender's public relayed address, which is what
//! it permitted. Every other port of the public address is refused.
//!
//! No DNAT rule is used: this container has neither netfilter nor tc's nat action. What a DNAT rule
//! would add (the client reaching the listener through the public address) is the NAT's work, not the
//! relay's; the relay's part is the advertised address and relaying between its own public addresses.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::{IpAddr, SocketAddr};

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
