//! The durable record of revocations: per identity its horizon and the `x-ms-date` of the last admin
//! request applied to it, in SQLite. It lives in the usage database when `[usage]` is configured and in a
//! file of its own (`[api] revocations_database`) otherwise, so a revocation always survives a restart.
//!
//! The signed date orders the admin requests for an identity: one older than the last one applied is
//! refused, so a captured old "lift" cannot undo a newer revoke.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

/// A storage error (its message names what failed).
#[derive(Debug)]
pub struct Error(rusqlite::Error);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "revocation store: {}", self.0)
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error(e)
    }
}

// `signed_ms` was added after the first release of this table (then in the usage database): the ALTER
// below adds it to an older file, and its rows count as signed at 0.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS revocations (
    identity   TEXT PRIMARY KEY,
    until      INTEGER NOT NULL,
    revoked_ms INTEGER NOT NULL
);
";

/// What an admin request did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was recorded.
    Recorded,
    /// A request for this identity with a later `x-ms-date` was applied before (its date, Unix ms).
    Stale(u64),
}

/// The revocation store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Open (creating it if needed) the store in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Store, Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(SCHEMA)?;
        let has_signed = conn
            .prepare("SELECT 1 FROM pragma_table_info('revocations') WHERE name = 'signed_ms'")?
            .exists([])?;
        if !has_signed {
            conn.execute_batch(
                "ALTER TABLE revocations ADD COLUMN signed_ms INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        Ok(Store { conn })
    }

    /// Apply a revoke (`until` > 0, Unix seconds) or a lift (`until == 0`) of `identity` signed at
    /// `signed_ms`, unless a later-signed one was applied before. A lift keeps the row (with horizon 0)
    /// so that its date still orders the next request.
    pub fn apply(
        &self,
        identity: &str,
        until: u64,
        signed_ms: u64,
        now_ms: u64,
    ) -> Result<Applied, Error> {
        let last: Option<i64> = self
            .conn
            .query_row(
                "SELECT signed_ms FROM revocations WHERE identity = ?1",
                params![identity],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(last) = last.map(|l| l.max(0) as u64) {
            if signed_ms < last {
                return Ok(Applied::Stale(last));
            }
        }
        self.conn.execute(
            "INSERT INTO revocations (identity, until, revoked_ms, signed_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (identity) DO UPDATE SET until = excluded.until,
                revoked_ms = excluded.revoked_ms, signed_ms = excluded.signed_ms",
            params![
                identity,
                until.min(i64::MAX as u64) as i64,
                now_ms.min(i64::MAX as u64) as i64,
                signed_ms.min(i64::MAX as u64) as i64
            ],
        )?;
        Ok(Applied::Recorded)
    }

    /// Revocations whose horizon has not passed at `unix_now`: (identity, horizon in Unix seconds).
    pub fn active(&self, unix_now: u64) -> Result<Vec<(String, u64)>, Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT identity, until FROM revocations WHERE until >= ?1 AND until > 0",
        )?;
        let rows = stmt.query_map(params![unix_now.min(i64::MAX as u64) as i64], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?.max(0) as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn revocations_persist_are_ordered_by_signed_date_and_lifts_keep_the_order() {
        let path =
            std::env::temp_dir().join(format!("turnpike-revstore-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.apply("carol", 2_000, 10_000, 1).unwrap(),
            Applied::Recorded
        );
        assert_eq!(s.apply("dave", 900, 10_000, 1).unwrap(), Applied::Recorded);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.active(1_000).unwrap(), [("carol".to_string(), 2_000)]);
        // An older lift is refused; the revoke stands.
        assert_eq!(
            s.apply("carol", 0, 9_000, 2).unwrap(),
            Applied::Stale(10_000)
        );
        assert_eq!(s.active(1_000).unwrap().len(), 1);
        // A newer lift applies, and then an older revoke is refused too.
        assert_eq!(s.apply("carol", 0, 11_000, 3).unwrap(), Applied::Recorded);
        assert!(s.active(0).unwrap().iter().all(|(i, _)| i != "carol"));
        assert_eq!(
            s.apply("carol", 5_000, 10_500, 4).unwrap(),
            Applied::Stale(11_000)
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_table_from_the_usage_database_gains_the_signed_date() {
        let path =
            std::env::temp_dir().join(format!("turnpike-revstore-old-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO revocations (identity, until, revoked_ms) VALUES ('eve', 5000, 1)",
            [],
        )
        .unwrap();
        drop(conn);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.active(0).unwrap(), [("eve".to_string(), 5_000)]);
        assert_eq!(s.apply("eve", 0, 1, 2).unwrap(), Applied::Recorded);
        let _ = std::fs::remove_file(&path);
    }
}
