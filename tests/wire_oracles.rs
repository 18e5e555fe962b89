//! The cargo-fuzz oracles of `tests/fuzz/oracles.rs`, run on stable as proptests: arbitrary bytes, and
//! STUN headers in front of attribute soup shaped so that many inputs parse and reach the re-emit oracle.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use turnpike::wire::{attr_type as t, pad4, MessageWriter, CHANNEL_RANGE, MAGIC_COOKIE};

#[path = "fuzz/oracles.rs"]
mod oracles;

/// Attribute types the codec knows (so decoding is exercised), a few unknown ones (both ranges).
const TYPES: &[u16] = &[
    t::MAPPED_ADDRESS,
    t::XOR_MAPPED_ADDRESS,
    t::XOR_PEER_ADDRESS,
    t::XOR_RELAYED_ADDRESS,
    t::ALTERNATE_SERVER,
    t::USERNAME,
    t::USERHASH,
    t::MESSAGE_INTEGRITY,
    t::MESSAGE_INTEGRITY_SHA256,
    t::FINGERPRINT,
    t::ERROR_CODE,
    t::REALM,
    t::NONCE,
    t::SOFTWARE,
    t::ALTERNATE_DOMAIN,
    t::PASSWORD_ALGORITHMS,
    t::PASSWORD_ALGORITHM,
    t::UNKNOWN_ATTRIBUTES,
    t::CHANNEL_NUMBER,
    t::LIFETIME,
    t::DATA,
    t::REQUESTED_ADDRESS_FAMILY,
    t::ADDITIONAL_ADDRESS_FAMILY,
    t::EVEN_PORT,
    t::REQUESTED_TRANSPORT,
    t::DONT_FRAGMENT,
    t::RESERVATION_TOKEN,
    t::ADDRESS_ERROR_CODE,
    t::ICMP,
    t::CONNECTION_ID,
    t::PRIORITY,
    t::USE_CANDIDATE,
    t::ICE_CONTROLLED,
    t::ICE_CONTROLLING,
    0x0002,
    0x7FFF,
    0xC001,
];

/// A value for `typ` that passes its shape check, built from the random bytes `r` (`n` steers the
/// variable lengths): most soup attributes should decode, so that whole messages parse.
fn shaped(typ: u16, r: &[u8; 64], n: usize) -> Vec<u8> {
    let ascii = |len: usize| -> Vec<u8> { r[..len].iter().map(|b| 0x20 + b % 0x5F).collect() };
    let error_code = |first: u8| -> Vec<u8> {
        let mut v = vec![first, r[1], (r[2] & 0xF8) | (3 + r[2] % 4), r[3] % 100];
        v.extend(ascii(n % 24));
        v
    };
    match typ {
        t::MAPPED_ADDRESS
        | t::XOR_MAPPED_ADDRESS
        | t::XOR_PEER_ADDRESS
        | t::XOR_RELAYED_ADDRESS
        | t::ALTERNATE_SERVER => {
            let v6 = r[0] & 1 == 1;
            let mut v = vec![r[1], if v6 { 2 } else { 1 }, r[2], r[3]];
            v.extend_from_slice(&r[4..if v6 { 20 } else { 8 }]);
            v
        }
        t::USERNAME | t::REALM | t::NONCE | t::SOFTWARE | t::ALTERNATE_DOMAIN => ascii(n % 48),
        t::USERHASH => r[..32].to_vec(),
        t::MESSAGE_INTEGRITY => r[..20].to_vec(),
        t::MESSAGE_INTEGRITY_SHA256 => r[..16 + 4 * (n % 5)].to_vec(),
        t::ERROR_CODE => error_code(r[0]),
        t::ADDRESS_ERROR_CODE => error_code(1 + r[0] % 2),
        t::PASSWORD_ALGORITHMS | t::PASSWORD_ALGORITHM => {
            let count = if typ == t::PASSWORD_ALGORITHM {
                1
            } else {
                n % 4
            };
            let mut v = Vec::new();
            for i in 0..count {
                let plen = usize::from(r[8 * i + 2] % 6);
                v.extend_from_slice(&[r[8 * i], r[8 * i + 1] % 3, 0, plen as u8]);
                v.extend_from_slice(&r[40..40 + pad4(plen)]);
            }
            v
        }
        t::UNKNOWN_ATTRIBUTES => r[..2 * (n % 6)].to_vec(),
        t::EVEN_PORT if n % 2 == 0 => vec![r[0]],
        t::EVEN_PORT => vec![r[0], 0, 0, 0],
        t::DONT_FRAGMENT | t::USE_CANDIDATE => Vec::new(),
        t::RESERVATION_TOKEN | t::ICMP | t::ICE_CONTROLLED | t::ICE_CONTROLLING => r[..8].to_vec(),
        t::DATA => r[..n % 64].to_vec(),
        // The remaining known types are 4 bytes; unknown ones take anything.
        _ if TYPES[..TYPES.len() - 3].contains(&typ) => r[..4].to_vec(),
        _ => r[..n % 16].to_vec(),
    }
}

/// One attribute TLV: type, a value (usually well-shaped for the type, sometimes random), and padding
/// bytes that need not be zero.
fn tlv() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(TYPES),
        any::<[u8; 64]>(),
        0usize..64,
        0u8..10,
        any::<[u8; 3]>(),
        any::<bool>(),
    )
        .prop_map(|(typ, r, n, mode, pad, zero_pad)| {
            let value = match mode {
                0 => r[..n].to_vec(),
                _ => shaped(typ, &r, n),
            };
            let mut out = Vec::with_capacity(4 + pad4(value.len()));
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
            out.extend_from_slice(&value);
            let padding = pad4(value.len()) - value.len();
            if zero_pad {
                out.extend(std::iter::repeat(0).take(padding));
            } else {
                out.extend_from_slice(&pad[..padding]);
            }
            out
        })
}

/// A STUN header with the right length and cookie, then attribute soup.
fn stun_soup() -> impl Strategy<Value = Vec<u8>> {
    (
        0u16..0x4000,
        any::<[u8; 12]>(),
        proptest::collection::vec(tlv(), 0..10),
    )
        .prop_map(|(typ, tid, tlvs)| {
            let body: Vec<u8> = tlvs.concat();
            let mut buf = Vec::with_capacity(20 + body.len());
            buf.extend_from_slice(&typ.to_be_bytes());
            buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
            buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            buf.extend_from_slice(&tid);
            buf.extend_from_slice(&body);
            buf
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2048,
        // The default looks for a lib.rs/main.rs beside this file and finds none.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/wire_oracles.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn stun_message_oracle_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        oracles::stun_message(&bytes);
    }

    #[test]
    fn stun_message_oracle_on_attribute_soup(buf in stun_soup()) {
        oracles::stun_message(&buf);
    }

    #[test]
    fn channel_data_oracle_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        oracles::channel_data(&bytes);
    }

    #[test]
    fn channel_data_oracle_on_channel_headers(
        channel in prop_oneof![CHANNEL_RANGE, any::<u16>()],
        len in 0u16..200,
        extra in -8i32..8,
    ) {
        let total = (4 + i32::from(len) + extra).max(0) as usize;
        let mut buf = vec![0xA5u8; total];
        let hdr = [channel.to_be_bytes(), len.to_be_bytes()].concat();
        let n = hdr.len().min(total);
        buf[..n].copy_from_slice(&hdr[..n]);
        oracles::channel_data(&buf);
    }
}

/// The soup generator must actually reach the re-emit oracle: a fair share of its inputs has to parse.
#[test]
fn attribute_soup_mostly_parses() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let strategy = stun_soup();
    let total = 2000;
    let mut parsed = 0;
    let mut with_attrs = 0;
    for _ in 0..total {
        let buf = strategy
            .new_tree(&mut runner)
            .expect("strategy yields a value")
            .current();
        if let Ok(m) = turnpike::wire::Message::parse(&buf) {
            parsed += 1;
            if m.attributes().count() >= 2 {
                with_attrs += 1;
            }
        }
    }
    assert!(
        parsed * 2 >= total && with_attrs * 4 >= total,
        "only {parsed}/{total} parsed, {with_attrs} with 2+ attributes"
    );
}

/// A message written by the codec itself, with integrity and fingerprint, goes through both oracles.
#[test]
fn oracles_accept_a_well_formed_message() {
    use turnpike::wire::{Attribute, Class, MessageType, Method, TransactionId};

    let mut buf = [0u8; 256];
    let typ = MessageType::new(Method::ALLOCATE, Class::Request);
    let mut w = MessageWriter::new(&mut buf, typ, TransactionId([9; 12])).expect("header");
    for a in [
        Attribute::RequestedTransport(17),
        Attribute::EvenPort(true),
        Attribute::Username("1700000000:alice"),
        Attribute::XorPeerAddress("[2001:db8::1]:3478".parse().expect("address")),
        Attribute::Unknown {
            typ: 0x7FFF,
            value: b"abc",
        },
    ] {
        w.add(&a).expect("fits");
    }
    w.add_integrity(b"key").expect("fits");
    w.add_fingerprint().expect("fits");
    let n = w.finish();
    oracles::stun_message(&buf[..n]);
    oracles::channel_data(&[0x40, 0x01, 0x00, 0x02, 0xAB, 0xCD, 0, 0]);
}
