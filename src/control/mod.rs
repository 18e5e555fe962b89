//! The control thread: drives [`Server`], executes its commands (relay sockets, route updates), sends its
//! replies, and starts and stops the workers.
//!
//! Replies leave from the listener socket of the worker that owns the client's flow (the control thread
//! holds a clone of every worker's listener sockets), so their source is the address:port the client sent
//! to. Commands are executed before the transmits of the same step, so that the route a response
//! announces is installed in the worker before the client can use it.
//!
//! May use: server, route, sys, dataplane, wire, auth, policy, config.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::dataplane::stream::{StreamLimits, StreamListener, StreamShared, Streams};
use crate::dataplane::{self, BackendKind, Core, ToControl, WorkerMsg, WorkerSetup, WorkerStats};
use crate::route::{ClientKey, ListenerId, RelayId, RouteUpdate};
use crate::server::{self, Command, FiveTuple, Server, Transport};
use crate::sys::{self, EventFd, UdpOptions};
use metering::{unix_ms, usage_of};

mod metering;

/// Queue depth from the workers to the control thread; beyond it STUN requests are dropped and counted.
const CONTROL_QUEUE: usize = 16 * 1024;

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
}

impl RelayHandle {
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
    // Worker 0 binds first so that a port 0 resolves once and the others share it.
    let mut listen = settings.listen.clone();
    let mut sockets: Vec<Vec<UdpSocket>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut mine = Vec::with_capacity(listen.len());
        for addr in listen.iter_mut() {
            let s = sys::bind_udp(*addr, opts)
                .map_err(|e| io::Error::new(e.kind(), format!("listen {addr}: {e}")))?;
            *addr = s.local_addr()?;
            mine.push(s);
        }
        sockets.push(mine);
    }
    // Stream listeners get the ids after the UDP listeners': TCP, then TLS.
    let stream = &settings.stream;
    if !stream.listen_tls.is_empty() && stream.tls.is_none() {
        return Err(io::Error::other(
            "listen_tls needs a TLS certificate and key",
        ));
    }
    let mut listen_tcp = stream.listen_tcp.clone();
    let mut listen_tls = stream.listen_tls.clone();
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
    let shared = Arc::new(StreamShared::new(stream.limits.clone(), stream.tls.clone()));
    let mut listeners: Vec<(SocketAddr, Transport)> =
        listen.iter().map(|a| (*a, Transport::Udp)).collect();
    listeners.extend(listen_tcp.iter().map(|a| (*a, Transport::Tcp)));
    listeners.extend(listen_tls.iter().map(|a| (*a, Transport::Tls)));

    let mut server_config = settings.server.clone();
    server_config.peer_policy = server_config
        .peer_policy
        .with_service_ports(listeners.iter().map(|l| l.0).collect());
    let server = Server::new(server_config, StdRng::from_entropy())
        .map_err(|e| io::Error::other(e.to_string()))?;

    let (to_control, from_workers) = bounded(CONTROL_QUEUE);
    let mut handles = Vec::with_capacity(workers);
    let mut stats = Vec::with_capacity(workers);
    let mut replies = Vec::with_capacity(workers);
    for (k, (mine, tcp)) in sockets.into_iter().zip(tcp_sockets).enumerate() {
        let (tx, mailbox) = unbounded();
        let wake = Arc::new(EventFd::new()?);
        let worker_stats = Arc::new(WorkerStats::default());
        replies.push(
            mine.iter()
                .map(UdpSocket::try_clone)
                .collect::<io::Result<Vec<_>>>()?,
        );
        let setup = WorkerSetup {
            core: Core::new(
                k,
                to_control.clone(),
                worker_stats.clone(),
                settings.server.channel_range,
            ),
            listeners: mine,
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
        let thread = std::thread::Builder::new()
            .name(format!("turnpike-worker-{k}"))
            .spawn(move || {
                if pin && !sys::pin_to_core(k) {
                    tracing::warn!(worker = k, "could not pin worker to a core");
                }
                let res = dataplane::run(setup, backend);
                if let Err(e) = &res {
                    tracing::error!(worker = k, "worker stopped: {e}");
                }
                res
            })?;
        handles.push(Worker {
            tx,
            wake,
            thread: Some(thread),
        });
        stats.push(worker_stats);
    }
    tracing::info!(workers, ?backend, listen = ?listen, tcp = ?listen_tcp, tls = ?listen_tls, "relay started");

    let control = Control {
        server,
        listeners,
        stream_owners: HashMap::new(),
        workers: handles,
        replies,
        relays: HashMap::new(),
        owners: HashMap::new(),
        next_relay: 0,
        current_worker: 0,
        relay_opts: UdpOptions {
            reuse_port: false,
            recv_buffer: settings.recv_buffer,
            send_buffer: settings.send_buffer,
            dont_fragment: false,
        },
        drain: settings.drain,
        drain_deadline: None,
        usage: HashMap::new(),
        usage_sink: settings.usage_sink.clone(),
        stats: stats.clone(),
        backend,
        permissions: 0,
        channels: 0,
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
    })
}

#[derive(Debug)]
struct Worker {
    tx: Sender<WorkerMsg>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Worker {
    fn send(&self, msg: WorkerMsg) {
        if self.tx.send(msg).is_ok() {
            let _ = self.wake.notify();
        }
    }
}

struct Control {
    server: Server<StdRng>,
    /// Every listener by id: UDP first, then TCP, then TLS.
    listeners: Vec<(SocketAddr, Transport)>,
    /// TCP/TLS connection → the worker that owns it.
    stream_owners: HashMap<ClientKey, usize>,
    workers: Vec<Worker>,
    /// `replies[worker][listener]`: clones of each worker's listener sockets.
    replies: Vec<Vec<UdpSocket>>,
    /// relay address → (worker, slot).
    relays: HashMap<SocketAddr, (usize, RelayId)>,
    /// allocation client → owning worker.
    owners: HashMap<FiveTuple, usize>,
    next_relay: u32,
    current_worker: usize,
    relay_opts: UdpOptions,
    drain: Duration,
    drain_deadline: Option<Instant>,
    /// Usage of allocations until both the server's end report and every relay's final counters are in.
    usage: HashMap<u64, PendingUsage>,
    usage_sink: Option<Sender<UsageRecord>>,
    /// Every worker's counters (for metrics).
    stats: Vec<Arc<WorkerStats>>,
    backend: BackendKind,
    /// Installed permissions and channels (for metrics).
    permissions: u64,
    channels: u64,
}

/// An allocation's usage being assembled from the server's report and its relay sockets' counters.
#[derive(Debug, Default)]
struct PendingUsage {
    client: Option<FiveTuple>,
    identity: Option<Box<str>>,
    /// When its first relay socket opened (Unix milliseconds).
    started_ms: u64,
    /// The server has ended it (its own usage is in `usage`).
    ended: bool,
    /// The server's usage once ended, plus the final counters of closed relay sockets.
    usage: server::Usage,
    /// Relay sockets whose final counters have not arrived.
    open_relays: usize,
    /// What the last checkpoint recorded (to skip unchanged ones).
    checkpointed: Option<server::Usage>,
}

/// Usage of one allocation: what the server relayed itself plus every relay socket's counters. An
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
    /// When the allocation started (Unix milliseconds).
    pub started_ms: u64,
    /// When this record was taken: the end for a final record (Unix milliseconds).
    pub at_ms: u64,
    /// Whether this is the final record.
    pub done: bool,
    /// Bytes and packets per direction, cumulative.
    pub usage: server::Usage,
}

impl Control {
    fn run(mut self, rx: Receiver<ToControl>) -> io::Result<()> {
        loop {
            let now = Instant::now();
            let deadline = [self.server.poll_timeout(), self.drain_deadline]
                .into_iter()
                .flatten()
                .min();
            let msg = match deadline {
                Some(d) => rx.recv_timeout(d.saturating_duration_since(now)),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let now = Instant::now();
            match msg {
                Ok(ToControl::Stun {
                    worker,
                    listener,
                    client,
                    bytes,
                }) => {
                    let Some((server_addr, transport)) =
                        self.listeners.get(usize::from(listener)).copied()
                    else {
                        continue;
                    };
                    self.current_worker = worker;
                    if transport.is_stream() {
                        self.stream_owners
                            .insert(ClientKey { client, listener }, worker);
                    }
                    let five = FiveTuple {
                        client,
                        server: server_addr,
                        transport,
                    };
                    self.server
                        .handle_client_message(now, unix_now(), five, &bytes);
                }
                Ok(ToControl::StreamClosed { listener, client }) => {
                    self.stream_owners.remove(&ClientKey { client, listener });
                    if let Some((server_addr, transport)) =
                        self.listeners.get(usize::from(listener)).copied()
                    {
                        let five = FiveTuple {
                            client,
                            server: server_addr,
                            transport,
                        };
                        self.server.handle_connection_closed(now, five);
                    }
                }
                Ok(ToControl::RelayClosed {
                    allocation,
                    counters,
                }) => self.relay_closed(allocation, counters),
                Ok(ToControl::Counters { counters, .. }) => self.checkpoint(&counters, false),
                Ok(ToControl::Revoke { identity, until }) => {
                    tracing::info!(%identity, until, "credentials revoked");
                    self.server.revoke(&identity, until);
                }
                Ok(ToControl::Checkpoint) => {
                    for w in &self.workers {
                        w.send(WorkerMsg::Route(RouteUpdate::ReportCounters));
                    }
                }
                Ok(ToControl::Metrics(reply)) => {
                    let _ = reply.send(self.metrics());
                }
                Ok(ToControl::Shutdown) => {
                    if self.drain_deadline.is_none() {
                        tracing::info!(drain = ?self.drain, "shutting down: refusing new allocations while existing ones drain");
                        self.server.set_draining(true);
                        // Settings may come from code as well as from the (bounded) config file.
                        let drain = self.drain.min(crate::config::MAX_DRAIN);
                        self.drain_deadline = now.checked_add(drain).or(Some(now));
                    }
                }
                Ok(ToControl::Stop) | Err(RecvTimeoutError::Disconnected) => return self.stop(&rx),
                Err(RecvTimeoutError::Timeout) => {
                    if self.drain_deadline.is_some_and(|d| d <= now) {
                        return self.stop(&rx);
                    }
                    self.server.handle_timeout(now);
                }
            }
            self.pump(now);
        }
    }

    /// Execute every command, then send every transmit, until the server is quiet.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut busy = false;
            while let Some(cmd) = self.server.poll_command() {
                busy = true;
                self.execute(now, cmd);
            }
            while let Some(t) = self.server.poll_transmit() {
                busy = true;
                let Some(listener) = self
                    .listeners
                    .iter()
                    .position(|l| *l == (t.src, t.transport))
                else {
                    continue;
                };
                if t.transport.is_stream() {
                    let Ok(listener) = ListenerId::try_from(listener) else {
                        continue;
                    };
                    let key = ClientKey {
                        client: t.dst,
                        listener,
                    };
                    if let Some(&worker) = self.stream_owners.get(&key) {
                        self.workers[worker].send(WorkerMsg::SendStream {
                            client: key,
                            bytes: t.payload.to_vec(),
                        });
                    }
                    continue;
                }
                let five = FiveTuple {
                    client: t.dst,
                    server: t.src,
                    transport: t.transport,
                };
                let worker = self
                    .owners
                    .get(&five)
                    .copied()
                    .unwrap_or(self.current_worker);
                if let Some(sock) = self.replies.get(worker).and_then(|w| w.get(listener)) {
                    let _ = sock.send_to(t.payload, t.dst);
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn execute(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::OpenRelay {
                allocation,
                client,
                relay,
                dont_fragment,
            } => {
                let worker = self.current_worker;
                let Some(listener) = self.listener_of(client) else {
                    self.server.handle_relay_failed(now, allocation, relay);
                    return;
                };
                let opts = UdpOptions {
                    dont_fragment,
                    ..self.relay_opts
                };
                match sys::bind_udp(relay.0, opts) {
                    Ok(socket) => {
                        let id = RelayId(self.next_relay);
                        self.next_relay = self.next_relay.wrapping_add(1);
                        self.relays.insert(relay.0, (worker, id));
                        self.owners.insert(client, worker);
                        let identity = self.server.allocation_identity(allocation);
                        let pending = self.usage.entry(allocation.0).or_default();
                        if pending.client.is_none() {
                            pending.started_ms = unix_ms();
                        }
                        pending.client = Some(client);
                        if pending.identity.is_none() {
                            pending.identity = identity.map(Box::from);
                        }
                        pending.open_relays += 1;
                        let update = RouteUpdate::AddRelay {
                            id,
                            allocation: allocation.0,
                            addr: relay.0,
                            client: ClientKey {
                                client: client.client,
                                listener,
                            },
                        };
                        self.workers[worker].send(WorkerMsg::AddRelay { socket, update });
                        self.server.handle_relay_opened(now, allocation, relay);
                    }
                    Err(e) => {
                        tracing::warn!(relay = %relay.0, "cannot bind relay socket: {e}");
                        self.server.handle_relay_failed(now, allocation, relay);
                    }
                }
            }
            Command::CloseRelay { relay, .. } => {
                if let Some((worker, id)) = self.relays.remove(&relay.0) {
                    self.workers[worker].send(WorkerMsg::Route(RouteUpdate::RemoveRelay { id }));
                }
            }
            Command::InstallPermission { relay, peer, .. } => {
                self.permissions += 1;
                self.route(relay.0, |id| RouteUpdate::AddPermission { relay: id, peer });
            }
            Command::RemovePermission { relay, peer, .. } => {
                self.permissions = self.permissions.saturating_sub(1);
                self.route(relay.0, |id| RouteUpdate::RemovePermission {
                    relay: id,
                    peer,
                });
            }
            Command::InstallChannel {
                relay,
                channel,
                peer,
                ..
            } => {
                self.channels += 1;
                self.route(relay.0, |id| RouteUpdate::AddChannel {
                    relay: id,
                    channel: channel.get(),
                    peer: peer.0,
                });
            }
            Command::RemoveChannel {
                relay,
                channel,
                peer,
                ..
            } => {
                self.channels = self.channels.saturating_sub(1);
                self.route(relay.0, |id| RouteUpdate::RemoveChannel {
                    relay: id,
                    channel: channel.get(),
                    peer: peer.0,
                });
            }
            Command::AllocationEnded {
                allocation,
                identity,
                usage,
            } => {
                let pending = self.usage.entry(allocation.0).or_default();
                pending.identity = Some(identity);
                pending.ended = true;
                add_usage(&mut pending.usage, usage);
                if let Some(client) = pending.client {
                    self.owners.remove(&client);
                }
                self.finish_usage(allocation.0);
            }
        }
    }

    fn route(&self, relay: SocketAddr, update: impl FnOnce(RelayId) -> RouteUpdate) {
        if let Some((worker, id)) = self.relays.get(&relay) {
            self.workers[*worker].send(WorkerMsg::Route(update(*id)));
        }
    }

    fn listener_of(&self, client: FiveTuple) -> Option<ListenerId> {
        self.listeners
            .iter()
            .position(|l| *l == (client.server, client.transport))
            .and_then(|i| ListenerId::try_from(i).ok())
    }

    fn relay_closed(&mut self, allocation: u64, c: crate::route::Counters) {
        let pending = self.usage.entry(allocation).or_default();
        add_usage(&mut pending.usage, usage_of(c));
        pending.open_relays = pending.open_relays.saturating_sub(1);
        self.finish_usage(allocation);
    }

    /// Emit an allocation's usage once the server has ended it and every relay socket has reported.
    fn finish_usage(&mut self, allocation: u64) {
        let done = self
            .usage
            .get(&allocation)
            .is_some_and(|p| p.ended && p.open_relays == 0);
        if !done {
            return;
        }
        let Some(p) = self.usage.remove(&allocation) else {
            return;
        };
        if p.client.is_none() {
            // Never opened a relay socket (refused or failed): nothing to bill.
            return;
        }
        let record = UsageRecord {
            allocation,
            identity: p.identity.unwrap_or_default(),
            client: p.client,
            started_ms: p.started_ms,
            at_ms: unix_ms(),
            done: true,
            usage: p.usage,
        };
        tracing::info!(
            allocation,
            identity = %record.identity,
            to_peer_bytes = record.usage.to_peer_bytes,
            to_peer_packets = record.usage.to_peer_packets,
            to_client_bytes = record.usage.to_client_bytes,
            to_client_packets = record.usage.to_client_packets,
            "allocation ended"
        );
        if let Some(sink) = &self.usage_sink {
            let _ = sink.send(record);
        }
    }

    fn stop(mut self, rx: &Receiver<ToControl>) -> io::Result<()> {
        self.final_usage(rx);
        for w in &self.workers {
            w.send(WorkerMsg::Stop);
        }
        let mut result = Ok(());
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                if let Ok(Err(e)) = t.join() {
                    result = Err(e);
                }
            }
        }
        tracing::info!("relay stopped");
        result
    }
}

fn add_usage(total: &mut server::Usage, more: server::Usage) {
    total.to_peer_bytes += more.to_peer_bytes;
    total.to_peer_packets += more.to_peer_packets;
    total.to_client_bytes += more.to_client_bytes;
    total.to_client_packets += more.to_client_packets;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
