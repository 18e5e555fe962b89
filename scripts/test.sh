#!/usr/bin/env bash
# Runs every test turnpike has: formatting, lints, unit/property/scenario tests, and the benches in
# test mode (each bench runs once to prove it works). Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

# Toolchain components used below (present on the rust machine image; added if missing).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

# Interop test tools (tests/interop.rs): coturn's turnutils_uclient/turnutils_peer (Debian) and
# aioice (PyPI). Each is installed only when missing.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v turnutils_uclient >/dev/null 2>&1 || ! command -v turnutils_peer >/dev/null 2>&1; then
  echo "== installing coturn (turnutils_uclient, turnutils_peer)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends coturn >/dev/null
  # The package may start a turnserver on 3478; the tests use other ports, but keep it out of the way.
  $SUDO systemctl disable --now coturn >/dev/null 2>&1 || true
  $SUDO service coturn stop >/dev/null 2>&1 || true
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "== installing python3"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-pip >/dev/null
fi
if ! python3 -c "import aioice" >/dev/null 2>&1; then
  echo "== installing aioice"
  # A Debian system Python refuses pip installs (PEP 668) unless told otherwise.
  python3 -m pip install --quiet aioice ||
    python3 -m pip install --quiet --break-system-packages aioice
fi
# --- Python packages for tests/api.rs (token API: the official SDK, aioice for TURN, the metrics parser) ---
if ! python3 -c "import azure.communication.networktraversal, aioice, prometheus_client" 2>/dev/null; then
  python3 -m pip install --quiet "azure-communication-networktraversal==1.1.0b2" prometheus_client aioice ||
    python3 -m pip install --quiet --break-system-packages "azure-communication-networktraversal==1.1.0b2" prometheus_client aioice
fi
# --- end of the token API block ---

# Browser test (tests/browser.rs, issue 5): headless Chromium from Debian. With CI=true a missing browser
# fails the test, so install it here.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (apt-get)"
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== one rustls, >= 0.23.5 (RUSTSEC-2024-0336: the 0.20 line spins on ClientHello + close_notify)"
rustls=$(awk '$0 == "name = \"rustls\"" { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
if [ "$(wc -l <<<"$rustls")" -ne 1 ] || [ -z "$rustls" ] ||
  ! printf '0.23.5\n%s\n' "$rustls" | sort -V -C; then
  echo "Cargo.lock must hold exactly one rustls, 0.23.5 or later; it holds: ${rustls:-none}" >&2
  exit 1
fi
if grep -q '^name = "tiny_http"$' Cargo.lock; then
  echo "Cargo.lock still holds tiny_http" >&2
  exit 1
fi
echo "rustls $rustls"

echo "== module layering"
./scripts/check-layers.sh

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test --all-targets"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --all-targets --locked 2>&1 | tee "$log"
# One closing line for the whole run (the last runner to print is a criterion bench in test mode).
passed=$(grep -oE 'test result: ok\. [0-9]+ passed' "$log" | awk '{ n += $4 } END { print n + 0 }')
echo "tests: $passed passed, 0 failed"
