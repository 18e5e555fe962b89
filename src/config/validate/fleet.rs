//! Validation of the `[fleet]` section: the usage ledger on PostgreSQL.

use std::time::Duration;

use crate::config::raw::RawFleet;
use crate::config::ConfigError;
use crate::fleet::registry::Timing;
use crate::fleet::{Config, Password, Tls};

pub(super) fn fleet(raw: RawFleet) -> Result<Config, ConfigError> {
    if raw.postgres.trim().is_empty() {
        return Err(ConfigError::new(
            "fleet.postgres",
            "must be a connection string (\"host=... user=... dbname=...\" or \"postgresql://...\")",
        ));
    }
    if let Err(e) = raw.postgres.parse::<tokio_postgres::Config>() {
        return Err(ConfigError::new("fleet.postgres", e.to_string()));
    }
    let password = match (raw.password_file, raw.password_env) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "fleet.password_file",
                "give password_file or password_env, not both",
            ))
        }
        (Some(f), None) => Password::File(f),
        (None, Some(v)) if v.is_empty() => {
            return Err(ConfigError::new(
                "fleet.password_env",
                "must name a variable",
            ))
        }
        (None, Some(v)) => Password::Env(v),
        (None, None) => Password::None,
    };
    let tls = match (raw.tls.as_str(), raw.ca_file) {
        ("disable", None) => Tls::Disable,
        ("disable", Some(_)) => {
            return Err(ConfigError::new("fleet.ca_file", "needs tls = \"require\""))
        }
        ("require", Some(ca_file)) => Tls::Require { ca_file },
        ("require", None) => {
            return Err(ConfigError::new(
                "fleet.ca_file",
                "tls = \"require\" needs the CA certificates (PEM) to verify the server with",
            ))
        }
        (other, _) => {
            return Err(ConfigError::new(
                "fleet.tls",
                format!("must be \"disable\" or \"require\" (got {other:?})"),
            ))
        }
    };
    if raw.ship_interval_seconds == 0 || raw.ship_interval_seconds > 3600 {
        return Err(ConfigError::new(
            "fleet.ship_interval_seconds",
            format!("must be 1 to 3600 (got {})", raw.ship_interval_seconds),
        ));
    }
    if raw.batch == 0 || raw.batch > 100_000 {
        return Err(ConfigError::new(
            "fleet.batch",
            format!("must be 1 to 100000 (got {})", raw.batch),
        ));
    }
    if raw.heartbeat_seconds == 0 || raw.heartbeat_seconds > 3600 {
        return Err(ConfigError::new(
            "fleet.heartbeat_seconds",
            format!("must be 1 to 3600 (got {})", raw.heartbeat_seconds),
        ));
    }
    if raw.stale_seconds <= raw.heartbeat_seconds || raw.stale_seconds > 86_400 {
        return Err(ConfigError::new(
            "fleet.stale_seconds",
            format!(
                "must be more than heartbeat_seconds ({}) and at most 86400 (got {})",
                raw.heartbeat_seconds, raw.stale_seconds
            ),
        ));
    }
    if raw.pool_size == 0 || raw.pool_size > 64 {
        return Err(ConfigError::new(
            "fleet.pool_size",
            format!("must be 1 to 64 (got {})", raw.pool_size),
        ));
    }
    Ok(Config {
        postgres: raw.postgres,
        password,
        tls,
        ship_interval: Duration::from_secs(raw.ship_interval_seconds),
        batch: raw.batch,
        migrate: raw.migrate,
        registry: Timing {
            heartbeat: Duration::from_secs(raw.heartbeat_seconds),
            stale: Duration::from_secs(raw.stale_seconds),
        },
        pool_size: raw.pool_size,
    })
}
