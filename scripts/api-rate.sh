#!/usr/bin/env bash
# The token endpoint's rate, before and after a change, side by side in one run: signed
# `issueRelayConfiguration` requests per second over one keep-alive connection (bench/api_rate.rs), against
# the release binary of this checkout and of an earlier revision, alternating, on loopback.
#
#   scripts/api-rate.sh                      # BEFORE=be65e87 (the last tiny_http revision), 3 rounds
#   BEFORE=<rev> ROUNDS=5 COUNT=20000 scripts/api-rate.sh
#
# Each round starts each binary in turn with the same configuration (API and metering on, no TLS), sends at
# most COUNT requests for at most LIMIT seconds, and stops it. The earlier revision is built in a detached
# worktree under target/api-rate/ (its own target directory, kept for the next run).
# Prints one line per round and binary, then the median of each and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."

BEFORE=${BEFORE:-be65e87}
ROUNDS=${ROUNDS:-3}
COUNT=${COUNT:-20000}
LIMIT=${LIMIT:-10}
WORK=target/api-rate
mkdir -p "$WORK"

echo "== build (this checkout, release)"
cargo build --release --locked --bin turnpike --example api_rate
AFTER_BIN=$PWD/target/release/turnpike
RATE=$PWD/target/release/examples/api_rate

rev=$(git rev-parse --short "$BEFORE")
echo "== build ($rev, release)"
if [ ! -d "$WORK/src-$rev" ]; then
  git worktree add --detach "$WORK/src-$rev" "$rev" >/dev/null
fi
(cd "$WORK/src-$rev" && CARGO_TARGET_DIR=$PWD/../target-$rev cargo build --release --locked --bin turnpike)
BEFORE_BIN=$PWD/$WORK/target-$rev/release/turnpike

KEY=$(head -c 32 /dev/urandom | base64 -w0)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One run of one binary: start it, measure, stop it; prints the rate.
measure() {
  local bin=$1 tag=$2 dir api listen
  dir=$(mktemp -d "$WORK/run-XXXX")
  api=$(free_port)
  listen=$(free_port)
  cat >"$dir/turnpike.toml" <<EOF
listen = ["127.0.0.1:$listen"]
workers = 1
pin_workers = false
log_level = "warn"
[relay]
addresses = ["127.0.0.1"]
port_min = 10000
port_max = 10999
[rest]
secrets = ["api-rate-secret"]
[api]
listen = "127.0.0.1:$api"
access_keys = ["$KEY"]
[usage]
database = "$PWD/$dir/usage.db"
EOF
  "$bin" --config "$dir/turnpike.toml" >"$dir/log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$api") 2>/dev/null && break
    sleep 0.1
  done
  local out
  out=$("$RATE" "127.0.0.1:$api" "$KEY" "$COUNT" "$LIMIT" 2>&1) || out="failed: $out"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "$out" >"$dir/rate"
  echo "   $tag: $out" >&2
  grep -oE '[0-9]+ signed requests/s' <<<"$out" | cut -d' ' -f1
  rm -rf "$dir"
}

declare -a before_rates after_rates
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  if [ $((r % 2)) = 1 ]; then
    before_rates+=("$(measure "$BEFORE_BIN" "before ($rev)")")
    after_rates+=("$(measure "$AFTER_BIN" "after ($(git rev-parse --short HEAD))")")
  else
    after_rates+=("$(measure "$AFTER_BIN" "after ($(git rev-parse --short HEAD))")")
    before_rates+=("$(measure "$BEFORE_BIN" "before ($rev)")")
  fi
done

median() { printf '%s\n' "$@" | grep -E '^[0-9]' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
b=$(median "${before_rates[@]}")
a=$(median "${after_rates[@]}")
echo "== signed token requests/s over one keep-alive connection (median of $ROUNDS rounds, ≤ $COUNT requests or ${LIMIT} s each)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "before ($rev): $b   after ($(git rev-parse --short HEAD)): $a   after/before: $(awk -v a="$a" -v b="$b" 'BEGIN {if (b > 0) printf "%.2f×", a / b; else print "n/a"}')"
