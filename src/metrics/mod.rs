//! Prometheus metrics: plain snapshots of the relay's counters, and their rendering in the Prometheus
//! text format (prometheus-client).
//!
//! The counters themselves live where they are counted: per-worker relaxed atomics on the workers' own
//! cache lines (the data plane) and the server core's `Stats` (the control thread). Whoever
//! owns them fills a [`Snapshot`]; [`render`] builds a fresh registry from it for each scrape, so nothing
//! here is shared with the fast path. There are no per-identity labels (their number is unbounded):
//! identities belong in usage records.
//!
//! May use: nothing else in turnpike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Bytes and packets relayed, per direction: the four usage numbers, for one relay socket, one
/// allocation, one worker or the whole relay (the one type for them; `route` re-exports it). Bytes are
/// application data (the payload), not headers, so that billing does not depend on the client's framing
/// choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Payload bytes client → peer.
    pub to_peer_bytes: u64,
    /// Datagrams client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes peer → client.
    pub to_client_bytes: u64,
    /// Datagrams peer → client.
    pub to_client_packets: u64,
}

impl Counters {
    /// Add `more` to these.
    pub fn add(&mut self, more: Counters) {
        self.to_peer_bytes += more.to_peer_bytes;
        self.to_peer_packets += more.to_peer_packets;
        self.to_client_bytes += more.to_client_bytes;
        self.to_client_packets += more.to_client_packets;
    }
}

/// One worker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Datagrams received.
    pub rx: u64,
    /// Datagrams sent.
    pub tx: u64,
    /// Drops by reason.
    pub drops: Vec<(&'static str, u64)>,
    /// What its fast path relayed.
    pub relayed: Counters,
    /// Its loop is running (false once it exited: the relay then drains and stops).
    pub ready: bool,
}

/// TCP or TLS connections of one transport, over all workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSnapshot {
    /// `tcp` or `tls`.
    pub transport: &'static str,
    /// Open now.
    pub open: u64,
    /// Accepted since start.
    pub accepted: u64,
    /// Refused by a limit (connections, per source, TLS handshakes under way) since start.
    pub refused: u64,
}

/// The TURN core's state and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSnapshot {
    /// Live allocations (pending ones included).
    pub allocations: u64,
    /// Allocations that became active.
    pub allocations_created: u64,
    /// Refused Allocate requests by STUN error code.
    pub allocation_errors: Vec<(u16, u64)>,
    /// Installed permissions.
    pub permissions: u64,
    /// Bound channels.
    pub channels: u64,
    /// 401 challenges sent (the normal first round trip of a client).
    pub challenges: u64,
    /// Authentication failures by kind (`bad_credentials`, `stale_nonce`, `revoked`).
    pub auth_failures: Vec<(&'static str, u64)>,
    /// Datagrams the core dropped or refused, by reason.
    pub drops: Vec<(&'static str, u64)>,
    /// The allocation quota (`quotas.max_allocations`, after fitting under the open-file limit).
    pub max_allocations: u64,
}

/// Configuration reloads, counted where they happen (the SIGHUP handler) and read by the control thread
/// for [`Snapshot::reloads`]. Control plane only.
#[derive(Debug, Default)]
pub struct Reloads {
    ok: AtomicU64,
    failed: AtomicU64,
    last_ok_unix: AtomicU64,
}

/// A copy of [`Reloads`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadSnapshot {
    /// Reloads applied.
    pub ok: u64,
    /// Reloads refused (the file was unreadable or invalid, or the relay did not take it).
    pub failed: u64,
    /// When the last reload was applied (Unix seconds), 0 if none yet.
    pub last_ok_unix: u64,
}

impl Reloads {
    /// Count a reload: applied (`ok`, at `unix_now`) or refused.
    pub fn record(&self, ok: bool, unix_now: u64) {
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
            self.last_ok_unix.store(unix_now, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> ReloadSnapshot {
        ReloadSnapshot {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            last_ok_unix: self.last_ok_unix.load(Ordering::Relaxed),
        }
    }
}

/// Upper bounds (seconds) of the HTTP API's latency histogram buckets; one more bucket counts the rest.
pub const HTTP_LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Status codes counted one by one (100–599); others count as 599.
const STATUSES: usize = 500;

/// The HTTP API's request counters, by route and status, and a latency histogram by route: relaxed
/// atomics in fixed tables, sized at start from the routes the API names. Written by the API's
/// request layer (control plane), read by [`HttpMetrics::snapshot`].
#[derive(Debug)]
pub struct HttpMetrics {
    routes: &'static [&'static str],
    /// `routes.len() × STATUSES`: requests answered with status `100 + i`.
    requests: Box<[AtomicU64]>,
    /// `routes.len() × (buckets + 1)`: requests whose answer took up to each bound (not cumulative).
    latency: Box<[AtomicU64]>,
    /// Per route: the answers' total time in microseconds.
    latency_sum_us: Box<[AtomicU64]>,
}

/// A copy of [`HttpMetrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpSnapshot {
    /// (route, status, requests), only the non-zero ones.
    pub requests: Vec<(&'static str, u16, u64)>,
    /// Per route: requests per latency bucket ([`HTTP_LATENCY_BUCKETS`], then the rest; not
    /// cumulative), and their total time in microseconds.
    pub latency: Vec<(&'static str, Vec<u64>, u64)>,
}

impl HttpMetrics {
    /// Counters for `routes` (the label values; the API picks one per request).
    pub fn new(routes: &'static [&'static str]) -> Self {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        HttpMetrics {
            routes,
            requests: zeros(routes.len() * STATUSES),
            latency: zeros(routes.len() * (HTTP_LATENCY_BUCKETS.len() + 1)),
            latency_sum_us: zeros(routes.len()),
        }
    }

    /// Count one request on route `route` (an index into the routes) answered with `status` after
    /// `took`. An unknown route index is ignored.
    pub fn record(&self, route: usize, status: u16, took: Duration) {
        if route >= self.routes.len() {
            return;
        }
        let code = usize::from(status.clamp(100, 599) - 100);
        if let Some(c) = self.requests.get(route * STATUSES + code) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let bucket = HTTP_LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(HTTP_LATENCY_BUCKETS.len());
        if let Some(c) = self
            .latency
            .get(route * (HTTP_LATENCY_BUCKETS.len() + 1) + bucket)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(s) = self.latency_sum_us.get(route) {
            s.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> HttpSnapshot {
        let width = HTTP_LATENCY_BUCKETS.len() + 1;
        let mut out = HttpSnapshot::default();
        for (r, route) in self.routes.iter().enumerate() {
            for (i, c) in self.requests[r * STATUSES..(r + 1) * STATUSES]
                .iter()
                .enumerate()
            {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    out.requests.push((route, 100 + i as u16, n));
                }
            }
            let buckets: Vec<u64> = self.latency[r * width..(r + 1) * width]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            let sum_us = self.latency_sum_us[r].load(Ordering::Relaxed);
            out.latency.push((route, buckets, sum_us));
        }
        out
    }
}

/// Everything `/metrics` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The packet I/O backend in use (`epoll`, `io_uring`).
    pub backend: &'static str,
    /// Whether the relay is draining (refusing new allocations before it stops).
    pub draining: bool,
    /// Per worker, in worker order.
    pub workers: Vec<WorkerSnapshot>,
    /// Workers whose loop ended while the relay ran (the relay is then draining to an error exit).
    pub workers_lost: u64,
    /// STUN copies queued from the workers to the control thread now: (messages, bytes). Beyond its
    /// bounds they are dropped (`dropped_packets{reason="control_busy"}`).
    pub control_queue: (u64, u64),
    /// Replies to TCP/TLS clients dropped because their worker's mailbox was full.
    pub mailbox_full: u64,
    /// The TURN core.
    pub server: ServerSnapshot,
    /// Configuration reloads.
    pub reloads: ReloadSnapshot,
    /// Datagrams the XDP fast path forwarded, both directions (0 without XDP).
    pub xdp_packets: u64,
    /// When the process started (Unix seconds).
    pub started_unix: u64,
    /// TCP and TLS connections, by transport (empty without stream listeners).
    pub streams: Vec<StreamSnapshot>,
    /// Batches of usage records the metering writer could not store (the database refused them).
    pub usage_write_failures: u64,
    /// With `[fleet]`: PostgreSQL is unreachable and the relay enforces the revocations it last saw
    /// (its local copy), until its listener has caught up again.
    pub revocations_local_copy: bool,
    /// The HTTP API's requests, when the API serves this snapshot.
    pub http: Option<HttpSnapshot>,
}

impl Snapshot {
    /// What every worker relayed, summed.
    pub fn relayed(&self) -> Counters {
        let mut t = Counters::default();
        for w in &self.workers {
            t.add(w.relayed);
        }
        t
    }
}

type Labels = Vec<(String, String)>;

/// Render `snap` in the Prometheus text exposition format (OpenMetrics flavour of prometheus-client,
/// which Prometheus and its Python parser read).
pub fn render(snap: &Snapshot) -> String {
    let mut r = Registry::with_prefix("turnpike");
    r.register(
        "build",
        "Build information",
        Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
    );
    r.register(
        "backend",
        "Packet I/O backend in use",
        Info::new(vec![("backend".to_string(), snap.backend.to_string())]),
    );
    gauge(
        &mut r,
        "draining",
        "1 while draining (refusing new allocations)",
        i64::from(snap.draining),
    );
    gauge(
        &mut r,
        "workers_lost",
        "Workers whose loop ended while the relay ran (not ready; the relay drains and exits non-zero)",
        snap.workers_lost as i64,
    );
    gauge(
        &mut r,
        "control_queue_messages",
        "STUN messages queued for the control thread",
        snap.control_queue.0 as i64,
    );
    gauge(
        &mut r,
        "control_queue_bytes",
        "Bytes of STUN messages queued for the control thread",
        snap.control_queue.1 as i64,
    );
    counter(
        &mut r,
        "mailbox_full_dropped",
        "Replies to TCP/TLS clients dropped because their worker's mailbox was full",
        snap.mailbox_full,
    );
    family(
        &mut r,
        "reloads",
        "Configuration reloads, by result",
        [
            ("success", snap.reloads.ok),
            ("failure", snap.reloads.failed),
        ]
        .into_iter()
        .map(|(k, n)| (vec![("result", k.to_string())], n)),
    );
    gauge(
        &mut r,
        "last_reload_success_timestamp_seconds",
        "When the configuration was last reloaded successfully (Unix seconds; 0: not since start)",
        snap.reloads.last_ok_unix as i64,
    );
    gauge(
        &mut r,
        "process_start_time_seconds",
        "When the relay process started (Unix seconds)",
        snap.started_unix as i64,
    );
    counter(
        &mut r,
        "usage_write_failures",
        "Batches of usage records the metering writer could not store (the database refused them)",
        snap.usage_write_failures,
    );
    gauge(
        &mut r,
        "fleet_revocations_local_copy",
        "1 while PostgreSQL is unreachable and the relay enforces the revocations it last saw (its local copy)",
        i64::from(snap.revocations_local_copy),
    );
    let streams = || snap.streams.iter();
    gauge_family(
        &mut r,
        "stream_connections",
        "TCP and TLS connections open now, by transport",
        streams().map(|t| (vec![("transport", t.transport.to_string())], t.open as i64)),
    );
    family(
        &mut r,
        "stream_accepted",
        "TCP and TLS connections accepted, by transport",
        streams().map(|t| (vec![("transport", t.transport.to_string())], t.accepted)),
    );
    family(
        &mut r,
        "stream_refused",
        "TCP and TLS connections refused by a limit, by transport",
        streams().map(|t| (vec![("transport", t.transport.to_string())], t.refused)),
    );
    if let Some(h) = &snap.http {
        family(
            &mut r,
            "api_requests",
            "HTTP API requests answered, by route and status",
            h.requests.iter().map(|(route, status, n)| {
                (
                    vec![("route", route.to_string()), ("status", status.to_string())],
                    *n,
                )
            }),
        );
        r.register(
            "api_request_duration_seconds",
            "Time to answer an HTTP API request, by route (from its headers to its response head)",
            Histograms(
                h.latency
                    .iter()
                    .map(|(route, buckets, sum_us)| {
                        let labels = vec![("route".to_string(), route.to_string())];
                        (labels, buckets.clone(), *sum_us as f64 / 1e6)
                    })
                    .collect(),
            ),
        );
    }
    let s = &snap.server;
    gauge(
        &mut r,
        "allocations",
        "Live allocations",
        s.allocations as i64,
    );
    gauge(
        &mut r,
        "max_allocations",
        "The allocation quota (quotas.max_allocations); Allocate beyond it gets 508",
        s.max_allocations as i64,
    );
    counter(
        &mut r,
        "allocations_created",
        "Allocations that became active",
        s.allocations_created,
    );
    family(
        &mut r,
        "allocations_failed",
        "Refused Allocate requests by STUN error code",
        s.allocation_errors
            .iter()
            .map(|(code, n)| (vec![("code", code.to_string())], *n)),
    );
    gauge(
        &mut r,
        "permissions",
        "Installed permissions",
        s.permissions as i64,
    );
    gauge(&mut r, "channels", "Bound channels", s.channels as i64);
    counter(
        &mut r,
        "auth_challenges",
        "401 challenges sent",
        s.challenges,
    );
    family(
        &mut r,
        "auth_failures",
        "Authentication failures by kind",
        s.auth_failures
            .iter()
            .map(|(k, n)| (vec![("kind", k.to_string())], *n)),
    );
    family(
        &mut r,
        "server_dropped",
        "Datagrams the TURN core dropped or refused, by reason",
        s.drops
            .iter()
            .map(|(k, n)| (vec![("reason", k.to_string())], *n)),
    );
    let t = snap.relayed();
    family(
        &mut r,
        "relayed_packets",
        "Datagrams relayed, by direction",
        [
            ("to_peer", t.to_peer_packets),
            ("to_client", t.to_client_packets),
        ]
        .into_iter()
        .map(|(d, n)| (vec![("direction", d.to_string())], n)),
    );
    family(
        &mut r,
        "relayed_bytes",
        "Payload bytes relayed, by direction",
        [
            ("to_peer", t.to_peer_bytes),
            ("to_client", t.to_client_bytes),
        ]
        .into_iter()
        .map(|(d, n)| (vec![("direction", d.to_string())], n)),
    );
    family(
        &mut r,
        "path_packets",
        "Datagrams relayed, by path: xdp (the kernel fast path) or userspace (the workers)",
        [
            ("xdp", snap.xdp_packets),
            ("userspace", t.to_peer_packets + t.to_client_packets),
        ]
        .into_iter()
        .map(|(p, n)| (vec![("path", p.to_string())], n)),
    );
    let workers = || snap.workers.iter().enumerate();
    family(
        &mut r,
        "worker_received_packets",
        "Datagrams received per worker",
        workers().map(|(k, w)| (vec![("worker", k.to_string())], w.rx)),
    );
    family(
        &mut r,
        "worker_sent_packets",
        "Datagrams sent per worker",
        workers().map(|(k, w)| (vec![("worker", k.to_string())], w.tx)),
    );
    gauge_family(
        &mut r,
        "worker_ready",
        "1 while the worker's loop runs, 0 once it exited",
        workers().map(|(k, w)| (vec![("worker", k.to_string())], i64::from(w.ready))),
    );
    family(
        &mut r,
        "dropped_packets",
        "Datagrams the data plane dropped, by worker and reason",
        workers().flat_map(|(k, w)| {
            w.drops.iter().map(move |(why, n)| {
                (
                    vec![("worker", k.to_string()), ("reason", why.to_string())],
                    *n,
                )
            })
        }),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

fn gauge(r: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    r.register(name, help, c);
}

fn family(
    r: &mut Registry,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (Vec<(&'static str, String)>, u64)>,
) {
    let f: Family<Labels, Counter> = Family::default();
    for (labels, n) in values {
        let labels: Labels = labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        f.get_or_create(&labels).inc_by(n);
    }
    r.register(name, help, f);
}

fn gauge_family(
    r: &mut Registry,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (Vec<(&'static str, String)>, i64)>,
) {
    let f: Family<Labels, Gauge> = Family::default();
    for (labels, n) in values {
        let labels: Labels = labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        f.get_or_create(&labels).set(n);
    }
    r.register(name, help, f);
}

/// Histograms from counted buckets ([`HttpSnapshot::latency`]): one per label set, with its buckets
/// (not cumulative, the last one past [`HTTP_LATENCY_BUCKETS`]) and sum.
#[derive(Debug)]
struct Histograms(Vec<(Labels, Vec<u64>, f64)>);

impl TypedMetric for Histograms {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histograms {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, buckets, sum) in &self.0 {
            let bounds = HTTP_LATENCY_BUCKETS.iter().copied().chain([f64::MAX]);
            let buckets: Vec<(f64, u64)> = bounds.zip(buckets.iter().copied()).collect();
            let count = buckets.iter().map(|(_, n)| n).sum();
            encoder
                .encode_family(labels)?
                .encode_histogram::<()>(*sum, count, &buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_without_identities() {
        let snap = Snapshot {
            backend: "epoll",
            draining: false,
            workers: vec![
                WorkerSnapshot {
                    rx: 10,
                    tx: 9,
                    drops: vec![("malformed", 1)],
                    relayed: Counters {
                        to_peer_bytes: 100,
                        to_peer_packets: 2,
                        to_client_bytes: 50,
                        to_client_packets: 1,
                    },
                    ready: false,
                },
                WorkerSnapshot {
                    rx: 1,
                    ready: true,
                    ..WorkerSnapshot::default()
                },
            ],
            workers_lost: 1,
            control_queue: (2, 300),
            mailbox_full: 0,
            xdp_packets: 7,
            started_unix: 1_699_999_000,
            streams: vec![StreamSnapshot {
                transport: "tls",
                open: 2,
                accepted: 5,
                refused: 1,
            }],
            usage_write_failures: 3,
            revocations_local_copy: true,
            http: Some({
                let h = HttpMetrics::new(&["token", "other"]);
                h.record(0, 200, Duration::from_millis(3));
                h.record(0, 200, Duration::from_secs(30));
                h.record(1, 404, Duration::from_micros(10));
                h.record(7, 200, Duration::ZERO); // no such route: ignored
                h.snapshot()
            }),
            reloads: {
                let r = Reloads::default();
                r.record(true, 1_700_000_000);
                r.record(false, 1_700_000_100);
                r.record(false, 1_700_000_200);
                r.snapshot()
            },
            server: ServerSnapshot {
                allocations: 3,
                allocations_created: 4,
                allocation_errors: vec![(508, 2)],
                max_allocations: 1000,
                auth_failures: vec![("revoked", 5)],
                ..ServerSnapshot::default()
            },
        };
        let text = render(&snap);
        for line in [
            "turnpike_allocations 3",
            "turnpike_allocations_created_total 4",
            "turnpike_allocations_failed_total{code=\"508\"} 2",
            "turnpike_auth_failures_total{kind=\"revoked\"} 5",
            "turnpike_relayed_bytes_total{direction=\"to_peer\"} 100",
            "turnpike_relayed_packets_total{direction=\"to_client\"} 1",
            "turnpike_path_packets_total{path=\"xdp\"} 7",
            "turnpike_path_packets_total{path=\"userspace\"} 3",
            "turnpike_worker_received_packets_total{worker=\"1\"} 1",
            "turnpike_dropped_packets_total{worker=\"0\",reason=\"malformed\"} 1",
            "turnpike_backend_info{backend=\"epoll\"} 1",
            "turnpike_draining 0",
            "turnpike_workers_lost 1",
            "turnpike_control_queue_bytes 300",
            "turnpike_mailbox_full_dropped_total 0",
            "turnpike_reloads_total{result=\"success\"} 1",
            "turnpike_reloads_total{result=\"failure\"} 2",
            "turnpike_last_reload_success_timestamp_seconds 1700000000",
            "turnpike_process_start_time_seconds 1699999000",
            "turnpike_max_allocations 1000",
            "turnpike_worker_ready{worker=\"0\"} 0",
            "turnpike_worker_ready{worker=\"1\"} 1",
            "turnpike_stream_connections{transport=\"tls\"} 2",
            "turnpike_stream_accepted_total{transport=\"tls\"} 5",
            "turnpike_stream_refused_total{transport=\"tls\"} 1",
            "turnpike_usage_write_failures_total 3",
            "turnpike_fleet_revocations_local_copy 1",
            "turnpike_api_requests_total{route=\"token\",status=\"200\"} 2",
            "turnpike_api_requests_total{route=\"other\",status=\"404\"} 1",
            // 3 ms is in the 5 ms bucket; 30 s only in +Inf.
            "turnpike_api_request_duration_seconds_bucket{le=\"0.0025\",route=\"token\"} 0",
            "turnpike_api_request_duration_seconds_bucket{le=\"0.005\",route=\"token\"} 1",
            "turnpike_api_request_duration_seconds_bucket{le=\"10.0\",route=\"token\"} 1",
            "turnpike_api_request_duration_seconds_bucket{le=\"+Inf\",route=\"token\"} 2",
            "turnpike_api_request_duration_seconds_count{route=\"token\"} 2",
            "turnpike_api_request_duration_seconds_sum{route=\"token\"} 30.003",
            "turnpike_api_request_duration_seconds_count{route=\"other\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.contains("turnpike_build_info{version="));
        assert!(text.ends_with("# EOF\n"));
    }
}
