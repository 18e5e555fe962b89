//! TURN over TCP and TLS (RFC 8656 §3.1): a worker's stream listeners and connections.
//!
//! Each worker owns SO_REUSEPORT TCP listeners (the kernel spreads connections over the workers) and the
//! connections accepted on them, all registered with one epoll instance of its own ([`Streams::fd`]). The
//! worker's event loop waits on that fd beside its UDP sockets: the epoll backend nests it in its own epoll
//! set, the io_uring backend arms a poll on it. When it is readable, [`Streams::service`] runs with plain
//! non-blocking syscalls. The UDP fast path is untouched.
//!
//! A connection is one client 5-tuple: `ClientKey { client: its address, listener: the stream listener's
//! id }`. Its bytes are framed ([`super::framing`]) and each message goes through [`Core::on_client`] exactly
//! as a datagram would: ChannelData and Send indications to peers from the worker, STUN requests to the
//! control thread. Replies and peer data come back through [`Streams::send`], padded to 4 bytes
//! (RFC 8656 §12.5), into a bounded write queue; when a slow client's queue is full the message is dropped
//! and counted ([`Drop::StreamQueueFull`]), so memory stays bounded and no other flow waits.
//!
//! A malformed frame closes that connection only. Closing a connection tells the control thread
//! ([`ToControl::StreamClosed`](super::ToControl::StreamClosed)), which ends its allocation.
//!
//! Limits ([`StreamLimits`]) are shared by every worker: connections in total and per source IP, an idle
//! timeout for connections without an allocation, and a TLS handshake timeout.
//!
//! May use: wire, route, sys, metrics.

use std::collections::HashMap as StdHashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use mio::{Events, Interest, Poll, Token};

use super::framing::{Framer, MAX_FRAME};
use super::{Action, Core, Drop, Forward, Out, HEADROOM};
use crate::route::{ClientKey, ListenerId, RelayId};
use crate::wire::{self, ChannelRange};

/// Tokens below this are listeners; from it upward, connections by slot.
const CONN_BASE: usize = 1 << 16;
/// Reads from one connection per readiness event; a connection with more is looked at again after the
/// others (so one busy client cannot starve the rest of the worker).
const READ_BUDGET: usize = 16;
/// How often idle and handshake timeouts are checked.
pub const SWEEP: Duration = Duration::from_millis(500);

/// Limits on stream connections (shared by all workers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimits {
    /// Connections open at once, over all workers.
    pub max_connections: usize,
    /// Connections open at once from one source: one IPv4 address, or one IPv6 /64 (what one host or
    /// subscriber is given, so a client cannot dodge the cap by walking its own prefix).
    pub max_per_ip: usize,
    /// A connection that has not delivered its first complete STUN message or ChannelData frame this long
    /// after it was accepted is closed (TLS handshake time included).
    pub first_message_timeout: Duration,
    /// A connection without an allocation that delivers no complete message for this long is closed.
    /// Read attempts and partial bytes do not count: one byte every few seconds does not hold a slot.
    pub idle_timeout: Duration,
    /// A TLS connection whose handshake has not finished after this long is closed.
    pub tls_handshake_timeout: Duration,
    /// TLS handshakes under way at once on one worker; a TLS connection accepted beyond it is refused, so
    /// handshake work on a worker (which also relays UDP) stays bounded.
    pub max_tls_handshakes: usize,
    /// Bytes queued for one client before peer data to it is dropped.
    pub write_queue: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_connections: 10_000,
            max_per_ip: 100,
            first_message_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_tls_handshakes: 64,
            write_queue: 256 * 1024,
        }
    }
}

/// Counters of the stream side, over all workers. The per-transport ones are indexed by
/// [`StreamStats::TRANSPORTS`] (0: TCP, 1: TLS). Counted per connection, never per message.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Connections accepted, by transport.
    pub accepted: [AtomicU64; 2],
    /// Connections refused by a limit, by transport.
    pub refused: [AtomicU64; 2],
    /// Connections closed for a malformed frame or a TLS error.
    pub malformed: AtomicU64,
    /// Connections closed by a timeout.
    pub timed_out: AtomicU64,
    /// Connections open now, by transport.
    pub open: [AtomicUsize; 2],
}

impl StreamStats {
    /// The transports' names, in index order.
    pub const TRANSPORTS: [&'static str; 2] = ["tcp", "tls"];

    /// Connections accepted, both transports.
    pub fn accepted_total(&self) -> u64 {
        self.accepted
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// Connections refused, both transports.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Connections open now, both transports.
    pub fn open_total(&self) -> usize {
        self.open.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Per transport, for `/metrics`.
    pub fn snapshot(&self) -> Vec<crate::metrics::StreamSnapshot> {
        Self::TRANSPORTS
            .iter()
            .enumerate()
            .map(|(i, transport)| crate::metrics::StreamSnapshot {
                transport,
                open: self.open[i].load(Ordering::Relaxed) as u64,
                accepted: self.accepted[i].load(Ordering::Relaxed),
                refused: self.refused[i].load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// What every worker's stream side shares: limits, the current TLS configuration, connection counts.
#[derive(Debug)]
pub struct StreamShared {
    limits: StreamLimits,
    tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// Open connections by [`source_key`].
    per_ip: Mutex<StdHashMap<IpAddr, usize>>,
    /// Counters.
    pub stats: StreamStats,
}

impl StreamShared {
    /// Shared state with `limits` and, for TLS listeners, a server configuration.
    pub fn new(limits: StreamLimits, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        StreamShared {
            limits,
            tls: RwLock::new(tls),
            per_ip: Mutex::new(StdHashMap::new()),
            stats: StreamStats::default(),
        }
    }

    /// Use `config` for TLS connections accepted from now on (existing ones keep theirs).
    pub fn set_tls(&self, config: Arc<rustls::ServerConfig>) {
        if let Ok(mut t) = self.tls.write() {
            *t = Some(config);
        }
    }

    fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.read().ok().and_then(|t| t.clone())
    }

    /// Count a new connection from `ip` (over TLS: `tls`) if the limits allow it.
    fn admit(&self, ip: IpAddr, tls: bool) -> bool {
        let Ok(mut per_ip) = self.per_ip.lock() else {
            return false;
        };
        if self.stats.open_total() >= self.limits.max_connections {
            return false;
        }
        let n = per_ip.entry(source_key(ip)).or_insert(0);
        if *n >= self.limits.max_per_ip {
            return false;
        }
        *n += 1;
        self.stats.open[usize::from(tls)].fetch_add(1, Ordering::Relaxed);
        true
    }

    fn release(&self, ip: IpAddr, tls: bool) {
        if let Ok(mut per_ip) = self.per_ip.lock() {
            let k = source_key(ip);
            if let Some(n) = per_ip.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&k);
                }
            }
        }
        self.stats.open[usize::from(tls)].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Build a TLS server configuration (TLS 1.2 and 1.3) from a PEM certificate chain and a PEM private key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |file, problem: String| TlsError { file, problem };
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(TlsFile::Cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(
            TlsFile::Cert,
            "no CERTIFICATE block in the PEM file".into(),
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| err(TlsFile::Key, e.to_string()))?;
    // A PEM block can be well-formed around bytes that are no key: say so of the key file, before the
    // pair is checked.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| err(TlsFile::Key, format!("not a usable private key: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(TlsFile::Pair, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err(TlsFile::Pair, e.to_string()))?;
    Ok(Arc::new(config))
}

/// Which file of a certificate and key pair a [`TlsError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// The PEM certificate chain.
    Cert,
    /// The PEM private key.
    Key,
    /// Both: each reads, but they do not belong together (or TLS cannot be set up with them).
    Pair,
}

/// A certificate chain or private key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// The file at fault.
    pub file: TlsFile,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = match self.file {
            TlsFile::Cert => "certificate",
            TlsFile::Key => "key",
            TlsFile::Pair => "certificate and key",
        };
        write!(f, "{file}: {}", self.problem)
    }
}

impl std::error::Error for TlsError {}

/// How messages of stream clients reach peers: send `bytes` to the peer from a relay socket, now.
pub type SendRelay<'a> = dyn FnMut(RelayId, SocketAddr, &[u8]) -> Result<(), Drop> + 'a;

/// A stream listener handed to a worker.
#[derive(Debug)]
pub struct StreamListener {
    /// The bound, listening socket.
    pub socket: TcpListener,
    /// Its listener id (after the UDP listeners' ids).
    pub id: ListenerId,
    /// Whether connections speak TLS.
    pub tls: bool,
}

/// One client connection.
#[derive(Debug)]
struct Conn {
    sock: mio::net::TcpStream,
    key: ClientKey,
    framer: Framer,
    /// Bytes to write: `out[out_at..]`.
    out: Vec<u8>,
    out_at: usize,
    tls: Option<Box<rustls::ServerConnection>>,
    accepted: Instant,
    /// When the last complete message came in; `None` until the first one.
    last_msg: Option<Instant>,
    /// Counted in [`Streams::handshaking`].
    handshaking: bool,
    want_write: bool,
}

/// A worker's stream listeners and connections (see the module doc).
#[derive(Debug)]
pub struct Streams {
    poll: Poll,
    events: Events,
    /// The ready list of one poll (kept to reuse its allocation).
    ready: Vec<(Token, bool)>,
    listeners: Vec<(mio::net::TcpListener, ListenerId, bool)>,
    first_id: ListenerId,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_key: HashMap<ClientKey, usize>,
    /// A message copied out of a framer, at `HEADROOM` like a datagram.
    scratch: Vec<u8>,
    shared: Arc<StreamShared>,
    range: ChannelRange,
    last_sweep: Instant,
    /// TLS connections of this worker whose handshake has not finished.
    handshaking: usize,
}

impl Streams {
    /// A worker's stream side with `listeners`; `first_id` is the smallest id a stream listener can have
    /// (every id from it upward is a stream listener).
    pub fn new(
        listeners: Vec<StreamListener>,
        first_id: ListenerId,
        shared: Arc<StreamShared>,
        range: ChannelRange,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut ls = Vec::with_capacity(listeners.len());
        for (i, l) in listeners.into_iter().enumerate() {
            l.socket.set_nonblocking(true)?;
            let mut m = mio::net::TcpListener::from_std(l.socket);
            poll.registry()
                .register(&mut m, Token(i), Interest::READABLE)?;
            ls.push((m, l.id, l.tls));
        }
        Ok(Streams {
            poll,
            events: Events::with_capacity(256),
            ready: Vec::with_capacity(256),
            listeners: ls,
            first_id,
            conns: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            scratch: Vec::new(),
            shared,
            range,
            last_sweep: Instant::now(),
            handshaking: 0,
        })
    }

    /// The fd to wait on: readable when a listener or connection needs service.
    pub fn fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    /// Whether `listener` is a stream listener.
    #[inline]
    pub fn is_stream(&self, listener: ListenerId) -> bool {
        listener >= self.first_id
    }

    /// Whether any connection is open (then [`Streams::sweep`] should run about every [`SWEEP`]).
    pub fn has_connections(&self) -> bool {
        !self.by_key.is_empty()
    }

    /// Serve every ready listener and connection. Messages for peers are sent with `send_relay`.
    pub fn service(&mut self, core: &mut Core, send_relay: &mut SendRelay<'_>) {
        loop {
            if let Err(e) = self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("stream poll: {e}");
                }
                return;
            }
            let mut ready = std::mem::take(&mut self.ready);
            ready.clear();
            ready.extend(
                self.events
                    .iter()
                    .map(|ev| (ev.token(), ev.is_writable() || ev.is_write_closed())),
            );
            let n = ready.len();
            for &(token, writable) in &ready {
                if token.0 < CONN_BASE {
                    self.accept(token.0);
                } else {
                    let slot = token.0 - CONN_BASE;
                    if writable {
                        self.flush(core, slot);
                    }
                    self.read(core, slot, send_relay);
                }
            }
            self.ready = ready;
            if n < self.events.capacity() {
                break;
            }
        }
        self.sweep(core, Instant::now());
    }

    /// Queue `msg` (a STUN message or ChannelData) for the client `key`, padded to 4 bytes, and try to
    /// write it. Dropped and counted if the client's queue is full or it has no connection here. True if
    /// queued (what a relayed datagram is billed on).
    pub fn send(&mut self, core: &Core, key: ClientKey, msg: &[u8]) -> bool {
        let Some(&slot) = self.by_key.get(&key) else {
            core.drop(Drop::StreamQueueFull);
            return false;
        };
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            core.drop(Drop::StreamQueueFull);
            return false;
        };
        let padded = wire::pad4(msg.len());
        if c.out.len() - c.out_at + padded > self.shared.limits.write_queue {
            core.drop(Drop::StreamQueueFull);
            return false;
        }
        if c.out_at > 0 && c.out_at == c.out.len() {
            c.out.clear();
            c.out_at = 0;
        }
        c.out.extend_from_slice(msg);
        c.out.resize(c.out.len() + padded - msg.len(), 0);
        core.stats().count_tx(1);
        self.flush(core, slot);
        true
    }

    /// Close connections past their idle or handshake timeout (at most every [`SWEEP`]).
    pub fn sweep(&mut self, core: &Core, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP {
            return;
        }
        self.last_sweep = now;
        let limits = &self.shared.limits;
        let mut expired = Vec::new();
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            let handshaking = c.tls.as_ref().is_some_and(|t| t.is_handshaking());
            let age = now.saturating_duration_since(c.accepted);
            let late_handshake = handshaking && age > limits.tls_handshake_timeout;
            let expired_conn = match c.last_msg {
                None => age > limits.first_message_timeout,
                Some(at) => {
                    now.saturating_duration_since(at) > limits.idle_timeout
                        && !core.table().has_client(c.key)
                }
            };
            if late_handshake || expired_conn {
                expired.push(slot);
            }
        }
        for slot in expired {
            self.shared.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            self.close(core, slot);
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let Some((listener, id, tls)) = self.listeners.get(index) else {
                return;
            };
            let (id, tls) = (*id, *tls);
            let (mut sock, from) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNABORTED, EMFILE…: this connection is lost, the listener carries on.
                    tracing::debug!("accept: {e}");
                    return;
                }
            };
            let from = canonical(from);
            let refused = &self.shared.stats.refused[usize::from(tls)];
            if tls && self.handshaking >= self.shared.limits.max_tls_handshakes {
                // Refused before any handshake work: the socket closes as it drops.
                refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !self.shared.admit(from.ip(), tls) {
                refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let over_tls = tls;
            let tls = if tls {
                let conn = self
                    .shared
                    .tls()
                    .and_then(|cfg| rustls::ServerConnection::new(cfg).ok());
                match conn {
                    Some(c) => Some(Box::new(c)),
                    None => {
                        self.shared.release(from.ip(), over_tls);
                        continue;
                    }
                }
            } else {
                None
            };
            let _ = sock.set_nodelay(true);
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
            };
            if self
                .poll
                .registry()
                .register(&mut sock, Token(CONN_BASE + slot), Interest::READABLE)
                .is_err()
            {
                self.free.push(slot);
                self.shared.release(from.ip(), over_tls);
                continue;
            }
            let key = ClientKey {
                client: from,
                listener: id,
            };
            let now = Instant::now();
            let handshaking = tls.is_some();
            self.handshaking += usize::from(handshaking);
            self.conns[slot] = Some(Conn {
                sock,
                key,
                framer: Framer::new(self.range),
                out: Vec::new(),
                out_at: 0,
                tls,
                accepted: now,
                last_msg: None,
                handshaking,
                want_write: false,
            });
            self.by_key.insert(key, slot);
            self.shared.stats.accepted[usize::from(over_tls)].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&mut self, core: &mut Core, slot: usize, send_relay: &mut SendRelay<'_>) {
        if self.scratch.len() < HEADROOM + MAX_FRAME + 4 {
            self.scratch.resize(HEADROOM + MAX_FRAME + 4, 0);
        }
        let mut close = false;
        let mut wrote_tls = false;
        let mut budget = READ_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            // Fill the framer with whatever the socket (or TLS) has.
            let got = match &mut c.tls {
                None => match c.sock.read(c.framer.spare()) {
                    Ok(0) => Err(()),
                    Ok(n) => {
                        c.framer.filled(n);
                        Ok(true)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                    Err(_) => Err(()),
                },
                Some(tls) => read_tls(tls, &mut c.sock, &mut c.framer, &mut wrote_tls),
            };
            let more = match got {
                Ok(more) => more,
                Err(_) => {
                    close = true;
                    false
                }
            };
            if c.handshaking && !c.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
                c.handshaking = false;
                self.handshaking = self.handshaking.saturating_sub(1);
            }
            // Hand every whole message to the packet logic. Only a whole message counts as activity.
            let key = c.key;
            loop {
                let msg = match c.framer.next_frame() {
                    Ok(Some(m)) => {
                        c.last_msg = Some(Instant::now());
                        m
                    }
                    Ok(None) => break,
                    Err(_) => {
                        self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        core.drop(Drop::Malformed);
                        close = true;
                        break;
                    }
                };
                let len = msg.len();
                self.scratch[HEADROOM..HEADROOM + len].copy_from_slice(msg);
                if let Action::Forward(Forward {
                    out: Out::Relay(relay),
                    dst,
                    range,
                    bill,
                }) = core.on_stream_client(key.listener, key.client, &mut self.scratch, len)
                {
                    match self.scratch.get(range) {
                        Some(bytes) => match send_relay(relay, dst, bytes) {
                            Ok(()) => {
                                core.stats().count_tx(1);
                                core.sent(bill);
                            }
                            Err(why) => {
                                core.drop(why);
                            }
                        },
                        None => {
                            core.drop(Drop::Malformed);
                        }
                    }
                }
            }
            if close || !more {
                break;
            }
            budget -= 1;
            if budget == 0 {
                // More may be waiting: re-arming the registration queues a new readiness event (edge
                // triggered, nothing else would), served after the connections already ready.
                let interest = if c.want_write {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                let _ =
                    self.poll
                        .registry()
                        .reregister(&mut c.sock, Token(CONN_BASE + slot), interest);
                break;
            }
        }
        let tls = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.tls.is_some());
        if close {
            self.close(core, slot);
        } else if wrote_tls || tls {
            self.flush(core, slot);
        }
    }

    /// Write what is queued; watch for writability while some is left.
    fn flush(&mut self, core: &Core, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let res = match &mut c.tls {
            None => {
                let mut res = Ok(true);
                while c.out_at < c.out.len() {
                    match c.sock.write(&c.out[c.out_at..]) {
                        Ok(n) => c.out_at += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            res = Ok(false);
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                res
            }
            Some(tls) => write_tls(tls, &mut c.sock, &c.out, &mut c.out_at),
        };
        match res {
            Ok(done) => {
                if done {
                    c.out.clear();
                    c.out_at = 0;
                    if c.out.capacity() > 64 * 1024 {
                        c.out.shrink_to(16 * 1024);
                    }
                }
                if done == c.want_write {
                    c.want_write = !done;
                    let interest = if done {
                        Interest::READABLE
                    } else {
                        Interest::READABLE | Interest::WRITABLE
                    };
                    let _ = self.poll.registry().reregister(
                        &mut c.sock,
                        Token(CONN_BASE + slot),
                        interest,
                    );
                }
            }
            Err(_) => self.close(core, slot),
        }
    }

    fn close(&mut self, core: &Core, slot: usize) {
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.sock);
        self.by_key.remove(&c.key);
        self.free.push(slot);
        if c.handshaking {
            self.handshaking = self.handshaking.saturating_sub(1);
        }
        self.shared.release(c.key.client.ip(), c.tls.is_some());
        core.stream_closed(c.key);
    }
}

/// Read TLS records and decrypt what they carry into `framer`. `Ok(true)` if more may be waiting,
/// `Ok(false)` once the socket would block, `Err` to close.
fn read_tls(
    tls: &mut rustls::ServerConnection,
    sock: &mut mio::net::TcpStream,
    framer: &mut Framer,
    wrote: &mut bool,
) -> Result<bool, ()> {
    let more = match tls.read_tls(sock) {
        Ok(0) => return Err(()),
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
        Err(_) => return Err(()),
    };
    let state = match tls.process_new_packets() {
        Ok(s) => s,
        Err(_) => {
            // Send the alert, best effort.
            let _ = tls.write_tls(sock);
            return Err(());
        }
    };
    if tls.wants_write() {
        *wrote = true;
    }
    let mut plain = state.plaintext_bytes_to_read();
    while plain > 0 {
        match tls.reader().read(framer.spare()) {
            Ok(0) => break,
            Ok(n) => {
                framer.filled(n);
                plain = plain.saturating_sub(n);
                // The framer may be full of one partial frame only when it is MAX_FRAME long; frames
                // are taken out by the caller between reads, so stop here and come back.
                if framer.buffered() >= MAX_FRAME {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return Err(()),
        }
    }
    if state.peer_has_closed() {
        return Err(());
    }
    Ok(more || plain > 0)
}

/// Move queued plaintext into TLS records and write them. `Ok(true)` when everything is written.
fn write_tls(
    tls: &mut rustls::ServerConnection,
    sock: &mut mio::net::TcpStream,
    out: &[u8],
    out_at: &mut usize,
) -> io::Result<bool> {
    loop {
        if tls.wants_write() {
            match tls.write_tls(sock) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if *out_at >= out.len() {
            return Ok(true);
        }
        if tls.is_handshaking() {
            // Plaintext waits for the handshake; the read side writes its flights.
            return Ok(false);
        }
        let end = out.len().min(*out_at + 16 * 1024);
        let n = tls.writer().write(&out[*out_at..end])?;
        if n == 0 {
            return Ok(false);
        }
        *out_at += n;
    }
}

/// What the per-source cap counts by: an IPv4 address itself, an IPv6 address's /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
    }
}

/// An IPv4-mapped IPv6 address (from a dual-stack listener) as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The slowloris defences, driven as a worker drives [`Streams`]: real loopback sockets, `service`
    //! after each write, and `sweep` with a clock a little ahead where a deadline is due.
    use super::*;
    use std::net::TcpStream;
    use std::thread::sleep;

    /// A Binding request: a whole STUN message the framer hands on.
    const BINDING: [u8; 20] = [
        0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];

    fn core() -> (Core, crossbeam_channel::Receiver<super::super::ToControl>) {
        let (tx, rx) = crossbeam_channel::bounded(64);
        let core = Core::new(0, tx, Arc::default(), ChannelRange::Rfc8656, Arc::default());
        (core, rx)
    }

    fn limits() -> StreamLimits {
        StreamLimits {
            first_message_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            tls_handshake_timeout: Duration::from_secs(5),
            ..StreamLimits::default()
        }
    }

    /// A worker's stream side on one loopback listener, TLS or not.
    fn streams(limits: StreamLimits, tls: bool) -> (Streams, Arc<StreamShared>, SocketAddr) {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let cfg = tls.then(|| {
            let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            tls_config(
                c.cert.pem().as_bytes(),
                c.key_pair.serialize_pem().as_bytes(),
            )
            .unwrap()
        });
        let shared = Arc::new(StreamShared::new(limits, cfg));
        let listener = StreamListener { socket, id: 1, tls };
        let s = Streams::new(vec![listener], 1, shared.clone(), ChannelRange::Rfc8656).unwrap();
        (s, shared, addr)
    }

    fn service(s: &mut Streams, core: &mut Core) {
        s.service(core, &mut |_, _, _| Ok(()));
    }

    /// Serve until `n` connections were accepted or refused (bounded: about 2 s).
    fn settle(s: &mut Streams, core: &mut Core, shared: &StreamShared, n: u64) {
        for _ in 0..200 {
            service(s, core);
            let seen = shared.stats.accepted_total() + shared.stats.refused_total();
            if seen >= n {
                return;
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// Write `bytes` one at a time, `gap` apart, serving after each as the worker would.
    fn trickle(
        s: &mut Streams,
        core: &mut Core,
        client: &mut TcpStream,
        bytes: &[u8],
        gap: Duration,
    ) {
        for b in bytes {
            client.write_all(std::slice::from_ref(b)).unwrap();
            sleep(gap);
            service(s, core);
        }
    }

    #[test]
    fn a_trickler_is_closed_at_the_first_message_deadline() {
        let (mut core, _rx) = core();
        let lim = StreamLimits {
            idle_timeout: Duration::from_secs(30),
            ..limits()
        };
        let (mut s, shared, addr) = streams(lim, false);
        let mut client = TcpStream::connect(addr).unwrap();
        settle(&mut s, &mut core, &shared, 1);
        assert!(s.has_connections());
        // 12 bytes of a 20-byte message, each read by the worker, and no whole message; then the clock
        // past the 5 s deadline (the 30 s idle timeout is far off, counted from the last read or not).
        trickle(
            &mut s,
            &mut core,
            &mut client,
            &BINDING[..12],
            Duration::from_millis(25),
        );
        assert!(s.has_connections(), "inside the deadline");
        s.sweep(&core, Instant::now() + Duration::from_secs(5));
        assert!(!s.has_connections(), "no whole message by the deadline");
        assert_eq!(shared.stats.timed_out.load(Ordering::Relaxed), 1);
        assert_eq!(shared.stats.open_total(), 0);
    }

    #[test]
    fn after_a_message_partial_bytes_do_not_reset_the_idle_timer() {
        let (mut core, _rx) = core();
        let (mut s, shared, addr) = streams(limits(), false);
        let mut client = TcpStream::connect(addr).unwrap();
        settle(&mut s, &mut core, &shared, 1);
        client.write_all(&BINDING).unwrap();
        for _ in 0..100 {
            service(&mut s, &mut core);
            let c = s.conns.iter().flatten().next().unwrap();
            if c.last_msg.is_some() {
                break;
            }
            sleep(Duration::from_millis(10));
        }
        let t0 = Instant::now();
        // A message came at or before t0. Now partial bytes only, each read by the worker at least
        // 300 ms after t0; then a sweep 5.15 s after t0: past the 5 s idle timeout counted from the
        // message, short of it counted from the last read.
        trickle(
            &mut s,
            &mut core,
            &mut client,
            &BINDING[..12],
            Duration::from_millis(25),
        );
        assert!(s.has_connections());
        s.sweep(&core, t0 + Duration::from_millis(5_150));
        assert!(
            !s.has_connections(),
            "idle: no whole message for longer than the timeout"
        );
        assert_eq!(shared.stats.timed_out.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_connection_that_keeps_sending_messages_stays() {
        let (mut core, _rx) = core();
        let (mut s, shared, addr) = streams(limits(), false);
        let mut client = TcpStream::connect(addr).unwrap();
        settle(&mut s, &mut core, &shared, 1);
        for _ in 0..3 {
            trickle(
                &mut s,
                &mut core,
                &mut client,
                &BINDING,
                Duration::from_millis(20),
            );
        }
        // The last message is at most a few ms old; a sweep now finds it neither idle nor late.
        s.last_sweep = Instant::now() - SWEEP;
        s.sweep(&core, Instant::now());
        assert!(s.has_connections());
        assert_eq!(shared.stats.timed_out.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn ipv6_sources_in_one_64_share_the_cap() {
        let shared = StreamShared::new(
            StreamLimits {
                max_per_ip: 1,
                ..StreamLimits::default()
            },
            None,
        );
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(shared.admit(a, false));
        assert!(!shared.admit(same_64, true), "same /64: over the cap of 1");
        assert!(shared.admit(other_64, true));
        shared.release(a, false);
        assert!(
            shared.admit(same_64, false),
            "released by the /64, not the address"
        );
        // IPv4 keys on the whole address.
        assert!(shared.admit("192.0.2.1".parse().unwrap(), true));
        assert!(shared.admit("192.0.2.2".parse().unwrap(), false));
        assert_eq!(shared.stats.open_total(), 4);
        // Counted by transport (the gauge `/metrics` shows): TCP, then TLS.
        let open: Vec<(&str, u64)> = shared
            .stats
            .snapshot()
            .iter()
            .map(|t| (t.transport, t.open))
            .collect();
        assert_eq!(open, [("tcp", 2), ("tls", 2)]);
    }

    #[test]
    fn tls_handshakes_beyond_the_worker_bound_are_refused() {
        let (mut core, _rx) = core();
        let lim = StreamLimits {
            max_tls_handshakes: 2,
            ..limits()
        };
        let (mut s, shared, addr) = streams(lim, true);
        // Three clients that connect and never send a ClientHello.
        let stalled: Vec<_> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        settle(&mut s, &mut core, &shared, 3);
        assert_eq!(shared.stats.accepted_total(), 2);
        assert_eq!(shared.stats.refused_total(), 1);
        let tls = shared.stats.snapshot()[1];
        assert_eq!((tls.transport, tls.accepted, tls.refused), ("tls", 2, 1));
        assert_eq!(s.handshaking, 2);
        // The refused one is closed at once: its read sees EOF (bounded by a timeout).
        let mut third = &stalled[2];
        third
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(third.read(&mut b).unwrap(), 0);
        // The handshake timeout frees the slots, and a new handshake is let in.
        s.sweep(&core, Instant::now() + Duration::from_secs(6));
        assert_eq!(s.handshaking, 0);
        assert!(!s.has_connections());
        let _next = TcpStream::connect(addr).unwrap();
        settle(&mut s, &mut core, &shared, 4);
        assert_eq!(shared.stats.accepted_total(), 3);
        assert_eq!(s.handshaking, 1);
        drop(stalled);
    }
}
