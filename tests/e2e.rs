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
        let p = peer();
        c.permit(p.local_addr().unwrap());
        // Send indication → peer, from the relayed address.
        c.send_indication(p.local_addr().unwrap(), b"via send");
        let mut buf = [0u8; 2048];
        let (n, from) = p.recv_from(&mut buf).unwrap();
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
            let (n, from) = p.recv_from(&mut buf).unwrap();
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
        relay.stop().unwrap();
    }
}
