//! The fleet on PostgreSQL, phase 1: the usage ledger.
//!
//! Each relay's SQLite database is a durable outbox ([`usage::Outbox`]): every checkpoint adds one
//! *delta* per allocation (what it relayed since the previous checkpoint), keyed fleet-wide by
//! (relay id, run, allocation, seq). The [`Shipper`] copies unshipped deltas to PostgreSQL in
//! batches, one transaction each, with `ON CONFLICT DO NOTHING`, and marks them shipped locally only
//! after the COMMIT. A crash or a lost acknowledgement between the two ships a batch again, and the
//! key drops the copies: nothing is lost or counted twice. The relay never waits for PostgreSQL.
//!
//! The shipper runs on a thread of its own with a small current-thread tokio runtime. When the
//! control-plane runtime (the HTTP issue) lands, it can move onto that one.
//!
//! Schema changes are [`MIGRATIONS`], applied in order at start (or by `turnpike db migrate`) and
//! recorded in `schema_migrations`. A bill for `[since, until)` sums the deltas whose interval *ends*
//! in it (`usage_bill`), so each byte lands in exactly one period, at the resolution of one
//! checkpoint interval.
//!
//! May use: usage, tokio-postgres.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::usage::{self, Delta, IdentityUsage, Outbox};

pub mod registry;
pub mod revocations;

/// How the relay talks to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plain TCP or a Unix socket.
    Disable,
    /// rustls, verifying the server against the CA certificates in this PEM file.
    Require {
        /// The CA bundle.
        ca_file: PathBuf,
    },
}

/// Where the password comes from; it is never required inline in the connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password {
    /// None beyond what the connection string says (peer or trust authentication, or inline).
    None,
    /// The first line of this file.
    File(PathBuf),
    /// This environment variable.
    Env(String),
}

/// The ledger's settings (`[fleet]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// A libpq-style connection string (`host=... user=... dbname=...` or `postgresql://...`).
    pub postgres: String,
    /// The password's source.
    pub password: Password,
    /// TLS to the database.
    pub tls: Tls,
    /// How often the shipper looks for new deltas when it has caught up.
    pub ship_interval: Duration,
    /// Deltas per INSERT transaction at most.
    pub batch: usize,
    /// Apply the migrations at start.
    pub migrate: bool,
    /// The relay registry's heartbeat and stale timeout.
    pub registry: registry::Timing,
}

/// A ledger error.
#[derive(Debug)]
pub enum Error {
    /// PostgreSQL said no, or could not be reached.
    Pg(tokio_postgres::Error),
    /// The local outbox.
    Usage(usage::Error),
    /// Reading the password or CA file, or starting the runtime.
    Io(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Pg(e) => write!(f, "postgresql: {e}"),
            Error::Usage(e) => write!(f, "{e}"),
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Pg(e)
    }
}

impl From<usage::Error> for Error {
    fn from(e: usage::Error) -> Self {
        Error::Usage(e)
    }
}

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
pub(crate) const MIGRATION_LOCK: i64 = 0x7475_726e_7069_6b65; // "turnpike"

/// Apply the migrations the database lacks; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let mut applied = Vec::new();
    for (i, step) in MIGRATIONS.iter().enumerate() {
        let version = i as i32 + 1;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(step).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await?;
            applied.push(version);
        }
        tx.commit().await?;
    }
    // The fleet's shared state (revocations, registry) has versions of its own, from 10 up.
    applied.extend(revocations::migrate_state(client).await?);
    Ok(applied)
}

/// Connect to the database `config` names (password and TLS as configured). The connection is
/// driven by a task on the current tokio runtime.
pub async fn connect(config: &Config) -> Result<Client, Error> {
    connect_notifying(config, None).await
}

/// [`connect`], and hand every NOTIFY payload the connection receives (after a `LISTEN`) to
/// `notifications`. The sender is dropped when the connection ends, so the receiver sees the loss.
pub async fn connect_notifying(
    config: &Config,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Result<Client, Error> {
    let mut pg: tokio_postgres::Config = config
        .postgres
        .parse()
        .map_err(|e| Error::Io(format!("fleet.postgres: {e}")))?;
    match &config.password {
        Password::None => {}
        Password::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Io(format!("fleet.password_file {}: {e}", path.display())))?;
            pg.password(text.lines().next().unwrap_or_default());
        }
        Password::Env(var) => {
            let value = std::env::var(var)
                .map_err(|e| Error::Io(format!("fleet.password_env {var}: {e}")))?;
            pg.password(value);
        }
    }
    pg.connect_timeout(Duration::from_secs(5));
    let client = match &config.tls {
        Tls::Disable => {
            let (client, conn) = pg.connect(NoTls).await?;
            tokio::spawn(drive(conn, notifications));
            client
        }
        Tls::Require { ca_file } => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config(ca_file)?);
            let (client, conn) = pg.connect(tls).await?;
            tokio::spawn(drive(conn, notifications));
            client
        }
    };
    Ok(client)
}

/// Drive a connection until it ends, forwarding notifications.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notifications {
                    let _ = tx.send(n.payload().to_string());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!("postgresql connection ended: {e}");
                return;
            }
            None => return,
        }
    }
}

fn rustls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| Error::Io(format!("fleet.ca_file {}: {e}", ca_file.display())))?;
    for cert in certs {
        let cert =
            cert.map_err(|e| Error::Io(format!("fleet.ca_file {}: {e}", ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::Io(format!("fleet.ca_file {}: {e}", ca_file.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Io(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
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
    let deltas = outbox.unshipped(batch)?;
    if deltas.is_empty() {
        return Ok(0);
    }
    insert_batch(client, &deltas).await?;
    let rowids: Vec<i64> = deltas.iter().map(|d| d.rowid).collect();
    outbox.mark_shipped(&rowids, crate::clock::unix_ms())?;
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

/// A small runtime for one-off work from a plain thread (`turnpike db migrate`, `turnpike usage`).
pub fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::Io(format!("tokio runtime: {e}")))
}

/// Connect and apply the migrations (`turnpike db migrate`); returns the versions applied now.
pub fn migrate_blocking(config: &Config) -> Result<Vec<i32>, Error> {
    runtime()?.block_on(async {
        let mut client = connect(config).await?;
        migrate(&mut client).await
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

/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The shipper thread.
#[derive(Debug)]
pub struct Shipper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Shipper {
    /// Start shipping the outbox of the usage database at `database` per `config`. Failures are
    /// logged and retried with backoff; the thread never blocks the relay or the usage writer.
    pub fn start(config: Config, database: PathBuf) -> std::io::Result<Shipper> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("turnpike-shipper".into())
            .spawn(move || {
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("usage shipper not started: {e}");
                        return;
                    }
                };
                rt.block_on(ship_loop(&config, &database, &flag));
            })?;
        Ok(Shipper {
            stop,
            thread: Some(thread),
        })
    }

    /// Ship what is left (bounded: one more round), then stop.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn ship_loop(config: &Config, database: &std::path::Path, stop: &AtomicBool) {
    let mut backoff = Duration::from_millis(100);
    let mut client: Option<Client> = None;
    let mut outbox: Option<Outbox> = None;
    let mut migrated = !config.migrate;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let result = async {
            if outbox.is_none() {
                outbox = Some(Outbox::open(database)?);
            }
            if client.as_ref().map_or(true, Client::is_closed) {
                client = Some(connect(config).await?);
            }
            let (Some(c), Some(o)) = (client.as_mut(), outbox.as_mut()) else {
                return Ok(0);
            };
            if !migrated {
                let v = migrate(c).await?;
                if !v.is_empty() {
                    tracing::info!(versions = ?v, "fleet: applied ledger migrations");
                }
                migrated = true;
            }
            ship_once(c, o, config.batch).await
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
                client = None;
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
