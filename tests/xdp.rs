//! The XDP fast path in network namespaces this test creates (issue 13, phase 1): a client, a relay and a
//! peer namespace joined by two veth pairs, addressed only in 198.18.0.0/15 and 2001:2::/48 (benchmarking
//! ranges), with no route out.
//!
//! ```text
//!  client ns            relay ns (XDP on rc and rp)              peer ns
//!  c0 198.18.1.2 ─veth─ rc 198.18.1.1 (listener)   rp 198.19.2.1 (relayed) ─veth─ p0 198.19.2.2
//!     2001:2:0:1::2        2001:2:0:1::1              2001:2:0:2::1                 2001:2:0:2::2
//! ```
//!
//! Needs root (CAP_NET_ADMIN and CAP_BPF); without them each test says so and returns. The first tests
//! write channel entries by hand through `XdpTables`, the seam the route updates call; the others run
//! the relay binary, whose route updates program the maps (`xdp::Mirror`).
#![cfg(feature = "xdp")]
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use turnpike::dataplane::BackendKind;
use turnpike::route::{AllocationId, ChannelNumber, ClientKey, RelayId, RouteUpdate};
use turnpike::sys::xdp::enter_netns;
use turnpike::wire::{Attribute, Method};
use turnpike::xdp::{attach_pass_program, ChannelKey, FastPath, Mirror, XdpMode, XdpSettings};

mod common;
use common::Client;

/// CAP_NET_ADMIN (12) and CAP_BPF (39) or CAP_SYS_ADMIN (21) in the effective set.
fn privileged() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    has(12) && (has(39) || has(21))
}

fn skip_unprivileged(test: &str) -> bool {
    if privileged() {
        return false;
    }
    eprintln!("{test}: SKIPPED: needs CAP_NET_ADMIN and CAP_BPF (run as root) for network namespaces and XDP");
    true
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {args:?}: {e} (scripts/test.sh installs iproute2 and ethtool)")
        });
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces that are deleted when this is dropped (also when the test panics).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

struct Topology {
    client: String,
    relay: String,
    peer: String,
    _namespaces: Namespaces,
}

fn topology(tag: &str) -> Topology {
    let id = std::process::id();
    let (client, relay, peer) = (
        format!("tpx-{tag}c-{id}"),
        format!("tpx-{tag}r-{id}"),
        format!("tpx-{tag}p-{id}"),
    );
    for ns in [&client, &relay, &peer] {
        // A leftover of a killed run of this pid, if any.
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", ns]);
    }
    let namespaces = Namespaces(vec![client.clone(), relay.clone(), peer.clone()]);
    run(&[
        "ip", "link", "add", "c0", "netns", &client, "type", "veth", "peer", "name", "rc", "netns",
        &relay,
    ]);
    run(&[
        "ip", "link", "add", "p0", "netns", &peer, "type", "veth", "peer", "name", "rp", "netns",
        &relay,
    ]);
    let addrs: [(&str, &str, &str, &str); 4] = [
        (&client, "c0", "198.18.1.2/24", "2001:2:0:1::2/64"),
        (&relay, "rc", "198.18.1.1/24", "2001:2:0:1::1/64"),
        (&relay, "rp", "198.19.2.1/24", "2001:2:0:2::1/64"),
        (&peer, "p0", "198.19.2.2/24", "2001:2:0:2::2/64"),
    ];
    for (ns, dev, v4, v6) in addrs {
        run(&["ip", "-n", ns, "addr", "add", v4, "dev", dev]);
        run(&["ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
        // Locally sent datagrams would leave with CHECKSUM_PARTIAL (only the pseudo header summed);
        // the XDP program updates checksums incrementally, so it needs them complete.
        run(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    // bpf_fib_lookup forwards only where forwarding is on, and needs the neighbours resolved.
    run(&[
        "ip",
        "netns",
        "exec",
        &relay,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    run(&[
        "ip",
        "netns",
        "exec",
        &relay,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    let mac = |ns: &str, dev: &str| {
        output(&[
            "ip",
            "netns",
            "exec",
            ns,
            "cat",
            &format!("/sys/class/net/{dev}/address"),
        ])
        .trim()
        .to_string()
    };
    let (client_mac, peer_mac) = (mac(&client, "c0"), mac(&peer, "p0"));
    for (ip, m, dev) in [
        ("198.18.1.2", &client_mac, "rc"),
        ("2001:2:0:1::2", &client_mac, "rc"),
        ("198.19.2.2", &peer_mac, "rp"),
        ("2001:2:0:2::2", &peer_mac, "rp"),
    ] {
        run(&[
            "ip",
            "-n",
            &relay,
            "neigh",
            "replace",
            ip,
            "lladdr",
            m,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    Topology {
        client,
        relay,
        peer,
        _namespaces: namespaces,
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn bind(ns: &str, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = in_netns(ns, move || UdpSocket::bind(addr).unwrap());
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).expect("datagram within 2 s");
    (buf[..n].to_vec(), from)
}

/// Nothing arrives at `s` (checked after the datagrams that would have come have been seen elsewhere).
fn silent(s: &UdpSocket, what: &str) {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what} received {other:?}, but XDP should have carried it"),
    }
    s.set_nonblocking(false).unwrap();
}

fn channel_data(channel: u16, payload: &[u8], pad: usize) -> Vec<u8> {
    let mut m = channel.to_be_bytes().to_vec();
    m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    m.extend_from_slice(payload);
    m.extend(std::iter::repeat(0u8).take(pad));
    m
}

struct Family {
    client: &'static str,
    listener: &'static str,
    relayed: &'static str,
    peer: &'static str,
}

const V4: Family = Family {
    client: "198.18.1.2:40000",
    listener: "198.18.1.1:3478",
    relayed: "198.19.2.1:50000",
    peer: "198.19.2.2:7000",
};
const V6: Family = Family {
    client: "[2001:2:0:1::2]:40000",
    listener: "[2001:2:0:1::1]:3478",
    relayed: "[2001:2:0:2::1]:50000",
    peer: "[2001:2:0:2::2]:7000",
};

#[test]
fn channel_data_is_forwarded_in_xdp_both_ways_and_falls_back_when_removed() {
    if skip_unprivileged("xdp forwarding") {
        return;
    }
    let topo = topology("f");
    let mut fast = in_netns(&topo.relay, || {
        FastPath::start(&XdpSettings {
            interfaces: vec!["rc".into(), "rp".into()],
            mode: XdpMode::Native,
        })
    })
    .unwrap()
    .expect("mode native attaches or fails");
    // Frames XDP sends into a veth are dropped unless its far end runs XDP too.
    let _pass_client = in_netns(&topo.client, || attach_pass_program("c0").unwrap());
    let _pass_peer = in_netns(&topo.peer, || attach_pass_program("p0").unwrap());

    for (fam, name) in [(V4, "IPv4"), (V6, "IPv6")] {
        let client = bind(&topo.client, fam.client);
        let peer = bind(&topo.peer, fam.peer);
        // The userspace side: the listener and the allocation's relay socket.
        let listener = bind(&topo.relay, fam.listener);
        let relay_socket = bind(&topo.relay, fam.relayed);
        let (listener_addr, relayed, peer_addr) = (
            listener.local_addr().unwrap(),
            relay_socket.local_addr().unwrap(),
            peer.local_addr().unwrap(),
        );
        let key = ChannelKey {
            client: client.local_addr().unwrap(),
            listener: listener_addr,
            channel: 0x4001,
        };
        let tables = fast.tables();
        tables.add_relay(relayed).unwrap();
        assert!(tables.add_channel(key, relayed, peer_addr).unwrap());
        let before = tables.paths().unwrap();

        // Client → peer: padded (5 + 3) and unpadded (8) ChannelData; the peer sees the bare payload
        // from the relayed address.
        for (payload, pad) in [(&b"hello"[..], 3), (&b"12345678"[..], 0)] {
            client
                .send_to(&channel_data(0x4001, payload, pad), listener_addr)
                .unwrap();
            let (got, from) = recv(&peer);
            assert_eq!(got, payload, "{name}: payload at the peer");
            assert_eq!(from, relayed, "{name}: the peer sees the relayed address");
        }
        // Peer → client: the client sees ChannelData from the listener address.
        for payload in [&b"odd"[..], &b"from the peer"[..]] {
            peer.send_to(payload, relayed).unwrap();
            let (got, from) = recv(&client);
            assert_eq!(
                got,
                channel_data(0x4001, payload, 0),
                "{name}: ChannelData at the client"
            );
            assert_eq!(from, listener_addr, "{name}: the client sees its listener");
        }
        silent(&listener, "the listener");
        silent(&relay_socket, "the relay socket");
        let tables = fast.tables();
        let after = tables.paths().unwrap();
        assert_eq!(
            after.xdp_to_peer - before.xdp_to_peer,
            2,
            "{name}: XDP path counter"
        );
        assert_eq!(
            after.xdp_to_client - before.xdp_to_client,
            2,
            "{name}: XDP path counter"
        );
        let c = tables.counters(relayed).unwrap();
        assert_eq!((c.to_peer_bytes, c.to_peer_packets), (13, 2), "{name}");
        assert_eq!((c.to_client_bytes, c.to_client_packets), (16, 2), "{name}");

        // Without the entry, the same datagrams reach the userspace sockets unchanged.
        tables.remove_channel(key, relayed, peer_addr).unwrap();
        let cd = channel_data(0x4001, b"now userspace", 3);
        client.send_to(&cd, listener_addr).unwrap();
        let (got, from) = recv(&listener);
        assert_eq!(
            (got, from),
            (cd, key.client),
            "{name}: the listener gets it"
        );
        peer.send_to(b"to userspace", relayed).unwrap();
        let (got, from) = recv(&relay_socket);
        assert_eq!(
            (got.as_slice(), from),
            (&b"to userspace"[..], peer_addr),
            "{name}"
        );
        let passed = fast.tables().paths().unwrap();
        assert_eq!(
            passed.xdp_to_peer, after.xdp_to_peer,
            "{name}: nothing more in XDP"
        );
        assert_eq!(
            passed.xdp_to_client, after.xdp_to_client,
            "{name}: nothing more in XDP"
        );
        assert!(
            passed.pass_no_entry >= after.pass_no_entry + 2,
            "{name}: passed as unknown"
        );

        // Ending the relay frees everything; its retired meter settles into its final counters.
        let tables = fast.tables();
        assert!(tables.add_channel(key, relayed, peer_addr).unwrap());
        let (retired, removed) = tables.remove_relay(relayed).expect("a meter");
        removed.unwrap();
        let [Some(Ok(last))] = &tables.settle(&[retired], false)[..] else {
            panic!("{name}: one reading");
        };
        assert_eq!(
            (last.to_peer_bytes, last.to_client_bytes),
            (13, 16),
            "{name}"
        );
        peer.send_to(b"after the end", relayed).unwrap();
        let (got, _) = recv(&relay_socket);
        assert_eq!(got, b"after the end", "{name}: no entry outlives its relay");
    }
    fast.detach_links().unwrap();
    let link = output(&["ip", "-n", &topo.relay, "link", "show", "dev", "rc"]);
    assert!(!link.contains("xdp"), "detached on drain: {link}");
    fast.detach_links().unwrap();
    drop(fast);
}

/// A map deletion that fails when a relay is removed: the relay's entries stay on record and are
/// deleted again before its meter is read, so that what they still forward meanwhile is billed, the
/// allocation reports once, and no entry outlives the relay. On the last settle (the process stops)
/// a relay whose entries cannot be deleted reports anyway, so that its usage record is not held.
#[test]
fn a_relay_whose_map_deletion_fails_is_removed_later_and_billed_in_full() {
    if skip_unprivileged("xdp removal retry") {
        return;
    }
    let topo = topology("d");
    let fast = in_netns(&topo.relay, || {
        FastPath::start(&XdpSettings {
            interfaces: vec!["rc".into(), "rp".into()],
            mode: XdpMode::Native,
        })
    })
    .unwrap()
    .expect("mode native attaches or fails");
    let _pass_client = in_netns(&topo.client, || attach_pass_program("c0").unwrap());
    let _pass_peer = in_netns(&topo.peer, || attach_pass_program("p0").unwrap());
    let client = bind(&topo.client, V4.client);
    let peer = bind(&topo.peer, V4.peer);
    let listener = bind(&topo.relay, V4.listener);
    let relay_socket = bind(&topo.relay, V4.relayed);
    let (listener_addr, relayed, peer_addr) = (
        listener.local_addr().unwrap(),
        relay_socket.local_addr().unwrap(),
        peer.local_addr().unwrap(),
    );
    let mut mirror = Mirror::new(Some(fast), vec![Some(listener_addr)]);
    let channel = ChannelNumber::new(0x4001).unwrap();
    let open = |mirror: &mut Mirror, id: RelayId, allocation: AllocationId| {
        for update in [
            RouteUpdate::AddRelay {
                id,
                allocation,
                addr: relayed,
                client: ClientKey {
                    client: client.local_addr().unwrap(),
                    listener: 0,
                },
            },
            RouteUpdate::AddPermission {
                relay: id,
                peer: peer_addr.ip(),
            },
            RouteUpdate::AddChannel {
                relay: id,
                channel,
                peer: peer_addr,
            },
        ] {
            assert_eq!(mirror.apply(0, &update), None);
        }
    };
    let through_xdp = |payload: &[u8]| {
        client
            .send_to(&channel_data(0x4001, payload, 0), listener_addr)
            .unwrap();
        let (got, from) = recv(&peer);
        assert_eq!(
            (got.as_slice(), from),
            (payload, relayed),
            "forwarded in XDP"
        );
    };

    // What a settle reported, client → peer.
    let to_peer = |settled: Vec<(AllocationId, turnpike::route::Counters)>| {
        settled
            .iter()
            .map(|(a, c)| (*a, c.to_peer_packets, c.to_peer_bytes))
            .collect::<Vec<_>>()
    };
    let (id, allocation) = (RelayId(1), AllocationId(7));
    open(&mut mirror, id, allocation);
    through_xdp(b"before");
    // The deletion at the removal fails, and so does the retry at the first settle.
    mirror.fail_next_deletions(2);
    let failures = mirror.failures();
    assert_eq!(
        mirror.apply(0, &RouteUpdate::RemoveRelay { id }),
        Some(allocation),
        "the meter is retired all the same"
    );
    assert_eq!(mirror.failures(), failures + 1, "the failure is counted");
    through_xdp(b"during");
    assert_eq!(
        mirror.settle(false),
        vec![],
        "no reading while an entry can still add to the meter"
    );
    assert!(mirror.has_retired(), "settled again later");
    through_xdp(b"still!");
    assert_eq!(
        to_peer(mirror.settle(false)),
        vec![(allocation, 3, 18)],
        "once, with what the stale entry forwarded"
    );
    assert!(!mirror.has_retired());
    assert_eq!(mirror.settle(false), vec![], "reported once");
    // The entry is out of the kernel: the next ChannelData reaches the userspace listener.
    let cd = channel_data(0x4001, b"after", 3);
    client.send_to(&cd, listener_addr).unwrap();
    assert_eq!(recv(&listener).0, cd, "the listener gets it");
    silent(&peer, "the peer");

    // A relay whose entries cannot be deleted at all still reports on the last settle.
    let (id, allocation) = (RelayId(2), AllocationId(8));
    open(&mut mirror, id, allocation);
    through_xdp(b"second");
    mirror.fail_next_deletions(u32::MAX);
    assert_eq!(
        mirror.apply(0, &RouteUpdate::RemoveRelay { id }),
        Some(allocation)
    );
    assert_eq!(mirror.settle(false), vec![]);
    assert_eq!(
        to_peer(mirror.settle(true)),
        vec![(allocation, 1, 6)],
        "the last settle reads it anyway"
    );
    assert!(!mirror.has_retired());
    mirror.fail_next_deletions(0);
    mirror.detach();
}

#[test]
fn relay_to_relay_stays_in_userspace() {
    if skip_unprivileged("xdp relay-to-relay") {
        return;
    }
    let topo = topology("r");
    let mut fast = in_netns(&topo.relay, || {
        FastPath::start(&XdpSettings {
            interfaces: vec!["rc".into(), "rp".into()],
            mode: XdpMode::Native,
        })
    })
    .unwrap()
    .unwrap();
    let _pass_client = in_netns(&topo.client, || attach_pass_program("c0").unwrap());
    let _pass_peer = in_netns(&topo.peer, || attach_pass_program("p0").unwrap());
    let client = bind(&topo.client, V4.client);
    let peer = bind(&topo.peer, V4.peer);
    let listener = bind(&topo.relay, V4.listener);
    let relayed = bind(&topo.relay, V4.relayed).local_addr().unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let key = ChannelKey {
        client: client.local_addr().unwrap(),
        listener: listener.local_addr().unwrap(),
        channel: 0x4002,
    };
    let tables = fast.tables();
    tables.add_relay(relayed).unwrap();
    // The peer address is itself a live relayed address of this host.
    tables.add_relay(peer_addr).unwrap();
    assert!(tables.add_channel(key, relayed, peer_addr).unwrap());
    let cd = channel_data(0x4002, b"r2r", 1);
    client.send_to(&cd, key.listener).unwrap();
    let (got, _) = recv(&listener);
    assert_eq!(got, cd, "relay-to-relay ChannelData goes to the listener");
    let paths = fast.tables().paths().unwrap();
    assert_eq!(paths.xdp_to_peer, 0);
    assert!(paths.pass_relay_to_relay >= 1);
}

/// Holds the program attached until killed: run by `kill_9_detaches` as a child process.
#[test]
#[ignore = "child process of kill_9_detaches"]
fn xdp_child_holds_link() {
    let Ok(ns) = std::env::var("TURNPIKE_XDP_CHILD_NS") else {
        return;
    };
    enter_netns(&ns).unwrap();
    let _fast = FastPath::start(&XdpSettings {
        interfaces: vec!["rc".into()],
        mode: XdpMode::Native,
    })
    .unwrap()
    .unwrap();
    println!("XDP-ATTACHED");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn kill_9_detaches() {
    if skip_unprivileged("xdp kill -9") {
        return;
    }
    let topo = topology("k");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "xdp_child_holds_link",
            "--ignored",
            "--nocapture",
        ])
        .env("TURNPIKE_XDP_CHILD_NS", &topo.relay)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("XDP-ATTACHED") {
                let _ = tx.send(());
            }
        }
    });
    let attached = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    let link = output(&["ip", "-n", &topo.relay, "link", "show", "dev", "rc"]);
    if !attached {
        let _ = child.kill();
        panic!("the child did not attach: {link}");
    }
    assert!(
        link.contains("xdp"),
        "attached while the loader lives: {link}"
    );
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let link = output(&["ip", "-n", &topo.relay, "link", "show", "dev", "rc"]);
        if !link.contains("xdp") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still attached after kill -9: {link}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn auto_keeps_userspace_and_native_fails_where_attaching_fails() {
    // No privileges or no such interface: either way nothing attaches.
    let missing = XdpSettings {
        interfaces: vec!["tpx-nonexistent".into()],
        mode: XdpMode::Auto,
    };
    assert!(
        FastPath::start(&missing).unwrap().is_none(),
        "auto keeps userspace"
    );
    let native = XdpSettings {
        mode: XdpMode::Native,
        ..missing.clone()
    };
    let err = FastPath::start(&native).unwrap_err().to_string();
    assert!(err.contains("XDP"), "native names what failed: {err}");
    let off = XdpSettings {
        mode: XdpMode::Off,
        ..missing
    };
    assert!(FastPath::start(&off).unwrap().is_none());
}

/// The API access key of the relays [`start_binary`] starts (admin role too: no `admin_keys`).
const API_KEY_B64: &str = "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleQ==";

/// The relay process in its namespace; killed when dropped (a failed assertion included).
struct Binary(std::process::Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrape(ns: &str, api: SocketAddr) -> String {
    in_netns(ns, move || {
        ureq::get(&format!("http://{api}/metrics"))
            .timeout(Duration::from_secs(2))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default()
    })
}

/// The value of the metric line starting with `name` (labels included), or 0.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// (identity, end_reason, to_peer_bytes, to_peer_packets, to_client_bytes, to_client_packets) per row.
type UsageRow = (String, Option<String>, i64, i64, i64, i64);

fn usage_rows(db: &std::path::Path) -> Vec<UsageRow> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut q = conn
        .prepare(
            "SELECT identity, end_reason, to_peer_bytes, to_peer_packets, to_client_bytes, \
             to_client_packets FROM allocations ORDER BY allocation",
        )
        .unwrap();
    let rows = q
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

/// The real binary in the relay namespace, on each userspace backend, with `[xdp]` on (native, on rc
/// and rp) and off: byte-exact ChannelData both ways on IPv4 and IPv6 through allocations made over
/// the wire; with XDP on, the XDP path counter moves and the workers relay nothing; a channel bound
/// to another allocation's relayed address (relay-to-relay) stays in userspace; after the
/// allocations end (Refresh lifetime 0) nothing is forwarded to their peers any more; the SQLite usage
/// rows are exact either way; and after the relay exits the interfaces carry no XDP program.
#[test]
fn the_relay_binary_forwards_bound_channels_in_xdp_and_bills_exactly() {
    if skip_unprivileged("xdp through the relay binary") {
        return;
    }
    for backend in common::backends() {
        for xdp in [true, false] {
            relay_binary_run(backend, xdp);
        }
    }
}

fn relay_binary_run(backend: BackendKind, xdp: bool) {
    let name = format!("{backend:?}, xdp {}", if xdp { "on" } else { "off" });
    let topo = topology(if xdp { "b" } else { "u" });
    let dir = std::env::temp_dir().join(format!(
        "turnpike-xdp-{}-{backend:?}-{xdp}",
        std::process::id()
    ));
    let (mut relay, api, db) = start_binary(&topo, &dir, backend, xdp, "", &name);
    let attached = output(&["ip", "-n", &topo.relay, "link", "show", "dev", "rc"]);
    assert_eq!(attached.contains("xdp"), xdp, "{name}: {attached}");
    // Frames XDP sends into a veth are dropped unless its far end runs XDP too.
    let _pass = xdp.then(|| {
        (
            in_netns(&topo.client, || attach_pass_program("c0").unwrap()),
            in_netns(&topo.peer, || attach_pass_program("p0").unwrap()),
        )
    });

    let mut expected = Vec::new();
    let mut clients = Vec::new();
    for (fam, family_attr, label) in [(V4, 0x01u8, "IPv4"), (V6, 0x02u8, "IPv6")] {
        let server: SocketAddr = fam.listener.parse().unwrap();
        let client_ip = fam.client.parse::<SocketAddr>().unwrap().ip().to_string();
        let mut client = in_netns(&topo.client, move || {
            Client::new_on(&client_ip, server, "alice", "alice-pass")
        });
        let resp = client.authed(
            Method::ALLOCATE,
            &[
                Attribute::RequestedTransport(17),
                Attribute::RequestedAddressFamily(family_attr),
            ],
        );
        let m = turnpike::wire::Message::parse(&resp).unwrap();
        let relayed = m
            .attrs
            .xor_relayed_address
            .unwrap_or_else(|| panic!("{name} {label}: allocate failed: {:?}", m.attrs.error_code));
        let peer = bind(&topo.peer, fam.peer);
        let peer_addr = peer.local_addr().unwrap();
        client.bind(0x4001, peer_addr);

        // Client → peer, then peer → client; byte-exact, one at a time (no loss on the veths).
        let (mut up, mut down) = ((0i64, 0i64), (0i64, 0i64));
        for i in 0..20u8 {
            let payload = vec![i; 1 + usize::from(i) * 7];
            client.send_channel(0x4001, &payload);
            let (got, from) = recv(&peer);
            assert_eq!(got, payload, "{name} {label}: payload at the peer");
            assert_eq!(from, relayed, "{name} {label}: from the relayed address");
            up = (up.0 + payload.len() as i64, up.1 + 1);
            let back = vec![0xa0 ^ i; 3 + usize::from(i) * 5];
            peer.send_to(&back, relayed).unwrap();
            let got = client.recv();
            assert_eq!(
                got,
                channel_data(0x4001, &back, 0),
                "{name} {label}: ChannelData at the client"
            );
            down = (down.0 + back.len() as i64, down.1 + 1);
        }
        expected.push((up, down));
        clients.push((client, peer, relayed, label));
    }
    let text = scrape(&topo.relay, api);
    let (xdp_packets, userspace) = (
        metric(&text, "turnpike_path_packets_total{path=\"xdp\"}"),
        metric(&text, "turnpike_path_packets_total{path=\"userspace\"}"),
    );
    if xdp {
        assert_eq!(
            (xdp_packets, userspace),
            (80, 0),
            "{name}: every datagram took XDP\n{text}"
        );
    } else {
        assert_eq!(
            (xdp_packets, userspace),
            (0, 80),
            "{name}: every datagram took userspace"
        );
    }

    // Relay-to-relay: a channel from the IPv4 allocation to a second IPv4 allocation's relayed address
    // stays on the userspace path (it arrives there as a Data indication).
    let server: SocketAddr = V4.listener.parse().unwrap();
    let mut other = in_netns(&topo.client, move || {
        Client::new_on("198.18.1.2", server, "alice", "alice-pass")
    });
    let other_relayed = other.allocate();
    other.permit(clients[0].2);
    clients[0].0.bind(0x4002, other_relayed);
    clients[0].0.send_channel(0x4002, b"relay to relay");
    let indication = other.recv();
    let m = turnpike::wire::Message::parse(&indication).unwrap();
    assert_eq!(
        m.attrs.data,
        Some(&b"relay to relay"[..]),
        "{name}: relay-to-relay arrives as a Data indication"
    );
    expected[0].0 .0 += 14;
    expected[0].0 .1 += 1;
    expected.push(((0, 0), (14, 1)));
    let text = scrape(&topo.relay, api);
    assert_eq!(
        metric(&text, "turnpike_path_packets_total{path=\"xdp\"}"),
        xdp_packets,
        "{name}: relay-to-relay did not take XDP"
    );

    // End the first two allocations: their channels leave both tables, so nothing reaches the
    // client afterwards (neither path), and the peer's datagram is dropped.
    for (client, peer, relayed, label) in &mut clients {
        let r = client.authed(Method::REFRESH, &[Attribute::Lifetime(0)]);
        Client::expect_success(&r);
        peer.send_to(b"after the end", *relayed).unwrap();
        client
            .sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 2048];
        assert!(
            client.sock.recv_from(&mut buf).is_err(),
            "{name} {label}: nothing is relayed after the allocation ended"
        );
    }
    // Stop the relay (SIGTERM; drain 0): final rows written, programs detached.
    stop(&mut relay, &name);
    for dev in ["rc", "rp"] {
        let link = output(&["ip", "-n", &topo.relay, "link", "show", "dev", dev]);
        assert!(
            !link.contains("xdp"),
            "{name}: {dev} is clean after exit: {link}"
        );
    }
    let rows = usage_rows(&db);
    assert_eq!(
        rows.len(),
        3,
        "{name}: {rows:?}; the relay said: {}",
        std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
    );
    for (row, ((up_b, up_p), (down_b, down_p))) in rows.iter().zip(&expected) {
        assert_eq!(
            row,
            &(
                "alice".to_string(),
                Some("ended".to_string()),
                *up_b,
                *up_p,
                *down_b,
                *down_p
            ),
            "{name}: exact usage"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the relay binary in `topo`'s relay namespace with its files in `dir` (usage database,
/// config, stderr), `extra` appended to the config; returns once /metrics answers.
fn start_binary(
    topo: &Topology,
    dir: &std::path::Path,
    backend: BackendKind,
    xdp: bool,
    extra: &str,
    name: &str,
) -> (Binary, SocketAddr, std::path::PathBuf) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let db = dir.join("usage.db");
    let api: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let backend_key = match backend {
        BackendKind::Epoll => "epoll",
        BackendKind::IoUring => "io_uring",
    };
    let xdp_section = if xdp {
        "[xdp]\ninterfaces = [\"rc\", \"rp\"]\nmode = \"native\"\n"
    } else {
        ""
    };
    let config = format!(
        "listen = [\"198.18.1.1:3478\", \"[2001:2:0:1::1]:3478\"]\nworkers = 2\npin_workers = false\n\
         drain_seconds = 0\nbackend = \"{backend_key}\"\n\
         [relay]\naddresses = [\"198.19.2.1\", \"2001:2:0:2::1\"]\nport_min = 50000\nport_max = 50099\n\
         [[users]]\nname = \"alice\"\npassword = \"alice-pass\"\n\
         [peers]\nallow = [\"198.19.2.0/24\", \"2001:2:0:2::/64\"]\n\
         [api]\nlisten = \"{api}\"\naccess_keys = [\"{API_KEY_B64}\"]\n\
         [usage]\ndatabase = \"{db}\"\ncheckpoint_seconds = 1\n\
         {xdp_section}{extra}",
        db = db.display(),
    );
    let path = dir.join("turnpike.toml");
    std::fs::write(&path, config).unwrap();
    let log = dir.join("stderr");
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.relay])
        .arg(env!("CARGO_BIN_EXE_turnpike"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut relay = Binary(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !scrape(&topo.relay, api).contains("turnpike_allocations") {
        if let Ok(Some(status)) = relay.0.try_wait() {
            panic!(
                "{name}: the relay exited with {status}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{name}: no /metrics within 15 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    (relay, api, db)
}

/// The config file [`start_binary`] wrote in `dir`.
fn config_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("turnpike.toml")
}

/// Datagrams "probe" from `peer` to `relayed`, 200 ms apart, until one reaches `client` other than as
/// ChannelData on `channel` (returned), or none does (`None`, after 1.2 s of silence, so that a late one
/// is still counted rather than taken for a drop): with how many arrived as ChannelData before.
fn probe_until_not_channel(
    client: &Client,
    peer: &UdpSocket,
    relayed: SocketAddr,
    channel: u16,
    name: &str,
) -> (u64, Option<Vec<u8>>) {
    client
        .sock
        .set_read_timeout(Some(Duration::from_millis(1200)))
        .unwrap();
    let expected = channel_data(channel, b"probe", 0);
    let mut delivered = 0;
    for _ in 0..100 {
        peer.send_to(b"probe", relayed).unwrap();
        let mut buf = [0u8; 2048];
        match client.sock.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n] == expected[..] => {
                delivered += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok((n, _)) => return (delivered, Some(buf[..n].to_vec())),
            Err(_) => return (delivered, None),
        }
    }
    panic!("{name}: the channel was still relaying after 100 probes");
}

/// With XDP on, through the binary: a channel's expiry takes it out of the kernel (the peer's datagrams
/// then reach the client as Data indications from the userspace path, its permission being live), and
/// a reload whose peer policy denies the peer (a revocation of its permission and channel) stops the
/// forwarding on both paths. The XDP counter moves only while the channel is bound, and the usage row
/// holds exactly what both paths relayed.
#[test]
fn expiry_and_a_policy_revocation_take_the_kernel_entry_out() {
    if skip_unprivileged("xdp expiry and revocation") {
        return;
    }
    for backend in common::backends() {
        let name = format!("{backend:?}");
        let Scene {
            topo,
            dir,
            mut relay,
            api,
            db,
            _pass,
            mut client,
            relayed,
            peer,
        } = Scene::start("e", "expiry", backend, "[lifetimes]\nchannel = 2\n", &name);
        let peer_addr = peer.local_addr().unwrap();
        let paths = || paths(&topo, api);
        let reach = |want| paths_reach(&topo, api, want);

        // Expiry: bound, forwarded in XDP; once the channel expires the peer's datagram comes up
        // through userspace as a Data indication (the permission lives on), and XDP no longer counts.
        client.bind(0x4001, peer_addr);
        let (in_xdp, got) = probe_until_not_channel(&client, &peer, relayed, 0x4001, &name);
        let got = got.expect("after the channel expired, a Data indication");
        let m = turnpike::wire::Message::parse(&got).unwrap();
        assert_eq!(m.attrs.data, Some(&b"probe"[..]), "{name}: Data indication");
        assert!(in_xdp >= 1, "{name}: the bound channel relayed");
        assert_eq!(
            reach((in_xdp, 1)),
            (in_xdp, 1),
            "{name}: the channel in XDP, the indication not"
        );
        peer.send_to(b"probe", relayed).unwrap();
        let _indication = client.recv();
        assert_eq!(
            reach((in_xdp, 2)),
            (in_xdp, 2),
            "{name}: no XDP after the expiry"
        );

        // Revocation: bind a second peer (RFC 8656 §12: the expired binding's peer stays reserved to its
        // channel), then reload a policy that denies the peers' range: the permission and channel go
        // from both tables, so nothing reaches the client on either path.
        let peer = bind(&topo.peer, "198.19.2.2:7001");
        client.bind(0x4002, peer.local_addr().unwrap());
        peer.send_to(b"probe", relayed).unwrap();
        assert_eq!(client.recv(), channel_data(0x4002, b"probe", 0), "{name}");
        assert_eq!(
            reach((in_xdp + 1, 2)),
            (in_xdp + 1, 2),
            "{name}: rebound in XDP"
        );
        let config = std::fs::read_to_string(config_path(&dir)).unwrap().replace(
            "allow = [\"198.19.2.0/24\", \"2001:2:0:2::/64\"]",
            "allow = [\"2001:2:0:2::/64\"]",
        );
        std::fs::write(config_path(&dir), config).unwrap();
        run(&["kill", "-HUP", &relay.0.id().to_string()]);
        let (before_reload, got) = probe_until_not_channel(&client, &peer, relayed, 0x4002, &name);
        assert_eq!(
            got, None,
            "{name}: after the revocation nothing reaches the client"
        );
        let after = reach((in_xdp + 1 + before_reload, 2));
        assert_eq!(
            after,
            (in_xdp + 1 + before_reload, 2),
            "{name}: all of it in XDP"
        );
        peer.send_to(b"probe", relayed).unwrap();
        client
            .sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(client.sock.recv_from(&mut buf).is_err(), "{name}: dropped");
        assert_eq!(paths(), after, "{name}: neither path after the revocation");

        // The bill: every probe that reached the client, on either path (5 bytes each), nothing else.
        stop(&mut relay, &name);
        let packets = (after.0 + after.1) as i64;
        let row = (
            "alice".to_string(),
            Some("ended".to_string()),
            0,
            0,
            5 * packets,
            packets,
        );
        assert_eq!(usage_rows(&db), vec![row], "{name}: exact usage");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The REST secret of the revocation test (`[rest] secrets`).
const REST_SECRET: &str = "xdp-revoke-secret";

/// A revoke through the token API (`POST /admin/revoke`, which ends the identity's allocations by
/// default) with XDP on, through the binary on each backend. Before it, one identity's channel is
/// carried in XDP both ways (the XDP counter moves, the workers relay none of it) beside a Send and a
/// Data indication on the userspace path, and a checkpoint bills both paths. After it, that
/// identity's ChannelData reaches neither its peer nor its client on either path, another identity's
/// channel still runs in XDP, and the revoked allocation's final usage row holds exactly what was
/// relayed up to the revoke on both paths, with `end_reason` "revoked". (A fleet revocation reaches the
/// control thread as the same `ToControl::Revoke` as this one: src/service.rs.)
#[test]
fn an_api_revoke_takes_the_identitys_channels_out_of_the_kernel_and_bills_exactly() {
    if skip_unprivileged("xdp api revoke") {
        return;
    }
    for backend in common::backends() {
        revoke_run(backend);
    }
}

fn revoke_run(backend: BackendKind) {
    let name = format!("{backend:?}");
    let topo = topology("v");
    let dir = std::env::temp_dir().join(format!(
        "turnpike-xdp-revoke-{}-{backend:?}",
        std::process::id()
    ));
    let extra = format!("[rest]\nsecrets = [\"{REST_SECRET}\"]\n");
    let (mut relay, api, db) = start_binary(&topo, &dir, backend, true, &extra, &name);
    let _pass = (
        in_netns(&topo.client, || attach_pass_program("c0").unwrap()),
        in_netns(&topo.peer, || attach_pass_program("p0").unwrap()),
    );
    let reach = |want| paths_reach(&topo, api, want);
    let secrets = turnpike::auth::RestSecrets::new(vec![REST_SECRET.as_bytes().to_vec()]);
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rest_client = |id: &str| {
        let cred = secrets.mint(id, unix_now, 600).unwrap();
        let server: SocketAddr = V4.listener.parse().unwrap();
        in_netns(&topo.client, move || {
            Client::new_on("198.18.1.2", server, &cred.username, &cred.password)
        })
    };
    let mut revoked = rest_client("mallory");
    let mut kept = rest_client("kept");
    let (relayed, relayed_kept) = (revoked.allocate(), kept.allocate());
    let peer = bind(&topo.peer, V4.peer);
    let peer_kept = bind(&topo.peer, "198.19.2.2:7001");
    let (peer_addr, peer_kept_addr) = (peer.local_addr().unwrap(), peer_kept.local_addr().unwrap());
    revoked.bind(0x4001, peer_addr);
    kept.bind(0x4001, peer_kept_addr);

    // One ChannelData round trip (client → peer → client), byte-exact: ((up bytes, up packets),
    // (down bytes, down packets)) added to `bill`.
    type Bill = ((i64, i64), (i64, i64));
    let round = |client: &Client, peer: &UdpSocket, relayed: SocketAddr, i: u8, bill: &mut Bill| {
        let payload = vec![i; 1 + usize::from(i) * 11];
        client.send_channel(0x4001, &payload);
        let (got, from) = recv(peer);
        assert_eq!(
            (got, from),
            (payload.clone(), relayed),
            "{name}: at the peer"
        );
        let back = vec![!i; 2 + usize::from(i) * 3];
        peer.send_to(&back, relayed).unwrap();
        assert_eq!(
            client.recv(),
            channel_data(0x4001, &back, 0),
            "{name}: at the client"
        );
        bill.0 .0 += payload.len() as i64;
        bill.0 .1 += 1;
        bill.1 .0 += back.len() as i64;
        bill.1 .1 += 1;
    };
    let (mut bill, mut bill_kept) = (((0, 0), (0, 0)), ((0, 0), (0, 0)));
    for i in 0..10 {
        round(&revoked, &peer, relayed, i, &mut bill);
    }
    for i in 0..3 {
        round(&kept, &peer_kept, relayed_kept, i, &mut bill_kept);
    }
    assert_eq!(reach((26, 0)), (26, 0), "{name}: the channels ran in XDP");

    // The same allocation on the userspace path: a Send indication to the channel's peer, and a Data
    // indication from a second peer that has a permission only.
    revoked.send_indication(peer_addr, b"via userspace");
    let (got, from) = recv(&peer);
    assert_eq!(
        (got.as_slice(), from),
        (&b"via userspace"[..], relayed),
        "{name}"
    );
    let other = bind(&topo.peer, "198.19.2.2:7002");
    revoked.permit(other.local_addr().unwrap());
    other.send_to(b"data indication", relayed).unwrap();
    let indication = revoked.recv();
    let m = turnpike::wire::Message::parse(&indication).unwrap();
    assert_eq!(m.attrs.data, Some(&b"data indication"[..]), "{name}");
    bill.0 .0 += 13;
    bill.0 .1 += 1;
    bill.1 .0 += 15;
    bill.1 .1 += 1;
    assert_eq!(
        reach((26, 2)),
        (26, 2),
        "{name}: the indications ran in userspace"
    );

    // A checkpoint (every second) bills both paths while the allocation lives.
    let row = |bill: Bill, reason: Option<&str>| -> UsageRow {
        let ((up_b, up_p), (down_b, down_p)) = bill;
        let reason = reason.map(str::to_string);
        ("mallory".to_string(), reason, up_b, up_p, down_b, down_p)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !usage_rows(&db).contains(&row(bill, None)) {
        assert!(
            Instant::now() < deadline,
            "{name}: no checkpoint with both paths' usage within 10 s: {:?}",
            usage_rows(&db)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The revoke. Once a Refresh on the revoked credential is refused, the control thread has ended
    // the allocation (the API hands it the revoke before it answers, and the Refresh comes after it),
    // and with it taken the channel out of the maps; a Binding answered by the worker that owns the
    // client's 5-tuple then shows that worker has taken its route update too.
    let v = revoke(&topo.relay, api, "mallory");
    assert_eq!(
        (v["revoked"].as_bool(), v["terminated"].as_bool()),
        (Some(true), Some(true))
    );
    let r = revoked.authed(Method::REFRESH, &[]);
    assert_eq!(
        Client::error_code(&r),
        Some(401),
        "{name}: Refresh after the revoke"
    );
    let b = revoked.transact(Method::BINDING, &[], false);
    Client::expect_success(&b);

    // Nothing of the revoked identity's passes now, neither way, on either path; the other identity's
    // channel still runs in XDP (and its round trip is done before the silence is checked).
    revoked.send_channel(0x4001, b"after the revoke");
    peer.send_to(b"after the revoke", relayed).unwrap();
    round(&kept, &peer_kept, relayed_kept, 3, &mut bill_kept);
    for (sock, what) in [(&peer, "the peer"), (&revoked.sock, "the revoked client")] {
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 2048];
        let got = sock.recv_from(&mut buf);
        assert!(
            got.is_err(),
            "{name}: {what} received {got:?} after the revoke"
        );
    }
    assert_eq!(
        reach((28, 2)),
        (28, 2),
        "{name}: only the kept channel moved, in XDP"
    );

    stop(&mut relay, &name);
    let rows = usage_rows(&db);
    assert!(
        rows.contains(&row(bill, Some("revoked"))),
        "{name}: the revoked allocation's final row is exact: {rows:?}"
    );
    let ((up_b, up_p), (down_b, down_p)) = bill_kept;
    assert!(
        rows.iter()
            .any(|r| r.0 == "kept" && (r.2, r.3, r.4, r.5) == (up_b, up_p, down_b, down_p)),
        "{name}: the kept allocation's row is exact: {rows:?}"
    );
    assert_eq!(rows.len(), 2, "{name}: {rows:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `POST /admin/revoke` for `identity` (default horizon, terminate), signed with the config's access
/// key, to the API in namespace `ns`: the answer's JSON.
fn revoke(ns: &str, api: SocketAddr, identity: &str) -> serde_json::Value {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(API_KEY_B64)
        .unwrap();
    let url = "/admin/revoke?api-version=2022-03-01-preview";
    let body = format!("{{\"id\": \"{identity}\"}}");
    let host = api.to_string();
    let (date, hash, auth) = turnpike::api::sign::sign(
        &key,
        "POST",
        url,
        &host,
        body.as_bytes(),
        std::time::SystemTime::now(),
    );
    in_netns(ns, move || {
        ureq::post(&format!("http://{host}{url}"))
            .timeout(Duration::from_secs(5))
            .set("x-ms-date", &date)
            .set("x-ms-content-sha256", &hash)
            .set("Authorization", &auth)
            .set("Content-Type", "application/json")
            .send_string(&body)
            .unwrap_or_else(|e| panic!("revoke: {e}"))
            .into_json()
            .unwrap()
    })
}

/// The datagrams relayed on each path as the relay's `/metrics` counts them: (XDP, userspace).
fn paths(topo: &Topology, api: SocketAddr) -> (u64, u64) {
    let text = scrape(&topo.relay, api);
    (
        metric(&text, "turnpike_path_packets_total{path=\"xdp\"}"),
        metric(&text, "turnpike_path_packets_total{path=\"userspace\"}"),
    )
}

/// [`paths`] once it reads `want`, or what it reads after 2 s. A worker credits a datagram after its
/// send returns, so the receiver can see the datagram before the counter moves.
fn paths_reach(topo: &Topology, api: SocketAddr, want: (u64, u64)) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = paths(topo, api);
        if got == want || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The set-up of the lifetime tests: the binary with XDP on in a fresh topology, pass programs on the
/// client's and the peer's interfaces, alice's allocation and a peer socket. Fields drop in order: the
/// sockets and programs first, the relay, then the namespaces.
struct Scene {
    peer: UdpSocket,
    client: Client,
    relayed: SocketAddr,
    _pass: (turnpike::xdp::PassProgram, turnpike::xdp::PassProgram),
    relay: Binary,
    api: SocketAddr,
    db: std::path::PathBuf,
    dir: std::path::PathBuf,
    topo: Topology,
}

impl Scene {
    /// In topology `tag`, with its files in `turnpike-xdp-{what}-…`, `extra` appended to the
    /// relay's configuration.
    fn start(tag: &str, what: &str, backend: BackendKind, extra: &str, name: &str) -> Scene {
        let topo = topology(tag);
        let dir = std::env::temp_dir().join(format!(
            "turnpike-xdp-{what}-{}-{backend:?}",
            std::process::id()
        ));
        let (relay, api, db) = start_binary(&topo, &dir, backend, true, extra, name);
        let _pass = (
            in_netns(&topo.client, || attach_pass_program("c0").unwrap()),
            in_netns(&topo.peer, || attach_pass_program("p0").unwrap()),
        );
        let server: SocketAddr = V4.listener.parse().unwrap();
        let mut client = in_netns(&topo.client, move || {
            Client::new_on("198.18.1.2", server, "alice", "alice-pass")
        });
        let relayed = client.allocate();
        let peer = bind(&topo.peer, V4.peer);
        Scene {
            peer,
            client,
            relayed,
            _pass,
            relay,
            api,
            db,
            dir,
            topo,
        }
    }
}

/// SIGTERM to the relay (drain 0) and a bounded wait for its exit: its final usage rows are written.
fn stop(relay: &mut Binary, name: &str) {
    run(&["kill", "-TERM", &relay.0.id().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{name}: the relay did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With XDP on, through the binary on each backend, with permissions that last 2 s and a channel that
/// outlives them: a lapsed permission takes the channel out of the kernel (the peer's datagrams are
/// dropped, as the worker drops them), and granting it again puts the channel back in the kernel, both
/// by CreatePermission and by a ChannelBind refresh (which installs only the permission: the binding is
/// still active). Every datagram relayed went through XDP (the workers relayed none), and the usage row
/// is exact.
#[test]
fn a_permission_granted_again_puts_its_channel_back_in_the_kernel() {
    if skip_unprivileged("xdp permission granted again") {
        return;
    }
    for backend in common::backends() {
        let name = format!("{backend:?}");
        let Scene {
            topo,
            dir,
            mut relay,
            api,
            db,
            _pass,
            mut client,
            relayed,
            peer,
        } = Scene::start(
            "g",
            "regrant",
            backend,
            "[lifetimes]\npermission = 2\n",
            &name,
        );
        let peer_addr = peer.local_addr().unwrap();
        let paths = || paths(&topo, api);
        let reach = |want| paths_reach(&topo, api, want);

        let mut delivered = 0;
        for how in ["ChannelBind", "CreatePermission", "a ChannelBind refresh"] {
            match how {
                "CreatePermission" => client.permit(peer_addr),
                _ => client.bind(0x4001, peer_addr),
            }
            let (before, _) = paths();
            peer.send_to(b"probe", relayed).unwrap();
            assert_eq!(
                client.recv(),
                channel_data(0x4001, b"probe", 0),
                "{name}: {how}"
            );
            delivered += 1;
            assert_eq!(
                paths().0,
                before + 1,
                "{name}: after {how} the channel runs in XDP"
            );
            let (more, other) = probe_until_not_channel(&client, &peer, relayed, 0x4001, &name);
            assert_eq!(
                other, None,
                "{name}: after the lapse nothing reaches the client"
            );
            delivered += more;
        }
        assert_eq!(
            reach((delivered, 0)),
            (delivered, 0),
            "{name}: every datagram relayed went through XDP"
        );

        stop(&mut relay, &name);
        let rows = usage_rows(&db);
        let bytes = 5 * delivered as i64;
        assert_eq!(
            rows,
            vec![(
                "alice".to_string(),
                Some("ended".to_string()),
                0,
                0,
                bytes,
                delivered as i64
            )],
            "{name}: exact usage"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
