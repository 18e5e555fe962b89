//! Stateless nonces (RFC 8489 §9.2).
//!
//! The relay keeps no nonce table. A nonce carries its own expiry and security-feature bits and
//! is authenticated by a truncated HMAC-SHA256 under a server key over the client's transport
//! address, the features and the expiry. A client can therefore only replay a nonce from the
//! address it was issued to, and only until it expires (then the server answers 438 Stale Nonce,
//! RFC 8489 §9.2.4).
//!
//! Layout (51 ASCII bytes, all fixed width):
//!
//! ```text
//!  0          9      13                 29                        51
//!  +----------+------+------------------+-------------------------+
//!  |obMatJos2 | gAAA | 000000006553f100 | base64(HMAC[..16]), 22  |
//!  +----------+------+------------------+-------------------------+
//!   cookie     features  expiry, 16       tag: HMAC-SHA256(key, family ||
//!   (§9.2)     (base64)  lowercase hex         ip || port BE || features[3] || expiry BE)
//! ```
//!
//! Every field has exactly one accepted spelling (lowercase hex, canonical base64 without
//! padding), so changing any byte of a valid nonce makes it fail to parse or fail the MAC.
//!
//! The address is bound as given: an IPv4 client and the same client seen as an IPv4-mapped IPv6
//! address are different clients. IPv6 flow info and scope id are not bound.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Security feature bit 0 of RFC 8489 §9.2.1 (the most significant of the 24): "Password
/// algorithms", i.e. the server supports PASSWORD-ALGORITHMS (base64 `"gAAA"` on its own).
pub const FEATURE_PASSWORD_ALGORITHMS: u32 = 1 << 23;
/// Security feature bit 1 of RFC 8489 §9.2.1: "Username anonymity" (USERHASH).
pub const FEATURE_USERNAME_ANONYMITY: u32 = 1 << 22;

/// The server key that authenticates nonces. Its `Debug` does not show the bytes.
#[derive(Clone)]
pub struct NonceKey([u8; 32]);

/// A nonce held inline (no heap), always [`Nonce::LEN`] ASCII bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce {
    bytes: [u8; Nonce::LEN],
}

/// The outcome of [`NonceKey::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Minted by this key for this client and not expired; carries its security-feature bits.
    Valid {
        /// The 24 security-feature bits the nonce was minted with (RFC 8489 §9.2.1).
        features: u32,
    },
    /// Minted by this key for this client, but expired: answer 438 Stale Nonce with a fresh one.
    Stale,
    /// Not a nonce this key minted for this client (garbage, tampered, other key or address).
    Forged,
}

impl NonceKey {
    /// Wraps 32 secret bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Draws a fresh key from `rng` (use a cryptographically secure one outside tests).
    pub fn random<R: rand::RngCore>(rng: &mut R) -> Self {
        let mut bytes = [0; 32];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Mints a nonce for `client`, valid until `expiry` (Unix seconds, inclusive), advertising
    /// the low 24 bits of `features` (RFC 8489 §9.2.1). Does not allocate.
    pub fn mint(&self, client: SocketAddr, features: u32, expiry: u64) -> Nonce {
        let features = features & FEATURE_MASK;
        let mut bytes = [0; Nonce::LEN];
        bytes[field::COOKIE].copy_from_slice(COOKIE);
        STANDARD
            .encode_slice(&features.to_be_bytes()[1..], &mut bytes[field::FEATURES])
            .expect("3 bytes encode to exactly 4 base64 chars");
        for (i, digit) in bytes[field::EXPIRY].iter_mut().enumerate() {
            *digit = HEX[(expiry >> (60 - 4 * i) & 0xf) as usize];
        }
        let tag = self.mac(client, features, expiry).finalize().into_bytes();
        STANDARD_NO_PAD
            .encode_slice(&tag[..TAG_LEN], &mut bytes[field::TAG])
            .expect("16 bytes encode to exactly 22 unpadded base64 chars");
        Nonce { bytes }
    }

    /// Checks a nonce a client sent back from `client`.
    ///
    /// [`NonceCheck::Forged`] if it does not parse or its MAC does not match this key and client
    /// (compared in constant time); [`NonceCheck::Stale`] if authentic but `expiry < unix_now`;
    /// otherwise [`NonceCheck::Valid`]. Never panics, whatever the bytes.
    pub fn verify(&self, client: SocketAddr, nonce: &[u8], unix_now: u64) -> NonceCheck {
        let Some((features, expiry, tag)) = parse(nonce) else {
            return NonceCheck::Forged;
        };
        if self
            .mac(client, features, expiry)
            .verify_truncated_left(&tag)
            .is_err()
        {
            return NonceCheck::Forged;
        }
        if expiry < unix_now {
            NonceCheck::Stale
        } else {
            NonceCheck::Valid { features }
        }
    }

    /// The HMAC state after absorbing the authenticated fields (see the module doc).
    fn mac(&self, client: SocketAddr, features: u32, expiry: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts 32-byte keys");
        match client.ip() {
            IpAddr::V4(ip) => {
                mac.update(&[FAMILY_IPV4]);
                mac.update(&ip.octets());
            }
            IpAddr::V6(ip) => {
                mac.update(&[FAMILY_IPV6]);
                mac.update(&ip.octets());
            }
        }
        mac.update(&client.port().to_be_bytes());
        mac.update(&features.to_be_bytes()[1..]);
        mac.update(&expiry.to_be_bytes());
        mac
    }
}

impl fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

impl Nonce {
    /// The length of every nonce: cookie 9 + features 4 + expiry 16 + tag 22. Well under the
    /// 763-byte limit of RFC 8489 §14.10.
    pub const LEN: usize = field::TAG.end;

    /// The nonce text, for the NONCE attribute.
    pub fn as_str(&self) -> &str {
        // Always ASCII by construction, so the fallback is never taken.
        std::str::from_utf8(&self.bytes).unwrap_or_default()
    }

    /// The nonce bytes, for the NONCE attribute.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Nonce").field(&self.as_str()).finish()
    }
}

/// RFC 8489 §9.2: the nonce cookie that announces the security-feature bits.
const COOKIE: &[u8; 9] = b"obMatJos2";
const FEATURE_MASK: u32 = 0x00ff_ffff;
/// Truncated HMAC-SHA256 length: 128 bits.
const TAG_LEN: usize = 16;
/// Address family bytes, as in MAPPED-ADDRESS (RFC 8489 §14.1).
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Byte ranges of the nonce fields.
mod field {
    use std::ops::Range;
    pub const COOKIE: Range<usize> = 0..9;
    pub const FEATURES: Range<usize> = 9..13;
    pub const EXPIRY: Range<usize> = 13..29;
    pub const TAG: Range<usize> = 29..51;
}

/// Splits a nonce into (features, expiry, tag), accepting only the exact spelling `mint` writes.
fn parse(nonce: &[u8]) -> Option<(u32, u64, [u8; TAG_LEN])> {
    let nonce: &[u8; Nonce::LEN] = nonce.try_into().ok()?;
    if nonce[field::COOKIE] != COOKIE[..] {
        return None;
    }
    let mut features = [0; 4];
    if STANDARD
        .decode_slice(&nonce[field::FEATURES], &mut features[1..])
        .ok()?
        != 3
    {
        return None;
    }
    let mut expiry = 0u64;
    for &digit in &nonce[field::EXPIRY] {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        expiry = expiry << 4 | u64::from(value);
    }
    let mut tag = [0; TAG_LEN];
    if STANDARD_NO_PAD
        .decode_slice(&nonce[field::TAG], &mut tag)
        .ok()?
        != TAG_LEN
    {
        return None;
    }
    Some((u32::from_be_bytes(features), expiry, tag))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000;

    fn key() -> NonceKey {
        NonceKey::new([7; 32])
    }

    fn client() -> SocketAddr {
        "192.0.2.1:32853".parse().unwrap()
    }

    #[test]
    fn mint_then_verify_round_trips_features() {
        for features in [
            0,
            FEATURE_PASSWORD_ALGORITHMS,
            FEATURE_USERNAME_ANONYMITY,
            FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
            FEATURE_MASK,
        ] {
            let nonce = key().mint(client(), features, NOW + 600);
            assert_eq!(
                key().verify(client(), nonce.as_bytes(), NOW),
                NonceCheck::Valid { features }
            );
        }
        // Bits above the 24 features are dropped, not smuggled into the MAC.
        let nonce = key().mint(client(), 0xff00_0000 | FEATURE_PASSWORD_ALGORITHMS, NOW);
        assert_eq!(
            nonce,
            key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, NOW)
        );
    }

    #[test]
    fn layout_follows_rfc_8489_section_9_2() {
        let nonce = key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, 0x6553_f100);
        let text = nonce.as_str();
        assert!(text.starts_with("obMatJos2gAAA000000006553f100"), "{text}");
        assert_eq!(text.len(), Nonce::LEN);
        assert_eq!(Nonce::LEN, 51);
        assert!(nonce.as_bytes().len() <= 763, "RFC 8489 §14.10 limit");
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
        let both = key().mint(
            client(),
            FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
            0,
        );
        assert_eq!(&both.as_str()[9..13], "wAAA");
        assert_eq!(format!("{nonce:?}"), format!("Nonce({text:?})"));
    }

    #[test]
    fn other_clients_and_keys_are_forged() {
        let nonce = key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, NOW);
        for other in [
            "192.0.2.1:32854",
            "192.0.2.2:32853",
            "[2001:db8::1]:32853",
            "[::ffff:192.0.2.1]:32853",
        ] {
            let other: SocketAddr = other.parse().unwrap();
            assert_eq!(
                key().verify(other, nonce.as_bytes(), NOW),
                NonceCheck::Forged,
                "{other}"
            );
        }
        let v6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let nonce6 = key().mint(v6, 0, NOW);
        assert_eq!(
            key().verify(v6, nonce6.as_bytes(), NOW),
            NonceCheck::Valid { features: 0 }
        );
        let v4: SocketAddr = "32.1.13.184:3478".parse().unwrap(); // 2001:0db8 as IPv4
        assert_eq!(key().verify(v4, nonce6.as_bytes(), NOW), NonceCheck::Forged);

        let other_key = NonceKey::new([8; 32]);
        assert_eq!(
            other_key.verify(client(), nonce.as_bytes(), NOW),
            NonceCheck::Forged
        );
    }

    #[test]
    fn every_single_byte_change_is_forged() {
        let nonce = key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, NOW);
        for position in 0..Nonce::LEN {
            for value in 0..=u8::MAX {
                let mut bytes = nonce.as_bytes().to_vec();
                if bytes[position] == value {
                    continue;
                }
                bytes[position] = value;
                assert_eq!(
                    key().verify(client(), &bytes, NOW),
                    NonceCheck::Forged,
                    "byte {position} set to {value:#04x}"
                );
            }
        }
    }

    #[test]
    fn truncations_and_extensions_are_forged() {
        let nonce = key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, NOW);
        for len in 0..Nonce::LEN {
            assert_eq!(
                key().verify(client(), &nonce.as_bytes()[..len], NOW),
                NonceCheck::Forged
            );
            assert_eq!(
                key().verify(client(), &nonce.as_bytes()[Nonce::LEN - len..], NOW),
                NonceCheck::Forged
            );
        }
        let mut longer = nonce.as_bytes().to_vec();
        longer.push(b'A');
        assert_eq!(key().verify(client(), &longer, NOW), NonceCheck::Forged);
    }

    #[test]
    fn expiry_boundary_is_inclusive() {
        let nonce = key().mint(client(), FEATURE_USERNAME_ANONYMITY, NOW);
        let valid = NonceCheck::Valid {
            features: FEATURE_USERNAME_ANONYMITY,
        };
        assert_eq!(key().verify(client(), nonce.as_bytes(), NOW - 1), valid);
        assert_eq!(key().verify(client(), nonce.as_bytes(), NOW), valid);
        assert_eq!(
            key().verify(client(), nonce.as_bytes(), NOW + 1),
            NonceCheck::Stale
        );
        let last = key().mint(client(), 0, u64::MAX);
        assert_eq!(
            key().verify(client(), last.as_bytes(), u64::MAX),
            NonceCheck::Valid { features: 0 }
        );
    }

    #[test]
    fn random_keys_differ_and_debug_hides_them() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a = NonceKey::random(&mut rng);
        let b = NonceKey::random(&mut rng);
        let nonce = a.mint(client(), 0, NOW);
        assert_eq!(
            a.verify(client(), nonce.as_bytes(), NOW),
            NonceCheck::Valid { features: 0 }
        );
        assert_eq!(
            b.verify(client(), nonce.as_bytes(), NOW),
            NonceCheck::Forged
        );
        assert_eq!(format!("{:?}", key()), "NonceKey(..)");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_are_forged(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            prop_assert_eq!(key().verify(client(), &bytes, 0), NonceCheck::Forged);
        }

        /// Right length and cookie, so the field parsers see the arbitrary bytes.
        #[test]
        fn arbitrary_fields_are_forged(
            rest in "[0-9a-zA-Z+/=]{42}",
            raw in proptest::collection::vec(any::<u8>(), 42),
        ) {
            let text = format!("obMatJos2{rest}");
            prop_assert_eq!(key().verify(client(), text.as_bytes(), 0), NonceCheck::Forged);
            let mut bytes = COOKIE.to_vec();
            bytes.extend_from_slice(&raw);
            prop_assert_eq!(key().verify(client(), &bytes, 0), NonceCheck::Forged);
        }
    }
}
