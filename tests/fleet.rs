//! The fleet ledger (issue 12, phase 1) against a real PostgreSQL: throwaway clusters made with
//! Debian's `pg_createcluster` (as root it runs the server as `postgres`), on private ports, with
//! their data in a temporary directory. Relays are the real binary, relaying real traffic; the
//! clients' own counts are compared with PostgreSQL's per-identity totals (`usage_bill`).
//!
//! With `CI=true` a missing PostgreSQL fails these tests; elsewhere they say so and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::{postgres_available, Cluster};
use common::{temp_dir, Client, RecvRetry};
use turnpike::fleet;
use turnpike::usage::{self, IdentityUsage};
use turnpike::wire::{Attribute, Method};

/// A relay: the real binary with a ledger on `cluster`.
struct Relay {
    child: Child,
    listen: SocketAddr,
    /// Its API (`/metrics`).
    api: SocketAddr,
}

/// The REST secret the relays share with the token API replicas.
const SECRET: &str = "fleet-rest-secret";
/// The API replicas' access key (base64).
const KEY_B64: &str = "dHVybnBpa2UtZmxlZXQtYWNjZXNzLWtleQ==";

fn relay_config(dir: &Path, cluster: &Cluster, relay_id: &str, port_min: u16) -> PathBuf {
    relay_config_on(dir, cluster, relay_id, "127.0.0.1", port_min)
}

/// A relay listening and relaying on `ip` (a loopback address), its files in `dir`.
fn relay_config_on(
    dir: &Path,
    cluster: &Cluster,
    relay_id: &str,
    ip: &str,
    port_min: u16,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let port = UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api_port = common::free_tcp_port();
    let text = format!(
        "listen = [\"{ip}:{port}\"]\nworkers = 1\npin_workers = false\ndrain_seconds = 0\n\
         relay_id = \"{relay_id}\"\n\
         [relay]\naddresses = [\"{ip}\"]\nport_min = {port_min}\nport_max = {}\n\
         [rest]\nsecrets = [\"{SECRET}\"]\n\
         [api]\nlisten = \"{ip}:{api_port}\"\naccess_keys = [\"{KEY_B64}\"]\n\
         [[users]]\nname = \"alice\"\npassword = \"alice-pass\"\n\
         [[users]]\nname = \"bob\"\npassword = \"bob-pass\"\n\
         [peers]\nallow = [\"127.0.0.0/8\"]\n\
         [usage]\ndatabase = \"{}\"\ncheckpoint_seconds = 1\n\
         [fleet]\npostgres = \"{}\"\nship_interval_seconds = 1\n",
        port_min + 99,
        dir.join("usage.db").display(),
        cluster.conninfo()
    );
    let path = dir.join("turnpike.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Relay {
    fn start(config: &Path) -> Relay {
        let text = std::fs::read_to_string(config).unwrap();
        let listen: SocketAddr = text.split('"').nth(1).and_then(|s| s.parse().ok()).unwrap();
        // `[api] listen = "ip:port"` (the relay's own `listen` is a list).
        let api: SocketAddr = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = \""))
            .and_then(|l| l.trim_end_matches('"').parse().ok())
            .unwrap();
        // A restart right after kill -9 can find a port still held while the dead process's sockets
        // are torn down (seen on io_uring): such a start exits at once; try again, bounded, and show
        // what the relay said if it never comes up.
        let log = config.with_extension("stderr");
        for _ in 0..5 {
            let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
                .arg("--config")
                .arg(config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            if common::wait_binding(Duration::from_secs(15), listen, &mut child) {
                return Relay { child, listen, api };
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "relay at {listen} did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// kill -9.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The value of the unlabelled metric `name` on its `/metrics`, if it answers.
    fn metric(&self, name: &str) -> Option<i64> {
        let (status, body) = http(self.api, "GET", "/metrics", None);
        if status != 200 {
            return None;
        }
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// SIGTERM, and wait (bounded) for the process to end.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token API replica: the real binary, `turnpike api`, with the ledger on `cluster`.
struct ApiReplica {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    conninfo: String,
}

/// A second access key (base64), for the reload test.
const KEY2_B64: &str = "dHVybnBpa2UtZmxlZXQtc2Vjb25kLWFjY2Vzcy1rZXk=";

impl ApiReplica {
    /// Start a replica handing out `relays` (id, `ip:port`), in `dir`. Its configuration has no
    /// `[relay]` and no listeners: `turnpike api` needs none.
    fn start(dir: &Path, cluster: &Cluster, relays: &[(&str, SocketAddr)]) -> ApiReplica {
        std::fs::create_dir_all(dir).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
            .parse()
            .unwrap();
        let config = Self::configure(dir, addr, &cluster.conninfo(), relays, KEY_B64);
        let log = dir.join("api.stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
            .arg("--config")
            .arg(&config)
            .arg("api")
            .stdout(std::fs::File::create(dir.join("api.stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while http(addr, "GET", "/healthz", None).0 != 200 {
            assert!(
                child.try_wait().unwrap().is_none() && Instant::now() < deadline,
                "turnpike api did not come up: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ApiReplica {
            child,
            addr,
            dir: dir.to_path_buf(),
            conninfo: cluster.conninfo(),
        }
    }

    /// Write its configuration file: listening on `addr`, handing out `relays`, signed with `key`.
    fn configure(
        dir: &Path,
        addr: SocketAddr,
        conninfo: &str,
        relays: &[(&str, SocketAddr)],
        key: &str,
    ) -> PathBuf {
        let mut text = format!(
            "relay_id = \"api\"\n[rest]\nsecrets = [\"{SECRET}\"]\n\
             [api]\nlisten = \"{addr}\"\naccess_keys = [\"{key}\"]\n\
             revocations_database = \"{}\"\n",
            dir.join("revocations.db").display()
        );
        for (id, addr) in relays {
            text += &format!(
                "[[api.fleet]]\nid = \"{id}\"\nregion = \"default\"\naddresses = [\"{addr}\"]\n"
            );
        }
        text += &format!("[fleet]\npostgres = \"{conninfo}\"\n");
        let config = dir.join("api.toml");
        std::fs::write(&config, text).unwrap();
        config
    }

    /// Rewrite its configuration (`relays`, `key`) and send SIGHUP.
    fn reload(&self, relays: &[(&str, SocketAddr)], key: &str) {
        Self::configure(&self.dir, self.addr, &self.conninfo, relays, key);
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// The relays a token answer signed with `key` names (the `stun:` URLs' `host:port`), or the
    /// status when it is refused.
    fn answered(&self, key: &str) -> Result<BTreeSet<String>, u16> {
        let body = r#"{"id": "zoe", "routeType": "any"}"#;
        let (status, text) = http_body(self.addr, "POST", TOKEN_PATH, Some(key), body);
        if status != 200 {
            return Err(status);
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        Ok(v["iceServers"][0]["urls"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|u| u.as_str()?.strip_prefix("stun:"))
            .map(str::to_string)
            .collect())
    }

    /// `turnpike_reloads_total` on its `/metrics`: (success, failure).
    fn reloads(&self) -> (u64, u64) {
        let (status, body) = http(self.addr, "GET", "/metrics", None);
        assert_eq!(status, 200, "{body}");
        let count = |result: &str| {
            let name = format!("turnpike_reloads_total{{result=\"{result}\"}} ");
            body.lines()
                .find_map(|l| l.strip_prefix(&name)?.parse().ok())
                .unwrap_or_else(|| panic!("no {name}in /metrics:\n{body}"))
        };
        (count("success"), count("failure"))
    }

    /// `GET /usage` (signed with the admin key), fleet-wide: identity → totals.
    fn usage(&self) -> Vec<(String, [u64; 4])> {
        let (status, body) = http(
            self.addr,
            "GET",
            "/usage?since=2000-01-01T00:00:00Z",
            Some(KEY_B64),
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["identities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                let n = |k: &str| u[k].as_u64().unwrap();
                (
                    u["identity"].as_str().unwrap().to_string(),
                    [
                        n("to_peer_bytes"),
                        n("to_peer_packets"),
                        n("to_client_bytes"),
                        n("to_client_packets"),
                    ],
                )
            })
            .collect()
    }
}

impl Drop for ApiReplica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token endpoint.
const TOKEN_PATH: &str =
    "/networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview";

/// One HTTP/1.1 request without a body on a fresh connection (signed with `key`, base64, when
/// given): (status, body).
fn http(addr: SocketAddr, method: &str, url: &str, key: Option<&str>) -> (u16, String) {
    http_body(addr, method, url, key, "")
}

/// [`http`] with a JSON `body`.
fn http_body(
    addr: SocketAddr,
    method: &str,
    url: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let host = addr.to_string();
    let mut req = format!("{method} {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if !body.is_empty() {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    if let Some(key) = key {
        let key = common::http::key_of(key);
        let (date, hash, auth) = turnpike::api::sign::sign(
            &key,
            method,
            url,
            &host,
            body.as_bytes(),
            std::time::SystemTime::now(),
        );
        req += &format!(
            "x-ms-date: {date}\r\nx-ms-content-sha256: {hash}\r\nAuthorization: {auth}\r\n"
        );
    }
    req += "\r\n";
    req += body;
    common::http::raw(addr, req.as_bytes())
}

/// One client's traffic through one allocation, counted by the two ends.
struct Flow {
    client: Client,
    peer: UdpSocket,
    relayed: SocketAddr,
    /// Payload bytes and datagrams the peer received (client → peer).
    to_peer: (u64, u64),
    /// Payload bytes and datagrams the client received (peer → client).
    to_client: (u64, u64),
}

const CHANNEL: u16 = 0x4000;

/// The leg of a [`Flow::round_trip`] that got nothing.
#[derive(Debug)]
enum Lost {
    ToPeer,
    ToClient,
}

impl Flow {
    fn open(server: SocketAddr, user: &str) -> Flow {
        let mut client = Client::new(server, user, &format!("{user}-pass"));
        let relayed = client.allocate();
        let peer = common::peer();
        client.bind(CHANNEL, peer.local_addr().unwrap());
        Flow {
            client,
            peer,
            relayed,
            to_peer: (0, 0),
            to_client: (0, 0),
        }
    }

    /// One round trip (payload byte `k`): `size` bytes of ChannelData to the peer, then `size + 1`
    /// bytes back to the client, counted as received at each end. The leg that got nothing within the
    /// sockets' timeout (the way back is not tried when the way out failed).
    fn round_trip(&mut self, k: u32, size: usize) -> Result<(), Lost> {
        let mut buf = [0u8; 2048];
        self.client.send_channel(CHANNEL, &vec![k as u8; size]);
        match self.peer.recv_retry(&mut buf) {
            Ok((n, from)) if from == self.relayed => {
                self.to_peer.0 += n as u64;
                self.to_peer.1 += 1;
            }
            _ => return Err(Lost::ToPeer),
        }
        self.peer
            .send_to(&vec![k as u8; size + 1], self.relayed)
            .unwrap();
        match self.client.sock.recv_retry(&mut buf) {
            Ok((n, from)) if from == self.client.server && n >= 4 && buf[0] & 0xc0 == 0x40 => {
                self.to_client.0 += u16::from_be_bytes([buf[2], buf[3]]) as u64;
                self.to_client.1 += 1;
                Ok(())
            }
            _ => Err(Lost::ToClient),
        }
    }

    /// `rounds` round trips of `size` bytes, one each way; every one arrives.
    fn exchange(&mut self, rounds: usize, size: usize) {
        for k in 0..rounds {
            if let Err(leg) = self.round_trip(k as u32, size) {
                panic!("round trip {k}: nothing arrived {leg:?}");
            }
        }
    }

    /// Round trips of `size` bytes at a fixed `rate` per second for `duration`; returns how many were
    /// lost (a leg not there within the sockets' 3 s timeout).
    fn paced(&mut self, rate: u32, duration: Duration, size: usize) -> u64 {
        let every = Duration::from_secs(1) / rate;
        let start = Instant::now();
        let (mut lost, mut k) = (0, 0u32);
        while start.elapsed() < duration {
            if let Some(wait) = (start + every * k).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            k += 1;
            if self.round_trip(k, size).is_err() {
                lost += 1;
            }
        }
        lost
    }

    /// Round trips of `size` bytes, as fast as they come back, until one is not answered (the relay
    /// died; at most 10,000): after each, when it ended and the counts so far.
    fn until_lost(&mut self, size: usize) -> Vec<(Instant, [u64; 4])> {
        let mut history = Vec::new();
        for k in 0..10_000u32 {
            if self.round_trip(k, size).is_err() {
                break;
            }
            history.push((Instant::now(), self.counts()));
            std::thread::sleep(Duration::from_millis(1));
        }
        history
    }

    /// End the allocation (its final record).
    fn close(&mut self) {
        let r = self
            .client
            .authed(Method::REFRESH, &[Attribute::Lifetime(0)]);
        Client::expect_success(&r);
    }

    fn counts(&self) -> [u64; 4] {
        [
            self.to_peer.0,
            self.to_peer.1,
            self.to_client.0,
            self.to_client.1,
        ]
    }
}

fn totals(u: &IdentityUsage) -> [u64; 4] {
    [
        u.to_peer_bytes,
        u.to_peer_packets,
        u.to_client_bytes,
        u.to_client_packets,
    ]
}

fn sum(a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]
}

/// Poll (bounded) until `identity`'s ledger totals are `want`; returns the last seen.
fn wait_totals(cluster: &Cluster, identity: &str, want: [u64; 4], within: Duration) -> [u64; 4] {
    let deadline = Instant::now() + within;
    loop {
        let got = cluster
            .bill()
            .iter()
            .find(|u| u.identity == identity)
            .map(totals)
            .unwrap_or_default();
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// No key twice, no row twice: the ledger's rows equal its distinct (relay, run, allocation, seq).
fn assert_no_duplicates(cluster: &Cluster) {
    let rows = cluster.psql("SELECT COUNT(*) FROM usage_deltas");
    let keys =
        cluster.psql("SELECT COUNT(DISTINCT (relay_id, run, allocation, seq)) FROM usage_deltas");
    assert_eq!(rows, keys);
}

#[test]
fn relayed_traffic_lands_in_postgresql_exactly() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::new("exact");
    let dir = temp_dir("exact");
    let relay = Relay::start(&relay_config(&dir, &cluster, "relay-a", 61100));
    let mut a = Flow::open(relay.listen, "alice");
    let mut b = Flow::open(relay.listen, "bob");
    for _ in 0..3 {
        a.exchange(50, 100);
        b.exchange(20, 300);
        std::thread::sleep(Duration::from_millis(600)); // across checkpoints: several deltas
    }
    a.close();
    b.close();
    assert_eq!(
        wait_totals(&cluster, "alice", a.counts(), Duration::from_secs(10)),
        a.counts()
    );
    assert_eq!(
        wait_totals(&cluster, "bob", b.counts(), Duration::from_secs(10)),
        b.counts()
    );
    // The totals can be complete before the final records ship: a final record that adds no bytes
    // (everything was in an earlier checkpoint) arrives with a later batch. Wait for both, so that the
    // counts below are of a ledger that no longer grows.
    let ended = "SELECT COUNT(*) FROM usage_deltas WHERE end_reason = 'ended'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.psql(ended) != "2" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cluster.psql(ended), "2");
    // Several deltas per allocation, each with the client 5-tuple and relayed address.
    let n: u64 = cluster
        .psql("SELECT COUNT(*) FROM usage_deltas WHERE identity = 'alice'")
        .parse()
        .unwrap();
    assert!(n >= 2, "{n} deltas");
    assert_eq!(
        cluster.psql(&format!(
            "SELECT COUNT(*) FROM usage_deltas WHERE identity = 'alice' AND relayed = '{}'
             AND client = '{}' AND relay_id = 'relay-a'",
            a.relayed,
            a.client.local()
        )),
        n.to_string()
    );
    assert_eq!(
        cluster.psql("SELECT string_agg(version::text, ',') FROM schema_migrations"),
        "1"
    );
    assert_no_duplicates(&cluster);
    relay.stop();
    // `turnpike usage` reads the ledger.
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .arg("--config")
        .arg(dir.join("turnpike.toml"))
        .args(["usage", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alice = v["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["identity"] == "alice")
        .unwrap();
    assert_eq!(alice["to_peer_bytes"].as_u64(), Some(a.counts()[0]));
    // `turnpike db migrate` again: nothing left to apply.
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .arg("--config")
        .arg(dir.join("turnpike.toml"))
        .args(["db", "migrate"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
}

/// The relays of the issue's fleet, by id, on 127.0.0.2, .3 and .4.
const RELAY_IDS: [&str; 3] = ["relay-2", "relay-3", "relay-4"];

/// The issue's topology, shared by the fleet tests: three relays (the real binary) on 127.0.0.2, .3
/// and .4 with disjoint relay port ranges, and two `turnpike api` replicas handing them out, on one
/// PostgreSQL cluster of its own (a test may stop and start it).
struct Fleet {
    cluster: Cluster,
    configs: Vec<PathBuf>,
    relays: Vec<Relay>,
    replicas: [ApiReplica; 2],
}

impl Fleet {
    /// Start it; relay `i` relays on ports `ports + 200 i` .. +99 (ranges disjoint across the tests,
    /// which run at once, and above the ephemeral range).
    fn start(tag: &str, ports: u16) -> Fleet {
        let cluster = Cluster::new(tag);
        let dir = temp_dir(tag);
        let configs: Vec<PathBuf> = RELAY_IDS
            .iter()
            .zip(0u16..)
            .map(|(id, i)| {
                let ip = format!("127.0.0.{}", i + 2);
                relay_config_on(&dir.join(id), &cluster, id, &ip, ports + 200 * i)
            })
            .collect();
        let relays: Vec<Relay> = configs.iter().map(|c| Relay::start(c)).collect();
        let listed: Vec<(&str, SocketAddr)> = RELAY_IDS
            .into_iter()
            .zip(relays.iter().map(|r| r.listen))
            .collect();
        let replicas = [
            ApiReplica::start(&dir.join("api-1"), &cluster, &listed),
            ApiReplica::start(&dir.join("api-2"), &cluster, &listed),
        ];
        Fleet {
            cluster,
            configs,
            relays,
            replicas,
        }
    }

    /// Start relay `i` again (after a kill -9), on the same config: id, addresses, outbox.
    fn restart(&mut self, i: usize) {
        self.relays[i] = Relay::start(&self.configs[i]);
    }

    /// The full reconciliation: every identity's totals in the ledger (`usage_bill`, polled until
    /// they are `want` or `within` passes) and through each replica's `GET /usage` equal `want`, and no
    /// delta is there twice.
    fn reconcile(&self, want: &[(&str, [u64; 4])], within: Duration) {
        for (identity, counts) in want {
            assert_eq!(
                wait_totals(&self.cluster, identity, *counts, within),
                *counts,
                "{identity} in usage_bill"
            );
        }
        for r in &self.replicas {
            let usage = r.usage();
            for (identity, counts) in want {
                assert_eq!(
                    usage.iter().find(|(i, _)| i == identity).map(|(_, t)| *t),
                    Some(*counts),
                    "{identity} via the replica at {}",
                    r.addr
                );
            }
        }
        assert_no_duplicates(&self.cluster);
    }

    /// SIGTERM every relay.
    fn stop(self) {
        for r in self.relays {
            r.stop();
        }
    }
}

/// The issue's fleet: three relays on 127.0.0.2, .3 and .4 (disjoint relay port ranges) and two
/// `turnpike api` replicas, all real binaries, on one PostgreSQL ([`Fleet`]). The official SDK gets a
/// configuration from each replica and relays through the first relay; two more clients relay known
/// traffic on the other two. The ledger's per-identity totals (`usage_bill`, and `GET /usage` of a
/// replica) equal the clients' own counts exactly.
#[test]
fn a_fleet_of_three_relays_and_two_api_replicas_bills_exactly() {
    if !postgres_available() || !common::sdk::python_ready() {
        return;
    }
    let Fleet {
        cluster,
        relays,
        replicas,
        ..
    } = Fleet::start("fleet3", 62100);
    // The SDK, from either replica: every relay is handed out, and TURN through the first works
    // with the REST credentials it got (one datagram of 25 bytes out, 10 back, each time).
    for r in &replicas {
        let v = common::sdk::run_sdk(&format!("http://{}", r.addr), KEY_B64, None, false);
        let urls = v["ice_servers"][0]["urls"].to_string();
        for relay in &relays {
            assert!(
                urls.contains(&format!("turn:{}?transport=udp", relay.listen)),
                "{urls}"
            );
        }
        assert_eq!(v["turn"]["peer_got"], "hello from the sdk client");
        assert_eq!(v["turn"]["client_got"], "hello back");
    }
    let sdk = [2 * 25, 2, 2 * 10, 2];
    // Two more clients, on the two other relays.
    let mut a = Flow::open(relays[1].listen, "alice");
    let mut b = Flow::open(relays[2].listen, "bob");
    for _ in 0..3 {
        a.exchange(50, 100);
        b.exchange(20, 300);
        std::thread::sleep(Duration::from_millis(600)); // across checkpoints: several deltas
    }
    a.close();
    b.close();
    for (identity, want) in [
        ("8:acs:sdk-user", sdk),
        ("alice", a.counts()),
        ("bob", b.counts()),
    ] {
        assert_eq!(
            wait_totals(&cluster, identity, want, Duration::from_secs(15)),
            want,
            "{identity}"
        );
    }
    // Per relay: each identity's usage is where it relayed.
    for (relay, identity) in [
        ("relay-2", "8:acs:sdk-user"),
        ("relay-3", "alice"),
        ("relay-4", "bob"),
    ] {
        assert_eq!(
            cluster.psql(&format!("SELECT string_agg(identity, ',') FROM usage_bill(0, 9223372036854775807, '{relay}')")),
            identity
        );
    }
    // The same totals through either replica's GET /usage (the ledger, fleet-wide).
    for r in &replicas {
        let usage = r.usage();
        for (identity, want) in [
            ("8:acs:sdk-user", sdk),
            ("alice", a.counts()),
            ("bob", b.counts()),
        ] {
            assert_eq!(
                usage.iter().find(|(i, _)| i == identity).map(|(_, t)| *t),
                Some(want),
                "{identity} via {}",
                r.addr
            );
        }
    }
    assert_no_duplicates(&cluster);
    for r in relays {
        r.stop();
    }
}

/// The outbox of a relay that ran, by the same `Store::record` the usage writer calls.
fn outbox_with(dir: &Path, allocations: u64, checkpoints: u64) -> (usage::Store, PathBuf) {
    let path = dir.join("usage.db");
    let mut store = usage::Store::open(&path, "relay-x", 1_000).unwrap();
    store.enable_outbox();
    for k in 1..=checkpoints {
        let records: Vec<usage::Record> = (0..allocations)
            .map(|a| usage::Record {
                allocation: a,
                identity: format!("user{}", a % 7),
                transport: "udp",
                client: "127.0.0.1:40000".parse().ok(),
                server: "127.0.0.1:3478".parse().ok(),
                started_ms: 1_000,
                at_ms: 1_000 + k * 1_000,
                done: k == checkpoints,
                relayed: "127.0.0.1:61000".parse().ok(),
                end_reason: "ended",
                to_peer_bytes: k * 100,
                to_peer_packets: k,
                to_client_bytes: k * 200,
                to_client_packets: 2 * k,
            })
            .collect();
        store.record(&records).unwrap();
    }
    (store, path)
}

#[test]
fn a_lost_acknowledgement_and_a_retry_create_no_duplicates() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::new("ack");
    let dir = temp_dir("ack");
    let (_store, path) = outbox_with(&dir, 10, 3);
    let mut outbox = usage::Outbox::open(&path).unwrap();
    let rt = fleet::runtime().unwrap();
    rt.block_on(async {
        let mut client = fleet::connect(&cluster.config()).await.unwrap();
        assert_eq!(fleet::migrate(&mut client).await.unwrap(), vec![1]);
        assert!(fleet::migrate(&mut client).await.unwrap().is_empty());
        // The first batch commits, but its acknowledgement never reaches the shipper: the backend
        // is terminated from another session right after COMMIT, so the rows stay unshipped locally.
        let deltas = outbox.unshipped(1000).unwrap();
        assert_eq!(deltas.len(), 30);
        assert_eq!(fleet::insert_batch(&mut client, &deltas).await.unwrap(), 30);
        cluster.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = 'postgres' AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        );
        assert_eq!(outbox.backlog().unwrap(), 30);
        // The retry: the old connection is gone, a new one ships the same rows again.
        assert!(fleet::ship_once(&mut client, &mut outbox, 1000).await.is_err());
        let mut client = fleet::connect(&cluster.config()).await.unwrap();
        assert_eq!(
            fleet::ship_once(&mut client, &mut outbox, 1000)
                .await
                .unwrap(),
            30
        );
        assert_eq!(outbox.backlog().unwrap(), 0);
        let bill = fleet::bill(&client, 0, u64::MAX, Some("relay-x"))
            .await
            .unwrap();
        let all: u64 = bill.iter().map(|u| u.to_peer_bytes).sum();
        assert_eq!(all, 10 * 300, "each allocation's three checkpoints, once");
        assert_eq!(bill.iter().map(|u| u.allocations).sum::<u64>(), 10);
    });
    assert_eq!(cluster.psql("SELECT COUNT(*) FROM usage_deltas"), "30");
    assert_no_duplicates(&cluster);
}

/// PostgreSQL down for 20 s during traffic, in the fleet (its own cluster, stopped and started on the
/// same port): traffic through all three relays at a fixed rate loses no datagram, as in the baseline
/// at the same rate with the database up; every relay says on `/metrics` that it enforces its local
/// copy of the revocations while the database is down, and stops saying so once it is back; the
/// backlog then ships, exact and without duplicates.
#[test]
fn postgresql_down_during_traffic_delays_shipping_only() {
    if !postgres_available() {
        return;
    }
    const RATE: u32 = 100; // round trips per second, per flow
    const GAUGE: &str = "turnpike_fleet_revocations_local_copy";
    let fleet = Fleet::start("down", 63300);
    let users = ["alice", "bob", "alice"];
    let mut flows: Vec<Flow> = fleet
        .relays
        .iter()
        .zip(users)
        .map(|(r, user)| Flow::open(r.listen, user))
        .collect();
    let owed = |flows: &[Flow]| {
        [
            ("alice", sum(flows[0].counts(), flows[2].counts())),
            ("bob", flows[1].counts()),
        ]
    };
    let baseline = paced_all(&mut flows, RATE, Duration::from_secs(5));
    fleet.reconcile(&owed(&flows), Duration::from_secs(15));
    for r in &fleet.relays {
        assert_eq!(r.metric(GAUGE), Some(0), "{GAUGE} with the database up");
    }

    fleet.cluster.ctl("stop");
    let (down, local) = std::thread::scope(|s| {
        let traffic = s.spawn(|| paced_all(&mut flows, RATE, Duration::from_secs(20)));
        // Meanwhile every relay notices (its LISTEN session ends) and says so.
        let local: Vec<bool> = fleet
            .relays
            .iter()
            .map(|r| within(Duration::from_secs(15), || r.metric(GAUGE) == Some(1)))
            .collect();
        (traffic.join().unwrap(), local)
    });
    fleet.cluster.ctl("start");
    let after = paced_all(&mut flows, RATE, Duration::from_secs(2));
    for f in &mut flows {
        f.close();
    }
    assert_eq!(baseline, [0; 3], "the baseline at {RATE}/s lost datagrams");
    assert_eq!(
        down, [0; 3],
        "lost while PostgreSQL was down (baseline: {baseline:?})"
    );
    assert_eq!(after, [0; 3]);
    assert_eq!(local, [true; 3], "{GAUGE} = 1 while the database was down");
    // Back: the listeners reconnect (backoff at most 5 s) and the backlog ships.
    for r in &fleet.relays {
        assert!(
            within(Duration::from_secs(20), || r.metric(GAUGE) == Some(0)),
            "{GAUGE} still 1 after the database came back"
        );
    }
    fleet.reconcile(&owed(&flows), Duration::from_secs(20));
    fleet.stop();
}

/// kill -9 one relay of the fleet in the middle of its traffic, then restart it: the ledger is exact
/// for the relays that ran on, and for the killed one short by at most its last checkpoint interval,
/// never more than the clients counted; nothing is counted twice. A second full reconciliation after
/// more traffic on every relay (the restarted one included) adds exactly the clients' new counts.
#[test]
fn a_killed_relay_loses_at_most_its_last_checkpoint_and_counts_nothing_twice() {
    if !postgres_available() {
        return;
    }
    /// The relays' `checkpoint_seconds`.
    const CHECKPOINT: Duration = Duration::from_secs(1);
    /// Time for a checkpoint's deltas to reach the outbox on a loaded machine (control thread → usage
    /// writer → SQLite).
    const WRITE_SLACK: Duration = Duration::from_millis(500);
    let mut fleet = Fleet::start("kill", 62700);
    // alice on relay-3 (the one killed) and on relay-2, bob on relay-4.
    let mut a = Flow::open(fleet.relays[1].listen, "alice");
    let mut b = Flow::open(fleet.relays[2].listen, "bob");
    let mut c = Flow::open(fleet.relays[0].listen, "alice");
    a.exchange(100, 100);
    b.exchange(50, 200);
    c.exchange(30, 150);
    // Mid-traffic: alice relays on relay-3 until it dies; bob's and the other traffic run on.
    let (history, killed_at) = std::thread::scope(|s| {
        let traffic = s.spawn(|| a.until_lost(100));
        b.exchange(50, 200);
        std::thread::sleep(CHECKPOINT * 2);
        fleet.relays[1].kill();
        let killed_at = Instant::now();
        c.exchange(30, 150);
        (traffic.join().unwrap(), killed_at)
    });
    let sent = a.counts();
    assert!(history.len() > 100, "alice relayed through the kill");
    // What alice's ends had received one checkpoint interval (and the write's slack) before the kill
    // is in the outbox of the dead run.
    let floor = history
        .iter()
        .rev()
        .find(|(at, _)| *at + CHECKPOINT + WRITE_SLACK <= killed_at)
        .map_or([0; 4], |(_, counts)| *counts);
    b.close();

    fleet.restart(1);
    let mut a2 = Flow::open(fleet.relays[1].listen, "alice");
    a2.exchange(40, 100);
    a2.close();
    c.close();
    // The restart closed the dead run's allocation ("lost") and the backlog shipped.
    let ended = "SELECT string_agg(end_reason, ',' ORDER BY end_reason) FROM usage_deltas
                 WHERE relay_id = 'relay-3' AND end_reason IS NOT NULL";
    assert!(
        within(Duration::from_secs(15), || fleet.cluster.psql(ended)
            == "ended,lost"),
        "relay-3's allocations ended: {}",
        fleet.cluster.psql(ended)
    );
    // The first reconciliation: bob (relay-4) and alice on relay-2 exact; alice on relay-3 within
    // [what was checkpointed, what the clients counted].
    fleet.reconcile(&[("bob", b.counts())], Duration::from_secs(15));
    let on = |relay: &str| {
        let text = fleet.cluster.psql(&format!(
            "SELECT COALESCE(SUM(to_peer_bytes), 0) || ',' || COALESCE(SUM(to_peer_packets), 0) || ','
                    || COALESCE(SUM(to_client_bytes), 0) || ',' || COALESCE(SUM(to_client_packets), 0)
             FROM usage_deltas WHERE identity = 'alice' AND relay_id = '{relay}'"
        ));
        let v: Vec<u64> = text.split(',').map(|n| n.parse().unwrap()).collect();
        [v[0], v[1], v[2], v[3]]
    };
    let relay2 = c.counts();
    assert!(
        within(Duration::from_secs(15), || on("relay-2") == relay2),
        "alice on relay-2: {:?}, counted {relay2:?}",
        on("relay-2")
    );
    let relay3 = on("relay-3");
    let (low, high) = (sum(floor, a2.counts()), sum(sent, a2.counts()));
    for i in 0..4 {
        assert!(
            low[i] <= relay3[i] && relay3[i] <= high[i],
            "counter {i}: relay-3's ledger {} not within [{}, {}] (one checkpoint interval)",
            relay3[i],
            low[i],
            high[i]
        );
    }
    eprintln!(
        "kill -9: relay-3's ledger for alice {relay3:?} within [{low:?}, {high:?}] (short by {:?})",
        [0, 1, 2, 3].map(|i| high[i] - relay3[i])
    );
    let first = [("alice", sum(relay2, relay3)), ("bob", b.counts())];
    fleet.reconcile(&first, Duration::from_secs(5));

    // The second reconciliation: new traffic on every relay adds exactly its own counts (nothing of
    // the dead run is shipped twice as the new run's outbox drains).
    let mut more: Vec<Flow> = fleet
        .relays
        .iter()
        .zip(["alice", "alice", "bob"])
        .map(|(r, user)| Flow::open(r.listen, user))
        .collect();
    for f in &mut more {
        f.exchange(60, 100);
        f.close();
    }
    let second = [
        (
            "alice",
            sum(first[0].1, sum(more[0].counts(), more[1].counts())),
        ),
        ("bob", sum(first[1].1, more[2].counts())),
    ];
    fleet.reconcile(&second, Duration::from_secs(15));
    fleet.stop();
}

/// `flows` at a fixed `rate` of round trips per second each for `duration`, all at once (one thread
/// each); the datagrams each lost.
fn paced_all(flows: &mut [Flow], rate: u32, duration: Duration) -> Vec<u64> {
    std::thread::scope(|s| {
        let handles: Vec<_> = flows
            .iter_mut()
            .map(|f| s.spawn(move || f.paced(rate, duration, 120)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Poll `f` every 100 ms until it holds or `limit` passes; whether it held.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `turnpike api` on a fresh database, with no `[relay]` and no listeners in its configuration:
/// it applies the ledger's and the shared state's migrations before it serves, answers from its
/// `[[api.fleet]]` (no relay heartbeats: the static fallback), and SIGHUP reloads the fleet list
/// and the access keys (the old key is refused afterwards); a broken file changes nothing.
#[test]
fn turnpike_api_alone_migrates_at_start_and_reloads_on_sighup() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::new("apionly");
    let dir = temp_dir("apionly");
    let (a, b): (SocketAddr, SocketAddr) = (
        "198.51.100.1:3478".parse().unwrap(),
        "198.51.100.2:3478".parse().unwrap(),
    );
    let replica = ApiReplica::start(&dir, &cluster, &[("static-a", a)]);
    assert_eq!(
        cluster
            .psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"),
        "1"
    );
    assert_eq!(
        cluster.psql(
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM fleet_state_migrations"
        ),
        "10,11"
    );
    let only = |addr: SocketAddr| Ok(BTreeSet::from([addr.to_string()]));
    assert_eq!(replica.answered(KEY_B64), only(a));
    assert_eq!(replica.answered(KEY2_B64), Err(401));

    replica.reload(&[("static-b", b)], KEY2_B64);
    let reloaded = within(Duration::from_secs(10), || {
        replica.answered(KEY2_B64) == only(b)
    });
    assert!(reloaded, "after SIGHUP: {:?}", replica.answered(KEY2_B64));
    assert_eq!(
        replica.answered(KEY_B64),
        Err(401),
        "the old key, reloaded away"
    );
    assert_eq!(
        replica.reloads(),
        (1, 0),
        "the reload is counted on /metrics"
    );

    // A file that does not validate (no fleet to hand out): the running settings stay.
    replica.reload(&[], KEY_B64);
    let counted = within(Duration::from_secs(10), || replica.reloads() == (1, 1));
    assert!(
        counted,
        "the failed reload is counted: {:?}",
        replica.reloads()
    );
    assert_eq!(replica.answered(KEY2_B64), only(b));
    let log = std::fs::read_to_string(dir.join("api.stderr")).unwrap_or_default();
    let out = std::fs::read_to_string(dir.join("api.stdout")).unwrap_or_default();
    assert!(
        (log + &out).contains("reload failed, nothing changed"),
        "the failed reload is logged"
    );
}

/// `turnpike api` alone (no `[fleet]`: no database needed) serving TLS: SIGHUP reloads its
/// certificate for new connections, as the relay's API does; a client trusting only the old one is
/// refused from then on.
#[test]
fn turnpike_api_alone_reloads_its_certificate_on_sighup() {
    use common::tls::{tls_client, tls_healthz};
    let dir = temp_dir("apicert");
    let old = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let new = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("api.crt"), dir.join("api.key"));
    let install = |c: &rcgen::CertifiedKey| {
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    };
    install(&old);
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let config = dir.join("api.toml");
    std::fs::write(
        &config,
        format!(
            "[rest]\nsecrets = [\"{SECRET}\"]\n[api]\nlisten = \"{api}\"\n\
             access_keys = [\"{KEY_B64}\"]\nrevocations_database = \"{}\"\n\
             names = [\"localhost\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             [[api.fleet]]\nid = \"static-a\"\nregion = \"default\"\naddresses = [\"198.51.100.1:3478\"]\n",
            dir.join("revocations.db").display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let log = dir.join("api.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .arg("--config")
        .arg(&config)
        .arg("api")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("stderr")).unwrap())
        .spawn()
        .unwrap();
    // The status line of `/healthz` over TLS trusting only `ca` ("" when the handshake fails).
    let healthz = |ca: &rcgen::CertifiedKey| {
        let answer = tls_healthz(api, tls_client(ca));
        answer.lines().next().unwrap_or("").to_string()
    };
    let up = within(Duration::from_secs(15), || {
        healthz(&old).starts_with("HTTP/1.1 200")
    });
    let running = child.try_wait().unwrap().is_none();
    assert!(
        up && running,
        "turnpike api did not come up on TLS: {}",
        std::fs::read_to_string(log.with_extension("stderr")).unwrap_or_default()
    );
    assert_eq!(healthz(&new), "", "the next certificate is not served yet");

    install(&new);
    let ok = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let reloaded = within(Duration::from_secs(10), || {
        healthz(&new).starts_with("HTTP/1.1 200")
    });
    assert!(
        reloaded,
        "new connections get the reloaded certificate: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(healthz(&old), "", "the old certificate is no longer served");
    let _ = child.kill();
    let _ = child.wait();
}

/// The shipper's throughput into PostgreSQL at its batch size (printed; run with --nocapture).
#[test]
fn shipper_throughput() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::new("speed");
    let dir = temp_dir("speed");
    let (_store, path) = outbox_with(&dir, 5_000, 4);
    let mut outbox = usage::Outbox::open(&path).unwrap();
    let rt = fleet::runtime().unwrap();
    let config = cluster.config();
    let (n, took) = rt.block_on(async {
        let mut client = fleet::connect(&config).await.unwrap();
        fleet::migrate(&mut client).await.unwrap();
        let start = Instant::now();
        let mut n = 0;
        for _ in 0..1000 {
            let k = fleet::ship_once(&mut client, &mut outbox, config.batch)
                .await
                .unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        (n, start.elapsed())
    });
    assert_eq!(n, 20_000);
    assert_eq!(cluster.psql("SELECT COUNT(*) FROM usage_deltas"), "20000");
    eprintln!(
        "shipper: {n} deltas in {took:?} at batch {}: {:.0} records/s",
        config.batch,
        n as f64 / took.as_secs_f64()
    );
}

/// The pool holds at most `pool_size` connections (a caller beyond it waits, bounded), reuses an
/// idle one, and replaces one the server closed.
#[test]
fn the_pool_is_bounded_and_replaces_closed_connections() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::new("pool");
    let mut config = cluster.config();
    config.pool_size = 1;
    let rt = fleet::runtime().unwrap();
    rt.block_on(async {
        let pool = fleet::Pool::new(config);
        let first = pool.get(Duration::from_secs(10)).await.unwrap();
        let pid: i32 = first
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let err = pool.get(Duration::from_millis(200)).await.unwrap_err();
        assert!(err.to_string().contains("no free connection"), "{err}");
        drop(first);
        let again = pool.get(Duration::from_secs(10)).await.unwrap();
        let same: i32 = again
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(same, pid, "the idle connection is reused");
        drop(again);
        cluster.psql(&format!("SELECT pg_terminate_backend({pid})"));
        // The server closed it: the next caller gets a new, working connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let conn = pool.get(Duration::from_secs(10)).await.unwrap();
            match conn.query_one("SELECT pg_backend_pid()", &[]).await {
                Ok(row) => {
                    assert_ne!(row.get::<_, i32>(0), pid);
                    break;
                }
                // Not yet seen as closed when it was handed out: the error closes it.
                Err(_) => assert!(Instant::now() < deadline, "no new connection"),
            }
        }
    });
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM: (ca, cert, key).
fn ca_and_server_cert() -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "turnpike test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca.self_signed(&ca_key).unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// TLS to the database (`tls = "require"`, verified against `ca_file`): the pool connects, the ledger
/// migrates and ships through it, PostgreSQL reports the session as TLS; a CA that did not sign the
/// server's certificate is refused.
#[test]
fn the_ledger_ships_over_tls_verified_against_the_ca() {
    if !postgres_available() {
        return;
    }
    let dir = temp_dir("pgtls");
    let (ca, cert, key) = ca_and_server_cert();
    // The server runs as `postgres`: its key must be its own and private.
    let certs = std::env::temp_dir().join(format!("turnpike-pgtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&certs);
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("server.crt"), cert).unwrap();
    std::fs::write(certs.join("server.key"), key).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();
    let (other_ca, _, _) = ca_and_server_cert();
    std::fs::write(dir.join("other-ca.pem"), other_ca).unwrap();
    assert!(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&certs)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("chmod")
        .arg("600")
        .arg(certs.join("server.key"))
        .status()
        .unwrap()
        .success());
    let cluster = Cluster::with_options(
        "tls",
        &[
            "ssl=on".to_string(),
            format!("ssl_cert_file={}", certs.join("server.crt").display()),
            format!("ssl_key_file={}", certs.join("server.key").display()),
        ],
    );
    let mut config = cluster.config();
    config.tls = fleet::Tls::Require {
        ca_file: dir.join("ca.pem"),
    };
    let (_store, path) = outbox_with(&dir, 3, 2);
    let mut outbox = usage::Outbox::open(&path).unwrap();
    let rt = fleet::runtime().unwrap();
    rt.block_on(async {
        let pool = fleet::Pool::new(config.clone());
        let mut conn = pool.get(Duration::from_secs(10)).await.unwrap();
        let tls: bool = conn
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(tls, "the session is TLS");
        fleet::migrate(&mut conn).await.unwrap();
        assert_eq!(
            fleet::ship_once(&mut conn, &mut outbox, 1000)
                .await
                .unwrap(),
            6
        );
        drop(conn);
        assert_eq!(pool.idle(), 1, "the connection went back to the pool");

        let mut wrong = config.clone();
        wrong.tls = fleet::Tls::Require {
            ca_file: dir.join("other-ca.pem"),
        };
        let err = fleet::Pool::new(wrong)
            .get(Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
    });
    assert_eq!(cluster.psql("SELECT COUNT(*) FROM usage_deltas"), "6");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&certs);
}
