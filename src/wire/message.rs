//! The checked STUN message view (RFC 8489 §5, §14).
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-------------------------------+-------------------------------+
//! |0 0|     STUN Message Type (14)    |         Message Length        |
//! +-+-+-------------------------------+-------------------------------+
//! |                         Magic Cookie 0x2112A442                   |
//! +-------------------------------------------------------------------+
//! |                     Transaction ID (96 bits)                      |
//! +-------------------------------------------------------------------+
//! |             attributes: Length bytes, a multiple of 4             |
//! ```

use core::net::SocketAddr;

use hmac::Mac;

use super::attr::{AlgorithmIter, Attribute, U16Iter};
use super::{
    attr_type as t, pad4, Error, IntegrityKey, MessageType, TransactionId, FINGERPRINT_XOR,
    HEADER_LEN, MAGIC_COOKIE,
};

/// How many unknown comprehension-required attribute types are remembered for a 420 response.
pub const MAX_UNKNOWN: usize = 8;

mod field {
    use core::ops::Range;
    pub const TYPE: Range<usize> = 0..2;
    pub const LENGTH: Range<usize> = 2..4;
    pub const COOKIE: Range<usize> = 4..8;
    pub const TRANSACTION_ID: Range<usize> = 8..20;
}

/// The known attributes of a message, filled in one pass. For a repeated attribute the first one wins
/// (RFC 8489 §14 leaves this to the agent; first-wins stops a later copy overriding an earlier one).
/// Attributes after MESSAGE-INTEGRITY(-SHA256) are not here, except FINGERPRINT (RFC 8489 §14.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Attributes<'a> {
    pub mapped_address: Option<SocketAddr>,
    pub xor_mapped_address: Option<SocketAddr>,
    pub username: Option<&'a str>,
    pub userhash: Option<&'a [u8; 32]>,
    pub error_code: Option<(u16, &'a str)>,
    pub realm: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub password_algorithms: Option<AlgorithmIter<'a>>,
    pub password_algorithm: Option<(u16, &'a [u8])>,
    pub unknown_attributes: Option<U16Iter<'a>>,
    pub software: Option<&'a str>,
    pub alternate_server: Option<SocketAddr>,
    pub alternate_domain: Option<&'a str>,
    pub channel_number: Option<u16>,
    pub lifetime: Option<u32>,
    /// The first well-formed XOR-PEER-ADDRESS; all of them via [`Message::peer_addresses`].
    pub xor_peer_address: Option<SocketAddr>,
    /// Some XOR-PEER-ADDRESS (before any integrity attribute) is malformed: a value too short or too long
    /// for its family, or a family other than IPv4 and IPv6. The message still parses, so that an
    /// authenticated CreatePermission or ChannelBind can be answered 400 (RFC 8656 §10.2, §11.2) and a
    /// Send indication can be dropped as malformed rather than as missing its peer. A malformed one is
    /// never in `xor_peer_address` or [`Message::peer_addresses`].
    pub malformed_peer_address: bool,
    pub data: Option<&'a [u8]>,
    pub xor_relayed_address: Option<SocketAddr>,
    pub requested_address_family: Option<u8>,
    pub even_port: Option<bool>,
    pub requested_transport: Option<u8>,
    pub dont_fragment: bool,
    pub reservation_token: Option<u64>,
    pub additional_address_family: Option<u8>,
    pub address_error_code: Option<(u8, u16, &'a str)>,
    pub icmp: Option<(u8, u8, u32)>,
    pub connection_id: Option<u32>,
    pub fingerprint: Option<u32>,
}

/// A parsed STUN message borrowing its datagram. Construction checks every length once; after that
/// nothing can panic or read out of bounds.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    typ: MessageType,
    tid: TransactionId,
    /// The known attributes.
    pub attrs: Attributes<'a>,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if present and honoured.
    integrity: Option<usize>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header, if present and honoured.
    integrity_sha256: Option<usize>,
    /// Offset of the FINGERPRINT attribute header.
    fingerprint_at: Option<usize>,
    /// End of the attributes that count (up to the first integrity attribute).
    covered_end: usize,
    unknown: [u16; MAX_UNKNOWN],
    unknown_len: u8,
}

impl<'a> Message<'a> {
    /// Parse a whole datagram (or one framed message from a stream) as a STUN message: the length field
    /// must match `buf` exactly, and a FINGERPRINT, if present, must be the last attribute and match
    /// ([`Error::BadFingerprint`] otherwise). A malformed XOR-PEER-ADDRESS does not fail the parse: it
    /// is reported in [`Attributes::malformed_peer_address`].
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        let hdr = buf.first_chunk::<HEADER_LEN>().ok_or(Error::Truncated)?;
        let typ =
            MessageType::from_u16(u16::from_be_bytes([hdr[0], hdr[1]])).ok_or(Error::NotStun)?;
        if hdr[field::COOKIE] != MAGIC_COOKIE.to_be_bytes() {
            return Err(Error::NotStun);
        }
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        if len % 4 != 0 {
            return Err(Error::UnalignedLength);
        }
        match buf.len().cmp(&(HEADER_LEN + len)) {
            core::cmp::Ordering::Less => return Err(Error::Truncated),
            core::cmp::Ordering::Greater => return Err(Error::TrailingBytes),
            core::cmp::Ordering::Equal => {}
        }
        let mut tid = TransactionId::default();
        tid.0.copy_from_slice(&hdr[field::TRANSACTION_ID]);

        let mut msg = Message {
            buf,
            typ,
            tid,
            attrs: Attributes::default(),
            integrity: None,
            integrity_sha256: None,
            fingerprint_at: None,
            covered_end: buf.len(),
            unknown: [0; MAX_UNKNOWN],
            unknown_len: 0,
        };
        let mut after_integrity = false;
        for raw in RawAttrs::new(buf, HEADER_LEN) {
            let (at, typ, value) = raw?;
            if msg.fingerprint_at.is_some() {
                // RFC 8489 §14.7: FINGERPRINT is the last attribute. Bytes after it make this not STUN.
                return Err(Error::BadFingerprint);
            }
            match typ {
                t::FINGERPRINT => {
                    msg.attrs.fingerprint = match Attribute::decode(typ, value, &tid)? {
                        Attribute::Fingerprint(v) => Some(v),
                        _ => None,
                    };
                    msg.fingerprint_at = Some(at);
                    if !after_integrity {
                        msg.covered_end = at;
                    }
                }
                t::MESSAGE_INTEGRITY if !after_integrity => {
                    Attribute::decode(typ, value, &tid)?;
                    msg.integrity = Some(at);
                    msg.covered_end = at;
                    after_integrity = true;
                }
                // RFC 8489 §14.6: MESSAGE-INTEGRITY-SHA256 may follow MESSAGE-INTEGRITY, not the other way.
                t::MESSAGE_INTEGRITY_SHA256 if msg.integrity_sha256.is_none() => {
                    Attribute::decode(typ, value, &tid)?;
                    msg.integrity_sha256 = Some(at);
                    if !after_integrity {
                        msg.covered_end = at;
                    }
                    after_integrity = true;
                }
                // RFC 8489 §14.5: ignore everything else after an integrity attribute.
                _ if after_integrity => {}
                t::XOR_PEER_ADDRESS => match Attribute::decode(typ, value, &tid) {
                    Ok(Attribute::XorPeerAddress(a)) => {
                        msg.attrs.xor_peer_address.get_or_insert(a);
                    }
                    _ => msg.attrs.malformed_peer_address = true,
                },
                _ => msg.fill(typ, value)?,
            }
        }
        // RFC 8489 §7: a message whose FINGERPRINT does not match is not STUN; it is checked here, once,
        // so that every caller of `parse` (server and data plane) drops it the same way.
        if let (Some(at), Some(want)) = (msg.fingerprint_at, msg.attrs.fingerprint) {
            if fingerprint(buf, at) != want {
                return Err(Error::BadFingerprint);
            }
        }
        Ok(msg)
    }

    /// The message type.
    pub fn message_type(&self) -> MessageType {
        self.typ
    }

    /// The transaction id.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// The raw bytes of the whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Unknown comprehension-required attribute types seen before any integrity attribute (up to
    /// [`MAX_UNKNOWN`]); non-empty means the server answers 420 (RFC 8489 §6.3.1.1).
    pub fn unknown_required(&self) -> &[u16] {
        &self.unknown[..usize::from(self.unknown_len)]
    }

    /// Every XOR-PEER-ADDRESS, in order (CreatePermission may carry several, RFC 8656 §9.1).
    pub fn peer_addresses(&self) -> PeerAddresses<'a> {
        PeerAddresses {
            raw: RawAttrs::new(&self.buf[..self.covered_end], HEADER_LEN),
            tid: self.tid,
        }
    }

    /// Every attribute before any integrity attribute, decoded, in order (repeats included).
    pub fn attributes(&self) -> impl Iterator<Item = Attribute<'a>> + 'a {
        let tid = self.tid;
        RawAttrs::new(&self.buf[..self.covered_end], HEADER_LEN).filter_map(move |r| {
            r.ok()
                .and_then(|(_, typ, v)| Attribute::decode(typ, v, &tid).ok())
        })
    }

    /// Whether MESSAGE-INTEGRITY is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    /// Whether MESSAGE-INTEGRITY-SHA256 is present.
    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    /// Verify MESSAGE-INTEGRITY (HMAC-SHA1) with `key`, in constant time. The HMAC covers the message up to
    /// the attribute, with the length field set as if MESSAGE-INTEGRITY were the last attribute
    /// (RFC 8489 §14.5). False when the attribute is absent.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        self.verify_integrity_with(&IntegrityKey::new(key, false))
    }

    /// Verify MESSAGE-INTEGRITY-SHA256 with `key` (possibly truncated to 16–32 bytes, RFC 8489 §14.6), in
    /// constant time. False when the attribute is absent.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        self.verify_integrity_with(&IntegrityKey::new(key, true))
    }

    /// Verify the integrity attribute that `key` is for (MESSAGE-INTEGRITY, or MESSAGE-INTEGRITY-SHA256
    /// possibly truncated to 16–32 bytes), in constant time. False when that attribute is absent.
    pub fn verify_integrity_with(&self, key: &IntegrityKey) -> bool {
        match key {
            IntegrityKey::Sha1(mac) => {
                let Some(at) = self.integrity else {
                    return false;
                };
                let Some(expected) = self.buf.get(at + 4..at + 24) else {
                    return false;
                };
                let mut mac = mac.clone();
                feed_with_length(&mut mac, self.buf, at, at + 24 - HEADER_LEN);
                mac.verify_slice(expected).is_ok()
            }
            IntegrityKey::Sha256(mac) => {
                let Some(at) = self.integrity_sha256 else {
                    return false;
                };
                let Some(hdr) = self.buf.get(at..at + 4) else {
                    return false;
                };
                let vlen = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
                let Some(expected) = self.buf.get(at + 4..at + 4 + vlen) else {
                    return false;
                };
                let mut mac = mac.clone();
                feed_with_length(&mut mac, self.buf, at, at + 4 + vlen - HEADER_LEN);
                mac.verify_truncated_left(expected).is_ok()
            }
        }
    }

    /// Whether FINGERPRINT is present and matches (RFC 8489 §14.7). [`Message::parse`] already refuses a
    /// message whose FINGERPRINT is wrong or misplaced, so on a parsed message this is "present".
    pub fn verify_fingerprint(&self) -> bool {
        let (Some(at), Some(want)) = (self.fingerprint_at, self.attrs.fingerprint) else {
            return false;
        };
        fingerprint(self.buf, at) == want
    }

    fn fill(&mut self, typ: u16, value: &'a [u8]) -> Result<(), Error> {
        let a = &mut self.attrs;
        macro_rules! first {
            ($slot:expr, $v:expr) => {
                if $slot.is_none() {
                    $slot = Some($v);
                }
            };
        }
        match Attribute::decode(typ, value, &self.tid)? {
            Attribute::MappedAddress(v) => first!(a.mapped_address, v),
            Attribute::XorMappedAddress(v) => first!(a.xor_mapped_address, v),
            Attribute::Username(v) => first!(a.username, v),
            Attribute::Userhash(v) => first!(a.userhash, v),
            Attribute::ErrorCode { code, reason } => first!(a.error_code, (code, reason)),
            Attribute::Realm(v) => first!(a.realm, v),
            Attribute::Nonce(v) => first!(a.nonce, v),
            Attribute::PasswordAlgorithms(v) => first!(a.password_algorithms, v),
            Attribute::PasswordAlgorithm { algorithm, params } => {
                first!(a.password_algorithm, (algorithm, params))
            }
            Attribute::UnknownAttributes(v) => first!(a.unknown_attributes, v),
            Attribute::Software(v) => first!(a.software, v),
            Attribute::AlternateServer(v) => first!(a.alternate_server, v),
            Attribute::AlternateDomain(v) => first!(a.alternate_domain, v),
            Attribute::ChannelNumber(v) => first!(a.channel_number, v),
            Attribute::Lifetime(v) => first!(a.lifetime, v),
            Attribute::Data(v) => first!(a.data, v),
            Attribute::XorRelayedAddress(v) => first!(a.xor_relayed_address, v),
            Attribute::RequestedAddressFamily(v) => first!(a.requested_address_family, v),
            Attribute::EvenPort(v) => first!(a.even_port, v),
            Attribute::RequestedTransport(v) => first!(a.requested_transport, v),
            Attribute::DontFragment => a.dont_fragment = true,
            Attribute::ReservationToken(v) => first!(a.reservation_token, v),
            Attribute::AdditionalAddressFamily(v) => first!(a.additional_address_family, v),
            Attribute::AddressErrorCode {
                family,
                code,
                reason,
            } => {
                first!(a.address_error_code, (family, code, reason))
            }
            Attribute::Icmp {
                icmp_type,
                icmp_code,
                data,
            } => first!(a.icmp, (icmp_type, icmp_code, data)),
            Attribute::ConnectionId(v) => first!(a.connection_id, v),
            Attribute::Priority(_)
            | Attribute::XorPeerAddress(_)
            | Attribute::UseCandidate
            | Attribute::IceControlled(_)
            | Attribute::IceControlling(_)
            | Attribute::MessageIntegrity(_)
            | Attribute::MessageIntegritySha256(_)
            | Attribute::Fingerprint(_) => {}
            Attribute::Unknown { typ, .. } => {
                let n = usize::from(self.unknown_len);
                if t::is_comprehension_required(typ)
                    && n < MAX_UNKNOWN
                    && !self.unknown[..n].contains(&typ)
                {
                    self.unknown[n] = typ;
                    self.unknown_len += 1;
                }
            }
        }
        Ok(())
    }
}

/// Iterator over every XOR-PEER-ADDRESS of a message.
#[derive(Debug, Clone)]
pub struct PeerAddresses<'a> {
    raw: RawAttrs<'a>,
    tid: TransactionId,
}

impl Iterator for PeerAddresses<'_> {
    type Item = SocketAddr;
    fn next(&mut self) -> Option<SocketAddr> {
        for r in self.raw.by_ref() {
            if let Ok((_, t::XOR_PEER_ADDRESS, v)) = r {
                if let Ok(Attribute::XorPeerAddress(a)) =
                    Attribute::decode(t::XOR_PEER_ADDRESS, v, &self.tid)
                {
                    return Some(a);
                }
            }
        }
        None
    }
}

/// Raw TLV walk: yields `(offset of attribute header, type, value)`; an overrun ends the walk with an error.
#[derive(Debug, Clone)]
pub(crate) struct RawAttrs<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> RawAttrs<'a> {
    pub(crate) fn new(buf: &'a [u8], off: usize) -> Self {
        RawAttrs { buf, off }
    }
}

impl<'a> Iterator for RawAttrs<'a> {
    type Item = Result<(usize, u16, &'a [u8]), Error>;
    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.off..)?;
        if rest.is_empty() {
            return None;
        }
        let at = self.off;
        let Some(hdr) = rest.first_chunk::<4>() else {
            self.off = self.buf.len();
            return Some(Err(Error::AttributeOverrun));
        };
        let typ = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        // The value and its padding must both fit (RFC 8489 §14).
        match (rest.get(4..4 + len), rest.len() >= 4 + pad4(len)) {
            (Some(value), true) => {
                self.off = at + 4 + pad4(len);
                Some(Ok((at, typ, value)))
            }
            _ => {
                self.off = self.buf.len();
                Some(Err(Error::AttributeOverrun))
            }
        }
    }
}

/// Feed `buf[..end]` to `mac` with the header's length field replaced by `length` (RFC 8489 §14.5).
fn feed_with_length<M: Mac>(mac: &mut M, buf: &[u8], end: usize, length: usize) {
    let len = u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes();
    mac.update(&buf[field::TYPE]);
    mac.update(&len);
    mac.update(&buf[field::COOKIE.start..end]);
}

/// CRC-32 of `buf[..at]` with the length field covering the FINGERPRINT attribute at `at`, XOR 0x5354554e.
pub(crate) fn fingerprint(buf: &[u8], at: usize) -> u32 {
    let len = u16::try_from(at + 8 - HEADER_LEN)
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[field::TYPE]);
    h.update(&len);
    h.update(&buf[field::COOKIE.start..at]);
    h.finalize() ^ FINGERPRINT_XOR
}

/// Overwrite the length field of the message in `buf` (callers guarantee `buf.len() >= 4`).
pub(crate) fn set_length(buf: &mut [u8], len: u16) {
    if let Some(f) = buf.get_mut(field::LENGTH) {
        f.copy_from_slice(&len.to_be_bytes());
    }
}
