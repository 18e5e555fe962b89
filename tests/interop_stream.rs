//! The `turnpike` binary over TCP and TLS with clients nobody here wrote: coturn's `turnutils_uclient -t`
//! (TCP) and `-t -S` (TLS), relaying through `turnutils_peer`, on every backend; and a SIGHUP that
//! reloads the TLS certificate while a TLS session keeps relaying.
//!
//! Missing coturn tools skip the uclient test, except with `CI=true`, where that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TURNPIKE: &str = env!("CARGO_BIN_EXE_turnpike");

fn backends() -> Vec<&'static str> {
    let mut v = vec!["epoll"];
    if turnpike::sys::uring::probe().is_ok() {
        v.push("io-uring");
    } else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "io_uring unavailable in CI"
        );
    }
    v
}

/// A port free for both TCP and UDP right now.
fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Relay {
    proc: Proc,
    tcp: u16,
    tls: u16,
    dir: PathBuf,
}

fn write_cert(dir: &Path, name: &str) -> Vec<u8> {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), name.into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), c.key_pair.serialize_pem()).unwrap();
    c.cert.der().to_vec()
}

fn start(test: &str, backend: &str, relay_min: u16) -> (Relay, Vec<u8>) {
    let dir =
        std::env::temp_dir().join(format!("turnpike-{test}-{backend}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let der = write_cert(&dir, "first");
    let (udp, tcp, tls) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"listen = ["127.0.0.1:{udp}"]
listen_tcp = ["127.0.0.1:{tcp}"]
listen_tls = ["127.0.0.1:{tls}"]
workers = 2
pin_workers = false
log_level = "warn"
# coturn's turnutils_uclient picks channel numbers up to 0x7FFF (RFC 5766).
legacy_channel_numbers = true
tls.cert = "{dir}/cert.pem"
tls.key = "{dir}/key.pem"
[relay]
addresses = ["127.0.0.1"]
port_min = {relay_min}
port_max = {relay_max}
[[users]]
name = "demo"
password = "demo-pass"
[peers]
allow = ["127.0.0.0/8"]
"#,
        dir = dir.display(),
        relay_max = relay_min + 499,
    );
    std::fs::write(dir.join("turnpike.toml"), config).unwrap();
    let child = Command::new(TURNPIKE)
        .arg("--config")
        .arg(dir.join("turnpike.toml"))
        .args(["--backend", backend])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", tls)).is_err() {
        assert!(Instant::now() < deadline, "turnpike did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        Relay {
            proc: Proc(child),
            tcp,
            tls,
            dir,
        },
        der,
    )
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing (install coturn; scripts/test.sh does)"
        );
        eprintln!("{tool} missing: skipped");
    }
    ok
}

#[test]
fn turnutils_uclient_over_tcp_and_tls() {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        return;
    }
    for (i, backend) in backends().into_iter().enumerate() {
        let (relay, _) = start("uclient", backend, 54000 + 500 * i as u16);
        let peer_port = free_port();
        let _peer = Proc(
            Command::new("turnutils_peer")
                .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(200));
        for (flags, port, what) in [
            (vec!["-t"], relay.tcp, "tcp channels"),
            (vec!["-t", "-s"], relay.tcp, "tcp send indications"),
            (vec!["-t", "-S"], relay.tls, "tls channels"),
        ] {
            let out = Command::new("timeout")
                .arg("60")
                .arg("turnutils_uclient")
                .args(&flags)
                .args(["-u", "demo", "-w", "demo-pass", "-e", "127.0.0.1"])
                .args(["-r", &peer_port.to_string(), "-p", &port.to_string()])
                .args(["-n", "50", "-m", "4", "-l", "171", "127.0.0.1"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            let tail: String = text.lines().rev().take(8).collect::<Vec<_>>().join("\n");
            assert!(
                text.contains("tot_send_msgs=200, tot_recv_msgs=200"),
                "{backend} {what}: {tail}"
            );
            assert!(
                text.contains("Total lost packets 0 "),
                "{backend} {what}: {tail}"
            );
        }
    }
}

/// A STUN Binding request and its success response over `s`.
fn binding<S: std::io::Read + std::io::Write>(s: &mut S) -> std::io::Result<()> {
    use turnpike::wire::{Class, Message, MessageType, MessageWriter, Method, TransactionId};
    let mut buf = [0u8; 64];
    let w = MessageWriter::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        TransactionId([3; 12]),
    )
    .unwrap();
    let n = w.finish();
    s.write_all(&buf[..n])?;
    s.flush()?;
    let mut hdr = [0u8; 20];
    s.read_exact(&mut hdr)?;
    let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let mut msg = hdr.to_vec();
    msg.resize(20 + len, 0);
    s.read_exact(&mut msg[20..])?;
    let m = Message::parse(&msg).map_err(|_| std::io::Error::other("not STUN"))?;
    if m.message_type().class != Class::Success {
        return Err(std::io::Error::other("not a success"));
    }
    Ok(())
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn connect_tls(port: u16, der: &[u8]) -> std::io::Result<Tls> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.to_vec().into()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    binding(&mut s)?;
    Ok(s)
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_sessions() {
    for (i, backend) in backends().into_iter().enumerate() {
        let (relay, der1) = start("sighup", backend, 55000 + 500 * i as u16);
        let mut old = connect_tls(relay.tls, &der1).expect("TLS with the first certificate");
        let der2 = write_cert(&relay.dir, "second");
        let status = Command::new("kill")
            .args(["-HUP", &relay.proc.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while connect_tls(relay.tls, &der2).is_err() {
            assert!(
                Instant::now() < deadline,
                "{backend}: the new certificate is not served after SIGHUP"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            connect_tls(relay.tls, &der1).is_err(),
            "{backend}: the old certificate is still served"
        );
        binding(&mut old).expect("the established session survives the reload");
        // Plain TCP still answers too.
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", relay.tcp)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        binding(&mut tcp).unwrap();
    }
}
