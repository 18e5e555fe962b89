//! The relay's configuration file: TOML text → a validated [`RelayConfig`].
//!
//! Every section and key is optional; what is left out takes the default of
//! [`server::Config::default`](crate::server::Config) or of the data plane (see [`DEFAULT_CONFIG`],
//! which documents each key). Unknown keys are errors, so a typo is never silently ignored. Every
//! problem comes back as a [`ConfigError`] that names the key in TOML terms (`relay.port_min`,
//! `peers.allow[2]`, `users[1].password`) and says what is wrong with it.
//!
//! The peer policy is deny-by-default ([`PeerPolicy`]): `peers.allow` opens ranges explicitly, and
//! the relay's own listeners are always service ports that no allocation may relay to
//! (CVE-2020-26262).
//!
//! May use: `wire`, `auth`, `policy`, `server`, `api`, `usage`. No IO besides [`RelayConfig::load`] reading
//! the file.

mod locate;
mod raw;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

#[cfg(doc)]
use crate::policy::PeerPolicy;
use crate::server;
use raw::RawConfig;

/// The embedded loopback demo configuration. `turnpike --print-config` shows it, so each key is
/// explained; it is also the starting point for a real configuration file.
pub const DEFAULT_CONFIG: &str = include_str!("config/default.toml");

/// The relay's whole configuration, validated.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// TURN core settings. Its `peer_policy` already includes the listeners as service ports.
    pub server: server::Config,
    /// UDP listeners: specific addresses with non-zero ports, no duplicates.
    pub listen: Vec<SocketAddr>,
    /// Worker threads, at least 1 (a `0` in the file is resolved to the available cores).
    pub workers: usize,
    /// Packet I/O backend.
    pub backend: Backend,
    /// SO_RCVBUF in bytes (default 4 MiB); `None` keeps the kernel default.
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF in bytes (default 4 MiB); `None` keeps the kernel default.
    pub send_buffer: Option<usize>,
    /// One of `"error"`, `"warn"`, `"info"`, `"debug"`, `"trace"`.
    pub log_level: String,
    /// Graceful shutdown drain period.
    pub drain: Duration,
    /// Pin worker k to core k.
    pub pin_workers: bool,
    /// TCP listeners.
    pub listen_tcp: Vec<SocketAddr>,
    /// TLS listeners.
    pub listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain and key files for the TLS listeners (both set whenever `listen_tls` is
    /// not empty).
    pub tls: Option<TlsFiles>,
    /// Limits on TCP/TLS connections.
    pub streams: StreamConfig,
    /// This relay's id in usage records and the token API's fleet.
    pub relay_id: String,
    /// The HTTP API (`[api]`), if enabled.
    pub api: Option<crate::api::Config>,
    /// Metering (`[usage]`), if enabled.
    pub usage: Option<crate::usage::Config>,
}

/// The TLS certificate chain and private key files (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls.cert`.
    pub cert: std::path::PathBuf,
    /// `tls.key`.
    pub key: std::path::PathBuf,
}

/// Limits on TCP/TLS client connections (`[streams]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// Connections open at once over all listeners.
    pub max_connections: usize,
    /// Connections open at once from one source IP.
    pub max_connections_per_ip: usize,
    /// Idle timeout of a connection without an allocation.
    pub idle_timeout: Duration,
    /// TLS handshake timeout.
    pub tls_handshake_timeout: Duration,
    /// Bytes queued per client before peer data is dropped.
    pub write_queue_bytes: usize,
}

/// Which packet I/O backend the data plane uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// io_uring when the kernel offers it, else epoll.
    #[default]
    Auto,
    /// io_uring only; start-up fails without it.
    IoUring,
    /// epoll with recvmmsg/sendmmsg.
    Epoll,
}

/// A configuration problem, naming the key and what is wrong, e.g.
/// `relay.port_min: must be ≤ relay.port_max (got 60000 > 50000)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key in TOML terms (`relay.port_min`, `peers.allow[2]`), or `config` for the file as a
    /// whole (unreadable, or not TOML).
    pub key: String,
    /// What is wrong, with the offending value where that helps.
    pub problem: String,
}

/// Default SO_RCVBUF / SO_SNDBUF: 4 MiB.
pub(crate) const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// The log levels `log_level` accepts.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// More workers than this is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;

impl RelayConfig {
    /// Parses and validates configuration text.
    pub fn from_toml(text: &str) -> Result<RelayConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| locate::toml_error(text, &e))?;
        raw.validate()
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_toml(&text)
    }

    /// The loopback demo configuration, [`DEFAULT_CONFIG`].
    pub fn embedded_default() -> RelayConfig {
        Self::from_toml(DEFAULT_CONFIG).expect("DEFAULT_CONFIG is valid (see its test)")
    }

    /// Whether every listen address and every relay address is loopback, so that nothing is
    /// reachable from another host. An IPv4-mapped `::ffff:127.x.y.z` counts as loopback.
    pub fn is_loopback_only(&self) -> bool {
        let loopback = |ip: IpAddr| ip.to_canonical().is_loopback();
        !self.listen.is_empty()
            && self.listen.iter().all(|a| loopback(a.ip()))
            && self
                .listen_tcp
                .iter()
                .chain(&self.listen_tls)
                .all(|a| loopback(a.ip()))
            && self.server.relay_ips.iter().all(|&ip| loopback(ip))
    }
}

impl Backend {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests;
