//! The one worker loop, written once over both I/O backends.
//!
//! ```text
//!  wait ──▶ receive a batch ──▶ drain the mailbox ──▶ settle sends ──▶ Core per datagram ──▶ send the batch
//!   ▲       (Io::recv)          (routes first)        (bill / count)   (Action::Forward)     (Io::send, flush)
//!   └──────────────── sweep stream timeouts ◀─────────── until the backend has nothing more ◀─┘
//! ```
//!
//! UDP listeners: a backend knows listener *sockets* (by index) and reports each datagram's
//! destination address where the socket is bound to a wildcard; the loop turns (socket, destination)
//! into the [`ListenerId`] that `Core` and the control thread know, and a listener back into its socket
//! and source address for sends ([`ListenerMap`]).
//!
//! A backend ([`Io`]) only registers sockets, receives a batch of datagrams into buffers it owns, and
//! sends a batch out of those same buffers. Everything else (the mailbox, dispatch to [`Core`], the
//! stream-or-UDP branch, the sweep, counting what was sent) is here. The loop is generic over the
//! backend, so each backend gets its own monomorphised copy and nothing is dispatched dynamically per
//! packet.
//!
//! Routes first: the control thread queues the updates a request caused before it sends the response,
//! so draining the mailbox after a batch was received and before its datagrams are looked up means no
//! datagram can overtake an update queued before it arrived.
//!
//! Sends are counted when the kernel has taken them ([`Sent`]): synchronously for `sendmmsg`, when the
//! completion arrives for io_uring. A datagram the kernel refuses is dropped and counted by reason, and
//! only that datagram.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::stream::{Streams, SWEEP};
pub(super) use super::Bill;
use super::{Action, Core, Drop, Forward, ListenerMap, Out, WorkerMsg, WorkerSetup};
use crate::route::{ClientKey, RelayId, RouteUpdate};

/// One received datagram of the current batch; its bytes are in the backend's slot `i`
/// ([`Io::slot_mut`]) at `HEADROOM..HEADROOM + len`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Datagram {
    /// The socket it arrived on (`Out::Listener` carries the listener *socket* index).
    pub source: Out,
    /// Its destination address, on a listener socket bound to a wildcard address.
    pub local: Option<IpAddr>,
    /// Its sender.
    pub from: SocketAddr,
    /// Payload bytes.
    pub len: usize,
    /// It did not fit a slot (or its source could not be read): drop it.
    pub truncated: bool,
}

impl Default for Datagram {
    fn default() -> Self {
        Datagram {
            source: Out::Listener(0),
            local: None,
            from: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            truncated: false,
        }
    }
}

/// The outcome of one send: taken by the kernel, or dropped for a reason.
pub(super) type Sent = (Bill, Result<(), Drop>);

/// What a backend noticed besides datagrams.
#[derive(Debug)]
pub(super) struct Notes {
    /// The stream epoll set is readable: run [`Streams::service`].
    pub streams: bool,
    /// Outcomes of sends (filled by the backend, settled by the loop).
    pub sent: Vec<Sent>,
}

/// An I/O backend: sockets, a batch in, a batch out (quinn-udp's shape). Nothing here may allocate, lock,
/// log or block per packet, except [`Io::wait`], which blocks by design.
pub(super) trait Io {
    /// Datagrams per receive batch at most.
    const BATCH: usize;
    /// Send outcomes reported between two settles at most (the loop reserves room for them once).
    const MAX_SENT: usize;

    /// Own `socket` and receive on it; its datagrams come with `source`. With `pktinfo` (a listener
    /// socket bound to a wildcard address) each datagram's destination address is read too.
    fn register(&mut self, socket: UdpSocket, source: Out, pktinfo: bool) -> io::Result<()>;

    /// Stop receiving on relay socket `id` and close it (once nothing of it is in flight).
    fn deregister(&mut self, id: RelayId) -> io::Result<()>;

    /// Submit what is queued and block until something may be ready, at most `timeout` (`None`: no
    /// limit). Returns at once if the backend knows of work already.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;

    /// Take the next batch of datagrams into `meta` (at most `meta.len()`), and note send outcomes and a
    /// readable stream set in `notes`. Returns how many datagrams; 0 with nothing noted means: wait.
    fn recv(&mut self, meta: &mut [Datagram], notes: &mut Notes) -> io::Result<usize>;

    /// The whole slot of datagram `i` of the current batch.
    fn slot_mut(&mut self, i: usize) -> &mut [u8];

    /// Send `range` of datagram `i`'s slot to `dst` from `out` (a listener by socket index), naming
    /// source address `src` if given (a wildcard socket), queued until [`Io::flush`] or sent at once.
    /// Its outcome goes to `sent`, now or with a later [`Io::recv`].
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        i: usize,
        out: Out,
        src: Option<IpAddr>,
        dst: SocketAddr,
        range: Range<usize>,
        bill: Bill,
        sent: &mut Vec<Sent>,
    );

    /// The batch is dispatched: send what [`Io::send`] queued, and give back every slot not sent from.
    fn flush(&mut self, sent: &mut Vec<Sent>);

    /// Send `bytes` to `dst` from `out` now (messages of TCP/TLS clients, which are not in a slot).
    fn send_to(&mut self, out: Out, dst: SocketAddr, bytes: &[u8]) -> Result<(), Drop>;
}

/// Why the kernel refused a datagram, for the drop counters.
pub(super) fn send_error(errno: i32) -> Drop {
    match errno {
        libc::EAGAIN | libc::ENOBUFS => Drop::SendBufferFull,
        libc::EMSGSIZE => Drop::TooBig,
        _ => Drop::SendFailed,
    }
}

/// Run a worker's loop on backend `io` until it is told to stop.
pub(super) fn run<I: Io>(setup: WorkerSetup, mut io: I) -> io::Result<()> {
    let WorkerSetup {
        mut core,
        listeners,
        listener_map,
        mut streams,
        mut mailbox,
        wake: _wake,
    } = setup;
    for (i, l) in listeners.into_iter().enumerate() {
        let socket = u16::try_from(i).map_err(io::Error::other)?;
        io.register(l, Out::Listener(socket), listener_map.is_wildcard(socket))?;
    }
    let mut meta = vec![Datagram::default(); I::BATCH];
    let mut notes = Notes {
        streams: false,
        sent: Vec::with_capacity(I::MAX_SENT),
    };
    loop {
        io.wait(streams.has_connections().then_some(SWEEP))?;
        if streams.has_connections() {
            streams.sweep(&core, Instant::now());
        }
        loop {
            let n = io.recv(&mut meta, &mut notes)?;
            // Routes first (see the module doc).
            if drain_mailbox(&mut mailbox, &mut core, &mut io, &mut streams)? {
                return Ok(());
            }
            if n == 0 && !notes.streams && notes.sent.is_empty() {
                break;
            }
            settle(&mut core, &mut notes.sent);
            core.begin_batch();
            if notes.streams {
                notes.streams = false;
                streams.service(&mut core, &mut |relay, dst, bytes| {
                    io.send_to(Out::Relay(relay), dst, bytes)
                });
            }
            for (i, d) in meta.iter().take(n).enumerate() {
                if d.truncated {
                    core.drop(Drop::Truncated);
                    continue;
                }
                let action = match d.source {
                    Out::Listener(socket) => match listener_map.listener(socket, d.local) {
                        Some(l) => core.on_client(l, d.from, io.slot_mut(i), d.len),
                        None => core.drop(Drop::UnknownLocal),
                    },
                    Out::Relay(r) => core.on_peer(r, d.from, io.slot_mut(i), d.len),
                };
                let Action::Forward(Forward {
                    out,
                    dst,
                    range,
                    bill,
                }) = action
                else {
                    continue;
                };
                match out {
                    Out::Listener(l) if streams.is_stream(l) => {
                        // Peer data for a TCP/TLS client: into its connection's write queue.
                        let client = ClientKey {
                            client: dst,
                            listener: l,
                        };
                        let slot = io.slot_mut(i);
                        // Billed once queued: the connection's bounded queue is the send buffer.
                        if slot
                            .get(range)
                            .is_some_and(|bytes| streams.send(&core, client, bytes))
                        {
                            core.sent(bill);
                        }
                    }
                    _ => match outgoing(&listener_map, out) {
                        Some((out, src)) => io.send(i, out, src, dst, range, bill, &mut notes.sent),
                        None => notes.sent.push((bill, Err(Drop::SendFailed))),
                    },
                }
            }
            io.flush(&mut notes.sent);
            settle(&mut core, &mut notes.sent);
        }
    }
}

/// The socket (a listener by socket index) and source address that datagrams from `out` leave from.
#[inline]
fn outgoing(map: &ListenerMap, out: Out) -> Option<(Out, Option<IpAddr>)> {
    match out {
        Out::Listener(l) => {
            let (socket, src) = map.socket(l)?;
            Some((Out::Listener(socket), src))
        }
        Out::Relay(_) => Some((out, None)),
    }
}

/// Apply every queued message from the control thread. True if told to stop.
fn drain_mailbox<I: Io>(
    mailbox: &mut rtrb::Consumer<WorkerMsg>,
    core: &mut Core,
    io: &mut I,
    streams: &mut Streams,
) -> io::Result<bool> {
    // A message the control thread is still writing is not visible yet, and nothing waits for it: the
    // response that announces its route is sent after it is complete.
    while let Ok(msg) = mailbox.pop() {
        match msg {
            WorkerMsg::AddRelay { socket, update } => {
                if let RouteUpdate::AddRelay { id, .. } = update {
                    io.register(socket, Out::Relay(id), false)?;
                }
                core.apply(update);
            }
            WorkerMsg::Route(update) => {
                if let RouteUpdate::RemoveRelay { id } = update {
                    io.deregister(id)?;
                }
                core.apply(update);
            }
            WorkerMsg::SendStream { client, bytes } => {
                streams.send(core, client, &bytes);
            }
            WorkerMsg::BindingRate(rate) => core.set_binding_rate(rate),
            WorkerMsg::Stop => return Ok(true),
        }
    }
    Ok(false)
}

/// Count the outcomes of sends, and bill what the kernel took.
fn settle(core: &mut Core, sent: &mut Vec<Sent>) {
    for (bill, result) in sent.drain(..) {
        match result {
            Ok(()) => {
                core.stats().count_tx(1);
                core.sent(bill);
            }
            Err(why) => {
                core.drop(why);
            }
        }
    }
}
