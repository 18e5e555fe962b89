//! Criterion benches for the data plane's per-packet work, without syscalls: ChannelData classify +
//! route lookup with 1k, 100k and 1M channels in the table, and the full fast-path forward step
//! ([`Core::on_client`] for client → peer ChannelData, [`Core::on_peer`] for peer → client with the
//! ChannelData header written into the headroom).
//!
//! Run with `cargo bench --bench dataplane` (ns/op in the output). Table set-up for 1M entries takes a
//! few seconds.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use turnpike::dataplane::{Action, Core, WorkerStats, HEADROOM, SLOT};
use turnpike::route::{AllocationId, ChannelNumber, ClientKey, RelayId, RouteTable, RouteUpdate};
use turnpike::wire::{classify, ChannelData, ChannelRange, Kind};

const CHANNEL: u16 = 0x4000;

fn client(i: u32) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(0x0A00_0000 + (i >> 14)),
        1024 + (i & 0x3FFF) as u16,
    ))
}

fn peer(i: u32) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(0xC633_6400 + (i & 0xFF)),
        5000,
    ))
}

/// The updates that install `n` allocations, each with a permission and channel 0x4000 to one peer.
fn updates(n: u32) -> impl Iterator<Item = RouteUpdate> {
    (0..n).flat_map(|i| {
        let id = RelayId(i);
        [
            RouteUpdate::AddRelay {
                id,
                allocation: AllocationId(u64::from(i)),
                addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 49152)),
                client: ClientKey {
                    client: client(i),
                    listener: 0,
                },
            },
            RouteUpdate::AddPermission {
                relay: id,
                peer: peer(i).ip(),
            },
            RouteUpdate::AddChannel {
                relay: id,
                channel: ChannelNumber::new(CHANNEL).expect("in range"),
                peer: peer(i),
            },
        ]
    })
}

/// A pseudo-random sequence of table indices, so lookups are not all cache hits.
fn indices(n: u32) -> Vec<u32> {
    let mut x = 0x2545_F491u32;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % n
        })
        .collect()
}

fn bench_classify_and_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("channeldata_classify_parse_lookup");
    for n in [1_000u32, 100_000, 1_000_000] {
        let mut table = RouteTable::new();
        for u in updates(n) {
            table.apply(u);
        }
        let idx = indices(n);
        let pkt = [0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4];
        let mut k = 0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) & 4095;
                let key = ClientKey {
                    client: client(idx[k]),
                    listener: 0,
                };
                let data = black_box(&pkt[..]);
                match classify(data[0]) {
                    Kind::ChannelData => {
                        let cd = ChannelData::parse(data).ok()?;
                        table.channel(key, cd.channel())
                    }
                    _ => None,
                }
            })
        });
    }
    g.finish();
}

fn bench_forward_step(c: &mut Criterion) {
    let n = 100_000u32;
    let (tx, _rx) = crossbeam_channel::bounded(16);
    let mut core = Core::new(
        0,
        tx,
        Arc::new(WorkerStats::default()),
        ChannelRange::Rfc8656,
        Arc::default(),
    );
    for u in updates(n) {
        core.apply(u);
    }
    let idx = indices(n);
    let mut slot = vec![0u8; SLOT];
    let payload = 160;
    let mut g = c.benchmark_group("fast_path_100k_allocations");
    let mut k = 0;
    g.bench_function("client_to_peer_channeldata_160B", |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            let i = idx[k];
            slot[HEADROOM..HEADROOM + 4].copy_from_slice(&[0x40, 0x00, 0x00, payload as u8]);
            let a = core.on_client(0, client(i), &mut slot, 4 + payload);
            debug_assert!(matches!(a, Action::Forward(_)));
            black_box(a)
        })
    });
    g.bench_function("peer_to_client_channeldata_160B", |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            let i = idx[k];
            let a = core.on_peer(RelayId(i), peer(i), &mut slot, payload);
            debug_assert!(matches!(a, Action::Forward(_)));
            black_box(a)
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

/// Private so that the `pub fn` that `criterion_group!` generates is not a documented item.
mod group {
    use super::*;

    criterion_group! {
        name = dataplane;
        config = config();
        targets = bench_classify_and_lookup, bench_forward_step
    }
}
criterion_main!(group::dataplane);
