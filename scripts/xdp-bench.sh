#!/usr/bin/env bash
# The kernel fast path (issue 13) side by side: turnpike with XDP, turnpike in userspace (epoll and
# io_uring) and coturn, on the same veth topology in network namespaces, with the same generator
# (turnpike-bench, relay scenario) and the same offered load. Needs root (namespaces, XDP, bpf stats).
#
#   sudo scripts/xdp-bench.sh                          # defaults below
#   STEP_SECONDS=1 FIXED_SECONDS=2 scripts/xdp-bench.sh  # a short smoke run (noisy)
#   SERVERS="xdp epoll" scripts/xdp-bench.sh           # a subset
#
#  gen ns (generator: clients and echo peer)          relay ns (the server under test)
#   c0 198.18.1.2  ───────────── veth ─────────────  rc 198.18.1.1   listener :3478
#   p0 198.19.2.2 (echo :40000) ── veth ─────────────  rp 198.19.2.1   relayed addresses
#
# The generator's clients and its echo peer share one namespace, on two veth pairs: every relayed
# datagram crosses the relay namespace on its way out and back. The relay namespace forwards
# (bpf_fib_lookup needs it), the far ends have GRO on (a veth drops frames XDP redirects into it
# otherwise) and tx checksum offload off (XDP rewrites complete checksums).
#
# Per server it measures:
#   - saturation: the highest delivered rate at < MAX_LOSS loss (a sweep, STEP_SECONDS per step);
#   - CPU per relayed packet at a fixed FIXED_RATE offered for FIXED_SECONDS, two ways (bench/README.md
#     explains why neither alone is honest here: softirq time is charged to whichever task runs):
#       relay_ns = (relay process utime+stime + XDP program run time from kernel.bpf_stats_enabled)
#                  / relayed packets
#       machine_ns = (busy time of all CPUs from /proc/stat − the generator's utime+stime)
#                  / relayed packets
#     with relayed packets = 2 × datagrams that came back (each crosses the relay twice).
# Output: $OUT/results.md (table), $OUT/results.json, raw generator JSON and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SERVERS=${SERVERS:-"xdp epoll io_uring coturn"}
STEP=${STEP_SECONDS:-2}
FIXED_SECONDS=${FIXED_SECONDS:-5}
FIXED_RATE=${FIXED_RATE:-50000}
START_RATE=${START_RATE:-20000}
SWEEP_MAX=${SWEEP_MAX:-3000000}
MAX_LOSS=${MAX_LOSS:-0.001}
CLIENTS=${CLIENTS:-50}
SIZE=${SIZE:-160}
OUT=${OUT:-results/xdp-$(date +%Y%m%d-%H%M%S)}
GEN_NS=tpb-gen-$$
RELAY_NS=tpb-relay-$$
# PROFILE=debug reuses the debug binaries (a quick smoke check only: a debug generator is slow).
PROFILE=${PROFILE:-release}
BIN=$ROOT/target/$PROFILE

if [ "$(id -u)" != 0 ]; then
  echo "xdp-bench.sh needs root (network namespaces, XDP, kernel.bpf_stats_enabled)" >&2
  exit 1
fi
for tool in ip ethtool bpftool taskset; do
  command -v $tool >/dev/null || { echo "missing $tool (iproute2, ethtool, bpftool/linux-tools, util-linux)" >&2; exit 1; }
done
mkdir -p "$OUT/raw" "$OUT/logs"

echo "== build ($PROFILE, --features xdp: needs clang and libbpf-dev)"
if [ "$PROFILE" = release ]; then
  cargo build --release --locked --features xdp --bins 2>&1 | tail -1
else
  cargo build --locked --features xdp --bins 2>&1 | tail -1
fi
if [[ " $SERVERS " == *" coturn "* ]] && ! command -v turnserver >/dev/null; then
  echo "== installing coturn"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null
fi

SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  ip netns del "$GEN_NS" 2>/dev/null || true
  ip netns del "$RELAY_NS" 2>/dev/null || true
  [ -n "${BPF_STATS_WAS:-}" ] && sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS_WAS"
  return 0
}
trap cleanup EXIT

echo "== namespaces $GEN_NS, $RELAY_NS"
ip netns add "$GEN_NS"
ip netns add "$RELAY_NS"
ip link add c0 netns "$GEN_NS" type veth peer name rc netns "$RELAY_NS"
ip link add p0 netns "$GEN_NS" type veth peer name rp netns "$RELAY_NS"
ip -n "$GEN_NS" addr add 198.18.1.2/24 dev c0
ip -n "$GEN_NS" addr add 198.19.2.2/24 dev p0
ip -n "$RELAY_NS" addr add 198.18.1.1/24 dev rc
ip -n "$RELAY_NS" addr add 198.19.2.1/24 dev rp
for pair in "$GEN_NS c0" "$GEN_NS p0" "$RELAY_NS rc" "$RELAY_NS rp"; do
  set -- $pair
  ip netns exec "$1" ethtool -K "$2" tx off >/dev/null
  ip -n "$1" link set "$2" up
  ip -n "$1" link set lo up
done
ip netns exec "$GEN_NS" ethtool -K c0 gro on >/dev/null
ip netns exec "$GEN_NS" ethtool -K p0 gro on >/dev/null
ip netns exec "$RELAY_NS" sysctl -qw net.ipv4.ip_forward=1
# The generator's own two addresses must not short-cut through its loopback: the echo peer is reached
# only through the relay. (Each address is on its own veth; the relay sends to 198.19.2.2 over rp.)
ip netns exec "$GEN_NS" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0

BPF_STATS_WAS=$(sysctl -n kernel.bpf_stats_enabled)
sysctl -qw kernel.bpf_stats_enabled=1

turnpike_config() { # $1 file, $2 backend, $3 xdp on|off
  cat >"$1" <<EOF
realm = "turnpike"
listen = ["198.18.1.1:3478"]
workers = 1
backend = "$2"
log_level = "warn"
pin_workers = false
legacy_channel_numbers = true
challenge_rate = 0
drain_seconds = 0
[relay]
addresses = ["198.19.2.1"]
port_min = 10000
port_max = 29999
[[users]]
name = "bench"
password = "bench-pass"
[lifetimes]
default = 3600
[quotas]
max_allocations = 100000
max_allocations_per_user = 100000
[peers]
allow = ["198.19.2.0/24"]
EOF
  if [ "$3" = on ]; then
    printf '[xdp]\ninterfaces = ["rc", "rp"]\nmode = "native"\n' >>"$1"
  fi
}

start_server() { # $1 name
  case $1 in
    xdp) turnpike_config "$OUT/turnpike-xdp.toml" epoll on
      ip netns exec "$RELAY_NS" taskset -c 1 "$BIN/turnpike" --config "$OUT/turnpike-xdp.toml" >"$OUT/logs/$1.log" 2>&1 &;;
    epoll|io_uring) turnpike_config "$OUT/turnpike-$1.toml" "$1" off
      ip netns exec "$RELAY_NS" taskset -c 1 "$BIN/turnpike" --config "$OUT/turnpike-$1.toml" >"$OUT/logs/$1.log" 2>&1 &;;
    coturn)
      ip netns exec "$RELAY_NS" taskset -c 1 turnserver -n --listening-ip=198.18.1.1 --listening-port=3478 \
        --relay-ip=198.19.2.1 --min-port=10000 --max-port=29999 --user=bench:bench-pass --realm=turnpike \
        --lt-cred-mech --no-cli --no-tls --no-dtls --relay-threads=1 --no-software-attribute \
        --log-file=stdout --simple-log >"$OUT/logs/$1.log" 2>&1 &;;
  esac
  SERVER_PID=$!
  for _ in $(seq 1 50); do
    ip netns exec "$RELAY_NS" ss -uln | grep -q '198.18.1.1:3478 ' && break
    sleep 0.1
  done
  sleep 0.3
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

proc_cpu_ns() { # utime+stime of pid $1 in ns (0 if gone)
  local tck
  tck=$(getconf CLK_TCK)
  awk -v t="$tck" '{ sub(/^.*\) /, ""); printf "%d\n", ($12 + $13) * 1e9 / t }' "/proc/$1/stat" 2>/dev/null || echo 0
}

machine_busy_ns() { # all CPUs: everything but idle and iowait, in ns
  local tck
  tck=$(getconf CLK_TCK)
  awk -v t="$tck" '/^cpu / { printf "%d\n", ($2 + $3 + $4 + $7 + $8 + $9) * 1e9 / t }' /proc/stat
}

xdp_run_ns() { # the run time of every loaded turnpike_xdp program (bpf_stats), in ns
  bpftool prog show -j 2>/dev/null | python3 -c '
import json, sys
print(sum(p.get("run_time_ns", 0) for p in json.load(sys.stdin) if p.get("name") == "turnpike_xdp"))'
}

# The shell that waits for the generator reads its own cutime+cstime (/proc/self/stat fields 16, 17):
# the generator's CPU time, once it has exited.
cat >"$OUT/gen-cpu.sh" <<'WRAP'
#!/usr/bin/env bash
out=$1
shift
"$@" >"$out"
awk -v t="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%d\n", ($14 + $15) * 1e9 / t }' /proc/$$/stat
WRAP
chmod +x "$OUT/gen-cpu.sh"

gen() { # $1 outfile, rest: generator args. Prints the generator's utime+stime (ns) on stdout.
  local out=$1
  shift
  ip netns exec "$GEN_NS" taskset -c 0 "$OUT/gen-cpu.sh" "$out" \
    "$BIN/turnpike-bench" --server 198.18.1.1:3478 --echo 198.19.2.2:40000 --clients "$CLIENTS" \
    --size "$SIZE" --max-loss "$MAX_LOSS" --json -q "$@"
}

rows=()
for s in $SERVERS; do
  echo "== $s"
  start_server "$s"
  gen "$OUT/raw/$s-sweep.json" --sweep --rate "$START_RATE" --sweep-max "$SWEEP_MAX" --duration "$STEP" >/dev/null
  busy0=$(machine_busy_ns); relay0=$(proc_cpu_ns "$SERVER_PID"); bpf0=$(xdp_run_ns)
  gen_ns=$(gen "$OUT/raw/$s-fixed.json" --rate "$FIXED_RATE" --duration "$FIXED_SECONDS")
  busy1=$(machine_busy_ns); relay1=$(proc_cpu_ns "$SERVER_PID"); bpf1=$(xdp_run_ns)
  stop_server
  row=$(python3 - "$s" "$OUT/raw/$s-sweep.json" "$OUT/raw/$s-fixed.json" \
    $((busy1 - busy0)) $((relay1 - relay0)) $((bpf1 - bpf0)) "$gen_ns" <<'PY'
import json, sys
name, sweep, fixed, busy, relay, bpf, gen = sys.argv[1:]
sw = json.load(open(sweep)); fx = json.load(open(fixed))
step = fx.get("best") or (fx.get("steps") or [fx])[0]
received = step.get("received", 0)
relayed = 2 * received
per = lambda ns: round(int(ns) / relayed, 1) if relayed else None
print(json.dumps({
    "server": name, "best_pps": sw.get("best_pps"), "fixed_offered_pps": step.get("offered_pps"),
    "fixed_loss": step.get("loss"), "relayed_packets": relayed,
    "relay_ns_per_packet": per(int(relay) + int(bpf)), "xdp_prog_ns_per_packet": per(bpf),
    "machine_ns_per_packet": per(int(busy) - int(gen)),
}))
PY
)
  echo "   $row"
  rows+=("$row")
done

printf '%s\n' "${rows[@]}" >"$OUT/rows.jsonl"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/rows.jsonl") if l.strip()]
json.dump(rows, open(f"{out}/results.json", "w"), indent=2)
ct = next((r for r in rows if r["server"] == "coturn"), None)
def ratio(r, k):
    if not ct or not ct.get(k) or r.get(k) is None:
        return ""
    return f"{r[k] / ct[k]:.2f}×"
lines = ["| server | delivered pps at <0.1% loss | × coturn | relay ns/pkt (process + XDP prog) | × coturn | XDP prog ns/pkt | machine − generator ns/pkt | × coturn |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    bp = r["best_pps"]
    lines.append(f"| {r['server']} | {bp:.0f} | {ratio(r, 'best_pps')} | {r['relay_ns_per_packet']} | {ratio(r, 'relay_ns_per_packet')} | "
                 f"{r['xdp_prog_ns_per_packet']} | {r['machine_ns_per_packet']} | {ratio(r, 'machine_ns_per_packet')} |"
                 if bp is not None else f"| {r['server']} | (no step within loss) | | {r['relay_ns_per_packet']} | | {r['xdp_prog_ns_per_packet']} | {r['machine_ns_per_packet']} | |")
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "== results in $OUT"
