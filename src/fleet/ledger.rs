//! The usage ledger: versioned migrations, exactly-once batches of deltas from the SQLite outbox,
//! the shipper, and the bill (`usage_bill`). See the [module above](super) for the scheme.
//!
//! May use: usage, tokio-postgres.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_postgres::Client;

use super::{blocking, connect, runtime, Config, Error, Pool, Task, MAX_BACKOFF};
use crate::usage::{Delta, IdentityUsage, Outbox};

/// The ledger's schema, one step per version (1-based), each applied in one transaction.
pub const MIGRATIONS: &[&str] = &["
CREATE TABLE usage_deltas (
    relay_id          text   NOT NULL,
    run               text   NOT NULL,
    allocation        bigint NOT NULL,
    seq               bigint NOT NULL,
    identity          text   NOT NULL,
    transport         text   NOT NULL,
    client            text,
    server            text,
    relayed           text,
    period_start_ms   bigint NOT NULL,
    period_end_ms     bigint NOT NULL,
    end_reason        text,
    to_peer_bytes     bigint NOT NULL CHECK (to_peer_bytes >= 0),
    to_peer_packets   bigint NOT NULL CHECK (to_peer_packets >= 0),
    to_client_bytes   bigint NOT NULL CHECK (to_client_bytes >= 0),
    to_client_packets bigint NOT NULL CHECK (to_client_packets >= 0),
    shipped_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relay_id, run, allocation, seq)
);
-- Per-identity totals over a period, per relay, and fleet-wide.
CREATE INDEX usage_deltas_identity_end ON usage_deltas (identity, period_end_ms);
CREATE INDEX usage_deltas_relay_end ON usage_deltas (relay_id, period_end_ms);
CREATE INDEX usage_deltas_end ON usage_deltas (period_end_ms);
-- The bill: what each identity relayed in [since_ms, until_ms), on one relay or (NULL) all of them.
CREATE FUNCTION usage_bill(since_ms bigint, until_ms bigint, relay text DEFAULT NULL)
RETURNS TABLE (identity text, allocations bigint, to_peer_bytes bigint, to_peer_packets bigint,
               to_client_bytes bigint, to_client_packets bigint)
LANGUAGE sql STABLE AS $$
    SELECT d.identity,
           COUNT(DISTINCT (d.relay_id, d.run, d.allocation)),
           SUM(d.to_peer_bytes)::bigint, SUM(d.to_peer_packets)::bigint,
           SUM(d.to_client_bytes)::bigint, SUM(d.to_client_packets)::bigint
    FROM usage_deltas d
    WHERE d.period_end_ms >= since_ms AND d.period_end_ms < until_ms
      AND (relay IS NULL OR d.relay_id = relay)
    GROUP BY d.identity ORDER BY d.identity
$$;
"];

/// The key of an advisory lock that serialises migrations across relays starting together.
const MIGRATION_LOCK: i64 = 0x7475_726e_7069_6b65; // "turnpike"

/// Apply the migrations the database lacks; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, Error> {
    let steps = MIGRATIONS
        .iter()
        .enumerate()
        .map(|(i, step)| (i as i32 + 1, *step));
    apply_migrations(client, "schema_migrations", steps).await
}

/// Apply each `(version, sql)` step that `table` does not record yet, one transaction per step under
/// [`MIGRATION_LOCK`]; returns the versions applied now. `table` is one of the crate's own constants.
pub(crate) async fn apply_migrations(
    client: &mut Client,
    table: &str,
    steps: impl Iterator<Item = (i32, &str)>,
) -> Result<Vec<i32>, Error> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                version    integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let (done_sql, record_sql) = (
        format!("SELECT 1 FROM {table} WHERE version = $1"),
        format!("INSERT INTO {table} (version) VALUES ($1)"),
    );
    let mut applied = Vec::new();
    for (version, step) in steps {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        if tx.query_opt(&done_sql, &[&version]).await?.is_none() {
            tx.batch_execute(step).await?;
            tx.execute(&record_sql, &[&version]).await?;
            applied.push(version);
        }
        tx.commit().await?;
    }
    Ok(applied)
}

/// Insert `deltas` in one transaction, `ON CONFLICT DO NOTHING`; returns how many were new. When
/// this returns `Ok`, PostgreSQL has committed them (and only then may the outbox mark them).
pub async fn insert_batch(client: &mut Client, deltas: &[Delta]) -> Result<u64, Error> {
    let col = |f: fn(&Delta) -> String| deltas.iter().map(f).collect::<Vec<_>>();
    let opt = |f: fn(&Delta) -> Option<String>| deltas.iter().map(f).collect::<Vec<_>>();
    let num = |f: fn(&Delta) -> u64| {
        deltas
            .iter()
            .map(|d| f(d).min(i64::MAX as u64) as i64)
            .collect::<Vec<_>>()
    };
    let relay = col(|d| d.relay_id.clone());
    let run = col(|d| d.run_key.clone());
    let allocation = num(|d| d.allocation);
    let seq = num(|d| d.seq);
    let identity = col(|d| d.identity.clone());
    let transport = col(|d| d.transport.clone());
    let client_addr = opt(|d| d.client.clone());
    let server = opt(|d| d.server.clone());
    let relayed = opt(|d| d.relayed.clone());
    let start = num(|d| d.period_start_ms);
    let end = num(|d| d.period_end_ms);
    let reason = opt(|d| d.end_reason.clone());
    let tpb = num(|d| d.to_peer_bytes);
    let tpp = num(|d| d.to_peer_packets);
    let tcb = num(|d| d.to_client_bytes);
    let tcp = num(|d| d.to_client_packets);
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "INSERT INTO usage_deltas (relay_id, run, allocation, seq, identity, transport, client,
                server, relayed, period_start_ms, period_end_ms, end_reason, to_peer_bytes,
                to_peer_packets, to_client_bytes, to_client_packets)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[],
                $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[],
                $12::text[], $13::int8[], $14::int8[], $15::int8[], $16::int8[])
             ON CONFLICT DO NOTHING",
            &[
                &relay,
                &run,
                &allocation,
                &seq,
                &identity,
                &transport,
                &client_addr,
                &server,
                &relayed,
                &start,
                &end,
                &reason,
                &tpb,
                &tpp,
                &tcb,
                &tcp,
            ],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// Ship up to `batch` deltas from `outbox`: insert, COMMIT, then mark them shipped. Returns how many
/// it took (0: caught up).
pub async fn ship_once(
    client: &mut Client,
    outbox: &mut Outbox,
    batch: usize,
) -> Result<usize, Error> {
    let deltas = blocking(|| outbox.unshipped(batch))?;
    if deltas.is_empty() {
        return Ok(0);
    }
    insert_batch(client, &deltas).await?;
    let rowids: Vec<i64> = deltas.iter().map(|d| d.rowid).collect();
    blocking(|| outbox.mark_shipped(&rowids, crate::clock::unix_ms()))?;
    Ok(deltas.len())
}

/// Per-identity totals of the deltas whose interval ends in `[since_ms, until_ms)`, on `relay` or
/// fleet-wide (`usage_bill`).
pub async fn bill(
    client: &Client,
    since_ms: u64,
    until_ms: u64,
    relay: Option<&str>,
) -> Result<Vec<IdentityUsage>, Error> {
    let since = since_ms.min(i64::MAX as u64) as i64;
    let until = until_ms.min(i64::MAX as u64) as i64;
    let rows = client
        .query(
            "SELECT identity, allocations, to_peer_bytes, to_peer_packets, to_client_bytes,
                    to_client_packets
             FROM usage_bill($1, $2, $3)",
            &[&since, &until, &relay],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| IdentityUsage {
            identity: r.get(0),
            allocations: r.get::<_, i64>(1).max(0) as u64,
            to_peer_bytes: r.get::<_, i64>(2).max(0) as u64,
            to_peer_packets: r.get::<_, i64>(3).max(0) as u64,
            to_client_bytes: r.get::<_, i64>(4).max(0) as u64,
            to_client_packets: r.get::<_, i64>(5).max(0) as u64,
        })
        .collect())
}

/// Connect and apply the migrations (`turnpike db migrate`); returns the versions applied now.
pub fn migrate_blocking(config: &Config) -> Result<Vec<i32>, Error> {
    runtime()?.block_on(async {
        let mut client = connect(config).await?;
        super::revocations::migrate_all(&mut client).await
    })
}

/// Connect and run [`bill`] (`turnpike usage` with a ledger).
pub fn bill_blocking(
    config: &Config,
    since_ms: u64,
    until_ms: u64,
    relay: Option<&str>,
) -> Result<Vec<IdentityUsage>, Error> {
    runtime()?.block_on(async {
        let client = connect(config).await?;
        bill(&client, since_ms, until_ms, relay).await
    })
}

/// How long the shipper waits for a pooled connection before it counts the round as failed.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// The shipper: a task on the control-plane runtime, with connections from the process's [`Pool`].
#[derive(Debug)]
pub struct Shipper(Task);

impl Shipper {
    /// Start shipping the outbox of the usage database at `database` through `pool`, on `runtime`
    /// (a multi-thread one: the outbox's SQLite calls run in `block_in_place`). Failures are logged
    /// and retried with backoff; the relay and the usage writer never wait for it.
    pub fn start(runtime: &Handle, pool: Pool, database: PathBuf) -> Shipper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Shipper(Task::spawn(runtime, stop, async move {
            ship_loop(&pool, &database, &flag).await
        }))
    }

    /// Ship what is left (bounded: one more round), then stop. Call it from outside the runtime.
    pub fn stop(self) {
        self.0.stop(|| {});
    }
}

async fn ship_loop(pool: &Pool, database: &std::path::Path, stop: &AtomicBool) {
    let config = pool.config();
    let mut backoff = Duration::from_millis(100);
    let mut outbox: Option<Outbox> = None;
    let mut migrated = !config.migrate;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let result = async {
            if outbox.is_none() {
                outbox = Some(blocking(|| Outbox::open(database))?);
            }
            let mut conn = pool.get(POOL_WAIT).await?;
            let Some(o) = outbox.as_mut() else {
                return Ok(0);
            };
            if !migrated {
                let v = migrate(&mut conn).await?;
                if !v.is_empty() {
                    tracing::info!(versions = ?v, "fleet: applied ledger migrations");
                }
                migrated = true;
            }
            let r = ship_once(&mut conn, o, config.batch).await;
            if r.is_err() {
                conn.discard();
            }
            r
        }
        .await;
        let wait = match result {
            Ok(n) => {
                backoff = Duration::from_millis(100);
                if n == config.batch {
                    Duration::ZERO // more waiting
                } else {
                    if stopping {
                        return;
                    }
                    config.ship_interval
                }
            }
            Err(e) => {
                tracing::warn!("usage shipper: {e}; retrying in {backoff:?}");
                if stopping {
                    return;
                }
                let w = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                w
            }
        };
        // Sleep in short steps so that a stop is seen promptly.
        let mut left = wait;
        while !left.is_zero() && !stop.load(Ordering::Relaxed) {
            let step = left.min(Duration::from_millis(100));
            tokio::time::sleep(step).await;
            left -= step;
        }
    }
}
