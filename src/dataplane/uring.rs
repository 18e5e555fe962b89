//! The io_uring backend of the worker loop (`worker.rs`): one [`Ring`] per worker, with one multishot
//! receive armed on every socket the worker owns, all fed from one provided buffer ring (see
//! [`crate::sys::uring`]).
//!
//! `Io::wait` submits everything queued and waits for at least one completion in one `io_uring_enter`;
//! `Io::recv` then hands the completions over in batches (the loop drains its mailbox after each, so
//! that route updates apply before any datagram that follows them; a wake-up read completes with every
//! message):
//!
//! - a datagram goes through `Core` in its buffer; a forward sends *that* buffer with `SendMsg` from the
//!   outgoing socket (no copy), and the buffer returns to the kernel's ring when the send completes,
//!   whose result is the send's outcome; anything else returns it at `Io::flush`;
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
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;

use super::worker::{send_error, Bill, Datagram, Io, Notes, Sent};
use super::{Drop, Out, WorkerSetup, HEADROOM, MAX_DATAGRAM, SLOT};
use crate::route::RelayId;
use crate::sys::uring::{Buf, Completion, Ring, RingConfig, HDR};
use crate::sys::EventFd;

/// Whether this backend is implemented.
pub const IMPLEMENTED: bool = true;

/// Receive buffers per worker (`SLOT` bytes each: 2 MiB). Buffers are reused in ring order, so fewer
/// keep the working set in cache; a burst beyond them waits in the socket buffers until the next round.
const BUFFERS: u16 = 512;
/// Submission queue entries (a full queue is submitted and reused at once).
const ENTRIES: u32 = 256;
/// Datagrams handed to the loop per batch.
const BATCH: usize = 64;
/// Bytes in front of each [`SLOT`] of the ring's buffers: the kernel writes its receive header, the
/// source address and a pktinfo control message ([`HDR`] bytes) in front of the payload, more than the
/// data plane's [`HEADROOM`]. The loop sees `slot[PAD..]`, so its layout is the same as epoll's.
const PAD: usize = (HDR - HEADROOM + 7) & !7;

pub(super) fn run(setup: WorkerSetup) -> io::Result<()> {
    let io = Uring::new(setup.wake.clone(), setup.streams.fd())?;
    super::worker::run(setup, io)
}

/// The io_uring backend's state (see the module doc).
#[derive(Debug)]
pub(super) struct Uring {
    socks: Sockets,
    ring: Ring,
    /// Receives that could not be armed or cancelled (full submission queue): retried every iteration.
    retry: Vec<(u32, Retry)>,
    /// The worker's eventfd.
    wake: Arc<EventFd>,
    /// The worker's stream epoll set.
    streams: RawFd,
    /// The buffers of the current batch (taken by a send, or given back at flush).
    bufs: Vec<Option<Buf>>,
    /// What each buffer's send in flight is billed as, by buffer index.
    bills: Box<[Option<Bill>]>,
}

/// The tag of the readiness poll on the worker's stream epoll set.
const STREAMS_TAG: u32 = u32::MAX;

impl Uring {
    /// A backend woken by `wake`, watching the stream epoll set `streams` beside its UDP sockets.
    pub(super) fn new(wake: Arc<EventFd>, streams: RawFd) -> io::Result<Self> {
        let ring = Ring::new(RingConfig {
            entries: ENTRIES,
            buffers: BUFFERS,
            slot_size: PAD + SLOT,
            headroom: PAD + HEADROOM,
            max_payload: MAX_DATAGRAM,
        })?;
        let mut u = Uring {
            socks: Sockets::default(),
            ring,
            retry: Vec::with_capacity(64),
            wake,
            streams,
            bufs: (0..BATCH).map(|_| None).collect(),
            bills: vec![None; usize::from(BUFFERS)].into_boxed_slice(),
        };
        u.ring.read_eventfd(u.wake.as_raw_fd())?;
        u.ring.poll_readable(u.streams, STREAMS_TAG)?;
        Ok(u)
    }

    /// Arm the readiness poll of the stream epoll set (again later if the submission queue is full).
    fn poll_streams(&mut self) -> io::Result<()> {
        match self.ring.poll_readable(self.streams, STREAMS_TAG) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.retry.push((STREAMS_TAG, Retry::PollStreams));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Io for Uring {
    const BATCH: usize = BATCH;
    /// Every send in flight holds a buffer; the batch's own failures come on top.
    const MAX_SENT: usize = BUFFERS as usize + BATCH;

    /// Every receive has room for a pktinfo control message (one buffer ring feeds all sockets), so
    /// `pktinfo` needs nothing here: the kernel writes one only on sockets with the option.
    fn register(&mut self, socket: UdpSocket, source: Out, _pktinfo: bool) -> io::Result<()> {
        let Uring {
            socks, ring, retry, ..
        } = self;
        if let Out::Relay(id) = source {
            if let Some(old) = socks.relays.get(&id).copied() {
                socks.close(ring, old, retry)?;
            }
        }
        let tag = socks.insert(socket, source);
        if let Out::Relay(id) = source {
            socks.relays.insert(id, tag);
        }
        // Datagrams that arrived before this are picked up by the first receive.
        socks.arm(ring, tag, retry)
    }

    fn deregister(&mut self, id: RelayId) -> io::Result<()> {
        let Uring {
            socks, ring, retry, ..
        } = self;
        match socks.relays.get(&id).copied() {
            Some(tag) => socks.close(ring, tag, retry),
            None => Ok(()),
        }
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let n = self.retry.len();
        for i in 0..n {
            let (tag, what) = self.retry[i];
            let Uring {
                socks, ring, retry, ..
            } = self;
            match what {
                Retry::Arm => socks.arm(ring, tag, retry)?,
                Retry::Cancel => socks.cancel(ring, tag, retry)?,
                Retry::PollStreams => self.poll_streams()?,
            }
        }
        self.retry.drain(..n);
        // Interrupted waits return Ok: the loop just goes round again.
        match timeout {
            Some(t) => self.ring.submit_and_wait_timeout(1, t),
            None => self.ring.submit_and_wait(1),
        }
    }

    fn recv(&mut self, meta: &mut [Datagram], notes: &mut Notes) -> io::Result<usize> {
        let mut n = 0;
        let cap = meta.len().min(BATCH);
        // Every completion handed over here was posted before `reap` took it, so the mailbox the loop
        // drains after this call holds whatever was queued before these datagrams arrived.
        while n < cap && self.ring.reap() > 0 {
            while n < cap {
                let Some(c) = self.ring.next_completion() else {
                    break;
                };
                let Uring {
                    socks,
                    ring,
                    retry,
                    wake,
                    bills,
                    ..
                } = self;
                match c {
                    Completion::Recv {
                        tag,
                        buf,
                        from,
                        len,
                        truncated,
                        local,
                        more,
                    } => {
                        let Some(s) = socks.get_mut(tag) else {
                            ring.release(buf);
                            continue;
                        };
                        let (source, live) = (s.source, !s.closing);
                        if !more {
                            s.armed = false;
                            s.inflight -= 1;
                        }
                        if live {
                            meta[n] = Datagram {
                                source,
                                local,
                                from,
                                len,
                                truncated,
                            };
                            self.bufs[n] = Some(buf);
                            n += 1;
                        } else {
                            ring.release(buf);
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
                    Completion::Sent {
                        tag,
                        buf: index,
                        result,
                    } => {
                        // Every send in flight has its bill; its buffer index is free again now.
                        if let Some(bill) = bills.get_mut(index).and_then(Option::take) {
                            let outcome = if result >= 0 {
                                Ok(())
                            } else {
                                Err(send_error(-result))
                            };
                            notes.sent.push((bill, outcome));
                        }
                        if let Some(s) = socks.get_mut(tag) {
                            s.inflight -= 1;
                        }
                        socks.close_if_idle(tag);
                    }
                    Completion::Wake => ring.read_eventfd(wake.as_raw_fd())?,
                    Completion::Ready { .. } => {
                        // Armed again now, submitted at the next wait: after the loop served the set.
                        notes.streams = true;
                        self.poll_streams()?;
                    }
                }
            }
        }
        Ok(n)
    }

    fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        match self.bufs.get(i).and_then(Option::as_ref) {
            Some(buf) => self.ring.buf_mut(buf).get_mut(PAD..).unwrap_or_default(),
            None => &mut [],
        }
    }

    fn send(
        &mut self,
        i: usize,
        out: Out,
        src: Option<IpAddr>,
        dst: SocketAddr,
        range: Range<usize>,
        bill: Bill,
        sent: &mut Vec<Sent>,
    ) {
        let Some(buf) = self.bufs.get_mut(i).and_then(Option::take) else {
            sent.push((bill, Err(Drop::SendFailed)));
            return;
        };
        let Some((fd, tag)) = self.socks.out(out) else {
            self.ring.release(buf);
            sent.push((bill, Err(Drop::SendFailed)));
            return;
        };
        let index = buf.index();
        // The buffer returns to the kernel's ring when the send completes (or at once if it fails).
        let range = range.start + PAD..range.end + PAD;
        match self.ring.send(buf, fd, tag, range, dst, src) {
            Ok(()) => {
                if let Some(b) = self.bills.get_mut(index) {
                    *b = Some(bill);
                }
                if let Some(s) = self.socks.get_mut(tag) {
                    s.inflight += 1;
                }
            }
            Err(e) => sent.push((
                bill,
                Err(match e.kind() {
                    io::ErrorKind::WouldBlock => Drop::SendBufferFull,
                    _ => Drop::SendFailed,
                }),
            )),
        }
    }

    fn flush(&mut self, _sent: &mut Vec<Sent>) {
        // Sends were queued by `send` and are submitted with the next wait; give back the rest.
        for b in &mut self.bufs {
            if let Some(buf) = b.take() {
                self.ring.release(buf);
            }
        }
    }

    fn send_to(&mut self, out: Out, dst: SocketAddr, bytes: &[u8]) -> Result<(), Drop> {
        match self.socks.udp(out).map(|s| s.send_to(bytes, dst)) {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(send_error(e.raw_os_error().unwrap_or(0))),
            None => Err(Drop::SendFailed),
        }
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
}
