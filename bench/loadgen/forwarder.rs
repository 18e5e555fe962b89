//! The bare forwarder: the physical-limit yardstick. A single-threaded recvmmsg/sendmmsg UDP relay with
//! the same socket shape as a TURN relay (one listener, one relay socket per client) and none of the TURN
//! work: no parsing, no lookups beyond one hash map, no ChannelData framing.
//!
//! ```text
//!  client ──datagram──▶ listener ─▶ relay socket of that client ──▶ peer (fixed, --peer)
//!  client ◀──datagram── listener ◀─ relay socket ◀───────────────── peer
//! ```
//!
//! Client → peer datagrams of one receive batch are grouped by relay socket (one sendmmsg each); peer →
//! client datagrams from every readable relay socket are gathered and leave the listener in sendmmsg
//! batches of up to 64.
//!
//! It also answers STUN Binding requests (RFC 8489 §6.3.1) the cheapest way there is, so that Binding has a
//! yardstick too: the request is turned into its success response in its own receive slot (type, length,
//! one XOR-MAPPED-ADDRESS; any request attributes are dropped) and the answers of one receive batch leave
//! the listener in one sendmmsg. No integrity, no FINGERPRINT, no rate limit: the floor, not a server.
//!
//! And it answers the allocation churn (`turnpike-bench --scenario alloc`) the cheapest way, so that
//! churn has a yardstick as well ([`Churn`]): the kernel work that any TURN server must do per
//! allocation, and nothing else. An Allocate without MESSAGE-INTEGRITY gets a 401 (REALM, NONCE) of the
//! size of turnpike's; one with it gets a relay socket (socket, the same two buffer sizes, bind to a
//! port of its own, epoll registration) and a success (XOR-RELAYED-ADDRESS, LIFETIME,
//! XOR-MAPPED-ADDRESS); a Refresh with LIFETIME 0 closes that socket and gets a success. Nothing is
//! verified or signed (no HMAC, no nonce check, no quota), and it all runs on one thread.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use turnpike::sys::mmsg::{recv_batch, send_batch, RecvMeta, MAX_BATCH};
use turnpike::sys::{bind_udp, UdpOptions};

const SLOT: usize = 2048;
/// Slots for gathering peer → client datagrams across relay sockets before one flush.
const BACK_SLOTS: usize = 4 * MAX_BATCH;

/// Counters printed when the forwarder stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Datagrams forwarded client → peer.
    pub to_peer: u64,
    /// Datagrams forwarded peer → client.
    pub to_client: u64,
    /// Binding requests answered.
    pub bindings: u64,
    /// Allocations made (relay sockets opened) and deleted (closed) by the churn floor.
    pub allocations: u64,
    /// Deletes (Refresh with LIFETIME 0) answered.
    pub deletes: u64,
    /// Sends the kernel refused.
    pub send_failed: u64,
}

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The STUN header of a request in `slot[..len]`: (method, class bits cleared) if it is one.
fn request_method(slot: &[u8], len: usize) -> Option<u16> {
    let head = slot.get(..20).filter(|_| len >= 20)?;
    let kind = u16::from_be_bytes([head[0], head[1]]);
    // Class bits 0x0110 clear: a request.
    (kind & 0xC110 == 0 && head[4..8] == MAGIC_COOKIE).then_some(kind)
}

/// Rewrite the header of the request in `slot` as its `kind` answer with `body` bytes of attributes
/// (the transaction id stays).
fn answer_header(slot: &mut [u8], kind: u16, body: usize) {
    slot[0..2].copy_from_slice(&kind.to_be_bytes());
    slot[2..4].copy_from_slice(&(body as u16).to_be_bytes());
}

/// Write the XOR address attribute `attr` for `addr` at `out` (the message's transaction id is
/// `slot[8..20]`); its length.
///
/// ```text
/// | type | 8/20 | 0 | fam | port ^ 0x2112 | addr ^ cookie(‖tid) |
/// ```
fn put_xor_address(slot: &mut [u8], at: usize, attr: u16, addr: SocketAddr) -> usize {
    let (family, addr_len) = match addr {
        SocketAddr::V4(_) => (1u8, 4usize),
        SocketAddr::V6(_) => (2u8, 16usize),
    };
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE);
    mask[4..].copy_from_slice(&slot[8..20]);
    let out = &mut slot[at..at + 8 + addr_len];
    out[0..2].copy_from_slice(&attr.to_be_bytes());
    out[2..4].copy_from_slice(&(4 + addr_len as u16).to_be_bytes());
    out[4] = 0;
    out[5] = family;
    out[6..8].copy_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    let octets = match addr {
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(a) => a.ip().octets(),
    };
    let octets = &octets[16 - addr_len..];
    for (i, b) in octets.iter().enumerate() {
        out[8 + i] = b ^ mask[i];
    }
    8 + addr_len
}

/// If `slot[..len]` is a STUN Binding request, overwrite it with its success response and return the
/// response's length.
///
/// ```text
/// 0      2      4        8         20     22     24   26    28 (IPv4) / 40 (IPv6)
/// | 0101 | len  | cookie | tid (12) | 0020 | 8/20 | fam | port^ | addr ^ cookie(‖tid) |
/// ```
fn binding_response(slot: &mut [u8], len: usize, from: SocketAddr) -> Option<usize> {
    if request_method(slot, len)? != BINDING || slot.len() < 20 + 24 {
        return None;
    }
    let body = put_xor_address(slot, 20, XOR_MAPPED_ADDRESS, from);
    answer_header(slot, 0x0101, body);
    Some(20 + body)
}

const BINDING: u16 = 0x0001;
const ALLOCATE: u16 = 0x0003;
const REFRESH: u16 = 0x0004;
const LIFETIME: u16 = 0x000D;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const XOR_RELAYED_ADDRESS: u16 = 0x0016;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// What follows the header of the floor's 401: ERROR-CODE 401 "Unauthorized", REALM "turnpike" and a
/// 28-byte NONCE: 84 bytes in all, the size of turnpike's.
const CHALLENGE: [u8; 64] = *b"\x00\x09\x00\x10\x00\x00\x04\x01Unauthorized\x00\x14\x00\x08turnpike\x00\x15\x00\x1cobMatJos2gAAAAAAAAAAAAAAAAAA";

/// The value of the first attribute `attr` of the STUN message in `msg` (a walk over the attributes,
/// nothing checked beyond the bounds).
fn find_attribute(msg: &[u8], attr: u16) -> Option<&[u8]> {
    let mut at = 20;
    while let Some(head) = msg.get(at..at + 4) {
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = msg.get(at + 4..at + 4 + len)?;
        if kind == attr {
            return Some(value);
        }
        at += 4 + len.next_multiple_of(4);
    }
    None
}

/// The churn floor's allocations: one relay socket per client, on ports taken in turn from a range.
pub struct Churn {
    ip: std::net::IpAddr,
    ports: RangeInclusive<u16>,
    next_port: u16,
    opts: UdpOptions,
    /// client → its relay socket.
    allocations: HashMap<SocketAddr, UdpSocket>,
}

/// Relay sockets of the churn floor are registered from this token up (the port added).
const CHURN_TOKEN: usize = 1 << 32;
/// The churn floor's relay ports: those of turnpike's bench config (`scripts/bench-lib.sh`), below the
/// ephemeral range where the generator's clients bind.
const CHURN_PORTS: RangeInclusive<u16> = 10000..=29999;

impl Churn {
    /// Relay sockets on `ip`, ports `ports`, with `opts` (the buffers turnpike's bench config sets).
    pub fn new(ip: std::net::IpAddr, ports: RangeInclusive<u16>, opts: UdpOptions) -> Churn {
        Churn {
            ip,
            next_port: *ports.start(),
            ports,
            opts,
            allocations: HashMap::new(),
        }
    }

    /// If `slot[..len]` from `from` is an Allocate or a Refresh, act on it and overwrite it with its
    /// answer; the answer's length.
    fn answer(
        &mut self,
        slot: &mut [u8],
        len: usize,
        from: SocketAddr,
        registry: &Registry,
        counts: &mut Counts,
    ) -> io::Result<Option<usize>> {
        let Some(method) = request_method(slot, len) else {
            return Ok(None);
        };
        if slot.len() < 20 + CHALLENGE.len() {
            return Ok(None);
        }
        let msg = &slot[..len];
        match method {
            ALLOCATE if find_attribute(msg, MESSAGE_INTEGRITY).is_none() => {
                slot[20..20 + CHALLENGE.len()].copy_from_slice(&CHALLENGE);
                answer_header(slot, 0x0113, CHALLENGE.len());
                Ok(Some(20 + CHALLENGE.len()))
            }
            ALLOCATE => {
                let relayed = match self.allocations.get(&from) {
                    // A retransmission: the same relayed address again.
                    Some(s) => s.local_addr()?,
                    None => {
                        let s = self.open(registry)?;
                        let addr = s.local_addr()?;
                        self.allocations.insert(from, s);
                        counts.allocations += 1;
                        addr
                    }
                };
                let mut at = 20 + put_xor_address(slot, 20, XOR_RELAYED_ADDRESS, relayed);
                slot[at..at + 8].copy_from_slice(&[0, 0x0D, 0, 4, 0, 0, 0x0E, 0x10]);
                at += 8;
                at += put_xor_address(slot, at, XOR_MAPPED_ADDRESS, from);
                answer_header(slot, 0x0103, at - 20);
                Ok(Some(at))
            }
            REFRESH => {
                let lifetime = find_attribute(msg, LIFETIME)
                    .and_then(|v| v.try_into().ok())
                    .map(u32::from_be_bytes);
                let granted = if lifetime == Some(0) {
                    // Closing it takes it out of the epoll set.
                    if self.allocations.remove(&from).is_some() {
                        counts.deletes += 1;
                    }
                    0u32
                } else {
                    3600
                };
                slot[20..24].copy_from_slice(&[0, 0x0D, 0, 4]);
                slot[24..28].copy_from_slice(&granted.to_be_bytes());
                answer_header(slot, 0x0104, 8);
                Ok(Some(28))
            }
            _ => Ok(None),
        }
    }

    /// A relay socket on the next free port of the range, registered with `registry`.
    fn open(&mut self, registry: &Registry) -> io::Result<UdpSocket> {
        let span = usize::from(*self.ports.end() - *self.ports.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port >= *self.ports.end() {
                *self.ports.start()
            } else {
                port + 1
            };
            match bind_udp(SocketAddr::new(self.ip, port), self.opts) {
                Ok(s) => {
                    registry.register(
                        &mut SourceFd(&s.as_raw_fd()),
                        Token(CHURN_TOKEN + usize::from(port)),
                        Interest::READABLE,
                    )?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free relay port left in the churn floor's range",
        ))
    }
}

/// Run until `duration` passes (forever if `None`).
pub fn run(
    listen: SocketAddr,
    peer: SocketAddr,
    buffers: usize,
    duration: Option<Duration>,
) -> io::Result<Counts> {
    let opts = UdpOptions {
        recv_buffer: Some(buffers),
        send_buffer: Some(buffers),
        ..UdpOptions::default()
    };
    let listener = bind_udp(listen, opts)?;
    let mut poll = Poll::new()?;
    poll.registry().register(
        &mut SourceFd(&listener.as_raw_fd()),
        Token(0),
        Interest::READABLE,
    )?;
    let mut relays: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut slab = vec![0u8; BACK_SLOTS * SLOT];
    let mut meta = [RecvMeta::default(); MAX_BATCH];
    let mut back: Vec<(SocketAddr, usize, usize)> = Vec::with_capacity(BACK_SLOTS);
    let mut order: Vec<usize> = Vec::with_capacity(MAX_BATCH);
    let mut events = Events::with_capacity(1024);
    let mut counts = Counts::default();
    let start = Instant::now();
    let relay_ip = SocketAddr::new(listen.ip(), 0);
    let mut churn = Churn::new(listen.ip(), CHURN_PORTS, opts);
    loop {
        if duration.is_some_and(|d| start.elapsed() >= d) {
            return Ok(counts);
        }
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        back.clear();
        for ev in events.iter() {
            if ev.token() == Token(0) {
                // Client → peer, received at the start of the slab: send what was gathered there first.
                flush(&listener, &slab, &mut back, &mut counts)?;
                loop {
                    let n = recv_batch(listener.as_raw_fd(), &mut slab, SLOT, 0, &mut meta)?;
                    order.clear();
                    let mut answers = [(peer, &[][..]); MAX_BATCH];
                    let mut k = 0;
                    for (j, m) in meta.iter_mut().take(n).enumerate() {
                        let slot = &mut slab[j * SLOT..(j + 1) * SLOT];
                        let answer = match binding_response(slot, m.len, m.addr) {
                            Some(len) => {
                                counts.bindings += 1;
                                Some(len)
                            }
                            None => {
                                churn.answer(slot, m.len, m.addr, poll.registry(), &mut counts)?
                            }
                        };
                        if let Some(len) = answer {
                            // Answered below; never a flow of its own.
                            m.len = len;
                            order.push(usize::MAX);
                            continue;
                        }
                        let idx = match by_client.get(&m.addr) {
                            Some(&i) => i,
                            None => {
                                let s = bind_udp(relay_ip, opts)?;
                                let i = relays.len();
                                poll.registry().register(
                                    &mut SourceFd(&s.as_raw_fd()),
                                    Token(i + 1),
                                    Interest::READABLE,
                                )?;
                                relays.push((s, m.addr));
                                by_client.insert(m.addr, i);
                                i
                            }
                        };
                        order.push(idx);
                    }
                    for j in (0..n).filter(|&j| order[j] == usize::MAX) {
                        answers[k] = (meta[j].addr, &slab[j * SLOT..j * SLOT + meta[j].len]);
                        k += 1;
                    }
                    if k > 0 {
                        let sent = send_batch(listener.as_raw_fd(), &answers[..k], |_, _| {});
                        counts.send_failed += (k - sent) as u64;
                    }
                    // One sendmmsg per relay socket, datagrams of a flow kept in order.
                    let mut done = [false; MAX_BATCH];
                    for j in 0..n {
                        if order[j] == usize::MAX {
                            continue;
                        }
                        if done[j] {
                            continue;
                        }
                        let idx = order[j];
                        let mut msgs = [(peer, &[][..]); MAX_BATCH];
                        let mut k = 0;
                        for jj in j..n {
                            if !done[jj] && order[jj] == idx {
                                done[jj] = true;
                                msgs[k] = (peer, &slab[jj * SLOT..jj * SLOT + meta[jj].len]);
                                k += 1;
                            }
                        }
                        let sent = send_batch(relays[idx].0.as_raw_fd(), &msgs[..k], |_, _| {});
                        counts.to_peer += sent as u64;
                        counts.send_failed += (k - sent) as u64;
                    }
                    if n < MAX_BATCH {
                        break;
                    }
                }
            } else if ev.token().0 >= CHURN_TOKEN {
                // A churn floor's relay socket: a churn sends no peer data, and nothing is read here
                // (mio's registration is edge-triggered, so it is not reported again).
                continue;
            } else {
                // Peer → client: gather, flush when the slab is full.
                let idx = ev.token().0 - 1;
                let Some((sock, client)) = relays.get(idx) else {
                    continue;
                };
                loop {
                    if back.len() + MAX_BATCH > BACK_SLOTS {
                        flush(&listener, &slab, &mut back, &mut counts)?;
                    }
                    let first = back.len();
                    let n = recv_batch(
                        sock.as_raw_fd(),
                        &mut slab[first * SLOT..],
                        SLOT,
                        0,
                        &mut meta,
                    )?;
                    for (j, m) in meta.iter().take(n).enumerate() {
                        back.push((*client, (first + j) * SLOT, m.len));
                    }
                    if n < MAX_BATCH {
                        break;
                    }
                }
            }
        }
        flush(&listener, &slab, &mut back, &mut counts)?;
    }
}

fn flush(
    listener: &UdpSocket,
    slab: &[u8],
    back: &mut Vec<(SocketAddr, usize, usize)>,
    counts: &mut Counts,
) -> io::Result<()> {
    for chunk in back.chunks(MAX_BATCH) {
        let mut msgs = [(chunk[0].0, &[][..]); MAX_BATCH];
        for (m, &(dst, at, len)) in msgs.iter_mut().zip(chunk) {
            *m = (dst, &slab[at..at + len]);
        }
        let sent = send_batch(listener.as_raw_fd(), &msgs[..chunk.len()], |_, _| {});
        counts.to_client += sent as u64;
        counts.send_failed += (chunk.len() - sent) as u64;
    }
    back.clear();
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use turnpike::wire::{Class, Message, Method};

    #[test]
    fn binding_answer_parses_as_a_success_with_the_mapped_address() {
        for from in ["198.51.100.7:40000", "[2001:db8::7]:40001"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut slot = [0u8; SLOT];
            slot[..20].copy_from_slice(&[
                0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ]);
            let len = binding_response(&mut slot, 20, from).unwrap();
            let msg = Message::parse(&slot[..len]).unwrap();
            let t = msg.message_type();
            assert_eq!((t.class, t.method), (Class::Success, Method::BINDING));
            assert_eq!(msg.attrs.xor_mapped_address, Some(from));
            assert_eq!(&slot[8..20], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        }
    }

    #[test]
    fn only_binding_requests_are_answered() {
        let from: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut slot = [0u8; SLOT];
        // An Allocate request, a ChannelData header and a short datagram are relayed, not answered.
        slot[..20].copy_from_slice(&[
            0, 3, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        assert_eq!(binding_response(&mut slot, 20, from), None);
        slot[..4].copy_from_slice(&[0x40, 0, 0, 4]);
        assert_eq!(binding_response(&mut slot, 20, from), None);
        slot[..2].copy_from_slice(&[0, 1]);
        assert_eq!(binding_response(&mut slot, 8, from), None);
    }

    /// A request of method `kind` from `tid` with `attrs` (already encoded) in a receive slot.
    fn request(kind: u16, tid: u8, attrs: &[u8]) -> ([u8; SLOT], usize) {
        let mut slot = [0u8; SLOT];
        slot[0..2].copy_from_slice(&kind.to_be_bytes());
        slot[2..4].copy_from_slice(&(attrs.len() as u16).to_be_bytes());
        slot[4..8].copy_from_slice(&MAGIC_COOKIE);
        slot[8..20].copy_from_slice(&[tid; 12]);
        slot[20..20 + attrs.len()].copy_from_slice(attrs);
        (slot, 20 + attrs.len())
    }

    #[test]
    fn the_churn_floor_challenges_allocates_and_deletes() {
        let poll = Poll::new().unwrap();
        // A port range of its own (the bench's is 10000-29999): nothing else on loopback uses it.
        let mut churn = Churn::new(
            "127.0.0.1".parse().unwrap(),
            9000..=9009,
            UdpOptions::default(),
        );
        let mut counts = Counts::default();
        // The floor's answer to request `kind` with `attrs` from `from`, if it answers.
        let mut ask = |counts: &mut Counts, kind: u16, tid: u8, attrs: &[u8], from: SocketAddr| {
            let (mut slot, len) = request(kind, tid, attrs);
            let n = churn
                .answer(&mut slot, len, from, poll.registry(), counts)
                .unwrap()?;
            assert_eq!(&slot[8..20], &[tid; 12], "the transaction id stays");
            Some(slot[..n].to_vec())
        };
        let from: SocketAddr = "127.0.1.9:40000".parse().unwrap();
        let other: SocketAddr = "127.0.1.10:40000".parse().unwrap();

        // No MESSAGE-INTEGRITY: a 401 of turnpike's size with a realm and a nonce.
        let answer = ask(&mut counts, ALLOCATE, 1, &[], from).unwrap();
        assert_eq!(answer.len(), 84);
        let msg = Message::parse(&answer).unwrap();
        assert_eq!(msg.message_type().class, Class::Error);
        assert_eq!(msg.attrs.error_code.map(|e| e.0), Some(401));
        assert_eq!(msg.attrs.realm, Some("turnpike"));
        assert_eq!(msg.attrs.nonce.map(str::len), Some(28));
        assert_eq!(counts.allocations, 0);

        // With it: a relay socket that holds its port, and a success naming it.
        let mut mi = vec![0, 8, 0, 20];
        mi.extend_from_slice(&[0; 20]);
        let answer = ask(&mut counts, ALLOCATE, 2, &mi, from).unwrap();
        let msg = Message::parse(&answer).unwrap();
        let t = msg.message_type();
        assert_eq!((t.class, t.method), (Class::Success, Method::ALLOCATE));
        let relayed = msg.attrs.xor_relayed_address.unwrap();
        assert_eq!(relayed, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(msg.attrs.lifetime, Some(3600));
        assert_eq!(msg.attrs.xor_mapped_address, Some(from));
        let taken = UdpSocket::bind(relayed).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(counts.allocations, 1);

        // Its retransmission names the same socket; a second client gets the next port.
        let relayed_of = |answer: Option<Vec<u8>>| {
            let answer = answer.unwrap();
            Message::parse(&answer).unwrap().attrs.xor_relayed_address
        };
        assert_eq!(
            relayed_of(ask(&mut counts, ALLOCATE, 2, &mi, from)),
            Some(relayed)
        );
        assert_eq!(
            relayed_of(ask(&mut counts, ALLOCATE, 3, &mi, other)),
            Some("127.0.0.1:9001".parse().unwrap())
        );
        assert_eq!(counts.allocations, 2);

        // Refresh with LIFETIME 0: a success with LIFETIME 0, and the port is free again.
        let answer = ask(&mut counts, REFRESH, 4, &[0, 0x0D, 0, 4, 0, 0, 0, 0], from).unwrap();
        let msg = Message::parse(&answer).unwrap();
        let t = msg.message_type();
        assert_eq!((t.class, t.method), (Class::Success, Method::REFRESH));
        assert_eq!(msg.attrs.lifetime, Some(0));
        assert_eq!(counts.deletes, 1);
        UdpSocket::bind(relayed).expect("the deleted allocation's relay socket is closed");

        // Not a request, or not one of these: left alone.
        assert_eq!(ask(&mut counts, 0x0113, 5, &[], from), None);
        assert_eq!(ask(&mut counts, 0x0009, 6, &[], from), None);
        // An attribute that overruns the message ends the walk: no MESSAGE-INTEGRITY, a 401.
        let answer = ask(&mut counts, ALLOCATE, 7, &[0, 8, 0, 200], other);
        assert_eq!(answer.map(|a| a.len()), Some(84));
    }

    /// The generator's own churn loop against the running floor: every allocation answered and
    /// deleted, nothing refused.
    #[test]
    fn the_generator_churns_against_the_floor() {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let floor =
            std::thread::spawn(move || run(listen, peer, 1 << 20, Some(Duration::from_secs(3))));
        std::thread::sleep(Duration::from_millis(200));
        let mut poll = Poll::new().unwrap();
        let auth = crate::turn::Auth::Static("bench".into(), "bench-pass".into());
        let mut clients = crate::turn::open_clients(8, listen, &auth, &poll, 0, None).unwrap();
        let plan = crate::turn::Plan::Churn {
            max: 200,
            rate: None,
            interval: None,
            idle_sleep: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let st = crate::turn::drive(&mut clients, &mut poll, 0, listen, plan, deadline).unwrap();
        let counts = floor.join().unwrap().unwrap();
        assert!(st.allocations >= 200, "{st:?}");
        assert_eq!((st.errors, st.timeouts, st.left), (0, 0, 0), "{st:?}");
        assert_eq!(st.deletes, st.allocations);
        assert_eq!(
            (counts.allocations, counts.deletes),
            (st.allocations, st.deletes)
        );
    }
}
