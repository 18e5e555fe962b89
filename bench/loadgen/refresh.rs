//! Keeping long-running flows alive as a real client does: ChannelBind again well before the permission
//! (300 s) and the channel (600 s) run out, which refreshes both (RFC 8656 §12), and Refresh the
//! allocation at half the LIFETIME the server granted (RFC 8656 §7).
//!
//! A [`Keeper`] per flow holds what signs its requests and one transaction at a time. Its requests go out
//! on the flow's own socket, so the server sees the allocation's 5-tuple; their answers come back on
//! that socket between the ChannelData, and [`crate::relay`] hands every datagram that is STUN (not
//! ChannelData) to the keeper: an answer is never counted as a relayed or lost packet. A 438 Stale
//! Nonce is retried at once with the new NONCE (up to [`MAX_STALE`] times); a lost request is
//! retransmitted every [`RTO`] up to [`MAX_TRIES`] transmissions. A transaction that fails anyway is
//! counted in [`RefreshStats`] and tried again after [`RETRY_NS`], never a panic.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};

use turnpike::wire::{Attribute, Class, IntegrityKey, Message, Method, TransactionId};

use crate::turn::{self, Client, Credentials, CHANNEL, MAX_TRIES, RTO};

/// 438s answered in one transaction before it counts as failed.
pub const MAX_STALE: u8 = 3;
/// After a failed transaction, the next try comes this much later (ns), or at the regular interval if
/// that is sooner.
pub const RETRY_NS: u64 = 5_000_000_000;
/// Shortest allocation refresh interval (a server granting a LIFETIME of 1 s gets a Refresh every
/// 500 ms, not a storm).
const MIN_REFRESH_NS: u64 = 500_000_000;

/// What the keepers of a run did, all flows together.
#[derive(Debug, Clone, Default)]
pub struct RefreshStats {
    /// ChannelBinds answered with success.
    pub channel_binds: u64,
    /// Allocation Refreshes answered with success.
    pub refreshes: u64,
    /// 438 Stale Nonce answers (each retried with the new nonce).
    pub stale_nonce: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Transactions that got no answer after [`MAX_TRIES`] transmissions.
    pub timeouts: u64,
    /// Transactions that failed: an error answer (other than a retried 438), too many 438s, or a
    /// timeout.
    pub errors: u64,
    /// Error answers by code (0: no ERROR-CODE), including 438s beyond [`MAX_STALE`].
    pub codes: BTreeMap<u16, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bind,
    Refresh,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: Kind,
    tid: TransactionId,
    sent_ns: u64,
    tries: u8,
    stale: u8,
}

/// One flow's refresh state. Times are ns on the caller's clock (the traffic run's).
#[derive(Debug)]
pub struct Keeper {
    username: String,
    realm: String,
    nonce: String,
    key: IntegrityKey,
    peer: SocketAddr,
    lifetime: u32,
    bind_every_ns: u64,
    refresh_every_ns: u64,
    next_bind_ns: u64,
    next_refresh_ns: u64,
    pending: Option<Pending>,
    tid_counter: u64,
}

impl Keeper {
    /// The keeper of `client` (allocated, channel [`CHANNEL`] bound to `peer`): ChannelBind every
    /// `bind_every_ns`, Refresh at half the granted lifetime. `None` if the client never finished its
    /// 401 round, or `bind_every_ns` is 0 (no refreshing at all).
    pub fn new(client: &Client, peer: SocketAddr, bind_every_ns: u64, id: u64) -> Option<Keeper> {
        let c = client.credentials()?;
        if bind_every_ns == 0 {
            return None;
        }
        // RFC 8656 §7: 600 s when the server says nothing.
        let lifetime = client.lifetime.unwrap_or(600).max(1);
        Some(Keeper {
            username: c.username.to_string(),
            realm: c.realm.to_string(),
            nonce: c.nonce.to_string(),
            key: c.key.clone(),
            peer,
            lifetime,
            bind_every_ns,
            refresh_every_ns: half_ns(lifetime),
            next_bind_ns: u64::MAX,
            next_refresh_ns: u64::MAX,
            pending: None,
            tid_counter: id << 32,
        })
    }

    /// Start the schedule at `now_ns` (just after the set-up that allocated and bound).
    pub fn start(&mut self, now_ns: u64) {
        self.next_bind_ns = now_ns.saturating_add(self.bind_every_ns);
        self.next_refresh_ns = now_ns.saturating_add(self.refresh_every_ns);
    }

    /// Retransmit or give up the transaction under way, or start the one that is due.
    pub fn poll(
        &mut self,
        now_ns: u64,
        sock: &UdpSocket,
        target: SocketAddr,
        st: &mut RefreshStats,
    ) {
        if let Some(p) = self.pending {
            if now_ns.saturating_sub(p.sent_ns) < RTO.as_nanos() as u64 {
                return;
            }
            if p.tries >= MAX_TRIES {
                st.timeouts += 1;
                self.failed(p.kind, now_ns, st);
            } else {
                st.retransmits += 1;
                self.send(p.kind, false, now_ns, sock, target);
            }
            return;
        }
        if now_ns >= self.next_bind_ns {
            self.send(Kind::Bind, true, now_ns, sock, target);
        } else if now_ns >= self.next_refresh_ns {
            self.send(Kind::Refresh, true, now_ns, sock, target);
        }
    }

    /// A STUN message that arrived on the flow's socket. Returns whether it answered this keeper's
    /// transaction.
    pub fn on_message(
        &mut self,
        m: &Message<'_>,
        now_ns: u64,
        sock: &UdpSocket,
        target: SocketAddr,
        st: &mut RefreshStats,
    ) -> bool {
        let Some(p) = self.pending.filter(|p| p.tid == m.transaction_id()) else {
            return false;
        };
        let code = m.attrs.error_code.map(|e| e.0);
        match (m.message_type().class, code) {
            (Class::Success, _) => {
                self.pending = None;
                match p.kind {
                    Kind::Bind => {
                        st.channel_binds += 1;
                        self.next_bind_ns = now_ns.saturating_add(self.bind_every_ns);
                    }
                    Kind::Refresh => {
                        st.refreshes += 1;
                        if let Some(l) = m.attrs.lifetime.filter(|&l| l > 0) {
                            self.lifetime = l;
                            self.refresh_every_ns = half_ns(l);
                        }
                        self.next_refresh_ns = now_ns.saturating_add(self.refresh_every_ns);
                    }
                }
            }
            (Class::Error, Some(438)) if p.stale < MAX_STALE => {
                st.stale_nonce += 1;
                if let Some(n) = m.attrs.nonce {
                    self.nonce = n.to_string();
                }
                self.send(p.kind, true, now_ns, sock, target);
                if let Some(q) = self.pending.as_mut() {
                    q.stale = p.stale + 1;
                }
            }
            _ => {
                *st.codes.entry(code.unwrap_or(0)).or_default() += 1;
                self.failed(p.kind, now_ns, st);
            }
        }
        true
    }

    fn failed(&mut self, kind: Kind, now_ns: u64, st: &mut RefreshStats) {
        st.errors += 1;
        self.pending = None;
        let (next, every) = match kind {
            Kind::Bind => (&mut self.next_bind_ns, self.bind_every_ns),
            Kind::Refresh => (&mut self.next_refresh_ns, self.refresh_every_ns),
        };
        *next = now_ns.saturating_add(every.min(RETRY_NS));
    }

    /// Send a `kind` request: a new transaction if `fresh`, else a retransmission of the one under way.
    fn send(&mut self, kind: Kind, fresh: bool, now_ns: u64, sock: &UdpSocket, target: SocketAddr) {
        let p = match self.pending.filter(|_| !fresh) {
            Some(p) => p,
            None => {
                self.tid_counter += 1;
                let mut t = *b"TPKEEP\0\0\0\0\0\0";
                t[4..12].copy_from_slice(&self.tid_counter.to_be_bytes());
                Pending {
                    kind,
                    tid: TransactionId(t),
                    sent_ns: now_ns,
                    tries: 0,
                    stale: 0,
                }
            }
        };
        let (peer, lifetime) = (self.peer, self.lifetime);
        let mut buf = [0u8; 512];
        let method = match kind {
            Kind::Bind => Method::CHANNEL_BIND,
            Kind::Refresh => Method::REFRESH,
        };
        let built = turn::build(
            &mut buf,
            method,
            p.tid,
            |w| match kind {
                Kind::Bind => {
                    w.add(&Attribute::ChannelNumber(CHANNEL))?;
                    w.add(&Attribute::XorPeerAddress(peer))
                }
                Kind::Refresh => w.add(&Attribute::Lifetime(lifetime)),
            },
            Some(Credentials {
                username: &self.username,
                realm: &self.realm,
                nonce: &self.nonce,
                key: &self.key,
            }),
        );
        // A request that does not build (it always does: short fixed attributes) or a send the kernel
        // refuses is retransmitted, then times out and is counted.
        if let Ok(n) = built {
            let _ = sock.send_to(&buf[..n], target);
        }
        self.pending = Some(Pending {
            sent_ns: now_ns,
            tries: p.tries.saturating_add(1),
            ..p
        });
    }
}

fn half_ns(lifetime_s: u32) -> u64 {
    (u64::from(lifetime_s) * 500_000_000).max(MIN_REFRESH_NS)
}
