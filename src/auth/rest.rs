//! TURN REST API credentials (draft-uberti-behave-turn-rest-00, as coturn's `use-auth-secret`
//! implements it).
//!
//! A web service that shares a secret with the relay hands a client a username
//! `"<unix-expiry>:<user-id>"` and the password `base64(HMAC-SHA1(secret, username))`. The relay
//! recomputes the password from the username, so it stores no per-user state; the password then
//! feeds the ordinary long-term key (RFC 8489 §9.2.2). Several secrets may be live at once so an
//! operator can rotate them: new credentials use the first, old ones still verify under the rest.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::fmt;

/// TURN REST API (draft-uberti-behave-turn-rest-00 §2.2, as coturn implements it): the password
/// for `username` is `base64(HMAC-SHA1(secret, username))`, standard alphabet with padding.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    // RFC 2104 §2: HMAC takes keys of any length (long ones are hashed first).
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Parses a REST username: `"<unix-expiry>"` or `"<unix-expiry>:<user-id>"`.
///
/// The user id may itself contain `':'`; the split is at the first one. Returns `None` unless the
/// expiry is a plain decimal `u64`: ASCII digits only (no sign, no spaces), 1 to 20 of them, and
/// no overflow.
pub fn parse_rest_username(username: &str) -> Option<RestUsername<'_>> {
    let (expiry, user) = username.split_once(':').unwrap_or((username, ""));
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits only, so the one remaining failure is overflow.
    let expiry = expiry.parse().ok()?;
    Some(RestUsername { expiry, user })
}

/// A parsed REST username, borrowing the user id from the username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestUsername<'a> {
    /// When the credential stops being valid, in Unix seconds (valid while `expiry >= now`).
    pub expiry: u64,
    /// The user id after the first `':'`; `""` when the username is only an expiry.
    pub user: &'a str,
}

/// The live REST API shared secrets, for rotation; the first is the current one used to mint.
#[derive(Clone)]
pub struct RestSecrets {
    secrets: Vec<Vec<u8>>,
    max_ttl: u64,
}

/// The default longest credential lifetime the relay accepts (`[rest] max_ttl_seconds`): 48 hours, as
/// in the cloud API.
pub const DEFAULT_MAX_TTL: u64 = 172_800;
/// How far a credential's expiry may lie beyond now + the maximum TTL (clocks of minter and relay
/// differ): 5 minutes.
pub const EXPIRY_SKEW: u64 = 300;

impl RestSecrets {
    /// Wraps the live secrets, current one first, then older ones still accepted; credentials may
    /// live at most [`DEFAULT_MAX_TTL`].
    pub fn new(secrets: Vec<Vec<u8>>) -> Self {
        Self {
            secrets,
            max_ttl: DEFAULT_MAX_TTL,
        }
    }

    /// The same secrets with a longest credential lifetime of `max_ttl` seconds.
    pub fn with_max_ttl(self, max_ttl: u64) -> Self {
        Self { max_ttl, ..self }
    }

    /// The longest lifetime a credential may have: [`RestSecrets::passwords`] refuses an expiry beyond
    /// now + this + [`EXPIRY_SKEW`], and nothing should be minted beyond it.
    pub fn max_ttl(&self) -> u64 {
        self.max_ttl
    }

    /// Whether there is no secret at all (REST authentication is then off).
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Mints credentials for `user_id` valid until `unix_now + ttl` (saturating): username
    /// `"<expiry>:<user_id>"`, password [`rest_password`] under the current (first) secret.
    /// Returns `None` when there is no secret.
    pub fn mint(&self, user_id: &str, unix_now: u64, ttl: u64) -> Option<RestCredential> {
        let secret = self.secrets.first()?;
        let expiry = unix_now.saturating_add(ttl);
        let username = format!("{expiry}:{user_id}");
        let password = rest_password(secret, &username);
        Some(RestCredential {
            username,
            password,
            expiry,
        })
    }

    /// The candidate passwords for `username`, one per live secret, in order (computed lazily).
    ///
    /// The server derives the long-term key (RFC 8489 §9.2.2) of each and accepts the request if
    /// any of them verifies its MESSAGE-INTEGRITY. Fails with [`RestError::Malformed`] if the
    /// username is not REST-shaped, [`RestError::Expired`] if `expiry < unix_now` (a credential
    /// is still valid in its expiry second), and [`RestError::BeyondMaxTtl`] if its expiry lies beyond
    /// `unix_now` + the maximum TTL + [`EXPIRY_SKEW`] (so that a revocation horizon of now + max TTL
    /// covers every credential still accepted).
    pub fn passwords(
        &self,
        username: &str,
        unix_now: u64,
    ) -> Result<impl Iterator<Item = String> + '_, RestError> {
        let parsed = parse_rest_username(username).ok_or(RestError::Malformed)?;
        if parsed.expiry < unix_now {
            return Err(RestError::Expired);
        }
        if parsed.expiry
            > unix_now
                .saturating_add(self.max_ttl)
                .saturating_add(EXPIRY_SKEW)
        {
            return Err(RestError::BeyondMaxTtl);
        }
        // Owned, so that the iterator borrows only `self`.
        let username = username.to_owned();
        Ok(self
            .secrets
            .iter()
            .map(move |secret| rest_password(secret, &username)))
    }
}

impl fmt::Debug for RestSecrets {
    /// Shows how many secrets there are, never their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestSecrets")
            .field("count", &self.secrets.len())
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

/// Credentials minted by [`RestSecrets::mint`], for handing to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestCredential {
    /// `"<expiry>:<user_id>"`.
    pub username: String,
    /// `base64(HMAC-SHA1(current secret, username))`.
    pub password: String,
    /// When the credential stops being valid, in Unix seconds.
    pub expiry: u64,
}

/// Why a REST username was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestError {
    /// The username does not start with a plain decimal expiry.
    Malformed,
    /// The expiry is in the past.
    Expired,
    /// The expiry lies beyond now + the maximum TTL (+ skew).
    BeyondMaxTtl,
}

impl RestError {
    /// A short static description, for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed REST username",
            Self::Expired => "expired REST credential",
            Self::BeyondMaxTtl => "REST credential outlives the maximum TTL",
        }
    }
}

impl fmt::Display for RestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for RestError {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // python3: base64.b64encode(hmac.new(b"north", b"1700000000:alice", hashlib.sha1).digest())
    const NORTH_ALICE: &str = "Cd/49soE35ICqcJF/bCTn8Z4OyE=";
    // python3: base64.b64encode(hmac.new(b"south", b"1700000000:alice", hashlib.sha1).digest())
    const SOUTH_ALICE: &str = "FJeNoC0yJtNekwCa5JT/sW/1Ls4=";

    #[test]
    fn rest_password_known_answer() {
        assert_eq!(rest_password(b"north", "1700000000:alice"), NORTH_ALICE);
        assert_eq!(rest_password(b"south", "1700000000:alice"), SOUTH_ALICE);
    }

    #[test]
    fn parses_expiry_with_and_without_user() {
        assert_eq!(
            parse_rest_username("1700000000:alice"),
            Some(RestUsername {
                expiry: 1_700_000_000,
                user: "alice"
            })
        );
        assert_eq!(
            parse_rest_username("1700000000"),
            Some(RestUsername {
                expiry: 1_700_000_000,
                user: ""
            })
        );
        assert_eq!(
            parse_rest_username("0:"),
            Some(RestUsername {
                expiry: 0,
                user: ""
            })
        );
        // The split is at the first ':'; the rest belongs to the user id.
        assert_eq!(
            parse_rest_username("12:urn:user:bob"),
            Some(RestUsername {
                expiry: 12,
                user: "urn:user:bob"
            })
        );
        assert_eq!(
            parse_rest_username("18446744073709551615:x"),
            Some(RestUsername {
                expiry: u64::MAX,
                user: "x"
            })
        );
    }

    #[test]
    fn rejects_expiries_that_are_not_plain_decimal_u64() {
        for bad in [
            "",
            ":x",
            "abc:x",
            "-1:x",
            " 12:x",
            "12 :x",
            "+12:x",
            "0x12:x",
            "１２:x",                  // full-width digits are not ASCII digits
            "18446744073709551616:x",  // u64::MAX + 1
            "99999999999999999999:x",  // 20 digits, overflows
            "000000000000000000012:x", // 21 digits
        ] {
            assert_eq!(parse_rest_username(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mint_uses_the_first_secret() {
        let secrets = RestSecrets::new(vec![b"north".to_vec(), b"south".to_vec()]);
        let credential = secrets.mint("alice", 1_699_999_000, 1_000).unwrap();
        assert_eq!(
            credential,
            RestCredential {
                username: "1700000000:alice".into(),
                password: NORTH_ALICE.into(),
                expiry: 1_700_000_000,
            }
        );
        assert_eq!(RestSecrets::new(Vec::new()).mint("alice", 0, 60), None);
        assert!(RestSecrets::new(Vec::new()).is_empty());
        assert!(!secrets.is_empty());
    }

    #[test]
    fn expiry_boundary_is_inclusive() {
        let secrets = RestSecrets::new(vec![b"north".to_vec()]);
        let at = |now| {
            secrets
                .passwords("1700000000:alice", now)
                .map(|p| p.collect::<Vec<_>>())
        };
        assert_eq!(at(1_699_999_999), Ok(vec![NORTH_ALICE.to_string()]));
        assert_eq!(at(1_700_000_000), Ok(vec![NORTH_ALICE.to_string()]));
        assert_eq!(at(1_700_000_001).err(), Some(RestError::Expired));
    }

    #[test]
    fn rotation_yields_one_password_per_secret_in_order() {
        // Alice got her credential while "south" was current; "north" has since been added in
        // front of it. Her password must be among the candidates, in second place.
        let old = RestSecrets::new(vec![b"south".to_vec()]);
        let issued = old.mint("alice", 1_699_999_000, 1_000).unwrap();

        let rotated = RestSecrets::new(vec![b"north".to_vec(), b"south".to_vec()]);
        let candidates: Vec<String> = rotated
            .passwords(&issued.username, 1_699_999_500)
            .unwrap()
            .collect();
        assert_eq!(candidates, [NORTH_ALICE, SOUTH_ALICE]);
        assert_eq!(candidates[1], issued.password);
    }

    #[test]
    fn malformed_usernames_are_refused() {
        let secrets = RestSecrets::new(vec![b"north".to_vec()]);
        for bad in ["alice", "", "-5:alice", "alice:1700000000"] {
            assert_eq!(
                secrets.passwords(bad, 0).err(),
                Some(RestError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(RestError::Malformed.as_str(), "malformed REST username");
        assert_eq!(RestError::Expired.to_string(), "expired REST credential");
    }

    #[test]
    fn debug_does_not_show_secrets() {
        let secrets = RestSecrets::new(vec![b"hunter2-hunter2".to_vec()]);
        let shown = format!("{secrets:?}");
        assert_eq!(shown, "RestSecrets { count: 1, max_ttl: 172800, .. }");
        assert!(!shown.contains("hunter2") && !shown.contains("104"));
    }

    #[test]
    fn expiries_beyond_the_maximum_ttl_and_skew_are_refused() {
        let s = RestSecrets::new(vec![b"k".to_vec()]).with_max_ttl(3600);
        let now = 1_700_000_000;
        assert!(s.passwords(&format!("{}:a", now + 3600 + 300), now).is_ok());
        assert_eq!(
            s.passwords(&format!("{}:a", now + 3600 + 301), now).err(),
            Some(RestError::BeyondMaxTtl)
        );
        assert_eq!(RestSecrets::new(vec![]).max_ttl(), DEFAULT_MAX_TTL);
    }
}
