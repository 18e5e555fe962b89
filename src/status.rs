//! `turnpike status`: a one-screen summary of a running relay, read from its Prometheus `/metrics`
//! (two scrapes a second apart, for the rates). A plain HTTP/1.0 GET over a `TcpStream`: the metrics
//! endpoint is meant for loopback or a private network, so no HTTP client or TLS is needed here.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use turnpike::config::RelayConfig;

/// The configuration file the Debian package installs, used when neither --url nor --config is given.
const PACKAGED_CONFIG: &str = "/etc/turnpike/turnpike.toml";
/// Time between the two scrapes the rates come from.
const INTERVAL: Duration = Duration::from_secs(1);
/// Connect, read and write timeout of one scrape.
const TIMEOUT: Duration = Duration::from_secs(3);
/// A scrape larger than this is not a turnpike relay's.
const MAX_RESPONSE: u64 = 8 << 20;
/// Workers listed one by one at most; more are summarised.
const MAX_WORKERS_SHOWN: usize = 16;

/// `turnpike status [--url URL] [--config FILE]`.
pub fn run(config: Option<&Path>, url: Option<&str>) -> ExitCode {
    let (url, config_file) = match target(config, url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("turnpike status: {e}");
            return ExitCode::from(2);
        }
    };
    let first = scrape(&url).and_then(|text| {
        let at = Instant::now();
        std::thread::sleep(INTERVAL);
        let second = scrape(&url)?;
        Ok((Metrics::parse(&text), Metrics::parse(&second), at.elapsed()))
    });
    match first {
        Ok((before, after, elapsed)) => {
            let age = config_file.as_deref().map(|p| (p, file_age(p)));
            print!("{}", render(&url, &before, &after, elapsed, age));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnpike status: {url}: {e}");
            ExitCode::from(1)
        }
    }
}

/// The metrics URL and the configuration file it came from (if any).
fn target(config: Option<&Path>, url: Option<&str>) -> Result<(String, Option<PathBuf>), String> {
    let file = match config {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(PACKAGED_CONFIG)).filter(|p| p.exists()),
    };
    if let Some(u) = url {
        return Ok((u.to_string(), file));
    }
    let Some(path) = file else {
        return Err(format!(
            "give --url http://HOST:PORT/metrics, or --config FILE with an [api] section \
             ({PACKAGED_CONFIG} does not exist)"
        ));
    };
    let config = RelayConfig::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(api) = &config.fixed.api else {
        return Err(format!(
            "{}: no [api] section, so the relay serves no /metrics; add one or give --url",
            path.display()
        ));
    };
    // A metrics listener of its own is plain HTTP; otherwise /metrics shares the API's listener.
    let listen = api.metrics_listen.unwrap_or(api.listen);
    if api.metrics_listen.is_none() && config.live.api.as_ref().is_some_and(|a| a.tls.is_some()) {
        return Err(format!(
            "{}: the API is served over TLS and status speaks plain HTTP; give --url of a plain \
             metrics endpoint",
            path.display()
        ));
    }
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok((format!("http://{addr}/metrics"), Some(path)))
}

/// GET `url` (`http://host:port/path`) and return the body of a 200 answer.
fn scrape(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported (a loopback or private metrics address)")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority:?} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    // HTTP/1.0: the answer is never chunked and ends when the server closes the connection.
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("not an HTTP answer (no header end)")?;
    let status = head.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(body.to_string()),
        _ => Err(format!("answered {status:?}")),
    }
}

/// A series' labels, in scrape order.
type Labels = Vec<(String, String)>;

/// One scrape: sample values by name, each with its labels.
#[derive(Debug, Default)]
struct Metrics {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Metrics {
    /// Parse the Prometheus/OpenMetrics text format; lines that do not parse are skipped.
    fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((name, labels, value)) = parse_sample(line) {
                m.samples.entry(name).or_default().push((labels, value));
            }
        }
        m
    }

    /// The sum of every series of `name` (0 when there is none).
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .get(name)
            .map_or(0.0, |v| v.iter().map(|(_, x)| x).sum())
    }

    /// The value of the series of `name` whose label `key` is `value`.
    fn get(&self, name: &str, key: &str, value: &str) -> f64 {
        self.by(name, key).get(value).copied().unwrap_or(0.0)
    }

    /// `name` summed by the value of label `key`.
    fn by(&self, name: &str, key: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.samples.get(name).into_iter().flatten() {
            if let Some((_, lv)) = labels.iter().find(|(k, _)| k == key) {
                *out.entry(lv.clone()).or_insert(0.0) += v;
            }
        }
        out
    }

    /// The value of label `key` on the first series of `name` (info metrics).
    fn label(&self, name: &str, key: &str) -> Option<&str> {
        let (labels, _) = self.samples.get(name)?.first()?;
        labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let close = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        };
        rest = &inner[close + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// How long ago `path` was last modified.
fn file_age(path: &Path) -> Result<Duration, String> {
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|e| e.to_string())?;
    Ok(SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default())
}

/// The summary screen.
fn render(
    url: &str,
    before: &Metrics,
    after: &Metrics,
    elapsed: Duration,
    config: Option<(&Path, Result<Duration, String>)>,
) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = |name: &str, key: &str, value: &str| {
        (after.get(name, key, value) - before.get(name, key, value)).max(0.0) / secs
    };
    let mut out = String::new();
    let mut line = |what: &str, text: String| out.push_str(&format!("{what:<12} {text}\n"));
    let state = if after.sum("turnpike_draining") > 0.0 {
        "DRAINING (refusing new allocations)"
    } else {
        "serving"
    };
    line(
        "relay",
        format!(
            "turnpike {} at {url}: {state}",
            after.label("turnpike_build_info", "version").unwrap_or("?")
        ),
    );
    line(
        "backend",
        after
            .label("turnpike_backend_info", "backend")
            .unwrap_or("?")
            .to_string(),
    );
    // Seconds since a Unix timestamp the relay exports (0 or absent: none).
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let since = |name: &str| {
        let at = after.sum(name);
        (at > 0.0).then(|| Duration::from_secs_f64((now - at).max(0.0)))
    };
    let started = since("turnpike_process_start_time_seconds");
    line(
        "uptime",
        started.map_or_else(|| "unknown (not exported)".into(), human),
    );
    // The configuration the relay runs: the last reload's, or the one it started with.
    let loaded = since("turnpike_last_reload_success_timestamp_seconds");
    let config_text = match config {
        None => "no configuration file given (--config)".into(),
        Some((p, Ok(age))) => {
            let applied = loaded.or(started);
            let reload = match loaded {
                Some(l) => format!("last reload {} ago", human(l)),
                None => "no reload since start".into(),
            };
            let stale = applied.is_some_and(|a| age < a);
            format!(
                "{} modified {} ago; {reload}{}",
                p.display(),
                human(age),
                if stale {
                    " (changed since: reload to apply)"
                } else {
                    ""
                }
            )
        }
        Some((p, Err(e))) => format!("{}: {e}", p.display()),
    };
    line("config", config_text);
    let failed = after.by("turnpike_allocations_failed_total", "code");
    line(
        "allocations",
        format!(
            "{} live, {} created, failed: {}",
            after.sum("turnpike_allocations"),
            after.sum("turnpike_allocations_created_total"),
            list(&failed)
        ),
    );
    line(
        "state",
        format!(
            "{} permissions, {} channels",
            after.sum("turnpike_permissions"),
            after.sum("turnpike_channels")
        ),
    );
    let dir = |d: &str| {
        format!(
            "{d} {} {}",
            si(
                rate("turnpike_relayed_packets_total", "direction", d),
                "pkt/s"
            ),
            si(
                8.0 * rate("turnpike_relayed_bytes_total", "direction", d),
                "bit/s"
            ),
        )
    };
    line(
        "relayed",
        format!("{}, {}", dir("to_peer"), dir("to_client")),
    );
    line(
        "auth",
        format!(
            "{} challenges, failures: {}",
            after.sum("turnpike_auth_challenges_total"),
            list(&after.by("turnpike_auth_failures_total", "kind"))
        ),
    );
    let drops = after.sum("turnpike_dropped_packets_total");
    let drops_now = (drops - before.sum("turnpike_dropped_packets_total")).max(0.0) / secs;
    line(
        "drops",
        format!(
            "data plane {drops} ({} now), by reason: {}; TURN core: {}",
            si(drops_now, "pkt/s"),
            list(&after.by("turnpike_dropped_packets_total", "reason")),
            list(&after.by("turnpike_server_dropped_total", "reason"))
        ),
    );
    let workers = after.by("turnpike_worker_received_packets_total", "worker");
    let mut ids: Vec<&String> = workers.keys().collect();
    ids.sort_by_key(|k| k.parse::<u32>().unwrap_or(u32::MAX));
    let shown = ids
        .iter()
        .take(MAX_WORKERS_SHOWN)
        .map(|w| {
            format!(
                "#{w} rx {} tx {}",
                si(
                    rate("turnpike_worker_received_packets_total", "worker", w),
                    "pkt/s"
                ),
                si(
                    rate("turnpike_worker_sent_packets_total", "worker", w),
                    "pkt/s"
                )
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let more = ids.len().saturating_sub(MAX_WORKERS_SHOWN);
    let more = if more > 0 {
        format!(", and {more} more")
    } else {
        String::new()
    };
    // Workers whose loop exited (the relay then drains and stops with an error).
    let exited: Vec<String> = after
        .by("turnpike_worker_ready", "worker")
        .into_iter()
        .filter(|(_, ready)| *ready == 0.0)
        .map(|(w, _)| format!("#{w}"))
        .collect();
    let exited = if exited.is_empty() {
        String::new()
    } else {
        format!("; NOT READY (exited): {}", exited.join(", "))
    };
    line("workers", format!("{}: {shown}{more}{exited}", ids.len()));
    out
}

/// `k v, k v` of the non-zero entries, or `none`.
fn list(m: &BTreeMap<String, f64>) -> String {
    let items: Vec<String> = m
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// A rate in `unit` with an SI prefix: `950 pkt/s`, `12.3 kpkt/s`, `4.56 Mbit/s`, `1.20 Gbit/s`.
fn si(x: f64, unit: &str) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} G{unit}", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M{unit}", x / 1e6),
        x if x >= 1e3 => format!("{:.1} k{unit}", x / 1e3),
        x => format!("{x:.0} {unit}"),
    }
}

/// `3d 4h`, `2h 5m`, `7m 3s`, `12s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ONE: &str = "# TYPE turnpike_relayed_packets counter\n\
        turnpike_relayed_packets_total{direction=\"to_peer\"} 100\n\
        turnpike_relayed_packets_total{direction=\"to_client\"} 50\n\
        turnpike_relayed_bytes_total{direction=\"to_peer\"} 1000\n\
        turnpike_worker_received_packets_total{worker=\"0\"} 10\n\
        turnpike_worker_received_packets_total{worker=\"1\"} 20\n\
        turnpike_dropped_packets_total{worker=\"0\",reason=\"malformed\"} 1\n\
        turnpike_build_info{version=\"9.9.9\"} 1\n\
        turnpike_backend_info{backend=\"epoll\"} 1\n\
        turnpike_allocations 3\n\
        turnpike_draining 0\n\
        # EOF\n";

    #[test]
    fn parses_names_labels_and_escaped_values() {
        let m = Metrics::parse(ONE);
        assert_eq!(
            m.get("turnpike_relayed_packets_total", "direction", "to_peer"),
            100.0
        );
        assert_eq!(m.sum("turnpike_worker_received_packets_total"), 30.0);
        assert_eq!(m.label("turnpike_build_info", "version"), Some("9.9.9"));
        let odd = parse_sample(r#"x{a="q\"uo,te",b="z"} 2.5 1700000000"#).unwrap();
        assert_eq!(odd.0, "x");
        assert_eq!(
            odd.1,
            vec![("a".into(), "q\"uo,te".into()), ("b".into(), "z".into())]
        );
        assert_eq!(odd.2, 2.5);
        for bad in ["x{a=1} 2", "x{a=\"1\" 2", "x", "x{a=\"1\"} notanumber"] {
            assert!(parse_sample(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn summary_shows_rates_between_the_two_scrapes() {
        let before = Metrics::parse(ONE);
        let after = Metrics::parse(
            &ONE.replace(
                "packets_total{direction=\"to_peer\"} 100",
                "packets_total{direction=\"to_peer\"} 2100",
            )
            .replace(
                "bytes_total{direction=\"to_peer\"} 1000",
                "bytes_total{direction=\"to_peer\"} 251000",
            )
            .replace("turnpike_draining 0", "turnpike_draining 1"),
        );
        let out = render(
            "http://x/metrics",
            &before,
            &after,
            Duration::from_secs(2),
            None,
        );
        assert!(out.contains("to_peer 1.0 kpkt/s 1.00 Mbit/s"), "{out}");
        assert!(out.contains("to_client 0 pkt/s 0 bit/s"), "{out}");
        assert!(out.contains("DRAINING"), "{out}");
        assert!(out.contains("backend      epoll"), "{out}");
        assert!(
            out.contains("workers      2: #0 rx 0 pkt/s tx 0 pkt/s, #1"),
            "{out}"
        );
        assert!(out.contains("by reason: malformed 1"), "{out}");
        assert!(out.contains("uptime       unknown"), "{out}");
        assert!(out.lines().count() <= 24, "one screen:\n{out}");
    }

    #[test]
    fn summary_shows_uptime_the_last_reload_and_workers_not_ready() {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let text = ONE.replace(
            "turnpike_draining 0\n",
            &format!(
                "turnpike_draining 0\nturnpike_process_start_time_seconds {}\n\
                 turnpike_last_reload_success_timestamp_seconds {}\n\
                 turnpike_worker_ready{{worker=\"0\"}} 1\nturnpike_worker_ready{{worker=\"1\"}} 0\n",
                now - 7200,
                now - 600
            ),
        );
        let m = Metrics::parse(&text);
        let file = Path::new("/etc/turnpike/turnpike.toml");
        // The file was written just now, after the last reload: it is not what the relay runs.
        let out = render(
            "u",
            &m,
            &m,
            Duration::from_secs(1),
            Some((file, Ok(Duration::ZERO))),
        );
        assert!(out.contains("uptime       2h 0m"), "{out}");
        assert!(
            out.contains("last reload 10m 0s ago (changed since: reload to apply)"),
            "{out}"
        );
        assert!(out.contains("NOT READY (exited): #1"), "{out}");
        // Older than the last reload: nothing to apply.
        let out = render(
            "u",
            &m,
            &m,
            Duration::from_secs(1),
            Some((file, Ok(Duration::from_secs(3600)))),
        );
        assert!(
            out.contains("modified 1h 0m ago; last reload 10m 0s ago\n"),
            "{out}"
        );
    }
}
