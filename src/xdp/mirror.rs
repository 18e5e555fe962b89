//! The mirror: the route updates that program the workers' tables, applied to the BPF maps too, so the
//! kernel cache has one source of truth.
//!
//! The control thread hands every [`RouteUpdate`] here just before it sends it to the owning worker.
//! Removals therefore leave the kernel before (never after) they leave the worker's table: a permission
//! or channel expiry, a revocation, a policy change on reload and the end of an allocation. Nothing is
//! decided here: a channel reaches the maps only because the server accepted its ChannelBind (auth,
//! permission, peer policy), and the mirror only leaves out what the program must not carry:
//! - channels of TCP/TLS clients (the program only rewrites UDP);
//! - relay-to-relay channels (the peer is a relayed address of this host: the userspace path checks
//!   it per packet, and the program passes it too, through its `relayed` map);
//! - channels whose addresses are not all one family.
//!
//! A map call that fails leaves that channel on the userspace path (the worker's table still has it)
//! and is logged and counted; this is the control thread, never the packet path.

use core::net::{IpAddr, SocketAddr};
use std::collections::{HashMap, HashSet};

use super::{ChannelKey, FastPath, XdpError};
use crate::route::{AllocationId, ClientKey, Counters, RelayId, RouteUpdate};

/// Mirrors route updates into the loaded XDP program's maps; without one ([`Mirror::off`]) every call
/// is a no-op returning zeros.
#[derive(Debug)]
pub struct Mirror {
    fast: Option<FastPath>,
    /// The UDP listener address of each listener id; `None` for TCP/TLS listeners.
    listeners: Vec<Option<SocketAddr>>,
    relays: HashMap<RelayId, Relay>,
    /// Every live relayed address (for relay-to-relay).
    relayed: HashSet<SocketAddr>,
    failures: u64,
}

#[derive(Debug)]
struct Relay {
    allocation: AllocationId,
    worker: usize,
    addr: SocketAddr,
    /// (client, listener) for UDP clients; `None` keeps every channel of the relay in userspace.
    client: Option<(SocketAddr, SocketAddr)>,
    /// Channels in the maps: (number, peer).
    channels: Vec<(u16, SocketAddr)>,
}

impl Mirror {
    /// A mirror writing to `fast`. `listeners[id]` is listener `id`'s address if it is UDP.
    pub fn new(fast: Option<FastPath>, listeners: Vec<Option<SocketAddr>>) -> Mirror {
        Mirror {
            fast,
            listeners,
            relays: HashMap::new(),
            relayed: HashSet::new(),
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
    /// allocation and what XDP forwarded for that relay over its life, to fold into its usage (the
    /// meter is gone afterwards, so every byte is counted once).
    pub fn apply(
        &mut self,
        worker: usize,
        update: &RouteUpdate,
    ) -> Option<(AllocationId, Counters)> {
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
                self.relays.insert(
                    id,
                    Relay {
                        allocation,
                        worker,
                        addr,
                        client: listener.map(|l| (client, l)),
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
                let (client, listener) = r.client?;
                if self.relayed.contains(&canonical(peer)) {
                    return None;
                }
                let key = ChannelKey {
                    client,
                    listener,
                    channel: channel.get(),
                };
                match tables.add_channel(key, r.addr, peer) {
                    Ok(true) => r.channels.push((channel.get(), peer)),
                    Ok(false) => {}
                    Err(e) => note::<()>(&mut self.failures, "add channel", r.addr, Err(e)),
                }
                None
            }
            RouteUpdate::RemoveChannel {
                relay,
                channel,
                peer,
            } => {
                let r = self.relays.get_mut(&relay)?;
                let channel = channel.get();
                r.channels.retain(|c| *c != (channel, peer));
                remove(tables, &mut self.failures, r, channel, peer);
                None
            }
            RouteUpdate::RemovePermission { relay, peer } => {
                // A channel needs its permission: none to that peer IP may outlive it in the kernel.
                let r = self.relays.get_mut(&relay)?;
                let gone: Vec<(u16, SocketAddr)> = r
                    .channels
                    .iter()
                    .copied()
                    .filter(|(_, p)| same_ip(p.ip(), peer))
                    .collect();
                r.channels.retain(|(_, p)| !same_ip(p.ip(), peer));
                for (channel, p) in gone {
                    remove(tables, &mut self.failures, r, channel, p);
                }
                None
            }
            RouteUpdate::RemoveRelay { id } => {
                let r = self.relays.remove(&id)?;
                self.relayed.remove(&canonical(r.addr));
                match tables.remove_relay(r.addr) {
                    Ok(counters) => Some((r.allocation, counters)),
                    Err(e) => {
                        note::<()>(&mut self.failures, "remove relay", r.addr, Err(e));
                        None
                    }
                }
            }
            RouteUpdate::AddPermission { .. } | RouteUpdate::ReportCounters => None,
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
        for r in self.relays.values() {
            if r.worker == worker && r.allocation == allocation {
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

fn remove(
    tables: &mut super::XdpTables,
    failures: &mut u64,
    r: &Relay,
    channel: u16,
    peer: SocketAddr,
) {
    let Some((client, listener)) = r.client else {
        return;
    };
    let key = ChannelKey {
        client,
        listener,
        channel,
    };
    let result = tables.remove_channel(key, r.addr, peer);
    note(failures, "remove channel", r.addr, result);
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
