//! Metering: durable per-allocation usage records in SQLite and per-identity summaries. (The same file
//! may hold the API's revocations: `api::revocations`.)
//!
//! Counting happens elsewhere: the workers count bytes and packets per relay socket on the fast path
//! (plain integers in their own route tables, no locks, no allocation), and the control thread folds
//! them into per-allocation [`Record`]s: interim ones at every checkpoint and a final one when the
//! allocation ends. This module only stores them.
//!
//! # No double counting, bounded loss
//! Every record carries the allocation's *cumulative* counters, and there is one row per allocation
//! (keyed by relay id, run and allocation id) that each record replaces, never adds to. A final row is
//! never changed again. If the process dies, the rows of the run it was in stay open at their last
//! checkpoint; the next start closes them at that checkpoint (`end_reason = "lost"`), so what was
//! relayed after the last checkpoint (at most one checkpoint interval) is lost and nothing is counted
//! twice.
//!
//! One process writes a database: [`Store::open`] holds an exclusive lock on a file beside it.
//!
//! May use: metrics, sys (the lock), rusqlite.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::sys::file::{FileLock, LockError};

/// Metering settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The SQLite database file.
    pub database: std::path::PathBuf,
    /// How often live allocations are checkpointed (the most a crash can lose).
    pub checkpoint: Duration,
    /// How long closed rows are kept ([`Store::prune`]).
    pub retention: Duration,
}

/// How often the writer prunes rows older than the retention.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The range a summary covers when the query leaves it open: up to now, and back 31 days from its end.
/// An open range must not mean "scan everything ever recorded".
pub const DEFAULT_SPAN: Duration = Duration::from_secs(31 * 86_400);

/// A summary's `[since, until)` in Unix milliseconds, from optional bounds: `until` defaults to now,
/// `since` to [`DEFAULT_SPAN`] before `until`.
pub fn summary_range(since_ms: Option<u64>, until_ms: Option<u64>, now_ms: u64) -> (u64, u64) {
    let until = until_ms.unwrap_or(now_ms);
    let span = DEFAULT_SPAN.as_millis() as u64;
    (since_ms.unwrap_or(until.saturating_sub(span)), until)
}

/// Which rows [`Store::prune`] may delete, given the cut-off `?1` (Unix ms): closed, and closed
/// before the cut-off. Open rows are never pruned, whatever their age.
///
/// Hook for the fleet ledger: rows not yet shipped to PostgreSQL must never be pruned either; the
/// shipper adds its condition here (e.g. `AND shipped_ms IS NOT NULL`).
///
/// The ledger's condition: an allocation row goes only when none of its deltas waits to ship (a
/// delta is deleted by [`Store::prune`] only once shipped, see `DELTA_PRUNABLE`).
const PRUNABLE: &str = "ended_ms IS NOT NULL AND ended_ms < ?1 AND NOT EXISTS (
    SELECT 1 FROM deltas d WHERE d.relay_id = allocations.relay_id
        AND d.run_id = allocations.run_id AND d.allocation = allocations.allocation
        AND d.shipped_ms IS NULL)";

/// Which deltas [`Store::prune`] may delete: shipped, and ending before the cut-off `?1`. A delta
/// that has not shipped is never pruned, whatever its age.
const DELTA_PRUNABLE: &str = "shipped_ms IS NOT NULL AND period_end_ms < ?1";

/// Rows deleted per statement, so that a large prune never holds the write lock for long.
const PRUNE_BATCH: usize = 10_000;

/// One allocation's usage, cumulative since it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The allocation id (unique within a run).
    pub allocation: u64,
    /// Who it is billed to.
    pub identity: String,
    /// `"udp"` (and later `"tcp"`, `"tls"`).
    pub transport: &'static str,
    /// The client's address.
    pub client: Option<SocketAddr>,
    /// The relay's listener address the client talks to.
    pub server: Option<SocketAddr>,
    /// Start (Unix milliseconds).
    pub started_ms: u64,
    /// When taken; the end of a final record (Unix milliseconds).
    pub at_ms: u64,
    /// The final record of the allocation.
    pub done: bool,
    /// The relayed transport address.
    pub relayed: Option<SocketAddr>,
    /// Why it ended (`"ended"`, `"revoked"`): stored with a final record only.
    pub end_reason: &'static str,
    /// Payload bytes client → peer.
    pub to_peer_bytes: u64,
    /// Datagrams client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes peer → client.
    pub to_client_bytes: u64,
    /// Datagrams peer → client.
    pub to_client_packets: u64,
}

/// One identity's usage over a time range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IdentityUsage {
    /// The identity.
    pub identity: String,
    /// Allocations counted.
    pub allocations: u64,
    /// Payload bytes client → peer.
    pub to_peer_bytes: u64,
    /// Datagrams client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes peer → client.
    pub to_client_bytes: u64,
    /// Datagrams peer → client.
    pub to_client_packets: u64,
}

/// A metering database error.
#[derive(Debug)]
pub enum Error {
    /// SQLite said no.
    Db(rusqlite::Error),
    /// Another process writes this database: its lock file is held (by this pid, when known).
    InUse {
        /// The lock file ([`lock_path`]).
        lock: PathBuf,
        /// The holder's pid, as it wrote it there.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    Lock(PathBuf, std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Db(e) => write!(f, "usage database: {e}"),
            Error::InUse { lock, pid } => {
                write!(f, "usage database in use by another turnpike")?;
                if let Some(pid) = pid {
                    write!(f, " (pid {pid})")?;
                }
                write!(
                    f,
                    ": {} is locked; one relay writes one database (give each its own [usage] database)",
                    lock.display()
                )
            }
            Error::Lock(lock, e) => write!(f, "usage database lock {}: {e}", lock.display()),
        }
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Db(e)
    }
}

/// The lock file next to the database (`usage.db` → `usage.db.lock`) that its one writer holds with
/// an exclusive `flock`. SQLite's own locks on the database file are left alone: an fcntl lock on it
/// would break them, and EXCLUSIVE mode would lock out the readers (API, `turnpike usage`).
pub fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    relay_id   TEXT NOT NULL,
    started_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS allocations (
    relay_id          TEXT NOT NULL,
    run_id            INTEGER NOT NULL,
    allocation        INTEGER NOT NULL,
    identity          TEXT NOT NULL,
    transport         TEXT NOT NULL,
    client            TEXT,
    server            TEXT,
    started_ms        INTEGER NOT NULL,
    checkpoint_ms     INTEGER NOT NULL,
    ended_ms          INTEGER,
    end_reason        TEXT,
    to_peer_bytes     INTEGER NOT NULL,
    to_peer_packets   INTEGER NOT NULL,
    to_client_bytes   INTEGER NOT NULL,
    to_client_packets INTEGER NOT NULL,
    PRIMARY KEY (relay_id, run_id, allocation)
);
CREATE INDEX IF NOT EXISTS allocations_by_time ON allocations (started_ms);
CREATE INDEX IF NOT EXISTS allocations_by_end ON allocations (ended_ms);
";

/// Local schema steps after [`SCHEMA`], applied in order and counted in `PRAGMA user_version`.
///
/// 1: the outbox of deltas for the fleet ledger. Each checkpoint of an allocation adds one row with
/// what was relayed since the previous one (`seq` counts them per allocation, from 0); the shipper
/// ([`Outbox`]) copies them to PostgreSQL and sets `shipped_ms` after the COMMIT. `runs.run_key` names
/// a run fleet-wide (start time and a random part), since `run_id` restarts with a new file.
const LOCAL_MIGRATIONS: &[&str] = &["
ALTER TABLE runs ADD COLUMN run_key TEXT;
ALTER TABLE allocations ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE allocations ADD COLUMN relayed TEXT;
CREATE TABLE deltas (
    outbox_id         INTEGER PRIMARY KEY,
    relay_id          TEXT NOT NULL,
    run_id            INTEGER NOT NULL,
    allocation        INTEGER NOT NULL,
    seq               INTEGER NOT NULL,
    run_key           TEXT NOT NULL,
    identity          TEXT NOT NULL,
    transport         TEXT NOT NULL,
    client            TEXT,
    server            TEXT,
    relayed           TEXT,
    period_start_ms   INTEGER NOT NULL,
    period_end_ms     INTEGER NOT NULL,
    end_reason        TEXT,
    to_peer_bytes     INTEGER NOT NULL,
    to_peer_packets   INTEGER NOT NULL,
    to_client_bytes   INTEGER NOT NULL,
    to_client_packets INTEGER NOT NULL,
    shipped_ms        INTEGER,
    UNIQUE (relay_id, run_id, allocation, seq)
);
CREATE INDEX deltas_unshipped ON deltas (outbox_id) WHERE shipped_ms IS NULL;
CREATE INDEX deltas_by_end ON deltas (period_end_ms);
"];

fn migrate_local(conn: &Connection) -> Result<(), Error> {
    conn.execute_batch(SCHEMA)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, step) in LOCAL_MIGRATIONS.iter().enumerate() {
        let to = i as i64 + 1;
        if version < to {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()?;
        }
    }
    Ok(())
}

/// One delta of the outbox: what one allocation relayed in `[period_start_ms, period_end_ms]`,
/// keyed fleet-wide by (relay id, run key, allocation, seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The outbox row (local only; [`Outbox::mark_shipped`] takes it).
    pub rowid: i64,
    /// The relay.
    pub relay_id: String,
    /// The run, fleet-wide.
    pub run_key: String,
    /// The allocation (unique within a run).
    pub allocation: u64,
    /// Its deltas' sequence number, from 0.
    pub seq: u64,
    /// Who it is billed to.
    pub identity: String,
    /// `"udp"`, `"tcp"` or `"tls"`.
    pub transport: String,
    /// The client's address.
    pub client: Option<String>,
    /// The relay's listener address the client talks to.
    pub server: Option<String>,
    /// The relayed transport address.
    pub relayed: Option<String>,
    /// Start of the interval (Unix ms).
    pub period_start_ms: u64,
    /// End of the interval (Unix ms).
    pub period_end_ms: u64,
    /// Set on the final delta: `"ended"`, or `"lost"` when the run died.
    pub end_reason: Option<String>,
    /// Payload bytes client → peer in the interval.
    pub to_peer_bytes: u64,
    /// Datagrams client → peer in the interval.
    pub to_peer_packets: u64,
    /// Payload bytes peer → client in the interval.
    pub to_client_bytes: u64,
    /// Datagrams peer → client in the interval.
    pub to_client_packets: u64,
}

/// The shipper's side of the outbox: a connection of its own (WAL: it never blocks the writer for
/// long), reading unshipped deltas and marking them shipped after PostgreSQL committed them.
#[derive(Debug)]
pub struct Outbox {
    conn: Connection,
}

impl Outbox {
    /// Open the outbox in the database at `path` (the writer, [`Store::open`], creates it).
    pub fn open(path: &Path) -> Result<Outbox, Error> {
        let conn = Store::connect(path)?;
        migrate_local(&conn)?;
        Ok(Outbox { conn })
    }

    /// Up to `limit` unshipped deltas, oldest first.
    pub fn unshipped(&self, limit: usize) -> Result<Vec<Delta>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rowid, relay_id, run_key, allocation, seq, identity, transport, client, server,
                    relayed, period_start_ms, period_end_ms, end_reason, to_peer_bytes,
                    to_peer_packets, to_client_bytes, to_client_packets
             FROM deltas WHERE shipped_ms IS NULL ORDER BY rowid LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit.min(i64::MAX as usize) as i64], |r| {
            Ok(Delta {
                rowid: r.get(0)?,
                relay_id: r.get(1)?,
                run_key: r.get(2)?,
                allocation: r.get::<_, i64>(3)? as u64,
                seq: r.get::<_, i64>(4)? as u64,
                identity: r.get(5)?,
                transport: r.get(6)?,
                client: r.get(7)?,
                server: r.get(8)?,
                relayed: r.get(9)?,
                period_start_ms: r.get::<_, i64>(10)? as u64,
                period_end_ms: r.get::<_, i64>(11)? as u64,
                end_reason: r.get(12)?,
                to_peer_bytes: r.get::<_, i64>(13)? as u64,
                to_peer_packets: r.get::<_, i64>(14)? as u64,
                to_client_bytes: r.get::<_, i64>(15)? as u64,
                to_client_packets: r.get::<_, i64>(16)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Mark these outbox rows shipped at `now_ms`, in one transaction. Call only after PostgreSQL
    /// committed them: a crash between the two re-ships them, and the ledger's key drops the copies.
    pub fn mark_shipped(&mut self, rowids: &[i64], now_ms: u64) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("UPDATE deltas SET shipped_ms = ?2 WHERE rowid = ?1")?;
            for id in rowids {
                stmt.execute(params![id, now_ms.min(i64::MAX as u64) as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// How many deltas wait to ship.
    pub fn backlog(&self) -> Result<u64, Error> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM deltas WHERE shipped_ms IS NULL",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }
}

/// A connection to the usage database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    relay_id: String,
    run_id: i64,
    /// This run's name fleet-wide (see `LOCAL_MIGRATIONS`).
    run_key: String,
    /// Whether checkpoints also add deltas to the outbox (a ledger is configured).
    outbox: bool,
    /// The writer's lock ([`lock_path`]); `None` for readers.
    _lock: Option<FileLock>,
}

impl Store {
    /// Open (creating it if needed) the database at `path` for the relay `relay_id`, start a new run,
    /// and close the rows a previous run of this relay left open (it died) at their last checkpoint.
    ///
    /// The writer first takes the lock next to the database ([`lock_path`]), before anything is
    /// written: while another process holds it, this fails with [`Error::InUse`] and the other's open
    /// rows stay open (a second start must not close a live run's rows as lost).
    pub fn open(path: &Path, relay_id: &str, now_ms: u64) -> Result<Store, Error> {
        let lock_file = lock_path(path);
        let lock = FileLock::try_exclusive(&lock_file).map_err(|e| match e {
            LockError::Held(pid) => Error::InUse {
                lock: lock_file.clone(),
                pid,
            },
            LockError::Io(e) => Error::Lock(lock_file.clone(), e),
        })?;
        let conn = Self::connect(path)?;
        migrate_local(&conn)?;
        let run_key = format!("{now_ms}-{:016x}", rand::random::<u64>());
        conn.execute(
            "INSERT INTO runs (relay_id, started_ms, run_key) VALUES (?1, ?2, ?3)",
            params![relay_id, now_ms as i64, run_key],
        )?;
        let run_id = conn.last_insert_rowid();
        // The deltas of a dead run end with an empty one that says so (only for allocations
        // that have deltas: an outbox was on).
        conn.execute(
            "INSERT INTO deltas (relay_id, run_id, allocation, seq, run_key, identity, transport,
                client, server, relayed, period_start_ms, period_end_ms, end_reason,
                to_peer_bytes, to_peer_packets, to_client_bytes, to_client_packets)
             SELECT a.relay_id, a.run_id, a.allocation, a.seq, r.run_key, a.identity, a.transport,
                a.client, a.server, a.relayed, a.checkpoint_ms, a.checkpoint_ms, 'lost', 0, 0, 0, 0
             FROM allocations a JOIN runs r ON r.run_id = a.run_id
             WHERE a.relay_id = ?1 AND a.run_id <> ?2 AND a.ended_ms IS NULL AND a.seq > 0
                AND r.run_key IS NOT NULL",
            params![relay_id, run_id],
        )?;
        let lost = conn.execute(
            "UPDATE allocations SET ended_ms = checkpoint_ms, end_reason = 'lost'
             WHERE relay_id = ?1 AND run_id <> ?2 AND ended_ms IS NULL",
            params![relay_id, run_id],
        )?;
        if lost > 0 {
            tracing::warn!(
                allocations = lost,
                "usage: closed allocations of a previous run at their last checkpoint"
            );
        }
        Ok(Store {
            conn,
            relay_id: relay_id.into(),
            run_id,
            run_key,
            outbox: false,
            _lock: Some(lock),
        })
    }

    /// Open an existing database for queries only (`turnpike usage`, the HTTP API).
    pub fn open_reader(path: &Path) -> Result<Store, Error> {
        let conn = Self::connect(path)?;
        migrate_local(&conn)?;
        Ok(Store {
            conn,
            relay_id: String::new(),
            run_id: 0,
            run_key: String::new(),
            outbox: false,
            _lock: None,
        })
    }

    fn connect(path: &Path) -> Result<Connection, Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL: readers (API, CLI) never block the writer; NORMAL sync is durable at checkpoints of
        // the WAL and loses nothing on a process crash (only on power loss, the last transactions).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(conn)
    }

    /// Also add a delta to the outbox at every checkpoint (a fleet ledger ships them). Without it
    /// nothing would ever ship them, and unshipped deltas are never pruned.
    pub fn enable_outbox(&mut self) {
        self.outbox = true;
    }

    /// Store records in one transaction. Each replaces its allocation's row unless that row is final;
    /// with the outbox on, each also adds the delta since the allocation's previous record (none
    /// when nothing changed, except for the final one).
    pub fn record(&mut self, records: &[Record]) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        {
            let mut prev = tx.prepare_cached(
                "SELECT checkpoint_ms, ended_ms, seq, to_peer_bytes, to_peer_packets,
                    to_client_bytes, to_client_packets
                 FROM allocations WHERE relay_id = ?1 AND run_id = ?2 AND allocation = ?3",
            )?;
            let mut delta = tx.prepare_cached(
                "INSERT INTO deltas (relay_id, run_id, allocation, seq, run_key, identity,
                    transport, client, server, relayed, period_start_ms, period_end_ms,
                    end_reason, to_peer_bytes, to_peer_packets, to_client_bytes,
                    to_client_packets)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                    ?17)",
            )?;
            let mut stmt = tx.prepare_cached(
                "INSERT INTO allocations (relay_id, run_id, allocation, identity, transport, client,
                    server, started_ms, checkpoint_ms, ended_ms, end_reason, to_peer_bytes,
                    to_peer_packets, to_client_bytes, to_client_packets, seq, relayed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                    ?17)
                 ON CONFLICT (relay_id, run_id, allocation) DO UPDATE SET
                    checkpoint_ms = excluded.checkpoint_ms,
                    ended_ms = excluded.ended_ms,
                    end_reason = excluded.end_reason,
                    to_peer_bytes = excluded.to_peer_bytes,
                    to_peer_packets = excluded.to_peer_packets,
                    to_client_bytes = excluded.to_client_bytes,
                    to_client_packets = excluded.to_client_packets,
                    seq = excluded.seq,
                    relayed = COALESCE(allocations.relayed, excluded.relayed)
                 WHERE allocations.ended_ms IS NULL",
            )?;
            for r in records {
                let old = prev
                    .query_row(
                        params![self.relay_id, self.run_id, r.allocation as i64],
                        |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                row.get::<_, Option<i64>>(1)?,
                                row.get::<_, i64>(2)?,
                                [
                                    row.get::<_, i64>(3)?,
                                    row.get::<_, i64>(4)?,
                                    row.get::<_, i64>(5)?,
                                    row.get::<_, i64>(6)?,
                                ],
                            ))
                        },
                    )
                    .optional()?;
                if old.is_some_and(|(_, ended, _, _)| ended.is_some()) {
                    continue; // final already
                }
                let (since, mut seq, before) = match old {
                    Some((at, _, seq, c)) => (at, seq, c.map(|v| v as u64)),
                    None => (r.started_ms as i64, 0, [0; 4]),
                };
                let now = [
                    r.to_peer_bytes,
                    r.to_peer_packets,
                    r.to_client_bytes,
                    r.to_client_packets,
                ];
                let d: Vec<i64> = now
                    .iter()
                    .zip(before)
                    .map(|(n, b)| n.saturating_sub(b).min(i64::MAX as u64) as i64)
                    .collect();
                let client = r.client.map(|a| a.to_string());
                let server = r.server.map(|a| a.to_string());
                let relayed = r.relayed.map(|a| a.to_string());
                if self.outbox && (r.done || d.iter().any(|&v| v != 0)) {
                    delta.execute(params![
                        self.relay_id,
                        self.run_id,
                        r.allocation as i64,
                        seq,
                        self.run_key,
                        r.identity,
                        r.transport,
                        client,
                        server,
                        relayed,
                        since,
                        r.at_ms as i64,
                        r.done.then_some(r.end_reason),
                        d[0],
                        d[1],
                        d[2],
                        d[3],
                    ])?;
                    seq += 1;
                }
                stmt.execute(params![
                    self.relay_id,
                    self.run_id,
                    r.allocation as i64,
                    r.identity,
                    r.transport,
                    client,
                    server,
                    r.started_ms as i64,
                    r.at_ms as i64,
                    r.done.then_some(r.at_ms as i64),
                    r.done.then_some(r.end_reason),
                    r.to_peer_bytes as i64,
                    r.to_peer_packets as i64,
                    r.to_client_bytes as i64,
                    r.to_client_packets as i64,
                    seq,
                    relayed,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Per-identity totals of the allocations that overlap `[since_ms, until_ms)` (each allocation
    /// counted whole), identities in order. Allocations still running count with their last checkpoint.
    pub fn summary(&self, since_ms: u64, until_ms: u64) -> Result<Vec<IdentityUsage>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT identity, COUNT(*), SUM(to_peer_bytes), SUM(to_peer_packets),
                    SUM(to_client_bytes), SUM(to_client_packets)
             FROM allocations
             WHERE started_ms < ?2 AND COALESCE(ended_ms, checkpoint_ms) >= ?1
             GROUP BY identity ORDER BY identity",
        )?;
        let rows = stmt.query_map(
            params![
                since_ms.min(i64::MAX as u64) as i64,
                until_ms.min(i64::MAX as u64) as i64
            ],
            |row| {
                Ok(IdentityUsage {
                    identity: row.get(0)?,
                    allocations: row.get::<_, i64>(1)? as u64,
                    to_peer_bytes: row.get::<_, i64>(2)? as u64,
                    to_peer_packets: row.get::<_, i64>(3)? as u64,
                    to_client_bytes: row.get::<_, i64>(4)? as u64,
                    to_client_packets: row.get::<_, i64>(5)? as u64,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Delete the closed rows that ended more than `retention` before `now_ms` (see `PRUNABLE`), in
    /// batches; returns how many went.
    pub fn prune(&self, now_ms: u64, retention: Duration) -> Result<usize, Error> {
        let cutoff = now_ms.saturating_sub(retention.as_millis().min(u64::MAX as u128) as u64);
        let cutoff = cutoff.min(i64::MAX as u64) as i64;
        let sql = format!(
            "DELETE FROM allocations WHERE rowid IN
                (SELECT rowid FROM allocations WHERE {PRUNABLE} LIMIT {PRUNE_BATCH})"
        );
        let deltas = format!(
            "DELETE FROM deltas WHERE rowid IN
                (SELECT rowid FROM deltas WHERE {DELTA_PRUNABLE} LIMIT {PRUNE_BATCH})"
        );
        let mut total = 0;
        // Shipped deltas first, so that their allocations' rows may go too.
        for sql in [&deltas, &sql] {
            // Bounded: at most 1,000 batches per call; the rest waits for the next one.
            for _ in 0..1000 {
                let n = self.conn.execute(sql, params![cutoff])?;
                total += n;
                if n < PRUNE_BATCH {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// This run's id.
    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// This run's name fleet-wide (the `run` of the ledger's key).
    pub fn run_key(&self) -> &str {
        &self.run_key
    }
}

/// The summary as a text table, one identity per line.
pub fn render_table(rows: &[IdentityUsage]) -> String {
    let mut out = format!(
        "{:<32} {:>11} {:>16} {:>14} {:>16} {:>14}\n",
        "identity",
        "allocations",
        "to_peer_bytes",
        "to_peer_pkts",
        "to_client_bytes",
        "to_client_pkts"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<32} {:>11} {:>16} {:>14} {:>16} {:>14}\n",
            r.identity,
            r.allocations,
            r.to_peer_bytes,
            r.to_peer_packets,
            r.to_client_bytes,
            r.to_client_packets
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(allocation: u64, identity: &str, at_ms: u64, done: bool, bytes: u64) -> Record {
        Record {
            allocation,
            identity: identity.into(),
            transport: "udp",
            client: "127.0.0.1:5000".parse().ok(),
            server: "127.0.0.1:3478".parse().ok(),
            started_ms: 1_000,
            at_ms,
            done,
            relayed: "192.0.2.1:50000".parse().ok(),
            end_reason: "ended",
            to_peer_bytes: bytes,
            to_peer_packets: bytes / 10,
            to_client_bytes: 2 * bytes,
            to_client_packets: bytes / 5,
        }
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("turnpike-usage-{name}-{}.db", std::process::id()));
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", p.display()));
        }
        p
    }

    #[test]
    fn checkpoints_replace_finals_stick_and_a_restart_closes_lost_rows() {
        let path = temp("replace");
        let mut s = Store::open(&path, "r1", 0).unwrap();
        s.record(&[
            rec(1, "carol", 2_000, false, 100),
            rec(2, "dave", 2_000, false, 10),
        ])
        .unwrap();
        s.record(&[rec(1, "carol", 3_000, false, 300)]).unwrap();
        s.record(&[rec(1, "carol", 4_000, true, 500)]).unwrap();
        // A late checkpoint after the final record changes nothing.
        s.record(&[rec(1, "carol", 5_000, false, 900)]).unwrap();
        let sum = s.summary(0, u64::MAX).unwrap();
        assert_eq!(sum.len(), 2);
        assert_eq!(
            (
                sum[0].identity.as_str(),
                sum[0].to_peer_bytes,
                sum[0].allocations
            ),
            ("carol", 500, 1)
        );
        assert_eq!((sum[0].to_client_bytes, sum[0].to_peer_packets), (1000, 50));
        drop(s);

        // Restart: dave's open row is closed at its checkpoint, and new runs start their own rows.
        let mut s = Store::open(&path, "r1", 10_000).unwrap();
        let (ended, reason): (i64, String) = s
            .conn
            .query_row(
                "SELECT ended_ms, end_reason FROM allocations WHERE identity = 'dave'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((ended, reason.as_str()), (2_000, "lost"));
        s.record(&[rec(1, "carol", 11_000, true, 7)]).unwrap();
        let sum = s.summary(0, u64::MAX).unwrap();
        assert_eq!((sum[0].to_peer_bytes, sum[0].allocations), (507, 2));
        // Time ranges: rows overlapping the range count.
        assert!(s.summary(0, 500).unwrap().is_empty());
        assert_eq!(s.summary(4_500, 20_000).unwrap()[0].allocations, 1);
        assert!(render_table(&sum).contains("carol"));
    }

    #[test]
    fn prune_deletes_only_closed_rows_past_the_retention() {
        let path = temp("prune");
        let mut s = Store::open(&path, "r1", 0).unwrap();
        let day = 86_400_000;
        s.record(&[
            rec(1, "old-closed", 10 * day, true, 10),
            rec(2, "old-open", 10 * day, false, 10),
            rec(3, "recent-closed", 95 * day, true, 10),
        ])
        .unwrap();
        let retention = Duration::from_secs(90 * 86_400);
        // At day 100 the cut-off is day 10: a row that ended exactly then stays.
        assert_eq!(s.prune(100 * day, retention).unwrap(), 0);
        assert_eq!(s.prune(100 * day + 1, retention).unwrap(), 1);
        let ids: Vec<_> = s
            .summary(0, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|u| u.identity)
            .collect();
        assert_eq!(ids, ["old-open", "recent-closed"]);
        assert_eq!(
            s.prune(u64::MAX, retention).unwrap(),
            1,
            "open rows never go"
        );
    }

    #[test]
    fn the_outbox_holds_deltas_that_sum_to_the_totals_and_unshipped_ones_are_never_pruned() {
        let path = temp("outbox");
        let mut s = Store::open(&path, "r1", 0).unwrap();
        s.enable_outbox();
        let day = 86_400_000;
        s.record(&[rec(1, "carol", 2_000, false, 100)]).unwrap();
        // Unchanged: no delta, but the next one starts here (nothing was relayed before).
        s.record(&[rec(1, "carol", 3_000, false, 100)]).unwrap();
        s.record(&[rec(1, "carol", 4_000, false, 350)]).unwrap();
        s.record(&[rec(1, "carol", 5_000, true, 400)]).unwrap();
        s.record(&[rec(1, "carol", 6_000, false, 900)]).unwrap(); // after the final: ignored
        s.record(&[rec(2, "dave", 10 * day, false, 10)]).unwrap();
        let mut out = Outbox::open(&path).unwrap();
        let d = out.unshipped(100).unwrap();
        let carol: Vec<_> = d.iter().filter(|d| d.identity == "carol").collect();
        assert_eq!(
            carol
                .iter()
                .map(|d| (d.seq, d.period_start_ms, d.period_end_ms, d.to_peer_bytes))
                .collect::<Vec<_>>(),
            [
                (0, 1_000, 2_000, 100),
                (1, 3_000, 4_000, 250),
                (2, 4_000, 5_000, 50)
            ]
        );
        assert_eq!(carol[2].end_reason.as_deref(), Some("ended"));
        assert_eq!(carol.iter().map(|d| d.to_client_bytes).sum::<u64>(), 800);
        assert!(carol.iter().all(|d| d.run_key == s.run_key()));
        assert_eq!(carol[0].relayed.as_deref(), Some("192.0.2.1:50000"));

        // Nothing shipped: nothing goes, however old.
        let retention = Duration::from_secs(86_400);
        assert_eq!(s.prune(u64::MAX / 2, retention).unwrap(), 0);
        assert_eq!(out.backlog().unwrap(), 4);
        let carol_rows: Vec<i64> = carol.iter().map(|d| d.rowid).collect();
        out.mark_shipped(&carol_rows, 7_000).unwrap();
        assert_eq!(out.unshipped(100).unwrap().len(), 1);
        // Carol's three deltas and her closed row go; dave's unshipped delta and open row stay.
        assert_eq!(s.prune(u64::MAX / 2, retention).unwrap(), 4);
        assert_eq!(out.backlog().unwrap(), 1);
        drop(s);

        // A restart closes dave's allocation with an empty "lost" delta after his last one.
        let _s = Store::open(&path, "r1", 11 * day).unwrap();
        let d = out.unshipped(100).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].seq, d[1].end_reason.as_deref()), (1, Some("lost")));
        assert_eq!((d[1].to_peer_bytes, d[1].period_end_ms), (0, 10 * day));
    }

    #[test]
    fn an_open_summary_range_is_the_last_31_days() {
        let span = DEFAULT_SPAN.as_millis() as u64;
        assert_eq!(summary_range(None, None, 10 * span), (9 * span, 10 * span));
        assert_eq!(
            summary_range(None, Some(span / 2), 10 * span),
            (0, span / 2)
        );
        assert_eq!(summary_range(Some(7), None, 10 * span), (7, 10 * span));
    }
}
