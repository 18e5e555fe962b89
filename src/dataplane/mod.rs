//! Moving packets: the per-worker packet logic ([`Core`]) and the event loops that feed it (epoll with
//! `recvmmsg`/`sendmmsg`, and io_uring).
//!
//! # Buffer layout
//! Every datagram is received [`HEADROOM`] bytes into its buffer slot, so that whatever has to go in front
//! of a payload is written in place, never copied:
//!
//! ```text
//! slot: [ 0 ............ 44 | 45 46 47 48 | payload ............ | pad | ...free... ]
//!         Data indication header (36/48 B) ends at 48
//!                            ChannelData header (4 B) at 44..48
//! ```
//!
//! - client → peer ChannelData: the payload is sent from `48 + 4` as is;
//! - peer → client with a channel: the 4-byte ChannelData header is written at 44..48;
//! - peer → client with only a permission: the Data indication header (RFC 8656 §11.4) is written just in
//!   front of the payload and up to 3 bytes of zero padding after it.
//!
//! Nothing here allocates, locks or logs per packet: lookups go to the worker's own
//! [`RouteTable`](crate::route::RouteTable), counters are relaxed atomics on the worker's own cache lines,
//! and STUN requests (the control path) are copied to the control thread over a bounded channel.
//!
//! May use: wire, route, sys, metrics.

mod epoll;
pub mod framing;
mod stats;
pub mod stream;
pub mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

pub use stats::{Drop, WorkerStats};

use crate::route::{ClientKey, Counters, ListenerId, RelayId, RouteTable, RouteUpdate};
use crate::sys::EventFd;
use crate::wire::{self, ChannelData, Class, Kind, Message, Method};

/// Bytes in front of every received datagram (see the module doc).
pub const HEADROOM: usize = 48;
/// Size of one buffer slot: headroom, the largest datagram we relay, and padding room.
pub const SLOT: usize = 4096;
/// The largest datagram a worker accepts (bigger ones are dropped and counted as truncated).
pub const MAX_DATAGRAM: usize = SLOT - HEADROOM - 4;
/// Datagrams per receive batch.
pub const BATCH: usize = 32;

/// Which event loop a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring with batched submissions.
    IoUring,
    /// epoll with recvmmsg/sendmmsg.
    Epoll,
}

/// From a worker to the control thread.
#[derive(Debug)]
pub enum ToControl {
    /// A STUN message (request or indication the worker does not handle itself) from a client.
    Stun {
        /// The worker that received it (it owns the client's flow).
        worker: usize,
        /// The listener it arrived on.
        listener: ListenerId,
        /// The client's address.
        client: SocketAddr,
        /// The message.
        bytes: Vec<u8>,
    },
    /// A client's TCP/TLS connection closed (its allocation ends with it).
    StreamClosed {
        /// The connection's stream listener.
        listener: ListenerId,
        /// The client's address.
        client: SocketAddr,
    },
    /// A relay socket was closed; these are its final counters.
    RelayClosed {
        /// The allocation.
        allocation: u64,
        /// What its fast path relayed.
        counters: Counters,
    },
    /// A snapshot of every relay socket's counters, answering [`RouteUpdate::ReportCounters`].
    Counters {
        /// The worker.
        worker: usize,
        /// (allocation, counters) per relay socket.
        counters: Vec<(u64, Counters)>,
    },
    /// Refuse the REST credentials of `identity` expiring at or before `until` (Unix seconds; 0 lifts
    /// the revocation).
    Revoke {
        /// The identity (user id of the REST username).
        identity: Box<str>,
        /// The revocation horizon.
        until: u64,
    },
    /// Write interim usage checkpoints: ask every worker for its counters.
    Checkpoint,
    /// Answer with a metrics snapshot.
    Metrics(Sender<crate::metrics::Snapshot>),
    /// Begin a graceful shutdown (signal received).
    Shutdown,
    /// Stop now.
    Stop,
}

/// From the control thread to a worker.
#[derive(Debug)]
pub enum WorkerMsg {
    /// Take ownership of a relay socket and route it (`update` is a `RouteUpdate::AddRelay`).
    AddRelay {
        /// The socket.
        socket: UdpSocket,
        /// Its route.
        update: RouteUpdate,
    },
    /// Change the routes.
    Route(RouteUpdate),
    /// Write a message to a TCP/TLS client's connection (padded to 4 bytes there).
    SendStream {
        /// The connection.
        client: ClientKey,
        /// The message.
        bytes: Vec<u8>,
    },
    /// Exit the loop.
    Stop,
}

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

/// What a worker thread needs to run.
#[derive(Debug)]
pub struct WorkerSetup {
    /// The packet logic.
    pub core: Core,
    /// Its listeners, in config order.
    pub listeners: Vec<UdpSocket>,
    /// Its TCP/TLS listeners and connections.
    pub streams: stream::Streams,
    /// Its mailbox.
    pub mailbox: Receiver<WorkerMsg>,
    /// Rung after every mailbox send.
    pub wake: Arc<EventFd>,
}

/// Run a worker's event loop on `backend` until it is told to stop.
pub fn run(setup: WorkerSetup, backend: BackendKind) -> io::Result<()> {
    match backend {
        BackendKind::Epoll => epoll::run(setup),
        BackendKind::IoUring => uring::run(setup),
    }
}

/// Pick the backend: `Some(kind)` forces it; `None` (auto) probes io_uring and falls back to epoll, saying
/// why.
pub fn choose_backend(
    requested: Option<BackendKind>,
) -> Result<(BackendKind, Option<String>), String> {
    match requested {
        Some(BackendKind::Epoll) => Ok((BackendKind::Epoll, None)),
        Some(BackendKind::IoUring) => {
            crate::sys::uring::probe()
                .map_err(|why| format!("backend io_uring is not available: {why}"))?;
            Ok((BackendKind::IoUring, None))
        }
        None => match crate::sys::uring::probe() {
            Ok(()) if uring::IMPLEMENTED => Ok((BackendKind::IoUring, None)),
            Ok(()) => Ok((
                BackendKind::Epoll,
                Some("io_uring backend not built yet; using epoll".into()),
            )),
            Err(why) => Ok((
                BackendKind::Epoll,
                Some(format!("io_uring unavailable ({why}); using epoll")),
            )),
        },
    }
}
