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

# XDP fast path (issue 13): clang and libbpf's headers build src/xdp/turnpike.bpf.c (`--features xdp`);
# tests/xdp.rs builds network namespaces with iproute2 and turns checksum offload off with ethtool.
if ! command -v clang >/dev/null 2>&1 || ! command -v llc >/dev/null 2>&1 ||
  [ ! -f /usr/include/bpf/bpf_helpers.h ] || ! command -v ethtool >/dev/null 2>&1 ||
  ! command -v ip >/dev/null 2>&1; then
  echo "== installing clang, llvm, libbpf-dev, ethtool, iproute2 (XDP)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    clang llvm libbpf-dev linux-libc-dev ethtool iproute2 >/dev/null
fi
# --- end of the XDP block ---
# 1:1 NAT test (tests/e2e_nat.rs, issue 15): the nft binary loads a DNAT/SNAT rule into a test namespace.
if ! command -v nft >/dev/null 2>&1; then
  echo "== installing nftables (NAT test)"
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null
fi
# --- end of the NAT block ---
# Packaging and monitoring tests (tests/package.rs, tests/monitoring.rs, issue 15): cargo-deb (crates.io;
# pinned: the tests package the debug binary with --profile dev, which later versions may refuse),
# systemd-analyze (Debian's systemd; PID 1 need not be systemd), prometheus and promtool (Debian).
# With CI=true a missing one fails those tests.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install cargo-deb --version 3.8.0 --locked
fi
if ! command -v systemd-analyze >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 ||
  ! command -v promtool >/dev/null 2>&1; then
  echo "== installing systemd (systemd-analyze) and prometheus (promtool)"
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd prometheus >/dev/null
fi
# --- end of the packaging block ---
# Fleet ledger tests (tests/fleet.rs, issue 12): a real PostgreSQL from Debian; the tests make their own
# throwaway clusters (pg_createcluster) on private ports. With CI=true a missing server fails them.
if ! command -v pg_createcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "== installing postgresql (apt-get)"
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  # The package's own "main" cluster is not used by the tests; keep it stopped.
  ${SUDO:-} service postgresql stop >/dev/null 2>&1 || true
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

echo "== XDP (--features xdp): clippy, the map layouts, and tests/xdp.rs in network namespaces"
cargo clippy --all-targets --locked --features xdp -- -D warnings
cargo test --locked --features xdp --lib -- xdp 2>&1 | tee -a "$log"
cargo test --locked --features xdp --test xdp 2>&1 | tee -a "$log"
# One closing line for the whole run (the last runner to print is a criterion bench in test mode).
passed=$(grep -oE 'test result: ok\. [0-9]+ passed' "$log" | awk '{ n += $4 } END { print n + 0 }')
echo "tests: $passed passed, 0 failed"
