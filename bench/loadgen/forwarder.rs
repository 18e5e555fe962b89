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

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
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
    /// Sends the kernel refused.
    pub send_failed: u64,
}

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// If `slot[..len]` is a STUN Binding request, overwrite it with its success response and return the
/// response's length.
///
/// ```text
/// 0      2      4        8         20     22     24   26    28 (IPv4) / 40 (IPv6)
/// | 0101 | len  | cookie | tid (12) | 0020 | 8/20 | fam | port^ | addr ^ cookie(‖tid) |
/// ```
fn binding_response(slot: &mut [u8], len: usize, from: SocketAddr) -> Option<usize> {
    let head = slot.get(..20).filter(|_| len >= 20)?;
    if head[0..2] != [0x00, 0x01] || head[4..8] != MAGIC_COOKIE {
        return None;
    }
    let (family, addr_len) = match from {
        SocketAddr::V4(_) => (1u8, 4usize),
        SocketAddr::V6(_) => (2u8, 16usize),
    };
    let body = 4 + addr_len;
    let out = slot.get_mut(..20 + 4 + body)?;
    out[0..2].copy_from_slice(&[0x01, 0x01]);
    out[2..4].copy_from_slice(&(body as u16 + 4).to_be_bytes());
    out[20..22].copy_from_slice(&[0x00, 0x20]);
    out[22..24].copy_from_slice(&(body as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    let port = from.port() ^ 0x2112;
    out[26..28].copy_from_slice(&port.to_be_bytes());
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE);
    let (cookie_tid, addr) = out.split_at_mut(28);
    mask[4..].copy_from_slice(&cookie_tid[8..20]);
    match from {
        SocketAddr::V4(a) => a
            .ip()
            .octets()
            .iter()
            .enumerate()
            .for_each(|(i, b)| addr[i] = b ^ mask[i]),
        SocketAddr::V6(a) => a
            .ip()
            .octets()
            .iter()
            .enumerate()
            .for_each(|(i, b)| addr[i] = b ^ mask[i]),
    }
    Some(20 + 4 + body)
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
                        if let Some(len) = binding_response(slot, m.len, m.addr) {
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
                        let sent = send_batch(listener.as_raw_fd(), &answers[..k])?;
                        counts.bindings += sent as u64;
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
                        let sent = send_batch(relays[idx].0.as_raw_fd(), &msgs[..k])?;
                        counts.to_peer += sent as u64;
                        counts.send_failed += (k - sent) as u64;
                    }
                    if n < MAX_BATCH {
                        break;
                    }
                }
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
        let sent = send_batch(listener.as_raw_fd(), &msgs[..chunk.len()])?;
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
}
