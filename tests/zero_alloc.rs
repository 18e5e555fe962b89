//! Zero allocations per relayed packet: a counting global allocator watches the whole process while
//! 100,000 ChannelData packets are relayed each way in steady state, on every backend.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use turnpike::sys::alloc::{allocations, CountingAlloc};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const PACKETS: usize = 100_000;
const WINDOW: usize = 32;

#[test]
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
