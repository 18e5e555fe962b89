//! Scenario tests: one input, the exact transmits and commands that come out, with a fake clock and a
//! seeded RNG. A small client in [`Harness`] builds requests the way a TURN client would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod allocate;
mod hardening;
mod relay;
mod revoke;

use core::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::auth::{long_term_key_md5, RestSecrets};
use crate::policy::{Cidr, PeerPolicy};
use crate::wire::{Attribute, Class, Message, MessageType, MessageWriter, Method, TransactionId};

pub(super) const REALM: &str = "turnpike";
pub(super) const UNIX0: u64 = 1_800_000_000;
pub(super) const SECRET_NEW: &[u8] = b"new-secret";
pub(super) const SECRET_OLD: &[u8] = b"old-secret";

/// A transmit copied out of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sent {
    pub transport: Transport,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub bytes: Vec<u8>,
}

impl Sent {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("server sent valid STUN")
    }

    pub fn class(&self) -> Class {
        self.msg().message_type().class
    }

    pub fn error(&self) -> Option<u16> {
        self.msg().attrs.error_code.map(|(c, _)| c)
    }
}

/// Everything that came out of one input.
#[derive(Debug, Default)]
pub(super) struct Out {
    pub sent: Vec<Sent>,
    pub commands: Vec<Command>,
}

impl Out {
    /// The single response, asserting there is exactly one transmit.
    pub fn one(&self) -> &Sent {
        assert_eq!(
            self.sent.len(),
            1,
            "expected one transmit, got {:?}",
            self.sent
        );
        &self.sent[0]
    }

    /// The error code of the single response.
    pub fn error(&self) -> Option<u16> {
        self.one().error()
    }
}

pub(super) fn config() -> Config {
    Config {
        realm: REALM.into(),
        users: vec![
            ("alice".into(), "alice-pass".into()),
            ("bob".into(), "bob-pass".into()),
        ],
        rest_secrets: RestSecrets::new(vec![SECRET_NEW.to_vec(), SECRET_OLD.to_vec()]),
        relay_ips: vec![
            "203.0.113.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ],
        relay_ports: 50000..=50099,
        ..Config::default()
    }
}

pub(super) fn client(n: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("198.51.100.7".parse().unwrap(), 40000 + n),
        server: "192.0.2.1:3478".parse().unwrap(),
        transport: Transport::Udp,
    }
}

/// A public peer address.
pub(super) fn peer(n: u16) -> SocketAddr {
    SocketAddr::new("8.8.4.4".parse().unwrap(), 6000 + n)
}

/// Credentials a test client signs with.
#[derive(Debug, Clone)]
pub(super) struct Creds {
    pub username: String,
    pub key: [u8; 16],
}

impl Creds {
    pub fn static_user(name: &str, password: &str) -> Self {
        Creds {
            username: name.into(),
            key: long_term_key_md5(name, REALM, password),
        }
    }

    pub fn alice() -> Self {
        Self::static_user("alice", "alice-pass")
    }

    pub fn bob() -> Self {
        Self::static_user("bob", "bob-pass")
    }

    /// A REST credential for `user`, valid until `expiry`, minted with `secret`.
    pub fn rest(secret: &[u8], user: &str, expiry: u64) -> Self {
        let username = format!("{expiry}:{user}");
        let password = crate::auth::rest_password(secret, &username);
        Creds {
            key: long_term_key_md5(&username, REALM, &password),
            username,
        }
    }
}

pub(super) struct Harness {
    pub server: Server<StdRng>,
    pub t0: Instant,
    pub now: Instant,
    pub tid: u64,
    pub nonce: Option<String>,
    /// Nonces are bound to the client's address: the last one each client was given.
    pub nonces: std::collections::HashMap<SocketAddr, String>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(config())
    }

    pub fn with(config: Config) -> Self {
        let t0 = Instant::now();
        Harness {
            server: Server::new(config, StdRng::seed_from_u64(7)).unwrap(),
            t0,
            now: t0,
            tid: 0,
            nonce: None,
            nonces: Default::default(),
        }
    }

    pub fn unix(&self) -> u64 {
        UNIX0 + (self.now - self.t0).as_secs()
    }

    pub fn advance(&mut self, d: Duration) -> Out {
        self.now += d;
        self.server.handle_timeout(self.now);
        self.drain()
    }

    /// Set the clock to `t0 + d` and run timers.
    pub fn at(&mut self, d: Duration) -> Out {
        self.now = self.t0 + d;
        self.server.handle_timeout(self.now);
        self.drain()
    }

    pub fn drain(&mut self) -> Out {
        let mut out = Out::default();
        while let Some(t) = self.server.poll_transmit() {
            out.sent.push(Sent {
                transport: t.transport,
                src: t.src,
                dst: t.dst,
                bytes: t.payload.to_vec(),
            });
        }
        while let Some(c) = self.server.poll_command() {
            out.commands.push(c);
        }
        out
    }

    pub fn next_tid(&mut self) -> TransactionId {
        self.tid += 1;
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&self.tid.to_be_bytes());
        TransactionId(t)
    }

    /// Build a request; with `creds`, add USERNAME, REALM, NONCE and MESSAGE-INTEGRITY.
    pub fn build(
        &self,
        method: Method,
        class: Class,
        tid: TransactionId,
        attrs: &[Attribute<'_>],
        creds: Option<&Creds>,
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let mut w = MessageWriter::new(&mut buf, MessageType::new(method, class), tid).unwrap();
        for a in attrs {
            w.add(a).unwrap();
        }
        if let Some(c) = creds {
            w.add(&Attribute::Username(&c.username)).unwrap();
            w.add(&Attribute::Realm(REALM)).unwrap();
            w.add(&Attribute::Nonce(
                self.nonce.as_deref().unwrap_or("no-nonce-yet"),
            ))
            .unwrap();
            w.add_integrity(&c.key).unwrap();
        }
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    pub fn send(&mut self, five: FiveTuple, bytes: &[u8]) -> Out {
        let unix = self.unix();
        self.server
            .handle_client_message(self.now, unix, five, bytes);
        self.drain()
    }

    /// Send a request and return what came out.
    pub fn request(
        &mut self,
        five: FiveTuple,
        method: Method,
        attrs: &[Attribute<'_>],
        creds: Option<&Creds>,
    ) -> Out {
        let tid = self.next_tid();
        if let Some(n) = self.nonces.get(&five.client) {
            self.nonce = Some(n.clone());
        }
        let bytes = self.build(method, Class::Request, tid, attrs, creds);
        self.send(five, &bytes)
    }

    /// Get a nonce with an unauthenticated request (the 401 round).
    pub fn challenge(&mut self, five: FiveTuple) -> Out {
        let out = self.request(
            five,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            None,
        );
        let nonce = out
            .one()
            .msg()
            .attrs
            .nonce
            .expect("401 carries NONCE")
            .to_string();
        self.nonces.insert(five.client, nonce.clone());
        self.nonce = Some(nonce);
        out
    }

    /// The whole allocation dance: 401 round, Allocate, the data plane binds, success. Returns the relay
    /// address and allocation id.
    pub fn allocate(&mut self, five: FiveTuple, creds: &Creds) -> (RelayAddr, AllocationId) {
        self.allocate_with(five, creds, &[Attribute::RequestedTransport(17)])
    }

    pub fn allocate_with(
        &mut self,
        five: FiveTuple,
        creds: &Creds,
        attrs: &[Attribute<'_>],
    ) -> (RelayAddr, AllocationId) {
        self.challenge(five);
        let out = self.request(five, Method::ALLOCATE, attrs, Some(creds));
        assert!(
            out.sent.is_empty(),
            "no answer before the relay socket is bound: {:?}",
            out.sent
        );
        let (id, relays) = opened(&out.commands);
        let mut last = Out::default();
        for relay in &relays {
            self.server.handle_relay_opened(self.now, id, *relay);
            last = self.drain();
        }
        let resp = last.one();
        assert_eq!(
            resp.class(),
            Class::Success,
            "{:?}",
            resp.msg().attrs.error_code
        );
        assert!(resp.msg().verify_integrity(&creds.key));
        (relays[0], id)
    }

    /// Install a permission for `peer` via CreatePermission, asserting success.
    pub fn permit(&mut self, five: FiveTuple, creds: &Creds, peers: &[SocketAddr]) -> Out {
        let attrs: Vec<Attribute<'_>> = peers
            .iter()
            .map(|p| Attribute::XorPeerAddress(*p))
            .collect();
        let out = self.request(five, Method::CREATE_PERMISSION, &attrs, Some(creds));
        assert_eq!(
            out.one().class(),
            Class::Success,
            "{:?}",
            out.one().msg().attrs.error_code
        );
        out
    }

    pub fn bind(&mut self, five: FiveTuple, creds: &Creds, channel: u16, peer: SocketAddr) -> Out {
        self.request(
            five,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
            Some(creds),
        )
    }

    pub fn peer_data(&mut self, relay: RelayAddr, from: SocketAddr, payload: &[u8]) -> Out {
        self.server.handle_peer_data(self.now, relay, from, payload);
        self.drain()
    }

    /// Assert the server holds nothing: no allocations, timers, identities, and every port free.
    pub fn assert_empty(&self, ports: usize) {
        assert_eq!(self.server.allocation_count(), 0);
        assert_eq!(self.server.timer_count(), 0);
        assert_eq!(self.server.identity_count(), 0);
        assert_eq!(self.server.free_ports(), ports);
    }
}

/// The allocation id and relay addresses of the OpenRelay commands in `commands`.
pub(super) fn opened(commands: &[Command]) -> (AllocationId, Vec<RelayAddr>) {
    let mut id = None;
    let mut relays = Vec::new();
    for c in commands {
        if let Command::OpenRelay {
            allocation, relay, ..
        } = c
        {
            id = Some(*allocation);
            relays.push(*relay);
        }
    }
    (id.expect("an OpenRelay command"), relays)
}

/// A config that lets tests relay to loopback peers (the operator's explicit allow knob).
pub(super) fn loopback_config() -> Config {
    Config {
        peer_policy: PeerPolicy::new().with_allow(vec!["127.0.0.0/8".parse::<Cidr>().unwrap()]),
        ..config()
    }
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
