//! The official Python SDK (azure-communication-networktraversal) against a token API, with aioice
//! for TURN: `tests/api_sdk.py`, driven from the tests.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;

/// Python and the packages the SDK test needs; with CI=true their absence is a failure.
pub fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import azure.communication.networktraversal, aioice, prometheus_client",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with azure-communication-networktraversal, aioice and prometheus_client is required in CI \
             (scripts/test.sh installs them)"
        );
        eprintln!("skipping: python3 packages missing (run scripts/test.sh to install them)");
    }
    ok
}

/// Run `tests/api_sdk.py` against `endpoint` with the access key `key_b64` (and the CA bundle `ca` for
/// HTTPS): it gets a relay configuration, relays one datagram each way through the first `turn:`
/// relay, and (with `metrics`) scrapes the endpoint's `/metrics`. Returns what it printed.
pub fn run_sdk(
    endpoint: &str,
    key_b64: &str,
    ca: Option<&Path>,
    metrics: bool,
) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api_sdk.py"))
        .args([endpoint, key_b64]);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    if !metrics {
        cmd.env("TURNPIKE_SDK_NO_METRICS", "1");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "api_sdk.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
