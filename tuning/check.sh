#!/usr/bin/env bash
# Shows this host's values next to turnpike's recommendations (tuning/README.md explains each).
# Read-only: changes nothing. Usage: tuning/check.sh [RELAY_PORT_MIN] [RELAY_PORT_MAX] [WORKERS]
set -uo pipefail
PORT_MIN=${1:-49152}
PORT_MAX=${2:-65535}
WORKERS=${3:-$(nproc)}
ok=0 warn=0

row() { # name current recommended verdict
  printf '%-34s %-28s %-28s %s\n' "$1" "$2" "$3" "$4"
  if [ "$4" = ok ]; then ok=$((ok + 1)); else warn=$((warn + 1)); fi
}
at_least() { # name recommended
  local cur
  cur=$(sysctl -n "$1" 2>/dev/null || echo "?")
  if [ "$cur" != "?" ] && [ "$cur" -ge "$2" ] 2>/dev/null; then row "$1" "$cur" ">= $2" ok; else row "$1" "$cur" ">= $2" LOW; fi
}

printf '%-34s %-28s %-28s %s\n' setting current recommended verdict
at_least net.core.rmem_max 16777216
at_least net.core.wmem_max 16777216
at_least net.core.rmem_default 1048576
at_least net.core.wmem_default 1048576
at_least net.core.netdev_max_backlog 16384
at_least net.core.netdev_budget 600
at_least fs.nr_open 1048576

# udp_mem max, in pages: at least 4 GiB.
pages=$(getconf PAGESIZE)
udp_max=$(sysctl -n net.ipv4.udp_mem | awk '{print $3}')
need=$((4 * 1024 * 1024 * 1024 / pages))
if [ "$udp_max" -ge "$need" ]; then v=ok; else v=LOW; fi
row net.ipv4.udp_mem "$(sysctl -n net.ipv4.udp_mem | tr '\t' ' ')" "max >= $need pages (4 GiB)" $v

read -r lo hi < <(sysctl -n net.ipv4.ip_local_port_range)
if [ "$hi" -lt "$PORT_MIN" ] || [ "$lo" -gt "$PORT_MAX" ]; then v=ok; else v=OVERLAP; fi
row net.ipv4.ip_local_port_range "$lo-$hi" "clear of $PORT_MIN-$PORT_MAX" $v

cur=$(sysctl -n kernel.io_uring_disabled 2>/dev/null || echo absent)
if [ "$cur" = 0 ] || [ "$cur" = absent ]; then v=ok; else v="io_uring OFF (epoll used)"; fi
row kernel.io_uring_disabled "$cur" 0 "$v"

for k in net.core.busy_read net.core.busy_poll; do
  row "$k" "$(sysctl -n $k)" "0, or 50 for latency" ok
done

n=$(ulimit -n)
if [ "$n" = unlimited ] || [ "$n" -ge 1048576 ]; then v=ok; else v=LOW; fi
row "NOFILE (ulimit -n, this shell)" "$n" ">= 1048576 (LimitNOFILE=)" $v
m=$(ulimit -l)
kver=$(uname -r | awk -F. '{ print $1 * 100 + $2 }')
if [ "$m" = unlimited ] || [ "$m" -ge 65536 ] || [ "$kver" -ge 512 ]; then v=ok; else v=LOW; fi
row "memlock (ulimit -l, KiB)" "$m" ">= 65536 on kernels < 5.12" "$v"

gov=$(cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor 2>/dev/null | sort | uniq -c | xargs)
if [ -z "$gov" ]; then row "CPU governor" "n/a (no cpufreq: VM?)" performance ok
elif echo "$gov" | grep -qv performance; then row "CPU governor" "$gov" performance LOW
else row "CPU governor" "$gov" performance ok; fi

echo
echo "NIC queues and interrupts (turnpike has $WORKERS workers; spread RX queues/IRQs over the same cores):"
for dev in /sys/class/net/*; do
  d=$(basename "$dev")
  [ "$d" = lo ] && continue
  [ -d "$dev/queues" ] || continue
  rx=$(ls -d "$dev"/queues/rx-* 2>/dev/null | wc -l)
  tx=$(ls -d "$dev"/queues/tx-* 2>/dev/null | wc -l)
  rps=$(cat "$dev"/queues/rx-*/rps_cpus 2>/dev/null | sort -u | xargs)
  xps=$(cat "$dev"/queues/tx-*/xps_cpus 2>/dev/null | sort -u | xargs)
  printf '  %-8s rx queues %-3s tx queues %-3s rps_cpus [%s] xps_cpus [%s]\n' "$d" "$rx" "$tx" "$rps" "$xps"
  grep -E "$d" /proc/interrupts 2>/dev/null | while read -r irq _; do
    irq=${irq%:}
    printf '           irq %-5s affinity %s\n' "$irq" "$(cat /proc/irq/"$irq"/smp_affinity_list 2>/dev/null)"
  done
done

echo
echo "Drop counters since boot (non-zero and growing under load means a limit was hit):"
awk '/^Udp:/ { if (!h) { split($0, k); h = 1 } else { for (i = 2; i <= NF; i++) if (k[i] ~ /Errors|InErrors/) printf "  Udp %s %s\n", k[i], $i } }' /proc/net/snmp
d=0 s=0
while read -r _ dropped squeezed _; do
  d=$((d + 16#$dropped)) s=$((s + 16#$squeezed))
done </proc/net/softnet_stat
echo "  softnet dropped (backlog full) $d, time_squeeze (budget ran out) $s"
echo
echo "$ok ok, $warn to look at. Apply the sysctls with: cp tuning/99-turnpike.conf /etc/sysctl.d/ && sysctl --system"
