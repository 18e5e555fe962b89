//! End to end, on every backend: a wildcard listener (`0.0.0.0:port`) on a host with two addresses on
//! one interface (issue 15). A client sending to either address gets every answer (Binding, Allocate,
//! relayed data) from that address, and the relay's own-address deny list covers every interface
//! address, including one that no configuration names.
//!
//! Runs in a network namespace the test creates (root only; skipped with a message otherwise), with no
//! route out, so nothing leaves the machine.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::{IpAddr, SocketAddr};

use common::netns::Netns;
use common::*;
use turnpike::policy::PeerPolicy;
use turnpike::wire::{Attribute, Method};

const CLIENT_IP: &str = "198.18.0.1";
/// The relay side's interface carries two addresses: a private-range one and a public one, which
/// is also the relay IP.
const LISTEN_A: &str = "198.18.0.2";
const LISTEN_B: &str = "203.0.114.10";
/// One more interface address that no configuration names.
const OTHER_IF_IP: &str = "203.0.114.99";

#[test]
fn a_wildcard_listener_answers_from_the_address_the_client_used() {
    let name = format!("tp-wild-{}", std::process::id());
    let Some(ns) = Netns::with_veth_pair(
        &name,
        &["198.18.0.1/15"],
        &["198.18.0.2/15", "203.0.114.10/32", "203.0.114.99/32"],
    ) else {
        return;
    };
    let name = ns.0.clone();
    // The whole scenario runs on a thread inside the namespace; the relay's threads inherit it.
    std::thread::spawn(move || {
        turnpike::sys::enter_netns(&name).unwrap();
        for (i, backend) in backends().into_iter().enumerate() {
            in_namespace(backend, 3478 + i as u16, 40000 + 1000 * i as u16);
        }
    })
    .join()
    .unwrap();
}

fn in_namespace(backend: turnpike::dataplane::BackendKind, port: u16, base: u16) {
    let mut s = settings(backend, 2, base);
    s.server.relay_ips = vec![LISTEN_B.parse().unwrap()];
    // The clients and the test peer live in the benchmarking range: allow it, as an operator would
    // allow an internal network. The relay's public addresses are not allowed.
    s.server.peer_policy = PeerPolicy::new().with_allow(vec!["198.18.0.0/15".parse().unwrap()]);
    s.listen = vec![SocketAddr::from(([0, 0, 0, 0], port))];
    let relay = start(s);
    let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
    // CLIENT_IP is an interface address of this namespace, so it is the relay's own: an ephemeral
    // port could land in the relay range, where an own address is refused (`peer_on` avoids both).
    let peer = peer_on(CLIENT_IP.parse().unwrap());

    for server in [at(LISTEN_A), at(LISTEN_B)] {
        // `Client::recv` asserts that every datagram comes from `server`: the peer's data reaches
        // the client from the address it used.
        let mut c = Client::new_on(CLIENT_IP, server, "alice", "alice-pass");
        let what = format!("{backend:?} via {server}");
        let relayed = binding_allocate_and_relay(&mut c, &peer, (b"out", b"back"), &what);
        assert_eq!(relayed.ip().to_string(), LISTEN_B);

        // Every interface address is own: refused as a peer at a service port, the listener port on
        // every address included, and anywhere on the public ones.
        for target in [
            SocketAddr::new(OTHER_IF_IP.parse().unwrap(), 53),
            SocketAddr::new(LISTEN_B.parse().unwrap(), 53),
            at(OTHER_IF_IP),
            at(LISTEN_A),
            at(CLIENT_IP),
        ] {
            let r = c.authed(
                Method::CREATE_PERMISSION,
                &[Attribute::XorPeerAddress(target)],
            );
            assert_eq!(
                Client::error_code(&r),
                Some(403),
                "{backend:?} via {server}: CreatePermission {target}"
            );
        }
        // An allowed-range address of the host at another port is open (the allow covers it).
        let open = SocketAddr::new(IpAddr::from([198, 18, 0, 2]), 9);
        let r = c.authed(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(open)],
        );
        assert_eq!(Client::error_code(&r), None, "{backend:?}: {open}");
    }
    relay.stop().unwrap();
}

const CLIENT_V6: &str = "2001:db8::1";
/// The relay side's two IPv6 addresses on one interface.
const LISTEN_V6_A: &str = "2001:db8::2";
const LISTEN_V6_B: &str = "2001:db8:1::10";

/// The same over IPv6: `[::]:port` answers Binding and Allocate, and relays peer data, from whichever
/// of the interface's two IPv6 addresses the client sent to.
#[test]
fn an_ipv6_wildcard_listener_answers_from_the_address_the_client_used() {
    let name = format!("tp-wild6-{}", std::process::id());
    let Some(ns) = Netns::with_veth_pair(
        &name,
        &["198.18.0.1/15"],
        &["198.18.0.2/15", "203.0.114.10/32"],
    ) else {
        return;
    };
    ns.add_v6_nodad("tpv0", &["2001:db8::1/64"]);
    ns.add_v6_nodad("tpv1", &["2001:db8::2/64", "2001:db8:1::10/128"]);
    let name = ns.0.clone();
    std::thread::spawn(move || {
        turnpike::sys::enter_netns(&name).unwrap();
        for (i, backend) in backends().into_iter().enumerate() {
            in_namespace_v6(backend, 3478 + i as u16, 40000 + 1000 * i as u16);
        }
    })
    .join()
    .unwrap();
}

fn in_namespace_v6(backend: turnpike::dataplane::BackendKind, port: u16, base: u16) {
    let mut s = settings(backend, 2, base);
    s.server.relay_ips = vec![LISTEN_B.parse().unwrap()];
    s.server.peer_policy = PeerPolicy::new().with_allow(vec!["198.18.0.0/15".parse().unwrap()]);
    s.listen = vec![SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))];
    let relay = start(s);
    let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
    let peer = peer_on(CLIENT_IP.parse().unwrap());
    for server in [at(LISTEN_V6_A), at(LISTEN_V6_B)] {
        // `Client::recv` asserts that every datagram comes from `server`.
        let mut c = Client::new_on(CLIENT_V6, server, "alice", "alice-pass");
        let what = format!("{backend:?} via {server}");
        let relayed = binding_allocate_and_relay(&mut c, &peer, (b"out6", b"back6"), &what);
        assert_eq!(relayed.ip().to_string(), LISTEN_B);
    }
    relay.stop().unwrap();
}
