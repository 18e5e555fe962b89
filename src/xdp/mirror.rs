//! The mirror: the route updates that program the workers' tables, applied to the BPF maps too, so the
//! kernel cache has one source of truth.
//!
//! The control thread hands every [`RouteUpdate`] here just before it sends it to the owning worker.
//! Removals therefore leave the kernel before (never after) they leave the worker's table: a permission
//! or channel expiry, a revocation, a policy change on reload and the end of an allocation. The maps
//! hold a channel exactly while the worker's table would relay it (`RouteTable::channel`: bound, and
//! its peer IP permitted), so a permission that lapses takes the channel out of the kernel and one
//! granted again (CreatePermission, or a ChannelBind refresh) puts it back. Nothing is decided here: a
//! channel reaches the maps only because the server accepted its ChannelBind (auth, permission, peer
//! policy), and the mirror only leaves out what the program must not carry:
//! - channels of TCP/TLS clients (the program only rewrites UDP);
//! - relay-to-relay channels (the peer is a relayed address of this host: the userspace path checks
//!   it per packet, and the program passes it too, through its `relayed` map);
//! - channels whose addresses are not all one family.
//!
//! A map call that fails leaves that channel on the userspace path (the worker's table still has it)
//! and is logged and counted; this is the control thread, never the packet path.
//!
//! A removed relay's meter is read later, not at its removal: [`Mirror::apply`] retires it, and
//! [`Mirror::settle`] (due [`SETTLE_AFTER`] later, one wait for the kernel's running programs per
//! batch) returns what XDP forwarded for it, exactly ([`XdpTables::settle`](super::XdpTables::settle)).

use core::net::{IpAddr, SocketAddr};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{ChannelKey, FastPath, RetiredMeter, XdpError};
use crate::route::{AllocationId, ClientKey, Counters, RelayId, RouteUpdate};

/// Mirrors route updates into the loaded XDP program's maps; without one ([`Mirror::off`]) every call
/// is a no-op returning zeros.
#[derive(Debug)]
pub struct Mirror {
    fast: Option<FastPath>,
    /// The UDP listener address of each listener id; `None` for TCP/TLS listeners.
    listeners: Vec<Option<SocketAddr>>,
    relays: HashMap<RelayId, Relay>,
    /// The relays of each allocation (one per family), for checkpoints.
    by_allocation: HashMap<AllocationId, Vec<RelayId>>,
    /// Every live relayed address (for relay-to-relay).
    relayed: HashSet<SocketAddr>,
    /// Meters of removed relays, to be read by [`Mirror::settle`].
    retired: Vec<(AllocationId, RetiredMeter)>,
    failures: u64,
}

/// How long after a relay's removal its meter is read at the latest ([`Mirror::settle`]): batches the
/// waits for the kernel's running programs (one RCU grace period each) under allocation churn, and
/// delays the allocation's final usage record by as much.
pub const SETTLE_AFTER: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct Relay {
    allocation: AllocationId,
    worker: usize,
    addr: SocketAddr,
    /// (client, listener) for UDP clients; `None` keeps every channel of the relay in userspace.
    client: Option<(SocketAddr, SocketAddr)>,
    /// Peer IPs with a permission (IPv4-mapped ones as IPv4).
    permissions: HashSet<IpAddr>,
    /// The channels the worker's table has bound, each in the maps while its peer IP is permitted.
    channels: Vec<Channel>,
}

#[derive(Debug, Clone, Copy)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    /// Whether the maps hold it now.
    cached: bool,
}

impl Mirror {
    /// A mirror writing to `fast`. `listeners[id]` is listener `id`'s address if it is UDP.
    pub fn new(fast: Option<FastPath>, listeners: Vec<Option<SocketAddr>>) -> Mirror {
        Mirror {
            fast,
            listeners,
            relays: HashMap::new(),
            by_allocation: HashMap::new(),
            relayed: HashSet::new(),
            retired: Vec::new(),
            failures: 0,
        }
    }

    /// No XDP.
    pub fn off() -> Mirror {
        Mirror::new(None, Vec::new())
    }

    /// Whether a program is loaded (attached or detached by [`detach`](Self::detach)).
    pub fn is_on(&self) -> bool {
        self.fast.is_some()
    }

    /// Applies `update`, about to go to `worker`, to the maps. For `RemoveRelay` it returns the
    /// allocation when the relay's meter is retired: what XDP forwarded for it comes from
    /// [`settle`](Self::settle), once.
    pub fn apply(&mut self, worker: usize, update: &RouteUpdate) -> Option<AllocationId> {
        let fast = self.fast.as_mut()?;
        let tables = fast.tables();
        match *update {
            RouteUpdate::AddRelay {
                id,
                allocation,
                addr,
                client: ClientKey { client, listener },
            } => {
                let listener = self.listeners.get(usize::from(listener)).copied().flatten();
                let result = tables.add_relay(addr);
                note(&mut self.failures, "add relay", addr, result);
                self.relayed.insert(canonical(addr));
                self.by_allocation.entry(allocation).or_default().push(id);
                self.relays.insert(
                    id,
                    Relay {
                        allocation,
                        worker,
                        addr,
                        client: listener.map(|l| (client, l)),
                        permissions: HashSet::new(),
                        channels: Vec::new(),
                    },
                );
                None
            }
            RouteUpdate::AddChannel {
                relay,
                channel,
                peer,
            } => {
                let r = self.relays.get_mut(&relay)?;
                r.client?;
                if self.relayed.contains(&canonical(peer)) {
                    return None;
                }
                let number = channel.get();
                if !r
                    .channels
                    .iter()
                    .any(|c| (c.number, c.peer) == (number, peer))
                {
                    r.channels.push(Channel {
                        number,
                        peer,
                        cached: false,
                    });
                }
                if r.permissions.contains(&peer.ip().to_canonical()) {
                    cache(tables, &mut self.failures, r, |c| c.number == number);
                }
                None
            }
            RouteUpdate::RemoveChannel {
                relay,
                channel,
                peer,
            } => {
                let r = self.relays.get_mut(&relay)?;
                let number = channel.get();
                uncache(tables, &mut self.failures, r, |c| {
                    (c.number, c.peer) == (number, peer)
                });
                r.channels.retain(|c| (c.number, c.peer) != (number, peer));
                None
            }
            RouteUpdate::AddPermission { relay, peer } => {
                // The channels to that IP that the worker will relay again.
                let r = self.relays.get_mut(&relay)?;
                r.permissions.insert(peer.to_canonical());
                cache(tables, &mut self.failures, r, |c| {
                    same_ip(c.peer.ip(), peer)
                });
                None
            }
            RouteUpdate::RemovePermission { relay, peer } => {
                // A channel needs its permission: none to that peer IP may outlive it in the kernel.
                let r = self.relays.get_mut(&relay)?;
                r.permissions.remove(&peer.to_canonical());
                uncache(tables, &mut self.failures, r, |c| {
                    same_ip(c.peer.ip(), peer)
                });
                None
            }
            RouteUpdate::RemoveRelay { id } => {
                let r = self.relays.remove(&id)?;
                if let Some(ids) = self.by_allocation.get_mut(&r.allocation) {
                    ids.retain(|i| *i != id);
                    if ids.is_empty() {
                        self.by_allocation.remove(&r.allocation);
                    }
                }
                self.relayed.remove(&canonical(r.addr));
                let (retired, result) = tables.remove_relay(r.addr)?;
                // A failed deletion is retried by `settle`, before the meter is read.
                note(&mut self.failures, "remove relay", r.addr, result);
                self.retired.push((r.allocation, retired));
                Some(r.allocation)
            }
            RouteUpdate::ReportCounters => None,
        }
    }

    /// Whether removed relays' meters wait for [`settle`](Self::settle).
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// The final XDP counters of the relays removed since the last call, by allocation (one entry per
    /// relay that [`apply`](Self::apply) retired, each exactly once). Blocks for one RCU grace period
    /// when there are any. A relay whose entries could not all be deleted from the maps yet stays
    /// retired for the next call (it reports then, with what those entries forwarded meanwhile);
    /// `last` (the process is stopping) reports every one now. A meter that cannot be read is logged
    /// and counted, and reported as zero so that the allocation's usage record is not held forever.
    pub fn settle(&mut self, last: bool) -> Vec<(AllocationId, Counters)> {
        let retired = std::mem::take(&mut self.retired);
        let Some(fast) = self.fast.as_mut() else {
            return Vec::new();
        };
        let slots: Vec<RetiredMeter> = retired.iter().map(|(_, m)| *m).collect();
        let readings = fast.tables().settle(&slots, last);
        let mut settled = Vec::with_capacity(retired.len());
        for ((allocation, meter), reading) in retired.into_iter().zip(readings) {
            match reading {
                None => {
                    self.failures += 1;
                    self.retired.push((allocation, meter));
                }
                Some(Ok(c)) => settled.push((allocation, c)),
                Some(Err(e)) => {
                    self.failures += 1;
                    tracing::warn!(
                        allocation = allocation.0,
                        "xdp: cannot read a removed relay's meter: {e}"
                    );
                    settled.push((allocation, Counters::default()));
                }
            }
        }
        settled
    }

    /// Makes the next `count` map deletions fail (see [`XdpTables::fail_next_deletions`]); tests only.
    #[doc(hidden)]
    pub fn fail_next_deletions(&mut self, count: u32) {
        if let Some(fast) = self.fast.as_mut() {
            fast.tables().fail_next_deletions(count);
        }
    }

    /// What XDP has forwarded so far for `allocation`'s live relays owned by `worker` (a checkpoint
    /// adds it to that worker's counters for the allocation).
    pub fn live(&self, worker: usize, allocation: AllocationId) -> Counters {
        let mut total = Counters::default();
        let Some(fast) = &self.fast else {
            return total;
        };
        let tables = fast.tables_ref();
        let ids = self
            .by_allocation
            .get(&allocation)
            .map_or(&[][..], Vec::as_slice);
        for r in ids.iter().filter_map(|id| self.relays.get(id)) {
            if r.worker == worker {
                if let Ok(c) = tables.counters(r.addr) {
                    total.add(c);
                }
            }
        }
        total
    }

    /// Datagrams forwarded in XDP since start, both directions (0 without XDP).
    pub fn packets(&self) -> u64 {
        self.fast
            .as_ref()
            .and_then(|f| f.tables_ref().paths().ok())
            .map_or(0, |p| p.xdp_to_peer + p.xdp_to_client)
    }

    /// Map operations that failed (their channels stayed on the userspace path).
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Detaches the program from every interface (on drain) and keeps the maps for the last meter
    /// readings. Dropping the mirror detaches too (on exit).
    pub fn detach(&mut self) {
        if let Some(fast) = &mut self.fast {
            match fast.detach_links() {
                Ok(()) => tracing::info!("xdp: detached; relaying in userspace"),
                Err(e) => tracing::warn!("xdp: {e}"),
            }
        }
    }
}

/// Puts the relay's channels that `which` picks and the maps lack into the maps (UDP clients only).
fn cache(
    tables: &mut super::XdpTables,
    failures: &mut u64,
    r: &mut Relay,
    which: impl Fn(&Channel) -> bool,
) {
    let Some((client, listener)) = r.client else {
        return;
    };
    for c in r.channels.iter_mut().filter(|c| !c.cached && which(c)) {
        let key = ChannelKey {
            client,
            listener,
            channel: c.number,
        };
        match tables.add_channel(key, r.addr, c.peer) {
            Ok(cached) => c.cached = cached,
            Err(e) => note::<()>(failures, "add channel", r.addr, Err(e)),
        }
    }
}

/// Takes the relay's channels that `which` picks out of the maps (they stay bound in the worker).
fn uncache(
    tables: &mut super::XdpTables,
    failures: &mut u64,
    r: &mut Relay,
    which: impl Fn(&Channel) -> bool,
) {
    let Some((client, listener)) = r.client else {
        return;
    };
    for c in r.channels.iter_mut().filter(|c| c.cached && which(c)) {
        let key = ChannelKey {
            client,
            listener,
            channel: c.number,
        };
        match tables.remove_channel(key, r.addr, c.peer) {
            Ok(()) => c.cached = false,
            // Still cached: the next removal of it retries, and the relay's end removes it anyway.
            Err(e) => note::<()>(failures, "remove channel", r.addr, Err(e)),
        }
    }
}

fn note<T>(failures: &mut u64, what: &str, relayed: SocketAddr, result: Result<T, XdpError>) {
    if let Err(e) = result {
        *failures += 1;
        tracing::warn!(%relayed, "xdp: {what}: {e}; that traffic stays on the userspace path");
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}
