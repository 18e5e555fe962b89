#!/usr/bin/env bash
# How turnpike scales: delivered packets/s versus worker threads, and versus live allocations, with the
# memory each allocation costs (RSS delta of the server process; kernel socket memory is not in RSS).
#
#   scripts/scaling.sh                            # workers 1..nproc; 1, 10k and 100k allocations
#   ALLOCS="1 10000" scripts/scaling.sh           # smaller
#
# Live allocations spread over several relay addresses (127.0.0.1 … 127.0.0.N), 16k ports each, so that
# 100k relay sockets fit; the generator's client sockets spill over 127.0.1.x, 127.0.2.x… likewise.
# Worker runs give the server every CPU but the generator's (on a 2-core machine workers 2 share CPU 1 with
# nothing but each other, so expect no gain there: the curve needs more cores than this machine has).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

STEP=${STEP_SECONDS:-2}
BACKEND=${BACKEND:-epoll}
MAX_WORKERS=${MAX_WORKERS:-$NCPU}
ALLOCS=${ALLOCS:-1 10000 100000}
OUT=${OUT:-results/scaling-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/logs"
SECONDS=0

echo "== build"
bench_build
bench_raise_nofile
bench_check_quiet
trap stop_server EXIT

relays="127.0.0.1 127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5 127.0.0.6 127.0.0.7 127.0.0.8"
bench_turnpike_config "$OUT/turnpike.toml" "$relays" "$BACKEND"

for w in $(seq 1 "$MAX_WORKERS"); do
  echo "== workers $w"
  start_server turnpike "$w"
  gen "$OUT/raw/scaling-workers-$w.json" --clients 50 --size 160 --sweep --rate 20000 --duration "$STEP" \
    --label "workers=$w" || echo "   failed"
  stop_server
done

# One descriptor per allocation in the server and one per client socket here: the process limit caps
# what can be measured (raising it needs CAP_SYS_RESOURCE, which containers often lack).
nofile=$(ulimit -n)
for k in $ALLOCS; do
  if [ "$nofile" != unlimited ] && [ "$k" -gt $((nofile - 1000)) ]; then
    echo "== live allocations: $k skipped: ulimit -n is $nofile here (needs $((k + 1000))); raise LimitNOFILE"
    echo "skipped $k allocations: ulimit -n $nofile" >>"$OUT/notes.txt"
    continue
  fi
  echo "== live allocations: $k"
  start_server turnpike 1
  # The 50 measured flows come on top of k-1 idle ones... k counts the idle allocations alone.
  gen "$OUT/raw/scaling-allocs-$k.json" --idle-allocations "$k" --window 512 --clients 50 --size 160 \
    --sweep --rate 20000 --duration "$STEP" --label "allocations=$k" || echo "   failed"
  stop_server
done

echo "== results ($SECONDS s) in $OUT"
python3 scripts/bench-report.py scaling "$OUT"
scripts/bench-plots.sh scaling "$OUT" || true
