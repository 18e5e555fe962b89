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

use rusqlite::{params, Connection};
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
const PRUNABLE: &str = "ended_ms IS NOT NULL AND ended_ms < ?1";

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

/// A connection to the usage database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    relay_id: String,
    run_id: i64,
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
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "INSERT INTO runs (relay_id, started_ms) VALUES (?1, ?2)",
            params![relay_id, now_ms as i64],
        )?;
        let run_id = conn.last_insert_rowid();
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
            _lock: Some(lock),
        })
    }

    /// Open an existing database for queries only (`turnpike usage`, the HTTP API).
    pub fn open_reader(path: &Path) -> Result<Store, Error> {
        let conn = Self::connect(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn,
            relay_id: String::new(),
            run_id: 0,
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

    /// Store records in one transaction. Each replaces its allocation's row unless that row is final.
    pub fn record(&mut self, records: &[Record]) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO allocations (relay_id, run_id, allocation, identity, transport, client,
                    server, started_ms, checkpoint_ms, ended_ms, end_reason, to_peer_bytes,
                    to_peer_packets, to_client_bytes, to_client_packets)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (relay_id, run_id, allocation) DO UPDATE SET
                    checkpoint_ms = excluded.checkpoint_ms,
                    ended_ms = excluded.ended_ms,
                    end_reason = excluded.end_reason,
                    to_peer_bytes = excluded.to_peer_bytes,
                    to_peer_packets = excluded.to_peer_packets,
                    to_client_bytes = excluded.to_client_bytes,
                    to_client_packets = excluded.to_client_packets
                 WHERE allocations.ended_ms IS NULL",
            )?;
            for r in records {
                stmt.execute(params![
                    self.relay_id,
                    self.run_id,
                    r.allocation as i64,
                    r.identity,
                    r.transport,
                    r.client.map(|a| a.to_string()),
                    r.server.map(|a| a.to_string()),
                    r.started_ms as i64,
                    r.at_ms as i64,
                    r.done.then_some(r.at_ms as i64),
                    r.done.then_some("ended"),
                    r.to_peer_bytes as i64,
                    r.to_peer_packets as i64,
                    r.to_client_bytes as i64,
                    r.to_client_packets as i64,
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
        let mut total = 0;
        // Bounded: at most 1,000 batches per call; the rest waits for the next one.
        for _ in 0..1000 {
            let n = self.conn.execute(&sql, params![cutoff])?;
            total += n;
            if n < PRUNE_BATCH {
                break;
            }
        }
        Ok(total)
    }

    /// This run's id.
    pub fn run_id(&self) -> i64 {
        self.run_id
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
}
