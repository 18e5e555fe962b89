//! `turnpike-bench`: a load generator for TURN servers (turnpike, coturn, anything RFC 8656), and the bare
//! forwarder that serves as the physical-limit yardstick.
//!
//! Scenarios:
//! - `relay` (default): N clients allocate, bind channel 0x4000 to the generator's own UDP echo peer, and
//!   send ChannelData of `--size` bytes at an open-loop, paced `--rate`; the echo reflects every payload.
//!   Reports delivered packets/s and Mbit/s, loss, reordering and round-trip percentiles. `--sweep` steps
//!   the rate up and reports the highest with less than `--max-loss` loss. `--bare` sends raw datagrams to
//!   a bare forwarder instead (no TURN).
//! - `alloc`: every client loops Allocate (401 round, then authenticated) and delete (Refresh LIFETIME 0).
//! - `binding`: STUN Binding requests in windows of `--window` per socket.
//! - `hold`: `--clients` clients allocate and bind channel 0x4000 to the generator's echo peer (one
//!   permission and one channel each, `--window` at a time), then hold them while the server's RSS
//!   (`--server-pid`) is read before and after: bytes of resident memory per allocation, sockets included
//!   (`scripts/memory.sh`).
//! - `spoof`, `storm`, `streams`: hostile load for `scripts/reliability.sh` (see `abuse`): an
//!   unauthenticated flood from `--sources` loopback addresses, an authenticated Refresh /
//!   CreatePermission / ChannelBind storm from `--clients` clients, and `--tcp-conns` / `--tls-conns`
//!   trickling or stalled connections with a TCP allocation probe once a second.
//!
//! `--bare-forwarder` runs the forwarder instead of the generator. All timing is bounded by `--duration`
//! (and `--count` where it applies). Only point it at servers you run, on loopback or a test namespace.

mod abuse;
mod forwarder;
mod pace;
mod proc;
mod refresh;
mod relay;
mod turn;

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use pace::Sweep;
use proc::ProcSample;
use refresh::Keeper;
use relay::{StepResult, Traffic};
use turn::{Auth, Plan, CHANNEL};
use turnpike::sys::{bind_udp, UdpOptions};

/// Load generator for TURN servers, and the bare forwarder yardstick.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The server (TURN listener, or the bare forwarder with --bare).
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Relay)]
    scenario: Scenario,
    /// Static long-term user.
    #[arg(long, default_value = "bench")]
    user: String,
    /// Its password.
    #[arg(long, default_value = "bench-pass")]
    password: String,
    /// Use TURN REST credentials minted from this shared secret instead of --user (one user id per client).
    #[arg(long)]
    rest_secret: Option<String>,
    /// Clients (flows for relay, concurrent clients for alloc, sockets for binding).
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Payload bytes per packet (at least 20: the probe).
    #[arg(long, default_value_t = 160)]
    size: usize,
    /// Offered rate, packets/s from clients to the server, all flows together (the sweep's start).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Seconds of measurement (per step with --sweep).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Stop after this many packets (relay) or allocations (alloc).
    #[arg(long)]
    count: Option<u64>,
    /// Packets each flow sends back to back in one sendmmsg (fewer syscalls for the generator, burstier
    /// traffic for the server); 1 spreads packets evenly.
    #[arg(long, default_value_t = 1)]
    burst: usize,
    /// Sleep this many µs when the traffic loop, a full-speed alloc churn or the Binding loop finds
    /// nothing to do (0: spin). Use it when the generator runs SCHED_FIFO (scripts with RT=1), where
    /// spinning triggers RT throttling.
    #[arg(long, default_value_t = 0)]
    idle_sleep_us: u64,
    /// Step the rate up from --rate by --sweep-factor until loss reaches --max-loss, then bisect.
    #[arg(long)]
    sweep: bool,
    /// Rate multiplier between sweep steps.
    #[arg(long, default_value_t = 1.25)]
    sweep_factor: f64,
    /// Highest rate a sweep tries.
    #[arg(long, default_value_t = 2_000_000.0)]
    sweep_max: f64,
    /// Bisection steps after the first failing rate.
    #[arg(long, default_value_t = 3)]
    bisect: u32,
    /// How often a failing sweep step is repeated before it counts as failed.
    #[arg(long, default_value_t = 1)]
    retries: u32,
    /// Loss at or above which a sweep step fails (fraction).
    #[arg(long, default_value_t = 0.001)]
    max_loss: f64,
    /// The target is a bare forwarder: send raw datagrams, no TURN.
    #[arg(long)]
    bare: bool,
    /// Bind address of the built-in echo peer (a bare forwarder must be told this address as --peer).
    #[arg(long, default_value = "127.0.0.1:0")]
    echo: SocketAddr,
    /// Server pid: CPU seconds and RSS are read from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Before the traffic, open this many extra allocations (no channel) and hold them; reports the
    /// server's RSS growth per allocation.
    #[arg(long, default_value_t = 0)]
    idle_allocations: usize,
    /// Transactions in flight during set-up; Binding requests in flight per socket.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Socket buffer size of the generator's sockets, bytes.
    #[arg(long, default_value_t = 4 << 20)]
    buffers: usize,
    /// Print JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// A label carried into the output (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
    /// Run the bare forwarder: listen on --listen, relay to --peer.
    #[arg(long)]
    bare_forwarder: bool,
    /// Forwarder listen address.
    #[arg(long, default_value = "127.0.0.1:3479")]
    listen: SocketAddr,
    /// Forwarder peer address (the generator's --echo).
    #[arg(long, default_value = "127.0.0.1:40000")]
    peer: SocketAddr,
    /// relay: report a step every this many seconds over --duration (a soak's figures over time);
    /// alloc: count deletes per interval of this length (`deletes_per_interval`).
    #[arg(long)]
    interval: Option<f64>,
    /// relay: each flow sends ChannelBind again every this many seconds (refreshing its permission,
    /// 300 s, and its channel), and Refresh at half the allocation LIFETIME the server granted, as a
    /// real client does; 0: never refresh (the flows then stop at the permission's lifetime).
    #[arg(long, default_value_t = 60.0)]
    refresh_interval: f64,
    /// alloc: start at most this many allocate+delete cycles per second, all clients together (default:
    /// as fast as the clients go).
    #[arg(long)]
    churn_rate: Option<f64>,
    /// spoof: distinct source addresses in 127.16.0.0 and up.
    #[arg(long, default_value_t = 65_536)]
    sources: usize,
    /// streams: the relay's TURN-over-TCP listener.
    #[arg(long)]
    tcp_server: Option<SocketAddr>,
    /// streams: the relay's TURN-over-TLS listener.
    #[arg(long)]
    tls_server: Option<SocketAddr>,
    /// streams: abusive TCP connections.
    #[arg(long, default_value_t = 5_000)]
    tcp_conns: usize,
    /// streams: abusive TLS connections.
    #[arg(long, default_value_t = 1_000)]
    tls_conns: usize,
    /// streams: connections per source address (keep it under the relay's per-IP cap).
    #[arg(long, default_value_t = 50)]
    per_source: usize,
    /// streams: milliseconds between the bytes a trickling connection sends.
    #[arg(long, default_value_t = 1_000)]
    trickle_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Relay,
    Alloc,
    Binding,
    Hold,
    Spoof,
    Storm,
    Streams,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = if cli.bare_forwarder {
        let d = (cli.duration > 0.0).then(|| Duration::from_secs_f64(cli.duration));
        forwarder::run(cli.listen, cli.peer, cli.buffers, d).map(|c| {
            eprintln!(
                "bare forwarder: {} to peer, {} to clients, {} Binding answers, {} allocations, {} deletes, \
                 {} send failures",
                c.to_peer, c.to_client, c.bindings, c.allocations, c.deletes, c.send_failed
            );
        })
    } else {
        let wall = Instant::now();
        let out = match cli.scenario {
            Scenario::Relay => relay_scenario(&cli),
            Scenario::Alloc => alloc_scenario(&cli),
            Scenario::Binding => binding_scenario(&cli),
            Scenario::Hold => hold_scenario(&cli),
            Scenario::Spoof => spoof_scenario(&cli),
            Scenario::Storm => storm_scenario(&cli),
            Scenario::Streams => streams_scenario(&cli),
        };
        out.map(|mut v| {
            // The generator's own CPU over its run: on a shared machine it says whether the generator
            // itself was starved (CPU seconds well below the wall time of a spinning generator).
            if let Some(me) = ProcSample::read(std::process::id()) {
                v["generator_cpu_s"] = json!(me.cpu_seconds);
                v["generator_wall_s"] = json!(wall.elapsed().as_secs_f64());
            }
            if cli.json {
                println!("{v:#}");
            } else {
                print_table(&v);
            }
        })
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn auth(cli: &Cli) -> Auth {
    match &cli.rest_secret {
        Some(s) => Auth::Rest(s.clone()),
        None => Auth::Static(cli.user.clone(), cli.password.clone()),
    }
}

fn relay_scenario(cli: &Cli) -> io::Result<Value> {
    if cli.clients == 0 || cli.clients > usize::from(u16::MAX) {
        return Err(io::Error::other("--clients must be 1 to 65535"));
    }
    let echo = bind_udp(
        cli.echo,
        UdpOptions {
            recv_buffer: Some(cli.buffers),
            send_buffer: Some(cli.buffers),
            ..UdpOptions::default()
        },
    )?;
    let peer = echo.local_addr()?;
    let mut out = json!({
        "scenario": "relay", "label": cli.label, "server": cli.server.to_string(), "bare": cli.bare,
        "clients": cli.clients, "size": cli.size, "burst": cli.burst,
    });
    let mut poll = mio::Poll::new()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Idle allocations first, so the measured flows see a server holding them.
    let mut _idle = Vec::new();
    if cli.idle_allocations > 0 && !cli.bare {
        let before = cli.server_pid.and_then(ProcSample::read);
        let mut idle = turn::open_clients(
            cli.idle_allocations,
            cli.server,
            &auth(cli),
            &poll,
            1 << 24,
            None,
        )?;
        let st = turn::drive(
            &mut idle,
            &mut poll,
            1 << 24,
            cli.server,
            Plan::Setup {
                peer: None,
                window: cli.window,
            },
            deadline,
        )?;
        let ok = idle.iter().filter(|c| c.is_ready()).count();
        std::thread::sleep(Duration::from_millis(500));
        let after = cli.server_pid.and_then(ProcSample::read);
        if !cli.quiet {
            eprintln!(
                "idle allocations: {ok}/{} in {:.2}s ({:.0}/s)",
                cli.idle_allocations,
                st.seconds,
                ok as f64 / st.seconds
            );
        }
        out["idle"] = json!({
            "requested": cli.idle_allocations, "allocated": ok, "seconds": st.seconds,
            "errors": st.errors, "timeouts": st.timeouts,
            "rss_before_kib": before.map(|s| s.rss_kib), "rss_after_kib": after.map(|s| s.rss_kib),
            "bytes_per_allocation": match (before, after) {
                (Some(b), Some(a)) if ok > 0 => Some((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / ok as f64),
                _ => None,
            },
        });
        _idle = idle;
    }
    let mut keepers = Vec::new();
    let clients = if cli.bare {
        let mut v = Vec::new();
        for _ in 0..cli.clients {
            v.push(bind_udp(
                SocketAddr::new(cli.server.ip(), 0),
                UdpOptions {
                    recv_buffer: Some(cli.buffers),
                    send_buffer: Some(cli.buffers),
                    ..UdpOptions::default()
                },
            )?);
        }
        v
    } else {
        let mut cs = turn::open_clients(
            cli.clients,
            cli.server,
            &auth(cli),
            &poll,
            0,
            Some(cli.buffers),
        )?;
        let st = turn::drive(
            &mut cs,
            &mut poll,
            0,
            cli.server,
            Plan::Setup {
                peer: Some(peer),
                window: cli.window,
            },
            deadline,
        )?;
        let ready = cs.iter().filter(|c| c.is_ready()).count();
        if ready < cs.len() {
            return Err(io::Error::other(format!(
                "only {ready} of {} clients allocated and bound a channel ({} errors {:?}, {} timeouts): \
                 check the credentials, the server's peer policy (loopback peers must be allowed) and its \
                 quotas",
                cs.len(),
                st.errors,
                st.codes,
                st.timeouts
            )));
        }
        // Deregister from the set-up poll; Traffic has its own.
        for c in &cs {
            use std::os::fd::AsRawFd;
            let _ = poll
                .registry()
                .deregister(&mut mio::unix::SourceFd(&c.sock.as_raw_fd()));
        }
        let every = (cli.refresh_interval.max(0.0) * 1e9) as u64;
        keepers = cs
            .iter()
            .enumerate()
            .map(|(i, c)| Keeper::new(c, peer, every, i as u64))
            .collect();
        cs.into_iter().map(|c| c.sock).collect()
    };
    let channel = (!cli.bare).then_some(CHANNEL);
    let mut traffic = Traffic::new(clients, cli.server, echo, channel, cli.size, cli.server_pid)?;
    traffic.progress = !cli.quiet;
    traffic.burst = cli.burst.clamp(1, 64);
    traffic.idle_sleep = Duration::from_micros(cli.idle_sleep_us);
    traffic.keep_alive(keepers);
    let drain = Duration::from_millis(300);
    // Warm-up: caches, route tables, socket buffers.
    traffic.step(cli.rate.min(10_000.0), Duration::from_millis(300), drain)?;
    let mut steps = Vec::new();
    if cli.sweep {
        let mut sweep = Sweep::new(cli.rate, cli.sweep_factor, cli.sweep_max, cli.bisect);
        while let Some(rate) = sweep.next_rate() {
            let mut r = traffic.step(rate, Duration::from_secs_f64(cli.duration), drain)?;
            let mut pass = r.passes(cli.max_loss);
            // One transient stall (another process, a page fault storm) must not end the sweep: a failing
            // step is run again, and fails only if it fails twice.
            let mut retries = cli.retries;
            while !pass && retries > 0 && r.sent as f64 > 0.97 * rate * r.seconds {
                retries -= 1;
                if !cli.quiet {
                    eprintln!(
                        "step {rate:>9.0}/s: loss {:.4}%, trying again",
                        100.0 * r.loss()
                    );
                }
                steps.push(r);
                r = traffic.step(rate, Duration::from_secs_f64(cli.duration), drain)?;
                pass = r.passes(cli.max_loss);
            }
            if !cli.quiet {
                eprintln!(
                    "step {rate:>9.0}/s: delivered {:>9.0}/s loss {:.4}% {}",
                    r.delivered_pps(),
                    100.0 * r.loss(),
                    if pass { "pass" } else { "FAIL" }
                );
            }
            let generator_limited = r.sent as f64 <= 0.97 * rate * r.seconds;
            sweep.record(rate, pass);
            steps.push(r);
            if generator_limited {
                out["generator_limited"] = json!(true);
                break;
            }
        }
        let mut best = sweep.best().and_then(|b| {
            steps
                .iter()
                .rev()
                .find(|s| s.offered == b && s.passes(cli.max_loss))
        });
        // A last step the generator could not fully offer, but which the server delivered without loss,
        // shows the server does at least that much: report it, marked as a lower bound. The best is a
        // lower bound too when the sweep ended at the generator's limit without the server ever losing
        // more than allowed: the server's own limit was never reached.
        if let Some(last) = steps.last() {
            let limited = out.get("generator_limited").is_some();
            if limited && last.loss() < cli.max_loss {
                if best.map_or(true, |b| last.delivered_pps() > b.delivered_pps()) {
                    best = Some(last);
                }
                if steps.iter().all(|s| s.passes(cli.max_loss))
                    || best.is_some_and(|b| std::ptr::eq(b, last))
                {
                    out["best_is_lower_bound"] = json!(true);
                }
            }
        }
        out["best"] = best.map_or(Value::Null, |s| step_json(s, cli));
        out["best_pps"] = json!(best.map(StepResult::delivered_pps));
    } else {
        let mut d = Duration::from_secs_f64(cli.duration);
        if let Some(n) = cli.count {
            d = d.min(Duration::from_secs_f64(n as f64 / cli.rate.max(1.0)));
        }
        match cli.interval.filter(|&i| i > 0.0) {
            // Consecutive steps (each with its short drain) until the duration is spent.
            Some(i) => {
                let end = Instant::now() + d;
                let step = Duration::from_secs_f64(i);
                while let Some(left) = end.checked_duration_since(Instant::now()) {
                    if left.is_zero() {
                        break;
                    }
                    steps.push(traffic.step(cli.rate, step.min(left), drain)?);
                }
            }
            None => steps.push(traffic.step(cli.rate, d, drain)?),
        }
    }
    out["steps"] = steps.iter().map(|s| step_json(s, cli)).collect();
    let r = &traffic.refresh;
    out["refresh"] = json!({
        "interval_s": cli.refresh_interval, "channel_binds": r.channel_binds, "refreshes": r.refreshes,
        "stale_nonce": r.stale_nonce, "retransmits": r.retransmits, "timeouts": r.timeouts,
        "refresh_errors": r.errors,
        "error_codes": r.codes.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    Ok(out)
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    json!({
        "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "p999": us(0.999), "max": h.max() as f64 / 1e3,
        "samples": h.len(),
    })
}

fn step_json(s: &StepResult, cli: &Cli) -> Value {
    let wire = if cli.bare { cli.size } else { cli.size + 4 };
    json!({
        "offered_pps": s.offered, "seconds": s.seconds, "sent": s.sent, "send_failed": s.send_failed,
        "received": s.received, "loss": s.loss(), "reordered": s.reordered, "late": s.late,
        "echo_failed": s.echo_failed,
        "delivered_pps": s.delivered_pps(),
        "delivered_mbps": s.delivered_pps() * (wire * 8) as f64 / 1e6,
        "rtt_us": percentiles(&s.rtt),
        "server_cpu_s": s.server_cpu,
        "cpu_us_per_packet": s.cpu_us_per_packet(),
    })
}

fn alloc_scenario(cli: &Cli) -> io::Result<Value> {
    let mut poll = mio::Poll::new()?;
    let mut cs = turn::open_clients(cli.clients, cli.server, &auth(cli), &poll, 0, None)?;
    let cpu0 = cli.server_pid.and_then(ProcSample::read);
    let st = turn::drive(
        &mut cs,
        &mut poll,
        0,
        cli.server,
        Plan::Churn {
            max: cli.count.unwrap_or(u64::MAX),
            rate: cli.churn_rate.filter(|&r| r > 0.0),
            interval: cli
                .interval
                .filter(|&i| i > 0.0)
                .map(Duration::from_secs_f64),
            idle_sleep: Duration::from_micros(cli.idle_sleep_us),
        },
        Instant::now() + Duration::from_secs_f64(cli.duration),
    )?;
    let cpu1 = cli.server_pid.and_then(ProcSample::read);
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.cpu_seconds - a.cpu_seconds),
        _ => None,
    };
    Ok(json!({
        "scenario": "alloc", "label": cli.label, "server": cli.server.to_string(), "clients": cli.clients,
        "churn_rate": cli.churn_rate,
        "seconds": st.seconds, "offered_seconds": st.offered_seconds,
        "allocations": st.allocations, "deletes": st.deletes,
        "allocations_per_s": st.allocations as f64 / st.offered_seconds.max(1e-9),
        "interval_s": cli.interval, "deletes_per_interval": st.deletes_per_interval,
        "errors": st.errors, "timeouts": st.timeouts, "retransmits": st.retransmits, "left": st.left,
        "error_codes": st.codes.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "server_cpu_s": cpu,
    }))
}

fn hold_scenario(cli: &Cli) -> io::Result<Value> {
    let echo = bind_udp(cli.echo, UdpOptions::default())?;
    let peer = echo.local_addr()?;
    let mut poll = mio::Poll::new()?;
    let mut cs = turn::open_clients(cli.clients, cli.server, &auth(cli), &poll, 0, None)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = cli.server_pid.and_then(ProcSample::read);
    let st = turn::drive(
        &mut cs,
        &mut poll,
        0,
        cli.server,
        Plan::Setup {
            peer: Some(peer),
            window: cli.window,
        },
        Instant::now() + Duration::from_secs_f64(cli.duration.max(1.0)),
    )?;
    let ok = cs.iter().filter(|c| c.is_ready()).count();
    // Let the workers apply the last route updates before reading.
    std::thread::sleep(Duration::from_millis(500));
    let after = cli.server_pid.and_then(ProcSample::read);
    drop(echo);
    Ok(json!({
        "scenario": "hold", "label": cli.label, "server": cli.server.to_string(),
        "requested": cli.clients, "allocated": ok, "seconds": st.seconds,
        "errors": st.errors, "timeouts": st.timeouts,
        "rss_before_kib": before.map(|s| s.rss_kib), "rss_after_kib": after.map(|s| s.rss_kib),
        "bytes_per_allocation": match (before, after) {
            (Some(b), Some(a)) if ok > 0 => Some((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / ok as f64),
            _ => None,
        },
    }))
}

fn binding_scenario(cli: &Cli) -> io::Result<Value> {
    let cpu0 = cli.server_pid.and_then(ProcSample::read);
    let st = turn::binding(
        cli.server,
        cli.clients,
        cli.window,
        Duration::from_secs_f64(cli.duration),
        Duration::from_micros(cli.idle_sleep_us),
    )?;
    let cpu1 = cli.server_pid.and_then(ProcSample::read);
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.cpu_seconds - a.cpu_seconds),
        _ => None,
    };
    Ok(json!({
        "scenario": "binding", "label": cli.label, "server": cli.server.to_string(),
        "clients": cli.clients, "window": cli.window.min(64),
        "seconds": st.seconds, "sent": st.sent, "responses": st.responses,
        "bindings_per_s": st.responses as f64 / st.seconds.max(1e-9),
        "rtt_us": percentiles(&st.rtt),
        "server_cpu_s": cpu,
        "cpu_us_per_request": cpu.filter(|_| st.responses > 0).map(|c| c * 1e6 / st.responses as f64),
    }))
}

fn spoof_scenario(cli: &Cli) -> io::Result<Value> {
    let st = abuse::spoof(
        cli.server,
        cli.sources,
        Duration::from_secs_f64(cli.duration),
    )?;
    Ok(json!({
        "scenario": "spoof", "label": cli.label, "server": cli.server.to_string(),
        "sources": st.sources, "rounds": st.rounds, "seconds": st.seconds,
        "requests": st.requests, "request_bytes": st.request_bytes,
        "answers": st.answers, "answer_bytes": st.answer_bytes,
        "challenges": st.challenges, "bindings": st.bindings,
        "amplification": st.answer_bytes as f64 / (st.request_bytes.max(1)) as f64,
        "max_answer_ratio": st.max_answer_ratio,
        "max_answers_per_source": st.max_answers_per_source,
        "requests_per_s": st.requests as f64 / st.seconds.max(1e-9),
    }))
}

fn storm_scenario(cli: &Cli) -> io::Result<Value> {
    // The storm's permissions and channels point at a socket nobody reads: only the control plane is
    // loaded.
    let sink = bind_udp(cli.echo, UdpOptions::default())?;
    let st = abuse::storm(
        cli.server,
        &auth(cli),
        cli.clients,
        sink.local_addr()?,
        Duration::from_secs_f64(cli.duration),
    )?;
    Ok(json!({
        "scenario": "storm", "label": cli.label, "server": cli.server.to_string(),
        "clients": st.clients, "seconds": st.seconds, "sent": st.sent, "ok": st.ok, "stale": st.stale,
        "requests_per_s": st.sent as f64 / st.seconds.max(1e-9),
        "answered_per_s": st.ok as f64 / st.seconds.max(1e-9),
        "error_codes": st.codes.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    }))
}

fn streams_scenario(cli: &Cli) -> io::Result<Value> {
    if cli.tcp_server.is_none() && cli.tls_server.is_none() {
        return Err(io::Error::other(
            "streams needs --tcp-server and/or --tls-server",
        ));
    }
    let st = abuse::streams(
        abuse::StreamAbuse {
            tcp: cli.tcp_server.map(|a| (a, cli.tcp_conns)),
            tls: cli.tls_server.map(|a| (a, cli.tls_conns)),
            per_source: cli.per_source,
            trickle: Duration::from_millis(cli.trickle_ms.max(1)),
            duration: Duration::from_secs_f64(cli.duration),
            probe_timeout: Duration::from_secs(1),
        },
        &auth(cli),
    )?;
    let kinds = |a: [u64; 2]| json!({"tcp": a[0], "tls": a[1]});
    Ok(json!({
        "scenario": "streams", "label": cli.label, "server": cli.server.to_string(),
        "seconds": st.seconds, "opened": kinds(st.opened), "connect_failed": kinds(st.connect_failed),
        "closed_by_server": kinds(st.closed_by_server), "held_at_end": kinds(st.held_at_end),
        "probes": st.probes, "probe_ok": st.probe_ok, "probe_max_ms": st.probe_max_ms,
        "probe_failures": st.probe_failures,
    }))
}

fn print_table(v: &Value) {
    let f = |v: &Value| match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if x.fract() == 0.0 || x.abs() >= 100.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.3}")
            }
        }
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!(
        "{} {} {}",
        v["scenario"].as_str().unwrap_or(""),
        v["server"].as_str().unwrap_or(""),
        v["label"].as_str().unwrap_or("")
    );
    match v["scenario"].as_str() {
        Some("relay") => {
            if let Some(idle) = v.get("idle") {
                println!(
                    "idle allocations {} in {}s, RSS {} → {} KiB, {} B/allocation",
                    f(&idle["allocated"]),
                    f(&idle["seconds"]),
                    f(&idle["rss_before_kib"]),
                    f(&idle["rss_after_kib"]),
                    f(&idle["bytes_per_allocation"])
                );
            }
            println!(
                "{:>10} {:>10} {:>10} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
                "offered/s",
                "deliv/s",
                "Mbit/s",
                "loss%",
                "reord",
                "p50µs",
                "p90µs",
                "p99µs",
                "p99.9µs",
                "maxµs",
                "cpuµs/pkt"
            );
            for s in v["steps"].as_array().into_iter().flatten() {
                let r = &s["rtt_us"];
                println!(
                    "{:>10} {:>10} {:>10} {:>8.4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
                    f(&s["offered_pps"]),
                    f(&s["delivered_pps"]),
                    f(&s["delivered_mbps"]),
                    100.0 * s["loss"].as_f64().unwrap_or(0.0),
                    f(&s["reordered"]),
                    f(&r["p50"]),
                    f(&r["p90"]),
                    f(&r["p99"]),
                    f(&r["p999"]),
                    f(&r["max"]),
                    f(&s["cpu_us_per_packet"])
                );
            }
            if v.get("best_pps").is_some() {
                println!(
                    "highest delivered rate with loss < 0.1%: {} pkt/s{}",
                    f(&v["best_pps"]),
                    if v.get("best_is_lower_bound").is_some() {
                        " or more (the generator could not offer more, and the server lost nothing)"
                    } else if v.get("generator_limited").is_some() {
                        " (generator-limited: the generator could not offer more)"
                    } else {
                        ""
                    }
                );
            }
        }
        Some("alloc") => println!(
            "{} allocations in {}s: {} allocations/s (401 round + Allocate + delete); {} errors {}, {} timeouts, \
             server CPU {} s",
            f(&v["allocations"]),
            f(&v["seconds"]),
            f(&v["allocations_per_s"]),
            f(&v["errors"]),
            v["error_codes"],
            f(&v["timeouts"]),
            f(&v["server_cpu_s"])
        ),
        Some("binding") => {
            let r = &v["rtt_us"];
            println!(
                "{} Binding responses in {}s: {} /s; rtt p50 {} p99 {} max {} µs; server CPU {} µs/request",
                f(&v["responses"]),
                f(&v["seconds"]),
                f(&v["bindings_per_s"]),
                f(&r["p50"]),
                f(&r["p99"]),
                f(&r["max"]),
                f(&v["cpu_us_per_request"])
            );
        }
        _ => println!("{v:#}"),
    }
}
