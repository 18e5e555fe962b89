#!/usr/bin/env bash
# Runs every test turnpike has: formatting, lints, unit/property/scenario tests, and the benches in
# test mode (each bench runs once to prove it works). Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

# Toolchain components used below (present on the rust machine image; added if missing).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

# --- Python packages for tests/api.rs (token API: the official SDK, aioice for TURN, the metrics parser) ---
if ! python3 -c "import azure.communication.networktraversal, aioice, prometheus_client" 2>/dev/null; then
  python3 -m pip install --quiet "azure-communication-networktraversal==1.1.0b2" prometheus_client aioice
fi
# --- end of the token API block ---

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== module layering"
./scripts/check-layers.sh

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test --all-targets"
cargo test --all-targets --locked
