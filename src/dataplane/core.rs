//! A worker's packet logic, independent of the event loop: every per-packet decision, sans-IO.
//!
//! May use: wire, route, metrics.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};

use super::{Drop, ToControl, WorkerStats, HEADROOM};
use crate::route::{ClientKey, ListenerId, RelayId, RouteTable, RouteUpdate};
use crate::wire::{self, ChannelData, Class, Kind, Message, Method};

/// What to do with a received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing (dropped and counted, or handed to the control thread).
    Done,
    /// Send `range` of the same buffer slot to `dst` from `out`.
    Forward {
        /// The socket to send from.
        out: Out,
        /// The destination.
        dst: SocketAddr,
        /// The bytes, within the slot.
        range: Range<usize>,
    },
}

/// A worker socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Out {
    /// A listener (client side).
    Listener(ListenerId),
    /// A relay socket (peer side).
    Relay(RelayId),
}

/// A worker's packet logic, independent of the event loop.
#[derive(Debug)]
pub struct Core {
    worker: usize,
    table: RouteTable,
    to_control: Sender<ToControl>,
    stats: Arc<WorkerStats>,
    tid_state: u64,
    channel_range: wire::ChannelRange,
}

impl Core {
    /// The core of worker `worker`.
    pub fn new(
        worker: usize,
        to_control: Sender<ToControl>,
        stats: Arc<WorkerStats>,
        channel_range: wire::ChannelRange,
    ) -> Self {
        Core {
            worker,
            table: RouteTable::new(),
            to_control,
            stats,
            tid_state: 0x9E37_79B9_7F4A_7C15 ^ worker as u64,
            channel_range,
        }
    }

    /// Apply a route update; a removed relay's counters go to the control thread.
    pub fn apply(&mut self, update: RouteUpdate) {
        if update == RouteUpdate::ReportCounters {
            // Metering checkpoints only (one message per checkpoint interval, off the per-packet path).
            let counters = self.table.counters().collect();
            let _ = self.to_control.send(ToControl::Counters {
                worker: self.worker,
                counters,
            });
            return;
        }
        if let Some((allocation, counters)) = self.table.apply(update) {
            // Accounting must not be lost: this send blocks only if the control thread is far behind.
            let _ = self.to_control.send(ToControl::RelayClosed {
                allocation,
                counters,
            });
        }
    }

    /// The worker's lookup table.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// A datagram from a client on `listener`, at `slot[HEADROOM..HEADROOM + len]`.
    #[inline]
    pub fn on_client(
        &mut self,
        listener: ListenerId,
        from: SocketAddr,
        slot: &mut [u8],
        len: usize,
    ) -> Action {
        self.stats.count_rx();
        let Some(data) = slot.get(HEADROOM..HEADROOM + len) else {
            return self.drop(Drop::Malformed);
        };
        let key = ClientKey {
            client: from,
            listener,
        };
        match data.first().map(|b| self.channel_range.classify(*b)) {
            Some(Kind::ChannelData) => {
                let Ok(cd) = ChannelData::parse_in(data, self.channel_range) else {
                    return self.drop(Drop::Malformed);
                };
                let Some(route) = self.table.channel(key, cd.channel()) else {
                    return self.drop(Drop::NoChannel);
                };
                let n = cd.payload().len();
                self.stats.count_relayed(true, n);
                if let Some(r) = self.table.relay_mut(route.relay) {
                    r.counters.to_peer_bytes += n as u64;
                    r.counters.to_peer_packets += 1;
                }
                let start = HEADROOM + wire::CHANNEL_HEADER_LEN;
                Action::Forward {
                    out: Out::Relay(route.relay),
                    dst: route.peer,
                    range: start..start + n,
                }
            }
            Some(Kind::Stun) => self.on_client_stun(listener, from, key, data),
            _ => self.drop(Drop::NotTurn),
        }
    }

    fn on_client_stun(
        &mut self,
        listener: ListenerId,
        from: SocketAddr,
        key: ClientKey,
        data: &[u8],
    ) -> Action {
        let Ok(msg) = Message::parse(data) else {
            return self.drop(Drop::Malformed);
        };
        let typ = msg.message_type();
        if (typ.class, typ.method) == (Class::Indication, Method::SEND) {
            // Send indications stay in the worker (RFC 8656 §11.2): permission check, then send the DATA
            // bytes where they lie.
            let (Some(peer), Some(payload)) = (msg.attrs.xor_peer_address, msg.attrs.data) else {
                return self.drop(Drop::Malformed);
            };
            let Some(relay) = self.table.send_route(key, peer) else {
                return self.drop(Drop::NoPermission);
            };
            let start = HEADROOM + (payload.as_ptr() as usize - data.as_ptr() as usize);
            self.stats.count_relayed(true, payload.len());
            if let Some(r) = self.table.relay_mut(relay) {
                r.counters.to_peer_bytes += payload.len() as u64;
                r.counters.to_peer_packets += 1;
            }
            return Action::Forward {
                out: Out::Relay(relay),
                dst: peer,
                range: start..start + payload.len(),
            };
        }
        let msg = ToControl::Stun {
            worker: self.worker,
            listener,
            client: from,
            bytes: data.to_vec(),
        };
        match self.to_control.try_send(msg) {
            Ok(()) => Action::Done,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.drop(Drop::ControlBusy)
            }
        }
    }

    /// A datagram from `from` on relay socket `relay`, at `slot[HEADROOM..HEADROOM + len]`.
    #[inline]
    pub fn on_peer(
        &mut self,
        relay: RelayId,
        from: SocketAddr,
        slot: &mut [u8],
        len: usize,
    ) -> Action {
        self.stats.count_rx();
        let Some(r) = self.table.relay_mut(relay) else {
            return self.drop(Drop::NoRelay);
        };
        if !r.permissions.contains(&from.ip()) {
            return self.drop(Drop::NoPermission);
        }
        r.counters.to_client_bytes += len as u64;
        r.counters.to_client_packets += 1;
        self.stats.count_relayed(false, len);
        let client = r.client;
        let range = match r.channels.get(&from) {
            Some(&channel) => {
                let start = HEADROOM - wire::CHANNEL_HEADER_LEN;
                match ChannelData::write_header(&mut slot[start..], channel, len) {
                    Ok(n) => start..start + n,
                    Err(_) => return self.drop(Drop::Malformed),
                }
            }
            None => {
                self.tid_state ^= self.tid_state << 13;
                self.tid_state ^= self.tid_state >> 7;
                self.tid_state ^= self.tid_state << 17;
                let mut tid = [0u8; 12];
                tid[4..].copy_from_slice(&self.tid_state.to_le_bytes());
                match wire::data_indication_in_place(
                    slot,
                    HEADROOM,
                    len,
                    from,
                    wire::TransactionId(tid),
                ) {
                    Ok(range) => range,
                    Err(_) => return self.drop(Drop::Malformed),
                }
            }
        };
        Action::Forward {
            out: Out::Listener(client.listener),
            dst: client.client,
            range,
        }
    }

    /// A stream connection closed: tell the control thread (never lost: its allocation must end).
    pub fn stream_closed(&self, key: ClientKey) {
        let _ = self.to_control.send(ToControl::StreamClosed {
            listener: key.listener,
            client: key.client,
        });
    }

    /// Count a drop.
    #[inline]
    pub fn drop(&self, why: Drop) -> Action {
        self.stats.count_drop(why);
        Action::Done
    }

    /// The worker's counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }
}
