//! Building STUN messages into a caller-provided buffer, without allocation.

use hmac::Mac;

use super::attr::Attribute;
use super::message::{fingerprint, set_length};
use super::{
    attr_type as t, pad4, Error, IntegrityKey, MessageType, TransactionId, HEADER_LEN, MAGIC_COOKIE,
};

/// Writes one STUN message into `buf`. The header's length field is kept up to date after every
/// attribute, so the message is valid at any point. Integrity and fingerprint go last, in the order
/// MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, FINGERPRINT (RFC 8489 §14.5–§14.7).
#[derive(Debug)]
pub struct MessageWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
    tid: TransactionId,
}

impl<'b> MessageWriter<'b> {
    /// Start a message of type `typ` with transaction id `tid` at the start of `buf`.
    pub fn new(buf: &'b mut [u8], typ: MessageType, tid: TransactionId) -> Result<Self, Error> {
        let hdr = buf.get_mut(..HEADER_LEN).ok_or(Error::BufferTooSmall)?;
        hdr[0..2].copy_from_slice(&typ.to_u16().to_be_bytes());
        hdr[2..4].copy_from_slice(&[0, 0]);
        hdr[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        hdr[8..20].copy_from_slice(&tid.0);
        Ok(MessageWriter {
            buf,
            len: HEADER_LEN,
            tid,
        })
    }

    /// The transaction id being written.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether only the header has been written.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Append an attribute (zero padding to 4 bytes).
    pub fn add(&mut self, attr: &Attribute<'_>) -> Result<(), Error> {
        let vlen = attr.value_len();
        let tid = self.tid;
        let value = self.reserve(attr.typ(), vlen)?;
        attr.emit_value(value, &tid)
    }

    /// Append MESSAGE-INTEGRITY: HMAC-SHA1 with `key` over the message so far, with the length field
    /// already counting this attribute (RFC 8489 §14.5).
    pub fn add_integrity(&mut self, key: &[u8]) -> Result<(), Error> {
        self.add_integrity_with(&IntegrityKey::new(key, false))
    }

    /// Append MESSAGE-INTEGRITY-SHA256 (full 32 bytes) with `key` (RFC 8489 §14.6).
    pub fn add_integrity_sha256(&mut self, key: &[u8]) -> Result<(), Error> {
        self.add_integrity_with(&IntegrityKey::new(key, true))
    }

    /// Append the integrity attribute that `key` is for: MESSAGE-INTEGRITY, or MESSAGE-INTEGRITY-SHA256
    /// (full 32 bytes).
    pub fn add_integrity_with(&mut self, key: &IntegrityKey) -> Result<(), Error> {
        match key {
            IntegrityKey::Sha1(mac) => self.sign(t::MESSAGE_INTEGRITY, mac.clone()),
            IntegrityKey::Sha256(mac) => self.sign(t::MESSAGE_INTEGRITY_SHA256, mac.clone()),
        }
    }

    /// Append attribute `typ` holding `mac` over the message so far, the length field already counting
    /// the attribute.
    fn sign<M: Mac>(&mut self, typ: u16, mut mac: M) -> Result<(), Error> {
        let at = self.len;
        let len = M::output_size();
        self.reserve(typ, len)?.fill(0);
        mac.update(&self.buf[..at]);
        let tag = mac.finalize().into_bytes();
        self.buf[at + 4..at + 4 + len].copy_from_slice(&tag);
        Ok(())
    }

    /// Append FINGERPRINT (RFC 8489 §14.7). It must be the last attribute.
    pub fn add_fingerprint(&mut self) -> Result<(), Error> {
        let at = self.len;
        self.reserve(t::FINGERPRINT, super::FINGERPRINT_LEN - 4)?;
        let crc = fingerprint(self.buf, at);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        Ok(())
    }

    /// Finish: the message is `buf[..returned length]`.
    pub fn finish(self) -> usize {
        self.len
    }

    /// Append an attribute header for a `vlen`-byte value, zero its padding, update the length field, and
    /// return the value's bytes for the caller to fill.
    fn reserve(&mut self, typ: u16, vlen: usize) -> Result<&mut [u8], Error> {
        let vlen16 = u16::try_from(vlen).map_err(|_| Error::ValueTooLong)?;
        let end = self.len + 4 + pad4(vlen);
        let body = u16::try_from(end - HEADER_LEN).map_err(|_| Error::ValueTooLong)?;
        let attr = self
            .buf
            .get_mut(self.len..end)
            .ok_or(Error::BufferTooSmall)?;
        attr[0..2].copy_from_slice(&typ.to_be_bytes());
        attr[2..4].copy_from_slice(&vlen16.to_be_bytes());
        attr[4 + vlen..].fill(0);
        let start = self.len + 4;
        self.len = end;
        set_length(self.buf, body);
        Ok(&mut self.buf[start..start + vlen])
    }
}

/// Bytes a Data indication needs in front of its payload: header, XOR-PEER-ADDRESS and the DATA attribute
/// header (36 for an IPv4 peer, 48 for IPv6).
pub const fn data_indication_overhead(peer_is_ipv4: bool) -> usize {
    HEADER_LEN + 4 + if peer_is_ipv4 { 8 } else { 20 } + 4
}

/// Build a Data indication (RFC 8656 §11.4) around a payload that is already in `buf` at
/// `payload_at..payload_at + len`, without copying it:
///
/// ```text
/// buf: [ ...free... | STUN header | XOR-PEER-ADDRESS | DATA hdr | payload ........ | pad ]
///                   ^ start                                     ^ payload_at
/// ```
///
/// Needs [`data_indication_overhead`] bytes of headroom and up to 3 bytes after the payload for padding.
/// Returns the range of the message in `buf`.
pub fn data_indication_in_place(
    buf: &mut [u8],
    payload_at: usize,
    len: usize,
    peer: core::net::SocketAddr,
    tid: TransactionId,
) -> Result<core::ops::Range<usize>, Error> {
    let start = payload_at
        .checked_sub(data_indication_overhead(peer.is_ipv4()))
        .ok_or(Error::BufferTooSmall)?;
    let end = payload_at + pad4(len);
    if end > buf.len() {
        return Err(Error::BufferTooSmall);
    }
    let len16 = u16::try_from(len).map_err(|_| Error::ValueTooLong)?;
    let body = u16::try_from(end - start - HEADER_LEN).map_err(|_| Error::ValueTooLong)?;
    let typ = MessageType::new(super::Method::DATA, super::Class::Indication);
    let mut w = MessageWriter::new(&mut buf[start..payload_at - 4], typ, tid)?;
    w.add(&Attribute::XorPeerAddress(peer))?;
    let data_hdr = &mut buf[payload_at - 4..payload_at];
    data_hdr[..2].copy_from_slice(&t::DATA.to_be_bytes());
    data_hdr[2..].copy_from_slice(&len16.to_be_bytes());
    buf[payload_at + len..end].fill(0);
    set_length(&mut buf[start..], body);
    Ok(start..end)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::Message;

    #[test]
    fn data_indication_in_place_matches_the_writer() {
        for peer in ["192.0.2.9:5000", "[2001:db8::9]:5000"] {
            let peer: core::net::SocketAddr = peer.parse().unwrap();
            for len in [0usize, 1, 5, 8, 1200] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut buf = vec![0xAAu8; 48 + len + 8];
                buf[48..48 + len].copy_from_slice(&payload);
                let tid = TransactionId([5; 12]);
                let range = data_indication_in_place(&mut buf, 48, len, peer, tid).unwrap();
                let mut want = vec![0u8; 2000];
                let typ =
                    MessageType::new(super::super::Method::DATA, super::super::Class::Indication);
                let mut w = MessageWriter::new(&mut want, typ, tid).unwrap();
                w.add(&Attribute::XorPeerAddress(peer)).unwrap();
                w.add(&Attribute::Data(&payload)).unwrap();
                let n = w.finish();
                assert_eq!(&buf[range.clone()], &want[..n], "{peer} {len}");
                let m = Message::parse(&buf[range]).unwrap();
                assert_eq!(m.attrs.data, Some(&payload[..]));
            }
        }
        let mut small = [0u8; 40];
        let peer: core::net::SocketAddr = "[2001:db8::9]:1".parse().unwrap();
        assert_eq!(
            data_indication_in_place(&mut small, 40, 0, peer, TransactionId([0; 12])),
            Err(Error::BufferTooSmall)
        );
    }
}
