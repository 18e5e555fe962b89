//! Executing the server's output, written once: every command (relay sockets, route updates, usage
//! bookkeeping) before every transmit of the same step, so that the route a response announces is
//! installed in the worker before the client can use it.
//!
//! [`Executor`] holds what the control thread knows about the data plane (which worker owns which
//! relay socket and client, the pending usage of each allocation) and reaches the outside only through
//! a [`Plane`]: the control thread's binds sockets and sends to the workers' mailboxes; the scenario
//! harness's (`control/tests.rs`) applies the same updates to a worker's `Core` in the test. Both call
//! [`Executor::stun`], [`Executor::pump`] and [`Executor::relay_closed`]: there is no second copy.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use crossbeam_channel::Sender;
use hashbrown::{DefaultHashBuilder, HashTable};
use rand::RngCore;

use super::UsageRecord;
use crate::clock::unix_ms;
use crate::route::{
    AllocationId, ClientKey, Counters, ListenerId, PackedAddr, RelayId, RouteUpdate,
};
use crate::server::{Command, EndReason, FiveTuple, Server, Transport};

/// The outside world of the command executor: relay sockets and the workers.
pub trait Plane {
    /// A bound relay socket.
    type Socket;
    /// Bind a relay socket at `addr`.
    fn bind_relay(&mut self, addr: SocketAddr, dont_fragment: bool) -> io::Result<Self::Socket>;
    /// Hand `worker` a new relay socket with the table entry that routes it.
    fn add_relay(&mut self, worker: usize, socket: Self::Socket, update: RouteUpdate);
    /// Send `worker` a change to its route table. Every table change after a relay's creation leaves
    /// the control thread here (the kernel fast path that mirrors the tables is programmed here).
    /// `Some(allocation)` when a removed relay was metered outside the worker (XDP) too: those
    /// counters come later, through [`Executor::meter_settled`], and the allocation's final usage
    /// record waits for them.
    fn route(&mut self, worker: usize, update: RouteUpdate) -> Option<AllocationId>;
    /// What a fast path outside the worker (XDP) relayed so far for `worker`'s live relays of
    /// `allocation` (metering checkpoints).
    fn fast_path_live(&self, _worker: usize, _allocation: AllocationId) -> Counters {
        Counters::default()
    }
    /// Send `payload` to the UDP client `to` from listener `listener`, preferably through `worker`'s
    /// socket (it owns the flow).
    fn reply_udp(&mut self, worker: usize, listener: usize, to: FiveTuple, payload: &[u8]);
    /// Queue `payload` for the stream client `client` on `worker`; false if that could not be queued
    /// (its mailbox was full).
    fn reply_stream(&mut self, worker: usize, client: ClientKey, payload: &[u8]) -> bool;
}

/// The control thread's command execution and the state it keeps (see the module doc).
#[derive(Debug)]
pub struct Executor<P> {
    /// Sockets and workers.
    pub plane: P,
    /// Every listener by id: UDP first, then TCP, then TLS.
    pub(crate) listeners: Vec<(SocketAddr, Transport)>,
    /// TCP/TLS connection → the worker that owns it.
    stream_owners: HashMap<ClientKey, usize>,
    /// relay address → (worker, slot).
    relays: HashMap<SocketAddr, (u32, RelayId)>,
    /// Allocation client → owning worker ([`PendingUsage::worker`]): ids hashed by their pending
    /// usage's client, which is stored once, there.
    owners: HashTable<AllocationId>,
    /// Hashes `owners`' clients.
    hasher: DefaultHashBuilder,
    next_relay: u32,
    /// The worker whose STUN copy is being handled (new relay sockets go to it).
    current_worker: usize,
    /// Usage of allocations until both the server's end report and every relay's final counters are in.
    /// Boxed: the map's spare buckets then cost a pointer each.
    pub(crate) usage: HashMap<AllocationId, Box<PendingUsage>>,
    pub(crate) usage_sink: Option<Sender<UsageRecord>>,
    /// Installed permissions and channels (for metrics).
    pub(crate) permissions: u64,
    pub(crate) channels: u64,
    /// Replies to stream clients dropped because the owning worker's mailbox was full.
    pub(crate) mailbox_full: u64,
}

/// An allocation's usage being assembled from the server's report and its relay sockets' counters.
#[derive(Debug, Default)]
pub(crate) struct PendingUsage {
    pub(crate) client: Option<FiveTuple>,
    /// The worker that owns its relay sockets (and its client's flow).
    pub(crate) worker: u32,
    /// The first relayed transport address (for abuse look-ups in the ledger).
    pub(crate) relayed: Option<PackedAddr>,
    pub(crate) identity: Option<Box<str>>,
    /// When its first relay socket opened (Unix milliseconds).
    pub(crate) started_ms: u64,
    /// The server has ended it.
    pub(crate) ended: bool,
    /// Why (once `ended`).
    pub(crate) reason: EndReason,
    /// The final counters of its closed relay sockets.
    pub(crate) usage: Counters,
    /// Relay sockets whose final counters have not arrived.
    pub(crate) open_relays: u32,
    /// Removed relays whose fast-path (XDP) meters have not been settled.
    pub(crate) open_meters: u32,
    /// What the last checkpoint recorded (to skip unchanged ones).
    pub(crate) checkpointed: Option<Counters>,
}

impl<P: Plane> Executor<P> {
    /// An executor over `plane` for the relay's `listeners` (by id), sending final usage to `usage_sink`.
    pub fn new(
        plane: P,
        listeners: Vec<(SocketAddr, Transport)>,
        usage_sink: Option<Sender<UsageRecord>>,
    ) -> Self {
        Executor {
            plane,
            listeners,
            stream_owners: HashMap::new(),
            relays: HashMap::new(),
            owners: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            next_relay: 0,
            current_worker: 0,
            usage: HashMap::new(),
            usage_sink,
            permissions: 0,
            channels: 0,
            mailbox_full: 0,
        }
    }

    /// A STUN message that `worker` received from `client` on `listener`, into `server` (its output is
    /// executed by the [`Executor::pump`] that follows).
    #[allow(clippy::too_many_arguments)]
    pub fn stun<R: RngCore>(
        &mut self,
        server: &mut Server<R>,
        now: Instant,
        unix_now: u64,
        worker: usize,
        listener: ListenerId,
        client: SocketAddr,
        bytes: &[u8],
    ) {
        let Some((server_addr, transport)) = self.listeners.get(usize::from(listener)).copied()
        else {
            return;
        };
        self.current_worker = worker;
        if transport.is_stream() {
            self.stream_owners
                .insert(ClientKey { client, listener }, worker);
        }
        let five = FiveTuple {
            client,
            server: server_addr,
            transport,
        };
        server.handle_client_message(now, unix_now, five, bytes);
    }

    /// A stream client's connection closed.
    pub fn stream_closed<R: RngCore>(
        &mut self,
        server: &mut Server<R>,
        now: Instant,
        listener: ListenerId,
        client: SocketAddr,
    ) {
        self.stream_owners.remove(&ClientKey { client, listener });
        if let Some((server_addr, transport)) = self.listeners.get(usize::from(listener)).copied() {
            let five = FiveTuple {
                client,
                server: server_addr,
                transport,
            };
            server.handle_connection_closed(now, five);
        }
    }

    /// Execute every command, then send every transmit, until the server is quiet.
    pub fn pump<R: RngCore>(&mut self, server: &mut Server<R>, now: Instant) {
        loop {
            let mut busy = false;
            while let Some(cmd) = server.poll_command() {
                busy = true;
                self.execute(server, now, cmd);
            }
            while let Some(t) = server.poll_transmit() {
                busy = true;
                self.transmit(t.to, t.payload);
            }
            if !busy {
                return;
            }
        }
    }

    /// One transmit to the client `five`: from the worker that owns its flow.
    fn transmit(&mut self, five: FiveTuple, payload: &[u8]) {
        let Some(listener) = self
            .listeners
            .iter()
            .position(|l| *l == (five.server, five.transport))
        else {
            return;
        };
        if five.transport.is_stream() {
            let Ok(listener) = ListenerId::try_from(listener) else {
                return;
            };
            let key = ClientKey {
                client: five.client,
                listener,
            };
            if let Some(&worker) = self.stream_owners.get(&key) {
                if !self.plane.reply_stream(worker, key, payload) {
                    self.mailbox_full += 1;
                }
            }
            return;
        }
        let usage = &self.usage;
        let worker = self
            .owners
            .find(self.hasher.hash_one(five), |id| {
                usage.get(id).is_some_and(|p| p.client == Some(five))
            })
            .and_then(|id| usage.get(id))
            .map_or(self.current_worker, |p| p.worker as usize);
        self.plane.reply_udp(worker, listener, five, payload);
    }

    fn execute<R: RngCore>(&mut self, server: &mut Server<R>, now: Instant, cmd: Command) {
        match cmd {
            Command::OpenRelay {
                allocation,
                client,
                relay,
                dont_fragment,
            } => {
                let worker = self.current_worker;
                let Some(listener) = self.listener_of(client) else {
                    server.handle_relay_failed(now, allocation, relay);
                    return;
                };
                match self.plane.bind_relay(relay.0, dont_fragment) {
                    Ok(socket) => {
                        let id = RelayId(self.next_relay);
                        self.next_relay = self.next_relay.wrapping_add(1);
                        self.relays.insert(relay.0, (worker as u32, id));
                        let identity = server.allocation_identity(allocation);
                        let pending = self.usage.entry(allocation).or_default();
                        if pending.client.is_none() {
                            pending.started_ms = unix_ms();
                        }
                        pending.relayed.get_or_insert(PackedAddr::new(relay.0));
                        pending.client = Some(client);
                        // Workers are counted in the tens (one per core).
                        pending.worker = worker as u32;
                        if pending.identity.is_none() {
                            pending.identity = identity.map(Box::from);
                        }
                        pending.open_relays += 1;
                        let hash = self.hasher.hash_one(client);
                        if self.owners.find(hash, |x| *x == allocation).is_none() {
                            let (usage, hasher) = (&self.usage, &self.hasher);
                            self.owners.insert_unique(hash, allocation, |id| {
                                usage
                                    .get(id)
                                    .and_then(|p| p.client)
                                    .map_or(0, |c| hasher.hash_one(c))
                            });
                        }
                        let update = RouteUpdate::AddRelay {
                            id,
                            allocation,
                            addr: relay.0,
                            client: ClientKey {
                                client: client.client,
                                listener,
                            },
                        };
                        self.plane.add_relay(worker, socket, update);
                        server.handle_relay_opened(now, allocation, relay);
                    }
                    Err(e) => {
                        tracing::warn!(relay = %relay.0, "cannot bind relay socket: {e}");
                        server.handle_relay_failed(now, allocation, relay);
                    }
                }
            }
            Command::CloseRelay { relay, .. } => {
                if let Some((worker, id)) = self.relays.remove(&relay.0) {
                    if let Some(update) = table_update(&cmd, id) {
                        self.route(worker as usize, update);
                    }
                }
            }
            Command::InstallPermission { relay, .. }
            | Command::RemovePermission { relay, .. }
            | Command::InstallChannel { relay, .. }
            | Command::RemoveChannel { relay, .. } => {
                match cmd {
                    Command::InstallPermission { .. } => self.permissions += 1,
                    Command::RemovePermission { .. } => {
                        self.permissions = self.permissions.saturating_sub(1)
                    }
                    Command::InstallChannel { .. } => self.channels += 1,
                    _ => self.channels = self.channels.saturating_sub(1),
                }
                if let Some(&(worker, id)) = self.relays.get(&relay.0) {
                    if let Some(update) = table_update(&cmd, id) {
                        self.route(worker as usize, update);
                    }
                }
            }
            Command::AllocationEnded {
                allocation,
                identity,
                reason,
            } => {
                let pending = self.usage.entry(allocation).or_default();
                pending.identity = Some(identity);
                pending.ended = true;
                pending.reason = reason;
                if let Some(client) = pending.client {
                    if let Ok(owner) = self
                        .owners
                        .find_entry(self.hasher.hash_one(client), |x| *x == allocation)
                    {
                        owner.remove();
                    }
                }
                self.finish_usage(allocation);
            }
        }
    }

    /// Send `update` to `worker` through the plane; a closed relay metered by the plane's fast path
    /// holds its allocation's final record until [`meter_settled`](Self::meter_settled).
    fn route(&mut self, worker: usize, update: RouteUpdate) {
        if let Some(allocation) = self.plane.route(worker, update) {
            self.usage.entry(allocation).or_default().open_meters += 1;
        }
    }

    /// A closed relay's fast-path meter was read for the last time: add it to its allocation's usage.
    pub fn meter_settled(&mut self, allocation: AllocationId, c: Counters) {
        let pending = self.usage.entry(allocation).or_default();
        pending.usage.add(c);
        pending.open_meters = pending.open_meters.saturating_sub(1);
        self.finish_usage(allocation);
    }

    /// The size of every map the executor keeps per client, relay or allocation, and its installed
    /// permission and channel gauges, by name (the stateful fuzz target checks that all are zero once
    /// every allocation has ended and every connection closed).
    #[doc(hidden)]
    pub fn state_sizes(&self) -> [(&'static str, usize); 6] {
        let gauge = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        [
            ("exec.stream_owners", self.stream_owners.len()),
            ("exec.relays", self.relays.len()),
            ("exec.owners", self.owners.len()),
            ("exec.usage", self.usage.len()),
            ("exec.permissions", gauge(self.permissions)),
            ("exec.channels", gauge(self.channels)),
        ]
    }

    /// The relay socket at `addr` and the worker that owns it, while it is open.
    pub fn relay(&self, addr: SocketAddr) -> Option<(usize, RelayId)> {
        self.relays.get(&addr).map(|&(w, id)| (w as usize, id))
    }

    fn listener_of(&self, client: FiveTuple) -> Option<ListenerId> {
        self.listeners
            .iter()
            .position(|l| *l == (client.server, client.transport))
            .and_then(|i| ListenerId::try_from(i).ok())
    }

    /// A relay socket's final counters arrived from its worker.
    pub fn relay_closed(&mut self, allocation: AllocationId, c: Counters) {
        let pending = self.usage.entry(allocation).or_default();
        pending.usage.add(c);
        pending.open_relays = pending.open_relays.saturating_sub(1);
        self.finish_usage(allocation);
    }

    /// Emit an allocation's usage once the server has ended it, every relay socket has reported and
    /// every fast-path meter of its relays has settled.
    fn finish_usage(&mut self, allocation: AllocationId) {
        let done = self
            .usage
            .get(&allocation)
            .is_some_and(|p| p.ended && p.open_relays == 0 && p.open_meters == 0);
        if !done {
            return;
        }
        let Some(p) = self.usage.remove(&allocation) else {
            return;
        };
        if p.client.is_none() {
            // Never opened a relay socket (refused or failed): nothing to bill.
            return;
        }
        let record = UsageRecord {
            allocation: allocation.0,
            identity: p.identity.unwrap_or_default(),
            client: p.client,
            relayed: p.relayed.map(PackedAddr::get),
            started_ms: p.started_ms,
            at_ms: unix_ms(),
            done: true,
            end_reason: p.reason,
            usage: p.usage,
        };
        tracing::info!(
            allocation = record.allocation,
            identity = %record.identity,
            to_peer_bytes = record.usage.to_peer_bytes,
            to_peer_packets = record.usage.to_peer_packets,
            to_client_bytes = record.usage.to_client_bytes,
            to_client_packets = record.usage.to_client_packets,
            "allocation ended"
        );
        if let Some(sink) = &self.usage_sink {
            let _ = sink.send(record);
        }
    }
}

/// The change to a worker's table that `cmd` makes, once its relay socket is known to be `id` in that
/// worker: the one translation from the server's commands to route updates. `None` for commands that
/// do not change a table by themselves (OpenRelay, AllocationEnded).
pub(crate) fn table_update(cmd: &Command, id: RelayId) -> Option<RouteUpdate> {
    Some(match *cmd {
        Command::CloseRelay { .. } => RouteUpdate::RemoveRelay { id },
        Command::InstallPermission { peer, .. } => RouteUpdate::AddPermission { relay: id, peer },
        Command::RemovePermission { peer, .. } => RouteUpdate::RemovePermission { relay: id, peer },
        Command::InstallChannel { channel, peer, .. } => RouteUpdate::AddChannel {
            relay: id,
            channel,
            peer: peer.0,
        },
        Command::RemoveChannel { channel, peer, .. } => RouteUpdate::RemoveChannel {
            relay: id,
            channel,
            peer: peer.0,
        },
        Command::OpenRelay { .. } | Command::AllocationEnded { .. } => return None,
    })
}
