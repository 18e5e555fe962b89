//! The stateful fuzz target's oracle on stable (`tests/fuzz/fuzz_targets/stateful.rs` runs the same
//! harness, `turnpike::sim`, under libFuzzer): `Server`, the control thread's `Executor` and the
//! workers' `Core`s driven together by a random sequence of client and peer packets and time steps.
//! No panic; counters monotone and equal to what was billed; and once every allocation has ended, every
//! table is empty and each allocation's usage is exactly what was relayed for it.
#![allow(missing_docs, clippy::unwrap_used)]

use proptest::prelude::*;
use turnpike::sim::{self, Op};

/// 64 cases (a few seconds in a debug build), or `PROPTEST_CASES` for a longer campaign.
fn cases() -> u32 {
    match std::env::var_os("PROPTEST_CASES") {
        Some(_) => ProptestConfig::default().cases,
        None => 64,
    }
}

/// Operations biased towards the deep states: clients allocate, then permit and bind the first few
/// peers, and data flows both ways between time steps.
fn op() -> impl Strategy<Value = Op> {
    let client = prop_oneof![3 => 0u8..3, 1 => 0u8..6];
    let user = prop_oneof![12 => Just(0u8), 1 => Just(5u8), 1 => Just(6u8), 1 => Just(7u8)];
    let peer = prop_oneof![4 => 0u8..4, 1 => any::<u8>()];
    prop_oneof![
        1 => (client.clone(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(client, bytes)| Op::Raw { client, bytes }),
        4 => (client.clone(), user.clone(), prop_oneof![6 => Just(0u8), 1 => any::<u8>()], any::<u8>())
            .prop_map(|(client, user, flags, lifetime)| Op::Allocate { client, user, flags: flags & 0x7f, lifetime }),
        2 => (client.clone(), user.clone(), any::<u8>())
            .prop_map(|(client, user, lifetime)| Op::Refresh { client, user, lifetime }),
        3 => (client.clone(), user.clone(), peer.clone(), prop_oneof![Just(0u8), any::<u8>()])
            .prop_map(|(client, user, peer, second)| Op::Permit { client, user, peer, second }),
        3 => (client.clone(), user, any::<u8>(), peer.clone())
            .prop_map(|(client, user, channel, peer)| Op::Bind { client, user, channel, peer }),
        3 => (client.clone(), peer.clone(), any::<u8>())
            .prop_map(|(client, peer, len)| Op::Send { client, peer, len }),
        3 => (client.clone(), any::<u8>(), any::<u8>())
            .prop_map(|(client, channel, len)| Op::ChannelData { client, channel, len }),
        4 => (any::<u8>(), peer, prop::collection::vec(any::<u8>(), 0..48))
            .prop_map(|(relay, peer, bytes)| Op::Peer { relay, peer, bytes }),
        2 => prop_oneof![4 => 0u8..60, 1 => any::<u8>()].prop_map(|secs| Op::Advance { secs }),
        1 => client.clone().prop_map(|client| Op::Close { client }),
        1 => client.prop_map(|client| Op::Retransmit { client }),
    ]
}

/// The oracle over random operation sequences, each run twice (allocations deleted, allocations
/// expired). The cases must also reach the deep states between them (allocations, permissions,
/// channels, data both ways), or the test proves nothing.
#[test]
fn every_table_is_empty_once_every_allocation_ends() {
    let config = ProptestConfig {
        cases: cases(),
        // A hand-driven runner knows no source file: name the regressions file.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/stateful.proptest-regressions",
            ),
        )),
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let depth = std::cell::RefCell::new(sim::Summary::default());
    let strategy = prop::collection::vec(op(), 1..=60);
    runner
        .run(&strategy, |ops| {
            for delete in [false, true] {
                let s = sim::run(&ops, delete);
                let mut d = depth.borrow_mut();
                d.allocations += s.allocations;
                d.peak_permissions = d.peak_permissions.max(s.peak_permissions);
                d.peak_channels = d.peak_channels.max(s.peak_channels);
                d.relayed.add(s.relayed);
                d.relay_to_relay += s.relay_to_relay;
            }
            Ok(())
        })
        .unwrap();
    let d = depth.into_inner();
    println!("reached: {d:?}");
    assert!(
        d.allocations > 0 && d.peak_permissions > 1 && d.peak_channels > 1,
        "{d:?}"
    );
    assert!(
        d.relayed.to_peer_packets > 0 && d.relayed.to_client_packets > 0,
        "{d:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    /// The fuzz target's own entry point (bytes decoded into operations).
    #[test]
    fn arbitrary_bytes_decode_into_runs_that_keep_the_oracle(
        data in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        sim::run_bytes(&data);
    }
}

/// The harness reaches the deep states the fuzzer needs: two allocations through the 401 round (one
/// per worker), a permission and a channel, data both ways, relay to relay; then everything expires
/// and the oracle holds. Also checks that the summary counts what was relayed.
#[test]
fn a_call_allocates_binds_and_relays_both_ways_and_relay_to_relay() {
    // PEERS has 8 entries; the relayed addresses follow in the order they opened.
    let (alice_relay, bob_relay) = (8, 9);
    let ops = [
        Op::Allocate {
            client: 0,
            user: 0,
            flags: 0,
            lifetime: 0,
        },
        Op::Allocate {
            client: 1,
            user: 3,
            flags: 0,
            lifetime: 0,
        },
        Op::Permit {
            client: 0,
            user: 0,
            peer: 0,
            second: bob_relay,
        },
        Op::Permit {
            client: 1,
            user: 3,
            peer: alice_relay,
            second: 0,
        },
        Op::Bind {
            client: 0,
            user: 0,
            channel: 0,
            peer: 0,
        },
        Op::ChannelData {
            client: 0,
            channel: 0,
            len: 10,
        },
        Op::Peer {
            relay: 0,
            peer: 0,
            bytes: vec![1; 20],
        },
        Op::Send {
            client: 0,
            peer: 1,
            len: 5,
        },
        Op::Send {
            client: 0,
            peer: bob_relay,
            len: 7,
        },
        Op::Advance { secs: 250 },
    ];
    for delete in [false, true] {
        let s = sim::run(&ops, delete);
        assert_eq!(s.allocations, 2, "{s:?}");
        assert_eq!(s.peak_channels, 1, "{s:?}");
        assert_eq!(s.peak_permissions, 3, "{s:?}");
        assert_eq!(s.relay_to_relay, 1, "{s:?}");
        assert_eq!(
            (s.relayed.to_peer_packets, s.relayed.to_peer_bytes),
            (3, 10 + 5 + 7),
            "{s:?}"
        );
        assert_eq!(
            (s.relayed.to_client_packets, s.relayed.to_client_bytes),
            (2, 20 + 7),
            "{s:?}"
        );
    }
}
