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
    /// Sends the kernel refused.
    pub send_failed: u64,
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
                    for m in meta.iter().take(n) {
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
                    // One sendmmsg per relay socket, datagrams of a flow kept in order.
                    let mut done = [false; MAX_BATCH];
                    for j in 0..n {
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
