//! [`Api::handle`] without sockets: signed requests in, exact responses out.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use super::*;

const PATH: &str = "/networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview";
const HOST: &str = "api.example:443";
const KEY: &[u8] = b"access-key";
const MINT_ONLY: &[u8] = b"mint-only-key";

fn temp_db() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "turnpike-api-unit-{}-{}.db",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

type Revoked = Arc<Mutex<Vec<(String, u64, bool)>>>;

fn api(revoked: Revoked, draining: bool) -> Api {
    let config = Config {
        listen: "127.0.0.1:443".parse().unwrap(),
        metrics_listen: None,
        tls: None,
        keys: [b"old-key".as_slice(), KEY]
            .into_iter()
            .map(|k| AccessKey {
                secret: k.to_vec(),
                mint: true,
                admin: true,
            })
            .chain([AccessKey {
                secret: MINT_ONLY.to_vec(),
                mint: true,
                admin: false,
            }])
            .collect(),
        names: vec!["api.example".into()],
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        revocations_db: temp_db(),
        limits: Limits::default(),
        fleet: vec![
            FleetRelay {
                id: "eu-1".into(),
                region: "eu".into(),
                addresses: vec!["192.0.2.1:3478".into(), "[2001:db8::1]:3478".into()],
                tcp_addresses: Vec::new(),
                tls_addresses: Vec::new(),
            },
            FleetRelay {
                id: "us-1".into(),
                region: "us".into(),
                addresses: vec!["198.51.100.1:3478".into()],
                tcp_addresses: vec!["198.51.100.1:3478".into()],
                tls_addresses: vec!["198.51.100.1:443".into()],
            },
        ],
        region: "eu".into(),
        client_regions: vec![("203.0.113.0/24".parse().unwrap(), "us".into())],
        usage_db: None,
    };
    let hooks = Hooks {
        revoke: Box::new(move |id, until, terminate| {
            revoked.lock().unwrap().push((id.into(), until, terminate))
        }),
        metrics: Box::new(move || {
            Some(metrics::Snapshot {
                backend: "epoll",
                draining,
                ..Default::default()
            })
        }),
        fleet_revoke: None,
        fleet_relays: None,
        ledger: None,
    };
    Api::new(
        config,
        RestSecrets::new(vec![b"relay-secret".to_vec()]),
        hooks,
    )
    .unwrap()
}

fn signed<'a>(
    method: &'a str,
    url: &'a str,
    body: &'a [u8],
    key: &[u8],
    at: SystemTime,
) -> Request<'a> {
    let (date, hash, auth) = sign::sign(key, method, url, HOST, body, at);
    Request {
        method,
        url,
        headers: vec![
            ("Host".into(), HOST.into()),
            ("x-ms-date".into(), date),
            ("x-ms-content-sha256".into(), hash),
            ("Authorization".into(), auth),
        ],
        body,
        peer: Some("192.0.2.200".parse().unwrap()),
    }
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn issues_credentials_for_every_route_type_that_the_relays_accept() {
    let a = api(Arc::default(), false);
    let body = br#"{"id": "8:acs:carol", "ttl": 3600}"#;
    let r = a.handle(&signed("POST", PATH, body, KEY, now()), now());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(&r);
    assert_eq!(v["expiresOn"], "2027-01-15T09:00:00Z");
    let servers = v["iceServers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "no routeType: one entry per route type");
    assert_eq!(servers[0]["routeType"], "any");
    assert_eq!(
        servers[0]["urls"],
        json!([
            "stun:192.0.2.1:3478",
            "turn:192.0.2.1:3478?transport=udp",
            "stun:[2001:db8::1]:3478",
            "turn:[2001:db8::1]:3478?transport=udp",
            "stun:198.51.100.1:3478",
            "turn:198.51.100.1:3478?transport=udp",
            "turn:198.51.100.1:3478?transport=tcp",
            "turns:198.51.100.1:443?transport=tcp"
        ])
    );
    assert_eq!(servers[1]["routeType"], "nearest");
    assert_eq!(
        servers[1]["urls"].as_array().unwrap().len(),
        4,
        "the API host's region: eu"
    );
    let username = servers[0]["username"].as_str().unwrap();
    assert_eq!(username, "1800003600:8:acs:carol");
    // The relays verify it with the shared secret, and bill "8:acs:carol".
    let password = servers[0]["credential"].as_str().unwrap();
    let relay = RestSecrets::new(vec![b"relay-secret".to_vec()]);
    assert!(relay
        .passwords(username, 1_800_000_000)
        .unwrap()
        .any(|p| p == password));
    assert_eq!(
        crate::auth::parse_rest_username(username).unwrap().user,
        "8:acs:carol"
    );

    // nearest for a client in a configured CIDR: that region's relays.
    let body = br#"{"routeType": "nearest"}"#;
    let mut req = signed("POST", PATH, body, KEY, now());
    req.peer = Some("203.0.113.9".parse().unwrap());
    let v = json_of(&a.handle(&req, now()));
    assert_eq!(v["iceServers"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["iceServers"][0]["urls"],
        json!([
            "stun:198.51.100.1:3478",
            "turn:198.51.100.1:3478?transport=udp",
            "turn:198.51.100.1:3478?transport=tcp",
            "turns:198.51.100.1:443?transport=tcp"
        ])
    );
    // Without an id each token has an identity of its own.
    let user = |v: &Value| v["iceServers"][0]["username"].as_str().unwrap().to_string();
    let again = json_of(&a.handle(&signed("POST", PATH, body, KEY, now()), now()));
    assert!(user(&v).contains(":anonymous-"), "{}", user(&v));
    assert_ne!(
        user(&v),
        user(&again),
        "two anonymous tokens, two identities"
    );
}

#[test]
fn ttl_rules_follow_the_cloud_api() {
    let a = api(Arc::default(), false);
    let expiry = |body: &[u8]| {
        let r = a.handle(&signed("POST", PATH, body, KEY, now()), now());
        (r.status, json_of(&r))
    };
    let (s, v) = expiry(br#"{"ttl": 999999}"#);
    assert_eq!(
        (s, v["expiresOn"].as_str()),
        (200, Some("2027-01-17T08:00:00Z")),
        "too large: the default (48 h)"
    );
    let (s, v) = expiry(b"");
    assert_eq!(
        (s, v["expiresOn"].as_str()),
        (200, Some("2027-01-17T08:00:00Z")),
        "no body: the default"
    );
    for bad in [
        &br#"{"ttl": -1}"#[..],
        br#"{"ttl": 1.5}"#,
        br#"{"ttl": "60"}"#,
        br#"{"routeType": "fastest"}"#,
        b"[1]",
        br#"{"id": 7}"#,
    ] {
        let (s, v) = expiry(bad);
        assert_eq!(s, 400, "{}", String::from_utf8_lossy(bad));
        assert_eq!(v["error"]["code"], "InvalidRequest");
        assert!(v["error"]["message"].is_string());
    }
}

#[test]
fn bad_signatures_content_hashes_and_dates_get_401_with_a_json_error() {
    let a = api(Arc::default(), false);
    let body = br#"{"ttl": 60}"#;
    let mut cases = Vec::new();
    cases.push(signed("POST", PATH, body, b"wrong-key", now()));
    let mut r = signed("POST", PATH, body, KEY, now());
    r.body = br#"{"ttl": 61}"#;
    cases.push(r);
    cases.push(signed(
        "POST",
        PATH,
        body,
        KEY,
        now() - Duration::from_secs(16 * 60),
    ));
    let mut r = signed("POST", PATH, body, KEY, now());
    r.headers.retain(|(n, _)| n != "Authorization");
    cases.push(r);
    for req in cases {
        let resp = a.handle(&req, now());
        assert_eq!(resp.status, 401);
        let v = json_of(&resp);
        assert_eq!(v["error"]["code"], "Unauthorized");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }
    // Any configured key works (rotation).
    assert_eq!(
        a.handle(&signed("POST", PATH, body, b"old-key", now()), now())
            .status,
        200
    );
}

#[test]
fn revoke_reaches_the_relay_and_health_metrics_and_routing() {
    let revoked = Arc::new(Mutex::new(Vec::new()));
    let a = api(revoked.clone(), false);
    let url = "/admin/revoke?api-version=2022-03-01-preview";
    let r = a.handle(
        &signed("POST", url, br#"{"id": "carol"}"#, KEY, now()),
        now(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        json_of(&r)["until"],
        "2027-01-17T08:05:00Z",
        "now + max ttl + skew: every credential a relay still accepts"
    );
    let r = a.handle(
        &signed(
            "POST",
            url,
            br#"{"id": "dave", "until": "2020-01-01T00:00:00Z"}"#,
            KEY,
            now(),
        ),
        now(),
    );
    assert_eq!(
        json_of(&r)["revoked"],
        false,
        "a past horizon lifts the revocation"
    );
    // `terminate: false` only refuses new requests; anything but a boolean is a bad request.
    let r = a.handle(
        &signed(
            "POST",
            url,
            br#"{"id": "erin", "terminate": false}"#,
            KEY,
            now(),
        ),
        now(),
    );
    assert_eq!((r.status, &json_of(&r)["terminated"]), (200, &json!(false)));
    let r = a.handle(
        &signed(
            "POST",
            url,
            br#"{"id": "erin", "terminate": "yes"}"#,
            KEY,
            now(),
        ),
        now(),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        *revoked.lock().unwrap(),
        vec![
            ("carol".to_string(), 1_800_173_100, true),
            ("dave".to_string(), 0, false),
            ("erin".to_string(), 1_800_173_100, false),
        ],
        "a revoke terminates by default, a lift never"
    );
    assert_eq!(
        a.handle(&signed("POST", url, br#"{}"#, KEY, now()), now())
            .status,
        400
    );
    assert_eq!(
        a.handle(
            &signed("POST", url, br#"{"id": "x"}"#, b"nope", now()),
            now()
        )
        .status,
        401
    );

    let get = |a: &Api, url: &'static str| {
        a.handle(
            &Request {
                method: "GET",
                url,
                headers: vec![],
                body: b"",
                peer: None,
            },
            now(),
        )
    };
    assert_eq!(get(&a, "/healthz").status, 200);
    assert_eq!(get(&a, "/readyz").status, 200);
    assert_eq!(get(&api(Arc::default(), true), "/readyz").status, 503);
    let m = get(&a, "/metrics");
    assert_eq!(m.status, 200);
    assert!(String::from_utf8(m.body)
        .unwrap()
        .contains("turnpike_backend_info{backend=\"epoll\"} 1"));
    assert_eq!(get(&a, "/nope").status, 404);
    assert_eq!(
        get(&a, "/networkTraversal/:issueRelayConfiguration").status,
        405
    );
    assert_eq!(get(&a, "/usage").status, 401);
    let r = a.handle(&signed("GET", "/usage", b"", KEY, now()), now());
    assert_eq!(r.status, 404, "metering not configured");
}

#[test]
fn host_roles_replays_and_stale_admin_requests_are_refused() {
    let revoked = Arc::new(Mutex::new(Vec::new()));
    let a = api(revoked.clone(), false);
    let url = "/admin/revoke?api-version=2022-03-01-preview";
    let status = |r: &Request<'_>| a.handle(r, now()).status;

    // Host: one of the names, any case, with the listen port when it has one.
    for (host, want) in [
        ("API.example", 200),
        ("api.example:443", 200),
        ("api.example:8443", 401),
        ("other.example:443", 401),
    ] {
        let (date, hash, auth) = sign::sign(KEY, "POST", PATH, host, b"", now());
        let r = Request {
            method: "POST",
            url: PATH,
            headers: vec![
                ("Host".into(), host.into()),
                ("x-ms-date".into(), date),
                ("x-ms-content-sha256".into(), hash),
                ("Authorization".into(), auth),
            ],
            body: b"",
            peer: None,
        };
        assert_eq!(status(&r), want, "{host}");
    }

    // A mint-only key mints but may not revoke or read usage.
    assert_eq!(status(&signed("POST", PATH, b"", MINT_ONLY, now())), 200);
    let r = a.handle(
        &signed("POST", url, br#"{"id": "x"}"#, MINT_ONLY, now()),
        now(),
    );
    assert_eq!(
        (r.status, json_of(&r)["error"]["code"].clone()),
        (403, json!("Forbidden"))
    );
    assert_eq!(status(&signed("GET", "/usage", b"", MINT_ONLY, now())), 403);

    // An identical revoke is a replay; token requests may repeat.
    let revoke = signed("POST", url, br#"{"id": "carol"}"#, KEY, now());
    assert_eq!(status(&revoke), 200);
    assert_eq!(status(&revoke), 401, "replayed revoke");
    let token = signed("POST", PATH, b"", KEY, now());
    assert_eq!((status(&token), status(&token)), (200, 200));

    // A lift signed before the last applied revoke is refused, a later one applies.
    let lift = br#"{"id": "carol", "until": "2020-01-01T00:00:00Z"}"#;
    let old = signed("POST", url, lift, KEY, now() - Duration::from_secs(60));
    let r = a.handle(&old, now());
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    let newer = signed("POST", url, lift, KEY, now() + Duration::from_secs(1));
    assert_eq!(status(&newer), 200);
    assert_eq!(status(&newer), 401, "replayed lift");
    assert_eq!(
        *revoked.lock().unwrap(),
        vec![
            ("carol".to_string(), 1_800_173_100, true),
            ("carol".to_string(), 0, false)
        ],
        "only the applied ones reached the relay"
    );
}

#[test]
fn forwarded_headers_count_only_from_trusted_proxies() {
    let a = api(Arc::default(), false);
    let body = br#"{"routeType": "nearest"}"#;
    let region = |peer: &str, header: Option<(&str, &str)>| {
        let mut r = signed("POST", PATH, body, KEY, now());
        r.peer = Some(peer.parse().unwrap());
        if let Some((n, v)) = header {
            r.headers.push((n.into(), v.into()));
        }
        let v = json_of(&a.handle(&r, now()));
        let url = v["iceServers"][0]["urls"][0].as_str().unwrap().to_string();
        if url.contains("198.51.100.1") {
            "us"
        } else {
            "eu"
        }
    };
    let us_client = Some(("X-Forwarded-For", "203.0.113.9"));
    assert_eq!(
        region("192.0.2.7", us_client),
        "eu",
        "untrusted peer: header ignored"
    );
    assert_eq!(
        region("10.1.2.3", us_client),
        "us",
        "trusted proxy: header used"
    );
    // The rightmost hop that is not itself a trusted proxy; a forged leftmost hop does not count.
    assert_eq!(
        region(
            "10.1.2.3",
            Some(("X-Forwarded-For", "203.0.113.9, 192.0.2.50, 10.9.9.9"))
        ),
        "eu"
    );
    assert_eq!(
        region(
            "10.1.2.3",
            Some((
                "Forwarded",
                "for=192.0.2.50, for=\"203.0.113.9:4711\";proto=https"
            ))
        ),
        "us"
    );
}
