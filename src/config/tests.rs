#![allow(clippy::unwrap_used)]

use super::*;
use crate::auth::RestSecrets;
use crate::policy::Denied;

const OPERATOR: &str = r#"
listen = ["192.0.2.1:3478"]
[relay]
addresses = ["192.0.2.1"]
[rest]
secrets = ["s3cret"]
"#;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Parses `text`, expecting an error; returns it.
#[track_caller]
fn error(text: &str) -> ConfigError {
    match RelayConfig::from_toml(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// The operator config with `extra` top-level keys in front (so before any table header).
fn operator_with(extra: &str) -> String {
    format!("{extra}\n{OPERATOR}")
}

#[track_caller]
fn assert_error(text: &str, key: &str, fact: &str) {
    let e = error(text);
    assert_eq!(e.key, key, "{e}");
    assert!(e.problem.contains(fact), "{e:?} should mention {fact:?}");
    assert_eq!(e.to_string(), format!("{}: {}", e.key, e.problem));
}

#[test]
fn embedded_default_is_the_loopback_demo() {
    let c = RelayConfig::embedded_default();
    assert_eq!(c.fixed.listen, [sa("127.0.0.1:3478")]);
    assert_eq!(c.server().relay_ips, [IpAddr::from([127, 0, 0, 1])]);
    assert_eq!(c.server().relay_ports, 49152..=49999);
    assert_eq!(c.server().realm, "turnpike");
    assert_eq!(
        c.server().users,
        [("demo".to_string(), "demo-pass".to_string())]
    );
    let minted = c.server().rest_secrets.mint("alice", 0, 60).unwrap();
    let expected = RestSecrets::new(vec![b"demo-secret".to_vec()])
        .mint("alice", 0, 60)
        .unwrap();
    assert_eq!(minted, expected);
    assert_eq!(c.fixed.backend, Backend::Auto);
    assert!(c.fixed.workers >= 1);
    assert_eq!(c.fixed.drain, Duration::from_secs(5));
    assert!(c.fixed.pin_workers);
    assert_eq!(c.live.log_level, tracing::Level::INFO);
    assert_eq!(
        (c.fixed.recv_buffer, c.fixed.send_buffer),
        (Some(4 << 20), Some(4 << 20))
    );
    assert!(c.is_loopback_only());

    let policy = &c.peer_policy();
    assert_eq!(policy.check(sa("127.0.0.1:9")), Ok(()));
    assert_eq!(policy.check(sa("[::1]:9")), Ok(()));
    assert_eq!(policy.check(sa("127.0.0.1:3478")), Err(Denied::ServicePort));
    assert_eq!(
        policy.check(sa("10.0.0.1:9")),
        Err(Denied::Builtin("rfc1918"))
    );
}

#[test]
fn operator_config_keeps_deny_by_default() {
    let c = RelayConfig::from_toml(OPERATOR).unwrap();
    assert!(!c.is_loopback_only());
    assert_eq!(c.fixed.listen, [sa("192.0.2.1:3478")]);
    assert_eq!(c.server().relay_ports, 49152..=65535);
    assert!(c.server().users.is_empty());
    assert!(!c.server().rest_secrets.is_empty());
    let policy = &c.peer_policy();
    assert!(matches!(
        policy.check(sa("127.0.0.1:5000")),
        Err(Denied::Builtin(_))
    ));
    assert_eq!(
        policy.check(sa("198.51.100.7:5000")),
        Err(Denied::Builtin("documentation"))
    );
    assert_eq!(policy.check(sa("8.8.8.8:53")), Ok(()));
    assert_eq!(policy.check(sa("192.0.2.1:3478")), Err(Denied::ServicePort));
}

#[test]
fn stream_listeners_tls_and_limits() {
    let c = RelayConfig::from_toml(&operator_with(
        r#"listen_tcp = ["192.0.2.1:3478"]
listen_tls = ["192.0.2.1:443", "[2001:db8::1]:443"]
tls.cert = "/c.pem"
tls.key = "/k.pem"
streams.max_connections = 5
streams.max_connections_per_ip = 2
streams.idle_timeout_seconds = 7
streams.tls_handshake_timeout_seconds = 3
streams.write_queue_bytes = 100000
"#,
    ))
    .unwrap();
    assert_eq!(c.fixed.listen_tcp, [sa("192.0.2.1:3478")]);
    assert_eq!(c.fixed.listen_tls.len(), 2);
    assert_eq!(
        c.live.tls.as_ref().unwrap().key,
        std::path::PathBuf::from("/k.pem")
    );
    assert_eq!(c.fixed.streams.max_per_ip, 2);
    assert_eq!(c.fixed.streams.idle_timeout, Duration::from_secs(7));
    // The stream listeners are service ports too.
    assert_eq!(
        c.server().peer_policy.check(sa("192.0.2.1:443")),
        Err(crate::policy::Denied::ServicePort)
    );
    assert_error(
        &operator_with("listen_tls = [\"192.0.2.1:443\"]"),
        "tls.cert",
        "needs [tls]",
    );
    assert_error(
        &operator_with("listen_tls = [\"192.0.2.1:443\"]\ntls.cert = \"/c\""),
        "tls.key",
        "missing",
    );
    assert_error(
        &operator_with("listen_tcp = [\"nope\"]"),
        "listen_tcp[0]",
        "not an IP:port",
    );
    assert_error(
        &operator_with("streams.idle_timeout_seconds = 0"),
        "streams.idle_timeout_seconds",
        "at least 1",
    );
}

#[test]
fn every_key_is_read() {
    let c = RelayConfig::from_toml(
        r#"
realm = "example.org"
listen = ["192.0.2.1:3478", "[2001:db8::1]:3479"]
workers = 3
backend = "io_uring"
log_level = "debug"
drain_seconds = 30
pin_workers = false
recv_buffer = 1000
send_buffer = 2000
binding_requires_auth = true
password_algorithms = false
alternate_server = "198.51.100.2:3478"
[relay]
addresses = ["192.0.2.1", "2001:db8::1"]
port_min = 50000
port_max = 50100
[[users]]
name = "a"
password = "pa"
[[users]]
name = "b"
password = "pb"
[lifetimes]
default = 60
max = 120
permission = 30
channel = 40
nonce = 50
[quotas]
max_allocations = 10
max_allocations_per_user = 2
max_permissions_per_allocation = 3
max_channels_per_allocation = 4
max_permissions_per_identity = 5
max_channels_per_identity = 6
[peers]
allow = ["10.1.0.0/16"]
deny = ["8.8.8.0/24"]
"#,
    )
    .unwrap();
    assert_eq!(c.server().realm, "example.org");
    assert_eq!(c.fixed.listen.len(), 2);
    assert_eq!(c.fixed.workers, 3);
    assert_eq!(c.fixed.backend, Backend::IoUring);
    assert_eq!(c.live.log_level, tracing::Level::DEBUG);
    assert_eq!(c.fixed.drain, Duration::from_secs(30));
    assert!(!c.fixed.pin_workers);
    assert_eq!(
        (c.fixed.recv_buffer, c.fixed.send_buffer),
        (Some(1000), Some(2000))
    );
    assert!(c.server().binding_requires_auth && !c.server().password_algorithms);
    assert_eq!(c.server().alternate_server, Some(sa("198.51.100.2:3478")));
    assert_eq!(c.server().relay_ips.len(), 2);
    assert_eq!(c.server().relay_ports, 50000..=50100);
    assert_eq!(c.server().users.len(), 2);
    assert!(c.server().rest_secrets.is_empty());
    let s = &c.server();
    assert_eq!(
        (
            s.default_lifetime,
            s.max_lifetime,
            s.permission_lifetime,
            s.channel_lifetime,
            s.nonce_lifetime
        ),
        (60, 120, 30, 40, 50)
    );
    assert_eq!(
        (
            s.max_allocations,
            s.max_allocations_per_user,
            s.max_permissions_per_allocation
        ),
        (10, 2, 3)
    );
    assert_eq!(
        (
            s.max_channels_per_allocation,
            s.max_permissions_per_identity,
            s.max_channels_per_identity
        ),
        (4, 5, 6)
    );
    assert_eq!(s.peer_policy.check(sa("10.1.2.3:9")), Ok(()));
    assert_eq!(
        s.peer_policy.check(sa("10.2.2.3:9")),
        Err(Denied::Builtin("rfc1918"))
    );
    assert_eq!(
        s.peer_policy.check(sa("8.8.8.8:53")),
        Err(Denied::Configured)
    );
    assert_eq!(
        s.peer_policy.check(sa("[2001:db8::1]:3479")),
        Err(Denied::ServicePort)
    );
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    assert_error(&operator_with("relam = \"x\""), "relam", "relam");
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1\"]\nprot_min = 50000\n",
        "relay.prot_min",
        "prot_min",
    );
    assert_error(
        &format!("{OPERATOR}\n[[users]]\nname = \"a\"\npasword = \"b\"\n"),
        "users[0].pasword",
        "pasword",
    );
    assert_error(&format!("{OPERATOR}\n[relya]\n"), "relya", "relya");
    assert_error(
        &format!("{OPERATOR}\n[[usres]]\nname = \"a\"\n"),
        "usres",
        "usres",
    );
}

#[test]
fn type_errors_name_the_key() {
    assert_error(&operator_with("workers = \"four\""), "workers", "string");
    assert_error(
        "listen = [\n  \"192.0.2.1:3478\",\n  7,\n]\n[relay]\naddresses = [\"192.0.2.1\"]\n",
        "listen[1]",
        "integer",
    );
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1\"]\nport_max = 70000\n",
        "relay.port_max",
        "70000",
    );
    assert_error(
        &format!("{OPERATOR}\n[[users]]\nname = \"a\"\n"),
        "users[0]",
        "password",
    );
}

#[test]
fn toml_syntax_errors_have_line_and_column() {
    let e = error("realm = \"x\"\nlisten = [\n");
    assert_eq!(e.key, "config");
    assert!(e.problem.contains("line"), "{e}");
    // Dotted keys parse, and their errors still carry a position.
    let e = error(&operator_with("quotas.max_allocations = \"many\""));
    assert!(e.problem.contains("line 1"), "{e}");
    let c = RelayConfig::from_toml(&operator_with("quotas.max_allocations = 7"));
    assert_eq!(c.unwrap().live.quotas.max_allocations, 7);
}

#[test]
fn bad_cidr_names_its_index() {
    let e = error(&format!(
        "{OPERATOR}\n[peers]\nallow = [\"10.0.0.0/8\", \"::1/128\", \"10.0.0.0/33\"]\n"
    ));
    assert_eq!(e.key, "peers.allow[2]");
    assert!(e.problem.contains("33"), "{e}");
    let e = error(&format!("{OPERATOR}\n[peers]\ndeny = [\"not-an-ip\"]\n"));
    assert_eq!(e.key, "peers.deny[0]");
    assert!(e.problem.contains("not-an-ip"), "{e}");
}

#[test]
fn relay_errors() {
    assert_error(
            "[relay]\naddresses = [\"192.0.2.1\"]\nport_min = 60000\nport_max = 50000\n[rest]\nsecrets = [\"s\"]\n",
            "relay.port_min",
            "60000 > 50000",
        );
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1\"]\nport_min = 0\n[rest]\nsecrets = [\"s\"]\n",
        "relay.port_min",
        "above 0",
    );
    assert_error(
        "[rest]\nsecrets = [\"s\"]\n",
        "relay.addresses",
        "relay address",
    );
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1\", \"0.0.0.0\"]\n[rest]\nsecrets = [\"s\"]\n",
        "relay.addresses",
        "0.0.0.0",
    );
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1:3478\"]\n",
        "relay.addresses[0]",
        "192.0.2.1:3478",
    );
}

#[test]
fn credential_errors() {
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1\"]\n",
        "users",
        "REST secrets",
    );
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1\"]\n[rest]\nsecrets = []\n",
        "users",
        "REST secrets",
    );
    assert_error(
        &format!("{OPERATOR}\n[[users]]\nname = \"a\"\npassword = \"\"\n"),
        "users[0].password",
        "empty",
    );
    assert_error(
            &format!("{OPERATOR}\n[[users]]\nname = \"a\"\npassword = \"1\"\n[[users]]\nname = \"a\"\npassword = \"2\"\n"),
            "users[1].name",
            "twice",
        );
    assert_error(
        &format!("{OPERATOR}\n[[users]]\nname = \"\"\npassword = \"1\"\n"),
        "users",
        "1 to 512",
    );
    assert_error(
        "[relay]\naddresses = [\"192.0.2.1\"]\n[rest]\nsecrets = [\"a\", \"\"]\n",
        "rest.secrets[1]",
        "empty",
    );
    assert_error(&operator_with("realm = \"\""), "realm", "1 to 127");
    assert_error(
        &format!("{OPERATOR}[quotas]\nmax_channels_per_identity = 0\n"),
        "quotas.max_channels_per_identity",
        "at least 1",
    );
}

/// Design §3: a 401 past 3× a minimal Allocate would never be sent over UDP, so a realm that makes one
/// is refused, naming the key. PASSWORD-ALGORITHMS is accepted: it is advertised only where it fits.
#[test]
fn challenge_past_3x_is_refused() {
    assert_error(
        &operator_with("realm = \"turn.example.org\""),
        "realm",
        "at most 12 bytes",
    );
    let c = RelayConfig::from_toml(&operator_with("password_algorithms = true"))
        .expect("password_algorithms = true is accepted");
    assert!(c.server().password_algorithms);
}

#[test]
fn scalar_errors() {
    assert_error(&operator_with("backend = \"uring\""), "backend", "io_uring");
    assert_error(
        &operator_with("log_level = \"verbose\""),
        "log_level",
        "\"trace\"",
    );
    assert_error(&operator_with("log_level = \"INFO\""), "log_level", "INFO");
    assert_error(&operator_with("workers = 5000"), "workers", "5000");
    assert_error(
        &operator_with("recv_buffer = 0"),
        "recv_buffer",
        "kernel default",
    );
    assert_error(
        &operator_with("alternate_server = \"198.51.100.2\""),
        "alternate_server",
        "198.51.100.2",
    );
    assert_error(
        &operator_with("alternate_server = \"0.0.0.0:3478\""),
        "alternate_server",
        "0.0.0.0:3478",
    );
    let c = RelayConfig::from_toml(&operator_with("workers = 1024\nbackend = \"epoll\""));
    let c = c.unwrap();
    assert_eq!((c.fixed.workers, c.fixed.backend), (1024, Backend::Epoll));
}

#[test]
fn listen_errors() {
    let relay = "[relay]\naddresses = [\"192.0.2.1\"]\n[rest]\nsecrets = [\"s\"]\n";
    assert_error(
        &format!("listen = [\"192.0.2.1:0\"]\n{relay}"),
        "listen[0]",
        "port 0",
    );
    assert_error(
        &format!("listen = [\"0.0.0.0:3478\", \"0.0.0.0:3478\"]\n{relay}"),
        "listen[1]",
        "twice",
    );
    // Wildcards are listen addresses; the token API then needs the addresses clients reach.
    let c = RelayConfig::from_toml(&format!(
        "listen = [\"0.0.0.0:3478\", \"[::]:3478\"]\nlisten_tcp = [\"0.0.0.0:3478\"]\n{relay}"
    ))
    .unwrap();
    assert_eq!(c.fixed.listen, [sa("0.0.0.0:3478"), sa("[::]:3478")]);
    assert_error(
        &format!(
            "listen = [\"0.0.0.0:3478\"]\n{relay}[api]\nlisten = \"127.0.0.1:8080\"\n\
             access_keys = [\"c2VjcmV0LWtleS1vZi10aGlydHktdHdvLWJ5dGVzISE=\"]\n\
             revocations_database = \"/tmp/r.db\"\n"
        ),
        "api.public_addresses",
        "0.0.0.0:3478",
    );
    assert_error(
        &format!("listen = [\"192.0.2.1\"]\n{relay}"),
        "listen[0]",
        "192.0.2.1",
    );
    assert_error(
        &format!("listen = [\"192.0.2.1:3478\", \"192.0.2.1:3478\"]\n{relay}"),
        "listen[1]",
        "twice",
    );
    assert_error(&format!("listen = []\n{relay}"), "listen", "at least one");
}

#[test]
fn lifetime_errors() {
    assert_error(
        &format!("{OPERATOR}\n[lifetimes]\ndefault = 600\nmax = 300\n"),
        "lifetimes.max",
        "300 < 600",
    );
    assert_error(
        &format!("{OPERATOR}\n[lifetimes]\npermission = 0\n"),
        "lifetimes.permission",
        "at least 1",
    );
}

#[test]
fn is_loopback_only_needs_every_address_on_loopback() {
    let with = |listen: &str, relay: &str| {
        RelayConfig::from_toml(&format!(
            "listen = [{listen}]\n[relay]\naddresses = [{relay}]\n[rest]\nsecrets = [\"s\"]\n"
        ))
        .unwrap()
        .is_loopback_only()
    };
    assert!(with(
        "\"127.0.0.1:3478\", \"[::1]:3478\"",
        "\"127.0.0.2\", \"::1\""
    ));
    assert!(with("\"127.0.0.1:3478\"", "\"::ffff:127.0.0.1\""));
    assert!(!with("\"127.0.0.1:3478\"", "\"127.0.0.1\", \"192.0.2.1\""));
    assert!(!with(
        "\"127.0.0.1:3478\", \"192.0.2.1:3478\"",
        "\"127.0.0.1\""
    ));
}

#[test]
fn load_names_the_path() {
    let path = Path::new("/nonexistent/turnpike-test/turnpike.toml");
    let e = RelayConfig::load(path).unwrap_err();
    assert_eq!(e.key, "config");
    assert!(
        e.problem
            .contains("/nonexistent/turnpike-test/turnpike.toml"),
        "{e}"
    );

    let path = std::env::temp_dir().join(format!("turnpike-config-{}.toml", std::process::id()));
    std::fs::write(&path, DEFAULT_CONFIG).unwrap();
    let loaded = RelayConfig::load(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded.unwrap().fixed.listen, [sa("127.0.0.1:3478")]);
}

#[test]
fn backend_names_round_trip() {
    for b in [Backend::Auto, Backend::IoUring, Backend::Epoll] {
        let c = RelayConfig::from_toml(&operator_with(&format!("backend = \"{b}\""))).unwrap();
        assert_eq!(c.fixed.backend, b);
    }
}

#[test]
fn durations_and_sizes_are_bounded() {
    // now + drain at SIGTERM must not overflow: an hour at most.
    assert_error(
        &operator_with("drain_seconds = 9223372036854775807"),
        "drain_seconds",
        "at most 3600",
    );
    let c = RelayConfig::from_toml(&operator_with("drain_seconds = 3600")).unwrap();
    assert_eq!(c.fixed.drain, MAX_DRAIN);
    for (key, max) in [
        ("streams.idle_timeout_seconds", 86_400u64),
        ("streams.tls_handshake_timeout_seconds", 3600),
        ("streams.write_queue_bytes", 64 << 20),
        ("recv_buffer", 1 << 30),
        ("send_buffer", 1 << 30),
    ] {
        assert!(RelayConfig::from_toml(&operator_with(&format!("{key} = {max}"))).is_ok());
        assert_error(
            &operator_with(&format!("{key} = {}", max + 1)),
            key,
            &format!("at most {max}"),
        );
    }
    for key in ["default", "max", "permission", "channel", "nonce"] {
        assert_error(
            &format!("{OPERATOR}\n[lifetimes]\n{key} = 86401\n"),
            &format!("lifetimes.{key}"),
            "at most 86400",
        );
    }
}

#[test]
fn caps_are_fitted_under_the_open_file_limit() {
    // UDP only: the allocations take what is left beside the reserve.
    let mut c = RelayConfig::from_toml(&operator_with("workers = 2")).unwrap();
    let fit = c.fit_open_files(20_000, 0).unwrap();
    assert_eq!(fit.reserve, 2 * (8 + 2) + 128);
    assert_eq!(fit.configured, (100_000, 10_000));
    assert_eq!(fit.fitted, (20_000 - 148, 10_000), "no stream listeners");
    assert!(fit.lowered());
    assert_eq!(c.live.quotas.max_allocations, 20_000 - 148);
    assert_eq!(c.server().max_allocations, 20_000 - 148);

    // With stream listeners both caps come down in proportion, and add up to what is available.
    let mut c = RelayConfig::from_toml(&operator_with(
        "workers = 1\nlisten_tcp = [\"192.0.2.1:3478\"]\nquotas.max_allocations = 30000",
    ))
    .unwrap();
    let fit = c.fit_open_files(10_000, 1).unwrap();
    let available = 10_000 - fit.reserve;
    assert_eq!(fit.fitted.0 + fit.fitted.1, available as usize);
    assert_eq!(fit.fitted.0, (available * 3 / 4) as usize);
    assert_eq!(c.fixed.streams.max_connections, fit.fitted.1);

    // Caps that fit are left alone; a limit below the reserve is an error naming the key and limit.
    let mut c =
        RelayConfig::from_toml(&operator_with("workers = 1\nquotas.max_allocations = 10")).unwrap();
    assert!(!c.fit_open_files(1024, 0).unwrap().lowered());
    let e = c.fit_open_files(64, 0).unwrap_err();
    assert_eq!(e.key, "quotas.max_allocations");
    assert!(e.problem.contains("RLIMIT_NOFILE) is 64"), "{e}");
}

#[test]
fn listener_sockets_count_after_wildcard_handling() {
    let reserve = |listen: &str, stream_sockets: usize| {
        let text = OPERATOR.replace("192.0.2.1:3478\"]", &format!("{listen}\"]"));
        RelayConfig::from_toml(&format!("workers = 2\n{text}"))
            .unwrap()
            .fit_open_files(20_000, stream_sockets)
            .unwrap()
            .reserve
    };
    // A UDP wildcard is one socket per worker (pktinfo tells its addresses apart), plus its clone.
    let fixed_udp = reserve("192.0.2.1:3478", 0);
    assert_eq!(
        reserve("0.0.0.0:3478", 0),
        fixed_udp,
        "one UDP socket per entry"
    );
    // Each TCP/TLS socket (a wildcard expanded by the caller) is one per worker, with no clone.
    assert_eq!(reserve("192.0.2.1:3478", 3), fixed_udp + 2 * 3);
}

#[test]
fn the_apis_connections_count_in_the_open_file_budget() {
    const API: &str = "[api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5\"]\n\
                       revocations_database = \"/tmp/r.db\"\n";
    let udp_only = RelayConfig::from_toml(&operator_with("workers = 2"))
        .unwrap()
        .fit_open_files(20_000, 0)
        .unwrap();
    // Its listener and every connection `api.limits.max_connections` lets it hold.
    let mut c = RelayConfig::from_toml(&format!(
        "workers = 2\n{OPERATOR}{API}[api.limits]\nmax_connections = 5000\n"
    ))
    .unwrap();
    let fit = c.fit_open_files(20_000, 0).unwrap();
    assert_eq!(fit.reserve, udp_only.reserve + 1 + 5000);
    assert_eq!(fit.fitted.0, 20_000 - fit.reserve as usize);
    assert_eq!(c.live.quotas.max_allocations, fit.fitted.0);
    // A separate /metrics listener is one more; the connection budget is shared.
    let mut c = RelayConfig::from_toml(&format!(
        "workers = 2\n{OPERATOR}{API}metrics_listen = \"127.0.0.1:9090\"\n\
         [api.limits]\nmax_connections = 5000\n"
    ))
    .unwrap();
    assert_eq!(
        c.fit_open_files(20_000, 0).unwrap().reserve,
        udp_only.reserve + 2 + 5000
    );
    // An API that alone takes the whole limit: not even one allocation fits, and the error says
    // which key to lower.
    let mut c = RelayConfig::from_toml(&format!(
        "workers = 2\n{OPERATOR}{API}[api.limits]\nmax_connections = 20000\n"
    ))
    .unwrap();
    let e = c.fit_open_files(20_000, 0).unwrap_err();
    assert!(e.problem.contains("api.limits.max_connections"), "{e}");
}

#[test]
fn fleet_ledger_keys_are_checked() {
    let usage = "[usage]\ndatabase = \"/tmp/u.db\"\n";
    let ok = format!(
        "{OPERATOR}{usage}[fleet]\npostgres = \"host=127.0.0.1 user=t dbname=t\"\n\
         password_env = \"PGPASS_VAR\"\n"
    );
    let c = RelayConfig::from_toml(&ok).unwrap();
    let f = c.fixed.fleet.unwrap();
    assert_eq!(f.password, crate::fleet::Password::Env("PGPASS_VAR".into()));
    assert_eq!(f.tls, crate::fleet::Tls::Disable);
    assert_eq!(
        (f.ship_interval, f.batch, f.migrate, f.pool_size),
        (Duration::from_secs(5), 1000, true, 4)
    );
    // Without [usage] the ledger is only read (`turnpike api`, `turnpike usage`); a relay refuses
    // to start so (service::start_with).
    let read_only = RelayConfig::from_toml(&format!("{OPERATOR}[fleet]\npostgres = \"host=x\"\n"));
    assert!(read_only.unwrap().fixed.fleet.is_some());
    assert_error(
        &format!("{OPERATOR}{usage}[fleet]\npostgres = \"host=x\"\npool_size = 0\n"),
        "fleet.pool_size",
        "1 to 64",
    );
    assert_error(
        &format!("{OPERATOR}{usage}[fleet]\npostgres = \"host=x\"\ntls = \"require\"\n"),
        "fleet.ca_file",
        "CA",
    );
    assert_error(
        &format!(
            "{OPERATOR}{usage}[fleet]\npostgres = \"host=x\"\npassword_file = \"/p\"\n\
             password_env = \"P\"\n"
        ),
        "fleet.password_file",
        "not both",
    );
    assert_error(
        &format!("{OPERATOR}{usage}[fleet]\npostgres = \"host=x\"\nbatch = 0\n"),
        "fleet.batch",
        "1 to 100000",
    );
    assert_error(
        &format!("{OPERATOR}{usage}[fleet]\npostgres = \"\"\n"),
        "fleet.postgres",
        "connection string",
    );
}

#[test]
fn fixed_changes_are_one_line_per_setting_and_live_changes_are_none() {
    let old = RelayConfig::from_toml(&operator_with("workers = 2")).unwrap();
    // Live settings only: no fixed change.
    let live = RelayConfig::from_toml(&format!(
        "workers = 2\nlog_level = \"debug\"\n{OPERATOR}\n[peers]\ndeny = [\"203.0.113.0/24\"]\n\
         [[users]]\nname = \"carol\"\npassword = \"carol-pass\""
    ))
    .unwrap();
    assert_eq!(old.fixed.changes(&live.fixed), Vec::<String>::new());
    // Listen addresses, workers, backend and the port range: one line each, naming key and values.
    let fixed = RelayConfig::from_toml(
        "listen = [\"192.0.2.1:3479\"]\nworkers = 3\nbackend = \"epoll\"\n\
         [relay]\naddresses = [\"192.0.2.1\"]\nport_min = 50000\nport_max = 50999\n\
         [rest]\nsecrets = [\"s3cret\"]\n",
    )
    .unwrap();
    let lines = old.fixed.changes(&fixed.fixed);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert_eq!(
        lines[0],
        "listen: changed from [192.0.2.1:3478] to [192.0.2.1:3479], which needs a restart; keeping \
         [192.0.2.1:3478]"
    );
    assert!(
        lines[1].starts_with("workers: changed from 2 to 3"),
        "{lines:#?}"
    );
    assert!(
        lines[2].starts_with("backend: changed from Auto to Epoll"),
        "{lines:#?}"
    );
    assert!(
        lines[3].starts_with("relay.port_min..relay.port_max: changed"),
        "{lines:#?}"
    );
}

#[test]
fn pid_file_defaults_to_none() {
    let c = RelayConfig::from_toml(OPERATOR).unwrap();
    assert_eq!(c.fixed.pid_file, None);
    let c = RelayConfig::from_toml(&operator_with("pid_file = \"/run/turnpike/turnpike.pid\""))
        .unwrap();
    assert_eq!(
        c.fixed.pid_file.as_deref(),
        Some(Path::new("/run/turnpike/turnpike.pid"))
    );
    assert_error(&operator_with("pid_file = \"\""), "pid_file", "empty");
}

#[test]
fn xdp_is_off_by_default_validated_and_fixed() {
    use crate::xdp::{XdpMode, XdpSettings};
    let plain = RelayConfig::from_toml(OPERATOR).unwrap();
    assert_eq!(plain.fixed.xdp, XdpSettings::default());
    assert_eq!(plain.fixed.xdp.mode, XdpMode::Off);
    let on = RelayConfig::from_toml(&format!(
        "{OPERATOR}\n[xdp]\ninterfaces = [\"eth0\", \"veth-r1\"]\nmode = \"auto\"\n"
    ))
    .unwrap();
    assert_eq!(
        on.fixed.xdp,
        XdpSettings {
            interfaces: vec!["eth0".into(), "veth-r1".into()],
            mode: XdpMode::Auto,
        }
    );
    for (mode, want) in [("native", XdpMode::Native), ("generic", XdpMode::Generic)] {
        let c = RelayConfig::from_toml(&format!(
            "{OPERATOR}\n[xdp]\ninterfaces = [\"eth0\"]\nmode = \"{mode}\"\n"
        ))
        .unwrap();
        assert_eq!(c.fixed.xdp.mode, want);
    }
    assert_error(
        &format!("{OPERATOR}\n[xdp]\nmode = \"native\"\n"),
        "xdp.interfaces",
        "at least one interface",
    );
    assert_error(
        &format!("{OPERATOR}\n[xdp]\ninterfaces = [\"eth0\", \"eth0\"]\nmode = \"auto\"\n"),
        "xdp.interfaces[1]",
        "listed twice",
    );
    for bad in ["", "a/b", "sixteen-bytes-xx", "a b"] {
        assert_error(
            &format!("{OPERATOR}\n[xdp]\ninterfaces = [\"{bad}\"]\nmode = \"auto\"\n"),
            "xdp.interfaces[0]",
            "not an interface name",
        );
    }
    let e = error(&format!(
        "{OPERATOR}\n[xdp]\ninterfaces = [\"eth0\"]\nmode = \"fast\"\n"
    ));
    assert!(e.to_string().contains("fast"), "{e}");
    // A reload reports [xdp] as fixed and keeps the running value.
    let lines = plain.fixed.changes(&on.fixed);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("xdp: changed from") && lines[0].contains("needs a restart"),
        "{lines:#?}"
    );
}

/// `relay.external` (1:1 NAT) and the public addresses: both feed the own-address set, the external
/// pairs reach the TURN core, and the token API announces the public side of a NAT-ed listener.
#[test]
fn external_pairs_and_public_addresses_are_own_addresses() {
    const KEY: &str = "c2VjcmV0LWtleS1vZi10aGlydHktdHdvLWJ5dGVzISE=";
    let c = RelayConfig::from_toml(&format!(
        "listen = [\"10.0.0.5:3478\"]\n\
         [relay]\naddresses = [\"10.0.0.5\", \"2001:db8::5\"]\n\
         external = [{{ private = \"10.0.0.5\", public = \"198.51.99.7\" }}]\n\
         [rest]\nsecrets = [\"s\"]\n\
         [api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"{KEY}\"]\n\
         revocations_database = \"/tmp/r.db\"\n\
         public_tls_addresses = [\"198.51.99.8:443\", \"turn.example.org:443\"]\n"
    ))
    .unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(c.fixed.external, [(ip("10.0.0.5"), ip("198.51.99.7"))]);
    let s = c.server();
    assert_eq!(s.external, c.fixed.external);
    // The external public IP and the literal public address; the host name is not resolved.
    assert_eq!(s.own_ips, [ip("198.51.99.7"), ip("198.51.99.8")]);
    // The API's default UDP address is the listener as seen from outside.
    let me = &c.live.api.as_ref().unwrap().fleet[0];
    assert_eq!(me.addresses, ["198.51.99.7:3478"]);

    // What a plain public address contributes, without NAT.
    let plain = RelayConfig::from_toml(&format!(
        "{OPERATOR}\n[api]\nlisten = \"127.0.0.1:8080\"\naccess_keys = [\"{KEY}\"]\n\
         revocations_database = \"/tmp/r.db\"\n\
         public_addresses = [\"[2001:db8:1::9]:3478\", \"198.51.99.9:3478\"]\n"
    ))
    .unwrap();
    assert_eq!(
        plain.server().own_ips,
        [ip("198.51.99.9"), ip("2001:db8:1::9")]
    );
    assert!(RelayConfig::from_toml(OPERATOR)
        .unwrap()
        .server()
        .own_ips
        .is_empty());
}

#[test]
fn external_errors_name_the_key() {
    let with = |ext: &str| {
        format!(
            "[relay]\naddresses = [\"10.0.0.5\", \"10.0.0.6\", \"2001:db8::5\"]\nexternal = [{ext}]\n\
             [rest]\nsecrets = [\"s\"]\n"
        )
    };
    for (ext, key, fact) in [
        (
            r#"{ private = "10.0.0.9", public = "198.51.99.7" }"#,
            "relay.external[0].private",
            "not one of relay.addresses",
        ),
        (
            r#"{ private = "10.0.0.5", public = "2001:db8:9::7" }"#,
            "relay.external[0].public",
            "same family",
        ),
        (
            r#"{ private = "10.0.0.5", public = "0.0.0.0" }"#,
            "relay.external[0].public",
            "specific address",
        ),
        (
            r#"{ private = "10.0.0.5", public = "10.0.0.6" }"#,
            "relay.external[0].public",
            "not a relay address",
        ),
        (
            r#"{ private = "10.0.0.5", public = "198.51.99.7:3478" }"#,
            "relay.external[0].public",
            "no port",
        ),
        (
            r#"{ private = "10.0.0.5", public = "198.51.99.7" }, { private = "10.0.0.5", public = "198.51.99.8" }"#,
            "relay.external[1].private",
            "mapped twice",
        ),
        (
            r#"{ private = "10.0.0.5", public = "198.51.99.7" }, { private = "10.0.0.6", public = "198.51.99.7" }"#,
            "relay.external[1].public",
            "two relay addresses",
        ),
        (r#"{ private = "10.0.0.5" }"#, "relay.external", "public"),
    ] {
        let e = error(&with(ext));
        assert!(e.key.starts_with(key), "{ext}: {e}");
        assert!(
            e.problem.contains(fact),
            "{ext}: {e:?} should mention {fact:?}"
        );
    }
    // A reload reports a changed mapping as a fixed setting.
    let old = RelayConfig::from_toml(&with("")).unwrap();
    let new = RelayConfig::from_toml(&with(r#"{ private = "10.0.0.5", public = "198.51.99.7" }"#))
        .unwrap();
    let lines = old.fixed.changes(&new.fixed);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("relay.external: changed from [] to [(10.0.0.5, 198.51.99.7)]"),
        "{lines:#?}"
    );
}

/// `turnpike api` reads the same file format without the relay's checks: no listener and no `[relay]`
/// needed, but `[api]` and the REST secrets it mints with are.
#[test]
fn the_api_alone_needs_no_relay_section_but_an_api_and_secrets() {
    const API: &str = r#"
[rest]
secrets = ["s3cret"]
[api]
listen = "127.0.0.1:8080"
access_keys = ["dHVybnBpa2UtdGVzdC1hY2Nlc3Mta2V5"]
revocations_database = "/tmp/revocations.db"
[[api.fleet]]
id = "eu-1"
region = "eu"
addresses = ["203.0.113.5:3478"]
"#;
    let c = RelayConfig::from_toml_api(API).unwrap();
    assert_eq!(c.api().unwrap().fleet.last().unwrap().id, "eu-1");
    // The relay itself still needs its relay addresses.
    assert_eq!(
        RelayConfig::from_toml(API).unwrap_err().key,
        "relay.addresses"
    );
    let no_api = "[rest]\nsecrets = [\"s3cret\"]\n";
    assert_eq!(RelayConfig::from_toml_api(no_api).unwrap_err().key, "api");
    let no_secrets = API.replace("secrets = [\"s3cret\"]", "");
    assert_eq!(
        RelayConfig::from_toml_api(&no_secrets).unwrap_err().key,
        "rest.secrets"
    );
}
