//! A blocking HTTPS client for the API's TLS tests: trust one test certificate, ask `/healthz`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A client that trusts only `ca` (a self-signed test certificate).
pub fn tls_client(ca: &rcgen::CertifiedKey) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// `GET /healthz` over TLS for `localhost` with `client`: the whole answer, or "" when the handshake fails.
pub fn tls_healthz(api: SocketAddr, client: Arc<rustls::ClientConfig>) -> String {
    use std::io::{Read, Write};
    let conn = rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
    let Ok(tcp) = std::net::TcpStream::connect(api) else {
        return String::new();
    };
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}
