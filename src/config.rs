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
//! The validated [`RelayConfig`] is two parts: [`Fixed`], what takes effect only at start (listeners,
//! workers, backend, relay addresses and ports, timers, metering), and [`Live`], what a running relay
//! can take over (credentials, peer ranges, quotas, log level, TLS files, API keys, fleet and regions).
//!
//! Modules: `raw` (the serde structs, with the defaults), `validate` (raw → validated, every check),
//! `locate` (which key a toml error points at), `default.toml` (the demo, [`DEFAULT_CONFIG`]).
//!
//! May use: `wire`, `auth`, `policy`, `server`, `api`, `usage`, `dataplane` (for [`StreamLimits`]). No IO
//! besides [`RelayConfig::load`] reading the file.

mod locate;
mod raw;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::FleetRelay;
use crate::auth::RestSecrets;
pub use crate::dataplane::stream::StreamLimits;
use crate::policy::{Cidr, PeerPolicy};
use crate::server;
use crate::wire::ChannelRange;
use raw::RawConfig;

/// The embedded loopback demo configuration. `turnpike --print-config` shows it, so each key is
/// explained; it is also the starting point for a real configuration file.
pub const DEFAULT_CONFIG: &str = include_str!("config/default.toml");

/// The relay's whole configuration, validated: what needs a restart to change ([`Fixed`]) and what a
/// running relay can take over ([`Live`]). A reload validates the whole file again, swaps in its
/// `live` part, and reports every difference in `fixed` as left as it was.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Listeners, workers, backend, relay addresses and ports, timers, metering: fixed for the run.
    pub fixed: Fixed,
    /// Credentials, peer policy, quotas, log level, TLS files, API keys and fleet: may change live.
    pub live: Live,
}

/// The settings that only take effect at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixed {
    /// The REALM: it is part of every long-term key, so changing it invalidates every credential.
    pub realm: String,
    /// UDP listeners: specific addresses with non-zero ports, no duplicates.
    pub listen: Vec<SocketAddr>,
    /// TCP listeners.
    pub listen_tcp: Vec<SocketAddr>,
    /// TLS listeners.
    pub listen_tls: Vec<SocketAddr>,
    /// Worker threads, at least 1 (a `0` in the file is resolved to the available cores).
    pub workers: usize,
    /// Packet I/O backend.
    pub backend: Backend,
    /// SO_RCVBUF in bytes (default 4 MiB); `None` keeps the kernel default.
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF in bytes (default 4 MiB); `None` keeps the kernel default.
    pub send_buffer: Option<usize>,
    /// Graceful shutdown drain period (at most [`MAX_DRAIN`]).
    pub drain: Duration,
    /// Pin worker k to core k.
    pub pin_workers: bool,
    /// Addresses relayed transport addresses are allocated on (`relay.addresses`).
    pub relay_ips: Vec<IpAddr>,
    /// Relay port range, inclusive (`relay.port_min` ..= `relay.port_max`).
    pub relay_ports: RangeInclusive<u16>,
    /// 1:1 NAT (`relay.external`): (private, public) pairs. The private IP is one of `relay_ips`, of
    /// the same family; clients are told the public one (XOR-RELAYED-ADDRESS, the token API).
    pub external: Vec<(IpAddr, IpAddr)>,
    /// `[lifetimes]`.
    pub lifetimes: Lifetimes,
    /// Whether Binding requests need credentials.
    pub binding_requires_auth: bool,
    /// Advertise PASSWORD-ALGORITHMS.
    pub password_algorithms: bool,
    /// Where clients are sent (300 Try Alternate) when this relay is full or draining.
    pub alternate_server: Option<SocketAddr>,
    /// Which channel numbers ChannelBind accepts (`legacy_channel_numbers`).
    pub channel_range: ChannelRange,
    /// Limits on TCP/TLS connections (`[streams]`).
    pub streams: StreamLimits,
    /// This relay's id in usage records and the token API's fleet.
    pub relay_id: String,
    /// Where the HTTP API listens, its limits and revocation store, if `[api]` is present.
    pub api: Option<FixedApi>,
    /// Metering (`[usage]`), if enabled.
    pub usage: Option<crate::usage::Config>,
    /// The fleet's usage ledger on PostgreSQL (`[fleet]`), if configured (needs `[usage]`).
    pub fleet: Option<crate::fleet::Config>,
    /// Where the process id is written at start and removed at exit (`pid_file`), if anywhere.
    pub pid_file: Option<PathBuf>,
    /// The kernel fast path (`[xdp]`).
    pub xdp: crate::xdp::XdpSettings,
}

/// Allocation, permission, channel and nonce lifetimes in seconds (`[lifetimes]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// `lifetimes.default`.
    pub default: u32,
    /// `lifetimes.max`.
    pub max: u32,
    /// `lifetimes.permission`.
    pub permission: u32,
    /// `lifetimes.channel`.
    pub channel: u32,
    /// `lifetimes.nonce`.
    pub nonce: u32,
}

/// The settings a running relay can take over without dropping an allocation.
#[derive(Debug, Clone)]
pub struct Live {
    /// Log verbosity.
    pub log_level: tracing::Level,
    /// Static long-term users: (name, password), names unique.
    pub users: Vec<(String, String)>,
    /// TURN REST secrets; the first mints, all verify.
    pub rest_secrets: RestSecrets,
    /// `peers.allow` and `peers.deny`.
    pub peers: PeerLists,
    /// `[quotas]` and `challenge_rate`.
    pub quotas: Quotas,
    /// PEM certificate chain and key files for the TLS listeners (set whenever `listen_tls` is not
    /// empty).
    pub tls: Option<TlsFiles>,
    /// The HTTP API's keys, certificate files, fleet and regions, if `[api]` is present.
    pub api: Option<LiveApi>,
}

/// The operator's peer ranges (`[peers]`); [`RelayConfig::peer_policy`] adds the built-in denials
/// and the relay's own service ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerLists {
    /// `peers.allow`.
    pub allow: Vec<Cidr>,
    /// `peers.deny`, which wins over `allow`.
    pub deny: Vec<Cidr>,
}

/// Quotas and rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// `quotas.max_allocations`.
    pub max_allocations: usize,
    /// `quotas.max_allocations_per_user`.
    pub max_allocations_per_user: usize,
    /// `quotas.max_permissions_per_allocation`.
    pub max_permissions_per_allocation: usize,
    /// `quotas.max_channels_per_allocation`.
    pub max_channels_per_allocation: usize,
    /// `quotas.max_permissions_per_identity`.
    pub max_permissions_per_identity: usize,
    /// `quotas.max_channels_per_identity`.
    pub max_channels_per_identity: usize,
    /// `challenge_rate`: unauthenticated answers per second per source network, /32 or /64 (0 =
    /// unlimited).
    pub challenge_rate: u32,
}

/// The fixed part of `[api]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedApi {
    /// `api.listen`.
    pub listen: SocketAddr,
    /// `api.metrics_listen` (default: none, `/metrics` on `listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// `[api.limits]`.
    pub limits: crate::api::Limits,
    /// Where revocations are kept: `api.revocations_database`, else the usage database.
    pub revocations_db: PathBuf,
}

/// The live part of `[api]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveApi {
    /// `api.access_keys` (mint; every role when `admin_keys` is empty) and `api.admin_keys`.
    pub keys: Vec<crate::api::AccessKey>,
    /// `api.names` (lower case; default: the listen address and the public addresses' hosts).
    pub names: Vec<String>,
    /// `api.trusted_proxies`.
    pub trusted_proxies: Vec<Cidr>,
    /// `api.tls_cert` and `api.tls_key`; plain HTTP without.
    pub tls: Option<TlsFiles>,
    /// This relay's region (`api.region`).
    pub region: String,
    /// The relays handed out: this one first, then `[[api.fleet]]`.
    pub fleet: Vec<FleetRelay>,
    /// `[[api.client_regions]]`: client CIDR → region, first match wins.
    pub client_regions: Vec<(Cidr, String)>,
}

/// A PEM certificate chain and private key file pair (`[tls]`, or the API's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls.cert`.
    pub cert: PathBuf,
    /// `tls.key`.
    pub key: PathBuf,
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

/// The longest `drain_seconds`: an hour. Longer is a typo, and bounds `now + drain`.
pub const MAX_DRAIN: Duration = Duration::from_secs(3600);

impl RelayConfig {
    /// Parses and validates configuration text.
    pub fn from_toml(text: &str) -> Result<RelayConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| locate::toml_error(text, &e))?;
        raw.validate()
    }

    /// Parses and validates a configuration for `turnpike api`: as [`from_toml`](Self::from_toml),
    /// without the relay's own checks (no `[relay]` or listener is needed), with `[api]` and
    /// `[rest] secrets` required.
    pub fn from_toml_api(text: &str) -> Result<RelayConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| locate::toml_error(text, &e))?;
        raw.validate_as(true)
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        Self::from_toml(&read(path)?)
    }

    /// Reads and validates a configuration file for `turnpike api` ([`from_toml_api`](Self::from_toml_api)).
    pub fn load_api(path: &Path) -> Result<RelayConfig, ConfigError> {
        Self::from_toml_api(&read(path)?)
    }

    /// The loopback demo configuration, [`DEFAULT_CONFIG`].
    pub fn embedded_default() -> RelayConfig {
        Self::from_toml(DEFAULT_CONFIG).expect("DEFAULT_CONFIG is valid (see its test)")
    }

    /// Whether every listen address and every relay address is loopback, so that nothing is
    /// reachable from another host. An IPv4-mapped `::ffff:127.x.y.z` counts as loopback.
    pub fn is_loopback_only(&self) -> bool {
        let f = &self.fixed;
        let loopback = |ip: IpAddr| ip.to_canonical().is_loopback();
        !f.listen.is_empty()
            && f.listen
                .iter()
                .chain(&f.listen_tcp)
                .chain(&f.listen_tls)
                .all(|a| loopback(a.ip()))
            && f.relay_ips.iter().all(|&ip| loopback(ip))
    }

    /// The relay's own service ports, which no allocation may relay to (CVE-2020-26262): every
    /// listener and the HTTP API.
    pub fn service_ports(&self) -> Vec<SocketAddr> {
        let f = &self.fixed;
        f.listen
            .iter()
            .chain(&f.listen_tcp)
            .chain(&f.listen_tls)
            .copied()
            .chain(
                f.api
                    .iter()
                    .flat_map(|a| std::iter::once(a.listen).chain(a.metrics_listen)),
            )
            .collect()
    }

    /// The peer policy: deny-by-default, the operator's `[peers]` ranges, the service ports.
    pub fn peer_policy(&self) -> PeerPolicy {
        PeerPolicy::new()
            .with_allow(self.live.peers.allow.clone())
            .with_deny(self.live.peers.deny.clone())
            .with_service_ports(self.service_ports())
    }

    /// The TURN core's settings.
    pub fn server(&self) -> server::Config {
        let (f, l) = (&self.fixed, &self.live);
        server::Config {
            realm: f.realm.clone(),
            users: l.users.clone(),
            rest_secrets: l.rest_secrets.clone(),
            relay_ips: f.relay_ips.clone(),
            relay_ports: f.relay_ports.clone(),
            default_lifetime: f.lifetimes.default,
            max_lifetime: f.lifetimes.max,
            permission_lifetime: f.lifetimes.permission,
            channel_lifetime: f.lifetimes.channel,
            nonce_lifetime: f.lifetimes.nonce,
            max_allocations: l.quotas.max_allocations,
            max_allocations_per_user: l.quotas.max_allocations_per_user,
            max_permissions_per_allocation: l.quotas.max_permissions_per_allocation,
            max_channels_per_allocation: l.quotas.max_channels_per_allocation,
            max_permissions_per_identity: l.quotas.max_permissions_per_identity,
            max_channels_per_identity: l.quotas.max_channels_per_identity,
            binding_requires_auth: f.binding_requires_auth,
            password_algorithms: f.password_algorithms,
            peer_policy: self.peer_policy(),
            own_ips: self.public_ips(),
            external: f.external.clone(),
            alternate_server: f.alternate_server,
            challenge_rate: l.quotas.challenge_rate,
            channel_range: f.channel_range,
            ..server::Config::default()
        }
    }

    /// The relay's public IPs as configured: `api.public_addresses`, `public_tcp_addresses` and
    /// `public_tls_addresses` given as IP literals (a host name is not resolved), and the public side
    /// of `relay.external`. They are own addresses, denied as peers like the relay IPs.
    pub fn public_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.fixed.external.iter().map(|e| e.1).collect();
        if let Some(me) = self.live.api.as_ref().and_then(|a| a.fleet.first()) {
            ips.extend(
                me.addresses
                    .iter()
                    .chain(&me.tcp_addresses)
                    .chain(&me.tls_addresses)
                    .filter_map(|a| a.parse::<SocketAddr>().ok())
                    .map(|a| a.ip())
                    .filter(|ip| !ip.is_unspecified()),
            );
        }
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// The HTTP API's settings, if `[api]` is present.
    pub fn api(&self) -> Option<crate::api::Config> {
        let (fixed, live) = (self.fixed.api.as_ref()?, self.live.api.as_ref()?);
        Some(crate::api::Config {
            listen: fixed.listen,
            metrics_listen: fixed.metrics_listen,
            tls: live.tls.clone().map(|t| (t.cert, t.key)),
            keys: live.keys.clone(),
            names: live.names.clone(),
            trusted_proxies: live.trusted_proxies.clone(),
            revocations_db: fixed.revocations_db.clone(),
            limits: fixed.limits.clone(),
            fleet: live.fleet.clone(),
            region: live.region.clone(),
            client_regions: live.client_regions.clone(),
            usage_db: self.fixed.usage.as_ref().map(|u| u.database.clone()),
        })
    }
}

impl Fixed {
    /// Where clients reach the local address `addr`: behind 1:1 NAT (`relay.external`) a private
    /// address is reached at its public one; any other address as it is.
    pub fn advertised(&self, addr: SocketAddr) -> SocketAddr {
        self.external
            .iter()
            .find(|e| e.0 == addr.ip())
            .map_or(addr, |e| SocketAddr::new(e.1, addr.port()))
    }

    /// What differs between these settings (the running ones) and `new` (a reloaded file's): one line
    /// per setting, naming its key with the running and the new value. None of them can change live;
    /// a reload reports these lines and keeps the running values.
    pub fn changes(&self, new: &Fixed) -> Vec<String> {
        // Destructured without `..`, so that a new fixed setting cannot be left out of the report.
        let Fixed {
            realm,
            listen,
            listen_tcp,
            listen_tls,
            workers,
            backend,
            recv_buffer,
            send_buffer,
            drain,
            pin_workers,
            relay_ips,
            relay_ports,
            external,
            lifetimes,
            binding_requires_auth,
            password_algorithms,
            alternate_server,
            channel_range,
            streams,
            relay_id,
            api,
            usage,
            fleet,
            pid_file,
            xdp,
        } = self;
        let mut out = Vec::new();
        macro_rules! compare {
            ($($key:literal => $field:ident),* $(,)?) => {$(
                if *$field != new.$field {
                    out.push(format!(
                        "{}: changed from {:?} to {:?}, which needs a restart; keeping {:?}",
                        $key, $field, new.$field, $field
                    ));
                }
            )*};
        }
        compare!(
            "realm" => realm,
            "listen" => listen,
            "listen_tcp" => listen_tcp,
            "listen_tls" => listen_tls,
            "workers" => workers,
            "backend" => backend,
            "recv_buffer" => recv_buffer,
            "send_buffer" => send_buffer,
            "drain_seconds" => drain,
            "pin_workers" => pin_workers,
            "relay.addresses" => relay_ips,
            "relay.port_min..relay.port_max" => relay_ports,
            "relay.external" => external,
            "lifetimes" => lifetimes,
            "binding_requires_auth" => binding_requires_auth,
            "password_algorithms" => password_algorithms,
            "alternate_server" => alternate_server,
            "legacy_channel_numbers" => channel_range,
            "streams" => streams,
            "relay_id" => relay_id,
            "api (listen, metrics_listen, limits, revocations_database)" => api,
            "usage" => usage,
            "fleet" => fleet,
            "pid_file" => pid_file,
            "xdp" => xdp,
        );
        out
    }
}

/// The open-file budget of a configuration against `RLIMIT_NOFILE` ([`RelayConfig::fit_open_files`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft open-file limit in force.
    pub limit: u64,
    /// Descriptors kept for everything but relay sockets and stream connections: listeners (one UDP
    /// socket per `listen` entry, wildcards included; one TCP/TLS socket per address) and the UDP ones'
    /// clones, rings, epoll and eventfds per worker, the API's listeners and its
    /// `api.limits.max_connections`, the database, stdio.
    pub reserve: u64,
    /// (`quotas.max_allocations`, `streams.max_connections`) as configured.
    pub configured: (usize, usize),
    /// The same after fitting them under the limit.
    pub fitted: (usize, usize),
}

/// Descriptors per worker besides its listeners: epoll, eventfd, ring, stream poller, slack.
const FDS_PER_WORKER: u64 = 8;
/// Descriptors of the process as a whole: stdio, SQLite (database, WAL, shared memory, the lock),
/// signal handling, slack. The API's connections are counted apart (`api.limits.max_connections`).
const FDS_PROCESS: u64 = 128;

impl OpenFiles {
    /// Whether the caps had to come down.
    pub fn lowered(&self) -> bool {
        self.fitted != self.configured
    }
}

impl RelayConfig {
    /// Fits the allocation and stream connection caps under the open-file limit `limit`: each
    /// allocation holds a relay socket and each TCP/TLS connection a descriptor, so
    /// `quotas.max_allocations + streams.max_connections` (the latter only with stream listeners) must
    /// fit beside [`OpenFiles::reserve`]. When they do not, both are lowered in proportion (the caller
    /// logs it: an allocation beyond the cap gets 508, a connection beyond it is refused and counted,
    /// where running out of descriptors would fail accept, relay sockets and the database alike). An
    /// error when not even one allocation fits.
    ///
    /// `stream_sockets` is the number of TCP/TLS listener sockets each worker binds: one per
    /// `listen_tcp`/`listen_tls` address, a wildcard expanded to the host's interface addresses as
    /// `control::start` binds them (the caller expands them: this module does no I/O).
    pub fn fit_open_files(
        &mut self,
        limit: u64,
        stream_sockets: usize,
    ) -> Result<OpenFiles, ConfigError> {
        let f = &self.fixed;
        // Per worker: one UDP socket per listen entry, a wildcard included (it tells the addresses
        // apart with pktinfo), and the control thread's clone of each for replies; the TCP/TLS sockets.
        let udp = f.listen.len() as u64;
        let streams_bound = stream_sockets as u64;
        let mut reserve =
            f.workers as u64 * (FDS_PER_WORKER + 2 * udp + streams_bound) + FDS_PROCESS;
        if let Some(api) = &f.api {
            // Its listeners (the API's, `/metrics`'s own) and every connection they may hold at once:
            // both share the one `max_connections` budget.
            let api_listeners = 1 + u64::from(api.metrics_listen.is_some());
            reserve += api_listeners + api.limits.max_connections as u64;
        }
        let streams = !(f.listen_tcp.is_empty() && f.listen_tls.is_empty());
        let allocations = self.live.quotas.max_allocations;
        let connections = f.streams.max_connections;
        let configured = (allocations, connections);
        let wanted = allocations as u64 + if streams { connections as u64 } else { 0 };
        let available = limit.saturating_sub(reserve);
        let min = if streams { 2 } else { 1 };
        if available < min {
            return Err(ConfigError::new(
                "quotas.max_allocations",
                format!(
                    "the open-file limit (RLIMIT_NOFILE) is {limit}, and {reserve} descriptors are needed \
                     before any allocation (workers, listeners, api.limits.max_connections); raise it \
                     (LimitNOFILE= in the systemd unit, ulimit -n) or lower api.limits.max_connections"
                ),
            ));
        }
        let fitted = if wanted <= available {
            configured
        } else if !streams {
            (available as usize, connections)
        } else {
            // In proportion, each at least 1, together within `available`.
            let a = (u128::from(available) * allocations as u128 / u128::from(wanted)) as u64;
            let a = a.clamp(1, available - 1);
            (a as usize, (available - a) as usize)
        };
        self.live.quotas.max_allocations = fitted.0;
        self.fixed.streams.max_connections = fitted.1;
        Ok(OpenFiles {
            limit,
            reserve,
            configured,
            fitted,
        })
    }
}

/// The text of the configuration file at `path`.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("config", format!("cannot read {}: {e}", path.display())))
}

/// Parses a `log_level` value (one of [`LOG_LEVELS`]).
pub fn parse_log_level(s: &str) -> Option<tracing::Level> {
    if LOG_LEVELS.contains(&s) {
        s.parse().ok()
    } else {
        None
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
