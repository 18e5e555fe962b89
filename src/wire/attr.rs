//! Typed STUN/TURN attribute values: decoding from and encoding to the value bytes of one attribute.
//!
//! An attribute on the wire (RFC 8489 §14):
//!
//! ```text
//!  0                   1                   2                   3
//! +-------------------------------+-------------------------------+
//! |         Type (16)             |          Length (16)          |
//! +-------------------------------+-------------------------------+
//! |                 Value (Length bytes) ... padding to 4         |
//! +---------------------------------------------------------------+
//! ```

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{attr_type as t, family, Error, TransactionId, MAGIC_COOKIE};

/// Maximum length of USERNAME (RFC 8489 §14.3: less than 513 bytes).
const MAX_USERNAME: usize = 512;
/// Maximum length of REALM, NONCE, SOFTWARE, ALTERNATE-DOMAIN and reason phrases (less than 763 bytes).
const MAX_TEXT: usize = 762;

/// One decoded attribute. Variable-length values borrow the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute<'a> {
    /// MAPPED-ADDRESS (RFC 8489 §14.1).
    MappedAddress(SocketAddr),
    /// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
    XorMappedAddress(SocketAddr),
    /// USERNAME (RFC 8489 §14.3), UTF-8.
    Username(&'a str),
    /// USERHASH (RFC 8489 §14.4), 32 bytes.
    Userhash(&'a [u8; 32]),
    /// MESSAGE-INTEGRITY (RFC 8489 §14.5), 20 bytes of HMAC-SHA1.
    MessageIntegrity(&'a [u8; 20]),
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), 16 to 32 bytes, a multiple of 4.
    MessageIntegritySha256(&'a [u8]),
    /// FINGERPRINT (RFC 8489 §14.7).
    Fingerprint(u32),
    /// ERROR-CODE (RFC 8489 §14.8): code 300–699 and a reason phrase.
    ErrorCode {
        /// The code, class × 100 + number.
        code: u16,
        /// The reason phrase.
        reason: &'a str,
    },
    /// REALM (RFC 8489 §14.9).
    Realm(&'a str),
    /// NONCE (RFC 8489 §14.10).
    Nonce(&'a str),
    /// PASSWORD-ALGORITHMS (RFC 8489 §14.11): a validated list; iterate with [`AlgorithmIter`].
    PasswordAlgorithms(AlgorithmIter<'a>),
    /// PASSWORD-ALGORITHM (RFC 8489 §14.12).
    PasswordAlgorithm {
        /// The algorithm code.
        algorithm: u16,
        /// Its parameters (empty for MD5 and SHA-256).
        params: &'a [u8],
    },
    /// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13): a list of attribute types.
    UnknownAttributes(U16Iter<'a>),
    /// SOFTWARE (RFC 8489 §14.14).
    Software(&'a str),
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    AlternateServer(SocketAddr),
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    AlternateDomain(&'a str),
    /// CHANNEL-NUMBER (RFC 8656 §18.1). Any 16-bit value; the server judges the range.
    ChannelNumber(u16),
    /// LIFETIME in seconds (RFC 8656 §18.2).
    Lifetime(u32),
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3).
    XorPeerAddress(SocketAddr),
    /// DATA (RFC 8656 §18.4).
    Data(&'a [u8]),
    /// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    XorRelayedAddress(SocketAddr),
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6): the raw family byte, so the server can answer 440.
    RequestedAddressFamily(u8),
    /// EVEN-PORT (RFC 8656 §18.7): the R bit (reserve the next port too).
    EvenPort(bool),
    /// REQUESTED-TRANSPORT (RFC 8656 §18.8): an IP protocol number (17 = UDP, 6 = TCP).
    RequestedTransport(u8),
    /// DONT-FRAGMENT (RFC 8656 §18.9).
    DontFragment,
    /// RESERVATION-TOKEN (RFC 8656 §18.10).
    ReservationToken(u64),
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11): the raw family byte.
    AdditionalAddressFamily(u8),
    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    AddressErrorCode {
        /// The family the error is about.
        family: u8,
        /// The code, class × 100 + number.
        code: u16,
        /// The reason phrase.
        reason: &'a str,
    },
    /// ICMP (RFC 8656 §18.13).
    Icmp {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        icmp_code: u8,
        /// Error data.
        data: u32,
    },
    /// CONNECTION-ID (RFC 6062 §6.2.1).
    ConnectionId(u32),
    /// PRIORITY (RFC 8445 §16.1), known so that ICE checks are not answered with 420.
    Priority(u32),
    /// USE-CANDIDATE (RFC 8445 §16.1).
    UseCandidate,
    /// ICE-CONTROLLED (RFC 8445 §16.1).
    IceControlled(u64),
    /// ICE-CONTROLLING (RFC 8445 §16.1).
    IceControlling(u64),
    /// Any other attribute, kept raw.
    Unknown {
        /// The attribute type.
        typ: u16,
        /// The raw value.
        value: &'a [u8],
    },
}

/// A validated list of 16-bit values (UNKNOWN-ATTRIBUTES).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U16Iter<'a>(&'a [u8]);

impl<'a> U16Iter<'a> {
    /// The raw bytes: an even number of them.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

impl Iterator for U16Iter<'_> {
    type Item = u16;
    fn next(&mut self) -> Option<u16> {
        let (head, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_be_bytes(*head))
    }
}

/// A validated PASSWORD-ALGORITHMS list: yields `(algorithm, params)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmIter<'a>(&'a [u8]);

impl<'a> AlgorithmIter<'a> {
    /// The raw value bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Whether `algorithm` is in the list.
    pub fn contains(self, algorithm: u16) -> bool {
        self.into_iter().any(|(a, _)| a == algorithm)
    }

    fn validate(mut v: &[u8]) -> bool {
        while !v.is_empty() {
            match split_algorithm(v) {
                Some((_, _, rest)) => v = rest,
                None => return false,
            }
        }
        true
    }
}

impl<'a> Iterator for AlgorithmIter<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let (alg, params, rest) = split_algorithm(self.0)?;
        self.0 = rest;
        Some((alg, params))
    }
}

/// One algorithm entry: 2 bytes algorithm, 2 bytes parameter length, parameters padded to 4.
fn split_algorithm(v: &[u8]) -> Option<(u16, &[u8], &[u8])> {
    let (hdr, rest) = v.split_first_chunk::<4>()?;
    let alg = u16::from_be_bytes([hdr[0], hdr[1]]);
    let plen = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let params = rest.get(..plen)?;
    let rest = rest.get(super::pad4(plen)..)?;
    Some((alg, params, rest))
}

fn be16(v: &[u8]) -> Result<u16, ()> {
    v.first_chunk::<2>()
        .map(|b| u16::from_be_bytes(*b))
        .ok_or(())
}

fn be32(v: &[u8]) -> Result<u32, ()> {
    v.first_chunk::<4>()
        .map(|b| u32::from_be_bytes(*b))
        .ok_or(())
}

fn exact<const N: usize>(v: &[u8]) -> Result<&[u8; N], ()> {
    v.try_into().map_err(|_| ())
}

fn text(v: &[u8], max: usize) -> Result<&str, ()> {
    if v.len() > max {
        return Err(());
    }
    core::str::from_utf8(v).map_err(|_| ())
}

/// Error code field: 21 reserved bits, 3-bit class, 8-bit number (RFC 8489 §14.8).
fn error_code(v: &[u8]) -> Result<(u16, &str), ()> {
    let hdr = v.first_chunk::<4>().ok_or(())?;
    let class = u16::from(hdr[2] & 0x07);
    let number = u16::from(hdr[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(());
    }
    Ok((class * 100 + number, text(&v[4..], MAX_TEXT)?))
}

/// Decode a (possibly XORed) address value (RFC 8489 §14.1, §14.2).
fn address(v: &[u8], xor: Option<&TransactionId>) -> Result<SocketAddr, Error> {
    let hdr = v.first_chunk::<4>().ok_or(Error::BadAttribute(0))?;
    let mut port = u16::from_be_bytes([hdr[2], hdr[3]]);
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match (hdr[1], &v[4..]) {
        (family::IPV4, ip) => {
            let mut ip: [u8; 4] = ip.try_into().map_err(|_| Error::BadAttribute(0))?;
            if xor.is_some() {
                ip.iter_mut().zip(cookie).for_each(|(b, k)| *b ^= k);
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (family::IPV6, ip) => {
            let mut ip: [u8; 16] = ip.try_into().map_err(|_| Error::BadAttribute(0))?;
            if let Some(tid) = xor {
                let key = cookie.iter().chain(tid.0.iter());
                ip.iter_mut().zip(key).for_each(|(b, k)| *b ^= k);
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => Err(Error::BadAddressFamily),
    }
}

impl<'a> Attribute<'a> {
    /// Decode the value of an attribute of type `typ`. `tid` un-XORs the XOR-*-ADDRESS attributes.
    pub fn decode(typ: u16, v: &'a [u8], tid: &TransactionId) -> Result<Self, Error> {
        let bad = |()| Error::BadAttribute(typ);
        let addr = |xor: bool| {
            address(v, xor.then_some(tid)).map_err(|e| match e {
                Error::BadAddressFamily => e,
                _ => Error::BadAttribute(typ),
            })
        };
        Ok(match typ {
            t::MAPPED_ADDRESS => Attribute::MappedAddress(addr(false)?),
            t::XOR_MAPPED_ADDRESS => Attribute::XorMappedAddress(addr(true)?),
            t::XOR_PEER_ADDRESS => Attribute::XorPeerAddress(addr(true)?),
            t::XOR_RELAYED_ADDRESS => Attribute::XorRelayedAddress(addr(true)?),
            t::ALTERNATE_SERVER => Attribute::AlternateServer(addr(false)?),
            t::USERNAME => Attribute::Username(text(v, MAX_USERNAME).map_err(bad)?),
            t::USERHASH => Attribute::Userhash(exact::<32>(v).map_err(bad)?),
            t::MESSAGE_INTEGRITY => Attribute::MessageIntegrity(exact::<20>(v).map_err(bad)?),
            t::MESSAGE_INTEGRITY_SHA256 => {
                if !(16..=32).contains(&v.len()) || v.len() % 4 != 0 {
                    return Err(Error::BadAttribute(typ));
                }
                Attribute::MessageIntegritySha256(v)
            }
            t::FINGERPRINT => {
                Attribute::Fingerprint(u32::from_be_bytes(*exact::<4>(v).map_err(bad)?))
            }
            t::ERROR_CODE => {
                let (code, reason) = error_code(v).map_err(bad)?;
                Attribute::ErrorCode { code, reason }
            }
            t::REALM => Attribute::Realm(text(v, MAX_TEXT).map_err(bad)?),
            t::NONCE => Attribute::Nonce(text(v, MAX_TEXT).map_err(bad)?),
            t::SOFTWARE => Attribute::Software(text(v, MAX_TEXT).map_err(bad)?),
            t::ALTERNATE_DOMAIN => Attribute::AlternateDomain(text(v, MAX_TEXT).map_err(bad)?),
            t::PASSWORD_ALGORITHMS => {
                if !AlgorithmIter::validate(v) {
                    return Err(Error::BadAttribute(typ));
                }
                Attribute::PasswordAlgorithms(AlgorithmIter(v))
            }
            t::PASSWORD_ALGORITHM => match split_algorithm(v) {
                Some((algorithm, params, [])) => Attribute::PasswordAlgorithm { algorithm, params },
                _ => return Err(Error::BadAttribute(typ)),
            },
            t::UNKNOWN_ATTRIBUTES => {
                if v.len() % 2 != 0 {
                    return Err(Error::BadAttribute(typ));
                }
                Attribute::UnknownAttributes(U16Iter(v))
            }
            t::CHANNEL_NUMBER => {
                Attribute::ChannelNumber(be16(exact::<4>(v).map_err(bad)?).map_err(bad)?)
            }
            t::LIFETIME => Attribute::Lifetime(be32(exact::<4>(v).map_err(bad)?).map_err(bad)?),
            t::DATA => Attribute::Data(v),
            t::REQUESTED_ADDRESS_FAMILY => {
                Attribute::RequestedAddressFamily(exact::<4>(v).map_err(bad)?[0])
            }
            t::ADDITIONAL_ADDRESS_FAMILY => {
                Attribute::AdditionalAddressFamily(exact::<4>(v).map_err(bad)?[0])
            }
            // RFC 8656 §18.7 gives EVEN-PORT a 1-byte value; some stacks send it padded to 4.
            t::EVEN_PORT => match v {
                [b] | [b, 0, 0, 0] => Attribute::EvenPort(b & 0x80 != 0),
                _ => return Err(Error::BadAttribute(typ)),
            },
            t::REQUESTED_TRANSPORT => Attribute::RequestedTransport(exact::<4>(v).map_err(bad)?[0]),
            t::DONT_FRAGMENT if v.is_empty() => Attribute::DontFragment,
            t::RESERVATION_TOKEN => {
                Attribute::ReservationToken(u64::from_be_bytes(*exact::<8>(v).map_err(bad)?))
            }
            t::ADDRESS_ERROR_CODE => {
                let family = *v.first().ok_or(Error::BadAttribute(typ))?;
                let (code, reason) = error_code(v).map_err(bad)?;
                Attribute::AddressErrorCode {
                    family,
                    code,
                    reason,
                }
            }
            t::ICMP => {
                let b = exact::<8>(v).map_err(bad)?;
                let icmp_type = b[2];
                let icmp_code = b[3];
                let data = be32(&b[4..]).map_err(bad)?;
                Attribute::Icmp {
                    icmp_type,
                    icmp_code,
                    data,
                }
            }
            t::CONNECTION_ID => {
                Attribute::ConnectionId(be32(exact::<4>(v).map_err(bad)?).map_err(bad)?)
            }
            t::PRIORITY => Attribute::Priority(be32(exact::<4>(v).map_err(bad)?).map_err(bad)?),
            t::USE_CANDIDATE if v.is_empty() => Attribute::UseCandidate,
            t::ICE_CONTROLLED => {
                Attribute::IceControlled(u64::from_be_bytes(*exact::<8>(v).map_err(bad)?))
            }
            t::ICE_CONTROLLING => {
                Attribute::IceControlling(u64::from_be_bytes(*exact::<8>(v).map_err(bad)?))
            }
            t::DONT_FRAGMENT | t::USE_CANDIDATE => return Err(Error::BadAttribute(typ)),
            _ => Attribute::Unknown { typ, value: v },
        })
    }

    /// The attribute type code.
    pub fn typ(&self) -> u16 {
        match self {
            Attribute::MappedAddress(_) => t::MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => t::XOR_MAPPED_ADDRESS,
            Attribute::Username(_) => t::USERNAME,
            Attribute::Userhash(_) => t::USERHASH,
            Attribute::MessageIntegrity(_) => t::MESSAGE_INTEGRITY,
            Attribute::MessageIntegritySha256(_) => t::MESSAGE_INTEGRITY_SHA256,
            Attribute::Fingerprint(_) => t::FINGERPRINT,
            Attribute::ErrorCode { .. } => t::ERROR_CODE,
            Attribute::Realm(_) => t::REALM,
            Attribute::Nonce(_) => t::NONCE,
            Attribute::PasswordAlgorithms(_) => t::PASSWORD_ALGORITHMS,
            Attribute::PasswordAlgorithm { .. } => t::PASSWORD_ALGORITHM,
            Attribute::UnknownAttributes(_) => t::UNKNOWN_ATTRIBUTES,
            Attribute::Software(_) => t::SOFTWARE,
            Attribute::AlternateServer(_) => t::ALTERNATE_SERVER,
            Attribute::AlternateDomain(_) => t::ALTERNATE_DOMAIN,
            Attribute::ChannelNumber(_) => t::CHANNEL_NUMBER,
            Attribute::Lifetime(_) => t::LIFETIME,
            Attribute::XorPeerAddress(_) => t::XOR_PEER_ADDRESS,
            Attribute::Data(_) => t::DATA,
            Attribute::XorRelayedAddress(_) => t::XOR_RELAYED_ADDRESS,
            Attribute::RequestedAddressFamily(_) => t::REQUESTED_ADDRESS_FAMILY,
            Attribute::EvenPort(_) => t::EVEN_PORT,
            Attribute::RequestedTransport(_) => t::REQUESTED_TRANSPORT,
            Attribute::DontFragment => t::DONT_FRAGMENT,
            Attribute::ReservationToken(_) => t::RESERVATION_TOKEN,
            Attribute::AdditionalAddressFamily(_) => t::ADDITIONAL_ADDRESS_FAMILY,
            Attribute::AddressErrorCode { .. } => t::ADDRESS_ERROR_CODE,
            Attribute::Icmp { .. } => t::ICMP,
            Attribute::ConnectionId(_) => t::CONNECTION_ID,
            Attribute::Priority(_) => t::PRIORITY,
            Attribute::UseCandidate => t::USE_CANDIDATE,
            Attribute::IceControlled(_) => t::ICE_CONTROLLED,
            Attribute::IceControlling(_) => t::ICE_CONTROLLING,
            Attribute::Unknown { typ, .. } => *typ,
        }
    }

    /// Length of the encoded value, before padding.
    pub fn value_len(&self) -> usize {
        let addr_len = |a: &SocketAddr| if a.is_ipv4() { 8 } else { 20 };
        match self {
            Attribute::MappedAddress(a)
            | Attribute::XorMappedAddress(a)
            | Attribute::AlternateServer(a)
            | Attribute::XorPeerAddress(a)
            | Attribute::XorRelayedAddress(a) => addr_len(a),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::Software(s)
            | Attribute::AlternateDomain(s) => s.len(),
            Attribute::Userhash(_) => 32,
            Attribute::MessageIntegrity(_) => 20,
            Attribute::MessageIntegritySha256(v)
            | Attribute::Data(v)
            | Attribute::Unknown { value: v, .. } => v.len(),
            Attribute::ErrorCode { reason, .. } | Attribute::AddressErrorCode { reason, .. } => {
                4 + reason.len()
            }
            Attribute::PasswordAlgorithms(l) => l.0.len(),
            Attribute::PasswordAlgorithm { params, .. } => 4 + super::pad4(params.len()),
            Attribute::UnknownAttributes(l) => l.0.len(),
            Attribute::EvenPort(_) => 1,
            Attribute::DontFragment | Attribute::UseCandidate => 0,
            Attribute::Fingerprint(_)
            | Attribute::ChannelNumber(_)
            | Attribute::Lifetime(_)
            | Attribute::RequestedAddressFamily(_)
            | Attribute::RequestedTransport(_)
            | Attribute::AdditionalAddressFamily(_)
            | Attribute::ConnectionId(_)
            | Attribute::Priority(_) => 4,
            Attribute::ReservationToken(_)
            | Attribute::Icmp { .. }
            | Attribute::IceControlled(_)
            | Attribute::IceControlling(_) => 8,
        }
    }

    /// Encode the value into `out`, which is exactly [`value_len`](Self::value_len) bytes long.
    pub(crate) fn emit_value(&self, out: &mut [u8], tid: &TransactionId) -> Result<(), Error> {
        let put = |out: &mut [u8], src: &[u8]| -> Result<(), Error> {
            out.get_mut(..src.len())
                .ok_or(Error::BufferTooSmall)?
                .copy_from_slice(src);
            Ok(())
        };
        match *self {
            Attribute::MappedAddress(a) | Attribute::AlternateServer(a) => {
                emit_address(out, a, None)
            }
            Attribute::XorMappedAddress(a)
            | Attribute::XorPeerAddress(a)
            | Attribute::XorRelayedAddress(a) => emit_address(out, a, Some(tid)),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::Software(s)
            | Attribute::AlternateDomain(s) => put(out, s.as_bytes()),
            Attribute::Userhash(v) => put(out, v),
            Attribute::MessageIntegrity(v) => put(out, v),
            Attribute::MessageIntegritySha256(v)
            | Attribute::Data(v)
            | Attribute::Unknown { value: v, .. } => put(out, v),
            Attribute::Fingerprint(v)
            | Attribute::Lifetime(v)
            | Attribute::ConnectionId(v)
            | Attribute::Priority(v) => put(out, &v.to_be_bytes()),
            Attribute::ErrorCode { code, reason } => {
                put(out, &[0, 0, (code / 100) as u8 & 0x07, (code % 100) as u8])?;
                put(
                    out.get_mut(4..).ok_or(Error::BufferTooSmall)?,
                    reason.as_bytes(),
                )
            }
            Attribute::AddressErrorCode {
                family,
                code,
                reason,
            } => {
                put(
                    out,
                    &[family, 0, (code / 100) as u8 & 0x07, (code % 100) as u8],
                )?;
                put(
                    out.get_mut(4..).ok_or(Error::BufferTooSmall)?,
                    reason.as_bytes(),
                )
            }
            Attribute::PasswordAlgorithms(l) => put(out, l.0),
            Attribute::UnknownAttributes(l) => put(out, l.0),
            Attribute::PasswordAlgorithm { algorithm, params } => {
                let plen = u16::try_from(params.len()).map_err(|_| Error::ValueTooLong)?;
                let [a0, a1] = algorithm.to_be_bytes();
                let [l0, l1] = plen.to_be_bytes();
                put(out, &[a0, a1, l0, l1])?;
                put(out.get_mut(4..).ok_or(Error::BufferTooSmall)?, params)?;
                out.iter_mut().skip(4 + params.len()).for_each(|b| *b = 0);
                Ok(())
            }
            Attribute::ChannelNumber(c) => {
                let [c0, c1] = c.to_be_bytes();
                put(out, &[c0, c1, 0, 0])
            }
            Attribute::RequestedAddressFamily(f) | Attribute::AdditionalAddressFamily(f) => {
                put(out, &[f, 0, 0, 0])
            }
            Attribute::RequestedTransport(p) => put(out, &[p, 0, 0, 0]),
            Attribute::EvenPort(r) => put(out, &[if r { 0x80 } else { 0 }]),
            Attribute::DontFragment | Attribute::UseCandidate => Ok(()),
            Attribute::ReservationToken(v)
            | Attribute::IceControlled(v)
            | Attribute::IceControlling(v) => put(out, &v.to_be_bytes()),
            Attribute::Icmp {
                icmp_type,
                icmp_code,
                data,
            } => {
                let d = data.to_be_bytes();
                put(out, &[0, 0, icmp_type, icmp_code, d[0], d[1], d[2], d[3]])
            }
        }
    }
}

fn emit_address(out: &mut [u8], a: SocketAddr, xor: Option<&TransactionId>) -> Result<(), Error> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = a.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let [p0, p1] = port.to_be_bytes();
    match a.ip() {
        IpAddr::V4(ip) => {
            let mut b = ip.octets();
            if xor.is_some() {
                b.iter_mut().zip(cookie).for_each(|(x, k)| *x ^= k);
            }
            let out: &mut [u8; 8] = out.try_into().map_err(|_| Error::BufferTooSmall)?;
            *out = [0, family::IPV4, p0, p1, b[0], b[1], b[2], b[3]];
        }
        IpAddr::V6(ip) => {
            let mut b = ip.octets();
            if let Some(tid) = xor {
                b.iter_mut()
                    .zip(cookie.iter().chain(tid.0.iter()))
                    .for_each(|(x, k)| *x ^= k);
            }
            let out: &mut [u8; 20] = out.try_into().map_err(|_| Error::BufferTooSmall)?;
            out[..4].copy_from_slice(&[0, family::IPV6, p0, p1]);
            out[4..].copy_from_slice(&b);
        }
    }
    Ok(())
}

/// Build a validated PASSWORD-ALGORITHMS value for parameter-less algorithms into `out` (4 bytes each).
/// Returns the [`Attribute`] borrowing `out`.
pub fn password_algorithms<'o>(
    algorithms: &[u16],
    out: &'o mut [u8],
) -> Result<Attribute<'o>, Error> {
    let need = algorithms.len() * 4;
    let out = out.get_mut(..need).ok_or(Error::BufferTooSmall)?;
    for (chunk, a) in out.chunks_exact_mut(4).zip(algorithms) {
        let [a0, a1] = a.to_be_bytes();
        chunk.copy_from_slice(&[a0, a1, 0, 0]);
    }
    Ok(Attribute::PasswordAlgorithms(AlgorithmIter(out)))
}

/// Build an UNKNOWN-ATTRIBUTES value into `out` (2 bytes per type). Returns the [`Attribute`] borrowing `out`.
pub fn unknown_attributes<'o>(types: &[u16], out: &'o mut [u8]) -> Result<Attribute<'o>, Error> {
    let need = types.len() * 2;
    let out = out.get_mut(..need).ok_or(Error::BufferTooSmall)?;
    for (chunk, t) in out.chunks_exact_mut(2).zip(types) {
        chunk.copy_from_slice(&t.to_be_bytes());
    }
    Ok(Attribute::UnknownAttributes(U16Iter(out)))
}
