//! The fleet on PostgreSQL: the connection settings and driver ([`connect`], [`Pool`]) shared by
//! the usage ledger ([`ledger`]) and the fleet's other state.
//!
//! The ledger: each relay's SQLite database is a durable outbox ([`usage::Outbox`]): every checkpoint adds one
//! *delta* per allocation (what it relayed since the previous checkpoint), keyed fleet-wide by
//! (relay id, run, allocation, seq). The [`Shipper`] copies unshipped deltas to PostgreSQL in
//! batches, one transaction each, with `ON CONFLICT DO NOTHING`, and marks them shipped locally only
//! after the COMMIT. A crash or a lost acknowledgement between the two ships a batch again, and the
//! key drops the copies: nothing is lost or counted twice. The relay never waits for PostgreSQL.
//!
//! Everything here runs on the one control-plane tokio runtime of the process
//! (`api::control_plane_runtime`, the one the HTTP API runs on), never on the data plane: the shipper,
//! the registry's heartbeat and reader ([`registry`]) and the revocation listener ([`revocations`])
//! are tasks there, and they, `GET /usage` and `POST /admin/revoke` share one bounded [`Pool`] of
//! connections per process (the listener's `LISTEN` session holds a dedicated connection with the
//! pool's settings, [`Pool::dedicated`]). One-off commands (`turnpike db migrate`, `turnpike usage`)
//! use a small [`runtime`] of their own.
//!
//! Schema changes are [`MIGRATIONS`], applied in order at start (or by `turnpike db migrate`) and
//! recorded in `schema_migrations`. A bill for `[since, until)` sums the deltas whose interval *ends*
//! in it (`usage_bill`), so each byte lands in exactly one period, at the resolution of one
//! checkpoint interval.
//!
//! May use: usage, tokio-postgres.

pub mod ledger;
pub mod pool;

pub use ledger::{
    bill, bill_blocking, insert_batch, migrate, migrate_blocking, ship_once, Shipper, MIGRATIONS,
};
pub use pool::{Conn, Pool};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::usage;

pub mod registry;
pub mod revocations;

/// A fleet task on the control-plane runtime with its stop flag (the shipper, the revocation
/// listener, the heartbeat): the task reads the flag; [`Task::stop`] sets it and waits for the task to
/// end. Called from outside the runtime.
#[derive(Debug)]
pub struct Task {
    stop: Arc<std::sync::atomic::AtomicBool>,
    runtime: tokio::runtime::Handle,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Task {
    /// Spawn `future` on `runtime`; it stops when `stop` is set.
    pub fn spawn(
        runtime: &tokio::runtime::Handle,
        stop: Arc<std::sync::atomic::AtomicBool>,
        future: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Task {
        Task {
            stop,
            runtime: runtime.clone(),
            task: Some(runtime.spawn(future)),
        }
    }

    /// Set the stop flag, run `wake` (to cut a wait short), and wait for the task to end.
    pub fn stop(mut self, wake: impl FnOnce()) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        wake();
        if let Some(t) = self.task.take() {
            let _ = self.runtime.block_on(t);
        }
    }
}

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
    /// Connections to the database at most ([`Pool`]).
    pub pool_size: usize,
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
            // The driver's own words are often generic ("error performing TLS handshake"): add
            // the cause (rustls's reason, the server's message).
            Error::Pg(e) => match std::error::Error::source(e) {
                Some(cause) => write!(f, "postgresql: {e}: {cause}"),
                None => write!(f, "postgresql: {e}"),
            },
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

/// The longest wait between two attempts to reach PostgreSQL after failures (the shipper, the
/// heartbeat and the revocation listener back off up to it): a backlog ships, and a relay is listed
/// and caught up again, within this of the database's return.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Run a short blocking call (an SQLite write, a question to the control thread) from a task: in
/// `block_in_place` on a multi-thread runtime (the control plane's), so that the runtime's other
/// tasks move to another thread meanwhile; inline on a current-thread one (the CLI's, the tests').
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A small runtime for one-off work from a plain thread (`turnpike db migrate`, `turnpike usage`).
pub fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::Io(format!("tokio runtime: {e}")))
}
