//! Reload against the real binary (issue 15): `turnpike reload` signals the running relay through its
//! pid file; a broken file changes nothing (the relay keeps serving, the failure is counted and the log
//! names the key); a good one applies users and the peer policy to the running relay without dropping
//! its allocation, and reports the fixed settings it cannot change.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Client;

const KEY_B64: &str = "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleQ==";

impl Relay {
    /// The binary on `config` (its pid file `turnpike.pid` beside it), stdout to `log`, once the pid
    /// file exists and its `/metrics` on port `api` answers.
    fn start(config: &Path, log: &Path, api: u16) -> Relay {
        let child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
            .arg("--config")
            .arg(config)
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let relay = Relay(child, config.with_file_name("turnpike.pid"));
        wait_for("the pid file", || relay.1.exists());
        wait_for("/metrics", || metrics(api).contains("turnpike_allocations"));
        relay
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The configuration: fixed listeners and pid file, `workers`, and `extra` (peers, more users).
fn config(dir: &Path, udp: u16, api: u16, workers: usize, extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:{udp}\"]\nworkers = {workers}\npin_workers = false\ndrain_seconds = 0\n\
         backend = \"epoll\"\npid_file = \"{pid}\"\n\
         [relay]\naddresses = [\"127.0.0.1\"]\nport_min = 61200\nport_max = 61299\n\
         [[users]]\nname = \"alice\"\npassword = \"alice-pass\"\n\
         {extra}\n\
         [api]\nlisten = \"127.0.0.1:{api}\"\naccess_keys = [\"{KEY_B64}\"]\n\
         revocations_database = \"{rev}\"\n",
        pid = dir.join("turnpike.pid").display(),
        rev = dir.join("revocations.db").display(),
    )
}

/// `[peers]` allowing the loopback peers (127.0.0.2 and .3; 127.0.0.1 is the relay's own).
const PEERS: &str = "[peers]\nallow = [\"127.0.0.0/8\"]\n";

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(api: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{api}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default()
}

/// `turnpike reload`: `--pid-file <pid>` if given, else `--config <path>` (its `pid_file`).
fn reload(path: &Path, pid: Option<&Path>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnpike"));
    match pid {
        Some(p) => cmd.arg("reload").arg("--pid-file").arg(p),
        None => cmd.arg("--config").arg(path).arg("reload"),
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// `n` ChannelData datagrams to `peer` on `channel`, one at a time; how many arrived.
fn relayed(c: &Client, peer: &UdpSocket, channel: u16, n: usize) -> usize {
    peer.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    (0..n)
        .filter(|i| {
            c.send_channel(channel, &[*i as u8; 16]);
            matches!(peer.recv_from(&mut buf), Ok((16, _)))
        })
        .count()
}

/// The relay process and its pid file; killed when dropped (a failed assertion included).
struct Relay(Child, PathBuf);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reload_applies_a_good_file_live_and_a_broken_one_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("turnpike-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (udp, api) = (free_udp_port(), free_port());
    let path = dir.join("turnpike.toml");
    std::fs::write(&path, config(&dir, udp, api, 1, PEERS)).unwrap();
    let log = dir.join("stdout");
    let relay = Relay::start(&path, &log, api);
    let server: SocketAddr = format!("127.0.0.1:{udp}").parse().unwrap();
    let (p1, p2) = (
        common::peer_on("127.0.0.2".parse().unwrap()),
        common::peer_on("127.0.0.3".parse().unwrap()),
    );
    let mut alice = Client::new(server, "alice", "alice-pass");
    alice.allocate();
    alice.bind(0x4000, p1.local_addr().unwrap());
    alice.bind(0x4001, p2.local_addr().unwrap());
    assert_eq!(relayed(&alice, &p1, 0x4000, 10), 10);
    assert_eq!(relayed(&alice, &p2, 0x4001, 10), 10);

    // A broken file: nothing changes, the failure is counted and logged with the key.
    std::fs::write(
        &path,
        config(&dir, udp, api, 1, "[peers]\nallow = [\"not-a-cidr\"]\n"),
    )
    .unwrap();
    // (`turnpike --config <broken> reload` would refuse it itself, as check-config does.)
    reload(&path, Some(&relay.1));
    let text = || std::fs::read_to_string(&log).unwrap();
    wait_for("the failure in the log", || {
        text().contains("reload failed")
    });
    assert!(text().contains("peers.allow[0]"), "{}", text());
    let m = metrics(api);
    assert!(
        m.contains("turnpike_reloads_total{result=\"failure\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("turnpike_reloads_total{result=\"success\"} 0"),
        "{m}"
    );
    assert_eq!(
        relayed(&alice, &p1, 0x4000, 10),
        10,
        "the old policy still relays"
    );
    let mut bob = Client::new(server, "bob", "bob-pass");
    let r = bob.authed(
        turnpike::wire::Method::ALLOCATE,
        &[turnpike::wire::Attribute::RequestedTransport(17)],
    );
    assert_eq!(Client::error_code(&r), Some(401), "bob is not a user yet");

    // A good file: bob added, p1's IP denied, workers changed (reported, kept).
    let good = format!(
        "[[users]]\nname = \"bob\"\npassword = \"bob-pass\"\n{PEERS}deny = [\"127.0.0.2/32\"]\n"
    );
    std::fs::write(&path, config(&dir, udp, api, 2, &good)).unwrap();
    reload(&path, None);
    wait_for("the reload in the log", || {
        text().contains("configuration reloaded")
    });
    let t = text();
    assert!(t.contains("workers: changed from 1 to 2"), "{t}");
    assert!(t.contains("permissions and channels removed"), "{t}");
    let m = metrics(api);
    assert!(
        m.contains("turnpike_reloads_total{result=\"success\"} 1"),
        "{m}"
    );
    assert!(
        !m.contains("turnpike_last_reload_success_timestamp_seconds 0\n"),
        "{m}"
    );
    assert_eq!(
        relayed(&alice, &p1, 0x4000, 3),
        0,
        "the denied peer is cut off"
    );
    assert_eq!(
        relayed(&alice, &p2, 0x4001, 20),
        20,
        "the allowed peer keeps relaying"
    );
    bob.allocate();
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `n` Binding requests at once from `c`'s socket; how many successes came back (each read
/// waits at most 500 ms, so a silent relay ends the count).
fn bindings_answered(c: &mut Client, n: usize) -> usize {
    use turnpike::wire::{Class, Method};
    for _ in 0..n {
        let (_, req) = c.build(Method::BINDING, Class::Request, &[], false);
        c.sock.send_to(&req, c.server).unwrap();
    }
    c.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1500];
    let mut answered = 0;
    while answered < n {
        match c.sock.recv_from(&mut buf) {
            Ok(_) => answered += 1,
            Err(_) => break,
        }
    }
    answered
}

#[test]
fn reload_gives_the_workers_binding_answers_the_new_challenge_rate() {
    let dir = std::env::temp_dir().join(format!("turnpike-reload-rate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (udp, api) = (free_udp_port(), free_port());
    let path = dir.join("turnpike.toml");
    // 1 answer per second per source, a burst of 2: Binding is answered in the workers, each with its
    // own shard of this budget (a third of it with 2 workers and the server, at least one answer).
    let with_rate =
        |rate: u32| format!("challenge_rate = {rate}\n{}", config(&dir, udp, api, 2, ""));
    std::fs::write(&path, with_rate(1)).unwrap();
    let log = dir.join("stdout");
    let relay = Relay::start(&path, &log, api);
    let server: SocketAddr = format!("127.0.0.1:{udp}").parse().unwrap();
    let mut c = Client::new(server, "alice", "alice-pass");
    let before = bindings_answered(&mut c, 20);
    assert!(
        (1..20).contains(&before),
        "at 1/s only the burst is answered: {before} of 20"
    );

    std::fs::write(&path, with_rate(1000)).unwrap();
    reload(&path, None);
    let text = || std::fs::read_to_string(&log).unwrap();
    wait_for("the reload in the log", || {
        text().contains("configuration reloaded")
    });
    assert_eq!(
        bindings_answered(&mut c, 20),
        20,
        "at 1000/s (a burst of 2000) every Binding is answered: the worker has the new rate"
    );

    std::fs::write(&path, with_rate(1)).unwrap();
    reload(&path, None);
    wait_for("the second reload", || {
        text().matches("configuration reloaded").count() >= 2
    });
    let after = bindings_answered(&mut c, 20);
    assert!(
        (1..20).contains(&after),
        "back at 1/s: {after} of 20 answered"
    );
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `turnutils_peer` on 127.0.0.1:`port` (an explicit allow opens the relay's own address outside its
/// service ports and relay range), killed when dropped.
struct Tool(Child);

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is needed in CI (Debian package coturn)"
        );
        eprintln!("SKIPPED: {tool} not installed");
    }
    found
}

/// Wait for `child` at most `limit`, then kill it; its output.
fn bounded_output(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// Issue 15, "reload under traffic": uclient (channels, a static user) and the project's generator
/// (its own user, its echo peer) relay for about 20 s while a reload rotates the REST secret (one
/// removed, one kept, one added), removes a user, adds another, and denies one peer. Neither loses a
/// packet; a credential of the removed secret and the removed user get 401 on their next request, one
/// of the kept secret keeps working, and the denied peer's channel stops relaying.
#[test]
fn reload_under_traffic_loses_nothing_on_the_allocations_that_stay_valid() {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("turnpike-reload-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (udp, api, peer_port) = (free_udp_port(), free_port(), free_udp_port());
    let path = dir.join("turnpike.toml");
    let users = "[[users]]\nname = \"bench\"\npassword = \"bench-pass\"\n";
    let before = format!(
        "{users}[[users]]\nname = \"carol\"\npassword = \"carol-pass\"\n\
         [rest]\nsecrets = [\"old-secret\", \"kept-secret\"]\n{PEERS}"
    );
    let after = format!(
        "{users}[[users]]\nname = \"dave\"\npassword = \"dave-pass\"\n\
         [rest]\nsecrets = [\"new-secret\", \"kept-secret\"]\n{PEERS}deny = [\"127.0.0.3/32\"]\n"
    );
    // coturn's turnutils_uclient picks channel numbers up to 0x7FFF (RFC 5766).
    let file = |extra: &str| {
        format!(
            "legacy_channel_numbers = true\n{}",
            config(&dir, udp, api, 2, extra)
        )
    };
    std::fs::write(&path, file(&before)).unwrap();
    let log = dir.join("stdout");
    let relay = Relay::start(&path, &log, api);
    let server: SocketAddr = format!("127.0.0.1:{udp}").parse().unwrap();

    // The clients whose fate the reload decides, allocated before it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mint = |secret: &str, id: &str| {
        turnpike::auth::RestSecrets::new(vec![secret.as_bytes().to_vec()])
            .mint(id, now, 600)
            .unwrap()
    };
    let (old, kept) = (
        mint("old-secret", "olduser"),
        mint("kept-secret", "keptuser"),
    );
    let mut old_c = Client::new(server, &old.username, &old.password);
    let mut kept_c = Client::new(server, &kept.username, &kept.password);
    let mut carol = Client::new(server, "carol", "carol-pass");
    for c in [&mut old_c, &mut kept_c, &mut carol] {
        c.allocate();
    }
    let denied = common::peer_on("127.0.0.3".parse().unwrap());
    let allowed = common::peer_on("127.0.0.2".parse().unwrap());
    kept_c.bind(0x4000, denied.local_addr().unwrap());
    kept_c.bind(0x4001, allowed.local_addr().unwrap());
    assert_eq!(relayed(&kept_c, &denied, 0x4000, 5), 5);

    // The traffic: turnutils_peer echoes for uclient, the generator brings its own echo peer (on
    // 127.0.0.5, which the allow opens and the new deny does not touch).
    let _peer = Tool(
        Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let bench = Command::new(env!("CARGO_BIN_EXE_turnpike-bench"))
        .args(["--server", &server.to_string(), "--json", "-q"])
        .args([
            "--user",
            "bench",
            "--password",
            "bench-pass",
            "--clients",
            "4",
        ])
        .args([
            "--rate",
            "1000",
            "--duration",
            "20",
            "--echo",
            "127.0.0.5:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // uclient: 2 clients, 400 messages each over channels, from alice (a user both files keep).
    let mut uclient = Command::new("turnutils_uclient")
        .args(["-u", "alice", "-w", "alice-pass", "-e", "127.0.0.1"])
        .args(["-r", &peer_port.to_string(), "-p", &udp.to_string()])
        .args(["-n", "400", "-m", "2", "-l", "160", "127.0.0.1"])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // A few seconds into the traffic: the reload.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        uclient.try_wait().unwrap().is_none(),
        "uclient still relays when the reload comes"
    );
    std::fs::write(&path, file(&after)).unwrap();
    reload(&path, None);
    let text = || std::fs::read_to_string(&log).unwrap();
    wait_for("the reload in the log", || {
        text().contains("configuration reloaded")
    });

    // The removed secret's credential and the removed user: 401 on the next request.
    for (who, c) in [("old secret", &mut old_c), ("removed user", &mut carol)] {
        let r = c.authed(turnpike::wire::Method::REFRESH, &[]);
        assert_eq!(Client::error_code(&r), Some(401), "{who}");
    }
    // The kept secret's credential works, its allowed peer relays, its denied peer's channel stops.
    let r = kept_c.authed(turnpike::wire::Method::REFRESH, &[]);
    assert_eq!(Client::error_code(&r), None, "kept secret");
    assert_eq!(
        relayed(&kept_c, &denied, 0x4000, 3),
        0,
        "denied peer cut off"
    );
    assert_eq!(
        relayed(&kept_c, &allowed, 0x4001, 5),
        5,
        "allowed peer relays"
    );
    // A credential of the new secret and the new user allocate.
    let new = mint("new-secret", "newuser");
    Client::new(server, &new.username, &new.password).allocate();
    Client::new(server, "dave", "dave-pass").allocate();

    let out = bounded_output(bench, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "turnpike-bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = &v["steps"][0];
    let (sent, received) = (
        step["sent"].as_u64().unwrap(),
        step["received"].as_u64().unwrap(),
    );
    eprintln!("generator: {sent} sent, {received} echoed through the relay");
    assert!(sent > 10_000, "the generator ran: {step}");
    assert_eq!(
        received, sent,
        "the generator lost packets across the reload: {step}"
    );

    let out = bounded_output(uclient, Duration::from_secs(60));
    let text_out =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "uclient: {text_out}");
    let lost = text_out
        .lines()
        .rev()
        .find_map(|l| l.split("Total lost packets ").nth(1))
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|d| d.parse::<u64>().ok());
    assert_eq!(
        lost,
        Some(0),
        "uclient lost packets across the reload: {text_out}"
    );
    let totals = text_out
        .lines()
        .rev()
        .find(|l| l.contains("tot_send_msgs="));
    eprintln!("uclient: {}", totals.unwrap_or("no totals line"));
    assert!(
        totals.is_some_and(|l| !l.contains("tot_recv_msgs=0,")),
        "{text_out}"
    );
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}
