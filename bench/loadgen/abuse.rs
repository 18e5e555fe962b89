//! Hostile load for `scripts/reliability.sh` (issue 14): what an open-internet relay gets besides its
//! clients. Everything here is bounded by a duration and meant for loopback only: on Linux all of
//! 127.0.0.0/8 is local, so binding a socket to 127.x.y.z gives the relay that many distinct sources
//! without any real spoofing.
//!
//! - [`spoof`]: unauthenticated Allocate and Binding from many source addresses, as fast as it goes; it
//!   counts request and answer bytes, so the amplification factor is measured at the generator.
//! - [`storm`]: authenticated Refresh, CreatePermission and ChannelBind from allocated clients, as fast as
//!   it goes.
//! - [`streams`]: many TCP and TLS connections that trickle bytes or stall mid-handshake, spread over
//!   many sources so that a per-IP cap alone does not stop them, while a fresh client tries to allocate
//!   over TCP once a second.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use turnpike::auth::long_term_key_md5;
use turnpike::sys::{bind_udp, UdpOptions};
use turnpike::wire::{Attribute, Class, IntegrityKey, Message, Method, TransactionId};

use crate::turn::{self, Auth, Client, Credentials, CHANNEL};

/// Second octet of the first source address each scenario uses: away from 127.0.x.x, where the relay's
/// own addresses and the generator's ordinary clients live.
pub const SPOOF_BASE: u8 = 16;
/// Stream abuse and its probes start here.
pub const STREAM_BASE: u8 = 64;
/// The probes' sources.
pub const PROBE_BASE: u8 = 120;

/// The `i`-th loopback source address from 127.`base`.1.1 on, skipping .0 and .255 in the low octets.
pub fn source_ip(base: u8, i: usize) -> Ipv4Addr {
    let per_b = 254 * 254;
    let a = base.saturating_add((i / per_b) as u8);
    let b = (i / 254) % 254 + 1;
    let c = i % 254 + 1;
    Ipv4Addr::new(127, a, b as u8, c as u8)
}

fn tid(n: u64) -> TransactionId {
    let mut t = *b"TPABUSE\0\0\0\0\0";
    t[4..12].copy_from_slice(&n.to_be_bytes());
    TransactionId(t)
}

/// What a spoofed-source flood did, counted at the generator.
#[derive(Debug, Clone, Default)]
pub struct SpoofStats {
    /// Distinct source addresses used.
    pub sources: usize,
    /// Requests sent (Allocate and Binding, unauthenticated).
    pub requests: u64,
    /// Their bytes.
    pub request_bytes: u64,
    /// Answers received (401s, Binding successes, anything else).
    pub answers: u64,
    /// Their bytes.
    pub answer_bytes: u64,
    /// 401 answers.
    pub challenges: u64,
    /// Binding success answers.
    pub bindings: u64,
    /// The largest single answer relative to its request's size.
    pub max_answer_ratio: f64,
    /// Most answers any one source address received over the run.
    pub max_answers_per_source: u64,
    /// Times each source was used (the run cycles through them).
    pub rounds: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Unauthenticated Allocate + Binding from `sources` addresses in 127.`SPOOF_BASE`.0.0/… for
/// `duration`. Sources are used in generations of 256 sockets: a generation sends, the previous one is
/// read and closed, so each source has one generation's time to hear its answers.
pub fn spoof(target: SocketAddr, sources: usize, duration: Duration) -> io::Result<SpoofStats> {
    const GEN: usize = 256;
    let sources = sources.max(1);
    let mut st = SpoofStats {
        sources,
        ..SpoofStats::default()
    };
    let mut per_source = vec![0u32; sources];
    let mut alloc = [0u8; 64];
    let mut bind = [0u8; 64];
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    let mut prev: Vec<(usize, std::net::UdpSocket)> = Vec::with_capacity(GEN);
    let mut next = 0usize;
    let mut n = 0u64;
    let opts = UdpOptions {
        recv_buffer: Some(64 << 10),
        ..UdpOptions::default()
    };
    let drain = |prev: &mut Vec<(usize, std::net::UdpSocket)>,
                 st: &mut SpoofStats,
                 per_source: &mut [u32],
                 buf: &mut [u8]| {
        for (i, s) in prev.drain(..) {
            while let Ok(len) = s.recv(buf) {
                st.answers += 1;
                st.answer_bytes += len as u64;
                if let Some(c) = per_source.get_mut(i) {
                    *c = c.saturating_add(1);
                }
                let Ok(m) = Message::parse(&buf[..len]) else {
                    continue;
                };
                let t = m.message_type();
                // Requests are 28 (Allocate) and 20 (Binding) bytes; the tid says which.
                let req = if t.method == Method::BINDING { 20 } else { 28 };
                st.max_answer_ratio = st.max_answer_ratio.max(len as f64 / req as f64);
                match (t.method, t.class) {
                    (Method::BINDING, Class::Success) => st.bindings += 1,
                    (_, Class::Error) if m.attrs.error_code.map(|e| e.0) == Some(401) => {
                        st.challenges += 1
                    }
                    _ => {}
                }
            }
        }
    };
    while start.elapsed() < duration {
        let mut cur = Vec::with_capacity(GEN);
        for _ in 0..GEN {
            let i = next % sources;
            next += 1;
            if i == 0 {
                st.rounds += 1;
            }
            let addr = SocketAddr::V4(SocketAddrV4::new(source_ip(SPOOF_BASE, i), 0));
            let s = bind_udp(addr, opts)?;
            n += 1;
            let a = turn::build(
                &mut alloc,
                Method::ALLOCATE,
                tid(2 * n),
                |w| w.add(&Attribute::RequestedTransport(17)),
                None,
            )
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
            let b = turn::build(&mut bind, Method::BINDING, tid(2 * n + 1), |_| Ok(()), None)
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            for m in [&alloc[..a], &bind[..b]] {
                if s.send_to(m, target).is_ok() {
                    st.requests += 1;
                    st.request_bytes += m.len() as u64;
                }
            }
            cur.push((i, s));
        }
        drain(&mut prev, &mut st, &mut per_source, &mut buf);
        prev = cur;
    }
    std::thread::sleep(Duration::from_millis(20));
    drain(&mut prev, &mut st, &mut per_source, &mut buf);
    st.max_answers_per_source = per_source.iter().copied().max().map_or(0, u64::from);
    st.seconds = start.elapsed().as_secs_f64();
    Ok(st)
}

/// What a control-plane storm did.
#[derive(Debug, Clone, Default)]
pub struct StormStats {
    /// Clients that allocated and bound a channel before the storm.
    pub clients: usize,
    /// Requests sent (Refresh, CreatePermission, ChannelBind in turn).
    pub sent: u64,
    /// Success responses.
    pub ok: u64,
    /// 438s (the nonce is renewed and the storm goes on).
    pub stale: u64,
    /// Other error responses by code.
    pub codes: std::collections::BTreeMap<u16, u64>,
    /// Wall time of the storm, seconds.
    pub seconds: f64,
}

/// `clients` clients allocate and bind [`CHANNEL`] to `peer`, then send authenticated Refresh
/// (LIFETIME 600), CreatePermission(`peer`) and ChannelBind(`peer`) in turn, one per client per round,
/// without waiting for answers, for `duration`.
pub fn storm(
    target: SocketAddr,
    auth: &Auth,
    clients: usize,
    peer: SocketAddr,
    duration: Duration,
) -> io::Result<StormStats> {
    let mut poll = mio::Poll::new()?;
    // Token base far from anything else in this process.
    let mut cs = turn::open_clients(clients, target, auth, &poll, 1 << 20, None)?;
    let st = turn::drive(
        &mut cs,
        &mut poll,
        1 << 20,
        target,
        turn::Plan::Setup {
            peer: Some(peer),
            window: 64,
        },
        Instant::now() + Duration::from_secs(30),
    )?;
    let ready: Vec<&mut Client> = cs.iter_mut().filter(|c| c.is_ready()).collect();
    if ready.is_empty() {
        return Err(io::Error::other(format!(
            "no storm client allocated ({} errors {:?}, {} timeouts)",
            st.errors, st.codes, st.timeouts
        )));
    }
    let mut out = StormStats {
        clients: ready.len(),
        ..StormStats::default()
    };
    let mut ready = ready;
    let mut msg = [0u8; 512];
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        for c in ready.iter_mut() {
            n += 1;
            let Some(creds) = c.credentials() else {
                continue;
            };
            let (method, k) = match n % 3 {
                0 => (Method::REFRESH, 0),
                1 => (Method::CREATE_PERMISSION, 1),
                _ => (Method::CHANNEL_BIND, 2),
            };
            let Ok(len) = turn::build(
                &mut msg,
                method,
                tid(n),
                |w| match k {
                    0 => w.add(&Attribute::Lifetime(600)),
                    1 => w.add(&Attribute::XorPeerAddress(peer)),
                    _ => {
                        w.add(&Attribute::ChannelNumber(CHANNEL))?;
                        w.add(&Attribute::XorPeerAddress(peer))
                    }
                },
                Some(creds),
            ) else {
                continue;
            };
            if c.sock.send_to(&msg[..len], target).is_ok() {
                out.sent += 1;
            }
        }
        for c in ready.iter_mut() {
            while let Ok((len, _)) = c.sock.recv_from(&mut buf) {
                let Ok(m) = Message::parse(&buf[..len]) else {
                    continue;
                };
                match (m.message_type().class, m.attrs.error_code.map(|e| e.0)) {
                    (Class::Success, _) => out.ok += 1,
                    (Class::Error, Some(438)) => {
                        out.stale += 1;
                        if let Some(nonce) = m.attrs.nonce {
                            c.set_nonce(nonce);
                        }
                    }
                    (_, code) => *out.codes.entry(code.unwrap_or(0)).or_default() += 1,
                }
            }
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

/// What a stream-abuse run saw.
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    /// Abusive connections opened (connect issued), TCP and TLS.
    pub opened: [u64; 2],
    /// Connections whose socket or connect failed at once.
    pub connect_failed: [u64; 2],
    /// Connections the server closed (EOF or error) during the run.
    pub closed_by_server: [u64; 2],
    /// Connections still open at the end.
    pub held_at_end: [u64; 2],
    /// Probes: a fresh client allocating over TCP once a second.
    pub probes: u64,
    /// Probes that got their allocation within the probe timeout.
    pub probe_ok: u64,
    /// The slowest successful probe, ms.
    pub probe_max_ms: f64,
    /// Probe failures by what went wrong.
    pub probe_failures: std::collections::BTreeMap<String, u64>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// How the abusive connections of one kind are opened.
#[derive(Debug, Clone, Copy)]
pub struct StreamAbuse {
    /// TURN-over-TCP listener, and how many connections to it.
    pub tcp: Option<(SocketAddr, usize)>,
    /// TURN-over-TLS listener, and how many connections to it.
    pub tls: Option<(SocketAddr, usize)>,
    /// Connections per source address (below the relay's per-IP cap, so that cap alone stops nothing).
    pub per_source: usize,
    /// Interval between the single bytes a trickling connection sends.
    pub trickle: Duration,
    /// Length of the run.
    pub duration: Duration,
    /// How long a probe may take to allocate.
    pub probe_timeout: Duration,
}

struct Abuser {
    sock: TcpStream,
    kind: usize,
    trickle: bool,
    sent: usize,
    open: bool,
}

/// Half of each kind's connections trickle (TCP: a Binding request one byte at a time; TLS: a
/// ClientHello record header, then one byte at a time), the other half stall (TCP: connect and send
/// nothing; TLS: send the first 5 bytes of a ClientHello record and nothing more). Meanwhile a fresh
/// client from a new source allocates over TCP once a second (when `tcp` is given).
pub fn streams(abuse: StreamAbuse, auth: &Auth) -> io::Result<StreamStats> {
    let mut st = StreamStats::default();
    let mut conns: Vec<Abuser> = Vec::new();
    let per_source = abuse.per_source.max(1);
    let mut src = 0usize;
    let start = Instant::now();
    // A TLS 1.2 ClientHello record header announcing 512 bytes (then single bytes of nothing useful).
    const TLS_HEAD: [u8; 5] = [0x16, 0x03, 0x01, 0x02, 0x00];
    let mut binding = [0u8; 20];
    let _ = turn::build(&mut binding, Method::BINDING, tid(1), |_| Ok(()), None);
    for (kind, target) in [abuse.tcp, abuse.tls].into_iter().enumerate() {
        let Some((addr, n)) = target else { continue };
        for j in 0..n {
            if start.elapsed() >= abuse.duration {
                break;
            }
            let ip = source_ip(STREAM_BASE, src / per_source);
            src += 1;
            st.opened[kind] += 1;
            match connect_nonblocking(ip, addr) {
                Ok(sock) => {
                    let trickle = j % 2 == 0;
                    conns.push(Abuser {
                        sock,
                        kind,
                        trickle,
                        sent: 0,
                        open: true,
                    });
                }
                Err(_) => st.connect_failed[kind] += 1,
            }
            // Do not overflow the listen backlog: a pause every 200 connects.
            if j % 200 == 199 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let mut next_trickle = Instant::now();
    let mut next_probe = Instant::now() + Duration::from_millis(500);
    let mut probe_n = 0usize;
    let mut rbuf = [0u8; 4096];
    while start.elapsed() < abuse.duration {
        if Instant::now() >= next_trickle {
            next_trickle += abuse.trickle;
            for a in conns.iter_mut().filter(|a| a.open) {
                let byte = match (a.kind, a.trickle) {
                    // Stalled TLS: the record header once, then nothing.
                    (1, false) if a.sent < TLS_HEAD.len() => {
                        let _ = a.sock.write(&TLS_HEAD);
                        a.sent = TLS_HEAD.len();
                        None
                    }
                    (_, false) => None,
                    (0, true) => Some(binding[a.sent % binding.len()]),
                    (_, true) => Some(*TLS_HEAD.get(a.sent).unwrap_or(&0)),
                };
                if let Some(b) = byte {
                    match a.sock.write(&[b]) {
                        Ok(_) => a.sent += 1,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            a.open = false;
                            st.closed_by_server[a.kind] += 1;
                            continue;
                        }
                    }
                }
                match a.sock.read(&mut rbuf) {
                    Ok(0) => {
                        a.open = false;
                        st.closed_by_server[a.kind] += 1;
                    }
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                        a.open = false;
                        st.closed_by_server[a.kind] += 1;
                    }
                    _ => {}
                }
            }
        }
        if let Some((addr, _)) = abuse.tcp {
            if Instant::now() >= next_probe {
                next_probe += Duration::from_secs(1);
                st.probes += 1;
                let t0 = Instant::now();
                match probe_allocate_tcp(
                    source_ip(PROBE_BASE, probe_n),
                    addr,
                    auth,
                    probe_n,
                    abuse.probe_timeout,
                ) {
                    Ok(()) => {
                        st.probe_ok += 1;
                        st.probe_max_ms = st.probe_max_ms.max(t0.elapsed().as_secs_f64() * 1e3);
                    }
                    Err(e) => *st.probe_failures.entry(e).or_default() += 1,
                }
                probe_n += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    st.held_at_end = [0, 1].map(|k| conns.iter().filter(|a| a.open && a.kind == k).count() as u64);
    st.seconds = start.elapsed().as_secs_f64();
    Ok(st)
}

fn connect_nonblocking(src: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    s.set_nonblocking(true)?;
    match s.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// One fresh client from `src` allocates over TCP (the 401 round, then the signed Allocate) within
/// `timeout`; the connection closes after, which ends the allocation.
pub fn probe_allocate_tcp(
    src: Ipv4Addr,
    to: SocketAddr,
    auth: &Auth,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(|_| "socket")?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())
        .map_err(|_| "bind")?;
    s.connect_timeout(&to.into(), timeout)
        .map_err(|_| "connect")?;
    let mut sock: TcpStream = s.into();
    let (user, pass) = auth.credentials(1_000_000 + n);
    let mut msg = [0u8; 512];
    let len = turn::build(
        &mut msg,
        Method::ALLOCATE,
        tid(1),
        |w| w.add(&Attribute::RequestedTransport(17)),
        None,
    )
    .map_err(|_| "build")?;
    sock.write_all(&msg[..len]).map_err(|_| "write")?;
    let first = read_stun(&mut sock, deadline)?;
    let m = Message::parse(&first).map_err(|_| "unparsable answer")?;
    if m.attrs.error_code.map(|e| e.0) != Some(401) {
        return Err(format!(
            "first answer {:?}",
            m.attrs.error_code.map(|e| e.0)
        ));
    }
    let realm = m.attrs.realm.unwrap_or("").to_string();
    let nonce = m.attrs.nonce.unwrap_or("").to_string();
    let key = IntegrityKey::new(&long_term_key_md5(&user, &realm, &pass), false);
    let len = turn::build(
        &mut msg,
        Method::ALLOCATE,
        tid(2),
        |w| w.add(&Attribute::RequestedTransport(17)),
        Some(Credentials {
            username: &user,
            realm: &realm,
            nonce: &nonce,
            key: &key,
        }),
    )
    .map_err(|_| "build")?;
    sock.write_all(&msg[..len]).map_err(|_| "write")?;
    let second = read_stun(&mut sock, deadline)?;
    let m = Message::parse(&second).map_err(|_| "unparsable answer")?;
    match m.message_type().class {
        Class::Success => Ok(()),
        _ => Err(format!("allocate {:?}", m.attrs.error_code.map(|e| e.0))),
    }
}

/// One STUN message off a stream (20-byte header, then its length), before `deadline`.
fn read_stun(sock: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut head = [0u8; 20];
    read_exact_by(sock, &mut head, deadline)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut out = head.to_vec();
    out.resize(20 + len, 0);
    read_exact_by(sock, &mut out[20..], deadline)?;
    Ok(out)
}

fn read_exact_by(sock: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or("timeout")?;
    sock.set_read_timeout(Some(left)).map_err(|_| "timeout")?;
    sock.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".to_string(),
        io::ErrorKind::UnexpectedEof => "closed".to_string(),
        _ => format!("read: {e}"),
    })
}
