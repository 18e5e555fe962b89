//! A small blocking TURN client over UDP for end-to-end tests, built on turnpike's own wire codec (the
//! interop tests use clients nobody here wrote).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use turnpike::auth::long_term_key_md5;
use turnpike::control::{self, RelayHandle, Settings};
use turnpike::dataplane::BackendKind;
use turnpike::policy::PeerPolicy;
use turnpike::server;
use turnpike::wire::{
    Attribute, ChannelData, Class, Message, MessageType, MessageWriter, Method, TransactionId,
};

pub mod http;
pub mod netns;
pub mod pg;
pub mod sdk;
pub mod tls;

/// A TCP port free on loopback at the time of the call.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait up to `within` until the relay `child` answers a Binding request on `server`; `false` if it
/// exited or never answered.
pub fn wait_binding(within: Duration, server: SocketAddr, child: &mut std::process::Child) -> bool {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[9u8; 12]);
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 512];
    while std::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let _ = s.send_to(&req, server);
        if s.recv_from(&mut buf).is_ok() {
            return true;
        }
    }
    false
}

/// A fresh, empty directory for one test: `$TMPDIR/turnpike-test-<name>-<pid>`.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub const REALM: &str = "turnpike";

/// Every backend that works on this machine; with `CI=true` io_uring must work.
pub fn backends() -> Vec<BackendKind> {
    let mut v = vec![BackendKind::Epoll];
    match turnpike::sys::uring::probe() {
        Ok(()) if turnpike::dataplane::uring::IMPLEMENTED => v.push(BackendKind::IoUring),
        Ok(()) => {}
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring unavailable in CI: {e}"
            );
            eprintln!("io_uring unavailable, testing epoll only: {e}");
        }
    }
    v
}

/// Settings for a loopback relay with a distinct relay port range per test (`base`..`base + 999`).
pub fn settings(backend: BackendKind, workers: usize, base: u16) -> Settings {
    Settings {
        server: server::Config {
            realm: REALM.into(),
            users: vec![
                ("alice".into(), "alice-pass".into()),
                ("bob".into(), "bob-pass".into()),
            ],
            rest_secrets: turnpike::auth::RestSecrets::new(vec![b"secret".to_vec()]),
            relay_ips: vec!["127.0.0.1".parse().unwrap()],
            relay_ports: base..=base + 999,
            peer_policy: PeerPolicy::new().with_allow(vec!["127.0.0.0/8".parse().unwrap()]),
            ..server::Config::default()
        },
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        workers,
        backend: Some(backend),
        recv_buffer: Some(4 << 20),
        send_buffer: Some(4 << 20),
        pin_workers: false,
        drain: Duration::from_millis(200),
        usage_sink: None,
        xdp: Default::default(),
        stream: Default::default(),
    }
}

pub fn start(s: Settings) -> RelayHandle {
    control::start(s).expect("relay starts")
}

pub struct Client {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub username: String,
    pub key: [u8; 16],
    pub nonce: Option<String>,
    tid: u64,
}

impl Client {
    pub fn new(server: SocketAddr, user: &str, password: &str) -> Self {
        Self::new_on("127.0.0.1", server, user, password)
    }

    /// A client whose socket is bound on `ip`.
    pub fn new_on(ip: &str, server: SocketAddr, user: &str, password: &str) -> Self {
        let sock = UdpSocket::bind((ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Client {
            sock,
            server,
            username: user.into(),
            key: long_term_key_md5(user, REALM, password),
            nonce: None,
            tid: 0,
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    fn next_tid(&mut self) -> TransactionId {
        self.tid += 1;
        let mut t = [7u8; 12];
        t[4..].copy_from_slice(&self.tid.to_be_bytes());
        TransactionId(t)
    }

    pub fn build(
        &mut self,
        method: Method,
        class: Class,
        attrs: &[Attribute<'_>],
        auth: bool,
    ) -> (TransactionId, Vec<u8>) {
        let tid = self.next_tid();
        let auth = auth.then(|| Credentials {
            username: &self.username,
            nonce: self.nonce.as_deref().unwrap_or(""),
            key: &self.key,
        });
        (tid, build_request(method, class, tid, attrs, auth))
    }

    /// Receive the next datagram from the server (skipping nothing).
    pub fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        let (n, from) = self
            .sock
            .recv_retry(&mut buf)
            .expect("a datagram from the relay");
        assert_eq!(
            from, self.server,
            "replies come from the address the client sent to"
        );
        buf.truncate(n);
        buf
    }

    /// Send a request and return the response with the same transaction id.
    pub fn transact(&mut self, method: Method, attrs: &[Attribute<'_>], auth: bool) -> Vec<u8> {
        let (tid, req) = self.build(method, Class::Request, attrs, auth);
        for _ in 0..3 {
            self.sock.send_to(&req, self.server).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < deadline {
                let mut buf = vec![0u8; 65536];
                let Ok((n, _)) = self.sock.recv_retry(&mut buf) else {
                    break;
                };
                buf.truncate(n);
                if let Ok(m) = Message::parse(&buf) {
                    if m.transaction_id() == tid {
                        return buf;
                    }
                }
            }
        }
        panic!("no response to {method:?}");
    }

    /// Request; on 401/438 take the nonce and retry once. Returns the final response.
    pub fn authed(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        let resp = self.transact(method, attrs, self.nonce.is_some());
        let m = Message::parse(&resp).unwrap();
        match m.attrs.error_code.map(|e| e.0) {
            Some(401 | 438) => {
                self.nonce = m.attrs.nonce.map(str::to_string);
                self.transact(method, attrs, true)
            }
            _ => resp,
        }
    }

    /// Allocate; returns the relayed address.
    pub fn allocate(&mut self) -> SocketAddr {
        let resp = self.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        let m = Message::parse(&resp).unwrap();
        assert_eq!(
            m.message_type().class,
            Class::Success,
            "allocate failed: {:?}",
            m.attrs.error_code
        );
        assert!(m.verify_integrity(&self.key));
        m.attrs.xor_relayed_address.unwrap()
    }

    pub fn expect_success(resp: &[u8]) {
        let m = Message::parse(resp).unwrap();
        assert_eq!(
            m.message_type().class,
            Class::Success,
            "{:?}",
            m.attrs.error_code
        );
    }

    pub fn error_code(resp: &[u8]) -> Option<u16> {
        Message::parse(resp).unwrap().attrs.error_code.map(|e| e.0)
    }

    pub fn permit(&mut self, peer: SocketAddr) {
        let r = self.authed(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        );
        Self::expect_success(&r);
    }

    pub fn bind(&mut self, channel: u16, peer: SocketAddr) {
        let r = self.authed(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
        );
        Self::expect_success(&r);
    }

    pub fn send_channel(&self, channel: u16, payload: &[u8]) {
        let mut buf = vec![0u8; 4 + payload.len()];
        buf[4..].copy_from_slice(payload);
        ChannelData::write_header(&mut buf, channel, payload.len()).unwrap();
        self.sock.send_to(&buf, self.server).unwrap();
    }

    pub fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) {
        let (_, msg) = self.build(
            Method::SEND,
            Class::Indication,
            &[Attribute::XorPeerAddress(peer), Attribute::Data(payload)],
            false,
        );
        self.sock.send_to(&msg, self.server).unwrap();
    }
}

/// The round of a fresh client `c` in the end-to-end tests: a Binding answered with the client's own
/// address, an Allocate, and data both ways with `peer` (`out` in a Send indication, `back` to the
/// relayed address, which arrives as a Data indication). Returns the relayed address; `what` names
/// the case in failures.
pub fn binding_allocate_and_relay(
    c: &mut Client,
    peer: &UdpSocket,
    (out, back): (&[u8], &[u8]),
    what: &str,
) -> SocketAddr {
    let binding = c.transact(Method::BINDING, &[], false);
    let m = Message::parse(&binding).unwrap();
    assert_eq!(m.attrs.xor_mapped_address, Some(c.local()), "{what}");
    let relayed = c.allocate();
    let peer_addr = peer.local_addr().unwrap();
    c.permit(peer_addr);
    c.send_indication(peer_addr, out);
    let mut buf = [0u8; 64];
    let (len, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..len], from), (out, relayed), "{what}");
    peer.send_to(back, relayed).unwrap();
    let m = c.recv();
    let m = Message::parse(&m).unwrap();
    assert_eq!(m.message_type().method, Method::DATA, "{what}");
    assert_eq!(m.attrs.data, Some(back), "{what}");
    relayed
}

/// A UDP peer.
pub fn peer() -> UdpSocket {
    // Not the relay IP 127.0.0.1: its relay port range is closed to peers (only live relayed addresses
    // are open there), and an ephemeral port could fall inside it.
    let s = UdpSocket::bind("127.0.0.2:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// A UDP peer on `ip`, on a port above every test's relay port range (those end at 61999) and above the
/// kernel's ephemeral range (32768–60999). A peer on the relay's own IP inside its relay port range is
/// denied unless it is a live relayed address, so an ephemeral port would make a test fail at random.
pub fn peer_on(ip: std::net::IpAddr) -> UdpSocket {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 62000;
    const PORTS: u16 = u16::MAX - FIRST + 1;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = (std::process::id() % u32::from(PORTS)) as u16;
    for _ in 0..PORTS {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + ((offset as u32 + k as u32) % u32::from(PORTS)) as u16;
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(ip, port)) {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            return s;
        }
    }
    panic!("no free UDP port for a peer on {ip}");
}

/// `recv_from` that retries when a signal interrupts it (EINTR), as a real client would.
pub trait RecvRetry {
    fn recv_retry(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)>;
}

impl RecvRetry for UdpSocket {
    fn recv_retry(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        loop {
            match self.recv_from(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

/// What an authenticated test request carries: USERNAME, REALM, NONCE and the key for MESSAGE-INTEGRITY.
pub struct Credentials<'a> {
    pub username: &'a str,
    pub nonce: &'a str,
    pub key: &'a [u8],
}

/// A STUN message of `method`/`class` with `attrs`, signed with long-term `auth` when given.
pub fn build_request(
    method: Method,
    class: Class,
    tid: TransactionId,
    attrs: &[Attribute<'_>],
    auth: Option<Credentials<'_>>,
) -> Vec<u8> {
    let mut buf = vec![0u8; 1500];
    let mut w = MessageWriter::new(&mut buf, MessageType::new(method, class), tid).unwrap();
    for a in attrs {
        w.add(a).unwrap();
    }
    if let Some(c) = auth {
        w.add(&Attribute::Username(c.username)).unwrap();
        w.add(&Attribute::Realm(REALM)).unwrap();
        w.add(&Attribute::Nonce(c.nonce)).unwrap();
        w.add_integrity(c.key).unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}
