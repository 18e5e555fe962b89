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
fn unauthenticated_request_with_malformed_peer_is_dropped_silently() {
    let mut h = public_harness();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    let wrong = Creds::static_user("alice", "not-her-password");
    let before = h.server.stats().malformed;
    for creds in [None, Some(&wrong)] {
        for method in [Method::CREATE_PERMISSION, Method::CHANNEL_BIND] {
            let attrs = [
                Attribute::ChannelNumber(0x4000),
                malformed_peer(MALFORMED_PEERS[0]),
            ];
            let out = h.request(client(1), method, &attrs, creds);
            assert!(out.sent.is_empty(), "{method:?}: {:?}", out.sent);
        }
    }
    assert_eq!(h.server.stats().malformed, before + 4);
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

// Finding 7: authenticated state is bounded; reservations count toward the identity.

/// Public peers on distinct IPs (permissions are per IP, RFC 8656 §9).
fn far(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([8, 8, 4, n]), 6000)
}

#[test]
fn state_caps_default_to_the_documented_values() {
    let c = Config::default();
    assert_eq!(
        (
            c.max_channels_per_allocation,
            c.max_permissions_per_identity,
            c.max_channels_per_identity
        ),
        (512, 16_384, 16_384)
    );
}

#[test]
fn channels_per_allocation_are_capped_with_508() {
    let mut h = Harness::with(Config {
        max_channels_per_allocation: 3,
        ..public_config()
    });
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    for i in 0..3 {
        let out = h.bind(client(1), &alice, 0x4000 + i, peer(i));
        assert_eq!(out.one().class(), Class::Success, "channel {i}");
    }
    let out = h.bind(client(1), &alice, 0x4003, peer(3));
    assert_eq!(out.error(), Some(508));
    assert!(out.commands.is_empty(), "{:?}", out.commands);
    // Refreshing a bound channel is not a new one.
    assert_eq!(
        h.bind(client(1), &alice, 0x4001, peer(1)).one().class(),
        Class::Success
    );
}

#[test]
fn permissions_and_channels_per_identity_are_capped_with_508() {
    let mut h = Harness::with(Config {
        max_permissions_per_identity: 3,
        max_channels_per_identity: 2,
        ..public_config()
    });
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    h.allocate(client(2), &alice);
    h.permit(client(1), &alice, &[far(1), far(2)]);
    // Two more on the other allocation would make 4 > 3 for the identity: all or nothing.
    let out = h.request(
        client(2),
        Method::CREATE_PERMISSION,
        &[
            Attribute::XorPeerAddress(far(3)),
            Attribute::XorPeerAddress(far(4)),
        ],
        Some(&alice),
    );
    assert_eq!(out.error(), Some(508));
    assert!(out.commands.is_empty());
    h.permit(client(2), &alice, &[far(3)]);
    // A ChannelBind that would add a fourth permission is refused too; one on a permitted peer is not.
    assert_eq!(h.bind(client(2), &alice, 0x4000, far(4)).error(), Some(508));
    assert_eq!(
        h.bind(client(2), &alice, 0x4000, far(3)).one().class(),
        Class::Success
    );
    assert_eq!(
        h.bind(client(1), &alice, 0x4000, far(1)).one().class(),
        Class::Success
    );
    // Two channels for the identity: a third on either allocation is refused.
    assert_eq!(h.bind(client(1), &alice, 0x4001, far(2)).error(), Some(508));
    // Another identity has its own budget.
    let bob = Creds::bob();
    h.allocate(client(3), &bob);
    h.permit(client(3), &bob, &[far(1), far(2), far(3)]);

    // Ending an allocation gives its permissions and channels back to the identity.
    let out = h.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    assert_eq!(out.one().class(), Class::Success);
    assert_eq!(
        h.bind(client(2), &alice, 0x4001, far(4)).one().class(),
        Class::Success
    );
}

/// An Allocate with EVEN-PORT R=1, returning the RESERVATION-TOKEN of its success.
fn allocate_reserving(h: &mut Harness, five: FiveTuple, creds: &Creds) -> Out {
    h.challenge(five);
    let out = h.request(
        five,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::EvenPort(true)],
        Some(creds),
    );
    if !out.sent.is_empty() {
        return out;
    }
    let (id, relays) = opened(&out.commands);
    h.server.handle_relay_opened(h.now, id, relays[0]);
    h.drain()
}

#[test]
fn even_port_reservation_counts_toward_the_identity_quota() {
    let mut h = Harness::with(Config {
        max_allocations_per_user: 2,
        ..public_config()
    });
    let ports = h.server.free_ports();
    let alice = Creds::alice();
    let out = allocate_reserving(&mut h, client(1), &alice);
    assert!(out.one().msg().attrs.reservation_token.is_some());
    // One allocation and one reserved port: the quota of 2 is used up.
    h.challenge(client(2));
    let out = h.request(
        client(2),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17)],
        Some(&alice),
    );
    assert_eq!(out.error(), Some(486));
    // A reserving Allocate needs two slots.
    h.allocate(client(3), &Creds::bob());
    let out = allocate_reserving(&mut h, client(4), &Creds::bob());
    assert_eq!(out.error(), Some(486));

    // When the reservation times out, the slot comes back.
    h.advance(Duration::from_secs(31));
    h.allocate(client(2), &alice);
    for (five, who) in [
        (client(1), &alice),
        (client(2), &alice),
        (client(3), &Creds::bob()),
    ] {
        let out = h.request(five, Method::REFRESH, &[Attribute::Lifetime(0)], Some(who));
        assert_eq!(out.one().class(), Class::Success);
    }
    h.assert_empty(ports);
}

#[test]
fn even_port_reservation_is_freed_with_its_allocation() {
    let mut h = Harness::with(Config {
        max_allocations_per_user: 2,
        ..public_config()
    });
    let ports = h.server.free_ports();
    let alice = Creds::alice();
    let out = allocate_reserving(&mut h, client(1), &alice);
    let token = out.one().msg().attrs.reservation_token.unwrap();
    let out = h.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    assert_eq!(out.one().class(), Class::Success);
    // Port, timer and quota are all back at once, not after the reservation's 30 seconds.
    h.assert_empty(ports);
    h.challenge(client(2));
    let out = h.request(
        client(2),
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(17),
            Attribute::ReservationToken(token),
        ],
        Some(&alice),
    );
    assert_eq!(out.error(), Some(508), "the token died with its allocation");
}

#[test]
fn redeeming_ones_own_reservation_needs_no_extra_slot() {
    let mut h = Harness::with(Config {
        max_allocations_per_user: 2,
        ..public_config()
    });
    let alice = Creds::alice();
    let out = allocate_reserving(&mut h, client(1), &alice);
    let first = out.one().msg().attrs.xor_relayed_address.unwrap();
    let token = out.one().msg().attrs.reservation_token.unwrap();
    let (relay, _) = h.allocate_with(
        client(2),
        &alice,
        &[
            Attribute::RequestedTransport(17),
            Attribute::ReservationToken(token),
        ],
    );
    assert_eq!(relay.0.port(), first.port() + 1);
}

// Finding 6: every unauthenticated answer is within 3× its request or not sent, and all of them share
// one per-source budget (/32, /64); TCP and TLS are exempt.

fn from(ip_text: &str, transport: Transport) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new(ip(ip_text), 40000),
        transport,
        ..client(0)
    }
}

#[test]
fn bare_allocate_gets_no_amplified_401_over_udp() {
    let mut h = public_harness();
    let out = h.request(client(1), Method::ALLOCATE, &[], None);
    assert!(
        out.sent.is_empty(),
        "20 bytes must not draw a 401: {:?}",
        out.sent
    );
    assert_eq!(h.server.stats().amplification_refused, 1);
    assert_eq!(h.server.stats().challenges, 0, "nothing was sent");
    // The minimal valid Allocate is 28 bytes and its 401 fits in 3× that.
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17)],
        None,
    );
    assert_eq!(out.error(), Some(401));
    assert!(
        out.one().bytes.len() <= 3 * 28,
        "{} bytes",
        out.one().bytes.len()
    );
    assert_eq!(h.server.stats().challenges, 1);
    // A stream client cannot spoof its source: it gets the 401 whatever the request's size.
    for transport in [Transport::Tcp, Transport::Tls] {
        let out = h.request(from("198.51.100.9", transport), Method::ALLOCATE, &[], None);
        assert_eq!(out.error(), Some(401), "{transport:?}");
    }
}

/// One unauthenticated request of each kind: Binding (success), an unknown method (400), a Binding with
/// an unknown comprehension-required attribute (420), a minimal Allocate (401).
fn each_kind(h: &mut Harness, five: FiveTuple) -> Vec<Option<u16>> {
    let unknown = [Attribute::Unknown {
        typ: 0x0041,
        value: b"abcd",
    }];
    let rt = [Attribute::RequestedTransport(17)];
    let requests: [(Method, &[Attribute<'_>]); 4] = [
        (Method::BINDING, &[]),
        (Method(0x0FF), &[]),
        (Method::BINDING, &unknown),
        (Method::ALLOCATE, &rt),
    ];
    requests
        .into_iter()
        .map(|(method, attrs)| {
            let out = h.request(five, method, attrs, None);
            assert_eq!(out.sent.len(), 1, "{method:?} is answered within the burst");
            out.one().error()
        })
        .collect()
}

#[test]
fn all_unauthenticated_answers_share_one_budget() {
    let mut h = Harness::with(Config {
        challenge_rate: 2, // a burst of 4
        ..public_config()
    });
    assert_eq!(
        each_kind(&mut h, client(1)),
        [None, Some(400), Some(420), Some(401)]
    );
    for method in [Method::BINDING, Method(0x0FF), Method::ALLOCATE] {
        let out = h.request(
            client(1),
            method,
            &[Attribute::RequestedTransport(17)],
            None,
        );
        assert!(
            out.sent.is_empty(),
            "{method:?} past the budget: {:?}",
            out.sent
        );
    }
    assert_eq!(h.server.stats().rate_limited, 3);
    // Another IPv4 address has its own budget (/32).
    let out = h.request(
        from("198.51.100.8", Transport::Udp),
        Method::BINDING,
        &[],
        None,
    );
    assert_eq!(out.one().class(), Class::Success);
    // An authenticated client is not held to it: its answers are signed, not reflected.
    let mut h = Harness::with(Config {
        challenge_rate: 1, // a burst of 2: the 401 round of `allocate` is one
        ..public_config()
    });
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    for _ in 0..5 {
        let out = h.request(client(1), Method::REFRESH, &[], Some(&alice));
        assert_eq!(out.one().class(), Class::Success);
    }
}

#[test]
fn the_budget_is_per_ipv6_slash_64() {
    let mut h = Harness::with(Config {
        challenge_rate: 1, // a burst of 2
        ..public_config()
    });
    for host in ["2001:db8:1:2::1", "2001:db8:1:2::2"] {
        let out = h.request(from(host, Transport::Udp), Method::BINDING, &[], None);
        assert_eq!(out.one().class(), Class::Success, "{host}");
    }
    // Rotating through the /64 does not refill it.
    for host in ["2001:db8:1:2::3", "2001:db8:1:2:ffff:ffff:ffff:ffff"] {
        let out = h.request(from(host, Transport::Udp), Method::BINDING, &[], None);
        assert!(out.sent.is_empty(), "{host} shares the /64's budget");
    }
    // The next /64 is another subscriber.
    let out = h.request(
        from("2001:db8:1:3::1", Transport::Udp),
        Method::BINDING,
        &[],
        None,
    );
    assert_eq!(out.one().class(), Class::Success);
}

#[test]
fn stream_clients_neither_spend_nor_meet_the_budget() {
    let mut h = Harness::with(Config {
        challenge_rate: 1,
        ..public_config()
    });
    for transport in [Transport::Tcp, Transport::Tls] {
        for _ in 0..10 {
            let out = h.request(from("198.51.100.9", transport), Method::BINDING, &[], None);
            assert_eq!(out.one().class(), Class::Success);
        }
    }
    let udp = from("198.51.100.9", Transport::Udp);
    for _ in 0..2 {
        assert_eq!(h.request(udp, Method::BINDING, &[], None).sent.len(), 1);
    }
    assert!(h.request(udp, Method::BINDING, &[], None).sent.is_empty());
}
