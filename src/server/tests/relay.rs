//! Permissions, channels, Send/Data indications, ChannelData, peer policy.

use super::*;

#[test]
fn send_indication_relays_only_with_a_permission() {
    let mut h = Harness::new();
    let alice = Creds::alice();
    let (relay, _) = h.allocate(client(1), &alice);
    let send = h.build(
        Method::SEND,
        Class::Indication,
        TransactionId([9; 12]),
        &[
            Attribute::XorPeerAddress(peer(1)),
            Attribute::Data(b"hello"),
        ],
        None,
    );
    let out = h.send(client(1), &send);
    assert!(out.sent.is_empty(), "no permission yet: dropped");
    assert_eq!(h.server.stats().no_permission, 1);

    h.permit(client(1), &alice, &[peer(1)]);
    let out = h.send(client(1), &send);
    assert_eq!(
        out.sent,
        vec![Sent {
            transport: Transport::Udp,
            src: relay.0,
            dst: peer(1),
            bytes: b"hello".to_vec()
        }]
    );
}
