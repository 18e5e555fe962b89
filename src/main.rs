//! The `turnpike` command.
//!
//! Until the data plane lands (issue #4) the binary offers the credential tools that sit on top of the
//! finished layers; running the relay itself says plainly that it is not there yet.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use turnpike::auth::{long_term_key_md5, RestSecrets};

/// turnpike: a STUN/TURN relay (RFC 8489, RFC 8656, RFC 6156).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
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
        None => {
            eprintln!(
                "turnpike: the relay's data plane is not built yet (see the open data-plane issue).\n\
                 Available now: `turnpike rest-credential` and `turnpike long-term-key`; see --help."
            );
            ExitCode::from(2)
        }
    }
}
