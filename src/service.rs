//! Wiring of a whole relay process: the relay (workers and control thread), the metering writer and its
//! checkpoint timer, and the HTTP API, from one [`RelayConfig`]. `main` and the end-to-end tests use it.
//!
//! ```text
//!  workers ──counters──▶ control ──UsageRecord──▶ usage writer ──▶ SQLite ◀── api (/usage, revoke)
//!                           ▲  ▲                                                 │
//!          Checkpoint tick ─┘  └────────── Revoke / Metrics requests ────────────┘
//! ```
//!
//! May use: every module.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use crate::api::{self, Api, ApiHandle, Hooks};
use crate::clock::unix_ms;
use crate::config::{Backend, RelayConfig, TlsFiles};
use crate::control::{self, RelayHandle, Settings, UsageRecord};
use crate::dataplane::stream::{tls_config, TlsFile};
use crate::dataplane::{BackendKind, ToControl};
use crate::server::Transport;
use crate::usage;

/// Records written per SQLite transaction at most.
const WRITE_BATCH: usize = 4096;

/// A running relay process.
#[derive(Debug)]
pub struct Service {
    relay: RelayHandle,
    api: Option<ApiHandle>,
    /// Replaces the API's live settings (a reload), while it runs.
    api_reload: Option<api::ApiReload>,
    writer: Option<JoinHandle<()>>,
    ticker: Option<(Sender<()>, JoinHandle<()>)>,
    shipper: Option<crate::fleet::Shipper>,
}

/// The relay's [`Settings`] for `config` (without a usage sink).
pub fn settings(config: &RelayConfig) -> Settings {
    let f = &config.fixed;
    Settings {
        server: config.server(),
        listen: f.listen.clone(),
        workers: f.workers,
        backend: match f.backend {
            Backend::Auto => None,
            Backend::IoUring => Some(BackendKind::IoUring),
            Backend::Epoll => Some(BackendKind::Epoll),
        },
        recv_buffer: f.recv_buffer,
        send_buffer: f.send_buffer,
        pin_workers: f.pin_workers,
        drain: f.drain,
        usage_sink: None,
        stream: control::StreamSettings {
            listen_tcp: f.listen_tcp.clone(),
            listen_tls: f.listen_tls.clone(),
            // Read from the PEM files by the caller (`main`), which reports file errors.
            tls: None,
            limits: f.streams.clone(),
        },
    }
}

/// Start everything `config` enables.
pub fn start(config: &RelayConfig) -> io::Result<Service> {
    start_with(config, settings(config))
}

/// Start with explicit relay settings (tests adjust them); `config` supplies the API and metering.
pub fn start_with(config: &RelayConfig, mut settings: Settings) -> io::Result<Service> {
    let started_unix = unix_ms() / 1000;
    // Batches the usage writer could not store (`/metrics`).
    let write_failures = Arc::new(AtomicU64::new(0));
    let mut store = None;
    let mut writer = None;
    if let Some(u) = &config.fixed.usage {
        let mut s = usage::Store::open(&u.database, &config.fixed.relay_id, unix_ms())
            .map_err(|e| io::Error::other(format!("{}: {e}", u.database.display())))?;
        if config.fixed.fleet.is_some() {
            s.enable_outbox();
        }
        let (tx, rx) = unbounded();
        settings.usage_sink = Some(tx);
        store = Some(s);
        writer = Some(rx);
    }
    let relay = control::start(settings)?;
    // The ledger's shipper reads the outbox on its own connection; the relay never waits for it.
    let shipper = match (&config.fixed.fleet, &config.fixed.usage) {
        (Some(f), Some(u)) => Some(crate::fleet::Shipper::start(f.clone(), u.database.clone())?),
        _ => None,
    };
    let to_control = relay.shutdown_sender();

    let mut ticker = None;
    let writer = match (store, writer, &config.fixed.usage) {
        (Some(store), Some(rx), Some(u)) => {
            let (stop, stopped) = bounded::<()>(1);
            let (every, retention) = (u.checkpoint, u.retention);
            let tick = to_control.clone();
            let failures = write_failures.clone();
            let t = std::thread::Builder::new()
                .name("turnpike-checkpoint".into())
                .spawn(move || loop {
                    match stopped.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {
                            if tick.send(ToControl::Checkpoint).is_err() {
                                return;
                            }
                        }
                        _ => return,
                    }
                })?;
            ticker = Some((stop, t));
            Some(
                std::thread::Builder::new()
                    .name("turnpike-usage".into())
                    .spawn(move || write_usage(store, &rx, retention, &failures))?,
            )
        }
        _ => None,
    };

    // Revocations survive restarts: the API's store (or, without [api], the usage database) is read
    // before the API answers.
    let revocations = config
        .fixed
        .api
        .as_ref()
        .map(|a| a.revocations_db.clone())
        .or_else(|| config.fixed.usage.as_ref().map(|u| u.database.clone()));
    if let Some(path) = revocations {
        let list = api::revocations::Store::open(&path)
            .and_then(|s| s.active(unix_ms() / 1000))
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        for (identity, until) in list {
            // Nothing is live yet at start.
            let _ = to_control.send(ToControl::Revoke {
                identity: identity.into(),
                until,
                terminate: false,
            });
        }
    }

    let mut api_reload = None;
    let api = match config.api() {
        Some(a) => {
            let tls = config
                .live
                .api
                .as_ref()
                .and_then(|l| l.tls.as_ref())
                .map(|f| load_tls(f, API_TLS_KEYS))
                .transpose()
                .map_err(io::Error::other)?;
            let revoke_tx = to_control.clone();
            let metrics_tx = to_control.clone();
            let streams = relay.streams().clone();
            let stream_listeners = !(relay.tcp_addrs().is_empty() && relay.tls_addrs().is_empty());
            let hooks = Hooks {
                revoke: Box::new(move |identity, until, terminate| {
                    let _ = revoke_tx.send(ToControl::Revoke {
                        identity: identity.into(),
                        until,
                        terminate,
                    });
                }),
                metrics: Box::new(move || {
                    let (tx, rx) = bounded(1);
                    metrics_tx.send(ToControl::Metrics(tx)).ok()?;
                    let mut snap = rx.recv_timeout(Duration::from_secs(2)).ok()?;
                    // What the control thread does not hold: the process's start, the stream
                    // side's connection counts, the usage writer's failures.
                    snap.started_unix = started_unix;
                    if stream_listeners {
                        snap.streams = streams.stats.snapshot();
                    }
                    snap.usage_write_failures = write_failures.load(Ordering::Relaxed);
                    Some(snap)
                }),
            };
            let db = a.revocations_db.clone();
            let api = Api::new(a, config.live.rest_secrets.clone(), hooks)
                .map_err(|e| io::Error::other(format!("{}: {e}", db.display())))?;
            api_reload = Some(api.reloader());
            Some(api::serve(api, tls)?)
        }
        None => None,
    };
    Ok(Service {
        relay,
        api,
        api_reload,
        writer,
        ticker,
        shipper,
    })
}

impl Service {
    /// The relay.
    pub fn relay(&self) -> &RelayHandle {
        &self.relay
    }

    /// The API's address, if it runs.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api.as_ref().map(ApiHandle::local_addr)
    }

    /// The metrics listener's address, when `/metrics` has one of its own.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.api.as_ref().and_then(ApiHandle::metrics_addr)
    }

    /// Replaces the API's live settings (a reload), if the API runs.
    pub fn api_reload(&self) -> Option<api::ApiReload> {
        self.api_reload.clone()
    }

    /// Replaces the API's TLS configuration (SIGHUP), if the API runs TLS.
    pub fn api_tls(&self) -> Option<api::ApiTls> {
        self.api.as_ref().and_then(ApiHandle::tls)
    }

    /// Begin the graceful shutdown (drain, then stop).
    pub fn shutdown(&self) {
        self.relay.shutdown();
    }

    /// Wait until the relay has stopped, then flush the usage records and stop the API.
    pub fn join(mut self) -> io::Result<()> {
        let res = self.relay.join();
        self.finish();
        res
    }

    /// Stop now (live allocations get final usage records) and wait for everything.
    pub fn stop(self) -> io::Result<()> {
        self.relay.shutdown_sender().send(ToControl::Stop).ok();
        self.join()
    }

    fn finish(&mut self) {
        if let Some((stop, t)) = self.ticker.take() {
            let _ = stop.send(());
            let _ = t.join();
        }
        // The control thread has exited and dropped the sink: the writer drains and ends.
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        // After the writer: the final records are in the outbox; one last round ships them.
        if let Some(s) = self.shipper.take() {
            s.stop();
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
    }
}

/// The keys naming the `[tls]` pair in errors.
pub const TLS_KEYS: [&str; 2] = ["tls.cert", "tls.key"];
/// The keys naming the API's pair in errors.
pub const API_TLS_KEYS: [&str; 2] = ["api.tls_cert", "api.tls_key"];

/// Read and check a certificate chain and key pair; errors name the key (`keys`: certificate's, key's)
/// and the file, e.g. `tls.key: not a usable private key: … (/etc/turnpike/key.pem)`.
pub fn load_tls(files: &TlsFiles, keys: [&str; 2]) -> Result<Arc<rustls::ServerConfig>, String> {
    let [cert_key, key_key] = keys;
    let cert = std::fs::read(&files.cert)
        .map_err(|e| format!("{cert_key}: cannot read {}: {e}", files.cert.display()))?;
    let key = std::fs::read(&files.key)
        .map_err(|e| format!("{key_key}: cannot read {}: {e}", files.key.display()))?;
    tls_config(&cert, &key).map_err(|e| match e.file {
        TlsFile::Cert => format!("{cert_key}: {e} ({})", files.cert.display()),
        TlsFile::Key => format!("{key_key}: {e} ({})", files.key.display()),
        TlsFile::Pair => format!(
            "{key_key}: {e} ({} with {})",
            files.key.display(),
            files.cert.display()
        ),
    })
}

/// The usage writer: stores records in batches as they come, and prunes rows older than `retention`
/// at start and every [`usage::PRUNE_EVERY`].
fn write_usage(
    mut store: usage::Store,
    rx: &Receiver<UsageRecord>,
    retention: Duration,
    failures: &AtomicU64,
) {
    let prune = |store: &usage::Store| match store.prune(unix_ms(), retention) {
        Ok(0) => {}
        Ok(n) => tracing::info!(rows = n, "usage: pruned rows past the retention"),
        Err(e) => tracing::warn!("usage: pruning failed: {e}"),
    };
    prune(&store);
    let mut next_prune = Instant::now() + usage::PRUNE_EVERY;
    let mut batch = Vec::with_capacity(64);
    loop {
        match rx.recv_timeout(next_prune.saturating_duration_since(Instant::now())) {
            Ok(first) => batch.push(record(first)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while !batch.is_empty() && batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(record(r)),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.record(&batch) {
                failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!("usage records lost: {e}");
            }
            batch.clear();
        }
        if Instant::now() >= next_prune {
            prune(&store);
            next_prune = Instant::now() + usage::PRUNE_EVERY;
        }
    }
}

fn record(r: UsageRecord) -> usage::Record {
    usage::Record {
        allocation: r.allocation,
        identity: r.identity.into(),
        transport: match r.client.map(|c| c.transport) {
            Some(Transport::Tcp) => "tcp",
            Some(Transport::Tls) => "tls",
            _ => "udp",
        },
        client: r.client.map(|c| c.client),
        server: r.client.map(|c| c.server),
        started_ms: r.started_ms,
        at_ms: r.at_ms,
        done: r.done,
        relayed: r.relayed,
        end_reason: r.end_reason.as_str(),
        to_peer_bytes: r.usage.to_peer_bytes,
        to_peer_packets: r.usage.to_peer_packets,
        to_client_bytes: r.usage.to_client_bytes,
        to_client_packets: r.usage.to_client_packets,
    }
}
