//! Criterion benches for the STUN/TURN wire codec hot paths: parsing an authenticated Allocate,
//! verifying MESSAGE-INTEGRITY (with and without deriving the long-term key), ChannelData framing, and
//! building an Allocate success response.
//!
//! Run with `cargo bench --bench wire`. Measurement time is kept short so the whole run takes seconds.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use turnpike::auth::{long_term_key_md5, rest_password, NonceKey, FEATURE_PASSWORD_ALGORITHMS};
use turnpike::wire::{
    classify, Attribute, ChannelData, Class, Kind, Message, MessageType, MessageWriter, Method,
    TransactionId,
};

const USERNAME: &str = "1700000000:alice";
const REALM: &str = "turnpike";
const TID: TransactionId = TransactionId([
    0x6b, 0x1f, 0x3a, 0x90, 0x22, 0x41, 0xc7, 0x08, 0x5e, 0xd2, 0x17, 0xaa,
]);

/// The TURN REST password for [`USERNAME`] under a fixed shared secret.
fn password() -> String {
    rest_password(b"turnpike-shared-secret", USERNAME)
}

/// A real stateless nonce (the 37-byte form with the RFC 8489 cookie), as the server would have handed
/// out in its 401.
fn nonce(client: SocketAddr) -> String {
    let nonce = NonceKey::new([7; 32]).mint(client, FEATURE_PASSWORD_ALGORITHMS, 1_700_000_600);
    assert_eq!(nonce.as_str().len(), 37);
    nonce.as_str().to_owned()
}

fn client() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 23], 50_123))
}

/// The second (authenticated) Allocate request of a TURN client: REQUESTED-TRANSPORT UDP, LIFETIME,
/// USERNAME, REALM, NONCE, MESSAGE-INTEGRITY (MD5 long-term key) and FINGERPRINT.
fn authenticated_allocate(key: &[u8]) -> Vec<u8> {
    let nonce = nonce(client());
    let mut buf = vec![0u8; 512];
    let typ = MessageType::new(Method::ALLOCATE, Class::Request);
    let mut w = MessageWriter::new(&mut buf, typ, TID).expect("header fits");
    for attr in [
        Attribute::RequestedTransport(17),
        Attribute::Lifetime(600),
        Attribute::Username(USERNAME),
        Attribute::Realm(REALM),
        Attribute::Nonce(&nonce),
    ] {
        w.add(&attr).expect("attribute fits");
    }
    w.add_integrity(key).expect("integrity fits");
    w.add_fingerprint().expect("fingerprint fits");
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn bench_parse_authenticated_allocate(c: &mut Criterion) {
    let key = long_term_key_md5(USERNAME, REALM, &password());
    let msg = authenticated_allocate(&key);
    // Sanity: the message is what the bench claims it is.
    let parsed = Message::parse(&msg).expect("valid request");
    assert!(parsed.verify_integrity(&key) && parsed.verify_fingerprint());
    assert_eq!(parsed.attrs.nonce.map(str::len), Some(37));

    c.bench_function("parse_authenticated_allocate", |b| {
        b.iter(|| Message::parse(black_box(&msg)))
    });
}

fn bench_verify_message_integrity(c: &mut Criterion) {
    let password = password();
    let key = long_term_key_md5(USERNAME, REALM, &password);
    let msg = authenticated_allocate(&key);
    let parsed = Message::parse(&msg).expect("valid request");

    c.bench_function("verify_message_integrity", |b| {
        b.iter(|| black_box(&parsed).verify_integrity(black_box(&key)))
    });

    // The per-request cost when the long-term key is not cached: MD5 of user:realm:password, then HMAC.
    c.bench_function("derive_key_md5_and_verify_message_integrity", |b| {
        b.iter(|| {
            let m = black_box(&parsed);
            let key = long_term_key_md5(
                m.attrs.username.unwrap_or_default(),
                m.attrs.realm.unwrap_or_default(),
                black_box(&password),
            );
            m.verify_integrity(&key)
        })
    });
}

/// A 160-byte payload (a typical audio RTP packet) behind a ChannelData header for channel 0x4001.
fn channel_data_packet() -> Vec<u8> {
    let mut pkt = vec![0u8; 4 + 160];
    pkt[4..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    ChannelData::write_header(&mut pkt, 0x4001, 160).expect("headroom");
    pkt
}

fn bench_parse_channeldata_header(c: &mut Criterion) {
    let pkt = channel_data_packet();
    c.bench_function("parse_channeldata_header", |b| {
        b.iter(|| {
            let buf: &[u8] = black_box(&pkt);
            match classify(buf[0]) {
                Kind::ChannelData => ChannelData::parse(buf)
                    .map(|cd| (cd.channel(), cd.payload().len()))
                    .ok(),
                _ => None,
            }
        })
    });
}

fn bench_write_channeldata_header(c: &mut Criterion) {
    let mut pkt = channel_data_packet();
    c.bench_function("write_channeldata_header", |b| {
        b.iter(|| {
            ChannelData::write_header(black_box(&mut pkt[..]), black_box(0x4001), black_box(160))
        })
    });
}

fn bench_build_allocate_success(c: &mut Criterion) {
    let key = long_term_key_md5(USERNAME, REALM, &password());
    let relayed = SocketAddr::from(([203, 0, 113, 5], 49_152));
    let mapped = client();
    let typ = MessageType::new(Method::ALLOCATE, Class::Success);

    c.bench_function("build_allocate_success", |b| {
        b.iter(|| {
            let mut buf = [0u8; 256];
            let mut w =
                MessageWriter::new(&mut buf, black_box(typ), black_box(TID)).expect("header");
            w.add(&Attribute::XorRelayedAddress(black_box(relayed)))
                .expect("fits");
            w.add(&Attribute::Lifetime(black_box(600))).expect("fits");
            w.add(&Attribute::XorMappedAddress(black_box(mapped)))
                .expect("fits");
            w.add_integrity(black_box(&key)).expect("fits");
            w.add_fingerprint().expect("fits");
            let n = w.finish();
            black_box(buf);
            n
        })
    });
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

/// Private so that the `pub fn` that `criterion_group!` generates is not a documented item.
mod group {
    use super::*;

    criterion_group! {
        name = wire;
        config = config();
        targets =
            bench_parse_authenticated_allocate,
            bench_verify_message_integrity,
            bench_parse_channeldata_header,
            bench_write_channeldata_header,
            bench_build_allocate_success
    }
}
criterion_main!(group::wire);
