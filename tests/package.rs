//! The Debian package and its systemd unit (issue 15): `cargo deb` builds it (scripts/deb/build.sh) and
//! `dpkg-deb -c` lists the expected files; `dpkg -i` installs it (the system user, the conffile's
//! group) and `dpkg --purge` removes it; `systemd-analyze verify` accepts the unit, with and without
//! the XDP drop-in; the installed relay, filled in, runs as the unit's user, answers `turnpike status`
//! and takes `turnpike reload` (README "Install on a host", without systemd); sd_notify through a
//! NOTIFY_SOCKET the test owns (PID 1 is not systemd here); and the example configuration, which
//! `check-config` refuses until its placeholders are filled in.
//!
//! With CI=true a missing tool (cargo-deb, dpkg, systemd-analyze) fails the test instead of skipping.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::ErrorKind;
use std::net::UdpSocket;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use turnpike::config::RelayConfig;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const EXAMPLE: &str = "scripts/deb/turnpike.toml";
const UNIT: &str = "scripts/deb/turnpike.service";

fn root(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// Whether `cmd args` runs; with CI=true its absence fails the test.
fn tool(cmd: &str, args: &[&str]) -> bool {
    let ok = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{cmd} is required in CI (scripts/test.sh installs it)"
        );
        eprintln!("skipping: {cmd} missing (scripts/test.sh installs it)");
    }
    ok
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-pkg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What an operator fills in for each placeholder the example configuration names, keyed by the
/// key `check-config` reports.
fn fill(key: &str) -> (&'static str, &'static str) {
    match key {
        "listen[0]" => ("listen = ", "192.0.2.10"),
        "relay.addresses[0]" => ("addresses = ", "192.0.2.10"),
        "rest.secrets[0]" => ("secrets = ", "n0t-a-placeholder-but-a-long-random-secret"),
        "api.access_keys[0]" => ("access_keys = ", "dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5"),
        other => {
            panic!("check-config named {other:?}, which the example should not need filled in")
        }
    }
}

/// Runs `turnpike check-config` on `text`; `Err(stderr)` when it refuses.
fn check_config(dir: &Path, text: &str) -> Result<(), String> {
    let file = dir.join("turnpike.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["check-config", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(2) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        other => panic!("check-config exited with {other:?}"),
    }
}

/// The example with every placeholder filled in, one by one as check-config names them; returns the
/// filled text and the keys in the order they were named.
fn filled_example(dir: &Path) -> (String, Vec<String>) {
    let mut text = std::fs::read_to_string(root(EXAMPLE)).unwrap();
    let mut named = Vec::new();
    for _ in 0..10 {
        let Err(e) = check_config(dir, &text) else {
            return (text, named);
        };
        let key = e
            .trim()
            .strip_prefix("turnpike: configuration error: ")
            .and_then(|rest| rest.split(": ").next())
            .unwrap_or_else(|| panic!("unexpected check-config output: {e}"))
            .to_string();
        let (line_start, value) = fill(&key);
        // The first line (not a comment) that sets this key holds the placeholder.
        let line = text
            .lines()
            .find(|l| l.starts_with(line_start) && l.contains("CHANGE-ME"))
            .unwrap_or_else(|| panic!("{key}: no {line_start:?} line with a placeholder"))
            .to_string();
        text = text.replacen(&line, &line.replacen("CHANGE-ME", value, 1), 1);
        named.push(key);
    }
    panic!("check-config still refuses after filling {named:?}");
}

#[test]
fn example_config_is_refused_until_every_placeholder_is_filled_in() {
    let dir = temp_dir("example");
    let original = std::fs::read_to_string(root(EXAMPLE)).unwrap();
    let e = check_config(&dir, &original).unwrap_err();
    assert!(
        e.contains("listen[0]: still the example's placeholder"),
        "{e}"
    );
    let (text, named) = filled_example(&dir);
    assert_eq!(
        named,
        [
            "listen[0]",
            "relay.addresses[0]",
            "rest.secrets[0]",
            "api.access_keys[0]"
        ]
    );
    // Filled in, it is a real relay's configuration, not the demo: no static user, no loopback peers,
    // the API and metering on, the usage database in the unit's StateDirectory.
    let c = RelayConfig::from_toml(&text).unwrap();
    assert!(c.live.users.is_empty());
    assert!(!c.is_loopback_only());
    let loopback_peer = "127.0.0.1:9".parse().unwrap();
    assert!(c.peer_policy().check(loopback_peer).is_err());
    assert_eq!(
        c.fixed.api.as_ref().unwrap().listen.to_string(),
        "127.0.0.1:8080"
    );
    assert_eq!(
        c.fixed.usage.as_ref().unwrap().database,
        Path::new("/var/lib/turnpike/usage.db")
    );
    // A secret that merely contains the placeholder is refused too, naming its key.
    let half = text.replace(
        "n0t-a-placeholder-but-a-long-random-secret",
        "CHANGE-ME-later",
    );
    let e = check_config(&dir, &half).unwrap_err();
    assert!(
        e.contains("rest.secrets[0]: still the example's placeholder"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `TimeoutStopSec=` of the unit, in seconds.
fn unit_stop_timeout() -> u64 {
    let unit = std::fs::read_to_string(root(UNIT)).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("the unit sets TimeoutStopSec")
        .trim()
        .parse()
        .expect("TimeoutStopSec in whole seconds")
}

/// The next notification on `sock` (bounded wait).
fn next_notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("no sd_notify message within the timeout")
        }
        Err(e) => panic!("NOTIFY_SOCKET: {e}"),
    }
}

/// A STUN Binding request (RFC 8489 §5): 20 bytes, no attributes.
fn binding_request() -> [u8; 20] {
    let mut m = [0u8; 20];
    m[1] = 0x01;
    m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    m[8..].copy_from_slice(b"sdnotifytest");
    m
}

#[test]
fn sd_notify_ready_once_listening_reloading_on_sighup_stopping_at_sigterm() {
    let dir = temp_dir("notify");
    let listen = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = listen.local_addr().unwrap().port();
    drop(listen);
    let drain = 1;
    let config = dir.join("turnpike.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:{port}\"]\nworkers = 1\npin_workers = false\ndrain_seconds = {drain}\n\
             [relay]\naddresses = [\"127.0.0.1\"]\nport_min = 34000\nport_max = 34099\n\
             [rest]\nsecrets = [\"notify-test-secret\"]\n"
        ),
    )
    .unwrap();
    let socket_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--config", config.to_str().unwrap(), "--log-level", "warn"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        run(Command::new("kill").args([sig, &pid]));
    };

    let ready = next_notification(&sock);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=relaying on 127.0.0.1:{port}")),
        "{ready:?}"
    );
    // READY means listening: a Binding request is answered at once.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    client
        .send_to(&binding_request(), ("127.0.0.1", port))
        .unwrap();
    let mut buf = [0u8; 1500];
    let n = client
        .recv(&mut buf)
        .expect("a Binding response after READY");
    assert!(n >= 20 && buf[..2] == [0x01, 0x01], "Binding success");

    signal("-HUP");
    let reloading = next_notification(&sock);
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    let ready = next_notification(&sock);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not end the process"
    );

    signal("-TERM");
    let stopping = next_notification(&sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let extend: u64 = stopping
        .lines()
        .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .expect("the stop asks for the drain's time")
        .parse()
        .unwrap();
    let margin = extend / 1_000_000 - drain;
    // The unit waits for the example configuration's drain plus the same margin before SIGKILL.
    let (text, _) = filled_example(&dir);
    let example = RelayConfig::from_toml(&text).unwrap();
    assert!(
        unit_stop_timeout() >= example.fixed.drain.as_secs() + margin,
        "TimeoutStopSec={} < drain_seconds {} + {margin}",
        unit_stop_timeout(),
        example.fixed.drain.as_secs()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not stop after its drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Purges the package when the test ends, also on failure.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all("/etc/systemd/system/turnpike.service.d");
        let _ = Command::new("dpkg")
            .args(["--purge", "turnpike"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// README "Install on a host", steps 3 to 5, on the installed package where PID 1 is not systemd:
/// the installed example filled in (loopback, free ports), the directories the unit's
/// StateDirectory= and RuntimeDirectory= would create, and `/usr/bin/turnpike` run as the unit's
/// user. It reads the root:turnpike 0640 conffile, writes its pid file and usage database there;
/// `turnpike status` reads it, `turnpike reload --config` (through `pid_file`) applies an edit, and
/// SIGTERM stops it cleanly.
fn walk_installed_as_the_service_user() {
    const CONF: &str = "/etc/turnpike/turnpike.toml";
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = udp.local_addr().unwrap().port();
    drop(udp);
    let api = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let installed = std::fs::read_to_string(CONF).unwrap();
    let text = installed
        .replace(
            "listen = [\"CHANGE-ME:3478\"]",
            &format!("listen = [\"127.0.0.1:{listen}\"]"),
        )
        .replace("addresses = [\"CHANGE-ME\"]", "addresses = [\"127.0.0.1\"]")
        .replace(
            "secrets = [\"CHANGE-ME\"]",
            "secrets = [\"n0t-a-placeholder-but-a-long-random-secret\"]",
        )
        .replace(
            "access_keys = [\"CHANGE-ME\"]",
            "access_keys = [\"dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5\"]",
        )
        .replace(
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"127.0.0.1:{api}\""),
        )
        .replace("drain_seconds = 30", "drain_seconds = 0");
    // sudoedit keeps the file's owner and mode.
    std::fs::write(CONF, &text).unwrap();
    run(Command::new("/usr/bin/turnpike").args(["check-config", "--config", CONF]));
    for (dir, mode) in [("/var/lib/turnpike", 0o750), ("/run/turnpike", 0o755)] {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("chown").args(["turnpike:turnpike", dir]));
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let _dirs = RemoveOnDrop(vec!["/var/lib/turnpike", "/run/turnpike"]);
    let child = Command::new("setpriv")
        .args([
            "--reuid",
            "turnpike",
            "--regid",
            "turnpike",
            "--init-groups",
            "--",
        ])
        .args(["/usr/bin/turnpike", "--config", CONF, "--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut relay = Killed(child);
    let metrics = || {
        ureq::get(&format!("http://127.0.0.1:{api}/metrics"))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !metrics().contains("turnpike_allocations") {
        assert!(
            relay.0.try_wait().unwrap().is_none(),
            "the installed relay exited as the turnpike user"
        );
        assert!(
            Instant::now() < deadline,
            "the installed relay did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = std::fs::read_to_string("/run/turnpike/turnpike.pid").unwrap();
    assert_eq!(
        pid.trim(),
        relay.0.id().to_string(),
        "pid_file in the RuntimeDirectory"
    );
    assert!(
        Path::new("/var/lib/turnpike/usage.db").exists(),
        "usage database in the StateDirectory"
    );
    let status = run(Command::new("/usr/bin/turnpike").args(["status", "--config", CONF]));
    let screen = String::from_utf8_lossy(&status.stdout);
    assert!(
        screen.contains(&format!("127.0.0.1:{api}/metrics: serving")),
        "{screen}"
    );

    // Step 5: an edit, then `turnpike reload`; the relay applies it.
    std::fs::write(
        CONF,
        text.replace("log_level = \"info\"", "log_level = \"debug\""),
    )
    .unwrap();
    run(Command::new("/usr/bin/turnpike").args(["reload", "--config", CONF]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics().contains("turnpike_reloads_total{result=\"success\"} 1") {
        assert!(
            Instant::now() < deadline,
            "the reload was not applied:\n{}",
            metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run(Command::new("kill").args(["-TERM", &relay.0.id().to_string()]));
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = relay.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop the relay");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        !Path::new("/run/turnpike/turnpike.pid").exists(),
        "the pid file is removed at exit"
    );
    std::fs::write(CONF, installed).unwrap();
}

/// Kills and reaps a child when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes directories when dropped.
struct RemoveOnDrop(Vec<&'static str>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// `systemd-analyze verify turnpike.service`: success and not a word of warning.
fn verify_unit() {
    let out = run(Command::new("systemd-analyze").args(["verify", "turnpike.service"]));
    let noise = String::from_utf8_lossy(&out.stderr);
    assert!(noise.trim().is_empty(), "systemd-analyze verify: {noise}");
}

#[test]
fn debian_package_builds_lists_installs_verifies_and_purges() {
    if !tool("cargo", &["deb", "--version"])
        || !tool("dpkg-deb", &["--version"])
        || !tool("systemd-analyze", &["--version"])
    {
        return;
    }
    let out_dir = temp_dir("deb");
    // The debug binary this test run built (no second, release build inside the test).
    let built = run(Command::new(root("scripts/deb/build.sh"))
        .args(["--fast", "--output", out_dir.to_str().unwrap()])
        .env("PROFILE", "dev")
        .env("NO_BUILD", "1"));
    let deb = String::from_utf8_lossy(&built.stdout)
        .lines()
        .rev()
        .find(|l| l.ends_with(".deb"))
        .expect("cargo deb prints the package's path")
        .to_string();

    let listing = run(Command::new("dpkg-deb").args(["-c", &deb]));
    let listing = String::from_utf8_lossy(&listing.stdout);
    // "-rw-r----- 0/0 2937 2026-12-01 00:00 ./etc/turnpike/turnpike.toml" → (mode, path) of files.
    let files: Vec<(&str, &str)> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| Some((l.split_whitespace().next()?, l.split_whitespace().last()?)))
        .collect();
    let mut paths: Vec<&str> = files.iter().map(|(_, p)| *p).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "./etc/turnpike/turnpike.toml",
            "./usr/bin/turnpike",
            "./usr/lib/sysctl.d/99-turnpike.conf",
            "./usr/lib/systemd/system/turnpike.service",
            "./usr/lib/sysusers.d/turnpike.conf",
            "./usr/share/doc/turnpike/README.md",
            "./usr/share/doc/turnpike/copyright",
            "./usr/share/man/man1/turnpike.1.gz",
            "./usr/share/turnpike/monitoring/turnpike-alerts.yml",
            "./usr/share/turnpike/monitoring/turnpike-dashboard.json",
            "./usr/share/turnpike/xdp.conf",
        ],
        "{listing}"
    );
    let mode = |p: &str| files.iter().find(|(_, f)| *f == p).unwrap().0;
    assert_eq!(mode("./etc/turnpike/turnpike.toml"), "-rw-r-----");
    assert_eq!(mode("./usr/bin/turnpike"), "-rwxr-xr-x");
    let field = |f: &str| {
        let o = run(Command::new("dpkg-deb").args(["-f", &deb, f]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert!(field("Depends").contains("systemd"), "{}", field("Depends"));
    let control = temp_dir("deb-control");
    run(Command::new("dpkg-deb").args(["-e", &deb, control.to_str().unwrap()]));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/turnpike/turnpike.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysusers") && postinst.contains("try-restart turnpike.service"),
        "the user comes from sysusers.d; an upgrade try-restarts (drains) a running relay:\n{postinst}"
    );
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(
        !prerm.contains("upgrade") && prerm.contains("\"$1\" = remove"),
        "prerm stops the relay on removal only, never before an upgrade's unpack:\n{prerm}"
    );

    // Install (a leftover from an interrupted run is purged first).
    let _purge = Installed;
    let _ = Command::new("dpkg")
        .args(["--purge", "turnpike"])
        .stdout(Stdio::null())
        .status();
    run(Command::new("dpkg").args(["-i", &deb]));
    let passwd = run(Command::new("getent").args(["passwd", "turnpike"]));
    assert!(
        String::from_utf8_lossy(&passwd.stdout).contains(":/var/lib/turnpike:"),
        "the system user, home in the StateDirectory"
    );
    let conf = std::fs::metadata("/etc/turnpike/turnpike.toml").unwrap();
    let group = run(Command::new("getent").args(["group", "turnpike"]));
    let gid: u32 = String::from_utf8_lossy(&group.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!((conf.uid(), conf.gid()), (0, gid), "root:turnpike");
    assert_eq!(conf.permissions().mode() & 0o777, 0o640);
    assert_eq!(
        std::fs::read("/usr/lib/systemd/system/turnpike.service").unwrap(),
        std::fs::read(root(UNIT)).unwrap()
    );
    // The installed relay refuses the installed example until it is filled in.
    let check = Command::new("/usr/bin/turnpike")
        .args(["check-config", "--config", "/etc/turnpike/turnpike.toml"])
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("listen[0]"));
    walk_installed_as_the_service_user();

    verify_unit();
    // With the XDP drop-in enabled as the README says.
    std::fs::create_dir_all("/etc/systemd/system/turnpike.service.d").unwrap();
    std::os::unix::fs::symlink(
        "/usr/share/turnpike/xdp.conf",
        "/etc/systemd/system/turnpike.service.d/xdp.conf",
    )
    .unwrap();
    verify_unit();
    std::fs::remove_dir_all("/etc/systemd/system/turnpike.service.d").unwrap();

    run(Command::new("dpkg").args(["--purge", "turnpike"]));
    assert!(!Path::new("/usr/bin/turnpike").exists());
    assert!(!Path::new("/etc/turnpike/turnpike.toml").exists());
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_dir_all(&control);
}
