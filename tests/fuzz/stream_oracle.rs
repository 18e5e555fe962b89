//! Fuzz oracle for the stream framer (`turnpike::dataplane::framing`), shared by the cargo-fuzz target
//! `fuzz_targets/stream_framer.rs` (nightly) and the proptests in `tests/framing.rs` (stable).

use turnpike::dataplane::framing::{frame_len, FrameError, Framer, MAX_FRAME};
use turnpike::wire::ChannelRange;

/// What framing `stream` in one piece gives: the messages, then the error that stopped it, if any.
pub fn reference(stream: &[u8], range: ChannelRange) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        match frame_len(&stream[at..], range) {
            Ok(Some((frame, msg))) if stream.len() - at >= frame => {
                assert!(msg <= frame && frame <= MAX_FRAME);
                out.push(stream[at..at + msg].to_vec());
                at += frame;
            }
            Ok(_) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Feed `stream` to a [`Framer`] in pieces of the given sizes (cycled; 0 means "as much as fits") and
/// check that it yields exactly what [`reference`] does, never holds more than [`MAX_FRAME`] bytes, and
/// never panics.
pub fn split_equals_whole(stream: &[u8], splits: &[usize], range: ChannelRange) {
    let (want, want_err) = reference(stream, range);
    let mut f = Framer::new(range);
    let mut got = Vec::new();
    let mut err = None;
    let mut at = 0;
    let mut i = 0;
    'feed: while at < stream.len() {
        let spare = f.spare();
        assert!(!spare.is_empty());
        let step = splits.get(i % splits.len().max(1)).copied().unwrap_or(0);
        i += 1;
        let n = if step == 0 {
            spare.len()
        } else {
            step.min(spare.len())
        }
        .min(stream.len() - at);
        spare[..n].copy_from_slice(&stream[at..at + n]);
        f.filled(n);
        at += n;
        loop {
            match f.next_frame() {
                Ok(Some(m)) => got.push(m.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
        assert!(f.buffered() <= MAX_FRAME);
    }
    assert_eq!(got, want);
    assert_eq!(err, want_err);
}

/// Arbitrary bytes: the first few choose the split sizes, the rest is the stream.
pub fn stream_framer(data: &[u8]) {
    let (head, stream) = data.split_at(data.len().min(4));
    let splits: Vec<usize> = head.iter().map(|b| usize::from(*b)).collect();
    split_equals_whole(stream, &splits, ChannelRange::Rfc8656);
    split_equals_whole(stream, &splits, ChannelRange::Rfc5766);
}
