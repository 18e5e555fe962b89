//! Load and churn on every backend: several allocations relay bursts both ways through their channels,
//! then every allocation is deleted (its relay socket closes) and made again, a few times over.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use turnpike::dataplane::Drop;
use turnpike::wire::{Attribute, ChannelData, Method};

const CLIENTS: usize = 6;
const ROUNDS: usize = 3;
const BURSTS: usize = 10;
const BURST: usize = 64;
const SIZE: usize = 300;

struct Leg {
    client: Client,
    peer: UdpSocket,
    relayed: SocketAddr,
}

fn open(server: SocketAddr, user: &str, pass: &str) -> Leg {
    let mut client = Client::new(server, user, pass);
    let relayed = client.allocate();
    let peer = peer();
    client.bind(0x4000, peer.local_addr().unwrap());
    Leg {
        client,
        peer,
        relayed,
    }
}

fn payload(leg: usize, seq: usize) -> [u8; SIZE] {
    let mut p = [0u8; SIZE];
    p[..4].copy_from_slice(&(seq as u32).to_be_bytes());
    p[4] = leg as u8;
    for (i, b) in p[5..].iter_mut().enumerate() {
        *b = (i + seq) as u8;
    }
    p
}

#[test]
fn bursts_both_ways_with_relay_churn() {
    for (i, backend) in backends().into_iter().enumerate() {
        let relay = start(settings(backend, 2, 30000 + 2000 * i as u16));
        assert_eq!(relay.backend(), backend);
        let server = relay.listen_addrs()[0];
        let users = [("alice", "alice-pass"), ("bob", "bob-pass")];
        let mut legs: Vec<Leg> = (0..CLIENTS)
            .map(|k| {
                let (u, p) = users[k % 2];
                open(server, u, p)
            })
            .collect();
        let mut frame = [0u8; 4 + SIZE];
        let mut buf = [0u8; 2048];
        for round in 0..ROUNDS {
            for burst in 0..BURSTS {
                for (k, leg) in legs.iter().enumerate() {
                    for j in 0..BURST {
                        let seq = burst * BURST + j;
                        frame[4..].copy_from_slice(&payload(k, seq));
                        ChannelData::write_header(&mut frame, 0x4000, SIZE).unwrap();
                        leg.client.sock.send_to(&frame, server).unwrap();
                    }
                }
                for (k, leg) in legs.iter().enumerate() {
                    for j in 0..BURST {
                        let seq = burst * BURST + j;
                        let (n, from) = leg.peer.recv_from(&mut buf).unwrap();
                        assert_eq!(from, leg.relayed, "{backend:?} round {round}");
                        assert_eq!(&buf[..n], &payload(k, seq)[..], "{backend:?} round {round}");
                        leg.peer.send_to(&buf[..n], leg.relayed).unwrap();
                    }
                }
                for (k, leg) in legs.iter().enumerate() {
                    for j in 0..BURST {
                        let seq = burst * BURST + j;
                        let (n, from) = leg.client.sock.recv_from(&mut buf).unwrap();
                        assert_eq!(from, server);
                        assert_eq!(
                            &buf[..4],
                            &[0x40, 0x00, (SIZE >> 8) as u8, SIZE as u8],
                            "{backend:?} round {round} burst {burst} leg {k} seq {seq}: {:?}",
                            &buf[..n.min(64)]
                        );
                        assert_eq!(
                            &buf[4..n],
                            &payload(k, seq)[..],
                            "{backend:?} round {round}"
                        );
                    }
                }
            }
            // Delete every allocation: its relay socket closes. Data to the old relayed address goes nowhere.
            for leg in &mut legs {
                let r = leg
                    .client
                    .authed(Method::REFRESH, &[Attribute::Lifetime(0)]);
                Client::expect_success(&r);
            }
            for leg in &legs {
                let _ = leg.peer.send_to(b"too late", leg.relayed);
            }
            for leg in &legs {
                leg.client
                    .sock
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                assert!(
                    leg.client.sock.recv_from(&mut buf).is_err(),
                    "{backend:?}: nothing arrives through a deleted allocation"
                );
                leg.client
                    .sock
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
            }
            legs = (0..CLIENTS)
                .map(|k| {
                    let (u, p) = users[k % 2];
                    open(server, u, p)
                })
                .collect();
        }
        let stats = relay.worker_stats();
        let relayed = (ROUNDS * BURSTS * BURST * CLIENTS * 2) as u64;
        let tx: u64 = stats.iter().map(|s| s.tx()).sum();
        assert!(tx >= relayed, "{backend:?}: tx {tx} < {relayed}");
        for why in [Drop::SendFailed, Drop::Truncated, Drop::NoChannel] {
            let n: u64 = stats.iter().map(|s| s.drops(why)).sum();
            assert_eq!(n, 0, "{backend:?}: drops {}", why.as_str());
        }
        relay.stop().unwrap();
    }
}
