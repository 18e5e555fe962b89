//! The control thread: drives [`Server`], executes its commands (relay sockets, route updates), sends its
//! replies, and starts and stops the workers.
//!
//! Replies leave from the listener socket of the worker that owns the client's flow (the control thread
//! holds a clone of every worker's listener sockets), so their source is the address:port the client sent
//! to. Commands are executed before the transmits of the same step, so that the route a response
//! announces is installed in the worker before the client can use it.
//!
//! Queues, both ways bounded:
//! - workers → control: one FIFO ([`ControlTx`]). STUN copies are admitted within a count and a byte
//!   bound and dropped (counted per worker, `control_busy`) beyond it; accounting (`RelayClosed`,
//!   `StreamClosed`, `Counters`, `WorkerExited`) is never refused and never blocks a worker.
//! - control → worker: a bounded mailbox per worker, a wait-free single-producer ring (`rtrb`). Route
//!   updates wait for room, which the worker always makes (it never waits for the control thread, not
//!   even for a message half written); replies to stream clients are dropped and counted when it is
//!   full.
//!
//! A worker whose loop ends while the relay runs (an error or a panic) is reported by its own thread:
//! the relay closes that worker's listeners (so the kernel's SO_REUSEPORT groups stop handing it
//! clients), turns not ready, drains, and ends with an error (a non-zero exit status).
//!
//! May use: server, route, sys, dataplane, wire, auth, policy, config, budget.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rtrb::{Producer, PushError, RingBuffer};

use crate::clock::unix_now;
use crate::dataplane::stream::{StreamLimits, StreamListener, StreamShared, Streams};
use crate::dataplane::{
    self, BackendKind, ControlTx, Core, StunQueue, ToControl, WorkerMsg, WorkerSetup, WorkerStats,
};
use crate::metrics::Reloads;
use crate::route::{AllocationId, ClientKey, Counters, ListenerId, RouteUpdate};
use crate::server::{self, EndReason, FiveTuple, Server, Transport};
use crate::sys::{self, EventFd, UdpOptions};

pub mod exec;
mod metering;
#[cfg(test)]
mod tests;

use exec::{Executor, Plane};

/// STUN copies queued from the workers to the control thread at most; beyond it they are dropped and
/// counted (accounting messages are not bounded by it: see [`ControlTx`]).
pub(crate) const CONTROL_QUEUE: usize = 16 * 1024;
/// Bytes of STUN copies queued at most (a stream message may be 64 KiB: the count alone would allow
/// about 1 GiB).
pub(crate) const CONTROL_QUEUE_BYTES: usize = 8 << 20;
/// Messages queued from the control thread to one worker at most. Route updates wait for room (the
/// worker never waits for the control thread, so it always makes room); replies to stream clients are
/// dropped and counted.
const MAILBOX: usize = 4096;
/// Control messages handled at most before the workers with queued mail are woken, when the control
/// queue does not run empty first (see [`Worker::queue`]).
const WAKE_EVERY: usize = 64;

/// What the relay needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The TURN core's settings.
    pub server: server::Config,
    /// UDP listen addresses (port 0 picks one port, shared by every worker).
    pub listen: Vec<SocketAddr>,
    /// Worker threads.
    pub workers: usize,
    /// `None` = auto (io_uring if it works, else epoll).
    pub backend: Option<BackendKind>,
    /// SO_RCVBUF.
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF.
    pub send_buffer: Option<usize>,
    /// Pin worker k to core k.
    pub pin_workers: bool,
    /// How long existing allocations keep relaying after a shutdown signal.
    pub drain: Duration,
    /// Where final usage records go (metering); they are logged either way.
    pub usage_sink: Option<Sender<UsageRecord>>,
    /// TURN over TCP and TLS.
    pub stream: StreamSettings,
    /// The kernel fast path (`[xdp]`, off by default).
    pub xdp: crate::xdp::XdpSettings,
}

/// TURN over TCP and TLS: listeners, TLS configuration, limits.
#[derive(Debug, Clone, Default)]
pub struct StreamSettings {
    /// TCP listen addresses (port 0 picks one port, shared by every worker).
    pub listen_tcp: Vec<SocketAddr>,
    /// TLS listen addresses.
    pub listen_tls: Vec<SocketAddr>,
    /// The TLS server configuration (required when `listen_tls` is not empty).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connection limits and timeouts.
    pub limits: StreamLimits,
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    to_control: Sender<ToControl>,
    control: Option<JoinHandle<io::Result<()>>>,
    listen: Vec<SocketAddr>,
    listen_tcp: Vec<SocketAddr>,
    listen_tls: Vec<SocketAddr>,
    backend: BackendKind,
    stats: Vec<Arc<WorkerStats>>,
    streams: Arc<StreamShared>,
    reloader: Reloader,
}

/// Hands configuration reloads to a running relay's control thread (from a signal handler's thread:
/// it is `Clone` and `Send`), and counts them.
#[derive(Debug, Clone)]
pub struct Reloader {
    to_control: Sender<ToControl>,
    staged: Arc<Staged>,
    reloads: Arc<Reloads>,
    /// The listeners, ports resolved: service ports in every peer policy.
    service_ports: Vec<SocketAddr>,
}

/// A reload handed to the control thread: the new TURN core settings and where its answer goes.
type Staged = Mutex<Option<(server::Config, Sender<ReloadResult>)>>;

/// What the control thread made of a reload: the allocations the new peer policy took permissions or
/// channels from, or why the core refused the settings.
pub type ReloadResult = Result<Vec<server::Revoked>, server::ConfigError>;

/// How long [`RelayHandle::reload`] waits for the control thread.
const RELOAD_WAIT: Duration = Duration::from_secs(5);

impl Reloader {
    /// Hand the live settings of `config` to the TURN core ([`Server::reload`]) and wait for it: users,
    /// REST secrets, quotas, challenge rate and peer policy; its other fields are ignored. Permissions
    /// and channels the new policy denies are removed and logged, one line per allocation. Does not
    /// count the reload in [`Reloader::reloads`]: the caller does, once for the whole file.
    pub fn reload(&self, mut config: server::Config) -> ReloadResult {
        // As at start: the listeners (ports resolved) are service ports.
        config.peer_policy = config
            .peer_policy
            .with_service_ports(self.service_ports.clone());
        let (tx, rx) = bounded(1);
        let refused = |problem: &str| server::ConfigError {
            key: "config",
            problem: problem.into(),
        };
        match self.staged.lock() {
            Ok(mut slot) => *slot = Some((config, tx)),
            Err(_) => return Err(refused("the relay's reload slot is poisoned")),
        }
        if self.to_control.send(ToControl::Reload).is_err() {
            return Err(refused("the relay has stopped"));
        }
        rx.recv_timeout(RELOAD_WAIT)
            .map_err(|_| refused("the relay did not answer the reload"))?
    }

    /// The reload counters, which `/metrics` shows.
    pub fn reloads(&self) -> &Arc<Reloads> {
        &self.reloads
    }
}

impl RelayHandle {
    /// A handle for configuration reloads.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The addresses the relay listens on (ports resolved).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    /// The TCP addresses the relay listens on (ports resolved).
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.listen_tcp
    }

    /// The TLS addresses the relay listens on (ports resolved).
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.listen_tls
    }

    /// The stream side's shared state: counters, and [`StreamShared::set_tls`] to reload the certificate
    /// (new connections use it; established ones keep their session).
    pub fn streams(&self) -> &Arc<StreamShared> {
        &self.streams
    }

    /// The backend the workers run.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Each worker's counters.
    pub fn worker_stats(&self) -> &[Arc<WorkerStats>] {
        &self.stats
    }

    /// Begin a graceful shutdown: refuse new allocations, keep relaying for the drain period, then stop.
    pub fn shutdown(&self) {
        let _ = self.to_control.send(ToControl::Shutdown);
    }

    /// A sender that begins the graceful shutdown (for a signal thread).
    pub fn shutdown_sender(&self) -> Sender<ToControl> {
        self.to_control.clone()
    }

    /// Stop now and wait for every thread.
    pub fn stop(mut self) -> io::Result<()> {
        let _ = self.to_control.send(ToControl::Stop);
        self.join()
    }

    /// Wait until the relay has stopped (after [`RelayHandle::shutdown`] and the drain period).
    pub fn join(&mut self) -> io::Result<()> {
        match self.control.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("control thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if self.control.is_some() {
            let _ = self.to_control.send(ToControl::Stop);
            let _ = self.join();
        }
    }
}

/// Listen addresses with each wildcard replaced by the host's interface addresses of its family
/// ([`sys::expand_wildcards`]): the listeners a client can send to, one [`ListenerId`] each, and the
/// local address of its 5-tuple. A UDP wildcard is still served by one socket per worker (with
/// pktinfo, see [`dataplane::ListenerMap`]); a TCP/TLS one is bound per address. An error if a wildcard
/// finds no address.
fn expand_wildcards(listen: &[SocketAddr]) -> io::Result<Vec<SocketAddr>> {
    if !listen.iter().any(|a| a.ip().is_unspecified()) {
        return Ok(listen.to_vec());
    }
    let ifaddrs = sys::interface_addrs()?;
    let out = sys::expand_wildcards(listen, &ifaddrs);
    for a in listen.iter().filter(|a| a.ip().is_unspecified()) {
        if !out
            .iter()
            .any(|o| o.port() == a.port() && o.is_ipv4() == a.is_ipv4())
        {
            return Err(io::Error::other(format!(
                "listen {a}: the host has no interface address of that family to listen on"
            )));
        }
    }
    Ok(out)
}

/// How many shards the budget of unauthenticated answers (`challenge_rate`) is split into with
/// `workers` workers: one per worker (Binding and plain 401s) and one for the server (the other
/// unauthenticated answers), so that a source whose datagrams reach every worker still gets no more
/// than the configured budget in all.
pub fn budget_shards(workers: usize) -> u32 {
    u32::try_from(workers).map_or(u32::MAX, |w| w.saturating_add(1))
}

/// Bind the listeners, start the workers and the control thread.
pub fn start(settings: Settings) -> io::Result<RelayHandle> {
    let (backend, note) = dataplane::choose_backend(settings.backend).map_err(io::Error::other)?;
    if let Some(note) = note {
        tracing::info!("{note}");
    }
    let workers = settings.workers.max(1);
    let opts = UdpOptions {
        reuse_port: true,
        recv_buffer: settings.recv_buffer,
        send_buffer: settings.send_buffer,
        dont_fragment: false,
    };
    // SO_REUSEPORT would let a second relay on the same port start silently and share its clients: make
    // sure nobody holds a fixed listen port before the workers bind it with SO_REUSEPORT.
    for addr in settings.listen.iter().filter(|a| a.port() != 0) {
        let probe = sys::bind_udp(*addr, UdpOptions::default());
        if let Err(e) = probe {
            return Err(io::Error::new(
                e.kind(),
                format!("listen {addr}: {e} (is another relay running?)"),
            ));
        }
    }
    // One socket per listen entry and worker, a wildcard one with pktinfo; one listener id per address
    // clients can send to. Worker 0 binds first so that a port 0 resolves once and the others share it.
    let mut listen = expand_wildcards(&settings.listen)?;
    let mut bound: Vec<SocketAddr> = Vec::with_capacity(settings.listen.len());
    for a in &settings.listen {
        if !bound.contains(a) {
            bound.push(*a);
        }
    }
    let mut sockets: Vec<Vec<UdpSocket>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut mine = Vec::with_capacity(bound.len());
        for addr in bound.iter_mut() {
            let s = sys::bind_udp(*addr, opts)
                .map_err(|e| io::Error::new(e.kind(), format!("listen {addr}: {e}")))?;
            if addr.ip().is_unspecified() {
                sys::set_pktinfo(&s, addr.is_ipv4()).map_err(|e| {
                    io::Error::new(e.kind(), format!("listen {addr}: pktinfo: {e}"))
                })?;
            }
            let local = s.local_addr()?;
            if addr.port() == 0 {
                for l in listen.iter_mut().filter(|l| {
                    l.port() == 0
                        && l.is_ipv4() == addr.is_ipv4()
                        && (l.ip() == addr.ip() || addr.ip().is_unspecified())
                }) {
                    l.set_port(local.port());
                }
            }
            *addr = local;
            mine.push(s);
        }
        sockets.push(mine);
    }
    let listener_map = dataplane::ListenerMap::new(&bound, &listen)?;
    // Stream listeners get the ids after the UDP listeners': TCP, then TLS.
    let stream = &settings.stream;
    if !stream.listen_tls.is_empty() && stream.tls.is_none() {
        return Err(io::Error::other(
            "listen_tls needs a TLS certificate and key",
        ));
    }
    let mut listen_tcp = expand_wildcards(&stream.listen_tcp)?;
    let mut listen_tls = expand_wildcards(&stream.listen_tls)?;
    let mut tcp_sockets: Vec<Vec<StreamListener>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut mine = Vec::new();
        let mut id = listen.len();
        for (addrs, tls) in [(&mut listen_tcp, false), (&mut listen_tls, true)] {
            for addr in addrs.iter_mut() {
                let s = sys::bind_tcp(*addr, 1024)
                    .map_err(|e| io::Error::new(e.kind(), format!("listen {addr} (tcp): {e}")))?;
                *addr = s.local_addr()?;
                mine.push(StreamListener {
                    socket: s,
                    id: ListenerId::try_from(id).map_err(io::Error::other)?,
                    tls,
                });
                id += 1;
            }
        }
        tcp_sockets.push(mine);
    }
    let first_stream = ListenerId::try_from(listen.len()).map_err(io::Error::other)?;
    // Loaded before any relay socket exists, so that every route update reaches its maps.
    let fast = crate::xdp::FastPath::start(&settings.xdp)
        .map_err(|e| io::Error::other(format!("xdp: {e}")))?;
    if fast.is_some() {
        tracing::info!(interfaces = ?settings.xdp.interfaces, mode = ?settings.xdp.mode, "xdp: attached");
    }
    let shared = Arc::new(StreamShared::new(stream.limits.clone(), stream.tls.clone()));
    let mut listeners: Vec<(SocketAddr, Transport)> =
        listen.iter().map(|a| (*a, Transport::Udp)).collect();
    listeners.extend(listen_tcp.iter().map(|a| (*a, Transport::Tcp)));
    listeners.extend(listen_tls.iter().map(|a| (*a, Transport::Tls)));

    let mut server_config = settings.server.clone();
    server_config.peer_policy = server_config
        .peer_policy
        .with_service_ports(listeners.iter().map(|l| l.0).collect());
    // The relay's own addresses are denied peers (design §3): its listen IPs and every address on the
    // host's interfaces, besides the relay IPs and the configured public addresses.
    server_config
        .own_ips
        .extend(listeners.iter().map(|l| l.0.ip()));
    match sys::interface_addrs() {
        Ok(addrs) => server_config.own_ips.extend(addrs),
        Err(e) => tracing::warn!("cannot list the interface addresses (getifaddrs): {e}"),
    }
    // The server and every worker answer unauthenticated requests, each from a shard of the budget.
    server_config.challenge_shards = budget_shards(workers);
    let server = Server::new(server_config, StdRng::from_entropy())
        .map_err(|e| io::Error::other(e.to_string()))?;

    // Keys of the workers' budget shards (unpredictable, so that collisions cannot be aimed).
    let mut key_rng = StdRng::from_entropy();
    let (to_control, from_workers) = unbounded();
    let stun_queue = Arc::new(StunQueue::new(CONTROL_QUEUE, CONTROL_QUEUE_BYTES));
    let staged: Arc<Staged> = Arc::default();
    let reloads: Arc<Reloads> = Arc::default();
    let reloader = Reloader {
        to_control: to_control.clone(),
        staged: staged.clone(),
        reloads: reloads.clone(),
        service_ports: listeners.iter().map(|l| l.0).collect(),
    };
    let worker_tx = ControlTx::new(to_control.clone(), stun_queue.clone());
    let mut handles = Vec::with_capacity(workers);
    let mut stats = Vec::with_capacity(workers);
    let mut replies = Vec::with_capacity(workers);
    for (k, (mine, tcp)) in sockets.into_iter().zip(tcp_sockets).enumerate() {
        let (tx, mailbox) = RingBuffer::new(MAILBOX);
        let wake = Arc::new(EventFd::new()?);
        let worker_stats = Arc::new(WorkerStats::default());
        replies.push(
            mine.iter()
                .map(UdpSocket::try_clone)
                .collect::<io::Result<Vec<_>>>()?,
        );
        let setup = WorkerSetup {
            core: {
                let core = Core::new(
                    k,
                    worker_tx.clone(),
                    worker_stats.clone(),
                    settings.server.channel_range,
                    server.own_addresses().clone(),
                );
                // Binding is stateless, and so is the 401 to a request without integrity: each
                // worker answers them over UDP with its own shard of the budget, Binding unless it
                // must be authenticated (the control thread's job), the 401 with the server's
                // challenger (its nonce key, realm and algorithms), so that the server verifies it.
                let answers = dataplane::Answers {
                    binding: !settings.server.binding_requires_auth,
                    challenger: Some(server.challenger().clone()),
                };
                let budget = server.budget_shard([key_rng.next_u64(), key_rng.next_u64()]);
                core.answer_unauthenticated(budget, answers)
            },
            listeners: mine,
            listener_map: listener_map.clone(),
            streams: Streams::new(
                tcp,
                first_stream,
                shared.clone(),
                settings.server.channel_range,
            )?,
            mailbox,
            wake: wake.clone(),
        };
        let pin = settings.pin_workers;
        let thread = spawn_worker(k, worker_tx.clone(), move || {
            if pin && !sys::pin_to_core(k) {
                tracing::warn!(worker = k, "could not pin worker to a core");
            }
            dataplane::run(setup, backend)
        })?;
        handles.push(Worker {
            tx: RefCell::new(tx),
            wake,
            wake_due: Cell::new(false),
            thread: Some(thread),
        });
        stats.push(worker_stats);
    }
    tracing::info!(workers, ?backend, listen = ?listen, tcp = ?listen_tcp, tls = ?listen_tls, "relay started");

    let xdp = crate::xdp::Mirror::new(
        fast,
        listeners
            .iter()
            .map(|(a, t)| (*t == Transport::Udp).then_some(*a))
            .collect(),
    );
    let plane = Workers {
        xdp,
        workers: handles,
        replies,
        listener_map,
        held: Vec::new(),
        held_bytes: Vec::new(),
        relay_opts: UdpOptions {
            reuse_port: false,
            recv_buffer: settings.recv_buffer,
            send_buffer: settings.send_buffer,
            dont_fragment: false,
        },
    };
    let control = Control {
        server,
        exec: Executor::new(plane, listeners, settings.usage_sink.clone()),
        drain: settings.drain,
        drain_deadline: None,
        settle_deadline: None,
        stats: stats.clone(),
        backend,
        stun_queue,
        workers_lost: 0,
        failure: None,
        staged,
        reloads,
    };
    let thread = std::thread::Builder::new()
        .name("turnpike-control".into())
        .spawn(move || control.run(from_workers))?;
    Ok(RelayHandle {
        to_control,
        control: Some(thread),
        listen,
        listen_tcp,
        listen_tls,
        backend,
        stats,
        streams: shared,
        reloader,
    })
}

#[derive(Debug)]
struct Worker {
    /// Its mailbox (only the control thread sends to it).
    tx: RefCell<Producer<WorkerMsg>>,
    wake: Arc<EventFd>,
    /// Mail was queued ([`Worker::queue`]) since the worker was last woken.
    wake_due: Cell<bool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Worker {
    /// Queue a message that must arrive and wake the worker now (stop, counter reports: the control
    /// thread waits for what follows). Waits for room in the bounded mailbox; the wait is short, as in
    /// [`Worker::queue`]. A worker that has exited refuses at once.
    fn send(&self, msg: WorkerMsg) {
        self.queue(msg);
        self.wake();
    }

    /// Queue a message that must arrive (a route update) and leave the wake-up for [`Worker::wake`],
    /// which the control loop calls once its queue runs empty, or every [`WAKE_EVERY`] messages: one
    /// eventfd write (and one worker wake-up, on a shared core one context switch) per burst of
    /// requests instead of one per update. Order is kept without it: the worker drains its mailbox
    /// after every receive and before it looks a datagram up, and an update is queued before the
    /// response that announces it is sent. A full mailbox wakes the worker before waiting for room
    /// (the worker never waits for the control thread, so it always makes room); a worker that has
    /// exited refuses at once.
    fn queue(&self, mut msg: WorkerMsg) {
        let mut tx = self.tx.borrow_mut();
        for tries in 0u32.. {
            if tx.is_abandoned() {
                return;
            }
            match tx.push(msg) {
                Ok(()) => return self.wake_due.set(true),
                Err(PushError::Full(m)) => msg = m,
            }
            // Full: wake the worker at once, then wait for room, yielding first (on a shared core
            // that runs the worker) and then napping briefly.
            if tries == 0 {
                let _ = self.wake.notify();
            } else if tries < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Queue a message that may be dropped (a reply to a stream client); woken like [`Worker::queue`].
    /// False if the mailbox was full.
    fn try_queue(&self, msg: WorkerMsg) -> bool {
        let mut tx = self.tx.borrow_mut();
        if tx.is_abandoned() {
            return true;
        }
        match tx.push(msg) {
            Ok(()) => {
                self.wake_due.set(true);
                true
            }
            Err(PushError::Full(_)) => false,
        }
    }

    /// Ring the worker's eventfd if mail was queued since the last time.
    fn wake(&self) {
        if self.wake_due.replace(false) {
            let _ = self.wake.notify();
        }
    }
}

/// Start worker `k`'s thread running `body`. However the thread ends (returned, failed or panicked), it
/// tells the control thread with [`ToControl::WorkerExited`] on its way out, so that a dead worker is
/// never silent.
fn spawn_worker(
    k: usize,
    to_control: ControlTx,
    body: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> io::Result<JoinHandle<io::Result<()>>> {
    /// Sends the exit notice when dropped: after `body` returned, or while it unwinds.
    struct Exit {
        worker: usize,
        to_control: ControlTx,
        error: Option<String>,
    }
    impl std::ops::Drop for Exit {
        fn drop(&mut self) {
            let error = match self.error.take() {
                Some(e) => Some(e),
                None if std::thread::panicking() => Some("panicked".into()),
                None => None,
            };
            let _ = self.to_control.send(ToControl::WorkerExited {
                worker: self.worker,
                error,
            });
        }
    }
    std::thread::Builder::new()
        .name(format!("turnpike-worker-{k}"))
        .spawn(move || {
            let mut exit = Exit {
                worker: k,
                to_control,
                error: None,
            };
            let res = body();
            if let Err(e) = &res {
                tracing::error!(worker = k, "worker stopped: {e}");
                exit.error = Some(e.to_string());
            }
            res
        })
}

struct Control {
    server: Server<StdRng>,
    /// Command execution over the workers and their sockets.
    exec: Executor<Workers>,
    drain: Duration,
    drain_deadline: Option<Instant>,
    /// When the retired XDP meters of removed relays are read ([`Control::settle_meters`]).
    settle_deadline: Option<Instant>,
    /// Every worker's counters (for metrics).
    stats: Vec<Arc<WorkerStats>>,
    backend: BackendKind,
    /// The bounds and depth of the workers' STUN copies.
    stun_queue: Arc<StunQueue>,
    /// Workers whose loop ended while the relay was running.
    workers_lost: u64,
    /// Why the relay is stopping with an error (a worker was lost).
    failure: Option<String>,
    /// A reload waiting for [`ToControl::Reload`].
    staged: Arc<Staged>,
    /// Reload counters (for metrics).
    reloads: Arc<Reloads>,
}

/// The control thread's [`Plane`]: relay sockets bound here, handed to the workers through their
/// mailboxes; replies sent from clones of the workers' listener sockets.
#[derive(Debug)]
struct Workers {
    /// The XDP maps, programmed by the same route updates as the workers (before them).
    xdp: crate::xdp::Mirror,
    workers: Vec<Worker>,
    /// `replies[worker][socket]`: clones of each worker's listener sockets.
    replies: Vec<Vec<UdpSocket>>,
    /// Which socket and source address each listener's replies leave from.
    listener_map: dataplane::ListenerMap,
    /// Replies to UDP clients held until the end of the control loop's burst ([`Workers::flush`]):
    /// one sendmmsg per burst and listener socket, and the clients' next requests then wake the worker
    /// after the burst instead of preempting it on a shared core.
    held: Vec<HeldReply>,
    /// The held replies' bytes, back to back.
    held_bytes: Vec<u8>,
    relay_opts: UdpOptions,
}

/// A reply held in [`Workers::held`]: from `replies[worker][socket]` (or any worker's clone of that
/// socket, if the worker is gone by then), from address `src`, to `to`, bytes `at..at + len` of
/// `held_bytes`.
#[derive(Debug, Clone, Copy)]
struct HeldReply {
    worker: usize,
    socket: usize,
    src: Option<std::net::IpAddr>,
    to: SocketAddr,
    at: usize,
    len: usize,
}

/// Replies held at most before they are sent anyway (a burst of the control loop is at most
/// [`WAKE_EVERY`] messages, each answered by one reply or a few).
const MAX_HELD: usize = 4 * WAKE_EVERY;

impl Workers {
    /// Send every held reply, in order: one sendmmsg per run of replies that leave from the same
    /// socket and source address.
    fn flush(&mut self) {
        let mut start = 0;
        while let Some(first) = self.held.get(start).copied() {
            let same = |h: &HeldReply| {
                (h.worker, h.socket, h.src) == (first.worker, first.socket, first.src)
            };
            let end = start + self.held[start..].iter().take_while(|h| same(h)).count();
            // A lost worker's sockets are closed: any other worker's socket on the listener will do.
            let sock = self
                .replies
                .get(first.worker)
                .and_then(|w| w.get(first.socket))
                .or_else(|| self.replies.iter().find_map(|w| w.get(first.socket)));
            if let Some(sock) = sock {
                let bytes = &self.held_bytes;
                let msgs: Vec<(SocketAddr, &[u8])> = self.held[start..end]
                    .iter()
                    .filter_map(|h| Some((h.to, bytes.get(h.at..h.at + h.len)?)))
                    .collect();
                // From the address the client sent to (a wildcard socket names it per datagram).
                sys::mmsg::send_batch_from(
                    std::os::fd::AsRawFd::as_raw_fd(sock),
                    &msgs,
                    first.src,
                    |_, _| {},
                );
            }
            start = end;
        }
        self.held.clear();
        self.held_bytes.clear();
    }
}

impl Plane for Workers {
    type Socket = UdpSocket;

    fn bind_relay(&mut self, addr: SocketAddr, dont_fragment: bool) -> io::Result<UdpSocket> {
        let opts = UdpOptions {
            dont_fragment,
            ..self.relay_opts
        };
        sys::bind_udp(addr, opts)
    }

    fn add_relay(&mut self, worker: usize, socket: UdpSocket, update: RouteUpdate) {
        self.xdp.apply(worker, &update);
        if let Some(w) = self.workers.get(worker) {
            w.queue(WorkerMsg::AddRelay { socket, update });
        }
    }

    /// Applied to the XDP maps first: a removal leaves the kernel before the worker's table, and a
    /// closed relay's XDP meter is retired, to be folded into its usage when it settles
    /// ([`Control::settle_meters`]).
    fn route(&mut self, worker: usize, update: RouteUpdate) -> Option<AllocationId> {
        let metered = self.xdp.apply(worker, &update);
        if let Some(w) = self.workers.get(worker) {
            w.queue(WorkerMsg::Route(update));
        }
        metered
    }

    fn fast_path_live(&self, worker: usize, allocation: AllocationId) -> Counters {
        self.xdp.live(worker, allocation)
    }

    fn reply_udp(&mut self, worker: usize, listener: usize, to: FiveTuple, payload: &[u8]) {
        let Some((socket, src)) = ListenerId::try_from(listener)
            .ok()
            .and_then(|l| self.listener_map.socket(l))
        else {
            return;
        };
        self.held.push(HeldReply {
            worker,
            socket: usize::from(socket),
            src,
            to: to.client,
            at: self.held_bytes.len(),
            len: payload.len(),
        });
        self.held_bytes.extend_from_slice(payload);
        if self.held.len() >= MAX_HELD {
            self.flush();
        }
    }

    fn reply_stream(&mut self, worker: usize, client: ClientKey, payload: &[u8]) -> bool {
        let msg = WorkerMsg::SendStream {
            client,
            bytes: payload.to_vec(),
        };
        self.workers.get(worker).is_some_and(|w| w.try_queue(msg))
    }
}

/// Usage of one allocation: the sum of its relay sockets' counters. An
/// allocation gets interim records (`done == false`, cumulative, each replacing the previous one) on
/// checkpoints while it lives, and one final record (`done == true`) when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The allocation (unique within this process).
    pub allocation: u64,
    /// Who it is billed to.
    pub identity: Box<str>,
    /// The client's 5-tuple.
    pub client: Option<FiveTuple>,
    /// The relayed transport address (the first one, for a dual allocation).
    pub relayed: Option<std::net::SocketAddr>,
    /// When the allocation started (Unix milliseconds).
    pub started_ms: u64,
    /// When this record was taken: the end for a final record (Unix milliseconds).
    pub at_ms: u64,
    /// Whether this is the final record.
    pub done: bool,
    /// Why the allocation ended (meaningful when `done`).
    pub end_reason: EndReason,
    /// Bytes and packets per direction, cumulative.
    pub usage: Counters,
}

impl Control {
    fn run(mut self, rx: Receiver<ToControl>) -> io::Result<()> {
        // Messages handled since the workers were last woken.
        let mut unwoken = 0usize;
        loop {
            let deadline = [
                self.server.poll_timeout(),
                self.drain_deadline,
                self.settle_deadline,
            ]
            .into_iter()
            .flatten()
            .min();
            // A queued message needs no clock reading to be taken (one fewer per message in a burst).
            let msg = match rx.try_recv() {
                Ok(msg) => Ok(msg),
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => match deadline {
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                },
            };
            let now = Instant::now();
            // `recv_timeout` hands out queued messages before it reports a timeout: a queue that never
            // runs empty (a flood of requests) must not starve the timers or the end of a drain.
            if msg.is_ok() && deadline.is_some_and(|d| d <= now) {
                if self.drain_deadline.is_some_and(|d| d <= now) {
                    return self.stop(&rx);
                }
                self.server.handle_timeout(now);
            }
            match msg {
                Ok(ToControl::Stun {
                    worker,
                    listener,
                    client,
                    bytes,
                }) => {
                    self.stun_queue.taken(bytes.len());
                    let (server, unix) = (&mut self.server, unix_now());
                    self.exec
                        .stun(server, now, unix, worker, listener, client, &bytes);
                }
                Ok(ToControl::StreamClosed { listener, client }) => {
                    self.exec
                        .stream_closed(&mut self.server, now, listener, client);
                }
                Ok(ToControl::RelayClosed {
                    allocation,
                    counters,
                }) => self.exec.relay_closed(allocation, counters),
                Ok(ToControl::Counters { worker, counters }) => {
                    self.exec.checkpoint(worker, &counters, false)
                }
                Ok(ToControl::Revoke {
                    identity,
                    until,
                    terminate,
                }) => {
                    tracing::info!(%identity, until, terminate, "credentials revoked");
                    self.server.revoke(&identity, until, terminate);
                }
                Ok(ToControl::Checkpoint) => {
                    for w in &self.exec.plane.workers {
                        w.send(WorkerMsg::Route(RouteUpdate::ReportCounters));
                    }
                }
                Ok(ToControl::Metrics(reply)) => {
                    let _ = reply.send(self.metrics());
                }
                Ok(ToControl::Reload) => self.reload(),
                Ok(ToControl::Shutdown) => self.begin_drain(now),
                Ok(ToControl::WorkerExited { worker, error }) => {
                    self.worker_lost(now, worker, error)
                }
                Ok(ToControl::Stop) | Err(RecvTimeoutError::Disconnected) => return self.stop(&rx),
                Err(RecvTimeoutError::Timeout) => {
                    if self.drain_deadline.is_some_and(|d| d <= now) {
                        return self.stop(&rx);
                    }
                    self.server.handle_timeout(now);
                }
            }
            self.exec.pump(&mut self.server, now);
            if self.exec.plane.xdp.has_retired() {
                let due = *self
                    .settle_deadline
                    .get_or_insert(now + crate::xdp::SETTLE_AFTER);
                if due <= now {
                    self.settle_meters(false);
                }
            }
            unwoken += 1;
            if unwoken >= WAKE_EVERY || rx.is_empty() {
                unwoken = 0;
                self.exec.plane.flush();
                for w in &self.exec.plane.workers {
                    w.wake();
                }
            }
        }
    }

    /// Apply a staged reload; the commands it emits run in the [`Executor::pump`] that follows.
    fn reload(&mut self) {
        let staged = self.staged.lock().ok().and_then(|mut s| s.take());
        let Some((config, reply)) = staged else {
            return;
        };
        let rate = config.challenge_rate;
        let result = self.server.reload(config);
        if let Ok(revoked) = &result {
            // The workers answer Binding and 401s with their own shards of the same budget (the
            // realm and password_algorithms need a restart: their challenger stays the server's).
            for w in &self.exec.plane.workers {
                w.send(WorkerMsg::BindingRate(rate));
            }
            for r in revoked {
                tracing::info!(
                    allocation = r.allocation.0,
                    identity = %r.identity,
                    permissions = ?r.permissions,
                    channels = ?r.channels.iter().map(|(n, p)| (n.get(), p.0)).collect::<Vec<_>>(),
                    "reload: the new peer policy denies these peers; permissions and channels removed"
                );
            }
        }
        let _ = reply.send(result);
    }

    /// Refuse new allocations and stop once the drain period is over.
    fn begin_drain(&mut self, now: Instant) {
        if self.drain_deadline.is_none() {
            tracing::info!(drain = ?self.drain, "shutting down: refusing new allocations while existing ones drain");
            self.server.set_draining(true);
            // Existing allocations drain on the userspace path; the maps stay for the meters.
            self.exec.plane.xdp.detach();
            // Settings may come from code as well as from the (bounded) config file.
            let drain = self.drain.min(crate::config::MAX_DRAIN);
            self.drain_deadline = now.checked_add(drain).or(Some(now));
        }
    }

    /// A worker's loop ended on its own: the relay is no longer whole. Its listener sockets leave their
    /// SO_REUSEPORT groups (so that the kernel stops handing it a share of the clients), the relay turns
    /// not ready and drains, and it ends with an error.
    fn worker_lost(&mut self, now: Instant, worker: usize, error: Option<String>) {
        let why = error.unwrap_or_else(|| "its loop returned".into());
        tracing::error!(worker, "worker exited: {why}; the relay drains and stops");
        self.workers_lost += 1;
        self.failure
            .get_or_insert_with(|| format!("worker {worker} exited: {why}"));
        if let Some(r) = self.exec.plane.replies.get_mut(worker) {
            // The worker's own clones closed with it; these were the last.
            r.clear();
        }
        self.begin_drain(now);
    }

    /// Read the retired XDP meters of removed relays (one wait for the kernel's running programs)
    /// and fold them into their allocations' usage, which may end them. Meters whose relays' map
    /// entries could not be deleted yet wait for the next time, unless this is the `last`.
    fn settle_meters(&mut self, last: bool) {
        self.settle_deadline = None;
        for (allocation, counters) in self.exec.plane.xdp.settle(last) {
            self.exec.meter_settled(allocation, counters);
        }
    }

    fn stop(mut self, rx: &Receiver<ToControl>) -> io::Result<()> {
        self.exec.plane.flush();
        self.settle_meters(true);
        self.final_usage(rx);
        for w in &self.exec.plane.workers {
            w.send(WorkerMsg::Stop);
        }
        let mut result = Ok(());
        for w in &mut self.exec.plane.workers {
            if let Some(t) = w.thread.take() {
                if let Ok(Err(e)) = t.join() {
                    result = Err(e);
                }
            }
        }
        tracing::info!("relay stopped");
        match self.failure.take() {
            Some(f) => Err(io::Error::other(f)),
            None => result,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod worker_exit_tests {
    use super::*;

    fn exit_of(body: impl FnOnce() -> io::Result<()> + Send + 'static) -> ToControl {
        let (tx, rx) = unbounded();
        let t = spawn_worker(3, ControlTx::from(tx), body).unwrap();
        let _ = t.join();
        rx.recv_timeout(Duration::from_secs(2)).unwrap()
    }

    #[test]
    fn a_worker_that_fails_or_panics_tells_the_control_thread() {
        match exit_of(|| Err(io::Error::other("ring gone"))) {
            ToControl::WorkerExited { worker: 3, error } => {
                assert_eq!(error.as_deref(), Some("ring gone"))
            }
            other => panic!("unexpected {other:?}"),
        }
        match exit_of(|| panic!("boom")) {
            ToControl::WorkerExited { worker: 3, error } => {
                assert_eq!(error.as_deref(), Some("panicked"))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            exit_of(|| Ok(())),
            ToControl::WorkerExited {
                worker: 3,
                error: None
            }
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod mailbox_tests {
    use super::*;
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};

    /// A worker handle over a mailbox of `cap` messages, and a poller that sees its eventfd ring.
    fn worker(cap: usize) -> (Worker, rtrb::Consumer<WorkerMsg>, Poll) {
        let (tx, rx) = RingBuffer::new(cap);
        let wake = Arc::new(EventFd::new().unwrap());
        let poll = Poll::new().unwrap();
        poll.registry()
            .register(
                &mut SourceFd(&wake.as_raw_fd()),
                Token(0),
                Interest::READABLE,
            )
            .unwrap();
        let w = Worker {
            tx: RefCell::new(tx),
            wake,
            wake_due: Cell::new(false),
            thread: None,
        };
        (w, rx, poll)
    }

    fn rang(poll: &mut Poll, w: &Worker) -> bool {
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
        let rang = !events.is_empty();
        w.wake.drain();
        rang
    }

    #[test]
    fn queued_mail_rings_once_when_woken_and_send_rings_at_once() {
        let (w, rx, mut poll) = worker(16);
        w.queue(WorkerMsg::Route(RouteUpdate::ReportCounters));
        w.queue(WorkerMsg::Route(RouteUpdate::ReportCounters));
        assert!(!rang(&mut poll, &w), "queue defers the wake-up");
        w.wake();
        assert!(rang(&mut poll, &w), "wake rings for the queued mail");
        w.wake();
        assert!(!rang(&mut poll, &w), "nothing queued since: no second ring");
        w.send(WorkerMsg::Stop);
        assert!(rang(&mut poll, &w), "send rings at once");
        assert_eq!(rx.slots(), 3, "every message arrived");
    }

    #[test]
    fn a_full_mailbox_wakes_the_worker_before_waiting_for_room() {
        // Mail queued without a wake-up fills the mailbox; the next message must ring the eventfd
        // before it waits, or a worker asleep in its poll would never make room.
        let (w, mut rx, mut poll) = worker(1);
        let drained = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut events = Events::with_capacity(4);
            let mut got = 0;
            while got < 2 && Instant::now() < deadline {
                poll.poll(&mut events, Some(Duration::from_millis(100)))
                    .unwrap();
                if !events.is_empty() {
                    while rx.pop().is_ok() {
                        got += 1;
                    }
                }
            }
            got
        });
        w.queue(WorkerMsg::Route(RouteUpdate::ReportCounters));
        w.queue(WorkerMsg::Route(RouteUpdate::ReportCounters));
        // The second message waits for room until the woken "worker" drained the first one.
        w.wake();
        assert_eq!(drained.join().unwrap(), 2);
    }
}
