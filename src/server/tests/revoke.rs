//! Revocation: REST credentials of a revoked identity are refused on their next authenticated request,
//! Refresh included, while other identities and later credentials keep working. By default the
//! identity's live allocations end at once; `terminate == false` only refuses new requests.

use super::*;

const RT_UDP: Attribute<'static> = Attribute::RequestedTransport(17);

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn revoked_identity_gets_401_on_its_next_request_and_on_refresh() {
    let mut h = Harness::new();
    let carol = Creds::rest(SECRET_NEW, "carol", UNIX0 + 3600);
    let dave = Creds::rest(SECRET_NEW, "dave", UNIX0 + 3600);
    h.allocate(client(1), &carol);
    h.allocate(client(2), &dave);

    h.server.revoke("carol", UNIX0 + 172_800, false);
    assert!(
        h.drain().commands.is_empty(),
        "without terminate nothing ends"
    );
    let out = h.request(client(1), Method::REFRESH, &[], Some(&carol));
    assert_eq!(out.error(), Some(401), "Refresh of a revoked identity");
    assert!(out.commands.is_empty(), "a refused request changes nothing");
    let out = h.request(
        client(1),
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer(1))],
        Some(&carol),
    );
    assert_eq!(out.error(), Some(401));
    // A new allocation with the same credential, or a fresh one minted before the horizon, is refused too.
    h.challenge(client(3));
    let out = h.request(client(3), Method::ALLOCATE, &[RT_UDP], Some(&carol));
    assert_eq!(out.error(), Some(401));
    assert_eq!(h.server.stats().revoked, 3);
    assert_eq!(
        h.server.allocation_count(),
        2,
        "nothing was allocated for client 3"
    );

    // Other identities are unaffected.
    h.challenge(client(2));
    let out = h.request(client(2), Method::REFRESH, &[], Some(&dave));
    assert_eq!(out.one().class(), Class::Success);

    // A credential expiring after the horizon is not covered by the revocation.
    let later = Creds::rest(SECRET_NEW, "carol", UNIX0 + 172_801);
    h.allocate(client(4), &later);

    // The revoked allocation is never refreshed again and ends at its lifetime.
    let out = h.advance(s(601));
    assert!(
        out.commands.iter().any(
            |c| matches!(c, Command::AllocationEnded { identity, .. } if &**identity == "carol")
        ),
        "{:?}",
        out.commands
    );
}

#[test]
fn lifting_a_revocation_restores_access_and_static_users_are_not_affected() {
    let mut h = Harness::new();
    let carol = Creds::rest(SECRET_NEW, "carol", UNIX0 + 3600);
    h.server.revoke("carol", UNIX0 + 3600, true);
    h.challenge(client(1));
    let out = h.request(client(1), Method::ALLOCATE, &[RT_UDP], Some(&carol));
    assert_eq!(
        out.error(),
        Some(401),
        "expiry equal to the horizon is revoked"
    );
    h.server.revoke("carol", 0, true);
    h.allocate(client(1), &carol);
    // A lift never ends anything, even when asked to terminate.
    h.server.revoke("carol", 0, true);
    assert!(h.drain().commands.is_empty());

    // Revocation applies to REST credentials (they carry the identity and an expiry), not static users.
    h.server.revoke("alice", u64::MAX, true);
    h.allocate(client(2), &Creds::alice());
    h.server.revoke("alice", u64::MAX, true);
    assert!(
        h.drain().commands.is_empty(),
        "a static user's allocation stays"
    );
    assert_eq!(h.server.allocation_count(), 2);
    assert_eq!(h.server.stats().revoked, 1);
}

#[test]
fn revoking_ends_the_identitys_live_allocations_with_their_permissions_and_channels() {
    let mut h = Harness::new();
    let carol = Creds::rest(SECRET_NEW, "carol", UNIX0 + 3600);
    let dave = Creds::rest(SECRET_NEW, "dave", UNIX0 + 3600);
    let later = Creds::rest(SECRET_NEW, "carol", UNIX0 + 172_801);
    let (relay, id) = h.allocate(client(1), &carol);
    h.permit(client(1), &carol, &[peer(1)]);
    let out = h.bind(client(1), &carol, 0x4000, peer(2));
    assert_eq!(out.one().class(), Class::Success);
    let (_, dave_id) = h.allocate(client(2), &dave);
    let (_, later_id) = h.allocate(client(3), &later);

    h.server.revoke("carol", UNIX0 + 172_800, true);
    let out = h.drain();
    let c = &out.commands;
    assert!(
        c.iter().any(
            |c| matches!(c, Command::RemovePermission { allocation, relay: r, peer: p }
            if *allocation == id && *r == relay && *p == peer(1).ip())
        ),
        "{c:?}"
    );
    assert!(
        c.iter().any(
            |c| matches!(c, Command::RemoveChannel { allocation, relay: r, .. }
            if *allocation == id && *r == relay)
        ),
        "{c:?}"
    );
    assert!(
        c.iter()
            .any(|c| matches!(c, Command::CloseRelay { allocation, relay: r }
            if *allocation == id && *r == relay)),
        "{c:?}"
    );
    assert_eq!(
        c.last(),
        Some(&Command::AllocationEnded {
            allocation: id,
            identity: "carol".into(),
            reason: EndReason::Revoked,
        })
    );
    assert!(
        c.iter()
            .all(|c| !matches!(c, Command::AllocationEnded { allocation, .. }
            if *allocation == dave_id || *allocation == later_id)),
        "other identities and credentials past the horizon keep their allocations: {c:?}"
    );
    assert_eq!(h.server.allocation_count(), 2);

    // The client's next request finds no allocation.
    let out = h.request(client(1), Method::REFRESH, &[], Some(&carol));
    assert_eq!(out.error(), Some(401));
    // Revoking again ends nothing more.
    h.server.revoke("carol", UNIX0 + 172_800, true);
    assert!(h.drain().commands.is_empty());
}

#[test]
fn allocation_identity_and_creation_and_error_counters() {
    let mut h = Harness::new();
    let (_, id) = h.allocate(client(1), &Creds::rest(SECRET_NEW, "erin", UNIX0 + 60));
    assert_eq!(h.server.allocation_identity(id), Some("erin"));
    assert_eq!(h.server.stats().allocations_created, 1);
    h.challenge(client(2));
    let out = h.request(client(2), Method::ALLOCATE, &[], Some(&Creds::alice()));
    assert_eq!(out.error(), Some(400));
    let stats = h.server.stats();
    assert_eq!(stats.allocate_errors[ErrorCode::BadRequest.index()], 1);
    assert_eq!(stats.allocate_errors.iter().sum::<u64>(), 1);
}
