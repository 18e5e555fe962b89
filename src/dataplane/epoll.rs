//! The epoll backend: mio readiness (edge-triggered), `recvmmsg` into a slab of slots, the packet logic,
//! then `sendmmsg` of the forwards grouped by outgoing socket.
//!
//! A socket whose batch came back full may hold more; it goes on a hot list that is served again before
//! the loop blocks, so one busy socket cannot starve the others and none is forgotten under
//! edge-triggered readiness.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use crossbeam_channel::Receiver;
use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::stream::{Streams, SWEEP};
use super::{
    Action, Bill, Core, Drop, Forward, Out, WorkerMsg, WorkerSetup, BATCH, HEADROOM, SLOT,
};
use crate::route::{ClientKey, RelayId, RouteUpdate};
use crate::sys::mmsg::{recv_batch, send_batch, RecvMeta};

const WAKE: Token = Token(usize::MAX);
/// The worker's stream epoll set (TCP/TLS listeners and connections), nested in this one.
const STREAMS: Token = Token(usize::MAX - 1);
/// Tokens below this are listeners; from it upward, relay sockets by id.
const RELAY_BASE: usize = 1 << 16;

pub(super) fn run(setup: WorkerSetup) -> io::Result<()> {
    let WorkerSetup {
        mut core,
        listeners,
        streams,
        mailbox,
        wake,
    } = setup;
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut SourceFd(&streams.fd()), STREAMS, Interest::READABLE)?;
    for (i, l) in listeners.iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(&l.as_raw_fd()), Token(i), Interest::READABLE)?;
    }
    poll.registry()
        .register(&mut SourceFd(&wake.as_raw_fd()), WAKE, Interest::READABLE)?;
    let mut socks = Sockets {
        poll,
        relays: HashMap::new(),
        hot: VecDeque::with_capacity(1024),
        streams,
    };
    let mut events = Events::with_capacity(256);
    let mut io = Io {
        slab: vec![0u8; BATCH * SLOT],
        meta: [RecvMeta::default(); BATCH],
        pending: Vec::with_capacity(BATCH),
    };

    loop {
        let timeout = if !socks.hot.is_empty() {
            Some(std::time::Duration::ZERO)
        } else if socks.streams.has_connections() {
            Some(SWEEP)
        } else {
            None
        };
        match socks.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if socks.drain_mailbox(&mailbox, &mut core)? {
            return Ok(());
        }
        if socks.streams.has_connections() {
            socks.streams.sweep(&core, std::time::Instant::now());
        }
        for ev in events.iter() {
            if ev.token() == WAKE {
                wake.drain();
            } else if ev.token() == STREAMS {
                let Sockets {
                    streams, relays, ..
                } = &mut socks;
                streams.service(&mut core, &mut |relay, dst, bytes| {
                    relays
                        .get(&relay)
                        .is_some_and(|s| s.send_to(bytes, dst).is_ok())
                });
            } else {
                socks.hot.push_back(ev.token());
            }
        }
        // Serve each ready socket one batch at a time, round robin.
        for _ in 0..socks.hot.len() {
            let Some(token) = socks.hot.pop_front() else {
                break;
            };
            match io.serve(&mut core, &listeners, &mut socks, &mailbox, token)? {
                Served::More => socks.hot.push_back(token),
                Served::Drained => {}
                Served::Stop => return Ok(()),
            }
        }
    }
}

/// The worker's relay sockets and readiness bookkeeping.
struct Sockets {
    poll: Poll,
    relays: HashMap<RelayId, UdpSocket>,
    /// Sockets that may still hold datagrams.
    hot: VecDeque<Token>,
    /// TCP/TLS listeners and connections, served when their epoll set is readable.
    streams: Streams,
}

impl Sockets {
    /// Apply every queued route update. True if told to stop.
    ///
    /// Routes first: the control thread queues the updates for a request before it sends the response,
    /// so applying the mailbox after datagrams were received and before they are looked up means no
    /// datagram can overtake an update queued before it arrived.
    fn drain_mailbox(
        &mut self,
        mailbox: &Receiver<WorkerMsg>,
        core: &mut Core,
    ) -> io::Result<bool> {
        while let Ok(msg) = mailbox.try_recv() {
            match msg {
                WorkerMsg::AddRelay { socket, update } => {
                    if let RouteUpdate::AddRelay { id, .. } = update {
                        let token = Token(RELAY_BASE + id.0 as usize);
                        self.poll.registry().register(
                            &mut SourceFd(&socket.as_raw_fd()),
                            token,
                            Interest::READABLE,
                        )?;
                        self.relays.insert(id, socket);
                        // Datagrams may have arrived before registration: look at it once.
                        self.hot.push_back(token);
                    }
                    core.apply(update);
                }
                WorkerMsg::Route(update) => {
                    if let RouteUpdate::RemoveRelay { id } = update {
                        if let Some(socket) = self.relays.remove(&id) {
                            let _ = self
                                .poll
                                .registry()
                                .deregister(&mut SourceFd(&socket.as_raw_fd()));
                        }
                    }
                    core.apply(update);
                }
                WorkerMsg::SendStream { client, bytes } => {
                    self.streams.send(core, client, &bytes);
                }
                WorkerMsg::Stop => return Ok(true),
            }
        }
        Ok(false)
    }
}

/// What serving one socket found.
enum Served {
    /// A full batch: more may be waiting.
    More,
    /// The socket is drained.
    Drained,
    /// The mailbox said stop.
    Stop,
}

struct Io {
    slab: Vec<u8>,
    meta: [RecvMeta; BATCH],
    /// Forwards of the batch: (socket, destination, start in the slab, length, what to credit once sent).
    pending: Vec<(Out, SocketAddr, usize, usize, Bill)>,
}

impl Io {
    /// Receive one batch on `token`'s socket, run the packet logic, send the forwards. True if the batch was
    /// full (more may be waiting).
    fn serve(
        &mut self,
        core: &mut Core,
        listeners: &[UdpSocket],
        socks: &mut Sockets,
        mailbox: &Receiver<WorkerMsg>,
        token: Token,
    ) -> io::Result<Served> {
        let (fd, source) = if token.0 < RELAY_BASE {
            let Some(l) = listeners.get(token.0) else {
                return Ok(Served::Drained);
            };
            (l.as_raw_fd(), Out::Listener(token.0 as u16))
        } else {
            let id = RelayId((token.0 - RELAY_BASE) as u32);
            let Some(s) = socks.relays.get(&id) else {
                return Ok(Served::Drained);
            };
            (s.as_raw_fd(), Out::Relay(id))
        };
        let n = match recv_batch(fd, &mut self.slab, SLOT, HEADROOM, &mut self.meta) {
            Ok(n) => n,
            // ICMP errors surface as recv errors on UDP sockets; they concern one earlier send only.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EINTR)
                ) =>
            {
                return Ok(Served::More)
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Served::Drained);
        }
        // Updates queued before these datagrams arrived are in the mailbox now: apply them first.
        if socks.drain_mailbox(mailbox, core)? {
            return Ok(Served::Stop);
        }
        self.pending.clear();
        for i in 0..n {
            let meta = self.meta[i];
            let slot_start = i * SLOT;
            let slot = &mut self.slab[slot_start..slot_start + SLOT];
            if meta.truncated {
                core.drop(Drop::Truncated);
                continue;
            }
            let action = match source {
                Out::Listener(l) => core.on_client(l, meta.addr, slot, meta.len),
                Out::Relay(r) => core.on_peer(r, meta.addr, slot, meta.len),
            };
            if let Action::Forward(Forward {
                out,
                dst,
                range,
                bill,
            }) = action
            {
                self.pending
                    .push((out, dst, slot_start + range.start, range.len(), bill));
            }
        }
        self.flush(core, listeners, &socks.relays, &mut socks.streams);
        Ok(if n == BATCH {
            Served::More
        } else {
            Served::Drained
        })
    }

    /// Send the forwards, one `sendmmsg` per run of the same outgoing socket.
    fn flush(
        &mut self,
        core: &mut Core,
        listeners: &[UdpSocket],
        relays: &HashMap<RelayId, UdpSocket>,
        streams: &mut Streams,
    ) {
        let mut i = 0;
        while i < self.pending.len() {
            let out = self.pending[i].0;
            if let Out::Listener(l) = out {
                if streams.is_stream(l) {
                    // Peer data for a TCP/TLS client: into its connection's write queue.
                    let (_, dst, start, len, bill) = self.pending[i];
                    let client = ClientKey {
                        client: dst,
                        listener: l,
                    };
                    if streams.send(core, client, &self.slab[start..start + len]) {
                        core.sent(bill);
                    }
                    i += 1;
                    continue;
                }
            }
            let mut group: [(SocketAddr, &[u8]); BATCH] =
                [(SocketAddr::from(([0, 0, 0, 0], 0)), &[]); BATCH];
            let first = i;
            let mut k = 0;
            while i < self.pending.len() && self.pending[i].0 == out && k < BATCH {
                let (_, dst, start, len, _) = self.pending[i];
                group[k] = (dst, &self.slab[start..start + len]);
                k += 1;
                i += 1;
            }
            let fd = match out {
                Out::Listener(l) => listeners.get(usize::from(l)).map(AsRawFd::as_raw_fd),
                Out::Relay(r) => relays.get(&r).map(AsRawFd::as_raw_fd),
            };
            let sent = match fd {
                Some(fd) => send_batch(fd, &group[..k]).unwrap_or(0),
                None => 0,
            };
            core.stats().count_tx(sent);
            // sendmmsg sends in order: the first `sent` of the group went out.
            for p in &self.pending[first..first + sent] {
                core.sent(p.4);
            }
            if sent < k {
                core.stats().count_drops(Drop::SendFailed, k - sent);
            }
        }
    }
}
