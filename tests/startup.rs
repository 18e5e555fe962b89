//! Start-up against the real binary (issue 14): what the relay refuses before it serves, and how it
//! says so. Every case here used to fail late, obscurely or with a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory of this test process.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-startup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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

/// A loopback config on free ports, with `extra` appended (tables allowed).
fn config(extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:{}\"]\nworkers = 1\npin_workers = false\ndrain_seconds = 0\n\
         [relay]\naddresses = [\"127.0.0.1\"]\nport_min = 61000\nport_max = 61099\n\
         [rest]\nsecrets = [\"s\"]\n{extra}",
        free_udp_port()
    )
}

/// Runs `turnpike --config <file>` to its end (bounded: killed after 20 s).
fn run(dir: &Path, text: &str, args: &[&str]) -> Output {
    let path = dir.join("turnpike.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[track_caller]
fn assert_refused(out: &Output, facts: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit status, stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for fact in facts {
        assert!(
            stderr.contains(fact),
            "stderr should mention {fact:?}:\n{stderr}"
        );
    }
}

/// A self-signed certificate and its key, in PEM.
fn cert_and_key(dir: &Path) -> (PathBuf, PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// Key files that look like PEM keys (and pass a text check for the BEGIN line) but hold no key.
const BAD_KEYS: [&str; 2] = [
    "-----BEGIN PRIVATE KEY-----\n!!!!not base64\n-----END PRIVATE KEY-----\n",
    "-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n",
];

#[test]
fn an_unparsable_api_tls_key_is_named_without_a_panic() {
    let dir = temp_dir("api-key");
    let (cert, _) = cert_and_key(&dir);
    for (i, bad) in BAD_KEYS.iter().enumerate() {
        let key = dir.join(format!("bad{i}.pem"));
        std::fs::write(&key, bad).unwrap();
        let text = config(&format!(
            "[api]\nlisten = \"127.0.0.1:{}\"\naccess_keys = [\"dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5\"]\n\
             revocations_database = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            free_tcp_port(),
            dir.join("revocations.db").display(),
            cert.display(),
            key.display()
        ));
        let out = run(&dir, &text, &["--log-level", "warn"]);
        assert_refused(&out, &["api.tls_key", &key.display().to_string()]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unparsable_stream_tls_key_is_named_as_the_key() {
    let dir = temp_dir("tls-key");
    let (cert, _) = cert_and_key(&dir);
    for (i, bad) in BAD_KEYS.iter().enumerate() {
        let key = dir.join(format!("bad{i}.pem"));
        std::fs::write(&key, bad).unwrap();
        let text = config(&format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ))
        .replacen(
            "workers = 1",
            &format!(
                "workers = 1\nlisten_tls = [\"127.0.0.1:{}\"]",
                free_tcp_port()
            ),
            1,
        );
        let out = run(&dir, &text, &["--log-level", "warn"]);
        // The key is at fault, not the certificate.
        assert_refused(&out, &["tls.key:", &key.display().to_string()]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_huge_drain_is_refused_by_check_config() {
    let dir = temp_dir("drain");
    let text = config("").replace("drain_seconds = 0", "drain_seconds = 9223372036854775807");
    let out = run(&dir, &text, &["check-config"]);
    assert_refused(&out, &["drain_seconds", "at most 3600"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Settings built in code are not validated like the file: the control thread's `now + drain` at
/// shutdown must not overflow either (it panicked the control thread, losing every final usage row).
#[test]
fn shutdown_with_a_huge_drain_in_code_does_not_panic() {
    for (i, backend) in common::backends().into_iter().enumerate() {
        let mut s = common::settings(backend, 1, 33000 + 1000 * i as u16);
        s.drain = Duration::MAX;
        let mut relay = common::start(s);
        relay.shutdown();
        // Still draining (not stopped at once, nor panicked): a Binding is still answered.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let req = common::build_request(
            turnpike::wire::Method::BINDING,
            turnpike::wire::Class::Request,
            turnpike::wire::TransactionId([7; 12]),
            &[],
            None,
        );
        client.send_to(&req, relay.listen_addrs()[0]).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = client
            .recv_from(&mut buf)
            .expect("a Binding answer while draining");
        assert!(n >= 20);
        relay
            .shutdown_sender()
            .send(turnpike::dataplane::ToControl::Stop)
            .unwrap();
        relay.join().expect("the control thread ends cleanly");
    }
}

/// Runs `turnpike --config <file>` under `ulimit -n <nofile>` (soft and hard), output to files in `dir`.
fn spawn_limited(dir: &Path, text: &str, nofile: u32) -> std::process::Child {
    let path = dir.join("turnpike.toml");
    std::fs::write(&path, text).unwrap();
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {nofile} && exec \"$0\" --config \"$1\" --log-level warn"
        ))
        .arg(env!("CARGO_BIN_EXE_turnpike"))
        .arg(&path)
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap()
}

/// Issue 14: caps that cannot fit under RLIMIT_NOFILE are lowered at start, with a warning naming the
/// keys and the limit, so that Allocate beyond them gets 508 instead of the relay running out of
/// descriptors; below what the relay needs to run at all, it refuses to start.
#[test]
fn caps_are_fitted_under_the_open_file_limit() {
    let dir = temp_dir("nofile");
    let udp = free_udp_port();
    let text = format!(
        "listen = [\"127.0.0.1:{udp}\"]\nworkers = 1\npin_workers = false\ndrain_seconds = 0\n\
         backend = \"epoll\"\n\
         [relay]\naddresses = [\"127.0.0.1\"]\nport_min = 61100\nport_max = 61199\n\
         [[users]]\nname = \"alice\"\npassword = \"alice-pass\"\n"
    );
    // One worker and one listener: 138 descriptors kept, so 140 leaves room for two allocations.
    let mut child = spawn_limited(&dir, &text, 140);
    let server = format!("127.0.0.1:{udp}").parse().unwrap();
    let mut clients: Vec<_> = (0..3)
        .map(|_| common::Client::new(server, "alice", "alice-pass"))
        .collect();
    // The client retransmits (bounded) while the relay starts.
    clients[0].allocate();
    clients[1].allocate();
    let third = clients[2].authed(
        turnpike::wire::Method::ALLOCATE,
        &[turnpike::wire::Attribute::RequestedTransport(17)],
    );
    assert_eq!(common::Client::error_code(&third), Some(508));
    let _ = child.kill();
    child.wait().unwrap();
    let log = std::fs::read_to_string(dir.join("stdout")).unwrap();
    for fact in [
        "RLIMIT_NOFILE",
        "is 140",
        "quotas.max_allocations 100000 lowered to 2",
    ] {
        assert!(
            log.contains(fact),
            "the log should mention {fact:?}:\n{log}"
        );
    }
    // Only what was lowered: without a stream listener the connection cap stays as it was.
    assert!(
        !log.contains("streams.max_connections"),
        "no stream listener, nothing about connections:\n{log}"
    );

    // Too few for even one allocation: refused, naming the limit.
    let mut child = spawn_limited(&dir, &text, 100);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("quotas.max_allocations") && stderr.contains("RLIMIT_NOFILE) is 100"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
