//! Start-up against the real binary (issue 14): what the relay refuses before it serves, and how it
//! says so. Every case here used to fail late, obscurely or with a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

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
