//! The io_uring backend: one [`Ring`] per worker, with one multishot receive armed on every socket the
//! worker owns, all fed from one provided buffer ring (see [`crate::sys::uring`]).
//!
//! Each loop iteration submits everything queued and waits for at least one completion in one
//! `io_uring_enter`, then takes the completions in batches. Before each batch it drains the mailbox, so that
//! route updates apply before any datagram that follows them (a wake-up read completes with every message).
//! Then:
//!
//! - a datagram goes through [`Core`] in its buffer; a forward sends *that* buffer with `SendMsg` from the
//!   outgoing socket (no copy), and the buffer returns to the kernel's ring when the send completes;
//!   anything else returns it at once;
//! - a receive that ended (out of buffers, an ICMP error, a completion queue overflow) is armed again;
//! - a wake-up read of the worker's eventfd is armed again (the mailbox was drained before the batch).
//!
//! Multishot rather than several single-shot receives per socket: a buffer is taken only when a datagram
//! arrives, so idle relay sockets cost no buffer, and there is one request per socket, whatever the load.
//! The ring needs Linux 6.0; [`crate::sys::uring::probe`] checks, and older kernels get the epoll backend.
//!
//! A removed relay socket stops receiving (its receive is cancelled) at once, but is closed only when none
//! of its operations is in flight any more.
//!
//! Nothing on the per-packet path allocates, locks or logs: buffers, send headers and the completion batch
//! are allocated with the ring; the socket table grows only when relays are added.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use hashbrown::HashMap;

use super::stream::{Streams, SWEEP};
use super::{
    Action, Bill, Core, Drop, Forward, Out, WorkerMsg, WorkerSetup, HEADROOM, MAX_DATAGRAM, SLOT,
};
use crate::route::{ClientKey, RelayId, RouteUpdate};
use crate::sys::uring::{Buf, Completion, Ring, RingConfig};

/// Whether this backend is implemented.
pub const IMPLEMENTED: bool = true;

/// Receive buffers per worker (`SLOT` bytes each: 2 MiB). Buffers are reused in ring order, so fewer
/// keep the working set in cache; a burst beyond them waits in the socket buffers until the next round.
const BUFFERS: u16 = 512;
/// Submission queue entries (a full queue is submitted and reused at once).
const ENTRIES: u32 = 256;

pub(super) fn run(setup: WorkerSetup) -> io::Result<()> {
    let WorkerSetup {
        core,
        listeners,
        streams,
        mailbox,
        wake,
    } = setup;
    let ring = Ring::new(RingConfig {
        entries: ENTRIES,
        buffers: BUFFERS,
        slot_size: SLOT,
        headroom: HEADROOM,
        max_payload: MAX_DATAGRAM,
    })?;
    let mut w = Worker {
        core,
        socks: Sockets::default(),
        ring,
        retry: Vec::with_capacity(64),
        bills: vec![None; usize::from(BUFFERS)],
        wake: wake.as_raw_fd(),
        streams,
    };
    for (i, l) in listeners.into_iter().enumerate() {
        let tag = w.socks.insert(l, Out::Listener(i as u16));
        w.socks.arm(&mut w.ring, tag, &mut w.retry)?;
    }
    w.ring.read_eventfd(w.wake)?;
    w.ring.poll_readable(w.streams.fd(), STREAMS_TAG)?;

    loop {
        let n = w.retry.len();
        for i in 0..n {
            let (tag, what) = w.retry[i];
            match what {
                Retry::Arm => w.socks.arm(&mut w.ring, tag, &mut w.retry)?,
                Retry::Cancel => w.socks.cancel(&mut w.ring, tag, &mut w.retry)?,
                Retry::PollStreams => w.poll_streams()?,
            }
        }
        w.retry.drain(..n);

        // Interrupted waits return Ok: the loop just goes round again.
        if w.streams.has_connections() {
            w.ring.submit_and_wait_timeout(1, SWEEP)?;
            w.streams.sweep(&w.core, std::time::Instant::now());
        } else {
            w.ring.submit_and_wait(1)?;
        }

        while w.ring.reap() > 0 {
            // Routes first: updates queued before a response went out must apply before anything that
            // follows it. Every datagram of this batch arrived before the batch was taken, so whatever was
            // queued before it is in the mailbox now.
            while let Ok(msg) = mailbox.try_recv() {
                if !w.on_message(msg)? {
                    return Ok(());
                }
            }
            while let Some(c) = w.ring.next_completion() {
                w.on_completion(c)?;
            }
        }
    }
}

/// A worker's state besides its mailbox. (`wake` is kept open by the caller's `Arc<EventFd>`.)
#[derive(Debug)]
struct Worker {
    core: Core,
    socks: Sockets,
    ring: Ring,
    /// Receives that could not be armed or cancelled (full submission queue): retried every iteration.
    retry: Vec<(u32, Retry)>,
    /// Per receive buffer: what to credit when its send in flight completes successfully.
    bills: Vec<Option<Bill>>,
    wake: RawFd,
    /// TCP/TLS listeners and connections, served when their epoll set is readable.
    streams: Streams,
}

/// The tag of the readiness poll on the worker's stream epoll set.
const STREAMS_TAG: u32 = u32::MAX;

impl Worker {
    /// Arm the readiness poll of the stream epoll set (again later if the submission queue is full).
    fn poll_streams(&mut self) -> io::Result<()> {
        match self.ring.poll_readable(self.streams.fd(), STREAMS_TAG) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.retry.push((STREAMS_TAG, Retry::PollStreams));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Apply a message from the control thread. False: stop.
    fn on_message(&mut self, msg: WorkerMsg) -> io::Result<bool> {
        let Worker {
            core,
            socks,
            ring,
            retry,
            streams,
            ..
        } = self;
        match msg {
            WorkerMsg::AddRelay { socket, update } => {
                if let RouteUpdate::AddRelay { id, .. } = update {
                    if let Some(old) = socks.relays.get(&id).copied() {
                        socks.close(ring, old, retry)?;
                    }
                    let tag = socks.insert(socket, Out::Relay(id));
                    socks.relays.insert(id, tag);
                    // Datagrams that arrived before this are picked up by the first receive.
                    socks.arm(ring, tag, retry)?;
                }
                core.apply(update);
            }
            WorkerMsg::Route(update) => {
                if let RouteUpdate::RemoveRelay { id } = update {
                    if let Some(tag) = socks.relays.get(&id).copied() {
                        socks.close(ring, tag, retry)?;
                    }
                }
                core.apply(update);
            }
            WorkerMsg::SendStream { client, bytes } => {
                streams.send(core, client, &bytes);
            }
            WorkerMsg::Stop => return Ok(false),
        }
        Ok(true)
    }

    fn on_completion(&mut self, c: Completion) -> io::Result<()> {
        let Worker {
            core,
            socks,
            ring,
            retry,
            bills,
            wake,
            streams,
        } = self;
        match c {
            Completion::Recv {
                tag,
                buf,
                from,
                len,
                truncated,
                more,
            } => {
                let Some(s) = socks.get_mut(tag) else {
                    ring.release(buf);
                    return Ok(());
                };
                let source = s.source;
                let live = !s.closing;
                if !more {
                    s.armed = false;
                    s.inflight -= 1;
                }
                if !live {
                    ring.release(buf);
                } else if truncated {
                    core.drop(Drop::Truncated);
                    ring.release(buf);
                } else {
                    let action = match source {
                        Out::Listener(l) => core.on_client(l, from, ring.buf_mut(&buf), len),
                        Out::Relay(r) => core.on_peer(r, from, ring.buf_mut(&buf), len),
                    };
                    match action {
                        Action::Forward(Forward {
                            out: Out::Listener(l),
                            dst,
                            range,
                            bill,
                        }) if streams.is_stream(l) => {
                            // Peer data for a TCP/TLS client: into its connection's write queue.
                            let client = ClientKey {
                                client: dst,
                                listener: l,
                            };
                            if streams.send(core, client, &ring.buf_mut(&buf)[range]) {
                                core.sent(bill);
                            }
                            ring.release(buf);
                        }
                        Action::Forward(f) => {
                            let i = buf.index();
                            if socks.forward(ring, core, buf, f.out, f.dst, f.range) {
                                if let Some(b) = bills.get_mut(i) {
                                    *b = Some(f.bill);
                                }
                            }
                        }
                        Action::Done => ring.release(buf),
                    }
                }
                if !more {
                    socks.ended(ring, tag, 0, retry)?;
                }
            }
            Completion::RecvEnded { tag, errno } => {
                if let Some(s) = socks.get_mut(tag) {
                    s.armed = false;
                    s.inflight -= 1;
                }
                socks.ended(ring, tag, errno, retry)?;
            }
            Completion::Sent { tag, buf, result } => {
                let bill = bills.get_mut(buf).and_then(Option::take);
                if result >= 0 {
                    core.stats().count_tx(1);
                    if let Some(bill) = bill {
                        core.sent(bill);
                    }
                } else {
                    core.stats().count_drop(Drop::SendFailed);
                }
                if let Some(s) = socks.get_mut(tag) {
                    s.inflight -= 1;
                }
                socks.close_if_idle(tag);
            }
            Completion::Wake => ring.read_eventfd(*wake)?,
            Completion::Ready { .. } => {
                streams.service(core, &mut |relay, dst, bytes| {
                    socks
                        .udp(Out::Relay(relay))
                        .is_some_and(|s| s.send_to(bytes, dst).is_ok())
                });
                return self.poll_streams();
            }
        }
        Ok(())
    }
}

/// Something to do again next iteration, because the submission queue was full.
#[derive(Debug, Clone, Copy)]
enum Retry {
    Arm,
    Cancel,
    PollStreams,
}

/// A socket the worker owns.
#[derive(Debug)]
struct Sock {
    socket: UdpSocket,
    source: Out,
    /// Its multishot receive is armed.
    armed: bool,
    /// Its operations in flight: the receive, and sends from it.
    inflight: u32,
    /// Removed from the routes: close it once nothing is in flight.
    closing: bool,
}

/// The worker's sockets, indexed by tag (listeners first, in config order).
#[derive(Debug, Default)]
struct Sockets {
    slots: Vec<Option<Sock>>,
    free: Vec<u32>,
    /// Live relay sockets (not closing).
    relays: HashMap<RelayId, u32>,
}

impl Sockets {
    fn insert(&mut self, socket: UdpSocket, source: Out) -> u32 {
        let sock = Sock {
            socket,
            source,
            armed: false,
            inflight: 0,
            closing: false,
        };
        match self.free.pop() {
            Some(tag) => {
                self.slots[tag as usize] = Some(sock);
                tag
            }
            None => {
                self.slots.push(Some(sock));
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn get_mut(&mut self, tag: u32) -> Option<&mut Sock> {
        self.slots.get_mut(tag as usize).and_then(Option::as_mut)
    }

    /// The live socket for `out`.
    fn udp(&self, out: Out) -> Option<&UdpSocket> {
        let tag = match out {
            Out::Listener(l) => u32::from(l),
            Out::Relay(r) => *self.relays.get(&r)?,
        };
        let s = self.slots.get(tag as usize)?.as_ref()?;
        (!s.closing).then_some(&s.socket)
    }

    /// The descriptor and tag of an outgoing socket.
    fn out(&self, out: Out) -> Option<(RawFd, u32)> {
        let tag = match out {
            Out::Listener(l) => u32::from(l),
            Out::Relay(r) => *self.relays.get(&r)?,
        };
        let s = self.slots.get(tag as usize)?.as_ref()?;
        (!s.closing).then(|| (s.socket.as_raw_fd(), tag))
    }

    /// Arm the receive of a live socket that has none.
    fn arm(&mut self, ring: &mut Ring, tag: u32, retry: &mut Vec<(u32, Retry)>) -> io::Result<()> {
        let Some(s) = self.get_mut(tag) else {
            return Ok(());
        };
        if s.armed || s.closing {
            return Ok(());
        }
        match ring.recv(s.socket.as_raw_fd(), tag) {
            Ok(()) => {
                s.armed = true;
                s.inflight += 1;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                retry.push((tag, Retry::Arm));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Cancel the receive of a closing socket.
    fn cancel(
        &mut self,
        ring: &mut Ring,
        tag: u32,
        retry: &mut Vec<(u32, Retry)>,
    ) -> io::Result<()> {
        match self.get_mut(tag) {
            Some(s) if s.armed => match ring.cancel_recv(tag) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    retry.push((tag, Retry::Cancel));
                    Ok(())
                }
                Err(e) => Err(e),
            },
            _ => Ok(()),
        }
    }

    /// Stop routing to a socket and stop its receive; it closes once nothing of it is in flight.
    fn close(
        &mut self,
        ring: &mut Ring,
        tag: u32,
        retry: &mut Vec<(u32, Retry)>,
    ) -> io::Result<()> {
        let Some(s) = self.get_mut(tag) else {
            return Ok(());
        };
        s.closing = true;
        if let Out::Relay(id) = s.source {
            if self.relays.get(&id) == Some(&tag) {
                self.relays.remove(&id);
            }
        }
        self.cancel(ring, tag, retry)?;
        self.close_if_idle(tag);
        Ok(())
    }

    fn close_if_idle(&mut self, tag: u32) {
        if self
            .get_mut(tag)
            .is_some_and(|s| s.closing && s.inflight == 0)
        {
            // Dropping the socket closes it; its tag can be reused: no completion of it can come any more.
            self.slots[tag as usize] = None;
            self.free.push(tag);
        }
    }

    /// A socket's receive ended with `errno` (0: no error): arm it again, or finish closing it.
    fn ended(
        &mut self,
        ring: &mut Ring,
        tag: u32,
        errno: i32,
        retry: &mut Vec<(u32, Retry)>,
    ) -> io::Result<()> {
        if self.get_mut(tag).map_or(true, |s| s.closing) {
            self.close_if_idle(tag);
            return Ok(());
        }
        match errno {
            // Out of buffers, an ICMP error concerning an earlier send, a cancellation, an overflow.
            0
            | libc::ENOBUFS
            | libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ECANCELED
            | libc::EINTR
            | libc::EAGAIN => {}
            _ => return Err(io::Error::from_raw_os_error(errno)),
        }
        self.arm(ring, tag, retry)
    }

    /// Send `range` of `buf` to `dst` from `out`, counting a failure to queue it. True if queued.
    fn forward(
        &mut self,
        ring: &mut Ring,
        core: &Core,
        buf: Buf,
        out: Out,
        dst: SocketAddr,
        range: Range<usize>,
    ) -> bool {
        let Some((fd, tag)) = self.out(out) else {
            ring.release(buf);
            core.stats().count_drop(Drop::SendFailed);
            return false;
        };
        match ring.send(buf, fd, tag, range, dst) {
            Ok(()) => {
                if let Some(s) = self.get_mut(tag) {
                    s.inflight += 1;
                }
                true
            }
            Err(_) => {
                core.stats().count_drop(Drop::SendFailed);
                false
            }
        }
    }
}
