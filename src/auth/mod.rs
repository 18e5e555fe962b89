//! Credentials: long-term keys, TURN REST API credentials and stateless nonces.
//!
//! This module is deterministic: it reads no clock and does no IO; it uses `wire` and `budget` only
//! (for the challenge it writes). Time always comes in as an argument (`unix_now`, seconds since the
//! Unix epoch), and randomness only through a caller-supplied RNG ([`NonceKey::random`]).
//!
//! - [`long_term_key_md5`] / [`long_term_key_sha256`]: the RFC 8489 §9.2.2 long-term key that
//!   keys MESSAGE-INTEGRITY (MD5) or MESSAGE-INTEGRITY-SHA256 (SHA-256).
//! - [`RestSecrets`]: time-limited TURN REST API credentials, with secret rotation.
//! - [`NonceKey`]: stateless NONCE values (RFC 8489 §9.2) bound to the client's transport
//!   address, so the server keeps no per-client nonce state.
//! - [`Challenger`]: the 401 / 438 answer that carries a fresh nonce, written by the server and by
//!   the data-plane workers alike.

use md5::{Digest as _, Md5};
use sha2::Sha256;

mod challenge;
mod nonce;
mod rest;

pub(crate) use challenge::Unsent;
pub use challenge::{
    challenge_len, is_plain_challenge, Challenge, Challenger, RequestFacts, ADVERTISED_ALGORITHMS,
};

pub use nonce::{
    Nonce, NonceCheck, NonceKey, FEATURE_PASSWORD_ALGORITHMS, FEATURE_USERNAME_ANONYMITY,
};
pub use rest::{
    parse_rest_username, rest_password, RestCredential, RestError, RestSecrets, RestUsername,
    DEFAULT_MAX_TTL, EXPIRY_SKEW,
};

/// RFC 8489 §9.2.2: the long-term key `MD5(username ":" realm ":" password)`.
///
/// The inputs are hashed exactly as given (UTF-8). RFC 8489 asks for the OpaqueString profile
/// (RFC 8265) on the username and password, and RFC 5389 asked for SASLprep; neither is applied
/// here, so callers must pass already-prepared strings. For the ASCII names nearly every
/// deployment uses, preparation is the identity.
pub fn long_term_key_md5(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut hash = Md5::new();
    for part in [username, ":", realm, ":", password] {
        hash.update(part.as_bytes());
    }
    hash.finalize().into()
}

/// RFC 8489 §9.2.2 SHA-256 variant: `SHA-256(username ":" realm ":" password)`, the key for
/// MESSAGE-INTEGRITY-SHA256 when PASSWORD-ALGORITHM is SHA-256 (RFC 8489 §18.5.1.2).
///
/// As with [`long_term_key_md5`], no OpaqueString preparation is applied.
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [username, ":", realm, ":", password] {
        hash.update(part.as_bytes());
    }
    hash.finalize().into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha1::Sha1;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// RFC 5769 §2.4 username (マトリックス), realm and SASLprep'd password.
    const RFC5769_USERNAME: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    const RFC5769_REALM: &str = "example.org";
    const RFC5769_PASSWORD: &str = "TheMatrIX";

    #[test]
    fn md5_key_matches_rfc_5769_long_term_vector() {
        // python3: hashlib.md5("マトリックス:example.org:TheMatrIX".encode()).hexdigest()
        let key = long_term_key_md5(RFC5769_USERNAME, RFC5769_REALM, RFC5769_PASSWORD);
        assert_eq!(key.to_vec(), hex("e8ca7ad59d5eb0518e312911d2dab2a9"));

        // And it is the key the RFC 5769 §2.4 sample request is signed with: HMAC-SHA1 over
        // the message up to (not including) MESSAGE-INTEGRITY, whose header length already
        // counts MESSAGE-INTEGRITY (RFC 8489 §14.5), equals the published value.
        let signed = hex("00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
            00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
            00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46
                        53 54 76 79 36 34 73 41
            00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00");
        let mut mac = Hmac::<Sha1>::new_from_slice(&key).unwrap();
        mac.update(&signed);
        assert_eq!(
            mac.finalize().into_bytes().to_vec(),
            hex("f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66")
        );
    }

    #[test]
    fn md5_key_ascii_known_answer() {
        // python3: hashlib.md5(b"user:realm:pass").hexdigest()
        assert_eq!(
            long_term_key_md5("user", "realm", "pass").to_vec(),
            hex("8493fbc53ba582fb4c044c456bdc40eb")
        );
        // The separators are part of the input: moving a ':' changes the key.
        assert_ne!(
            long_term_key_md5("user", "realm", "pass"),
            long_term_key_md5("user:realm", "", "pass")
        );
    }

    #[test]
    fn sha256_key_known_answers() {
        // python3: hashlib.sha256("マトリックス:example.org:TheMatrIX".encode()).hexdigest()
        assert_eq!(
            long_term_key_sha256(RFC5769_USERNAME, RFC5769_REALM, RFC5769_PASSWORD).to_vec(),
            hex("dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1")
        );
        // python3: hashlib.sha256(b"user:realm:pass").hexdigest()
        assert_eq!(
            long_term_key_sha256("user", "realm", "pass").to_vec(),
            hex("07e934117abd40836e7c6329b54731b2b2d2a5f9a71f544922d75e0730d8251b")
        );
    }
}
