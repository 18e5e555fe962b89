//! A real browser relaying through turnpike: headless Chromium loads a page with two RTCPeerConnections
//! (`iceTransportPolicy: "relay"`, turnpike the only ICE server), once for each of
//! `turn:…?transport=udp`, `turn:…?transport=tcp` and `turns:…`, opens a data channel, sends messages both
//! ways, and reports back what arrived and the types of the selected candidate pair (from getStats).
//!
//! The page is served, and its report received, by a tiny HTTP server in this test: Chromium is driven by
//! its command line and the page itself, so no WebDriver or DevTools client is needed. Everything stays on
//! loopback; Chromium runs with a fresh profile and with background networking off.
//!
//! Without Chromium the test is skipped, except with `CI=true`, where that is a failure
//! (`scripts/test.sh` installs the Debian `chromium` package first).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use turnpike::dataplane::stream::tls_config;

const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>turnpike relay test</title>
<script>
const report = (text) => fetch("/result", { method: "POST", body: text });
async function run() {
  const cfg = {
    iceServers: [{ urls: ICE_URL, username: "alice", credential: "alice-pass" }],
    iceTransportPolicy: "relay",
  };
  const a = new RTCPeerConnection(cfg), b = new RTCPeerConnection(cfg);
  a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
  b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
  const gotA = [], gotB = [];
  const dc = a.createDataChannel("turnpike");
  dc.onmessage = (m) => gotA.push(m.data);
  const aOpen = new Promise((res) => (dc.onopen = res));
  const bOpen = new Promise((res) => (b.ondatachannel = (e) => {
    e.channel.onmessage = (m) => { gotB.push(m.data); e.channel.send("pong " + m.data); };
    e.channel.onopen = () => res(e.channel);
    if (e.channel.readyState === "open") res(e.channel);
  }));
  await a.setLocalDescription(await a.createOffer());
  await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription(await b.createAnswer());
  await a.setRemoteDescription(b.localDescription);
  await aOpen; await bOpen;
  for (let i = 0; i < 10; i++) dc.send("ping " + i + " " + "x".repeat(i * 97));
  while (gotA.length < 10) await new Promise((r) => setTimeout(r, 20));
  const pairType = async (pc) => {
    const stats = await pc.getStats();
    let pair;
    stats.forEach((s) => { if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
    if (!pair) stats.forEach((s) => { if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s; });
    const l = stats.get(pair.localCandidateId), r = stats.get(pair.remoteCandidateId);
    return l.candidateType + "/" + r.candidateType + "/" + (l.relayProtocol || "");
  };
  const ok = gotB.every((m, i) => m === "ping " + i + " " + "x".repeat(i * 97)) && gotA.every((m, i) => m === "pong " + gotB[i]);
  await report("ok=" + ok + ";a=" + gotA.length + ";b=" + gotB.length + ";pairA=" + await pairType(a) + ";pairB=" + await pairType(b));
}
run().catch((e) => report("error=" + e));
setTimeout(() => report("error=timeout"), 25000);
</script>"#;

/// The Chromium binary, if installed.
fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find_map(|name| {
            let ok = Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| name.to_string())
        })
}

/// Serve the page for `ice_url` and wait for its report.
fn run_page(browser: &str, ice_url: &str) -> String {
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = http.local_addr().unwrap().port();
    let page = PAGE.replace("ICE_URL", &format!("{ice_url:?}"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in http.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            let (ctype, reply) = if line.starts_with("POST /result") {
                let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                ("text/plain", String::new())
            } else {
                ("text/html", page.clone())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    let profile =
        std::env::temp_dir().join(format!("turnpike-chromium-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let mut child: Child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            // The TURN server and every relayed address are on loopback.
            "--allow-loopback-in-peer-connection",
            // Trust the test's self-signed certificate for turns:.
            "--ignore-certificate-errors",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let result = rx.recv_timeout(Duration::from_secs(40));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&profile);
    result.unwrap_or_else(|_| "error=no report from the page".into())
}

#[test]
fn chromium_data_channel_through_turnpike_over_udp_tcp_and_tls() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is not installed (scripts/test.sh installs the Debian package)"
        );
        eprintln!("chromium not installed: browser test skipped");
        return;
    };
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let tls = tls_config(
        c.cert.pem().as_bytes(),
        c.key_pair.serialize_pem().as_bytes(),
    )
    .unwrap();
    for (i, backend) in backends().into_iter().enumerate() {
        let mut s = settings(backend, 2, 52000 + 1000 * i as u16);
        s.stream.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()];
        s.stream.listen_tls = vec!["127.0.0.1:0".parse().unwrap()];
        s.stream.tls = Some(tls.clone());
        let relay = start(s);
        let udp = relay.listen_addrs()[0];
        let tcp = relay.tcp_addrs()[0];
        let tls = relay.tls_addrs()[0];
        for (url, proto) in [
            (format!("turn:{udp}?transport=udp"), "udp"),
            (format!("turn:{tcp}?transport=tcp"), "tcp"),
            (format!("turns:{tls}?transport=tcp"), "tls"),
        ] {
            let report = run_page(&browser, &url);
            eprintln!("{backend:?} {url}: {report}");
            assert!(
                report.starts_with("ok=true;a=10;b=10;"),
                "{backend:?} {url}: {report}"
            );
            assert!(
                report.contains(&format!("pairA=relay/relay/{proto}"))
                    && report.contains(&format!("pairB=relay/relay/{proto}")),
                "{backend:?} {url}: the selected pair is not relay/relay over {proto}: {report}"
            );
        }
        relay.stop().unwrap();
    }
}
