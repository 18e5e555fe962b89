//! The fast-path lookup tables of one worker, and the updates that change them.
//!
//! # Concurrency: one table per worker, fed by messages
//! Every worker owns its own [`RouteTable`]; no other thread ever touches it, so lookups take no lock and
//! no atomic. The control thread changes a table only by sending [`RouteUpdate`]s to the worker's mailbox;
//! the worker applies them at the top of each loop iteration, before it looks at any received datagram.
//! Because the control thread queues the updates for a request *before* it sends the response, a client
//! that reacts to the response (e.g. sends ChannelData right after ChannelBind succeeds) always finds its
//! route installed.
//!
//! A relay socket, and everything routed through it, belongs to the worker that owns the allocation's
//! client 5-tuple (the one whose SO_REUSEPORT listener the kernel hashes that client to).
//!
//! # Memory
//! A worker's state per relay socket is one [`Relay`] in one map, plus one entry in the client index.
//! Its permissions and channels are inline sets ([`SmallMap`]) sized for a typical call (one peer):
//! nothing else on the heap until an allocation has more, when they spill to hash maps (on the
//! control path: [`RouteTable::apply`]). Client ChannelData finds its peer through the client's relay
//! sockets (at most two), so there is no table-wide channel map.
//!
//! May use: wire, metrics (the counters type), hashbrown.

mod small;

use core::net::{IpAddr, SocketAddr};

use hashbrown::HashMap;

pub use crate::metrics::Counters;
pub use small::{SmallMap, SmallSet};

/// Permissions of one relay socket kept inline (more spill to the heap).
pub const INLINE_PERMISSIONS: usize = 1;
/// Channels of one relay socket kept inline (more spill to the heap).
pub const INLINE_CHANNELS: usize = 1;

/// Index of a listener within a worker (the same index in every worker: the config's `listen` order).
pub type ListenerId = u16;

/// Slot of a relay socket within its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(pub u32);

/// A channel number, always within the configured range once constructed (RFC 8656 §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    /// A channel number if `n` is in 0x4000–0x4FFF.
    pub fn new(n: u16) -> Option<Self> {
        Self::new_in(n, crate::wire::ChannelRange::Rfc8656)
    }

    /// A channel number if `n` is in `range`.
    pub fn new_in(n: u16, range: crate::wire::ChannelRange) -> Option<Self> {
        range.contains(n).then_some(ChannelNumber(n))
    }

    /// A number the server already validated when it was bound.
    pub(crate) fn bound(n: u16) -> Self {
        ChannelNumber(n)
    }

    /// The number.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// A relay or peer transport address in 19 bytes instead of a `SocketAddr`'s 32: the IP and the
/// port, without an IPv6 flow label or scope id (relay addresses come from the config, peer addresses
/// from XOR-PEER-ADDRESS, and the kernel reports received IPv6 sources with a zero flow label; only
/// link-local peers, denied by policy, carry a scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PackedAddr {
    /// An IPv4 address in the first 4 bytes when `!v6`.
    ip: [u8; 16],
    port: u16,
    v6: bool,
}

impl PackedAddr {
    /// Pack `addr` (dropping an IPv6 flow label and scope id).
    #[inline]
    pub fn new(addr: SocketAddr) -> Self {
        let mut ip = [0; 16];
        let v6 = match addr.ip() {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                ip[0] = a;
                ip[1] = b;
                ip[2] = c;
                ip[3] = d;
                false
            }
            IpAddr::V6(v6) => {
                ip = v6.octets();
                true
            }
        };
        PackedAddr {
            ip,
            port: addr.port(),
            v6,
        }
    }

    /// The address.
    #[inline]
    pub fn get(self) -> SocketAddr {
        let [a, b, c, d, ..] = self.ip;
        let ip = if self.v6 {
            IpAddr::from(self.ip)
        } else {
            IpAddr::from([a, b, c, d])
        };
        SocketAddr::new(ip, self.port)
    }

    /// Whether it is an IPv6 address.
    #[inline]
    pub fn is_ipv6(self) -> bool {
        self.v6
    }
}

/// A server-assigned allocation id: never reused within one `Server`'s life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

/// A client's 5-tuple as the data plane sees it: its address and the listener it talks to (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The client's address.
    pub client: SocketAddr,
    /// The listener.
    pub listener: ListenerId,
}

/// A change to a worker's table, sent by the control thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteUpdate {
    /// A relay socket now serves `client` for allocation `allocation` (the socket itself travels beside).
    AddRelay {
        /// Its slot.
        id: RelayId,
        /// The server's allocation id, echoed in reports.
        allocation: AllocationId,
        /// Its address.
        addr: SocketAddr,
        /// The client it serves.
        client: ClientKey,
    },
    /// The relay socket is gone; report its counters.
    RemoveRelay {
        /// Its slot.
        id: RelayId,
    },
    /// Peer IP `peer` may exchange data through relay `relay`.
    AddPermission {
        /// The relay.
        relay: RelayId,
        /// The peer IP.
        peer: IpAddr,
    },
    /// Remove that permission.
    RemovePermission {
        /// The relay.
        relay: RelayId,
        /// The peer IP.
        peer: IpAddr,
    },
    /// Bind `channel` of `client` to `peer` through `relay`.
    AddChannel {
        /// The relay.
        relay: RelayId,
        /// The channel number (0x4000–0x4FFF).
        channel: ChannelNumber,
        /// The peer transport address.
        peer: SocketAddr,
    },
    /// Remove that binding.
    RemoveChannel {
        /// The relay.
        relay: RelayId,
        /// The channel number.
        channel: ChannelNumber,
        /// The peer transport address.
        peer: SocketAddr,
    },
    /// Report every relay socket's counters to the control thread (metering checkpoints); changes
    /// nothing in the table.
    ReportCounters,
}

/// One relay socket's routing state.
#[derive(Debug)]
pub struct Relay {
    /// The allocation.
    pub allocation: AllocationId,
    /// The client it serves.
    pub client: ClientKey,
    /// Peer IPs with a permission.
    pub permissions: SmallSet<IpAddr, INLINE_PERMISSIONS>,
    /// The channels bound through this relay socket.
    pub channels: Channels,
    /// What was relayed.
    pub counters: Counters,
}

/// A relay socket's channel bindings, looked up both ways: peer → number for peer → client
/// ChannelData, number → peer for client → peer. Inline, the one list serves both (a scan of
/// [`INLINE_CHANNELS`] entries); once spilled, a map each way keeps both O(1).
#[derive(Debug)]
pub enum Channels {
    /// Up to [`INLINE_CHANNELS`] bindings.
    Inline([Option<(PackedAddr, ChannelNumber)>; INLINE_CHANNELS]),
    /// More (a spilled set stays spilled).
    Spilled(Box<SpilledChannels>),
}

/// The maps of a [`Channels`] with more than [`INLINE_CHANNELS`] bindings.
#[derive(Debug, Default)]
pub struct SpilledChannels {
    by_peer: HashMap<PackedAddr, ChannelNumber>,
    by_number: HashMap<ChannelNumber, PackedAddr>,
}

impl Default for Channels {
    fn default() -> Self {
        Channels::Inline([None; INLINE_CHANNELS])
    }
}

impl Channels {
    /// The channel bound to `peer`.
    #[inline]
    pub fn get(&self, peer: &SocketAddr) -> Option<&ChannelNumber> {
        let peer = PackedAddr::new(*peer);
        match self {
            Channels::Inline(items) => items
                .iter()
                .flatten()
                .find(|(p, _)| *p == peer)
                .map(|(_, n)| n),
            Channels::Spilled(s) => s.by_peer.get(&peer),
        }
    }

    /// The peer bound to channel `number`.
    #[inline]
    pub fn peer(&self, number: ChannelNumber) -> Option<SocketAddr> {
        match self {
            Channels::Inline(items) => items
                .iter()
                .flatten()
                .find(|(_, n)| *n == number)
                .map(|(p, _)| p.get()),
            Channels::Spilled(s) => s.by_number.get(&number).map(|p| p.get()),
        }
    }

    /// Bind `number` to `peer` (replacing `peer`'s previous binding). Control path: may allocate.
    fn insert(&mut self, peer: SocketAddr, number: ChannelNumber) {
        let peer = PackedAddr::new(peer);
        if let Channels::Inline(items) = self {
            let at = items
                .iter()
                .position(|e| e.is_some_and(|(p, _)| p == peer))
                .or_else(|| items.iter().position(Option::is_none));
            if let Some(slot) = at.and_then(|i| items.get_mut(i)) {
                *slot = Some((peer, number));
                return;
            }
            let mut spilled = SpilledChannels::default();
            for (p, n) in items.iter().flatten() {
                spilled.by_peer.insert(*p, *n);
                spilled.by_number.insert(*n, *p);
            }
            *self = Channels::Spilled(Box::new(spilled));
        }
        if let Channels::Spilled(s) = self {
            if let Some(old) = s.by_peer.insert(peer, number) {
                if s.by_number.get(&old) == Some(&peer) {
                    s.by_number.remove(&old);
                }
            }
            s.by_number.insert(number, peer);
        }
    }

    /// Unbind `peer` if it is bound to `number`.
    fn remove(&mut self, peer: SocketAddr, number: ChannelNumber) {
        let peer = PackedAddr::new(peer);
        match self {
            Channels::Inline(items) => {
                for e in items.iter_mut() {
                    if *e == Some((peer, number)) {
                        *e = None;
                    }
                }
            }
            Channels::Spilled(s) => {
                if s.by_peer.get(&peer) == Some(&number) {
                    s.by_peer.remove(&peer);
                    s.by_number.remove(&number);
                }
            }
        }
    }

    /// Number of bindings.
    pub fn len(&self) -> usize {
        match self {
            Channels::Inline(items) => items.iter().flatten().count(),
            Channels::Spilled(s) => s.by_peer.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a client's ChannelData goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelRoute {
    /// Through this relay socket.
    pub relay: RelayId,
    /// To this peer.
    pub peer: SocketAddr,
}

/// A worker's lookup tables.
#[derive(Debug, Default)]
pub struct RouteTable {
    relays: HashMap<RelayId, Relay>,
    /// client → its relay sockets (one per family), for Send indications.
    clients: HashMap<ClientKey, [Option<RelayId>; 2]>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply an update. Returns the final counters of a removed relay.
    pub fn apply(&mut self, update: RouteUpdate) -> Option<(AllocationId, Counters)> {
        match update {
            RouteUpdate::AddRelay {
                id,
                allocation,
                addr,
                client,
            } => {
                let slots = self.clients.entry(client).or_default();
                let i = usize::from(addr.is_ipv6());
                slots[i] = Some(id);
                self.relays.insert(
                    id,
                    Relay {
                        allocation,
                        client,
                        permissions: SmallSet::new(),
                        channels: Channels::default(),
                        counters: Counters::default(),
                    },
                );
            }
            RouteUpdate::RemoveRelay { id } => {
                let relay = self.relays.remove(&id)?;
                if let Some(slots) = self.clients.get_mut(&relay.client) {
                    for s in slots.iter_mut() {
                        if *s == Some(id) {
                            *s = None;
                        }
                    }
                    if slots.iter().all(Option::is_none) {
                        self.clients.remove(&relay.client);
                    }
                }
                return Some((relay.allocation, relay.counters));
            }
            RouteUpdate::AddPermission { relay, peer } => {
                if let Some(r) = self.relays.get_mut(&relay) {
                    r.permissions.insert(peer);
                }
            }
            RouteUpdate::RemovePermission { relay, peer } => {
                if let Some(r) = self.relays.get_mut(&relay) {
                    r.permissions.remove(&peer);
                }
            }
            RouteUpdate::AddChannel {
                relay,
                channel,
                peer,
            } => {
                if let Some(r) = self.relays.get_mut(&relay) {
                    r.channels.insert(peer, channel);
                }
            }
            RouteUpdate::ReportCounters => {}
            RouteUpdate::RemoveChannel {
                relay,
                channel,
                peer,
            } => {
                if let Some(r) = self.relays.get_mut(&relay) {
                    r.channels.remove(peer, channel);
                }
            }
        }
        None
    }

    /// Client ChannelData: where channel `channel` of `client` goes, if bound and permitted.
    #[inline]
    pub fn channel(&self, client: ClientKey, channel: u16) -> Option<ChannelRoute> {
        let number = ChannelNumber::bound(channel);
        // A channel number is bound once per allocation (RFC 8656 §12), so at most one of the client's
        // relay sockets (one per family) has it.
        for id in self.clients.get(&client)?.iter().flatten() {
            let Some(relay) = self.relays.get(id) else {
                continue;
            };
            if let Some(peer) = relay.channels.peer(number) {
                return relay
                    .permissions
                    .contains(&peer.ip())
                    .then_some(ChannelRoute { relay: *id, peer });
            }
        }
        None
    }

    /// Send indication: the relay of `client` for `peer`'s family, if `peer` is permitted there.
    #[inline]
    pub fn send_route(&self, client: ClientKey, peer: SocketAddr) -> Option<RelayId> {
        let id = self.clients.get(&client)?[usize::from(peer.is_ipv6())]?;
        self.relays
            .get(&id)?
            .permissions
            .contains(&peer.ip())
            .then_some(id)
    }

    /// A relay socket's state.
    #[inline]
    pub fn relay(&self, id: RelayId) -> Option<&Relay> {
        self.relays.get(&id)
    }

    /// A relay socket's state, mutably (counters).
    #[inline]
    pub fn relay_mut(&mut self, id: RelayId) -> Option<&mut Relay> {
        self.relays.get_mut(&id)
    }

    /// Whether `client` has a relay socket (an allocation) in this worker.
    pub fn has_client(&self, client: ClientKey) -> bool {
        self.clients.contains_key(&client)
    }

    /// (allocation, counters) of every relay socket.
    pub fn counters(&self) -> impl Iterator<Item = (AllocationId, Counters)> + '_ {
        self.relays.values().map(|r| (r.allocation, r.counters))
    }

    /// Number of relay sockets.
    pub fn relay_count(&self) -> usize {
        self.relays.len()
    }

    /// Number of channel bindings (counted over the relays: diagnostics and tests, not the fast path).
    pub fn channel_count(&self) -> usize {
        self.relays.values().map(|r| r.channels.len()).sum()
    }

    /// Every relay socket's state.
    pub fn relays(&self) -> impl Iterator<Item = &Relay> + '_ {
        self.relays.values()
    }

    /// Number of clients with a relay socket here (Send indication routes).
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn client() -> ClientKey {
        ClientKey {
            client: "198.51.100.1:4000".parse().unwrap(),
            listener: 0,
        }
    }

    #[test]
    fn channel_needs_binding_and_permission_and_goes_away_with_the_relay() {
        let mut t = RouteTable::new();
        let peer: SocketAddr = "8.8.8.8:53".parse().unwrap();
        let id = RelayId(1);
        t.apply(RouteUpdate::AddRelay {
            id,
            allocation: AllocationId(9),
            addr: "203.0.113.1:50000".parse().unwrap(),
            client: client(),
        });
        t.apply(RouteUpdate::AddChannel {
            relay: id,
            channel: ChannelNumber::new(0x4000).unwrap(),
            peer,
        });
        assert_eq!(t.channel(client(), 0x4000), None, "no permission yet");
        t.apply(RouteUpdate::AddPermission {
            relay: id,
            peer: peer.ip(),
        });
        assert_eq!(
            t.channel(client(), 0x4000),
            Some(ChannelRoute { relay: id, peer })
        );
        assert_eq!(
            t.send_route(client(), "8.8.8.8:1".parse().unwrap()),
            Some(id),
            "permissions are per IP"
        );
        assert_eq!(
            t.send_route(client(), "[2001:db8::1]:1".parse().unwrap()),
            None
        );
        t.relay_mut(id).unwrap().counters.to_peer_packets = 3;
        t.apply(RouteUpdate::RemovePermission {
            relay: id,
            peer: peer.ip(),
        });
        assert_eq!(t.channel(client(), 0x4000), None);
        t.apply(RouteUpdate::AddPermission {
            relay: id,
            peer: peer.ip(),
        });
        let (alloc, counters) = t.apply(RouteUpdate::RemoveRelay { id }).unwrap();
        assert_eq!((alloc, counters.to_peer_packets), (AllocationId(9), 3));
        assert_eq!((t.relay_count(), t.channel_count()), (0, 0));
        assert_eq!(t.channel(client(), 0x4000), None);
    }

    #[test]
    fn remove_channel_only_removes_the_matching_binding() {
        let mut t = RouteTable::new();
        let id = RelayId(1);
        let (p1, p2): (SocketAddr, SocketAddr) =
            ("8.8.8.8:1".parse().unwrap(), "8.8.8.8:2".parse().unwrap());
        t.apply(RouteUpdate::AddRelay {
            id,
            allocation: AllocationId(1),
            addr: "203.0.113.1:50000".parse().unwrap(),
            client: client(),
        });
        t.apply(RouteUpdate::AddPermission {
            relay: id,
            peer: p1.ip(),
        });
        t.apply(RouteUpdate::AddChannel {
            relay: id,
            channel: ChannelNumber::new(0x4001).unwrap(),
            peer: p1,
        });
        t.apply(RouteUpdate::RemoveChannel {
            relay: id,
            channel: ChannelNumber::new(0x4001).unwrap(),
            peer: p2,
        });
        assert!(
            t.channel(client(), 0x4001).is_some(),
            "mismatched peer: nothing removed from the peer side"
        );
        t.apply(RouteUpdate::RemoveChannel {
            relay: id,
            channel: ChannelNumber::new(0x4001).unwrap(),
            peer: p1,
        });
        assert!(t.channel(client(), 0x4001).is_none());
        assert!(t.relay(id).unwrap().channels.is_empty());
    }

    #[test]
    fn many_permissions_and_channels_spill_and_stay_routed_both_ways() {
        let mut t = RouteTable::new();
        let id = RelayId(3);
        t.apply(RouteUpdate::AddRelay {
            id,
            allocation: AllocationId(1),
            addr: "203.0.113.1:50000".parse().unwrap(),
            client: client(),
        });
        let peer = |i: u16| SocketAddr::from(([8, 8, (i >> 8) as u8, i as u8], 1000 + i));
        let n = 3 * (INLINE_CHANNELS + INLINE_PERMISSIONS) as u16 + 5;
        for i in 0..n {
            t.apply(RouteUpdate::AddPermission {
                relay: id,
                peer: peer(i).ip(),
            });
            t.apply(RouteUpdate::AddChannel {
                relay: id,
                channel: ChannelNumber::new(0x4000 + i).unwrap(),
                peer: peer(i),
            });
        }
        assert_eq!(t.channel_count(), usize::from(n));
        for i in 0..n {
            assert_eq!(
                t.channel(client(), 0x4000 + i),
                Some(ChannelRoute {
                    relay: id,
                    peer: peer(i)
                })
            );
            let r = t.relay(id).unwrap();
            assert_eq!(r.channels.get(&peer(i)).map(|c| c.get()), Some(0x4000 + i));
            assert_eq!(t.send_route(client(), peer(i)), Some(id));
        }
        t.apply(RouteUpdate::RemoveChannel {
            relay: id,
            channel: ChannelNumber::new(0x4000 + 1).unwrap(),
            peer: peer(1),
        });
        t.apply(RouteUpdate::RemovePermission {
            relay: id,
            peer: peer(2).ip(),
        });
        assert_eq!(t.channel(client(), 0x4001), None, "unbound");
        assert_eq!(t.channel(client(), 0x4002), None, "no permission");
        assert_eq!(t.send_route(client(), peer(2)), None);
        assert!(t.channel(client(), 0x4003).is_some());
        assert_eq!(t.channel_count(), usize::from(n) - 1);
    }
}
