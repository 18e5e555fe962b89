#!/usr/bin/env bash
# Resident memory per allocation with real sockets (design §4): for each N in COUNTS (default
# 1000 10000 18000) a fresh release relay on loopback (one worker), `turnpike-bench --scenario hold`
# opens N allocations with one permission and one channel each and holds them, and the relay's VmRSS is
# read from /proc before and after. Prints N, the RSS delta and bytes per allocation (its relay socket,
# kernel memory not included: RSS is the process's own pages).
#
# Bounded: each step has a 120 s deadline; open files are raised to 20,000 (this container's cap), so N
# stays below ~19,000 (the relay holds one socket per allocation, the generator one per client).
# Usage: scripts/memory.sh   (COUNTS="1000 5000" BACKEND=io_uring scripts/memory.sh)
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

OUT=${OUT:-$BENCH_ROOT/target/memory}
COUNTS=${COUNTS:-1000 10000 18000}
BACKEND=${BACKEND:-epoll}
mkdir -p "$OUT/logs" "$OUT/raw"
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== open files: $(ulimit -n)"

echo "== building release binaries"
bench_build
bench_turnpike_config "$OUT/turnpike.toml" 127.0.0.1 "$BACKEND"
trap stop_server EXIT

rows=()
for n in $COUNTS; do
  start_server turnpike 1 "$OUT/turnpike.toml"
  gen "$OUT/raw/hold-$n.json" --scenario hold --clients "$n" --window 512 --duration 120
  stop_server
  rows+=("$(python3 - "$OUT/raw/hold-$n.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
b, a, ok = v["rss_before_kib"], v["rss_after_kib"], v["allocated"]
per = v["bytes_per_allocation"]
print(f'{v["requested"]:>8} {ok:>9} {b:>12} {a:>11} {(a - b):>13} {per:>12.0f}')
PY
)")
done

echo
echo "backend $BACKEND, one worker; RSS of the relay process (KiB), bytes per allocation = delta / allocated"
printf '%8s %9s %12s %11s %13s %12s\n' N allocated "before KiB" "after KiB" "delta KiB" "B/allocation"
printf '%s\n' "${rows[@]}"
