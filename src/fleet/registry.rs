//! The live relay registry on PostgreSQL: every relay heartbeats its id, region, public addresses,
//! draining flag, live allocations and capacity into `fleet_relays` ([`Heartbeat`]); the token API
//! reads back the relays that can take clients ([`Watcher`]): a heartbeat fresher than the stale
//! timeout (by the database's clock, so relay clocks do not matter), not draining and not full.
//! Both are tasks on the control-plane runtime, with connections from the process's [`Pool`].
//!
//! May use: usage, tokio-postgres.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_postgres::Client;

use super::{blocking, Error, Pool, Task};

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

/// Asks the relay for its load (`None` when it does not answer). It may block briefly (it asks the
/// control thread); the heartbeat calls it through [`blocking`](super::blocking).
pub type LoadProbe = Box<dyn Fn() -> Option<Load> + Send + Sync>;

/// How long one heartbeat or registry read may take (connection included) before it counts as failed:
/// a stalled database must not hold up a stop for long.
const ROUND: Duration = Duration::from_secs(5);

/// The relay's heartbeat: a task on the control-plane runtime, with connections from the [`Pool`].
#[derive(Debug)]
pub struct Heartbeat {
    draining: Arc<AtomicBool>,
    wake: Arc<Notify>,
    task: Task,
}

/// Publishes "draining" at once (SIGTERM), from any thread.
#[derive(Debug, Clone)]
pub struct Drain {
    draining: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Drain {
    /// Mark the relay draining and heartbeat now.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

impl Heartbeat {
    /// Heartbeat `relay` every `timing.heartbeat` with the load `probe` reports, on `runtime` through
    /// `pool`. Failures are logged once per outage and retried at the next beat; the relay never
    /// waits for it.
    pub fn start(
        runtime: &Handle,
        pool: Pool,
        relay: Relay,
        timing: Timing,
        probe: LoadProbe,
    ) -> Heartbeat {
        let draining = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let beater = Beater {
            pool,
            relay,
            timing,
            probe,
            draining: draining.clone(),
            stop: stop.clone(),
            wake: wake.clone(),
        };
        Heartbeat {
            draining,
            wake,
            task: Task::spawn(runtime, stop, beater.run()),
        }
    }

    /// The handle that publishes draining.
    pub fn drain(&self) -> Drain {
        Drain {
            draining: self.draining.clone(),
            wake: self.wake.clone(),
        }
    }

    /// A last heartbeat that says draining (so the relay leaves the answers at once), then stop
    /// (bounded: the beat's own time limit). Call it from outside the runtime.
    pub fn stop(self) {
        self.draining.store(true, Ordering::Relaxed);
        let wake = self.wake;
        self.task.stop(|| wake.notify_one());
    }
}

/// The heartbeat task's state.
struct Beater {
    pool: Pool,
    relay: Relay,
    timing: Timing,
    probe: LoadProbe,
    draining: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Beater {
    async fn run(self) {
        let mut down_logged = false;
        loop {
            // Stopping: this is the last beat (marked draining by `stop`).
            let last_round = self.stop.load(Ordering::Relaxed);
            // A relay that no longer answers (stopping) is announced full and draining.
            let mut load = blocking(|| (self.probe)()).unwrap_or(Load {
                draining: true,
                allocations: 0,
                capacity: 0,
            });
            load.draining |= self.draining.load(Ordering::Relaxed);
            let result = tokio::time::timeout(ROUND, async {
                let conn = self.pool.get(ROUND).await?;
                let r = beat(&conn, &self.relay, load).await;
                if r.is_err() {
                    conn.discard();
                }
                r
            })
            .await
            .unwrap_or_else(|_| Err(Error::Io("heartbeat timed out".into())));
            match result {
                Ok(()) if down_logged => {
                    tracing::info!("fleet registry: heartbeats reach PostgreSQL again");
                    down_logged = false;
                }
                Ok(()) => {}
                Err(e) => {
                    if !down_logged {
                        tracing::warn!("fleet registry: heartbeat failed ({e}); retrying");
                        down_logged = true;
                    }
                }
            }
            if last_round {
                return;
            }
            // The next beat, or at once when woken (draining, stopping).
            let _ = tokio::time::timeout(self.timing.heartbeat, self.wake.notified()).await;
        }
    }
}

/// The token API's view of the registry: reread every heartbeat interval (at most every second) by a
/// task on the control-plane runtime; readers take a short control-plane lock, never a database round
/// trip.
#[derive(Debug)]
pub struct Watcher {
    current: Arc<RwLock<Option<Arc<Vec<Relay>>>>>,
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Watcher {
    /// Start reading the registry on `runtime` through `pool`, per `timing`. With `migrate`, it first
    /// applies the fleet's migrations ([`migrate_all`](super::revocations::migrate_all)), retried
    /// at each read until they are in (`turnpike api` when its start-up attempt could not reach the
    /// database).
    pub fn start(runtime: &Handle, pool: Pool, timing: Timing, migrate: bool) -> Watcher {
        let current = Arc::new(RwLock::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let (shared, stopping, woken) = (current.clone(), stop.clone(), wake.clone());
        runtime.spawn(async move {
            let every = timing.heartbeat.min(Duration::from_secs(1));
            let mut migrated = !migrate;
            let mut down_logged = false;
            while !stopping.load(Ordering::Relaxed) {
                let read = tokio::time::timeout(ROUND, async {
                    let mut conn = pool.get(ROUND).await?;
                    if !migrated {
                        let v = super::revocations::migrate_all(&mut conn).await?;
                        if !v.is_empty() {
                            tracing::info!(versions = ?v, "fleet: applied migrations");
                        }
                        migrated = true;
                    }
                    let r = live(&conn, timing.stale).await;
                    if r.is_err() {
                        conn.discard();
                    }
                    r
                })
                .await
                .unwrap_or_else(|_| Err(Error::Io("registry read timed out".into())));
                let next = match read {
                    Ok(relays) => {
                        if down_logged {
                            tracing::info!("fleet registry: read from PostgreSQL again");
                            down_logged = false;
                        }
                        Some(Arc::new(relays))
                    }
                    Err(e) => {
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
                let _ = tokio::time::timeout(every, woken.notified()).await;
            }
        });
        Watcher {
            current,
            stop,
            wake,
        }
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

    /// Stop reading (the task ends after its current read, at most a few seconds on; the API may
    /// still hold this watcher, and then answers from its last read).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}
