//! A worker's packet logic, independent of the event loop: every per-packet decision, sans-IO.
//!
//! May use: wire, route, policy, metrics, budget, auth (the challenge it shares with the server).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use super::{ControlTx, Drop, ToControl, WorkerStats, HEADROOM};
use crate::auth::{self, Challenge, Challenger, RequestFacts, Unsent};
use crate::budget::{Refused, SourceLimiter};
use crate::policy::OwnAddresses;
use crate::route::{ClientKey, ListenerId, RelayId, RouteTable, RouteUpdate};
use crate::wire::{
    self, Attribute, ChannelData, Class, Kind, Message, MessageType, MessageWriter, Method,
};

/// What to do with a received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing (dropped and counted, or handed to the control thread).
    Done,
    /// Send part of the same buffer slot; once the kernel (or a stream's write queue) took it, call
    /// [`Core::sent`] with its [`Bill`].
    Forward(Forward),
}

/// A datagram to send: everything a backend needs, so that it never looks the relay up again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The socket to send from.
    pub out: Out,
    /// The destination.
    pub dst: SocketAddr,
    /// The bytes to send, within the slot (header included).
    pub range: Range<usize>,
    /// What to credit when the send succeeded.
    pub bill: Bill,
}

/// The billing facts of one forwarded datagram, credited by [`Core::sent`] only after a send succeeded
/// (usage counts what was sent, not what was queued). `Copy` and small, so that a backend can keep it
/// beside a send in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bill {
    /// The relay socket (allocation) the datagram went through.
    pub relay: RelayId,
    /// Which way it went.
    pub dir: Direction,
    /// Payload bytes (the application data, without ChannelData or Data indication framing).
    pub payload: u32,
}

impl Bill {
    /// The bill of a worker's own answer (a Binding success): not relayed data, so it credits no relay
    /// and no relayed totals, only the worker's answer counter. Its `relay` is not looked at.
    pub const ANSWER: Bill = Bill {
        relay: RelayId(u32::MAX),
        dir: Direction::Answer,
        payload: 0,
    };

    /// The bill of a worker's own 401 challenge: as [`Bill::ANSWER`], counted as a challenge.
    pub const CHALLENGE: Bill = Bill {
        relay: RelayId(u32::MAX),
        dir: Direction::Challenge,
        payload: 0,
    };
}

/// Which way a relayed datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → peer (ChannelData or a Send indication from the client).
    ToPeer,
    /// Peer → client (ChannelData or a Data indication to the client).
    ToClient,
    /// The worker's own answer to a client (Binding success, [`Bill::ANSWER`]): nothing relayed.
    Answer,
    /// The worker's own 401 challenge to a client ([`Bill::CHALLENGE`]): nothing relayed.
    Challenge,
}

/// A worker socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Out {
    /// A listener (client side).
    Listener(ListenerId),
    /// A relay socket (peer side).
    Relay(RelayId),
}

/// A worker's packet logic, independent of the event loop.
#[derive(Debug)]
pub struct Core {
    worker: usize,
    table: RouteTable,
    to_control: ControlTx,
    stats: Arc<WorkerStats>,
    tid_state: u64,
    channel_range: wire::ChannelRange,
    /// The relay's own addresses and the live relayed ones (shared with the control thread).
    own: Arc<OwnAddresses>,
    /// This worker's shard of the unauthenticated-answer budget, when the worker answers stateless
    /// requests itself ([`Core::answer_unauthenticated`]); `None`: they go to the control thread.
    budget: Option<SourceLimiter>,
    /// Whether UDP Binding requests are answered here.
    binding: bool,
    /// The server's challenger, when a UDP request that certainly gets a plain 401 is answered here.
    challenger: Option<Challenger>,
    /// The clocks of the stateless answers, read once per receive batch.
    clocks: Clocks,
}

/// The clocks of the stateless answers. Inside a receive batch ([`Core::begin_batch`]) each is read
/// once, when the batch's first answer needs it: the datagrams of a batch arrived together, so one
/// reading serves them all (one `clock_gettime` per batch instead of one per Binding). Outside a batch
/// every answer reads them afresh.
#[derive(Debug, Clone, Copy)]
struct Clocks {
    /// Unix seconds, for a challenge's nonce expiry: [`crate::clock::unix_now`] (a fake in tests).
    unix_clock: fn() -> u64,
    in_batch: bool,
    now: Option<Instant>,
    unix: Option<u64>,
}

impl Clocks {
    fn begin_batch(&mut self) {
        *self = Clocks {
            in_batch: true,
            now: None,
            unix: None,
            ..*self
        };
    }

    fn now(&mut self) -> Instant {
        if !self.in_batch {
            return Instant::now();
        }
        *self.now.get_or_insert_with(Instant::now)
    }

    fn unix(&mut self) -> u64 {
        if !self.in_batch {
            return (self.unix_clock)();
        }
        *self.unix.get_or_insert_with(self.unix_clock)
    }
}

/// What a worker answers itself ([`Core::answer_unauthenticated`]).
#[derive(Debug, Clone, Default)]
pub struct Answers {
    /// Binding requests (not for a server with `binding_requires_auth`: there Binding must be
    /// authenticated by the control thread).
    pub binding: bool,
    /// Requests that certainly get a plain 401 ([`auth::is_plain_challenge`]), written with a clone
    /// of the server's challenger (`Server::challenger`, handed over by `control`) so that the server
    /// verifies the nonce.
    pub challenger: Option<Challenger>,
}

impl Core {
    /// The core of worker `worker`.
    pub fn new(
        worker: usize,
        to_control: impl Into<ControlTx>,
        stats: Arc<WorkerStats>,
        channel_range: wire::ChannelRange,
        own: Arc<OwnAddresses>,
    ) -> Self {
        Core {
            worker,
            table: RouteTable::new(),
            to_control: to_control.into(),
            stats,
            tid_state: 0x9E37_79B9_7F4A_7C15 ^ worker as u64,
            channel_range,
            own,
            budget: None,
            binding: false,
            challenger: None,
            clocks: Clocks {
                unix_clock: crate::clock::unix_now,
                in_batch: false,
                now: None,
                unix: None,
            },
        }
    }

    /// A new receive batch starts: its stateless answers share one reading of each clock, taken
    /// when the first of them needs it. The worker loop calls this before it dispatches a batch.
    #[inline]
    pub fn begin_batch(&mut self) {
        self.clocks.begin_batch();
    }

    /// Read Unix time from `clock` instead of the system's (a scenario's fake clock).
    #[cfg(test)]
    pub(crate) fn with_unix_clock(mut self, clock: fn() -> u64) -> Self {
        self.clocks.unix_clock = clock;
        self
    }

    /// Answer `answers` from UDP clients here, in the receive slot, spending `budget` (this worker's
    /// own shard of the per-source budget of unauthenticated answers). Stream clients' requests
    /// always go to the control thread (exempt from the budget there).
    pub(crate) fn answer_unauthenticated(
        mut self,
        budget: SourceLimiter,
        answers: Answers,
    ) -> Self {
        self.budget = Some(budget);
        self.binding = answers.binding;
        self.challenger = answers.challenger;
        self
    }

    /// A reload's new rate of the unauthenticated-answer budget (when this worker answers any).
    pub fn set_binding_rate(&mut self, rate: u32) {
        if let Some(b) = &mut self.budget {
            b.set_rate(rate);
        }
    }

    /// Apply a route update; a removed relay's counters go to the control thread.
    pub fn apply(&mut self, update: RouteUpdate) {
        if update == RouteUpdate::ReportCounters {
            // Metering checkpoints only (one message per checkpoint interval, off the per-packet path).
            let counters = self.table.counters().collect();
            let _ = self.to_control.send(ToControl::Counters {
                worker: self.worker,
                counters,
            });
            return;
        }
        if let Some((allocation, counters)) = self.table.apply(update) {
            // Accounting must not be lost: this send is never refused and never blocks (`ControlTx`).
            let _ = self.to_control.send(ToControl::RelayClosed {
                allocation,
                counters,
            });
        }
    }

    /// The worker's lookup table.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// A datagram from a UDP client on `listener`, at `slot[HEADROOM..HEADROOM + len]`.
    #[inline]
    pub fn on_client(
        &mut self,
        listener: ListenerId,
        from: SocketAddr,
        slot: &mut [u8],
        len: usize,
    ) -> Action {
        self.on_client_via(listener, from, slot, len, false)
    }

    /// A message from a TCP/TLS client on `listener`, at `slot[HEADROOM..HEADROOM + len]`. As
    /// [`Core::on_client`], except that its Binding goes to the control thread (a stream client cannot
    /// spoof its source: its answers are exempt from the budget there).
    #[inline]
    pub fn on_stream_client(
        &mut self,
        listener: ListenerId,
        from: SocketAddr,
        slot: &mut [u8],
        len: usize,
    ) -> Action {
        self.on_client_via(listener, from, slot, len, true)
    }

    #[inline]
    fn on_client_via(
        &mut self,
        listener: ListenerId,
        from: SocketAddr,
        slot: &mut [u8],
        len: usize,
        stream: bool,
    ) -> Action {
        self.stats.count_rx();
        let Some(data) = slot.get(HEADROOM..HEADROOM + len) else {
            return self.drop(Drop::Malformed);
        };
        let key = ClientKey {
            client: from,
            listener,
        };
        match data.first().map(|b| self.channel_range.classify(*b)) {
            Some(Kind::ChannelData) => {
                let Ok(cd) = ChannelData::parse_in(data, self.channel_range) else {
                    return self.drop(Drop::Malformed);
                };
                let Some(route) = self.table.channel(key, cd.channel()) else {
                    return self.drop(Drop::NoChannel);
                };
                if !self.peer_allowed(route.peer) {
                    return self.drop(Drop::OwnAddress);
                }
                let n = cd.payload().len();
                let start = HEADROOM + wire::CHANNEL_HEADER_LEN;
                Action::Forward(Forward {
                    out: Out::Relay(route.relay),
                    dst: self.own.bound(route.peer),
                    range: start..start + n,
                    bill: Bill {
                        relay: route.relay,
                        dir: Direction::ToPeer,
                        payload: n as u32,
                    },
                })
            }
            Some(Kind::Stun) => {
                let Ok(msg) = Message::parse(data) else {
                    return self.drop(Drop::Malformed);
                };
                // A UDP Binding and a plain challenge are answered here (stream clients' go to the
                // control thread).
                if !stream && self.budget.is_some() {
                    if let Some(answer) = self.stateless(&msg) {
                        return self.answer(listener, from, slot, answer);
                    }
                }
                self.on_client_stun(listener, from, key, data, &msg)
            }
            _ => self.drop(Drop::NotTurn),
        }
    }

    fn on_client_stun(
        &mut self,
        listener: ListenerId,
        from: SocketAddr,
        key: ClientKey,
        data: &[u8],
        msg: &Message<'_>,
    ) -> Action {
        let typ = msg.message_type();
        if (typ.class, typ.method) == (Class::Indication, Method::SEND) {
            // Send indications stay in the worker (RFC 8656 §11.2): permission check, then send the DATA
            // bytes where they lie.
            // A malformed XOR-PEER-ADDRESS no longer fails `Message::parse` (the server answers 400 to
            // one in a request); an indication carrying one is dropped as malformed.
            let (Some(peer), Some(payload), false) = (
                msg.attrs.xor_peer_address,
                msg.attrs.data,
                msg.attrs.malformed_peer_address,
            ) else {
                return self.drop(Drop::Malformed);
            };
            let Some(relay) = self.table.send_route(key, peer) else {
                return self.drop(Drop::NoPermission);
            };
            if !self.peer_allowed(peer) {
                return self.drop(Drop::OwnAddress);
            }
            let start = HEADROOM + (payload.as_ptr() as usize - data.as_ptr() as usize);
            return Action::Forward(Forward {
                out: Out::Relay(relay),
                dst: self.own.bound(peer),
                range: start..start + payload.len(),
                bill: Bill {
                    relay,
                    dir: Direction::ToPeer,
                    payload: payload.len() as u32,
                },
            });
        }
        if self
            .to_control
            .try_send_stun(self.worker, listener, from, data)
        {
            Action::Done
        } else {
            self.drop(Drop::ControlBusy)
        }
    }

    /// What of `msg` the worker answers itself, if anything.
    #[inline]
    fn stateless(&self, msg: &Message<'_>) -> Option<Stateless> {
        let typ = msg.message_type();
        if (typ.class, typ.method) == (Class::Request, Method::BINDING) {
            // An unknown comprehension-required attribute: the 420 with UNKNOWN-ATTRIBUTES is the
            // control thread's.
            return (self.binding && msg.unknown_required().is_empty())
                .then(|| Stateless::Binding(RequestFacts::of(msg)));
        }
        (self.challenger.is_some() && auth::is_plain_challenge(msg))
            .then(|| Stateless::Challenge(RequestFacts::of(msg)))
    }

    /// Answer a stateless request in its own slot: a Binding success (RFC 8489 §8.1) with
    /// XOR-MAPPED-ADDRESS, or the server's 401 (the same function writes it there); FINGERPRINT when
    /// the request had one. Sent only if it is at most 3× the request and the source's network has a
    /// token left ([`SourceLimiter::admit`], checked once the size is known, so that an answer too
    /// large spends no token).
    fn answer(
        &mut self,
        listener: ListenerId,
        from: SocketAddr,
        slot: &mut [u8],
        req: Stateless,
    ) -> Action {
        let (Some(budget), Some(buf)) = (self.budget.as_mut(), slot.get_mut(HEADROOM..)) else {
            return self.drop(Drop::Truncated);
        };
        let now = self.clocks.now();
        let (written, bill) = match req {
            Stateless::Binding(req) => {
                let typ = MessageType::new(Method::BINDING, Class::Success);
                let n = MessageWriter::new(buf, typ, req.tid())
                    .and_then(|mut w| {
                        w.add(&Attribute::XorMappedAddress(from))?;
                        if req.fingerprint() {
                            w.add_fingerprint()?;
                        }
                        Ok(w.finish())
                    })
                    .map_err(Unsent::Write)
                    .and_then(|n| {
                        budget
                            .admit(from.ip(), now, req.request_len(), n)
                            .map(|()| n)
                            .map_err(Unsent::Refused)
                    });
                (n, Bill::ANSWER)
            }
            Stateless::Challenge(req) => {
                let Some(challenger) = &self.challenger else {
                    return self.drop(Drop::Truncated);
                };
                let unix_now = self.clocks.unix();
                let n = challenger.write(
                    buf,
                    req,
                    from,
                    Challenge::Unauthenticated,
                    unix_now,
                    Some((budget, now)),
                );
                (n, Bill::CHALLENGE)
            }
        };
        let binding = bill == Bill::ANSWER;
        match written {
            Ok(n) => Action::Forward(Forward {
                out: Out::Listener(listener),
                dst: from,
                range: HEADROOM..HEADROOM + n,
                bill,
            }),
            Err(Unsent::Refused(Refused::RateLimited)) if binding => {
                self.drop(Drop::BindingRateLimited)
            }
            Err(Unsent::Refused(Refused::RateLimited)) => self.drop(Drop::ChallengeRateLimited),
            Err(_) if binding => self.drop(Drop::BindingAmplification),
            Err(_) => self.drop(Drop::ChallengeAmplification),
        }
    }

    /// A datagram from `from` on relay socket `relay`, at `slot[HEADROOM..HEADROOM + len]`.
    #[inline]
    pub fn on_peer(
        &mut self,
        relay: RelayId,
        from: SocketAddr,
        slot: &mut [u8],
        len: usize,
    ) -> Action {
        self.stats.count_rx();
        // Behind 1:1 NAT another of our relay sockets sends from its private address: the receiver's
        // permission and channel name the public one (`OwnAddresses::bound`, `advertised`).
        let from = self.own.advertised(from);
        let Some(r) = self.table.relay_mut(relay) else {
            return self.drop(Drop::NoRelay);
        };
        if !r.permissions.contains(&from.ip()) {
            return self.drop(Drop::NoPermission);
        }
        if matches!(self.own.check(from), Some(Err(_))) {
            return self.drop(Drop::OwnAddress);
        }
        let client = r.client;
        let range = match r.channels.get(&from) {
            Some(&channel) => {
                let start = HEADROOM - wire::CHANNEL_HEADER_LEN;
                match ChannelData::write_header(&mut slot[start..], channel.get(), len) {
                    Ok(n) => start..start + n,
                    Err(_) => return self.drop(Drop::Malformed),
                }
            }
            None => {
                self.tid_state ^= self.tid_state << 13;
                self.tid_state ^= self.tid_state >> 7;
                self.tid_state ^= self.tid_state << 17;
                let mut tid = [0u8; 12];
                tid[4..].copy_from_slice(&self.tid_state.to_le_bytes());
                match wire::data_indication_in_place(
                    slot,
                    HEADROOM,
                    len,
                    from,
                    wire::TransactionId(tid),
                ) {
                    Ok(range) => range,
                    Err(_) => return self.drop(Drop::Malformed),
                }
            }
        };
        Action::Forward(Forward {
            out: Out::Listener(client.listener),
            dst: client.client,
            range,
            bill: Bill {
                relay,
                dir: Direction::ToClient,
                payload: len as u32,
            },
        })
    }

    /// Credit a forward whose send succeeded: the relay's usage counters and the worker's relayed
    /// totals. A relay removed meanwhile (its final counters already reported) credits the worker only.
    #[inline]
    pub fn sent(&mut self, bill: Bill) {
        match bill.dir {
            Direction::Answer => return self.stats.count_binding(),
            Direction::Challenge => return self.stats.count_challenge(),
            Direction::ToPeer | Direction::ToClient => {}
        }
        let n = u64::from(bill.payload);
        let to_peer = bill.dir == Direction::ToPeer;
        self.stats.count_relayed(to_peer, n as usize);
        if let Some(r) = self.table.relay_mut(bill.relay) {
            let c = &mut r.counters;
            if to_peer {
                c.to_peer_bytes += n;
                c.to_peer_packets += 1;
            } else {
                c.to_client_bytes += n;
                c.to_client_packets += 1;
            }
        }
    }

    /// Permissions are per IP (RFC 8656 §9), so on one of the relay's own IPs the exact address decides,
    /// per packet: only another allocation's live relayed address, or a port an explicit allow opens.
    #[inline]
    fn peer_allowed(&self, peer: SocketAddr) -> bool {
        !matches!(self.own.check(peer), Some(Err(_)))
    }

    /// A stream connection closed: tell the control thread (never lost: its allocation must end).
    pub fn stream_closed(&self, key: ClientKey) {
        let _ = self.to_control.send(ToControl::StreamClosed {
            listener: key.listener,
            client: key.client,
        });
    }

    /// Count a drop.
    #[inline]
    pub fn drop(&self, why: Drop) -> Action {
        self.stats.count_drop(why);
        Action::Done
    }

    /// The worker's counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }
}

/// What answering a stateless request needs of it, copied out so that the slot can be overwritten.
#[derive(Debug, Clone, Copy)]
enum Stateless {
    /// A well-formed Binding request (FINGERPRINT, when present, verified by the parse) with no
    /// unknown comprehension-required attribute.
    Binding(RequestFacts),
    /// A request that certainly gets a plain 401 ([`auth::is_plain_challenge`]).
    Challenge(RequestFacts),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::route::{AllocationId, ChannelNumber, Counters};

    const RELAY: RelayId = RelayId(7);

    fn core() -> (Core, crossbeam_channel::Receiver<ToControl>) {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let core = Core::new(
            0,
            tx,
            Arc::default(),
            wire::ChannelRange::Rfc8656,
            Arc::default(),
        );
        (core, rx)
    }

    #[test]
    fn a_forward_is_billed_only_when_sent() {
        let (mut core, _rx) = core();
        let client = ClientKey {
            client: "198.51.100.1:4000".parse().unwrap(),
            listener: 0,
        };
        let peer: SocketAddr = "8.8.8.8:53".parse().unwrap();
        core.apply(RouteUpdate::AddRelay {
            id: RELAY,
            allocation: AllocationId(1),
            addr: "192.0.2.1:50000".parse().unwrap(),
            client,
        });
        core.apply(RouteUpdate::AddPermission {
            relay: RELAY,
            peer: peer.ip(),
        });
        core.apply(RouteUpdate::AddChannel {
            relay: RELAY,
            channel: ChannelNumber::new(0x4000).unwrap(),
            peer,
        });
        let mut slot = [0u8; 256];
        slot[HEADROOM..HEADROOM + 8].copy_from_slice(&[0x40, 0x00, 0, 4, 1, 2, 3, 4]);
        let Action::Forward(f) = core.on_client(0, client.client, &mut slot, 8) else {
            panic!("not forwarded");
        };
        assert_eq!(
            f,
            Forward {
                out: Out::Relay(RELAY),
                dst: peer,
                range: HEADROOM + 4..HEADROOM + 8,
                bill: Bill {
                    relay: RELAY,
                    dir: Direction::ToPeer,
                    payload: 4,
                },
            }
        );
        let counters = |core: &Core| core.table().relay(RELAY).unwrap().counters;
        assert_eq!(
            counters(&core),
            Counters::default(),
            "nothing billed before the send"
        );
        assert_eq!(core.stats().relayed(), Counters::default());

        slot[HEADROOM..HEADROOM + 3].copy_from_slice(b"abc");
        let Action::Forward(back) = core.on_peer(RELAY, peer, &mut slot, 3) else {
            panic!("not forwarded");
        };
        assert_eq!(back.bill.dir, Direction::ToClient);
        assert_eq!(back.bill.payload, 3);
        assert_eq!(back.dst, client.client);
        // Only the first send succeeds: only it is billed.
        core.sent(f.bill);
        assert_eq!(
            counters(&core),
            Counters {
                to_peer_bytes: 4,
                to_peer_packets: 1,
                ..Counters::default()
            }
        );
        assert_eq!(core.stats().relayed(), counters(&core));
        core.sent(back.bill);
        assert_eq!(core.stats().relayed(), counters(&core));
        assert_eq!(counters(&core).to_client_packets, 1);
    }

    const CLIENT4: &str = "198.51.100.1:4000";
    const CLIENT6: &str = "[2001:db8:1:2::1]:4000";

    /// A Binding request as a client writes it, with FINGERPRINT if `fingerprint`.
    fn binding(tid: u8, fingerprint: bool) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let typ = MessageType::new(Method::BINDING, Class::Request);
        let mut w = MessageWriter::new(&mut buf, typ, wire::TransactionId([tid; 12])).unwrap();
        if fingerprint {
            w.add_fingerprint().unwrap();
        }
        let n = w.finish();
        buf[..n].to_vec()
    }

    fn send(core: &mut Core, from: &str, msg: &[u8], stream: bool) -> (Action, [u8; 256]) {
        let mut slot = [0u8; 256];
        slot[HEADROOM..HEADROOM + msg.len()].copy_from_slice(msg);
        let from = from.parse().unwrap();
        let action = if stream {
            core.on_stream_client(3, from, &mut slot, msg.len())
        } else {
            core.on_client(3, from, &mut slot, msg.len())
        };
        (action, slot)
    }

    fn answering(rate: u32) -> (Core, crossbeam_channel::Receiver<ToControl>) {
        let (core, rx) = core();
        let answers = Answers {
            binding: true,
            challenger: None,
        };
        (
            core.answer_unauthenticated(SourceLimiter::new(rate, 1, [5, 6]), answers),
            rx,
        )
    }

    #[test]
    fn binding_is_answered_in_the_slot_with_xor_mapped_address_and_fingerprint() {
        let (mut core, rx) = answering(100);
        for (client, fingerprint) in [(CLIENT4, true), (CLIENT4, false), (CLIENT6, true)] {
            let req = binding(9, fingerprint);
            let (action, slot) = send(&mut core, client, &req, false);
            let Action::Forward(f) = action else {
                panic!("not answered: {client} {fingerprint}");
            };
            assert_eq!(f.out, Out::Listener(3));
            assert_eq!(f.dst, client.parse().unwrap());
            assert_eq!(f.bill, Bill::ANSWER);
            assert_eq!(f.range.start, HEADROOM);
            let resp = Message::parse(&slot[f.range.clone()]).unwrap();
            let typ = resp.message_type();
            assert_eq!((typ.class, typ.method), (Class::Success, Method::BINDING));
            assert_eq!(resp.transaction_id(), wire::TransactionId([9; 12]));
            assert_eq!(resp.attrs.xor_mapped_address, Some(f.dst));
            assert_eq!(resp.attrs.fingerprint.is_some(), fingerprint);
            // Exactly the header, XOR-MAPPED-ADDRESS and, if asked for, FINGERPRINT.
            let xma = if f.dst.is_ipv4() { 12 } else { 24 };
            let len = wire::HEADER_LEN + xma + if fingerprint { 8 } else { 0 };
            assert_eq!(f.range.len(), len);
            assert!(f.range.len() <= crate::budget::MAX_AMPLIFICATION * req.len());
        }
        assert!(rx.try_recv().is_err(), "no control-thread hop");
        // Billed as an answer only: no relay, no relayed totals.
        core.sent(Bill::ANSWER);
        assert_eq!(core.stats().bindings(), 1);
        assert_eq!(core.stats().relayed(), Counters::default());
    }

    #[test]
    fn the_worst_case_binding_answer_is_within_three_times_its_request() {
        // The smallest request (20 bytes, no FINGERPRINT) from an IPv6 client draws the largest answer
        // relative to it: 44 bytes, under 60. With FINGERPRINT: 28 in, 52 out. So the check in
        // `Core::answer` never refuses a Binding today; it holds the rule should the answer grow.
        let (mut core, _rx) = answering(100);
        let req = binding(1, false);
        assert_eq!(req.len(), wire::HEADER_LEN);
        let (Action::Forward(f), _) = send(&mut core, CLIENT6, &req, false) else {
            panic!("not answered");
        };
        assert_eq!(f.range.len(), 44);
        assert_eq!(core.stats().drops(Drop::BindingAmplification), 0);
    }

    #[test]
    fn binding_answers_beyond_the_source_budget_are_not_sent() {
        // 1 answer a second, a burst of 2, per /64: the third and later are refused and counted
        // (a refill needs a whole second between these calls).
        let (mut core, rx) = answering(1);
        let answered: Vec<bool> = (0..5u8)
            .map(|i| {
                // Rotating through one /64 does not escape its budget.
                let client = format!("[2001:db8:1:2::{}]:4000", i + 1);
                matches!(
                    send(&mut core, &client, &binding(i, true), false).0,
                    Action::Forward(_)
                )
            })
            .collect();
        assert_eq!(answered[..2], [true, true]);
        assert!(answered.iter().filter(|a| **a).count() < 5);
        let refused = answered.iter().filter(|a| !**a).count() as u64;
        assert_eq!(core.stats().drops(Drop::BindingRateLimited), refused);
        assert!(rx.try_recv().is_err(), "refused, not passed on");
        // Another /64 has its own budget.
        let other = send(
            &mut core,
            "[2001:db8:1:3::1]:4000",
            &binding(7, false),
            false,
        )
        .0;
        assert!(matches!(other, Action::Forward(_)));
    }

    #[test]
    fn stream_clients_and_authenticated_or_unknown_attribute_bindings_go_to_the_control_thread() {
        let stun_to_control = |rx: &crossbeam_channel::Receiver<ToControl>| {
            matches!(rx.try_recv(), Ok(ToControl::Stun { .. }))
        };
        // A TCP/TLS client: exempt from the budget, answered by the server (which exempts streams).
        let (mut core, rx) = answering(1);
        for i in 0..4 {
            let (action, _) = send(&mut core, CLIENT4, &binding(i, true), true);
            assert_eq!(action, Action::Done);
            assert!(stun_to_control(&rx), "stream Binding {i}");
        }
        assert_eq!(core.stats().drops(Drop::BindingRateLimited), 0);
        // An unknown comprehension-required attribute: the 420 is the control thread's.
        let mut req = binding(2, false);
        req[3] = 8;
        req.extend_from_slice(&[0x00, 0x31, 0, 4, 1, 2, 3, 4]);
        assert!(!Message::parse(&req).unwrap().unknown_required().is_empty());
        assert_eq!(send(&mut core, CLIENT4, &req, false).0, Action::Done);
        assert!(stun_to_control(&rx));
        // `binding_requires_auth`: the worker is not told to answer Binding.
        let (mut core, rx) = super::tests::core();
        assert_eq!(
            send(&mut core, CLIENT4, &binding(3, true), false).0,
            Action::Done
        );
        assert!(stun_to_control(&rx));
        // A wrong FINGERPRINT is not STUN: dropped, neither answered nor passed on.
        let (mut core, rx) = answering(100);
        let mut bad = binding(4, true);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(send(&mut core, CLIENT4, &bad, false).0, Action::Done);
        assert!(rx.try_recv().is_err());
        assert_eq!(core.stats().drops(Drop::Malformed), 1);
    }

    /// A core that answers Binding and plain challenges, with the challenger of realm "turnpike".
    fn challenging(rate: u32) -> (Core, crossbeam_channel::Receiver<ToControl>, Challenger) {
        let (core, rx) = core();
        let challenger = Challenger::new(auth::NonceKey::new([7; 32]), "turnpike", 600, false);
        let answers = Answers {
            binding: true,
            challenger: Some(challenger.clone()),
        };
        let core = core
            .answer_unauthenticated(SourceLimiter::new(rate, 1, [5, 6]), answers)
            .with_unix_clock(|| 1_800_000_000);
        (core, rx, challenger)
    }

    /// A unix clock that moves 1000 s on at every reading (its readings are counted by the nonces'
    /// expiry: a nonce lives 600 s).
    fn stepping_clock() -> u64 {
        static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        1_800_000_000 + 1000 * READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn a_batchs_answers_share_one_clock_reading_and_the_next_batch_takes_a_new_one() {
        let (core, _rx, challenger) = challenging(100);
        let mut core = core.with_unix_clock(stepping_clock);
        let req = request(
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            false,
        );
        let nonce_minted_at = |core: &mut Core| {
            let (action, slot) = send(core, CLIENT4, &req, false);
            let Action::Forward(f) = action else {
                panic!("not answered");
            };
            let resp = Message::parse(&slot[f.range.clone()]).unwrap();
            let nonce = resp.attrs.nonce.unwrap().as_bytes().to_vec();
            let valid_at = |t| {
                challenger.key().verify(f.dst, &nonce, t) == auth::NonceCheck::Valid { features: 0 }
            };
            (0..4u64)
                .map(|k| 1_800_000_000 + 1000 * k)
                .find(|&t| valid_at(t) && !valid_at(t + 601))
                .expect("minted at one of the clock's first readings")
        };
        core.begin_batch();
        let first = nonce_minted_at(&mut core);
        assert_eq!(nonce_minted_at(&mut core), first, "one reading per batch");
        core.begin_batch();
        assert_eq!(
            nonce_minted_at(&mut core),
            first + 1000,
            "a new batch reads the clock again"
        );
    }

    fn request(method: Method, attrs: &[Attribute<'_>], fingerprint: bool) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let typ = MessageType::new(method, Class::Request);
        let mut w = MessageWriter::new(&mut buf, typ, wire::TransactionId([3; 12])).unwrap();
        for a in attrs {
            w.add(a).unwrap();
        }
        if fingerprint {
            w.add_fingerprint().unwrap();
        }
        let n = w.finish();
        buf[..n].to_vec()
    }

    #[test]
    fn a_plain_challenge_is_answered_in_the_slot_with_a_nonce_of_the_servers_key() {
        let (mut core, rx, challenger) = challenging(100);
        let peer = Attribute::XorPeerAddress("8.8.8.8:53".parse().unwrap());
        let cases = [
            (Method::ALLOCATE, Attribute::RequestedTransport(17)),
            (Method::REFRESH, Attribute::Lifetime(0)),
            (Method::CREATE_PERMISSION, peer),
            (Method::CHANNEL_BIND, peer),
        ];
        for (method, attr) in cases {
            for fingerprint in [false, true] {
                let req = request(method, &[attr], fingerprint);
                let (action, slot) = send(&mut core, CLIENT4, &req, false);
                let Action::Forward(f) = action else {
                    panic!("not answered: {method:?}");
                };
                assert_eq!((f.out, f.bill), (Out::Listener(3), Bill::CHALLENGE));
                assert_eq!(f.dst, CLIENT4.parse().unwrap());
                let resp = Message::parse(&slot[f.range.clone()]).unwrap();
                let typ = resp.message_type();
                assert_eq!((typ.class, typ.method), (Class::Error, method));
                assert_eq!(resp.transaction_id(), wire::TransactionId([3; 12]));
                assert_eq!(resp.attrs.error_code.map(|e| e.0), Some(401));
                assert_eq!(resp.attrs.realm, Some("turnpike"));
                assert_eq!(resp.attrs.fingerprint.is_some(), fingerprint);
                let nonce = resp.attrs.nonce.unwrap();
                assert_eq!(
                    challenger
                        .key()
                        .verify(f.dst, nonce.as_bytes(), 1_800_000_600),
                    auth::NonceCheck::Valid { features: 0 },
                    "valid for the nonce lifetime"
                );
                assert!(f.range.len() <= crate::budget::MAX_AMPLIFICATION * req.len());
                core.sent(f.bill);
            }
        }
        assert!(rx.try_recv().is_err(), "no control-thread hop");
        assert_eq!(core.stats().challenges(), 8);
        assert_eq!(
            (core.stats().bindings(), core.stats().relayed()),
            (0, Counters::default())
        );
    }

    #[test]
    fn signed_stream_and_other_requests_go_to_the_control_thread() {
        let (mut core, rx, _) = challenging(100);
        let to_control = |rx: &crossbeam_channel::Receiver<ToControl>| {
            matches!(rx.try_recv(), Ok(ToControl::Stun { .. }))
        };
        let allocate = request(
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            false,
        );
        // From a TCP/TLS client: the server answers it (exempt from the budget there).
        assert_eq!(send(&mut core, CLIENT4, &allocate, true).0, Action::Done);
        assert!(to_control(&rx));
        // With MESSAGE-INTEGRITY: only the server can judge it.
        let mut buf = [0u8; 256];
        let typ = MessageType::new(Method::ALLOCATE, Class::Request);
        let mut w = MessageWriter::new(&mut buf, typ, wire::TransactionId([4; 12])).unwrap();
        w.add(&Attribute::RequestedTransport(17)).unwrap();
        w.add_integrity(&[1; 16]).unwrap();
        let n = w.finish();
        assert_eq!(send(&mut core, CLIENT4, &buf[..n], false).0, Action::Done);
        assert!(to_control(&rx));
        // Not a method that always needs credentials: the 400 is the server's.
        let unknown = request(Method(0x00a), &[], false);
        assert_eq!(send(&mut core, CLIENT4, &unknown, false).0, Action::Done);
        assert!(to_control(&rx));
        // A worker without the challenger passes every request on.
        let (mut plain, rx) = answering(100);
        assert_eq!(send(&mut plain, CLIENT4, &allocate, false).0, Action::Done);
        assert!(to_control(&rx));
        assert_eq!(core.stats().challenges() + plain.stats().challenges(), 0);
    }
}
