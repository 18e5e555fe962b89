//! Interoperability with clients nobody here wrote, against the real `turnpike` binary: coturn's
//! `turnutils_uclient` (channels, Send indications, TURN REST credentials) relaying through
//! `turnutils_peer`, and aioice's TURN client (`tests/interop_aioice.py`). Each test runs on every
//! backend, with its own config file, listen port and relay port range, so they run in parallel;
//! each ends with SIGTERM and checks that turnpike drains and exits 0.
//!
//! The tools come from the Debian `coturn` package and PyPI `aioice`; `scripts/test.sh` installs
//! them. Without them a test prints "skipped: ..." and passes, except with `CI=true`, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::{self, File};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const TURNPIKE: &str = env!("CARGO_BIN_EXE_turnpike");
const USER: &str = "user";
const PASSWORD: &str = "pass";
const SECRET: &str = "interop-secret";
const DRAIN_SECONDS: u64 = 1;
/// uclient: clients (`-m`) and messages per client (`-n`).
const CLIENTS: u64 = 10;
const MESSAGES: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Epoll,
    IoUring,
}

impl Backend {
    /// The name in the configuration file.
    fn config_name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::IoUring => "io_uring",
        }
    }

    /// The value `--backend` takes (clap spells the variant in kebab case).
    fn cli_name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::IoUring => "io-uring",
        }
    }
}

/// Ports of one test: the listen port, the peer's port and the relay range, distinct per slot so
/// that tests run in parallel. Below the usual ephemeral range (32768-60999), so the clients' own
/// sockets never take them; clear of the e2e (20000-21999) and zero_alloc (30000-31999) ranges.
#[derive(Debug, Clone, Copy)]
struct Ports {
    listen: u16,
    peer: u16,
    relay_min: u16,
    relay_max: u16,
}

impl Ports {
    fn slot(slot: u16) -> Ports {
        let base = 23000 + 200 * slot;
        Ports {
            listen: base,
            peer: base + 1,
            relay_min: base + 100,
            relay_max: base + 199,
        }
    }
}

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether the test should run on `backend`: io_uring is skipped only outside CI when the kernel
/// refuses it.
fn backend_available(backend: Backend) -> bool {
    if backend == Backend::Epoll {
        return true;
    }
    match turnpike::sys::uring::probe() {
        Ok(()) => true,
        Err(e) if ci() => panic!("io_uring unavailable in CI (CI=true): {e}"),
        Err(e) => {
            eprintln!("skipped: io_uring unavailable on this machine: {e}");
            false
        }
    }
}

/// Whether `name` is an executable on PATH. Missing: fails under CI=true, else prints "skipped".
fn require_tool(name: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if !found {
        missing(&format!(
            "{name} is not on PATH (install {package}; scripts/test.sh does)"
        ));
    }
    found
}

/// Whether `python3` can import aioice. Missing: fails under CI=true, else prints "skipped".
fn require_aioice() -> bool {
    if !require_tool("python3", "python3") {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", "import aioice"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing(
            "python3 cannot import aioice (python3 -m pip install aioice; scripts/test.sh does)",
        );
    }
    ok
}

fn missing(what: &str) {
    assert!(
        !ci(),
        "{what}: interop tests must run in CI (CI=true), not be skipped"
    );
    eprintln!("skipped: {what}");
}

/// A scratch directory for one test's config and logs; removed unless the test failed.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("turnpike-interop-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process with its output in a log file. Dropping it kills it (also on panic), and on
/// panic shows the end of its log.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child,
            log,
            status: None,
        }
    }

    /// The exit status, if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Waits up to `limit` for it to exit; `None` if it is still running.
    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn tail(&self, lines: usize) -> String {
        let out = self.output();
        let all: Vec<&str> = out.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn terminate(&mut self) {
        let pid = self.child.id();
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} (last 40 lines of {}) ---\n{}\n---",
                self.name,
                self.log.display(),
                self.tail(40)
            );
        }
    }
}

/// Removes terminal colour sequences (tracing colours its output even into a file).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Fails unless `port` is free on 127.0.0.1 (turnpike's listeners use SO_REUSEPORT, so a leftover
/// relay on the same port would silently share the traffic instead of failing to start).
fn assert_port_free(port: u16, what: &str) {
    if let Err(e) = UdpSocket::bind(("127.0.0.1", port)) {
        panic!("UDP 127.0.0.1:{port} ({what}) is in use: {e}; a process left over from an earlier run?");
    }
}

fn config(backend: Backend, ports: Ports) -> String {
    format!(
        r#"realm = "turnpike"
listen = ["127.0.0.1:{listen}"]
workers = 2
backend = "{backend}"
log_level = "info"
drain_seconds = {DRAIN_SECONDS}
pin_workers = false
# coturn's turnutils_uclient picks channel numbers up to 0x7FFF (RFC 5766).
legacy_channel_numbers = true

[relay]
addresses = ["127.0.0.1"]
port_min = {relay_min}
port_max = {relay_max}

[[users]]
name = "{USER}"
password = "{PASSWORD}"

[rest]
secrets = ["{SECRET}"]

[peers]
allow = ["127.0.0.0/8"]
"#,
        listen = ports.listen,
        backend = backend.config_name(),
        relay_min = ports.relay_min,
        relay_max = ports.relay_max,
    )
}

/// Starts turnpike on `backend` and waits (up to 10 s) until it answers a STUN Binding request.
fn start_turnpike(dir: &Path, backend: Backend, ports: Ports) -> Proc {
    assert_port_free(ports.listen, "turnpike's listen port");
    let path = dir.join("turnpike.toml");
    fs::write(&path, config(backend, ports)).unwrap();
    let mut proc = Proc::spawn(
        "turnpike",
        dir,
        Command::new(TURNPIKE).arg("--config").arg(&path).args([
            "--backend",
            backend.cli_name(),
            "--workers",
            "2",
        ]),
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempt = 0u32;
    loop {
        if let Some(status) = proc.exited() {
            panic!("turnpike exited ({status}) before answering a Binding request");
        }
        assert!(
            Instant::now() < deadline,
            "turnpike did not answer a Binding request on 127.0.0.1:{} within 10 s",
            ports.listen
        );
        attempt += 1;
        // Binding request: type 0x0001, length 0, magic cookie, transaction id.
        let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        req.extend_from_slice(b"interop");
        req.extend_from_slice(&attempt.to_be_bytes()[1..]);
        req.extend_from_slice(&[0x00, 0x00]);
        sock.send_to(&req, ("127.0.0.1", ports.listen)).unwrap();
        let mut buf = [0u8; 1500];
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 20 && buf[..2] == [0x01, 0x01] && buf[8..20] == req[8..20] {
                return proc;
            }
        }
    }
}

/// Starts coturn's UDP echo peer and waits (up to 10 s) until it echoes.
fn start_peer(dir: &Path, port: u16) -> Proc {
    assert_port_free(port, "turnutils_peer's port");
    let mut proc = Proc::spawn(
        "turnutils_peer",
        dir,
        Command::new("turnutils_peer").args(["-L", "127.0.0.1", "-p", &port.to_string()]),
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = proc.exited() {
            panic!("turnutils_peer exited ({status}) before echoing");
        }
        assert!(
            Instant::now() < deadline,
            "turnutils_peer on 127.0.0.1:{port} did not echo within 10 s"
        );
        sock.send_to(b"interop ping", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if &buf[..n] == b"interop ping" {
                return proc;
            }
        }
    }
}

/// SIGTERM; turnpike must drain and exit 0 within drain + 5 s.
fn stop_turnpike(turnpike: &mut Proc) {
    if let Some(status) = turnpike.exited() {
        panic!("turnpike exited ({status}) before SIGTERM");
    }
    let started = Instant::now();
    turnpike.terminate();
    let limit = Duration::from_secs(DRAIN_SECONDS + 5);
    match turnpike.wait_for(limit) {
        Some(status) => assert!(
            status.success(),
            "turnpike exited with {status} after SIGTERM"
        ),
        None => panic!("turnpike still running {limit:?} after SIGTERM"),
    }
    eprintln!("turnpike exited 0 {:?} after SIGTERM", started.elapsed());
    let log = turnpike.output();
    assert!(!log.contains("panicked"), "turnpike panicked:\n{log}");
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Static user, ChannelBind + ChannelData.
    Channels,
    /// Static user, Send/Data indications (`-s`).
    SendIndications,
    /// TURN REST API credentials minted by uclient from the shared secret (`-W`).
    Rest,
}

/// `tot_send_msgs` and `tot_recv_msgs` from uclient's final summary line.
fn totals(out: &str) -> Option<(u64, u64)> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("start_mclient: tot_send_msgs="))?;
    let num = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    Some((num("tot_send_msgs=")?, num("tot_recv_msgs=")?))
}

/// The count in uclient's "Total lost packets N (...)" line.
fn lost_packets(out: &str) -> Option<u64> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("Total lost packets "))?;
    let rest = &line[line.find("Total lost packets ")? + "Total lost packets ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn uclient(test: &str, backend: Backend, mode: Mode, slot: u16) {
    if !backend_available(backend)
        || !require_tool("turnutils_uclient", "Debian package coturn")
        || !require_tool("turnutils_peer", "Debian package coturn")
    {
        return;
    }
    let scratch = Scratch::new(test);
    let dir = &scratch.0;
    let ports = Ports::slot(slot);
    let mut turnpike = start_turnpike(dir, backend, ports);
    let _peer = start_peer(dir, ports.peer);

    let credentials: &[&str] = match mode {
        Mode::Channels => &["-u", USER, "-w", PASSWORD],
        Mode::SendIndications => &["-s", "-u", USER, "-w", PASSWORD],
        Mode::Rest => &["-W", SECRET, "-u", "someuser"],
    };
    let (peer, port) = (ports.peer.to_string(), ports.listen.to_string());
    let (messages, clients) = (MESSAGES.to_string(), CLIENTS.to_string());
    let mut args: Vec<&str> = credentials.to_vec();
    args.extend([
        "-e",
        "127.0.0.1",
        "-r",
        &peer,
        "-p",
        &port,
        "-n",
        &messages,
        "-m",
        &clients,
        "-l",
        "160",
        "127.0.0.1",
    ]);
    let started = Instant::now();
    let mut client = Proc::spawn(
        "turnutils_uclient",
        dir,
        Command::new("turnutils_uclient").args(&args),
    );
    let limit = Duration::from_secs(60);
    let Some(status) = client.wait_for(limit) else {
        panic!(
            "turnutils_uclient {} still running after {limit:?}; killed",
            args.join(" ")
        );
    };
    let out = client.output();
    let summary = || {
        format!(
            "turnutils_uclient {} ({backend:?}, {mode:?}):\n{}",
            args.join(" "),
            client.tail(12)
        )
    };
    assert!(status.success(), "exited with {status}: {}", summary());
    let expected = CLIENTS * MESSAGES;
    assert_eq!(
        totals(&out),
        Some((expected, expected)),
        "tot_send_msgs, tot_recv_msgs: {}",
        summary()
    );
    assert_eq!(lost_packets(&out), Some(0), "lost packets: {}", summary());
    eprintln!(
        "{backend:?} {mode:?}: {expected} messages each way, none lost, in {:?}",
        started.elapsed()
    );
    stop_turnpike(&mut turnpike);
}

fn aioice(test: &str, backend: Backend, slot: u16) {
    if !backend_available(backend) || !require_aioice() {
        return;
    }
    let scratch = Scratch::new(test);
    let dir = &scratch.0;
    let ports = Ports::slot(slot);
    let mut turnpike = start_turnpike(dir, backend, ports);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_aioice.py");
    let mut client = Proc::spawn(
        "interop_aioice.py",
        dir,
        Command::new("python3").arg(script).args([
            "127.0.0.1".to_string(),
            ports.listen.to_string(),
            USER.into(),
            PASSWORD.into(),
            ports.relay_min.to_string(),
            ports.relay_max.to_string(),
        ]),
    );
    let limit = Duration::from_secs(60);
    let Some(status) = client.wait_for(limit) else {
        panic!("interop_aioice.py still running after {limit:?}; killed");
    };
    assert!(
        status.success(),
        "interop_aioice.py exited with {status} ({backend:?}):\n{}",
        client.output()
    );
    eprintln!("{backend:?} aioice:\n{}", client.output());
    stop_turnpike(&mut turnpike);
}

#[test]
fn uclient_channels_epoll() {
    uclient("uclient_channels_epoll", Backend::Epoll, Mode::Channels, 0);
}

#[test]
fn uclient_channels_io_uring() {
    uclient(
        "uclient_channels_io_uring",
        Backend::IoUring,
        Mode::Channels,
        1,
    );
}

#[test]
fn uclient_send_indications_epoll() {
    uclient(
        "uclient_send_indications_epoll",
        Backend::Epoll,
        Mode::SendIndications,
        2,
    );
}

#[test]
fn uclient_send_indications_io_uring() {
    uclient(
        "uclient_send_indications_io_uring",
        Backend::IoUring,
        Mode::SendIndications,
        3,
    );
}

#[test]
fn uclient_rest_credentials_epoll() {
    uclient(
        "uclient_rest_credentials_epoll",
        Backend::Epoll,
        Mode::Rest,
        4,
    );
}

#[test]
fn uclient_rest_credentials_io_uring() {
    uclient(
        "uclient_rest_credentials_io_uring",
        Backend::IoUring,
        Mode::Rest,
        5,
    );
}

#[test]
fn aioice_epoll() {
    aioice("aioice_epoll", Backend::Epoll, 6);
}

#[test]
fn aioice_io_uring() {
    aioice("aioice_io_uring", Backend::IoUring, 7);
}

#[test]
fn uclient_summary_parsing() {
    let out = "26: : start_mclient: msz=10, tot_send_msgs=9986, tot_recv_msgs=9986, tot_send_bytes ~ 1597760, tot_recv_bytes ~ 1597760\n\
               26: : start_mclient: tot_send_msgs=10000, tot_recv_msgs=7194\n\
               26: : Total lost packets 2806 (28.060000%), total send dropped 0 (0.000000%)\n";
    assert_eq!(totals(out), Some((10000, 7194)));
    assert_eq!(lost_packets(out), Some(2806));
    assert_eq!(totals("nothing"), None);
    assert_eq!(
        strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
        "time  INFO x"
    );
}
