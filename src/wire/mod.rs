//! STUN/TURN wire format: bytes ↔ typed views and writers.
//!
//! - [`Message`] is a checked, zero-copy view over a borrowed STUN datagram (RFC 8489 §5, §14), with the
//!   TURN attributes of RFC 8656 §18, RFC 6156 and RFC 6062's CONNECTION-ID.
//! - [`MessageWriter`] builds a message into a caller-provided buffer, with MESSAGE-INTEGRITY,
//!   MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.
//! - [`ChannelData`] is the TURN ChannelData framing (RFC 8656 §12.4), with an in-place header writer for
//!   buffers that keep 4 bytes of headroom.
//! - [`classify`] demultiplexes on the first byte (RFC 7983).
//!
//! Nothing here allocates, does IO, opts out of memory safety or panics on any input: every length is checked once at
//! parse time and every accessor afterwards is infallible. May use: hmac, sha1, sha2, crc32fast.

mod attr;
mod channel;
mod integrity;
mod message;
mod writer;

pub use attr::{password_algorithms, unknown_attributes, AlgorithmIter, Attribute, U16Iter};
pub use channel::{ChannelData, ChannelRange, CHANNEL_RANGE};
pub use integrity::IntegrityKey;
pub use message::{Attributes, Message, PeerAddresses, MAX_UNKNOWN};
pub use writer::{data_indication_in_place, data_indication_overhead, MessageWriter};

/// The magic cookie of every RFC 5389/8489 message (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;
/// Size of the ChannelData header (RFC 8656 §12.4).
pub const CHANNEL_HEADER_LEN: usize = 4;
/// The value XORed into the CRC-32 of FINGERPRINT (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Size of a FINGERPRINT attribute on the wire: its 4-byte header and the CRC-32 (RFC 8489 §14.7).
pub const FINGERPRINT_LEN: usize = 8;

/// Why bytes were rejected. Small and `Copy` so that the hot path can count it without formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// Fewer bytes than a header, or than the header's length field announces.
    Truncated,
    /// More bytes than the header's length field announces (STUN over UDP must match exactly).
    TrailingBytes,
    /// Not a STUN message: the top two bits are not zero or the magic cookie is missing.
    NotStun,
    /// The STUN length field is not a multiple of 4.
    UnalignedLength,
    /// An attribute's length runs past the end of the message.
    AttributeOverrun,
    /// A known attribute has a value of the wrong size or shape.
    BadAttribute(u16),
    /// An address attribute carries an address family other than IPv4 (0x01) or IPv6 (0x02).
    BadAddressFamily,
    /// A channel number outside 0x4000–0x4FFF (RFC 8656 §12).
    BadChannelNumber,
    /// The output buffer is too small for what is being written.
    BufferTooSmall,
    /// A value is too long for its attribute or for the 16-bit length field.
    ValueTooLong,
    /// FINGERPRINT does not match the message's CRC-32, or is not the last attribute: by RFC 8489 §7 and
    /// §14.7 the bytes are not a STUN message at all.
    BadFingerprint,
}

impl Error {
    /// A short static name, for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Error::Truncated => "truncated",
            Error::TrailingBytes => "trailing_bytes",
            Error::NotStun => "not_stun",
            Error::UnalignedLength => "unaligned_length",
            Error::AttributeOverrun => "attribute_overrun",
            Error::BadAttribute(_) => "bad_attribute",
            Error::BadAddressFamily => "bad_address_family",
            Error::BadChannelNumber => "bad_channel_number",
            Error::BufferTooSmall => "buffer_too_small",
            Error::ValueTooLong => "value_too_long",
            Error::BadFingerprint => "bad_fingerprint",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::BadAttribute(t) => write!(f, "bad attribute 0x{t:04x}"),
            other => f.write_str(other.as_str()),
        }
    }
}

impl std::error::Error for Error {}

/// What a datagram is, judged by its first byte (RFC 7983 §7, as extended by RFC 8656 §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 0–3: STUN (still to be confirmed by the magic cookie).
    Stun,
    /// 64–79: TURN ChannelData.
    ChannelData,
    /// Anything else (DTLS, RTP, ZRTP, garbage): not for a TURN server's listener.
    Other,
}

/// Demultiplex on the first byte of a datagram (RFC 7983).
#[inline]
pub fn classify(first_byte: u8) -> Kind {
    match first_byte {
        0..=3 => Kind::Stun,
        64..=79 => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// The 96-bit transaction id (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransactionId(pub [u8; 12]);

/// A STUN method (RFC 8489 §5; TURN methods from RFC 8656 §17, RFC 6062 §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(pub u16);

impl Method {
    /// Binding (RFC 8489).
    pub const BINDING: Method = Method(0x001);
    /// Allocate (RFC 8656).
    pub const ALLOCATE: Method = Method(0x003);
    /// Refresh (RFC 8656).
    pub const REFRESH: Method = Method(0x004);
    /// Send (RFC 8656, indication only).
    pub const SEND: Method = Method(0x006);
    /// Data (RFC 8656, indication only).
    pub const DATA: Method = Method(0x007);
    /// CreatePermission (RFC 8656).
    pub const CREATE_PERMISSION: Method = Method(0x008);
    /// ChannelBind (RFC 8656).
    pub const CHANNEL_BIND: Method = Method(0x009);
    /// Connect (RFC 6062).
    pub const CONNECT: Method = Method(0x00A);
    /// ConnectionBind (RFC 6062).
    pub const CONNECTION_BIND: Method = Method(0x00B);
    /// ConnectionAttempt (RFC 6062).
    pub const CONNECTION_ATTEMPT: Method = Method(0x00C);
}

/// A STUN message class (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Request (C1 C0 = 00).
    Request,
    /// Indication (01).
    Indication,
    /// Success response (10).
    Success,
    /// Error response (11).
    Error,
}

/// A STUN message type: a 12-bit method and a class, interleaved in 14 bits (RFC 8489 §5, Figure 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageType {
    /// The method.
    pub method: Method,
    /// The class.
    pub class: Class,
}

impl MessageType {
    /// A type from a method and class.
    pub const fn new(method: Method, class: Class) -> Self {
        MessageType { method, class }
    }

    /// Decode the 16-bit type field. The top two bits must be zero.
    pub fn from_u16(v: u16) -> Option<Self> {
        if v & 0xC000 != 0 {
            return None;
        }
        let class = match ((v >> 7) & 0b10) | ((v >> 4) & 0b01) {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        };
        let m = (v & 0x000F) | ((v & 0x00E0) >> 1) | ((v & 0x3E00) >> 2);
        Some(MessageType {
            method: Method(m),
            class,
        })
    }

    /// Encode to the 16-bit type field. Method bits above 12 are dropped.
    pub fn to_u16(self) -> u16 {
        let m = self.method.0 & 0x0FFF;
        let c: u16 = match self.class {
            Class::Request => 0,
            Class::Indication => 1,
            Class::Success => 2,
            Class::Error => 3,
        };
        (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
    }
}

/// Address family codes used by address attributes and REQUESTED-ADDRESS-FAMILY (RFC 8489 §14.1,
/// RFC 8656 §18.8).
pub mod family {
    /// IPv4.
    pub const IPV4: u8 = 0x01;
    /// IPv6.
    pub const IPV6: u8 = 0x02;
}

/// Attribute type codes (RFC 8489 §18.3, RFC 8656 §18, RFC 6062 §6.2, RFC 8445 §16.1).
pub mod attr_type {
    /// MAPPED-ADDRESS.
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY.
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// MESSAGE-INTEGRITY-SHA256.
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM.
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH.
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// PRIORITY (ICE, RFC 8445).
    pub const PRIORITY: u16 = 0x0024;
    /// USE-CANDIDATE (ICE, RFC 8445).
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// CONNECTION-ID (RFC 6062).
    pub const CONNECTION_ID: u16 = 0x002A;
    /// ADDITIONAL-ADDRESS-FAMILY.
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// ADDRESS-ERROR-CODE.
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    /// PASSWORD-ALGORITHMS.
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    /// ALTERNATE-DOMAIN.
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    /// ICMP.
    pub const ICMP: u16 = 0x8004;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// ALTERNATE-SERVER.
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
    /// ICE-CONTROLLED (ICE, RFC 8445).
    pub const ICE_CONTROLLED: u16 = 0x8029;
    /// ICE-CONTROLLING (ICE, RFC 8445).
    pub const ICE_CONTROLLING: u16 = 0x802A;

    /// Attributes 0x0000–0x7FFF are comprehension-required (RFC 8489 §14).
    pub const fn is_comprehension_required(t: u16) -> bool {
        t < 0x8000
    }
}

/// PASSWORD-ALGORITHM codes (RFC 8489 §18.5).
pub mod password_algorithm {
    /// MD5 (the RFC 5389 long-term key).
    pub const MD5: u16 = 0x0001;
    /// SHA-256.
    pub const SHA256: u16 = 0x0002;
}

/// Round up to a multiple of 4 (STUN attribute padding, ChannelData padding on streams).
#[inline]
pub const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classify_follows_rfc7983_ranges() {
        for b in 0u8..=255 {
            let want = match b {
                0..=3 => Kind::Stun,
                64..=79 => Kind::ChannelData,
                _ => Kind::Other,
            };
            assert_eq!(classify(b), want, "byte {b}");
        }
        // DTLS (20..=63) and RTP (128..=191) are not ours.
        assert_eq!(classify(22), Kind::Other);
        assert_eq!(classify(0x80), Kind::Other);
    }

    #[test]
    fn message_type_matches_rfc_encodings() {
        // RFC 8489 §5: Binding request 0x0001, success 0x0101, error 0x0111; RFC 8656: Allocate request 0x0003,
        // Allocate error 0x0113, Send indication 0x0016, Data indication 0x0017, ChannelBind success 0x0109.
        let cases = [
            (0x0001, Method::BINDING, Class::Request),
            (0x0101, Method::BINDING, Class::Success),
            (0x0111, Method::BINDING, Class::Error),
            (0x0003, Method::ALLOCATE, Class::Request),
            (0x0113, Method::ALLOCATE, Class::Error),
            (0x0016, Method::SEND, Class::Indication),
            (0x0017, Method::DATA, Class::Indication),
            (0x0109, Method::CHANNEL_BIND, Class::Success),
        ];
        for (v, m, c) in cases {
            assert_eq!(
                MessageType::from_u16(v),
                Some(MessageType::new(m, c)),
                "{v:#06x}"
            );
            assert_eq!(MessageType::new(m, c).to_u16(), v);
        }
        assert_eq!(MessageType::from_u16(0x4001), None);
        for v in 0u16..0x4000 {
            assert_eq!(MessageType::from_u16(v).unwrap().to_u16(), v);
        }
    }
}

#[cfg(test)]
mod vectors;
