//! Properties of the TCP/TLS stream framer: any split of a stream of valid STUN and ChannelData messages
//! yields the same messages, in order; and the fuzz oracle holds on arbitrary bytes.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "fuzz/stream_oracle.rs"]
mod stream_oracle;

use proptest::prelude::*;
use turnpike::wire::{
    Attribute, ChannelData, ChannelRange, Class, MessageType, MessageWriter, Method, TransactionId,
};

/// One valid message as it goes on a stream, and the message the framer must give back.
fn message() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    prop_oneof![
        // ChannelData, padded on the stream, unpadded out of the framer; up to the 0xFFFF limit.
        (
            0x4000u16..=0x4FFF,
            prop_oneof![0usize..64, 0usize..2000, Just(0xFFFF), 0xFFF0usize..=0xFFFF]
        )
            .prop_map(|(ch, len)| {
                let mut m = vec![0u8; 4 + len];
                for (i, b) in m[4..].iter_mut().enumerate() {
                    *b = i as u8;
                }
                ChannelData::write_header(&mut m, ch, len).unwrap();
                let mut wire = m.clone();
                wire.resize((wire.len() + 3) & !3, 0);
                (wire, m)
            }),
        // STUN with a DATA attribute of any length.
        (any::<[u8; 12]>(), 0usize..1200).prop_map(|(tid, len)| {
            let mut buf = vec![0u8; 1400];
            let data = vec![0x5A; len];
            let mut w = MessageWriter::new(
                &mut buf,
                MessageType::new(Method::SEND, Class::Indication),
                TransactionId(tid),
            )
            .unwrap();
            w.add(&Attribute::XorPeerAddress("192.0.2.1:9".parse().unwrap()))
                .unwrap();
            w.add(&Attribute::Data(&data)).unwrap();
            let n = w.finish();
            buf.truncate(n);
            (buf.clone(), buf)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_split_yields_the_same_messages(
        msgs in proptest::collection::vec(message(), 1..12),
        splits in proptest::collection::vec(0usize..3000, 1..16),
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(|(w, _)| w.clone()).collect();
        let want: Vec<Vec<u8>> = msgs.into_iter().map(|(_, m)| m).collect();
        let (whole, err) = stream_oracle::reference(&stream, ChannelRange::Rfc8656);
        prop_assert_eq!(&whole, &want);
        prop_assert_eq!(err, None);
        stream_oracle::split_equals_whole(&stream, &splits, ChannelRange::Rfc8656);
        // One byte at a time too.
        stream_oracle::split_equals_whole(&stream, &[1], ChannelRange::Rfc8656);
    }

    #[test]
    fn oracle_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        stream_oracle::stream_framer(&bytes);
    }

    #[test]
    fn oracle_on_valid_prefix_then_garbage(
        msgs in proptest::collection::vec(message(), 0..4),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        splits in proptest::collection::vec(0usize..300, 1..8),
    ) {
        let mut stream: Vec<u8> = msgs.iter().flat_map(|(w, _)| w.clone()).collect();
        stream.extend(garbage);
        stream_oracle::split_equals_whole(&stream, &splits, ChannelRange::Rfc8656);
    }
}
