//! Short versions of `scripts/reliability.sh` (issue 14), against the real binary and driven by the real
//! load generator (`turnpike-bench`). They assert only what does not depend on timing: accounting is
//! never dropped (usage rows equal what the peer and client saw), RSS stays bounded, nothing panics (the
//! process is alive, exits 0), the relay still allocates after the abuse, and its fd count comes back
//! to where it was. The timing figures are the script's.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{peer, Client};
use turnpike::auth::RestSecrets;

const SECRET: &str = "reliability-secret";

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-rel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A relay under test: its config, its ports, and the process once spawned.
struct Relay {
    dir: PathBuf,
    config: PathBuf,
    udp: SocketAddr,
    tcp: SocketAddr,
    api: SocketAddr,
    db: PathBuf,
    child: Option<Child>,
}

impl Relay {
    /// A loopback relay (UDP and TCP on one port, API, metering with 1 s checkpoints) relaying on ports
    /// `base..base+499`, with `extra` top-level keys. Each test's `base` is its own, in 12000-15999:
    /// below Linux's ephemeral range (32768-60999), where the clients, the generator's peers and
    /// other tests bind (a peer inside the relay range is denied, and a port taken there would
    /// collide), and clear of the e2e, interop and zero_alloc ranges (20000-31999).
    fn new(name: &str, backend: &str, base: u16, extra: &str) -> Relay {
        let dir = temp_dir(name);
        let port = free_udp_port();
        let api: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let db = dir.join("usage.db");
        let text = format!(
            r#"listen = ["127.0.0.1:{port}"]
listen_tcp = ["127.0.0.1:{port}"]
workers = 1
pin_workers = false
backend = "{backend}"
log_level = "warn"
drain_seconds = 0
{extra}
[relay]
addresses = ["127.0.0.1"]
port_min = {base}
port_max = {max}
[[users]]
name = "bench"
password = "bench-pass"
[rest]
secrets = ["{SECRET}"]
[peers]
allow = ["127.0.0.0/8"]
[api]
listen = "{api}"
access_keys = ["cmVsaWFiaWxpdHktdGVzdC1rZXk="]
[usage]
database = "{db}"
checkpoint_seconds = 1
"#,
            max = base + 499,
            db = db.display()
        );
        let config = dir.join("turnpike.toml");
        std::fs::write(&config, text).unwrap();
        let udp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Relay {
            dir,
            config,
            udp,
            tcp: udp,
            api,
            db,
            child: None,
        }
    }

    /// Spawn, and if the process exits at start (after SIGKILL, an io_uring ring's sockets are released
    /// asynchronously, so the ports can still be busy for a moment), try again: up to 20 times.
    fn spawn_until_it_binds(&mut self) -> u32 {
        for attempt in 1..=20 {
            if self.try_spawn() {
                return attempt;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("the relay did not start again on its ports");
    }

    /// Spawn a first time. The listen and API ports were free when picked, but under a loaded suite
    /// another test's socket can take one before the relay binds it; then the relay exits at start
    /// and this picks fresh ports and tries again (up to 5 times), showing the last stderr if it
    /// never comes up. The relay port range is fixed (below the ephemeral range, so nothing else
    /// takes it).
    fn spawn(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            match self.try_spawn_output() {
                None => return,
                Some(stderr) => last = stderr,
            }
            let text = std::fs::read_to_string(&self.config).unwrap();
            let (old_udp, old_api) = (self.udp, self.api);
            self.udp = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
            self.tcp = self.udp;
            self.api = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
            let text = text
                .replace(&format!("\"{old_udp}\""), &format!("\"{}\"", self.udp))
                .replace(&format!("\"{old_api}\""), &format!("\"{}\"", self.api));
            std::fs::write(&self.config, text).unwrap();
        }
        panic!("the relay exited at start, 5 times on fresh ports; last stderr: {last}");
    }

    fn try_spawn(&mut self) -> bool {
        self.try_spawn_output().is_none()
    }

    /// Spawn and wait (bounded) for `/healthz`: `None` once it answers, or the stderr of a process
    /// that exited at start.
    fn try_spawn_output(&mut self) -> Option<String> {
        let child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
            .args(["--config", self.config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("turnpike starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ureq::get(&format!("http://{}/healthz", self.api))
            .call()
            .is_err()
        {
            if !self.alive() {
                let out = self.child.take().unwrap().wait_with_output().unwrap();
                return Some(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            assert!(Instant::now() < deadline, "the API did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// What each open fd of the relay points at (`readlink /proc/<pid>/fd/N`: `socket:[inode]`,
    /// `anon_inode:[eventfd]`, a path), sorted. A socket's inode names that one socket, so a set
    /// equal to an earlier one means the same descriptors, not just as many.
    fn fd_targets(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|t| t.display().to_string())
            .collect();
        v.sort();
        v
    }

    /// Poll (bounded, 10 s) until every fd the relay holds was already held in `before` (a worker's
    /// transient fd that was open then and closed since is fine; one that is new is not); returns the
    /// fd targets that are new at the last look (empty when it settled).
    fn new_fds_settle(&self, before: &[String]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut left: Vec<&String> = before.iter().collect();
            let mut new = Vec::new();
            for t in self.fd_targets() {
                match left.iter().position(|b| **b == t) {
                    Some(i) => {
                        left.swap_remove(i);
                    }
                    None => new.push(t),
                }
            }
            if new.is_empty() || Instant::now() > deadline {
                return new;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The relay's live allocations, from its `/metrics` (`turnpike_allocations`); 0 if unreadable.
    fn allocations(&self) -> u64 {
        let Ok(r) = ureq::get(&format!("http://{}/metrics", self.api)).call() else {
            return 0;
        };
        r.into_string()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("turnpike_allocations "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    /// Poll until the fd count is back to `before` (sockets of closed clients are closed by the
    /// relay's own timers and sweeps); returns the last count seen.
    fn fds_settle(&self, before: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.fds();
            if n <= before || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM; waits (bounded) and returns the exit output.
    fn terminate(&mut self) -> Output {
        let child = self.child.take().unwrap();
        signal(child.id(), "-TERM");
        wait_bounded(child, Duration::from_secs(20))
    }

    fn sigkill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A REST client for identity `id`, allocated, with channel 0x4000 bound to a fresh peer.
    fn flow(&self, id: &str) -> (Client, UdpSocket, SocketAddr) {
        let cred = RestSecrets::new(vec![SECRET.as_bytes().to_vec()])
            .mint(id, unix_now(), 3600)
            .unwrap();
        let mut c = Client::new(self.udp, &cred.username, &cred.password);
        let relayed = c.allocate();
        let p = peer();
        c.bind(0x4000, p.local_addr().unwrap());
        (c, p, relayed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(pid: u32, sig: &str) {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
}

fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Run `turnpike-bench` with `args` against `server` (bounded by its own --duration, killed after
/// `limit`), and parse its JSON.
fn bench(server: SocketAddr, args: &[&str], limit: Duration) -> serde_json::Value {
    let child = Command::new(env!("CARGO_BIN_EXE_turnpike-bench"))
        .arg("--server")
        .arg(server.to_string())
        .args(["--json", "-q"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, limit);
    assert!(
        out.status.success(),
        "turnpike-bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Start `turnpike-bench` in the background.
fn bench_bg(server: SocketAddr, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_turnpike-bench"))
        .arg("--server")
        .arg(server.to_string())
        .args(["--json", "-q"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Client → peer `n` ChannelData packets of `size` bytes at a low fixed rate, then peer → client as many
/// as the peer received. Returns (packets the peer received, packets the client received).
fn exchange(c: &Client, p: &UdpSocket, relayed: SocketAddr, n: usize, size: usize) -> (u64, u64) {
    let payload = vec![0x5A; size];
    let mut buf = [0u8; 2048];
    p.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut at_peer = 0u64;
    for _ in 0..n {
        c.send_channel(0x4000, &payload);
        std::thread::sleep(Duration::from_micros(500));
        while let Ok((len, from)) = p.recv_from(&mut buf) {
            assert_eq!((len, from), (size, relayed));
            at_peer += 1;
        }
    }
    p.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok((len, from)) = p.recv_from(&mut buf) {
        assert_eq!((len, from), (size, relayed));
        at_peer += 1;
    }
    c.sock
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut at_client = 0u64;
    let mut drain = |at_client: &mut u64| {
        while let Ok((len, _)) = c.sock.recv_from(&mut buf) {
            assert_eq!(len, 4 + size);
            *at_client += 1;
        }
    };
    for _ in 0..at_peer {
        p.send_to(&payload, relayed).unwrap();
        std::thread::sleep(Duration::from_micros(500));
        drain(&mut at_client);
    }
    c.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    drain(&mut at_client);
    (at_peer, at_client)
}

/// (to_peer_packets, to_client_packets, to_peer_bytes, to_client_bytes, end_reason) of `identity`'s rows.
fn usage(db: &Path, identity: &str) -> Vec<(u64, u64, u64, u64, Option<String>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare(
            "SELECT to_peer_packets, to_client_packets, to_peer_bytes, to_client_bytes, end_reason
             FROM allocations WHERE identity = ?1 ORDER BY run_id, allocation",
        )
        .unwrap();
    let rows = s
        .query_map([identity], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
                r.get(4)?,
            ))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// Scenario 1, short: an unauthenticated flood from 4096 loopback sources. Answers never exceed 3× the
/// request bytes, the relay lives, its RSS stays within 10 MB, its fds come back, and it still allocates.
#[test]
fn spoofed_source_flood_is_answered_within_budget_and_leaves_nothing_behind() {
    let mut relay = Relay::new("flood", "epoll", 12000, "");
    relay.spawn();
    let _warm = relay.flow("warm");
    let (fds0, rss0) = (relay.fd_targets(), relay.rss_kib());
    let v = bench(
        relay.udp,
        &[
            "--scenario",
            "spoof",
            "--sources",
            "4096",
            "--duration",
            "2",
        ],
        Duration::from_secs(20),
    );
    assert!(v["requests"].as_u64().unwrap() > 0, "{v}");
    let (req, ans) = (
        v["request_bytes"].as_u64().unwrap(),
        v["answer_bytes"].as_u64().unwrap(),
    );
    assert!(ans <= 3 * req, "answered {ans} bytes to {req}: {v}");
    assert!(v["max_answer_ratio"].as_f64().unwrap() <= 3.0, "{v}");
    assert!(relay.alive(), "the relay died under the flood");
    let grown = relay.rss_kib().saturating_sub(rss0);
    assert!(grown <= 10 * 1024, "RSS grew {grown} KiB");
    let new = relay.new_fds_settle(&fds0);
    assert!(
        new.is_empty(),
        "fds after the flood: {new:?} new beside {fds0:?}"
    );
    let (c, p, relayed) = relay.flow("after-flood");
    assert_eq!(exchange(&c, &p, relayed, 20, 100), (20, 20));
    let out = relay.terminate();
    assert!(out.status.success(), "{out:?}");
}

/// Scenario 2, short: a control-plane storm beside a flow at a low fixed rate. The flow's usage rows
/// equal exactly what its peer and client received, and nothing panics.
#[test]
fn control_storm_never_drops_accounting() {
    let mut relay = Relay::new("storm", "epoll", 12500, "");
    relay.spawn();
    let (c, p, relayed) = relay.flow("metered");
    let storm = bench_bg(
        relay.udp,
        &["--scenario", "storm", "--clients", "20", "--duration", "3"],
    );
    let (at_peer, at_client) = exchange(&c, &p, relayed, 400, 100);
    let out = wait_bounded(storm, Duration::from_secs(40));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["sent"].as_u64().unwrap() > 0, "{v}");
    assert!(relay.alive());
    drop(c);
    let out = relay.terminate();
    assert!(out.status.success(), "exit: {out:?}");
    let rows = usage(&relay.db, "metered");
    assert_eq!(
        rows,
        vec![(
            at_peer,
            at_client,
            at_peer * 100,
            at_client * 100,
            Some("ended".into())
        )],
        "usage rows equal what the peer and the client received"
    );
}

/// Scenario 3, short: SIGTERM with live flows and a drain. `/readyz` answers 503, a new Allocate is
/// refused (508), the process exits 0, and every allocation has its final, exact row.
#[test]
fn drain_refuses_new_allocations_exits_zero_and_closes_every_row() {
    let mut relay = Relay::new("drain", "epoll", 13000, "");
    std::fs::write(
        &relay.config,
        std::fs::read_to_string(&relay.config)
            .unwrap()
            .replace("drain_seconds = 0", "drain_seconds = 2"),
    )
    .unwrap();
    relay.spawn();
    let flows: Vec<_> = (0..3).map(|i| relay.flow(&format!("drain{i}"))).collect();
    let child = relay.child.take().unwrap();
    signal(child.id(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        match ureq::get(&format!("http://{}/readyz", relay.api)).call() {
            Err(ureq::Error::Status(code, _)) => break code,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => panic!("/readyz while draining: {other:?}"),
        }
    };
    assert_eq!(ready, 503);
    let mut late = Client::new(relay.udp, "bench", "bench-pass");
    let resp = late.authed(
        turnpike::wire::Method::ALLOCATE,
        &[turnpike::wire::Attribute::RequestedTransport(17)],
    );
    assert_eq!(Client::error_code(&resp), Some(508));
    // Relaying goes on during the drain: the counts below are exact.
    let seen: Vec<_> = flows
        .iter()
        .map(|(c, p, r)| exchange(c, p, *r, 30, 80))
        .collect();
    let out = wait_bounded(child, Duration::from_secs(20));
    assert!(out.status.success(), "exit: {out:?}");
    for (i, (a, b)) in seen.into_iter().enumerate() {
        let rows = usage(&relay.db, &format!("drain{i}"));
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].0, rows[0].1), (a, b));
        assert!(rows[0].4.is_some(), "a final row: {rows:?}");
    }
}

/// Scenario 4, short, on every backend: SIGKILL during traffic, restart on the same config. The
/// restarted relay allocates on the same ports at once; the killed run's rows are closed and count no
/// more than was relayed (nothing twice).
#[test]
fn kill_9_and_restart_counts_nothing_twice_and_serves_on_the_same_ports() {
    for (i, backend) in common::backends().into_iter().enumerate() {
        let name = match backend {
            turnpike::dataplane::BackendKind::Epoll => "epoll",
            _ => "io_uring",
        };
        let mut relay = Relay::new(&format!("kill-{name}"), name, 13500 + 500 * i as u16, "");
        relay.spawn();
        let (c, p, relayed) = relay.flow("killed");
        let (a, b) = exchange(&c, &p, relayed, 50, 60);
        relay.sigkill();
        let attempts = relay.spawn_until_it_binds();
        eprintln!("{name}: restarted on the same ports at attempt {attempts}");
        let (c2, p2, relayed2) = relay.flow("after");
        assert_eq!(exchange(&c2, &p2, relayed2, 10, 60), (10, 10));
        let rows = usage(&relay.db, "killed");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].4.as_deref(), Some("lost"));
        assert!(
            rows[0].0 <= a && rows[0].1 <= b,
            "billed {rows:?}, relayed ({a}, {b})"
        );
        let out = relay.terminate();
        assert!(out.status.success(), "{out:?}");
    }
}

/// Scenario 5, short: a second instance on the same config and database refuses to start and leaves
/// the first one's open rows alone.
#[test]
fn second_instance_refuses_and_leaves_the_first_ones_rows_untouched() {
    let mut relay = Relay::new("second", "epoll", 14500, "");
    relay.spawn();
    let (c, p, relayed) = relay.flow("first");
    let _ = exchange(&c, &p, relayed, 10, 50);
    std::thread::sleep(Duration::from_millis(2200));
    let before = usage(&relay.db, "first");
    let second = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--config", relay.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(second, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second instance ran: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Refused for the reason this test is about (the first one's lock), not for a busy port.
    assert!(
        stderr.contains("usage database in use by another turnpike"),
        "{stderr}"
    );
    assert_eq!(usage(&relay.db, "first"), before, "the first one's rows");
    assert!(relay.alive());
}

/// Scenario 6, short: trickling and stalled TCP connections from many loopback sources. The relay
/// lives, allocates over UDP after, relays exactly, and its fds come back once the abusers leave.
#[test]
fn stream_abuse_leaves_the_relay_allocating_and_its_fds_flat() {
    let mut relay = Relay::new("streams", "epoll", 15000, "");
    relay.spawn();
    let fds0 = relay.fds();
    let tcp = relay.tcp.to_string();
    let v = bench(
        relay.udp,
        &[
            "--scenario",
            "streams",
            "--tcp-server",
            &tcp,
            "--tcp-conns",
            "400",
            "--per-source",
            "20",
            "--trickle-ms",
            "200",
            "--duration",
            "3",
        ],
        Duration::from_secs(30),
    );
    assert!(v["opened"]["tcp"].as_u64().unwrap() > 0, "{v}");
    assert!(relay.alive(), "the relay died under stream abuse");
    let (c, p, relayed) = relay.flow("after-streams");
    assert_eq!(exchange(&c, &p, relayed, 20, 100), (20, 20));
    drop((c, p));
    assert!(
        relay.fds_settle(fds0 + 2) <= fds0 + 2,
        "fds after the abuse"
    );
    let out = relay.terminate();
    assert!(out.status.success(), "{out:?}");
}

/// Scenario 7, the suite's 2-minute soak: flows at a fixed rate with allocations created and deleted
/// all along by one paced churn over 8 clients. The fd count moves with the live allocations; "flat"
/// is the script's definition: once the churn has stopped (and deleted what it held), the relay holds
/// the same descriptors as before it started, the flows still live. RSS grows at most 5 MB.
#[test]
fn soak_two_minutes_fd_count_flat_and_rss_bounded() {
    let mut relay = Relay::new("soak", "epoll", 15500, "");
    relay.spawn();
    // Warm-up: the first allocations, channels and checkpoints touch memory once.
    let _ = bench(
        relay.udp,
        &[
            "--scenario",
            "alloc",
            "--clients",
            "8",
            "--count",
            "200",
            "--duration",
            "5",
        ],
        Duration::from_secs(30),
    );
    let (fds0, rss0) = (relay.fd_targets(), relay.rss_kib());
    let flows = bench_bg(
        relay.udp,
        &[
            "--clients",
            "20",
            "--rate",
            "5000",
            "--duration",
            "130",
            "--interval",
            "10",
        ],
    );
    // The fds once the flows hold their allocations (they keep them to the end: the generator sends no
    // delete), before the churn starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.allocations() < 20 {
        assert!(Instant::now() < deadline, "the flows did not allocate");
        std::thread::sleep(Duration::from_millis(100));
    }
    let settled = relay.fd_targets();
    let v = bench(
        relay.udp,
        &[
            "--scenario",
            "alloc",
            "--clients",
            "8",
            "--churn-rate",
            "100",
            "--duration",
            "100",
        ],
        Duration::from_secs(150),
    );
    assert!(relay.alive());
    let cycles = v["deletes"].as_u64().unwrap();
    // Churn cycles the generator gave up on (no answer, or an error) or that its drain cut off while
    // they held an allocation ("left"): each may leave one allocation, and its relay socket, until the
    // allocation expires.
    let abandoned = ["timeouts", "errors", "left"]
        .iter()
        .map(|k| v[k].as_u64().unwrap())
        .sum::<u64>();
    // Still during the flows: every churned allocation is gone, so the fds are the settled ones.
    let new = relay.new_fds_settle(&settled);
    eprintln!(
        "soak: fds {} at start, {} with the flows, {} new after {cycles} cycles ({abandoned} abandoned): {new:?}",
        fds0.len(),
        settled.len(),
        new.len()
    );
    assert!(
        new.len() <= abandoned as usize,
        "fds {} at start, {} with the flows, {} new after the churn ({abandoned} cycles abandoned): \
         {new:?}",
        fds0.len(),
        settled.len(),
        new.len()
    );
    let out = wait_bounded(flows, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["steps"].as_array().unwrap().len() >= 2, "{v}");
    assert!(cycles > 0);
    let grown = relay.rss_kib().saturating_sub(rss0);
    assert!(grown <= 5 * 1024, "RSS grew {grown} KiB over the soak");
    let out = relay.terminate();
    assert!(out.status.success(), "{out:?}");
}

/// Long-running flows refresh as a real client does (ChannelBind again, Refresh at half the granted
/// lifetime, 438 retried with the new nonce), against a relay whose lifetimes are seconds long: past
/// every lifetime the flows still relay, and the relay answered every refresh with success. The same
/// flows with refreshing off stop once their permission lapses, so the lifetimes really bite.
#[test]
fn flows_refresh_past_short_lifetimes_and_every_refresh_succeeds() {
    let lifetimes = "[lifetimes]\ndefault = 4\nmax = 4\npermission = 3\nchannel = 4\nnonce = 3\n";
    let mut relay = Relay::new("refresh", "epoll", 15000, lifetimes);
    relay.spawn();
    let run = |refresh: &str, secs: &str| {
        bench(
            relay.udp,
            &[
                "--clients",
                "4",
                "--rate",
                "1000",
                "--duration",
                secs,
                "--interval",
                "2",
                "--refresh-interval",
                refresh,
            ],
            Duration::from_secs(60),
        )
    };
    let v = run("1", "12");
    let r = &v["refresh"];
    let steps = v["steps"].as_array().unwrap();
    assert!(steps.len() >= 5, "{v}");
    for s in steps {
        let (sent, got) = (s["sent"].as_u64().unwrap(), s["received"].as_u64().unwrap());
        assert!(
            sent > 0 && 2 * got >= sent,
            "a step lost most packets: {s}\n{r}"
        );
    }
    assert_eq!(r["refresh_errors"], 0, "{r}");
    // 12 s at 1 s and 2 s intervals: every flow bound again and refreshed several times, and its 3 s
    // nonce went stale at least once.
    assert!(r["channel_binds"].as_u64().unwrap() >= 4 * 3, "{r}");
    assert!(r["refreshes"].as_u64().unwrap() >= 4 * 2, "{r}");
    assert!(r["stale_nonce"].as_u64().unwrap() >= 1, "{r}");

    let v = run("0", "8");
    let last = v["steps"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(v["refresh"]["channel_binds"], 0, "{v}");
    assert_eq!(
        last["received"], 0,
        "without refreshing, the flows outlive their permission: {last}"
    );
    let out = relay.terminate();
    assert!(out.status.success(), "{out:?}");
}
