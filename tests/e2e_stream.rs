//! End-to-end TURN over TCP and TLS (RFC 8656 §3.1), on every backend: the relay runs in-process with a
//! self-signed certificate made here (rcgen); clients are blocking TCP or rustls streams framed with
//! turnpike's own framer, peers are UDP sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use turnpike::auth::long_term_key_md5;
use turnpike::control::{RelayHandle, Settings};
use turnpike::dataplane::framing::Framer;
use turnpike::dataplane::stream::tls_config;
use turnpike::dataplane::{BackendKind, Drop};
use turnpike::wire::{Attribute, ChannelData, ChannelRange, Class, Message, Method, TransactionId};

/// A self-signed certificate for "localhost": (cert PEM, key PEM, cert DER).
fn cert() -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    (
        c.cert.pem(),
        c.key_pair.serialize_pem(),
        c.cert.der().to_vec(),
    )
}

fn stream_settings(backend: BackendKind, base: u16, cert_pem: &str, key_pem: &str) -> Settings {
    let mut s = settings(backend, 2, base);
    s.stream.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()];
    s.stream.listen_tls = vec!["127.0.0.1:0".parse().unwrap()];
    s.stream.tls = Some(tls_config(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap());
    s
}

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tr {
    Tcp,
    Tls,
}

struct StreamClient {
    conn: Box<dyn Conn>,
    framer: Framer,
    key: [u8; 16],
    username: String,
    nonce: Option<String>,
    tid: u64,
    /// Messages read while waiting for a response.
    stash: std::collections::VecDeque<Vec<u8>>,
}

/// TLS versions the test clients offer (one at a time, to test both).
static TLS_VERSION: std::sync::Mutex<Option<&'static rustls::SupportedProtocolVersion>> =
    std::sync::Mutex::new(None);

fn tls_client(der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.to_vec().into()).unwrap();
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        match *TLS_VERSION.lock().unwrap() {
            Some(v) => vec![v],
            None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
        };
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

impl StreamClient {
    fn connect(relay: &RelayHandle, tr: Tr, der: &[u8], user: &str, password: &str) -> Self {
        let addr = match tr {
            Tr::Tcp => relay.tcp_addrs()[0],
            Tr::Tls => relay.tls_addrs()[0],
        };
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        sock.set_nodelay(true).unwrap();
        let conn: Box<dyn Conn> = match tr {
            Tr::Tcp => Box::new(sock),
            Tr::Tls => {
                let c =
                    rustls::ClientConnection::new(tls_client(der), "localhost".try_into().unwrap())
                        .unwrap();
                Box::new(rustls::StreamOwned::new(c, sock))
            }
        };
        StreamClient {
            conn,
            framer: Framer::new(ChannelRange::Rfc8656),
            key: long_term_key_md5(user, REALM, password),
            username: user.into(),
            nonce: None,
            tid: 0,
            stash: Default::default(),
        }
    }

    fn build(
        &mut self,
        method: Method,
        class: Class,
        attrs: &[Attribute<'_>],
        auth: bool,
    ) -> (TransactionId, Vec<u8>) {
        self.tid += 1;
        let mut t = [9u8; 12];
        t[4..].copy_from_slice(&self.tid.to_be_bytes());
        let tid = TransactionId(t);
        let auth = auth.then(|| Credentials {
            username: &self.username,
            nonce: self.nonce.as_deref().unwrap_or(""),
            key: &self.key,
        });
        (tid, build_request(method, class, tid, attrs, auth))
    }

    /// The next message from the relay (ChannelData without its padding).
    fn read_msg(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(m) = self
                .framer
                .next_frame()
                .expect("the relay frames correctly")
            {
                return Ok(m.to_vec());
            }
            let n = self.conn.read(self.framer.spare())?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.framer.filled(n);
        }
    }

    fn recv(&mut self) -> Vec<u8> {
        match self.stash.pop_front() {
            Some(m) => m,
            None => self.read_msg().expect("a message from the relay"),
        }
    }

    fn transact(&mut self, method: Method, attrs: &[Attribute<'_>], auth: bool) -> Vec<u8> {
        let (tid, req) = self.build(method, Class::Request, attrs, auth);
        self.conn.write_all(&req).unwrap();
        self.conn.flush().unwrap();
        loop {
            let m = self.read_msg().expect("a response");
            if Message::parse(&m).is_ok_and(|p| p.transaction_id() == tid) {
                return m;
            }
            self.stash.push_back(m);
        }
    }

    fn authed(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
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

    fn try_allocate(&mut self) -> Result<SocketAddr, Option<u16>> {
        let resp = self.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        let m = Message::parse(&resp).unwrap();
        if m.message_type().class != Class::Success {
            return Err(m.attrs.error_code.map(|e| e.0));
        }
        assert!(m.verify_integrity(&self.key));
        Ok(m.attrs.xor_relayed_address.unwrap())
    }

    fn allocate(&mut self) -> SocketAddr {
        self.try_allocate().expect("allocate succeeds")
    }

    fn bind(&mut self, channel: u16, peer: SocketAddr) {
        let r = self.authed(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
        );
        Client::expect_success(&r);
    }

    fn permit(&mut self, peer: SocketAddr) {
        let r = self.authed(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        );
        Client::expect_success(&r);
    }

    /// ChannelData, padded to 4 bytes as streams require.
    fn send_channel(&mut self, channel: u16, payload: &[u8]) {
        let mut buf = vec![0u8; 4 + payload.len()];
        buf[4..].copy_from_slice(payload);
        ChannelData::write_header(&mut buf, channel, payload.len()).unwrap();
        buf.resize((buf.len() + 3) & !3, 0);
        self.conn.write_all(&buf).unwrap();
        self.conn.flush().unwrap();
    }

    fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) {
        let (_, msg) = self.build(
            Method::SEND,
            Class::Indication,
            &[Attribute::XorPeerAddress(peer), Attribute::Data(payload)],
            false,
        );
        self.conn.write_all(&msg).unwrap();
        self.conn.flush().unwrap();
    }

    /// Whether the relay closed the connection within `within`.
    fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.read_msg() {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return true,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true, // reset
                Ok(_) => {}
            }
        }
        false
    }
}

fn stream_drops(relay: &RelayHandle) -> u64 {
    relay
        .worker_stats()
        .iter()
        .map(|s| s.drops(Drop::StreamQueueFull))
        .sum()
}

/// Channel data both ways, byte-exact, with every padding length.
fn relay_both_ways(c: &mut StreamClient, p: &UdpSocket, relayed: SocketAddr, what: &str) {
    let mut buf = vec![0u8; 65536];
    for k in 0..40u16 {
        let payload: Vec<u8> = (0..1 + k * 37).map(|i| (i ^ k) as u8).collect();
        c.send_channel(0x4000, &payload);
        let (n, from) = p.recv_retry(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&payload[..], relayed),
            "{what}: to peer"
        );
        p.send_to(&payload, relayed).unwrap();
        let back = c.recv();
        let cd = ChannelData::parse(&back).unwrap();
        assert_eq!(
            (cd.channel(), cd.payload()),
            (0x4000, &payload[..]),
            "{what}: to client"
        );
    }
}

#[test]
fn tcp_and_tls_allocate_bind_and_relay_both_ways() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = common::start(stream_settings(
            backend,
            40000 + 1000 * i as u16,
            &cert_pem,
            &key_pem,
        ));
        for tr in [Tr::Tcp, Tr::Tls] {
            let what = format!("{backend:?}/{tr:?}");
            let mut c = StreamClient::connect(&relay, tr, &der, "alice", "alice-pass");
            // Binding: XOR-MAPPED-ADDRESS is the TCP source.
            let resp = c.transact(Method::BINDING, &[], false);
            assert!(Message::parse(&resp)
                .unwrap()
                .attrs
                .xor_mapped_address
                .is_some());

            let relayed = c.allocate();
            let p = peer();
            let pa = p.local_addr().unwrap();
            c.permit(pa);
            c.send_indication(pa, b"via send");
            let mut buf = vec![0u8; 65536];
            let (n, from) = p.recv_retry(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"via send"[..], relayed), "{what}");
            // Odd lengths: the Data indication is padded, so what follows still frames.
            p.send_to(b"back as data!", relayed).unwrap();
            let d = c.recv();
            let m = Message::parse(&d).unwrap();
            assert_eq!(
                (m.message_type().method, m.attrs.data),
                (Method::DATA, Some(&b"back as data!"[..]))
            );

            c.bind(0x4000, pa);
            relay_both_ways(&mut c, &p, relayed, &what);
            // A frame near the 0xFFFF limit, client → peer.
            let big: Vec<u8> = (0..65_000u32).map(|i| i as u8).collect();
            c.send_channel(0x4000, &big);
            let (n, _) = p.recv_retry(&mut buf).unwrap();
            assert_eq!(&buf[..n], &big[..], "{what}: big frame");
            // Several messages in one write.
            let mut batch = Vec::new();
            for k in 0..5u8 {
                let mut m = vec![0x40, 0x00, 0, 1 + k];
                m.extend(std::iter::repeat(k).take(usize::from(1 + k)));
                m.resize((m.len() + 3) & !3, 0);
                batch.extend(m);
            }
            c.conn.write_all(&batch).unwrap();
            c.conn.flush().unwrap();
            for k in 0..5u8 {
                let (n, _) = p.recv_retry(&mut buf).unwrap();
                assert_eq!(
                    &buf[..n],
                    &vec![k; usize::from(1 + k)][..],
                    "{what}: batched"
                );
            }
        }
        relay.stop().unwrap();
    }
}

#[test]
fn closing_the_connection_frees_the_allocation() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = stream_settings(backend, 42000 + 1000 * i as u16, &cert_pem, &key_pem);
        // One relay port only: a second allocation needs the first one gone.
        let base = *s.server.relay_ports.start();
        s.server.relay_ports = base..=base;
        let relay = common::start(s);
        for tr in [Tr::Tcp, Tr::Tls] {
            let mut a = StreamClient::connect(&relay, tr, &der, "alice", "alice-pass");
            a.allocate();
            let mut b = StreamClient::connect(&relay, tr, &der, "bob", "bob-pass");
            assert_eq!(
                b.try_allocate(),
                Err(Some(508)),
                "{backend:?}/{tr:?}: the port is taken"
            );
            drop(a);
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                match b.try_allocate() {
                    Ok(_) => break,
                    Err(e) => assert!(
                        Instant::now() < deadline,
                        "{backend:?}/{tr:?}: still taken: {e:?}"
                    ),
                }
            }
        }
        relay.stop().unwrap();
    }
}

#[test]
fn a_slow_reader_drops_and_others_keep_relaying() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = stream_settings(backend, 44000 + 1000 * i as u16, &cert_pem, &key_pem);
        s.stream.limits.write_queue = 64 * 1024;
        let relay = common::start(s);
        for tr in [Tr::Tcp, Tr::Tls] {
            let what = format!("{backend:?}/{tr:?}");
            let mut slow = StreamClient::connect(&relay, tr, &der, "alice", "alice-pass");
            let slow_relayed = slow.allocate();
            let flood = peer();
            slow.bind(0x4000, flood.local_addr().unwrap());
            let mut fast = StreamClient::connect(&relay, tr, &der, "bob", "bob-pass");
            let relayed = fast.allocate();
            let p = peer();
            fast.bind(0x4000, p.local_addr().unwrap());
            let before = stream_drops(&relay);
            // The slow client never reads: its socket buffers and then its queue fill up.
            let payload = vec![0xAB; 1200];
            for _ in 0..20_000 {
                let _ = flood.send_to(&payload, slow_relayed);
            }
            relay_both_ways(&mut fast, &p, relayed, &what);
            let deadline = Instant::now() + Duration::from_secs(3);
            while stream_drops(&relay) == before {
                assert!(
                    Instant::now() < deadline,
                    "{what}: no drop counted for the slow reader"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        relay.stop().unwrap();
    }
}

#[test]
fn a_malformed_frame_closes_that_connection_only() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = common::start(stream_settings(
            backend,
            46000 + 1000 * i as u16,
            &cert_pem,
            &key_pem,
        ));
        for tr in [Tr::Tcp, Tr::Tls] {
            let mut good = StreamClient::connect(&relay, tr, &der, "alice", "alice-pass");
            good.allocate();
            let mut bad = StreamClient::connect(&relay, tr, &der, "bob", "bob-pass");
            bad.transact(Method::BINDING, &[], false);
            bad.conn.write_all(&[0xFF; 16]).unwrap();
            bad.conn.flush().unwrap();
            assert!(
                bad.closed_within(Duration::from_secs(3)),
                "{backend:?}/{tr:?}"
            );
            let resp = good.transact(Method::BINDING, &[], false);
            Client::expect_success(&resp);
        }
        relay.stop().unwrap();
    }
}

#[test]
fn certificate_reload_keeps_sessions() {
    let (cert1, key1, der1) = cert();
    let (cert2, key2, der2) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = common::start(stream_settings(
            backend,
            48000 + 1000 * i as u16,
            &cert1,
            &key1,
        ));
        let mut old = StreamClient::connect(&relay, Tr::Tls, &der1, "alice", "alice-pass");
        let relayed = old.allocate();
        let p = peer();
        old.bind(0x4000, p.local_addr().unwrap());

        relay
            .streams()
            .set_tls(tls_config(cert2.as_bytes(), key2.as_bytes()).unwrap());
        // New connections get the new certificate: trusting only it works…
        let mut new = StreamClient::connect(&relay, Tr::Tls, &der2, "bob", "bob-pass");
        new.allocate();
        // …and trusting only the old one fails.
        let mut stale = StreamClient::connect(&relay, Tr::Tls, &der1, "bob", "bob-pass");
        let (_, req) = stale.build(Method::BINDING, Class::Request, &[], false);
        assert!(
            stale
                .conn
                .write_all(&req)
                .and_then(|_| stale.conn.flush())
                .is_err()
                || stale.read_msg().is_err()
        );
        // The established session still relays.
        relay_both_ways(&mut old, &p, relayed, &format!("{backend:?} after reload"));
        relay.stop().unwrap();
    }
}

#[test]
fn limits_and_timeouts() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = stream_settings(backend, 50000 + 1000 * i as u16, &cert_pem, &key_pem);
        s.stream.limits.max_per_ip = 3;
        s.stream.limits.idle_timeout = Duration::from_millis(800);
        s.stream.limits.tls_handshake_timeout = Duration::from_millis(800);
        let relay = common::start(s);
        let what = format!("{backend:?}");
        // One with an allocation (stays), one idle (closed), one TLS that never handshakes (closed).
        let mut busy = StreamClient::connect(&relay, Tr::Tcp, &der, "alice", "alice-pass");
        busy.allocate();
        let mut idle = StreamClient::connect(&relay, Tr::Tcp, &der, "bob", "bob-pass");
        idle.transact(Method::BINDING, &[], false);
        let mut mute = TcpStream::connect(relay.tls_addrs()[0]).unwrap();
        mute.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        // A fourth from the same IP is over the limit: closed at once.
        let mut over = TcpStream::connect(relay.tcp_addrs()[0]).unwrap();
        over.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 64];
        assert!(
            matches!(over.read(&mut b), Ok(0) | Err(_)),
            "{what}: per-IP limit"
        );

        assert!(
            idle.closed_within(Duration::from_secs(4)),
            "{what}: idle timeout"
        );
        assert!(
            matches!(mute.read(&mut b), Ok(0)),
            "{what}: TLS handshake timeout"
        );
        Client::expect_success(&busy.transact(Method::BINDING, &[], false));
        relay.stop().unwrap();
    }
}

#[test]
fn ipv6_listeners_and_dual_stack_allocations_relay_to_both_families() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = stream_settings(backend, 56000 + 1000 * i as u16, &cert_pem, &key_pem);
        s.stream.listen_tcp = vec!["[::1]:0".parse().unwrap()];
        s.stream.listen_tls = vec!["[::1]:0".parse().unwrap()];
        s.server.relay_ips = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        s.server.peer_policy = turnpike::policy::PeerPolicy::new().with_allow(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        let relay = common::start(s);
        for tr in [Tr::Tcp, Tr::Tls] {
            let what = format!("{backend:?}/{tr:?}/IPv6");
            let mut c = StreamClient::connect(&relay, tr, &der, "alice", "alice-pass");
            let resp = c.transact(Method::BINDING, &[], false);
            let mapped = Message::parse(&resp)
                .unwrap()
                .attrs
                .xor_mapped_address
                .unwrap();
            assert!(mapped.is_ipv6(), "{what}: {mapped}");
            // RFC 8656 §7.1 / RFC 6156: an IPv4 relayed address plus an IPv6 one (ADDITIONAL-ADDRESS-FAMILY).
            let resp = c.authed(
                Method::ALLOCATE,
                &[
                    Attribute::RequestedTransport(17),
                    Attribute::AdditionalAddressFamily(turnpike::wire::family::IPV6),
                ],
            );
            let m = Message::parse(&resp).unwrap();
            assert_eq!(
                m.message_type().class,
                Class::Success,
                "{what}: {:?}",
                m.attrs.error_code
            );
            let relayed: Vec<SocketAddr> = m
                .attributes()
                .filter_map(|a| match a {
                    Attribute::XorRelayedAddress(r) => Some(r),
                    _ => None,
                })
                .collect();
            let v4 = *relayed
                .iter()
                .find(|a| a.is_ipv4())
                .expect("an IPv4 relayed address");
            let v6 = *relayed
                .iter()
                .find(|a| a.is_ipv6())
                .expect("an IPv6 relayed address");
            let p4 = peer();
            let p6 = peer_on("::1".parse().unwrap());
            p6.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            c.bind(0x4000, p4.local_addr().unwrap());
            c.bind(0x4001, p6.local_addr().unwrap());
            let mut buf = vec![0u8; 2048];
            for (ch, p, relayed) in [(0x4000u16, &p4, v4), (0x4001, &p6, v6)] {
                for k in 0..10u8 {
                    let payload = vec![k; 3 + usize::from(k)];
                    c.send_channel(ch, &payload);
                    let (n, from) = p.recv_retry(&mut buf).unwrap();
                    assert_eq!((&buf[..n], from), (&payload[..], relayed), "{what}");
                    p.send_to(&payload, relayed).unwrap();
                    let back = c.recv();
                    let cd = ChannelData::parse(&back).unwrap();
                    assert_eq!((cd.channel(), cd.payload()), (ch, &payload[..]), "{what}");
                }
            }
        }
        relay.stop().unwrap();
    }
}

/// A quick measurement, not a pass/fail test: round-trip latency (sequential) and delivered packets/s
/// (64 in flight) through the relay with an echo peer, over UDP, TCP and TLS. Run with
/// `cargo test --release --test e2e_stream -- --ignored --nocapture measure`.
#[test]
#[ignore]
fn measure_udp_tcp_tls() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = common::start(stream_settings(
            backend,
            58000 + 500 * i as u16,
            &cert_pem,
            &key_pem,
        ));
        let echo = peer();
        echo.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let pa = echo.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let echo_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        });
        let payload = vec![0x5Au8; 100];
        for name in ["udp", "tcp", "tls"] {
            let mut send: Box<dyn FnMut()>;
            let mut recv: Box<dyn FnMut() -> bool>;
            if name == "udp" {
                let mut c = Client::new(relay.listen_addrs()[0], "alice", "alice-pass");
                c.allocate();
                c.bind(0x4000, pa);
                c.sock
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let c = Arc::new(c);
                let (c1, c2, p) = (c.clone(), c, payload.clone());
                send = Box::new(move || c1.send_channel(0x4000, &p));
                recv = Box::new(move || {
                    let mut b = [0u8; 2048];
                    c2.sock.recv_from(&mut b).is_ok()
                });
            } else {
                let tr = if name == "tcp" { Tr::Tcp } else { Tr::Tls };
                let mut c = StreamClient::connect(&relay, tr, &der, "alice", "alice-pass");
                c.allocate();
                c.bind(0x4000, pa);
                let c = Arc::new(std::sync::Mutex::new(c));
                let (c1, c2, p) = (c.clone(), c, payload.clone());
                send = Box::new(move || c1.lock().unwrap().send_channel(0x4000, &p));
                recv = Box::new(move || c2.lock().unwrap().read_msg().is_ok());
            }
            let mut rtts = Vec::with_capacity(5000);
            for _ in 0..5000 {
                let t = Instant::now();
                send();
                if recv() {
                    rtts.push(t.elapsed());
                }
            }
            rtts.sort();
            let (p50, p99) = (rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100]);
            let (mut delivered, mut in_flight, mut lost) = (0u64, 0u32, 0u64);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                while in_flight < 64 {
                    send();
                    in_flight += 1;
                }
                if recv() {
                    delivered += 1;
                    in_flight -= 1;
                } else {
                    lost += u64::from(in_flight);
                    in_flight = 0;
                }
            }
            let pps = delivered as f64 / t.elapsed().as_secs_f64();
            eprintln!(
            "{backend:?} {name}: rtt p50 {p50:?} p99 {p99:?} ({} of 5000); {pps:.0} packets/s delivered with 64 in flight, {lost} lost",
            rtts.len()
        );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        echo_thread.join().unwrap();
        relay.stop().unwrap();
    }
}

#[test]
fn tls_1_2_and_1_3_both_relay() {
    let (cert_pem, key_pem, der) = cert();
    let backend = *backends().last().unwrap();
    let relay = common::start(stream_settings(backend, 59000, &cert_pem, &key_pem));
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        *TLS_VERSION.lock().unwrap() = Some(v);
        let mut c = StreamClient::connect(&relay, Tr::Tls, &der, "alice", "alice-pass");
        *TLS_VERSION.lock().unwrap() = None;
        let relayed = c.allocate();
        let p = peer();
        c.bind(0x4000, p.local_addr().unwrap());
        relay_both_ways(&mut c, &p, relayed, &format!("{:?}", v.version));
    }
    relay.stop().unwrap();
}

#[test]
fn a_flooding_client_does_not_starve_another_on_the_same_worker() {
    let (cert_pem, key_pem, der) = cert();
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = stream_settings(backend, 60000 + 1000 * i as u16, &cert_pem, &key_pem);
        s.workers = 1;
        let relay = common::start(s);
        let mut flood = StreamClient::connect(&relay, Tr::Tcp, &der, "alice", "alice-pass");
        flood.allocate();
        let sink = peer();
        flood.bind(0x4000, sink.local_addr().unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let flooder = std::thread::spawn(move || {
            let mut frame = vec![0u8; 4 + 1000];
            ChannelData::write_header(&mut frame, 0x4000, 1000).unwrap();
            let burst: Vec<u8> = frame.repeat(64);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                if flood.conn.write_all(&burst).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let mut other = StreamClient::connect(&relay, Tr::Tcp, &der, "bob", "bob-pass");
        for _ in 0..20 {
            let t = Instant::now();
            Client::expect_success(&other.transact(Method::BINDING, &[], false));
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{backend:?}: a Binding took {:?} beside a flood",
                t.elapsed()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flooder.join().unwrap();
        drop(sink);
        relay.stop().unwrap();
    }
}
