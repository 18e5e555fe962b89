//! The token API, metering and metrics end to end: the official Python SDK against the real binary
//! (plain HTTP and TLS), exact usage rows in SQLite after relaying known traffic, a SIGKILL mid-run,
//! revocation through the admin API, and a Prometheus scrape parsed by prometheus_client. The
//! attacks and contracts of issue 11 (oversized and trickled requests, idle connections, TLS
//! close_notify, replays, Host and roles, max_ttl, trusted proxies) run against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::http::{key_of, raw};
use common::tls::{tls_client, tls_healthz};
use common::*;
use turnpike::api::sign;
use turnpike::auth::RestSecrets;
use turnpike::clock::unix_now;
use turnpike::config::RelayConfig;
use turnpike::wire::{Attribute, Method};

const KEY_B64: &str = "dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5";
const SECRET: &str = "secret";

fn key() -> Vec<u8> {
    key_of(KEY_B64)
}

/// A free UDP port for a relay's listener. The relay refuses to start on a port another socket holds
/// (it probes before binding with SO_REUSEPORT), so two concurrent tests can never silently share one;
/// the port is released here before the relay binds it.
struct Reserved(u16);

impl Reserved {
    fn port(&self) -> u16 {
        self.0
    }
}

fn reserve_udp() -> Reserved {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    Reserved(s.local_addr().unwrap().port())
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A configuration with the API and metering on, relaying on loopback with ports `base..base+999`.
fn config_text(listen: u16, api: u16, base: u16, db: &Path, extra_api: &str) -> String {
    config_on("epoll", listen, api, base, db, extra_api)
}

fn config_on(
    backend: &str,
    listen: u16,
    api: u16,
    base: u16,
    db: &Path,
    extra_api: &str,
) -> String {
    format!(
        r#"listen = ["127.0.0.1:{listen}"]
workers = 2
pin_workers = false
backend = "{backend}"
drain_seconds = 0
relay_id = "test-relay"
[relay]
addresses = ["127.0.0.1"]
port_min = {base}
port_max = {max}
[rest]
secrets = ["{SECRET}"]
[peers]
allow = ["127.0.0.0/8"]
[api]
listen = "127.0.0.1:{api}"
access_keys = ["{KEY_B64}"]
{extra_api}
[usage]
database = "{db}"
checkpoint_seconds = 1
"#,
        max = base + 999,
        db = db.display()
    )
}

struct Relay {
    child: Child,
}

impl Relay {
    fn spawn(config: &Path, api: SocketAddr) -> Relay {
        let child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
            .args(["--config", config.to_str().unwrap(), "--log-level", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .expect("turnpike starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while ureq::get(&format!("http://{api}/healthz")).call().is_err() {
            assert!(Instant::now() < deadline, "the API did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Relay { child }
    }

    /// SIGTERM and wait (drain_seconds = 0: live allocations get final records).
    fn terminate(mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }

    /// SIGKILL: no chance to flush anything.
    fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary on configuration `text`, written to `dir`: the relay, its UDP listener (port
/// `listen`, as in `text`) and its API's address (port `api`). Attacks go against this process.
fn spawn_relay(dir: &Path, text: &str, listen: u16, api: u16) -> (Relay, SocketAddr, SocketAddr) {
    let cfg = dir.join("turnpike.toml");
    std::fs::write(&cfg, text).unwrap();
    let api: SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();
    let relay = Relay::spawn(&cfg, api);
    (relay, format!("127.0.0.1:{listen}").parse().unwrap(), api)
}

/// (identity, to_peer_bytes, to_peer_packets, to_client_bytes, to_client_packets, end_reason) per row.
type Row = (String, u64, u64, u64, u64, Option<String>);

fn rows(db: &Path) -> Vec<Row> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare(
            "SELECT identity, to_peer_bytes, to_peer_packets, to_client_bytes, to_client_packets, end_reason
             FROM allocations ORDER BY run_id, allocation",
        )
        .unwrap();
    let r = s
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
                r.get::<_, i64>(4)? as u64,
                r.get(5)?,
            ))
        })
        .unwrap();
    r.map(Result::unwrap).collect()
}

/// Poll until `f` holds (records travel control → writer → SQLite asynchronously).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A REST-credential client on `server`, allocated, with a channel to a fresh peer.
fn rest_client(server: SocketAddr, id: &str) -> (Client, UdpSocket, SocketAddr) {
    let cred = RestSecrets::new(vec![SECRET.as_bytes().to_vec()])
        .mint(id, unix_now(), 3600)
        .unwrap();
    let mut c = Client::new(server, &cred.username, &cred.password);
    let relayed = c.allocate();
    let p = peer();
    c.bind(0x4000, p.local_addr().unwrap());
    (c, p, relayed)
}

/// `n` ChannelData packets of `size` bytes each way; returns when all have arrived.
fn exchange(c: &Client, p: &UdpSocket, relayed: SocketAddr, n: usize, size: usize) {
    let payload = vec![0x5A; size];
    let mut buf = [0u8; 2048];
    for _ in 0..n {
        c.send_channel(0x4000, &payload);
        let (len, from) = p.recv_from(&mut buf).unwrap();
        assert_eq!((len, from), (size, relayed));
        p.send_to(&payload, relayed).unwrap();
        assert_eq!(c.recv().len(), 4 + size);
    }
}

fn signed_get(api: SocketAddr, url: &str) -> serde_json::Value {
    http::signed_get(api, &key(), url)
}

fn signed_post(api: SocketAddr, url: &str, body: &str) -> Result<serde_json::Value, u16> {
    http::signed_post_at(api, &key(), url, body, SystemTime::now())
}

#[test]
fn usage_rows_match_the_bytes_relayed_exactly_with_checkpoints_and_final_records() {
    for (i, backend) in backends().into_iter().enumerate() {
        let name = match backend {
            turnpike::dataplane::BackendKind::Epoll => "epoll",
            turnpike::dataplane::BackendKind::IoUring => "io_uring",
        };
        exact_usage(name, 41000 + 1000 * i as u16);
    }
}

fn exact_usage(backend: &str, base: u16) {
    let dir = temp_dir(&format!("exact-{backend}"));
    let db = dir.join("usage.db");
    let api_port = free_tcp_port();
    let reserved = reserve_udp();
    let text = config_on(backend, reserved.port(), api_port, base, &db, "");
    let config = RelayConfig::from_toml(&text).unwrap();
    let service = turnpike::service::start(&config).unwrap();
    let server = service.relay().listen_addrs()[0];
    let api = service.api_addr().unwrap();

    let (mut c, p, relayed) = rest_client(server, "carol");
    // Send indications and Data indications count too (payload bytes only, not headers).
    let peer_addr = p.local_addr().unwrap();
    c.send_indication(peer_addr, &[1u8; 33]);
    let mut buf = [0u8; 2048];
    assert_eq!(p.recv_from(&mut buf).unwrap().0, 33);
    exchange(&c, &p, relayed, 25, 100);

    // A checkpoint of the live allocation carries its exact counters so far.
    eventually("a checkpoint", || {
        rows(&db) == [("carol".into(), 33 + 2500, 26, 2500, 25, None)]
    });

    exchange(&c, &p, relayed, 10, 7);
    let r = c.authed(Method::REFRESH, &[Attribute::Lifetime(0)]);
    Client::expect_success(&r);
    let carol: Row = (
        "carol".into(),
        33 + 2500 + 70,
        36,
        2570,
        35,
        Some("ended".into()),
    );
    eventually("the final record", || rows(&db) == [carol.clone()]);

    // An allocation still live at stop gets its final record from the workers' last counters.
    let (d, pd, relayed_d) = rest_client(server, "dave");
    exchange(&d, &pd, relayed_d, 3, 1000);
    // The usage summary over the API (same as `turnpike usage --json`).
    eventually("dave's checkpoint", || rows(&db).len() == 2);
    let v = signed_get(api, "/usage?since=2020-01-01T00:00:00Z");
    let ids = v["identities"].as_array().unwrap();
    assert_eq!(ids[0]["identity"], "carol");
    assert_eq!(ids[0]["to_peer_bytes"], 2603);
    assert_eq!(ids[0]["to_client_packets"], 35);
    assert_eq!(ids[1]["identity"], "dave");

    service.stop().unwrap();
    assert_eq!(
        rows(&db),
        [
            carol,
            ("dave".into(), 3000, 3, 3000, 3, Some("ended".into()))
        ]
    );

    // `turnpike usage` reads the same.
    let cfg = dir.join("turnpike.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["usage", "--json", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identities"][1]["to_client_bytes"], 3000);
    let table = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args([
            "usage",
            "--since",
            "2020-01-01T00:00:00Z",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("carol") && l.contains("2603")),
        "{table}"
    );
}

#[test]
fn sigkill_loses_at_most_one_checkpoint_interval_and_restart_counts_nothing_twice() {
    let dir = temp_dir("sigkill");
    let db = dir.join("usage.db");
    let cfg = dir.join("turnpike.toml");
    let reserved = reserve_udp();
    let (listen, api_port) = (reserved.port(), free_tcp_port());
    std::fs::write(&cfg, config_text(listen, api_port, 46000, &db, "")).unwrap();
    let server: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();

    let relay = Relay::spawn(&cfg, api);
    let (c, p, relayed) = rest_client(server, "erin");
    exchange(&c, &p, relayed, 20, 50);
    // Two checkpoint intervals: the 20 packets each way are checkpointed.
    std::thread::sleep(Duration::from_millis(2500));
    exchange(&c, &p, relayed, 10, 50);
    relay.sigkill();

    let before = rows(&db);
    assert_eq!(before.len(), 1);
    let (_, bytes, packets, cbytes, cpackets, reason) = before[0].clone();
    assert_eq!(reason, None, "still open: the process died");
    assert!((20..=30).contains(&packets), "{packets}");
    assert_eq!(
        (bytes, cbytes),
        (packets * 50, cpackets * 50),
        "consistent counters"
    );
    assert!((20..=30).contains(&cpackets));

    // Restart: the open row is closed at its checkpoint, unchanged.
    let relay = Relay::spawn(&cfg, api);
    let after = rows(&db);
    assert_eq!(after[0].5.as_deref(), Some("lost"));
    assert_eq!(after[0].1..=after[0].4, bytes..=cpackets);
    // New traffic of the same identity goes to a new row, and the summary adds both exactly once.
    let (c, p, relayed) = rest_client(server, "erin");
    exchange(&c, &p, relayed, 7, 50);
    relay.terminate();
    let all = rows(&db);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], after[0], "a closed row never changes");
    assert_eq!(
        all[1],
        ("erin".into(), 350, 7, 350, 7, Some("ended".into()))
    );
    let store = turnpike::usage::Store::open_reader(&db).unwrap();
    let sum = store.summary(0, u64::MAX).unwrap();
    assert_eq!(sum[0].to_peer_packets, packets + 7);
    assert_eq!(sum[0].allocations, 2);
}

/// Issue 14: a second `turnpike` on the same database refuses to start, before it writes anything; the
/// first one's open rows stay open and are finished by the first one, exactly.
#[test]
fn a_second_instance_on_the_same_database_refuses_and_leaves_the_first_ones_rows_alone() {
    let dir = temp_dir("second");
    let db = dir.join("usage.db");
    let cfg = dir.join("turnpike.toml");
    let reserved = reserve_udp();
    let (listen, api_port) = (reserved.port(), free_tcp_port());
    std::fs::write(&cfg, config_text(listen, api_port, 49000, &db, "")).unwrap();
    let server: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();

    let relay = Relay::spawn(&cfg, api);
    let (c, p, relayed) = rest_client(server, "fay");
    exchange(&c, &p, relayed, 5, 40);
    eventually("a checkpointed row", || rows(&db).len() == 1);

    let mut second = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--config", cfg.to_str().unwrap(), "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second instance did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another turnpike"), "{stderr}");
    assert!(stderr.contains("usage.db.lock"), "{stderr}");
    assert_eq!(rows(&db)[0].5, None, "the live run's row is still open");

    // The first instance carries on and closes its row itself, with everything it relayed.
    exchange(&c, &p, relayed, 5, 40);
    relay.terminate();
    assert_eq!(
        rows(&db),
        [("fay".into(), 400, 10, 400, 10, Some("ended".into()))]
    );
}

/// Issue 14: rows closed longer ago than `[usage] retention_days` (default 90) are pruned by the running
/// relay; open rows are kept whatever their age; `/usage` and `turnpike usage` without bounds cover the
/// last 31 days, not everything ever recorded.
#[test]
fn old_closed_rows_are_pruned_and_usage_defaults_to_a_bounded_range() {
    let dir = temp_dir("retention");
    let db = dir.join("usage.db");
    let cfg = dir.join("turnpike.toml");
    let reserved = reserve_udp();
    let (listen, api_port) = (reserved.port(), free_tcp_port());
    std::fs::write(&cfg, config_text(listen, api_port, 50000, &db, "")).unwrap();
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();

    let day = 86_400_000u64;
    let now = unix_now() * 1000;
    let row = |allocation, identity: &str, started_ms, at_ms, done| turnpike::usage::Record {
        allocation,
        identity: identity.into(),
        transport: "udp",
        client: None,
        server: None,
        relayed: None,
        started_ms,
        at_ms,
        done,
        end_reason: "ended",
        to_peer_bytes: 100,
        to_peer_packets: 1,
        to_client_bytes: 100,
        to_client_packets: 1,
    };
    {
        // Another relay's run, so that this relay's start does not close its open row as lost.
        let mut store = turnpike::usage::Store::open(&db, "other-relay", now - 200 * day).unwrap();
        store
            .record(&[
                row(1, "ancient", now - 200 * day, now - 199 * day, true),
                row(2, "last-month", now - 41 * day, now - 40 * day, true),
                row(3, "still-open", now - 200 * day, now - 199 * day, false),
                row(4, "yesterday", now - 2 * day, now - day, true),
            ])
            .unwrap();
    }
    let identities = || rows(&db).into_iter().map(|r| r.0).collect::<Vec<_>>();
    assert_eq!(identities().len(), 4);

    let relay = Relay::spawn(&cfg, api);
    eventually("the prune at start", || {
        identities() == ["last-month", "still-open", "yesterday"]
    });
    let listed = |url: &str| {
        signed_get(api, url)["identities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["identity"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed("/usage"), ["yesterday"], "default: the last 31 days");
    assert_eq!(
        listed("/usage?since=2020-01-01T00:00:00Z"),
        ["last-month", "still-open", "yesterday"]
    );
    relay.terminate();

    let cli = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["usage", "--json", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cli.status.success());
    let v: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(v["identities"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["identities"][0]["identity"], "yesterday");
}

#[test]
fn credentials_command_mints_what_the_relays_accept() {
    let dir = temp_dir("cli");
    let cfg = dir.join("turnpike.toml");
    std::fs::write(
        &cfg,
        config_text(3478, 8080, 47000, &dir.join("usage.db"), ""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args([
            "credentials",
            "--id",
            "script-user",
            "--ttl",
            "600",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["iceServers"][0];
    assert_eq!(
        s["urls"],
        serde_json::json!(["stun:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=udp"])
    );
    let username = s["username"].as_str().unwrap();
    let expiry = turnpike::auth::parse_rest_username(username).unwrap();
    assert_eq!(expiry.user, "script-user");
    assert!((unix_now() + 590..=unix_now() + 600).contains(&expiry.expiry));
    let secrets = RestSecrets::new(vec![SECRET.as_bytes().to_vec()]);
    assert!(secrets
        .passwords(username, unix_now())
        .unwrap()
        .any(|p| p == s["credential"]));
    let bad = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args([
            "credentials",
            "--id",
            "x",
            "--route-type",
            "fastest",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn revocation_through_the_api_refuses_the_next_request_and_survives_restart() {
    let dir = temp_dir("revoke");
    let db = dir.join("usage.db");
    let reserved = reserve_udp();
    let text = config_text(reserved.port(), free_tcp_port(), 43000, &db, "");
    let config = RelayConfig::from_toml(&text).unwrap();
    let service = turnpike::service::start(&config).unwrap();
    let server = service.relay().listen_addrs()[0];
    let api = service.api_addr().unwrap();

    // Credentials from the token endpoint itself.
    let v = signed_post(
        api,
        "/networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview",
        r#"{"id": "mallory", "routeType": "any", "ttl": 600}"#,
    )
    .unwrap();
    let s = &v["iceServers"][0];
    assert_eq!(s["urls"][1], format!("turn:{server}?transport=udp"));
    let mut m = Client::new(
        server,
        s["username"].as_str().unwrap(),
        s["credential"].as_str().unwrap(),
    );
    m.allocate();
    let (mut ok, _, _) = rest_client(server, "trent");

    let revoked = signed_post(
        api,
        "/admin/revoke?api-version=2022-03-01-preview",
        r#"{"id": "mallory"}"#,
    );
    assert_eq!(revoked.unwrap()["revoked"], true);
    assert_eq!(
        signed_post(
            api,
            "/admin/revoke",
            r#"{"id": "x"}"#.replace('x', "").as_str()
        ),
        Err(400)
    );
    eventually("the revocation to reach the relay", || {
        Client::error_code(&m.authed(Method::REFRESH, &[])) == Some(401)
    });
    Client::expect_success(&ok.authed(Method::REFRESH, &[]));
    service.stop().unwrap();

    // After a restart (same database) the revocation still holds.
    let service = turnpike::service::start(&config).unwrap();
    let server = service.relay().listen_addrs()[0];
    m.server = server;
    m.nonce = None;
    let resp = m.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    assert_eq!(Client::error_code(&resp), Some(401));
    let metrics = ureq::get(&format!("http://{}/metrics", service.api_addr().unwrap()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "turnpike_auth_failures_total{kind=\"revoked\"} 1"),
        "{metrics}"
    );
    service.stop().unwrap();
}

#[test]
fn a_revoke_through_the_api_stops_a_live_allocation_relaying_and_its_usage_says_revoked() {
    let dir = temp_dir("revoke-terminate");
    let db = dir.join("usage.db");
    let reserved = reserve_udp();
    let text = config_text(reserved.port(), free_tcp_port(), 53000, &db, "");
    let config = RelayConfig::from_toml(&text).unwrap();
    let service = turnpike::service::start(&config).unwrap();
    let server = service.relay().listen_addrs()[0];
    let api = service.api_addr().unwrap();

    let (c, p, relayed) = rest_client(server, "mallory");
    exchange(&c, &p, relayed, 5, 100);
    let (k, pk, relayed_k) = rest_client(server, "kept");
    let (t, pt, relayed_t) = rest_client(server, "trent");

    // `terminate: false` only refuses new requests: the allocation keeps relaying.
    let v = signed_post(
        api,
        "/admin/revoke?api-version=2022-03-01-preview",
        r#"{"id": "kept", "terminate": false}"#,
    )
    .unwrap();
    assert_eq!(
        (&v["revoked"], &v["terminated"]),
        (&serde_json::json!(true), &serde_json::json!(false))
    );

    let v = signed_post(
        api,
        "/admin/revoke?api-version=2022-03-01-preview",
        r#"{"id": "mallory"}"#,
    )
    .unwrap();
    assert_eq!(
        (&v["revoked"], &v["terminated"]),
        (&serde_json::json!(true), &serde_json::json!(true))
    );

    // Within a bounded wait the relay stops forwarding the client's channel data. The revoke is
    // applied by the control thread after the API answers: bounded in time (10 s, at most 500
    // rounds), not only in rounds, which a relay still forwarding would use up in milliseconds.
    p.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut stopped = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..500 {
        c.send_channel(0x4000, &[0x5A; 100]);
        if p.recv_from(&mut buf).is_err() {
            stopped = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(stopped, "the revoked allocation still relays");
    eventually("the revoked allocation's final row", || {
        rows(&db)
            .iter()
            .any(|r| r.0 == "mallory" && r.5.as_deref() == Some("revoked"))
    });

    // The other allocations keep relaying, the one revoked without terminate included.
    exchange(&k, &pk, relayed_k, 2, 10);
    exchange(&t, &pt, relayed_t, 2, 10);
    service.stop().unwrap();
    let reasons: Vec<(String, Option<String>)> =
        rows(&db).into_iter().map(|r| (r.0, r.5)).collect();
    assert_eq!(
        reasons,
        [
            ("mallory".into(), Some("revoked".into())),
            ("kept".into(), Some("ended".into())),
            ("trent".into(), Some("ended".into())),
        ]
    );
}

fn check_sdk_result(v: &serde_json::Value, server: SocketAddr) {
    let servers = v["ice_servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0]["route_type"], "any");
    assert_eq!(servers[1]["route_type"], "nearest");
    assert!(servers[0]["username"]
        .as_str()
        .unwrap()
        .ends_with(":8:acs:sdk-user"));
    assert_eq!(
        servers[0]["urls"],
        serde_json::json!([
            format!("stun:{server}"),
            format!("turn:{server}?transport=udp")
        ])
    );
    assert_eq!(v["nearest_route_types"], serde_json::json!(["nearest"]));
    assert_eq!(v["bad_key_status"], 401);
    assert_eq!(v["turn"]["peer_got"], "hello from the sdk client");
    assert_eq!(v["turn"]["client_got"], "hello back");
    assert_eq!(v["allocations_created"], 1.0);
    assert_eq!(v["relayed_bytes"]["to_peer"], 25.0);
    assert_eq!(v["relayed_bytes"]["to_client"], 10.0);
    for family in [
        "turnpike_allocations",
        "turnpike_allocations_failed",
        "turnpike_permissions",
        "turnpike_channels",
        "turnpike_relayed_packets",
        "turnpike_dropped_packets",
        "turnpike_auth_failures",
        "turnpike_worker_received_packets",
        "turnpike_backend",
        "turnpike_build",
    ] {
        assert!(
            v["metric_families"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == family),
            "{family} missing"
        );
    }
}

#[test]
fn python_sdk_gets_a_relay_configuration_and_allocates_with_it() {
    if !common::sdk::python_ready() {
        return;
    }
    let dir = temp_dir("sdk");
    let db = dir.join("usage.db");
    let cfg = dir.join("turnpike.toml");
    let reserved = reserve_udp();
    let (listen, api_port) = (reserved.port(), free_tcp_port());
    std::fs::write(&cfg, config_text(listen, api_port, 44000, &db, "")).unwrap();
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let relay = Relay::spawn(&cfg, api);
    let v = common::sdk::run_sdk(&format!("http://{api}"), KEY_B64, None, true);
    check_sdk_result(&v, format!("127.0.0.1:{listen}").parse().unwrap());
    relay.terminate();
    // The SDK's identity is billed exactly what aioice relayed.
    assert_eq!(
        rows(&db),
        [("8:acs:sdk-user".into(), 25, 1, 10, 1, Some("ended".into()))]
    );
}

#[test]
fn python_sdk_over_tls_with_a_certificate_made_by_the_test() {
    if !common::sdk::python_ready() {
        return;
    }
    let dir = temp_dir("tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (relay, listen, api, cert_pem) = spawn_tls_relay(&dir, &cert, 45000);
    let v = common::sdk::run_sdk(
        &format!("https://localhost:{}", api.port()),
        KEY_B64,
        Some(&cert_pem),
        true,
    );
    check_sdk_result(&v, listen);
    // Plain HTTP to the TLS port gets nowhere.
    assert!(ureq::get(&format!("http://{api}/healthz"))
        .timeout(Duration::from_secs(2))
        .call()
        .is_err());
    relay.terminate();
}

const TOKEN_PATH: &str =
    "/networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview";
const REVOKE_PATH: &str = "/admin/revoke?api-version=2022-03-01-preview";
/// A second key, given the admin role only in the tests that configure `admin_keys`.
const ADMIN_B64: &str = "dHVybnBpa2UtdGVzdC1hZG1pbi1rZXk=";

/// A signed request's bytes (HTTP/1.1, `Connection: close`), signed with `key` at `at` for `host`.
fn signed_bytes(host: &str, url: &str, body: &str, key: &[u8], at: SystemTime) -> Vec<u8> {
    let (date, hash, auth) = sign::sign(key, "POST", url, host, body.as_bytes(), at);
    format!(
        "POST {url} HTTP/1.1\r\nHost: {host}\r\nx-ms-date: {date}\r\nx-ms-content-sha256: {hash}\r\n\
         Authorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn host_roles_replays_and_stale_lifts_over_http_and_revocations_survive_a_restart_without_usage() {
    let dir = temp_dir("admin");
    let reserved = reserve_udp();
    let api_port = free_tcp_port();
    // No [usage]: revocations have a store of their own.
    let text = config_text(reserved.port(), api_port, 46000, &dir.join("unused.db"), "")
        .replace(
            &format!("access_keys = [\"{KEY_B64}\"]\n"),
            &format!(
                "access_keys = [\"{KEY_B64}\"]\nadmin_keys = [\"{ADMIN_B64}\"]\nrevocations_database = \"{}\"\n",
                dir.join("revocations.db").display()
            ),
        );
    let text = text.split("[usage]").next().unwrap().to_string();
    assert!(RelayConfig::from_toml(&text).unwrap().fixed.usage.is_none());
    let (relay, server, api) = spawn_relay(&dir, &text, reserved.port(), api_port);
    let host = api.to_string();
    let (mint, admin) = (key(), key_of(ADMIN_B64));
    let now = SystemTime::now();

    // A token with the access key; a wrong Host is refused even when correctly signed for it.
    let (status, _) = raw(api, &signed_bytes(&host, TOKEN_PATH, "{}", &mint, now));
    assert_eq!(status, 200);
    let (status, body) = raw(
        api,
        &signed_bytes("relay-2.example:8080", TOKEN_PATH, "{}", &mint, now),
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"Unauthorized\""), "{body}");
    // The access key may not revoke; the admin key may not mint.
    let revoke = r#"{"id": "mallory"}"#;
    let (status, body) = raw(api, &signed_bytes(&host, REVOKE_PATH, revoke, &mint, now));
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        raw(api, &signed_bytes(&host, TOKEN_PATH, "{}", &admin, now)).0,
        403
    );

    // A revoke, then its replay.
    let (c, _, _) = rest_client(server, "mallory");
    let mut c = c;
    let revoke_req = signed_bytes(&host, REVOKE_PATH, revoke, &admin, now);
    assert_eq!(raw(api, &revoke_req).0, 200);
    assert_eq!(raw(api, &revoke_req).0, 401, "replayed revoke");
    // A lift signed before the revoke (a captured old request) is refused; the revocation holds.
    let lift = r#"{"id": "mallory", "until": "2020-01-01T00:00:00Z"}"#;
    let old_lift = signed_bytes(
        &host,
        REVOKE_PATH,
        lift,
        &admin,
        now - Duration::from_secs(120),
    );
    assert_eq!(
        raw(api, &old_lift).0,
        401,
        "older lift after a newer revoke"
    );
    eventually("the revocation to reach the relay", || {
        Client::error_code(&c.authed(Method::REFRESH, &[])) == Some(401)
    });
    relay.terminate();

    // After a restart (no [usage]) the revocation still holds, and the replays are still refused.
    let (relay, server, api) = spawn_relay(&dir, &text, reserved.port(), api_port);
    let cred = RestSecrets::new(vec![SECRET.as_bytes().to_vec()])
        .mint("mallory", unix_now(), 600)
        .unwrap();
    let mut m = Client::new(server, &cred.username, &cred.password);
    let resp = m.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    assert_eq!(Client::error_code(&resp), Some(401));
    assert_eq!(raw(api, &old_lift).0, 401, "the order survives the restart");
    // A newer lift applies.
    let later = SystemTime::now() + Duration::from_secs(2);
    let new_lift = signed_bytes(&host, REVOKE_PATH, lift, &admin, later);
    assert_eq!(raw(api, &new_lift).0, 200);
    relay.terminate();
}

#[test]
fn x_forwarded_for_from_an_untrusted_peer_is_ignored_and_metrics_listen_apart() {
    let dir = temp_dir("xff");
    let reserved = reserve_udp();
    let metrics_port = free_tcp_port();
    let extra = format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n") + "trusted_proxies = [\"10.0.0.0/8\"]\nregion = \"eu\"\n\
                 [[api.fleet]]\nid = \"us-1\"\nregion = \"us\"\naddresses = [\"198.51.100.1:3478\"]\n\
                 [[api.client_regions]]\ncidr = \"203.0.113.0/24\"\nregion = \"us\"";
    let api_port = free_tcp_port();
    let text = config_text(reserved.port(), api_port, 47000, &dir.join("u.db"), &extra);
    let (relay, _, api) = spawn_relay(&dir, &text, reserved.port(), api_port);
    let body = r#"{"routeType": "nearest"}"#;
    let mut req = signed_bytes(
        &api.to_string(),
        TOKEN_PATH,
        body,
        &key(),
        SystemTime::now(),
    );
    let at = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    req.splice(at..at, b"\r\nX-Forwarded-For: 203.0.113.9".iter().copied());
    let (status, answer) = raw(api, &req);
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let urls = v["iceServers"][0]["urls"].to_string();
    assert!(
        !urls.contains("198.51.100.1") && urls.contains("127.0.0.1"),
        "the loopback peer is no trusted proxy: its region is the API's own ({urls})"
    );
    // /metrics answers on its own listener only.
    let metrics = ureq::get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .unwrap();
    assert!(metrics
        .into_string()
        .unwrap()
        .contains("turnpike_allocations"));
    match ureq::get(&format!("http://{api}/metrics")).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("/metrics on the API listener: {other:?}"),
    }
    relay.terminate();
}

/// What the server did with a connection: answered with a status, or closed it without one. Panics if
/// it did neither within `wait` (the limit did not hold).
fn answered_or_closed(s: &mut std::net::TcpStream, wait: Duration) -> u16 {
    use std::io::Read;
    s.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("neither answered nor closed within {wait:?}: {e}"),
        }
    }
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn huge_headers_many_headers_and_trickled_bodies_are_cut_off_while_tokens_are_issued() {
    use std::io::Write;
    let dir = temp_dir("limits");
    let reserved = reserve_udp();
    let extra = "[api.limits]\nheader_read_timeout_seconds = 2\nrequest_timeout_seconds = 2";
    let api_port = free_tcp_port();
    let text = config_text(reserved.port(), api_port, 48000, &dir.join("u.db"), extra);
    let (relay, _, api) = spawn_relay(&dir, &text, reserved.port(), api_port);
    let wait = Duration::from_secs(2 + 8);

    let huge_line = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(api).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ");
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..16 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        answered_or_closed(&mut s, wait)
    });
    let many = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(api).unwrap();
        let mut req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..10_000 {
            req.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let _ = s.write_all(&req);
        answered_or_closed(&mut s, wait)
    });
    let trickle = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(api).unwrap();
        let head = signed_bytes(
            &api.to_string(),
            TOKEN_PATH,
            &" ".repeat(100),
            &key(),
            SystemTime::now(),
        );
        let at = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        s.write_all(&head[..at]).unwrap();
        // One byte a second, at most 12: the server must answer (408) or close long before 100.
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        for _ in 0..12 {
            if s.write_all(b" ").is_err() {
                return 0;
            }
            let mut b = [0u8; 512];
            match std::io::Read::read(&mut s, &mut b) {
                Ok(0) => return 0,
                Ok(n) => {
                    let t = String::from_utf8_lossy(&b[..n]).to_string();
                    return t
                        .split(' ')
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return 0,
            }
        }
        panic!("a body trickling one byte a second was neither refused nor closed");
    });
    // Meanwhile the token endpoint answers (a generous bound for a loaded machine).
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(api).unwrap();
        s.write_all(&signed_bytes(
            &api.to_string(),
            TOKEN_PATH,
            "{}",
            &key(),
            SystemTime::now(),
        ))
        .unwrap();
        assert_eq!(answered_or_closed(&mut s, Duration::from_secs(5)), 200);
        std::thread::sleep(Duration::from_millis(500));
    }
    let big = huge_line.join().unwrap();
    assert!(big == 431 || big == 0, "1 MiB header line: {big}");
    let many = many.join().unwrap();
    assert!(many == 431 || many == 0, "10,000 headers: {many}");
    let slow = trickle.join().unwrap();
    assert!(slow == 408 || slow == 0, "trickled body: {slow}");
    // A body over the limit gets the API's JSON 413.
    let (status, body) = raw(
        api,
        &signed_bytes(
            &api.to_string(),
            TOKEN_PATH,
            &" ".repeat(70 * 1024),
            &key(),
            SystemTime::now(),
        ),
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("PayloadTooLarge"), "{body}");
    // The request layer counted what it answered, the limits' refusals included.
    let metrics = ureq::get(&format!("http://{api}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for line in [
        "turnpike_api_requests_total{route=\"token\",status=\"200\"} 3",
        "turnpike_api_requests_total{route=\"token\",status=\"413\"} 1",
        "turnpike_api_request_duration_seconds_bucket{le=\"+Inf\",route=\"token\"} ",
    ] {
        assert!(metrics.contains(line), "{line:?} in\n{metrics}");
    }
    if slow == 408 {
        assert!(
            metrics.contains("turnpike_api_requests_total{route=\"token\",status=\"408\"} 1"),
            "{metrics}"
        );
    }
    relay.terminate();
}

#[test]
fn two_thousand_idle_connections_starve_neither_the_api_nor_allocations() {
    let dir = temp_dir("idle");
    let reserved = reserve_udp();
    let api_port = free_tcp_port();
    let text = config_text(reserved.port(), api_port, 49000, &dir.join("u.db"), "");
    let (relay, server, api) = spawn_relay(&dir, &text, reserved.port(), api_port);
    // 2,000 in this process and 2,000 in the relay's: well inside the 20,000 open-file cap.
    let idle: Vec<_> = (0..2_000)
        .map(|_| std::net::TcpStream::connect_timeout(&api, Duration::from_secs(5)).unwrap())
        .collect();
    let v = signed_post(api, TOKEN_PATH, r#"{"id": "busy", "ttl": 600}"#).unwrap();
    assert!(v["iceServers"][0]["username"]
        .as_str()
        .unwrap()
        .ends_with(":busy"));
    assert_eq!(
        ureq::get(&format!("http://{api}/healthz"))
            .timeout(Duration::from_secs(5))
            .call()
            .unwrap()
            .status(),
        200
    );
    let (c, p, relayed) = rest_client(server, "busy");
    exchange(&c, &p, relayed, 3, 100);
    drop(idle);
    relay.terminate();
}

/// utime + stime of process `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Writes `cert` as the API's pair in `dir` (`api.crt`, `api.key`, replacing what was there).
fn install_api_pair(dir: &Path, cert: &rcgen::CertifiedKey) -> PathBuf {
    let cert_pem = dir.join("api.crt");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(dir.join("api.key"), cert.key_pair.serialize_pem()).unwrap();
    cert_pem
}

/// The binary with its API on TLS for `localhost` with `cert` (written to `dir`) and relay ports from
/// `base`, once `/healthz` answers over TLS: the relay, its UDP listener, its API and the certificate file.
fn spawn_tls_relay(
    dir: &Path,
    cert: &rcgen::CertifiedKey,
    base: u16,
) -> (Relay, SocketAddr, SocketAddr, PathBuf) {
    let cert_pem = install_api_pair(dir, cert);
    let tls = format!(
        "names = [\"localhost\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        cert_pem.display(),
        dir.join("api.key").display()
    );
    let reserved = reserve_udp();
    let (listen, api_port) = (reserved.port(), free_tcp_port());
    let cfg = dir.join("turnpike.toml");
    let text = config_text(listen, api_port, base, &dir.join("u.db"), &tls);
    std::fs::write(&cfg, text).unwrap();
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--config", cfg.to_str().unwrap(), "--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .expect("turnpike starts");
    let relay = Relay { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tls_healthz(api, tls_client(cert)).starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the API did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let listen = format!("127.0.0.1:{listen}").parse().unwrap();
    (relay, listen, api, cert_pem)
}

#[test]
fn client_hello_then_close_notify_on_the_api_tls_port_neither_spins_nor_blocks() {
    use std::io::Write;
    let dir = temp_dir("close-notify");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (relay, _, api, _) = spawn_tls_relay(&dir, &cert, 50000);
    let client = tls_client(&cert);
    let healthz = || tls_healthz(api, client.clone());

    // RUSTSEC-2024-0336: a ClientHello, then a close_notify alert (a plaintext record before the
    // handshake is done). 32 such connections stay open.
    let mut evil = Vec::new();
    for _ in 0..32 {
        let mut conn =
            rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let mut s = std::net::TcpStream::connect(api).unwrap();
        s.write_all(&hello).unwrap();
        s.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00])
            .unwrap();
        evil.push(s);
    }
    let before = cpu_ticks(relay.child.id());
    let start = Instant::now();
    let mut answered = 0;
    while start.elapsed() < Duration::from_secs(5) {
        assert!(
            healthz().starts_with("HTTP/1.1 200"),
            "the API stays responsive"
        );
        answered += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let used = cpu_ticks(relay.child.id()) - before;
    // Clock ticks are 1/100 s on Linux. One spinning thread would burn ~500 ticks; the health checks
    // and an idle relay use a few. A generous bound: under half a core.
    assert!(
        used < 250,
        "{used} ticks of CPU in 5 s with {answered} health checks"
    );
    drop(evil);
    relay.terminate();
}

#[test]
fn a_credential_outliving_max_ttl_gets_401_and_the_api_never_mints_one() {
    let dir = temp_dir("max-ttl");
    let reserved = reserve_udp();
    let api_port = free_tcp_port();
    let text = config_text(reserved.port(), api_port, 51000, &dir.join("u.db"), "").replace(
        "secrets = [\"secret\"]",
        "secrets = [\"secret\"]\nmax_ttl_seconds = 3600",
    );
    let (relay, server, api) = spawn_relay(&dir, &text, reserved.port(), api_port);
    let secrets = RestSecrets::new(vec![SECRET.as_bytes().to_vec()]);
    let too_long = secrets.mint("long", unix_now(), 3600 + 400).unwrap();
    let mut c = Client::new(server, &too_long.username, &too_long.password);
    let resp = c.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    assert_eq!(Client::error_code(&resp), Some(401));
    let ok = secrets.mint("short", unix_now(), 3600).unwrap();
    Client::new(server, &ok.username, &ok.password).allocate();
    // Asked for more, the API mints the maximum.
    let v = signed_post(api, TOKEN_PATH, r#"{"id": "x", "ttl": 86400}"#).unwrap();
    let user = v["iceServers"][0]["username"].as_str().unwrap();
    let expiry: u64 = user.split(':').next().unwrap().parse().unwrap();
    assert!(expiry <= unix_now() + 3600, "{user}");
    relay.terminate();
}

/// The API's certificate reloads on SIGHUP like the TURN one: new connections get the new pair, and
/// a client that trusts only the old one is refused from then on.
#[test]
fn the_api_certificate_reloads_on_sighup_for_new_connections() {
    let dir = temp_dir("api-cert-reload");
    let old = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let new = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (relay, _, api, _) = spawn_tls_relay(&dir, &old, 27000);
    // `/healthz` over TLS trusting only `ca`: the status line, or "" when the handshake fails.
    let healthz = |ca: &rcgen::CertifiedKey| -> String {
        let answer = tls_healthz(api, tls_client(ca));
        answer.lines().next().unwrap_or("").to_string()
    };
    assert_eq!(
        healthz(&new),
        "",
        "a client trusting only the next certificate is refused"
    );

    install_api_pair(&dir, &new);
    let status = Command::new("kill")
        .args(["-HUP", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("new connections get the reloaded certificate", || {
        healthz(&new).starts_with("HTTP/1.1 200")
    });
    assert_eq!(healthz(&old), "", "the old certificate is no longer served");
}
