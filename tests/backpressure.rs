//! Back-pressure as designed (issue 10), on every backend: a control thread that cannot keep up costs
//! STUN copies (dropped and counted within a count and byte bound), never forwarding; and a worker that
//! exits makes the relay not ready and end with an error.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use turnpike::dataplane::{Drop, ToControl};
use turnpike::wire::{Attribute, Method};

/// STUN copies queued at most, in bytes (`control::CONTROL_QUEUE_BYTES`).
const QUEUE_BYTES: usize = 8 << 20;
/// The flood: rounds of `PER_ROUND` requests of `SIZE` bytes.
const ROUNDS: usize = 40;
const PER_ROUND: usize = 100;
const SIZE: usize = 3000;

const SMALL_ROUNDS: usize = 40;
const SMALL_PER_ROUND: usize = 450;

/// A request of a method the relay does not know (0x00a), with transaction id `n`: it goes to the
/// control thread, which answers 400 (a Binding and an Allocate without credentials no longer do:
/// the worker answers them).
const UNKNOWN_METHOD: [u8; 2] = [0x00, 0x0a];

/// A minimal request of [`UNKNOWN_METHOD`] with transaction id `n`.
fn request(n: u32) -> Vec<u8> {
    let mut m = vec![UNKNOWN_METHOD[0], UNKNOWN_METHOD[1], 0, 0];
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&n.to_be_bytes());
    m
}

/// A request of [`UNKNOWN_METHOD`] of `SIZE` bytes (an unknown comprehension-optional attribute pads
/// it), with transaction id `n`.
fn big_request(n: u32) -> Vec<u8> {
    let pad = (SIZE - 24) as u16;
    let mut m = UNKNOWN_METHOD.to_vec();
    m.extend_from_slice(&(pad + 4).to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&n.to_be_bytes());
    m.extend_from_slice(&0x8123u16.to_be_bytes());
    m.extend_from_slice(&pad.to_be_bytes());
    m.resize(SIZE, 0);
    m
}

#[test]
fn a_stalled_control_thread_costs_stun_copies_never_forwarding() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 1, 43000 + 1000 * i as u16);
        s.stream.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()];
        let relay = start(s);
        let server = relay.listen_addrs()[0];
        let mut c = Client::new(server, "alice", "alice-pass");
        let relayed = c.allocate();
        let p = peer();
        c.bind(0x4000, p.local_addr().unwrap());

        // Stall the control thread: it blocks answering this metrics request until we read it.
        let (stall_tx, stall_rx) = crossbeam_channel::bounded(0);
        relay
            .shutdown_sender()
            .send(ToControl::Metrics(stall_tx))
            .unwrap();

        let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 2048];
        for round in 0..ROUNDS {
            for k in 0..PER_ROUND {
                flood
                    .send_to(&big_request((round * PER_ROUND + k) as u32), server)
                    .unwrap();
            }
            // Relaying goes on; the reply also shows the worker has read the flood sent before it.
            c.send_channel(0x4000, &[round as u8; 64]);
            let (n, from) = p.recv_retry(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&[round as u8; 64][..], relayed),
                "{backend:?}"
            );
        }
        let stats = &relay.worker_stats()[0];
        let dropped = stats.drops(Drop::ControlBusy) as usize;
        // The count bound (16k) is far away: the byte bound did this.
        let admitted_at_most = QUEUE_BYTES / SIZE;
        assert!(
            dropped >= ROUNDS * PER_ROUND - admitted_at_most,
            "{backend:?}: {dropped} STUN copies dropped"
        );

        // Now fill the count bound with small requests, then close a TCP connection: its StreamClosed
        // must go through the full queue without the worker waiting for the control thread.
        for round in 0..SMALL_ROUNDS {
            for k in 0..SMALL_PER_ROUND {
                flood
                    .send_to(&request((round * SMALL_PER_ROUND + k) as u32), server)
                    .unwrap();
            }
            c.send_channel(0x4000, &[round as u8; 32]);
            let (n, _) = p.recv_retry(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[round as u8; 32][..], "{backend:?}");
        }
        let more = stats.drops(Drop::ControlBusy) as usize - dropped;
        assert!(more > 0, "{backend:?}: the count bound refused copies");
        let tcp = std::net::TcpStream::connect(relay.tcp_addrs()[0]).unwrap();
        // The worker accepts it (a Binding over TCP makes sure), then sees it close.
        let mut w = &tcp;
        std::io::Write::write_all(&mut w, &request(u32::MAX)).unwrap();
        drop(tcp);
        for k in 0..20u8 {
            c.send_channel(0x4000, &[k; 16]);
            let (n, _) = p.recv_retry(&mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                &[k; 16][..],
                "{backend:?}: forwarding after StreamClosed"
            );
        }
        let dropped = stats.drops(Drop::ControlBusy) as usize;

        // Unstall: the control thread works through its queue and answers again.
        stall_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let resp = c.transact(Method::BINDING, &[], false);
        Client::expect_success(&resp);
        let (tx, rx) = crossbeam_channel::bounded(1);
        relay
            .shutdown_sender()
            .send(ToControl::Metrics(tx))
            .unwrap();
        let m = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(m.control_queue, (0, 0), "{backend:?}: the queue drained");
        let busy = m.workers[0]
            .drops
            .iter()
            .find(|(why, _)| *why == "control_busy")
            .map(|(_, n)| *n);
        // Later drops: requests the control thread had no room for right after the unstall (the client
        // retried them).
        assert!(
            busy >= Some(dropped as u64),
            "{backend:?}: exposed as a metric"
        );
        assert_eq!(busy, Some(stats.drops(Drop::ControlBusy)), "{backend:?}");
        relay.stop().unwrap();
    }
}

#[test]
fn a_worker_exit_makes_the_relay_not_ready_and_end_with_an_error() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut relay = start(settings(backend, 2, 45000 + 1000 * i as u16));
        let mut c = Client::new(relay.listen_addrs()[0], "alice", "alice-pass");
        c.allocate();
        // What worker 1's thread sends on its way out when its loop fails (control::spawn_worker).
        relay
            .shutdown_sender()
            .send(ToControl::WorkerExited {
                worker: 1,
                error: Some("io_uring_enter: EBADF".into()),
            })
            .unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        relay
            .shutdown_sender()
            .send(ToControl::Metrics(tx))
            .unwrap();
        let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // /readyz answers 503 while draining.
        assert!(m.draining, "{backend:?}: not ready");
        assert_eq!(m.workers_lost, 1);
        // New allocations are refused while it drains.
        let mut d = Client::new(relay.listen_addrs()[0], "bob", "bob-pass");
        let r = d.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        assert!(Client::error_code(&r).is_some(), "{backend:?}: refused");
        let err = relay.join().unwrap_err();
        assert!(
            err.to_string().contains("worker 1 exited"),
            "{backend:?}: {err}"
        );
    }
}

/// Metrics requests kept in flight on the control queue: it never runs empty while they flow (each
/// reply is answered by a new request long before the control thread could take the other
/// `IN_FLIGHT - 1`, even with this thread descheduled for a while: they take it about a second).
const IN_FLIGHT: usize = 1 << 17;

#[test]
fn timers_and_the_end_of_a_drain_run_while_the_control_queue_never_runs_empty() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 1, 47000 + 1000 * i as u16);
        // An allocation of one second: its expiry is the control thread's next timer.
        s.server.default_lifetime = 1;
        s.server.max_lifetime = 1;
        s.drain = Duration::from_millis(300);
        let mut relay = start(s);
        let mut c = Client::new(relay.listen_addrs()[0], "alice", "alice-pass");
        c.allocate();
        let to_control = relay.shutdown_sender();
        let (reply_tx, replies) = crossbeam_channel::unbounded();
        let ask = || {
            to_control
                .send(ToControl::Metrics(reply_tx.clone()))
                .is_ok()
        };
        for _ in 0..IN_FLIGHT {
            assert!(ask());
        }
        // The allocation expires although the queue never runs empty (generous bounds: 20 s, and
        // a count far beyond what the flood needs).
        let until = std::time::Instant::now() + Duration::from_secs(20);
        let mut expired = false;
        for _ in 0..50_000_000u64 {
            if std::time::Instant::now() > until {
                break;
            }
            let m = replies.recv_timeout(Duration::from_secs(5)).unwrap();
            if m.server.allocations == 0 {
                expired = true;
                break;
            }
            assert!(ask());
        }
        assert!(
            expired,
            "{backend:?}: the allocation outlived its lifetime under a flood of control messages"
        );
        // A drain begins behind the flood and ends while it goes on: the control thread stops and
        // drops its queue, so that a request can no longer be sent.
        relay.shutdown();
        let until = std::time::Instant::now() + Duration::from_secs(20);
        let mut stopped = false;
        for _ in 0..50_000_000u64 {
            if std::time::Instant::now() > until {
                break;
            }
            let _ = replies.recv_timeout(Duration::from_millis(200));
            if !ask() {
                stopped = true;
                break;
            }
        }
        assert!(
            stopped,
            "{backend:?}: the drain never ended under a flood of control messages"
        );
        relay.join().unwrap();
    }
}
