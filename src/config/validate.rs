//! Validation: [`RawConfig`] → [`RelayConfig`], every key checked in file order, each problem a
//! [`ConfigError`] naming the key.

mod api;
mod fleet;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use super::raw::{RawConfig, RawExternal, RawUser};
use super::{
    parse_log_level, ConfigError, Fixed, Lifetimes, Live, PeerLists, Quotas, RelayConfig,
    StreamLimits, TlsFiles, LOG_LEVELS, MAX_DRAIN, MAX_WORKERS,
};
use crate::auth::RestSecrets;
use crate::policy::Cidr;
use crate::wire::ChannelRange;

// --- Placeholders of the packaged example configuration (scripts/deb/turnpike.toml, issue 15) ---
/// What the example configuration writes where the operator must fill in a value.
const PLACEHOLDER: &str = "CHANGE-ME";

/// Refuses a configuration that still holds a [`PLACEHOLDER`], naming the first such key, so that
/// the packaged example cannot start a relay before its addresses and secrets are filled in.
fn reject_placeholders(raw: &RawConfig) -> Result<(), ConfigError> {
    let no_keys = Vec::new();
    let access_keys = raw.api.as_ref().map_or(&no_keys, |a| &a.access_keys);
    let lists = [
        ("listen", &raw.listen),
        ("listen_tcp", &raw.listen_tcp),
        ("listen_tls", &raw.listen_tls),
        ("relay.addresses", &raw.relay.addresses),
        ("rest.secrets", &raw.rest.secrets),
        ("api.access_keys", access_keys),
    ];
    let users = raw.users.iter().enumerate();
    let found = lists
        .into_iter()
        .flat_map(|(key, list)| {
            list.iter()
                .enumerate()
                .map(move |(i, v)| (format!("{key}[{i}]"), v))
        })
        .chain(users.map(|(i, u)| (format!("users[{i}].password"), &u.password)))
        .find(|(_, v)| v.contains(PLACEHOLDER));
    match found {
        Some((key, value)) => Err(ConfigError::new(
            key,
            format!("still the example's placeholder ({value:?}): fill in this host's value"),
        )),
        None => Ok(()),
    }
}
// --- end of the placeholder check ---

impl RawConfig {
    /// Checks every key in file order and builds the validated configuration.
    pub(super) fn validate(self) -> Result<RelayConfig, ConfigError> {
        self.validate_as(false)
    }

    /// [`validate`](Self::validate) for `turnpike api` (`api_only`): the token API alone relays
    /// nothing, so the TURN core's checks (relay addresses, users or secrets, lifetimes) are left out;
    /// it needs `[api]` and the REST secrets it mints with.
    pub(super) fn validate_as(self, api_only: bool) -> Result<RelayConfig, ConfigError> {
        reject_placeholders(&self)?;
        if self.listen.is_empty() {
            return Err(ConfigError::new(
                "listen",
                "at least one listen address is needed",
            ));
        }
        let listen = listen_addrs("listen", &self.listen)?;
        let listen_tcp = listen_addrs("listen_tcp", &self.listen_tcp)?;
        let listen_tls = listen_addrs("listen_tls", &self.listen_tls)?;
        if let Some(dup) = listen_tcp.iter().find(|a| listen_tls.contains(a)) {
            return Err(ConfigError::new(
                "listen_tls",
                format!("{dup} is also in listen_tcp; a TCP port serves one of the two"),
            ));
        }
        let tls = match (&self.tls, listen_tls.is_empty()) {
            (None, true) => None,
            (None, false) => {
                return Err(ConfigError::new(
                    "tls.cert",
                    "listen_tls needs [tls] cert and key (PEM files)",
                ))
            }
            (Some(t), _) => {
                let cert = t.cert.clone().ok_or_else(|| {
                    ConfigError::new("tls.cert", "missing: the PEM certificate chain file")
                })?;
                let key = t.key.clone().ok_or_else(|| {
                    ConfigError::new("tls.key", "missing: the PEM private key file")
                })?;
                Some(TlsFiles {
                    cert: cert.into(),
                    key: key.into(),
                })
            }
        };
        let st = &self.streams;
        for (key, v) in [
            ("streams.max_connections", st.max_connections as u64),
            (
                "streams.max_connections_per_ip",
                st.max_connections_per_ip as u64,
            ),
            ("streams.idle_timeout_seconds", st.idle_timeout_seconds),
            (
                "streams.first_message_timeout_seconds",
                st.first_message_timeout_seconds,
            ),
            (
                "streams.max_tls_handshakes_per_worker",
                st.max_tls_handshakes_per_worker as u64,
            ),
            (
                "streams.tls_handshake_timeout_seconds",
                st.tls_handshake_timeout_seconds,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        for (key, v, max) in [
            (
                "streams.idle_timeout_seconds",
                st.idle_timeout_seconds,
                MAX_TIMER_SECONDS,
            ),
            (
                "streams.first_message_timeout_seconds",
                st.first_message_timeout_seconds,
                MAX_DRAIN.as_secs(),
            ),
            (
                "streams.tls_handshake_timeout_seconds",
                st.tls_handshake_timeout_seconds,
                MAX_DRAIN.as_secs(),
            ),
            (
                "streams.write_queue_bytes",
                st.write_queue_bytes as u64,
                MAX_WRITE_QUEUE,
            ),
        ] {
            at_most(key, v, max)?;
        }
        if st.write_queue_bytes < 70_000 {
            return Err(ConfigError::new(
                "streams.write_queue_bytes",
                format!(
                    "must be at least 70000, room for the largest message (got {})",
                    st.write_queue_bytes
                ),
            ));
        }
        let streams = StreamLimits {
            max_connections: st.max_connections,
            max_per_ip: st.max_connections_per_ip,
            first_message_timeout: Duration::from_secs(st.first_message_timeout_seconds),
            idle_timeout: Duration::from_secs(st.idle_timeout_seconds),
            tls_handshake_timeout: Duration::from_secs(st.tls_handshake_timeout_seconds),
            max_tls_handshakes: st.max_tls_handshakes_per_worker,
            write_queue: st.write_queue_bytes,
        };

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

        let log_level = parse_log_level(&self.log_level).ok_or_else(|| {
            ConfigError::new(
                "log_level",
                format!(
                    "must be one of {} (got {:?})",
                    LOG_LEVELS.map(|l| format!("\"{l}\"")).join(", "),
                    self.log_level
                ),
            )
        })?;

        at_most("drain_seconds", self.drain_seconds, MAX_DRAIN.as_secs())?;

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
            // setsockopt takes a C int; the kernel caps it at net.core.rmem_max / wmem_max anyway.
            at_most(key, size.unwrap_or(0) as u64, MAX_SOCKET_BUFFER)?;
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
        let external = external(&self.relay.external, &relay_ips)?;
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
        let max_ttl = self
            .rest
            .max_ttl_seconds
            .unwrap_or(crate::auth::DEFAULT_MAX_TTL);
        if max_ttl == 0 || max_ttl > 30 * 86_400 {
            return Err(ConfigError::new(
                "rest.max_ttl_seconds",
                format!("must be 1 to 2592000 (30 days) (got {max_ttl})"),
            ));
        }
        let rest_secrets = RestSecrets::new(
            self.rest
                .secrets
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        )
        .with_max_ttl(max_ttl);

        let lifetimes = &self.lifetimes;
        for (key, v) in [
            ("lifetimes.default", lifetimes.default),
            ("lifetimes.max", lifetimes.max),
            ("lifetimes.permission", lifetimes.permission),
            ("lifetimes.channel", lifetimes.channel),
            ("lifetimes.nonce", lifetimes.nonce),
        ] {
            at_most(key, u64::from(v), MAX_TIMER_SECONDS)?;
        }
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
        let peers = PeerLists {
            allow: cidrs(&self.peers.allow, "allow")?,
            deny: cidrs(&self.peers.deny, "deny")?,
        };

        let relay_id = api::relay_id(self.relay_id)?;
        if self
            .pid_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::new("pid_file", "must not be empty"));
        }
        let mut fixed = Fixed {
            realm: self.realm,
            listen,
            listen_tcp,
            listen_tls,
            workers,
            backend: self.backend,
            recv_buffer: self.recv_buffer,
            send_buffer: self.send_buffer,
            drain: Duration::from_secs(self.drain_seconds),
            pin_workers: self.pin_workers,
            relay_ips,
            relay_ports: port_min..=port_max,
            external,
            lifetimes: Lifetimes {
                default: lifetimes.default,
                max: lifetimes.max,
                permission: lifetimes.permission,
                channel: lifetimes.channel,
                nonce: lifetimes.nonce,
            },
            binding_requires_auth: self.binding_requires_auth,
            password_algorithms: self.password_algorithms,
            alternate_server,
            channel_range: if self.legacy_channel_numbers {
                ChannelRange::Rfc5766
            } else {
                ChannelRange::Rfc8656
            },
            streams,
            relay_id,
            pid_file: self.pid_file,
            api: None,
            // A relay needs [usage] beside it (the outbox; `service::start_with` says so); the API
            // alone and `turnpike usage` only read the ledger.
            fleet: self.fleet.map(fleet::fleet).transpose()?,
            usage: self.usage.map(api::usage).transpose()?,
            xdp: xdp(self.xdp)?,
        };
        let mut live = Live {
            log_level,
            users,
            rest_secrets,
            peers,
            quotas: Quotas {
                max_allocations: self.quotas.max_allocations,
                max_allocations_per_user: self.quotas.max_allocations_per_user,
                max_permissions_per_allocation: self.quotas.max_permissions_per_allocation,
                max_channels_per_allocation: self.quotas.max_channels_per_allocation,
                max_permissions_per_identity: self.quotas.max_permissions_per_identity,
                max_channels_per_identity: self.quotas.max_channels_per_identity,
                challenge_rate: self.challenge_rate,
            },
            tls,
            api: None,
        };
        if api_only && self.api.is_none() {
            return Err(ConfigError::new(
                "api",
                "`turnpike api` needs an [api] section: listen, access_keys and the [[api.fleet]] it hands out",
            ));
        }
        if api_only && live.rest_secrets.is_empty() {
            return Err(ConfigError::new(
                "rest.secrets",
                "`turnpike api` mints REST credentials with them: the relays' shared secrets are needed",
            ));
        }
        // The TURN core's own checks, before [api], as the file reads (not for the API alone).
        if !api_only {
            RelayConfig {
                fixed: fixed.clone(),
                live: live.clone(),
            }
            .server()
            .validate()
            .map_err(|e| {
                let key = match e.key {
                    "relay_ips" => "relay.addresses",
                    "relay_ports" => "relay.port_min",
                    "default_lifetime" => "lifetimes.default",
                    "max_lifetime" => "lifetimes.max",
                    "permission_lifetime" => "lifetimes.permission",
                    "channel_lifetime" => "lifetimes.channel",
                    "nonce_lifetime" => "lifetimes.nonce",
                    "max_channels_per_allocation" => "quotas.max_channels_per_allocation",
                    "max_permissions_per_identity" => "quotas.max_permissions_per_identity",
                    "max_channels_per_identity" => "quotas.max_channels_per_identity",
                    // realm, users, and reservation_lifetime (not configurable, so never wrong).
                    other => other,
                };
                ConfigError::new(key, e.problem)
            })?;
        }
        if let Some(raw) = self.api {
            let (fixed_api, api) = api::api(raw, &fixed)?;
            fixed.api = Some(fixed_api);
            live.api = Some(api);
        }
        Ok(RelayConfig { fixed, live })
    }
}

/// `relay.external` (1:1 NAT): each private address is one of `relay.addresses`, its public address
/// of the same family, neither given twice, and the public one a specific address that is not itself
/// a relay address.
fn external(
    raw: &[RawExternal],
    relay_ips: &[IpAddr],
) -> Result<Vec<(IpAddr, IpAddr)>, ConfigError> {
    let mut pairs: Vec<(IpAddr, IpAddr)> = Vec::with_capacity(raw.len());
    for (i, e) in raw.iter().enumerate() {
        let parse = |side: &str, s: &str| {
            IpAddr::from_str(s).map_err(|_| {
                ConfigError::new(
                    format!("relay.external[{i}].{side}"),
                    format!("{s:?} is not an IPv4 or IPv6 address (no port here)"),
                )
            })
        };
        let (private, public) = (parse("private", &e.private)?, parse("public", &e.public)?);
        let key = |side: &str| format!("relay.external[{i}].{side}");
        if !relay_ips.contains(&private) {
            return Err(ConfigError::new(
                key("private"),
                format!("{private} is not one of relay.addresses: the private side is the relay address the sockets bind"),
            ));
        }
        if private.is_ipv4() != public.is_ipv4() {
            return Err(ConfigError::new(
                key("public"),
                format!("{public} is not of the same family as {private}"),
            ));
        }
        if public.is_unspecified() || public.is_multicast() || relay_ips.contains(&public) {
            return Err(ConfigError::new(
                key("public"),
                format!("{public} must be the specific address clients reach {private} at, not a relay address"),
            ));
        }
        if pairs.iter().any(|p| p.0 == private) {
            return Err(ConfigError::new(
                key("private"),
                format!("{private} is mapped twice"),
            ));
        }
        if pairs.iter().any(|p| p.1 == public) {
            return Err(ConfigError::new(
                key("public"),
                format!("{public} is the public address of two relay addresses"),
            ));
        }
        pairs.push((private, public));
    }
    Ok(pairs)
}

/// Longest timer a key may set (lifetimes, stream idle timeout): a day, in seconds. Beyond it is a
/// typo, and the bound keeps every `now + timer` far from overflowing.
const MAX_TIMER_SECONDS: u64 = 86_400;

/// Largest `streams.write_queue_bytes`: 64 MiB queued for one slow client.
const MAX_WRITE_QUEUE: u64 = 64 << 20;

/// Largest `recv_buffer` / `send_buffer`: 1 GiB (setsockopt takes a C int).
const MAX_SOCKET_BUFFER: u64 = 1 << 30;

/// `key: must be at most max (got v)`.
fn at_most(key: &str, v: u64, max: u64) -> Result<(), ConfigError> {
    if v > max {
        return Err(ConfigError::new(
            key,
            format!("must be at most {max} (got {v})"),
        ));
    }
    Ok(())
}

/// Parses a list of listen addresses (`key[i]` in errors): specific IPs, non-zero ports, no duplicates.
fn listen_addrs(name: &str, list: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut listen: Vec<SocketAddr> = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let key = format!("{name}[{i}]");
        let addr = SocketAddr::from_str(s).map_err(|_| {
            ConfigError::new(
                &key,
                format!("{s:?} is not an IP:port address (e.g. \"192.0.2.1:3478\" or \"[2001:db8::1]:3478\")"),
            )
        })?;
        // A wildcard ("0.0.0.0", "[::]") listens on every interface address of its family: over UDP
        // one socket with pktinfo (`dataplane::ListenerMap`), so replies leave from the address the
        // client used; over TCP/TLS one socket per address (`sys::expand_wildcards`).
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
    Ok(listen)
}

/// `[xdp]`: a mode other than `off` needs at least one interface; names are Linux interface names
/// (1–15 bytes, no `/`, whitespace or NUL), each once.
fn xdp(raw: super::raw::RawXdp) -> Result<crate::xdp::XdpSettings, ConfigError> {
    use super::raw::RawXdpMode;
    use crate::xdp::XdpMode;
    let mode = match raw.mode {
        RawXdpMode::Off => XdpMode::Off,
        RawXdpMode::Auto => XdpMode::Auto,
        RawXdpMode::Native => XdpMode::Native,
        RawXdpMode::Generic => XdpMode::Generic,
    };
    for (i, name) in raw.interfaces.iter().enumerate() {
        let bad = name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
        if bad {
            return Err(ConfigError::new(
                format!("xdp.interfaces[{i}]"),
                format!(
                    "{name:?} is not an interface name (1 to 15 bytes, no '/', whitespace or NUL)"
                ),
            ));
        }
        if raw.interfaces[..i].contains(name) {
            return Err(ConfigError::new(
                format!("xdp.interfaces[{i}]"),
                format!("{name:?} is listed twice"),
            ));
        }
    }
    if mode != XdpMode::Off && raw.interfaces.is_empty() {
        return Err(ConfigError::new(
            "xdp.interfaces",
            "must name at least one interface when xdp.mode is not \"off\"",
        ));
    }
    Ok(crate::xdp::XdpSettings {
        interfaces: raw.interfaces,
        mode,
    })
}
