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

/// ChannelData bytes: the 4-byte header, the payload and `pad` zero bytes.
fn refresh(h: &mut Harness, five: FiveTuple, creds: &Creds, lifetime: u32) -> Out {
    h.request(
        five,
        Method::REFRESH,
        &[Attribute::Lifetime(lifetime)],
        Some(creds),
    )
}

/// The datagram the relay sends to a peer.
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
// ---------------------------------------------------------------------------------------------------
// 1. CreatePermission
// ---------------------------------------------------------------------------------------------------
#[test]
fn create_permission_is_all_or_nothing() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (_, _) = h.allocate(client(1), &alice);
    let peers = [peer(1), sa("10.0.0.1:5000"), sa("8.8.8.8:53")];
    let out = create_permission(&mut h, client(1), &alice, &peers);
    assert_refused(&h, &out, client(1), Method::CREATE_PERMISSION, &alice, 403);
    assert!(
        out.commands.is_empty(),
        "nothing installed: {:?}",
        out.commands
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
}

// ---------------------------------------------------------------------------------------------------
// 2. Permission lifetime
// ---------------------------------------------------------------------------------------------------

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
    let out = h.at(secs(500));
    assert_eq!(out.commands, vec![remove_permission(id, relay, "8.8.4.4")]);
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

// ---------------------------------------------------------------------------------------------------
// 4. ChannelData from the client
// ---------------------------------------------------------------------------------------------------

fn tcp(n: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Tcp,
        ..client(n)
    }
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

// ---------------------------------------------------------------------------------------------------
// 8. Relay to relay
// ---------------------------------------------------------------------------------------------------

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
        "203.0.114.10:12345",
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
        Garbage {
            c: u8,
            bytes: Vec<u8>,
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
            2 => (any::<u8>(), any::<u8>(), channel(), peer)
                .prop_map(|(c, u, channel, peer)| Op::Bind { c, u, channel, peer }),
            1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(c, bytes)| Op::Garbage { c, bytes }),
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
                Op::Garbage { c, bytes } => {
                    let out = self.h.send(five(c), &bytes);
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
            reason: EndReason::Ended,
        });
        assert_eq!(out.commands, ended);
    }
    h.assert_empty(free);
    assert_eq!(h.server.poll_timeout(), None);
}

// ---------------------------------------------------------------------------------------------------
// Odds and ends
// ---------------------------------------------------------------------------------------------------
