//! The 401 challenge and the 438 Stale Nonce answer (RFC 8489 §9.2.4), written in one place for the
//! server (every request it authenticates) and the data-plane workers (which answer an Allocate,
//! Refresh, CreatePermission or ChannelBind without MESSAGE-INTEGRITY in the receive slot, as they
//! answer Binding): the body (ERROR-CODE, REALM, NONCE, at most PASSWORD-ALGORITHMS; design §3), the
//! nonce, and the amplification and per-source budget check of [`SourceLimiter::admit`].
//!
//! Deterministic like the rest of `auth`: time comes in as arguments. May use: wire, budget.

use core::net::SocketAddr;
use std::time::Instant;

use super::{NonceKey, FEATURE_PASSWORD_ALGORITHMS};
use crate::budget::{Refused, SourceLimiter};
use crate::wire::{
    self, password_algorithm, Attribute, Class, Message, MessageType, MessageWriter, Method,
};

/// What PASSWORD-ALGORITHMS advertises, in order of the server's preference (RFC 8489 §14.11): both
/// without parameters, 4 bytes each on the wire.
pub const ADVERTISED_ALGORITHMS: [u16; 2] = [password_algorithm::MD5, password_algorithm::SHA256];

/// Which answer carries a fresh nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// 401 Unauthorized: no or wrong credentials.
    Unauthenticated,
    /// 438 Stale Nonce: an authentic nonce past its expiry (or one this key did not mint).
    StaleNonce,
}

impl Challenge {
    /// The ERROR-CODE number.
    pub fn code(self) -> u16 {
        match self {
            Challenge::Unauthenticated => 401,
            Challenge::StaleNonce => 438,
        }
    }

    /// The ERROR-CODE reason phrase.
    pub fn reason(self) -> &'static str {
        match self {
            Challenge::Unauthenticated => "Unauthorized",
            Challenge::StaleNonce => "Stale Nonce",
        }
    }
}

/// What an unauthenticated answer (a challenge, or a worker's Binding success) needs of its request,
/// copied out of it (so that a worker can write the answer over the request, in its receive slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts {
    method: Method,
    tid: wire::TransactionId,
    fingerprint: bool,
    len: usize,
}

impl RequestFacts {
    /// The facts of `msg`.
    pub fn of(msg: &Message<'_>) -> Self {
        RequestFacts {
            method: msg.message_type().method,
            tid: msg.transaction_id(),
            fingerprint: msg.attrs.fingerprint.is_some(),
            len: msg.as_bytes().len(),
        }
    }

    /// The request's transaction id.
    pub fn tid(&self) -> wire::TransactionId {
        self.tid
    }

    /// Whether the request carried FINGERPRINT (so the answer does).
    pub fn fingerprint(&self) -> bool {
        self.fingerprint
    }

    /// The request's length in bytes (the amplification bound's base).
    pub fn request_len(&self) -> usize {
        self.len
    }
}

/// Why a challenge was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// Over the amplification bound or the source's budget (counted by the caller).
    Refused(Refused),
    /// It did not fit the buffer.
    Write(wire::Error),
}

/// What a challenge needs besides the request: the nonce key, the realm, the nonce lifetime and
/// whether PASSWORD-ALGORITHMS is advertised. The server holds one and every worker a clone of it,
/// so that a nonce a worker mints is one the server verifies.
#[derive(Clone)]
pub struct Challenger {
    key: NonceKey,
    realm: Box<str>,
    nonce_lifetime: u32,
    /// With `password_algorithms`: the size of the 401 that advertises them (without FINGERPRINT),
    /// to tell which requests it fits ([`Challenger::advertises`]).
    advertised: Option<usize>,
}

impl core::fmt::Debug for Challenger {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Challenger")
            .field("realm", &self.realm)
            .field("nonce_lifetime", &self.nonce_lifetime)
            .field("advertised", &self.advertised)
            .finish_non_exhaustive()
    }
}

impl Challenger {
    /// Challenges in `realm` with nonces of `key` valid for `nonce_lifetime` seconds, advertising
    /// PASSWORD-ALGORITHMS if `password_algorithms`.
    pub fn new(key: NonceKey, realm: &str, nonce_lifetime: u32, password_algorithms: bool) -> Self {
        Challenger {
            key,
            realm: realm.into(),
            nonce_lifetime,
            advertised: password_algorithms.then(|| challenge_len(realm, true)),
        }
    }

    /// The nonce key (the server verifies the nonces it and the workers mint).
    pub fn key(&self) -> &NonceKey {
        &self.key
    }

    /// The realm the challenges name.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Whether the 401 or 438 to `req` advertises PASSWORD-ALGORITHMS (RFC 8489 §9.2.4), with the
    /// nonce cookie's feature bit that records it. Only where that longer answer fits: always to a
    /// `stream` (TCP, TLS) client, exempt from the amplification bound, and over UDP when it stays
    /// within the bound of [`crate::budget::answer_limit`]; a smaller UDP request gets the plain 401
    /// with a featureless nonce. Bid-down protection holds per client: the server reads the feature
    /// bits from the nonce, which the MAC covers, so a client is held to exactly what it was told.
    pub fn advertises(&self, req: RequestFacts, stream: bool) -> bool {
        let Some(len) = self.advertised else {
            return false;
        };
        let fingerprint = if req.fingerprint {
            wire::FINGERPRINT_LEN
        } else {
            0
        };
        stream || len + fingerprint <= crate::budget::answer_limit(req.len)
    }

    /// Write the `challenge` answer to `req` from `client` into `buf`: a fresh nonce valid from
    /// `unix_now` for the nonce lifetime, FINGERPRINT when the request had one. Over UDP `budget` is
    /// the source limiter and the time: the answer is refused if it is more than 3× the request or
    /// the source's network has no token left (checked once the size is known, so that an answer too
    /// large spends no token); `None` for a stream client. Returns the answer's length. Does not
    /// allocate.
    pub(crate) fn write(
        &self,
        buf: &mut [u8],
        req: RequestFacts,
        client: SocketAddr,
        challenge: Challenge,
        unix_now: u64,
        budget: Option<(&mut SourceLimiter, Instant)>,
    ) -> Result<usize, Unsent> {
        let algorithms = self.advertises(req, budget.is_none());
        let features = if algorithms {
            FEATURE_PASSWORD_ALGORITHMS
        } else {
            0
        };
        let expiry = unix_now.saturating_add(u64::from(self.nonce_lifetime));
        let nonce = self.key.mint(client, features, expiry);
        let typ = MessageType::new(req.method, Class::Error);
        let n = MessageWriter::new(buf, typ, req.tid)
            .and_then(|mut w| {
                challenge_body(&mut w, challenge, &self.realm, nonce.as_str(), algorithms)?;
                if req.fingerprint {
                    w.add_fingerprint()?;
                }
                Ok(w.finish())
            })
            .map_err(Unsent::Write)?;
        if let Some((limiter, now)) = budget {
            limiter
                .admit(client.ip(), now, req.len, n)
                .map_err(Unsent::Refused)?;
        }
        Ok(n)
    }
}

/// `msg` certainly gets a plain 401 from the server, whatever its state: a request of a method that
/// is always authenticated (Allocate, Refresh, CreatePermission, ChannelBind) with neither
/// MESSAGE-INTEGRITY nor MESSAGE-INTEGRITY-SHA256, and no malformed XOR-PEER-ADDRESS (such a request
/// is dropped silently, design §3). The server authenticates these methods before anything else, so
/// nothing about allocations, quotas, draining or unknown attributes changes the answer.
pub fn is_plain_challenge(msg: &Message<'_>) -> bool {
    let typ = msg.message_type();
    typ.class == Class::Request
        && matches!(
            typ.method,
            Method::ALLOCATE | Method::REFRESH | Method::CREATE_PERMISSION | Method::CHANNEL_BIND
        )
        && !msg.has_integrity()
        && !msg.has_integrity_sha256()
        && !msg.attrs.malformed_peer_address
}

/// Size of the 401 that a request without FINGERPRINT gets with `realm`, advertising
/// PASSWORD-ALGORITHMS or not. Config validation holds the plain one to 3× a minimal Allocate; the
/// advertising one decides which UDP requests may get it.
pub fn challenge_len(realm: &str, password_algorithms: bool) -> usize {
    let features = if password_algorithms {
        FEATURE_PASSWORD_ALGORITHMS
    } else {
        0
    };
    // Nonce lengths depend only on the feature bits, never on the key, address or expiry.
    let nonce = NonceKey::new([0; 32]).mint(SocketAddr::from(([0, 0, 0, 0], 0)), features, 0);
    let mut buf = [0u8; 1500];
    let typ = MessageType::new(Method::ALLOCATE, Class::Error);
    MessageWriter::new(&mut buf, typ, wire::TransactionId::default())
        .and_then(|mut w| {
            let code = Challenge::Unauthenticated;
            challenge_body(&mut w, code, realm, nonce.as_str(), password_algorithms)?;
            Ok(w.finish())
        })
        .unwrap_or(usize::MAX)
}

/// The body of a 401 or 438: ERROR-CODE, REALM, NONCE and, when advertised, PASSWORD-ALGORITHMS; only
/// what RFC 8489 §9.2.4 requires.
fn challenge_body(
    w: &mut MessageWriter<'_>,
    challenge: Challenge,
    realm: &str,
    nonce: &str,
    algorithms: bool,
) -> Result<(), wire::Error> {
    w.add(&Attribute::ErrorCode {
        code: challenge.code(),
        reason: challenge.reason(),
    })?;
    w.add(&Attribute::Realm(realm))?;
    w.add(&Attribute::Nonce(nonce))?;
    if algorithms {
        let mut scratch = [0u8; 4 * ADVERTISED_ALGORITHMS.len()];
        w.add(&wire::password_algorithms(
            &ADVERTISED_ALGORITHMS,
            &mut scratch,
        )?)?;
    }
    Ok(())
}
