//! The fleet's shared state (issue 12) against a real PostgreSQL: fleet-wide revocation by
//! LISTEN/NOTIFY and the live relay registry behind `any` / `nearest`. Three relays, the real binary,
//! on 127.0.0.2, 127.0.0.3 and 127.0.0.4 with disjoint relay port ranges, each with its token API
//! (the API replicas), on one throwaway cluster per test.
//!
//! With `CI=true` a missing PostgreSQL fails these tests; elsewhere they say so and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::pg::{postgres_available, Cluster};
use common::{free_tcp_port, temp_dir, Client};
use turnpike::wire::{Attribute, Method};

const KEY_B64: &str = "dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5";
const TOKEN_PATH: &str =
    "/networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview";
const REVOKE_PATH: &str = "/admin/revoke?api-version=2022-03-01-preview";
/// The registry's timing in these tests (`[fleet] heartbeat_seconds`, `stale_seconds`).
const HEARTBEAT: Duration = Duration::from_secs(1);
const STALE: Duration = Duration::from_secs(4);
/// A relay only the static fleet of the config lists (the fallback when the registry is unreachable).
const STATIC_US: &str = "198.51.100.7:3478";

fn key() -> Vec<u8> {
    common::http::key_of(KEY_B64)
}

/// One relay of the fleet: its config file and, while it runs, the process.
struct Relay {
    id: String,
    config: PathBuf,
    listen: SocketAddr,
    api: SocketAddr,
    child: Option<Child>,
}

impl Relay {
    /// Configure relay `n` (on 127.0.0.`n`, relay ports `port_min`..+99) in `region`.
    fn new(dir: &Path, cluster: &Cluster, n: u8, region: &str, port_min: u16) -> Relay {
        let ip = format!("127.0.0.{n}");
        let port = UdpSocket::bind((ip.as_str(), 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let api_port = free_tcp_port();
        let id = format!("relay-{n}");
        let dir = dir.join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "listen = [\"{ip}:{port}\"]\nworkers = 1\npin_workers = false\ndrain_seconds = 60\n\
             relay_id = \"{id}\"\n\
             [relay]\naddresses = [\"{ip}\"]\nport_min = {port_min}\nport_max = {}\n\
             [rest]\nsecrets = [\"secret\"]\n\
             [peers]\nallow = [\"127.0.0.0/8\"]\n\
             [api]\nlisten = \"{ip}:{api_port}\"\naccess_keys = [\"{KEY_B64}\"]\nregion = \"{region}\"\n\
             [[api.client_regions]]\ncidr = \"127.0.0.1/32\"\nregion = \"us\"\n\
             [[api.fleet]]\nid = \"static-us\"\nregion = \"us\"\naddresses = [\"{STATIC_US}\"]\n\
             [usage]\ndatabase = \"{}\"\ncheckpoint_seconds = 1\n\
             [fleet]\npostgres = \"{}\"\nship_interval_seconds = 1\nheartbeat_seconds = {}\n\
             stale_seconds = {}\n",
            port_min + 99,
            dir.join("usage.db").display(),
            cluster.conninfo(),
            HEARTBEAT.as_secs(),
            STALE.as_secs(),
        );
        let config = dir.join("turnpike.toml");
        std::fs::write(&config, text).unwrap();
        Relay {
            id,
            config,
            listen: format!("{ip}:{port}").parse().unwrap(),
            api: format!("{ip}:{api_port}").parse().unwrap(),
            child: None,
        }
    }

    fn log(&self) -> PathBuf {
        self.config.with_extension("log")
    }

    /// Start the binary and wait (bounded) until it answers Binding, which it does only after its
    /// start-up catch-up with the fleet's revocations.
    fn start(&mut self) {
        for _ in 0..5 {
            // The log goes to stdout, errors to stderr: both into one file.
            let log = std::fs::File::create(self.log()).unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
                .arg("--config")
                .arg(&self.config)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(log)
                .spawn()
                .unwrap();
            if common::wait_binding(Duration::from_secs(20), self.listen, &mut child) {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "{} did not come up: {}",
            self.id,
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM: the relay starts draining (60 s) and keeps running meanwhile.
    fn term(&self) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A signed POST to the API at `api`, signed at `at`: the JSON answer or the status code.
fn signed_post_at(
    api: SocketAddr,
    url: &str,
    body: &str,
    at: SystemTime,
) -> Result<serde_json::Value, u16> {
    common::http::signed_post_at(api, &key(), url, body, at)
}

fn signed_post(api: SocketAddr, url: &str, body: &str) -> Result<serde_json::Value, u16> {
    signed_post_at(api, url, body, SystemTime::now())
}

/// REST credentials for `id` from the token endpoint at `api`: (username, password).
fn credentials(api: SocketAddr, id: &str) -> (String, String) {
    let v = signed_post(
        api,
        TOKEN_PATH,
        &format!(r#"{{"id": "{id}", "routeType": "any"}}"#),
    )
    .unwrap();
    let s = &v["iceServers"][0];
    (
        s["username"].as_str().unwrap().to_string(),
        s["credential"].as_str().unwrap().to_string(),
    )
}

/// The relays a token answer for `route` names, by their UDP `host:port`.
fn answered(api: SocketAddr, route: &str) -> BTreeSet<String> {
    let v = signed_post(
        api,
        TOKEN_PATH,
        &format!(r#"{{"id": "zoe", "routeType": "{route}"}}"#),
    )
    .unwrap();
    v["iceServers"][0]["urls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u.as_str()?.strip_prefix("stun:"))
        .map(str::to_string)
        .collect()
}

fn addrs(relays: &[&Relay]) -> BTreeSet<String> {
    relays.iter().map(|r| r.listen.to_string()).collect()
}

/// Poll `f` every 20 ms until it holds or `within` passes; how long it took, or `None`.
fn within(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A fresh Allocate with (`user`, `pass`) on `server`: its error code (`None`: it succeeded).
fn allocate_code(server: SocketAddr, user: &str, pass: &str) -> Option<u16> {
    let mut c = Client::new(server, user, pass);
    let r = c.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    Client::error_code(&r)
}

#[test]
fn a_revoke_through_one_api_is_refused_by_every_relay_within_2s_and_after_restarts() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::new("rev");
    let dir = temp_dir("fleet-revoke");
    let mut relays: Vec<Relay> = [(2, 37000), (3, 37100), (4, 37200)]
        .into_iter()
        .map(|(n, ports)| Relay::new(&dir, &cluster, n, "eu", ports))
        .collect();
    for r in &mut relays {
        r.start();
    }
    let (user, pass) = credentials(relays[0].api, "mallory");
    let (t_user, t_pass) = credentials(relays[1].api, "trent");
    // A live allocation of mallory's on every relay, and one of trent's (not revoked) on each too.
    let mut live: Vec<Client> = relays
        .iter()
        .map(|r| {
            let mut c = Client::new(r.listen, &user, &pass);
            c.allocate();
            c
        })
        .collect();
    let mut trent: Vec<Client> = relays
        .iter()
        .map(|r| {
            let mut c = Client::new(r.listen, &t_user, &t_pass);
            c.allocate();
            c
        })
        .collect();

    // Revoke through replica 1 (relay-2's API); terminate = false, so that what refuses the live
    // allocations' Refresh is the revocation itself, not their end.
    let t0 = Instant::now();
    let v = signed_post(
        relays[0].api,
        REVOKE_PATH,
        r#"{"id": "mallory", "terminate": false}"#,
    )
    .unwrap();
    assert_eq!(v["revoked"], true);
    let answered_in = t0.elapsed();
    let took: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = live
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    within(Duration::from_secs(10), || {
                        Client::error_code(&c.authed(Method::REFRESH, &[])) == Some(401)
                    })
                    .map(|_| t0.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap()
                    .expect("a relay never refused the revoked Refresh")
            })
            .collect()
    });
    eprintln!(
        "revocation propagation (revoke sent on relay-2's API, answered in {answered_in:?}) → \
         Refresh refused: relay-2 {:?}, relay-3 {:?}, relay-4 {:?}",
        took[0], took[1], took[2]
    );
    for (r, t) in relays.iter().zip(&took) {
        assert!(
            *t <= Duration::from_secs(2),
            "{} refused only after {t:?}",
            r.id
        );
    }
    // New allocations are refused everywhere too; trent's are untouched.
    for (r, t) in relays.iter().zip(&mut trent) {
        assert_eq!(allocate_code(r.listen, &user, &pass), Some(401), "{}", r.id);
        Client::expect_success(&t.authed(Method::REFRESH, &[]));
    }
    // A captured older lift, replayed to another replica, is refused by the fleet's record.
    let old = SystemTime::now() - Duration::from_secs(60);
    assert_eq!(
        signed_post_at(
            relays[2].api,
            REVOKE_PATH,
            r#"{"id": "mallory", "until": "1970-01-01T00:00:01Z"}"#,
            old
        ),
        Err(401)
    );

    // A relay restarted afterwards still refuses (it catches up from PostgreSQL before serving).
    relays[2].kill();
    relays[2].start();
    assert_eq!(allocate_code(relays[2].listen, &user, &pass), Some(401));

    // With the database down, a restarted relay still comes up, from its local copy, and says so.
    cluster.ctl("stop");
    relays[1].kill();
    relays[1].start();
    assert_eq!(allocate_code(relays[1].listen, &user, &pass), Some(401));
    let log = std::fs::read_to_string(relays[1].log()).unwrap();
    assert_eq!(
        log.matches("serving with the local copy").count(),
        1,
        "{log}"
    );
    cluster.ctl("start");

    // A lift through another replica reaches every relay (once the listener has reconnected).
    let v = signed_post(
        relays[2].api,
        REVOKE_PATH,
        r#"{"id": "mallory", "until": "1970-01-01T00:00:01Z"}"#,
    )
    .unwrap();
    assert_eq!(v["revoked"], false);
    for r in &relays {
        let ok = within(Duration::from_secs(15), || {
            allocate_code(r.listen, &user, &pass).is_none()
        });
        assert!(ok.is_some(), "{} still refuses after the lift", r.id);
    }
}

#[test]
fn the_token_api_answers_from_live_relays_draining_and_dead_ones_leave() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::new("reg");
    let dir = temp_dir("fleet-registry");
    let mut relays: Vec<Relay> = [(2, "eu", 37300), (3, "us", 37400), (4, "us", 37500)]
        .into_iter()
        .map(|(n, region, ports)| Relay::new(&dir, &cluster, n, region, ports))
        .collect();
    for r in &mut relays {
        r.start();
    }
    let api = relays[0].api;
    let all = addrs(&[&relays[0], &relays[1], &relays[2]]);
    // Every relay heartbeats into the registry, which every replica reads.
    // (The static entry is the fallback only: a registry answer never lists it.)
    let t = within(Duration::from_secs(10), || answered(api, "any") == all);
    assert!(t.is_some(), "any: {:?}", answered(api, "any"));
    // Every replica reads the same registry.
    let t = within(Duration::from_secs(10), || {
        answered(relays[2].api, "any") == all
    });
    assert!(t.is_some(), "any: {:?}", answered(relays[2].api, "any"));
    // nearest: the client (127.0.0.1) is in region "us" by client_regions, although this replica
    // (relay-2) is in "eu": the live relays of the client's region.
    assert_eq!(answered(api, "nearest"), addrs(&[&relays[1], &relays[2]]));

    // SIGTERM relay-3: it drains (and keeps running), and leaves the answers within one heartbeat.
    relays[1].term();
    let t0 = Instant::now();
    let left = within(Duration::from_secs(10), || {
        !answered(api, "any").contains(&relays[1].listen.to_string())
    })
    .expect("a draining relay is still handed out");
    let left_at = t0.elapsed();
    assert!(relays[1].running(), "relay-3 should still be draining");
    eprintln!("drain: relay-3 left the answers {left:?} after SIGTERM");
    // One heartbeat, plus the API's registry read (at most every second) and this poll, generously.
    assert!(
        left_at <= HEARTBEAT + Duration::from_secs(2),
        "a draining relay left only after {left_at:?}"
    );
    assert_eq!(answered(api, "nearest"), addrs(&[&relays[2]]));

    // kill -9 relay-4: it stops heartbeating and leaves within the stale timeout.
    relays[2].kill();
    let t0 = Instant::now();
    within(Duration::from_secs(20), || {
        !answered(api, "any").contains(&relays[2].listen.to_string())
    })
    .expect("a dead relay is still handed out");
    let gone = t0.elapsed();
    eprintln!("kill -9: relay-4 left the answers {gone:?} after it died (stale {STALE:?})");
    assert!(
        gone <= STALE + HEARTBEAT + Duration::from_secs(2),
        "a dead relay left only after {gone:?}"
    );
    assert_eq!(answered(api, "any"), addrs(&[&relays[0]]));

    // The registry unreachable: the replica answers from its static fleet (itself and static-us).
    cluster.ctl("stop");
    let mut fallback = addrs(&[&relays[0]]);
    fallback.insert(STATIC_US.to_string());
    let t = within(Duration::from_secs(15), || answered(api, "any") == fallback);
    assert!(t.is_some(), "any: {:?}", answered(api, "any"));
    assert_eq!(
        answered(api, "nearest"),
        BTreeSet::from([STATIC_US.to_string()])
    );
    cluster.ctl("start");
}
