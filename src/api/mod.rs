//! The HTTP API: the relay token endpoint of the cloud network-traversal API (self-hosted), admin
//! revocation, usage summaries, Prometheus `/metrics`, and `/healthz` / `/readyz`.
//!
//! | method and path | auth | what |
//! |---|---|---|
//! | `POST /networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview` | HMAC | relay credentials and ICE servers |
//! | `POST /admin/revoke?api-version=...` | HMAC | revoke an identity's credentials and end its allocations (`{"id", "until"?, "terminate"?}`) |
//! | `GET /usage?since=..&until=..&relay=..` | HMAC | per-identity usage summary (RFC 3339 bounds; default: the 31 days up to now): from the fleet ledger in PostgreSQL when configured (fleet-wide, or one `relay`), else from the local usage database |
//! | `GET /metrics` | none | Prometheus text format |
//! | `GET /healthz`, `GET /readyz` | none | liveness; readiness (503 while draining) |
//!
//! Admin requests (`/admin/revoke`, `/usage`) need a key with the admin role; the token endpoint one with
//! the mint role. Every signed request must name one of the API's own names in `Host`. A revoke or lift
//! is refused when it is an exact replay (within the signature's validity window) or when its
//! `x-ms-date` is older than the last one applied for the identity (see [`revocations`]).
//! With `[fleet]` that record is PostgreSQL ([`Hooks::fleet_revoke`], which also publishes it to every
//! relay; the local store is then its copy), and `any` / `nearest` name the live relays of the fleet's
//! registry ([`Hooks::fleet_relays`]) before the static fleet.
//!
//! [`Api::handle`] is the whole logic: a request in, a response out, time as an argument. [`serve`] runs
//! it on axum/hyper on a small tokio runtime of its own (plain HTTP or TLS through tokio-rustls), away
//! from the relay's data path, with the limits of [`Limits`].
//!
//! May use: auth, metrics, usage, policy.

mod http;
pub mod revocations;
pub mod sign;

pub use http::{control_plane_runtime, serve, serve_on, ApiHandle, ApiTls};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::clock::{unix_ms_at, unix_secs};

use serde_json::{json, Value};

use crate::auth::RestSecrets;
use crate::metrics;
use crate::policy::Cidr;
use crate::usage;

/// Replay-cache entries at most (admin requests seen within the signature window); beyond it admin
/// requests get 503 until entries expire.
const MAX_REPLAY_ENTRIES: usize = 100_000;

/// A relay of the fleet, as handed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRelay {
    /// Its id (as in its usage records).
    pub id: String,
    /// Its region.
    pub region: String,
    /// Public `host:port` addresses clients reach it at (IPv6 in brackets).
    pub addresses: Vec<String>,
    /// Public `host:port` addresses of its TURN-over-TCP listeners (`turn:…?transport=tcp`).
    pub tcp_addresses: Vec<String>,
    /// Public `host:port` addresses of its TURN-over-TLS listeners (`turns:…?transport=tcp`).
    pub tls_addresses: Vec<String>,
}

/// API settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where `/metrics` is served (`None`: on `listen`; otherwise only there, in plain HTTP).
    pub metrics_listen: Option<SocketAddr>,
    /// TLS certificate chain and private key (PEM files); plain HTTP without.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The keys (decoded from base64) that may sign requests, with their roles.
    pub keys: Vec<AccessKey>,
    /// The names `Host` may carry (lower case; `host` or `host:port`, IPv6 in brackets).
    pub names: Vec<String>,
    /// Peers whose `Forwarded` / `X-Forwarded-For` headers are believed (for `nearest`).
    pub trusted_proxies: Vec<Cidr>,
    /// The durable revocation store ([`revocations`]).
    pub revocations_db: PathBuf,
    /// Connection and request limits.
    pub limits: Limits,
    /// The relays handed out, with their regions.
    pub fleet: Vec<FleetRelay>,
    /// This API host's own region (for `nearest` when no client rule matches).
    pub region: String,
    /// Client CIDR → region rules for `nearest`, first match wins.
    pub client_regions: Vec<(Cidr, String)>,
    /// The usage database, for `/usage` (none: 404).
    pub usage_db: Option<PathBuf>,
}

/// A key that may sign requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKey {
    /// The key bytes.
    pub secret: Vec<u8>,
    /// It may mint relay tokens.
    pub mint: bool,
    /// It may revoke and read usage.
    pub admin: bool,
}

/// The HTTP server's limits (`[api.limits]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Request line and headers, in bytes; beyond it 431.
    pub max_header_bytes: usize,
    /// Header fields per request; beyond it 431.
    pub max_headers: usize,
    /// Request body, in bytes; beyond it 413.
    pub max_body_bytes: usize,
    /// The longest a connection may take to send a request's headers, counted from the accept or the
    /// end of the previous response: so also the idle keep-alive timeout (hyper's header read timeout).
    /// It bounds the TLS handshake too.
    pub header_read_timeout: Duration,
    /// The longest a request may take from its headers to its answer, body read included; then 408.
    pub request_timeout: Duration,
    /// Open connections at most; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// Requests being answered at once at most; more wait (within `request_timeout`).
    pub max_concurrent_requests: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_concurrent_requests: 64,
        }
    }
}

/// Applies a revocation (identity, horizon in Unix seconds; 0 lifts it) to the relay; with the flag set,
/// the identity's live allocations end too.
pub type RevokeHook = Box<dyn Fn(&str, u64, bool) + Send + Sync>;
/// Asks the relay for a metrics snapshot (`None` if it does not answer).
pub type MetricsHook = Box<dyn Fn() -> Option<metrics::Snapshot> + Send + Sync>;

/// Records a revocation (identity, horizon or 0, signed `x-ms-date` in Unix ms, now in Unix ms,
/// terminate) in the fleet's durable store and publishes it to every relay; `Err` when that store is
/// unreachable.
pub type FleetRevokeHook =
    Box<dyn Fn(&str, u64, u64, u64, bool) -> Result<revocations::Applied, String> + Send + Sync>;
/// The relays that can take clients now, from the fleet's registry (`None`: it is empty or
/// unreachable, and the static fleet answers).
pub type FleetRelaysHook = Box<dyn Fn() -> Option<Vec<FleetRelay>> + Send + Sync>;
/// Reads the fleet ledger: per-identity totals in `[since_ms, until_ms)`, on one relay or (`None`)
/// fleet-wide. Called from the blocking pool.
pub type LedgerHook =
    Box<dyn Fn(u64, u64, Option<&str>) -> Result<Vec<usage::IdentityUsage>, String> + Send + Sync>;

/// Hooks into the running relay.
pub struct Hooks {
    /// Apply a revocation.
    pub revoke: RevokeHook,
    /// A metrics snapshot.
    pub metrics: MetricsHook,
    /// With `[fleet]`: the fleet-wide revocation store (the local one is then its copy).
    pub fleet_revoke: Option<FleetRevokeHook>,
    /// With `[fleet]`: the live relays for `any` and `nearest`.
    pub fleet_relays: Option<FleetRelaysHook>,
    /// The fleet ledger, when `[fleet]` is configured: `/usage` reads it instead of `usage_db`.
    pub ledger: Option<LedgerHook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

/// An HTTP request, as far as the API cares.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Upper-case method.
    pub method: &'a str,
    /// The request target as sent (path and query).
    pub url: &'a str,
    /// Headers (names in any case).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: &'a [u8],
    /// The client's address (the TCP peer).
    pub peer: Option<IpAddr>,
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    fn json(status: u16, v: &Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
        }
    }

    /// The cloud API's error shape: `{"error": {"code", "message"}}`.
    fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(
            status,
            &json!({"error": {"code": code, "message": message}}),
        )
    }

    fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }
}

/// The API's logic.
#[derive(Debug)]
pub struct Api {
    /// The settings fixed at start; its live fields (keys, names, proxies, fleet, regions) are empty,
    /// they are in `live`.
    config: Config,
    /// What a reload may replace ([`ApiReload`]). The control plane's lock, never the data path's.
    live: Arc<RwLock<Arc<LiveSettings>>>,
    hooks: Hooks,
    store: Mutex<revocations::Store>,
    /// Signatures of admin requests applied, with the Unix second after which they are too old anyway.
    replay: Mutex<HashMap<String, u64>>,
    /// Requests by route and status, and their latency (counted by the HTTP layer, shown in `/metrics`).
    http_metrics: Arc<metrics::HttpMetrics>,
}

/// The API settings a reload may replace (the live part of [`Config`], and the REST secrets).
#[derive(Debug, Clone)]
struct LiveSettings {
    keys: Vec<AccessKey>,
    names: Vec<String>,
    trusted_proxies: Vec<Cidr>,
    fleet: Vec<FleetRelay>,
    region: String,
    client_regions: Vec<(Cidr, String)>,
    secrets: RestSecrets,
}

impl LiveSettings {
    /// Takes the live fields out of `config`.
    fn take(config: &mut Config, secrets: RestSecrets) -> Self {
        LiveSettings {
            keys: std::mem::take(&mut config.keys),
            names: std::mem::take(&mut config.names),
            trusted_proxies: std::mem::take(&mut config.trusted_proxies),
            fleet: std::mem::take(&mut config.fleet),
            region: std::mem::take(&mut config.region),
            client_regions: std::mem::take(&mut config.client_regions),
            secrets,
        }
    }
}

/// Replaces a running API's live settings (a configuration reload): access keys and their roles,
/// names, trusted proxies, fleet, regions and the REST secrets it mints with. Requests that start
/// after [`ApiReload::set`] see the new settings; a request in flight finishes with the old ones.
#[derive(Debug, Clone)]
pub struct ApiReload(Arc<RwLock<Arc<LiveSettings>>>);

impl ApiReload {
    /// Take over the live fields of `config` (its listen address, limits, TLS files and databases are
    /// ignored: they need a restart) and `secrets`.
    pub fn set(&self, mut config: Config, secrets: RestSecrets) {
        let live = Arc::new(LiveSettings::take(&mut config, secrets));
        match self.0.write() {
            Ok(mut l) => *l = live,
            Err(poisoned) => *poisoned.into_inner() = live,
        }
    }
}

/// The region for a client at `peer`: the first `client_regions` rule that matches, else this API's.
fn region_of(live: &LiveSettings, peer: Option<IpAddr>) -> &str {
    peer.and_then(|ip| {
        live.client_regions
            .iter()
            .find(|(cidr, _)| cidr.contains(ip))
            .map(|(_, r)| r.as_str())
    })
    .unwrap_or(&live.region)
}

/// Which endpoint family a request is for, and so which key role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Mint,
    Admin,
}

impl Api {
    /// An API minting credentials with `secrets` (the relays' REST secrets); opens the revocation store.
    pub fn new(
        config: Config,
        secrets: RestSecrets,
        hooks: Hooks,
    ) -> Result<Api, revocations::Error> {
        let store = revocations::Store::open(&config.revocations_db)?;
        let mut config = config;
        let live = Arc::new(RwLock::new(Arc::new(LiveSettings::take(
            &mut config,
            secrets,
        ))));
        Ok(Api {
            config,
            live,
            hooks,
            store: Mutex::new(store),
            replay: Mutex::new(HashMap::new()),
            http_metrics: Arc::new(metrics::HttpMetrics::new(&http::ROUTES)),
        })
    }

    /// The request counters the HTTP layer fills.
    pub(crate) fn http_metrics(&self) -> &Arc<metrics::HttpMetrics> {
        &self.http_metrics
    }

    /// A handle that replaces this API's live settings (a reload).
    pub fn reloader(&self) -> ApiReload {
        ApiReload(self.live.clone())
    }

    /// Whether every access key may both mint and use the admin endpoints (start-up warns).
    pub fn every_key_is_admin(&self) -> bool {
        self.live().keys.iter().all(|k| k.mint && k.admin)
    }

    /// The live settings now.
    fn live(&self) -> Arc<LiveSettings> {
        match self.live.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The revocations to apply to the relay at start: (identity, horizon in Unix seconds).
    pub fn active_revocations(
        &self,
        now: SystemTime,
    ) -> Result<Vec<(String, u64)>, revocations::Error> {
        match self.store.lock() {
            Ok(s) => s.active(unix_secs(now)),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Answer one request at `now` (on the API's listener).
    pub fn handle(&self, req: &Request<'_>, now: SystemTime) -> Response {
        let path = req.url.split('?').next().unwrap_or("");
        match (req.method, path) {
            ("GET", "/healthz") => Response::text(200, "text/plain", "ok\n".into()),
            ("GET", "/readyz") => match (self.hooks.metrics)() {
                Some(m) if !m.draining => Response::text(200, "text/plain", "ready\n".into()),
                Some(_) => Response::text(503, "text/plain", "draining\n".into()),
                None => Response::text(503, "text/plain", "relay not answering\n".into()),
            },
            ("GET", "/metrics") if self.config.metrics_listen.is_none() => self.metrics(),
            ("POST", "/networkTraversal/:issueRelayConfiguration") => {
                self.authed(req, now, Role::Mint, |_| self.issue(req, now))
            }
            ("POST", "/admin/revoke") => {
                self.authed(req, now, Role::Admin, |date| self.revoke(req, date, now))
            }
            ("GET", "/usage") => self.authed(req, now, Role::Admin, |_| self.usage(req.url, now)),
            (_, "/metrics") if self.config.metrics_listen.is_some() => {
                Response::error(404, "NotFound", "no such endpoint")
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/usage")
            | (_, "/networkTraversal/:issueRelayConfiguration" | "/admin/revoke") => {
                Response::error(405, "MethodNotAllowed", "method not allowed")
            }
            _ => Response::error(404, "NotFound", "no such endpoint"),
        }
    }

    /// Answer one request on the metrics listener (`metrics_listen`): `/metrics` only.
    pub fn handle_metrics(&self, req: &Request<'_>) -> Response {
        match (req.method, req.url.split('?').next().unwrap_or("")) {
            ("GET", "/metrics") => self.metrics(),
            (_, "/metrics") => Response::error(405, "MethodNotAllowed", "method not allowed"),
            _ => Response::error(404, "NotFound", "no such endpoint"),
        }
    }

    fn metrics(&self) -> Response {
        match (self.hooks.metrics)() {
            Some(mut m) => {
                m.http = Some(self.http_metrics.snapshot());
                Response::text(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics::render(&m),
                )
            }
            None => Response::error(503, "Unavailable", "the relay is not answering"),
        }
    }

    /// Check `Host`, the signature and the signing key's role, then answer with `then` (given the
    /// request's `x-ms-date`).
    fn authed(
        &self,
        req: &Request<'_>,
        now: SystemTime,
        role: Role,
        then: impl FnOnce(SystemTime) -> Response,
    ) -> Response {
        let host = req.header("host");
        if let Some(h) = host {
            if !self.is_own_name(h) {
                return Response::error(
                    401,
                    "Unauthorized",
                    "the Host header is not one of this API's names",
                );
            }
        }
        let signed = sign::Signed {
            method: req.method,
            path_and_query: req.url,
            host,
            date: req.header("x-ms-date"),
            content_hash: req.header("x-ms-content-sha256"),
            authorization: req.header("authorization"),
            body: req.body,
        };
        let live = self.live();
        let secrets: Vec<&[u8]> = live.keys.iter().map(|k| k.secret.as_slice()).collect();
        let verified = match sign::verify(&signed, &secrets, now) {
            Ok(v) => v,
            Err(e) => return Response::error(401, "Unauthorized", e.message()),
        };
        let allowed = live.keys.get(verified.key).is_some_and(|k| match role {
            Role::Mint => k.mint,
            Role::Admin => k.admin,
        });
        if !allowed {
            return Response::error(
                403,
                "Forbidden",
                match role {
                    Role::Mint => "this access key may not mint relay tokens",
                    Role::Admin => "this access key may not use the admin endpoints",
                },
            );
        }
        then(verified.date)
    }

    /// `Host` names this API: one of `names`, case-insensitively, with the port when it has one (a
    /// name listed without a port matches `name:<listen port>` too).
    fn is_own_name(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let live = self.live();
        if live.names.contains(&host) {
            return true;
        }
        match host.rsplit_once(':') {
            Some((name, port))
                if !name.is_empty() && (!name.starts_with('[') || name.ends_with(']')) =>
            {
                port.parse::<u16>()
                    .is_ok_and(|p| p == self.config.listen.port())
                    && live.names.iter().any(|n| n == name)
            }
            _ => false,
        }
    }

    /// Refuse an exact replay of an admin request (same signature) within its validity window, and
    /// remember this one.
    fn first_use(
        &self,
        req: &Request<'_>,
        signed: SystemTime,
        now: SystemTime,
    ) -> Result<(), Response> {
        let Some(signature) = req.header("authorization") else {
            return Ok(());
        };
        let Ok(mut seen) = self.replay.lock() else {
            return Err(Response::error(
                500,
                "InternalError",
                "the replay cache is unavailable",
            ));
        };
        let now = unix_secs(now);
        if seen.len() >= MAX_REPLAY_ENTRIES {
            seen.retain(|_, until| *until >= now);
        }
        if seen.get(signature).is_some_and(|until| *until >= now) {
            return Err(Response::error(
                401,
                "Unauthorized",
                "this signed request was already applied (replay)",
            ));
        }
        if seen.len() >= MAX_REPLAY_ENTRIES {
            return Err(Response::error(
                503,
                "Unavailable",
                "too many admin requests; try again later",
            ));
        }
        seen.insert(
            signature.to_string(),
            unix_secs(signed) + sign::MAX_SKEW.as_secs(),
        );
        Ok(())
    }

    /// The client's address for `nearest`: the TCP peer, or when that is a trusted proxy, the rightmost
    /// hop of `Forwarded` (or else `X-Forwarded-For`) that is not itself a trusted proxy.
    fn client_of(&self, req: &Request<'_>) -> Option<IpAddr> {
        let peer = req.peer?;
        let live = self.live();
        let trusted = |ip: IpAddr| live.trusted_proxies.iter().any(|c| c.contains(ip));
        if !trusted(peer) {
            return Some(peer);
        }
        let hops: Vec<Option<IpAddr>> = if let Some(f) = req.header("forwarded") {
            f.split(',')
                .map(|element| {
                    element
                        .split(';')
                        .filter_map(|pair| pair.trim().split_once('='))
                        .find(|(k, _)| k.eq_ignore_ascii_case("for"))
                        .and_then(|(_, v)| forwarded_ip(v))
                })
                .collect()
        } else if let Some(x) = req.header("x-forwarded-for") {
            x.split(',').map(forwarded_ip).collect()
        } else {
            return Some(peer);
        };
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) if trusted(ip) => client = ip,
                Some(ip) => return Some(ip),
                // An unreadable hop (obfuscated, "unknown"): the last address we can vouch for.
                None => return Some(client),
            }
        }
        Some(client)
    }

    fn issue(&self, req: &Request<'_>, now: SystemTime) -> Response {
        let v = match parse_object(req.body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        // Without an id each token gets an identity of its own: revoking or metering one anonymous
        // client must not touch every other one.
        let anonymous;
        let id = match v.get("id") {
            None | Some(Value::Null) => {
                anonymous = format!("anonymous-{:016x}", rand::random::<u64>());
                anonymous.as_str()
            }
            Some(Value::String(s)) if valid_identity(s) => s.as_str(),
            Some(_) => {
                return Response::error(
                    400,
                    "InvalidRequest",
                    "id must be a string of 1 to 256 printable characters",
                )
            }
        };
        let route = match v.get("routeType") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("any") => Some("any"),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("nearest") => Some("nearest"),
            Some(_) => {
                return Response::error(
                    400,
                    "InvalidRequest",
                    "routeType must be \"any\" or \"nearest\"",
                )
            }
        };
        // The longest (and default) lifetime: the relays' `[rest] max_ttl_seconds` (48 h by default).
        let live = self.live();
        let max_ttl = live.secrets.max_ttl();
        let ttl = match v.get("ttl") {
            None | Some(Value::Null) => max_ttl,
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                // Larger than the maximum: the default, as the cloud API does.
                (Some(t), _) => {
                    if t > max_ttl {
                        max_ttl
                    } else {
                        t
                    }
                }
                _ => {
                    return Response::error(
                        400,
                        "InvalidRequest",
                        "ttl must be a non-negative integer (seconds)",
                    )
                }
            },
            Some(_) => {
                return Response::error(
                    400,
                    "InvalidRequest",
                    "ttl must be a non-negative integer (seconds)",
                )
            }
        };
        let region = region_of(&live, self.client_of(req));
        let registry = self.hooks.fleet_relays.as_ref().and_then(|f| f());
        let fleet = registry.as_deref().unwrap_or(&live.fleet);
        match relay_configuration(fleet, region, &live.secrets, id, route, ttl, now) {
            Some(v) => Response::json(200, &v),
            None => Response::error(
                500,
                "NotConfigured",
                "the relay has no REST secret to mint with",
            ),
        }
    }

    fn revoke(&self, req: &Request<'_>, signed: SystemTime, now: SystemTime) -> Response {
        if let Err(r) = self.first_use(req, signed, now) {
            return r;
        }
        let v = match parse_object(req.body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let Some(id) = v
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| valid_identity(s))
        else {
            return Response::error(400, "InvalidRequest", "id (string) is required");
        };
        // Default horizon: every credential the relays still accept (none outlives now + the maximum
        // ttl + the clock skew allowance).
        let until = match v.get("until") {
            None | Some(Value::Null) => {
                unix_secs(now) + self.live().secrets.max_ttl() + crate::auth::EXPIRY_SKEW
            }
            Some(Value::String(s)) => match humantime::parse_rfc3339(s) {
                Ok(t) => unix_secs(t),
                Err(_) => {
                    return Response::error(
                        400,
                        "InvalidRequest",
                        "until must be an RFC 3339 date-time",
                    )
                }
            },
            Some(_) => {
                return Response::error(
                    400,
                    "InvalidRequest",
                    "until must be an RFC 3339 date-time",
                )
            }
        };
        // By default a revoke also ends the identity's live allocations; `false` only refuses new requests.
        let terminate = match v.get("terminate") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Response::error(400, "InvalidRequest", "terminate must be a boolean")
            }
        };
        let lift = until <= unix_secs(now);
        let stored = if lift { 0 } else { until };
        let terminate = terminate && !lift;
        let stale = || {
            Response::error(
                401,
                "Unauthorized",
                "a revoke or lift of this identity with a later x-ms-date was already applied",
            )
        };
        // With a fleet, PostgreSQL is the record (and orders the requests fleet-wide); the local
        // store keeps the copy a relay starts from when the database is unreachable.
        let in_fleet = match &self.hooks.fleet_revoke {
            Some(fleet) => {
                match fleet(id, stored, unix_ms_at(signed), unix_ms_at(now), terminate) {
                    Ok(revocations::Applied::Recorded) => true,
                    Ok(revocations::Applied::Stale(_)) => return stale(),
                    Err(e) => {
                        return Response::error(
                            503,
                            "Unavailable",
                            &format!("the fleet's revocation store is unreachable: {e}"),
                        )
                    }
                }
            }
            None => false,
        };
        let applied = match self.store.lock() {
            Ok(s) => s.apply(id, stored, unix_ms_at(signed), unix_ms_at(now)),
            Err(_) => {
                return Response::error(500, "StorageError", "the revocation store is unavailable")
            }
        };
        match applied {
            Ok(revocations::Applied::Recorded) => {}
            // The fleet's record decides; the copy catches up.
            Ok(revocations::Applied::Stale(_)) if in_fleet => {}
            Ok(revocations::Applied::Stale(_)) => return stale(),
            Err(e) if in_fleet => tracing::warn!("revocation: the local copy failed: {e}"),
            Err(e) => return Response::error(500, "StorageError", &e.to_string()),
        }
        (self.hooks.revoke)(id, stored, terminate);
        Response::json(
            200,
            &json!({
                "id": id,
                "revoked": !lift,
                "terminated": terminate,
                "until": humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(until)).to_string(),
            }),
        )
    }

    fn usage(&self, url: &str, now: SystemTime) -> Response {
        if self.hooks.ledger.is_none() && self.config.usage_db.is_none() {
            return Response::error(404, "NotFound", "metering is not configured");
        }
        let (mut since, mut until, mut relay) = (None, None, None);
        let query = url.split_once('?').map_or("", |(_, q)| q);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*k {
                "since" => &mut since,
                "until" => &mut until,
                "relay" => {
                    relay = Some(v.into_owned());
                    continue;
                }
                _ => continue,
            };
            match humantime::parse_rfc3339(&v) {
                Ok(t) => *slot = Some(unix_ms_at(t)),
                Err(_) => {
                    return Response::error(
                        400,
                        "InvalidRequest",
                        &format!("{k} must be an RFC 3339 date-time"),
                    )
                }
            }
        }
        let (since, until) = usage::summary_range(since, until, unix_ms_at(now));
        let rows = match (&self.hooks.ledger, &self.config.usage_db) {
            (Some(ledger), _) => ledger(since, until, relay.as_deref()),
            (None, _) if relay.is_some() => {
                return Response::error(
                    400,
                    "InvalidRequest",
                    "relay= needs the fleet ledger ([fleet])",
                )
            }
            (None, Some(db)) => usage::Store::open_reader(db)
                .and_then(|s| s.summary(since, until))
                .map_err(|e| e.to_string()),
            (None, None) => Err("metering is not configured".into()),
        };
        match rows {
            Ok(rows) => Response::json(200, &json!({ "identities": rows })),
            Err(e) => Response::error(500, "StorageError", &e),
        }
    }
}

/// The token endpoint's answer: credentials for `id` valid `ttl` seconds from `now`, minted with the
/// current REST secret, and the relays of `fleet` for `route` (`None`: one entry per route type;
/// `nearest`: the relays of `region`). `None` when there is no secret.
pub fn relay_configuration(
    fleet: &[FleetRelay],
    region: &str,
    secrets: &RestSecrets,
    id: &str,
    route: Option<&str>,
    ttl: u64,
    now: SystemTime,
) -> Option<Value> {
    let cred = secrets.mint(id, unix_secs(now), ttl)?;
    let entry = |route: &str| {
        let urls: Vec<String> = fleet
            .iter()
            .filter(|r| route == "any" || r.region == region)
            .flat_map(|r| {
                let udp = r
                    .addresses
                    .iter()
                    .flat_map(|a| [format!("stun:{a}"), format!("turn:{a}?transport=udp")]);
                let tcp = r
                    .tcp_addresses
                    .iter()
                    .map(|a| format!("turn:{a}?transport=tcp"));
                let tls = r
                    .tls_addresses
                    .iter()
                    .map(|a| format!("turns:{a}?transport=tcp"));
                udp.chain(tcp).chain(tls).collect::<Vec<_>>()
            })
            .collect();
        json!({
            "urls": urls,
            "username": cred.username,
            "credential": cred.password,
            "routeType": route,
        })
    };
    let servers: Vec<Value> = match route {
        Some(r) => vec![entry(r)],
        None => vec![entry("any"), entry("nearest")],
    };
    let expires = UNIX_EPOCH + Duration::from_secs(cred.expiry);
    Some(json!({
        "expiresOn": humantime::format_rfc3339_seconds(expires).to_string(),
        "iceServers": servers,
    }))
}

fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Response::error(
            400,
            "InvalidRequest",
            "the body must be a JSON object",
        )),
    }
}

/// The address in one `X-Forwarded-For` hop or `Forwarded` `for=` value (RFC 7239: maybe quoted, IPv6
/// in brackets, maybe with a port).
fn forwarded_ip(v: &str) -> Option<IpAddr> {
    let v = v.trim().trim_matches('"');
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    v.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

fn valid_identity(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests;
