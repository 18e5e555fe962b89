//! The sans-IO TURN server core: authentication, allocations, permissions, channels, quotas and peer
//! policy (RFC 8489, RFC 8656, RFC 6156).
//!
//! This module is deterministic: it has no networking, no threads, no clock and no randomness of its own.
//! Time comes in as arguments (`now` for timers, `unix_now` for credential and nonce expiry), randomness
//! from the RNG passed to [`Server::new`]. The data plane and the control thread only execute what it
//! decides.
//!
//! # Driving it
//! Feed inputs with the `handle_*` methods. **After every `handle_*` call, drain [`Server::poll_transmit`]
//! and [`Server::poll_command`] until they return `None`**, then arm a timer for [`Server::poll_timeout`]
//! and call [`Server::handle_timeout`] when it fires. Transmits borrow the server's buffer until the next
//! `handle_*` call; the buffer is bounded, and what does not fit is dropped and counted in
//! [`Stats::outbox_overflow`].
//!
//! # What the fast path needs
//! The commands program the data plane's lookup tables: a relay socket per allocation and family, a
//! permission per (relay, peer IP), a channel per (client 5-tuple, channel number) ↔ (relay, peer). The
//! server never relays: every per-packet decision is made once, in the data plane's `Core` over the
//! route table these commands program. Its transmits go to clients only (responses,
//! from a listener address); nothing it emits can address a peer.
//!
//! May use: wire, auth, policy, budget, and its own config.

mod config;
mod ports;
mod types;

use core::hash::BuildHasher;
use core::net::{IpAddr, SocketAddr};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use rand::RngCore;

pub use config::{Config, ConfigError};
pub use types::{
    AllocationId, ChannelNumber, Command, EndReason, ErrorCode, FiveTuple, PeerAddr, RelayAddr,
    Transmit, Transport,
};

use crate::auth::{
    self, Challenge, Challenger, NonceCheck, NonceKey, RequestFacts, RestError, Unsent,
    ADVERTISED_ALGORITHMS, FEATURE_PASSWORD_ALGORITHMS,
};
use crate::budget::{Refused, SourceLimiter};
use crate::policy::OwnAddresses;
use crate::route::{PackedAddr, SmallMap, INLINE_CHANNELS, INLINE_PERMISSIONS};
use crate::wire::{
    self, family, password_algorithm, Attribute, Class, IntegrityKey, Kind, Message, MessageType,
    MessageWriter, Method,
};
use ports::PortPool;

/// The smallest valid Allocate: the header and REQUESTED-TRANSPORT (RFC 8656 §7.1). Its 401 must fit
/// in [`crate::budget::MAX_AMPLIFICATION`]× this, or a client could never be challenged.
pub(crate) const MIN_ALLOCATE: usize = wire::HEADER_LEN + 8;

/// UDP's protocol number, the only REQUESTED-TRANSPORT a UDP relay serves (RFC 8656 §7.2).
const PROTO_UDP: u8 = 17;
/// Bytes of queued transmits after which new ones are dropped (the caller is not draining).
const OUTBOX_LIMIT: usize = 4 << 20;
/// Upper bound of a response the server writes (never more than one UDP datagram's worth).
const MAX_RESPONSE: usize = 1500;
/// How often the relay retries binding another port when the data plane cannot bind one.
const OPEN_ATTEMPTS: u8 = 3;
/// After a channel binding expires, neither its number nor its peer may be rebound to something else
/// for 5 minutes (RFC 8656 §12).
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// Counters of what the core dropped or refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams that were neither STUN nor ChannelData, or failed to parse (dropped silently).
    pub malformed: u64,
    /// Responses, indications and ChannelData from clients (the data plane relays Send indications and
    /// ChannelData; none of them is for the server).
    pub unexpected_class: u64,
    /// Transmits dropped because the caller did not drain the outbox.
    pub outbox_overflow: u64,
    /// Challenges (401) sent.
    pub challenges: u64,
    /// Requests refused after authentication failed (401 with credentials, or 438).
    pub auth_failures: u64,
    /// Retransmitted Allocate requests answered again (or ignored while pending).
    pub retransmits: u64,
    /// Unauthenticated answers not sent because their source (/32, /64) was over its rate.
    pub rate_limited: u64,
    /// Unauthenticated UDP answers not sent because they would be more than 3× their request.
    pub amplification_refused: u64,
    /// Of `auth_failures`: 438 Stale Nonce answers.
    pub stale_nonces: u64,
    /// Of `auth_failures`: requests refused because the identity's credentials were revoked.
    pub revoked: u64,
    /// Allocations that became active (their relay sockets open, success sent).
    pub allocations_created: u64,
    /// Allocate requests refused after authentication, by error code, in [`ErrorCode::ALL`] order.
    pub allocate_errors: [u64; ErrorCode::ALL.len()],
}

/// What a reload's peer policy took from one live allocation ([`Server::reload`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The allocation.
    pub allocation: AllocationId,
    /// Who it is billed to.
    pub identity: Box<str>,
    /// The permissions removed, by peer IP.
    pub permissions: Vec<IpAddr>,
    /// The channel bindings removed.
    pub channels: Vec<(ChannelNumber, PeerAddr)>,
}

/// The TURN server core. `R` is the source of randomness (relay ports, reservation tokens, nonce key).
#[derive(Debug)]
pub struct Server<R> {
    config: Config,
    rng: R,
    /// The nonce key, realm and PASSWORD-ALGORITHMS of every 401 and 438 (the workers hold clones).
    challenger: Challenger,
    users: HashMap<Box<str>, StaticUser>,
    userhashes: HashMap<[u8; 32], Box<str>>,
    pools: Vec<PortPool>,
    /// Boxed: the map's spare buckets then cost a pointer each, not a whole allocation.
    allocations: HashMap<AllocationId, Box<Allocation>>,
    /// Client 5-tuple → its allocation: ids hashed by their allocation's 5-tuple, which is stored once,
    /// in the allocation ([`Server::allocation_on`]).
    by_client: HashTable<AllocationId>,
    /// Hashes `by_client`'s 5-tuples.
    hasher: DefaultHashBuilder,
    /// What each identity holds, for its quotas; an identity holding nothing has no entry.
    per_identity: HashMap<Box<str>, Holdings>,
    /// identity → revocation horizon: its REST credentials expiring at or before it are refused.
    revoked: HashMap<Box<str>, u64>,
    reservations: HashMap<u64, Reservation>,
    timers: BTreeSet<(Instant, Timer)>,
    next_id: u64,
    draining: bool,
    outbox: Outbox,
    commands: VecDeque<Command>,
    stats: Stats,
    limiter: SourceLimiter,
    /// The relay's own addresses and which relayed addresses are live, shared with the workers.
    own: Arc<OwnAddresses>,
}

impl<R: RngCore> Server<R> {
    /// A server with `config`, drawing randomness from `rng` (a CSPRNG in production; seeded in tests).
    pub fn new(config: Config, mut rng: R) -> Result<Self, ConfigError> {
        config.validate()?;
        let challenger = Challenger::new(
            NonceKey::random(&mut rng),
            &config.realm,
            config.nonce_lifetime,
            config.password_algorithms,
        );
        let limiter = SourceLimiter::new(
            config.challenge_rate,
            config.challenge_shards,
            [rng.next_u64(), rng.next_u64()],
        );
        let (users, userhashes) = static_users(&config);
        let pools = config
            .relay_ips
            .iter()
            .map(|ip| PortPool::new(*ip, config.relay_ports.clone()))
            .collect();
        let own = Arc::new(
            OwnAddresses::new(
                &config.peer_policy,
                config.own_ips.iter().copied(),
                &config.relay_ips,
                config.relay_ports.clone(),
            )
            .with_external(&config.peer_policy, &config.external),
        );
        Ok(Server {
            config,
            rng,
            challenger,
            users,
            userhashes,
            pools,
            allocations: HashMap::new(),
            by_client: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            per_identity: HashMap::new(),
            revoked: HashMap::new(),
            reservations: HashMap::new(),
            timers: BTreeSet::new(),
            next_id: 1,
            draining: false,
            outbox: Outbox::default(),
            commands: VecDeque::new(),
            stats: Stats::default(),
            limiter,
            own,
        })
    }

    /// A STUN message from a client on its 5-tuple (the data plane relays ChannelData and Send
    /// indications itself, in its `Core`; they are never handed here, and are counted as
    /// unexpected if they are).
    pub fn handle_client_message(
        &mut self,
        now: Instant,
        unix_now: u64,
        client: FiveTuple,
        bytes: &[u8],
    ) {
        match bytes
            .first()
            .map(|b| self.config.channel_range.classify(*b))
        {
            Some(Kind::Stun) => match Message::parse(bytes) {
                Ok(msg) => self.client_stun(now, unix_now, client, &msg),
                // RFC 8489 §6.3: a message that is not well-formed STUN is discarded silently.
                Err(_) => self.stats.malformed += 1,
            },
            Some(Kind::ChannelData) => self.stats.unexpected_class += 1,
            _ => self.stats.malformed += 1,
        }
    }

    /// The data plane bound the relay socket asked for by [`Command::OpenRelay`].
    pub fn handle_relay_opened(
        &mut self,
        now: Instant,
        allocation: AllocationId,
        relay: RelayAddr,
    ) {
        let Some(alloc) = self.allocations.get_mut(&allocation) else {
            return;
        };
        let Some(i) = alloc.pending_relay(relay) else {
            return;
        };
        if let Some(slot) = alloc.relays[i].as_mut() {
            slot.open = true;
            self.own.set_live(relay.0, true);
        }
        self.activate_if_open(now, allocation);
    }

    /// The data plane could not bind `relay`. The server tries other ports a few times, then answers 508
    /// (or, for the additional IPv6 address of a dual-stack allocation, drops that family and reports it
    /// in ADDRESS-ERROR-CODE).
    pub fn handle_relay_failed(
        &mut self,
        now: Instant,
        allocation: AllocationId,
        relay: RelayAddr,
    ) {
        let Some(alloc) = self.allocations.get_mut(&allocation) else {
            return;
        };
        let Some(i) = alloc.pending_relay(relay) else {
            return;
        };
        release_port(&mut self.pools, relay);
        let attempts = alloc.open_attempts;
        alloc.open_attempts += 1;
        let retry = if attempts + 1 < OPEN_ATTEMPTS {
            take_port(
                &mut self.pools,
                &mut self.rng,
                relay.0.is_ipv4(),
                false,
                false,
            )
            .map(|(addr, _)| addr)
        } else {
            None
        };
        let alloc = self.allocations.get_mut(&allocation).expect_alloc();
        match retry {
            Some(addr) => {
                alloc.relays[i] = Some(RelaySlot::new(addr));
                self.commands.push_back(Command::OpenRelay {
                    allocation,
                    client: alloc.five_tuple,
                    relay: addr,
                    dont_fragment: alloc.dont_fragment,
                });
            }
            None if i == 1 => {
                // The additional family failed: keep the allocation with the other one (RFC 8656 §7.2).
                alloc.relays[1] = None;
                alloc.address_error = Some((family::IPV6, ErrorCode::InsufficientCapacity));
                self.activate_if_open(now, allocation);
            }
            None => {
                let (five, tid, mac) = (alloc.five_tuple, alloc.allocate_tid, alloc.signer.mac());
                self.free_allocation(allocation);
                self.count_allocate_error(ErrorCode::InsufficientCapacity);
                self.reply_to(
                    five,
                    MessageType::new(Method::ALLOCATE, Class::Error),
                    tid,
                    Some(&mac),
                    |w| error_code(w, ErrorCode::InsufficientCapacity),
                );
            }
        }
    }

    /// The client's TCP or TLS connection `client` closed: its allocation ends with it (RFC 8656 §3.1, the
    /// 5-tuple of a stream allocation is the connection). Nothing happens for a connection without one.
    pub fn handle_connection_closed(&mut self, now: Instant, client: FiveTuple) {
        let _ = now;
        if let Some(id) = self.allocation_on(client) {
            self.free_allocation(id);
        }
    }

    /// Expire whatever is due at `now`: allocations, permissions, channel bindings and port reservations.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Allocation(id) => self.expire(id, at),
                Timer::Reservation(token) => {
                    if let Some(r) = self.reservations.remove(&token) {
                        release_port(&mut self.pools, r.relay);
                        hold(&mut self.per_identity, &r.identity, |h| {
                            h.reservations = h.reservations.saturating_sub(1)
                        });
                    }
                }
            }
        }
    }

    /// Stop (or resume) taking new allocations: Allocate gets 300 Try Alternate when an alternate server
    /// is configured, else 508. Existing allocations keep working.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Revoke the REST credentials of `identity` (the user id in "<expiry>:<user-id>") that expire at or
    /// before `until_unix`: from now on every authenticated request made with one of them, Refresh
    /// included, gets 401, so existing allocations end at their next Refresh at the latest. A horizon at
    /// or before the credential expiries still in use (e.g. 0) lifts the revocation.
    ///
    /// With `terminate`, the live allocations made with such a credential end now (their permissions,
    /// channels and relay sockets are removed by the usual commands, and their usage ends as
    /// [`EndReason::Revoked`]). A lift never ends anything.
    pub fn revoke(&mut self, identity: &str, until_unix: u64, terminate: bool) {
        if until_unix == 0 {
            self.revoked.remove(identity);
            return;
        }
        self.revoked.insert(identity.into(), until_unix);
        if !terminate {
            return;
        }
        let ended: Vec<AllocationId> = self
            .allocations
            .iter()
            .filter(|(_, a)| {
                &*a.identity == identity
                    && auth::parse_rest_username(&a.username)
                        .is_some_and(|p| p.expiry <= until_unix)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            self.end_allocation(id, EndReason::Revoked);
        }
    }

    /// Take over the live settings of `config` (a reload): static users, REST secrets, quotas, the
    /// challenge rate and the peer policy. Every other field of `config` (realm, relay addresses and
    /// ports, lifetimes, ...) is ignored: those need a restart, and the caller reports their changes.
    /// `config` is validated first; an invalid one changes nothing.
    ///
    /// No allocation is dropped. Credentials are checked on every request, so a removed user or REST
    /// secret gets 401 at its next request, and a secret still listed keeps working. A lower quota
    /// applies to new allocations, permissions and channels. The new peer policy applies to new
    /// permissions at once; the permissions and active channels of live allocations that it denies
    /// are removed with the same [`Command::RemovePermission`] and [`Command::RemoveChannel`] that
    /// expiry emits, so the data plane's tables follow, and are listed in the returned [`Revoked`]
    /// (one entry per allocation, for the caller's log).
    pub fn reload(&mut self, config: Config) -> Result<Vec<Revoked>, ConfigError> {
        config.validate()?;
        let c = &mut self.config;
        if c.challenge_rate != config.challenge_rate {
            self.limiter = SourceLimiter::new(
                config.challenge_rate,
                c.challenge_shards,
                [self.rng.next_u64(), self.rng.next_u64()],
            );
        }
        c.users = config.users;
        c.rest_secrets = config.rest_secrets;
        c.max_allocations = config.max_allocations;
        c.max_allocations_per_user = config.max_allocations_per_user;
        c.max_permissions_per_allocation = config.max_permissions_per_allocation;
        c.max_channels_per_allocation = config.max_channels_per_allocation;
        c.max_permissions_per_identity = config.max_permissions_per_identity;
        c.max_channels_per_identity = config.max_channels_per_identity;
        c.challenge_rate = config.challenge_rate;
        c.peer_policy = config.peer_policy;
        (self.users, self.userhashes) = static_users(&self.config);
        self.own.set_allows(&self.config.peer_policy);

        let mut revoked = Vec::new();
        let mut ids: Vec<AllocationId> = self.allocations.keys().copied().collect();
        ids.sort_unstable_by_key(|id| id.0);
        for id in ids {
            let Some(alloc) = self.allocations.get(&id) else {
                continue;
            };
            // Own IPs are judged per packet by `OwnAddresses` (their allows were just updated), with
            // the port; every other IP by the policy, as `check_peer` does.
            let denied_ip = |ip: IpAddr| {
                !self.own.contains(ip) && self.config.peer_policy.check_ip(ip).is_err()
            };
            let channels: Vec<(u16, SocketAddr)> = alloc
                .channels
                .iter()
                .filter(|(_, b)| b.active && self.check_peer(alloc, b.peer.get()).is_err())
                .map(|(n, b)| (*n, b.peer.get()))
                .collect();
            let permissions: Vec<IpAddr> = alloc
                .permissions
                .keys()
                .copied()
                .filter(|ip| denied_ip(*ip))
                .collect();
            if channels.is_empty() && permissions.is_empty() {
                continue;
            }
            let alloc = self.allocations.get_mut(&id).expect_alloc();
            for &(number, peer) in &channels {
                if alloc.channels.remove(&number).is_none() {
                    continue;
                }
                hold(&mut self.per_identity, &alloc.identity, |h| {
                    h.channels = h.channels.saturating_sub(1)
                });
                if let Some(relay) = alloc.relay_for(peer.ip()) {
                    self.commands.push_back(Command::RemoveChannel {
                        allocation: id,
                        client: alloc.five_tuple,
                        relay,
                        channel: ChannelNumber::bound(number),
                        peer: PeerAddr(peer),
                    });
                }
            }
            for &ip in &permissions {
                if alloc.permissions.remove(&ip).is_none() {
                    continue;
                }
                hold(&mut self.per_identity, &alloc.identity, |h| {
                    h.permissions = h.permissions.saturating_sub(1)
                });
                if let Some(relay) = alloc.relay_for(ip) {
                    self.commands.push_back(Command::RemovePermission {
                        allocation: id,
                        relay,
                        peer: ip,
                    });
                }
            }
            revoked.push(Revoked {
                allocation: id,
                identity: alloc.identity.clone(),
                permissions,
                channels: channels
                    .into_iter()
                    .map(|(n, p)| (ChannelNumber::bound(n), PeerAddr(p)))
                    .collect(),
            });
            self.arm(id);
        }
        Ok(revoked)
    }

    /// The relay's own addresses, with the live relayed addresses the server marks as relay sockets open
    /// and close: the data plane checks every peer against them per packet.
    pub fn own_addresses(&self) -> &Arc<OwnAddresses> {
        &self.own
    }

    /// What the 401s and 438s are written with: the workers answer an unauthenticated request with a
    /// clone of it ([`auth::is_plain_challenge`]), so that the server verifies the nonces they mint.
    pub fn challenger(&self) -> &Challenger {
        &self.challenger
    }

    /// A worker's shard of the budget of unauthenticated answers, keyed with `key`: the same rate and
    /// the same number of shards as the server's own ([`Config::challenge_shards`]).
    pub(crate) fn budget_shard(&self, key: [u64; 2]) -> SourceLimiter {
        SourceLimiter::new(
            self.config.challenge_rate,
            self.config.challenge_shards,
            key,
        )
    }

    /// The identity usage of allocation `id` is billed to, while it lives.
    pub fn allocation_identity(&self, id: AllocationId) -> Option<&str> {
        self.allocations.get(&id).map(|a| &*a.identity)
    }

    /// The next message to send, if any. Borrowed until the next `handle_*` call.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        self.outbox.pop()
    }

    /// The next command for the data plane, if any.
    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`Server::handle_timeout`] must next be called. Changes only after a `handle_*` call.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Counters of drops and refusals.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Live allocations (pending ones included).
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// The allocation quota in force (`max_allocations`, changed by a reload).
    pub fn max_allocations(&self) -> usize {
        self.config.max_allocations
    }

    /// Free relay ports across all relay addresses (reserved ports count as used).
    pub fn free_ports(&self) -> usize {
        self.pools.iter().map(PortPool::free).sum()
    }

    /// Pending timers; zero once everything has expired.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Number of identities holding anything (an allocation, a port reservation).
    pub fn identity_count(&self) -> usize {
        self.per_identity.len()
    }

    /// The size of every table the server keeps per client, allocation or identity, by name (the
    /// stateful fuzz target checks that all are empty once every allocation has ended). Nonces are
    /// stateless and the unauthenticated-answer budget is a fixed table: neither is here.
    #[doc(hidden)]
    pub fn state_sizes(&self) -> [(&'static str, usize); 7] {
        [
            ("server.allocations", self.allocations.len()),
            ("server.by_client", self.by_client.len()),
            ("server.per_identity", self.per_identity.len()),
            ("server.reservations", self.reservations.len()),
            ("server.timers", self.timers.len()),
            ("server.commands", self.commands.len()),
            ("server.outbox", self.outbox.queue.len()),
        ]
    }

    fn client_stun(&mut self, now: Instant, unix_now: u64, five: FiveTuple, msg: &Message<'_>) {
        let typ = msg.message_type();
        match (typ.class, typ.method) {
            (Class::Request, Method::BINDING) => self.binding(now, unix_now, five, msg),
            (Class::Request, Method::ALLOCATE) => self.allocate(now, unix_now, five, msg),
            (Class::Request, Method::REFRESH) => self.refresh(now, unix_now, five, msg),
            (Class::Request, Method::CREATE_PERMISSION) => {
                self.create_permission(now, unix_now, five, msg)
            }
            (Class::Request, Method::CHANNEL_BIND) => self.channel_bind(now, unix_now, five, msg),
            // RFC 8489 §6.3.1: a request for a method the server does not know gets 400.
            (Class::Request, _) => self.reply_error(
                five,
                msg,
                Answer::Unauthenticated(now),
                ErrorCode::BadRequest,
            ),
            _ => self.stats.unexpected_class += 1,
        }
    }

    fn binding(&mut self, now: Instant, unix_now: u64, five: FiveTuple, msg: &Message<'_>) {
        let signer = if self.config.binding_requires_auth {
            match self.authenticate(unix_now, five, msg) {
                Ok(auth) => Some(auth.mac),
                Err(reject) => return self.reject(now, unix_now, five, msg, reject),
            }
        } else {
            None
        };
        let answer = signer
            .as_ref()
            .map_or(Answer::Unauthenticated(now), Answer::Signed);
        if self.unknown_attributes(five, msg, answer) {
            return;
        }
        self.reply(five, msg, Class::Success, answer, |w| {
            w.add(&Attribute::XorMappedAddress(five.client))
        });
    }

    fn allocate(&mut self, now: Instant, unix_now: u64, five: FiveTuple, msg: &Message<'_>) {
        let auth = match self.authenticate(unix_now, five, msg) {
            Ok(auth) => auth,
            Err(reject) => return self.reject(now, unix_now, five, msg, reject),
        };
        let s = Answer::Signed(&auth.mac);
        if let Some(existing) = self
            .allocation_on(five)
            .and_then(|id| self.allocations.get(&id))
        {
            // RFC 8656 §7.2: a retransmission gets the same answer; anything else on a used 5-tuple is 437.
            let code = if *existing.username != *auth.username {
                ErrorCode::WrongCredentials
            } else if existing.allocate_tid == msg.transaction_id() {
                self.stats.retransmits += 1;
                if existing.active {
                    self.allocate_success(existing.id);
                }
                return;
            } else {
                ErrorCode::AllocationMismatch
            };
            return self.reply_error(five, msg, s, code);
        }
        if self.unknown_attributes(five, msg, s) {
            return;
        }
        let a = &msg.attrs;
        let refuse = |server: &mut Self, code| server.reply_error(five, msg, s, code);
        match a.requested_transport {
            None => return refuse(self, ErrorCode::BadRequest),
            Some(PROTO_UDP) => {}
            Some(_) => return refuse(self, ErrorCode::UnsupportedTransport),
        }
        let families =
            a.requested_address_family.is_some() || a.additional_address_family.is_some();
        if a.reservation_token.is_some() && (a.even_port.is_some() || families) {
            return refuse(self, ErrorCode::BadRequest);
        }
        if a.requested_address_family.is_some() && a.additional_address_family.is_some() {
            return refuse(self, ErrorCode::BadRequest);
        }
        if a.additional_address_family
            .is_some_and(|f| f != family::IPV6)
        {
            return refuse(self, ErrorCode::BadRequest);
        }
        let want_v4 = match a.requested_address_family {
            None | Some(family::IPV4) => true,
            Some(family::IPV6) => false,
            Some(_) => return refuse(self, ErrorCode::AddressFamilyNotSupported),
        };
        if self.draining || self.allocations.len() >= self.config.max_allocations {
            return match self.config.alternate_server {
                Some(alt) => {
                    self.count_allocate_error(ErrorCode::TryAlternate);
                    self.reply(five, msg, Class::Error, s, |w| {
                        error_code(w, ErrorCode::TryAlternate)?;
                        w.add(&Attribute::AlternateServer(alt))
                    });
                }
                None => refuse(self, ErrorCode::InsufficientCapacity),
            };
        }
        // Reservations count toward the identity's quota (design §3): an EVEN-PORT R=1 request takes
        // two slots, redeeming one's own reservation none more.
        let reserve = a.reservation_token.is_none() && a.even_port == Some(true);
        let redeeming_own = a
            .reservation_token
            .and_then(|t| self.reservations.get(&t))
            .is_some_and(|r| *r.identity == *auth.identity);
        let needed = 1 + usize::from(reserve) - usize::from(redeeming_own);
        let held = self
            .per_identity
            .get(&*auth.identity)
            .map_or(0, |h| h.allocations + h.reservations);
        if held + needed > self.config.max_allocations_per_user {
            return refuse(self, ErrorCode::AllocationQuotaReached);
        }

        // Relay addresses: a reserved one, or fresh ports of the requested family (and IPv6 besides).
        let mut token_out = None;
        let primary = if let Some(token) = a.reservation_token {
            match self.reservations.remove(&token) {
                Some(r) => {
                    self.timers.remove(&(r.expires, Timer::Reservation(token)));
                    hold(&mut self.per_identity, &r.identity, |h| {
                        h.reservations = h.reservations.saturating_sub(1)
                    });
                    r.relay
                }
                None => return refuse(self, ErrorCode::InsufficientCapacity),
            }
        } else {
            if !self.pools.iter().any(|p| p.ip().is_ipv4() == want_v4) {
                return refuse(self, ErrorCode::AddressFamilyNotSupported);
            }
            match take_port(
                &mut self.pools,
                &mut self.rng,
                want_v4,
                a.even_port.is_some(),
                reserve,
            ) {
                Some((addr, _)) => {
                    if reserve {
                        let token = self.rng.next_u64();
                        let next = RelayAddr(SocketAddr::new(addr.0.ip(), addr.0.port() + 1));
                        let expires = now + secs(self.config.reservation_lifetime);
                        self.reservations.insert(
                            token,
                            Reservation {
                                relay: next,
                                expires,
                                identity: auth.identity.clone(),
                            },
                        );
                        self.timers.insert((expires, Timer::Reservation(token)));
                        token_out = Some(token);
                    }
                    addr
                }
                None => return refuse(self, ErrorCode::InsufficientCapacity),
            }
        };
        let mut address_error = None;
        let additional = if a.additional_address_family.is_some() {
            if !self.pools.iter().any(|p| p.ip().is_ipv6()) {
                address_error = Some((family::IPV6, ErrorCode::AddressFamilyNotSupported));
                None
            } else {
                let taken = take_port(&mut self.pools, &mut self.rng, false, false, false);
                if taken.is_none() {
                    address_error = Some((family::IPV6, ErrorCode::InsufficientCapacity));
                }
                taken.map(|(addr, _)| addr)
            }
        } else {
            None
        };

        let id = AllocationId(self.next_id);
        self.next_id += 1;
        let lifetime = desired_lifetime(&self.config, a.lifetime);
        let expires = now + secs(lifetime);
        let alloc = Allocation {
            id,
            five_tuple: five,
            username: auth.username,
            identity: auth.identity,
            signer: auth.signer,
            relays: [
                Some(RelaySlot::new(primary)),
                additional.map(RelaySlot::new),
            ],
            open_attempts: 0,
            active: false,
            expires,
            due: expires,
            lifetime,
            allocate_tid: msg.transaction_id(),
            address_error,
            reservation_token: token_out,
            dont_fragment: a.dont_fragment,
            permissions: SmallMap::new(),
            channels: SmallMap::new(),
        };
        hold(&mut self.per_identity, &alloc.identity, |h| {
            h.allocations += 1;
            h.reservations += usize::from(token_out.is_some());
        });
        for slot in alloc.relays.iter().flatten() {
            self.commands.push_back(Command::OpenRelay {
                allocation: id,
                client: five,
                relay: slot.addr(),
                dont_fragment: alloc.dont_fragment,
            });
        }
        self.timers.insert((expires, Timer::Allocation(id)));
        self.allocations.insert(id, Box::new(alloc));
        let (allocations, hasher) = (&self.allocations, &self.hasher);
        self.by_client
            .insert_unique(hasher.hash_one(five), id, |id| {
                allocations
                    .get(id)
                    .map_or(0, |a| hasher.hash_one(a.five_tuple))
            });
    }

    fn refresh(&mut self, now: Instant, unix_now: u64, five: FiveTuple, msg: &Message<'_>) {
        let Some((id, signer)) = self.authorize(now, unix_now, five, msg) else {
            return;
        };
        let s = Answer::Signed(&signer);
        let alloc = self.allocations.get_mut(&id).expect_alloc();
        // RFC 8656 §7.3: REQUESTED-ADDRESS-FAMILY must name a family the allocation has.
        if let Some(f) = msg.attrs.requested_address_family {
            if !alloc
                .relays
                .iter()
                .flatten()
                .any(|r| family_of(r.addr().0.ip()) == f)
            {
                return self.reply_error(five, msg, s, ErrorCode::PeerAddressFamilyMismatch);
            }
        }
        let lifetime = match msg.attrs.lifetime {
            Some(0) => 0,
            requested => desired_lifetime(&self.config, requested),
        };
        if lifetime == 0 {
            self.free_allocation(id);
        } else {
            alloc.expires = now + secs(lifetime);
            self.arm(id);
        }
        self.reply(five, msg, Class::Success, s, |w| {
            w.add(&Attribute::Lifetime(lifetime))
        });
    }

    fn create_permission(
        &mut self,
        now: Instant,
        unix_now: u64,
        five: FiveTuple,
        msg: &Message<'_>,
    ) {
        let Some((id, signer)) = self.authorize(now, unix_now, five, msg) else {
            return;
        };
        let s = Answer::Signed(&signer);
        // RFC 8656 §10.2: a malformed XOR-PEER-ADDRESS is a bad request.
        if msg.attrs.malformed_peer_address {
            return self.reply_error(five, msg, s, ErrorCode::BadRequest);
        }
        // RFC 8656 §9.2: all or nothing. Check every peer first, then install them all.
        let alloc = self.allocations.get(&id).expect_alloc();
        let mut new = 0usize;
        let mut any = false;
        for (i, peer) in msg.peer_addresses().enumerate() {
            any = true;
            if let Err(code) = self.check_peer(alloc, peer) {
                return self.reply_error(five, msg, s, code);
            }
            let repeated = msg.peer_addresses().take(i).any(|p| p.ip() == peer.ip());
            if !repeated && !alloc.permissions.contains_key(&peer.ip()) {
                new += 1;
            }
        }
        if !any {
            return self.reply_error(five, msg, s, ErrorCode::BadRequest);
        }
        let held = self.holdings(&alloc.identity);
        if alloc.permissions.len() + new > self.config.max_permissions_per_allocation
            || held.permissions + new > self.config.max_permissions_per_identity
        {
            return self.reply_error(five, msg, s, ErrorCode::InsufficientCapacity);
        }
        for peer in msg.peer_addresses() {
            self.install_permission(now, id, peer.ip());
        }
        self.reply(five, msg, Class::Success, s, |_| Ok(()));
    }

    fn channel_bind(&mut self, now: Instant, unix_now: u64, five: FiveTuple, msg: &Message<'_>) {
        let Some((id, signer)) = self.authorize(now, unix_now, five, msg) else {
            return;
        };
        let s = Answer::Signed(&signer);
        let alloc = self.allocations.get(&id).expect_alloc();
        let (Some(number), Some(peer), false) = (
            msg.attrs.channel_number,
            msg.attrs.xor_peer_address,
            msg.attrs.malformed_peer_address,
        ) else {
            return self.reply_error(five, msg, s, ErrorCode::BadRequest);
        };
        let Some(channel) = ChannelNumber::new_in(number, self.config.channel_range) else {
            return self.reply_error(five, msg, s, ErrorCode::BadRequest);
        };
        if let Err(code) = self.check_peer(alloc, peer) {
            return self.reply_error(five, msg, s, code);
        }
        // RFC 8656 §11.2: a channel is bound to one peer and a peer to one channel, including during the
        // 5 minutes after a binding expired.
        let conflict = alloc
            .channels
            .get(&number)
            .is_some_and(|b| b.peer.get() != peer)
            || alloc.channel_of(peer).is_some_and(|c| c != number);
        if conflict {
            return self.reply_error(five, msg, s, ErrorCode::BadRequest);
        }
        let held = self.holdings(&alloc.identity);
        let new_permission = !alloc.permissions.contains_key(&peer.ip());
        let new_channel = !alloc.channels.contains_key(&number);
        let c = &self.config;
        if new_permission
            && (alloc.permissions.len() >= c.max_permissions_per_allocation
                || held.permissions >= c.max_permissions_per_identity)
            || new_channel
                && (alloc.channels.len() >= c.max_channels_per_allocation
                    || held.channels >= c.max_channels_per_identity)
        {
            return self.reply_error(five, msg, s, ErrorCode::InsufficientCapacity);
        }
        let expires = now + secs(self.config.channel_lifetime);
        let alloc = self.allocations.get_mut(&id).expect_alloc();
        let relay = alloc.relay_for(peer.ip());
        let previous = alloc.channels.insert(
            number,
            ChannelBinding {
                peer: PackedAddr::new(peer),
                expires,
                active: true,
            },
        );
        if previous.is_none() {
            hold(&mut self.per_identity, &alloc.identity, |h| h.channels += 1);
        }
        self.arm(id);
        // A binding also installs or refreshes the permission (RFC 8656 §11.2); install it before the
        // channel so that the data plane never has a channel without its permission.
        self.install_permission(now, id, peer.ip());
        if !previous.is_some_and(|b| b.active) {
            if let Some(relay) = relay {
                self.commands.push_back(Command::InstallChannel {
                    allocation: id,
                    client: five,
                    relay,
                    channel,
                    peer: PeerAddr(peer),
                });
            }
        }
        self.reply(five, msg, Class::Success, s, |_| Ok(()));
    }

    /// Authenticate a non-Allocate request and find the client's allocation. Answers (and returns None)
    /// when the request is refused: 401/438, 437 without a live allocation, 441 for another user's, 420.
    fn authorize(
        &mut self,
        now: Instant,
        unix_now: u64,
        five: FiveTuple,
        msg: &Message<'_>,
    ) -> Option<(AllocationId, IntegrityKey)> {
        let auth = match self.authenticate(unix_now, five, msg) {
            Ok(auth) => auth,
            Err(reject) => {
                self.reject(now, unix_now, five, msg, reject);
                return None;
            }
        };
        let s = Answer::Signed(&auth.mac);
        let Some(alloc) = self.live_allocation(now, five) else {
            self.reply_error(five, msg, s, ErrorCode::AllocationMismatch);
            return None;
        };
        if *alloc.username != *auth.username {
            self.reply_error(five, msg, s, ErrorCode::WrongCredentials);
            return None;
        }
        let id = alloc.id;
        if self.unknown_attributes(five, msg, s) {
            return None;
        }
        Some((id, auth.mac))
    }

    /// What `identity` holds now (nothing when it has no entry).
    fn holdings(&self, identity: &str) -> Holdings {
        self.per_identity.get(identity).copied().unwrap_or_default()
    }

    /// The allocation on the client 5-tuple `five`, live or not.
    fn allocation_on(&self, five: FiveTuple) -> Option<AllocationId> {
        self.by_client
            .find(self.hasher.hash_one(five), |id| {
                self.allocations
                    .get(id)
                    .is_some_and(|a| a.five_tuple == five)
            })
            .copied()
    }

    /// An active allocation on `five` that has not expired (even if its timer has not run yet).
    fn live_allocation(&self, now: Instant, five: FiveTuple) -> Option<&Allocation> {
        let alloc = self
            .allocation_on(five)
            .and_then(|id| self.allocations.get(&id))?;
        (alloc.active && alloc.expires > now).then_some(alloc)
    }

    /// Peer checks shared by CreatePermission and ChannelBind: family (443) and policy (403).
    fn check_peer(&self, alloc: &Allocation, peer: SocketAddr) -> Result<(), ErrorCode> {
        if alloc.relay_for(peer.ip()).is_none() {
            return Err(ErrorCode::PeerAddressFamilyMismatch);
        }
        // The relay's own addresses: only another allocation's exact live relayed address (two relayed
        // clients on one server is the most common relayed call), or what an explicit allow opens.
        if let Some(verdict) = self.own.check(peer) {
            return verdict.map_err(|_| ErrorCode::Forbidden);
        }
        self.config
            .peer_policy
            .check(peer)
            .map_err(|_| ErrorCode::Forbidden)
    }

    fn install_permission(&mut self, now: Instant, id: AllocationId, ip: IpAddr) {
        let expires = now + secs(self.config.permission_lifetime);
        let alloc = self.allocations.get_mut(&id).expect_alloc();
        match alloc.permissions.insert(ip, expires) {
            Some(_) => {}
            None => {
                hold(&mut self.per_identity, &alloc.identity, |h| {
                    h.permissions += 1
                });
                if let Some(relay) = alloc.relay_for(ip) {
                    self.commands.push_back(Command::InstallPermission {
                        allocation: id,
                        relay,
                        client: alloc.five_tuple,
                        peer: ip,
                    });
                }
            }
        }
        self.arm(id);
    }

    /// (Re)arm allocation `id`'s one timer at its earliest deadline ([`Allocation::due`]).
    fn arm(&mut self, id: AllocationId) {
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        let due = alloc
            .permissions
            .values()
            .chain(alloc.channels.values().map(|b| &b.expires))
            .fold(alloc.expires, |due, at| due.min(*at));
        if due != alloc.due || !self.timers.contains(&(due, Timer::Allocation(id))) {
            self.timers.remove(&(alloc.due, Timer::Allocation(id)));
            alloc.due = due;
            self.timers.insert((due, Timer::Allocation(id)));
        }
    }

    /// Allocation `id`'s timer fired at `at` (its timer entry is gone): end what is due by then, in the
    /// order RFC 8656 gives each its lifetime, and re-arm for the rest. The allocation's own expiry ends
    /// everything (§7); an expired permission is removed (§9); an expired channel binding stops routing
    /// and cools down for 5 minutes before its number and peer are free again (§12).
    fn expire(&mut self, id: AllocationId, at: Instant) {
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        if alloc.expires <= at {
            return self.free_allocation(id);
        }
        let (identity, five) = (&alloc.identity, alloc.five_tuple);
        let relays = alloc.relays;
        let relay_for = |ip: IpAddr| {
            relays
                .iter()
                .flatten()
                .find(|r| r.addr().0.is_ipv4() == ip.is_ipv4())
                .map(|r| r.addr())
        };
        let (commands, per_identity) = (&mut self.commands, &mut self.per_identity);
        alloc.permissions.retain(|ip, expires| {
            if *expires > at {
                return true;
            }
            hold(per_identity, identity, |h| {
                h.permissions = h.permissions.saturating_sub(1)
            });
            if let Some(relay) = relay_for(*ip) {
                commands.push_back(Command::RemovePermission {
                    allocation: id,
                    relay,
                    peer: *ip,
                });
            }
            false
        });
        alloc.channels.retain(|number, binding| {
            if binding.expires > at {
                return true;
            }
            if !binding.active {
                hold(per_identity, identity, |h| {
                    h.channels = h.channels.saturating_sub(1)
                });
                return false;
            }
            binding.active = false;
            binding.expires += CHANNEL_COOLDOWN;
            if let Some(relay) = relay_for(binding.peer.get().ip()) {
                commands.push_back(Command::RemoveChannel {
                    allocation: id,
                    client: five,
                    relay,
                    channel: ChannelNumber::bound(*number),
                    peer: PeerAddr(binding.peer.get()),
                });
            }
            true
        });
        self.arm(id);
    }

    /// Remove an allocation and everything it holds, returning every port, counter and timer.
    fn free_allocation(&mut self, id: AllocationId) {
        self.end_allocation(id, EndReason::Ended);
    }

    /// [`Self::free_allocation`], recording why it ended.
    fn end_allocation(&mut self, id: AllocationId, reason: EndReason) {
        let Some(alloc) = self.allocations.remove(&id) else {
            return;
        };
        self.timers.remove(&(alloc.due, Timer::Allocation(id)));
        for (number, b) in &alloc.channels {
            if let (true, Some(relay), Some(channel)) = (
                b.active,
                alloc.relay_for(b.peer.get().ip()),
                Some(ChannelNumber::bound(*number)),
            ) {
                self.commands.push_back(Command::RemoveChannel {
                    allocation: id,
                    client: alloc.five_tuple,
                    relay,
                    channel,
                    peer: PeerAddr(b.peer.get()),
                });
            }
        }
        for ip in alloc.permissions.keys() {
            if let Some(relay) = alloc.relay_for(*ip) {
                self.commands.push_back(Command::RemovePermission {
                    allocation: id,
                    relay,
                    peer: *ip,
                });
            }
        }
        for slot in alloc.relays.iter().flatten() {
            release_port(&mut self.pools, slot.addr());
            if slot.open {
                self.own.set_live(slot.addr().0, false);
                self.commands.push_back(Command::CloseRelay {
                    allocation: id,
                    relay: slot.addr(),
                });
            }
        }
        if let Ok(entry) = self
            .by_client
            .find_entry(self.hasher.hash_one(alloc.five_tuple), |x| *x == id)
        {
            entry.remove();
        }
        // A port reserved by this allocation's EVEN-PORT ends with it.
        if let Some((token, r)) = alloc
            .reservation_token
            .and_then(|t| self.reservations.remove(&t).map(|r| (t, r)))
        {
            self.timers.remove(&(r.expires, Timer::Reservation(token)));
            release_port(&mut self.pools, r.relay);
            hold(&mut self.per_identity, &r.identity, |h| {
                h.reservations = h.reservations.saturating_sub(1)
            });
        }
        hold(&mut self.per_identity, &alloc.identity, |h| {
            h.allocations = h.allocations.saturating_sub(1);
            h.permissions = h.permissions.saturating_sub(alloc.permissions.len());
            h.channels = h.channels.saturating_sub(alloc.channels.len());
        });
        self.commands.push_back(Command::AllocationEnded {
            allocation: id,
            identity: alloc.identity,
            reason,
        });
    }

    fn activate_if_open(&mut self, now: Instant, id: AllocationId) {
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        if alloc.active || !alloc.relays.iter().flatten().all(|r| r.open) {
            return;
        }
        alloc.active = true;
        self.stats.allocations_created += 1;
        let expires = now + secs(alloc.lifetime);
        alloc.expires = expires;
        self.arm(id);
        self.allocate_success(id);
    }

    /// The Allocate success response (RFC 8656 §7.2), also sent again for a retransmitted request.
    fn allocate_success(&mut self, id: AllocationId) {
        let Some(alloc) = self.allocations.get(&id) else {
            return;
        };
        let typ = MessageType::new(Method::ALLOCATE, Class::Success);
        let mac = self.signing_key(&alloc.username, alloc.signer);
        // Behind 1:1 NAT clients are told the public address of the socket (relay.external).
        let relays = alloc
            .relays
            .map(|r| r.map(|slot| self.own.advertised(slot.addr().0)));
        let (lifetime, client, token, address_error) = (
            alloc.lifetime,
            alloc.five_tuple.client,
            alloc.reservation_token,
            alloc.address_error,
        );
        self.reply_to(alloc.five_tuple, typ, alloc.allocate_tid, Some(&mac), |w| {
            for addr in relays.iter().flatten() {
                w.add(&Attribute::XorRelayedAddress(*addr))?;
            }
            w.add(&Attribute::Lifetime(lifetime))?;
            if let Some(t) = token {
                w.add(&Attribute::ReservationToken(t))?;
            }
            if let Some((family, code)) = address_error {
                w.add(&Attribute::AddressErrorCode {
                    family,
                    code: code.code(),
                    reason: code.reason(),
                })?;
            }
            w.add(&Attribute::XorMappedAddress(client))
        });
    }

    /// RFC 8489 §9.2.4: long-term credential checks, in the RFC's order.
    fn authenticate(
        &mut self,
        unix_now: u64,
        five: FiveTuple,
        msg: &Message<'_>,
    ) -> Result<Authenticated, Reject> {
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            return Err(Reject::Challenge);
        }
        let a = &msg.attrs;
        let (Some(realm), Some(nonce)) = (a.realm, a.nonce) else {
            return Err(Reject::BadRequest);
        };
        if a.username.is_none() && a.userhash.is_none() {
            return Err(Reject::BadRequest);
        }
        let features = match self
            .challenger
            .key()
            .verify(five.client, nonce.as_bytes(), unix_now)
        {
            NonceCheck::Valid { features } => features,
            NonceCheck::Stale | NonceCheck::Forged => return Err(Reject::StaleNonce),
        };
        // Bid-down protection (RFC 8489 §9.2.4): if we advertised algorithms, what the client echoes must
        // match exactly, and its choice must be one of them.
        let mut sha256_key = false;
        if features & FEATURE_PASSWORD_ALGORITHMS != 0 {
            match (a.password_algorithms, a.password_algorithm) {
                (None, None) => {}
                (Some(list), Some((alg, params))) => {
                    let mut ours = [0u8; 4 * ADVERTISED_ALGORITHMS.len()];
                    let ours = wire::password_algorithms(&ADVERTISED_ALGORITHMS, &mut ours)
                        .ok()
                        .and_then(|a| match a {
                            Attribute::PasswordAlgorithms(l) => Some(l.as_bytes()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    if list.as_bytes() != ours || !params.is_empty() {
                        return Err(Reject::BadRequest);
                    }
                    match alg {
                        password_algorithm::MD5 => {}
                        password_algorithm::SHA256 => sha256_key = true,
                        _ => return Err(Reject::BadRequest),
                    }
                }
                _ => return Err(Reject::BadRequest),
            }
        }
        if realm != self.config.realm {
            return Err(Reject::Unauthenticated);
        }
        let username: &str = match (a.username, a.userhash) {
            (Some(u), _) => u,
            (None, Some(h)) => match self.userhashes.get(h) {
                Some(u) => u,
                None => return Err(Reject::Unauthenticated),
            },
            (None, None) => return Err(Reject::BadRequest),
        };
        let use_sha256_mac = msg.has_integrity_sha256();
        let (key, mac, identity) = if let Some(user) = self.users.get(username) {
            let key = if sha256_key {
                Key::Sha256(user.sha256)
            } else {
                Key::Md5(user.md5)
            };
            let signer = Signer {
                key,
                sha256: use_sha256_mac,
            };
            (key, user.integrity_key(signer), username)
        } else {
            let passwords = match self.config.rest_secrets.passwords(username, unix_now) {
                Ok(p) => p,
                Err(RestError::Expired | RestError::Malformed | RestError::BeyondMaxTtl) => {
                    return Err(Reject::Unauthenticated)
                }
            };
            let realm = &self.config.realm;
            let mut found = None;
            for password in passwords {
                let key = if sha256_key {
                    Key::Sha256(auth::long_term_key_sha256(username, realm, &password))
                } else {
                    Key::Md5(auth::long_term_key_md5(username, realm, &password))
                };
                let mac = IntegrityKey::new(key.bytes(), use_sha256_mac);
                if msg.verify_integrity_with(&mac) {
                    found = Some((key, mac));
                    break;
                }
            }
            let Some((key, mac)) = found else {
                return Err(Reject::Unauthenticated);
            };
            let parsed = auth::parse_rest_username(username);
            let identity = parsed
                .map(|r| r.user)
                .filter(|u| !u.is_empty())
                .unwrap_or(username);
            if let (Some(horizon), Some(p)) = (self.revoked.get(identity), parsed) {
                if p.expiry <= *horizon {
                    return Err(Reject::Revoked);
                }
            }
            return Ok(Authenticated {
                username: username.into(),
                identity: identity.into(),
                signer: Signer {
                    key,
                    sha256: use_sha256_mac,
                },
                mac,
            });
        };
        if !msg.verify_integrity_with(&mac) {
            return Err(Reject::Unauthenticated);
        }
        Ok(Authenticated {
            username: username.into(),
            identity: identity.into(),
            signer: Signer {
                key,
                sha256: use_sha256_mac,
            },
            mac,
        })
    }

    /// `signer`, an allocation's key, ready to use: a static user's MESSAGE-INTEGRITY key as derived
    /// at start (or reload), when the allocation's key is still that one.
    fn signing_key(&self, username: &str, signer: Signer) -> IntegrityKey {
        self.users
            .get(username)
            .map_or_else(|| signer.mac(), |user| user.integrity_key(signer))
    }

    /// Answer a request that failed authentication. Unauthenticated answers carry only what RFC 8489
    /// §9.2.4 requires (ERROR-CODE, REALM, NONCE and, when advertised, PASSWORD-ALGORITHMS), and share
    /// the per-source budget and the 3× size bound of every unauthenticated answer (design §3).
    fn reject(
        &mut self,
        now: Instant,
        unix_now: u64,
        five: FiveTuple,
        msg: &Message<'_>,
        reject: Reject,
    ) {
        // Design §3: an unauthenticated malformed request is dropped silently (it only parsed so that
        // an authenticated one can get 400).
        if msg.attrs.malformed_peer_address {
            self.stats.malformed += 1;
            return;
        }
        let answer = Answer::Unauthenticated(now);
        let challenge = match reject {
            Reject::BadRequest => {
                return self.reply_error(five, msg, answer, ErrorCode::BadRequest)
            }
            Reject::Challenge | Reject::Unauthenticated | Reject::Revoked => {
                Challenge::Unauthenticated
            }
            Reject::StaleNonce => Challenge::StaleNonce,
        };
        let request = RequestFacts::of(msg);
        let (challenger, limiter) = (&self.challenger, &mut self.limiter);
        let budget = (!five.transport.is_stream()).then_some((limiter, now));
        let mut unsent = None;
        let queued = self.outbox.push(five, MAX_RESPONSE, |buf| {
            challenger
                .write(buf, request, five.client, challenge, unix_now, budget)
                .map_err(|e| {
                    unsent = Some(e);
                    wire::Error::BufferTooSmall
                })
        });
        match unsent {
            Some(Unsent::Refused(why)) => return self.count_refused(why),
            Some(Unsent::Write(_)) => return,
            None if !queued => {
                self.stats.outbox_overflow += 1;
                return;
            }
            None => {}
        }
        let s = &mut self.stats;
        match reject {
            Reject::Challenge => s.challenges += 1,
            Reject::Unauthenticated => s.auth_failures += 1,
            Reject::StaleNonce => {
                s.auth_failures += 1;
                s.stale_nonces += 1;
            }
            Reject::Revoked => {
                s.auth_failures += 1;
                s.revoked += 1;
            }
            Reject::BadRequest => {}
        }
    }

    /// Answer 420 if the request carries unknown comprehension-required attributes (RFC 8489 §6.3.1.1).
    fn unknown_attributes(
        &mut self,
        five: FiveTuple,
        msg: &Message<'_>,
        answer: Answer<'_>,
    ) -> bool {
        let unknown = msg.unknown_required();
        if unknown.is_empty() {
            return false;
        }
        self.reply(five, msg, Class::Error, answer, |w| {
            error_code(w, ErrorCode::UnknownAttribute)?;
            let mut scratch = [0u8; 2 * wire::MAX_UNKNOWN];
            w.add(&wire::unknown_attributes(unknown, &mut scratch)?)
        });
        true
    }

    /// A response of `class` to `req`, signed with the request's key when it was authenticated, with
    /// FINGERPRINT when the request had one. True when it was queued.
    ///
    /// An unauthenticated answer (401, 438, 400, 420, Binding success) over UDP, whose source may be
    /// spoofed, is sent only if it is at most [`crate::budget::MAX_AMPLIFICATION`]× its request and the source's
    /// budget has a token left (design §3). TCP and TLS clients cannot spoof their source: exempt.
    fn reply(
        &mut self,
        five: FiveTuple,
        req: &Message<'_>,
        class: Class,
        answer: Answer<'_>,
        body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), wire::Error>,
    ) -> bool {
        let typ = MessageType::new(req.message_type().method, class);
        let fingerprint = req.attrs.fingerprint.is_some();
        let (signer, budget) = match answer {
            Answer::Signed(s) => (Some(s), None),
            Answer::Unauthenticated(_) if five.transport.is_stream() => (None, None),
            Answer::Unauthenticated(now) => (None, Some(now)),
        };
        let mut refused = None;
        let (limiter, client) = (&mut self.limiter, five.client.ip());
        let request_len = req.as_bytes().len();
        let sent = self.outbox.push(five, MAX_RESPONSE, |buf| {
            let mut w = MessageWriter::new(buf, typ, req.transaction_id())?;
            body(&mut w)?;
            let n = finish(w, signer, fingerprint)?;
            match budget.map(|now| limiter.admit(client, now, request_len, n)) {
                Some(Err(why)) => {
                    refused = Some(why);
                    Err(wire::Error::BufferTooSmall)
                }
                _ => Ok(n),
            }
        });
        match refused {
            Some(why) => self.count_refused(why),
            None if !sent => self.stats.outbox_overflow += 1,
            None => {}
        }
        sent
    }

    fn count_refused(&mut self, why: Refused) {
        match why {
            Refused::Amplification => self.stats.amplification_refused += 1,
            Refused::RateLimited => self.stats.rate_limited += 1,
        }
    }

    fn reply_error(
        &mut self,
        five: FiveTuple,
        req: &Message<'_>,
        answer: Answer<'_>,
        code: ErrorCode,
    ) {
        if req.message_type().method == Method::ALLOCATE {
            self.count_allocate_error(code);
        }
        self.reply(five, req, Class::Error, answer, |w| error_code(w, code));
    }

    fn count_allocate_error(&mut self, code: ErrorCode) {
        self.stats.allocate_errors[code.index()] += 1;
    }

    /// A message of an explicit type to `five` (used for answers not tied to a parsed request).
    fn reply_to(
        &mut self,
        five: FiveTuple,
        typ: MessageType,
        tid: wire::TransactionId,
        signer: Option<&IntegrityKey>,
        body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), wire::Error>,
    ) {
        let sent = self.outbox.push(five, MAX_RESPONSE, |buf| {
            let mut w = MessageWriter::new(buf, typ, tid)?;
            body(&mut w)?;
            finish(w, signer, false)
        });
        if !sent {
            self.stats.outbox_overflow += 1;
        }
    }
}

/// Append MESSAGE-INTEGRITY(-SHA256) with the request's key and FINGERPRINT when the request had one.
fn finish(
    mut w: MessageWriter<'_>,
    signer: Option<&IntegrityKey>,
    fingerprint: bool,
) -> Result<usize, wire::Error> {
    if let Some(key) = signer {
        w.add_integrity_with(key)?;
    }
    if fingerprint {
        w.add_fingerprint()?;
    }
    Ok(w.finish())
}

fn error_code(w: &mut MessageWriter<'_>, code: ErrorCode) -> Result<(), wire::Error> {
    w.add(&Attribute::ErrorCode {
        code: code.code(),
        reason: code.reason(),
    })
}

/// RFC 8656 §7.2/§7.3 "desired lifetime": the requested value capped at the maximum, but never below the
/// default.
fn desired_lifetime(config: &Config, requested: Option<u32>) -> u32 {
    requested.map_or(config.default_lifetime, |r| {
        r.min(config.max_lifetime).max(config.default_lifetime)
    })
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        family::IPV4
    } else {
        family::IPV6
    }
}

/// USERHASH = SHA-256(username ":" realm) (RFC 8489 §14.4).
/// Static users by name, and their names by USERHASH.
type StaticUsers = (HashMap<Box<str>, StaticUser>, HashMap<[u8; 32], Box<str>>);

/// The static users' keys, by name and by USERHASH.
fn static_users(config: &Config) -> StaticUsers {
    let mut users = HashMap::new();
    let mut userhashes = HashMap::new();
    for (name, password) in &config.users {
        let md5 = auth::long_term_key_md5(name, &config.realm, password);
        let user = StaticUser {
            md5,
            md5_integrity: IntegrityKey::new(&md5, false),
            sha256: auth::long_term_key_sha256(name, &config.realm, password),
        };
        users.insert(name.as_str().into(), user);
        userhashes.insert(userhash(name, &config.realm), name.as_str().into());
    }
    (users, userhashes)
}

fn userhash(username: &str, realm: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// Take a port from the relay address of the wanted family with the most free ports.
fn take_port<R: RngCore>(
    pools: &mut [PortPool],
    rng: &mut R,
    v4: bool,
    even: bool,
    pair: bool,
) -> Option<(RelayAddr, u16)> {
    let pool = pools
        .iter_mut()
        .filter(|p| p.ip().is_ipv4() == v4)
        .max_by_key(|p| p.free())?;
    let port = pool.take(rng, even, pair)?;
    Some((RelayAddr(SocketAddr::new(pool.ip(), port)), port))
}

fn release_port(pools: &mut [PortPool], relay: RelayAddr) {
    if let Some(pool) = pools.iter_mut().find(|p| p.ip() == relay.0.ip()) {
        pool.release(relay.0.port());
    }
}

/// Keys of static users, derived once.
#[derive(Debug, Clone)]
struct StaticUser {
    md5: [u8; 16],
    /// `md5` ready for MESSAGE-INTEGRITY, what nearly every client uses: its key schedule is not
    /// hashed again for each request and response.
    md5_integrity: IntegrityKey,
    sha256: [u8; 32],
}

impl StaticUser {
    /// `signer` ready to use: the prepared `md5_integrity` when that is what it is.
    fn integrity_key(&self, signer: Signer) -> IntegrityKey {
        match signer {
            Signer {
                key: Key::Md5(key),
                sha256: false,
            } if key == self.md5 => self.md5_integrity.clone(),
            _ => signer.mac(),
        }
    }
}

/// The long-term key that authenticated a request.
#[derive(Debug, Clone, Copy)]
enum Key {
    Md5([u8; 16]),
    Sha256([u8; 32]),
}

impl Key {
    fn bytes(&self) -> &[u8] {
        match self {
            Key::Md5(k) => k,
            Key::Sha256(k) => k,
        }
    }
}

/// How to sign responses to an authenticated request: its key and its integrity attribute. What an
/// allocation keeps (34 bytes); [`IntegrityKey`] is the key ready to use.
#[derive(Debug, Clone, Copy)]
struct Signer {
    key: Key,
    sha256: bool,
}

impl Signer {
    fn mac(&self) -> IntegrityKey {
        IntegrityKey::new(self.key.bytes(), self.sha256)
    }
}

#[derive(Debug)]
struct Authenticated {
    username: Box<str>,
    identity: Box<str>,
    signer: Signer,
    /// `signer` ready to sign the response.
    mac: IntegrityKey,
}

/// Who an answer is for: an authenticated request, signed with its key, or an unauthenticated one
/// (received at the instant given), which is held to the source budget and the 3× bound.
#[derive(Debug, Clone, Copy)]
enum Answer<'s> {
    Signed(&'s IntegrityKey),
    Unauthenticated(Instant),
}

/// Why authentication refused a request.
#[derive(Debug, Clone, Copy)]
enum Reject {
    /// No integrity: challenge with 401.
    Challenge,
    /// Integrity present but USERNAME/REALM/NONCE missing, or a bid-down attempt: 400.
    BadRequest,
    /// Unknown user, expired credential, wrong realm or integrity: 401.
    Unauthenticated,
    /// Nonce expired or not ours: 438 with a fresh one.
    StaleNonce,
    /// A REST credential of a revoked identity: 401.
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// An allocation's earliest deadline ([`Allocation::due`]): its expiry, a permission's, a channel
    /// binding's or the end of its cool-down. One timer per allocation, however much it holds.
    Allocation(AllocationId),
    Reservation(u64),
}

#[derive(Debug, Clone)]
struct Reservation {
    relay: RelayAddr,
    expires: Instant,
    /// Who reserved it: the port counts toward that identity's allocation quota until it is redeemed,
    /// expires, or the allocation that reserved it ends.
    identity: Box<str>,
}

/// What one identity holds, for its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Holdings {
    allocations: usize,
    reservations: usize,
    /// Permissions over all its allocations.
    permissions: usize,
    /// Channel bindings over all its allocations, those cooling down included (RFC 8656 §12).
    channels: usize,
}

/// Change what `identity` holds; an identity left holding nothing loses its entry, so the map stays as
/// small as the set of identities with state.
fn hold(map: &mut HashMap<Box<str>, Holdings>, identity: &str, f: impl FnOnce(&mut Holdings)) {
    let h = map.entry_ref(identity).or_default();
    f(h);
    if *h == Holdings::default() {
        map.remove(identity);
    }
}

/// One relay socket of an allocation (its address packed: config relay IPs have no flow label or scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelaySlot {
    addr: PackedAddr,
    open: bool,
}

impl RelaySlot {
    /// A slot for `addr`, not bound yet.
    fn new(addr: RelayAddr) -> Self {
        RelaySlot {
            addr: PackedAddr::new(addr.0),
            open: false,
        }
    }

    /// Its address.
    fn addr(&self) -> RelayAddr {
        RelayAddr(self.addr.get())
    }
}

#[derive(Debug, Clone, Copy)]
struct ChannelBinding {
    /// Packed: a peer address from XOR-PEER-ADDRESS has no flow label or scope.
    peer: PackedAddr,
    /// End of the binding while active; end of the cool-down while not.
    expires: Instant,
    active: bool,
}

#[derive(Debug)]
struct Allocation {
    id: AllocationId,
    five_tuple: FiveTuple,
    username: Box<str>,
    identity: Box<str>,
    signer: Signer,
    /// The primary relay (requested family) and the additional IPv6 one of a dual-stack allocation.
    relays: [Option<RelaySlot>; 2],
    open_attempts: u8,
    active: bool,
    expires: Instant,
    /// When its one timer is armed: the earliest of `expires` and its permissions' and channels'
    /// deadlines ([`Server::arm`]).
    due: Instant,
    lifetime: u32,
    allocate_tid: wire::TransactionId,
    address_error: Option<(u8, ErrorCode)>,
    reservation_token: Option<u64>,
    dont_fragment: bool,
    /// Peer IP → when its permission expires. Inline for a typical call, spilled beyond.
    permissions: SmallMap<IpAddr, Instant, INLINE_PERMISSIONS>,
    /// Channel number → its binding (a peer is bound to at most one number, RFC 8656 §11.2:
    /// [`Allocation::channel_of`] finds it).
    channels: SmallMap<u16, ChannelBinding, INLINE_CHANNELS>,
}

impl Allocation {
    /// Which relay slot is `relay`, still waiting for the data plane to bind it.
    fn pending_relay(&self, relay: RelayAddr) -> Option<usize> {
        self.relays
            .iter()
            .position(|r| r.is_some_and(|r| r.addr() == relay && !r.open))
    }

    /// The channel number `peer` is bound to (active or cooling down).
    fn channel_of(&self, peer: SocketAddr) -> Option<u16> {
        self.channels
            .iter()
            .find(|(_, b)| b.peer.get() == peer)
            .map(|(n, _)| *n)
    }

    /// The relay socket of the peer's family.
    fn relay_for(&self, peer: IpAddr) -> Option<RelayAddr> {
        self.relays
            .iter()
            .flatten()
            .find(|r| r.addr().0.is_ipv4() == peer.is_ipv4())
            .map(|r| r.addr())
    }
}

trait ExpectAlloc<T> {
    fn expect_alloc(self) -> T;
}

/// The server looks up an allocation it has just found by id, within one call; a miss is a bug in this
/// module, never a consequence of input.
impl<T> ExpectAlloc<T> for Option<T> {
    #[allow(clippy::expect_used)]
    fn expect_alloc(self) -> T {
        self.expect("allocation looked up within the same call")
    }
}

/// Queued transmits in one reusable buffer: no allocation per message once warm.
#[derive(Debug, Default)]
struct Outbox {
    buf: Vec<u8>,
    queue: VecDeque<Queued>,
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    to: FiveTuple,
    start: usize,
    len: usize,
}

impl Outbox {
    /// Queue a message written by `write` into at most `max_len` bytes. False if it did not fit or failed.
    fn push(
        &mut self,
        to: FiveTuple,
        max_len: usize,
        write: impl FnOnce(&mut [u8]) -> Result<usize, wire::Error>,
    ) -> bool {
        if self.queue.is_empty() {
            self.buf.clear();
        }
        let start = self.buf.len();
        if start + max_len > OUTBOX_LIMIT {
            return false;
        }
        self.buf.resize(start + max_len, 0);
        match write(&mut self.buf[start..]) {
            Ok(len) if len <= max_len => {
                self.buf.truncate(start + len);
                self.queue.push_back(Queued { to, start, len });
                true
            }
            _ => {
                self.buf.truncate(start);
                false
            }
        }
    }

    fn pop(&mut self) -> Option<Transmit<'_>> {
        let q = self.queue.pop_front()?;
        let payload = self.buf.get(q.start..q.start + q.len)?;
        Some(Transmit { to: q.to, payload })
    }
}

#[cfg(test)]
pub(crate) mod tests;
