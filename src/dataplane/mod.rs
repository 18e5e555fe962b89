//! Moving packets: the per-worker packet logic ([`Core`]) and the event loops that feed it (epoll with
//! `recvmmsg`/`sendmmsg`, and io_uring).
//!
//! # Buffer layout
//! Every datagram is received [`HEADROOM`] bytes into its buffer slot, so that whatever has to go in front
//! of a payload is written in place, never copied:
//!
//! ```text
//! offset: 0          12                    44        48                       48 + len
//! slot:   [ Data indication header, IPv6 peer: 0..48 | received datagram ......... | pad 0-3 | free ]
//!                    [ IPv4 peer: 12..48 ............ ]
//!                                          [ CD 44..48 ]
//! ```
//!
//! - client → peer ChannelData: received at 48 with its header at 48..52; the payload is sent from 52
//!   as is;
//! - client → peer Send indication: the DATA value is sent where it lies in the received message;
//! - peer → client with a channel: the 4-byte ChannelData header (CD) is written at 44..48;
//! - peer → client with only a permission: the Data indication header (RFC 8656 §11.4: 36 bytes for an
//!   IPv4 peer, 48 for IPv6) is written so that it ends at 48, and up to 3 bytes of zero padding after
//!   the payload.
//!
//! Nothing here allocates, locks or logs per packet: lookups go to the worker's own
//! [`RouteTable`](crate::route::RouteTable), counters are relaxed atomics on the worker's own cache lines,
//! and STUN requests (the control path) are copied to the control thread within the count and byte
//! bounds of [`ControlTx`], which never makes a worker wait.
//!
//! The event loop is written once (`worker.rs`), over two I/O backends that only register sockets,
//! receive a batch and send a batch: `epoll` (`recvmmsg`/`sendmmsg`) and `uring` (io_uring).
//!
//! May use: wire, route, policy, sys, metrics, budget.

mod core;
mod epoll;
pub mod framing;
mod stats;
pub mod stream;
pub mod uring;
mod worker;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{SendError, Sender};
use crossbeam_utils::CachePadded;

pub use self::core::{Action, Answers, Bill, Core, Direction, Forward, Out};
pub use stats::{Drop, WorkerStats};

use crate::route::{AllocationId, ClientKey, Counters, ListenerId, RouteUpdate};
use crate::sys::EventFd;

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
        allocation: AllocationId,
        /// What its fast path relayed.
        counters: Counters,
    },
    /// A snapshot of every relay socket's counters, answering [`RouteUpdate::ReportCounters`].
    Counters {
        /// The worker.
        worker: usize,
        /// (allocation, counters) per relay socket.
        counters: Vec<(AllocationId, Counters)>,
    },
    /// Refuse the REST credentials of `identity` expiring at or before `until` (Unix seconds; 0 lifts
    /// the revocation). With `terminate`, the identity's live allocations made with such credentials end
    /// now.
    Revoke {
        /// The identity (user id of the REST username).
        identity: Box<str>,
        /// The revocation horizon.
        until: u64,
        /// End the live allocations too (a lift ends nothing).
        terminate: bool,
    },
    /// Write interim usage checkpoints: ask every worker for its counters.
    Checkpoint,
    /// Answer with a metrics snapshot.
    Metrics(Sender<crate::metrics::Snapshot>),
    /// Take over the live settings staged by `control::RelayHandle::reload` (a configuration reload).
    Reload,
    /// Begin a graceful shutdown (signal received).
    Shutdown,
    /// Stop now.
    Stop,
    /// A worker's loop ended (returned, failed or panicked) while the relay was not stopping it. Sent by
    /// the worker thread itself on the way out.
    WorkerExited {
        /// The worker.
        worker: usize,
        /// Why, if it failed.
        error: Option<String>,
    },
}

/// The workers' end of the control queue: one FIFO for everything (so that a STUN message and the
/// `StreamClosed` after it arrive in that order), with an admission bound for STUN copies only.
///
/// - [`ControlTx::try_send_stun`] of a [`ToControl::Stun`] is admitted only while the queued STUN messages
///   stay within [`StunQueue`]'s count and byte bounds; otherwise it is refused at once and the worker
///   drops and counts it ([`Drop::ControlBusy`]). A worker never waits for the control thread.
/// - [`ControlTx::send`] (accounting: `RelayClosed`, `StreamClosed`, `Counters`, `WorkerExited`) is
///   never refused and never blocks. Its volume is bounded by construction: at most one `RelayClosed`
///   per relay socket and one `StreamClosed` per connection the control thread has opened or admitted,
///   and one `Counters` per checkpoint the control thread asked for.
#[derive(Debug, Clone)]
pub struct ControlTx {
    tx: Sender<ToControl>,
    stun: Arc<StunQueue>,
}

/// The bounds on STUN copies waiting for the control thread, and what is queued now.
#[derive(Debug)]
pub struct StunQueue {
    max_messages: usize,
    max_bytes: usize,
    messages: CachePadded<AtomicUsize>,
    bytes: CachePadded<AtomicUsize>,
}

impl StunQueue {
    /// At most `max_messages` STUN copies and `max_bytes` of them queued at once.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        StunQueue {
            max_messages,
            max_bytes,
            messages: CachePadded::new(AtomicUsize::new(0)),
            bytes: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// The control thread took a STUN message of `len` bytes off the queue.
    pub fn taken(&self, len: usize) {
        self.messages.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// (messages, bytes) queued now.
    pub fn depth(&self) -> (usize, usize) {
        (
            self.messages.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn admit(&self, len: usize) -> bool {
        if self.messages.fetch_add(1, Ordering::Relaxed) >= self.max_messages {
            self.messages.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if self
            .bytes
            .fetch_add(len, Ordering::Relaxed)
            .saturating_add(len)
            > self.max_bytes
        {
            self.taken(len);
            return false;
        }
        true
    }
}

impl ControlTx {
    /// The sending end of `tx` (unbounded: the bounds are `stun`'s), whose receiver releases STUN
    /// messages with [`StunQueue::taken`].
    pub fn new(tx: Sender<ToControl>, stun: Arc<StunQueue>) -> Self {
        ControlTx { tx, stun }
    }

    /// Queue a message that must arrive (accounting). Never blocks on an unbounded channel, which
    /// [`ControlTx::new`] is given; fails only if the control thread is gone.
    pub fn send(&self, msg: ToControl) -> Result<(), SendError<ToControl>> {
        self.tx.send(msg)
    }

    /// Queue a copy of the STUN message `bytes` that `worker` received from `client` on `listener`,
    /// if the bounds admit it; false if refused. Admission is decided first, so that a refused message
    /// costs no copy (no allocation under overload).
    pub fn try_send_stun(
        &self,
        worker: usize,
        listener: ListenerId,
        client: SocketAddr,
        bytes: &[u8],
    ) -> bool {
        let len = bytes.len();
        if !self.stun.admit(len) {
            return false;
        }
        let msg = ToControl::Stun {
            worker,
            listener,
            client,
            bytes: bytes.to_vec(),
        };
        if self.tx.try_send(msg).is_err() {
            self.stun.taken(len);
            return false;
        }
        true
    }
}

/// A sender without STUN bounds (tests and benches that drive `Core` alone).
impl From<Sender<ToControl>> for ControlTx {
    fn from(tx: Sender<ToControl>) -> Self {
        ControlTx::new(tx, Arc::new(StunQueue::new(usize::MAX, usize::MAX)))
    }
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
    /// A reload changed the budget of unauthenticated answers (`challenge_rate`, per source per
    /// second): the worker's shard (Binding successes and 401s) takes the new rate.
    BindingRate(u32),
    /// Exit the loop.
    Stop,
}

/// Which UDP listener (the local address of a client's 5-tuple, a [`ListenerId`]) a datagram arrived
/// on, and which socket and source address a datagram to that client leaves from.
///
/// A socket bound to a specific address is one listener. A socket bound to a wildcard address
/// (`0.0.0.0:p`, `[::]:p`, with [`crate::sys::set_pktinfo`]) serves one listener per interface address
/// of its family found at start: each datagram's destination (its `IP_PKTINFO` / `IPV6_PKTINFO`) names
/// the listener, and what goes back to that client carries the same address as its source. A datagram
/// to an address the map does not know (one added to the host after start, or an IPv6 link-local one)
/// is dropped and counted ([`Drop::UnknownLocal`]): the listener set is fixed until a restart.
#[derive(Debug, Clone, Default)]
pub struct ListenerMap {
    /// By listener id: (socket index, the source address to name: `Some` on a wildcard socket).
    ids: Vec<(u16, Option<IpAddr>)>,
    /// By socket index: the listener of a socket bound to a specific address; `None` for a wildcard one.
    sockets: Vec<Option<ListenerId>>,
}

impl ListenerMap {
    /// The map of UDP `listeners` (by id: the addresses clients send to, every wildcard's port
    /// resolved) over the bound `sockets` (by index; a wildcard one with an unspecified IP). A listener
    /// goes to the socket bound to exactly its address, else to the wildcard socket of its port and
    /// family. An error names a listener no socket serves.
    pub fn new(sockets: &[SocketAddr], listeners: &[SocketAddr]) -> io::Result<Self> {
        let mut map = ListenerMap {
            ids: Vec::with_capacity(listeners.len()),
            sockets: vec![None; sockets.len()],
        };
        for (id, l) in listeners.iter().enumerate() {
            let id = ListenerId::try_from(id).map_err(io::Error::other)?;
            let fixed = sockets.iter().position(|s| s == l);
            let entry = match fixed {
                Some(j) => {
                    map.sockets[j] = Some(id);
                    (j, None)
                }
                None => {
                    let j = sockets
                        .iter()
                        .position(|s| {
                            s.ip().is_unspecified()
                                && s.port() == l.port()
                                && s.is_ipv4() == l.is_ipv4()
                        })
                        .ok_or_else(|| {
                            io::Error::other(format!("listen {l}: no socket serves it"))
                        })?;
                    (j, Some(l.ip()))
                }
            };
            let socket = u16::try_from(entry.0).map_err(io::Error::other)?;
            map.ids.push((socket, entry.1));
        }
        Ok(map)
    }

    /// The listener of a datagram that arrived on socket `socket` with destination `local` (from
    /// pktinfo; `None` on a socket bound to a specific address).
    #[inline]
    pub fn listener(&self, socket: u16, local: Option<IpAddr>) -> Option<ListenerId> {
        match self.sockets.get(usize::from(socket))? {
            Some(id) => Some(*id),
            None => {
                let local = local?;
                let i = self
                    .ids
                    .iter()
                    .position(|&(s, src)| s == socket && src == Some(local))?;
                ListenerId::try_from(i).ok()
            }
        }
    }

    /// Whether socket `socket` is bound to a wildcard address (and reads pktinfo).
    pub fn is_wildcard(&self, socket: u16) -> bool {
        matches!(self.sockets.get(usize::from(socket)), Some(None))
    }

    /// The socket index and source address (`Some` on a wildcard socket) that `listener`'s datagrams
    /// leave from.
    #[inline]
    pub fn socket(&self, listener: ListenerId) -> Option<(u16, Option<IpAddr>)> {
        self.ids.get(usize::from(listener)).copied()
    }
}

/// What a worker thread needs to run.
#[derive(Debug)]
pub struct WorkerSetup {
    /// The packet logic.
    pub core: Core,
    /// Its UDP listener sockets, by socket index of `listener_map`.
    pub listeners: Vec<UdpSocket>,
    /// Which listener each datagram on them belongs to.
    pub listener_map: ListenerMap,
    /// Its TCP/TLS listeners and connections.
    pub streams: stream::Streams,
    /// Its mailbox: a wait-free single-producer ring, so that the worker never waits for the control
    /// thread, not even for one caught half-way through a send (on a shared core it may be preempted
    /// there for a whole time slice).
    pub mailbox: rtrb::Consumer<WorkerMsg>,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::route::RelayId;

    const CLIENT: ClientKey = ClientKey {
        client: SocketAddr::V4(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(198, 51, 100, 1),
            4000,
        )),
        listener: 0,
    };

    /// A Binding request (20 bytes) followed by an unknown comprehension-optional attribute of `pad`
    /// bytes: what a client may send, and what `Core` hands to the control thread as is.
    fn stun(pad: u16) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(pad + 4).to_be_bytes());
        m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&0x8123u16.to_be_bytes());
        m.extend_from_slice(&pad.to_be_bytes());
        m.resize(m.len() + usize::from(pad), 0);
        m
    }

    fn on_client(core: &mut Core, msg: &[u8]) {
        let mut slot = [0u8; SLOT];
        slot[HEADROOM..HEADROOM + msg.len()].copy_from_slice(msg);
        let _ = core.on_client(0, CLIENT.client, &mut slot, msg.len());
    }

    /// Back-pressure: beyond the STUN bounds (count, then bytes) copies are refused and counted, while
    /// RelayClosed and StreamClosed from the same worker still go through, in order, without blocking.
    #[test]
    fn a_full_stun_queue_refuses_stun_copies_and_never_accounting() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let queue = Arc::new(StunQueue::new(3, 1000));
        let stats = Arc::new(WorkerStats::default());
        let mut core = Core::new(
            0,
            ControlTx::new(tx, queue.clone()),
            stats.clone(),
            crate::wire::ChannelRange::Rfc8656,
            Arc::default(),
        );
        core.apply(RouteUpdate::AddRelay {
            id: RelayId(1),
            allocation: crate::route::AllocationId(9),
            addr: "203.0.113.1:50000".parse().unwrap(),
            client: CLIENT,
        });
        // Bytes first: 400 + 400 fit in 1000, a third of 400 does not.
        for _ in 0..3 {
            on_client(&mut core, &stun(376));
        }
        assert_eq!(queue.depth(), (2, 800));
        assert_eq!(stats.drops(Drop::ControlBusy), 1);
        // Count next: one small message fits, the fourth message does not.
        on_client(&mut core, &stun(0));
        on_client(&mut core, &stun(0));
        assert_eq!(queue.depth(), (3, 824));
        assert_eq!(stats.drops(Drop::ControlBusy), 2);
        // Accounting under the full queue.
        core.apply(RouteUpdate::RemoveRelay { id: RelayId(1) });
        core.stream_closed(CLIENT);
        let got: Vec<ToControl> = rx.try_iter().collect();
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got[..3].iter().all(|m| matches!(m, ToControl::Stun { .. })));
        assert!(matches!(
            got[3],
            ToControl::RelayClosed {
                allocation: crate::route::AllocationId(9),
                ..
            }
        ));
        assert!(matches!(got[4], ToControl::StreamClosed { .. }));
        // The control thread takes them off: room again.
        for m in &got[..3] {
            if let ToControl::Stun { bytes, .. } = m {
                queue.taken(bytes.len());
            }
        }
        assert_eq!(queue.depth(), (0, 0));
        on_client(&mut core, &stun(376));
        assert_eq!(queue.depth(), (1, 400));
        assert_eq!(stats.drops(Drop::ControlBusy), 2);
    }

    #[test]
    fn a_wildcard_socket_serves_one_listener_per_address_and_a_fixed_one_its_own() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let sockets = [sa("0.0.0.0:3478"), sa("192.0.2.1:3479"), sa("[::]:3478")];
        let listeners = [
            sa("10.0.0.1:3478"),
            sa("10.0.0.2:3478"),
            sa("192.0.2.1:3479"),
            sa("[2001:db8::2]:3478"),
        ];
        let map = ListenerMap::new(&sockets, &listeners).unwrap();
        assert_eq!(map.listener(0, ip("10.0.0.2")), Some(1));
        assert_eq!(map.listener(0, ip("10.0.0.1")), Some(0));
        // A wildcard datagram without pktinfo, or to an address added after start: no listener.
        assert_eq!(map.listener(0, None), None);
        assert_eq!(map.listener(0, ip("10.9.9.9")), None);
        assert_eq!(map.listener(2, ip("10.0.0.1")), None);
        assert_eq!(map.listener(2, ip("2001:db8::2")), Some(3));
        assert_eq!(map.listener(1, None), Some(2));
        assert_eq!(map.listener(9, None), None);
        assert_eq!(map.socket(1), Some((0, ip("10.0.0.2"))));
        assert_eq!(map.socket(2), Some((1, None)));
        assert_eq!(map.socket(4), None);
        assert!(map.is_wildcard(0) && !map.is_wildcard(1) && map.is_wildcard(2));
        assert!(ListenerMap::new(&sockets[1..2], &listeners[..1]).is_err());
    }
}
