//! A worker's packet logic, independent of the event loop: every per-packet decision, sans-IO.
//!
//! May use: wire, route, policy, metrics.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::TrySendError;

use super::{ControlTx, Drop, ToControl, WorkerStats, HEADROOM};
use crate::policy::OwnAddresses;
use crate::route::{ClientKey, ListenerId, RelayId, RouteTable, RouteUpdate};
use crate::wire::{self, ChannelData, Class, Kind, Message, Method};

/// What to do with a received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing (dropped and counted, or handed to the control thread).
    Done,
    /// Send part of the same buffer slot; once the kernel (or a stream's write queue) took it, call
    /// [`Core::sent`] with its [`Bill`].
    Forward(Forward),
}

/// A datagram to send: everything a backend needs, so that it never looks the relay up again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The socket to send from.
    pub out: Out,
    /// The destination.
    pub dst: SocketAddr,
    /// The bytes to send, within the slot (header included).
    pub range: Range<usize>,
    /// What to credit when the send succeeded.
    pub bill: Bill,
}

/// The billing facts of one forwarded datagram, credited by [`Core::sent`] only after a send succeeded
/// (usage counts what was sent, not what was queued). `Copy` and small, so that a backend can keep it
/// beside a send in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bill {
    /// The relay socket (allocation) the datagram went through.
    pub relay: RelayId,
    /// Which way it went.
    pub dir: Direction,
    /// Payload bytes (the application data, without ChannelData or Data indication framing).
    pub payload: u32,
}

/// Which way a relayed datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → peer (ChannelData or a Send indication from the client).
    ToPeer,
    /// Peer → client (ChannelData or a Data indication to the client).
    ToClient,
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
    to_control: ControlTx,
    stats: Arc<WorkerStats>,
    tid_state: u64,
    channel_range: wire::ChannelRange,
    /// The relay's own addresses and the live relayed ones (shared with the control thread).
    own: Arc<OwnAddresses>,
}

impl Core {
    /// The core of worker `worker`.
    pub fn new(
        worker: usize,
        to_control: impl Into<ControlTx>,
        stats: Arc<WorkerStats>,
        channel_range: wire::ChannelRange,
        own: Arc<OwnAddresses>,
    ) -> Self {
        Core {
            worker,
            table: RouteTable::new(),
            to_control: to_control.into(),
            stats,
            tid_state: 0x9E37_79B9_7F4A_7C15 ^ worker as u64,
            channel_range,
            own,
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
            // Accounting must not be lost: this send is never refused and never blocks (`ControlTx`).
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
                if !self.peer_allowed(route.peer) {
                    return self.drop(Drop::OwnAddress);
                }
                let n = cd.payload().len();
                let start = HEADROOM + wire::CHANNEL_HEADER_LEN;
                Action::Forward(Forward {
                    out: Out::Relay(route.relay),
                    dst: route.peer,
                    range: start..start + n,
                    bill: Bill {
                        relay: route.relay,
                        dir: Direction::ToPeer,
                        payload: n as u32,
                    },
                })
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
            // A malformed XOR-PEER-ADDRESS no longer fails `Message::parse` (the server answers 400 to
            // one in a request); an indication carrying one is dropped as malformed.
            let (Some(peer), Some(payload), false) = (
                msg.attrs.xor_peer_address,
                msg.attrs.data,
                msg.attrs.malformed_peer_address,
            ) else {
                return self.drop(Drop::Malformed);
            };
            let Some(relay) = self.table.send_route(key, peer) else {
                return self.drop(Drop::NoPermission);
            };
            if !self.peer_allowed(peer) {
                return self.drop(Drop::OwnAddress);
            }
            let start = HEADROOM + (payload.as_ptr() as usize - data.as_ptr() as usize);
            return Action::Forward(Forward {
                out: Out::Relay(relay),
                dst: peer,
                range: start..start + payload.len(),
                bill: Bill {
                    relay,
                    dir: Direction::ToPeer,
                    payload: payload.len() as u32,
                },
            });
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
        if matches!(self.own.check(from), Some(Err(_))) {
            return self.drop(Drop::OwnAddress);
        }
        let client = r.client;
        let range = match r.channels.get(&from) {
            Some(&channel) => {
                let start = HEADROOM - wire::CHANNEL_HEADER_LEN;
                match ChannelData::write_header(&mut slot[start..], channel.get(), len) {
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
        Action::Forward(Forward {
            out: Out::Listener(client.listener),
            dst: client.client,
            range,
            bill: Bill {
                relay,
                dir: Direction::ToClient,
                payload: len as u32,
            },
        })
    }

    /// Credit a forward whose send succeeded: the relay's usage counters and the worker's relayed
    /// totals. A relay removed meanwhile (its final counters already reported) credits the worker only.
    #[inline]
    pub fn sent(&mut self, bill: Bill) {
        let n = u64::from(bill.payload);
        let to_peer = bill.dir == Direction::ToPeer;
        self.stats.count_relayed(to_peer, n as usize);
        if let Some(r) = self.table.relay_mut(bill.relay) {
            let c = &mut r.counters;
            if to_peer {
                c.to_peer_bytes += n;
                c.to_peer_packets += 1;
            } else {
                c.to_client_bytes += n;
                c.to_client_packets += 1;
            }
        }
    }

    /// Permissions are per IP (RFC 8656 §9), so on one of the relay's own IPs the exact address decides,
    /// per packet: only another allocation's live relayed address, or a port an explicit allow opens.
    #[inline]
    fn peer_allowed(&self, peer: SocketAddr) -> bool {
        !matches!(self.own.check(peer), Some(Err(_)))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::route::{AllocationId, ChannelNumber, Counters};

    const RELAY: RelayId = RelayId(7);

    fn core() -> (Core, crossbeam_channel::Receiver<ToControl>) {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let core = Core::new(
            0,
            tx,
            Arc::default(),
            wire::ChannelRange::Rfc8656,
            Arc::default(),
        );
        (core, rx)
    }

    #[test]
    fn a_forward_is_billed_only_when_sent() {
        let (mut core, _rx) = core();
        let client = ClientKey {
            client: "198.51.100.1:4000".parse().unwrap(),
            listener: 0,
        };
        let peer: SocketAddr = "8.8.8.8:53".parse().unwrap();
        core.apply(RouteUpdate::AddRelay {
            id: RELAY,
            allocation: AllocationId(1),
            addr: "192.0.2.1:50000".parse().unwrap(),
            client,
        });
        core.apply(RouteUpdate::AddPermission {
            relay: RELAY,
            peer: peer.ip(),
        });
        core.apply(RouteUpdate::AddChannel {
            relay: RELAY,
            channel: ChannelNumber::new(0x4000).unwrap(),
            peer,
        });
        let mut slot = [0u8; 256];
        slot[HEADROOM..HEADROOM + 8].copy_from_slice(&[0x40, 0x00, 0, 4, 1, 2, 3, 4]);
        let Action::Forward(f) = core.on_client(0, client.client, &mut slot, 8) else {
            panic!("not forwarded");
        };
        assert_eq!(
            f,
            Forward {
                out: Out::Relay(RELAY),
                dst: peer,
                range: HEADROOM + 4..HEADROOM + 8,
                bill: Bill {
                    relay: RELAY,
                    dir: Direction::ToPeer,
                    payload: 4,
                },
            }
        );
        let counters = |core: &Core| core.table().relay(RELAY).unwrap().counters;
        assert_eq!(
            counters(&core),
            Counters::default(),
            "nothing billed before the send"
        );
        assert_eq!(core.stats().relayed(), Counters::default());

        slot[HEADROOM..HEADROOM + 3].copy_from_slice(b"abc");
        let Action::Forward(back) = core.on_peer(RELAY, peer, &mut slot, 3) else {
            panic!("not forwarded");
        };
        assert_eq!(back.bill.dir, Direction::ToClient);
        assert_eq!(back.bill.payload, 3);
        assert_eq!(back.dst, client.client);
        // Only the first send succeeds: only it is billed.
        core.sent(f.bill);
        assert_eq!(
            counters(&core),
            Counters {
                to_peer_bytes: 4,
                to_peer_packets: 1,
                ..Counters::default()
            }
        );
        assert_eq!(core.stats().relayed(), counters(&core));
        core.sent(back.bill);
        assert_eq!(core.stats().relayed(), counters(&core));
        assert_eq!(counters(&core).to_client_packets, 1);
    }
}
