//! The control-plane side of the generator: many TURN clients, each one UDP socket, driven by one event
//! loop through Allocate (with the 401 round), ChannelBind, Refresh-to-delete and Binding.
//!
//! A client holds at most one transaction at a time; concurrency comes from running many clients. Lost
//! requests are retransmitted every [`RTO`], up to [`MAX_TRIES`] transmissions, then the client fails (set-up) or starts over
//! (churn).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use turnpike::auth::{long_term_key_md5, rest_password};
use turnpike::sys::mmsg::{recv_batch, send_batch, RecvMeta, MAX_BATCH};
use turnpike::sys::{bind_udp, UdpOptions};
use turnpike::wire::{
    Attribute, Class, IntegrityKey, Message, MessageType, MessageWriter, Method, TransactionId,
};

/// Retransmission timeout for control requests.
pub const RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request before the client gives up on it (4 s of silence).
pub const MAX_TRIES: u8 = 8;
/// The channel number every client binds (each client has its own allocation, so one number serves all;
/// 0x4000 is valid for both RFC 8656 and RFC 5766 servers).
pub const CHANNEL: u16 = 0x4000;

/// Credentials: a static long-term user, or a TURN REST shared secret (one user id per client, so
/// per-user quotas do not cap the bench).
#[derive(Debug, Clone)]
pub enum Auth {
    /// `user`, `password`.
    Static(String, String),
    /// The shared secret.
    Rest(String),
}

impl Auth {
    /// User name and password of client number `client`.
    pub fn credentials(&self, client: usize) -> (String, String) {
        match self {
            Auth::Static(u, p) => (u.clone(), p.clone()),
            Auth::Rest(secret) => {
                let expiry = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    + 86_400;
                let user = format!("{expiry}:bench{client}");
                let pass = rest_password(secret.as_bytes(), &user);
                (user, pass)
            }
        }
    }
}

/// Where a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Idle,
    Allocate,
    Bind,
    Delete,
    Ready,
    Failed,
}

/// One TURN client.
#[derive(Debug)]
pub struct Client {
    /// Its socket (non-blocking).
    pub sock: UdpSocket,
    /// Its relayed address once allocated.
    pub relayed: Option<SocketAddr>,
    /// The allocation's LIFETIME as the server granted it, seconds.
    pub lifetime: Option<u32>,
    bind: SocketAddr,
    buffers: Option<usize>,
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<String>,
    /// The long-term key, ready to sign (its HMAC key schedule hashed once per realm).
    key: IntegrityKey,
    step: Step,
    tid: TransactionId,
    tid_counter: u64,
    sent_at: Instant,
    tries: u8,
    cycle_start: Instant,
}

/// What a control run did.
#[derive(Debug, Clone, Default)]
pub struct CtlStats {
    /// Error responses by code (0: an error response without ERROR-CODE).
    pub codes: std::collections::BTreeMap<u16, u64>,
    /// Successful Allocates (each after its 401 round).
    pub allocations: u64,
    /// Successful deletes (Refresh with LIFETIME 0).
    pub deletes: u64,
    /// ChannelBinds that succeeded.
    pub channels: u64,
    /// Error responses other than the expected 401/438.
    pub errors: u64,
    /// Transactions that got no answer after all retransmissions.
    pub timeouts: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Churn clients cut off by the deadline while they may hold an allocation (allocated and not yet
    /// deleted, or an authenticated Allocate in flight): each may leave one allocation, and its relay
    /// socket, on the server until it expires.
    pub left: u64,
    /// Seconds during which new churn cycles started (up to the deadline or `max`).
    pub offered_seconds: f64,
    /// Deletes in each consecutive interval (churn with an interval only).
    pub deletes_per_interval: Vec<u64>,
    /// Wall time of the run, seconds (a churn's drain after its deadline included).
    pub seconds: f64,
}

/// How long a churn's cycles under way at its deadline get to finish (two full retransmission
/// rounds would be 8 s; this is enough for any answered request).
pub const DRAIN: Duration = Duration::from_secs(3);

/// What a control run does.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// Allocate every client (and bind a channel to `peer` if given), `window` clients at a time; stop when
    /// all are ready or failed.
    Setup {
        /// Bind [`CHANNEL`] to this peer after allocating.
        peer: Option<SocketAddr>,
        /// Clients in flight at once.
        window: usize,
    },
    /// Every client loops 401 → Allocate → delete until the deadline or `max` allocations. At the
    /// deadline no new cycle starts; cycles under way finish (their allocations deleted) within
    /// [`DRAIN`].
    Churn {
        /// Stop after this many allocations.
        max: u64,
        /// Start at most this many cycles per second, all clients together (`None`: each client starts
        /// its next cycle as soon as its delete is answered).
        rate: Option<f64>,
        /// Count deletes per interval of this length (`CtlStats::deletes_per_interval`).
        interval: Option<Duration>,
        /// A full-speed churn (no `rate`) spins on the poll while cycles are under way, as the relay
        /// traffic loop does, so that the server does not pay for waking the generator after every
        /// response, and sleeps this long (if not zero) when the poll found nothing. A paced churn
        /// waits up to 1 ms in the poll instead.
        idle_sleep: Duration,
    },
}

/// Open `n` client sockets registered with `poll` as tokens `token_base..`. Against a loopback server
/// each binds an address of its own, 127.0.1.1, 127.0.1.2, … 127.0.254.254 (then round again), as
/// clients on the internet do: the relay's per-source budget for unauthenticated answers (its
/// `challenge_rate`, 100/s per /32) then limits each client, not the generator as a whole (a churn of
/// 200/s from one address gets 401s for only 100 of them). Never 127.0.0.x: that is where relay
/// addresses live in the benches, and a client socket must not take a port the relay wants.
pub fn open_clients(
    n: usize,
    target: SocketAddr,
    auth: &Auth,
    poll: &Poll,
    token_base: usize,
    buffers: Option<usize>,
) -> io::Result<Vec<Client>> {
    let mut out = Vec::with_capacity(n);
    let now = Instant::now();
    for i in 0..n {
        let ip = match target {
            SocketAddr::V4(t) if t.ip().is_loopback() => {
                let k = i % (254 * 254);
                std::net::IpAddr::from([127, 0, (1 + k / 254) as u8, (1 + k % 254) as u8])
            }
            SocketAddr::V4(_) => std::net::IpAddr::from([0, 0, 0, 0]),
            SocketAddr::V6(_) => std::net::IpAddr::from([0u16; 8]),
        };
        let sock = bind_udp(
            SocketAddr::new(ip, 0),
            UdpOptions {
                recv_buffer: buffers,
                send_buffer: buffers,
                ..UdpOptions::default()
            },
        )?;
        poll.registry().register(
            &mut SourceFd(&sock.as_raw_fd()),
            Token(token_base + i),
            Interest::READABLE,
        )?;
        let (username, password) = auth.credentials(i);
        out.push(Client {
            bind: SocketAddr::new(ip, 0),
            buffers,
            sock,
            relayed: None,
            lifetime: None,
            username,
            password,
            realm: None,
            nonce: None,
            key: IntegrityKey::new(&[0; 16], false),
            step: Step::Idle,
            tid: TransactionId::default(),
            tid_counter: (i as u64) << 32,
            sent_at: now,
            tries: 0,
            cycle_start: now,
        });
    }
    Ok(out)
}

impl Client {
    /// Replace the socket with a fresh one (a new 5-tuple): coturn keeps a deleted allocation's 5-tuple
    /// busy (437) for a while, and real churn comes from new clients anyway.
    fn reopen(&mut self, poll: &Poll, token: Token) -> io::Result<()> {
        // Closing the old socket (on assignment) takes it out of the epoll set: no deregister call.
        self.sock = bind_udp(
            self.bind,
            UdpOptions {
                recv_buffer: self.buffers,
                send_buffer: self.buffers,
                ..UdpOptions::default()
            },
        )?;
        poll.registry().register(
            &mut SourceFd(&self.sock.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    /// Whether set-up finished with an allocation (and channel, if asked).
    pub fn is_ready(&self) -> bool {
        self.step == Step::Ready
    }

    /// What signs this client's requests once it has been through the 401 round.
    pub fn credentials(&self) -> Option<Credentials<'_>> {
        Some(Credentials {
            username: &self.username,
            realm: self.realm.as_deref()?,
            nonce: self.nonce.as_deref()?,
            key: &self.key,
        })
    }

    /// Take a fresh NONCE (from a 438 Stale Nonce).
    pub fn set_nonce(&mut self, nonce: &str) {
        self.nonce = Some(nonce.to_string());
    }

    fn send_request(&mut self, target: SocketAddr, peer: Option<SocketAddr>, fresh: bool) {
        if fresh {
            self.tid_counter += 1;
            let mut t = *b"TPBENCH\0\0\0\0\0";
            t[4..12].copy_from_slice(&self.tid_counter.to_be_bytes());
            self.tid = TransactionId(t);
            self.tries = 0;
        }
        self.tries += 1;
        self.sent_at = Instant::now();
        let mut buf = [0u8; 512];
        let method = match self.step {
            Step::Allocate => Method::ALLOCATE,
            Step::Bind => Method::CHANNEL_BIND,
            _ => Method::REFRESH,
        };
        let Ok(n) = build(
            &mut buf,
            method,
            self.tid,
            |w| match self.step {
                Step::Allocate => w.add(&Attribute::RequestedTransport(17)),
                Step::Bind => {
                    w.add(&Attribute::ChannelNumber(CHANNEL))?;
                    match peer {
                        Some(p) => w.add(&Attribute::XorPeerAddress(p)),
                        None => Ok(()),
                    }
                }
                _ => w.add(&Attribute::Lifetime(0)),
            },
            self.nonce.as_deref().map(|nonce| Credentials {
                username: &self.username,
                realm: self.realm.as_deref().unwrap_or(""),
                nonce,
                key: &self.key,
            }),
        ) else {
            return;
        };
        let _ = self.sock.send_to(&buf[..n], target);
    }
}

/// What goes into an authenticated request.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// USERNAME.
    pub username: &'a str,
    /// REALM.
    pub realm: &'a str,
    /// NONCE.
    pub nonce: &'a str,
    /// The long-term key.
    pub key: &'a IntegrityKey,
}

/// Build a request: `attrs` adds the method's attributes, then USERNAME/REALM/NONCE/MESSAGE-INTEGRITY if
/// `creds` is given. Returns its length.
pub fn build(
    buf: &mut [u8],
    method: Method,
    tid: TransactionId,
    attrs: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), turnpike::wire::Error>,
    creds: Option<Credentials<'_>>,
) -> Result<usize, turnpike::wire::Error> {
    let mut w = MessageWriter::new(buf, MessageType::new(method, Class::Request), tid)?;
    attrs(&mut w)?;
    if let Some(c) = creds {
        w.add(&Attribute::Username(c.username))?;
        w.add(&Attribute::Realm(c.realm))?;
        w.add(&Attribute::Nonce(c.nonce))?;
        w.add_integrity_with(c.key)?;
    }
    Ok(w.finish())
}

/// Drive `clients` through `plan` against `target` until it is done or `deadline` passes (a churn
/// then drains its cycles under way for up to [`DRAIN`] more).
pub fn drive(
    clients: &mut [Client],
    poll: &mut Poll,
    token_base: usize,
    target: SocketAddr,
    plan: Plan,
    deadline: Instant,
) -> io::Result<CtlStats> {
    let start = Instant::now();
    let mut st = CtlStats::default();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 4096];
    let (peer, window, max, rate, interval, spin) = match plan {
        Plan::Setup { peer, window } => (peer, window.max(1), u64::MAX, None, None, None),
        Plan::Churn {
            max,
            rate,
            interval,
            idle_sleep,
        } => {
            let spin = rate.is_none().then_some(idle_sleep);
            (None, clients.len(), max, rate, interval, spin)
        }
    };
    let churn = matches!(plan, Plan::Churn { .. });
    let mut q = Cycles {
        idle: (0..clients.len()).collect(),
        active: 0,
        finished: 0,
    };
    let mut started = 0u64;
    let mut draining = false;
    let mut next_interval = interval.filter(|i| !i.is_zero()).map(|i| (start + i, i));
    let mut interval_base = 0u64;
    let mut last_scan = Instant::now();
    loop {
        let now = Instant::now();
        if churn && !draining && (now >= deadline || st.allocations >= max) {
            // No new cycle from here; a client still in its 401 round holds nothing on the server.
            draining = true;
            st.offered_seconds = start.elapsed().as_secs_f64();
            q.idle.clear();
            for c in clients.iter_mut() {
                if c.step == Step::Allocate && c.nonce.is_none() {
                    c.step = Step::Idle;
                    q.active -= 1;
                }
            }
        }
        if let Some((at, every)) = next_interval.filter(|(at, _)| !draining && now >= *at) {
            st.deletes_per_interval.push(st.deletes - interval_base);
            interval_base = st.deletes;
            next_interval = Some((at + every, every));
        }
        // Start idle clients while the window (and, for a paced churn, the rate) has room.
        let allowed = match rate {
            Some(r) => (r * start.elapsed().as_secs_f64()) as u64 + 1,
            None => u64::MAX,
        };
        while !draining && q.active < window && started < allowed {
            let Some(i) = q.idle.pop_front() else { break };
            let Some(c) = clients.get_mut(i) else { break };
            c.step = Step::Allocate;
            c.nonce = None;
            c.cycle_start = Instant::now();
            c.send_request(target, peer, true);
            q.active += 1;
            started += 1;
        }
        if !churn && q.finished >= clients.len() {
            break;
        }
        // A churn ends once every cycle under way has finished: a bounded churn leaves no allocation
        // behind.
        if churn && draining && q.active == 0 {
            break;
        }
        if now >= deadline && (!churn || now >= deadline + DRAIN) {
            break;
        }
        let wait = match spin {
            Some(_) if q.active > 0 => Duration::ZERO,
            _ => Duration::from_millis(1),
        };
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Some(nap) = spin.filter(|n| events.is_empty() && !n.is_zero()) {
            std::thread::sleep(nap);
        }
        for ev in events.iter() {
            let Some(i) = ev.token().0.checked_sub(token_base) else {
                continue;
            };
            let Some(c) = clients.get_mut(i) else {
                continue;
            };
            while let Ok((n, _)) = c.sock.recv_from(&mut buf) {
                let Ok(m) = Message::parse(&buf[..n]) else {
                    continue;
                };
                if m.transaction_id() != c.tid
                    || matches!(c.step, Step::Idle | Step::Ready | Step::Failed)
                {
                    continue;
                }
                let class = m.message_type().class;
                let code = m.attrs.error_code.map(|e| e.0);
                match (class, code) {
                    (Class::Error, Some(401)) if c.nonce.is_none() => {
                        c.nonce = m.attrs.nonce.map(str::to_string);
                        let realm = m.attrs.realm.unwrap_or("");
                        if c.realm.as_deref() != Some(realm) {
                            c.key = IntegrityKey::new(
                                &long_term_key_md5(&c.username, realm, &c.password),
                                false,
                            );
                            c.realm = Some(realm.to_string());
                        }
                        c.send_request(target, peer, true);
                    }
                    (Class::Error, Some(438)) => {
                        c.nonce = m.attrs.nonce.map(str::to_string);
                        c.send_request(target, peer, true);
                    }
                    (Class::Success, _) => match c.step {
                        Step::Allocate => {
                            st.allocations += 1;
                            c.relayed = m.attrs.xor_relayed_address;
                            c.lifetime = m.attrs.lifetime;
                            match plan {
                                Plan::Setup { peer: Some(_), .. } => {
                                    c.step = Step::Bind;
                                    c.send_request(target, peer, true);
                                }
                                Plan::Setup { .. } => {
                                    c.step = Step::Ready;
                                    q.active -= 1;
                                    q.finished += 1;
                                }
                                Plan::Churn { .. } => {
                                    c.step = Step::Delete;
                                    c.send_request(target, peer, true);
                                }
                            }
                        }
                        Step::Bind => {
                            st.channels += 1;
                            c.step = Step::Ready;
                            q.active -= 1;
                            q.finished += 1;
                        }
                        Step::Delete => {
                            st.deletes += 1;
                            // The next cycle is a new client: new 5-tuple, and the 401 round again.
                            q.end_cycle(c, i, poll, ev.token(), churn, draining)?;
                        }
                        _ => {}
                    },
                    _ => {
                        st.errors += 1;
                        *st.codes.entry(code.unwrap_or(0)).or_default() += 1;
                        q.end_cycle(c, i, poll, ev.token(), churn, draining)?;
                    }
                }
                // One answer per request is outstanding: the next one arrives after this, with an
                // event of its own (a stale datagram still queued is read then, ahead of it). Not
                // reading on to EAGAIN saves a syscall per answer.
                break;
            }
        }
        if last_scan.elapsed() >= Duration::from_millis(50) {
            last_scan = Instant::now();
            for (i, c) in clients.iter_mut().enumerate() {
                if matches!(c.step, Step::Idle | Step::Ready | Step::Failed)
                    || c.sent_at.elapsed() < RTO
                {
                    continue;
                }
                if c.tries >= MAX_TRIES {
                    st.timeouts += 1;
                    q.end_cycle(c, i, poll, Token(token_base + i), churn, draining)?;
                } else {
                    st.retransmits += 1;
                    c.send_request(target, peer, false);
                }
            }
        }
    }
    if churn {
        if !draining {
            st.offered_seconds = start.elapsed().as_secs_f64();
        }
        st.left = clients
            .iter()
            .filter(|c| c.step == Step::Delete || (c.step == Step::Allocate && c.nonce.is_some()))
            .count() as u64;
    }
    st.seconds = start.elapsed().as_secs_f64();
    Ok(st)
}

/// Which clients are in a cycle (set-up: allocating; churn: 401 → Allocate → delete) and which wait
/// for one.
struct Cycles {
    idle: std::collections::VecDeque<usize>,
    active: usize,
    finished: usize,
}

impl Cycles {
    /// Client `i`'s cycle is over (done, refused or timed out). Set-up: it has failed. Churn: its next
    /// cycle is a new client (a fresh socket, a new 5-tuple: coturn keeps a deleted or failed
    /// allocation's 5-tuple busy with 437 for a while), queued unless the churn is draining.
    fn end_cycle(
        &mut self,
        c: &mut Client,
        i: usize,
        poll: &Poll,
        token: Token,
        churn: bool,
        draining: bool,
    ) -> io::Result<()> {
        self.active = self.active.saturating_sub(1);
        if !churn {
            c.step = Step::Failed;
            self.finished += 1;
            return Ok(());
        }
        c.reopen(poll, token)?;
        c.step = Step::Idle;
        c.nonce = None;
        c.relayed = None;
        if !draining {
            self.idle.push_back(i);
        }
        Ok(())
    }
}

/// What a Binding run measured.
#[derive(Debug, Clone)]
pub struct BindingStats {
    /// Requests sent (first transmissions; lost ones are not retransmitted).
    pub sent: u64,
    /// Success responses.
    pub responses: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Round-trip times, ns.
    pub rtt: hdrhistogram::Histogram<u64>,
}

/// STUN Binding at full speed: `sockets` sockets, each keeping `window` requests in flight, for
/// `duration`. Requests and responses move in sendmmsg/recvmmsg batches. The send time rides in the
/// transaction id, so no table is kept; a window that hears nothing for [`RTO`] is refilled (its
/// requests count as lost).
pub fn binding(
    target: SocketAddr,
    sockets: usize,
    window: usize,
    duration: Duration,
    idle_sleep: Duration,
) -> io::Result<BindingStats> {
    let mut poll = Poll::new()?;
    let mut socks = Vec::with_capacity(sockets);
    for i in 0..sockets.max(1) {
        let ip = match target {
            SocketAddr::V4(t) if t.ip().is_loopback() => (*t.ip()).into(),
            SocketAddr::V4(_) => std::net::IpAddr::from([0, 0, 0, 0]),
            SocketAddr::V6(_) => std::net::IpAddr::from([0u16; 8]),
        };
        let s = bind_udp(
            SocketAddr::new(ip, 0),
            UdpOptions {
                recv_buffer: Some(4 << 20),
                send_buffer: Some(4 << 20),
                ..UdpOptions::default()
            },
        )?;
        poll.registry()
            .register(&mut SourceFd(&s.as_raw_fd()), Token(i), Interest::READABLE)?;
        socks.push(s);
    }
    let window = window.clamp(1, MAX_BATCH);
    let start = Instant::now();
    let mut st = BindingStats {
        sent: 0,
        responses: 0,
        seconds: 0.0,
        rtt: new_histogram(),
    };
    let mut in_flight = vec![0usize; socks.len()];
    let mut last_heard = vec![Instant::now(); socks.len()];
    let mut reqs = vec![[0u8; 20]; MAX_BATCH];
    let mut slab = vec![0u8; MAX_BATCH * 256];
    let mut meta = [RecvMeta::default(); MAX_BATCH];
    let mut events = Events::with_capacity(1024);
    let send_window = |fd: i32, k: usize, reqs: &mut [[u8; 20]], start: Instant| -> usize {
        let now = start.elapsed().as_nanos() as u64;
        for (j, r) in reqs.iter_mut().take(k).enumerate() {
            let mut t = [0u8; 12];
            t[0..8].copy_from_slice(&now.to_be_bytes());
            t[8..12].copy_from_slice(&(j as u32).to_be_bytes());
            let _ = build(r, Method::BINDING, TransactionId(t), |_| Ok(()), None);
        }
        let msgs: Vec<(SocketAddr, &[u8])> = reqs[..k].iter().map(|r| (target, &r[..])).collect();
        send_batch(fd, &msgs, |_, _| {})
    };
    for (i, s) in socks.iter().enumerate() {
        let n = send_window(s.as_raw_fd(), window, &mut reqs, start);
        in_flight[i] = n;
        st.sent += n as u64;
    }
    while start.elapsed() < duration {
        // Spin, as the relay traffic loop does (the server then never pays for waking the generator).
        poll.poll(&mut events, Some(Duration::ZERO))?;
        if events.is_empty() && !idle_sleep.is_zero() {
            std::thread::sleep(idle_sleep);
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = socks.get(i) else { continue };
            loop {
                let n = recv_batch(s.as_raw_fd(), &mut slab, 256, 0, &mut meta)?;
                let now = start.elapsed().as_nanos() as u64;
                let mut got = 0;
                for (j, m) in meta.iter().take(n).enumerate() {
                    let Ok(msg) = Message::parse(&slab[j * 256..j * 256 + m.len]) else {
                        continue;
                    };
                    let t = msg.transaction_id().0;
                    let mut ts = [0u8; 8];
                    ts.copy_from_slice(&t[0..8]);
                    if msg.message_type() == MessageType::new(Method::BINDING, Class::Success) {
                        got += 1;
                        let _ = st
                            .rtt
                            .record(now.saturating_sub(u64::from_be_bytes(ts)).max(1));
                    }
                }
                if got > 0 {
                    st.responses += got as u64;
                    last_heard[i] = Instant::now();
                    in_flight[i] = in_flight[i].saturating_sub(got);
                    let k = send_window(s.as_raw_fd(), got, &mut reqs, start);
                    in_flight[i] += k;
                    st.sent += k as u64;
                }
                if n < MAX_BATCH {
                    break;
                }
            }
        }
        for (i, s) in socks.iter().enumerate() {
            if last_heard[i].elapsed() > RTO {
                // Nothing heard for a whole RTO: count its window as lost and refill it.
                last_heard[i] = Instant::now();
                let k = send_window(s.as_raw_fd(), window, &mut reqs, start);
                in_flight[i] = k;
                st.sent += k as u64;
            }
        }
    }
    st.seconds = start.elapsed().as_secs_f64();
    Ok(st)
}

/// A histogram for round-trip times in ns, 1 ns to 60 s at 3 significant digits.
pub fn new_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}
