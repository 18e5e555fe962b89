#!/usr/bin/env bash
# The effect of turnpike's socket buffer size (recv_buffer/send_buffer) on loss, for tuning/README.md:
# the same bursty offered load (50 flows × 160 B, bursts of 32 packets per flow) against turnpike with
# kernel-default buffers and with 4 MiB. Prints loss and the kernel's UDP RcvbufErrors delta per size.
#
#   scripts/buffers.sh            # ~1 minute
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
RATE=${RATE:-30000}
OUT=${OUT:-results/buffers-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/logs"
bench_build
bench_check_quiet
trap stop_server EXIT
rcvbuf_errors() { awk '/^Udp:/ { if (h) print $6; h = 1 }' /proc/net/snmp; }
echo "| SO_RCVBUF/SO_SNDBUF asked | offered pkt/s | loss % | UDP RcvbufErrors | p99 µs |" | tee "$OUT/results.md"
echo "|---:|---:|---:|---:|---:|" | tee -a "$OUT/results.md"
for size in 212992 1048576 4194304; do
  RECV_BUFFER=$size SEND_BUFFER=$size bench_turnpike_config "$OUT/turnpike-$size.toml"
  start_server turnpike 1 "$OUT/turnpike-$size.toml"
  before=$(rcvbuf_errors)
  gen "$OUT/raw/buffers-$size.json" --clients 50 --size 160 --rate "$RATE" --burst 32 --duration 5 --label "buf=$size"
  after=$(rcvbuf_errors)
  stop_server
  python3 - "$OUT/raw/buffers-$size.json" "$size" "$((after - before))" <<'P' | tee -a "$OUT/results.md"
import json, sys
v = json.load(open(sys.argv[1]))["steps"][0]
print(f'| {int(sys.argv[2]):,} | {v["offered_pps"]:,.0f} | {100 * v["loss"]:.3f} | {sys.argv[3]} | {v["rtt_us"]["p99"]:,.0f} |')
P
done
echo "(the kernel caps each request at net.core.rmem_max/wmem_max: $(sysctl -n net.core.rmem_max))"
