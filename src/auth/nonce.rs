//! Stateless nonces (RFC 8489 §9.2).
//!
//! The relay keeps no nonce table. A nonce carries its own expiry and security-feature bits and
//! is authenticated by a truncated HMAC-SHA256 under a server key over the client's transport
//! address, the features and the expiry. A client can therefore only replay a nonce from the
//! address it was issued to, and only until it expires (then the server answers 438 Stale Nonce,
//! RFC 8489 §9.2.4).
//!
//! Nonces are kept short because they go into every 401, which must stay within 3x a minimal
//! 28-byte Allocate (anti-amplification). There are two layouts, told apart by length:
//!
//! ```text
//!  No features advertised (24 ASCII bytes): a plain opaque nonce, no cookie.
//!  0          8                    24
//!  +----------+--------------------+
//!  | 6553f100 | base64(HMAC[..12]) |
//!  +----------+--------------------+
//!   expiry     tag, 16 chars
//!
//!  Some features advertised (37 ASCII bytes): the RFC 8489 §9.2 cookie and feature bits first.
//!  0           9      13         21                   37
//!  +-----------+------+----------+--------------------+
//!  | obMatJos2 | gAAA | 6553f100 | base64(HMAC[..12]) |
//!  +-----------+------+----------+--------------------+
//!   cookie      features expiry   tag, 16 chars
//!   (§9.2)      (base64)
//!
//!  expiry: u32 Unix seconds, 8 lowercase hex digits.
//!  tag:    HMAC-SHA256(key, family || ip || port BE || features[3] || expiry u32 BE),
//!          first 12 bytes, standard base64 without padding.
//! ```
//!
//! The MAC always covers the feature bits, so stripping the cookie and features off a 37-byte
//! nonce does not yield a valid 24-byte one. Every field has exactly one accepted spelling
//! (lowercase hex, canonical base64, the cookie only when some feature bit is set), so changing
//! any byte of a valid nonce makes it fail to parse or fail the MAC.
//!
//! The address is bound as given: an IPv4 client and the same client seen as an IPv4-mapped IPv6
//! address are different clients. IPv6 flow info and scope id are not bound.

use base64::engine::general_purpose::STANDARD_NO_PAD;
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
///
/// It is held as the HMAC state after the key was absorbed (the inner and outer pads), derived once:
/// each nonce minted or checked clones it instead of hashing the pads again, two SHA-256 blocks of
/// the four an HMAC over a nonce's fields costs.
#[derive(Clone)]
pub struct NonceKey(Hmac<Sha256>);

/// A nonce held inline (no heap): 24 ASCII bytes without feature bits, [`Nonce::MAX_LEN`] with.
#[derive(Clone, Copy)]
pub struct Nonce {
    bytes: [u8; Nonce::MAX_LEN],
    len: u8,
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
        Self(Hmac::<Sha256>::new_from_slice(&bytes).expect("HMAC accepts 32-byte keys"))
    }

    /// Draws a fresh key from `rng` (use a cryptographically secure one outside tests).
    pub fn random<R: rand::RngCore>(rng: &mut R) -> Self {
        let mut bytes = [0; 32];
        rng.fill_bytes(&mut bytes);
        Self::new(bytes)
    }

    /// Mints a nonce for `client`, valid until `expiry` (Unix seconds, inclusive; clamped to
    /// `u32::MAX`), advertising the low 24 bits of `features` (RFC 8489 §9.2.1). Without feature
    /// bits the nonce is a plain 24-byte value with no RFC 8489 cookie. Does not allocate.
    pub fn mint(&self, client: SocketAddr, features: u32, expiry: u64) -> Nonce {
        let features = features & FEATURE_MASK;
        let expiry = u32::try_from(expiry).unwrap_or(u32::MAX);
        let mut bytes = [0; Nonce::MAX_LEN];
        let start = if features == 0 {
            0
        } else {
            bytes[..COOKIE.len()].copy_from_slice(COOKIE);
            STANDARD_NO_PAD
                .encode_slice(
                    &features.to_be_bytes()[1..],
                    &mut bytes[COOKIE.len()..PREFIX_LEN],
                )
                .expect("3 bytes encode to exactly 4 base64 chars");
            PREFIX_LEN
        };
        let fields = &mut bytes[start..];
        for (i, digit) in fields[..EXPIRY_LEN].iter_mut().enumerate() {
            *digit = HEX[(expiry >> (28 - 4 * i) & 0xf) as usize];
        }
        let tag = self.mac(client, features, expiry).finalize().into_bytes();
        STANDARD_NO_PAD
            .encode_slice(&tag[..TAG_LEN], &mut fields[EXPIRY_LEN..])
            .expect("12 bytes encode to exactly 16 unpadded base64 chars");
        Nonce {
            bytes,
            len: (start + SHORT_LEN) as u8,
        }
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
        if u64::from(expiry) < unix_now {
            NonceCheck::Stale
        } else {
            NonceCheck::Valid { features }
        }
    }

    /// The HMAC state after absorbing the authenticated fields (see the module doc).
    fn mac(&self, client: SocketAddr, features: u32, expiry: u32) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
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
    /// The longest nonce: cookie 9 + features 4 + expiry 8 + tag 16. Nonces without feature
    /// bits are 24 bytes. Well under the 763-byte limit of RFC 8489 §14.10.
    pub const MAX_LEN: usize = PREFIX_LEN + SHORT_LEN;

    /// The nonce text, for the NONCE attribute.
    pub fn as_str(&self) -> &str {
        // Always ASCII by construction, so the fallback is never taken.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The nonce bytes, for the NONCE attribute.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl PartialEq for Nonce {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Nonce {}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Nonce").field(&self.as_str()).finish()
    }
}

/// RFC 8489 §9.2: the nonce cookie that announces the security-feature bits.
const COOKIE: &[u8; 9] = b"obMatJos2";
/// Cookie plus the 4 base64 chars of the feature bits.
const PREFIX_LEN: usize = COOKIE.len() + 4;
const FEATURE_MASK: u32 = 0x00ff_ffff;
/// Hex digits of the u32 expiry.
const EXPIRY_LEN: usize = 8;
/// Truncated HMAC-SHA256 length: 96 bits, 16 base64 chars.
const TAG_LEN: usize = 12;
/// The nonce without cookie and features: expiry 8 + tag 16.
const SHORT_LEN: usize = EXPIRY_LEN + 16;
/// Address family bytes, as in MAPPED-ADDRESS (RFC 8489 §14.1).
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Splits a nonce into (features, expiry, tag), accepting only the exact spelling `mint` writes.
fn parse(nonce: &[u8]) -> Option<(u32, u32, [u8; TAG_LEN])> {
    let (features, fields) = match nonce.len() {
        SHORT_LEN => (0, nonce),
        Nonce::MAX_LEN => {
            let (prefix, fields) = nonce.split_at(PREFIX_LEN);
            let (cookie, encoded) = prefix.split_at(COOKIE.len());
            if cookie != COOKIE {
                return None;
            }
            let mut features = [0; 4];
            if STANDARD_NO_PAD
                .decode_slice(encoded, &mut features[1..])
                .ok()?
                != 3
            {
                return None;
            }
            let features = u32::from_be_bytes(features);
            // Featureless nonces are minted without the cookie: one spelling only.
            if features == 0 {
                return None;
            }
            (features, fields)
        }
        _ => return None,
    };
    let (hex, encoded) = fields.split_at(EXPIRY_LEN);
    let mut expiry = 0u32;
    for &digit in hex {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        expiry = expiry << 4 | u32::from(value);
    }
    let mut tag = [0; TAG_LEN];
    if STANDARD_NO_PAD.decode_slice(encoded, &mut tag).ok()? != TAG_LEN {
        return None;
    }
    Some((features, expiry, tag))
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

    /// One nonce of each layout: without features (24 bytes) and with (37 bytes).
    fn both_layouts() -> [Nonce; 2] {
        [
            key().mint(client(), 0, NOW),
            key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, NOW),
        ]
    }

    #[test]
    fn mint_then_verify_round_trips_features() {
        for features in [
            0,
            FEATURE_PASSWORD_ALGORITHMS,
            FEATURE_USERNAME_ANONYMITY,
            FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
            1,
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
        let plain = key().mint(client(), 0xff00_0000, NOW);
        assert_eq!(plain, key().mint(client(), 0, NOW));
        assert_eq!(plain.as_bytes().len(), 24);
    }

    #[test]
    fn layout_follows_rfc_8489_section_9_2() {
        let nonce = key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, 0x6553_f100);
        let text = nonce.as_str();
        assert!(text.starts_with("obMatJos2gAAA6553f100"), "{text}");
        assert_eq!(text.len(), 37);
        assert_eq!(Nonce::MAX_LEN, 37);
        assert!(nonce.as_bytes().len() <= 763, "RFC 8489 §14.10 limit");
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
        let both = key().mint(
            client(),
            FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
            0,
        );
        assert_eq!(&both.as_str()[9..21], "wAAA00000000");
        assert_eq!(format!("{nonce:?}"), format!("Nonce({text:?})"));

        // No features: a plain opaque nonce, no cookie.
        let plain = key().mint(client(), 0, 0x6553f100);
        let text = plain.as_str();
        assert!(text.starts_with("6553f100"), "{text}");
        assert_eq!(text.len(), 24);
        assert!(!text.contains("obMatJos2"));
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
        // Same expiry and MAC input apart from features, so the tags differ.
        assert_ne!(&text[8..], &nonce.as_str()[21..]);
    }

    /// A 401 carrying the NONCE attribute must stay small (anti-amplification).
    #[test]
    fn nonce_attribute_is_small() {
        for (nonce, wire) in both_layouts().iter().zip([28, 44]) {
            let len = nonce.as_bytes().len();
            assert_eq!(4 + len.next_multiple_of(4), wire, "{nonce:?}");
        }
    }

    #[test]
    fn other_clients_and_keys_are_forged() {
        for nonce in both_layouts() {
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
                    "{other} {nonce:?}"
                );
            }
            let other_key = NonceKey::new([8; 32]);
            assert_eq!(
                other_key.verify(client(), nonce.as_bytes(), NOW),
                NonceCheck::Forged
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
    }

    #[test]
    fn every_single_byte_change_is_forged() {
        for nonce in both_layouts() {
            for position in 0..nonce.as_bytes().len() {
                for value in 0..=u8::MAX {
                    let mut bytes = nonce.as_bytes().to_vec();
                    if bytes[position] == value {
                        continue;
                    }
                    bytes[position] = value;
                    assert_eq!(
                        key().verify(client(), &bytes, NOW),
                        NonceCheck::Forged,
                        "{nonce:?}: byte {position} set to {value:#04x}"
                    );
                }
            }
        }
    }

    #[test]
    fn truncations_and_extensions_are_forged() {
        for nonce in both_layouts() {
            let bytes = nonce.as_bytes();
            for len in 0..bytes.len() {
                assert_eq!(
                    key().verify(client(), &bytes[..len], NOW),
                    NonceCheck::Forged
                );
                assert_eq!(
                    key().verify(client(), &bytes[bytes.len() - len..], NOW),
                    NonceCheck::Forged
                );
            }
            let mut longer = bytes.to_vec();
            longer.push(b'A');
            assert_eq!(key().verify(client(), &longer, NOW), NonceCheck::Forged);
        }
    }

    #[test]
    fn layouts_cannot_be_converted() {
        let [plain, featured] = both_layouts();
        // Stripping cookie and features does not downgrade to a featureless nonce.
        let stripped = &featured.as_bytes()[13..];
        assert_eq!(stripped.len(), 24);
        assert_eq!(key().verify(client(), stripped, NOW), NonceCheck::Forged);
        // Nor does dressing a featureless nonce up with a cookie and zero features, even though
        // the MAC input is the same: featureless nonces have only the short spelling.
        let mut dressed = b"obMatJos2AAAA".to_vec();
        dressed.extend_from_slice(plain.as_bytes());
        assert_eq!(dressed.len(), Nonce::MAX_LEN);
        assert_eq!(key().verify(client(), &dressed, NOW), NonceCheck::Forged);
    }

    #[test]
    fn expiry_boundary_is_inclusive() {
        for features in [0, FEATURE_USERNAME_ANONYMITY] {
            let nonce = key().mint(client(), features, NOW);
            let valid = NonceCheck::Valid { features };
            assert_eq!(key().verify(client(), nonce.as_bytes(), NOW - 1), valid);
            assert_eq!(key().verify(client(), nonce.as_bytes(), NOW), valid);
            assert_eq!(
                key().verify(client(), nonce.as_bytes(), NOW + 1),
                NonceCheck::Stale
            );
        }
        let max = u64::from(u32::MAX);
        let last = key().mint(client(), 0, max);
        assert!(last.as_str().starts_with("ffffffff"), "{last:?}");
        assert_eq!(
            key().verify(client(), last.as_bytes(), max),
            NonceCheck::Valid { features: 0 }
        );
        assert_eq!(
            key().verify(client(), last.as_bytes(), max + 1),
            NonceCheck::Stale
        );
        assert_eq!(
            key().verify(client(), last.as_bytes(), u64::MAX),
            NonceCheck::Stale
        );
        // Later expiries clamp to u32::MAX, and the MAC covers the clamped value.
        for beyond in [max + 1, u64::MAX] {
            assert_eq!(key().mint(client(), 0, beyond), last);
            let featured = key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, beyond);
            assert_eq!(
                featured,
                key().mint(client(), FEATURE_PASSWORD_ALGORITHMS, max)
            );
            assert_eq!(&featured.as_str()[13..21], "ffffffff");
            assert_eq!(
                key().verify(client(), featured.as_bytes(), max),
                NonceCheck::Valid {
                    features: FEATURE_PASSWORD_ALGORITHMS
                }
            );
        }
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

        /// Right length (and cookie, for the long layout), so the field parsers see the
        /// arbitrary bytes.
        #[test]
        fn arbitrary_fields_are_forged(
            rest in "[0-9a-zA-Z+/=]{28}",
            short in "[0-9a-zA-Z+/=]{24}",
            raw in proptest::collection::vec(any::<u8>(), 28),
            raw_short in proptest::collection::vec(any::<u8>(), 24),
        ) {
            let text = format!("obMatJos2{rest}");
            prop_assert_eq!(key().verify(client(), text.as_bytes(), 0), NonceCheck::Forged);
            prop_assert_eq!(key().verify(client(), short.as_bytes(), 0), NonceCheck::Forged);
            let mut bytes = COOKIE.to_vec();
            bytes.extend_from_slice(&raw);
            prop_assert_eq!(key().verify(client(), &bytes, 0), NonceCheck::Forged);
            prop_assert_eq!(key().verify(client(), &raw_short, 0), NonceCheck::Forged);
        }
    }
}
