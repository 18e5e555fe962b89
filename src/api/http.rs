//! The API's HTTP server: axum on hyper 1 (HTTP/1.1), on the control-plane tokio runtime
//! ([`control_plane_runtime`]: two threads plus a small blocking pool for [`Api::handle`]), which the
//! fleet's PostgreSQL work shares; the relay's data plane never sees it.
//!
//! ```text
//!  accept ─▶ connection permit (max_connections; none: close) ─▶ [TLS handshake ≤ header_read_timeout]
//!    ─▶ hyper http1 (header_read_timeout, max_header_bytes, max_headers; 431 / close)
//!    ─▶ request metrics (route, status, latency) ─▶ TimeoutLayer (request_timeout: 408)
//!    ─▶ GlobalConcurrencyLimit (max_concurrent_requests)
//!    ─▶ RequestBodyLimit (max_body_bytes: 413) ─▶ Api::handle (on the blocking pool unless it only
//!       computes: minting, /healthz)
//! ```
//!
//! The TLS configuration can be replaced while running ([`ApiTls::set`], on SIGHUP); connections
//! already open keep theirs. [`ApiHandle::stop`] stops accepting, lets requests in flight finish (up to
//! [`GRACE`]), then ends the runtime.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::ServiceExt as _;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use super::{Api, Limits, Request, Response};

/// How long [`ApiHandle::stop`] lets requests in flight finish.
pub const GRACE: Duration = Duration::from_secs(5);
/// The token endpoint's path.
const TOKEN_PATH: &str = "/networkTraversal/:issueRelayConfiguration";
/// The `route` label values of the request metrics, in [`route`]'s order.
pub(super) const ROUTES: [&str; 7] = [
    "token", "revoke", "usage", "healthz", "readyz", "metrics", "other",
];

/// The index in [`ROUTES`] of a request path (a bounded label: unknown paths are `other`).
fn route(path: &str) -> usize {
    match path {
        TOKEN_PATH => 0,
        "/admin/revoke" => 1,
        "/usage" => 2,
        "/healthz" => 3,
        "/readyz" => 4,
        "/metrics" => 5,
        _ => 6,
    }
}

/// Threads answering requests ([`Api::handle`] may wait on SQLite or the control thread).
const BLOCKING_THREADS: usize = 8;

type TlsSlot = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// A running API server.
pub struct ApiHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    tls: Option<TlsSlot>,
    stop: watch::Sender<bool>,
    loops: Vec<tokio::task::JoinHandle<()>>,
    handle: tokio::runtime::Handle,
    /// The runtime, when [`serve`] made one for this server alone.
    runtime: Option<tokio::runtime::Runtime>,
    stopped: bool,
}

impl std::fmt::Debug for ApiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandle")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl ApiHandle {
    /// The address it listens on (port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics listener's address, when `/metrics` has one of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The handle that replaces the TLS configuration (none: the API is plain HTTP).
    pub fn tls(&self) -> Option<ApiTls> {
        self.tls.clone().map(ApiTls)
    }

    /// Stop accepting, let requests in flight finish (up to `GRACE`), and end the runtime if
    /// [`serve`] made one for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let _ = self.stop.send(true);
        let loops = std::mem::take(&mut self.loops);
        self.handle.block_on(async move {
            for l in loops {
                let _ = l.await;
            }
        });
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Replaces the API's TLS configuration for new connections (a reloaded certificate).
#[derive(Debug, Clone)]
pub struct ApiTls(TlsSlot);

impl ApiTls {
    /// Serve new connections with `config`; connections already open keep theirs.
    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        if let Ok(mut c) = self.0.write() {
            *c = config;
        }
    }
}

/// The control-plane runtime: the HTTP API and the fleet's PostgreSQL work (the shipper, the pool)
/// run on it, off the data path.
pub fn control_plane_runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("turnpike-control")
        .enable_all()
        .build()
}

/// Listen on `api`'s addresses (TLS with `tls`, plain HTTP without) and answer requests on a runtime of
/// its own ([`control_plane_runtime`]).
pub fn serve(api: Api, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<ApiHandle> {
    let runtime = control_plane_runtime()?;
    let mut handle = serve_on(runtime.handle(), api, tls)?;
    handle.runtime = Some(runtime);
    Ok(handle)
}

/// [`serve`] on `runtime` (a multi-thread one, such as [`control_plane_runtime`]), which the caller
/// keeps running until [`ApiHandle::stop`].
pub fn serve_on(
    runtime: &tokio::runtime::Handle,
    api: Api,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<ApiHandle> {
    let limits = api.config.limits.clone();
    let listen = api.config.listen;
    let metrics_listen = api.config.metrics_listen;
    let bind = |addr: SocketAddr| -> io::Result<TcpListener> {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("api listen {addr}: {e}")))?;
        l.set_nonblocking(true)?;
        let _guard = runtime.enter();
        TcpListener::from_std(l)
    };
    let main = bind(listen)?;
    let addr = main.local_addr()?;
    let metrics = metrics_listen.map(bind).transpose()?;
    let metrics_addr = metrics.as_ref().map(TcpListener::local_addr).transpose()?;

    let api = Arc::new(api);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let requests = Arc::new(Semaphore::new(limits.max_concurrent_requests));
    let (stop, stopped) = watch::channel(false);
    let tls_slot = tls.map(|c| Arc::new(RwLock::new(c)));
    let mut loops = Vec::new();
    let app = router(&api, &limits, &requests, false);
    loops.push(runtime.spawn(accept_loop(
        main,
        app,
        tls_slot.clone(),
        limits.clone(),
        connections.clone(),
        stopped.clone(),
    )));
    if let Some(m) = metrics {
        let app = router(&api, &limits, &requests, true);
        loops.push(runtime.spawn(accept_loop(
            m,
            app,
            None,
            limits.clone(),
            connections,
            stopped,
        )));
    }
    tracing::info!(%addr, tls = tls_slot.is_some(), ?metrics_addr, "api listening");
    if api.every_key_is_admin() {
        tracing::warn!(
            "api.access_keys: every key may mint, revoke and read usage; give admin keys a list of \
             their own (api.admin_keys) so that the keys apps hold cannot revoke"
        );
    }
    Ok(ApiHandle {
        addr,
        metrics_addr,
        tls: tls_slot,
        stop,
        loops,
        handle: runtime.clone(),
        runtime: None,
        stopped: false,
    })
}

/// The axum app: every request goes to [`Api::handle`] (or [`Api::handle_metrics`]) through the limits.
fn router(
    api: &Arc<Api>,
    limits: &Limits,
    requests: &Arc<Semaphore>,
    metrics_only: bool,
) -> Router {
    let counted = api.http_metrics().clone();
    let api = api.clone();
    let max_body = limits.max_body_bytes;
    Router::new()
        .fallback(move |req: axum::extract::Request| {
            answer(api.clone(), req, max_body, metrics_only)
        })
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(
            requests.clone(),
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(axum::middleware::map_response(json_errors))
        // Outermost: every answer the service gives (the layers' 408 and 413 included) is counted
        // by route and status, its time from the request head to the response head. Refusals
        // hyper makes itself (431, a connection closed at the header timeout) never reach it.
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let counted = counted.clone();
                async move {
                    let (at, started) = (route(req.uri().path()), Instant::now());
                    let resp = next.run(req).await;
                    counted.record(at, resp.status().as_u16(), started.elapsed());
                    resp
                }
            },
        ))
}

/// Give the layers' own refusals (408, 413: empty or plain-text bodies) the cloud API's error JSON.
async fn json_errors(resp: axum::response::Response) -> axum::response::Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match resp.status() {
        StatusCode::REQUEST_TIMEOUT if !is_json => to_http(Response::error(
            408,
            "RequestTimeout",
            "the request took too long to arrive",
        )),
        StatusCode::PAYLOAD_TOO_LARGE if !is_json => to_http(Response::error(
            413,
            "PayloadTooLarge",
            "the body is too large",
        )),
        _ => resp,
    }
}

async fn answer(
    api: Arc<Api>,
    req: axum::extract::Request,
    max_body: usize,
    metrics_only: bool,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = match axum::body::to_bytes(body, max_body).await {
        Ok(b) => b,
        Err(_) => {
            return to_http(Response::error(
                413,
                "PayloadTooLarge",
                "the body is too large",
            ))
        }
    };
    let peer = parts.extensions.get::<Peer>().map(|p| p.0.ip());
    let method = parts.method.as_str().to_ascii_uppercase();
    let url = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let run = move || {
        let r = Request {
            method: &method,
            url: &url,
            headers,
            body: &body,
            peer,
        };
        if metrics_only {
            api.handle_metrics(&r)
        } else {
            api.handle(&r, SystemTime::now())
        }
    };
    // Minting and /healthz only compute: answer them here. The rest may wait on SQLite or on the
    // control thread (/readyz, /metrics): the blocking pool.
    let path = parts.uri.path();
    let resp = if !metrics_only && (path == TOKEN_PATH || path == "/healthz") {
        run()
    } else {
        tokio::task::spawn_blocking(run)
            .await
            .unwrap_or_else(|_| Response::error(500, "InternalError", "the request handler failed"))
    };
    to_http(resp)
}

fn to_http(r: Response) -> axum::response::Response {
    let mut out = axum::response::Response::new(Body::from(r.body));
    *out.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(r.content_type),
    );
    out
}

/// The TCP peer of a request's connection (a request extension).
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsSlot>,
    limits: Limits,
    connections: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut refused: u64 = 0;
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: the relay shares the fd limit. Back off instead of spinning.
                    tracing::warn!("api accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max = limits.max_connections,
                    "api: connection limit reached, closing new connections"
                );
            }
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let app = app.clone();
        let tls = tls
            .as_ref()
            .and_then(|slot| slot.read().ok().map(|c| c.clone()));
        let watcher = graceful.watcher();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = app.map_request(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(Peer(peer));
                req
            });
            let svc = TowerToHyperService::new(svc);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_header_size(limits.max_header_bytes)
                .max_headers(limits.max_headers)
                .keep_alive(true);
            match tls {
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let stream = match tokio::time::timeout(
                        limits.header_read_timeout,
                        acceptor.accept(sock),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "api tls handshake: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = http.serve_connection(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn).await;
                }
                None => {
                    let conn = http.serve_connection(TokioIo::new(sock), svc);
                    let _ = watcher.watch(conn).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("api: requests still in flight after {GRACE:?}, closing them");
    }
}
