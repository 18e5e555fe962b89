//! The `turnpike` command: runs the relay, checks configurations, mints credentials, and summarises a
//! running relay (`turnpike status`).
//!
//! Under systemd (`Type=notify`, scripts/deb/turnpike.service) it reports READY=1 once the relay's
//! sockets are bound, STOPPING=1 when a SIGTERM/SIGINT starts the drain, and RELOADING=1 … READY=1
//! around a SIGHUP reload; without `NOTIFY_SOCKET` these are no-ops.

mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use sd_notify::NotifyState;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use turnpike::auth::{long_term_key_md5, RestSecrets};
use turnpike::config::{
    parse_log_level, Backend, RelayConfig, DEFAULT_CONFIG, LOG_LEVELS, MAX_WORKERS,
};
use turnpike::dataplane::ToControl;
use turnpike::service::{load_tls, API_TLS_KEYS, TLS_KEYS};
use turnpike::sys::file as open_files;

/// Changes the log level of the running process.
type LogLevel = tracing_subscriber::reload::Handle<LevelFilter, tracing_subscriber::Registry>;

/// turnpike: a STUN/TURN relay (RFC 8489, RFC 8656, RFC 6156).
///
/// With no arguments it runs an embedded loopback demo configuration (see `turnpike print-config`).
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded loopback demo configuration.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Override the configured packet I/O backend.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Override the configured number of worker threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Override the configured log level (error, warn, info, debug, trace).
    #[arg(long)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    /// Spelled as in the configuration file; `io-uring` works too.
    #[value(name = "io_uring", alias = "io-uring")]
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, Subcommand)]
enum DbCommand {
    /// Apply the ledger's schema migrations that the database lacks, then exit.
    Migrate,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Validate the configuration and exit (0 if valid, 2 with the key and problem if not).
    CheckConfig,
    /// Ask the running relay to reload its configuration file (SIGHUP to the pid in its pid file).
    /// The relay logs the outcome and counts it in turnpike_reloads{result}.
    Reload {
        /// The pid file (default: `pid_file` of the configuration).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Print the embedded default configuration, with comments.
    PrintConfig,
    /// Mint a TURN REST API credential ("<expiry>:<user>", base64 HMAC-SHA1), as a token service would.
    RestCredential {
        /// The shared secret (as configured on the relays).
        #[arg(long)]
        secret: String,
        /// The user id carried in the username.
        #[arg(long)]
        user: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
    /// Mint relay credentials offline from the configuration's REST secret, and print the relay
    /// configuration the token API would answer (JSON: expiresOn, iceServers).
    Credentials {
        /// The identity (user id) the credentials carry; usage is billed to it.
        #[arg(long)]
        id: String,
        /// Validity in seconds (at most the configuration's [rest] max_ttl_seconds, 172800 by default).
        #[arg(long, default_value_t = turnpike::auth::DEFAULT_MAX_TTL)]
        ttl: u64,
        /// "any" or "nearest" (default: one entry for each).
        #[arg(long)]
        route_type: Option<String>,
    },
    /// Print a per-identity usage summary: from the fleet ledger in PostgreSQL when [fleet] is
    /// configured (the bytes relayed inside the period), else from the metering database ([usage]).
    Usage {
        /// Only this relay's usage (ledger only; default: fleet-wide).
        #[arg(long)]
        relay: Option<String>,
        /// From this time (RFC 3339, e.g. 2026-11-01T00:00:00Z); default: 31 days before --until.
        #[arg(long)]
        since: Option<String>,
        /// Until this time (RFC 3339, exclusive); default: now.
        #[arg(long)]
        until: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Summarise a running relay from its /metrics: allocations, packets per second (two scrapes a
    /// second apart), drops, workers, backend, and the configuration file's age.
    ///
    /// The URL comes from --url, else from the configuration's [api] listen address (--config, or
    /// /etc/turnpike/turnpike.toml when that exists). Plain HTTP only: give a loopback or private
    /// metrics address.
    Status {
        /// The relay's metrics URL, e.g. http://127.0.0.1:8080/metrics.
        #[arg(long)]
        url: Option<String>,
    },
    /// Print the manual page (roff), generated from these definitions; the Debian package installs it.
    #[command(hide = true)]
    Man,
    /// Run the token API alone, without a relay (no listeners, no workers): [api], [rest], the
    /// fleet list and [fleet] of the configuration (no listen or [relay] needed). Several replicas
    /// can stand behind a load balancer; with [fleet] it applies the migrations at start and GET
    /// /usage reads the ledger in PostgreSQL. SIGHUP reloads the keys, fleet list and certificate.
    Api,
    /// The fleet ledger's database ([fleet]).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Print the RFC 8489 long-term key MD5(user:realm:password) in hex, as coturn's turnadmin -k does.
    LongTermKey {
        /// User name.
        #[arg(long)]
        user: String,
        /// Realm.
        #[arg(long)]
        realm: String,
        /// Password.
        #[arg(long)]
        password: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::RestCredential { secret, user, ttl }) => {
            let now = turnpike::clock::unix_now();
            if ttl > turnpike::auth::DEFAULT_MAX_TTL {
                eprintln!(
                    "warning: --ttl {ttl} is beyond the relays' default maximum ({} s, [rest] \
                     max_ttl_seconds): relays with the default refuse this credential",
                    turnpike::auth::DEFAULT_MAX_TTL
                );
            }
            match RestSecrets::new(vec![secret.into_bytes()]).mint(&user, now, ttl) {
                Some(c) => {
                    println!(
                        "username: {}\npassword: {}\nexpires:  {} (unix)",
                        c.username, c.password, c.expiry
                    );
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("error: --secret must not be empty");
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::LongTermKey {
            user,
            realm,
            password,
        }) => {
            let key = long_term_key_md5(&user, &realm, &password);
            println!(
                "0x{}",
                key.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            ExitCode::SUCCESS
        }
        Some(Command::Credentials {
            ref id,
            ttl,
            ref route_type,
        }) => credentials(&cli, id, ttl, route_type.as_deref()),
        Some(Command::Usage {
            ref relay,
            ref since,
            ref until,
            json,
        }) => usage(
            &cli,
            relay.as_deref(),
            since.as_deref(),
            until.as_deref(),
            json,
        ),
        Some(Command::Reload { ref pid_file }) => signal_reload(&cli, pid_file.as_deref()),
        Some(Command::Db {
            command: DbCommand::Migrate,
        }) => db_migrate(&cli),
        Some(Command::Status { ref url }) => status::run(cli.config.as_deref(), url.as_deref()),
        Some(Command::Api) => match load_as(&cli, RelayConfig::load_api) {
            Ok(config) => run_api(config, &cli),
            Err(e) => {
                eprintln!("turnpike: configuration error: {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Man) => {
            let page = clap_mangen::Man::new(Cli::command());
            match page.render(&mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("turnpike: cannot write the manual page: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::PrintConfig) => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig) => match load(&cli) {
            Ok(_) => {
                println!("configuration ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("turnpike: configuration error: {e}");
                ExitCode::from(2)
            }
        },
        None => match load(&cli) {
            Ok(config) => run(config, &cli),
            Err(e) => {
                eprintln!("turnpike: configuration error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// The configuration: the file or the embedded demo, with command-line overrides applied.
fn load(cli: &Cli) -> Result<RelayConfig, String> {
    load_as(cli, RelayConfig::load)
}

/// [`load`], the file read by `read` (`RelayConfig::load_api` for `turnpike api`).
fn load_as(
    cli: &Cli,
    read: fn(&std::path::Path) -> Result<RelayConfig, turnpike::config::ConfigError>,
) -> Result<RelayConfig, String> {
    let mut config = match &cli.config {
        Some(path) => read(path).map_err(|e| e.to_string())?,
        None => RelayConfig::embedded_default(),
    };
    if let Some(b) = cli.backend {
        config.fixed.backend = match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::IoUring => Backend::IoUring,
            BackendArg::Epoll => Backend::Epoll,
        };
    }
    if let Some(w) = cli.workers {
        if w == 0 || w > MAX_WORKERS {
            return Err(format!("--workers: must be 1 to {MAX_WORKERS} (got {w})"));
        }
        config.fixed.workers = w;
    }
    if let Some(level) = &cli.log_level {
        config.live.log_level = parse_log_level(level).ok_or_else(|| {
            format!(
                "--log-level: must be one of {} (got {level:?})",
                LOG_LEVELS.join(", ")
            )
        })?;
    }
    Ok(config)
}

/// Log to stdout at `level`; the level sits in a reload layer, so that a reload can change it.
fn init_logging(level: tracing::Level) -> LogLevel {
    let (level, log_level) = tracing_subscriber::reload::Layer::new(LevelFilter::from_level(level));
    tracing_subscriber::registry()
        .with(level)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
        )
        .init();
    log_level
}

/// `turnpike api`: the token API alone until SIGTERM or SIGINT; SIGHUP reloads the configuration
/// file (keys, fleet list, REST secrets, certificate, log level).
fn run_api(mut config: RelayConfig, cli: &Cli) -> ExitCode {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let log_level = init_logging(config.live.log_level);
    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]);
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => {
            eprintln!("turnpike: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let api = match turnpike::service::start_api(&config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("turnpike: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = api.local_addr();
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("token API on {addr}")),
    ]);
    for signal in signals.forever() {
        if signal != SIGHUP {
            break;
        }
        tracing::info!("SIGHUP: reloading the configuration");
        let mut states = vec![NotifyState::Reloading];
        states.extend(NotifyState::monotonic_usec_now().ok());
        notify(&states);
        let new = load_as(cli, RelayConfig::load_api);
        if api.reload(&mut config, new).is_ok() {
            let level = LevelFilter::from_level(config.live.log_level);
            if let Err(e) = log_level.modify(|l| *l = level) {
                tracing::warn!("reload: cannot change the log level: {e}");
            }
        }
        notify(&[NotifyState::Ready]);
    }
    notify(&[NotifyState::Stopping]);
    api.stop();
    ExitCode::SUCCESS
}

fn run(mut config: RelayConfig, cli: &Cli) -> ExitCode {
    let demo = cli.config.is_none();
    let log_level = init_logging(config.live.log_level);
    if let Err(e) = fit_open_files(&mut config) {
        eprintln!("turnpike: configuration error: {e}");
        return ExitCode::from(2);
    }
    let mut settings = turnpike::service::settings(&config);
    match config
        .live
        .tls
        .as_ref()
        .map(|f| load_tls(f, TLS_KEYS))
        .transpose()
    {
        Ok(t) => settings.stream.tls = t,
        Err(e) => {
            eprintln!("turnpike: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    // The API reads its own pair when it starts; check it first, so that a bad file is named here.
    if let Some(files) = config.live.api.as_ref().and_then(|a| a.tls.as_ref()) {
        if let Err(e) = load_tls(files, API_TLS_KEYS) {
            eprintln!("turnpike: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    let service = match turnpike::service::start_with(&config, settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("turnpike: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let relay = service.relay();
    let listening = relay
        .listen_addrs()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    // The listeners are bound: clients can be served from here on.
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("relaying on {listening}")),
    ]);
    if demo {
        let addr = relay.listen_addrs()[0];
        println!(
            "turnpike: demo relay on {addr} (embedded loopback config: user demo / demo-pass, REST secret demo-secret).\n\
             Try it with coturn's tools:\n  turnutils_peer -L 127.0.0.1 -p 3480 &\n  \
             turnutils_uclient -u demo -w demo-pass -e 127.0.0.1 -r 3480 -p {} -n 100 127.0.0.1\n\
             Stop with Ctrl-C.",
            addr.port()
        );
    }
    // SIGTERM/SIGINT: refuse new allocations, drain, exit 0.
    let to_control = relay.shutdown_sender();
    let drain_notice = service.drain_notice();
    let drain = config.fixed.drain;
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for _ in signals.forever() {
                    // Ask systemd for the drain plus the final usage flush, whatever TimeoutStopSec says.
                    let extend = (drain + STOP_MARGIN).as_micros();
                    notify(&[
                        NotifyState::Stopping,
                        NotifyState::Status(&format!("draining for {}s", drain.as_secs())),
                        NotifyState::ExtendTimeoutUsec(u32::try_from(extend).unwrap_or(u32::MAX)),
                    ]);
                    // The fleet's registry hears of the drain at once (not at the next heartbeat).
                    if let Some(d) = &drain_notice {
                        d.draining();
                    }
                    let _ = to_control.send(ToControl::Shutdown);
                }
            });
        }
        Err(e) => tracing::warn!("cannot install signal handlers: {e}"),
    }
    // SIGHUP: reload the configuration file (see `reload_on_sighup`).
    let pid_file = config.fixed.pid_file.clone();
    reload_on_sighup(&service, config, cli, log_level);
    let pid_file = match write_pid_file(pid_file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("turnpike: cannot start: {e}");
            let _ = service.stop();
            return ExitCode::from(1);
        }
    };
    let result = service.join();
    if let Some(p) = pid_file {
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!("cannot remove the pid file {}: {e}", p.display());
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike: {e}");
            ExitCode::from(1)
        }
    }
}

/// On SIGHUP, reload the configuration file: read and validate it as at start (command-line overrides
/// included), fit its caps under the open-file limit and read its TLS files; any failure there changes
/// nothing. Then [`turnpike::reload::apply`] reports the fixed settings that differ and hands the live
/// ones to the relay; after it the log level and the `[tls]` certificate (established sessions keep
/// theirs) follow. Every attempt is counted in `turnpike_reloads{result}`.
fn reload_on_sighup(
    service: &turnpike::service::Service,
    mut running: RelayConfig,
    cli: &Cli,
    log_level: LogLevel,
) {
    let reloader = service.relay().reloader();
    let api = service.api_reload();
    let api_tls = service.api_tls();
    let streams = service.relay().streams().clone();
    let cli = cli.clone();
    let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot install the SIGHUP handler, reload disabled: {e}");
            return;
        }
    };
    std::thread::spawn(move || {
        for _ in signals.forever() {
            tracing::info!("SIGHUP: reloading the configuration");
            let mut states = vec![NotifyState::Reloading];
            states.extend(NotifyState::monotonic_usec_now().ok());
            notify(&states);
            let new = load(&cli).and_then(|mut c| {
                fit_open_files(&mut c).map_err(|e| e.to_string())?;
                let tls = c
                    .live
                    .tls
                    .as_ref()
                    .map(|f| load_tls(f, TLS_KEYS))
                    .transpose()?;
                let api_cert = c.live.api.as_ref().and_then(|a| a.tls.as_ref());
                let api_cert = api_cert.map(|f| load_tls(f, API_TLS_KEYS)).transpose()?;
                Ok((c, tls, api_cert))
            });
            let (new, tls, api_cert) = match new {
                Ok((c, tls, api_cert)) => (Ok(c), tls, api_cert),
                Err(e) => (Err(e), None, None),
            };
            if turnpike::reload::apply(&mut running, new, &reloader, api.as_ref()).is_ok() {
                let level = LevelFilter::from_level(running.live.log_level);
                if let Err(e) = log_level.modify(|l| *l = level) {
                    tracing::warn!("reload: cannot change the log level: {e}");
                }
                if let (Some(cfg), Some(files)) = (tls, &running.live.tls) {
                    streams.set_tls(cfg);
                    tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                }
                // The API serves TLS or plain HTTP from start to exit; only its pair can change.
                let api_files = running.live.api.as_ref().and_then(|a| a.tls.as_ref());
                if let (Some(cfg), Some(slot), Some(files)) = (api_cert, &api_tls, api_files) {
                    slot.set(cfg);
                    tracing::info!(cert = %files.cert.display(), "API TLS certificate reloaded");
                }
            }
            notify(&[NotifyState::Ready]);
        }
    });
}

/// Write this process's id to `path` (through a temporary file and a rename, so a reader never sees
/// it half written). `Ok(None)` without a pid file.
fn write_pid_file(path: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("pid_file: cannot write {}: {e}", path.display()))?;
    Ok(Some(path))
}

/// `turnpike reload`: SIGHUP to the pid in the pid file (`--pid-file`, else the configuration's
/// `pid_file`).
fn signal_reload(cli: &Cli, pid_file: Option<&std::path::Path>) -> ExitCode {
    let path = match pid_file {
        Some(p) => p.to_path_buf(),
        None => match load(cli) {
            Ok(c) => match c.fixed.pid_file {
                Some(p) => p,
                None => {
                    eprintln!(
                        "error: no pid file: pass --pid-file, or set pid_file in the configuration"
                    );
                    return ExitCode::from(2);
                }
            },
            Err(e) => {
                eprintln!("turnpike: configuration error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let pid = match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(pid) => pid,
            Err(_) => {
                eprintln!("error: {}: not a pid: {:?}", path.display(), text.trim());
                return ExitCode::from(1);
            }
        },
        Err(e) => {
            eprintln!(
                "error: cannot read {}: {e} (is the relay running?)",
                path.display()
            );
            return ExitCode::from(1);
        }
    };
    match open_files::send_sighup(pid) {
        Ok(()) => {
            println!(
                "turnpike: reload requested (SIGHUP to pid {pid}); the relay logs the outcome"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: cannot signal pid {pid} (from {}): {e}",
                path.display()
            );
            ExitCode::from(1)
        }
    }
}

/// What a stop may take beyond `drain_seconds`: the final usage records (the control thread waits up
/// to 2 s for the workers' last counters) and the SQLite writes. scripts/deb/turnpike.service's
/// TimeoutStopSec leaves the same room (tests/package.rs checks it against the example config).
const STOP_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Tell the service manager (systemd's `NOTIFY_SOCKET`) about a state change; a no-op without one.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

fn credentials(cli: &Cli, id: &str, ttl: u64, route: Option<&str>) -> ExitCode {
    let config = match load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnpike: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if id.is_empty() || id.chars().any(char::is_control) {
        eprintln!("error: --id must be a non-empty printable string");
        return ExitCode::from(2);
    }
    let route = match route {
        None => None,
        Some(r @ ("any" | "nearest")) => Some(r),
        Some(r) => {
            eprintln!("error: --route-type must be \"any\" or \"nearest\" (got {r:?})");
            return ExitCode::from(2);
        }
    };
    let f = &config.fixed;
    let (fleet, region) = match &config.live.api {
        Some(a) => (a.fleet.clone(), a.region.clone()),
        None => (
            vec![turnpike::api::FleetRelay {
                id: f.relay_id.clone(),
                region: "default".into(),
                addresses: f
                    .listen
                    .iter()
                    .map(|a| f.advertised(*a).to_string())
                    .collect(),
                tcp_addresses: f
                    .listen_tcp
                    .iter()
                    .map(|a| f.advertised(*a).to_string())
                    .collect(),
                tls_addresses: f
                    .listen_tls
                    .iter()
                    .map(|a| f.advertised(*a).to_string())
                    .collect(),
            }],
            "default".into(),
        ),
    };
    let ttl = ttl.min(config.live.rest_secrets.max_ttl());
    match turnpike::api::relay_configuration(
        &fleet,
        &region,
        &config.live.rest_secrets,
        id,
        route,
        ttl,
        SystemTime::now(),
    ) {
        Some(v) => {
            println!("{v:#}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("error: the configuration has no REST secret ([rest] secrets) to mint with");
            ExitCode::from(2)
        }
    }
}

fn db_migrate(cli: &Cli) -> ExitCode {
    let config = match load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnpike: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(f) = &config.fixed.fleet else {
        eprintln!("error: no ledger is configured (no [fleet] section)");
        return ExitCode::from(2);
    };
    match turnpike::fleet::migrate_blocking(f) {
        Ok(v) if v.is_empty() => {
            println!("ledger schema up to date");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!("applied ledger migrations {v:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnpike: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage(
    cli: &Cli,
    relay: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
    json: bool,
) -> ExitCode {
    let config = match load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnpike: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if config.fixed.fleet.is_none() && config.fixed.usage.is_none() {
        eprintln!("error: metering is not configured (no [usage] or [fleet] section)");
        return ExitCode::from(2);
    }
    let ms = turnpike::clock::unix_ms_at;
    let time = |flag: &str, v: Option<&str>| match v {
        None => Ok(None),
        Some(s) => humantime::parse_rfc3339_weak(s)
            .map(|t| Some(ms(t)))
            .map_err(|e| format!("{flag}: {s:?} is not an RFC 3339 date-time ({e})")),
    };
    let range = time("--since", since).and_then(|s| Ok((s, time("--until", until)?)));
    let (since, until) = match range {
        Ok((since, until)) => turnpike::usage::summary_range(since, until, ms(SystemTime::now())),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rows = match (&config.fixed.fleet, &config.fixed.usage) {
        (Some(f), _) => {
            turnpike::fleet::bill_blocking(f, since, until, relay).map_err(|e| e.to_string())
        }
        (None, _) if relay.is_some() => Err("--relay needs a ledger ([fleet])".to_string()),
        (None, Some(u)) => turnpike::usage::Store::open_reader(&u.database)
            .and_then(|s| s.summary(since, until))
            .map_err(|e| format!("{}: {e}", u.database.display())),
        (None, None) => Err("metering is not configured".to_string()),
    };
    match rows {
        Ok(rows) if json => {
            println!("{}", serde_json::json!({ "identities": rows }));
            ExitCode::SUCCESS
        }
        Ok(rows) => {
            print!("{}", turnpike::usage::render_table(&rows));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnpike: {e}");
            ExitCode::from(1)
        }
    }
}

/// Raise the soft open-file limit to the hard one, then fit the allocation and connection caps under
/// it (lowered with a warning: the relay runs, and answers 508 beyond the cap, rather than failing on
/// descriptors later). An error when not even one allocation would fit.
fn fit_open_files(config: &mut RelayConfig) -> Result<(), turnpike::config::ConfigError> {
    let limit = match open_files::raise_open_file_limit() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "cannot read the open-file limit (RLIMIT_NOFILE), caps not checked: {e}"
            );
            return Ok(());
        }
    };
    // TCP/TLS wildcards are bound once per interface address (`control::start`); UDP ones once.
    let f = &config.fixed;
    let ifaddrs = if f
        .listen_tcp
        .iter()
        .chain(&f.listen_tls)
        .any(|a| a.ip().is_unspecified())
    {
        turnpike::sys::interface_addrs().unwrap_or_default()
    } else {
        Vec::new()
    };
    let stream_sockets = turnpike::sys::expand_wildcards(&f.listen_tcp, &ifaddrs).len()
        + turnpike::sys::expand_wildcards(&f.listen_tls, &ifaddrs).len();
    let fit = config.fit_open_files(limit, stream_sockets)?;
    if fit.lowered() {
        // Name only the caps that came down (streams.max_connections only with stream listeners).
        let lowered: Vec<String> = [
            ("quotas.max_allocations", fit.configured.0, fit.fitted.0),
            ("streams.max_connections", fit.configured.1, fit.fitted.1),
        ]
        .iter()
        .filter(|(_, was, now)| was != now)
        .map(|(key, was, now)| format!("{key} {was} lowered to {now}"))
        .collect();
        tracing::warn!(
            "the open-file limit (RLIMIT_NOFILE) is {limit}, and the relay keeps {} descriptors beside \
             its relay sockets and connections: {}. Raise the limit (LimitNOFILE= in the systemd unit, \
             ulimit -n) or lower the cap.",
            fit.reserve,
            lowered.join(", "),
        );
    }
    Ok(())
}
