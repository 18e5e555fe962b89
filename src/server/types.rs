//! The nouns of the TURN core: newtypes for addresses (the allocation id and channel number live in
//! `route`, which carries them to the data plane), the commands and transmits it emits, and protocol
//! error codes.

use crate::auth::Challenge;
use core::net::{IpAddr, SocketAddr};

pub use crate::route::{AllocationId, ChannelNumber};

/// The transport between a client and the relay (RFC 8656 §3.1). The relayed side is always UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// Whether the transport is a byte stream (ChannelData is padded to 4 bytes there, RFC 8656 §12.5).
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// A client's 5-tuple: the client's address, the relay's listening address it sent to, and the
/// transport (RFC 8656 §2). It names an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// The client's address as the relay sees it (its server-reflexive address).
    pub client: SocketAddr,
    /// The relay's address the client sent to; replies leave from here.
    pub server: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

/// A relayed transport address: the relay's own address that peers see (RFC 8656 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayAddr(pub SocketAddr);

/// A peer's transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// What the data plane must do. Emitted by [`Server::poll_command`](super::Server::poll_command), in the
/// order the server decided them; execute them in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Bind a UDP relay socket on `relay` for `allocation`, owned by the worker of `client`. Report the
    /// outcome with [`Server::handle_relay_opened`](super::Server::handle_relay_opened) or
    /// [`Server::handle_relay_failed`](super::Server::handle_relay_failed).
    OpenRelay {
        /// The allocation.
        allocation: AllocationId,
        /// The client's 5-tuple.
        client: FiveTuple,
        /// The address to bind.
        relay: RelayAddr,
        /// Set DF on datagrams sent to peers (DONT-FRAGMENT, RFC 8656 §7.2).
        dont_fragment: bool,
    },
    /// Close the relay socket on `relay`.
    CloseRelay {
        /// The allocation.
        allocation: AllocationId,
        /// The relay address to close.
        relay: RelayAddr,
    },
    /// Allow traffic between `relay` and any port of `peer` (RFC 8656 §9).
    InstallPermission {
        /// The allocation.
        allocation: AllocationId,
        /// The relay socket (of the peer's family).
        relay: RelayAddr,
        /// The client.
        client: FiveTuple,
        /// The peer's IP address.
        peer: IpAddr,
    },
    /// Remove a permission installed earlier.
    RemovePermission {
        /// The allocation.
        allocation: AllocationId,
        /// The relay socket.
        relay: RelayAddr,
        /// The peer's IP address.
        peer: IpAddr,
    },
    /// Route `channel` between `client` and `peer` through `relay` (RFC 8656 §11).
    InstallChannel {
        /// The allocation.
        allocation: AllocationId,
        /// The client.
        client: FiveTuple,
        /// The relay socket.
        relay: RelayAddr,
        /// The channel.
        channel: ChannelNumber,
        /// The peer's transport address.
        peer: PeerAddr,
    },
    /// Remove a channel route installed earlier.
    RemoveChannel {
        /// The allocation.
        allocation: AllocationId,
        /// The client.
        client: FiveTuple,
        /// The relay socket.
        relay: RelayAddr,
        /// The channel.
        channel: ChannelNumber,
        /// The peer's transport address.
        peer: PeerAddr,
    },
    /// The allocation has ended (expired, deleted or failed); its commands are done. Its usage is what
    /// the data plane relayed, reported with its relay sockets' final counters.
    AllocationEnded {
        /// The allocation.
        allocation: AllocationId,
        /// The identity usage is billed to: the user id of a REST credential or the static user name.
        identity: Box<str>,
        /// Why it ended.
        reason: EndReason,
    },
}

/// Why an allocation ended, as its final usage row records it (`end_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndReason {
    /// Expired, deleted, or its relay sockets failed.
    #[default]
    Ended,
    /// Its identity's credentials were revoked with `terminate`.
    Revoked,
}

impl EndReason {
    /// The usage row's `end_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Ended => "ended",
            EndReason::Revoked => "revoked",
        }
    }
}

/// A response (or other STUN message) to a client, borrowed from the server until the next `handle_*`
/// call. It names the client's 5-tuple and nothing else: no server output can address a peer, because
/// the server never relays (the data plane does, in its `Core`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// The client's 5-tuple: send from `to.server` to `to.client` on `to.transport`.
    pub to: FiveTuple,
    /// The bytes.
    pub payload: &'a [u8],
}

/// STUN/TURN error codes the server answers with (RFC 8489 §14.8, RFC 8656 §19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 300 Try Alternate.
    TryAlternate,
    /// 400 Bad Request.
    BadRequest,
    /// 401 Unauthenticated.
    Unauthenticated,
    /// 403 Forbidden.
    Forbidden,
    /// 420 Unknown Attribute.
    UnknownAttribute,
    /// 437 Allocation Mismatch.
    AllocationMismatch,
    /// 438 Stale Nonce.
    StaleNonce,
    /// 440 Address Family not Supported.
    AddressFamilyNotSupported,
    /// 441 Wrong Credentials.
    WrongCredentials,
    /// 442 Unsupported Transport Protocol.
    UnsupportedTransport,
    /// 443 Peer Address Family Mismatch.
    PeerAddressFamilyMismatch,
    /// 486 Allocation Quota Reached.
    AllocationQuotaReached,
    /// 508 Insufficient Capacity.
    InsufficientCapacity,
}

impl ErrorCode {
    /// Every code, in [`Stats::allocate_errors`](super::Stats) order.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::TryAlternate,
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::UnknownAttribute,
        ErrorCode::AllocationMismatch,
        ErrorCode::StaleNonce,
        ErrorCode::AddressFamilyNotSupported,
        ErrorCode::WrongCredentials,
        ErrorCode::UnsupportedTransport,
        ErrorCode::PeerAddressFamilyMismatch,
        ErrorCode::AllocationQuotaReached,
        ErrorCode::InsufficientCapacity,
    ];

    /// Position in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        ErrorCode::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::TryAlternate => 300,
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthenticated => Challenge::Unauthenticated.code(),
            ErrorCode::Forbidden => 403,
            ErrorCode::UnknownAttribute => 420,
            ErrorCode::AllocationMismatch => 437,
            ErrorCode::StaleNonce => Challenge::StaleNonce.code(),
            ErrorCode::AddressFamilyNotSupported => 440,
            ErrorCode::WrongCredentials => 441,
            ErrorCode::UnsupportedTransport => 442,
            ErrorCode::PeerAddressFamilyMismatch => 443,
            ErrorCode::AllocationQuotaReached => 486,
            ErrorCode::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase (short: unauthenticated replies must stay small).
    pub fn reason(self) -> &'static str {
        match self {
            ErrorCode::TryAlternate => "Try Alternate",
            ErrorCode::BadRequest => "Bad Request",
            ErrorCode::Unauthenticated => Challenge::Unauthenticated.reason(),
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::UnknownAttribute => "Unknown Attribute",
            ErrorCode::AllocationMismatch => "Allocation Mismatch",
            ErrorCode::StaleNonce => Challenge::StaleNonce.reason(),
            ErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            ErrorCode::WrongCredentials => "Wrong Credentials",
            ErrorCode::UnsupportedTransport => "Unsupported Transport Protocol",
            ErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            ErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            ErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }
}
