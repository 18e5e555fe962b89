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
//! May use: wire, metrics (the counters type), hashbrown.

use core::net::{IpAddr, SocketAddr};

use hashbrown::{HashMap, HashSet};

pub use crate::metrics::Counters;

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
    /// The relay socket's address.
    pub addr: SocketAddr,
    /// The client it serves.
    pub client: ClientKey,
    /// Peer IPs with a permission.
    pub permissions: HashSet<IpAddr>,
    /// Peer → channel number, for peer → client ChannelData.
    pub channels: HashMap<SocketAddr, ChannelNumber>,
    /// What was relayed.
    pub counters: Counters,
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
    /// (client, channel) → route, for client → peer ChannelData.
    channels: HashMap<(ClientKey, ChannelNumber), ChannelRoute>,
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
                        addr,
                        client,
                        permissions: HashSet::new(),
                        channels: HashMap::new(),
                        counters: Counters::default(),
                    },
                );
            }
            RouteUpdate::RemoveRelay { id } => {
                let relay = self.relays.remove(&id)?;
                for channel in relay.channels.values() {
                    self.channels.remove(&(relay.client, *channel));
                }
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
                    self.channels
                        .insert((r.client, channel), ChannelRoute { relay, peer });
                }
            }
            RouteUpdate::ReportCounters => {}
            RouteUpdate::RemoveChannel {
                relay,
                channel,
                peer,
            } => {
                if let Some(r) = self.relays.get_mut(&relay) {
                    if r.channels.get(&peer) == Some(&channel) {
                        r.channels.remove(&peer);
                    }
                    if self
                        .channels
                        .get(&(r.client, channel))
                        .is_some_and(|c| c.relay == relay && c.peer == peer)
                    {
                        self.channels.remove(&(r.client, channel));
                    }
                }
            }
        }
        None
    }

    /// Client ChannelData: where channel `channel` of `client` goes, if bound and permitted.
    #[inline]
    pub fn channel(&self, client: ClientKey, channel: u16) -> Option<ChannelRoute> {
        let route = *self
            .channels
            .get(&(client, ChannelNumber::bound(channel)))?;
        let relay = self.relays.get(&route.relay)?;
        relay
            .permissions
            .contains(&route.peer.ip())
            .then_some(route)
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

    /// Number of channel routes.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
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
}
