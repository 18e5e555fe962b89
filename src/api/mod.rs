//! The HTTP API: the relay token endpoint of the cloud network-traversal API (self-hosted), admin
//! revocation, usage summaries, Prometheus `/metrics`, and `/healthz` / `/readyz`.
//!
//! | method and path | auth | what |
//! |---|---|---|
//! | `POST /networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview` | HMAC | relay credentials and ICE servers |
//! | `POST /admin/revoke?api-version=...` | HMAC | revoke an identity's credentials (`{"id", "until"?}`) |
//! | `GET /usage?since=..&until=..` | HMAC | per-identity usage summary (RFC 3339 bounds; default: the 31 days up to now) |
//! | `GET /metrics` | none | Prometheus text format |
//! | `GET /healthz`, `GET /readyz` | none | liveness; readiness (503 while draining) |
//!
//! [`Api::handle`] is the whole logic, sans-IO: a request in, a response out, time as an argument. [`serve`]
//! runs it on tiny_http's blocking server (plain HTTP or rustls TLS), on threads of its own, away from the
//! relay's data path.
//!
//! May use: auth, metrics, usage, policy.

pub mod sign;

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::clock::{unix_ms_at as unix_ms, unix_secs as unix};

use serde_json::{json, Value};

use crate::auth::RestSecrets;
use crate::metrics;
use crate::policy::Cidr;
use crate::usage;

/// The longest (and default) credential lifetime, as in the cloud API: 48 hours.
pub const MAX_TTL: u64 = 172_800;
/// Requests with larger bodies get 413.
const MAX_BODY: usize = 64 * 1024;
/// HTTP worker threads.
const THREADS: usize = 2;

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
    /// TLS certificate chain and private key (PEM files); plain HTTP without.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Access keys (decoded from base64); any of them may sign a request.
    pub access_keys: Vec<Vec<u8>>,
    /// The relays handed out, with their regions.
    pub fleet: Vec<FleetRelay>,
    /// This API host's own region (for `nearest` when no client rule matches).
    pub region: String,
    /// Client CIDR → region rules for `nearest`, first match wins.
    pub client_regions: Vec<(Cidr, String)>,
    /// The usage database, for `/usage` (none: 404).
    pub usage_db: Option<PathBuf>,
}

/// Applies a revocation (identity, horizon in Unix seconds; 0 lifts it) to the relay.
pub type RevokeHook = Box<dyn Fn(&str, u64) + Send + Sync>;
/// Asks the relay for a metrics snapshot (`None` if it does not answer).
pub type MetricsHook = Box<dyn Fn() -> Option<metrics::Snapshot> + Send + Sync>;

/// Hooks into the running relay.
pub struct Hooks {
    /// Apply a revocation.
    pub revoke: RevokeHook,
    /// A metrics snapshot.
    pub metrics: MetricsHook,
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
    /// The client's address.
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
    config: Config,
    secrets: RestSecrets,
    hooks: Hooks,
}

impl Api {
    /// An API minting credentials with `secrets` (the relays' REST secrets).
    pub fn new(config: Config, secrets: RestSecrets, hooks: Hooks) -> Api {
        Api {
            config,
            secrets,
            hooks,
        }
    }

    /// Answer one request at `now`.
    pub fn handle(&self, req: &Request<'_>, now: SystemTime) -> Response {
        let path = req.url.split('?').next().unwrap_or("");
        match (req.method, path) {
            ("GET", "/healthz") => Response::text(200, "text/plain", "ok\n".into()),
            ("GET", "/readyz") => match (self.hooks.metrics)() {
                Some(m) if !m.draining => Response::text(200, "text/plain", "ready\n".into()),
                Some(_) => Response::text(503, "text/plain", "draining\n".into()),
                None => Response::text(503, "text/plain", "relay not answering\n".into()),
            },
            ("GET", "/metrics") => match (self.hooks.metrics)() {
                Some(m) => Response::text(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics::render(&m),
                ),
                None => Response::error(503, "Unavailable", "the relay is not answering"),
            },
            ("POST", "/networkTraversal/:issueRelayConfiguration") => {
                self.authed(req, now, |body| self.issue(body, req.peer, now))
            }
            ("POST", "/admin/revoke") => self.authed(req, now, |body| self.revoke(body, now)),
            ("GET", "/usage") => self.authed(req, now, |_| self.usage(req.url, now)),
            (_, "/healthz" | "/readyz" | "/metrics" | "/usage")
            | (_, "/networkTraversal/:issueRelayConfiguration" | "/admin/revoke") => {
                Response::error(405, "MethodNotAllowed", "method not allowed")
            }
            _ => Response::error(404, "NotFound", "no such endpoint"),
        }
    }

    fn authed(
        &self,
        req: &Request<'_>,
        now: SystemTime,
        then: impl FnOnce(&[u8]) -> Response,
    ) -> Response {
        let signed = sign::Signed {
            method: req.method,
            path_and_query: req.url,
            host: req.header("host"),
            date: req.header("x-ms-date"),
            content_hash: req.header("x-ms-content-sha256"),
            authorization: req.header("authorization"),
            body: req.body,
        };
        match sign::verify(&signed, &self.config.access_keys, now) {
            Ok(()) => then(req.body),
            Err(e) => Response::error(401, "Unauthorized", e.message()),
        }
    }

    fn issue(&self, body: &[u8], peer: Option<IpAddr>, now: SystemTime) -> Response {
        let v = match parse_object(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let id = match v.get("id") {
            None | Some(Value::Null) => "anonymous",
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
        let ttl = match v.get("ttl") {
            None | Some(Value::Null) => MAX_TTL,
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                // Larger than the maximum: the default, as the cloud API does.
                (Some(t), _) => {
                    if t > MAX_TTL {
                        MAX_TTL
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
        let region = self.region_of(peer);
        match relay_configuration(
            &self.config.fleet,
            region,
            &self.secrets,
            id,
            route,
            ttl,
            now,
        ) {
            Some(v) => Response::json(200, &v),
            None => Response::error(
                500,
                "NotConfigured",
                "the relay has no REST secret to mint with",
            ),
        }
    }

    fn region_of(&self, peer: Option<IpAddr>) -> &str {
        peer.and_then(|ip| {
            self.config
                .client_regions
                .iter()
                .find(|(cidr, _)| cidr.contains(ip))
                .map(|(_, r)| r.as_str())
        })
        .unwrap_or(&self.config.region)
    }

    fn revoke(&self, body: &[u8], now: SystemTime) -> Response {
        let v = match parse_object(body) {
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
        // Default horizon: every credential minted so far (none outlives now + the maximum ttl).
        let until = match v.get("until") {
            None | Some(Value::Null) => unix(now) + MAX_TTL,
            Some(Value::String(s)) => match humantime::parse_rfc3339(s) {
                Ok(t) => unix(t),
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
        let lift = until <= unix(now);
        let stored = if lift { 0 } else { until };
        if let Some(db) = &self.config.usage_db {
            let res =
                usage::Store::open_reader(db).and_then(|s| s.revoke(id, stored, unix_ms(now)));
            if let Err(e) = res {
                return Response::error(500, "StorageError", &e.to_string());
            }
        }
        (self.hooks.revoke)(id, stored);
        Response::json(
            200,
            &json!({
                "id": id,
                "revoked": !lift,
                "until": humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(until)).to_string(),
            }),
        )
    }

    fn usage(&self, url: &str, now: SystemTime) -> Response {
        let Some(db) = &self.config.usage_db else {
            return Response::error(404, "NotFound", "metering is not configured");
        };
        let (mut since, mut until) = (None, None);
        let query = url.split_once('?').map_or("", |(_, q)| q);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*k {
                "since" => &mut since,
                "until" => &mut until,
                _ => continue,
            };
            match humantime::parse_rfc3339(&v) {
                Ok(t) => *slot = Some(unix_ms(t)),
                Err(_) => {
                    return Response::error(
                        400,
                        "InvalidRequest",
                        &format!("{k} must be an RFC 3339 date-time"),
                    )
                }
            }
        }
        let (since, until) = usage::summary_range(since, until, unix_ms(now));
        match usage::Store::open_reader(db).and_then(|s| s.summary(since, until)) {
            Ok(rows) => Response::json(200, &json!({ "identities": rows })),
            Err(e) => Response::error(500, "StorageError", &e.to_string()),
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
    let cred = secrets.mint(id, unix(now), ttl)?;
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

fn valid_identity(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)
}

/// A running API server.
pub struct ApiHandle {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ApiHandle {
    /// The address it listens on (port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and wait for the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Listen on `api.config.listen` (TLS when configured) and answer requests on threads of its own.
pub fn serve(api: Api) -> std::io::Result<ApiHandle> {
    let listen = api.config.listen;
    let server = match &api.config.tls {
        None => tiny_http::Server::http(listen),
        Some((cert, key)) => {
            let certificate = std::fs::read(cert)
                .map_err(|e| std::io::Error::new(e.kind(), format!("api tls certificate {}: {e}", cert.display())))?;
            let private_key = std::fs::read(key)
                .map_err(|e| std::io::Error::new(e.kind(), format!("api tls key {}: {e}", key.display())))?;
            // tiny_http panics on keys it cannot read; refuse them here with a message instead.
            let text = String::from_utf8_lossy(&private_key);
            if !text.contains("-----BEGIN PRIVATE KEY-----") && !text.contains("-----BEGIN RSA PRIVATE KEY-----") {
                return Err(std::io::Error::other(format!(
                    "api tls key {}: must be an unencrypted PKCS#8 (BEGIN PRIVATE KEY) or RSA PEM key",
                    key.display()
                )));
            }
            tiny_http::Server::https(
                listen,
                tiny_http::SslConfig {
                    certificate,
                    private_key,
                },
            )
        }
    }
    .map_err(|e| std::io::Error::other(format!("api listen {listen}: {e}")))?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("api: not an IP listener"))?;
    let server = Arc::new(server);
    let api = Arc::new(api);
    let mut threads = Vec::with_capacity(THREADS);
    for k in 0..THREADS {
        let (server, api) = (server.clone(), api.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("turnpike-api-{k}"))
                .spawn(move || {
                    while let Ok(req) = server.recv() {
                        answer(&api, req);
                    }
                })?,
        );
    }
    tracing::info!(%addr, tls = api.config.tls.is_some(), "api listening");
    Ok(ApiHandle {
        server,
        addr,
        threads,
    })
}

fn answer(api: &Api, mut req: tiny_http::Request) {
    let mut body = Vec::new();
    let too_big = req
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_or(true, |n| n > MAX_BODY);
    let resp = if too_big {
        Response::error(413, "PayloadTooLarge", "the body is too large")
    } else {
        let method = req.method().as_str().to_ascii_uppercase();
        let headers = req
            .headers()
            .iter()
            .map(|h| {
                (
                    h.field.as_str().as_str().to_string(),
                    h.value.as_str().to_string(),
                )
            })
            .collect();
        let r = Request {
            method: &method,
            url: req.url(),
            headers,
            body: &body,
            peer: req.remote_addr().map(|a| a.ip()),
        };
        api.handle(&r, SystemTime::now())
    };
    let content_type =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], resp.content_type.as_bytes());
    let mut out = tiny_http::Response::from_data(resp.body).with_status_code(resp.status);
    if let Ok(h) = content_type {
        out = out.with_header(h);
    }
    let _ = req.respond(out);
}

#[cfg(test)]
mod tests;
