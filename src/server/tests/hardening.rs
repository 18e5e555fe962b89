//! Issue #10, findings 3–7, driven through [`Server::handle_client_message`] as production calls it.
//! Relay and peer addresses are public unicast ones that the built-in peer policy allows, so that every
//! refusal here is for the reason the test names.

use super::*;
use crate::wire::{attr_type, family};

/// Relay addresses outside every built-in deny range.
fn public_config() -> Config {
    Config {
        relay_ips: vec![ip("45.76.1.10"), ip("2a01:4f8::10")],
        ..config()
    }
}

fn public_harness() -> Harness {
    Harness::with(public_config())
}

/// A Binding request with FINGERPRINT, then `edit` applied to its bytes.
fn binding_with_fingerprint(h: &mut Harness, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let tid = h.next_tid();
    let mut buf = vec![0u8; 128];
    let mut w = MessageWriter::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        tid,
    )
    .unwrap();
    w.add(&Attribute::Software("probe")).unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    edit(&mut buf);
    buf
}

// Finding 4: FINGERPRINT is verified where messages are parsed.

#[test]
fn binding_with_wrong_fingerprint_is_dropped_and_counted() {
    let mut h = public_harness();
    let good = binding_with_fingerprint(&mut h, |_| {});
    assert_eq!(h.send(client(1), &good).one().class(), Class::Success);

    let before = h.server.stats().malformed;
    let bad = binding_with_fingerprint(&mut h, |b| {
        let n = b.len();
        b[n - 1] ^= 0x5a;
    });
    let out = h.send(client(1), &bad);
    assert!(
        out.sent.is_empty(),
        "a wrong FINGERPRINT is not STUN: {:?}",
        out.sent
    );
    assert_eq!(h.server.stats().malformed, before + 1);
}

#[test]
fn fingerprint_not_last_is_dropped_and_counted() {
    let mut h = public_harness();
    let before = h.server.stats().malformed;
    // A correct FINGERPRINT, then an empty SOFTWARE after it, the length field covering both.
    let bad = binding_with_fingerprint(&mut h, |b| {
        b.extend_from_slice(&[0x80, 0x22, 0, 0]);
        let len = u16::try_from(b.len() - 20).unwrap();
        b[2..4].copy_from_slice(&len.to_be_bytes());
    });
    let out = h.send(client(1), &bad);
    assert!(out.sent.is_empty(), "{:?}", out.sent);
    assert_eq!(h.server.stats().malformed, before + 1);
}

// Finding 5: a malformed XOR-PEER-ADDRESS gets 400, a peer of a family the allocation lacks 443.

/// The malformed shapes: IPv4 with a 4-byte value, IPv6 with an 8-byte value, family 0x07.
const MALFORMED_PEERS: [&[u8]; 3] = [
    &[0, 0x01, 0x21, 0x12],
    &[0, 0x02, 0x21, 0x12, 1, 2, 3, 4],
    &[0, 0x07, 0x21, 0x12, 0x29, 0x1a, 0xad, 0x46],
];

fn malformed_peer(value: &[u8]) -> Attribute<'_> {
    Attribute::Unknown {
        typ: attr_type::XOR_PEER_ADDRESS,
        value,
    }
}

#[test]
fn create_permission_with_malformed_peer_gets_400() {
    let mut h = public_harness();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    for value in MALFORMED_PEERS {
        for attrs in [
            vec![malformed_peer(value)],
            // All or nothing: a good peer beside a malformed one does not make it through.
            vec![Attribute::XorPeerAddress(peer(1)), malformed_peer(value)],
        ] {
            let out = h.request(client(1), Method::CREATE_PERMISSION, &attrs, Some(&alice));
            assert_eq!(out.error(), Some(400), "{value:02x?}");
            assert!(out.one().msg().verify_integrity(&alice.key));
            assert!(out.commands.is_empty(), "{:?}", out.commands);
        }
    }
}

#[test]
fn channel_bind_with_malformed_peer_gets_400() {
    let mut h = public_harness();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    for value in MALFORMED_PEERS {
        let out = h.request(
            client(1),
            Method::CHANNEL_BIND,
            &[Attribute::ChannelNumber(0x4000), malformed_peer(value)],
            Some(&alice),
        );
        assert_eq!(out.error(), Some(400), "{value:02x?}");
        assert!(out.commands.is_empty(), "{:?}", out.commands);
    }
}

#[test]
fn well_formed_peer_of_a_missing_family_gets_443() {
    let mut h = public_harness();
    let alice = Creds::alice();
    let (relay, _) = h.allocate(client(1), &alice);
    assert!(relay.0.is_ipv4(), "a plain Allocate relays IPv4 only");
    let v6_peer: SocketAddr = "[2606:4700::1111]:6001".parse().unwrap();
    let out = h.request(
        client(1),
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(v6_peer)],
        Some(&alice),
    );
    assert_eq!(out.error(), Some(443));
    let out = h.bind(client(1), &alice, 0x4000, v6_peer);
    assert_eq!(out.error(), Some(443));
    // The same requests with an IPv4 peer succeed: the refusal was the family.
    h.permit(client(1), &alice, &[peer(1)]);
    assert_eq!(
        h.bind(client(1), &alice, 0x4000, peer(1)).one().class(),
        Class::Success
    );
}

// Finding 3: an allow entry on the IPv6 form does not open the IPv4 address embedded in it.

#[test]
fn allowed_nat64_prefix_does_not_open_embedded_private_ipv4() {
    let mut h = Harness::with(Config {
        peer_policy: PeerPolicy::new().with_allow(vec!["64:ff9b::/96".parse::<Cidr>().unwrap()]),
        ..public_config()
    });
    let alice = Creds::alice();
    let (relay, _) = h.allocate_with(
        client(1),
        &alice,
        &[
            Attribute::RequestedTransport(17),
            Attribute::RequestedAddressFamily(family::IPV6),
        ],
    );
    assert!(relay.0.is_ipv6());
    for embedded_private in ["[64:ff9b::a01:203]:5000", "[64:ff9b::a9fe:a9fe]:80"] {
        let p: SocketAddr = embedded_private.parse().unwrap();
        let out = h.request(
            client(1),
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(p)],
            Some(&alice),
        );
        assert_eq!(out.error(), Some(403), "{p}");
        assert_eq!(
            h.bind(client(1), &alice, 0x4001, p).error(),
            Some(403),
            "{p}"
        );
    }
    // A public IPv4 address behind the allowed prefix is fine.
    h.permit(
        client(1),
        &alice,
        &["[64:ff9b::808:808]:53".parse().unwrap()],
    );
}
