//! Binding, authentication, Allocate and Refresh (RFC 8489 §9.2, RFC 8656 §7).

use super::*;
use crate::wire::{attr_type, family};

const RT_UDP: Attribute<'static> = Attribute::RequestedTransport(17);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn binding_answers_with_xor_mapped_address() {
    let mut h = Harness::new();
    let out = h.request(client(1), Method::BINDING, &[], None);
    let m = out.one().msg();
    assert_eq!(
        m.message_type(),
        MessageType::new(Method::BINDING, Class::Success)
    );
    assert_eq!(m.attrs.xor_mapped_address, Some(client(1).client));
    assert!(!m.has_integrity());
    assert_eq!(
        (out.one().src, out.one().dst),
        (client(1).server, client(1).client)
    );
    assert!(out.commands.is_empty());
    assert_eq!(h.server.timer_count(), 0, "a Binding leaves no state");
}

#[test]
fn binding_with_fingerprint_gets_fingerprint_back() {
    let mut h = Harness::new();
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        TransactionId([3; 12]),
    )
    .unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    let out = h.send(client(1), &buf[..n]);
    let m = out.one().msg();
    assert_eq!(m.transaction_id(), TransactionId([3; 12]));
    assert!(m.verify_fingerprint());
}

#[test]
fn binding_can_require_credentials() {
    let mut h = Harness::with(Config {
        binding_requires_auth: true,
        ..config()
    });
    // A bare 20-byte Binding would get no 401 over UDP (84 bytes is more than 3× it); one with SOFTWARE
    // does.
    let software = [Attribute::Software("client")];
    let out = h.request(client(1), Method::BINDING, &software, None);
    assert_eq!(out.error(), Some(401));
    h.nonce = out.one().msg().attrs.nonce.map(str::to_string);
    let out = h.request(client(1), Method::BINDING, &[], Some(&Creds::alice()));
    let m = out.one().msg();
    assert_eq!(m.attrs.xor_mapped_address, Some(client(1).client));
    assert!(m.verify_integrity(&Creds::alice().key));
}

/// RFC 8489 §9.2.4 and design §3: the challenge carries ERROR-CODE, REALM and NONCE only, stays within 3×
/// a minimal Allocate (20-byte header + REQUESTED-TRANSPORT = 28 bytes), and leaves no state behind.
#[test]
fn challenge_is_minimal_and_stateless() {
    let mut h = Harness::new();
    let out = h.challenge(client(1));
    let sent = out.one();
    let m = sent.msg();
    assert_eq!(
        m.message_type(),
        MessageType::new(Method::ALLOCATE, Class::Error)
    );
    let types: Vec<u16> = m.attributes().map(|a| a.typ()).collect();
    assert_eq!(
        types,
        vec![attr_type::ERROR_CODE, attr_type::REALM, attr_type::NONCE]
    );
    assert_eq!(m.attrs.error_code.map(|e| e.0), Some(401));
    assert_eq!(m.attrs.realm, Some(REALM));
    assert!(
        sent.bytes.len() <= 3 * 28,
        "401 is {} bytes",
        sent.bytes.len()
    );
    assert!(out.commands.is_empty());
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.timer_count(), 0);
    assert_eq!(h.server.stats().challenges, 1);
}

/// Design §3: a 401 past 3× a minimal Allocate would never be sent over UDP, so the settings that would
/// make one are refused at start, naming the key.
#[test]
fn settings_that_would_push_the_challenge_past_3x_are_refused() {
    let with_realm = |realm: &str| {
        Server::new(
            Config {
                realm: realm.into(),
                ..config()
            },
            StdRng::seed_from_u64(1),
        )
    };
    // The 401 is 68 bytes plus the padded realm: up to 12 bytes of realm fit in 84.
    assert_eq!(crate::auth::challenge_len("123456789012", false), 84);
    assert!(with_realm("123456789012").is_ok());
    let e = with_realm("turn.example.org").unwrap_err();
    assert_eq!(e.key, "realm");
    assert!(e.problem.contains("the 401 88 bytes"), "{e}");
    assert!(e.problem.contains("at most 12 bytes"), "{e}");
    // PASSWORD-ALGORITHMS and the RFC 8489 nonce cookie add 28 bytes; that 401 goes only where it fits
    // (see `password_algorithms_are_advertised_only_where_the_401_fits`), so the setting is accepted.
    assert_eq!(crate::auth::challenge_len(REALM, true), 108);
    assert!(Server::new(
        Config {
            password_algorithms: true,
            ..config()
        },
        StdRng::seed_from_u64(1),
    )
    .is_ok());
}

fn with_algorithms() -> Harness {
    Harness::with(Config {
        password_algorithms: true,
        ..config()
    })
}

/// The RFC 8489 §9.2 cookie that opens a nonce advertising security features.
const NONCE_COOKIE: &str = "obMatJos2";

/// The types of the attributes of `m`, in order.
fn types(m: &Message<'_>) -> Vec<u16> {
    m.attributes().map(|a| a.typ()).collect()
}

/// RFC 8489 §9.2.4 with design §3: PASSWORD-ALGORITHMS (and the nonce's feature bit) is advertised over
/// UDP only to a request its 401 stays within 3× of, and always over TCP; a minimal Allocate gets the
/// plain 401 with a featureless nonce.
#[test]
fn password_algorithms_are_advertised_only_where_the_401_fits() {
    let mut h = with_algorithms();
    // 28 bytes: the 108-byte 401 would be 3.9×, so the plain one (80 bytes) goes out.
    let out = h.challenge(client(1));
    let m = out.one().msg();
    assert_eq!(m.as_bytes().len(), 80);
    assert_eq!(
        types(&m),
        vec![attr_type::ERROR_CODE, attr_type::REALM, attr_type::NONCE]
    );
    assert!(!m.attrs.nonce.unwrap().starts_with(NONCE_COOKIE));
    // 36 bytes (SOFTWARE "abcd"): 3× is 108, exactly the advertising 401.
    let attrs = [RT_UDP, Attribute::Software("abcd")];
    let out = h.request(client(2), Method::ALLOCATE, &attrs, None);
    let m = out.one().msg();
    assert_eq!(m.attrs.error_code.map(|e| e.0), Some(401));
    assert_eq!(m.as_bytes().len(), 108);
    assert_eq!(
        types(&m),
        vec![
            attr_type::ERROR_CODE,
            attr_type::REALM,
            attr_type::NONCE,
            attr_type::PASSWORD_ALGORITHMS
        ]
    );
    assert!(m.attrs.nonce.unwrap().starts_with(NONCE_COOKIE));
    // TCP clients cannot spoof their source: a minimal Allocate gets the advertising 401.
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..client(3)
    };
    let out = h.request(tcp, Method::ALLOCATE, &[RT_UDP], None);
    let m = out.one().msg();
    assert!(m.attrs.password_algorithms.is_some());
    assert!(m.attrs.nonce.unwrap().starts_with(NONCE_COOKIE));
    assert_eq!(h.server.stats().amplification_refused, 0);
    assert_eq!(h.server.stats().challenges, 3);
}

/// An Allocate signed with `key` (MESSAGE-INTEGRITY), echoing `list` as PASSWORD-ALGORITHMS and choosing
/// `choice`, with the harness's nonce for `five`.
fn allocate_choosing(
    h: &mut Harness,
    five: FiveTuple,
    list: Option<&[u16]>,
    choice: Option<u16>,
    key: &[u8],
) -> Out {
    let tid = h.next_tid();
    let nonce = h.nonces[&five.client].clone();
    let mut buf = [0u8; 512];
    let typ = MessageType::new(Method::ALLOCATE, Class::Request);
    let mut w = MessageWriter::new(&mut buf, typ, tid).unwrap();
    w.add(&RT_UDP).unwrap();
    let mut scratch = [0u8; 16];
    if let Some(list) = list {
        w.add(&wire::password_algorithms(list, &mut scratch).unwrap())
            .unwrap();
    }
    if let Some(algorithm) = choice {
        w.add(&Attribute::PasswordAlgorithm {
            algorithm,
            params: &[],
        })
        .unwrap();
    }
    w.add(&Attribute::Username("alice")).unwrap();
    w.add(&Attribute::Realm(REALM)).unwrap();
    w.add(&Attribute::Nonce(&nonce)).unwrap();
    w.add_integrity(key).unwrap();
    let n = w.finish();
    h.send(five, &buf[..n])
}

/// RFC 8489 §9.2.4: with an advertising nonce, a client may pick SHA-256 by echoing the list exactly;
/// an altered list (bid-down) or a list without a choice gets 400; neither attribute means MD5. A
/// featureless nonce (the plain 401) holds the client to MD5.
#[test]
fn sha256_is_chosen_against_the_advertised_list() {
    use crate::wire::password_algorithm::{MD5, SHA256};
    let md5 = Creds::alice().key;
    let sha256 = crate::auth::long_term_key_sha256("alice", REALM, "alice-pass");
    let mut h = with_algorithms();
    let big = [RT_UDP, Attribute::Software("abcd")];
    let featured = |h: &mut Harness, n: u16| {
        let out = h.request(client(n), Method::ALLOCATE, &big, None);
        let nonce = out.one().msg().attrs.nonce.unwrap().to_string();
        assert!(nonce.starts_with(NONCE_COOKIE));
        h.nonces.insert(client(n).client, nonce);
    };
    featured(&mut h, 1);
    let both: &[u16] = &[MD5, SHA256];
    let out = allocate_choosing(&mut h, client(1), Some(both), Some(SHA256), &sha256);
    assert!(out.sent.is_empty(), "{:?}", out.sent);
    assert_eq!(opened(&out.commands).1.len(), 1);
    // Bid-down: the echoed list differs from what was advertised.
    featured(&mut h, 2);
    let out = allocate_choosing(&mut h, client(2), Some(&[SHA256]), Some(SHA256), &sha256);
    assert_eq!(out.error(), Some(400));
    let out = allocate_choosing(&mut h, client(2), Some(both), None, &md5);
    assert_eq!(out.error(), Some(400));
    // Neither attribute: MD5, as RFC 8489 §9.2.4 allows.
    let out = allocate_choosing(&mut h, client(2), None, None, &md5);
    assert!(out.sent.is_empty(), "{:?}", out.sent);
    assert_eq!(opened(&out.commands).1.len(), 1);
    // A featureless nonce: the SHA-256 key is not in play, only MD5 verifies.
    h.challenge(client(3));
    let out = allocate_choosing(&mut h, client(3), Some(both), Some(SHA256), &sha256);
    assert_eq!(out.error(), Some(401));
    let out = allocate_choosing(&mut h, client(3), None, None, &md5);
    assert!(out.sent.is_empty(), "{:?}", out.sent);
}

#[test]
fn allocate_with_static_user() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&alice));
    assert!(out.sent.is_empty());
    let (id, relays) = opened(&out.commands);
    assert_eq!(relays.len(), 1);
    let relay = relays[0];
    assert_eq!(
        out.commands,
        vec![Command::OpenRelay {
            allocation: id,
            client: client(1),
            relay,
            dont_fragment: false
        }]
    );
    assert_eq!(
        relay.0.ip(),
        ip(RELAY_V4),
        "IPv4 unless asked otherwise (RFC 8656 §7.2)"
    );
    assert!((50000..=50099).contains(&relay.0.port()));

    h.server.handle_relay_opened(h.now, id, relay);
    let out = h.drain();
    let m = out.one().msg();
    assert_eq!(
        m.message_type(),
        MessageType::new(Method::ALLOCATE, Class::Success)
    );
    assert_eq!(m.attrs.xor_relayed_address, Some(relay.0));
    assert_eq!(m.attrs.lifetime, Some(600));
    assert_eq!(m.attrs.xor_mapped_address, Some(client(1).client));
    assert!(m.verify_integrity(&alice.key));
    assert!(!m.verify_integrity(&Creds::bob().key));
    assert!(out.commands.is_empty());
}

#[test]
fn allocate_with_rest_credentials_from_any_live_secret() {
    let mut h = Harness::new();
    let expiry = UNIX0 + 3600;
    h.allocate(client(1), &Creds::rest(SECRET_NEW, "carol", expiry));
    h.allocate(client(2), &Creds::rest(SECRET_OLD, "carol", expiry));
    // Valid through its expiry second (RFC-style "expiry:user" is inclusive).
    h.allocate(client(3), &Creds::rest(SECRET_NEW, "dave", UNIX0));
    h.challenge(client(4));
    let forged = Creds::rest(b"not-our-secret", "carol", expiry);
    assert_eq!(
        h.request(client(4), Method::ALLOCATE, &[RT_UDP], Some(&forged))
            .error(),
        Some(401)
    );
    let expired = Creds::rest(SECRET_NEW, "carol", UNIX0 - 1);
    assert_eq!(
        h.request(client(4), Method::ALLOCATE, &[RT_UDP], Some(&expired))
            .error(),
        Some(401)
    );
    assert_eq!(h.server.stats().auth_failures, 2);
}

#[test]
fn expired_rest_credential_is_refused_on_later_requests() {
    let mut h = Harness::new();
    let carol = Creds::rest(SECRET_NEW, "carol", UNIX0 + 100);
    h.allocate(client(1), &carol);
    h.at(s(101));
    // A fresh nonce so that only the credential's expiry is in question.
    h.challenge(client(2));
    h.nonce = h
        .challenge(client(1))
        .one()
        .msg()
        .attrs
        .nonce
        .map(str::to_string);
    let out = h.request(client(1), Method::REFRESH, &[], Some(&carol));
    assert_eq!(
        out.error(),
        Some(401),
        "credentials are checked for expiry on every request"
    );
}

#[test]
fn wrong_password_unknown_user_and_wrong_realm_get_401() {
    let mut h = Harness::new();
    h.challenge(client(1));
    for creds in [
        Creds::static_user("alice", "nope"),
        Creds::static_user("mallory", "x"),
    ] {
        let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&creds));
        assert_eq!(out.error(), Some(401));
        let m = out.one().msg();
        assert!(m.attrs.nonce.is_some() && m.attrs.realm == Some(REALM));
        assert!(!m.has_integrity());
    }
    let tid = h.next_tid();
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(
        &mut buf,
        MessageType::new(Method::ALLOCATE, Class::Request),
        tid,
    )
    .unwrap();
    w.add(&RT_UDP).unwrap();
    w.add(&Attribute::Username("alice")).unwrap();
    w.add(&Attribute::Realm("other")).unwrap();
    w.add(&Attribute::Nonce(h.nonce.as_deref().unwrap()))
        .unwrap();
    w.add_integrity(&long_term_key_md5("alice", "other", "alice-pass"))
        .unwrap();
    let n = w.finish();
    assert_eq!(h.send(client(1), &buf[..n]).error(), Some(401));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn integrity_without_realm_or_nonce_is_400() {
    let mut h = Harness::new();
    h.challenge(client(1));
    let tid = h.next_tid();
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(
        &mut buf,
        MessageType::new(Method::ALLOCATE, Class::Request),
        tid,
    )
    .unwrap();
    w.add(&RT_UDP).unwrap();
    w.add(&Attribute::Username("alice")).unwrap();
    w.add(&Attribute::Realm(REALM)).unwrap();
    w.add_integrity(&Creds::alice().key).unwrap();
    let n = w.finish();
    let out = h.send(client(1), &buf[..n]);
    assert_eq!(out.error(), Some(400));
    assert!(!out.one().msg().has_integrity());
}

#[test]
fn stale_and_foreign_nonces_get_438_with_a_fresh_nonce() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let old = h.nonce.clone();
    // The nonce lives 600 s: valid at +600 s, stale after.
    h.at(s(601));
    let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&alice));
    assert_eq!(out.error(), Some(438));
    let fresh = out.one().msg().attrs.nonce.unwrap().to_string();
    assert_ne!(Some(fresh.clone()), old);
    assert_eq!(out.one().msg().attrs.realm, Some(REALM));
    // A nonce minted for another client address is not valid here either.
    h.nonce = Some(fresh.clone());
    assert_eq!(
        h.request(client(2), Method::ALLOCATE, &[RT_UDP], Some(&alice))
            .error(),
        Some(438)
    );
    // With the fresh nonce the original client gets its allocation.
    h.nonces.insert(client(1).client, fresh);
    let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&alice));
    assert!(matches!(out.commands[..], [Command::OpenRelay { .. }]));
}

#[test]
fn nonce_valid_until_its_last_second() {
    let mut h = Harness::new();
    h.challenge(client(1));
    h.at(s(600));
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP],
        Some(&Creds::alice()),
    );
    assert!(
        matches!(out.commands[..], [Command::OpenRelay { .. }]),
        "{:?}",
        out.sent
    );
}

#[test]
fn requested_transport_is_required_and_must_be_udp() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = h.request(client(1), Method::ALLOCATE, &[], Some(&alice));
    assert_eq!(out.error(), Some(400));
    assert!(
        out.one().msg().verify_integrity(&alice.key),
        "errors after authentication are signed"
    );
    assert_eq!(
        h.request(
            client(1),
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(6)],
            Some(&alice)
        )
        .error(),
        Some(442)
    );
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn requested_address_family() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::RequestedAddressFamily(3)],
        Some(&alice),
    );
    assert_eq!(out.error(), Some(440));
    let (relay, _) = h.allocate_with(
        client(1),
        &alice,
        &[RT_UDP, Attribute::RequestedAddressFamily(family::IPV6)],
    );
    assert_eq!(relay.0.ip(), ip(RELAY_V6));

    let mut h = Harness::with(Config {
        relay_ips: vec![ip(RELAY_V4)],
        ..config()
    });
    h.challenge(client(1));
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::RequestedAddressFamily(family::IPV6)],
        Some(&alice),
    );
    assert_eq!(out.error(), Some(440));
}

#[test]
fn dual_stack_allocation() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::AdditionalAddressFamily(family::IPV6)],
        Some(&alice),
    );
    let (id, relays) = opened(&out.commands);
    assert_eq!(
        relays.iter().map(|r| r.0.is_ipv4()).collect::<Vec<_>>(),
        vec![true, false]
    );
    h.server.handle_relay_opened(h.now, id, relays[0]);
    assert!(
        h.drain().sent.is_empty(),
        "answer only once both sockets are bound"
    );
    h.server.handle_relay_opened(h.now, id, relays[1]);
    let out = h.drain();
    let m = out.one().msg();
    let relayed: Vec<SocketAddr> = m
        .attributes()
        .filter_map(|a| match a {
            Attribute::XorRelayedAddress(x) => Some(x),
            _ => None,
        })
        .collect();
    assert_eq!(relayed, vec![relays[0].0, relays[1].0]);

    h.challenge(client(2));
    for attrs in [
        vec![RT_UDP, Attribute::AdditionalAddressFamily(family::IPV4)],
        vec![
            RT_UDP,
            Attribute::AdditionalAddressFamily(family::IPV6),
            Attribute::RequestedAddressFamily(family::IPV4),
        ],
    ] {
        assert_eq!(
            h.request(client(2), Method::ALLOCATE, &attrs, Some(&alice))
                .error(),
            Some(400)
        );
    }
}

#[test]
fn dual_stack_without_ipv6_reports_address_error_code() {
    let mut h = Harness::with(Config {
        relay_ips: vec![ip(RELAY_V4)],
        ..config()
    });
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::AdditionalAddressFamily(family::IPV6)],
        Some(&alice),
    );
    let (id, relays) = opened(&out.commands);
    assert_eq!(relays.len(), 1);
    h.server.handle_relay_opened(h.now, id, relays[0]);
    let out = h.drain();
    let m = out.one().msg();
    assert_eq!(m.message_type().class, Class::Success);
    assert_eq!(
        m.attrs.address_error_code.map(|(f, c, _)| (f, c)),
        Some((family::IPV6, 440))
    );
}

#[test]
fn even_port_and_reservation_token() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate_with(client(1), &alice, &[RT_UDP, Attribute::EvenPort(false)]);
    assert_eq!(relay.0.port() % 2, 0);

    let free_before = h.server.free_ports();
    h.challenge(client(2));
    let out = h.request(
        client(2),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::EvenPort(true)],
        Some(&alice),
    );
    let (id, relays) = opened(&out.commands);
    assert_eq!(
        h.server.free_ports(),
        free_before - 2,
        "the next port is reserved too"
    );
    h.server.handle_relay_opened(h.now, id, relays[0]);
    let m_out = h.drain();
    let m = m_out.one().msg();
    assert_eq!(relays[0].0.port() % 2, 0);
    let token = m
        .attrs
        .reservation_token
        .expect("RESERVATION-TOKEN with the R bit");

    // The token gives another allocation the reserved port (RFC 8656 §7.2).
    h.challenge(client(3));
    let out = h.request(
        client(3),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::ReservationToken(token)],
        Some(&alice),
    );
    let (_, reserved) = opened(&out.commands);
    assert_eq!(
        reserved[0].0,
        SocketAddr::new(relays[0].0.ip(), relays[0].0.port() + 1)
    );
    // Used once only; unknown tokens get 508; a token with EVEN-PORT is a bad request.
    h.challenge(client(4));
    let reuse = h.request(
        client(4),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::ReservationToken(token)],
        Some(&alice),
    );
    assert_eq!(reuse.error(), Some(508));
    let both = h.request(
        client(4),
        Method::ALLOCATE,
        &[
            RT_UDP,
            Attribute::ReservationToken(7),
            Attribute::EvenPort(false),
        ],
        Some(&alice),
    );
    assert_eq!(both.error(), Some(400));
}

#[test]
fn unused_reservation_expires_and_frees_the_port() {
    let mut h = Harness::new();
    let before = h.server.free_ports();
    h.allocate_with(
        client(1),
        &Creds::alice(),
        &[RT_UDP, Attribute::EvenPort(true)],
    );
    assert_eq!(h.server.free_ports(), before - 2);
    assert!(h.at(ms(29_999)).commands.is_empty());
    assert_eq!(h.server.free_ports(), before - 2);
    h.at(s(30));
    assert_eq!(
        h.server.free_ports(),
        before - 1,
        "reservation lifetime 30 s"
    );
}

#[test]
fn dont_fragment_is_passed_to_the_data_plane() {
    let mut h = Harness::new();
    h.challenge(client(1));
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::DontFragment],
        Some(&Creds::alice()),
    );
    assert!(matches!(
        out.commands[..],
        [Command::OpenRelay {
            dont_fragment: true,
            ..
        }]
    ));
}

#[test]
fn retransmitted_allocate_gets_the_same_response() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let tid = h.next_tid();
    let req = h.build(
        Method::ALLOCATE,
        Class::Request,
        tid,
        &[RT_UDP],
        Some(&alice),
    );
    let out = h.send(client(1), &req);
    let (id, relays) = opened(&out.commands);
    // While the relay socket is being bound, a retransmission is absorbed.
    let again = h.send(client(1), &req);
    assert!(again.sent.is_empty() && again.commands.is_empty());
    h.server.handle_relay_opened(h.now, id, relays[0]);
    let first = h.drain().one().bytes.clone();
    let retransmit = h.send(client(1), &req);
    assert_eq!(retransmit.one().bytes, first);
    assert!(retransmit.commands.is_empty());
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.server.stats().retransmits, 2);

    // A new transaction on the same 5-tuple: 437. Another user's credentials: 441.
    assert_eq!(
        h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&alice))
            .error(),
        Some(437)
    );
    assert_eq!(
        h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&Creds::bob()))
            .error(),
        Some(441)
    );
}

/// A static user's key is derived once per (re)load and reused to sign. An Allocate whose relay
/// socket opens after a reload changed the password is answered with the key it was made with; a new
/// request needs the new password, and its answer is signed with that.
#[test]
fn an_allocate_answered_after_a_password_change_is_signed_with_its_own_key() {
    let mut h = Harness::new();
    let (old, new) = (
        Creds::alice(),
        Creds::static_user("alice", "alice-new-pass"),
    );
    h.challenge(client(1));
    // The Allocate success once the relay socket of `out`'s request opens: (signed with `old`, with `new`).
    let signed_with = |h: &mut Harness, out: Out| {
        let (id, relays) = opened(&out.commands);
        h.server.handle_relay_opened(h.now, id, relays[0]);
        let answer = h.drain().one().bytes.clone();
        let m = Message::parse(&answer).unwrap();
        assert_eq!(
            m.message_type(),
            MessageType::new(Method::ALLOCATE, Class::Success)
        );
        (m.verify_integrity(&old.key), m.verify_integrity(&new.key))
    };
    let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&old));
    let mut changed = config();
    changed.users[0].1 = "alice-new-pass".into();
    h.server.reload(changed).unwrap();
    assert_eq!(signed_with(&mut h, out), (true, false));

    h.challenge(client(2));
    let out = h.request(client(2), Method::ALLOCATE, &[RT_UDP], Some(&old));
    assert_eq!(out.error(), Some(401));
    let out = h.request(client(2), Method::ALLOCATE, &[RT_UDP], Some(&new));
    assert_eq!(signed_with(&mut h, out), (false, true));
}

#[test]
fn refresh_clamps_lifetime() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    for (asked, granted) in [
        (Some(10_000u32), 3600u32),
        (Some(100), 600),
        (None, 600),
        (Some(1000), 1000),
    ] {
        let attrs: Vec<Attribute<'_>> = asked.map(Attribute::Lifetime).into_iter().collect();
        let out = h.request(client(1), Method::REFRESH, &attrs, Some(&alice));
        let m = out.one().msg();
        assert_eq!(
            m.message_type(),
            MessageType::new(Method::REFRESH, Class::Success)
        );
        assert_eq!(m.attrs.lifetime, Some(granted), "asked {asked:?}");
        assert!(m.verify_integrity(&alice.key));
    }
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::Lifetime(99_999)],
        Some(&Creds::alice()),
    );
    assert_eq!(out.error(), Some(437));
}

#[test]
fn allocate_lifetime_is_clamped_too() {
    let mut h = Harness::new();
    h.challenge(client(1));
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, Attribute::Lifetime(99_999)],
        Some(&Creds::alice()),
    );
    let (id, relays) = opened(&out.commands);
    h.server.handle_relay_opened(h.now, id, relays[0]);
    assert_eq!(h.drain().one().msg().attrs.lifetime, Some(3600));
}

#[test]
fn refresh_zero_deletes_and_returns_everything() {
    let mut h = Harness::new();
    let ports = h.server.free_ports();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    let out = h.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    assert_eq!(out.one().msg().attrs.lifetime, Some(0));
    assert_eq!(
        out.commands,
        vec![
            Command::CloseRelay {
                allocation: id,
                relay
            },
            Command::AllocationEnded {
                allocation: id,
                identity: "alice".into(),
                reason: EndReason::Ended,
            },
        ]
    );
    h.assert_empty(ports);
    assert_eq!(
        h.request(client(1), Method::REFRESH, &[], Some(&alice))
            .error(),
        Some(437)
    );
}

#[test]
fn allocation_expires_exactly_on_schedule() {
    let mut h = Harness::new();
    let ports = h.server.free_ports();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    assert_eq!(h.server.poll_timeout(), Some(h.t0 + s(600)));
    assert!(h.at(ms(599_999)).commands.is_empty());
    let out = h.at(s(600));
    assert_eq!(
        out.commands,
        vec![
            Command::CloseRelay {
                allocation: id,
                relay
            },
            Command::AllocationEnded {
                allocation: id,
                identity: "alice".into(),
                reason: EndReason::Ended,
            },
        ]
    );
    h.assert_empty(ports);
    assert_eq!(h.server.poll_timeout(), None);
}

#[test]
fn refresh_after_expiry_is_437_even_before_the_timer_runs() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    h.now = h.t0 + s(600); // no handle_timeout
    h.challenge(client(1));
    assert_eq!(
        h.request(client(1), Method::REFRESH, &[], Some(&alice))
            .error(),
        Some(437)
    );
}

#[test]
fn refresh_extends_from_now() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    h.at(s(500));
    h.request(client(1), Method::REFRESH, &[], Some(&alice));
    assert!(h.at(ms(1_099_999)).commands.is_empty());
    assert_eq!(h.at(s(1100)).commands.len(), 2);
}

#[test]
fn refresh_with_a_family_the_allocation_lacks_is_443() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    let out = h.request(
        client(1),
        Method::REFRESH,
        &[Attribute::RequestedAddressFamily(family::IPV6)],
        Some(&alice),
    );
    assert_eq!(out.error(), Some(443));
}

#[test]
fn requests_of_another_user_get_441() {
    let mut h = Harness::new();
    h.allocate(client(1), &Creds::alice());
    assert_eq!(
        h.request(client(1), Method::REFRESH, &[], Some(&Creds::bob()))
            .error(),
        Some(441)
    );
}

#[test]
fn unknown_comprehension_required_attribute_is_420_after_authentication() {
    let mut h = Harness::new();
    let unknown = Attribute::Unknown {
        typ: 0x7F00,
        value: b"?",
    };
    // Unauthenticated: the challenge comes first, and reveals nothing else.
    let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP, unknown], None);
    assert_eq!(out.error(), Some(401));
    h.nonce = out.one().msg().attrs.nonce.map(str::to_string);
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, unknown],
        Some(&Creds::alice()),
    );
    let m = out.one().msg();
    assert_eq!(m.attrs.error_code.map(|e| e.0), Some(420));
    assert_eq!(
        m.attrs.unknown_attributes.unwrap().collect::<Vec<_>>(),
        vec![0x7F00]
    );
    assert!(m.verify_integrity(&Creds::alice().key));
    // A comprehension-optional unknown attribute is fine.
    let optional = Attribute::Unknown {
        typ: 0xC0DE,
        value: b"",
    };
    let out = h.request(
        client(1),
        Method::ALLOCATE,
        &[RT_UDP, optional],
        Some(&Creds::alice()),
    );
    assert!(matches!(out.commands[..], [Command::OpenRelay { .. }]));
    // On Binding without auth, 420 straight away.
    assert_eq!(
        h.request(client(2), Method::BINDING, &[unknown], None)
            .error(),
        Some(420)
    );
}

#[test]
fn unknown_method_request_is_400_and_responses_are_dropped() {
    let mut h = Harness::new();
    assert_eq!(
        h.request(client(1), Method(0x0FF), &[], None).error(),
        Some(400)
    );
    let tid = h.next_tid();
    let resp = h.build(Method::BINDING, Class::Success, tid, &[], None);
    assert!(h.send(client(1), &resp).sent.is_empty());
    assert_eq!(h.server.stats().unexpected_class, 1);
}

#[test]
fn malformed_datagrams_are_dropped_silently() {
    let mut h = Harness::new();
    let tid = h.next_tid();
    let mut good = h.build(Method::ALLOCATE, Class::Request, tid, &[RT_UDP], None);
    good.push(0); // trailing byte
    for bad in [
        &good[..],
        &good[..10],
        &[0x80u8, 1, 2, 3][..],
        &[][..],
        &[0x16, 3, 1][..],
    ] {
        let out = h.send(client(1), bad);
        assert!(out.sent.is_empty() && out.commands.is_empty());
    }
    assert_eq!(h.server.stats().malformed, 5);
}

#[test]
fn per_user_quota_is_486_and_total_is_508_or_300() {
    let alice = Creds::alice();
    let mut h = Harness::with(Config {
        max_allocations_per_user: 2,
        ..config()
    });
    h.allocate(client(1), &alice);
    h.allocate(client(2), &alice);
    h.challenge(client(3));
    assert_eq!(
        h.request(client(3), Method::ALLOCATE, &[RT_UDP], Some(&alice))
            .error(),
        Some(486)
    );
    h.allocate(client(3), &Creds::bob());
    // Deleting one gives the quota back.
    h.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    h.allocate(client(4), &alice);

    let mut h = Harness::with(Config {
        max_allocations: 1,
        ..config()
    });
    h.allocate(client(1), &alice);
    h.challenge(client(2));
    assert_eq!(
        h.request(client(2), Method::ALLOCATE, &[RT_UDP], Some(&Creds::bob()))
            .error(),
        Some(508)
    );

    let alt: SocketAddr = "198.51.100.99:3478".parse().unwrap();
    let mut h = Harness::with(Config {
        max_allocations: 1,
        alternate_server: Some(alt),
        ..config()
    });
    h.allocate(client(1), &alice);
    h.challenge(client(2));
    let out = h.request(client(2), Method::ALLOCATE, &[RT_UDP], Some(&Creds::bob()));
    assert_eq!(out.error(), Some(300));
    assert_eq!(out.one().msg().attrs.alternate_server, Some(alt));
    assert!(out.one().msg().verify_integrity(&Creds::bob().key));
}

#[test]
fn draining_refuses_new_allocations_but_keeps_old_ones() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    h.server.set_draining(true);
    h.challenge(client(2));
    assert_eq!(
        h.request(client(2), Method::ALLOCATE, &[RT_UDP], Some(&alice))
            .error(),
        Some(508)
    );
    let out = h.request(client(1), Method::REFRESH, &[], Some(&alice));
    assert_eq!(out.one().class(), Class::Success, "{:?}", out.error());
}

#[test]
fn port_pool_exhaustion_is_508_and_release_restores() {
    let alice = Creds::alice();
    let mut h = Harness::with(Config {
        relay_ips: vec![ip(RELAY_V4)],
        relay_ports: 50000..=50001,
        ..config()
    });
    h.allocate(client(1), &alice);
    h.allocate(client(2), &alice);
    h.challenge(client(3));
    assert_eq!(
        h.request(client(3), Method::ALLOCATE, &[RT_UDP], Some(&alice))
            .error(),
        Some(508)
    );
    assert_eq!(h.server.allocation_count(), 2);
    h.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    h.allocate(client(3), &alice);
}

#[test]
fn relay_bind_failure_retries_then_508() {
    let mut h = Harness::new();
    let ports = h.server.free_ports();
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&alice));
    let (id, mut relays) = opened(&out.commands);
    for _ in 0..2 {
        h.server.handle_relay_failed(h.now, id, relays[0]);
        let out = h.drain();
        assert!(out.sent.is_empty());
        let (again, next) = opened(&out.commands);
        assert_eq!(again, id);
        assert_ne!(next[0], relays[0]);
        relays = next;
    }
    h.server.handle_relay_failed(h.now, id, relays[0]);
    let out = h.drain();
    assert_eq!(out.error(), Some(508));
    assert_eq!(
        out.commands,
        vec![Command::AllocationEnded {
            allocation: id,
            identity: "alice".into(),
            reason: EndReason::Ended,
        }]
    );
    h.assert_empty(ports);
}

#[test]
fn userhash_identifies_a_static_user() {
    use sha2::{Digest, Sha256};
    let mut h = Harness::new();
    h.challenge(client(1));
    let hash: [u8; 32] = Sha256::digest(format!("alice:{REALM}").as_bytes()).into();
    let tid = h.next_tid();
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(
        &mut buf,
        MessageType::new(Method::ALLOCATE, Class::Request),
        tid,
    )
    .unwrap();
    w.add(&RT_UDP).unwrap();
    w.add(&Attribute::Userhash(&hash)).unwrap();
    w.add(&Attribute::Realm(REALM)).unwrap();
    w.add(&Attribute::Nonce(h.nonce.as_deref().unwrap()))
        .unwrap();
    w.add_integrity(&Creds::alice().key).unwrap();
    let n = w.finish();
    let out = h.send(client(1), &buf[..n]);
    assert!(
        matches!(out.commands[..], [Command::OpenRelay { .. }]),
        "{:?}",
        out.sent
    );
}

#[test]
fn stream_clients_get_answers_on_their_connection() {
    let mut h = Harness::new();
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..client(1)
    };
    let out = h.request(tcp, Method::BINDING, &[], None);
    assert_eq!(out.one().transport, Transport::Tcp);
    let (_, id) = h.allocate(tcp, &Creds::alice());
    let (_, other) = h.allocate(client(1), &Creds::alice());
    assert_ne!(
        id, other,
        "the UDP and TCP 5-tuples are different allocations"
    );
}

/// RFC 8656 §3.1: over TCP or TLS the 5-tuple is the connection, so closing it ends the allocation, and
/// only that one: an allocation of the same client address over UDP stays.
#[test]
fn closing_a_stream_connection_ends_its_allocation_only() {
    let mut h = Harness::new();
    let ports = h.server.free_ports();
    let alice = Creds::alice();
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..client(1)
    };
    let (relay, id) = h.allocate(tcp, &alice);
    let (_, udp_id) = h.allocate(client(1), &alice);
    assert_ne!(id, udp_id);
    // A connection without an allocation: nothing happens.
    h.server.handle_connection_closed(
        h.now,
        FiveTuple {
            transport: Transport::Tls,
            ..client(2)
        },
    );
    assert!(h.drain().commands.is_empty());
    h.server.handle_connection_closed(h.now, tcp);
    assert_eq!(
        h.drain().commands,
        vec![
            Command::CloseRelay {
                allocation: id,
                relay
            },
            Command::AllocationEnded {
                allocation: id,
                identity: "alice".into(),
                reason: EndReason::Ended,
            },
        ]
    );
    assert_eq!(h.server.free_ports(), ports - 1, "the UDP allocation stays");
    assert_eq!(
        h.request(client(1), Method::REFRESH, &[], Some(&alice))
            .one()
            .class(),
        Class::Success
    );
}

/// Design §3: unauthenticated answers are rate-limited per source, so the relay cannot reflect a flood.
#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut h = Harness::with(Config {
        challenge_rate: 2,
        ..config()
    });
    let answered = (0..6)
        .filter(|_| {
            !h.request(client(1), Method::ALLOCATE, &[RT_UDP], None)
                .sent
                .is_empty()
        })
        .count();
    assert_eq!(answered, 4, "a burst of twice the rate, then silence");
    assert_eq!(h.server.stats().rate_limited, 2);
    let other = FiveTuple {
        client: "192.0.2.77:5000".parse().unwrap(),
        ..client(1)
    };
    assert_eq!(
        h.request(other, Method::ALLOCATE, &[RT_UDP], None).error(),
        Some(401),
        "other sources unaffected"
    );
    h.at(ms(499));
    assert!(h
        .request(client(1), Method::ALLOCATE, &[RT_UDP], None)
        .sent
        .is_empty());
    h.at(ms(500));
    assert_eq!(
        h.request(client(1), Method::ALLOCATE, &[RT_UDP], None)
            .error(),
        Some(401),
        "one token per 500 ms at 2/s"
    );
    assert_eq!(
        h.server.allocation_count() + h.server.timer_count(),
        0,
        "and no state either way"
    );
}
