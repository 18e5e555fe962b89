//! The Grafana dashboard and the Prometheus alert rules (tuning/monitoring/, issue 15), checked
//! against a real Prometheus (Debian's `prometheus` package): `promtool check rules` passes; a
//! Prometheus started here (loopback, temp dir, 1 s scrapes) scrapes a running relay under a little
//! traffic; every metric a panel, a template variable or a rule uses exists in what it scraped;
//! every panel returns data through its query API, and every panel over a counter or gauge the
//! traffic moves returns a non-zero value; every rule evaluates without error. `turnpike status`
//! reads the same relay. The checker itself is tested on doctored panels.
//!
//! With CI=true a missing prometheus or promtool fails the test instead of skipping.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;
use turnpike::auth::RestSecrets;
use turnpike::wire::{Attribute, Class, Method};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DASHBOARD: &str = "tuning/monitoring/turnpike-dashboard.json";
const RULES: &str = "tuning/monitoring/turnpike-alerts.yml";
const SECRET: &str = "monitoring-test-secret";
const KEY_B64: &str = "dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5";
/// Relay ports of this test's relay.
const PORT_BASE: u16 = 33000;
/// Metrics the traffic below does not move (a serving relay is not draining; the TURN core's drops,
/// reloads, usage write failures and refused stream connections need events this test does not
/// make): their panels must return series, not non-zero values.
const NOT_MOVED: [&str; 5] = [
    "turnpike_draining",
    "turnpike_server_dropped_total",
    "turnpike_reloads_total",
    "turnpike_usage_write_failures_total",
    "turnpike_stream_refused_total",
];

fn root(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

// ---------------------------------------------------------------------------------------------
// The checker: which metrics a PromQL expression reads, and which of them a scrape lacks.

/// Every metric name `expr` selects: identifiers that are neither functions, keywords, label names
/// (in `{…}` and `by (…)`-style groupings) nor durations. Grafana variables (`$…`) are dropped.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // label_values(metric, label) in a template variable: only the metric.
    if let Some(inner) = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
    {
        return match inner.split_once(',') {
            Some((m, _)) => promql_metrics(m),
            None => BTreeSet::new(),
        };
    }
    const KEYWORDS: [&str; 12] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
    ];
    const GROUPINGS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    // Skip from an opening bracket to its match (strings inside are skipped whole).
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => {
                    let q = chars[i];
                    i += 1;
                    while i < chars.len() && chars[i] != q {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || "_{}".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            // `sum by (x) (…)`: an aggregation whose grouping comes before its argument.
            let next: String = chars[j..]
                .iter()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            let call = (j < chars.len() && chars[j] == '(')
                || (AGGREGATIONS.contains(&word.as_str()) && (next == "by" || next == "without"));
            if GROUPINGS.contains(&word.as_str()) {
                if call {
                    i = skip_group(j, '(', ')');
                }
            } else if !call && !KEYWORDS.contains(&word.to_lowercase().as_str()) && word != "nan" {
                out.insert(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// One query of the dashboard or the rules: where it is (panel title, `variable $x`, `rule X`) and its PromQL.
#[derive(Debug, Clone)]
struct Query {
    panel: String,
    expr: String,
}

/// Every query of the dashboard: panel targets (rows included) and template variables.
fn dashboard_queries(dashboard: &Value) -> Vec<Query> {
    fn panels(list: &Value, out: &mut Vec<Query>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(Query {
                        panel: title.clone(),
                        expr: expr.to_string(),
                    });
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            out.push(Query {
                panel: format!("variable ${}", v["name"].as_str().unwrap_or("?")),
                expr: q.unwrap_or_default().to_string(),
            });
        }
    }
    out
}

/// `(where, metric)` for every metric a query reads that `known` lacks.
fn missing(queries: &[Query], known: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for q in queries {
        for m in promql_metrics(&q.expr) {
            if !known.contains(&m) {
                out.push((q.panel.clone(), m));
            }
        }
    }
    out
}

/// A panel query as Prometheus runs it: Grafana's variables replaced (all relays, a 10 s window).
fn as_prometheus_query(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$__interval", "1s")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root(DASHBOARD)).unwrap()).unwrap()
}

/// Sample names of a Prometheus text scrape.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// What /metrics renders for a relay that has seen every kind of event (the same renderer the API
/// serves), plus `up`, which Prometheus adds to every scrape.
fn rendered_names() -> BTreeSet<String> {
    use turnpike::metrics::{
        render, HttpMetrics, ServerSnapshot, Snapshot, StreamSnapshot, WorkerSnapshot,
    };
    let http = HttpMetrics::new(&["token"]);
    http.record(0, 200, Duration::from_millis(1));
    let snap = Snapshot {
        backend: "epoll",
        streams: vec![StreamSnapshot {
            transport: "tcp",
            ..StreamSnapshot::default()
        }],
        http: Some(http.snapshot()),
        workers: vec![WorkerSnapshot {
            drops: vec![("not_turn", 1)],
            ..WorkerSnapshot::default()
        }],
        server: ServerSnapshot {
            allocation_errors: vec![(437, 1)],
            auth_failures: vec![("bad_credentials", 1)],
            drops: vec![("malformed", 1)],
            ..ServerSnapshot::default()
        },
        ..Snapshot::default()
    };
    let mut names = sample_names(&render(&snap));
    names.insert("up".into());
    names
}

#[test]
fn promql_metric_extraction() {
    let m = |e: &str| promql_metrics(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        m(
            r#"8 * sum by (direction) (rate(turnpike_relayed_bytes_total{instance=~"$instance", direction!="x}"}[$__rate_interval]))"#
        ),
        ["turnpike_relayed_bytes_total"]
    );
    assert_eq!(
        m("sum by (instance, reason) (rate(a_total[5m])) / on (instance) group_left sum by (instance) (rate(b_total[5m] offset 1h)) > 0.01"),
        ["a_total", "b_total"]
    );
    assert_eq!(
        m("x == 0 and on(instance) sum without (worker) (y) > bool 1e3 unless max(z)"),
        ["x", "y", "z"]
    );
    assert_eq!(
        m("histogram_quantile(0.99, sum by (le) (rate(api_seconds_bucket[5m])))"),
        ["api_seconds_bucket"]
    );
    assert_eq!(
        m("label_values(turnpike_build_info, instance)"),
        ["turnpike_build_info"]
    );
    assert_eq!(m(r#"up{job="turnpike"}"#), ["up"]);
}

#[test]
fn every_dashboard_metric_is_one_the_relay_renders() {
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 15, "{queries:?}");
    assert_eq!(
        missing(&queries, &rendered_names()),
        Vec::<(String, String)>::new()
    );
}

#[test]
fn checker_flags_a_panel_or_variable_whose_metric_does_not_exist() {
    let mut d = dashboard();
    // Doctor one real panel (inside the panel list as Grafana stores it) and the template variable.
    let panel = d["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["title"] == "Relayed bit/s by direction")
        .unwrap();
    panel["targets"][0]["expr"] =
        "sum by (direction) (rate(turnpike_relayed_bits_total{instance=~\"$instance\"}[$__rate_interval]))"
            .into();
    d["templating"]["list"][1]["query"]["query"] = "label_values(turnpike_info, instance)".into();
    let found = missing(&dashboard_queries(&d), &rendered_names());
    assert_eq!(
        found,
        [
            (
                "Relayed bit/s by direction".to_string(),
                "turnpike_relayed_bits_total".to_string()
            ),
            ("variable $instance".into(), "turnpike_info".into()),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Against a real Prometheus.

/// Whether `cmd --version` runs; with CI=true its absence fails the test.
fn tool(cmd: &str) -> bool {
    let ok = Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{cmd} is required in CI (scripts/test.sh installs Debian's prometheus)"
        );
        eprintln!("skipping: {cmd} missing (scripts/test.sh installs it)");
    }
    ok
}

fn free_tcp_port() -> u16 {
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Kills and reaps a child process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn get_json(url: &str) -> Value {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .into_json()
        .unwrap()
}

/// An instant query through Prometheus's API: the result vector.
fn query(prom: SocketAddr, expr: &str) -> Vec<Value> {
    let v: Value = ureq::get(&format!("http://{prom}/api/v1/query"))
        .query("query", expr)
        .call()
        .unwrap_or_else(|e| panic!("query {expr:?}: {e}"))
        .into_json()
        .unwrap();
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

/// A Binding request over a TCP connection, and its answer read (bounded by the read timeout).
fn stream_binding(conn: &mut TcpStream, c: &mut Client) {
    let (_, req) = c.build(Method::BINDING, Class::Request, &[], false);
    conn.write_all(&req).unwrap();
    let mut buf = [0u8; 512];
    let _ = conn.read(&mut buf);
}

/// A little of everything until `stop`: channel data both ways, and each round a new allocation
/// (a 401 challenge first), an Allocate on a taken 5-tuple (437), a wrong password (401
/// bad_credentials), a datagram that is not TURN (a data-plane drop), and Binding over TCP on a
/// connection that stays open and on a new one. Bounded to 60 s.
fn traffic(server: SocketAddr, tcp: SocketAddr, stop: &AtomicBool) {
    let mint = |id: &str| {
        RestSecrets::new(vec![SECRET.as_bytes().to_vec()])
            .mint(id, unix_now(), 3600)
            .unwrap()
    };
    let cred = mint("alice");
    let mut c = Client::new(server, &cred.username, &cred.password);
    let relayed = c.allocate();
    let p = peer();
    c.bind(0x4000, p.local_addr().unwrap());
    let payload = [0x5A; 200];
    let mut buf = [0u8; 2048];
    let connect = || {
        let conn = TcpStream::connect(tcp).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        conn
    };
    let mut kept = connect();
    let started = Instant::now();
    let mut round = 0u32;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
        for _ in 0..20 {
            c.send_channel(0x4000, &payload);
            let _ = p.recv_from(&mut buf);
            p.send_to(&payload, relayed).unwrap();
            let _ = c.sock.recv_from(&mut buf);
            std::thread::sleep(Duration::from_millis(10));
        }
        round += 1;
        let cred = mint(&format!("churn-{round}"));
        let mut churn = Client::new(server, &cred.username, &cred.password);
        let created = churn.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        if let Some(code) = Client::error_code(&created) {
            // Not fatal (the panels' checks say whether the counters moved), but worth knowing.
            eprintln!("churn allocation {round} refused with {code}");
        }
        let again = c.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        assert_eq!(Client::error_code(&again), Some(437));
        let mut wrong = Client::new(server, &cred.username, "not-the-password");
        let refused = wrong.authed(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        assert_eq!(Client::error_code(&refused), Some(401));
        c.sock.send_to(&[0xFF; 8], server).unwrap();
        stream_binding(&mut kept, &mut c);
        stream_binding(&mut connect(), &mut c);
    }
}

#[test]
fn dashboard_and_rules_against_prometheus_scraping_a_relay_under_traffic() {
    if !tool("prometheus") || !tool("promtool") {
        return;
    }
    let check = Command::new("promtool")
        .args(["check", "rules", root(RULES).to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let dir = std::env::temp_dir().join(format!("turnpike-monitoring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (listen, api, tcp) = (free_udp_port(), free_tcp_port(), free_tcp_port());
    let config = dir.join("turnpike.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:{listen}\"]\nlisten_tcp = [\"127.0.0.1:{tcp}\"]\n\
             workers = 2\npin_workers = false\ndrain_seconds = 0\n\
             [relay]\naddresses = [\"127.0.0.1\"]\nport_min = {PORT_BASE}\nport_max = {}\n\
             [rest]\nsecrets = [\"{SECRET}\"]\n[peers]\nallow = [\"127.0.0.0/8\"]\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\naccess_keys = [\"{KEY_B64}\"]\n\
             revocations_database = \"{}\"\n",
            PORT_BASE + 999,
            dir.join("revocations.db").display()
        ),
    )
    .unwrap();
    let _relay = Proc(
        Command::new(env!("CARGO_BIN_EXE_turnpike"))
            .args(["--config", config.to_str().unwrap(), "--log-level", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the relay's API", Duration::from_secs(10), || {
        ureq::get(&format!("http://127.0.0.1:{api}/healthz"))
            .call()
            .is_ok()
    });

    let prom = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let prom_config = dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: turnpike\n    static_configs:\n      - targets: [\"127.0.0.1:{api}\"]\n",
            rules = root(RULES).display()
        ),
    )
    .unwrap();
    let _prometheus = Proc(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("Prometheus to be ready", Duration::from_secs(30), || {
        ureq::get(&format!("http://{prom}/-/ready")).call().is_ok()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let server = SocketAddr::from(([127, 0, 0, 1], listen));
    let stream = SocketAddr::from(([127, 0, 0, 1], tcp));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || traffic(server, stream, &stop))
    };

    // `turnpike status` reads the same relay while the traffic runs.
    std::thread::sleep(Duration::from_secs(2));
    let status = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.status.success(),
        "{screen}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for expected in [
        format!("http://127.0.0.1:{api}/metrics: serving"),
        "workers      2: #0".to_string(),
        "failed: 437".to_string(),
    ] {
        assert!(screen.contains(&expected), "{expected:?} in\n{screen}");
    }
    let live: u64 = screen
        .lines()
        .find_map(|l| l.strip_prefix("allocations  "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("allocations line in\n{screen}"));
    assert!(live >= 1, "{screen}");
    assert!(
        !screen.contains("to_peer 0 pkt/s"),
        "relayed packets per second under traffic:\n{screen}"
    );
    assert!(
        !screen.contains("uptime       unknown") && screen.contains("no reload since start"),
        "the relay exports its start and reload times:\n{screen}"
    );

    // Enough scrapes for the rate windows, with the traffic in them.
    wait_for("12 scrapes in Prometheus", Duration::from_secs(40), || {
        query(prom, "count_over_time(turnpike_allocations[1m])")
            .first()
            .is_some_and(|s| value(s) >= 12.0)
    });

    let names: BTreeSet<String> = get_json(&format!("http://{prom}/api/v1/label/__name__/values"))
        ["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let queries = dashboard_queries(&dashboard());
    assert_eq!(
        missing(&queries, &names),
        Vec::<(String, String)>::new(),
        "dashboard"
    );

    // Each panel returns data; panels over what the traffic moves return a non-zero value.
    for q in queries.iter().filter(|q| !q.panel.starts_with("variable ")) {
        let expr = as_prometheus_query(&q.expr);
        let result = query(prom, &expr);
        assert!(
            !result.is_empty(),
            "panel {:?}: no data for {expr}",
            q.panel
        );
        let moved = promql_metrics(&q.expr)
            .iter()
            .any(|m| !NOT_MOVED.contains(&m.as_str()));
        if moved {
            assert!(
                result.iter().any(|s| value(s) > 0.0),
                "panel {:?}: only zeros for {expr}: {result:?}",
                q.panel
            );
        }
    }
    // The template variable's values: the relay's instance.
    let series = get_json(&format!(
        "http://{prom}/api/v1/series?match[]=turnpike_build_info"
    ));
    assert_eq!(series["data"][0]["instance"], format!("127.0.0.1:{api}"));

    // Every rule: its metrics exist, and it has been evaluated without error.
    wait_for("the rules to be evaluated", Duration::from_secs(20), || {
        let groups = get_json(&format!("http://{prom}/api/v1/rules"));
        groups["data"]["groups"][0]["rules"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["health"] == "ok"))
    });
    let groups = get_json(&format!("http://{prom}/api/v1/rules"));
    let rules: Vec<Query> = groups["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| Query {
            panel: format!("rule {}", r["name"].as_str().unwrap()),
            expr: r["query"].as_str().unwrap().to_string(),
        })
        .collect();
    assert_eq!(rules.len(), 12, "{rules:?}");
    assert_eq!(
        missing(&rules, &names),
        Vec::<(String, String)>::new(),
        "rules"
    );

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
