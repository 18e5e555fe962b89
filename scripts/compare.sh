#!/usr/bin/env bash
# turnpike vs coturn vs the bare forwarder, same generator, same offered load, alternating, in one run.
#
#   scripts/compare.sh                 # ~6 minutes on a 2-core machine
#   ROUNDS=1 scripts/compare.sh        # quicker, noisier
#   RT=1 scripts/compare.sh            # server and generator SCHED_FIFO: for a machine shared with other work
#   PROFILES=all scripts/compare.sh    # also 1 flow × 100 B and 10 flows × 1200 B sweeps (longer)
#
# Each round starts turnpike (1 worker, epoll unless BACKEND=io_uring), coturn (1 relay thread) and the
# bare forwarder in turn (the order alternates between rounds), each pinned to CPU 1 with the generator
# on CPU 0, and measures:
#   - sweep: the highest delivered ChannelData rate with <0.1% loss (50 flows × 160 B), and server CPU
#     µs per relayed packet at that rate (from /proc/<pid>/stat, utime+stime);
#   - fixed: RTT percentiles and CPU per packet at a fixed 40k packets/s offered (50 flows × 160 B);
#   - binding: STUN Binding responses/s and server CPU per request (4 sockets × 32 in flight; the bare
#     forwarder answers Binding too, as the floor);
#   - alloc: allocations/s through the full 401 round, then delete (64 concurrent clients; the bare
#     forwarder answers the churn too, with a relay socket per allocation and no HMAC, as the floor).
# Results (JSON per run, results.json, results.md, plots) go to $OUT (default results/compare-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

ROUNDS=${ROUNDS:-2}
STEP=${STEP_SECONDS:-2}
FIXED_RATE=${FIXED_RATE:-40000}
BACKEND=${BACKEND:-epoll}
PROFILES=${PROFILES:-audio}
OUT=${OUT:-results/compare-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/logs"
SECONDS=0

echo "== build"
bench_build
bench_need_coturn
bench_raise_nofile
bench_turnpike_config "$OUT/turnpike.toml" 127.0.0.1 "$BACKEND"
{
  echo "host: $(uname -sr), $NCPU CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "generator CPUs: $GEN_CPUS, server CPU: $SRV_ONE_CPU, turnpike backend: $BACKEND"
  echo "command: $0 (ROUNDS=$ROUNDS STEP_SECONDS=$STEP FIXED_RATE=$FIXED_RATE PROFILES=$PROFILES RT=${RT:-0})"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/host.txt"

profiles=("audio:50:160")
if [ "$PROFILES" = all ]; then
  profiles+=("single:1:100" "video:10:1200")
fi

run_server() {
  local s=$1 r=$2
  echo "== round $r: $s"
  bench_check_quiet
  start_server "$s"
  # A server that died (or was killed) mid-round is restarted before the next test and reported.
  alive() {
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "   $s (pid $SERVER_PID) is gone: restarting it" | tee -a "$OUT/host.txt"
      start_server "$s"
    fi
    sleep 1
  }
  for p in "${profiles[@]}"; do
    IFS=: read -r pname flows size <<<"$p"
    gen "$OUT/raw/$s-sweep-${pname}_${flows}x${size}B-r$r.json" --clients "$flows" --size "$size" \
      --sweep --rate 20000 --sweep-factor 1.25 --duration "$STEP" --label "$s" ||
      echo "   sweep $pname failed on $s"
  done
  alive
  gen "$OUT/raw/$s-fixed-${FIXED_RATE}pps-r$r.json" --clients 50 --size 160 --rate "$FIXED_RATE" \
    --duration 5 --label "$s" || echo "   fixed-rate run failed on $s"
  alive
  # The bare forwarder answers Binding too (the floor for Binding's CPU per request).
  gen "$OUT/raw/$s-binding-r$r.json" --scenario binding --clients 4 --window 32 --duration 3 \
    --label "$s" || echo "   binding failed on $s"
  # A fresh server: the relay runs above leave their flows' allocations behind (they hold them to the
  # end), and a churn client's new ephemeral port that meets one of those 5-tuples rightly gets 437.
  stop_server
  start_server "$s"
  sleep 1
  gen "$OUT/raw/$s-alloc-r$r.json" --scenario alloc --clients 64 --duration 3 --label "$s" ||
    echo "   alloc failed on $s"
  stop_server
}
trap stop_server EXIT

for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order=(turnpike coturn bare); else order=(bare coturn turnpike); fi
  for s in "${order[@]}"; do
    run_server "$s" "$r"
  done
done

echo "== results ($SECONDS s) in $OUT"
python3 scripts/bench-report.py compare "$OUT"
scripts/bench-plots.sh compare "$OUT" || true
