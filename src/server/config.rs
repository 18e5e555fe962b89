//! What the TURN core needs to know, validated once at construction.

use core::net::{IpAddr, SocketAddr};
use core::ops::RangeInclusive;

use super::MIN_ALLOCATE;
use crate::auth::{challenge_len, RestSecrets};
use crate::budget::MAX_AMPLIFICATION;
use crate::policy::PeerPolicy;
use crate::wire::pad4;

/// Settings of the TURN core. `Default` gives RFC 8656's default timers and conservative quotas; an
/// operator must still supply a realm, relay addresses and credentials.
#[derive(Debug, Clone)]
pub struct Config {
    /// The REALM (RFC 8489 §14.9). It is part of every 401, which must stay within 3× a minimal
    /// Allocate: at most 12 bytes.
    pub realm: String,
    /// Static long-term users: (username, password).
    pub users: Vec<(String, String)>,
    /// TURN REST API secrets; the first mints, all verify.
    pub rest_secrets: RestSecrets,
    /// Relay IP addresses; several per family spread allocations over more ports.
    pub relay_ips: Vec<IpAddr>,
    /// Relay port range, inclusive (RFC 8656 §7.2 suggests 49152–65535).
    pub relay_ports: RangeInclusive<u16>,
    /// Allocation lifetime when the client asks for none or less (seconds; RFC 8656: 600).
    pub default_lifetime: u32,
    /// Longest allocation lifetime granted (seconds; 3600 by default).
    pub max_lifetime: u32,
    /// Permission lifetime (seconds; RFC 8656 §9: 300).
    pub permission_lifetime: u32,
    /// Channel binding lifetime (seconds; RFC 8656 §12: 600).
    pub channel_lifetime: u32,
    /// How long a nonce stays valid (seconds).
    pub nonce_lifetime: u32,
    /// How long a port reserved by EVEN-PORT's R bit is kept (seconds; RFC 8656 §7.2 suggests 30).
    pub reservation_lifetime: u32,
    /// Allocations in total; beyond it Allocate gets 508 (or 300 with `alternate_server`).
    pub max_allocations: usize,
    /// Allocations per user (identity); beyond it Allocate gets 486.
    pub max_allocations_per_user: usize,
    /// Permissions per allocation; beyond it CreatePermission/ChannelBind get 508.
    pub max_permissions_per_allocation: usize,
    /// Channel bindings per allocation (cooling-down ones included); beyond it ChannelBind gets 508.
    pub max_channels_per_allocation: usize,
    /// Permissions per identity over all its allocations; beyond it CreatePermission/ChannelBind get 508.
    pub max_permissions_per_identity: usize,
    /// Channel bindings per identity over all its allocations; beyond it ChannelBind gets 508.
    pub max_channels_per_identity: usize,
    /// Whether Binding requests need long-term credentials.
    pub binding_requires_auth: bool,
    /// Advertise PASSWORD-ALGORITHMS (MD5, SHA-256) with the RFC 8489 nonce cookie. It makes the 401
    /// 28 bytes larger, so over UDP it is advertised only to requests that the larger 401 stays within
    /// 3× of (a minimal Allocate gets the plain 401); TCP and TLS clients always get it.
    pub password_algorithms: bool,
    /// Which peers may be relayed to.
    pub peer_policy: PeerPolicy,
    /// The relay's own addresses besides `relay_ips` (listen IPs, public addresses, the host's interface
    /// addresses): denied peers like loopback unless an explicit allow opens them, and never at a service
    /// port or in the relay port range ([`crate::policy::OwnAddresses`]). The relay IPs always are.
    pub own_ips: Vec<IpAddr>,
    /// 1:1 NAT (`relay.external`): (private relay IP, public IP) pairs. Relay sockets bind the private
    /// IP; XOR-RELAYED-ADDRESS carries the public one. Both are own addresses
    /// ([`crate::policy::OwnAddresses::with_external`]).
    pub external: Vec<(IpAddr, IpAddr)>,
    /// Where to send clients (300 Try Alternate) when this relay is full or draining.
    pub alternate_server: Option<SocketAddr>,
    /// Unauthenticated answers (401, 438, 400, 420, Binding success) per second per source network
    /// (/32 IPv4, /64 IPv6) over UDP, with a burst of twice that; beyond it the server stays silent.
    /// TCP and TLS clients are exempt. 0 = unlimited.
    pub challenge_rate: u32,
    /// How many owners share `challenge_rate`: the server and every data-plane worker, each holding an
    /// even shard of it, so that together they never give a source more (`control::budget_shards`).
    /// Set at start; a reload keeps it.
    pub challenge_shards: u32,
    /// Which channel numbers ChannelBind accepts: RFC 8656's 0x4000–0x4FFF by default, or RFC 5766's
    /// 0x4000–0x7FFF for older clients.
    pub channel_range: crate::wire::ChannelRange,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            realm: "turnpike".into(),
            users: Vec::new(),
            rest_secrets: RestSecrets::new(Vec::new()),
            relay_ips: Vec::new(),
            relay_ports: 49152..=65535,
            default_lifetime: 600,
            max_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            nonce_lifetime: 600,
            reservation_lifetime: 30,
            max_allocations: 100_000,
            max_allocations_per_user: 1_000,
            max_permissions_per_allocation: 1_024,
            max_channels_per_allocation: 512,
            max_permissions_per_identity: 16_384,
            max_channels_per_identity: 16_384,
            binding_requires_auth: false,
            password_algorithms: false,
            peer_policy: PeerPolicy::new(),
            own_ips: Vec::new(),
            external: Vec::new(),
            alternate_server: None,
            channel_range: crate::wire::ChannelRange::Rfc8656,
            challenge_rate: 100,
            challenge_shards: 1,
        }
    }
}

/// A setting that cannot work, named so the operator can fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting.
    pub key: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Check the settings for contradictions.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, problem: &str| {
            Err(ConfigError {
                key,
                problem: problem.into(),
            })
        };
        if self.realm.is_empty() || self.realm.len() > 127 {
            return err("realm", "must be 1 to 127 bytes");
        }
        // Design §3: the 401 fits in 3× a minimal Allocate, or such a client would never be challenged.
        let limit = MAX_AMPLIFICATION * MIN_ALLOCATE;
        let plain = challenge_len(&self.realm, false);
        if plain > limit {
            let room = (limit + pad4(self.realm.len())).saturating_sub(plain);
            return err(
                "realm",
                &format!(
                    "{:?} makes the 401 {plain} bytes, more than {MAX_AMPLIFICATION}× a minimal \
                     {MIN_ALLOCATE}-byte Allocate ({limit}), so it would never be sent over UDP; use \
                     at most {room} bytes",
                    self.realm
                ),
            );
        }
        if self.relay_ips.is_empty() {
            return err("relay_ips", "at least one relay address is needed");
        }
        if let Some(ip) = self
            .relay_ips
            .iter()
            .find(|ip| ip.is_unspecified() || ip.is_multicast())
        {
            return err(
                "relay_ips",
                &format!("{ip} is not a unicast address peers can reach"),
            );
        }
        if self.relay_ports.is_empty() || *self.relay_ports.start() == 0 {
            return err("relay_ports", "must be a non-empty range of ports above 0");
        }
        for (key, v) in [
            ("default_lifetime", self.default_lifetime),
            ("permission_lifetime", self.permission_lifetime),
            ("channel_lifetime", self.channel_lifetime),
            ("nonce_lifetime", self.nonce_lifetime),
            ("reservation_lifetime", self.reservation_lifetime),
        ] {
            if v == 0 {
                return err(key, "must be at least 1 second");
            }
        }
        for (key, v) in [
            (
                "max_channels_per_allocation",
                self.max_channels_per_allocation,
            ),
            (
                "max_permissions_per_identity",
                self.max_permissions_per_identity,
            ),
            ("max_channels_per_identity", self.max_channels_per_identity),
        ] {
            if v == 0 {
                return err(key, "must be at least 1");
            }
        }
        if self.max_lifetime < self.default_lifetime {
            return err("max_lifetime", "must not be less than default_lifetime");
        }
        if self.users.is_empty() && self.rest_secrets.is_empty() {
            return err(
                "users",
                "no static users and no REST secrets: nobody could allocate",
            );
        }
        if let Some((u, _)) = self
            .users
            .iter()
            .find(|(u, _)| u.is_empty() || u.len() > 512)
        {
            return err("users", &format!("user name {u:?} must be 1 to 512 bytes"));
        }
        Ok(())
    }
}
