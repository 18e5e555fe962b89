//! Usage counts what was sent, not what was queued (issue 10, finding 8), on every backend: a datagram
//! the kernel refuses is neither billed nor allowed to take the rest of its batch down with it.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use turnpike::dataplane::Drop;
use turnpike::policy::PeerPolicy;
use turnpike::wire::{Attribute, Method};

const EACH: usize = 20;

#[test]
fn refused_datagrams_are_not_billed_and_the_rest_of_the_batch_is_sent() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 1, 41000 + 1000 * i as u16);
        // The limited broadcast address is opened so that the server installs a channel to it; the
        // kernel then refuses every datagram to it (EACCES without SO_BROADCAST, or no route).
        s.server.peer_policy = PeerPolicy::new().with_allow(vec![
            "127.0.0.0/8".parse().unwrap(),
            "255.255.255.255/32".parse().unwrap(),
        ]);
        let (usage_tx, usage_rx) = crossbeam_channel::unbounded();
        s.usage_sink = Some(usage_tx);
        let relay = start(s);
        let mut c = Client::new(relay.listen_addrs()[0], "alice", "alice-pass");
        let relayed = c.allocate();
        let p = peer();
        c.bind(0x4000, p.local_addr().unwrap());
        c.bind(0x4001, "255.255.255.255:9".parse().unwrap());

        // Interleaved, so that a refused datagram sits between deliverable ones in the same batch.
        for k in 0..EACH {
            c.send_channel(0x4000, &[k as u8; 100]);
            c.send_channel(0x4001, &[k as u8; 100]);
        }
        let mut buf = [0u8; 2048];
        for k in 0..EACH {
            let (n, from) = p.recv_retry(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&[k as u8; 100][..], relayed),
                "{backend:?}"
            );
        }
        // io_uring reports a send's outcome with its completion, which may come after the peer has
        // the datagram: wait (bounded) for every refusal to be counted.
        let stats = &relay.worker_stats()[0];
        let refused = || stats.drops(Drop::SendFailed) + stats.drops(Drop::SendBufferFull);
        let deadline = Instant::now() + Duration::from_secs(3);
        while refused() < EACH as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(refused(), EACH as u64, "{backend:?}: refusals counted");
        let relayed = stats.relayed();
        assert_eq!(
            (relayed.to_peer_bytes, relayed.to_peer_packets),
            (100 * EACH as u64, EACH as u64),
            "{backend:?}: only what was sent is counted as relayed"
        );

        // The allocation's usage record bills the same.
        let r = c.authed(Method::REFRESH, &[Attribute::Lifetime(0)]);
        Client::expect_success(&r);
        let record = usage_rx.recv_timeout(Duration::from_secs(3)).unwrap();
        assert!(record.done);
        assert_eq!(
            (record.usage.to_peer_bytes, record.usage.to_peer_packets),
            (100 * EACH as u64, EACH as u64),
            "{backend:?}: billed only what was sent"
        );
        relay.stop().unwrap();
    }
}
