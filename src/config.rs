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
//! May use: `wire`, `auth`, `policy`, `server`. No IO besides [`RelayConfig::load`] reading the file.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::auth::RestSecrets;
use crate::policy::{Cidr, PeerPolicy};
use crate::server;

/// The embedded loopback demo configuration. `turnpike --print-config` shows it, so each key is
/// explained; it is also the starting point for a real configuration file.
pub const DEFAULT_CONFIG: &str = r#"# turnpike configuration (TOML). Every key is optional; the values below are the defaults
# unless marked "demo". Unknown keys are errors, so a typo is reported rather than ignored.
#
# This is a loopback demo: it listens and relays on 127.0.0.1 only, and lets allocations relay to
# loopback peers. For a real deployment, change listen, relay.addresses, the credentials, and
# remove peers.allow.

# REALM sent to clients (RFC 8489 §14.9). Keep it short: it is in every 401 response.
realm = "turnpike"

# UDP addresses to listen on for STUN/TURN, each a specific IP and port ("0.0.0.0" and "[::]"
# are not supported yet). They are also service ports: no allocation may relay to them.
listen = ["127.0.0.1:3478"]

# Worker threads, each with its own socket and ring. 0 = one per available core.
workers = 0

# Packet I/O backend: "auto" (io_uring when the kernel allows it, else epoll), "io_uring", "epoll".
backend = "auto"

# Log verbosity: "error", "warn", "info", "debug" or "trace".
log_level = "info"

# On shutdown, keep relaying for this many seconds while refusing new allocations.
drain_seconds = 5

# Pin worker k to core k.
pin_workers = true

# Socket buffer sizes in bytes (SO_RCVBUF / SO_SNDBUF) of listeners and relay sockets. The
# kernel caps them at net.core.rmem_max / wmem_max (see tuning/). Kernel defaults (~200 KiB)
# overflow under bursts: measured with turnutils_uclient, 100 clients, 1.8% loss at the default
# against 0% at 4 MiB.
recv_buffer = 4194304
send_buffer = 4194304

# Whether STUN Binding requests need credentials too. Off: Binding is how clients learn their
# public address (RFC 8489 §3).
binding_requires_auth = false

# Advertise PASSWORD-ALGORITHMS (MD5 and SHA-256, RFC 8489 §9.2.4). Makes every 401 ~40 bytes
# larger; deployed clients use MD5.
password_algorithms = false

# When this relay is full or draining, send clients here instead (300 Try Alternate).
# alternate_server = "198.51.100.2:3478"

# Unauthenticated answers (401, 438) per second per source IP, burst twice that; beyond it the
# relay stays silent so that it cannot reflect a flood. 0 = unlimited.
challenge_rate = 100

# Accept RFC 5766's channel numbers 0x4000-0x7FFF instead of RFC 8656's 0x4000-0x4FFF. Off by
# default (first bytes 0x50-0x7F belong to other protocols under RFC 7983/9443).
# demo: on, because coturn's turnutils_uclient picks channel numbers up to 0x7FFF.
legacy_channel_numbers = true

[relay]
# Addresses that relayed transport addresses are allocated on: IPv4 and/or IPv6, several allowed.
# Required. demo: loopback.
addresses = ["127.0.0.1"]
# Inclusive port range for relayed addresses (default 49152 to 65535). demo: a smaller range.
port_min = 49152
port_max = 49999

# Static long-term users (RFC 8489 §9.2); repeat the [[users]] block for each. At least one user
# or one REST secret is required. demo: a throwaway user.
[[users]]
name = "demo"
password = "demo-pass"

[rest]
# TURN REST API shared secrets (time-limited credentials minted by a web service). The first
# mints, all verify, so a new secret can be put first while old credentials still work.
# demo: a throwaway secret.
secrets = ["demo-secret"]

[lifetimes]
# In seconds. Allocation lifetime when the client asks for none (RFC 8656: 600).
default = 600
# Longest allocation lifetime granted; at least `default`.
max = 3600
# Permission lifetime (RFC 8656 §9: 300).
permission = 300
# Channel binding lifetime (RFC 8656 §12: 600).
channel = 600
# How long a nonce stays valid before the client gets 438 Stale Nonce.
nonce = 600

[quotas]
# Allocations in total; beyond it Allocate gets 508 (or 300 with alternate_server).
max_allocations = 100000
# Allocations per user; beyond it Allocate gets 486.
max_allocations_per_user = 1000
# Permissions per allocation; beyond it CreatePermission and ChannelBind get 508.
max_permissions_per_allocation = 1024

[peers]
# Which peers allocations may relay to. By default loopback, private, CGNAT, link-local
# (including 169.254.169.254), multicast, reserved and documentation ranges are refused, in every
# encoding (IPv4-mapped, NAT64, 6to4). `allow` opens CIDR ranges; `deny` closes more and wins
# over `allow`. The listen addresses above are always refused.
#
# demo only: allow loopback peers so the demo can relay to a local echo server. Never allow
# loopback on a relay others can reach (CVE-2020-26262).
allow = ["127.0.0.0/8", "::1/128"]
deny = []
"#;

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
const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// The log levels `log_level` accepts.
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// More workers than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

impl RelayConfig {
    /// Parses and validates configuration text.
    pub fn from_toml(text: &str) -> Result<RelayConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
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
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
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

/// The file as written, before validation. Defaults come from [`server::Config::default`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    realm: String,
    listen: Vec<String>,
    workers: usize,
    backend: Backend,
    log_level: String,
    drain_seconds: u64,
    pin_workers: bool,
    recv_buffer: Option<usize>,
    send_buffer: Option<usize>,
    binding_requires_auth: bool,
    password_algorithms: bool,
    alternate_server: Option<String>,
    legacy_channel_numbers: bool,
    challenge_rate: u32,
    relay: RawRelay,
    users: Vec<RawUser>,
    rest: RawRest,
    lifetimes: RawLifetimes,
    quotas: RawQuotas,
    peers: RawPeers,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRelay {
    addresses: Vec<String>,
    port_min: u16,
    port_max: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRest {
    secrets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLifetimes {
    default: u32,
    max: u32,
    permission: u32,
    channel: u32,
    nonce: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQuotas {
    max_allocations: usize,
    max_allocations_per_user: usize,
    max_permissions_per_allocation: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPeers {
    allow: Vec<String>,
    deny: Vec<String>,
}

impl Default for RawConfig {
    fn default() -> Self {
        let d = server::Config::default();
        RawConfig {
            realm: d.realm,
            listen: vec!["127.0.0.1:3478".into()],
            workers: 0,
            backend: Backend::Auto,
            log_level: "info".into(),
            drain_seconds: 5,
            pin_workers: true,
            recv_buffer: Some(DEFAULT_SOCKET_BUFFER),
            send_buffer: Some(DEFAULT_SOCKET_BUFFER),
            binding_requires_auth: d.binding_requires_auth,
            password_algorithms: d.password_algorithms,
            alternate_server: None,
            legacy_channel_numbers: false,
            challenge_rate: d.challenge_rate,
            relay: RawRelay::default(),
            users: Vec::new(),
            rest: RawRest::default(),
            lifetimes: RawLifetimes::default(),
            quotas: RawQuotas::default(),
            peers: RawPeers::default(),
        }
    }
}

impl Default for RawRelay {
    fn default() -> Self {
        let d = server::Config::default();
        RawRelay {
            addresses: Vec::new(),
            port_min: *d.relay_ports.start(),
            port_max: *d.relay_ports.end(),
        }
    }
}

impl Default for RawLifetimes {
    fn default() -> Self {
        let d = server::Config::default();
        RawLifetimes {
            default: d.default_lifetime,
            max: d.max_lifetime,
            permission: d.permission_lifetime,
            channel: d.channel_lifetime,
            nonce: d.nonce_lifetime,
        }
    }
}

impl Default for RawQuotas {
    fn default() -> Self {
        let d = server::Config::default();
        RawQuotas {
            max_allocations: d.max_allocations,
            max_allocations_per_user: d.max_allocations_per_user,
            max_permissions_per_allocation: d.max_permissions_per_allocation,
        }
    }
}

impl RawConfig {
    /// Checks every key in file order and builds the validated configuration.
    fn validate(self) -> Result<RelayConfig, ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::new(
                "listen",
                "at least one listen address is needed",
            ));
        }
        let mut listen: Vec<SocketAddr> = Vec::with_capacity(self.listen.len());
        for (i, s) in self.listen.iter().enumerate() {
            let key = format!("listen[{i}]");
            let addr = SocketAddr::from_str(s).map_err(|_| {
                ConfigError::new(
                    &key,
                    format!("{s:?} is not an IP:port address (e.g. \"192.0.2.1:3478\" or \"[2001:db8::1]:3478\")"),
                )
            })?;
            if addr.ip().is_unspecified() {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "unspecified addresses are not supported yet; list each address (got {addr})"
                    ),
                ));
            }
            if addr.port() == 0 {
                return Err(ConfigError::new(
                    key,
                    format!("port 0 is not allowed; give the port clients send to, usually 3478 (got {addr})"),
                ));
            }
            if listen.contains(&addr) {
                return Err(ConfigError::new(key, format!("{addr} is listed twice")));
            }
            listen.push(addr);
        }

        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n if n > MAX_WORKERS => {
                return Err(ConfigError::new(
                    "workers",
                    format!("must be at most {MAX_WORKERS}, or 0 for one per core (got {n})"),
                ))
            }
            n => n,
        };

        if !LOG_LEVELS.contains(&self.log_level.as_str()) {
            return Err(ConfigError::new(
                "log_level",
                format!(
                    "must be one of {} (got {:?})",
                    LOG_LEVELS.map(|l| format!("\"{l}\"")).join(", "),
                    self.log_level
                ),
            ));
        }

        for (key, size) in [
            ("recv_buffer", self.recv_buffer),
            ("send_buffer", self.send_buffer),
        ] {
            if size == Some(0) {
                return Err(ConfigError::new(
                    key,
                    "must be at least 1 byte; leave it out to keep the kernel default",
                ));
            }
        }

        let alternate_server = match &self.alternate_server {
            None => None,
            Some(s) => {
                let addr = SocketAddr::from_str(s).map_err(|_| {
                    ConfigError::new(
                        "alternate_server",
                        format!("{s:?} is not an IP:port address (e.g. \"198.51.100.2:3478\")"),
                    )
                })?;
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(ConfigError::new(
                        "alternate_server",
                        format!("{addr} is not an address clients can be sent to"),
                    ));
                }
                Some(addr)
            }
        };

        let relay_ips = self
            .relay
            .addresses
            .iter()
            .enumerate()
            .map(|(i, s)| {
                IpAddr::from_str(s).map_err(|_| {
                    ConfigError::new(
                        format!("relay.addresses[{i}]"),
                        format!("{s:?} is not an IPv4 or IPv6 address (no port here)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (port_min, port_max) = (self.relay.port_min, self.relay.port_max);
        if port_min > port_max {
            return Err(ConfigError::new(
                "relay.port_min",
                format!("must be ≤ relay.port_max (got {port_min} > {port_max})"),
            ));
        }

        let mut users: Vec<(String, String)> = Vec::with_capacity(self.users.len());
        for (i, RawUser { name, password }) in self.users.into_iter().enumerate() {
            if password.is_empty() {
                return Err(ConfigError::new(
                    format!("users[{i}].password"),
                    "must not be empty",
                ));
            }
            if users.iter().any(|(n, _)| *n == name) {
                return Err(ConfigError::new(
                    format!("users[{i}].name"),
                    format!("user {name:?} is defined twice"),
                ));
            }
            users.push((name, password));
        }

        if let Some(i) = self.rest.secrets.iter().position(String::is_empty) {
            return Err(ConfigError::new(
                format!("rest.secrets[{i}]"),
                "must not be empty",
            ));
        }
        let rest_secrets = RestSecrets::new(
            self.rest
                .secrets
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        );

        let lifetimes = &self.lifetimes;
        if lifetimes.max < lifetimes.default {
            return Err(ConfigError::new(
                "lifetimes.max",
                format!(
                    "must be ≥ lifetimes.default (got {} < {})",
                    lifetimes.max, lifetimes.default
                ),
            ));
        }

        let cidrs = |list: &[String], key: &str| {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    Cidr::from_str(s)
                        .map_err(|e| ConfigError::new(format!("peers.{key}[{i}]"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let peer_policy = PeerPolicy::new()
            .with_allow(cidrs(&self.peers.allow, "allow")?)
            .with_deny(cidrs(&self.peers.deny, "deny")?)
            // The relay's own listeners are never peers (CVE-2020-26262).
            .with_service_ports(listen.clone());

        let server = server::Config {
            realm: self.realm,
            users,
            rest_secrets,
            relay_ips,
            relay_ports: port_min..=port_max,
            default_lifetime: lifetimes.default,
            max_lifetime: lifetimes.max,
            permission_lifetime: lifetimes.permission,
            channel_lifetime: lifetimes.channel,
            nonce_lifetime: lifetimes.nonce,
            max_allocations: self.quotas.max_allocations,
            max_allocations_per_user: self.quotas.max_allocations_per_user,
            max_permissions_per_allocation: self.quotas.max_permissions_per_allocation,
            binding_requires_auth: self.binding_requires_auth,
            password_algorithms: self.password_algorithms,
            peer_policy,
            alternate_server,
            challenge_rate: self.challenge_rate,
            channel_range: if self.legacy_channel_numbers {
                crate::wire::ChannelRange::Rfc5766
            } else {
                crate::wire::ChannelRange::Rfc8656
            },
            ..server::Config::default()
        };
        server.validate().map_err(|e| {
            let key = match e.key {
                "relay_ips" => "relay.addresses",
                "relay_ports" => "relay.port_min",
                "default_lifetime" => "lifetimes.default",
                "max_lifetime" => "lifetimes.max",
                "permission_lifetime" => "lifetimes.permission",
                "channel_lifetime" => "lifetimes.channel",
                "nonce_lifetime" => "lifetimes.nonce",
                // realm, users, and reservation_lifetime (not configurable, so never wrong).
                other => other,
            };
            ConfigError::new(key, e.problem)
        })?;

        Ok(RelayConfig {
            server,
            listen,
            workers,
            backend: self.backend,
            recv_buffer: self.recv_buffer,
            send_buffer: self.send_buffer,
            log_level: self.log_level,
            drain: Duration::from_secs(self.drain_seconds),
            pin_workers: self.pin_workers,
        })
    }
}

/// Turns a toml error into a [`ConfigError`]: the key it points at (when the text parses as TOML
/// at all) and the message with its line and column.
fn toml_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(at) = error.span().map(|s| s.start) else {
        return ConfigError::new("config", message);
    };
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let key = toml::from_str::<Node>(text)
        .ok()
        .and_then(|root| {
            let mut path = String::new();
            root.find(text, at, &mut path);
            (!path.is_empty()).then_some(path)
        })
        .unwrap_or_else(|| "config".into());
    ConfigError::new(key, format!("{message} (line {line}, column {column})"))
}

/// A TOML document reduced to its shape and the byte spans of its values: just enough to name
/// the key at the offset a toml error points to. Dotted keys (`relay.port_min = 1`) make tables
/// without spans, which `toml::Spanned` refuses; the whole parse then fails and the error is
/// reported against `config`, still with its line and column.
enum Node {
    Table(Vec<(String, toml::Spanned<Node>)>),
    Array(Vec<toml::Spanned<Node>>),
    Leaf,
}

impl Node {
    /// Appends to `path` the key (`relay.port_min`, `users[1].name`) whose key or value holds byte
    /// `at` of `text`; an unknown-key error points at the key, any other at the value.
    fn find(&self, text: &str, at: usize, path: &mut String) {
        match self {
            Node::Table(entries) => {
                let push = |path: &mut String, key: &str| {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                };
                if let Some((key, value)) = entries.iter().find(|(_, v)| v.span().contains(&at)) {
                    push(path, key);
                    // A header's span (`[[users]]`) is its table's; if the error is at the
                    // header's own key, that key is the answer.
                    if !text.get(at..).is_some_and(|t| t.starts_with(key.as_str())) {
                        value.get_ref().find(text, at, path);
                    }
                } else if let Some((key, _)) = entries
                    .iter()
                    // A key and its value share a line, the key first.
                    .filter(|(_, v)| {
                        text.get(at..v.span().start)
                            .is_some_and(|between| !between.contains('\n'))
                    })
                    .min_by_key(|(_, v)| v.span().start)
                {
                    push(path, key);
                }
            }
            Node::Array(items) => {
                if let Some((i, item)) = items
                    .iter()
                    .enumerate()
                    .find(|(_, v)| v.span().contains(&at))
                {
                    path.push_str(&format!("[{i}]"));
                    item.get_ref().find(text, at, path);
                }
            }
            Node::Leaf => {}
        }
    }
}

impl<'de> de::Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            // toml hands a datetime to `deserialize_any` as a one-entry map with a private key.
            if key.starts_with("$__toml_private") {
                map.next_value::<IgnoredAny>()?;
                return Ok(Node::Leaf);
            }
            entries.push((key, map.next_value()?));
        }
        Ok(Node::Table(entries))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::policy::Denied;

    const OPERATOR: &str = r#"
listen = ["192.0.2.1:3478"]
[relay]
addresses = ["192.0.2.1"]
[rest]
secrets = ["s3cret"]
"#;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Parses `text`, expecting an error; returns it.
    #[track_caller]
    fn error(text: &str) -> ConfigError {
        match RelayConfig::from_toml(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    /// The operator config with `extra` top-level keys in front (so before any table header).
    fn operator_with(extra: &str) -> String {
        format!("{extra}\n{OPERATOR}")
    }

    #[track_caller]
    fn assert_error(text: &str, key: &str, fact: &str) {
        let e = error(text);
        assert_eq!(e.key, key, "{e}");
        assert!(e.problem.contains(fact), "{e:?} should mention {fact:?}");
        assert_eq!(e.to_string(), format!("{}: {}", e.key, e.problem));
    }

    #[test]
    fn embedded_default_is_the_loopback_demo() {
        let c = RelayConfig::embedded_default();
        assert_eq!(c.listen, [sa("127.0.0.1:3478")]);
        assert_eq!(c.server.relay_ips, [IpAddr::from([127, 0, 0, 1])]);
        assert_eq!(c.server.relay_ports, 49152..=49999);
        assert_eq!(c.server.realm, "turnpike");
        assert_eq!(
            c.server.users,
            [("demo".to_string(), "demo-pass".to_string())]
        );
        let minted = c.server.rest_secrets.mint("alice", 0, 60).unwrap();
        let expected = RestSecrets::new(vec![b"demo-secret".to_vec()])
            .mint("alice", 0, 60)
            .unwrap();
        assert_eq!(minted, expected);
        assert_eq!(c.backend, Backend::Auto);
        assert!(c.workers >= 1);
        assert_eq!(c.drain, Duration::from_secs(5));
        assert!(c.pin_workers);
        assert_eq!(c.log_level, "info");
        assert_eq!(
            (c.recv_buffer, c.send_buffer),
            (Some(4 << 20), Some(4 << 20))
        );
        assert!(c.is_loopback_only());

        let policy = &c.server.peer_policy;
        assert_eq!(policy.check(sa("127.0.0.1:9")), Ok(()));
        assert_eq!(policy.check(sa("[::1]:9")), Ok(()));
        assert_eq!(policy.check(sa("127.0.0.1:3478")), Err(Denied::ServicePort));
        assert_eq!(
            policy.check(sa("10.0.0.1:9")),
            Err(Denied::Builtin("rfc1918"))
        );
    }

    #[test]
    fn operator_config_keeps_deny_by_default() {
        let c = RelayConfig::from_toml(OPERATOR).unwrap();
        assert!(!c.is_loopback_only());
        assert_eq!(c.listen, [sa("192.0.2.1:3478")]);
        assert_eq!(c.server.relay_ports, 49152..=65535);
        assert!(c.server.users.is_empty());
        assert!(!c.server.rest_secrets.is_empty());
        let policy = &c.server.peer_policy;
        assert!(matches!(
            policy.check(sa("127.0.0.1:5000")),
            Err(Denied::Builtin(_))
        ));
        assert_eq!(
            policy.check(sa("198.51.100.7:5000")),
            Err(Denied::Builtin("documentation"))
        );
        assert_eq!(policy.check(sa("8.8.8.8:53")), Ok(()));
        assert_eq!(policy.check(sa("192.0.2.1:3478")), Err(Denied::ServicePort));
    }

    #[test]
    fn every_key_is_read() {
        let c = RelayConfig::from_toml(
            r#"
realm = "example.org"
listen = ["192.0.2.1:3478", "[2001:db8::1]:3479"]
workers = 3
backend = "io_uring"
log_level = "debug"
drain_seconds = 30
pin_workers = false
recv_buffer = 1000
send_buffer = 2000
binding_requires_auth = true
password_algorithms = true
alternate_server = "198.51.100.2:3478"
[relay]
addresses = ["192.0.2.1", "2001:db8::1"]
port_min = 50000
port_max = 50100
[[users]]
name = "a"
password = "pa"
[[users]]
name = "b"
password = "pb"
[lifetimes]
default = 60
max = 120
permission = 30
channel = 40
nonce = 50
[quotas]
max_allocations = 10
max_allocations_per_user = 2
max_permissions_per_allocation = 3
[peers]
allow = ["10.1.0.0/16"]
deny = ["8.8.8.0/24"]
"#,
        )
        .unwrap();
        assert_eq!(c.server.realm, "example.org");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.workers, 3);
        assert_eq!(c.backend, Backend::IoUring);
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.drain, Duration::from_secs(30));
        assert!(!c.pin_workers);
        assert_eq!((c.recv_buffer, c.send_buffer), (Some(1000), Some(2000)));
        assert!(c.server.binding_requires_auth && c.server.password_algorithms);
        assert_eq!(c.server.alternate_server, Some(sa("198.51.100.2:3478")));
        assert_eq!(c.server.relay_ips.len(), 2);
        assert_eq!(c.server.relay_ports, 50000..=50100);
        assert_eq!(c.server.users.len(), 2);
        assert!(c.server.rest_secrets.is_empty());
        let s = &c.server;
        assert_eq!(
            (
                s.default_lifetime,
                s.max_lifetime,
                s.permission_lifetime,
                s.channel_lifetime,
                s.nonce_lifetime
            ),
            (60, 120, 30, 40, 50)
        );
        assert_eq!(
            (
                s.max_allocations,
                s.max_allocations_per_user,
                s.max_permissions_per_allocation
            ),
            (10, 2, 3)
        );
        assert_eq!(s.peer_policy.check(sa("10.1.2.3:9")), Ok(()));
        assert_eq!(
            s.peer_policy.check(sa("10.2.2.3:9")),
            Err(Denied::Builtin("rfc1918"))
        );
        assert_eq!(
            s.peer_policy.check(sa("8.8.8.8:53")),
            Err(Denied::Configured)
        );
        assert_eq!(
            s.peer_policy.check(sa("[2001:db8::1]:3479")),
            Err(Denied::ServicePort)
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        assert_error(&operator_with("relam = \"x\""), "relam", "relam");
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\nprot_min = 50000\n",
            "relay.prot_min",
            "prot_min",
        );
        assert_error(
            &format!("{OPERATOR}\n[[users]]\nname = \"a\"\npasword = \"b\"\n"),
            "users[0].pasword",
            "pasword",
        );
        assert_error(&format!("{OPERATOR}\n[relya]\n"), "relya", "relya");
        assert_error(
            &format!("{OPERATOR}\n[[usres]]\nname = \"a\"\n"),
            "usres",
            "usres",
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        assert_error(&operator_with("workers = \"four\""), "workers", "string");
        assert_error(
            "listen = [\n  \"192.0.2.1:3478\",\n  7,\n]\n[relay]\naddresses = [\"192.0.2.1\"]\n",
            "listen[1]",
            "integer",
        );
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\nport_max = 70000\n",
            "relay.port_max",
            "70000",
        );
        assert_error(
            &format!("{OPERATOR}\n[[users]]\nname = \"a\"\n"),
            "users[0]",
            "password",
        );
    }

    #[test]
    fn toml_syntax_errors_have_line_and_column() {
        let e = error("realm = \"x\"\nlisten = [\n");
        assert_eq!(e.key, "config");
        assert!(e.problem.contains("line"), "{e}");
        // Dotted keys parse, and their errors still carry a position.
        let e = error(&operator_with("quotas.max_allocations = \"many\""));
        assert!(e.problem.contains("line 1"), "{e}");
        let c = RelayConfig::from_toml(&operator_with("quotas.max_allocations = 7"));
        assert_eq!(c.unwrap().server.max_allocations, 7);
    }

    #[test]
    fn bad_cidr_names_its_index() {
        let e = error(&format!(
            "{OPERATOR}\n[peers]\nallow = [\"10.0.0.0/8\", \"::1/128\", \"10.0.0.0/33\"]\n"
        ));
        assert_eq!(e.key, "peers.allow[2]");
        assert!(e.problem.contains("33"), "{e}");
        let e = error(&format!("{OPERATOR}\n[peers]\ndeny = [\"not-an-ip\"]\n"));
        assert_eq!(e.key, "peers.deny[0]");
        assert!(e.problem.contains("not-an-ip"), "{e}");
    }

    #[test]
    fn relay_errors() {
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\nport_min = 60000\nport_max = 50000\n[rest]\nsecrets = [\"s\"]\n",
            "relay.port_min",
            "60000 > 50000",
        );
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\nport_min = 0\n[rest]\nsecrets = [\"s\"]\n",
            "relay.port_min",
            "above 0",
        );
        assert_error(
            "[rest]\nsecrets = [\"s\"]\n",
            "relay.addresses",
            "relay address",
        );
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\", \"0.0.0.0\"]\n[rest]\nsecrets = [\"s\"]\n",
            "relay.addresses",
            "0.0.0.0",
        );
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1:3478\"]\n",
            "relay.addresses[0]",
            "192.0.2.1:3478",
        );
    }

    #[test]
    fn credential_errors() {
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\n",
            "users",
            "REST secrets",
        );
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\n[rest]\nsecrets = []\n",
            "users",
            "REST secrets",
        );
        assert_error(
            &format!("{OPERATOR}\n[[users]]\nname = \"a\"\npassword = \"\"\n"),
            "users[0].password",
            "empty",
        );
        assert_error(
            &format!("{OPERATOR}\n[[users]]\nname = \"a\"\npassword = \"1\"\n[[users]]\nname = \"a\"\npassword = \"2\"\n"),
            "users[1].name",
            "twice",
        );
        assert_error(
            &format!("{OPERATOR}\n[[users]]\nname = \"\"\npassword = \"1\"\n"),
            "users",
            "1 to 512",
        );
        assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\n[rest]\nsecrets = [\"a\", \"\"]\n",
            "rest.secrets[1]",
            "empty",
        );
        assert_error(&operator_with("realm = \"\""), "realm", "1 to 127");
    }

    #[test]
    fn scalar_errors() {
        assert_error(&operator_with("backend = \"uring\""), "backend", "io_uring");
        assert_error(
            &operator_with("log_level = \"verbose\""),
            "log_level",
            "\"trace\"",
        );
        assert_error(&operator_with("log_level = \"INFO\""), "log_level", "INFO");
        assert_error(&operator_with("workers = 5000"), "workers", "5000");
        assert_error(
            &operator_with("recv_buffer = 0"),
            "recv_buffer",
            "kernel default",
        );
        assert_error(
            &operator_with("alternate_server = \"198.51.100.2\""),
            "alternate_server",
            "198.51.100.2",
        );
        assert_error(
            &operator_with("alternate_server = \"0.0.0.0:3478\""),
            "alternate_server",
            "0.0.0.0:3478",
        );
        let c = RelayConfig::from_toml(&operator_with("workers = 1024\nbackend = \"epoll\""));
        let c = c.unwrap();
        assert_eq!((c.workers, c.backend), (1024, Backend::Epoll));
    }

    #[test]
    fn listen_errors() {
        let relay = "[relay]\naddresses = [\"192.0.2.1\"]\n[rest]\nsecrets = [\"s\"]\n";
        assert_error(
            &format!("listen = [\"192.0.2.1:0\"]\n{relay}"),
            "listen[0]",
            "port 0",
        );
        assert_error(
            &format!("listen = [\"192.0.2.1:3478\", \"0.0.0.0:3478\"]\n{relay}"),
            "listen[1]",
            "unspecified addresses are not supported yet; list each address",
        );
        assert_error(
            &format!("listen = [\"[::]:3478\"]\n{relay}"),
            "listen[0]",
            "unspecified",
        );
        assert_error(
            &format!("listen = [\"192.0.2.1\"]\n{relay}"),
            "listen[0]",
            "192.0.2.1",
        );
        assert_error(
            &format!("listen = [\"192.0.2.1:3478\", \"192.0.2.1:3478\"]\n{relay}"),
            "listen[1]",
            "twice",
        );
        assert_error(&format!("listen = []\n{relay}"), "listen", "at least one");
    }

    #[test]
    fn lifetime_errors() {
        assert_error(
            &format!("{OPERATOR}\n[lifetimes]\ndefault = 600\nmax = 300\n"),
            "lifetimes.max",
            "300 < 600",
        );
        assert_error(
            &format!("{OPERATOR}\n[lifetimes]\npermission = 0\n"),
            "lifetimes.permission",
            "at least 1",
        );
    }

    #[test]
    fn is_loopback_only_needs_every_address_on_loopback() {
        let with = |listen: &str, relay: &str| {
            RelayConfig::from_toml(&format!(
                "listen = [{listen}]\n[relay]\naddresses = [{relay}]\n[rest]\nsecrets = [\"s\"]\n"
            ))
            .unwrap()
            .is_loopback_only()
        };
        assert!(with(
            "\"127.0.0.1:3478\", \"[::1]:3478\"",
            "\"127.0.0.2\", \"::1\""
        ));
        assert!(with("\"127.0.0.1:3478\"", "\"::ffff:127.0.0.1\""));
        assert!(!with("\"127.0.0.1:3478\"", "\"127.0.0.1\", \"192.0.2.1\""));
        assert!(!with(
            "\"127.0.0.1:3478\", \"192.0.2.1:3478\"",
            "\"127.0.0.1\""
        ));
    }

    #[test]
    fn load_names_the_path() {
        let path = Path::new("/nonexistent/turnpike-test/turnpike.toml");
        let e = RelayConfig::load(path).unwrap_err();
        assert_eq!(e.key, "config");
        assert!(
            e.problem
                .contains("/nonexistent/turnpike-test/turnpike.toml"),
            "{e}"
        );

        let path =
            std::env::temp_dir().join(format!("turnpike-config-{}.toml", std::process::id()));
        std::fs::write(&path, DEFAULT_CONFIG).unwrap();
        let loaded = RelayConfig::load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.unwrap().listen, [sa("127.0.0.1:3478")]);
    }

    #[test]
    fn backend_names_round_trip() {
        for b in [Backend::Auto, Backend::IoUring, Backend::Epoll] {
            let c = RelayConfig::from_toml(&operator_with(&format!("backend = \"{b}\""))).unwrap();
            assert_eq!(c.backend, b);
        }
    }
}
