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

use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::{Action, Core, Drop, Out, WorkerMsg, WorkerSetup, BATCH, HEADROOM, SLOT};
use crate::route::{RelayId, RouteUpdate};
use crate::sys::mmsg::{recv_batch, send_batch, RecvMeta};

const WAKE: Token = Token(usize::MAX);
/// Tokens below this are listeners; from it upward, relay sockets by id.
const RELAY_BASE: usize = 1 << 16;

pub(super) fn run(setup: WorkerSetup) -> io::Result<()> {
    let WorkerSetup {
        mut core,
        listeners,
        mailbox,
        wake,
    } = setup;
    let mut poll = Poll::new()?;
    for (i, l) in listeners.iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(&l.as_raw_fd()), Token(i), Interest::READABLE)?;
    }
    poll.registry()
        .register(&mut SourceFd(&wake.as_raw_fd()), WAKE, Interest::READABLE)?;
    let mut relays: HashMap<RelayId, UdpSocket> = HashMap::new();
    let mut events = Events::with_capacity(256);
    let mut hot: VecDeque<Token> = VecDeque::with_capacity(1024);
    let mut io = Io {
        slab: vec![0u8; BATCH * SLOT],
        meta: [RecvMeta::default(); BATCH],
        received: 0,
        icmp: false,
        pending: Vec::with_capacity(BATCH),
    };

    loop {
        // Routes first: updates queued before a response went out must apply before anything that follows it.
        if !apply_mailbox(&mut core, &mailbox, &poll, &mut relays, &mut hot)? {
            return Ok(());
        }
        let timeout = if hot.is_empty() {
            None
        } else {
            Some(std::time::Duration::ZERO)
        };
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            if ev.token() == WAKE {
                wake.drain();
            } else {
                hot.push_back(ev.token());
            }
        }
        // Serve each ready socket one batch at a time, round robin.
        for _ in 0..hot.len() {
            let Some(token) = hot.pop_front() else { break };
            let Some(source) = io.recv(&listeners, &relays, token)? else {
                continue;
            };
            // A client may answer a response (e.g. send data right after CreatePermission succeeded) before
            // this thread has seen the wake-up that came with the response's routes. Those routes were
            // queued before the response was sent, so before any datagram reacting to it was received:
            // applying the mailbox after the receive and before the packet logic never misses them (an
            // empty mailbox costs one atomic load per batch).
            if !apply_mailbox(&mut core, &mailbox, &poll, &mut relays, &mut hot)? {
                return Ok(());
            }
            if io.process(&mut core, &listeners, &relays, source) {
                hot.push_back(token);
            }
        }
    }
}

/// Apply every queued mailbox message. False when told to stop.
fn apply_mailbox(
    core: &mut Core,
    mailbox: &crossbeam_channel::Receiver<WorkerMsg>,
    poll: &Poll,
    relays: &mut HashMap<RelayId, UdpSocket>,
    hot: &mut VecDeque<Token>,
) -> io::Result<bool> {
    while let Ok(msg) = mailbox.try_recv() {
        match msg {
            WorkerMsg::AddRelay { socket, update } => {
                if let RouteUpdate::AddRelay { id, .. } = update {
                    let token = Token(RELAY_BASE + id.0 as usize);
                    poll.registry().register(
                        &mut SourceFd(&socket.as_raw_fd()),
                        token,
                        Interest::READABLE,
                    )?;
                    relays.insert(id, socket);
                    // Datagrams may have arrived before registration: look at it once.
                    hot.push_back(token);
                }
                core.apply(update);
            }
            WorkerMsg::Route(update) => {
                if let RouteUpdate::RemoveRelay { id } = update {
                    if let Some(socket) = relays.remove(&id) {
                        let _ = poll
                            .registry()
                            .deregister(&mut SourceFd(&socket.as_raw_fd()));
                    }
                }
                core.apply(update);
            }
            WorkerMsg::Stop => return Ok(false),
        }
    }
    Ok(true)
}

struct Io {
    slab: Vec<u8>,
    meta: [RecvMeta; BATCH],
    /// Datagrams in the slab from the last [`Io::recv`].
    received: usize,
    /// The last receive reported an ICMP error instead of datagrams.
    icmp: bool,
    pending: Vec<(Out, SocketAddr, usize, usize)>,
}

impl Io {
    /// Receive one batch on `token`'s socket. Its source, or `None` if the socket is gone.
    fn recv(
        &mut self,
        listeners: &[UdpSocket],
        relays: &HashMap<RelayId, UdpSocket>,
        token: Token,
    ) -> io::Result<Option<Out>> {
        self.received = 0;
        let (fd, source) = if token.0 < RELAY_BASE {
            let Some(l) = listeners.get(token.0) else {
                return Ok(None);
            };
            (l.as_raw_fd(), Out::Listener(token.0 as u16))
        } else {
            let id = RelayId((token.0 - RELAY_BASE) as u32);
            let Some(s) = relays.get(&id) else {
                return Ok(None);
            };
            (s.as_raw_fd(), Out::Relay(id))
        };
        self.received = match recv_batch(fd, &mut self.slab, SLOT, HEADROOM, &mut self.meta) {
            Ok(n) => n,
            // ICMP errors surface as recv errors on UDP sockets; they concern one earlier send only, and
            // more may be waiting (reported as a full batch).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
                ) =>
            {
                self.icmp = true;
                0
            }
            Err(e) => return Err(e),
        };
        Ok(Some(source))
    }

    /// Run the packet logic on the batch [`Io::recv`] received from `source` and send the forwards. True
    /// if the batch was full (more may be waiting).
    fn process(
        &mut self,
        core: &mut Core,
        listeners: &[UdpSocket],
        relays: &HashMap<RelayId, UdpSocket>,
        source: Out,
    ) -> bool {
        let n = self.received;
        if std::mem::take(&mut self.icmp) {
            return true;
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
            if let Action::Forward { out, dst, range } = action {
                self.pending
                    .push((out, dst, slot_start + range.start, range.len()));
            }
        }
        self.flush(core, listeners, relays);
        n == BATCH
    }

    /// Send the forwards, one `sendmmsg` per run of the same outgoing socket.
    fn flush(
        &mut self,
        core: &Core,
        listeners: &[UdpSocket],
        relays: &HashMap<RelayId, UdpSocket>,
    ) {
        let mut i = 0;
        while i < self.pending.len() {
            let out = self.pending[i].0;
            let mut group: [(SocketAddr, &[u8]); BATCH] =
                [(SocketAddr::from(([0, 0, 0, 0], 0)), &[]); BATCH];
            let mut k = 0;
            while i < self.pending.len() && self.pending[i].0 == out && k < BATCH {
                let (_, dst, start, len) = self.pending[i];
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
            if sent < k {
                core.stats().count_drops(Drop::SendFailed, k - sent);
            }
        }
    }
}
