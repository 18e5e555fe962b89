//! Fuzz oracles for the wire codec, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`, nightly) and
//! by the proptests in `tests/wire_oracles.rs` (stable, `cargo test`). Each function takes arbitrary bytes
//! and panics only if the codec misbehaves.

use turnpike::wire::{
    classify, pad4, Attribute, Attributes, ChannelData, ChannelRange, Error, Kind, Message,
    MessageWriter, CHANNEL_RANGE, MAX_UNKNOWN,
};

/// A key to exercise the integrity checks with; the result does not matter, only that nothing panics.
const KEY: &[u8] = b"fuzz-key";

/// `Message::parse` on arbitrary bytes. If it parses: the integrity, fingerprint and attribute accessors
/// must not panic and must stay consistent; and re-emitting every decoded attribute through a
/// [`MessageWriter`] (same type and transaction id) must give a message that parses back to the same
/// attributes.
pub fn stun_message(data: &[u8]) {
    let Ok(m) = Message::parse(data) else {
        return;
    };
    let _ = m.verify_integrity(KEY);
    let _ = m.verify_integrity_sha256(KEY);
    let _ = m.verify_integrity_sha256(&[0u8; 32]);
    let _ = m.verify_fingerprint();
    assert!(m.unknown_required().len() <= MAX_UNKNOWN);

    let attrs: Vec<Attribute<'_>> = m.attributes().collect();
    assert!(attrs.len() <= data.len() / 4);
    // Integrity and fingerprint attributes end the covered region, so they never show up here.
    assert!(!attrs.iter().any(|a| matches!(
        a,
        Attribute::MessageIntegrity(_)
            | Attribute::MessageIntegritySha256(_)
            | Attribute::Fingerprint(_)
    )));
    // peer_addresses() is exactly the XOR-PEER-ADDRESSes among attributes().
    let peers = attrs.iter().filter_map(|a| match a {
        Attribute::XorPeerAddress(p) => Some(*p),
        _ => None,
    });
    assert!(m.peer_addresses().eq(peers));

    // Re-emit. Every attribute's re-encoding is no longer than its original (non-canonical padding,
    // reserved bits and the 4-byte EVEN-PORT only shrink or stay), so a buffer the size of the input
    // always suffices.
    let mut out = vec![0u8; data.len()];
    let mut w = MessageWriter::new(&mut out, m.message_type(), m.transaction_id())
        .expect("a parsed message has a full header");
    for a in &attrs {
        if let Err(e) = w.add(a) {
            panic!("re-emitting {a:?} failed: {e}");
        }
    }
    let n = w.finish();
    let re = match Message::parse(&out[..n]) {
        Ok(re) => re,
        Err(e) => panic!(
            "re-emitted message does not parse: {e}\n in: {data:02x?}\nout: {:02x?}",
            &out[..n]
        ),
    };
    assert_eq!(re.message_type(), m.message_type());
    assert_eq!(re.transaction_id(), m.transaction_id());
    let back: Vec<Attribute<'_>> = re.attributes().collect();
    assert_eq!(back, attrs);
    assert_eq!(
        re.attrs,
        Attributes {
            fingerprint: None,
            // A malformed XOR-PEER-ADDRESS is not among the decoded attributes, so it is not re-emitted.
            malformed_peer_address: false,
            ..m.attrs
        }
    );
    assert_eq!(re.unknown_required(), m.unknown_required());
    assert!(!re.has_integrity() && !re.has_integrity_sha256() && !re.verify_fingerprint());
}

/// ChannelData framing on arbitrary bytes: `parse`, `stream_frame_len` and `classify` agree with the
/// header, a parsed message rebuilt with `write_header` in front of its payload parses back the same,
/// and `write_header` with the input's header fields reproduces the input's header.
pub fn channel_data(data: &[u8]) {
    let Some(&[c0, c1, l0, l1]) = data.first_chunk::<4>() else {
        assert_eq!(ChannelData::parse(data), Err(Error::Truncated));
        assert_eq!(ChannelData::stream_frame_len(data), None);
        return;
    };
    let channel = u16::from_be_bytes([c0, c1]);
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    let in_range = CHANNEL_RANGE.contains(&channel);
    assert_eq!(in_range, classify(c0) == Kind::ChannelData);

    let frame = ChannelData::stream_frame_len(data).expect("4 header bytes");
    assert_eq!(frame, 4 + pad4(len));
    assert!(frame % 4 == 0 && frame >= 4 + len && frame < 4 + len + 4);

    match ChannelData::parse(data) {
        Ok(cd) => {
            assert!(in_range);
            assert_eq!(cd.channel(), channel);
            assert_eq!(cd.payload(), &data[4..4 + len]);

            let mut out = vec![0u8; 4 + len];
            out[4..].copy_from_slice(cd.payload());
            let n = ChannelData::write_header(&mut out, cd.channel(), cd.payload().len())
                .expect("in-range channel, 16-bit length, 4 bytes of headroom");
            assert_eq!(n, out.len());
            assert_eq!(out[..4], data[..4]);
            assert_eq!(ChannelData::parse(&out), Ok(cd));
        }
        Err(Error::BadChannelNumber) => assert!(!in_range),
        Err(Error::Truncated) => assert!(in_range && data.len() < 4 + len),
        Err(e) => panic!("unexpected ChannelData error {e:?}"),
    }

    // The header writer accepts either range's numbers (RFC 5766's 0x4000-0x7FFF is opt-in per relay).
    let writable = ChannelRange::Rfc5766.contains(channel);
    let mut hdr = [0u8; 4];
    match ChannelData::write_header(&mut hdr, channel, len) {
        Ok(n) => {
            assert!(writable);
            assert_eq!(n, 4 + len);
            assert_eq!(hdr, [c0, c1, l0, l1]);
        }
        Err(e) => assert!(!writable && e == Error::BadChannelNumber),
    }
}
