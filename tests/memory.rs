//! Userspace state per allocation (design §4: ≤ 1 KiB at 100k allocations), counted with the counting
//! allocator on the sans-IO core: `Server`, the control thread's command executor and a worker's
//! `RouteTable`, with no sockets. Every allocation goes through the real request path: a 401 round, an
//! authenticated Allocate (the executor opens its relay through a plane that binds nothing and programs
//! the table), and a ChannelBind to one peer (a permission and a channel, what a typical call has).
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use turnpike::auth::long_term_key_md5;
use turnpike::control::exec::{Executor, Plane};
use turnpike::route::{AllocationId, ClientKey, RouteTable, RouteUpdate};
use turnpike::server::{Config, FiveTuple, Server, Transport};
use turnpike::sys::alloc::{live_bytes, CountingAlloc};
use turnpike::wire::{
    Attribute, Class, Message, MessageType, MessageWriter, Method, TransactionId,
};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const ALLOCATIONS: usize = 100_000;
const BUDGET: i64 = 1024;
const REALM: &str = "turnpike";
const UNIX: u64 = 1_800_000_000;

/// A worker's table, programmed by the executor; relay sockets are not opened.
struct Tables {
    table: RouteTable,
}

impl Plane for Tables {
    type Socket = ();

    fn bind_relay(&mut self, _: SocketAddr, _: bool) -> std::io::Result<()> {
        Ok(())
    }

    fn add_relay(&mut self, _: usize, (): (), update: RouteUpdate) {
        self.table.apply(update);
    }

    fn route(&mut self, _: usize, update: RouteUpdate) -> Option<AllocationId> {
        self.table.apply(update);
        None
    }

    fn reply_udp(&mut self, _: usize, _: usize, _: FiveTuple, _: &[u8]) {}

    fn reply_stream(&mut self, _: usize, _: ClientKey, _: &[u8]) -> bool {
        true
    }
}

fn request(
    key: &[u8],
    tid: u64,
    method: Method,
    attrs: &[Attribute<'_>],
    nonce: Option<&str>,
) -> Vec<u8> {
    let mut t = [0u8; 12];
    t[4..].copy_from_slice(&tid.to_be_bytes());
    let mut buf = vec![0u8; 512];
    let typ = MessageType::new(method, Class::Request);
    let mut w = MessageWriter::new(&mut buf, typ, TransactionId(t)).unwrap();
    for a in attrs {
        w.add(a).unwrap();
    }
    if let Some(nonce) = nonce {
        w.add(&Attribute::Username("alice")).unwrap();
        w.add(&Attribute::Realm(REALM)).unwrap();
        w.add(&Attribute::Nonce(nonce)).unwrap();
        w.add_integrity(key).unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// 2,752 bytes per allocation on r3-core (2026-12-01); inline permission and channel sets, one timer
/// per allocation and indexes that hold ids instead of copies of 5-tuples brought it under 1 KiB.
/// `cargo test --test memory -- --nocapture` prints the split between the server, the executor and
/// the route table.
#[test]
fn userspace_state_per_allocation_at_100k_is_at_most_1_kib() {
    let relay_ips: Vec<IpAddr> = (10..17)
        .map(|i| IpAddr::V4(Ipv4Addr::new(203, 0, 114, i)))
        .collect();
    let config = Config {
        realm: REALM.into(),
        users: vec![("alice".into(), "alice-pass".into())],
        relay_ips,
        relay_ports: 49152..=65535,
        max_allocations: 2 * ALLOCATIONS,
        max_allocations_per_user: 2 * ALLOCATIONS,
        max_permissions_per_identity: 2 * ALLOCATIONS,
        max_channels_per_identity: 2 * ALLOCATIONS,
        challenge_rate: 0,
        ..Config::default()
    };
    let listener: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let peer: SocketAddr = "8.8.4.4:6000".parse().unwrap();
    let now = Instant::now();

    let empty = live_bytes();
    let mut server = Server::new(config, StdRng::seed_from_u64(7)).unwrap();
    let plane = Tables {
        table: RouteTable::new(),
    };
    let mut exec = Executor::new(plane, vec![(listener, Transport::Udp)], None);
    let idle = live_bytes();

    let key = long_term_key_md5("alice", REALM, "alice-pass");
    let rt = Attribute::RequestedTransport(17);
    let mut tid = 0u64;
    for i in 0..ALLOCATIONS {
        let [_, a, b, c] = (i as u32 + 1).to_be_bytes();
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, a, b, c)), 40000);
        // The 401 round. The plane drops replies, so the challenge is read from the server before the
        // executor's pump would drain it (a 401 carries no command).
        tid += 1;
        let allocate = request(&key, tid, Method::ALLOCATE, &[rt], None);
        exec.stun(&mut server, now, UNIX, 0, 0, client, &allocate);
        let challenge = server.poll_transmit().expect("a 401").payload.to_vec();
        let nonce = Message::parse(&challenge)
            .unwrap()
            .attrs
            .nonce
            .unwrap()
            .to_string();
        exec.pump(&mut server, now);
        tid += 1;
        exec.stun(
            &mut server,
            now,
            UNIX,
            0,
            0,
            client,
            &request(&key, tid, Method::ALLOCATE, &[rt], Some(&nonce)),
        );
        exec.pump(&mut server, now);
        tid += 1;
        let bind = [
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer),
        ];
        exec.stun(
            &mut server,
            now,
            UNIX,
            0,
            0,
            client,
            &request(&key, tid, Method::CHANNEL_BIND, &bind, Some(&nonce)),
        );
        exec.pump(&mut server, now);
    }
    let full = live_bytes();
    assert_eq!(server.allocation_count(), ALLOCATIONS);
    assert_eq!(exec.plane.table.relay_count(), ALLOCATIONS);
    assert_eq!(exec.plane.table.channel_count(), ALLOCATIONS);
    let per = (full - idle) / ALLOCATIONS as i64;
    println!(
        "userspace state: {} bytes idle, {} bytes at {ALLOCATIONS} allocations (1 permission, 1 \
         channel each): {per} bytes per allocation",
        idle - empty,
        full - empty
    );
    // Where it goes: drop the parts one by one.
    let n = ALLOCATIONS as i64;
    drop(std::mem::take(&mut exec.plane.table));
    let no_table = live_bytes();
    drop(exec);
    let no_exec = live_bytes();
    drop(server);
    let none = live_bytes();
    println!(
        "per allocation: route table {} B, executor {} B, server {} B",
        (full - no_table) / n,
        (no_table - no_exec) / n,
        (no_exec - none) / n
    );
    assert!(
        per <= BUDGET,
        "{per} bytes per allocation, more than {BUDGET}"
    );
}
