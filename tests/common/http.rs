//! HTTP requests to the token API as its clients make them: signed with an access key
//! (`turnpike::api::sign`), or raw bytes on a fresh connection. Shared by the API and fleet tests.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use turnpike::api::sign;

/// An access key from its base64 form (as the configuration lists it).
pub fn key_of(b64: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// A GET of `url` at `api`, signed with `key` now: the JSON answer.
pub fn signed_get(api: SocketAddr, key: &[u8], url: &str) -> serde_json::Value {
    let host = api.to_string();
    let (date, hash, auth) = sign::sign(key, "GET", url, &host, b"", SystemTime::now());
    ureq::get(&format!("http://{host}{url}"))
        .set("x-ms-date", &date)
        .set("x-ms-content-sha256", &hash)
        .set("Authorization", &auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// A POST of the JSON `body` to `url` at `api`, signed with `key` at `at`: the JSON answer or the
/// status code.
pub fn signed_post_at(
    api: SocketAddr,
    key: &[u8],
    url: &str,
    body: &str,
    at: SystemTime,
) -> Result<serde_json::Value, u16> {
    let host = api.to_string();
    let (date, hash, auth) = sign::sign(key, "POST", url, &host, body.as_bytes(), at);
    match ureq::post(&format!("http://{host}{url}"))
        .set("x-ms-date", &date)
        .set("x-ms-content-sha256", &hash)
        .set("Authorization", &auth)
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => Ok(r.into_json().unwrap()),
        Err(ureq::Error::Status(code, _)) => Err(code),
        Err(e) => panic!("{e}"),
    }
}

/// Send `req` on a fresh connection to `addr` and read the answer: (status, body); status 0 when
/// nothing listens or the server closed without answering.
pub fn raw(addr: SocketAddr, req: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}
