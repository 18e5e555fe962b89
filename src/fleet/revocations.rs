//! Fleet-wide revocations on PostgreSQL: the durable record of every revoke and lift, and how each
//! relay learns of them.
//!
//! `fleet_revocations` holds per identity its horizon (Unix seconds, 0 for a lift), the `x-ms-date` of
//! the last admin request applied to it (`signed_ms`, which orders requests: an older one is refused,
//! so a captured old "lift" cannot undo a newer revoke anywhere in the fleet) and whether the revoke
//! ended live allocations. [`apply`] writes a row and publishes it with `NOTIFY` in one transaction.
//!
//! Every relay runs a [`Listener`] (a task on the control-plane runtime): it `LISTEN`s, loads the
//! whole table at start and after every reconnect (and every [`POLL`] as the fallback for a lost
//! notification), and hands each change to the relay exactly as a local revocation, while keeping the
//! relay's local SQLite store as the copy it starts from when the database is unreachable (and saying
//! so in `/metrics` meanwhile).
//!
//! May use: usage, tokio-postgres.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::runtime::Handle;
use tokio_postgres::Client;

use super::ledger::apply_migrations;
use super::{blocking, migrate, Error, Pool, Task, MAX_BACKOFF};

/// The NOTIFY channel revocations are published on.
pub const CHANNEL: &str = "turnpike_revocations";

/// How often a relay reloads the whole set even when no notification came (the fallback).
pub const POLL: Duration = Duration::from_secs(5);

/// The fleet's shared-state schema: (version, SQL), recorded in `fleet_state_migrations` (the
/// ledger's versions are in `schema_migrations`). Versions start at 10, so that they can never be
/// mistaken for the ledger's.
const STATE_MIGRATIONS: &[(i32, &str)] = &[
    (
        10,
        "CREATE TABLE fleet_revocations (
            identity   text    PRIMARY KEY,
            until      bigint  NOT NULL CHECK (until >= 0),
            signed_ms  bigint  NOT NULL,
            revoked_ms bigint  NOT NULL,
            terminate  boolean NOT NULL
        );",
    ),
    (11, super::registry::SCHEMA),
];

/// Apply every migration the database lacks, the ledger's ([`migrate`]) and the shared state's;
/// returns the versions applied now.
pub async fn migrate_all(client: &mut Client) -> Result<Vec<i32>, Error> {
    let mut applied = migrate(client).await?;
    applied.extend(migrate_state(client).await?);
    Ok(applied)
}

/// Apply the shared-state migrations the database lacks.
async fn migrate_state(client: &mut Client) -> Result<Vec<i32>, Error> {
    let steps = STATE_MIGRATIONS.iter().copied();
    apply_migrations(client, "fleet_state_migrations", steps).await
}

/// One identity's revocation state, as stored and as notified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The identity (the user id of its REST credentials).
    pub identity: String,
    /// The horizon in Unix seconds; 0 is a lift.
    pub until: u64,
    /// The admin request's `x-ms-date`, Unix ms.
    pub signed_ms: u64,
    /// When it was applied, Unix ms.
    pub revoked_ms: u64,
    /// Whether the identity's live allocations end.
    pub terminate: bool,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was recorded and published.
    Recorded,
    /// A request for this identity with a later `x-ms-date` was applied before (its date, Unix ms).
    Stale(u64),
}

fn to_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Record `r` unless a later-signed request for the identity was applied before, and publish it to
/// every listening relay (the NOTIFY is delivered at COMMIT, so only recorded rows are published).
pub async fn apply(client: &mut Client, r: &Revocation) -> Result<Applied, Error> {
    let tx = client.transaction().await?;
    // The upsert takes the row lock, so that two API replicas applying at once are ordered.
    let recorded = tx
        .query_opt(
            "INSERT INTO fleet_revocations (identity, until, signed_ms, revoked_ms, terminate)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (identity) DO UPDATE SET until = excluded.until,
                signed_ms = excluded.signed_ms, revoked_ms = excluded.revoked_ms,
                terminate = excluded.terminate
             WHERE fleet_revocations.signed_ms <= excluded.signed_ms
             RETURNING 1",
            &[
                &r.identity,
                &to_i64(r.until),
                &to_i64(r.signed_ms),
                &to_i64(r.revoked_ms),
                &r.terminate,
            ],
        )
        .await?
        .is_some();
    if !recorded {
        let last: i64 = tx
            .query_one(
                "SELECT signed_ms FROM fleet_revocations WHERE identity = $1",
                &[&r.identity],
            )
            .await?
            .get(0);
        tx.rollback().await?;
        return Ok(Applied::Stale(last.max(0) as u64));
    }
    let payload = json!({
        "id": r.identity,
        "until": r.until,
        "signed_ms": r.signed_ms,
        "revoked_ms": r.revoked_ms,
        "terminate": r.terminate,
    })
    .to_string();
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    tx.commit().await?;
    Ok(Applied::Recorded)
}

/// Every row of the table (lifts included, so that a relay that missed a lift catches up on it too).
pub async fn load(client: &Client) -> Result<Vec<Revocation>, Error> {
    let rows = client
        .query(
            "SELECT identity, until, signed_ms, revoked_ms, terminate FROM fleet_revocations",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Revocation {
            identity: r.get(0),
            until: r.get::<_, i64>(1).max(0) as u64,
            signed_ms: r.get::<_, i64>(2).max(0) as u64,
            revoked_ms: r.get::<_, i64>(3).max(0) as u64,
            terminate: r.get(4),
        })
        .collect())
}

fn parse_notification(payload: &str) -> Option<Revocation> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    Some(Revocation {
        identity: v.get("id")?.as_str()?.to_string(),
        until: v.get("until")?.as_u64()?,
        signed_ms: v.get("signed_ms")?.as_u64()?,
        revoked_ms: v.get("revoked_ms")?.as_u64()?,
        terminate: v.get("terminate")?.as_bool()?,
    })
}

/// Hands a revocation to the relay (refuse the credentials; end live allocations with `terminate`) and
/// to its local copy. Called from the listener's task through [`blocking`] (it writes SQLite).
pub type Apply = Box<dyn FnMut(&Revocation) + Send>;

/// The relay's listener: a task on the control-plane runtime, on a dedicated connection with the
/// pool's settings ([`Pool::dedicated`]: `LISTEN` holds its session).
#[derive(Debug)]
pub struct Listener(Task);

impl Listener {
    /// Start listening on `runtime` with `pool`'s settings; `apply` gets every row at each (re)load and
    /// every change notified in between, each identity's state once per change. `reached` says
    /// whether the start-up catch-up reached the database (and applied the migrations); if not, it has
    /// said so, and the first failure here is not logged again. `local_copy` is set while the relay
    /// serves from the revocations it last saw (PostgreSQL unreachable: the `/metrics` gauge), and
    /// cleared once it has caught up.
    pub fn start(
        runtime: &Handle,
        pool: Pool,
        apply: Apply,
        reached: bool,
        local_copy: Arc<AtomicBool>,
    ) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        local_copy.store(!reached, Ordering::Relaxed);
        Listener(Task::spawn(runtime, stop, async move {
            listen_loop(&pool, apply, reached, &local_copy, &flag).await;
        }))
    }

    /// Stop listening (within one step of its loop, 200 ms). Call it from outside the runtime.
    pub fn stop(self) {
        self.0.stop(|| {});
    }
}

/// What the relay has applied: identity → (horizon, signed date). Only changes are handed on.
type Seen = HashMap<String, (u64, u64)>;

fn hand_on(seen: &mut Seen, apply: &mut Apply, r: &Revocation) {
    let state = (r.until, r.signed_ms);
    match seen.get(&r.identity) {
        // Older than what was applied (a reordered notification), or the same.
        Some(&(until, signed)) if signed > r.signed_ms || (until, signed) == state => {}
        _ => {
            seen.insert(r.identity.clone(), state);
            blocking(|| apply(r));
        }
    }
}

/// How long connecting, migrating and loading may take before the session counts as failed.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

async fn listen_loop(
    pool: &Pool,
    mut apply: Apply,
    reached: bool,
    local_copy: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut seen = Seen::new();
    let mut migrated = reached || !pool.config().migrate;
    let mut backoff = Duration::from_millis(100);
    let mut down_logged = !reached;
    while !stop.load(Ordering::Relaxed) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let session = async {
            let client = tokio::time::timeout(CONNECT_WAIT, async {
                let mut client = pool.dedicated(tx).await?;
                if !migrated {
                    migrate_all(&mut client).await?;
                    migrated = true;
                }
                client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                // LISTEN first, then load: a change committed in between is both loaded and notified.
                let rows = load(&client).await?;
                Ok::<_, Error>((client, rows))
            })
            .await
            .unwrap_or_else(|_| Err(Error::Io("connecting timed out".into())));
            let (client, rows) = client?;
            for r in rows {
                hand_on(&mut seen, &mut apply, &r);
            }
            local_copy.store(false, Ordering::Relaxed);
            if down_logged {
                tracing::info!("fleet revocations: reconnected to PostgreSQL and caught up");
                down_logged = false;
            }
            backoff = Duration::from_millis(100);
            let mut next_poll = tokio::time::Instant::now() + POLL;
            while !stop.load(Ordering::Relaxed) {
                let step = tokio::time::Instant::now() + Duration::from_millis(200);
                match tokio::time::timeout_at(step.min(next_poll), rx.recv()).await {
                    Ok(Some(payload)) => match parse_notification(&payload) {
                        Some(r) => hand_on(&mut seen, &mut apply, &r),
                        None => tracing::warn!("fleet revocations: unreadable notification"),
                    },
                    Ok(None) => return Err(Error::Io("the connection ended".into())),
                    Err(_) if tokio::time::Instant::now() >= next_poll => {
                        let rows = tokio::time::timeout(CONNECT_WAIT, load(&client))
                            .await
                            .unwrap_or_else(|_| Err(Error::Io("reloading timed out".into())))?;
                        for r in rows {
                            hand_on(&mut seen, &mut apply, &r);
                        }
                        next_poll = tokio::time::Instant::now() + POLL;
                    }
                    Err(_) => {}
                }
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = session {
            local_copy.store(true, Ordering::Relaxed);
            if !down_logged {
                tracing::warn!(
                    "fleet revocations: not listening ({e}); the relay serves with the revocations \
                     it last saw (its local copy), retrying"
                );
                down_logged = true;
            }
            let mut left = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            while !left.is_zero() && !stop.load(Ordering::Relaxed) {
                let step = left.min(Duration::from_millis(100));
                tokio::time::sleep(step).await;
                left -= step;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip_and_only_changes_are_handed_on() {
        let r = Revocation {
            identity: "carol".into(),
            until: 2_000,
            signed_ms: 10_000,
            revoked_ms: 10_001,
            terminate: true,
        };
        let payload = json!({"id": "carol", "until": 2_000, "signed_ms": 10_000,
            "revoked_ms": 10_001, "terminate": true})
        .to_string();
        assert_eq!(parse_notification(&payload), Some(r.clone()));
        assert_eq!(parse_notification("{\"id\": 3}"), None);
        assert_eq!(parse_notification("not json"), None);

        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = got.clone();
        let mut apply: Apply = Box::new(move |r| sink.lock().unwrap().push(r.until));
        let mut seen = Seen::new();
        hand_on(&mut seen, &mut apply, &r);
        hand_on(&mut seen, &mut apply, &r); // the poll reloads it: no second apply
        let older_lift = Revocation {
            until: 0,
            signed_ms: 9_000,
            ..r.clone()
        };
        hand_on(&mut seen, &mut apply, &older_lift); // a reordered older one: ignored
        let lift = Revocation {
            until: 0,
            signed_ms: 11_000,
            ..r
        };
        hand_on(&mut seen, &mut apply, &lift);
        assert_eq!(*got.lock().unwrap(), [2_000, 0]);
    }
}
