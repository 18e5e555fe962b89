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
//! and STUN requests (the control path) are copied to the control thread over a bounded channel.
//!
//! May use: wire, route, policy, sys, metrics.

mod core;
mod epoll;
pub mod framing;
mod stats;
pub mod stream;
pub mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

pub use self::core::{Action, Bill, Core, Direction, Forward, Out};
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
