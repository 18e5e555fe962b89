//! Scenario tests of the path that runs: [`Server`] and a worker's [`Core`] driven together the way the
//! control thread and a worker drive them, with a fake clock and a seeded RNG.
//!
//! A client datagram goes into `Core::on_client` first, as on a worker; what the worker hands to the
//! control thread (`ToControl::Stun`) goes through the control thread's own [`Executor::stun`] into
//! `Server::handle_client_message`; then the server's output is drained by the control thread's own
//! [`Executor::pump`]: every command is executed (route updates applied to the worker's table by the
//! test's [`Plane`], which binds every relay socket) before any transmit. Everything
//! is recorded in one ordered stream of [`Event`]s, so that a scenario covers request → route update →
//! datagram and can assert that a route is in place before the response that announces it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::budget_shards;
use super::exec::{Executor, Plane};
use crate::dataplane::{Action, Answers, Core, Direction, Drop, ToControl, HEADROOM, SLOT};
use crate::route::{AllocationId, ClientKey, Counters, RelayId, RouteUpdate};
use crate::server::tests::{
    client, config, loopback_config, peer, Creds, Harness, SECRET_NEW, UNIX0,
};
use crate::server::{Config, FiveTuple, Transport};
use crate::wire::{self, Attribute, Class, Message, MessageType, MessageWriter, Method};

/// One thing that happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// A route update the control thread sent to the worker (applied to its table).
    Route(RouteUpdate),
    /// A server transmit: always to a client's 5-tuple.
    Reply { to: FiveTuple, bytes: Vec<u8> },
    /// The worker's own answer to a client (a Binding success, a 401), from the listener.
    Answered { to: FiveTuple, bytes: Vec<u8> },
    /// A datagram the worker sent: from a relay address to a peer, or from the listener to a client.
    Relayed {
        src: SocketAddr,
        dst: SocketAddr,
        bytes: Vec<u8>,
    },
}

/// The scenario's [`Plane`]: every relay socket binds; route updates are applied to the one worker's
/// `Core` and recorded, and so are replies, in the order the executor makes them.
struct Bench {
    core: Core,
    events: Vec<Event>,
    /// Relay id → its address, from the AddRelay updates (the worker's table does not keep it).
    addrs: std::collections::HashMap<RelayId, SocketAddr>,
    /// Relay id → its allocation, when a fast path outside the worker (as XDP) meters the relays too:
    /// their removal then says the allocation's meter is still to settle.
    fast_path: Option<std::collections::HashMap<RelayId, AllocationId>>,
}

impl Plane for Bench {
    type Socket = ();

    fn bind_relay(&mut self, _addr: SocketAddr, _dont_fragment: bool) -> std::io::Result<()> {
        Ok(())
    }

    fn add_relay(&mut self, worker: usize, (): (), update: RouteUpdate) {
        self.route(worker, update);
    }

    fn route(&mut self, worker: usize, update: RouteUpdate) -> Option<AllocationId> {
        assert_eq!(worker, 0, "one worker");
        if let RouteUpdate::AddRelay {
            id,
            addr,
            allocation,
            ..
        } = update
        {
            self.addrs.insert(id, addr);
            if let Some(fast) = &mut self.fast_path {
                fast.insert(id, allocation);
            }
        }
        let metered = match (&mut self.fast_path, &update) {
            (Some(fast), RouteUpdate::RemoveRelay { id }) => fast.remove(id),
            _ => None,
        };
        self.core.apply(update.clone());
        self.events.push(Event::Route(update));
        metered
    }

    fn reply_udp(&mut self, worker: usize, listener: usize, to: FiveTuple, payload: &[u8]) {
        assert_eq!((worker, listener), (0, 0), "one worker, one listener");
        self.events.push(Event::Reply {
            to,
            bytes: payload.to_vec(),
        });
    }

    fn reply_stream(&mut self, _worker: usize, _client: ClientKey, _payload: &[u8]) -> bool {
        panic!("no stream listener in these scenarios")
    }
}

/// A relay of one worker with one UDP listener (`client(_).server`, listener 0).
struct Relay {
    /// The server, its clock and a request builder.
    h: Harness,
    /// The control thread's command execution (production code) over the test's [`Bench`].
    exec: Executor<Bench>,
    from_worker: Receiver<ToControl>,
    /// What the worker reported besides STUN (RelayClosed, counters), in order.
    reports: Vec<ToControl>,
}

impl Relay {
    fn new() -> Self {
        Self::with(config())
    }

    fn with(config: Config) -> Self {
        Self::with_core(config, |core, _| core)
    }

    /// A worker that answers Binding and plain challenges itself, as `control::start` configures it:
    /// the server and the worker each hold a shard of the budget ([`budget_shards`] of one worker;
    /// its nonce clock the harness's start, [`UNIX0`]).
    fn answering(config: Config) -> Self {
        let config = Config {
            challenge_shards: budget_shards(1),
            ..config
        };
        let binding = !config.binding_requires_auth;
        Self::with_core(config, |core, server| {
            let answers = Answers {
                binding,
                challenger: Some(server.challenger().clone()),
            };
            core.answer_unauthenticated(server.budget_shard([1, 2]), answers)
                .with_unix_clock(|| UNIX0)
        })
    }

    fn with_core(
        config: Config,
        setup: impl FnOnce(Core, &crate::server::Server<rand::rngs::StdRng>) -> Core,
    ) -> Self {
        let range = config.channel_range;
        let (tx, rx) = crossbeam_channel::bounded(64);
        let h = Harness::with(config);
        let own = h.server.own_addresses().clone();
        let core = setup(Core::new(0, tx, Arc::default(), range, own), &h.server);
        let bench = Bench {
            core,
            events: Vec::new(),
            addrs: Default::default(),
            fast_path: None,
        };
        let listeners = vec![(client(0).server, Transport::Udp)];
        Relay {
            h,
            exec: Executor::new(bench, listeners, None),
            from_worker: rx,
            reports: Vec::new(),
        }
    }

    fn listener(&self) -> SocketAddr {
        client(0).server
    }

    /// The worker's `Core`.
    fn core(&self) -> &Core {
        &self.exec.plane.core
    }

    fn core_mut(&mut self) -> &mut Core {
        &mut self.exec.plane.core
    }

    /// The relay socket id of the relay address `relay`, as the control thread assigned it.
    fn id(&self, relay: SocketAddr) -> RelayId {
        self.relay_id(relay).expect("a live relay socket")
    }

    fn relay_id(&self, relay: SocketAddr) -> Option<RelayId> {
        self.exec.relay(relay).map(|(_, id)| id)
    }

    /// A datagram from `five`'s client on the listener, through the worker and, for a STUN request, the
    /// control thread.
    fn client(&mut self, five: FiveTuple, bytes: &[u8]) -> Vec<Event> {
        assert_eq!(five.server, self.listener());
        let mut slot = vec![0u8; SLOT];
        slot[HEADROOM..HEADROOM + bytes.len()].copy_from_slice(bytes);
        let mut events = Vec::new();
        if let Action::Forward(f) =
            self.core_mut()
                .on_client(0, five.client, &mut slot, bytes.len())
        {
            let bytes = slot[f.range.clone()].to_vec();
            if matches!(f.bill.dir, Direction::Answer | Direction::Challenge) {
                assert_eq!(f.dst, five.client);
                events.push(Event::Answered { to: five, bytes });
            } else {
                let src = self.exec.plane.addrs[&f.bill.relay];
                events.push(Event::Relayed {
                    src,
                    dst: f.dst,
                    bytes,
                });
            }
            self.core_mut().sent(f.bill);
        }
        while let Ok(msg) = self.from_worker.try_recv() {
            let ToControl::Stun {
                worker,
                listener,
                client,
                bytes,
            } = msg
            else {
                self.reports.push(msg);
                continue;
            };
            let (now, unix) = (self.h.now, self.h.unix());
            let server = &mut self.h.server;
            self.exec
                .stun(server, now, unix, worker, listener, client, &bytes);
            events.extend(self.pump());
        }
        events
    }

    /// A datagram from `from` to the relay address `relay`.
    fn peer(&mut self, relay: SocketAddr, from: SocketAddr, payload: &[u8]) -> Vec<Event> {
        let id = self.id(relay);
        let mut slot = vec![0u8; SLOT];
        slot[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
        match self.core_mut().on_peer(id, from, &mut slot, payload.len()) {
            Action::Forward(f) => {
                self.core_mut().sent(f.bill);
                vec![Event::Relayed {
                    src: self.listener(),
                    dst: f.dst,
                    bytes: slot[f.range].to_vec(),
                }]
            }
            Action::Done => Vec::new(),
        }
    }

    /// Run the server's timers at `now + d`.
    fn advance(&mut self, d: Duration) -> Vec<Event> {
        self.h.now += d;
        self.h.server.handle_timeout(self.h.now);
        self.pump()
    }

    /// The control thread's drain ([`Executor::pump`]): what it executed and sent, in order.
    fn pump(&mut self) -> Vec<Event> {
        let now = self.h.now;
        self.exec.pump(&mut self.h.server, now);
        std::mem::take(&mut self.exec.plane.events)
    }

    fn request(
        &mut self,
        five: FiveTuple,
        method: Method,
        attrs: &[Attribute<'_>],
        creds: Option<&Creds>,
    ) -> Vec<Event> {
        let tid = self.h.next_tid();
        if let Some(n) = self.h.nonces.get(&five.client) {
            self.h.nonce = Some(n.clone());
        }
        let bytes = self.h.build(method, Class::Request, tid, attrs, creds);
        self.client(five, &bytes)
    }

    /// The 401 round and an Allocate; returns the relayed address.
    fn allocate(&mut self, five: FiveTuple, creds: &Creds) -> SocketAddr {
        self.allocate_with(five, creds, &[Attribute::RequestedTransport(17)])
    }

    fn allocate_with(
        &mut self,
        five: FiveTuple,
        creds: &Creds,
        attrs: &[Attribute<'_>],
    ) -> SocketAddr {
        let events = self.request(five, Method::ALLOCATE, attrs, None);
        let nonce = reply(&events).attrs.nonce.unwrap().to_string();
        self.h.nonces.insert(five.client, nonce);
        let events = self.request(five, Method::ALLOCATE, attrs, Some(creds));
        let msg = reply(&events);
        assert_eq!(msg.message_type().class, Class::Success);
        msg.attrs.xor_relayed_address.unwrap()
    }

    fn permit(&mut self, five: FiveTuple, creds: &Creds, peer: SocketAddr) -> Vec<Event> {
        let attrs = [Attribute::XorPeerAddress(peer)];
        self.request(five, Method::CREATE_PERMISSION, &attrs, Some(creds))
    }

    fn bind(
        &mut self,
        five: FiveTuple,
        creds: &Creds,
        channel: u16,
        peer: SocketAddr,
    ) -> Vec<Event> {
        let attrs = [
            Attribute::ChannelNumber(channel),
            Attribute::XorPeerAddress(peer),
        ];
        self.request(five, Method::CHANNEL_BIND, &attrs, Some(creds))
    }

    fn send(&mut self, five: FiveTuple, peer: SocketAddr, data: &[u8]) -> Vec<Event> {
        let tid = self.h.next_tid();
        let attrs = [Attribute::XorPeerAddress(peer), Attribute::Data(data)];
        let bytes = self
            .h
            .build(Method::SEND, Class::Indication, tid, &attrs, None);
        self.client(five, &bytes)
    }
}

/// The single reply among `events` (the server's, or the worker's own).
fn reply(events: &[Event]) -> Message<'_> {
    let replies: Vec<&Vec<u8>> = events
        .iter()
        .filter_map(|e| match e {
            Event::Reply { bytes, .. } | Event::Answered { bytes, .. } => Some(bytes),
            _ => None,
        })
        .collect();
    assert_eq!(replies.len(), 1, "one reply expected: {events:?}");
    Message::parse(replies[0]).unwrap()
}

fn success(events: &[Event]) -> bool {
    reply(events).message_type().class == Class::Success
}

fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = channel.to_be_bytes().to_vec();
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn relayed(src: SocketAddr, dst: SocketAddr, bytes: &[u8]) -> Event {
    Event::Relayed {
        src,
        dst,
        bytes: bytes.to_vec(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn channel_bind_is_routed_before_it_is_answered_and_channel_data_flows_both_ways() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    let id = r.id(relay);

    let events = r.bind(client(1), &alice, 0x4000, peer(1));
    assert!(matches!(&events[..], [
        Event::Route(RouteUpdate::AddPermission { relay: a, peer: p }),
        Event::Route(RouteUpdate::AddChannel { relay: b, channel: c, peer: q }),
        Event::Reply { to, .. },
    ] if *a == id && *b == id && c.get() == 0x4000 && *p == peer(1).ip() && *q == peer(1) && *to == client(1)));
    assert!(success(&events));

    // ChannelData right after the success finds its route.
    let events = r.client(client(1), &channel_data(0x4000, b"hello"));
    assert_eq!(events, vec![relayed(relay, peer(1), b"hello")]);
    // A peer datagram comes back on the channel, from the listener to the client's address.
    let events = r.peer(relay, peer(1), b"back");
    assert_eq!(
        events,
        vec![relayed(
            r.listener(),
            client(1).client,
            &channel_data(0x4000, b"back")
        )]
    );
    // An unbound channel is dropped and counted.
    assert!(r.client(client(1), &channel_data(0x4001, b"x")).is_empty());
    assert_eq!(r.core().stats().drops(Drop::NoChannel), 1);
}

#[test]
fn send_needs_a_permission_and_peer_data_without_a_channel_is_a_data_indication() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);

    assert!(r.send(client(1), peer(1), b"early").is_empty());
    assert!(r.peer(relay, peer(1), b"early").is_empty());
    assert_eq!(r.core().stats().drops(Drop::NoPermission), 2);

    let events = r.permit(client(1), &alice, peer(1));
    assert!(matches!(
        events[0],
        Event::Route(RouteUpdate::AddPermission { .. })
    ));
    assert!(success(&events[1..]));
    // Permissions are per IP: another port of the peer is reachable too (RFC 8656 §9).
    let other_port = SocketAddr::new(peer(1).ip(), 9);
    assert_eq!(
        r.send(client(1), other_port, b"hi"),
        vec![relayed(relay, other_port, b"hi")]
    );
    let events = r.peer(relay, other_port, b"answer");
    let [Event::Relayed { src, dst, bytes }] = &events[..] else {
        panic!("{events:?}");
    };
    assert_eq!((*src, *dst), (r.listener(), client(1).client));
    let msg = Message::parse(bytes).unwrap();
    assert_eq!(
        (msg.message_type().method, msg.message_type().class),
        (Method::DATA, Class::Indication)
    );
    assert_eq!(msg.attrs.xor_peer_address, Some(other_port));
    assert_eq!(msg.attrs.data, Some(&b"answer"[..]));

    // The permission expires after 300 s: the server removes the route, and data stops both ways.
    let events = r.advance(Duration::from_secs(301));
    assert!(
        events.contains(&Event::Route(RouteUpdate::RemovePermission {
            relay: r.id(relay),
            peer: peer(1).ip(),
        }))
    );
    assert!(r.send(client(1), peer(1), b"late").is_empty());
    assert!(r.peer(relay, peer(1), b"late").is_empty());
}

#[test]
fn usage_is_what_the_worker_sent_and_is_reported_when_the_relay_closes() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    r.bind(client(1), &alice, 0x4000, peer(1));
    for n in [10, 20] {
        assert_eq!(
            r.client(client(1), &channel_data(0x4000, &vec![1; n]))
                .len(),
            1
        );
    }
    assert_eq!(r.send(client(1), peer(1), &[2; 5]).len(), 1);
    assert_eq!(r.peer(relay, peer(1), &[3; 7]).len(), 1);
    // Dropped datagrams are not billed.
    assert!(r.send(client(1), sa("8.8.8.8:1"), &[0; 100]).is_empty());
    assert!(r.peer(relay, sa("8.8.8.8:1"), &[0; 100]).is_empty());

    let events = r.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    let id = r.relay_id(relay);
    assert_eq!(id, None, "the relay socket is closed");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Route(RouteUpdate::RemoveRelay { .. }))));
    let [ToControl::RelayClosed { counters, .. }] = &r.reports[..] else {
        panic!("{:?}", r.reports);
    };
    assert_eq!(
        *counters,
        Counters {
            to_peer_bytes: 35,
            to_peer_packets: 3,
            to_client_bytes: 7,
            to_client_packets: 1,
        }
    );
}

/// A relay metered by a fast path outside the worker too (XDP): the allocation's final usage record
/// waits for that meter to settle (`Mirror::settle`, after the kernel's running programs are done
/// with it) and adds it once, besides what the worker's relay socket reported.
#[test]
fn a_fast_path_meter_settles_into_the_final_usage_record_once() {
    let mut r = Relay::new();
    let (sink, records) = crossbeam_channel::unbounded();
    r.exec.usage_sink = Some(sink);
    r.exec.plane.fast_path = Some(Default::default());
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    r.bind(client(1), &alice, 0x4000, peer(1));
    assert_eq!(
        r.client(client(1), &channel_data(0x4000, &[1; 10])).len(),
        1
    );
    assert_eq!(r.peer(relay, peer(1), &[3; 7]).len(), 1);
    r.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    let [ToControl::RelayClosed {
        allocation,
        counters,
    }] = std::mem::take(&mut r.reports)[..]
    else {
        panic!("{:?}", r.reports);
    };
    r.exec.relay_closed(allocation, counters);
    assert!(
        records.try_recv().is_err(),
        "the final record waits for the fast path's meter"
    );
    let fast = Counters {
        to_peer_bytes: 1000,
        to_peer_packets: 4,
        to_client_bytes: 300,
        to_client_packets: 2,
    };
    r.exec.meter_settled(allocation, fast);
    let record = records.try_recv().expect("the final record");
    assert!(record.done);
    assert_eq!(
        record.usage,
        Counters {
            to_peer_bytes: 1010,
            to_peer_packets: 5,
            to_client_bytes: 307,
            to_client_packets: 3,
        }
    );
    assert!(records.try_recv().is_err(), "one final record");
    assert!(
        r.exec.state_sizes().iter().all(|(_, n)| *n == 0),
        "{:?}",
        r.exec.state_sizes()
    );
}

#[test]
fn no_server_output_addresses_a_peer() {
    // `Transmit` names a client 5-tuple and nothing else; this runs every kind of request, and the
    // relaying they enable, and checks that what the server sent went to a client, from the listener.
    let mut r = Relay::with(loopback_config());
    let (alice, bob) = (Creds::alice(), Creds::bob());
    let clients = [client(1), client(2)];
    let relay = r.allocate(clients[0], &alice);
    r.allocate(clients[1], &bob);
    let mut events = Vec::new();
    events.extend(r.permit(clients[0], &alice, peer(1)));
    events.extend(r.bind(clients[0], &alice, 0x4000, peer(2)));
    events.extend(r.bind(clients[0], &alice, 0x3000, peer(2)));
    events.extend(r.send(clients[0], peer(1), b"x"));
    events.extend(r.client(clients[0], &channel_data(0x4000, b"y")));
    events.extend(r.peer(relay, peer(2), b"z"));
    events.extend(r.request(clients[1], Method::BINDING, &[], None));
    events.extend(r.advance(Duration::from_secs(700)));
    let mut replies = 0;
    for e in &events {
        match e {
            Event::Reply { to, .. } | Event::Answered { to, .. } => {
                replies += 1;
                assert!(clients.contains(to), "{e:?}");
            }
            Event::Relayed { src, dst, .. } if *src == r.listener() => {
                assert!(clients.iter().any(|c| c.client == *dst), "{e:?}");
            }
            Event::Relayed { dst, .. } => assert!([peer(1), peer(2)].contains(dst), "{e:?}"),
            Event::Route(_) => {}
        }
    }
    assert!(replies >= 4, "{events:?}");
}

/// Finding 1 of issue 10: a permission for another allocation's relayed address is per IP, so the data
/// plane has to check the exact address (IP and port) per packet, both ways, for Send indications and
/// channels, and only while that allocation lives.
#[test]
fn relay_to_relay_reaches_only_the_exact_live_relayed_address() {
    let mut r = Relay::new();
    let (alice, bob) = (Creds::alice(), Creds::bob());
    let bob_relay = r.allocate(client(2), &bob);
    let alice_relay = r.allocate(client(1), &alice);
    assert!(success(&r.permit(client(1), &alice, bob_relay)));
    assert!(success(&r.bind(client(1), &alice, 0x4000, bob_relay)));
    r.allocate(client(3), &bob); // a third relay socket on the same IP
    assert!(success(&r.permit(client(2), &bob, alice_relay)));

    // The exact relayed address: relayed both ways.
    assert_eq!(
        r.send(client(1), bob_relay, b"hi bob"),
        vec![relayed(alice_relay, bob_relay, b"hi bob")]
    );
    assert_eq!(r.client(client(1), &channel_data(0x4000, b"cd")).len(), 1);
    assert_eq!(r.peer(alice_relay, bob_relay, b"hi alice").len(), 1);

    // Other ports of the relay IP: inside the relay port range without an allocation, and outside it
    // (an ordinary local service). Dropped both ways, although the IP is permitted.
    for port in [50099, 53, 11211] {
        let other = SocketAddr::new(bob_relay.ip(), port);
        assert!(r.send(client(1), other, b"no").is_empty(), "{other}");
        assert!(r.peer(alice_relay, other, b"no").is_empty(), "{other}");
    }

    // Once bob's allocation is gone, his address is no relayed address any more: alice's permission and
    // channel for it still exist in her table, but nothing goes through.
    r.request(
        client(2),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&bob),
    );
    assert!(r.send(client(1), bob_relay, b"gone").is_empty());
    assert!(r
        .client(client(1), &channel_data(0x4000, b"gone"))
        .is_empty());
    assert!(r.peer(alice_relay, bob_relay, b"gone").is_empty());
}

/// Finding 2 of issue 10: the relay's own addresses (relay IPs, public addresses, listen and interface
/// addresses) are denied peers by default, like loopback. The fixture's relay IP is public, so these
/// refusals are about it being the relay's own address, not about a documentation range.
#[test]
fn the_relays_own_addresses_are_denied_peers() {
    let public: SocketAddr = sa("203.0.114.20:0");
    let mut r = Relay::with(Config {
        own_ips: vec![public.ip()],
        ..config()
    });
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    assert!(
        crate::policy::PeerPolicy::new().check(relay).is_ok(),
        "a public relay IP"
    );
    for ip in [relay.ip(), public.ip()] {
        for port in [53, 123, 161, 11211] {
            let peer = SocketAddr::new(ip, port);
            assert_eq!(
                reply(&r.permit(client(1), &alice, peer))
                    .attrs
                    .error_code
                    .map(|e| e.0),
                Some(403),
                "{peer}"
            );
            let events = r.bind(client(1), &alice, 0x4000, peer);
            assert_eq!(
                reply(&events).attrs.error_code.map(|e| e.0),
                Some(403),
                "{peer}"
            );
            assert!(
                !events.iter().any(|e| matches!(e, Event::Route(_))),
                "{events:?}"
            );
        }
    }
}

/// An explicit allow may open the relay's own IP, but never its service ports nor the relay port range
/// (except exact live relayed addresses), checked at request time and per packet.
#[test]
fn an_explicit_allow_opens_the_relays_own_ip_but_not_its_service_ports_or_relay_range() {
    use crate::policy::{Cidr, PeerPolicy};
    let base = config();
    let r_ip = base.relay_ips[0];
    let mut r = Relay::with(Config {
        peer_policy: PeerPolicy::new()
            .with_allow(vec![Cidr::new(r_ip, 32).unwrap()])
            .with_service_ports(vec![SocketAddr::new(r_ip, 3478), sa("0.0.0.0:9090")]),
        ..base
    });
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    let open = SocketAddr::new(r_ip, 5353);
    assert!(success(&r.permit(client(1), &alice, open)));
    let closed = [
        SocketAddr::new(r_ip, 3478),  // a listener
        SocketAddr::new(r_ip, 9090),  // metrics on 0.0.0.0
        SocketAddr::new(r_ip, 50050), // the relay port range, no allocation there
        SocketAddr::new(r_ip, 0),
    ];
    for peer in closed {
        let events = r.bind(client(1), &alice, 0x4000, peer);
        assert_eq!(
            reply(&events).attrs.error_code.map(|e| e.0),
            Some(403),
            "{peer}"
        );
    }
    // The permission covers the IP; the data plane still judges the port of every packet.
    assert_eq!(
        r.send(client(1), open, b"ok"),
        vec![relayed(relay, open, b"ok")]
    );
    assert_eq!(r.peer(relay, open, b"ok").len(), 1);
    for peer in closed {
        assert!(r.send(client(1), peer, b"no").is_empty(), "{peer}");
        assert!(r.peer(relay, peer, b"no").is_empty(), "{peer}");
    }
    assert_eq!(
        r.core().stats().drops(Drop::OwnAddress),
        2 * closed.len() as u64
    );
}

#[test]
fn an_expired_channel_stops_relaying_but_its_permission_may_outlive_it() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    r.bind(client(1), &alice, 0x4000, peer(1));
    // Refresh the allocation and the permission (not the channel) before the channel's 600 s run out.
    for _ in 0..2 {
        r.advance(Duration::from_secs(290));
        let events = r.request(client(1), Method::REFRESH, &[], Some(&alice));
        assert!(success(&events));
        assert!(success(&r.permit(client(1), &alice, peer(1))));
    }
    let events = r.advance(Duration::from_secs(30));
    assert!(
        events.iter().any(|e| matches!(e,
        Event::Route(RouteUpdate::RemoveChannel { peer: p, .. }) if *p == peer(1))),
        "{events:?}"
    );
    assert!(r.client(client(1), &channel_data(0x4000, b"x")).is_empty());
    assert_eq!(r.core().stats().drops(Drop::NoChannel), 1);
    // Peer data now comes as a Data indication (the permission still holds).
    let events = r.peer(relay, peer(1), b"y");
    let [Event::Relayed { bytes, .. }] = &events[..] else {
        panic!("{events:?}");
    };
    assert_eq!(Message::parse(bytes).unwrap().attrs.data, Some(&b"y"[..]));
}

#[test]
fn an_ipv6_allocation_relays_ipv6_peers_with_the_48_byte_data_indication_header() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let attrs = [
        Attribute::RequestedTransport(17),
        Attribute::RequestedAddressFamily(crate::wire::family::IPV6),
    ];
    let relay = r.allocate_with(client(1), &alice, &attrs);
    assert!(relay.is_ipv6());
    let v6_peer = sa("[2606:4700::1111]:443");
    assert_eq!(
        reply(&r.permit(client(1), &alice, peer(1)))
            .attrs
            .error_code
            .map(|e| e.0),
        Some(443),
        "an IPv4 peer for an IPv6 relay"
    );
    assert!(success(&r.permit(client(1), &alice, v6_peer)));
    assert_eq!(
        r.send(client(1), v6_peer, b"six"),
        vec![relayed(relay, v6_peer, b"six")]
    );
    let events = r.peer(relay, v6_peer, b"back");
    let [Event::Relayed { bytes, .. }] = &events[..] else {
        panic!("{events:?}");
    };
    let msg = Message::parse(bytes).unwrap();
    assert_eq!(msg.attrs.xor_peer_address, Some(v6_peer));
    assert_eq!(msg.attrs.data, Some(&b"back"[..]));
    assert_eq!(
        bytes.len(),
        48 + 4,
        "20 header + 24 XOR-PEER-ADDRESS + 4 DATA header + 4 payload"
    );
}

#[test]
fn nothing_is_relayed_once_the_allocation_is_gone() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    let id = r.id(relay);
    r.bind(client(1), &alice, 0x4000, peer(1));
    r.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(0)],
        Some(&alice),
    );
    assert_eq!(r.core().table().relay_count(), 0);
    assert!(r.client(client(1), &channel_data(0x4000, b"x")).is_empty());
    assert!(r.send(client(1), peer(1), b"x").is_empty());
    let mut slot = vec![0u8; SLOT];
    assert_eq!(
        r.core_mut().on_peer(id, peer(1), &mut slot, 1),
        Action::Done
    );
    let s = r.core().stats();
    assert_eq!(
        (
            s.drops(Drop::NoChannel),
            s.drops(Drop::NoPermission),
            s.drops(Drop::NoRelay)
        ),
        (1, 1, 1)
    );
}

#[test]
fn a_revoked_identity_is_relayed_nothing_once_its_allocation_is_terminated() {
    let mut r = Relay::new();
    let carol = Creds::rest(SECRET_NEW, "carol", UNIX0 + 3600);
    let relay = r.allocate(client(1), &carol);
    let id = r.id(relay);
    r.bind(client(1), &carol, 0x4000, peer(1));
    assert_eq!(
        r.client(client(1), &channel_data(0x4000, b"x")),
        vec![relayed(relay, peer(1), b"x")]
    );

    r.h.server.revoke("carol", UNIX0 + 172_800, true);
    let events = r.pump();
    assert!(
        events.iter().any(|e| matches!(e,
        Event::Route(RouteUpdate::RemoveChannel { peer: p, .. }) if *p == peer(1))),
        "{events:?}"
    );
    assert_eq!(r.core().table().relay_count(), 0, "{events:?}");
    assert!(r.client(client(1), &channel_data(0x4000, b"x")).is_empty());
    let mut slot = vec![0u8; SLOT];
    assert_eq!(
        r.core_mut().on_peer(id, peer(1), &mut slot, 1),
        Action::Done
    );
    let s = r.core().stats();
    assert_eq!((s.drops(Drop::NoChannel), s.drops(Drop::NoRelay)), (1, 1));
}

mod random {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Permit(usize),
        Bind(u16, usize),
        Send(usize, u8),
        ChannelData(u16, u8),
        Peer(usize, u8),
        Advance(u64),
        Refresh,
    }

    fn op() -> impl Strategy<Value = Op> {
        let peer = 0usize..6;
        let channel = 0x4000u16..0x4003;
        prop_oneof![
            2 => peer.clone().prop_map(Op::Permit),
            2 => (channel.clone(), peer.clone()).prop_map(|(c, p)| Op::Bind(c, p)),
            4 => (peer.clone(), any::<u8>()).prop_map(|(p, n)| Op::Send(p, n)),
            3 => (channel, any::<u8>()).prop_map(|(c, n)| Op::ChannelData(c, n)),
            4 => (peer, any::<u8>()).prop_map(|(p, n)| Op::Peer(p, n)),
            1 => (0u64..400).prop_map(Op::Advance),
            1 => Just(Op::Refresh),
        ]
    }

    proptest! {
        // Failure seeds are kept beside this file (tests.proptest-regressions), not in a top-level folder.
        #![proptest_config(ProptestConfig {
            cases: 48,
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
            )),
            ..ProptestConfig::default()
        })]

        /// Whatever a client does: data reaches only peers it permitted, never an own address but
        /// the live relayed one, and the relay's final counters are exactly what was relayed.
        #[test]
        fn data_goes_only_where_permitted_and_is_billed_exactly(
            ops in prop::collection::vec(op(), 1..=40)
        ) {
            let mut r = Relay::new();
            let (alice, bob) = (Creds::alice(), Creds::bob());
            let bob_relay = r.allocate(client(2), &bob);
            let relay = r.allocate(client(1), &alice);
            let own = |port| SocketAddr::new(relay.ip(), port);
            let peers = [peer(1), peer(2), sa("8.8.8.8:53"), own(12345), own(50050), bob_relay];
            let mut permitted = std::collections::HashSet::new();
            let mut billed = Counters::default();
            let alloc = r.core().table().relay(r.id(relay)).unwrap().allocation;
            for op in ops {
                let events = match op {
                    Op::Permit(p) => r.permit(client(1), &alice, peers[p]),
                    Op::Bind(c, p) => r.bind(client(1), &alice, c, peers[p]),
                    Op::Send(p, n) => r.send(client(1), peers[p], &vec![n; usize::from(n)]),
                    Op::ChannelData(c, n) => {
                        r.client(client(1), &channel_data(c, &vec![n; usize::from(n)]))
                    }
                    Op::Peer(p, n) if r.relay_id(relay).is_some() => {
                        let events = r.peer(relay, peers[p], &vec![n; usize::from(n)]);
                        if !events.is_empty() {
                            billed.to_client_bytes += u64::from(n);
                            billed.to_client_packets += 1;
                        }
                        events
                    }
                    Op::Peer(..) => Vec::new(),
                    Op::Advance(s) => r.advance(Duration::from_secs(s)),
                    Op::Refresh => r.request(client(1), Method::REFRESH, &[], Some(&alice)),
                };
                if let Op::Permit(p) | Op::Bind(_, p) = op {
                    let ok = events.iter().any(|e| matches!(e, Event::Reply { bytes, .. }
                        if Message::parse(bytes).is_ok_and(|m| m.message_type().class == Class::Success)));
                    if ok {
                        permitted.insert(peers[p].ip());
                    }
                }
                for e in &events {
                    match e {
                        Event::Relayed { src, dst, bytes } if *src == relay => {
                            prop_assert!(permitted.contains(&dst.ip()), "{e:?}");
                            prop_assert!(
                                dst.ip() != relay.ip() || *dst == bob_relay,
                                "to an own address: {e:?}"
                            );
                            billed.to_peer_bytes += bytes.len() as u64;
                            billed.to_peer_packets += 1;
                        }
                        Event::Relayed { dst, .. } => prop_assert_eq!(*dst, client(1).client),
                        Event::Reply { to, .. } | Event::Answered { to, .. } => {
                            prop_assert_eq!(*to, client(1))
                        }
                        Event::Route(_) => {}
                    }
                }
            }
            r.request(client(1), Method::REFRESH, &[Attribute::Lifetime(0)], Some(&alice));
            r.advance(Duration::from_secs(3600));
            let rest: Vec<ToControl> = r.from_worker.try_iter().collect();
            r.reports.extend(rest);
            let closed: Vec<Counters> = r
                .reports
                .iter()
                .filter_map(|m| match m {
                    ToControl::RelayClosed { allocation, counters } if *allocation == alloc => {
                        Some(*counters)
                    }
                    _ => None,
                })
                .collect();
            prop_assert_eq!(closed, vec![billed]);
        }
    }
}

/// The code of the single error reply among `events`, `None` for a success.
fn error_code(events: &[Event]) -> Option<u16> {
    reply(events).attrs.error_code.map(|e| e.0)
}

/// `n` datagrams each way on channel `channel` to `peer`; how many arrived (each way).
fn exchange(
    r: &mut Relay,
    five: FiveTuple,
    relay: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    n: usize,
) -> (usize, usize) {
    let (mut out, mut back) = (0, 0);
    for i in 0..n {
        let payload = [i as u8; 20];
        if r.client(five, &channel_data(channel, &payload)) == vec![relayed(relay, peer, &payload)]
        {
            out += 1;
        }
        let expected = relayed(r.listener(), five.client, &channel_data(channel, &payload));
        if r.peer(relay, peer, &payload) == vec![expected] {
            back += 1;
        }
    }
    (out, back)
}

#[test]
fn a_reloaded_peer_policy_removes_denied_permissions_and_channels_and_the_data_path_drops_them() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    let id = r.id(relay);
    let (denied, kept) = (peer(1), sa("9.9.9.9:7000"));
    assert!(success(&r.bind(client(1), &alice, 0x4000, denied)));
    assert!(success(&r.bind(client(1), &alice, 0x4001, kept)));
    assert_eq!(
        exchange(&mut r, client(1), relay, 0x4000, denied, 10),
        (10, 10)
    );
    assert_eq!(
        exchange(&mut r, client(1), relay, 0x4001, kept, 10),
        (10, 10)
    );

    let mut new = config();
    new.peer_policy = new
        .peer_policy
        .with_deny(vec!["8.8.4.0/24".parse().unwrap()]);
    let revoked = r.h.server.reload(new).unwrap();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].permissions, vec![denied.ip()]);
    assert_eq!(
        revoked[0]
            .channels
            .iter()
            .map(|(n, p)| (n.get(), p.0))
            .collect::<Vec<_>>(),
        vec![(0x4000, denied)]
    );
    // The same route updates as expiry, to the worker's table.
    let events = r.pump();
    assert!(
        events.contains(&Event::Route(RouteUpdate::RemovePermission {
            relay: id,
            peer: denied.ip(),
        }))
    );
    assert!(events.iter().any(|e| matches!(e,
        Event::Route(RouteUpdate::RemoveChannel { relay, channel, .. })
            if *relay == id && channel.get() == 0x4000)));
    assert!(!events.iter().any(|e| matches!(e, Event::Reply { .. })));

    // The denied peer is cut off both ways, on the channel and by Send indication.
    assert_eq!(
        exchange(&mut r, client(1), relay, 0x4000, denied, 5),
        (0, 0)
    );
    assert!(r.send(client(1), denied, b"x").is_empty());
    // The allowed peer keeps relaying without a loss, on the same allocation.
    assert_eq!(
        exchange(&mut r, client(1), relay, 0x4001, kept, 20),
        (20, 20)
    );
    assert_eq!(r.h.server.allocation_count(), 1);
    // New permissions follow the new policy at once.
    assert_eq!(error_code(&r.permit(client(1), &alice, denied)), Some(403));
    assert!(success(&r.permit(client(1), &alice, sa("9.9.9.10:1"))));
}

#[test]
fn reloaded_rest_secrets_rotate_and_users_come_and_go_while_allocations_keep_relaying() {
    use crate::auth::RestSecrets;
    use crate::server::tests::{SECRET_NEW, SECRET_OLD};
    let mut start = config();
    start.rest_secrets = RestSecrets::new(vec![SECRET_OLD.to_vec()]);
    let mut r = Relay::with(start.clone());
    let expiry = r.h.unix() + 86_400;
    let (old, new) = (
        Creds::rest(SECRET_OLD, "u1", expiry),
        Creds::rest(SECRET_NEW, "u2", expiry),
    );
    let relay = r.allocate(client(1), &old);
    assert!(success(&r.bind(client(1), &old, 0x4000, peer(1))));
    let refresh = |r: &mut Relay, n: u16, c: &Creds| {
        let events = r.request(
            client(n),
            Method::REFRESH,
            &[Attribute::Lifetime(600)],
            Some(c),
        );
        error_code(&events)
    };

    // Rotation: the new secret first (it mints), the old one still listed.
    let mut both = start.clone();
    both.rest_secrets = RestSecrets::new(vec![SECRET_NEW.to_vec(), SECRET_OLD.to_vec()]);
    assert_eq!(r.h.server.reload(both).unwrap(), vec![]);
    assert_eq!(
        refresh(&mut r, 1, &old),
        None,
        "old credential, secret still listed"
    );
    r.allocate(client(2), &new);
    assert_eq!(
        exchange(&mut r, client(1), relay, 0x4000, peer(1), 10),
        (10, 10)
    );

    // The old secret removed: its credential gets 401 at its next request; the allocation lives on
    // (until its lifetime ends) and keeps relaying; the new one keeps working.
    let mut only_new = start.clone();
    only_new.rest_secrets = RestSecrets::new(vec![SECRET_NEW.to_vec()]);
    r.h.server.reload(only_new.clone()).unwrap();
    assert_eq!(refresh(&mut r, 1, &old), Some(401));
    assert_eq!(refresh(&mut r, 2, &new), None);
    assert_eq!(
        exchange(&mut r, client(1), relay, 0x4000, peer(1), 10),
        (10, 10)
    );
    assert_eq!(r.h.server.allocation_count(), 2);

    // A user added, then removed (alice kept throughout).
    let carol = Creds::static_user("carol", "carol-pass");
    let mut with_carol = only_new.clone();
    with_carol.users.push(("carol".into(), "carol-pass".into()));
    r.h.server.reload(with_carol).unwrap();
    r.allocate(client(3), &carol);
    r.allocate(client(4), &Creds::alice());
    r.h.server.reload(only_new).unwrap();
    assert_eq!(refresh(&mut r, 3, &carol), Some(401));
    assert_eq!(refresh(&mut r, 4, &Creds::alice()), None);
}

#[test]
fn an_invalid_reload_changes_nothing() {
    let mut r = Relay::new();
    let alice = Creds::alice();
    let relay = r.allocate(client(1), &alice);
    assert!(success(&r.bind(client(1), &alice, 0x4000, peer(1))));
    let mut bad = config();
    bad.users.clear();
    bad.rest_secrets = crate::auth::RestSecrets::new(Vec::new());
    bad.peer_policy = bad
        .peer_policy
        .with_deny(vec!["0.0.0.0/0".parse().unwrap()]);
    let err = r.h.server.reload(bad).unwrap_err();
    assert_eq!(err.key, "users");
    assert!(r.pump().is_empty());
    assert_eq!(
        exchange(&mut r, client(1), relay, 0x4000, peer(1), 5),
        (5, 5)
    );
    let events = r.request(
        client(1),
        Method::REFRESH,
        &[Attribute::Lifetime(600)],
        Some(&alice),
    );
    assert_eq!(error_code(&events), None);
}

/// Issue 10 finding 2, from the file: the public addresses in the config (`api.public_addresses`) and
/// the public side of `relay.external` are the relay's own, denied like the relay IPs, while a
/// neighbouring public address stays an ordinary peer.
#[test]
fn configured_public_addresses_are_denied_peers() {
    let file = crate::config::RelayConfig::from_toml(&format!(
        "realm = \"turnpike\"\nlisten = [\"203.0.114.10:3478\"]\n\
         [relay]\naddresses = [\"203.0.114.10\", \"10.0.0.5\"]\nport_min = 50000\nport_max = 50099\n\
         external = [{{ private = \"10.0.0.5\", public = \"198.51.99.7\" }}]\n\
         [[users]]\nname = \"alice\"\npassword = \"alice-pass\"\n\
         [api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"{}\"]\n\
         revocations_database = \"/tmp/unused.db\"\npublic_addresses = [\"198.51.99.9:3478\"]\n",
        "c2VjcmV0LWtleS1vZi10aGlydHktdHdvLWJ5dGVzISE="
    ))
    .unwrap();
    let mut r = Relay::with(file.server());
    let alice = Creds::alice();
    r.allocate(client(1), &alice);
    for peer in ["198.51.99.9:53", "198.51.99.7:53", "198.51.99.7:50001"] {
        let peer = sa(peer);
        assert_eq!(
            error_code(&r.permit(client(1), &alice, peer)),
            Some(403),
            "{peer}"
        );
        assert_eq!(
            error_code(&r.bind(client(1), &alice, 0x4000, peer)),
            Some(403),
            "{peer}"
        );
    }
    assert!(success(&r.permit(client(1), &alice, sa("198.51.99.10:53"))));
}

/// 1:1 NAT (`relay.external`): the relay binds the private address and tells clients the public one.
/// Two relayed clients reach each other at their public relayed addresses; the data stays on the host
/// (sent to the private address, no NAT hairpin) and arrives from the sender's public relayed address,
/// which is what the receiver permitted. No other port of either IP is relayed to.
#[test]
fn behind_one_to_one_nat_clients_see_the_public_address_and_relay_to_each_other() {
    let (private, public) = ("10.0.0.5".parse().unwrap(), "198.51.99.7".parse().unwrap());
    let mut r = Relay::with(Config {
        relay_ips: vec![private],
        external: vec![(private, public)],
        ..config()
    });
    let (alice, bob) = (Creds::alice(), Creds::bob());
    let alice_pub = r.allocate(client(1), &alice);
    let bob_pub = r.allocate(client(2), &bob);
    assert_eq!((alice_pub.ip(), bob_pub.ip()), (public, public));
    let bound = |a: SocketAddr| SocketAddr::new(private, a.port());
    assert!(
        r.relay_id(bound(alice_pub)).is_some(),
        "bound on the private IP"
    );

    assert!(success(&r.permit(client(1), &alice, bob_pub)));
    assert!(success(&r.bind(client(2), &bob, 0x4001, alice_pub)));
    // Alice → bob: sent from alice's socket to bob's private address.
    assert_eq!(
        r.send(client(1), bob_pub, b"hi bob"),
        vec![relayed(bound(alice_pub), bound(bob_pub), b"hi bob")]
    );
    // It arrives on bob's socket from alice's private address; bob's channel names her public one.
    assert_eq!(
        r.peer(bound(bob_pub), bound(alice_pub), b"hi bob"),
        vec![relayed(
            r.listener(),
            client(2).client,
            &channel_data(0x4001, b"hi bob")
        )]
    );
    // Bob → alice over his channel, and back to bob as a Data indication naming bob's public address.
    assert_eq!(
        r.client(client(2), &channel_data(0x4001, b"hi alice")),
        vec![relayed(bound(bob_pub), bound(alice_pub), b"hi alice")]
    );
    let back = r.peer(bound(alice_pub), bound(bob_pub), b"hi alice");
    let [Event::Relayed { bytes, .. }] = back.as_slice() else {
        panic!("{back:?}");
    };
    assert_eq!(
        Message::parse(bytes).unwrap().attrs.xor_peer_address,
        Some(bob_pub)
    );

    // Other ports of the public and the private IP: refused at request time and dropped per packet.
    for port in [53, 50099] {
        for ip in [public, private] {
            let other = SocketAddr::new(ip, port);
            assert_eq!(
                error_code(&r.permit(client(1), &alice, other)),
                Some(403),
                "{other}"
            );
        }
        assert!(r
            .send(client(1), SocketAddr::new(public, port), b"no")
            .is_empty());
        assert!(r
            .peer(bound(alice_pub), SocketAddr::new(private, port), b"no")
            .is_empty());
    }
}

/// An unauthenticated request as a client writes it: `attrs`, FINGERPRINT if `fingerprint`.
fn unsigned(method: Method, tid: u8, attrs: &[Attribute<'_>], fingerprint: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let typ = MessageType::new(method, Class::Request);
    let mut w = MessageWriter::new(&mut buf, typ, wire::TransactionId([tid; 12])).unwrap();
    for a in attrs {
        w.add(a).unwrap();
    }
    if fingerprint {
        w.add_fingerprint().unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// An Allocate with no integrity (REQUESTED-TRANSPORT UDP, FINGERPRINT): it certainly gets a plain 401.
fn plain_allocate(tid: u8) -> Vec<u8> {
    unsigned(
        Method::ALLOCATE,
        tid,
        &[Attribute::RequestedTransport(17)],
        true,
    )
}

/// What the server alone answers to `bytes` from `five` (a fresh server of the same seed, so the
/// same nonce key, at the same Unix time).
fn server_answer(config: &Config, five: FiveTuple, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut h = Harness::with(config.clone());
    let out = h.send(five, bytes);
    assert!(out.sent.len() <= 1, "{out:?}");
    out.sent.first().map(|t| t.bytes.clone())
}

/// The worker's 401 is the server's, byte for byte, for every method it answers, with and without
/// FINGERPRINT, IPv4 and IPv6 clients, and PASSWORD-ALGORITHMS advertised where it fits (and not in
/// a request too small for it); nothing reaches the control thread.
#[test]
fn the_workers_401_is_the_servers_byte_for_byte() {
    let v6 = FiveTuple {
        client: sa("[2001:db8:1:2::1]:4000"),
        ..client(1)
    };
    let transport = Attribute::RequestedTransport(17);
    let peer_attr = Attribute::XorPeerAddress(peer(1));
    let lifetime = Attribute::Lifetime(600);
    let channel = Attribute::ChannelNumber(0x4000);
    let software = Attribute::Software("a client with a longer name, so the 401 may grow");
    let requests: Vec<(Method, Vec<Attribute<'_>>)> = vec![
        (Method::ALLOCATE, vec![transport]),
        (Method::ALLOCATE, vec![transport, software]),
        (Method::REFRESH, vec![lifetime]),
        (Method::CREATE_PERMISSION, vec![peer_attr]),
        (Method::CHANNEL_BIND, vec![channel, peer_attr, software]),
    ];
    let mut compared = 0;
    for password_algorithms in [false, true] {
        let config = Config {
            password_algorithms,
            ..config()
        };
        let mut r = Relay::answering(config.clone());
        for (i, (method, attrs)) in requests.iter().enumerate() {
            for fingerprint in [false, true] {
                for five in [client(1), v6] {
                    let bytes = unsigned(*method, i as u8, attrs, fingerprint);
                    let events = r.client(five, &bytes);
                    let [Event::Answered { to, bytes: ours }] = events.as_slice() else {
                        panic!("not answered by the worker: {method:?} {events:?}");
                    };
                    assert_eq!(*to, five);
                    let theirs = server_answer(&config, five, &bytes).unwrap();
                    assert_eq!(ours, &theirs, "{method:?} fp={fingerprint} {five:?}");
                    let msg = Message::parse(ours).unwrap();
                    assert_eq!(msg.attrs.error_code.map(|e| e.0), Some(401));
                    assert_eq!(msg.attrs.fingerprint.is_some(), fingerprint);
                    compared += 1;
                }
            }
        }
        // Every one answered, sent and counted by the worker; none reached the server.
        assert_eq!(r.core().stats().challenges(), 5 * 2 * 2);
        assert_eq!(r.h.server.stats().challenges, 0);
    }
    assert_eq!(compared, 2 * 5 * 2 * 2);
}

/// The 401 round through the worker: its nonce is one the server accepts, the Allocate succeeds, and
/// the challenge is counted once, by the worker.
#[test]
fn a_nonce_the_worker_minted_is_accepted_by_the_server() {
    for password_algorithms in [false, true] {
        let mut r = Relay::answering(Config {
            password_algorithms,
            ..config()
        });
        let alice = Creds::alice();
        let first = r.request(
            client(1),
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            None,
        );
        assert!(
            matches!(first.as_slice(), [Event::Answered { .. }]),
            "{first:?}"
        );
        let nonce = reply(&first).attrs.nonce.unwrap().to_string();
        r.h.nonces.insert(client(1).client, nonce);
        let events = r.request(
            client(1),
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            Some(&alice),
        );
        assert!(success(&events), "{events:?}");
        assert_eq!(r.core().stats().challenges(), 1);
        assert_eq!(r.h.server.stats().challenges, 0);
        assert_eq!(r.h.server.stats().auth_failures, 0);
        // The signed requests that follow go to the server, with the same nonce.
        assert!(success(&r.permit(client(1), &alice, peer(1))));
    }
}

/// The worker spends its own shard of the per-source budget on 401s and Binding successes alike;
/// what is refused is counted and not passed on. A 401 more than 3× its request is never sent, by
/// the worker as by the server.
#[test]
fn the_workers_401s_share_the_budget_and_the_amplification_bound() {
    // 2/s with a burst of 4, half of it the worker's shard (the other half is the server's).
    let mut r = Relay::answering(Config {
        challenge_rate: 2,
        ..config()
    });
    let answered = (0..4)
        .filter(|i| !r.client(client(1), &plain_allocate(*i)).is_empty())
        .count();
    assert_eq!(
        answered, 2,
        "the worker's half of a burst of twice the rate"
    );
    assert_eq!(r.core().stats().drops(Drop::ChallengeRateLimited), 2);
    let binding = unsigned(Method::BINDING, 9, &[], true);
    assert!(r.client(client(1), &binding).is_empty(), "one budget");
    assert_eq!(r.core().stats().drops(Drop::BindingRateLimited), 1);
    assert_eq!(r.h.server.stats().challenges, 0, "nothing passed on");
    // Another source has its own budget; a reload's rate reaches the worker's shard.
    let other = FiveTuple {
        client: sa("198.51.100.99:4000"),
        ..client(1)
    };
    assert_eq!(r.client(other, &plain_allocate(5)).len(), 1);
    r.core_mut().set_binding_rate(5);
    assert_eq!(r.client(client(1), &plain_allocate(6)).len(), 1);

    // 20 bytes in, an 84-byte 401 out: over 3×, neither answered nor passed on.
    let bare = unsigned(Method::ALLOCATE, 7, &[], false);
    assert_eq!(bare.len(), wire::HEADER_LEN);
    assert!(r.client(client(2), &bare).is_empty());
    assert_eq!(r.core().stats().drops(Drop::ChallengeAmplification), 1);
    assert_eq!(server_answer(&config(), client(2), &bare), None);
}

/// What is not certainly a plain 401 goes to the control thread as before: a signed request (here
/// with a nonce the server never minted: 438), an unauthenticated one with a malformed
/// XOR-PEER-ADDRESS (dropped silently by the server), and an unknown method (400).
#[test]
fn requests_that_are_not_plain_challenges_reach_the_server() {
    let mut r = Relay::answering(config());
    let alice = Creds::alice();
    r.h.nonces
        .insert(client(1).client, "not-a-nonce-of-ours".into());
    let events = r.request(
        client(1),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17)],
        Some(&alice),
    );
    assert!(
        matches!(events.as_slice(), [Event::Reply { .. }]),
        "{events:?}"
    );
    assert_eq!(error_code(&events), Some(438));

    let mut malformed = unsigned(
        Method::CREATE_PERMISSION,
        3,
        &[Attribute::XorPeerAddress(peer(1))],
        false,
    );
    // XOR-PEER-ADDRESS of the IPv4 family with a 4-byte value.
    malformed[3] -= 4;
    malformed[wire::HEADER_LEN + 3] = 4;
    malformed.truncate(wire::HEADER_LEN + 8);
    assert!(
        Message::parse(&malformed)
            .unwrap()
            .attrs
            .malformed_peer_address
    );
    let before = r.h.server.stats().malformed;
    assert!(r.client(client(1), &malformed).is_empty());
    assert_eq!(
        r.h.server.stats().malformed,
        before + 1,
        "the server dropped it"
    );

    let unknown = unsigned(Method(0x00a), 4, &[], false);
    assert_eq!(error_code(&r.client(client(1), &unknown)), Some(400));
    assert_eq!(r.core().stats().challenges(), 0);
}

/// The realm and `password_algorithms` need a restart: a reload that changes them keeps the
/// server's, and the worker's 401 still names the realm the server checks.
#[test]
fn a_reload_of_the_realm_changes_neither_the_servers_nor_the_workers_challenge() {
    let mut r = Relay::answering(config());
    let reloaded = Config {
        realm: "elsewhere".into(),
        password_algorithms: true,
        ..config()
    };
    r.h.server.reload(reloaded).unwrap();
    let bytes = unsigned(
        Method::ALLOCATE,
        1,
        &[Attribute::RequestedTransport(17)],
        false,
    );
    let events = r.client(client(1), &bytes);
    assert_eq!(
        reply(&events).attrs.realm,
        Some(crate::server::tests::REALM)
    );
    let [Event::Answered { bytes: ours, .. }] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(
        Some(ours.clone()),
        server_answer(&config(), client(1), &bytes)
    );
    let alice = Creds::alice();
    assert!(r.allocate(client(1), &alice).port() > 0);
}

/// One source gets no more unauthenticated answers than `challenge_rate` allows, however many owners
/// answer it: the worker's plain 401s and the server's 400s (here, to an unknown method) together stay
/// within one burst of twice the rate. Each owning the whole budget, they gave twice that.
#[test]
fn the_worker_and_the_server_together_keep_one_sources_budget() {
    let mut r = Relay::answering(Config {
        challenge_rate: 4,
        ..config()
    });
    let unknown = |tid| unsigned(Method(0x0FF), tid, &[], true);
    let mut answered = 0;
    for i in 0..12u8 {
        answered += r.client(client(1), &plain_allocate(2 * i)).len();
        answered += r.client(client(1), &unknown(2 * i + 1)).len();
    }
    assert_eq!(
        answered, 8,
        "a burst of twice 4/s, for the worker and the server together"
    );
    assert_eq!(r.core().stats().drops(Drop::ChallengeRateLimited), 8);
    assert_eq!(r.h.server.stats().rate_limited, 8);
}
