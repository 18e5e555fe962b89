//! The data-plane side of the generator: paced ChannelData (or raw datagrams, for the bare forwarder) from
//! many client sockets, a built-in echo peer, and the accounting of what came back.
//!
//! ```text
//!  client sockets ──ChannelData──▶ server ──payload──▶ echo socket
//!        ▲                                                  │ (reflects to the sender: the relayed address)
//!        └──────────ChannelData◀── server ◀──payload────────┘
//! ```
//!
//! One thread does everything, spinning: send what the [`Pacer`] says is due (one sendmmsg per flow per
//! iteration), then drain whatever sockets are readable with recvmmsg. The echo peer replies with one
//! sendmmsg per received batch. Every 10 ms the flows' [`Keeper`]s (if any) send their due refreshes;
//! the answers, STUN among the ChannelData on the same sockets, go to them and are never counted as
//! relayed packets.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use turnpike::sys::mmsg::{recv_batch, send_batch, RecvMeta, MAX_BATCH};
use turnpike::wire::Message;

use crate::pace::{FlowRx, Pacer, Probe, PROBE_LEN};
use crate::proc::ProcSample;
use crate::refresh::{Keeper, RefreshStats};
use crate::turn::new_histogram;

const ECHO: Token = Token(usize::MAX - 1);
const SLOT: usize = 2048;
/// How often the keepers are polled.
const KEEP_EVERY_NS: u64 = 10_000_000;

/// One paced traffic run.
#[derive(Debug)]
pub struct Traffic {
    poll: Poll,
    clients: Vec<UdpSocket>,
    target: SocketAddr,
    echo: UdpSocket,
    /// ChannelData framing (TURN) or raw payloads (bare forwarder).
    channel: Option<u16>,
    size: usize,
    seq: Vec<u64>,
    rr: usize,
    slab: Vec<u8>,
    meta: [RecvMeta; MAX_BATCH],
    /// Epoch of the current step; packets of other epochs are late.
    epoch: u16,
    server_pid: Option<u32>,
    start: Instant,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Packets a flow sends back to back (one sendmmsg); 1 spreads every packet over the flows.
    pub burst: usize,
    /// Sleep this long when an iteration found nothing to do (zero: spin). A real-time (SCHED_FIFO)
    /// generator must sleep, or the kernel's RT throttling stops it for 50 ms every second.
    pub idle_sleep: Duration,
    /// One keeper per flow (`None`: that flow is not refreshed), indexed like `clients`.
    keepers: Vec<Option<Keeper>>,
    /// What the keepers did over the whole run.
    pub refresh: RefreshStats,
}

/// What one step (one offered rate for one duration) measured.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Offered rate, packets/s (client → server; each comes back once).
    pub offered: f64,
    /// Seconds of sending.
    pub seconds: f64,
    /// Packets the kernel accepted.
    pub sent: u64,
    /// Sends refused (socket buffer full): the generator's own limit.
    pub send_failed: u64,
    /// Echoed packets received back.
    pub received: u64,
    /// Of them, arrived after a later one of the same flow.
    pub reordered: u64,
    /// Arrived after their step ended (not counted as received).
    pub late: u64,
    /// Echo replies the echo socket could not send.
    pub echo_failed: u64,
    /// Round-trip times, ns.
    pub rtt: Histogram<u64>,
    /// Server CPU seconds during the step, if its pid is known.
    pub server_cpu: Option<f64>,
}

impl StepResult {
    /// Fraction of sent packets that did not come back.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }

    /// Delivered round trips per second.
    pub fn delivered_pps(&self) -> f64 {
        self.received as f64 / self.seconds.max(1e-9)
    }

    /// Server CPU µs per relayed packet (each round trip is two relayed packets: to the peer and back).
    pub fn cpu_us_per_packet(&self) -> Option<f64> {
        let pkts = 2 * self.received;
        self.server_cpu
            .filter(|_| pkts > 0)
            .map(|c| c * 1e6 / pkts as f64)
    }

    /// Whether this step passes a sweep: under `max_loss` and the generator really offered the rate.
    pub fn passes(&self, max_loss: f64) -> bool {
        self.loss() < max_loss && self.sent as f64 >= 0.97 * self.offered * self.seconds
    }
}

impl Traffic {
    /// Traffic from `clients` (already allocated and bound, or plain sockets for the bare forwarder) to
    /// `target`, echoed by `echo`.
    pub fn new(
        clients: Vec<UdpSocket>,
        target: SocketAddr,
        echo: UdpSocket,
        channel: Option<u16>,
        size: usize,
        server_pid: Option<u32>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        for (i, c) in clients.iter().enumerate() {
            poll.registry().register(
                &mut SourceFd(&c.as_raw_fd()),
                Token(i),
                Interest::READABLE,
            )?;
        }
        poll.registry()
            .register(&mut SourceFd(&echo.as_raw_fd()), ECHO, Interest::READABLE)?;
        let n = clients.len();
        Ok(Traffic {
            poll,
            clients,
            target,
            echo,
            channel,
            size: size.max(PROBE_LEN),
            seq: vec![0; n],
            rr: 0,
            slab: vec![0u8; MAX_BATCH * SLOT],
            meta: [RecvMeta::default(); MAX_BATCH],
            epoch: 0,
            server_pid,
            start: Instant::now(),
            progress: false,
            burst: 1,
            idle_sleep: Duration::ZERO,
            keepers: Vec::new(),
            refresh: RefreshStats::default(),
        })
    }

    /// Refresh the flows from now on: `keepers[i]` keeps flow `i` (client socket `i`) alive.
    pub fn keep_alive(&mut self, keepers: Vec<Option<Keeper>>) {
        let now = self.now_ns();
        self.keepers = keepers;
        for k in self.keepers.iter_mut().flatten() {
            k.start(now);
        }
    }

    /// Offer `rate` packets/s for `duration`, then wait `drain` for stragglers.
    pub fn step(
        &mut self,
        rate: f64,
        duration: Duration,
        drain: Duration,
    ) -> io::Result<StepResult> {
        self.epoch = self.epoch.wrapping_add(1);
        let mut rx = vec![FlowRx::default(); self.clients.len()];
        let mut r = StepResult {
            offered: rate,
            seconds: duration.as_secs_f64(),
            sent: 0,
            send_failed: 0,
            received: 0,
            reordered: 0,
            late: 0,
            echo_failed: 0,
            rtt: new_histogram(),
            server_cpu: None,
        };
        let cpu0 = self.server_pid.and_then(ProcSample::read);
        let t0 = Instant::now();
        let t0_ns = self.now_ns();
        let send_end = duration.as_nanos() as u64;
        let stop = send_end + drain.as_nanos() as u64;
        let mut pacer = Pacer::new(rate, 4 * MAX_BATCH as u64);
        let mut events = Events::with_capacity(1024);
        let mut next_progress = 1_000_000_000u64;
        let mut last = (0u64, 0u64);
        let mut cpu_end = None;
        let burst = self.burst.max(1);
        let mut owed = 0usize;
        let mut next_keep = 0u64;
        loop {
            let now = self.now_ns() - t0_ns;
            let mut idle = true;
            if now >= next_keep && !self.keepers.is_empty() {
                next_keep = now + KEEP_EVERY_NS;
                self.keep();
            }
            if now < send_end {
                owed += pacer.due(now) as usize;
                if owed >= burst {
                    let bursts = owed / burst;
                    owed -= bursts * burst;
                    idle = false;
                    let (ok, failed) = self.send(bursts, burst)?;
                    r.sent += ok;
                    r.send_failed += failed;
                }
            } else if cpu_end.is_none() {
                cpu_end = Some(self.server_pid.and_then(ProcSample::read));
            } else if now >= stop {
                break;
            }
            match self.poll.poll(&mut events, Some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                idle = false;
                if ev.token() == ECHO {
                    r.echo_failed += self.echo()?;
                } else {
                    self.receive(ev.token().0, &mut rx, &mut r)?;
                }
            }
            if idle && !self.idle_sleep.is_zero() {
                std::thread::sleep(self.idle_sleep);
            }
            if self.progress && now >= next_progress && now < send_end {
                next_progress += 1_000_000_000;
                let secs = now as f64 / 1e9;
                eprintln!(
                    "  t={secs:5.1}s offered {:>8.0}/s sent {:>8} (+{:>7}/s) recv {:>8} (+{:>7}/s) loss {:6.3}% p99 {:>7.1}µs",
                    rate,
                    r.sent,
                    r.sent - last.0,
                    r.received,
                    r.received - last.1,
                    100.0 * r.sent.saturating_sub(r.received) as f64 / r.sent.max(1) as f64,
                    r.rtt.value_at_quantile(0.99) as f64 / 1e3,
                );
                last = (r.sent, r.received);
            }
        }
        r.seconds = (duration.as_secs_f64()).min(t0.elapsed().as_secs_f64());
        if let (Some(a), Some(Some(b))) = (cpu0, cpu_end) {
            r.server_cpu = Some(b.cpu_seconds - a.cpu_seconds);
        }
        r.reordered = rx.iter().map(|f| f.reordered).sum();
        Ok(r)
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Let every keeper retransmit or start what is due.
    fn keep(&mut self) {
        let now = self.now_ns();
        for (k, sock) in self.keepers.iter_mut().zip(&self.clients) {
            if let Some(k) = k {
                k.poll(now, sock, self.target, &mut self.refresh);
            }
        }
    }

    /// Send `n` bursts of `burst` packets, spread round robin over the flows, one sendmmsg per flow.
    /// Returns (sent, refused).
    fn send(&mut self, n: usize, burst: usize) -> io::Result<(u64, u64)> {
        let flows = self.clients.len();
        let hdr = if self.channel.is_some() { 4 } else { 0 };
        let len = hdr + self.size;
        let now = self.now_ns();
        let (mut ok, mut failed) = (0u64, 0u64);
        for k in 0..n.min(flows) {
            let f = (self.rr + k) % flows;
            let mut count = (n / flows + usize::from(k < n % flows)) * burst;
            while count > 0 {
                let batch = count.min(MAX_BATCH);
                for j in 0..batch {
                    let buf = &mut self.slab[j * SLOT..j * SLOT + len];
                    if let Some(ch) = self.channel {
                        buf[0..2].copy_from_slice(&ch.to_be_bytes());
                        buf[2..4].copy_from_slice(&(self.size as u16).to_be_bytes());
                    }
                    Probe {
                        flow: f as u16,
                        epoch: self.epoch,
                        seq: self.seq[f],
                        sent_ns: now,
                    }
                    .write(&mut buf[hdr..]);
                    self.seq[f] += 1;
                }
                let mut msgs = [(self.target, &[][..]); MAX_BATCH];
                for (j, m) in msgs.iter_mut().enumerate().take(batch) {
                    m.1 = &self.slab[j * SLOT..j * SLOT + len];
                }
                let sent = send_batch(self.clients[f].as_raw_fd(), &msgs[..batch], |_, _| {});
                ok += sent as u64;
                failed += (batch - sent) as u64;
                count -= batch;
            }
        }
        self.rr = (self.rr + n) % flows.max(1);
        Ok((ok, failed))
    }

    /// Reflect everything waiting on the echo socket. Returns replies that could not be sent.
    fn echo(&mut self) -> io::Result<u64> {
        let mut failed = 0;
        loop {
            let n = recv_batch(
                self.echo.as_raw_fd(),
                &mut self.slab,
                SLOT,
                0,
                &mut self.meta,
            )?;
            if n == 0 {
                return Ok(failed);
            }
            let mut msgs = [(self.target, &[][..]); MAX_BATCH];
            for (j, m) in msgs.iter_mut().enumerate().take(n) {
                *m = (
                    self.meta[j].addr,
                    &self.slab[j * SLOT..j * SLOT + self.meta[j].len],
                );
            }
            let sent = send_batch(self.echo.as_raw_fd(), &msgs[..n], |_, _| {});
            failed += (n - sent) as u64;
            if n < MAX_BATCH {
                return Ok(failed);
            }
        }
    }

    /// Drain client socket `i` and account for what came back.
    fn receive(&mut self, i: usize, rx: &mut [FlowRx], r: &mut StepResult) -> io::Result<()> {
        let Some(sock) = self.clients.get(i) else {
            return Ok(());
        };
        let fd = sock.as_raw_fd();
        let hdr = if self.channel.is_some() { 4 } else { 0 };
        loop {
            let n = match recv_batch(fd, &mut self.slab, SLOT, 0, &mut self.meta) {
                Ok(n) => n,
                // An ICMP error from an earlier send (e.g. the server is gone): not ours to count here.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                Err(e) => return Err(e),
            };
            let now = self.now_ns();
            for j in 0..n {
                let d = &self.slab[j * SLOT..j * SLOT + self.meta[j].len];
                if hdr > 0 && !matches!(d.first(), Some(0x40..=0x7F)) {
                    // STUN (RFC 7983: first byte 0-3): a refresh's answer, for the flow's keeper.
                    if let (Some(0..=3), Ok(m), Some(Some(k))) =
                        (d.first(), Message::parse(d), self.keepers.get_mut(i))
                    {
                        k.on_message(&m, now, sock, self.target, &mut self.refresh);
                    }
                    continue;
                }
                let Some(p) = d.get(hdr..).and_then(Probe::read) else {
                    continue;
                };
                if p.epoch != self.epoch {
                    r.late += 1;
                    continue;
                }
                if let Some(f) = rx.get_mut(usize::from(p.flow)) {
                    f.on_seq(p.seq);
                    r.received += 1;
                    let _ = r.rtt.record(now.saturating_sub(p.sent_ns).max(1));
                }
            }
            if n < MAX_BATCH {
                return Ok(());
            }
        }
    }
}
