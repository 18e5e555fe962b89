//! End-to-end over real loopback UDP, on every backend: the relay runs in-process, clients and peers are
//! plain sockets.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use turnpike::wire::{Attribute, Class, Message, Method};

#[test]
fn binding_allocate_permission_channel_and_data_both_ways() {
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = start(settings(backend, 2, 20000 + 1000 * i as u16));
        assert_eq!(relay.backend(), backend);
        let server = relay.listen_addrs()[0];
        let mut c = Client::new(server, "alice", "alice-pass");

        let resp = c.transact(Method::BINDING, &[], false);
        assert_eq!(
            Message::parse(&resp).unwrap().attrs.xor_mapped_address,
            Some(c.local())
        );

        let relayed = c.allocate();
        // The 401 round was answered in a worker, and its nonce accepted by the server; the metric
        // counts the workers' 401s with the server's.
        let challenges: u64 = relay.worker_stats().iter().map(|w| w.challenges()).sum();
        assert_eq!(challenges, 1, "{backend:?}");
        let (tx, rx) = crossbeam_channel::bounded(1);
        relay
            .shutdown_sender()
            .send(turnpike::dataplane::ToControl::Metrics(tx))
            .unwrap();
        let m = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(m.server.challenges, 1, "{backend:?}");
        let p = peer();
        c.permit(p.local_addr().unwrap());
        // Send indication → peer, from the relayed address.
        c.send_indication(p.local_addr().unwrap(), b"via send");
        let mut buf = [0u8; 2048];
        let (n, from) = p.recv_retry(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"via send"[..], relayed));
        // Peer → client without a channel: a Data indication.
        p.send_to(b"back as data", relayed).unwrap();
        let d = c.recv();
        let m = Message::parse(&d).unwrap();
        assert_eq!(
            (m.message_type().class, m.message_type().method),
            (Class::Indication, Method::DATA)
        );
        assert_eq!(m.attrs.data, Some(&b"back as data"[..]));
        assert_eq!(m.attrs.xor_peer_address, p.local_addr().ok());

        c.bind(0x4000, p.local_addr().unwrap());
        for k in 0..50u8 {
            let payload = vec![k; 1 + usize::from(k) * 7];
            c.send_channel(0x4000, &payload);
            let (n, from) = p.recv_retry(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&payload[..], relayed),
                "backend {backend:?}"
            );
            p.send_to(&payload, relayed).unwrap();
            let back = c.recv();
            assert_eq!(
                &back[..4],
                &[[0x40, 0x00], (payload.len() as u16).to_be_bytes()].concat()[..]
            );
            assert_eq!(&back[4..], &payload[..]);
        }
        let r = c.authed(Method::REFRESH, &[Attribute::Lifetime(0)]);
        Client::expect_success(&r);
        // The allocation is gone: its routes too.
        c.send_channel(0x4000, b"after delete");
        p.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        assert!(p.recv_retry(&mut buf).is_err(), "relayed after Refresh 0");
        relay.stop().unwrap();
    }
}

#[test]
fn rest_credentials_allocate_and_denied_peers_get_403_and_nothing() {
    use turnpike::policy::PeerPolicy;
    for (i, backend) in backends().into_iter().enumerate() {
        // Default peer policy: loopback peers are denied.
        let mut s = settings(backend, 2, 22000 + 1000 * i as u16);
        s.server.peer_policy = PeerPolicy::new();
        let relay = start(s);
        let server = relay.listen_addrs()[0];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let cred = turnpike::auth::RestSecrets::new(vec![b"secret".to_vec()])
            .mint("carol", now, 600)
            .unwrap();
        let mut c = Client::new(server, &cred.username, &cred.password);
        let relayed = c.allocate();
        let p = peer();
        let r = c.authed(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(p.local_addr().unwrap())],
        );
        assert_eq!(Client::error_code(&r), Some(403));
        let r = c.authed(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(p.local_addr().unwrap()),
            ],
        );
        assert_eq!(Client::error_code(&r), Some(403));
        // A Send indication to the denied peer is dropped: the peer receives nothing.
        c.send_indication(p.local_addr().unwrap(), b"must not arrive");
        // The relay's own listener is a service port: refused even if loopback were allowed.
        let r = c.authed(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(server)],
        );
        assert_eq!(Client::error_code(&r), Some(403));
        p.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(p.recv_retry(&mut buf).is_err(), "denied peer received data");
        // And datagrams from that peer to the relayed address go nowhere.
        p.send_to(b"unsolicited", relayed).unwrap();
        c.sock
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        assert!(c.sock.recv_retry(&mut buf).is_err());
        relay.stop().unwrap();
    }
}

#[test]
fn expiry_removes_routes_and_data_stops() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 1, 24000 + 1000 * i as u16);
        s.server.default_lifetime = 2;
        s.server.max_lifetime = 2;
        let relay = start(s);
        let mut c = Client::new(relay.listen_addrs()[0], "alice", "alice-pass");
        let relayed = c.allocate();
        let p = peer();
        c.bind(0x4000, p.local_addr().unwrap());
        c.send_channel(0x4000, b"before");
        let mut buf = [0u8; 64];
        let (n, _) = p.recv_retry(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"before");
        std::thread::sleep(std::time::Duration::from_millis(2600));
        c.send_channel(0x4000, b"after");
        p.set_read_timeout(Some(std::time::Duration::from_millis(400)))
            .unwrap();
        assert!(
            p.recv_retry(&mut buf).is_err(),
            "relayed after the allocation expired"
        );
        p.send_to(b"after", relayed).unwrap();
        c.sock
            .set_read_timeout(Some(std::time::Duration::from_millis(400)))
            .unwrap();
        assert!(c.sock.recv_retry(&mut buf).is_err());
        let r = c.authed(Method::REFRESH, &[]);
        assert_eq!(Client::error_code(&r), Some(437));
        relay.stop().unwrap();
    }
}

#[test]
fn many_clients_on_many_workers_all_relay() {
    const CLIENTS: usize = 200;
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = start(settings(backend, 2, 26000 + 1000 * i as u16));
        let server = relay.listen_addrs()[0];
        let p = peer();
        let peer_addr = p.local_addr().unwrap();
        let mut clients: Vec<(Client, std::net::SocketAddr)> = (0..CLIENTS)
            .map(|_| {
                let mut c = Client::new(server, "bob", "bob-pass");
                let relayed = c.allocate();
                c.bind(0x4000 + 1, peer_addr);
                (c, relayed)
            })
            .collect();
        let mut buf = [0u8; 256];
        for (k, (c, relayed)) in clients.iter_mut().enumerate() {
            let msg = (k as u32).to_be_bytes();
            c.send_channel(0x4001, &msg);
            let (n, from) = p.recv_retry(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&msg[..], *relayed));
            p.send_to(&msg, *relayed).unwrap();
            let back = c.recv();
            assert_eq!(&back[4..], &msg[..]);
        }
        let per_worker: Vec<u64> = relay.worker_stats().iter().map(|s| s.rx()).collect();
        assert!(
            per_worker.iter().all(|rx| *rx > 0),
            "every worker carried traffic: {per_worker:?}"
        );
        relay.stop().unwrap();
    }
}

#[test]
fn graceful_shutdown_refuses_new_allocations_and_keeps_relaying_until_the_drain_ends() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 1, 28000 + 1000 * i as u16);
        s.drain = std::time::Duration::from_millis(1500);
        let mut relay = start(s);
        let server = relay.listen_addrs()[0];
        let mut c = Client::new(server, "alice", "alice-pass");
        let relayed = c.allocate();
        let p = peer();
        c.bind(0x4000, p.local_addr().unwrap());
        relay.shutdown();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut late = Client::new(server, "bob", "bob-pass");
        let r = late.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        assert_eq!(
            Client::error_code(&r),
            Some(508),
            "new allocations refused while draining"
        );
        c.send_channel(0x4000, b"still flowing");
        let mut buf = [0u8; 64];
        let (n, from) = p.recv_retry(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"still flowing"[..], relayed));
        let started = std::time::Instant::now();
        relay.join().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
