//! The cloud network-traversal API's request signing: HMAC-SHA256 over the method, the path and query,
//! the date, the host and the body's SHA-256, keyed with a base64 access key.
//!
//! ```text
//! x-ms-date:           Sun, 29 Nov 2026 13:51:07 GMT            (RFC 1123 / IMF-fixdate)
//! x-ms-content-sha256: base64(SHA-256(body))
//! Authorization:       HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=<sig>
//! sig = base64(HMAC-SHA256(base64-decoded key, "POST\n<path?query>\n<x-ms-date>;<host>;<content hash>"))
//! ```

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The only signed-header list the API accepts (the one the SDKs send).
pub const SIGNED_HEADERS: &str = "x-ms-date;host;x-ms-content-sha256";
/// How far `x-ms-date` may be from the server's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Why a request's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignError {
    /// A required header is missing.
    MissingHeader(&'static str),
    /// `x-ms-date` is not an RFC 1123 date.
    BadDate,
    /// `x-ms-date` is more than [`MAX_SKEW`] away from now.
    Skew,
    /// `x-ms-content-sha256` is not the body's hash.
    ContentHash,
    /// `Authorization` is not `HMAC-SHA256 SignedHeaders=...&Signature=...` with our header list.
    BadAuthorization,
    /// No access key produces the signature.
    Signature,
}

impl SignError {
    /// The message for the 401 body.
    pub fn message(self) -> &'static str {
        match self {
            SignError::MissingHeader("authorization") => "missing Authorization header",
            SignError::MissingHeader("x-ms-date") => "missing x-ms-date header",
            SignError::MissingHeader("host") => "missing Host header",
            SignError::MissingHeader(_) => "missing x-ms-content-sha256 header",
            SignError::BadDate => "x-ms-date is not an RFC 1123 date",
            SignError::Skew => "x-ms-date is more than 15 minutes away from the server's time",
            SignError::ContentHash => "x-ms-content-sha256 does not match the request body",
            SignError::BadAuthorization => {
                "Authorization must be HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=..."
            }
            SignError::Signature => "the request signature is not valid",
        }
    }
}

/// base64(SHA-256(body)).
pub fn content_hash(body: &[u8]) -> String {
    STANDARD.encode(Sha256::digest(body))
}

/// The string that is signed.
pub fn string_to_sign(
    method: &str,
    path_and_query: &str,
    date: &str,
    host: &str,
    hash: &str,
) -> String {
    format!("{method}\n{path_and_query}\n{date};{host};{hash}")
}

fn mac(key: &[u8], text: &str) -> Hmac<Sha256> {
    // RFC 2104: HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(text.as_bytes());
    m
}

/// The headers a client sends: (x-ms-date, x-ms-content-sha256, Authorization).
pub fn sign(
    key: &[u8],
    method: &str,
    path_and_query: &str,
    host: &str,
    body: &[u8],
    now: SystemTime,
) -> (String, String, String) {
    let date = httpdate::fmt_http_date(now);
    let hash = content_hash(body);
    let text = string_to_sign(method, path_and_query, &date, host, &hash);
    let sig = STANDARD.encode(mac(key, &text).finalize().into_bytes());
    let auth = format!("HMAC-SHA256 SignedHeaders={SIGNED_HEADERS}&Signature={sig}");
    (date, hash, auth)
}

/// The request as far as signing is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// Upper-case method.
    pub method: &'a str,
    /// The request target as sent (path and query).
    pub path_and_query: &'a str,
    /// `Host`.
    pub host: Option<&'a str>,
    /// `x-ms-date`.
    pub date: Option<&'a str>,
    /// `x-ms-content-sha256`.
    pub content_hash: Option<&'a str>,
    /// `Authorization`.
    pub authorization: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
}

/// A request whose signature checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The index of the key that signed it.
    pub key: usize,
    /// Its `x-ms-date`.
    pub date: SystemTime,
}

/// Verify a request against the access keys (any of them may have signed it, for rotation). The MAC is
/// compared in constant time.
pub fn verify<K: AsRef<[u8]>>(
    req: &Signed<'_>,
    keys: &[K],
    now: SystemTime,
) -> Result<Verified, SignError> {
    let authorization = req
        .authorization
        .ok_or(SignError::MissingHeader("authorization"))?;
    let date = req.date.ok_or(SignError::MissingHeader("x-ms-date"))?;
    let hash = req
        .content_hash
        .ok_or(SignError::MissingHeader("x-ms-content-sha256"))?;
    let host = req.host.ok_or(SignError::MissingHeader("host"))?;
    let when = httpdate::parse_http_date(date).map_err(|_| SignError::BadDate)?;
    let skew = match now.duration_since(when) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > MAX_SKEW {
        return Err(SignError::Skew);
    }
    if hash != content_hash(req.body) {
        return Err(SignError::ContentHash);
    }
    let rest = authorization
        .strip_prefix("HMAC-SHA256 ")
        .ok_or(SignError::BadAuthorization)?;
    let mut signed_headers = None;
    let mut signature = None;
    for part in rest.trim().split('&') {
        match part.split_once('=') {
            Some(("SignedHeaders", v)) => signed_headers = Some(v),
            // The signature is base64 and may end in '=': split at the first one only.
            Some(("Signature", v)) => signature = Some(v),
            _ => return Err(SignError::BadAuthorization),
        }
    }
    if !signed_headers.is_some_and(|h| h.eq_ignore_ascii_case(SIGNED_HEADERS)) {
        return Err(SignError::BadAuthorization);
    }
    let signature = signature
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or(SignError::BadAuthorization)?;
    let text = string_to_sign(req.method, req.path_and_query, date, host, hash);
    keys.iter()
        .position(|k| mac(k.as_ref(), &text).verify_slice(&signature).is_ok())
        .map(|key| Verified { key, date: when })
        .ok_or(SignError::Signature)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PATH: &str = "/networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview";

    #[test]
    fn known_answer_matches_the_sdk_algorithm() {
        // python3: base64.b64encode(hmac.new(b"key", b"POST\n/x?a=1\n"
        //   b"Sun, 06 Nov 1994 08:49:37 GMT;h:1;47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        //   hashlib.sha256).digest())
        let text = string_to_sign(
            "POST",
            "/x?a=1",
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "h:1",
            &content_hash(b""),
        );
        assert_eq!(
            content_hash(b""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        let sig = STANDARD.encode(mac(b"key", &text).finalize().into_bytes());
        assert_eq!(sig, "Pw3RRH8tePnYXBlJahbnVrY9v66bgzk238Q8+719Udo=");
    }

    #[test]
    fn sign_then_verify_and_every_refusal() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let keys = vec![b"old".to_vec(), b"k1".to_vec()];
        let body = br#"{"ttl":60}"#;
        let (date, hash, auth) = sign(b"k1", "POST", PATH, "127.0.0.1:8080", body, now);
        let req = Signed {
            method: "POST",
            path_and_query: PATH,
            host: Some("127.0.0.1:8080"),
            date: Some(&date),
            content_hash: Some(&hash),
            authorization: Some(&auth),
            body,
        };
        let signed_at = httpdate::parse_http_date(&date).unwrap();
        assert_eq!(
            verify(&req, &keys, now),
            Ok(Verified {
                key: 1,
                date: signed_at
            })
        );
        assert_eq!(
            verify(&req, &keys, now + Duration::from_secs(14 * 60)).map(|v| v.key),
            Ok(1)
        );
        assert_eq!(
            verify(&req, &keys, now + Duration::from_secs(16 * 60)),
            Err(SignError::Skew)
        );
        assert_eq!(
            verify(&req, &keys, now - Duration::from_secs(16 * 60)),
            Err(SignError::Skew)
        );
        assert_eq!(
            verify(&req, &[b"other".to_vec()], now),
            Err(SignError::Signature)
        );
        assert_eq!(
            verify(&Signed { body: b"{}", ..req }, &keys, now),
            Err(SignError::ContentHash)
        );
        let other_body_hash = content_hash(b"{}");
        assert_eq!(
            verify(
                &Signed {
                    body: b"{}",
                    content_hash: Some(&other_body_hash),
                    ..req
                },
                &keys,
                now
            ),
            Err(SignError::Signature),
            "the hash is signed"
        );
        assert_eq!(
            verify(
                &Signed {
                    host: Some("evil:1"),
                    ..req
                },
                &keys,
                now
            ),
            Err(SignError::Signature)
        );
        assert_eq!(
            verify(
                &Signed {
                    path_and_query: "/admin/revoke",
                    ..req
                },
                &keys,
                now
            ),
            Err(SignError::Signature)
        );
        assert_eq!(
            verify(
                &Signed {
                    date: Some("yesterday"),
                    ..req
                },
                &keys,
                now
            ),
            Err(SignError::BadDate)
        );
        assert_eq!(
            verify(
                &Signed {
                    authorization: Some("Bearer x"),
                    ..req
                },
                &keys,
                now
            ),
            Err(SignError::BadAuthorization)
        );
        assert_eq!(
            verify(
                &Signed {
                    authorization: None,
                    ..req
                },
                &keys,
                now
            ),
            Err(SignError::MissingHeader("authorization"))
        );
    }
}
