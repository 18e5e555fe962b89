//! A deterministic simulation of one relay's sans-IO path, for the stateful fuzz target
//! (`tests/fuzz/fuzz_targets/stateful.rs`) and its proptest (`tests/stateful.rs`): one harness, not two.
//!
//! It wires the production pieces exactly as the control thread does: a [`Server`] with a seeded RNG
//! and a fake clock; the control thread's own [`Executor`] executing its commands; and
//! [`WORKERS`] workers' [`Core`]s (each with its `RouteTable`), programmed by the executor through a
//! [`Plane`] that binds nothing. Client datagrams enter a worker's `Core` first; what the worker hands to
//! the control thread goes through the same bounded STUN queue into [`Executor::stun`] and
//! [`Executor::pump`]; relay sockets' final counters come back as `ToControl::RelayClosed` into
//! [`Executor::relay_closed`]; time advances through the server's own `poll_timeout` deadlines.
//!
//! The input is a byte string decoded into [`Op`]s (every byte string is a valid sequence): raw client
//! datagrams, well-formed requests with valid long-term credentials through the 401 round (Allocate,
//! Refresh incl. lifetime 0, CreatePermission, ChannelBind), Send indications, ChannelData, peer
//! datagrams to relayed addresses (relay to relay included), TCP client messages and closes, and time
//! steps beyond every lifetime, over several client 5-tuples.
//!
//! Oracle ([`run`]): no panic and no hang; every counter monotone; what the workers' stats say was
//! relayed is what the cores' forwards billed; and once every allocation has ended (deleted, or
//! expired after time passes every lifetime) and every connection closed, every table is empty (the
//! server's, the executor's, every route table and the live relay-port set), every port is free, and
//! each allocation's final usage record and relay counters equal exactly what was relayed for it.
//!
//! Not part of the relay: `#[doc(hidden)]`, for tests only. May use: wire, auth, route, policy, budget,
//! server, dataplane, control, metrics.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::auth::long_term_key_md5;
use crate::control::exec::{Executor, Plane};
use crate::control::{UsageRecord, CONTROL_QUEUE, CONTROL_QUEUE_BYTES};
use crate::dataplane::{
    Action, ControlTx, Core, Direction, Drop, StunQueue, ToControl, WorkerStats, HEADROOM,
    MAX_DATAGRAM, SLOT,
};
use crate::route::{AllocationId, ClientKey, Counters, RelayId, RouteUpdate};
use crate::server::{Config, FiveTuple, Server, Stats, Transport};
use crate::wire::{Attribute, Class, Message, MessageType, MessageWriter, Method, TransactionId};

/// Workers (each a `Core` with its route table); a client's datagrams always reach the same one, as
/// with SO_REUSEPORT.
pub const WORKERS: usize = 2;
/// Client 5-tuples: the first [`UDP_CLIENTS`] on the UDP listener, the rest on the TCP listener.
pub const CLIENTS: usize = 6;
const UDP_CLIENTS: usize = 4;
/// Operations decoded from one input at most (bounds a run).
pub const MAX_OPS: usize = 256;

const REALM: &str = "turnpike";
const USERS: [(&str, &str); 2] = [("alice", "alice-pass"), ("bob", "bob-pass")];
const RELAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 114, 10);
const RELAY_V6: Ipv6Addr = Ipv6Addr::new(0x2a02, 1, 0, 0, 0, 0, 0, 0x10);
/// A small port range, so that running out of ports is reachable.
const RELAY_PORTS: std::ops::RangeInclusive<u16> = 50000..=50015;
const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 3478);
/// Unix time at the start of a run.
const UNIX0: u64 = 1_800_000_000;
/// Longer than every lifetime, cooldown and nonce of [`config`] together.
const PAST_EVERYTHING: Duration = Duration::from_secs(4 * 3600);
/// Timer deadlines handled in one time step at most (a bound, so that a timer that never expires is
/// a failure, not a hang).
const MAX_DEADLINES: usize = 100_000;

/// The server configuration of a simulation: static users, two relay IPs (IPv4 and IPv6) with a
/// small port range, small quotas (so that their refusals are reachable), no challenge rate limit
/// (so that the fuzzer's 401 rounds are never refused).
pub fn config() -> Config {
    Config {
        realm: REALM.into(),
        users: USERS
            .iter()
            .map(|(u, p)| ((*u).into(), (*p).into()))
            .collect(),
        relay_ips: vec![IpAddr::V4(RELAY_V4), IpAddr::V6(RELAY_V6)],
        relay_ports: RELAY_PORTS,
        max_allocations: 5,
        max_allocations_per_user: 3,
        max_permissions_per_allocation: 4,
        max_channels_per_allocation: 3,
        max_permissions_per_identity: 6,
        max_channels_per_identity: 4,
        challenge_rate: 0,
        ..Config::default()
    }
}

/// Peers the operations name (besides the live relayed addresses): public ones, and ones the policy
/// denies (loopback, private, the relay's own IP outside and inside its port range).
const PEERS: [SocketAddr; 8] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 4, 4)), 6000),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 4, 4)), 6001),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)), 53),
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888)),
        443,
    ),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5000),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80),
    SocketAddr::new(IpAddr::V4(RELAY_V4), 3478),
    SocketAddr::new(IpAddr::V4(RELAY_V4), 50001),
];

/// One step of a simulation. Indexes (client, peer, relay) are taken modulo what exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Arbitrary bytes from a client.
    Raw {
        /// The client.
        client: u8,
        /// The datagram (or stream message).
        bytes: Vec<u8>,
    },
    /// An Allocate (with the 401 round first when the client has no nonce yet).
    Allocate {
        /// The client.
        client: u8,
        /// Whose credentials (see [`Creds`]).
        user: u8,
        /// Bits: LIFETIME, IPv6 family, dual (ADDITIONAL-ADDRESS-FAMILY), EVEN-PORT with R,
        /// RESERVATION-TOKEN, DONT-FRAGMENT, FINGERPRINT, TCP transport (refused).
        flags: u8,
        /// The LIFETIME asked for (see [`lifetime`]).
        lifetime: u8,
    },
    /// A Refresh, LIFETIME chosen by [`lifetime`] (one of them 0: delete).
    Refresh {
        /// The client.
        client: u8,
        /// Whose credentials.
        user: u8,
        /// The LIFETIME asked for.
        lifetime: u8,
    },
    /// A CreatePermission for one or two peers.
    Permit {
        /// The client.
        client: u8,
        /// Whose credentials.
        user: u8,
        /// The peer.
        peer: u8,
        /// A second peer (0: none).
        second: u8,
    },
    /// A ChannelBind.
    Bind {
        /// The client.
        client: u8,
        /// Whose credentials.
        user: u8,
        /// The channel (see [`channel`]).
        channel: u8,
        /// The peer.
        peer: u8,
    },
    /// A Send indication of `len` bytes.
    Send {
        /// The client.
        client: u8,
        /// The peer.
        peer: u8,
        /// Payload length.
        len: u8,
    },
    /// ChannelData of `len` bytes.
    ChannelData {
        /// The client.
        client: u8,
        /// The channel (see [`channel`]).
        channel: u8,
        /// Payload length.
        len: u8,
    },
    /// A datagram from a peer to a relayed address (one that was ever allocated).
    Peer {
        /// The relayed address.
        relay: u8,
        /// The peer it comes from.
        peer: u8,
        /// The payload, arbitrary.
        bytes: Vec<u8>,
    },
    /// Time passes by `secs` seconds (× 16 when `secs` > 200, reaching past every lifetime).
    Advance {
        /// The step.
        secs: u8,
    },
    /// A TCP client's connection closes.
    Close {
        /// The client (a UDP one: nothing happens).
        client: u8,
    },
    /// The client sends its last request again (same transaction id, same bytes).
    Retransmit {
        /// The client.
        client: u8,
    },
}

/// Credentials an operation of client `c` signs with: `user % 8` is 0–4 the client's own user
/// (alice for even clients, bob for odd ones), 5 the other user, 6 its own user with a wrong password,
/// 7 none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creds {
    /// Static user `USERS[i]`, or with a wrong password.
    User(usize, bool),
    /// No credentials.
    None,
}

impl Creds {
    /// The credentials `user` chooses for client `c`.
    pub fn of(c: usize, user: u8) -> Self {
        let own = c % USERS.len();
        match user % 8 {
            0..=4 => Creds::User(own, true),
            5 => Creds::User(own ^ 1, true),
            6 => Creds::User(own, false),
            _ => Creds::None,
        }
    }
}

/// The LIFETIME `choice` asks for: none, 0, 30 s, the default, above the maximum, `u32::MAX`.
pub fn lifetime(choice: u8) -> Option<u32> {
    match choice % 6 {
        0 => None,
        1 => Some(0),
        2 => Some(30),
        3 => Some(600),
        4 => Some(4000),
        _ => Some(u32::MAX),
    }
}

/// The channel number `choice` names: mostly 0x4000–0x4003, sometimes out of range.
pub fn channel(choice: u8) -> u16 {
    match choice % 8 {
        6 => 0x3FFF,
        7 => 0x4FFF + u16::from(choice >> 7),
        n => 0x4000 + u16::from(n % 4),
    }
}

/// The operations `data` encodes (at most [`MAX_OPS`]); every byte string decodes.
pub fn decode(data: &[u8]) -> Vec<Op> {
    let mut r = Reader(data);
    let mut ops = Vec::new();
    while !r.0.is_empty() && ops.len() < MAX_OPS {
        let op = match r.u8() % 16 {
            0 => {
                let client = r.u8();
                let n = usize::from(r.u8()) * 4;
                Op::Raw {
                    client,
                    bytes: r.take(n).to_vec(),
                }
            }
            1..=3 => Op::Allocate {
                client: r.u8(),
                user: r.u8(),
                flags: r.u8(),
                lifetime: r.u8(),
            },
            4 => Op::Refresh {
                client: r.u8(),
                user: r.u8(),
                lifetime: r.u8(),
            },
            5 | 6 => Op::Permit {
                client: r.u8(),
                user: r.u8(),
                peer: r.u8(),
                second: r.u8(),
            },
            7 => Op::Bind {
                client: r.u8(),
                user: r.u8(),
                channel: r.u8(),
                peer: r.u8(),
            },
            8 => Op::Send {
                client: r.u8(),
                peer: r.u8(),
                len: r.u8(),
            },
            9 => Op::ChannelData {
                client: r.u8(),
                channel: r.u8(),
                len: r.u8(),
            },
            10 | 11 => {
                let relay = r.u8();
                let peer = r.u8();
                let n = usize::from(r.u8());
                Op::Peer {
                    relay,
                    peer,
                    bytes: r.take(n).to_vec(),
                }
            }
            12 | 13 => Op::Advance { secs: r.u8() },
            14 => Op::Close { client: r.u8() },
            _ => Op::Retransmit { client: r.u8() },
        };
        ops.push(op);
    }
    ops
}

/// How deep a run went (for tests that check the harness reaches the states it claims to).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Allocations that became active.
    pub allocations: u64,
    /// The most channel routes the workers' tables held at once.
    pub peak_channels: usize,
    /// The most permissions the workers' tables held at once.
    pub peak_permissions: usize,
    /// What was relayed, both ways.
    pub relayed: Counters,
    /// Datagrams relayed from one of our relay sockets to another (relay to relay).
    pub relay_to_relay: u64,
}

/// Run `ops`, then end everything (`delete`: each client first deletes its allocation with a
/// Refresh of lifetime 0; otherwise they expire), and check the oracle (see the module doc). Panics on
/// a violation.
pub fn run(ops: &[Op], delete: bool) -> Summary {
    let mut sim = Sim::new();
    for op in ops {
        sim.step(op);
        sim.check();
    }
    sim.finish(delete)
}

/// [`run`] over [`decode`]: the first byte's low bit chooses `delete`.
pub fn run_bytes(data: &[u8]) -> Summary {
    let delete = data.first().is_some_and(|b| b & 1 == 1);
    run(&decode(data.get(1..).unwrap_or_default()), delete)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// The simulation's [`Plane`]: every relay socket binds; route updates go to the worker's `Core`;
/// replies are kept for the simulated clients to read.
struct Workers {
    cores: Vec<Core>,
    /// Every relayed address ever opened, in order (peers send to them; closed ones receive nothing).
    relays: Vec<SocketAddr>,
    /// Replies to clients since the last look.
    replies: Vec<(FiveTuple, Vec<u8>)>,
    /// Relay id → its address, from the AddRelay updates (a worker's table does not keep it).
    addrs: HashMap<RelayId, SocketAddr>,
}

impl Plane for Workers {
    type Socket = ();

    fn bind_relay(&mut self, _: SocketAddr, _: bool) -> std::io::Result<()> {
        Ok(())
    }

    fn add_relay(&mut self, worker: usize, (): (), update: RouteUpdate) {
        if let RouteUpdate::AddRelay { id, addr, .. } = update {
            self.addrs.insert(id, addr);
            if !self.relays.contains(&addr) {
                self.relays.push(addr);
            }
        }
        self.route(worker, update);
    }

    fn route(&mut self, worker: usize, update: RouteUpdate) -> Option<AllocationId> {
        self.cores
            .get_mut(worker)
            .expect("the executor names a worker that exists")
            .apply(update);
        None
    }

    fn reply_udp(&mut self, _: usize, _: usize, to: FiveTuple, payload: &[u8]) {
        self.replies.push((to, payload.to_vec()));
    }

    fn reply_stream(&mut self, _: usize, client: ClientKey, payload: &[u8]) -> bool {
        let to = FiveTuple {
            client: client.client,
            server: LISTEN,
            transport: Transport::Tcp,
        };
        self.replies.push((to, payload.to_vec()));
        true
    }
}

/// A simulated client's knowledge.
#[derive(Debug, Default, Clone)]
struct ClientState {
    nonce: Option<String>,
    last_request: Option<Vec<u8>>,
    /// The last RESERVATION-TOKEN it was given.
    token: Option<u64>,
    /// Whether it ever talked on its TCP connection (which is then open until closed).
    connected: bool,
}

/// The simulated relay (see the module doc).
struct Sim {
    server: Server<StdRng>,
    exec: Executor<Workers>,
    from_workers: Receiver<ToControl>,
    stun_queue: Arc<StunQueue>,
    usage: Receiver<UsageRecord>,
    stats: Vec<Arc<WorkerStats>>,
    start: Instant,
    now: Instant,
    tid: u64,
    clients: Vec<ClientState>,
    slot: Vec<u8>,
    /// What the cores' forwards billed per allocation (credited with `Core::sent`).
    billed: HashMap<AllocationId, Counters>,
    /// Final counters of closed relay sockets, per allocation, as the workers reported them.
    closed: HashMap<AllocationId, Counters>,
    /// The counters last seen, to check they never go down.
    last: Vec<u64>,
    summary: Summary,
}

impl Sim {
    fn new() -> Self {
        // As `control::start`: the server and each worker hold a shard of the budget.
        let config = Config {
            challenge_shards: crate::control::budget_shards(WORKERS),
            ..config()
        };
        let range = config.channel_range;
        let server = Server::new(config, StdRng::seed_from_u64(7)).expect("a valid config");
        let (tx, from_workers) = crossbeam_channel::unbounded();
        let stun_queue = Arc::new(StunQueue::new(CONTROL_QUEUE, CONTROL_QUEUE_BYTES));
        let stats: Vec<Arc<WorkerStats>> = (0..WORKERS).map(|_| Arc::default()).collect();
        let cores = stats
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let to_control = ControlTx::new(tx.clone(), stun_queue.clone());
                let own = server.own_addresses().clone();
                // As `control::start` without `binding_requires_auth`: the worker answers Binding.
                // Its 401s stay with the server here: the worker's nonce expiry reads the real
                // clock, the sim's server a fake one.
                let answers = crate::dataplane::Answers {
                    binding: true,
                    challenger: None,
                };
                Core::new(k, to_control, s.clone(), range, own)
                    .answer_unauthenticated(server.budget_shard([k as u64, 1]), answers)
            })
            .collect();
        let plane = Workers {
            cores,
            relays: Vec::new(),
            replies: Vec::new(),
            addrs: HashMap::new(),
        };
        let (sink, usage): (Sender<UsageRecord>, _) = crossbeam_channel::unbounded();
        let listeners = vec![(LISTEN, Transport::Udp), (LISTEN, Transport::Tcp)];
        let now = Instant::now();
        Sim {
            server,
            exec: Executor::new(plane, listeners, Some(sink)),
            from_workers,
            stun_queue,
            usage,
            stats,
            start: now,
            now,
            tid: 0,
            clients: vec![ClientState::default(); CLIENTS],
            slot: vec![0; SLOT],
            billed: HashMap::new(),
            closed: HashMap::new(),
            last: Vec::new(),
            summary: Summary::default(),
        }
    }

    fn unix(&self) -> u64 {
        UNIX0 + (self.now - self.start).as_secs()
    }

    /// Client `i`'s 5-tuple.
    fn five(i: usize) -> FiveTuple {
        let (ip, transport) = if i < UDP_CLIENTS {
            (Ipv4Addr::new(198, 51, 100, 7), Transport::Udp)
        } else {
            (Ipv4Addr::new(198, 51, 100, 8), Transport::Tcp)
        };
        FiveTuple {
            client: SocketAddr::new(IpAddr::V4(ip), 40000 + i as u16),
            server: LISTEN,
            transport,
        }
    }

    fn peer(&self, choice: u8) -> SocketAddr {
        let i = usize::from(choice) % (PEERS.len() + self.exec.plane.relays.len());
        PEERS
            .get(i)
            .copied()
            .unwrap_or_else(|| self.exec.plane.relays[i - PEERS.len()])
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Raw { client, ref bytes } => self.client(usize::from(client) % CLIENTS, bytes),
            Op::Allocate {
                client,
                user,
                flags,
                lifetime: l,
            } => {
                let c = usize::from(client) % CLIENTS;
                let mut attrs = vec![Attribute::RequestedTransport(if flags & 0x80 != 0 {
                    6
                } else {
                    17
                })];
                if flags & 0x01 != 0 {
                    attrs.extend(lifetime(l).map(Attribute::Lifetime));
                }
                if flags & 0x02 != 0 {
                    attrs.push(Attribute::RequestedAddressFamily(2));
                }
                if flags & 0x04 != 0 {
                    attrs.push(Attribute::AdditionalAddressFamily(2));
                }
                if flags & 0x08 != 0 {
                    attrs.push(Attribute::EvenPort(true));
                }
                if flags & 0x10 != 0 {
                    let token = self.clients[c].token.unwrap_or(u64::from(l));
                    attrs.push(Attribute::ReservationToken(token));
                }
                if flags & 0x20 != 0 {
                    attrs.push(Attribute::DontFragment);
                }
                self.request(
                    c,
                    Method::ALLOCATE,
                    &attrs,
                    Creds::of(c, user),
                    flags & 0x40 != 0,
                );
            }
            Op::Refresh {
                client,
                user,
                lifetime: l,
            } => {
                let attrs: Vec<Attribute<'_>> =
                    lifetime(l).map(Attribute::Lifetime).into_iter().collect();
                let c = usize::from(client) % CLIENTS;
                self.request(c, Method::REFRESH, &attrs, Creds::of(c, user), false);
            }
            Op::Permit {
                client,
                user,
                peer,
                second,
            } => {
                let mut attrs = vec![Attribute::XorPeerAddress(self.peer(peer))];
                if second != 0 {
                    attrs.push(Attribute::XorPeerAddress(self.peer(second)));
                }
                let c = usize::from(client) % CLIENTS;
                self.request(
                    c,
                    Method::CREATE_PERMISSION,
                    &attrs,
                    Creds::of(c, user),
                    false,
                );
            }
            Op::Bind {
                client,
                user,
                channel: ch,
                peer,
            } => {
                let attrs = [
                    Attribute::ChannelNumber(channel(ch)),
                    Attribute::XorPeerAddress(self.peer(peer)),
                ];
                let c = usize::from(client) % CLIENTS;
                self.request(c, Method::CHANNEL_BIND, &attrs, Creds::of(c, user), false);
            }
            Op::Send { client, peer, len } => {
                let data = vec![len; usize::from(len)];
                let attrs = [
                    Attribute::XorPeerAddress(self.peer(peer)),
                    Attribute::Data(&data),
                ];
                self.tid += 1;
                if let Some(bytes) = build(
                    self.tid,
                    Method::SEND,
                    Class::Indication,
                    &attrs,
                    None,
                    false,
                ) {
                    self.client(usize::from(client) % CLIENTS, &bytes);
                }
            }
            Op::ChannelData {
                client,
                channel: ch,
                len,
            } => {
                let c = usize::from(client) % CLIENTS;
                let mut bytes = channel(ch).to_be_bytes().to_vec();
                bytes.extend_from_slice(&u16::from(len).to_be_bytes());
                bytes.resize(4 + usize::from(len), len);
                if Self::five(c).transport.is_stream() {
                    // Stream ChannelData is padded to 4 bytes (RFC 8656 §12.5).
                    bytes.resize(bytes.len().next_multiple_of(4), 0);
                }
                self.client(c, &bytes);
            }
            Op::Peer {
                relay,
                peer,
                ref bytes,
            } => {
                let relays = &self.exec.plane.relays;
                if relays.is_empty() {
                    return;
                }
                let to = relays[usize::from(relay) % relays.len()];
                let from = self.peer(peer);
                self.peer_datagram(to, from, bytes);
            }
            Op::Advance { secs } => {
                let secs = if secs > 200 {
                    u64::from(secs) * 16
                } else {
                    u64::from(secs)
                };
                self.advance(Duration::from_secs(secs));
            }
            Op::Close { client } => self.close(usize::from(client) % CLIENTS),
            Op::Retransmit { client } => {
                let c = usize::from(client) % CLIENTS;
                if let Some(bytes) = self.clients[c].last_request.clone() {
                    self.client(c, &bytes);
                }
            }
        }
    }

    /// A signed (or unsigned) request from client `c`, with the nonce it knows.
    fn request(
        &mut self,
        c: usize,
        method: Method,
        attrs: &[Attribute<'_>],
        creds: Creds,
        fingerprint: bool,
    ) {
        if creds != Creds::None && self.clients[c].nonce.is_none() {
            // The 401 round first: the same request unsigned, whose challenge brings the nonce.
            self.request(c, method, attrs, Creds::None, fingerprint);
        }
        self.tid += 1;
        let nonce = self.clients[c].nonce.clone();
        let signer = match (creds, nonce.as_deref()) {
            (Creds::User(i, right), Some(nonce)) => {
                let (user, password) = USERS[i % USERS.len()];
                let password = if right { password } else { "wrong" };
                Some((user, nonce, long_term_key_md5(user, REALM, password)))
            }
            _ => None,
        };
        let signer = signer.as_ref().map(|(u, n, k)| (*u, *n, &k[..]));
        let Some(bytes) = build(self.tid, method, Class::Request, attrs, signer, fingerprint)
        else {
            return;
        };
        self.clients[c].last_request = Some(bytes.clone());
        self.client(c, &bytes);
    }

    /// A datagram (UDP) or a whole message (TCP) from client `c`, into its worker's `Core`.
    fn client(&mut self, c: usize, bytes: &[u8]) {
        let five = Self::five(c);
        let worker = c % WORKERS;
        let len = bytes.len().min(MAX_DATAGRAM);
        self.slot[HEADROOM..HEADROOM + len].copy_from_slice(&bytes[..len]);
        let core = &mut self.exec.plane.cores[worker];
        let action = if five.transport.is_stream() {
            self.clients[c].connected = true;
            core.on_stream_client(1, five.client, &mut self.slot, len)
        } else {
            core.on_client(0, five.client, &mut self.slot, len)
        };
        self.forwarded(worker, action);
        self.drain();
    }

    /// A datagram from `from` to the relayed address `to`: into the `Core` of the worker owning that
    /// relay socket, if it is open.
    fn peer_datagram(&mut self, to: SocketAddr, from: SocketAddr, payload: &[u8]) {
        let Some((worker, id)) = self.exec.relay(to) else {
            return;
        };
        let len = payload.len().min(MAX_DATAGRAM);
        self.slot[HEADROOM..HEADROOM + len].copy_from_slice(&payload[..len]);
        let action = self.exec.plane.cores[worker].on_peer(id, from, &mut self.slot, len);
        self.forwarded(worker, action);
        self.drain();
    }

    /// What a worker does with a forward: bill it once sent; a datagram to one of our own live relayed
    /// addresses (relay to relay) then arrives there.
    fn forwarded(&mut self, worker: usize, action: Action) {
        let Action::Forward(f) = action else {
            return;
        };
        let bytes = self
            .slot
            .get(f.range.clone())
            .expect("a forward lies within its slot")
            .to_vec();
        let from = self.exec.plane.addrs.get(&f.bill.relay).copied();
        let core = &mut self.exec.plane.cores[worker];
        let mut relay_to_relay = None;
        if f.bill.dir != Direction::Answer {
            let relay = core
                .table()
                .relay(f.bill.relay)
                .expect("a forward's bill names a live relay socket");
            let billed = self.billed.entry(relay.allocation).or_default();
            let n = u64::from(f.bill.payload);
            if f.bill.dir == Direction::ToPeer {
                billed.to_peer_bytes += n;
                billed.to_peer_packets += 1;
                relay_to_relay = Some((from.expect("every live relay was added"), f.dst));
            } else {
                billed.to_client_bytes += n;
                billed.to_client_packets += 1;
            }
        }
        core.sent(f.bill);
        if let Some((from, to)) = relay_to_relay {
            if self.exec.relay(to).is_some() {
                self.summary.relay_to_relay += 1;
                self.peer_datagram(to, from, &bytes);
            }
        }
    }

    /// The control thread's loop body for everything the workers queued, then the replies the clients
    /// read (nonces, reservation tokens).
    fn drain(&mut self) {
        while let Ok(msg) = self.from_workers.try_recv() {
            match msg {
                ToControl::Stun {
                    worker,
                    listener,
                    client,
                    bytes,
                } => {
                    self.stun_queue.taken(bytes.len());
                    let (now, unix) = (self.now, self.unix());
                    self.exec.stun(
                        &mut self.server,
                        now,
                        unix,
                        worker,
                        listener,
                        client,
                        &bytes,
                    );
                }
                ToControl::StreamClosed { listener, client } => {
                    self.exec
                        .stream_closed(&mut self.server, self.now, listener, client);
                }
                ToControl::RelayClosed {
                    allocation,
                    counters,
                } => {
                    self.closed.entry(allocation).or_default().add(counters);
                    self.exec.relay_closed(allocation, counters);
                }
                other => panic!("the sim asked for no {other:?}"),
            }
            self.exec.pump(&mut self.server, self.now);
        }
        for (to, bytes) in std::mem::take(&mut self.exec.plane.replies) {
            let Some(c) = (0..CLIENTS).find(|&c| Self::five(c) == to) else {
                panic!("a reply to {to:?}, who sent nothing");
            };
            let msg = Message::parse(&bytes).expect("the server's replies parse");
            if let Some(nonce) = msg.attrs.nonce {
                self.clients[c].nonce = Some(nonce.to_string());
            }
            if let Some(token) = msg.attrs.reservation_token {
                self.clients[c].token = Some(token);
            }
        }
    }

    /// Client `c`'s TCP connection closes (as its worker reports it).
    fn close(&mut self, c: usize) {
        let five = Self::five(c);
        if !five.transport.is_stream() || !std::mem::take(&mut self.clients[c].connected) {
            return;
        }
        self.exec.plane.cores[c % WORKERS].stream_closed(ClientKey {
            client: five.client,
            listener: 1,
        });
        self.clients[c].nonce = None;
        self.drain();
    }

    /// Time passes by `d`, through every timer deadline on the way, as the control thread wakes.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        for _ in 0..MAX_DEADLINES {
            match self.server.poll_timeout() {
                Some(at) if at <= target => {
                    self.now = self.now.max(at);
                    self.server.handle_timeout(self.now);
                    self.exec.pump(&mut self.server, self.now);
                    self.drain();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("timers do not expire: {MAX_DEADLINES} deadlines within {d:?}");
    }

    /// Every counter, in a fixed order.
    fn counters(&self) -> Vec<u64> {
        let s: Stats = self.server.stats();
        let mut v = vec![
            s.malformed,
            s.unexpected_class,
            s.outbox_overflow,
            s.challenges,
            s.auth_failures,
            s.retransmits,
            s.rate_limited,
            s.amplification_refused,
            s.stale_nonces,
            s.revoked,
            s.allocations_created,
        ];
        v.extend(s.allocate_errors);
        for w in &self.stats {
            let r = w.relayed();
            v.extend([w.rx(), w.tx(), w.bindings()]);
            v.extend([
                r.to_peer_bytes,
                r.to_peer_packets,
                r.to_client_bytes,
                r.to_client_packets,
            ]);
            v.extend(Drop::ALL.iter().map(|d| w.drops(*d)));
        }
        v
    }

    /// The oracle after each step: counters never go down, and what the workers' stats say was relayed
    /// is what their forwards billed.
    fn check(&mut self) {
        let now = self.counters();
        for (i, (a, b)) in self.last.iter().zip(&now).enumerate() {
            assert!(b >= a, "counter {i} went down: {a} → {b}");
        }
        self.last = now;
        let mut relayed = Counters::default();
        for w in &self.stats {
            relayed.add(w.relayed());
        }
        let billed = billed_total(&self.billed);
        assert_eq!(
            relayed, billed,
            "the workers' relayed totals are what was billed"
        );
        assert!(self.server.allocation_count() <= self.server.max_allocations());
        let tables = self.exec.plane.cores.iter().map(Core::table);
        let (channels, permissions) = tables.fold((0, 0), |(c, p), t| {
            let perms: usize = t.relays().map(|r| r.permissions.len()).sum();
            (c + t.channel_count(), p + perms)
        });
        let s = &mut self.summary;
        s.peak_channels = s.peak_channels.max(channels);
        s.peak_permissions = s.peak_permissions.max(permissions);
    }

    /// End everything and check that nothing is left (see the module doc).
    fn finish(mut self, delete: bool) -> Summary {
        if delete {
            for c in 0..CLIENTS {
                let attrs = [Attribute::Lifetime(0)];
                self.request(c, Method::REFRESH, &attrs, Creds::of(c, 0), false);
            }
            self.check();
        }
        for c in 0..CLIENTS {
            self.close(c);
        }
        self.advance(PAST_EVERYTHING);
        self.check();
        let mut sizes: Vec<(&str, usize)> = Vec::new();
        sizes.extend(self.server.state_sizes());
        sizes.extend(self.exec.state_sizes());
        for (k, core) in self.exec.plane.cores.iter().enumerate() {
            let t = core.table();
            sizes.push((["worker0.relays", "worker1.relays"][k], t.relay_count()));
            sizes.push((
                ["worker0.channels", "worker1.channels"][k],
                t.channel_count(),
            ));
            sizes.push((["worker0.clients", "worker1.clients"][k], t.client_count()));
        }
        sizes.push(("own.live", self.server.own_addresses().live_count()));
        let left: Vec<_> = sizes.iter().filter(|(_, n)| *n != 0).collect();
        assert!(
            left.is_empty(),
            "state left after every allocation ended: {left:?}"
        );
        let ports = 2 * RELAY_PORTS.len();
        assert_eq!(
            self.server.free_ports(),
            ports,
            "every relay port is free again"
        );
        assert_eq!(self.server.identity_count(), 0);

        // Accounting: each allocation's relay sockets reported exactly what was billed for it, and its
        // one final usage record says the same.
        let mut records: HashMap<AllocationId, Counters> = HashMap::new();
        for r in self.usage.try_iter() {
            assert!(r.done, "no checkpoints were asked for: {r:?}");
            let first = records.insert(AllocationId(r.allocation), r.usage);
            assert!(first.is_none(), "two final records for {}", r.allocation);
        }
        for (allocation, billed) in &self.billed {
            assert_eq!(
                self.closed.get(allocation),
                Some(billed),
                "{allocation:?}: relay counters"
            );
            assert_eq!(
                records.get(allocation),
                Some(billed),
                "{allocation:?}: usage record"
            );
        }
        for (allocation, usage) in &records {
            let billed = self.billed.get(allocation).copied().unwrap_or_default();
            assert_eq!(*usage, billed, "{allocation:?}: usage record");
        }
        assert_eq!(
            records.len(),
            self.closed.len(),
            "one final record per allocation with relays"
        );
        self.summary.allocations = self.server.stats().allocations_created;
        self.summary.relayed = billed_total(&self.billed);
        self.summary
    }
}

fn billed_total(billed: &HashMap<AllocationId, Counters>) -> Counters {
    let mut total = Counters::default();
    for b in billed.values() {
        total.add(*b);
    }
    total
}

/// A STUN message from the simulated client, signed when `signer` is (user, nonce, key).
fn build(
    tid: u64,
    method: Method,
    class: Class,
    attrs: &[Attribute<'_>],
    signer: Option<(&str, &str, &[u8])>,
    fingerprint: bool,
) -> Option<Vec<u8>> {
    let mut t = [0u8; 12];
    t[4..].copy_from_slice(&tid.to_be_bytes());
    let mut buf = vec![0u8; 1500];
    let mut w =
        MessageWriter::new(&mut buf, MessageType::new(method, class), TransactionId(t)).ok()?;
    for a in attrs {
        w.add(a).ok()?;
    }
    if let Some((user, nonce, key)) = signer {
        w.add(&Attribute::Username(user)).ok()?;
        w.add(&Attribute::Realm(REALM)).ok()?;
        w.add(&Attribute::Nonce(nonce)).ok()?;
        w.add_integrity(key).ok()?;
    }
    if fingerprint {
        w.add_fingerprint().ok()?;
    }
    let n = w.finish();
    buf.truncate(n);
    Some(buf)
}
