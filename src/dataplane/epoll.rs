//! The epoll backend of the [worker loop](super::worker): mio readiness (edge-triggered), `recvmmsg` into
//! a slab of slots, and `sendmmsg` of the forwards grouped by outgoing socket.
//!
//! A socket whose batch came back full may hold more; it goes back on a hot list that is served again
//! before the loop blocks, so one busy socket cannot starve the others and none is forgotten under
//! edge-triggered readiness. Each [`Io::recv`] serves the next hot socket, one batch at a time, round
//! robin.
//!
//! A `sendmmsg` that stops at datagram k (the kernel refused it) is called again from k + 1: only the
//! refused datagram is dropped, except for a full socket buffer, where every later datagram to the same
//! socket would fail the same way and the rest of the run is dropped (and counted) at once.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::worker::{send_error, Bill, Datagram, Io, Notes, Sent};
use super::{Drop, Out, WorkerSetup, BATCH, HEADROOM, SLOT};
use crate::route::RelayId;
use crate::sys::mmsg::{recv_batch, recv_batch_pktinfo, send_batch_from, RecvMeta, MAX_BATCH};
use crate::sys::EventFd;

const WAKE: Token = Token(usize::MAX);
/// The worker's stream epoll set (TCP/TLS listeners and connections), nested in this one.
const STREAMS: Token = Token(usize::MAX - 1);
/// Tokens below this are listeners; from it upward, relay sockets by id.
const RELAY_BASE: usize = 1 << 16;

pub(super) fn run(setup: WorkerSetup) -> io::Result<()> {
    let io = Epoll::new(setup.wake.clone(), setup.streams.fd())?;
    super::worker::run(setup, io)
}

/// The epoll backend's state (see the module doc).
#[derive(Debug)]
pub(super) struct Epoll {
    poll: Poll,
    events: Events,
    /// The worker's eventfd.
    wake: Arc<EventFd>,
    /// Listener sockets by index, and whether each reads pktinfo (bound to a wildcard address).
    listeners: Vec<(UdpSocket, bool)>,
    relays: HashMap<RelayId, UdpSocket>,
    /// Sockets that may still hold datagrams.
    hot: VecDeque<Token>,
    /// Hot sockets still to serve before the next wait.
    round: usize,
    /// The stream epoll set was readable.
    streams_ready: bool,
    /// `BATCH` slots of `SLOT` bytes.
    slab: Vec<u8>,
    recv_meta: [RecvMeta; BATCH],
    /// Forwards of the current batch: (socket, source address, destination, slab offset, length, bill).
    pending: Vec<(Out, Option<IpAddr>, SocketAddr, usize, usize, Bill)>,
}

impl Epoll {
    /// A backend woken by `wake`, watching the stream epoll set `streams` beside its UDP sockets.
    pub(super) fn new(wake: Arc<EventFd>, streams: RawFd) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut SourceFd(&streams), STREAMS, Interest::READABLE)?;
        poll.registry()
            .register(&mut SourceFd(&wake.as_raw_fd()), WAKE, Interest::READABLE)?;
        Ok(Epoll {
            poll,
            events: Events::with_capacity(256),
            wake,
            listeners: Vec::new(),
            relays: HashMap::new(),
            hot: VecDeque::with_capacity(1024),
            round: 0,
            streams_ready: false,
            slab: vec![0u8; BATCH * SLOT],
            recv_meta: [RecvMeta::default(); BATCH],
            pending: Vec::with_capacity(BATCH),
        })
    }

    fn fd(&self, out: Out) -> Option<RawFd> {
        match out {
            Out::Listener(l) => self.listeners.get(usize::from(l)).map(|s| s.0.as_raw_fd()),
            Out::Relay(r) => self.relays.get(&r).map(AsRawFd::as_raw_fd),
        }
    }

    /// One `recvmmsg` on the socket of `token`: its source, how many datagrams arrived, and whether more
    /// may be waiting. `Ok(None)` if the socket is gone.
    fn recv_one(&mut self, token: Token) -> io::Result<Option<(Out, usize, bool)>> {
        let (fd, source, pktinfo) = if token.0 < RELAY_BASE {
            let Some((l, pktinfo)) = self.listeners.get(token.0) else {
                return Ok(None);
            };
            (l.as_raw_fd(), Out::Listener(token.0 as u16), *pktinfo)
        } else {
            let id = RelayId((token.0 - RELAY_BASE) as u32);
            let Some(s) = self.relays.get(&id) else {
                return Ok(None);
            };
            (s.as_raw_fd(), Out::Relay(id), false)
        };
        let recv = if pktinfo {
            recv_batch_pktinfo
        } else {
            recv_batch
        };
        match recv(fd, &mut self.slab, SLOT, HEADROOM, &mut self.recv_meta) {
            Ok(n) => Ok(Some((source, n, n == BATCH))),
            // ICMP errors surface as recv errors on UDP sockets; they concern one earlier send only.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EINTR)
                ) =>
            {
                Ok(Some((source, 0, true)))
            }
            Err(e) => Err(e),
        }
    }
}

impl Io for Epoll {
    const BATCH: usize = BATCH;
    /// One flush reports each datagram of the batch once.
    const MAX_SENT: usize = BATCH;

    fn register(&mut self, socket: UdpSocket, source: Out, pktinfo: bool) -> io::Result<()> {
        let token = match source {
            Out::Listener(l) => Token(usize::from(l)),
            Out::Relay(id) => Token(RELAY_BASE + id.0 as usize),
        };
        self.poll.registry().register(
            &mut SourceFd(&socket.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        // Datagrams that arrived before registration need no extra look: EPOLL_CTL_ADD polls the socket
        // and queues an event at once if it is already readable (edge-triggered too), so the next wait
        // reports it. A relay socket costs no `recvmmsg` that can only find it empty.
        match source {
            Out::Listener(l) => {
                debug_assert_eq!(usize::from(l), self.listeners.len());
                self.listeners.push((socket, pktinfo));
            }
            Out::Relay(id) => {
                // A socket replaced under the same id closes here, which takes it out of the epoll set.
                self.relays.insert(id, socket);
            }
        }
        Ok(())
    }

    fn deregister(&mut self, id: RelayId) -> io::Result<()> {
        // Closing the socket takes it out of the epoll set (the worker holds its only descriptor): no
        // EPOLL_CTL_DEL first. Events or hot entries still naming it find no socket and are skipped.
        self.relays.remove(&id);
        Ok(())
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let timeout = if self.hot.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            match ev.token() {
                // Only the counter needs resetting: the mailbox is drained after every batch.
                WAKE => self.wake.drain(),
                STREAMS => self.streams_ready = true,
                token => self.hot.push_back(token),
            }
        }
        self.round = self.hot.len();
        Ok(())
    }

    fn recv(&mut self, meta: &mut [Datagram], notes: &mut Notes) -> io::Result<usize> {
        if self.streams_ready {
            self.streams_ready = false;
            notes.streams = true;
        }
        while self.round > 0 {
            self.round -= 1;
            let Some(token) = self.hot.pop_front() else {
                break;
            };
            let Some((source, n, more)) = self.recv_one(token)? else {
                continue;
            };
            if more {
                self.hot.push_back(token);
            }
            let got = n.min(meta.len());
            if got == 0 {
                continue;
            }
            for (d, m) in meta.iter_mut().zip(&self.recv_meta[..got]) {
                *d = Datagram {
                    source,
                    local: m.local,
                    from: m.addr,
                    len: m.len,
                    truncated: m.truncated,
                };
            }
            return Ok(got);
        }
        Ok(0)
    }

    fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        let start = i * SLOT;
        self.slab.get_mut(start..start + SLOT).unwrap_or_default()
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
        if range.end > SLOT || range.start > range.end {
            sent.push((bill, Err(Drop::SendFailed)));
            return;
        }
        self.pending
            .push((out, src, dst, i * SLOT + range.start, range.len(), bill));
    }

    fn flush(&mut self, sent: &mut Vec<Sent>) {
        let mut i = 0;
        while i < self.pending.len() {
            let (out, src) = (self.pending[i].0, self.pending[i].1);
            let mut group: [(SocketAddr, &[u8]); MAX_BATCH] =
                [(SocketAddr::from(([0, 0, 0, 0], 0)), &[]); MAX_BATCH];
            let first = i;
            let mut k = 0;
            // One run per socket and source address: one sendmmsg shares one control message.
            while i < self.pending.len()
                && (self.pending[i].0, self.pending[i].1) == (out, src)
                && k < MAX_BATCH
            {
                let (_, _, dst, start, len, _) = self.pending[i];
                group[k] = (dst, &self.slab[start..start + len]);
                k += 1;
                i += 1;
            }
            let Some(fd) = self.fd(out) else {
                for p in &self.pending[first..i] {
                    sent.push((p.5, Err(Drop::SendFailed)));
                }
                continue;
            };
            let pending = &self.pending[first..i];
            send_batch_from(fd, &group[..k], src, |j, result| {
                let why = result.map_err(|e| send_error(e.raw_os_error().unwrap_or(0)));
                sent.push((pending[j].5, why));
            });
        }
        self.pending.clear();
    }

    fn send_to(&mut self, out: Out, dst: SocketAddr, bytes: &[u8]) -> Result<(), Drop> {
        let sock = match out {
            Out::Listener(l) => self.listeners.get(usize::from(l)).map(|s| &s.0),
            Out::Relay(r) => self.relays.get(&r),
        };
        match sock.map(|s| s.send_to(bytes, dst)) {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(send_error(e.raw_os_error().unwrap_or(0))),
            None => Err(Drop::SendFailed),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dataplane::{Bill, Direction};

    /// A relay socket is registered without a look of its own: a datagram already queued on it is
    /// reported by the next wait all the same (EPOLL_CTL_ADD polls it). Deregistering closes it
    /// (its port can be bound again), without EPOLL_CTL_DEL.
    #[test]
    fn a_datagram_queued_before_registration_is_received_and_deregistering_closes() {
        let wake = Arc::new(EventFd::new().unwrap());
        let streams = EventFd::new().unwrap();
        let mut io = Epoll::new(wake, streams.as_raw_fd()).unwrap();
        let relay =
            crate::sys::bind_udp("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
        let addr = relay.local_addr().unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"early", addr).unwrap();
        let id = RelayId(3);
        io.register(relay, Out::Relay(id), false).unwrap();
        let mut meta = vec![Datagram::default(); BATCH];
        let mut notes = Notes {
            streams: false,
            sent: Vec::new(),
        };
        let mut got = 0;
        for _ in 0..20 {
            io.wait(Some(Duration::from_millis(100))).unwrap();
            got = io.recv(&mut meta, &mut notes).unwrap();
            if got > 0 {
                break;
            }
        }
        assert_eq!(got, 1);
        assert!(matches!(meta[0].source, Out::Relay(r) if r == id));
        assert_eq!(meta[0].from, peer.local_addr().unwrap());
        assert_eq!(&io.slot_mut(0)[HEADROOM..HEADROOM + meta[0].len], b"early");
        io.deregister(id).unwrap();
        assert!(io.fd(Out::Relay(id)).is_none());
        UdpSocket::bind(addr).expect("the deregistered relay socket is closed");
        io.wait(Some(Duration::ZERO)).unwrap();
        assert_eq!(io.recv(&mut meta, &mut notes).unwrap(), 0);
    }

    /// Finding 8: one `sendmmsg` whose second datagram the kernel refuses still sends the third, and
    /// reports each outcome with its own bill.
    #[test]
    fn a_refused_datagram_in_the_middle_of_a_batch_drops_only_itself() {
        let wake = Arc::new(EventFd::new().unwrap());
        let streams = EventFd::new().unwrap();
        let mut io = Epoll::new(wake, streams.as_raw_fd()).unwrap();
        let relay =
            crate::sys::bind_udp("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
        let id = RelayId(7);
        io.register(relay, Out::Relay(id), false).unwrap();
        let p = UdpSocket::bind("127.0.0.1:0").unwrap();
        p.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let good = p.local_addr().unwrap();
        let refused: SocketAddr = "255.255.255.255:9".parse().unwrap();
        let mut sent = Vec::new();
        for (i, dst) in [good, refused, good].into_iter().enumerate() {
            io.slot_mut(i)[HEADROOM..HEADROOM + 10].fill(i as u8);
            let bill = Bill {
                relay: id,
                dir: Direction::ToPeer,
                payload: i as u32 + 1,
            };
            io.send(
                i,
                Out::Relay(id),
                None,
                dst,
                HEADROOM..HEADROOM + 10,
                bill,
                &mut sent,
            );
        }
        assert!(sent.is_empty(), "queued until the flush");
        io.flush(&mut sent);
        let mut outcomes: Vec<(u32, bool)> =
            sent.iter().map(|(b, r)| (b.payload, r.is_ok())).collect();
        outcomes.sort_unstable();
        assert_eq!(outcomes, [(1, true), (2, false), (3, true)]);
        let mut buf = [0u8; 64];
        for i in [0u8, 2] {
            let (n, _) = p.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 10]);
        }
    }
}
