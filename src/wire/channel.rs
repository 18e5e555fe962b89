//! TURN ChannelData messages (RFC 8656 §12.4, §12.5).
//!
//! ```text
//!  0                   1                   2                   3
//! +-------------------------------+-------------------------------+
//! |        Channel Number         |            Length             |
//! +-------------------------------+-------------------------------+
//! |                      Application Data (Length bytes)          |
//! |                       ... padding to 4 on TCP/TLS only        |
//! ```
//!
//! The data plane reads peer datagrams 48 bytes into their buffer slot (its `HEADROOM`, room enough for
//! a Data indication header), so that [`ChannelData::write_header`] writes the header in the 4 bytes just
//! in front of the payload, in place, with no copy; `buf` starts there:
//!
//! ```text
//! slot: [ ...unused 0..44... | h h h h | payload ................ ]
//!                            ^ 44: buf, filled by write_header
//!                                      ^ 48: where the datagram was received
//! ```

use super::{pad4, Error, CHANNEL_HEADER_LEN};

/// The valid channel numbers (RFC 8656 §12: 0x4000 through 0x4FFF; 0x5000–0xFFFF are reserved).
pub const CHANNEL_RANGE: core::ops::RangeInclusive<u16> = 0x4000..=0x4FFF;

/// Which channel numbers a relay accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelRange {
    /// RFC 8656 §12: 0x4000–0x4FFF (first byte 64–79, as RFC 7983 demultiplexes).
    #[default]
    Rfc8656,
    /// RFC 5766 §11: 0x4000–0x7FFF, for older clients (coturn's test client picks numbers up to 0x7FFF).
    /// First bytes 80–127 are then ChannelData too, which collides with RFC 9443's QUIC range: enable it
    /// only for clients that need it.
    Rfc5766,
}

impl ChannelRange {
    /// Whether `channel` is a valid channel number.
    #[inline]
    pub fn contains(self, channel: u16) -> bool {
        match self {
            ChannelRange::Rfc8656 => CHANNEL_RANGE.contains(&channel),
            ChannelRange::Rfc5766 => (0x4000..=0x7FFF).contains(&channel),
        }
    }

    /// [`classify`](super::classify), with the first-byte range of ChannelData widened for RFC 5766.
    #[inline]
    pub fn classify(self, first_byte: u8) -> super::Kind {
        match (self, first_byte) {
            (ChannelRange::Rfc5766, 80..=127) => super::Kind::ChannelData,
            _ => super::classify(first_byte),
        }
    }
}

/// A checked ChannelData view borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    channel: u16,
    payload: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parse one ChannelData message from a datagram. Over UDP the datagram may carry padding after the
    /// payload, or none (RFC 8656 §12.5); bytes past `Length` are ignored. A datagram shorter than
    /// `4 + Length`, or a channel outside 0x4000–0x4FFF, is an error.
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        Self::parse_in(buf, ChannelRange::Rfc8656)
    }

    /// [`parse`](Self::parse) accepting the channel numbers of `range`.
    #[inline]
    pub fn parse_in(buf: &'a [u8], range: ChannelRange) -> Result<Self, Error> {
        let (hdr, rest) = buf
            .split_first_chunk::<CHANNEL_HEADER_LEN>()
            .ok_or(Error::Truncated)?;
        let channel = u16::from_be_bytes([hdr[0], hdr[1]]);
        if !range.contains(channel) {
            return Err(Error::BadChannelNumber);
        }
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        let payload = rest.get(..len).ok_or(Error::Truncated)?;
        Ok(ChannelData { channel, payload })
    }

    /// The number of bytes one ChannelData message occupies on a stream transport, where the payload is
    /// padded to a multiple of 4 (RFC 8656 §12.5). Needs only the 4 header bytes; `None` if fewer.
    #[inline]
    pub fn stream_frame_len(header: &[u8]) -> Option<usize> {
        let hdr = header.first_chunk::<CHANNEL_HEADER_LEN>()?;
        Some(CHANNEL_HEADER_LEN + pad4(usize::from(u16::from_be_bytes([hdr[2], hdr[3]]))))
    }

    /// The channel number.
    #[inline]
    pub fn channel(&self) -> u16 {
        self.channel
    }

    /// The application data.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Write a ChannelData header for `payload_len` bytes of data into the 4 bytes of headroom at the start
    /// of `buf`. Returns the message length (`4 + payload_len`), not padded; stream transports add padding.
    /// Any number of either [`ChannelRange`] is accepted (the caller bound it).
    #[inline]
    pub fn write_header(buf: &mut [u8], channel: u16, payload_len: usize) -> Result<usize, Error> {
        if !ChannelRange::Rfc5766.contains(channel) {
            return Err(Error::BadChannelNumber);
        }
        let len = u16::try_from(payload_len).map_err(|_| Error::ValueTooLong)?;
        let hdr = buf
            .first_chunk_mut::<CHANNEL_HEADER_LEN>()
            .ok_or(Error::BufferTooSmall)?;
        let [c0, c1] = channel.to_be_bytes();
        let [l0, l1] = len.to_be_bytes();
        *hdr = [c0, c1, l0, l1];
        Ok(CHANNEL_HEADER_LEN + payload_len)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Channel 0x4001 carrying "hello" (5 bytes), padded to 8 as on a stream.
    const PACKET: [u8; 12] = [
        0x40, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
    ];

    #[test]
    fn deconstruct() {
        let cd = ChannelData::parse(&PACKET).unwrap();
        assert_eq!(cd.channel(), 0x4001);
        assert_eq!(cd.payload(), b"hello");
        assert_eq!(ChannelData::stream_frame_len(&PACKET), Some(12));
    }

    #[test]
    fn construct_in_headroom() {
        let mut buf = [0u8; 12];
        buf[4..9].copy_from_slice(b"hello");
        assert_eq!(ChannelData::write_header(&mut buf, 0x4001, 5).unwrap(), 9);
        assert_eq!(buf, PACKET);
    }

    #[test]
    fn udp_without_padding_is_accepted() {
        let cd = ChannelData::parse(&PACKET[..9]).unwrap();
        assert_eq!(cd.payload(), b"hello");
    }

    #[test]
    fn short_or_out_of_range_is_rejected() {
        assert_eq!(ChannelData::parse(&PACKET[..8]), Err(Error::Truncated));
        assert_eq!(ChannelData::parse(&PACKET[..3]), Err(Error::Truncated));
        for ch in [0x0000u16, 0x3FFF, 0x5000, 0x7FFF, 0xFFFF] {
            let mut p = PACKET;
            p[..2].copy_from_slice(&ch.to_be_bytes());
            assert_eq!(
                ChannelData::parse(&p),
                Err(Error::BadChannelNumber),
                "{ch:#x}"
            );
        }
        for ch in [0x0000u16, 0x3FFF, 0x8000, 0xFFFF] {
            let mut p = PACKET;
            p[..2].copy_from_slice(&ch.to_be_bytes());
            assert_eq!(
                ChannelData::parse_in(&p, ChannelRange::Rfc5766),
                Err(Error::BadChannelNumber)
            );
            assert_eq!(
                ChannelData::write_header(&mut p, ch, 5),
                Err(Error::BadChannelNumber)
            );
        }
        let mut p = PACKET;
        p[..2].copy_from_slice(&0x7FFFu16.to_be_bytes());
        assert_eq!(
            ChannelData::parse_in(&p, ChannelRange::Rfc5766)
                .unwrap()
                .channel(),
            0x7FFF
        );
        assert_eq!(
            ChannelRange::Rfc5766.classify(0x7F),
            crate::wire::Kind::ChannelData
        );
        assert_eq!(
            ChannelRange::Rfc8656.classify(0x50),
            crate::wire::Kind::Other
        );
        assert_eq!(
            ChannelRange::Rfc5766.classify(0x80),
            crate::wire::Kind::Other
        );
        for ch in [0x4000u16, 0x4FFF] {
            let mut p = PACKET;
            p[..2].copy_from_slice(&ch.to_be_bytes());
            assert_eq!(ChannelData::parse(&p).unwrap().channel(), ch);
        }
        let mut small = [0u8; 3];
        assert_eq!(
            ChannelData::write_header(&mut small, 0x4000, 0),
            Err(Error::BufferTooSmall)
        );
        assert_eq!(
            ChannelData::write_header(&mut [0u8; 4], 0x4000, 70_000),
            Err(Error::ValueTooLong)
        );
    }

    #[test]
    fn stream_frame_len_pads_to_four() {
        for (len, want) in [
            (0u16, 4usize),
            (1, 8),
            (4, 8),
            (5, 12),
            (0xFFFF, 4 + 0x10000),
        ] {
            let [l0, l1] = len.to_be_bytes();
            assert_eq!(
                ChannelData::stream_frame_len(&[0x40, 0, l0, l1]),
                Some(want)
            );
        }
        assert_eq!(ChannelData::stream_frame_len(&[0x40, 0, 0]), None);
    }
}
