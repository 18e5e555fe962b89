//! Validation of the `[api]` and `[usage]` sections and `relay_id`: the token API, metering and metrics.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::api::{AccessKey, FleetRelay, Limits};
use crate::config::raw::{RawApi, RawApiLimits, RawUsage};
use crate::config::{ConfigError, Fixed, FixedApi, LiveApi, TlsFiles};
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
pub(super) fn api(raw: RawApi, fixed: &Fixed) -> Result<(FixedApi, LiveApi), ConfigError> {
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
    if raw.access_keys.is_empty() && raw.admin_keys.is_empty() {
        return Err(ConfigError::new(
            "api.access_keys",
            "at least one access key (base64) is needed to sign API requests",
        ));
    }
    // Without admin_keys the single list keeps every role, as before (the server warns at start).
    let legacy = raw.admin_keys.is_empty();
    let mut keys = Vec::with_capacity(raw.access_keys.len() + raw.admin_keys.len());
    for (list, name, admin) in [
        (&raw.access_keys, "access_keys", false),
        (&raw.admin_keys, "admin_keys", true),
    ] {
        for (i, k) in list.iter().enumerate() {
            keys.push(AccessKey {
                secret: decode_key(&format!("api.{name}[{i}]"), k)?,
                mint: !admin,
                admin: admin || legacy,
            });
        }
    }
    let plaintext = raw.allow_plaintext_on_public_address;
    let tls = match (raw.tls_cert.clone(), raw.tls_key) {
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
    // By default clients reach the relay at its listeners; behind 1:1 NAT (relay.external) a listener
    // on a private address is reached at the public one.
    let outside = |a: &SocketAddr| fixed.advertised(*a).to_string();
    // A wildcard listener is no address a client can be given.
    let wildcard =
        |key: &str, listen: &[SocketAddr]| match listen.iter().find(|a| a.ip().is_unspecified()) {
            Some(a) => Err(ConfigError::new(
                format!("api.{key}"),
                format!(
                "needed: a listener is the wildcard {a}; list the host:port clients reach it at"
            ),
            )),
            None => Ok(()),
        };
    let addresses = if raw.public_addresses.is_empty() {
        wildcard("public_addresses", listen)?;
        listen.iter().map(outside).collect()
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
            wildcard(key, listen)?;
            Ok(listen.iter().map(outside).collect())
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
    if raw.tls_cert.is_none() && !addr.ip().to_canonical().is_loopback() && !plaintext {
        return Err(ConfigError::new(
            "api.listen",
            format!(
                "{addr} is not a loopback address and the API has no TLS (api.tls_cert, api.tls_key): \
                 access keys and tokens would cross the network in clear text. Configure TLS, listen on \
                 loopback behind a TLS proxy, or set api.allow_plaintext_on_public_address = true"
            ),
        ));
    }
    let metrics_listen = raw
        .metrics_listen
        .as_deref()
        .map(|m| {
            SocketAddr::from_str(m).map_err(|_| {
                ConfigError::new(
                    "api.metrics_listen",
                    format!("{m:?} is not an IP:port address (e.g. \"127.0.0.1:9090\")"),
                )
            })
        })
        .transpose()?;
    let names = if raw.names.is_empty() {
        // The listen address, and the hosts clients reach this relay at.
        std::iter::once(addr.to_string())
            .chain(fleet[0].addresses.iter().map(|a| host_of(a).to_string()))
            .map(|n| n.to_ascii_lowercase())
            .collect()
    } else {
        raw.names
            .iter()
            .map(|n| n.trim().to_ascii_lowercase())
            .collect()
    };
    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Cidr::from_str(c)
                .map_err(|e| ConfigError::new(format!("api.trusted_proxies[{i}]"), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let revocations_db = match (raw.revocations_database, &fixed.usage) {
        (Some(p), _) if !p.as_os_str().is_empty() => p,
        (None, Some(u)) => u.database.clone(),
        _ => return Err(ConfigError::new(
            "api.revocations_database",
            "revocations must survive a restart: give a file path for them (or configure [usage], \
                 whose database then keeps them)",
        )),
    };
    Ok((
        FixedApi {
            listen: addr,
            metrics_listen,
            limits: limits(&raw.limits)?,
            revocations_db,
        },
        LiveApi {
            keys,
            names,
            trusted_proxies,
            tls,
            region: raw.region,
            fleet,
            client_regions,
        },
    ))
}

fn decode_key(key: &str, k: &str) -> Result<Vec<u8>, ConfigError> {
    match STANDARD.decode(k) {
        Ok(bytes) if bytes.len() >= 16 => Ok(bytes),
        Ok(_) => Err(ConfigError::new(
            key,
            "too short: use at least 16 random bytes (e.g. `head -c 32 /dev/urandom | base64`)",
        )),
        Err(_) => Err(ConfigError::new(
            key,
            "is not base64 (standard alphabet, with padding)",
        )),
    }
}

/// The host of a `host:port` address (IPv6 keeps its brackets).
fn host_of(a: &str) -> &str {
    a.rsplit_once(':').map_or(a, |(h, _)| h)
}

/// `[api.limits]`, each key checked against a sane range.
fn limits(raw: &RawApiLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let range = |key: &str, v: Option<usize>, default: usize, min: usize, max: usize| match v {
        None => Ok(default),
        Some(v) if (min..=max).contains(&v) => Ok(v),
        Some(v) => Err(ConfigError::new(
            format!("api.limits.{key}"),
            format!("must be {min} to {max} (got {v})"),
        )),
    };
    let secs = |key: &str, v: Option<u64>, default: Duration| {
        range(
            key,
            v.map(|s| s as usize),
            default.as_secs() as usize,
            1,
            3600,
        )
        .map(|s| Duration::from_secs(s as u64))
    };
    Ok(Limits {
        max_header_bytes: range(
            "max_header_bytes",
            raw.max_header_bytes,
            d.max_header_bytes,
            1024,
            1 << 20,
        )?,
        max_headers: range("max_headers", raw.max_headers, d.max_headers, 8, 1000)?,
        max_body_bytes: range(
            "max_body_bytes",
            raw.max_body_bytes,
            d.max_body_bytes,
            1024,
            16 << 20,
        )?,
        header_read_timeout: secs(
            "header_read_timeout_seconds",
            raw.header_read_timeout_seconds,
            d.header_read_timeout,
        )?,
        request_timeout: secs(
            "request_timeout_seconds",
            raw.request_timeout_seconds,
            d.request_timeout,
        )?,
        max_connections: range(
            "max_connections",
            raw.max_connections,
            d.max_connections,
            1,
            100_000,
        )?,
        max_concurrent_requests: range(
            "max_concurrent_requests",
            raw.max_concurrent_requests,
            d.max_concurrent_requests,
            1,
            10_000,
        )?,
    })
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
        assert_eq!(
            api.keys,
            [crate::api::AccessKey {
                secret: b"key-key-key-key-key".to_vec(),
                mint: true,
                admin: true
            }],
            "a single list: every role"
        );
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
             [api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"{KEY}\"]\nrevocations_database = \"/tmp/r.db\"\n\
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
    fn roles_names_limits_and_the_plaintext_guard() {
        const ADMIN: &str = "YWRtaW4ta2V5LWFkbWluLWtleQ==";
        let c = RelayConfig::from_toml(&format!(
            "{BASE}[api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"{KEY}\"]\nadmin_keys = [\"{ADMIN}\"]\n\
             revocations_database = \"/tmp/r.db\"\nmetrics_listen = \"127.0.0.1:9090\"\n\
             trusted_proxies = [\"10.0.0.0/8\"]\n[api.limits]\nmax_headers = 20\n"
        ))
        .unwrap();
        let api = c.api().unwrap();
        assert_eq!(
            api.keys
                .iter()
                .map(|k| (k.mint, k.admin))
                .collect::<Vec<_>>(),
            [(true, false), (false, true)]
        );
        assert_eq!(api.names, ["127.0.0.1:8080", "192.0.2.1"], "default names");
        assert_eq!(api.limits.max_headers, 20);
        assert_eq!(
            api.limits.max_body_bytes,
            crate::api::Limits::default().max_body_bytes
        );
        let policy = c.peer_policy();
        assert_eq!(
            policy.check("127.0.0.1:9090".parse().unwrap()),
            Err(crate::policy::Denied::ServicePort),
            "the metrics listener is a service port"
        );
        let plain = "[api]\nlisten = \"192.0.2.1:8080\"\naccess_keys = [\"a2V5LWtleS1rZXkta2V5LWtleQ==\"]\n\
                     revocations_database = \"/tmp/r.db\"\n";
        error(plain, "api.listen", "clear text");
        assert!(RelayConfig::from_toml(&format!(
            "{BASE}{plain}allow_plaintext_on_public_address = true\n"
        ))
        .is_ok());
        error(
            &format!("[api]\nlisten = \"127.0.0.1:1\"\naccess_keys = [\"{KEY}\"]\n"),
            "api.revocations_database",
            "survive a restart",
        );
        error(
            &format!("[api]\nlisten = \"127.0.0.1:1\"\naccess_keys = [\"{KEY}\"]\nrevocations_database = \"r\"\n[api.limits]\nmax_connections = 0\n"),
            "api.limits.max_connections",
            "1 to",
        );
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
