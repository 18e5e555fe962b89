//! The `turnpike` command: runs the relay, checks configurations, and mints credentials.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use turnpike::auth::{long_term_key_md5, RestSecrets};
use turnpike::config::TlsFiles;
use turnpike::config::{Backend, RelayConfig, DEFAULT_CONFIG};
use turnpike::control::{self, Settings, StreamSettings};
use turnpike::dataplane::stream::{tls_config, StreamLimits};
use turnpike::dataplane::{BackendKind, ToControl};

/// turnpike: a STUN/TURN relay (RFC 8489, RFC 8656, RFC 6156).
///
/// With no arguments it runs an embedded loopback demo configuration (see `turnpike print-config`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded loopback demo configuration.
    #[arg(long, short)]
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
    IoUring,
    Epoll,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and exit (0 if valid, 2 with the key and problem if not).
    CheckConfig,
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
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
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
            Ok(config) => run(config, cli.config.is_none()),
            Err(e) => {
                eprintln!("turnpike: configuration error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// The configuration: the file or the embedded demo, with command-line overrides applied.
fn load(cli: &Cli) -> Result<RelayConfig, String> {
    let mut config = match &cli.config {
        Some(path) => RelayConfig::load(path).map_err(|e| e.to_string())?,
        None => RelayConfig::embedded_default(),
    };
    if let Some(b) = cli.backend {
        config.backend = match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::IoUring => Backend::IoUring,
            BackendArg::Epoll => Backend::Epoll,
        };
    }
    if let Some(w) = cli.workers {
        if w == 0 || w > 1024 {
            return Err(format!("--workers: must be 1 to 1024 (got {w})"));
        }
        config.workers = w;
    }
    if let Some(level) = &cli.log_level {
        if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(format!(
                "--log-level: must be one of error, warn, info, debug, trace (got {level:?})"
            ));
        }
        config.log_level = level.clone();
    }
    Ok(config)
}

fn run(config: RelayConfig, demo: bool) -> ExitCode {
    let level = config.log_level.parse().unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .init();
    let tls = match config.tls.as_ref().map(load_tls).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("turnpike: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = Settings {
        server: config.server.clone(),
        listen: config.listen.clone(),
        workers: config.workers,
        backend: match config.backend {
            Backend::Auto => None,
            Backend::IoUring => Some(BackendKind::IoUring),
            Backend::Epoll => Some(BackendKind::Epoll),
        },
        recv_buffer: config.recv_buffer,
        send_buffer: config.send_buffer,
        pin_workers: config.pin_workers,
        drain: config.drain,
        usage_sink: None,
        stream: StreamSettings {
            listen_tcp: config.listen_tcp.clone(),
            listen_tls: config.listen_tls.clone(),
            tls,
            limits: StreamLimits {
                max_connections: config.streams.max_connections,
                max_per_ip: config.streams.max_connections_per_ip,
                idle_timeout: config.streams.idle_timeout,
                tls_handshake_timeout: config.streams.tls_handshake_timeout,
                write_queue: config.streams.write_queue_bytes,
            },
        },
    };
    let mut relay = match control::start(settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("turnpike: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
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
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for _ in signals.forever() {
                    let _ = to_control.send(ToControl::Shutdown);
                }
            });
        }
        Err(e) => tracing::warn!("cannot install signal handlers: {e}"),
    }
    // SIGHUP: reload the TLS certificate and key; established sessions keep theirs.
    if let Some(files) = config.tls.clone() {
        let streams = relay.streams().clone();
        match signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP]) {
            Ok(mut signals) => {
                std::thread::spawn(move || {
                    for _ in signals.forever() {
                        match load_tls(&files) {
                            Ok(cfg) => {
                                streams.set_tls(cfg);
                                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                            }
                            Err(e) => tracing::error!(
                                "TLS reload failed, keeping the old certificate: {e}"
                            ),
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("cannot install the SIGHUP handler: {e}"),
        }
    }
    match relay.join() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike: {e}");
            ExitCode::from(1)
        }
    }
}

/// Read and check the TLS certificate chain and key; errors name the key (`tls.cert`, `tls.key`).
fn load_tls(files: &TlsFiles) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
    let cert = std::fs::read(&files.cert)
        .map_err(|e| format!("tls.cert: cannot read {}: {e}", files.cert.display()))?;
    let key = std::fs::read(&files.key)
        .map_err(|e| format!("tls.key: cannot read {}: {e}", files.key.display()))?;
    tls_config(&cert, &key).map_err(|e| {
        if e.starts_with("key") {
            format!("tls.key: {e} ({})", files.key.display())
        } else {
            format!("tls.cert: {e} ({})", files.cert.display())
        }
    })
}
