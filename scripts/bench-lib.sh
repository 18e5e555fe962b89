# Shared by scripts/compare.sh, loadtest.sh and scaling.sh (source it; not run on its own).
#
# Builds the release binaries, installs coturn when missing, starts and stops the servers under test on
# loopback, pinned to a CPU of their own, and runs turnpike-bench pinned to another.

BENCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$BENCH_ROOT/target/release"
NCPU=$(nproc)
# Generator on CPU 0, server on the others (CPU 1 on a 2-core machine). Override with GEN_CPUS/SRV_CPUS.
if [ "$NCPU" -ge 2 ]; then
  GEN_CPUS=${GEN_CPUS:-0}
  SRV_CPUS=${SRV_CPUS:-1-$((NCPU - 1))}
  SRV_ONE_CPU=${SRV_ONE_CPU:-1}
else
  GEN_CPUS=${GEN_CPUS:-0}
  SRV_CPUS=${SRV_CPUS:-0}
  SRV_ONE_CPU=${SRV_ONE_CPU:-0}
fi
TP_PORT=${TP_PORT:-3478}
CT_PORT=${CT_PORT:-3488}
BARE_PORT=${BARE_PORT:-3498}
ECHO_PORT=${ECHO_PORT:-39999}
# RT=1 runs the server and the generator SCHED_FIFO (chrt -f 50): on a machine where other work is
# running, ordinary tasks can then no longer preempt them, which otherwise turns into milliseconds of
# latency and spurious loss. It starves other work on those CPUs for the length of the run (the kernel's
# RT throttling still leaves it 5%), so use it only on a machine you may monopolise.
RT_PREFIX=()
GEN_RT_ARGS=()
if [ "${RT:-0}" = 1 ]; then
  RT_PREFIX=(chrt -f 50)
  # A spinning SCHED_FIFO generator would be throttled 50 ms of every second: sleep when idle instead.
  GEN_RT_ARGS=(--idle-sleep-us 10)
fi
SERVER_PID=""
SERVER_ADDR=""
SERVER_ARGS=()

bench_build() {
  (cd "$BENCH_ROOT" && cargo build --release --locked --bins 2>&1 | tail -1)
}

bench_need_coturn() {
  if ! command -v turnserver >/dev/null 2>&1; then
    echo "== installing coturn (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null
  fi
}

bench_need_gnuplot() {
  command -v gnuplot >/dev/null 2>&1 && return 0
  echo "== installing gnuplot-nox for the plots"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox >/dev/null; } ||
    echo "   (could not install gnuplot: plots skipped)"
}

# Sockets: 100k allocations need 100k relay sockets in the server and as many client sockets here.
bench_raise_nofile() {
  ulimit -n 1048576 2>/dev/null || ulimit -n 262144 2>/dev/null || true
}

# Writes a turnpike bench config to $1: loopback listener and relay addresses ($2, space-separated
# relay IPs), loopback peers allowed (bench only), quotas high enough for the scaling runs.
bench_turnpike_config() {
  local file=$1 relays=${2:-127.0.0.1} backend=${3:-epoll}
  local list
  list=$(printf '"%s", ' $relays)
  cat >"$file" <<EOF
realm = "turnpike"
listen = ["127.0.0.1:$TP_PORT"]
workers = 1
backend = "$backend"
log_level = "warn"
pin_workers = true
recv_buffer = ${RECV_BUFFER:-4194304}
send_buffer = ${SEND_BUFFER:-4194304}
legacy_channel_numbers = true
# bench only: every generator client shares one source IP, which the per-source limit on 401s would cap.
challenge_rate = 0
[relay]
addresses = [${list%, }]
# below the ephemeral range (32768-60999), where the generator's echo peers bind: the relay port range is one
# of the relay's own ranges, denied as a peer.
port_min = 10000
port_max = 29999
[[users]]
name = "bench"
password = "bench-pass"
[rest]
secrets = ["bench-secret"]
[lifetimes]
default = 3600
[quotas]
max_allocations = 1000000
max_allocations_per_user = 1000000
max_permissions_per_identity = 1000000
max_channels_per_identity = 1000000
# bench only: the generator's echo peer is on loopback.
[peers]
allow = ["127.0.0.0/8"]
EOF
}

wait_udp_listen() {
  local port=$1
  for _ in $(seq 1 50); do
    ss -uln 2>/dev/null | grep -q ":$port " && return 0
    sleep 0.1
  done
  echo "server did not start listening on $port" >&2
  return 1
}

# start_server NAME [WORKERS] [CONFIG]: NAME is turnpike, coturn or bare. Sets SERVER_PID, SERVER_ADDR,
# and SERVER_ARGS (extra generator arguments).
start_server() {
  local name=$1 workers=${2:-1} config=${3:-$OUT/turnpike.toml}
  local cpus=$SRV_ONE_CPU
  [ "$workers" -gt 1 ] && cpus=$SRV_CPUS
  case $name in
    turnpike)
      [ -f "$config" ] || bench_turnpike_config "$config"
      "${RT_PREFIX[@]}" taskset -c "$cpus" "$BIN/turnpike" --config "$config" --workers "$workers" \
        >"$OUT/logs/turnpike.log" 2>&1 &
      SERVER_PID=$!
      SERVER_ADDR=127.0.0.1:$TP_PORT
      SERVER_ARGS=()
      wait_udp_listen "$TP_PORT"
      ;;
    coturn)
      # The same 20,000 relay ports as turnpike's bench config (10000-29999, below the ephemeral range):
      # with 9,000 the churn ran coturn out of ports (508s) at 9k allocations/s.
      "${RT_PREFIX[@]}" taskset -c "$cpus" turnserver -n --listening-ip=127.0.0.1 --listening-port="$CT_PORT" \
        --relay-ip=127.0.0.1 --min-port=10000 --max-port=29999 --user=bench:bench-pass --realm=turnpike \
        --lt-cred-mech --allow-loopback-peers --no-cli --no-tls --no-dtls --relay-threads="$workers" \
        --no-software-attribute --log-file=stdout --simple-log >"$OUT/logs/coturn.log" 2>&1 &
      SERVER_PID=$!
      SERVER_ADDR=127.0.0.1:$CT_PORT
      SERVER_ARGS=()
      wait_udp_listen "$CT_PORT"
      ;;
    bare)
      "${RT_PREFIX[@]}" taskset -c "$cpus" "$BIN/turnpike-bench" --bare-forwarder --listen "127.0.0.1:$BARE_PORT" \
        --peer "127.0.0.1:$ECHO_PORT" --duration 0 >"$OUT/logs/bare.log" 2>&1 &
      SERVER_PID=$!
      SERVER_ADDR=127.0.0.1:$BARE_PORT
      SERVER_ARGS=(--bare --echo "127.0.0.1:$ECHO_PORT")
      wait_udp_listen "$BARE_PORT"
      ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  sleep 0.3
}

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}

# gen OUTFILE ARGS...: run the generator pinned to the generator CPU against the current server.
gen() {
  local outfile=$1
  shift
  "${RT_PREFIX[@]}" taskset -c "$GEN_CPUS" "$BIN/turnpike-bench" --server "$SERVER_ADDR" --server-pid "$SERVER_PID" \
    "${SERVER_ARGS[@]}" "${GEN_RT_ARGS[@]}" --json -q "$@" >"$outfile"
}

# Warn when something else is using the CPUs: measurements on a busy machine are noise.
bench_check_quiet() {
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  if awk -v l="$load" -v n="$NCPU" 'BEGIN { exit !(l > n / 2) }'; then
    echo "   warning: load average $load on $NCPU CPUs: other work is running, results will be noisy"
  fi
}
