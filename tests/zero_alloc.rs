//! Zero allocations on the packet path: a counting global allocator watches the whole process while, on
//! every backend, 100,000 ChannelData packets are relayed each way in steady state and 100,000 Binding
//! and unauthenticated Allocate requests (the 401 round) are answered in the worker; and while a worker
//! refuses STUN copies to a full control queue.
//!
//! The allocator counts process-wide, so the scenarios run one after another in one test.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use turnpike::sys::alloc::{allocations, CountingAlloc};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const PACKETS: usize = 100_000;
const WINDOW: usize = 32;

#[test]
fn the_packet_path_allocates_nothing() {
    relaying_channel_data_allocates_nothing();
    answering_binding_and_challenges_in_the_worker_allocates_nothing();
    refusing_stun_copies_allocates_nothing();
}

fn relaying_channel_data_allocates_nothing() {
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = start(settings(backend, 1, 30000 + 1000 * i as u16));
        let mut c = Client::new(relay.listen_addrs()[0], "alice", "alice-pass");
        let relayed = c.allocate();
        let p = peer();
        let peer_addr = p.local_addr().unwrap();
        c.bind(0x4001, peer_addr);

        let payload = [0xA5u8; 160];
        let mut frame = [0u8; 164];
        frame[..4].copy_from_slice(&[0x40, 0x01, 0, 160]);
        frame[4..].copy_from_slice(&payload);
        let mut buf = [0u8; 2048];
        let server = c.server;
        let mut run = |packets: usize| {
            let mut done = 0;
            while done < packets {
                let n = WINDOW.min(packets - done);
                for _ in 0..n {
                    c.sock.send_to(&frame, server).unwrap();
                }
                for _ in 0..n {
                    let (len, from) = p.recv_retry(&mut buf).unwrap();
                    assert!(len == 160 && from == relayed);
                }
                for _ in 0..n {
                    p.send_to(&payload, relayed).unwrap();
                }
                for _ in 0..n {
                    let (len, _) = c.sock.recv_retry(&mut buf).unwrap();
                    assert!(len == 164 && buf[..4] == frame[..4]);
                }
                done += n;
            }
        };
        // Warm up: first-touch growth of tables, buffers and queues happens here.
        run(2_000);
        let before = allocations();
        run(PACKETS);
        let after = allocations();
        assert_eq!(
            after - before,
            0,
            "{backend:?}: {} allocations while relaying {PACKETS} packets each way",
            after - before
        );
        relay.stop().unwrap();
    }
}

/// Binding (RFC 8489 §8.1) and the 401 to an Allocate without credentials are answered in the
/// worker's receive slot: no allocation per request (a request handed to the control thread would be
/// copied). The budget is unlimited (`challenge_rate = 0`) so that every request is answered.
fn answering_binding_and_challenges_in_the_worker_allocates_nothing() {
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 1, 32000 + 1000 * i as u16);
        s.server.challenge_rate = 0;
        let relay = start(s);
        let server = relay.listen_addrs()[0];
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        // A 20-byte Binding request: type 0x0001, length 0, the magic cookie, a transaction id.
        let mut binding = [0u8; 20];
        binding[..8].copy_from_slice(&[0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42]);
        // A 28-byte Allocate without credentials: type 0x0003, REQUESTED-TRANSPORT UDP.
        let mut allocate = [0u8; 28];
        allocate[..8].copy_from_slice(&[0x00, 0x03, 0, 8, 0x21, 0x12, 0xA4, 0x42]);
        allocate[20..].copy_from_slice(&[0x00, 0x19, 0, 4, 17, 0, 0, 0]);
        let mut buf = [0u8; 2048];
        let mut run = |requests: usize| {
            let mut done = 0;
            while done < requests {
                let n = WINDOW.min(requests - done);
                for k in 0..n {
                    let request = if k % 2 == 0 {
                        &mut binding[..]
                    } else {
                        &mut allocate[..]
                    };
                    request[8..16].copy_from_slice(&((done + k) as u64).to_be_bytes());
                    sock.send_to(request, server).unwrap();
                }
                for _ in 0..n {
                    let (len, from) = sock.recv_retry(&mut buf).unwrap();
                    assert_eq!(from, server);
                    match [buf[0], buf[1]] {
                        // A Binding success with XOR-MAPPED-ADDRESS (12 bytes for IPv4).
                        [0x01, 0x01] => assert_eq!(len, 32),
                        // An Allocate error: the 401, within 3× its request.
                        [0x01, 0x13] => assert!(len <= 3 * allocate.len()),
                        other => panic!("unexpected answer {other:?}"),
                    }
                }
                done += n;
            }
        };
        run(2_000);
        let before = allocations();
        run(PACKETS);
        let after = allocations();
        assert_eq!(
            after - before,
            0,
            "{backend:?}: {} allocations while answering {PACKETS} Bindings and Allocates",
            after - before
        );
        relay.stop().unwrap();
    }
}

/// Overload: a STUN request for the control thread is admitted against the queue's bounds before it
/// is copied, so that refusing it costs no allocation (driven through `Core::on_client`, as a worker
/// does).
fn refusing_stun_copies_allocates_nothing() {
    use std::sync::Arc;
    use turnpike::dataplane::{
        Action, ControlTx, Core, Drop, StunQueue, WorkerStats, HEADROOM, SLOT,
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let full = Arc::new(StunQueue::new(0, 0));
    let stats = Arc::new(WorkerStats::default());
    let mut core = Core::new(
        0,
        ControlTx::new(tx, full),
        stats.clone(),
        turnpike::wire::ChannelRange::Rfc8656,
        Arc::default(),
    );
    // A 28-byte Allocate (REQUESTED-TRANSPORT UDP): STUN for the control thread.
    let allocate = [
        0x00, 0x03, 0, 8, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x00,
        0x19, 0, 4, 17, 0, 0, 0,
    ];
    let mut slot = vec![0u8; SLOT];
    slot[HEADROOM..HEADROOM + allocate.len()].copy_from_slice(&allocate);
    let from = "127.0.0.1:40000".parse().unwrap();
    let before = allocations();
    for _ in 0..PACKETS {
        let action = core.on_client(0, from, &mut slot, allocate.len());
        assert!(action == Action::Done);
    }
    let after = allocations();
    assert_eq!(stats.drops(Drop::ControlBusy), PACKETS as u64);
    assert!(rx.try_recv().is_err(), "nothing was admitted");
    assert_eq!(
        after - before,
        0,
        "{} allocations while refusing {PACKETS} STUN copies",
        after - before
    );
}
