//! The file as written: serde structs, before validation. Every key is optional; what is left out takes
//! the default written here (from [`server::Config::default`] where the TURN core has one). Unknown keys
//! are errors (`deny_unknown_fields`), so a typo is never silently ignored. The defaults are the TURN
//! core's ([`server::Config::default`]) and the stream side's ([`StreamLimits::default`]), written once
//! there.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Backend, StreamLimits, DEFAULT_SOCKET_BUFFER};
use crate::server;

/// The file as written, before validation. Defaults come from [`server::Config::default`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) realm: String,
    pub(super) listen: Vec<String>,
    pub(super) listen_tcp: Vec<String>,
    pub(super) listen_tls: Vec<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) streams: RawStreams,
    pub(super) workers: usize,
    pub(super) backend: Backend,
    pub(super) log_level: String,
    pub(super) pid_file: Option<PathBuf>,
    pub(super) drain_seconds: u64,
    pub(super) pin_workers: bool,
    pub(super) recv_buffer: Option<usize>,
    pub(super) send_buffer: Option<usize>,
    pub(super) binding_requires_auth: bool,
    pub(super) password_algorithms: bool,
    pub(super) alternate_server: Option<String>,
    pub(super) legacy_channel_numbers: bool,
    pub(super) challenge_rate: u32,
    pub(super) relay: RawRelay,
    pub(super) users: Vec<RawUser>,
    pub(super) rest: RawRest,
    pub(super) lifetimes: RawLifetimes,
    pub(super) quotas: RawQuotas,
    pub(super) peers: RawPeers,
    pub(super) relay_id: String,
    pub(super) api: Option<RawApi>,
    pub(super) usage: Option<RawUsage>,
    pub(super) fleet: Option<RawFleet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStreams {
    pub(super) max_connections: usize,
    pub(super) max_connections_per_ip: usize,
    pub(super) first_message_timeout_seconds: u64,
    pub(super) idle_timeout_seconds: u64,
    pub(super) tls_handshake_timeout_seconds: u64,
    pub(super) max_tls_handshakes_per_worker: usize,
    pub(super) write_queue_bytes: usize,
}

impl Default for RawStreams {
    fn default() -> Self {
        let d = StreamLimits::default();
        RawStreams {
            max_connections: d.max_connections,
            max_connections_per_ip: d.max_per_ip,
            first_message_timeout_seconds: d.first_message_timeout.as_secs(),
            idle_timeout_seconds: d.idle_timeout.as_secs(),
            tls_handshake_timeout_seconds: d.tls_handshake_timeout.as_secs(),
            max_tls_handshakes_per_worker: d.max_tls_handshakes,
            write_queue_bytes: d.write_queue,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRelay {
    pub(super) addresses: Vec<String>,
    pub(super) port_min: u16,
    pub(super) port_max: u16,
    pub(super) external: Vec<RawExternal>,
}

/// One `relay.external` pair (1:1 NAT): the relay address the sockets bind, the address clients see.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExternal {
    pub(super) private: String,
    pub(super) public: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUser {
    pub(super) name: String,
    pub(super) password: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRest {
    pub(super) secrets: Vec<String>,
    pub(super) max_ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLifetimes {
    pub(super) default: u32,
    pub(super) max: u32,
    pub(super) permission: u32,
    pub(super) channel: u32,
    pub(super) nonce: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQuotas {
    pub(super) max_allocations: usize,
    pub(super) max_allocations_per_user: usize,
    pub(super) max_permissions_per_allocation: usize,
    pub(super) max_channels_per_allocation: usize,
    pub(super) max_permissions_per_identity: usize,
    pub(super) max_channels_per_identity: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPeers {
    pub(super) allow: Vec<String>,
    pub(super) deny: Vec<String>,
}

impl Default for RawConfig {
    fn default() -> Self {
        let d = server::Config::default();
        RawConfig {
            realm: d.realm,
            listen: vec!["127.0.0.1:3478".into()],
            listen_tcp: Vec::new(),
            listen_tls: Vec::new(),
            tls: None,
            streams: RawStreams::default(),
            workers: 0,
            backend: Backend::Auto,
            log_level: "info".into(),
            pid_file: None,
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
            relay_id: "turnpike".into(),
            api: None,
            usage: None,
            fleet: None,
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
            external: Vec::new(),
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
            max_channels_per_allocation: d.max_channels_per_allocation,
            max_permissions_per_identity: d.max_permissions_per_identity,
            max_channels_per_identity: d.max_channels_per_identity,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) listen: String,
    #[serde(default)]
    pub(super) access_keys: Vec<String>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    #[serde(default = "default_region")]
    pub(super) region: String,
    #[serde(default)]
    pub(super) public_addresses: Vec<String>,
    #[serde(default)]
    pub(super) public_tcp_addresses: Vec<String>,
    #[serde(default)]
    pub(super) public_tls_addresses: Vec<String>,
    #[serde(default)]
    pub(super) fleet: Vec<RawFleetRelay>,
    #[serde(default)]
    pub(super) client_regions: Vec<RawClientRegion>,
    #[serde(default)]
    pub(super) admin_keys: Vec<String>,
    pub(super) metrics_listen: Option<String>,
    #[serde(default)]
    pub(super) names: Vec<String>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    pub(super) revocations_database: Option<PathBuf>,
    #[serde(default)]
    pub(super) allow_plaintext_on_public_address: bool,
    #[serde(default)]
    pub(super) limits: RawApiLimits,
}

/// `[api.limits]`; every key defaults to [`crate::api::Limits::default`].
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApiLimits {
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_headers: Option<usize>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) header_read_timeout_seconds: Option<u64>,
    pub(super) request_timeout_seconds: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_concurrent_requests: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleetRelay {
    pub(super) id: String,
    pub(super) region: String,
    pub(super) addresses: Vec<String>,
    #[serde(default)]
    pub(super) tcp_addresses: Vec<String>,
    #[serde(default)]
    pub(super) tls_addresses: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientRegion {
    pub(super) cidr: String,
    pub(super) region: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsage {
    pub(super) database: PathBuf,
    #[serde(default = "default_checkpoint")]
    pub(super) checkpoint_seconds: u64,
    #[serde(default = "default_retention")]
    pub(super) retention_days: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) postgres: String,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_env: Option<String>,
    #[serde(default = "default_fleet_tls")]
    pub(super) tls: String,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default = "default_ship_interval")]
    pub(super) ship_interval_seconds: u64,
    #[serde(default = "default_ship_batch")]
    pub(super) batch: usize,
    #[serde(default = "default_true")]
    pub(super) migrate: bool,
}

fn default_fleet_tls() -> String {
    "disable".into()
}

fn default_ship_interval() -> u64 {
    5
}

fn default_ship_batch() -> usize {
    1000
}

fn default_true() -> bool {
    true
}

fn default_region() -> String {
    "default".into()
}

fn default_checkpoint() -> u64 {
    60
}

fn default_retention() -> u64 {
    90
}
