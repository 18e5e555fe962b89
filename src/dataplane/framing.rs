//! Framing TURN messages out of a byte stream (TCP or TLS, RFC 8656 §3.1 and §12.5).
//!
//! A stream carries back-to-back STUN messages and ChannelData messages. The first byte tells them apart
//! (RFC 7983); the length comes from the header:
//!
//! ```text
//! STUN:        [ 0b00xxxxxx .. | length (2 B) | cookie (4 B) | tid (12 B) ][ attributes: length bytes ]
//!              frame = 20 + length (a multiple of 4)
//! ChannelData: [ channel (2 B) | length (2 B) ][ data: length bytes ][ 0–3 B padding to 4 ]
//!              frame = 4 + pad4(length)           message = 4 + length (what is relayed)
//! ```
//!
//! Anything else is not TURN, and the connection carrying it is closed: after a bad frame there is no way
//! to find the next boundary.
//!
//! [`Framer`] holds one connection's unframed bytes in a buffer that starts small and grows only as far as
//! the largest frame the header allows ([`MAX_FRAME`]), so a connection can never make it grow beyond that.
//!
//! May use: wire.

use crate::wire::{self, ChannelRange, Kind};

/// The largest frame: a STUN message with a 0xFFFC-byte body (the length must be a multiple of 4).
pub const MAX_FRAME: usize = wire::HEADER_LEN + 0xFFFC;
/// The framer's initial buffer size.
const INITIAL: usize = 4096;

/// Why a stream cannot be framed (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The first byte is neither STUN nor ChannelData (in the configured channel range).
    NotTurn,
    /// A STUN header with a length that is not a multiple of 4, or without the magic cookie.
    BadStun,
}

impl FrameError {
    /// A short name for logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::NotTurn => "not_turn",
            FrameError::BadStun => "bad_stun",
        }
    }
}

/// The frame at the start of `buf`: `Ok(Some((frame_len, message_len)))` once its header is complete (the
/// frame may still be incomplete), `Ok(None)` if more bytes are needed to know, or an error.
///
/// `frame_len` includes ChannelData padding; `message_len` does not.
pub fn frame_len(buf: &[u8], range: ChannelRange) -> Result<Option<(usize, usize)>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match range.classify(first) {
        Kind::ChannelData => {
            let Some(hdr) = buf.first_chunk::<{ wire::CHANNEL_HEADER_LEN }>() else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            let msg = wire::CHANNEL_HEADER_LEN + len;
            Ok(Some((wire::CHANNEL_HEADER_LEN + wire::pad4(len), msg)))
        }
        Kind::Stun => {
            let Some(hdr) = buf.first_chunk::<8>() else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            if len % 4 != 0 || hdr[4..8] != wire::MAGIC_COOKIE.to_be_bytes() {
                return Err(FrameError::BadStun);
            }
            Ok(Some((wire::HEADER_LEN + len, wire::HEADER_LEN + len)))
        }
        _ => Err(FrameError::NotTurn),
    }
}

/// One connection's receive buffer: bytes go in with [`Framer::spare`] and [`Framer::filled`], whole
/// messages come out of [`Framer::next_frame`].
///
/// ```text
/// buf: [ consumed ... | start .. unframed bytes .. end | spare ... ]
/// ```
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    range: ChannelRange,
}

impl Framer {
    /// An empty framer for channel numbers in `range`.
    pub fn new(range: ChannelRange) -> Self {
        Framer {
            buf: Vec::new(),
            start: 0,
            end: 0,
            range,
        }
    }

    /// Room to read into (never empty): moves unframed bytes to the front and grows the buffer, up to
    /// [`MAX_FRAME`], when needed.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let want = (self.buf.len() * 2).clamp(INITIAL, MAX_FRAME);
                self.buf.resize(want, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written at the start of [`Framer::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes held that are not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The next whole message (ChannelData without its padding), `Ok(None)` if it is not all here yet.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let pending = &self.buf[self.start..self.end];
        let Some((frame, msg)) = frame_len(pending, self.range)? else {
            return Ok(None);
        };
        if pending.len() < frame {
            return Ok(None);
        }
        let at = self.start;
        self.start += frame;
        Ok(Some(&self.buf[at..at + msg]))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn splits_stun_and_padded_channel_data() {
        let mut stream = vec![
            0x40, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
        ];
        // A Binding request without attributes.
        stream.extend_from_slice(&[0x00, 0x01, 0x00, 0x00]);
        stream.extend_from_slice(&wire::MAGIC_COOKIE.to_be_bytes());
        stream.extend_from_slice(&[9; 12]);
        let mut f = Framer::new(ChannelRange::Rfc8656);
        for b in &stream {
            f.spare()[0] = *b;
            f.filled(1);
        }
        assert_eq!(f.next_frame().unwrap().unwrap().len(), 9);
        assert_eq!(f.next_frame().unwrap().unwrap().len(), 20);
        assert_eq!(f.next_frame().unwrap(), None);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn garbage_and_bad_stun_are_errors() {
        assert_eq!(
            frame_len(&[0xFF], ChannelRange::Rfc8656),
            Err(FrameError::NotTurn)
        );
        assert_eq!(
            frame_len(&[0, 1, 0, 2, 0x21, 0x12, 0xA4, 0x42], ChannelRange::Rfc8656),
            Err(FrameError::BadStun)
        );
        assert_eq!(frame_len(&[0, 1, 0, 4], ChannelRange::Rfc8656), Ok(None));
    }

    #[test]
    fn largest_channel_data_fits() {
        let mut f = Framer::new(ChannelRange::Rfc8656);
        let mut stream = vec![0x40, 0x00, 0xFF, 0xFF];
        stream.resize(4 + 0xFFFF + 1, 7);
        let mut at = 0;
        let mut got = None;
        while at < stream.len() {
            let spare = f.spare();
            let n = spare.len().min(stream.len() - at);
            spare[..n].copy_from_slice(&stream[at..at + n]);
            f.filled(n);
            at += n;
            if let Some(m) = f.next_frame().unwrap() {
                got = Some(m.len());
            }
        }
        assert_eq!(got, Some(4 + 0xFFFF));
    }
}
