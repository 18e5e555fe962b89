//! A bounded pool of PostgreSQL connections on the control-plane runtime.
//!
//! At most `size` connections exist at once: a semaphore permit goes with each checked-out
//! connection, and a caller waits for one at most [`Pool::get`]'s timeout. Idle connections are
//! kept for reuse; a closed one (the server restarted, the network cut it) is dropped when it comes
//! back or is found idle, and the next `get` connects afresh. Nothing here is on the relay's data
//! path: the shipper, the registry's heartbeat and reader, the API's `/usage` and revocations use it;
//! the revocation listener's `LISTEN` session takes a [`Pool::dedicated`] connection beside it.
//!
//! Why not deadpool or bb8: this is all the pooling the fleet needs (bounded, reconnecting, no
//! background tasks), in one small file over the tokio-postgres client we already use.
//!
//! May use: tokio-postgres.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::Client;

use super::{connect, connect_notifying, Config, Error};

/// A bounded set of connections to the database of one [`Config`]. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Client>>,
}

/// A connection checked out of a [`Pool`]; it goes back when dropped (unless it has closed).
#[derive(Debug)]
pub struct Conn {
    client: Option<Client>,
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    /// A pool of at most `config.pool_size` connections (at least one). Connects lazily.
    pub fn new(config: Config) -> Pool {
        let size = config.pool_size.max(1);
        Pool {
            inner: Arc::new(Inner {
                config,
                permits: Arc::new(Semaphore::new(size)),
                idle: Mutex::new(Vec::with_capacity(size)),
            }),
        }
    }

    /// The settings it connects with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// A connection: an idle open one, or a new one. Waits for a free slot at most `wait`.
    pub async fn get(&self, wait: Duration) -> Result<Conn, Error> {
        let permit = tokio::time::timeout(wait, self.inner.permits.clone().acquire_owned())
            .await
            .map_err(|_| Error::Io(format!("postgresql pool: no free connection in {wait:?}")))?
            .map_err(|_| Error::Io("postgresql pool: closed".into()))?;
        let reused = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(c) => c,
            None => connect(&self.inner.config).await?,
        };
        Ok(Conn {
            client: Some(client),
            inner: self.inner.clone(),
            _permit: permit,
        })
    }

    /// A connection of its own with the pool's settings, outside its bound, handing every NOTIFY
    /// payload to `notifications` ([`connect_notifying`]): for a session that holds its connection for
    /// the process's life (the revocation listener's `LISTEN`), which would otherwise take a slot
    /// from the shipper and the API for good.
    pub async fn dedicated(
        &self,
        notifications: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<Client, Error> {
        connect_notifying(&self.inner.config, Some(notifications)).await
    }

    /// Connections open and idle now (for tests and metrics).
    pub fn idle(&self) -> usize {
        self.inner.idle.lock().map_or(0, |i| i.len())
    }
}

impl Conn {
    /// Drop this connection instead of returning it (after an error that may have left it unusable).
    pub fn discard(mut self) {
        self.client = None;
    }
}

impl Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        // Only `Drop` and `discard` (which consumes) take it out.
        #[allow(clippy::expect_used)]
        self.client.as_ref().expect("a checked-out connection")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        #[allow(clippy::expect_used)]
        self.client.as_mut().expect("a checked-out connection")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                if let Ok(mut idle) = self.inner.idle.lock() {
                    idle.push(c);
                }
            }
        }
    }
}
