#!/usr/bin/env bash
# Runs every test turnpike has: formatting, lints, unit/property/scenario tests, and the benches in
# test mode (each bench runs once to prove it works). Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

# Toolchain components used below (present on the rust machine image; added if missing).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

# Browser test (tests/browser.rs, issue 5): headless Chromium from Debian. With CI=true a missing browser
# fails the test, so install it here.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (apt-get)"
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== module layering"
./scripts/check-layers.sh

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test --all-targets"
cargo test --all-targets --locked
