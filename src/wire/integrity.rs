//! A long-term key ready to sign and check MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// A key for MESSAGE-INTEGRITY (HMAC-SHA1) or MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.5, §14.6), with
/// its HMAC key schedule (the inner and outer padded key blocks) already hashed. Checking a request
/// and signing its response each start from a copy of this state, not from the key bytes.
#[derive(Clone)]
pub enum IntegrityKey {
    /// MESSAGE-INTEGRITY.
    Sha1(Hmac<Sha1>),
    /// MESSAGE-INTEGRITY-SHA256.
    Sha256(Hmac<Sha256>),
}

impl IntegrityKey {
    /// `key` (the long-term key, RFC 8489 §9.2.2) for MESSAGE-INTEGRITY-SHA256 when `sha256`, else for
    /// MESSAGE-INTEGRITY.
    pub fn new(key: &[u8], sha256: bool) -> Self {
        // HMAC takes keys of any length (a longer one is hashed first): `new_from_slice` never fails.
        if sha256 {
            Self::Sha256(Hmac::new_from_slice(key).expect("HMAC takes keys of any length"))
        } else {
            Self::Sha1(Hmac::new_from_slice(key).expect("HMAC takes keys of any length"))
        }
    }
}

impl core::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Sha1(_) => "IntegrityKey::Sha1(..)",
            Self::Sha256(_) => "IntegrityKey::Sha256(..)",
        })
    }
}
