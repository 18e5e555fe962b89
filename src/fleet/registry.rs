//! The live relay registry on PostgreSQL: every relay heartbeats its id, region, public addresses,
//! draining flag, live allocations and capacity into `fleet_relays` ([`Heartbeat`]); the token API
//! reads back the relays that can take clients ([`Watcher`]): a heartbeat fresher than the stale
//! timeout (by the database's clock, so relay clocks do not matter), not draining and not full.
//!
//! May use: usage, tokio-postgres.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use tokio_postgres::Client;

use super::{connect, runtime, Config, Error};

/// The registry's table (shared-state migration 11).
pub(crate) const SCHEMA: &str = "
CREATE TABLE fleet_relays (
    id            text        PRIMARY KEY,
    region        text        NOT NULL,
    udp           text[]      NOT NULL,
    tcp           text[]      NOT NULL,
    tls           text[]      NOT NULL,
    draining      boolean     NOT NULL,
    allocations   bigint      NOT NULL,
    capacity      bigint      NOT NULL,
    heartbeat_at  timestamptz NOT NULL
);";

/// A relay as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Its id (`relay_id`).
    pub id: String,
    /// Its region.
    pub region: String,
    /// Public `host:port` addresses of its UDP listeners.
    pub udp: Vec<String>,
    /// Public `host:port` addresses of its TURN-over-TCP listeners.
    pub tcp: Vec<String>,
    /// Public `host:port` addresses of its TURN-over-TLS listeners.
    pub tls: Vec<String>,
}

/// The relay's load at one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Refusing new allocations (shutting down).
    pub draining: bool,
    /// Live allocations.
    pub allocations: u64,
    /// Allocations it takes at most.
    pub capacity: u64,
}

/// The registry's timing (`[fleet] heartbeat_seconds`, `stale_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often a relay heartbeats (and the API rereads the registry at least as often).
    pub heartbeat: Duration,
    /// A relay whose last heartbeat is older leaves the answers.
    pub stale: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat: Duration::from_secs(5),
            stale: Duration::from_secs(15),
        }
    }
}

fn to_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Write one heartbeat of `relay` with `load`, stamped with the database's clock.
pub async fn beat(client: &Client, relay: &Relay, load: Load) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO fleet_relays (id, region, udp, tcp, tls, draining, allocations, capacity,
                heartbeat_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
             ON CONFLICT (id) DO UPDATE SET region = excluded.region, udp = excluded.udp,
                tcp = excluded.tcp, tls = excluded.tls, draining = excluded.draining,
                allocations = excluded.allocations, capacity = excluded.capacity,
                heartbeat_at = excluded.heartbeat_at",
            &[
                &relay.id,
                &relay.region,
                &relay.udp,
                &relay.tcp,
                &relay.tls,
                &load.draining,
                &to_i64(load.allocations),
                &to_i64(load.capacity),
            ],
        )
        .await?;
    Ok(())
}

/// The relays that can take clients now: heartbeat within `stale`, not draining, not full; by id.
pub async fn live(client: &Client, stale: Duration) -> Result<Vec<Relay>, Error> {
    let stale_ms = to_i64(stale.as_millis().min(u128::from(u64::MAX)) as u64);
    let rows = client
        .query(
            "SELECT id, region, udp, tcp, tls FROM fleet_relays
             WHERE heartbeat_at > now() - make_interval(secs => $1::bigint / 1000.0)
               AND NOT draining AND allocations < capacity
             ORDER BY id",
            &[&stale_ms],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Relay {
            id: r.get(0),
            region: r.get(1),
            udp: r.get(2),
            tcp: r.get(3),
            tls: r.get(4),
        })
        .collect())
}

/// Asks the relay for its load (`None` when it does not answer).
pub type LoadProbe = Box<dyn Fn() -> Option<Load> + Send>;

/// The relay's heartbeat thread.
#[derive(Debug)]
pub struct Heartbeat {
    draining: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    wake: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

/// Publishes "draining" at once (SIGTERM), from any thread.
#[derive(Debug, Clone)]
pub struct Drain {
    draining: Arc<AtomicBool>,
    wake: Sender<()>,
}

impl Drain {
    /// Mark the relay draining and heartbeat now.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.wake.try_send(());
    }
}

impl Heartbeat {
    /// Heartbeat `relay` every `timing.heartbeat` with the load `probe` reports. Failures are logged
    /// once per outage and retried at the next beat; the relay never waits for it.
    pub fn start(
        config: Config,
        relay: Relay,
        timing: Timing,
        probe: LoadProbe,
    ) -> std::io::Result<Heartbeat> {
        let draining = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, woken) = bounded(1);
        let flag = draining.clone();
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("turnpike-heartbeat".into())
            .spawn(move || {
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("fleet registry: no heartbeat: {e}");
                        return;
                    }
                };
                Beater {
                    config,
                    relay,
                    timing,
                    probe,
                    draining: flag,
                    stop: stopping,
                    woken,
                }
                .run(&rt);
            })?;
        Ok(Heartbeat {
            draining,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// The handle that publishes draining.
    pub fn drain(&self) -> Drain {
        Drain {
            draining: self.draining.clone(),
            wake: self.wake.clone(),
        }
    }

    /// A last heartbeat that says draining (so the relay leaves the answers at once), then stop.
    pub fn stop(mut self) {
        self.draining.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The heartbeat thread's state.
struct Beater {
    config: Config,
    relay: Relay,
    timing: Timing,
    probe: LoadProbe,
    draining: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    woken: Receiver<()>,
}

impl Beater {
    fn run(self, rt: &tokio::runtime::Runtime) {
        let Beater {
            config,
            relay,
            timing,
            probe,
            draining,
            stop,
            woken,
        } = self;
        let (config, relay) = (&config, &relay);
        let mut client: Option<Client> = None;
        let mut down_logged = false;
        let mut last_round = false;
        loop {
            // A relay that no longer answers (stopping) is announced full and draining.
            let mut load = probe().unwrap_or(Load {
                draining: true,
                allocations: 0,
                capacity: 0,
            });
            load.draining |= draining.load(Ordering::Relaxed);
            // Bounded: a stalled database must not hold up a stop for long.
            let result = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), async {
                    if client.as_ref().map_or(true, Client::is_closed) {
                        client = Some(connect(config).await?);
                    }
                    match &client {
                        Some(c) => beat(c, relay, load).await,
                        None => Ok(()),
                    }
                })
                .await
                .unwrap_or_else(|_| Err(Error::Io("heartbeat timed out".into())))
            });
            match result {
                Ok(()) if down_logged => {
                    tracing::info!("fleet registry: heartbeats reach PostgreSQL again");
                    down_logged = false;
                }
                Ok(()) => {}
                Err(e) => {
                    client = None;
                    if !down_logged {
                        tracing::warn!("fleet registry: heartbeat failed ({e}); retrying");
                        down_logged = true;
                    }
                }
            }
            if last_round {
                return;
            }
            let _ = woken.recv_timeout(timing.heartbeat);
            // Stopping: one last beat (marked draining by `stop`), then out.
            last_round = stop.load(Ordering::Relaxed);
        }
    }
}

/// The token API's view of the registry: reread every heartbeat interval (at most every second) on a
/// thread of its own; readers take a short control-plane lock, never a database round trip.
#[derive(Debug)]
pub struct Watcher {
    current: Arc<RwLock<Option<Arc<Vec<Relay>>>>>,
    stop: Sender<()>,
}

impl Watcher {
    /// Start reading the registry per `config` and `timing`.
    pub fn start(config: Config, timing: Timing) -> std::io::Result<Watcher> {
        let current = Arc::new(RwLock::new(None));
        let (stop, stopped) = bounded::<()>(1);
        let shared = current.clone();
        let every = timing.heartbeat.min(Duration::from_secs(1));
        std::thread::Builder::new()
            .name("turnpike-registry".into())
            .spawn(move || {
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("fleet registry: not read: {e}");
                        return;
                    }
                };
                let mut client: Option<Client> = None;
                let mut down_logged = false;
                loop {
                    let read = rt.block_on(async {
                        tokio::time::timeout(Duration::from_secs(5), async {
                            if client.as_ref().map_or(true, Client::is_closed) {
                                client = Some(connect(&config).await?);
                            }
                            match &client {
                                Some(c) => live(c, timing.stale).await,
                                None => Ok(Vec::new()),
                            }
                        })
                        .await
                        .unwrap_or_else(|_| Err(Error::Io("registry read timed out".into())))
                    });
                    let next = match read {
                        Ok(relays) => {
                            if down_logged {
                                tracing::info!("fleet registry: read from PostgreSQL again");
                                down_logged = false;
                            }
                            Some(Arc::new(relays))
                        }
                        Err(e) => {
                            client = None;
                            if !down_logged {
                                tracing::warn!(
                                    "fleet registry: unreadable ({e}); answering from the static fleet"
                                );
                                down_logged = true;
                            }
                            None
                        }
                    };
                    if let Ok(mut c) = shared.write() {
                        *c = next;
                    }
                    match stopped.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(Watcher { current, stop })
    }

    /// The live relays at the last read; `None` when the registry is unreachable or empty (the caller
    /// then answers from its static fleet).
    pub fn live(&self) -> Option<Arc<Vec<Relay>>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.clone())
            .filter(|r| !r.is_empty())
    }

    /// Stop reading (the thread ends after its current read, at most a few seconds on; the API may
    /// still hold this watcher, and then answers from its last read).
    pub fn stop(&self) {
        let _ = self.stop.try_send(());
    }
}
