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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use crate::api::{self, Api, ApiHandle, Hooks};
use crate::clock::{unix_ms, unix_now};
use crate::config::{Backend, RelayConfig, TlsFiles};
use crate::control::{self, RelayHandle, Settings, UsageRecord};
use crate::dataplane::stream::{tls_config, TlsFile};
use crate::dataplane::{BackendKind, ToControl};
use crate::fleet::{registry, revocations};
use crate::metrics::Reloads;
use crate::server::Transport;
use crate::{fleet, usage};

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
    /// The fleet's revocations, applied here as they are published.
    revocations: Option<revocations::Listener>,
    /// This relay's entry in the fleet's registry.
    heartbeat: Option<registry::Heartbeat>,
    /// The registry as the API reads it.
    watcher: Option<Arc<registry::Watcher>>,
    shipper: Option<fleet::Shipper>,
    /// The fleet's connections, when `[fleet]` is configured.
    pool: Option<fleet::Pool>,
    /// The control-plane runtime (API, shipper), when either runs; ended last.
    runtime: Option<tokio::runtime::Runtime>,
}

/// How long a relay with `[fleet]` waits at start for the fleet's revocations before it serves with
/// its local copy (issue 12: a bounded catch-up, 5 s by default).
pub const REVOCATION_CATCH_UP: Duration = Duration::from_secs(5);

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
        xdp: f.xdp.clone(),
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
    if config.fixed.fleet.is_some() && config.fixed.usage.is_none() {
        return Err(io::Error::other(
            "fleet: a relay needs [usage] as well: its database is the ledger's outbox \
             (only `turnpike api` and `turnpike usage` read the ledger without it)",
        ));
    }
    let runtime = (config.fixed.api.is_some() || config.fixed.fleet.is_some())
        .then(api::control_plane_runtime)
        .transpose()?;
    let pool = config.fixed.fleet.clone().map(fleet::Pool::new);
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
    // Revocations survive restarts: the API's store (or, without [api], the usage database) is read
    // before the relay serves. With a fleet it is first brought up to date from PostgreSQL (bounded).
    let revocations = config
        .fixed
        .api
        .as_ref()
        .map(|a| a.revocations_db.clone())
        .or_else(|| config.fixed.usage.as_ref().map(|u| u.database.clone()));
    let copy = revocations
        .as_ref()
        .map(|path| {
            api::revocations::Store::open(path)
                .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
        })
        .transpose()?;
    let reached = match (&runtime, &pool, &copy) {
        (Some(rt), Some(p), Some(copy)) => catch_up(rt.handle(), p, copy),
        _ => false,
    };
    // Set while the relay serves from its local copy of the revocations (`/metrics`).
    let local_copy = Arc::new(AtomicBool::new(false));
    let relay = control::start(settings)?;
    // The ledger's shipper reads the outbox and ships on the control-plane runtime, with pooled
    // connections; the relay never waits for it.
    let shipper = match (&runtime, &pool, &config.fixed.usage) {
        (Some(rt), Some(p), Some(u)) => Some(fleet::Shipper::start(
            rt.handle(),
            p.clone(),
            u.database.clone(),
        )),
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

    if let (Some(copy), Some(path)) = (&copy, &revocations) {
        let list = copy
            .active(unix_ms() / 1000)
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
    let (revocations, heartbeat) = match (&config.fixed.fleet, &runtime, &pool, copy) {
        (Some(f), Some(rt), Some(p), Some(copy)) => (
            Some(listen_for_revocations(
                rt.handle(),
                p,
                copy,
                reached,
                local_copy.clone(),
                to_control.clone(),
            )),
            Some(registry::Heartbeat::start(
                rt.handle(),
                p.clone(),
                registry_entry(config),
                f.registry,
                {
                    let probe = metrics_probe(to_control.clone());
                    let capacity = config.live.quotas.max_allocations as u64;
                    Box::new(move || {
                        probe().map(|m| registry::Load {
                            draining: m.draining,
                            allocations: m.server.allocations,
                            capacity,
                        })
                    })
                },
            )),
        ),
        _ => (None, None),
    };
    // The relay's catch-up and listener apply the migrations: the registry reader needs not.
    let watcher = match (&config.fixed.fleet, &runtime, &pool, config.api()) {
        (Some(f), Some(rt), Some(p), Some(_)) => Some(Arc::new(registry::Watcher::start(
            rt.handle(),
            p.clone(),
            f.registry,
            false,
        ))),
        _ => None,
    };

    let mut api_reload = None;
    let api = match (config.api(), &runtime) {
        (Some(a), Some(rt)) => {
            let tls = config
                .live
                .api
                .as_ref()
                .and_then(|l| l.tls.as_ref())
                .map(|f| load_tls(f, API_TLS_KEYS))
                .transpose()
                .map_err(io::Error::other)?;
            let revoke_tx = to_control.clone();
            let registry = watcher.clone();
            let metrics_tx = to_control.clone();
            let local_copy = local_copy.clone();
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
                    snap.revocations_local_copy = local_copy.load(Ordering::Relaxed);
                    Some(snap)
                }),
                fleet_revoke: pool
                    .clone()
                    .map(|p| fleet_revoke_hook(p, rt.handle().clone())),
                fleet_relays: registry.map(fleet_relays_hook),
                ledger: pool.clone().map(|p| ledger_hook(p, rt.handle().clone())),
            };
            let db = a.revocations_db.clone();
            let api = Api::new(a, config.live.rest_secrets.clone(), hooks)
                .map_err(|e| io::Error::other(format!("{}: {e}", db.display())))?;
            api_reload = Some(api.reloader());
            Some(api::serve_on(rt.handle(), api, tls)?)
        }
        _ => None,
    };
    Ok(Service {
        relay,
        api,
        api_reload,
        writer,
        ticker,
        shipper,
        revocations,
        heartbeat,
        watcher,
        pool,
        runtime,
    })
}

/// Asks the control thread for a metrics snapshot (bounded wait).
fn metrics_probe(to_control: Sender<ToControl>) -> impl Fn() -> Option<crate::metrics::Snapshot> {
    move || {
        let (tx, rx) = bounded(1);
        to_control.send(ToControl::Metrics(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(2)).ok()
    }
}

/// This relay as the registry lists it: the API's entry for it (region, public addresses), or without
/// `[api]` its listeners in region "default".
fn registry_entry(config: &RelayConfig) -> registry::Relay {
    let f = &config.fixed;
    match config.live.api.as_ref().and_then(|a| a.fleet.first()) {
        Some(me) => registry::Relay {
            id: f.relay_id.clone(),
            region: me.region.clone(),
            udp: me.addresses.clone(),
            tcp: me.tcp_addresses.clone(),
            tls: me.tls_addresses.clone(),
        },
        None => registry::Relay {
            id: f.relay_id.clone(),
            region: "default".into(),
            udp: f.listen.iter().map(ToString::to_string).collect(),
            tcp: f.listen_tcp.iter().map(ToString::to_string).collect(),
            tls: f.listen_tls.iter().map(ToString::to_string).collect(),
        },
    }
}

/// Bring the local copy of the revocations up to date from the fleet's store (applying the migrations
/// first, with `migrate`), on the control-plane `runtime` through `pool`, within
/// [`REVOCATION_CATCH_UP`]; when PostgreSQL cannot be reached, say once that the relay serves with the
/// copy (the listener keeps retrying). Returns whether it reached the database.
fn catch_up(
    runtime: &tokio::runtime::Handle,
    pool: &fleet::Pool,
    copy: &api::revocations::Store,
) -> bool {
    let loaded = runtime.block_on(async {
        tokio::time::timeout(REVOCATION_CATCH_UP, async {
            let mut conn = pool.get(REVOCATION_CATCH_UP).await?;
            if pool.config().migrate {
                revocations::migrate_all(&mut conn).await?;
            }
            revocations::load(&conn).await
        })
        .await
        .unwrap_or_else(|_| Err(fleet::Error::Io("timed out".into())))
    });
    match loaded {
        Ok(rows) => {
            for r in &rows {
                // A stale row here is one the copy already has a newer version of.
                if let Err(e) = copy.apply(&r.identity, r.until, r.signed_ms, r.revoked_ms) {
                    tracing::warn!("fleet revocations: the local copy failed: {e}");
                }
            }
            tracing::info!(
                rows = rows.len(),
                "fleet revocations: caught up with PostgreSQL"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                "fleet revocations: PostgreSQL unreachable at start ({e}); serving with the local \
                 copy of the revocations while retrying"
            );
            false
        }
    }
}

/// Apply the fleet's revocations here exactly as local ones (refuse the credentials; end live
/// allocations unless the revoke said not to), as they are published, and keep `copy` (the local
/// store) up to date with them: a task on the control-plane `runtime`, with `pool`'s settings.
fn listen_for_revocations(
    runtime: &tokio::runtime::Handle,
    pool: &fleet::Pool,
    copy: api::revocations::Store,
    reached: bool,
    local_copy: Arc<AtomicBool>,
    to_control: Sender<ToControl>,
) -> revocations::Listener {
    revocations::Listener::start(
        runtime,
        pool.clone(),
        Box::new(move |r| {
            let _ = to_control.send(ToControl::Revoke {
                identity: r.identity.as_str().into(),
                until: r.until,
                terminate: r.terminate && r.until > 0,
            });
            if let Err(e) = copy.apply(&r.identity, r.until, r.signed_ms, r.revoked_ms) {
                tracing::warn!("fleet revocations: the local copy failed: {e}");
            }
        }),
        reached,
        local_copy,
    )
}

/// `POST /admin/revoke` with a fleet: record and publish through `pool` (on the API's blocking pool).
fn fleet_revoke_hook(pool: fleet::Pool, runtime: tokio::runtime::Handle) -> api::FleetRevokeHook {
    Box::new(move |identity, until, signed_ms, now_ms, terminate| {
        let r = revocations::Revocation {
            identity: identity.into(),
            until,
            signed_ms,
            revoked_ms: now_ms,
            terminate,
        };
        let applied = runtime.block_on(async {
            let mut conn = pool.get(LEDGER_WAIT).await?;
            revocations::apply(&mut conn, &r).await
        });
        match applied {
            Ok(revocations::Applied::Recorded) => Ok(api::revocations::Applied::Recorded),
            Ok(revocations::Applied::Stale(at)) => Ok(api::revocations::Applied::Stale(at)),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// `any` and `nearest` from the registry as `watcher` last read it.
fn fleet_relays_hook(watcher: Arc<registry::Watcher>) -> api::FleetRelaysHook {
    Box::new(move || {
        let live = watcher.live()?;
        Some(
            live.iter()
                .map(|r| api::FleetRelay {
                    id: r.id.clone(),
                    region: r.region.clone(),
                    addresses: r.udp.clone(),
                    tcp_addresses: r.tcp.clone(),
                    tls_addresses: r.tls.clone(),
                })
                .collect(),
        )
    })
}

/// How long a `/usage` request waits for a pooled connection.
const LEDGER_WAIT: Duration = Duration::from_secs(5);

/// `/usage` from the fleet ledger through `pool` (the API calls it on its blocking pool).
fn ledger_hook(pool: fleet::Pool, runtime: tokio::runtime::Handle) -> api::LedgerHook {
    Box::new(move |since, until, relay| {
        runtime
            .block_on(async {
                let conn = pool.get(LEDGER_WAIT).await?;
                fleet::bill(&conn, since, until, relay).await
            })
            .map_err(|e| e.to_string())
    })
}

/// The token API on its own (`turnpike api`): no listeners, no workers, no relay. Several replicas
/// with the same configuration can stand behind a load balancer: they share the REST secret and, with
/// `[fleet]`, read usage from the ledger. Its configuration is read with
/// [`RelayConfig::load_api`] (no `[relay]` needed); SIGHUP reloads it ([`ApiService::reload`]).
#[derive(Debug)]
pub struct ApiService {
    api: ApiHandle,
    api_reload: api::ApiReload,
    /// Reloads of this process (SIGHUP), counted as the relay's are and shown on `/metrics`.
    reloads: Arc<Reloads>,
    pool: Option<fleet::Pool>,
    /// The registry as this API reads it.
    watcher: Option<Arc<registry::Watcher>>,
    runtime: tokio::runtime::Runtime,
}

/// `config`'s `[api]` for the API alone: its fleet is `[[api.fleet]]` (the first entry of a relay's
/// list is the relay itself; this process has none), which must not be empty.
fn api_alone(config: &RelayConfig) -> io::Result<api::Config> {
    let Some(mut a) = config.api() else {
        return Err(io::Error::other(
            "api: `turnpike api` needs an [api] section",
        ));
    };
    if !a.fleet.is_empty() {
        a.fleet.remove(0);
    }
    if a.fleet.is_empty() {
        return Err(io::Error::other(
            "api.fleet: `turnpike api` hands out the relays of [[api.fleet]]; list them there",
        ));
    }
    Ok(a)
}

/// Apply the fleet's migrations at start (`[fleet] migrate`), within [`REVOCATION_CATCH_UP`]. Returns
/// whether they are in; if not (PostgreSQL unreachable), the registry reader retries them.
fn migrate_at_start(runtime: &tokio::runtime::Handle, pool: &fleet::Pool) -> bool {
    let applied = runtime.block_on(async {
        tokio::time::timeout(REVOCATION_CATCH_UP, async {
            let mut conn = pool.get(REVOCATION_CATCH_UP).await?;
            revocations::migrate_all(&mut conn).await
        })
        .await
        .unwrap_or_else(|_| Err(fleet::Error::Io("timed out".into())))
    });
    match applied {
        Ok(v) => {
            tracing::info!(versions = ?v, "fleet: migrations applied (none: up to date)");
            true
        }
        Err(e) => {
            tracing::warn!(
                "fleet: PostgreSQL unreachable at start ({e}); the migrations are retried, and the \
                 API answers from the static fleet meanwhile"
            );
            false
        }
    }
}

/// Start the token API alone from `config`'s `[api]`, `[rest]`, fleet list and `[fleet]`. With
/// `[fleet]` it applies the migrations first (bounded; retried when the database is unreachable).
pub fn start_api(config: &RelayConfig) -> io::Result<ApiService> {
    let a = api_alone(config)?;
    let runtime = api::control_plane_runtime()?;
    let pool = config.fixed.fleet.clone().map(fleet::Pool::new);
    let watcher = match (&config.fixed.fleet, &pool) {
        (Some(f), Some(p)) => {
            let migrated = !f.migrate || migrate_at_start(runtime.handle(), p);
            Some(Arc::new(registry::Watcher::start(
                runtime.handle(),
                p.clone(),
                f.registry,
                !migrated,
            )))
        }
        _ => None,
    };
    let tls = config
        .live
        .api
        .as_ref()
        .and_then(|l| l.tls.as_ref())
        .map(|f| load_tls(f, API_TLS_KEYS))
        .transpose()
        .map_err(io::Error::other)?;
    let reloads: Arc<Reloads> = Arc::default();
    let reloads_seen = reloads.clone();
    let hooks = Hooks {
        // No relay here: a revocation is stored (and answered) only.
        revoke: Box::new(|_, _, _| {}),
        // Ready while it runs; no relay counters to report, only this process's reloads.
        metrics: Box::new(move || {
            Some(crate::metrics::Snapshot {
                backend: "none",
                reloads: reloads_seen.snapshot(),
                ..Default::default()
            })
        }),
        fleet_revoke: pool
            .clone()
            .map(|p| fleet_revoke_hook(p, runtime.handle().clone())),
        fleet_relays: watcher.clone().map(fleet_relays_hook),
        ledger: pool
            .clone()
            .map(|p| ledger_hook(p, runtime.handle().clone())),
    };
    let db = a.revocations_db.clone();
    let api = Api::new(a, config.live.rest_secrets.clone(), hooks)
        .map_err(|e| io::Error::other(format!("{}: {e}", db.display())))?;
    let api_reload = api.reloader();
    let api = api::serve_on(runtime.handle(), api, tls)?;
    Ok(ApiService {
        api,
        api_reload,
        reloads,
        pool,
        watcher,
        runtime,
    })
}

impl ApiService {
    /// The address it listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.api.local_addr()
    }

    /// Replaces the API's live settings (a reload).
    pub fn api_reload(&self) -> api::ApiReload {
        self.api_reload.clone()
    }

    /// Replaces the API's TLS configuration (SIGHUP), if it runs TLS.
    pub fn api_tls(&self) -> Option<api::ApiTls> {
        self.api.tls()
    }

    /// Reload from `new` (the file just read with [`RelayConfig::load_api`], or why it could not be):
    /// the access keys, names, trusted proxies, fleet list, regions and REST secrets apply to requests
    /// that start from now on, and the API's certificate to new connections. Settings that need a
    /// restart (listen addresses, databases, `[fleet]`) are kept, one warning each. On any error
    /// nothing changes. `running` becomes the new configuration on success. Either way the reload is
    /// counted in `turnpike_reloads_total{result}`, as the relay counts its own SIGHUP reloads.
    pub fn reload(
        &self,
        running: &mut RelayConfig,
        new: Result<RelayConfig, String>,
    ) -> Result<(), String> {
        let result = new.and_then(|new| {
            let a = api_alone(&new).map_err(|e| e.to_string())?;
            let cert = match (
                self.api.tls(),
                new.live.api.as_ref().and_then(|l| l.tls.as_ref()),
            ) {
                (Some(slot), Some(files)) => {
                    Some((slot, load_tls(files, API_TLS_KEYS)?, files.cert.clone()))
                }
                _ => None,
            };
            Ok((new, a, cert))
        });
        self.reloads.record(result.is_ok(), unix_now());
        match result {
            Ok((new, a, cert)) => {
                for line in running.fixed.changes(&new.fixed) {
                    tracing::warn!("reload: {line}");
                }
                self.api_reload.set(a, new.live.rest_secrets.clone());
                if let Some((slot, cfg, path)) = cert {
                    slot.set(cfg);
                    tracing::info!(cert = %path.display(), "API TLS certificate reloaded");
                }
                running.live = new.live;
                tracing::info!("configuration reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!("reload failed, nothing changed: configuration error: {e}");
                Err(e)
            }
        }
    }

    /// The fleet's connections, when `[fleet]` is configured.
    pub fn pool(&self) -> Option<&fleet::Pool> {
        self.pool.as_ref()
    }

    /// The control-plane runtime.
    pub fn control_plane(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    /// Stop accepting, let requests in flight finish, and end the runtime.
    pub fn stop(self) {
        let ApiService {
            api,
            runtime,
            watcher,
            ..
        } = self;
        api.stop();
        if let Some(w) = watcher {
            w.stop();
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
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

    /// The fleet's connections, when `[fleet]` is configured (for the fleet's other state).
    pub fn pool(&self) -> Option<&fleet::Pool> {
        self.pool.as_ref()
    }

    /// The control-plane runtime (API, shipper), when it runs.
    pub fn control_plane(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Begin the graceful shutdown (drain, then stop).
    pub fn shutdown(&self) {
        if let Some(d) = self.drain_notice() {
            d.draining();
        }
        self.relay.shutdown();
    }

    /// Publishes "draining" to the fleet's registry at once (for a signal handler), with `[fleet]`.
    pub fn drain_notice(&self) -> Option<registry::Drain> {
        self.heartbeat.as_ref().map(registry::Heartbeat::drain)
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
        if let Some(h) = self.heartbeat.take() {
            h.stop();
        }
        if let Some(l) = self.revocations.take() {
            l.stop();
        }
        if let Some(w) = self.watcher.take() {
            w.stop();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
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
