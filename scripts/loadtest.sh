#!/usr/bin/env bash
# Load-test turnpike alone with the standard scenarios, as an operator would before deploying.
#
#   scripts/loadtest.sh                       # ~3 minutes
#   BACKEND=io_uring WORKERS=2 scripts/loadtest.sh
#
# turnpike runs with a bench config (loopback listener and peers) on the server CPUs, the generator on
# CPU 0. Scenarios: sweeps to the highest rate with <0.1% loss for 1 flow × 100 B, 50 flows × 160 B
# (audio-like) and 10 flows × 1200 B (video-like); allocation churn (401 + Allocate + delete); STUN
# Binding. Results (JSON per test, results.json, results.md) go to $OUT (default results/loadtest-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

STEP=${STEP_SECONDS:-2}
BACKEND=${BACKEND:-epoll}
WORKERS=${WORKERS:-1}
OUT=${OUT:-results/loadtest-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/logs"
SECONDS=0

echo "== build"
bench_build
bench_raise_nofile
bench_turnpike_config "$OUT/turnpike.toml" 127.0.0.1 "$BACKEND"
bench_check_quiet
trap stop_server EXIT
start_server turnpike "$WORKERS"
for p in single:1:100 audio:50:160 video:10:1200; do
  IFS=: read -r pname flows size <<<"$p"
  echo "== sweep $pname: $flows flows × $size B"
  gen "$OUT/raw/turnpike-sweep-${pname}_${flows}x${size}B-r1.json" --clients "$flows" --size "$size" \
    --sweep --rate 10000 --duration "$STEP" --label turnpike
done
echo "== allocation churn"
gen "$OUT/raw/turnpike-alloc-r1.json" --scenario alloc --clients 64 --duration 5 --label turnpike
echo "== Binding"
gen "$OUT/raw/turnpike-binding-r1.json" --scenario binding --clients 4 --window 32 --duration 5 --label turnpike
stop_server
echo "== results ($SECONDS s) in $OUT"
python3 scripts/bench-report.py loadtest "$OUT"
