//! Per-worker counters: relaxed atomics padded to their own cache lines, written only by their worker.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::metrics::Counters;

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not STUN or ChannelData (RFC 7983 demultiplexing).
    NotTurn,
    /// Failed to parse.
    Malformed,
    /// ChannelData on a channel that is not bound (or whose permission expired).
    NoChannel,
    /// No permission for the peer.
    NoPermission,
    /// The peer is one of the relay's own addresses and not another allocation's live relayed address
    /// (or a port an explicit allow cannot open).
    OwnAddress,
    /// A relay socket the table does not know.
    NoRelay,
    /// Did not fit a buffer slot.
    Truncated,
    /// The control thread's queue was full.
    ControlBusy,
    /// The kernel refused the datagram for another reason (unreachable, not permitted), or its socket
    /// is gone.
    SendFailed,
    /// The outgoing socket's buffer (or the io_uring submission queue) was full.
    SendBufferFull,
    /// The datagram was too big for the path (`EMSGSIZE`, e.g. with DONT-FRAGMENT).
    TooBig,
    /// A TCP/TLS client's bounded write queue was full (a slow reader), or its connection is gone.
    StreamQueueFull,
    /// A Binding success not sent: its source's network (/32, /64) was over its budget.
    BindingRateLimited,
    /// A Binding success not sent: it would have been more than 3× its request.
    BindingAmplification,
    /// A 401 challenge not sent: its source's network (/32, /64) was over its budget.
    ChallengeRateLimited,
    /// A 401 challenge not sent: it would have been more than 3× its request.
    ChallengeAmplification,
    /// A wildcard listener received it at an address that was not on the host at start (see
    /// [`ListenerMap`](super::ListenerMap)).
    UnknownLocal,
}

impl Drop {
    /// All reasons, in counter order.
    pub const ALL: [Drop; 17] = [
        Drop::NotTurn,
        Drop::Malformed,
        Drop::NoChannel,
        Drop::NoPermission,
        Drop::OwnAddress,
        Drop::NoRelay,
        Drop::Truncated,
        Drop::ControlBusy,
        Drop::SendFailed,
        Drop::SendBufferFull,
        Drop::TooBig,
        Drop::StreamQueueFull,
        Drop::BindingRateLimited,
        Drop::BindingAmplification,
        Drop::ChallengeRateLimited,
        Drop::ChallengeAmplification,
        Drop::UnknownLocal,
    ];

    /// A short name for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::NotTurn => "not_turn",
            Drop::Malformed => "malformed",
            Drop::NoChannel => "no_channel",
            Drop::NoPermission => "no_permission",
            Drop::OwnAddress => "own_address",
            Drop::NoRelay => "no_relay",
            Drop::Truncated => "truncated",
            Drop::ControlBusy => "control_busy",
            Drop::SendFailed => "send_failed",
            Drop::SendBufferFull => "send_buffer_full",
            Drop::TooBig => "too_big",
            Drop::StreamQueueFull => "stream_queue_full",
            Drop::BindingRateLimited => "binding_rate_limited",
            Drop::BindingAmplification => "binding_amplification",
            Drop::ChallengeRateLimited => "challenge_rate_limited",
            Drop::ChallengeAmplification => "challenge_amplification",
            Drop::UnknownLocal => "unknown_local",
        }
    }
}

/// A worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    rx: CachePadded<AtomicU64>,
    tx: CachePadded<AtomicU64>,
    drops: CachePadded<[AtomicU64; Drop::ALL.len()]>,
    /// Relayed bytes/packets: to-peer bytes, to-peer packets, to-client bytes, to-client packets.
    relayed: CachePadded<[AtomicU64; 4]>,
    /// Binding successes the worker answered itself and the kernel took.
    bindings: CachePadded<AtomicU64>,
    /// 401 challenges the worker answered itself and the kernel took.
    challenges: CachePadded<AtomicU64>,
}

impl WorkerStats {
    #[inline]
    pub(crate) fn count_rx(&self) {
        self.rx.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn count_tx(&self, n: usize) {
        self.tx.fetch_add(n as u64, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn count_drop(&self, why: Drop) {
        self.count_drops(why, 1);
    }

    #[inline]
    pub(crate) fn count_drops(&self, why: Drop, n: usize) {
        let i = Drop::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.drops[i].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One datagram of `bytes` payload bytes relayed towards the peer (`to_peer`) or the client.
    #[inline]
    pub(crate) fn count_relayed(&self, to_peer: bool, bytes: usize) {
        let i = if to_peer { 0 } else { 2 };
        // Only this worker writes these: a load and a store, no read-modify-write bus lock.
        let add = |a: &AtomicU64, n: u64| a.store(a.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        add(&self.relayed[i], bytes as u64);
        add(&self.relayed[i + 1], 1);
    }

    /// One Binding success answered by the worker was sent.
    #[inline]
    pub(crate) fn count_binding(&self) {
        self.bindings.fetch_add(1, Ordering::Relaxed);
    }

    /// Binding successes answered by the worker and sent (refusals are drops:
    /// [`Drop::BindingRateLimited`], [`Drop::BindingAmplification`]).
    pub fn bindings(&self) -> u64 {
        self.bindings.load(Ordering::Relaxed)
    }

    /// One 401 challenge answered by the worker was sent.
    #[inline]
    pub(crate) fn count_challenge(&self) {
        self.challenges.fetch_add(1, Ordering::Relaxed);
    }

    /// 401 challenges answered by the worker and sent (refusals are drops:
    /// [`Drop::ChallengeRateLimited`], [`Drop::ChallengeAmplification`]).
    pub fn challenges(&self) -> u64 {
        self.challenges.load(Ordering::Relaxed)
    }

    /// What the fast path relayed (sent successfully).
    pub fn relayed(&self) -> Counters {
        let r = |i: usize| self.relayed[i].load(Ordering::Relaxed);
        Counters {
            to_peer_bytes: r(0),
            to_peer_packets: r(1),
            to_client_bytes: r(2),
            to_client_packets: r(3),
        }
    }

    /// Datagrams received.
    pub fn rx(&self) -> u64 {
        self.rx.load(Ordering::Relaxed)
    }

    /// Datagrams sent.
    pub fn tx(&self) -> u64 {
        self.tx.load(Ordering::Relaxed)
    }

    /// Drops for `why`.
    pub fn drops(&self, why: Drop) -> u64 {
        let i = Drop::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.drops[i].load(Ordering::Relaxed)
    }
}
