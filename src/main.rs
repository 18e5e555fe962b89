//! The `turnpike` command: runs the relay, checks configurations, and mints credentials.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use turnpike::auth::{long_term_key_md5, RestSecrets};
use turnpike::config::{Backend, RelayConfig, DEFAULT_CONFIG};
use turnpike::control::{self, Settings};
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
    /// Spelled as in the configuration file; `io-uring` works too.
    #[value(name = "io_uring", alias = "io-uring")]
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
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
    match relay.join() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike: {e}");
            ExitCode::from(1)
        }
    }
}
