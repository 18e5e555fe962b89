//! Validation of the `[api]` and `[usage]` sections and `relay_id`: the token API, metering and metrics.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::api::FleetRelay;
use crate::config::raw::{RawApi, RawUsage};
use crate::config::{ConfigError, Fixed, LiveApi, TlsFiles};
use crate::policy::Cidr;
use crate::usage;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// `"host:port"` with a non-empty host and a non-zero port (IPv6 in brackets).
fn check_address(key: &str, s: &str) -> Result<String, ConfigError> {
    if SocketAddr::from_str(s).is_ok_and(|a| a.port() != 0 && !a.ip().is_unspecified()) {
        return Ok(s.to_string());
    }
    match s.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(':')
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(s.to_string())
        }
        _ => Err(ConfigError::new(
            key,
            format!("{s:?} is not a host:port clients can reach (e.g. \"203.0.113.5:3478\", \"[2001:db8::1]:3478\", \"turn.example.org:3478\")"),
        )),
    }
}

pub(super) fn relay_id(id: String) -> Result<String, ConfigError> {
    if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::new(
            "relay_id",
            format!("must be 1 to 64 characters without spaces (got {id:?})"),
        ));
    }
    Ok(id)
}

/// `[api]`: where it listens (fixed) and its keys, files, fleet and regions (live). The fleet starts
/// with this relay, at its public addresses (default: its listeners).
pub(super) fn api(raw: RawApi, fixed: &Fixed) -> Result<(SocketAddr, LiveApi), ConfigError> {
    let (relay_id, listen) = (fixed.relay_id.as_str(), &fixed.listen);
    let addr = SocketAddr::from_str(&raw.listen).map_err(|_| {
        ConfigError::new(
            "api.listen",
            format!(
                "{:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")",
                raw.listen
            ),
        )
    })?;
    if raw.access_keys.is_empty() {
        return Err(ConfigError::new(
            "api.access_keys",
            "at least one access key (base64) is needed to sign API requests",
        ));
    }
    let mut access_keys = Vec::with_capacity(raw.access_keys.len());
    for (i, k) in raw.access_keys.iter().enumerate() {
        match STANDARD.decode(k) {
            Ok(bytes) if bytes.len() >= 16 => access_keys.push(bytes),
            Ok(_) => return Err(ConfigError::new(
                format!("api.access_keys[{i}]"),
                "too short: use at least 16 random bytes (e.g. `head -c 32 /dev/urandom | base64`)",
            )),
            Err(_) => {
                return Err(ConfigError::new(
                    format!("api.access_keys[{i}]"),
                    "is not base64 (standard alphabet, with padding)",
                ))
            }
        }
    }
    let tls = match (raw.tls_cert, raw.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                "api.tls_key",
                "tls_cert needs tls_key too",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "api.tls_cert",
                "tls_key needs tls_cert too",
            ))
        }
    };
    let addresses = if raw.public_addresses.is_empty() {
        listen.iter().map(ToString::to_string).collect()
    } else {
        raw.public_addresses
            .iter()
            .enumerate()
            .map(|(i, a)| check_address(&format!("api.public_addresses[{i}]"), a))
            .collect::<Result<_, _>>()?
    };
    // TCP and TLS listeners are announced too (default: the listen_tcp / listen_tls addresses).
    let public = |key: &str, given: &[String], listen: &[SocketAddr]| {
        if given.is_empty() {
            Ok(listen.iter().map(ToString::to_string).collect())
        } else {
            given
                .iter()
                .enumerate()
                .map(|(i, a)| check_address(&format!("api.{key}[{i}]"), a))
                .collect::<Result<Vec<_>, _>>()
        }
    };
    let tcp_addresses = public(
        "public_tcp_addresses",
        &raw.public_tcp_addresses,
        &fixed.listen_tcp,
    )?;
    let tls_addresses = public(
        "public_tls_addresses",
        &raw.public_tls_addresses,
        &fixed.listen_tls,
    )?;
    let mut fleet = vec![FleetRelay {
        id: relay_id.into(),
        region: raw.region.clone(),
        addresses,
        tcp_addresses,
        tls_addresses,
    }];
    for (i, r) in raw.fleet.into_iter().enumerate() {
        if r.addresses.is_empty() {
            return Err(ConfigError::new(
                format!("api.fleet[{i}].addresses"),
                "at least one address is needed",
            ));
        }
        if fleet.iter().any(|f| f.id == r.id) {
            return Err(ConfigError::new(
                format!("api.fleet[{i}].id"),
                format!("relay {:?} is listed twice", r.id),
            ));
        }
        let check = |key: &str, list: &[String]| {
            list.iter()
                .enumerate()
                .map(|(j, a)| check_address(&format!("api.fleet[{i}].{key}[{j}]"), a))
                .collect::<Result<Vec<_>, _>>()
        };
        fleet.push(FleetRelay {
            addresses: check("addresses", &r.addresses)?,
            tcp_addresses: check("tcp_addresses", &r.tcp_addresses)?,
            tls_addresses: check("tls_addresses", &r.tls_addresses)?,
            id: r.id,
            region: r.region,
        });
    }
    let client_regions = raw
        .client_regions
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            Cidr::from_str(&r.cidr).map(|c| (c, r.region)).map_err(|e| {
                ConfigError::new(format!("api.client_regions[{i}].cidr"), e.to_string())
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((
        addr,
        LiveApi {
            access_keys,
            tls,
            region: raw.region,
            fleet,
            client_regions,
        },
    ))
}

/// The longest `usage.retention_days`: a century.
const MAX_RETENTION_DAYS: u64 = 36_500;

pub(super) fn usage(raw: RawUsage) -> Result<usage::Config, ConfigError> {
    if raw.database.as_os_str().is_empty() {
        return Err(ConfigError::new("usage.database", "must be a file path"));
    }
    if raw.checkpoint_seconds == 0 || raw.checkpoint_seconds > 86_400 {
        return Err(ConfigError::new(
            "usage.checkpoint_seconds",
            format!("must be 1 to 86400 (got {})", raw.checkpoint_seconds),
        ));
    }
    if raw.retention_days == 0 || raw.retention_days > MAX_RETENTION_DAYS {
        return Err(ConfigError::new(
            "usage.retention_days",
            format!(
                "must be 1 to {MAX_RETENTION_DAYS} (got {})",
                raw.retention_days
            ),
        ));
    }
    Ok(usage::Config {
        database: raw.database,
        checkpoint: Duration::from_secs(raw.checkpoint_seconds),
        retention: Duration::from_secs(raw.retention_days * 86_400),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use crate::config::RelayConfig;

    const BASE: &str = "listen = [\"192.0.2.1:3478\"]\nrelay_id = \"eu-1\"\n[relay]\naddresses = [\"192.0.2.1\"]\n[rest]\nsecrets = [\"s\"]\n";
    const KEY: &str = "a2V5LWtleS1rZXkta2V5LWtleQ==";

    #[track_caller]
    fn error(extra: &str, key: &str, fact: &str) {
        let e = RelayConfig::from_toml(&format!("{BASE}{extra}")).unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert!(e.problem.contains(fact), "{e}");
    }

    #[test]
    fn api_and_usage_sections() {
        let c = RelayConfig::from_toml(&format!(
            "{BASE}[api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"{KEY}\"]\nregion = \"eu\"\n\
             [[api.fleet]]\nid = \"us-1\"\nregion = \"us\"\naddresses = [\"turn.example.org:3478\"]\n\
             [[api.client_regions]]\ncidr = \"198.51.100.0/24\"\nregion = \"us\"\n\
             [usage]\ndatabase = \"/tmp/u.db\"\ncheckpoint_seconds = 5\n"
        ))
        .unwrap();
        let api = c.api().unwrap();
        assert_eq!(c.fixed.relay_id, "eu-1");
        assert_eq!(api.fleet.len(), 2);
        assert_eq!(
            api.fleet[0].addresses,
            ["192.0.2.1:3478"],
            "default: the listen addresses"
        );
        assert_eq!(api.fleet[1].addresses, ["turn.example.org:3478"]);
        assert_eq!(api.access_keys, [b"key-key-key-key-key".to_vec()]);
        assert_eq!(
            api.usage_db.as_deref(),
            Some(std::path::Path::new("/tmp/u.db"))
        );
        assert_eq!(c.fixed.usage.as_ref().unwrap().checkpoint.as_secs(), 5);
        assert_eq!(
            c.fixed.usage.as_ref().unwrap().retention,
            Duration::from_secs(90 * 86_400),
            "default: 90 days"
        );
        assert!(RelayConfig::from_toml(BASE).unwrap().api().is_none());
        let policy = &c.peer_policy();
        assert_eq!(
            policy.check("127.0.0.1:8080".parse().unwrap()),
            Err(crate::policy::Denied::ServicePort),
            "the API is a service port"
        );
    }

    #[test]
    fn tcp_and_tls_listeners_are_announced() {
        let c = RelayConfig::from_toml(&format!(
            "listen_tcp = [\"192.0.2.1:3478\"]\nlisten_tls = [\"192.0.2.1:443\"]\n\
             tls.cert = \"/c\"\ntls.key = \"/k\"\n{BASE}\
             [api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"{KEY}\"]\n\
             [[api.fleet]]\nid = \"us-1\"\nregion = \"us\"\naddresses = [\"turn.example.org:3478\"]\n\
             tls_addresses = [\"turn.example.org:443\"]\n"
        ))
        .unwrap();
        let api = c.api().unwrap();
        assert_eq!(
            api.fleet[0].tcp_addresses,
            ["192.0.2.1:3478"],
            "default: listen_tcp"
        );
        assert_eq!(
            api.fleet[0].tls_addresses,
            ["192.0.2.1:443"],
            "default: listen_tls"
        );
        assert!(api.fleet[1].tcp_addresses.is_empty());
        assert_eq!(api.fleet[1].tls_addresses, ["turn.example.org:443"]);
    }

    #[test]
    fn errors_name_the_key() {
        error(
            "[api]\nlisten = \"127.0.0.1\"\naccess_keys = [\"a2V5\"]\n",
            "api.listen",
            "IP:port",
        );
        error(
            "[api]\nlisten = \"127.0.0.1:1\"\n",
            "api.access_keys",
            "at least one",
        );
        error(
            "[api]\nlisten = \"127.0.0.1:1\"\naccess_keys = [\"a2V5\"]\n",
            "api.access_keys[0]",
            "too short",
        );
        error(
            "[api]\nlisten = \"127.0.0.1:1\"\naccess_keys = [\"!!\"]\n",
            "api.access_keys[0]",
            "base64",
        );
        error(
            &format!("[api]\nlisten = \"127.0.0.1:1\"\naccess_keys = [\"{KEY}\"]\ntls_cert = \"c.pem\"\n"),
            "api.tls_key",
            "tls_key",
        );
        error(
            &format!("[api]\nlisten = \"127.0.0.1:1\"\naccess_keys = [\"{KEY}\"]\npublic_addresses = [\"x\"]\n"),
            "api.public_addresses[0]",
            "host:port",
        );
        error(
            &format!("[api]\nlisten = \"127.0.0.1:1\"\naccess_keys = [\"{KEY}\"]\nlsiten = 1\n"),
            "api.lsiten",
            "lsiten",
        );
        error(
            "[usage]\ndatabase = \"u.db\"\ncheckpoint_seconds = 0\n",
            "usage.checkpoint_seconds",
            "1 to 86400",
        );
        error("[usage]\ndatabse = \"u.db\"\n", "usage.databse", "databse");
        error(
            "[usage]\ndatabase = \"u.db\"\nretention_days = 0\n",
            "usage.retention_days",
            "1 to 36500",
        );
        error(
            "[usage]\ndatabase = \"u.db\"\nretention_days = 36501\n",
            "usage.retention_days",
            "1 to 36500",
        );
        let e = RelayConfig::from_toml(
            &format!("relay_id = \"a b\"\n{BASE}").replace("relay_id = \"eu-1\"\n", ""),
        )
        .unwrap_err();
        assert_eq!(e.key, "relay_id", "{e}");
    }
}
