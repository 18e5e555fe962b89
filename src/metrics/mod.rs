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

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
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
    let s = &snap.server;
    gauge(
        &mut r,
        "allocations",
        "Live allocations",
        s.allocations as i64,
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
                },
                WorkerSnapshot {
                    rx: 1,
                    ..WorkerSnapshot::default()
                },
            ],
            workers_lost: 1,
            control_queue: (2, 300),
            mailbox_full: 0,
            xdp_packets: 7,
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
