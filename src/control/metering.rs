//! Metering and metrics of the control thread: usage checkpoints from the workers' counter snapshots,
//! final records for allocations still live at stop, and metrics snapshots.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::exec::{Executor, Plane};
use super::{Control, UsageRecord};
use crate::clock::unix_ms;
use crate::dataplane::{self, BackendKind, ToControl, WorkerMsg};
use crate::route::{AllocationId, Counters, RouteUpdate};
use crate::server;

impl<P: Plane> Executor<P> {
    /// Interim records from one worker's counter snapshot: for each of its allocations, what closed relay
    /// sockets reported plus the live ones' counters. With `last`, they are final records (the relay
    /// is stopping with these allocations still live).
    /// What XDP forwarded for the worker's live relays is added too (the one usage record per allocation).
    pub(super) fn checkpoint(
        &mut self,
        worker: usize,
        counters: &[(AllocationId, Counters)],
        last: bool,
    ) {
        let mut live: HashMap<AllocationId, Counters> = HashMap::new();
        for (allocation, c) in counters {
            live.entry(*allocation).or_default().add(*c);
        }
        let at_ms = unix_ms();
        for (allocation, relays) in live {
            let Some(p) = self.usage.get_mut(&allocation) else {
                continue;
            };
            let mut usage = p.usage;
            usage.add(relays);
            usage.add(self.plane.fast_path_live(worker, allocation));
            if !last && p.checkpointed == Some(usage) {
                continue;
            }
            p.checkpointed = Some(usage);
            let record = UsageRecord {
                allocation: allocation.0,
                identity: p.identity.clone().unwrap_or_default(),
                client: p.client,
                relayed: p.relayed.map(crate::route::PackedAddr::get),
                started_ms: p.started_ms,
                at_ms,
                done: last,
                end_reason: p.reason,
                usage,
            };
            if let Some(sink) = &self.usage_sink {
                let _ = sink.send(record);
            }
        }
    }
}

impl Control {
    pub(super) fn metrics(&self) -> crate::metrics::Snapshot {
        use crate::metrics::{ServerSnapshot, Snapshot, WorkerSnapshot};
        let s = self.server.stats();
        let bad_credentials = s.auth_failures.saturating_sub(s.stale_nonces + s.revoked);
        Snapshot {
            backend: match self.backend {
                BackendKind::Epoll => "epoll",
                BackendKind::IoUring => "io_uring",
            },
            draining: self.drain_deadline.is_some(),
            workers_lost: self.workers_lost,
            control_queue: {
                let (m, b) = self.stun_queue.depth();
                (m as u64, b as u64)
            },
            mailbox_full: self.exec.mailbox_full,
            reloads: self.reloads.snapshot(),
            xdp_packets: self.exec.plane.xdp.packets(),
            workers: self
                .stats
                .iter()
                .zip(&self.exec.plane.workers)
                .map(|(w, handle)| WorkerSnapshot {
                    ready: handle.thread.as_ref().is_some_and(|t| !t.is_finished()),
                    rx: w.rx(),
                    tx: w.tx(),
                    drops: dataplane::Drop::ALL
                        .iter()
                        .map(|why| (why.as_str(), w.drops(*why)))
                        .collect(),
                    relayed: w.relayed(),
                })
                .collect(),
            server: ServerSnapshot {
                allocations: self.server.allocation_count() as u64,
                allocations_created: s.allocations_created,
                allocation_errors: server::ErrorCode::ALL
                    .iter()
                    .zip(s.allocate_errors)
                    .filter(|(_, n)| *n > 0)
                    .map(|(code, n)| (code.code(), n))
                    .collect(),
                max_allocations: self.server.max_allocations() as u64,
                permissions: self.exec.permissions,
                channels: self.exec.channels,
                // The workers answer most 401s themselves.
                challenges: s.challenges + self.stats.iter().map(|w| w.challenges()).sum::<u64>(),
                auth_failures: vec![
                    ("bad_credentials", bad_credentials),
                    ("stale_nonce", s.stale_nonces),
                    ("revoked", s.revoked),
                ],
                drops: vec![
                    ("malformed", s.malformed),
                    ("unexpected_class", s.unexpected_class),
                    ("outbox_overflow", s.outbox_overflow),
                    ("rate_limited", s.rate_limited),
                    ("amplification_refused", s.amplification_refused),
                ],
            },
            // The process's own facts, the stream side's and the API's: filled in by who serves
            // the snapshot (service, api).
            ..Snapshot::default()
        }
    }

    /// Allocations still live at stop get final usage records from the workers' last counters.
    pub(super) fn final_usage(&mut self, rx: &Receiver<ToControl>) {
        if self.exec.usage_sink.is_none() || self.exec.usage.is_empty() {
            return;
        }
        for w in &self.exec.plane.workers {
            w.send(WorkerMsg::Route(RouteUpdate::ReportCounters));
        }
        let mut waiting = self.exec.plane.workers.len();
        let deadline = Instant::now() + Duration::from_secs(2);
        while waiting > 0 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(ToControl::Counters { worker, counters }) => {
                    self.exec.checkpoint(worker, &counters, true);
                    waiting -= 1;
                }
                Ok(ToControl::RelayClosed {
                    allocation,
                    counters,
                }) => self.exec.relay_closed(allocation, counters),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}
