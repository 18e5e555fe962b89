//! Permissions, channels, Send/Data indications, ChannelData, peer policy.

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn chan(n: u16) -> ChannelNumber {
    ChannelNumber::new(n).unwrap()
}

/// The transaction id of the last request the harness built.
fn last_tid(h: &Harness) -> TransactionId {
    let mut t = [0u8; 12];
    t[4..].copy_from_slice(&h.tid.to_be_bytes());
    TransactionId(t)
}

/// A CreatePermission request for `peers`, whatever the answer.
fn create_permission(h: &mut Harness, five: FiveTuple, creds: &Creds, peers: &[SocketAddr]) -> Out {
    let attrs: Vec<Attribute<'_>> = peers
        .iter()
        .map(|p| Attribute::XorPeerAddress(*p))
        .collect();
    h.request(five, Method::CREATE_PERMISSION, &attrs, Some(creds))
}

fn send_indication(h: &mut Harness, five: FiveTuple, peer: SocketAddr, data: &[u8]) -> Out {
    let tid = h.next_tid();
    let bytes = h.build(
        Method::SEND,
        Class::Indication,
        tid,
        &[Attribute::XorPeerAddress(peer), Attribute::Data(data)],
        None,
    );
    h.send(five, &bytes)
}

/// ChannelData bytes: the 4-byte header, the payload and `pad` zero bytes.
fn channel_data(channel: u16, payload: &[u8], pad: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&channel.to_be_bytes());
    b.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    b.extend_from_slice(payload);
    b.resize(b.len() + pad, 0);
    b
}

fn refresh(h: &mut Harness, five: FiveTuple, creds: &Creds, lifetime: u32) -> Out {
    h.request(
        five,
        Method::REFRESH,
        &[Attribute::Lifetime(lifetime)],
        Some(creds),
    )
}

/// The datagram the relay sends to a peer.
fn to_peer(relay: RelayAddr, peer: SocketAddr, payload: &[u8]) -> Sent {
    Sent {
        transport: Transport::Udp,
        src: relay.0,
        dst: peer,
        bytes: payload.to_vec(),
    }
}

fn install_permission(id: AllocationId, relay: RelayAddr, five: FiveTuple, peer: &str) -> Command {
    Command::InstallPermission {
        allocation: id,
        relay,
        client: five,
        peer: ip(peer),
    }
}

fn remove_permission(id: AllocationId, relay: RelayAddr, peer: &str) -> Command {
    Command::RemovePermission {
        allocation: id,
        relay,
        peer: ip(peer),
    }
}

fn install_channel(
    id: AllocationId,
    relay: RelayAddr,
    five: FiveTuple,
    channel: u16,
    peer: SocketAddr,
) -> Command {
    Command::InstallChannel {
        allocation: id,
        client: five,
        relay,
        channel: chan(channel),
        peer: PeerAddr(peer),
    }
}

fn remove_channel(
    id: AllocationId,
    relay: RelayAddr,
    five: FiveTuple,
    channel: u16,
    peer: SocketAddr,
) -> Command {
    Command::RemoveChannel {
        allocation: id,
        client: five,
        relay,
        channel: chan(channel),
        peer: PeerAddr(peer),
    }
}

/// Assert a signed success response of `method` to the last request, to `five`.
#[track_caller]
fn assert_success(h: &Harness, out: &Out, five: FiveTuple, method: Method, creds: &Creds) {
    let r = out.one();
    assert_eq!(
        (r.transport, r.src, r.dst),
        (five.transport, five.server, five.client)
    );
    let m = r.msg();
    assert_eq!(
        m.message_type(),
        MessageType::new(method, Class::Success),
        "{:?}",
        m.attrs.error_code
    );
    assert_eq!(m.transaction_id(), last_tid(h));
    assert!(
        m.verify_integrity(&creds.key),
        "signed with the request's key"
    );
}

/// Assert a signed error response with `code` to the last request, and no command.
#[track_caller]
fn assert_refused(
    h: &Harness,
    out: &Out,
    five: FiveTuple,
    method: Method,
    creds: &Creds,
    code: u16,
) {
    assert!(out.commands.is_empty(), "{:?}", out.commands);
    let r = out.one();
    assert_eq!(
        (r.transport, r.src, r.dst),
        (five.transport, five.server, five.client)
    );
    let m = r.msg();
    assert_eq!(m.message_type(), MessageType::new(method, Class::Error));
    assert_eq!(r.error(), Some(code));
    assert_eq!(m.transaction_id(), last_tid(h));
    assert!(
        m.verify_integrity(&creds.key),
        "signed with the request's key"
    );
}

/// The payload of a Data indication from `peer`, asserting its shape (RFC 8656 §11.3).
#[track_caller]
fn data_indication(s: &Sent, five: FiveTuple, peer: SocketAddr) -> Vec<u8> {
    assert_eq!(
        (s.transport, s.src, s.dst),
        (five.transport, five.server, five.client)
    );
    let m = s.msg();
    assert_eq!(
        m.message_type(),
        MessageType::new(Method::DATA, Class::Indication)
    );
    assert_eq!(m.attrs.xor_peer_address, Some(peer));
    assert!(
        !m.has_integrity() && !m.has_integrity_sha256(),
        "indications are not signed"
    );
    m.attrs.data.expect("DATA").to_vec()
}

// ---------------------------------------------------------------------------------------------------
// 1. CreatePermission
// ---------------------------------------------------------------------------------------------------

#[test]
fn send_indication_relays_only_with_a_permission() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate(client(1), &alice);
    let send = h.build(
        Method::SEND,
        Class::Indication,
        TransactionId([9; 12]),
        &[
            Attribute::XorPeerAddress(peer(1)),
            Attribute::Data(b"hello"),
        ],
        None,
    );
    let out = h.send(client(1), &send);
    assert!(out.sent.is_empty(), "no permission yet: dropped");
    assert_eq!(h.server.stats().no_permission, 1);

    h.permit(client(1), &alice, &[peer(1)]);
    let out = h.send(client(1), &send);
    assert_eq!(
        out.sent,
        vec![Sent {
            transport: Transport::Udp,
            src: relay.0,
            dst: peer(1),
            bytes: b"hello".to_vec()
        }]
    );
}

#[test]
fn create_permission_installs_one_permission_per_distinct_ip_in_order() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    let peers = [peer(1), sa("8.8.8.8:53"), peer(2), sa("1.1.1.1:1")];
    let out = create_permission(&mut h, client(1), &alice, &peers);
    assert_success(&h, &out, client(1), Method::CREATE_PERMISSION, &alice);
    assert!(!out.one().msg().verify_integrity(&Creds::bob().key));
    assert_eq!(
        out.commands,
        vec![
            install_permission(id, relay, client(1), "8.8.4.4"),
            install_permission(id, relay, client(1), "8.8.8.8"),
            install_permission(id, relay, client(1), "1.1.1.1"),
        ]
    );
    // A permission covers the IP, whatever the port (RFC 8656 §9).
    for p in [peer(1), peer(7), sa("8.8.8.8:9"), sa("1.1.1.1:1")] {
        let out = send_indication(&mut h, client(1), p, b"x");
        assert_eq!(out.sent, vec![to_peer(relay, p, b"x")]);
    }
    // 8.8.8.4 was never permitted.
    let out = send_indication(&mut h, client(1), sa("8.8.8.4:53"), b"x");
    assert!(out.sent.is_empty());
}

#[test]
fn create_permission_is_all_or_nothing() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (_, _) = h.allocate(client(1), &alice);
    let peers = [peer(1), sa("10.0.0.1:5000"), sa("8.8.8.8:53")];
    let out = create_permission(&mut h, client(1), &alice, &peers);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 403);

    let before = h.server.stats();
    for p in [peer(1), sa("8.8.8.8:53")] {
        let out = send_indication(&mut h, client(1), p, b"x");
        assert!(out.sent.is_empty() && out.commands.is_empty());
    }
    assert_eq!(
        h.server.stats(),
        Stats {
            no_permission: before.no_permission + 2,
            ..before
        }
    );
}

#[test]
fn create_permission_without_peer_address_is_400() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    let out = create_permission(&mut h, client(1), &alice, &[]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 400);
}

#[test]
fn create_permission_for_a_family_the_allocation_lacks_is_443() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    let v6 = sa("[2606:4700::1111]:443");
    let out = create_permission(&mut h, client(1), &alice, &[v6]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 443);
    // Mixed with an acceptable IPv4 peer: still refused as a whole.
    let out = create_permission(&mut h, client(1), &alice, &[peer(1), v6]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 443);
    assert!(send_indication(&mut h, client(1), peer(1), b"x")
        .sent
        .is_empty());
}

#[test]
fn permission_quota_is_508_but_refreshing_an_existing_ip_succeeds() {
    let mut h = Harness::with(Config {
        max_permissions_per_allocation: 2,
        ..config()
    });
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    let out = h.permit(client(1), &alice, &[peer(1)]);
    assert_eq!(out.commands.len(), 1);
    // Two ports of one new IP are one new permission: within the quota.
    let out = h.permit(client(1), &alice, &[sa("8.8.8.8:53"), sa("8.8.8.8:54")]);
    assert_eq!(
        out.commands,
        vec![install_permission(id, relay, client(1), "8.8.8.8")]
    );

    let out = create_permission(&mut h, client(1), &alice, &[sa("1.1.1.1:1")]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 508);
    // One known and one new IP is still one too many.
    let out = create_permission(&mut h, client(1), &alice, &[peer(1), sa("1.1.1.1:1")]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 508);
    // ChannelBind to a new IP would install a third permission too.
    let out = h.bind(client(1), &alice, 0x4000, sa("1.1.1.1:1"));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 508);
    assert!(send_indication(&mut h, client(1), sa("1.1.1.1:1"), b"x")
        .sent
        .is_empty());

    // Re-permitting known IPs (any port) refreshes without a new command.
    let out = create_permission(&mut h, client(1), &alice, &[peer(5), sa("8.8.8.8:54")]);
    assert_success(&h, &out, client(1), Method::CREATE_PERMISSION, &alice);
    assert!(out.commands.is_empty());
    // And a channel to a permitted IP only installs the channel.
    let out = h.bind(client(1), &alice, 0x4000, peer(1));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![install_channel(id, relay, client(1), 0x4000, peer(1))]
    );
}

#[test]
fn create_permission_without_allocation_is_437() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = create_permission(&mut h, client(1), &alice, &[peer(1)]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 437);
    let out = h.bind(client(1), &alice, 0x4000, peer(1));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 437);
}

#[test]
fn create_permission_by_another_user_is_441() {
    let mut h = Harness::new();
    let (alice, bob) = (Creds::alice(), Creds::bob());
    h.allocate(client(1), &alice);
    let out = create_permission(&mut h, client(1), &bob, &[peer(1)]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &bob, 441);
    let out = h.bind(client(1), &bob, 0x4000, peer(1));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &bob, 441);
    assert!(send_indication(&mut h, client(1), peer(1), b"x")
        .sent
        .is_empty());
}

// ---------------------------------------------------------------------------------------------------
// 2. Permission lifetime
// ---------------------------------------------------------------------------------------------------

#[test]
fn permission_lasts_exactly_300_seconds() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    h.permit(client(1), &alice, &[peer(1)]);

    let out = h.at(millis(299_999));
    assert!(out.sent.is_empty() && out.commands.is_empty(), "{out:?}");
    let out = send_indication(&mut h, client(1), peer(1), b"still");
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), b"still")]);
    let out = h.peer_data(relay, peer(1), b"back");
    assert_eq!(data_indication(out.one(), client(1), peer(1)), b"back");

    // At +300 the permission is gone even if the timer has not run yet.
    h.now = h.t0 + secs(300);
    let before = h.server.stats();
    assert!(send_indication(&mut h, client(1), peer(1), b"late")
        .sent
        .is_empty());
    assert!(h.peer_data(relay, peer(1), b"late").sent.is_empty());
    assert_eq!(
        h.server.stats(),
        Stats {
            no_permission: before.no_permission + 2,
            ..before
        }
    );

    let out = h.at(secs(300));
    assert!(out.sent.is_empty());
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
    assert!(send_indication(&mut h, client(1), peer(1), b"late")
        .sent
        .is_empty());
    assert!(h.peer_data(relay, peer(1), b"late").sent.is_empty());
    assert_eq!(h.server.stats().no_permission, before.no_permission + 4);
}

#[test]
fn create_permission_refreshes_the_permission() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    h.permit(client(1), &alice, &[peer(1)]);
    h.at(secs(200));
    let out = h.permit(client(1), &alice, &[peer(2)]);
    assert!(out.commands.is_empty(), "a refresh installs nothing new");

    let out = h.at(secs(300));
    assert!(out.commands.is_empty(), "{:?}", out.commands);
    let out = h.at(millis(499_999));
    assert!(out.commands.is_empty(), "{:?}", out.commands);
    assert_eq!(
        send_indication(&mut h, client(1), peer(1), b"x").sent.len(),
        1
    );
    let out = h.at(secs(500));
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
    assert!(send_indication(&mut h, client(1), peer(1), b"x")
        .sent
        .is_empty());
}

#[test]
fn data_never_refreshes_a_permission() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    h.permit(client(1), &alice, &[peer(1)]);
    h.bind(client(1), &alice, 0x4000, peer(2));
    // The bind at t0 refreshed the permission to t0 + 300 too; traffic after that must not.
    for t in [100, 200, 299] {
        h.at(secs(t));
        assert_eq!(
            send_indication(&mut h, client(1), peer(1), b"s").sent.len(),
            1
        );
        let out = h.send(client(1), &channel_data(0x4000, b"c", 0));
        assert_eq!(out.sent, vec![to_peer(relay, peer(2), b"c")]);
        assert_eq!(h.peer_data(relay, peer(1), b"d").sent.len(), 1);
        assert_eq!(h.peer_data(relay, peer(2), b"d").sent.len(), 1);
    }
    let out = h.at(secs(300));
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
    // The channel is still bound, but without a permission nothing flows either way.
    assert!(h
        .send(client(1), &channel_data(0x4000, b"c", 0))
        .sent
        .is_empty());
    assert!(h.peer_data(relay, peer(2), b"d").sent.is_empty());
}

// ---------------------------------------------------------------------------------------------------
// 3. ChannelBind
// ---------------------------------------------------------------------------------------------------

#[test]
fn channel_numbers_outside_0x4000_to_0x4fff_are_400() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    for n in [0x0000, 0x0001, 0x3FFF, 0x5000, 0x7FFF, 0x8000, 0xFFFF] {
        let out = h.bind(client(1), &alice, n, peer(1));
        assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 400);
    }
    let out = h.bind(client(1), &alice, 0x4000, peer(1));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![
            install_permission(id, relay, client(1), "8.8.4.4"),
            install_channel(id, relay, client(1), 0x4000, peer(1)),
        ]
    );
    let out = h.bind(client(1), &alice, 0x4FFF, peer(2));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![install_channel(id, relay, client(1), 0x4FFF, peer(2))]
    );
}

#[test]
fn channel_bind_needs_both_attributes() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    for attrs in [
        vec![Attribute::XorPeerAddress(peer(1))],
        vec![Attribute::ChannelNumber(0x4000)],
        vec![],
    ] {
        let out = h.request(client(1), Method::CHANNEL_BIND, &attrs, Some(&alice));
        assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 400);
    }
    assert!(send_indication(&mut h, client(1), peer(1), b"x")
        .sent
        .is_empty());
}

#[test]
fn a_channel_binds_one_peer_and_a_peer_one_channel() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    assert_eq!(h.bind(client(1), &alice, 0x4000, peer(1)).commands.len(), 2);

    let out = h.bind(client(1), &alice, 0x4000, peer(2));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 400);
    let out = h.bind(client(1), &alice, 0x4001, peer(1));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 400);
    // Channels bind transport addresses: another port of the same IP takes another channel.
    let out = h.bind(client(1), &alice, 0x4001, peer(2));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![install_channel(id, relay, client(1), 0x4001, peer(2))]
    );
    // The refused binds changed nothing: 0x4000 still goes to peer(1).
    let out = h.send(client(1), &channel_data(0x4000, b"a", 0));
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), b"a")]);
}

#[test]
fn channel_bind_to_a_denied_peer_is_403() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    let out = h.bind(client(1), &alice, 0x4000, sa("127.0.0.1:5000"));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 403);
    // Nothing was reserved by the refusal: the number is still free.
    let out = h.bind(client(1), &alice, 0x4000, peer(1));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
}

#[test]
fn rebinding_refreshes_channel_and_permission_without_reinstalling() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    let out = refresh(&mut h, client(1), &alice, 3600);
    assert_success(&h, &out, client(1), Method::REFRESH, &alice);
    h.bind(client(1), &alice, 0x4000, peer(1));
    h.at(secs(200));
    let out = h.bind(client(1), &alice, 0x4000, peer(1));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert!(out.commands.is_empty(), "{:?}", out.commands);

    assert!(h.at(secs(300)).commands.is_empty(), "permission refreshed");
    let out = h.at(secs(500));
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
    assert!(h.at(secs(600)).commands.is_empty(), "channel refreshed");
    let out = h.at(secs(800));
    assert_eq!(
        out.commands,
        vec![remove_channel(id, relay, client(1), 0x4000, peer(1))]
    );
}

#[test]
fn channel_lifetime_and_cooldown() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    refresh(&mut h, client(1), &alice, 3600);
    let (a, b, c) = (0x4000, 0x4001, 0x4002);
    let out = h.bind(client(1), &alice, a, peer(1));
    assert_eq!(
        out.commands,
        vec![
            install_permission(id, relay, client(1), "8.8.4.4"),
            install_channel(id, relay, client(1), a, peer(1)),
        ]
    );
    let out = h.bind(client(1), &alice, b, peer(2));
    assert_eq!(
        out.commands,
        vec![install_channel(id, relay, client(1), b, peer(2))]
    );

    let out = h.at(secs(300));
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
    assert!(h.at(millis(599_999)).commands.is_empty());
    let out = h.at(secs(600));
    assert_eq!(
        out.commands,
        vec![
            remove_channel(id, relay, client(1), a, peer(1)),
            remove_channel(id, relay, client(1), b, peer(2)),
        ]
    );
    // Expired: ChannelData on it is dropped as unbound, and peer data has no permission.
    let before = h.server.stats();
    assert!(h.send(client(1), &channel_data(a, b"x", 0)).sent.is_empty());
    assert_eq!(h.server.stats().no_channel, before.no_channel + 1);

    // During the cool-down neither the number nor the peer may be bound to anything else.
    h.at(secs(700));
    h.challenge(client(1)); // the nonce lasts 600 s
    let out = h.bind(client(1), &alice, a, peer(3));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 400);
    let out = h.bind(client(1), &alice, c, peer(1));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 400);
    // The same pair may be bound again, and is installed again.
    let out = h.bind(client(1), &alice, a, peer(1));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![
            install_permission(id, relay, client(1), "8.8.4.4"),
            install_channel(id, relay, client(1), a, peer(1)),
        ]
    );
    let out = h.send(client(1), &channel_data(a, b"again", 0));
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), b"again")]);

    // B's cool-down ends silently at +900; then its number and its peer are free.
    assert!(h.at(millis(899_999)).commands.is_empty());
    let out = h.bind(client(1), &alice, b, peer(3));
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 400);
    let out = h.at(secs(900));
    assert!(out.commands.is_empty() && out.sent.is_empty(), "{out:?}");
    let out = h.bind(client(1), &alice, b, peer(3));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![install_channel(id, relay, client(1), b, peer(3))]
    );
    let out = h.bind(client(1), &alice, c, peer(2));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![install_channel(id, relay, client(1), c, peer(2))]
    );
}

// ---------------------------------------------------------------------------------------------------
// 4. ChannelData from the client
// ---------------------------------------------------------------------------------------------------

#[test]
fn client_channel_data_relays_on_a_bound_channel_only() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate(client(1), &alice);
    h.bind(client(1), &alice, 0x4000, peer(1));

    let payload: Vec<u8> = (0..=255).collect();
    let out = h.send(client(1), &channel_data(0x4000, &payload, 0));
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), &payload)]);
    assert!(out.commands.is_empty());
    // Over UDP, trailing padding is allowed and not relayed.
    let out = h.send(client(1), &channel_data(0x4000, b"abcde", 3));
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), b"abcde")]);
    // An empty payload is a valid datagram.
    let out = h.send(client(1), &channel_data(0x4000, b"", 0));
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), b"")]);

    let before = h.server.stats();
    let out = h.send(client(1), &channel_data(0x4001, b"abc", 0));
    assert!(out.sent.is_empty() && out.commands.is_empty());
    assert_eq!(
        h.server.stats(),
        Stats {
            no_channel: before.no_channel + 1,
            ..before
        }
    );

    // Length beyond the datagram.
    let mut bad = channel_data(0x4000, b"abcd", 0);
    bad.truncate(6);
    let out = h.send(client(1), &bad);
    assert!(out.sent.is_empty());
    // A header cut short.
    let out2 = h.send(client(1), &[0x40, 0x00, 0x00]);
    assert!(out2.sent.is_empty());
    assert_eq!(
        h.server.stats(),
        Stats {
            no_channel: before.no_channel + 1,
            malformed: before.malformed + 2,
            ..before
        }
    );
}

#[test]
fn channel_data_without_allocation_is_dropped() {
    let mut h = Harness::new();
    let before = h.server.stats();
    assert!(h
        .send(client(1), &channel_data(0x4000, b"x", 0))
        .sent
        .is_empty());
    assert_eq!(
        h.server.stats(),
        Stats {
            no_allocation: before.no_allocation + 1,
            ..before
        }
    );
}

fn tcp(n: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Tcp,
        ..client(n)
    }
}

#[test]
fn stream_channel_data_is_padded_both_ways() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate(tcp(1), &alice);
    h.bind(tcp(1), &alice, 0x4000, peer(1));
    let out = h.send(tcp(1), &channel_data(0x4000, b"hello", 3));
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), b"hello")]);

    for (payload, padded) in [(&b"hello"[..], 12), (b"1234", 8), (b"", 4), (b"a", 8)] {
        let out = h.peer_data(relay, peer(1), payload);
        let mut want = channel_data(0x4000, payload, 0);
        want.resize(padded, 0);
        assert_eq!(
            out.sent,
            vec![Sent {
                transport: Transport::Tcp,
                src: tcp(1).server,
                dst: tcp(1).client,
                bytes: want,
            }]
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// 5. Peer data
// ---------------------------------------------------------------------------------------------------

#[test]
fn peer_data_goes_as_channel_data_when_bound_else_as_data_indication() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate(client(1), &alice);
    h.bind(client(1), &alice, 0x4ABC, peer(1));

    let out = h.peer_data(relay, peer(1), b"hello");
    assert_eq!(
        out.sent,
        vec![Sent {
            transport: Transport::Udp,
            src: client(1).server,
            dst: client(1).client,
            bytes: vec![0x4A, 0xBC, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o'],
        }]
    );
    assert!(out.commands.is_empty());

    // Same IP, other port: the permission covers it, the channel does not.
    let out = h.peer_data(relay, peer(2), b"hello");
    assert_eq!(data_indication(out.one(), client(1), peer(2)), b"hello");
    let m = out.one().msg();
    assert_eq!(m.attrs.fingerprint, None);
    // Every Data indication gets a fresh transaction id.
    let out2 = h.peer_data(relay, peer(2), b"");
    assert_eq!(data_indication(out2.one(), client(1), peer(2)), b"");
    assert_ne!(out2.one().msg().transaction_id(), m.transaction_id());

    let before = h.server.stats();
    assert!(h.peer_data(relay, sa("8.8.8.8:53"), b"x").sent.is_empty());
    let unknown = RelayAddr(sa("203.0.113.10:3000"));
    assert!(h.peer_data(unknown, peer(1), b"x").sent.is_empty());
    assert_eq!(
        h.server.stats(),
        Stats {
            no_permission: before.no_permission + 1,
            unknown_relay: before.unknown_relay + 1,
            ..before
        }
    );
}

#[test]
fn peer_data_over_ipv6_carries_the_ipv6_peer() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate_with(
        client(1),
        &alice,
        &[
            Attribute::RequestedTransport(17),
            Attribute::RequestedAddressFamily(wire::family::IPV6),
        ],
    );
    assert!(relay.0.is_ipv6());
    let p = sa("[2606:4700::1111]:443");
    h.permit(client(1), &alice, &[p]);
    let out = h.peer_data(relay, p, b"v6");
    assert_eq!(data_indication(out.one(), client(1), p), b"v6");
    let out = send_indication(&mut h, client(1), p, b"v6");
    assert_eq!(out.sent, vec![to_peer(relay, p, b"v6")]);
}

// ---------------------------------------------------------------------------------------------------
// 6. Usage
// ---------------------------------------------------------------------------------------------------

/// Relay 5 packets (72 bytes) to peers and 3 (124 bytes) back, with drops in between that must not count,
/// then delete the allocation and return its commands.
fn relay_some_and_delete(
    h: &mut Harness,
    five: FiveTuple,
    creds: &Creds,
) -> (RelayAddr, AllocationId, Out) {
    let (relay, id) = h.allocate(five, creds);
    h.permit(five, creds, &[peer(2)]);
    h.bind(five, creds, 0x4000, peer(1));
    for n in [10, 20, 30] {
        assert_eq!(send_indication(h, five, peer(2), &vec![1; n]).sent.len(), 1);
    }
    for n in [5, 7] {
        assert_eq!(
            h.send(five, &channel_data(0x4000, &vec![2; n], 0))
                .sent
                .len(),
            1
        );
    }
    // Dropped: no permission, unbound channel, unknown sender.
    assert!(send_indication(h, five, sa("8.8.8.8:1"), &[0; 100])
        .sent
        .is_empty());
    assert!(h
        .send(five, &channel_data(0x4001, &[0; 100], 0))
        .sent
        .is_empty());
    assert!(h
        .peer_data(relay, sa("8.8.8.8:1"), &[0; 100])
        .sent
        .is_empty());
    for (from, n) in [(peer(1), 11), (peer(2), 13), (peer(1), 100)] {
        assert_eq!(h.peer_data(relay, from, &vec![3; n]).sent.len(), 1);
    }
    let out = refresh(h, five, creds, 0);
    assert_success(h, &out, five, Method::REFRESH, creds);
    assert_eq!(out.one().msg().attrs.lifetime, Some(0));
    (relay, id, out)
}

#[test]
fn allocation_ended_reports_exact_usage_for_a_static_user() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id, out) = relay_some_and_delete(&mut h, client(1), &alice);
    assert_eq!(
        out.commands,
        vec![
            remove_channel(id, relay, client(1), 0x4000, peer(1)),
            remove_permission(id, relay, "8.8.4.4"),
            Command::CloseRelay {
                allocation: id,
                relay
            },
            Command::AllocationEnded {
                allocation: id,
                identity: "alice".into(),
                usage: Usage {
                    to_peer_bytes: 72,
                    to_peer_packets: 5,
                    to_client_bytes: 124,
                    to_client_packets: 3,
                },
            },
        ]
    );
    h.assert_empty(200);
}

#[test]
fn allocation_ended_bills_the_rest_user_id() {
    let mut h = Harness::new();
    let carol = Creds::rest(SECRET_NEW, "carol", UNIX0 + 3600);
    let (_, id, out) = relay_some_and_delete(&mut h, client(1), &carol);
    assert_eq!(
        out.commands.last(),
        Some(&Command::AllocationEnded {
            allocation: id,
            identity: "carol".into(),
            usage: Usage {
                to_peer_bytes: 72,
                to_peer_packets: 5,
                to_client_bytes: 124,
                to_client_packets: 3,
            },
        })
    );
    h.assert_empty(200);
}

#[test]
fn expiry_reports_usage_too() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    h.permit(client(1), &alice, &[peer(1)]);
    send_indication(&mut h, client(1), peer(1), b"abc");
    h.peer_data(relay, peer(1), b"abcdefg");
    let out = h.at(secs(300));
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
    assert!(h.at(millis(599_999)).commands.is_empty());
    let out = h.at(secs(600));
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
                usage: Usage {
                    to_peer_bytes: 3,
                    to_peer_packets: 1,
                    to_client_bytes: 7,
                    to_client_packets: 1,
                },
            },
        ]
    );
    h.assert_empty(200);
}

// ---------------------------------------------------------------------------------------------------
// 7. Peer policy through the server
// ---------------------------------------------------------------------------------------------------

const DENIED_V4: &[&str] = &[
    "127.0.0.1",
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "224.0.0.1",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.5",
    "198.51.100.5",
    "203.0.113.5",
];

const DENIED_V6: &[&str] = &[
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "2001:db8::5",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::a00:1",
    "2002:a00:1::1",
    "2001::1",
];

/// Assert CreatePermission and ChannelBind for `peer` are both answered `code`, and nothing is installed.
#[track_caller]
fn assert_peer_refused(
    h: &mut Harness,
    five: FiveTuple,
    creds: &Creds,
    peer: SocketAddr,
    code: u16,
) {
    let out = create_permission(h, five, creds, &[peer]);
    assert_eq!(out.error(), Some(code), "CreatePermission {peer}");
    assert_refused(h, &out, five, Method::CREATE_PERMISSION, creds, code);
    let out = h.bind(five, creds, 0x4000, peer);
    assert_eq!(out.error(), Some(code), "ChannelBind {peer}");
    assert_refused(h, &out, five, Method::CHANNEL_BIND, creds, code);
}

#[track_caller]
fn assert_peer_allowed(
    h: &mut Harness,
    five: FiveTuple,
    creds: &Creds,
    peer: SocketAddr,
    channel: u16,
) {
    let out = create_permission(h, five, creds, &[peer]);
    assert_success(h, &out, five, Method::CREATE_PERMISSION, creds);
    let out = h.bind(five, creds, channel, peer);
    assert_success(h, &out, five, Method::CHANNEL_BIND, creds);
}

fn v6_attrs() -> [Attribute<'static>; 2] {
    [
        Attribute::RequestedTransport(17),
        Attribute::RequestedAddressFamily(wire::family::IPV6),
    ]
}

fn dual_attrs() -> [Attribute<'static>; 2] {
    [
        Attribute::RequestedTransport(17),
        Attribute::AdditionalAddressFamily(wire::family::IPV6),
    ]
}

#[test]
fn every_deny_range_is_403_for_create_permission_and_channel_bind() {
    let mut h = Harness::new();
    let (alice, bob) = (Creds::alice(), Creds::bob());
    let carol = Creds::rest(SECRET_NEW, "carol", UNIX0 + 3600);

    // IPv4-only allocation: IPv4 peers are 403, IPv6 ones 443.
    h.allocate(client(1), &alice);
    for s in DENIED_V4 {
        assert_peer_refused(&mut h, client(1), &alice, SocketAddr::new(ip(s), 5000), 403);
    }
    for s in DENIED_V6 {
        assert_peer_refused(&mut h, client(1), &alice, SocketAddr::new(ip(s), 5000), 443);
    }
    assert_peer_allowed(&mut h, client(1), &alice, sa("8.8.4.4:5000"), 0x4000);

    // IPv6-only allocation: the family matches, so the refusal is the policy's.
    let (relay6, _) = h.allocate_with(client(2), &bob, &v6_attrs());
    assert!(relay6.0.is_ipv6());
    for s in DENIED_V6 {
        assert_peer_refused(&mut h, client(2), &bob, SocketAddr::new(ip(s), 5000), 403);
    }
    assert_peer_allowed(
        &mut h,
        client(2),
        &bob,
        sa("[2606:4700::1111]:5000"),
        0x4000,
    );

    // Dual-stack: every denied address of either family is 403.
    h.allocate_with(client(3), &carol, &dual_attrs());
    for s in DENIED_V4.iter().chain(DENIED_V6) {
        assert_peer_refused(&mut h, client(3), &carol, SocketAddr::new(ip(s), 5000), 403);
    }
    assert_peer_allowed(&mut h, client(3), &carol, sa("8.8.4.4:5000"), 0x4000);
    assert_peer_allowed(
        &mut h,
        client(3),
        &carol,
        sa("[2606:4700::1111]:5000"),
        0x4001,
    );
    // Port 0 is never a destination, even on a public address.
    assert_peer_refused(&mut h, client(3), &carol, sa("8.8.4.4:0"), 403);
    assert_peer_refused(&mut h, client(3), &carol, sa("[2606:4700::1111]:0"), 403);
}

#[test]
fn loopback_config_allows_loopback_peers() {
    let mut h = Harness::with(loopback_config());
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    let lo = sa("127.0.0.1:5000");
    let out = create_permission(&mut h, client(1), &alice, &[lo]);
    assert_success(&h, &out, client(1), Method::CREATE_PERMISSION, &alice);
    assert_eq!(
        out.commands,
        vec![install_permission(id, relay, client(1), "127.0.0.1")]
    );
    let out = send_indication(&mut h, client(1), lo, b"x");
    assert_eq!(out.sent, vec![to_peer(relay, lo, b"x")]);
    // Only loopback was allowed: the rest of the table still applies.
    assert_peer_refused(&mut h, client(1), &alice, sa("10.0.0.1:5000"), 403);
}

fn service_port_config() -> Config {
    Config {
        peer_policy: PeerPolicy::new()
            .with_allow(vec!["8.8.4.4/32".parse::<Cidr>().unwrap()])
            .with_service_ports(vec![sa("8.8.4.4:3478")]),
        ..config()
    }
}

#[test]
fn the_relays_own_service_ports_are_403() {
    let mut h = Harness::with(service_port_config());
    let alice = Creds::alice();
    h.allocate(client(1), &alice);
    assert_peer_refused(&mut h, client(1), &alice, sa("8.8.4.4:3478"), 403);
    assert_peer_allowed(&mut h, client(1), &alice, sa("8.8.4.4:3479"), 0x4000);
}

#[test]
fn send_indication_to_a_forbidden_port_of_a_permitted_ip_is_dropped() {
    // A permission covers an IP, but the policy also judges ports (service ports, port 0): a Send to
    // those is silently discarded (RFC 8656 §11.2), or permitting 8.8.4.4:3479 would open 8.8.4.4:3478.
    let mut h = Harness::with(service_port_config());
    let alice = Creds::alice();
    let (relay, _) = h.allocate(client(1), &alice);
    h.permit(client(1), &alice, &[sa("8.8.4.4:3479")]);
    let out = send_indication(&mut h, client(1), sa("8.8.4.4:3479"), b"ok");
    assert_eq!(out.sent, vec![to_peer(relay, sa("8.8.4.4:3479"), b"ok")]);
    let before = h.server.stats();
    for p in [sa("8.8.4.4:3478"), sa("8.8.4.4:0")] {
        let out = send_indication(&mut h, client(1), p, b"no");
        assert!(out.sent.is_empty(), "{p}: {:?}", out.sent);
    }
    assert_eq!(
        h.server.stats(),
        Stats {
            no_permission: before.no_permission + 2,
            ..before
        }
    );
}

// ---------------------------------------------------------------------------------------------------
// 8. Relay to relay
// ---------------------------------------------------------------------------------------------------

#[test]
fn relay_to_relay_on_the_same_server() {
    let mut h = Harness::new();
    let (alice, bob) = (Creds::alice(), Creds::bob());
    let (bob_relay, bob_id) = h.allocate(client(2), &bob);
    let (alice_relay, alice_id) = h.allocate(client(1), &alice);
    assert!(
        PeerPolicy::new().check(bob_relay.0).is_err(),
        "the relay address is in a denied range"
    );

    let out = create_permission(&mut h, client(1), &alice, &[bob_relay.0]);
    assert_success(&h, &out, client(1), Method::CREATE_PERMISSION, &alice);
    assert_eq!(
        out.commands,
        vec![install_permission(
            alice_id,
            alice_relay,
            client(1),
            &bob_relay.0.ip().to_string()
        )]
    );
    // Another port of that IP is not a relayed address: the policy applies.
    let not_relay = SocketAddr::new(bob_relay.0.ip(), 12345);
    let out = create_permission(&mut h, client(1), &alice, &[not_relay]);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 403);
    let out = h.bind(client(1), &alice, 0x4000, not_relay);
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 403);
    // ...and a Send to it is dropped although the IP is permitted.
    assert!(send_indication(&mut h, client(1), not_relay, b"no")
        .sent
        .is_empty());

    let out = send_indication(&mut h, client(1), bob_relay.0, b"hi bob");
    assert_eq!(out.sent, vec![to_peer(alice_relay, bob_relay.0, b"hi bob")]);

    // Bob has no permission for alice's relay yet: dropped.
    assert!(h
        .peer_data(bob_relay, alice_relay.0, b"hi bob")
        .sent
        .is_empty());
    h.challenge(client(2));
    let out = h.permit(client(2), &bob, &[alice_relay.0]);
    assert_eq!(
        out.commands,
        vec![install_permission(
            bob_id,
            bob_relay,
            client(2),
            &alice_relay.0.ip().to_string()
        )]
    );
    let out = h.peer_data(bob_relay, alice_relay.0, b"hi bob");
    assert_eq!(
        data_indication(out.one(), client(2), alice_relay.0),
        b"hi bob"
    );

    // Once bob's allocation is gone its address is an ordinary documentation address again.
    refresh(&mut h, client(2), &bob, 0);
    h.challenge(client(1));
    let out = h.bind(client(1), &alice, 0x4000, bob_relay.0);
    assert_refused(&h, &out, client(1), Method::CHANNEL_BIND, &alice, 403);
}

// ---------------------------------------------------------------------------------------------------
// 9. Random operation sequences
// ---------------------------------------------------------------------------------------------------

mod random {
    use std::collections::{BTreeSet, HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    /// Peers the random client talks to: public, denied, port 0, IPv6, and a port of the relay's own IP
    /// that is never a relayed address. Indices past the end pick a relay address seen so far.
    const PEERS: &[&str] = &[
        "8.8.4.4:6001",
        "8.8.4.4:6002",
        "8.8.8.8:53",
        "8.8.8.8:0",
        "10.0.0.1:5000",
        "127.0.0.1:3478",
        "0.0.0.0:5000",
        "[2606:4700::1111]:443",
        "[::1]:1",
        "[::ffff:10.0.0.1]:80",
        "203.0.113.10:12345",
    ];

    fn five(c: u8) -> FiveTuple {
        match c % 3 {
            0 => client(1),
            1 => client(2),
            _ => tcp(3),
        }
    }

    fn creds(u: u8) -> Creds {
        match u % 4 {
            0 => Creds::alice(),
            1 => Creds::bob(),
            2 => Creds::rest(SECRET_NEW, "carol", UNIX0 + 3600),
            _ => Creds::static_user("alice", "wrong"),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Challenge(u8),
        Allocate {
            c: u8,
            u: u8,
            lifetime: Option<u32>,
            shape: u8,
            /// What the data plane does with the relay sockets: 0–5 binds them at once, 6 fails the first
            /// attempt of each and binds the retries, 7 leaves them to a later `Resolve`.
            open: u8,
        },
        Refresh {
            c: u8,
            u: u8,
            lifetime: Option<u32>,
        },
        Permit {
            c: u8,
            u: u8,
            peers: Vec<u8>,
        },
        Bind {
            c: u8,
            u: u8,
            channel: u16,
            peer: u8,
        },
        Send {
            c: u8,
            peer: u8,
            len: u8,
        },
        ChannelData {
            c: u8,
            channel: u16,
            len: u8,
            pad: u8,
        },
        Garbage {
            c: u8,
            bytes: Vec<u8>,
        },
        PeerData {
            relay: u8,
            peer: u8,
            len: u8,
        },
        Resolve {
            idx: u8,
            ok: bool,
        },
        Advance(u64),
    }

    fn lifetime() -> impl Strategy<Value = Option<u32>> {
        prop_oneof![
            4 => Just(None),
            1 => Just(Some(0)),
            2 => (1u32..4000).prop_map(Some),
            1 => Just(Some(u32::MAX)),
        ]
    }

    fn channel() -> impl Strategy<Value = u16> {
        prop_oneof![3 => 0x4000u16..0x4004, 1 => any::<u16>()]
    }

    fn op() -> impl Strategy<Value = Op> {
        // Mostly the first four (public IPv4, and port 0 of a public IP), sometimes anything.
        let peer = prop_oneof![3 => 0u8..4, 2 => 0u8..(PEERS.len() as u8 + 3)];
        prop_oneof![
            1 => any::<u8>().prop_map(Op::Challenge),
            3 => (any::<u8>(), any::<u8>(), lifetime(), 0u8..8, 0u8..8).prop_map(
                |(c, u, lifetime, shape, open)| Op::Allocate { c, u, lifetime, shape, open }
            ),
            1 => (any::<u8>(), any::<u8>(), lifetime())
                .prop_map(|(c, u, lifetime)| Op::Refresh { c, u, lifetime }),
            2 => (any::<u8>(), any::<u8>(), prop::collection::vec(peer.clone(), 0..=3))
                .prop_map(|(c, u, peers)| Op::Permit { c, u, peers }),
            2 => (any::<u8>(), any::<u8>(), channel(), peer.clone())
                .prop_map(|(c, u, channel, peer)| Op::Bind { c, u, channel, peer }),
            4 => (any::<u8>(), peer.clone(), any::<u8>())
                .prop_map(|(c, peer, len)| Op::Send { c, peer, len }),
            3 => (any::<u8>(), channel(), any::<u8>(), 0u8..4)
                .prop_map(|(c, channel, len, pad)| Op::ChannelData { c, channel, len, pad }),
            1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(c, bytes)| Op::Garbage { c, bytes }),
            3 => (any::<u8>(), peer, any::<u8>())
                .prop_map(|(relay, peer, len)| Op::PeerData { relay, peer, len }),
            3 => (any::<u8>(), any::<bool>()).prop_map(|(idx, ok)| Op::Resolve { idx, ok }),
            2 => prop_oneof![6 => 0u64..2_000, 3 => 0u64..60_000, 1 => 0u64..700_000]
                .prop_map(Op::Advance),
        ]
    }

    /// The server plus what the data plane would hold if it executed every command, checked as it goes.
    struct Model {
        h: Harness,
        nonces: [Option<String>; 3],
        /// OpenRelay commands not yet answered.
        pending: Vec<(AllocationId, RelayAddr)>,
        /// Every relay address ever handed out.
        relays: Vec<RelayAddr>,
        opened: BTreeSet<AllocationId>,
        ended: BTreeSet<AllocationId>,
        open: HashSet<(AllocationId, RelayAddr)>,
        permissions: HashSet<(AllocationId, RelayAddr, IpAddr)>,
        channels: HashMap<(AllocationId, ChannelNumber), (FiveTuple, RelayAddr, PeerAddr)>,
        policy: PeerPolicy,
    }

    impl Model {
        fn peer(&self, i: u8) -> SocketAddr {
            match PEERS.get(usize::from(i)) {
                Some(s) => sa(s),
                None if !self.relays.is_empty() => {
                    self.relays[usize::from(i) % self.relays.len()].0
                }
                None => peer(1),
            }
        }

        /// An authenticated request, by the client's own user most of the time. A client without a nonce
        /// does the 401 round first.
        fn request(&mut self, c: u8, method: Method, attrs: &[Attribute<'_>], u: u8) {
            if self.nonces[usize::from(c % 3)].is_none() {
                self.run(Op::Challenge(c));
            }
            self.h.nonce = self.nonces[usize::from(c % 3)].clone();
            let who = if u < 200 { c % 3 } else { u };
            let out = self.h.request(five(c), method, attrs, Some(&creds(who)));
            self.apply(out);
        }

        fn apply(&mut self, out: Out) {
            for cmd in out.commands {
                match cmd {
                    Command::OpenRelay {
                        allocation, relay, ..
                    } => {
                        assert!(!self.ended.contains(&allocation));
                        self.opened.insert(allocation);
                        self.pending.push((allocation, relay));
                        self.relays.push(relay);
                    }
                    Command::CloseRelay { allocation, relay } => {
                        assert!(
                            self.open.remove(&(allocation, relay)),
                            "close of unopened {relay:?}"
                        );
                    }
                    Command::InstallPermission {
                        allocation,
                        relay,
                        peer,
                        ..
                    } => {
                        assert!(self.open.contains(&(allocation, relay)));
                        assert!(
                            self.permissions.insert((allocation, relay, peer)),
                            "installed twice"
                        );
                    }
                    Command::RemovePermission {
                        allocation,
                        relay,
                        peer,
                    } => {
                        assert!(
                            self.permissions.remove(&(allocation, relay, peer)),
                            "not installed"
                        );
                    }
                    Command::InstallChannel {
                        allocation,
                        client,
                        relay,
                        channel,
                        peer,
                    } => {
                        assert!(
                            self.permissions.contains(&(allocation, relay, peer.0.ip())),
                            "a channel without its permission"
                        );
                        let old = self
                            .channels
                            .insert((allocation, channel), (client, relay, peer));
                        assert_eq!(old, None, "channel installed twice");
                    }
                    Command::RemoveChannel {
                        allocation,
                        client,
                        relay,
                        channel,
                        peer,
                    } => {
                        let old = self.channels.remove(&(allocation, channel));
                        assert_eq!(old, Some((client, relay, peer)));
                    }
                    Command::AllocationEnded { allocation, .. } => {
                        assert!(self.opened.contains(&allocation));
                        assert!(self.ended.insert(allocation), "ended twice");
                        self.pending.retain(|p| p.0 != allocation);
                        assert!(!self.open.iter().any(|o| o.0 == allocation));
                        assert!(!self.permissions.iter().any(|p| p.0 == allocation));
                        assert!(!self.channels.keys().any(|k| k.0 == allocation));
                    }
                }
            }
            let listener = client(1).server;
            for s in out.sent {
                if s.src == listener {
                    assert!((0..3).any(|c| five(c).client == s.dst), "{s:?}");
                    if let wire::Kind::Stun = wire::classify(s.bytes[0]) {
                        let m = s.msg();
                        if let Some((401 | 438, _)) = m.attrs.error_code {
                            let c = (0..3).find(|c| five(*c).client == s.dst).unwrap();
                            self.nonces[usize::from(c)] = m.attrs.nonce.map(str::to_string);
                        }
                    } else {
                        wire::ChannelData::parse(&s.bytes).expect("valid ChannelData");
                    }
                } else {
                    // Relayed to a peer: only from an open relay with a permission for the peer, and only to
                    // a peer the policy allows or a relayed address.
                    assert_eq!(s.transport, Transport::Udp);
                    assert!(
                        self.permissions
                            .iter()
                            .any(|p| p.1 .0 == s.src && p.2 == s.dst.ip()),
                        "relayed without a permission: {s:?}"
                    );
                    assert!(
                        self.relays.contains(&RelayAddr(s.dst)) || self.policy.check(s.dst).is_ok(),
                        "relayed to a forbidden peer: {s:?}"
                    );
                }
            }
        }

        /// The data plane's answer to an OpenRelay it has taken off `pending`.
        fn resolve(&mut self, id: AllocationId, relay: RelayAddr, ok: bool) {
            let now = self.h.now;
            if self.ended.contains(&id) {
                return;
            }
            if ok {
                self.h.server.handle_relay_opened(now, id, relay);
                self.open.insert((id, relay));
            } else {
                self.h.server.handle_relay_failed(now, id, relay);
            }
            let out = self.h.drain();
            self.apply(out);
        }

        fn run(&mut self, op: Op) {
            match op {
                Op::Challenge(c) => {
                    let out = self.h.challenge(five(c));
                    self.apply(out);
                    self.nonces[usize::from(c % 3)] = self.h.nonce.clone();
                }
                Op::Allocate {
                    c,
                    u,
                    lifetime,
                    shape,
                    open,
                } => {
                    let mut attrs = vec![Attribute::RequestedTransport(if shape == 7 {
                        6
                    } else {
                        17
                    })];
                    match shape {
                        1 => attrs.push(Attribute::RequestedAddressFamily(wire::family::IPV6)),
                        2 => attrs.push(Attribute::AdditionalAddressFamily(wire::family::IPV6)),
                        3 => attrs.push(Attribute::RequestedAddressFamily(9)),
                        4 => attrs.push(Attribute::EvenPort(true)),
                        5 => attrs.push(Attribute::EvenPort(false)),
                        6 => attrs.push(Attribute::DontFragment),
                        _ => {}
                    }
                    if let Some(l) = lifetime {
                        attrs.push(Attribute::Lifetime(l));
                    }
                    let before = self.pending.len();
                    self.request(c, Method::ALLOCATE, &attrs, u);
                    if open < 7 {
                        let new: Vec<_> = self.pending.drain(before..).collect();
                        for (id, relay) in new {
                            if open == 6 {
                                let n = self.pending.len();
                                self.resolve(id, relay, false);
                                let retries: Vec<_> = self.pending.drain(n..).collect();
                                for (id, relay) in retries {
                                    self.resolve(id, relay, true);
                                }
                            } else {
                                self.resolve(id, relay, true);
                            }
                        }
                    }
                }
                Op::Refresh { c, u, lifetime } => {
                    let attrs: Vec<_> = lifetime.map(Attribute::Lifetime).into_iter().collect();
                    self.request(c, Method::REFRESH, &attrs, u);
                }
                Op::Permit { c, u, peers } => {
                    let peers: Vec<_> = peers.iter().map(|p| self.peer(*p)).collect();
                    let attrs: Vec<_> = peers.into_iter().map(Attribute::XorPeerAddress).collect();
                    self.request(c, Method::CREATE_PERMISSION, &attrs, u);
                }
                Op::Bind {
                    c,
                    u,
                    channel,
                    peer,
                } => {
                    let peer = self.peer(peer);
                    let attrs = [
                        Attribute::ChannelNumber(channel),
                        Attribute::XorPeerAddress(peer),
                    ];
                    self.request(c, Method::CHANNEL_BIND, &attrs, u);
                }
                Op::Send { c, peer, len } => {
                    let peer = self.peer(peer);
                    let out =
                        send_indication(&mut self.h, five(c), peer, &vec![len; usize::from(len)]);
                    self.apply(out);
                }
                Op::ChannelData {
                    c,
                    channel,
                    len,
                    pad,
                } => {
                    let bytes =
                        channel_data(channel, &vec![len; usize::from(len)], usize::from(pad));
                    let out = self.h.send(five(c), &bytes);
                    self.apply(out);
                }
                Op::Garbage { c, bytes } => {
                    let out = self.h.send(five(c), &bytes);
                    self.apply(out);
                }
                Op::PeerData { relay, peer, len } => {
                    let relay = if self.relays.is_empty() {
                        RelayAddr(sa("203.0.113.10:50000"))
                    } else {
                        self.relays[usize::from(relay) % self.relays.len()]
                    };
                    let peer = self.peer(peer);
                    let out = self.h.peer_data(relay, peer, &vec![len; usize::from(len)]);
                    self.apply(out);
                }
                Op::Resolve { idx, ok } => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let (id, relay) = self.pending.remove(usize::from(idx) % self.pending.len());
                    self.resolve(id, relay, ok);
                }
                Op::Advance(ms) => {
                    let out = self.h.advance(Duration::from_millis(ms));
                    self.apply(out);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_operations_never_panic_and_leave_nothing_behind(
            warm in prop::bool::weighted(0.75),
            ops in prop::collection::vec(op(), 1..=40)
        ) {
            let h = Harness::new();
            let free = h.server.free_ports();
            let mut m = Model {
                h,
                nonces: [None, None, None],
                pending: Vec::new(),
                relays: Vec::new(),
                opened: BTreeSet::new(),
                ended: BTreeSet::new(),
                open: HashSet::new(),
                permissions: HashSet::new(),
                channels: HashMap::new(),
                policy: PeerPolicy::new(),
            };
            if warm {
                // Most interesting sequences need live allocations: start with one per client (IPv4,
                // IPv6-only, dual-stack) most of the time.
                for c in 0..3 {
                    m.run(Op::Allocate { c, u: 0, lifetime: None, shape: c, open: 0 });
                }
            }
            for op in ops {
                m.run(op);
            }
            let out = m.h.advance(Duration::from_secs(2 * 3600));
            m.apply(out);
            m.h.assert_empty(free);
            prop_assert_eq!(&m.opened, &m.ended);
            prop_assert!(m.pending.is_empty());
            prop_assert!(m.open.is_empty());
            prop_assert!(m.permissions.is_empty());
            prop_assert!(m.channels.is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 10. Many allocations
// ---------------------------------------------------------------------------------------------------

#[test]
fn ten_thousand_allocate_delete_cycles_leak_nothing() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let free = h.server.free_ports();
    h.challenge(client(1));
    for i in 0..10_000u64 {
        let out = h.request(
            client(1),
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            Some(&alice),
        );
        let (id, relays) = opened(&out.commands);
        assert_eq!(id, AllocationId(i + 1), "ids are never reused");
        let relay = relays[0];
        h.server.handle_relay_opened(h.now, id, relay);
        assert_eq!(h.drain().one().class(), Class::Success);
        let mut ended = vec![];
        if i % 10 == 0 {
            h.permit(client(1), &alice, &[peer(1)]);
            h.bind(client(1), &alice, 0x4000, peer(2));
            ended.push(remove_channel(id, relay, client(1), 0x4000, peer(2)));
            ended.push(remove_permission(id, relay, "8.8.4.4"));
        }
        let out = refresh(&mut h, client(1), &alice, 0);
        assert_eq!(out.one().class(), Class::Success);
        ended.push(Command::CloseRelay {
            allocation: id,
            relay,
        });
        ended.push(Command::AllocationEnded {
            allocation: id,
            identity: "alice".into(),
            usage: Usage::default(),
        });
        assert_eq!(out.commands, ended);
    }
    h.assert_empty(free);
    assert_eq!(h.server.poll_timeout(), None);
}

// ---------------------------------------------------------------------------------------------------
// Odds and ends
// ---------------------------------------------------------------------------------------------------

#[test]
fn dual_stack_permissions_and_data_use_the_relay_of_the_peers_family() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    h.challenge(client(1));
    let out = h.request(client(1), Method::ALLOCATE, &dual_attrs(), Some(&alice));
    let (id, relays) = opened(&out.commands);
    let [v4, v6] = relays[..] else {
        panic!("two relays: {relays:?}")
    };
    assert!(v4.0.is_ipv4() && v6.0.is_ipv6());
    for r in [v4, v6] {
        h.server.handle_relay_opened(h.now, id, r);
    }
    assert_eq!(h.drain().one().class(), Class::Success);

    let p6 = sa("[2606:4700::1111]:443");
    let out = h.permit(client(1), &alice, &[p6, peer(1)]);
    assert_eq!(
        out.commands,
        vec![
            install_permission(id, v6, client(1), "2606:4700::1111"),
            install_permission(id, v4, client(1), "8.8.4.4"),
        ]
    );
    let out = h.bind(client(1), &alice, 0x4000, p6);
    assert_eq!(
        out.commands,
        vec![install_channel(id, v6, client(1), 0x4000, p6)]
    );
    let out = send_indication(&mut h, client(1), peer(1), b"4");
    assert_eq!(out.sent, vec![to_peer(v4, peer(1), b"4")]);
    let out = h.send(client(1), &channel_data(0x4000, b"6", 0));
    assert_eq!(out.sent, vec![to_peer(v6, p6, b"6")]);
    let out = h.peer_data(v6, p6, b"6");
    assert_eq!(out.one().bytes, channel_data(0x4000, b"6", 0));

    let out = refresh(&mut h, client(1), &alice, 0);
    let c = &out.commands;
    assert_eq!(c.len(), 6, "{c:?}");
    assert_eq!(c[0], remove_channel(id, v6, client(1), 0x4000, p6));
    // Permissions come out in hash order.
    assert!(c[1..3].contains(&remove_permission(id, v6, "2606:4700::1111")));
    assert!(c[1..3].contains(&remove_permission(id, v4, "8.8.4.4")));
    assert_eq!(
        c[3..5],
        [
            Command::CloseRelay {
                allocation: id,
                relay: v4
            },
            Command::CloseRelay {
                allocation: id,
                relay: v6
            },
        ]
    );
    assert!(matches!(&c[5], Command::AllocationEnded { allocation, .. } if *allocation == id));
    h.assert_empty(200);
}

#[test]
fn rebinding_an_active_channel_reinstalls_an_expired_permission_only() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, id) = h.allocate(client(1), &alice);
    h.bind(client(1), &alice, 0x4000, peer(1));
    let out = h.at(secs(300));
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
    h.at(secs(400));
    let out = h.bind(client(1), &alice, 0x4000, peer(1));
    assert_success(&h, &out, client(1), Method::CHANNEL_BIND, &alice);
    assert_eq!(
        out.commands,
        vec![install_permission(id, relay, client(1), "8.8.4.4")]
    );
    let out = h.send(client(1), &channel_data(0x4000, b"x", 0));
    assert_eq!(out.sent, vec![to_peer(relay, peer(1), b"x")]);
}

#[test]
fn data_after_the_allocation_is_gone_is_dropped() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate(client(1), &alice);
    h.bind(client(1), &alice, 0x4000, peer(1));
    refresh(&mut h, client(1), &alice, 0);
    let before = h.server.stats();
    assert!(h
        .send(client(1), &channel_data(0x4000, b"x", 0))
        .sent
        .is_empty());
    assert!(send_indication(&mut h, client(1), peer(1), b"x")
        .sent
        .is_empty());
    assert!(h.peer_data(relay, peer(1), b"x").sent.is_empty());
    assert_eq!(
        h.server.stats(),
        Stats {
            no_allocation: before.no_allocation + 2,
            unknown_relay: before.unknown_relay + 1,
            ..before
        }
    );
}
