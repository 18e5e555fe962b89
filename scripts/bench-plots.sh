#!/usr/bin/env bash
# Renders PNG charts from the .dat files bench-report.py wrote: bench-plots.sh compare|scaling OUTDIR.
# Needs gnuplot (gnuplot-nox, installed with apt-get when missing); without it the plots are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
kind=$1 out=$2
bench_need_gnuplot
command -v gnuplot >/dev/null 2>&1 || exit 0
term='set terminal pngcairo size 900,540 noenhanced font "sans,11" background "white"'
case $kind in
  compare)
    for f in "$out"/plot-sweep-*-turnpike.dat; do
      [ -e "$f" ] || continue
      t=$(basename "$f" -turnpike.dat); t=${t#plot-}
      gnuplot <<G
$term
set output "$out/$t.png"
set title "Delivered vs offered ($t): each point is one sweep step"
set xlabel "offered packets/s (client → server)"; set ylabel "delivered packets/s (back at the client)"
set key left top; set grid
plot "$out/plot-$t-turnpike.dat" u 1:1 w l dt 2 lc "gray" title "ideal (no loss)", \
  "$out/plot-$t-turnpike.dat" u 1:2 w p pt 7 ps 0.8 title "turnpike", \
  "$out/plot-$t-coturn.dat" u 1:2 w p pt 5 ps 0.8 title "coturn", \
  "$out/plot-$t-bare.dat" u 1:2 w p pt 9 ps 0.9 title "bare forwarder"
set output "$out/$t-p99.png"
set title "p99 round trip vs offered load ($t)"; set ylabel "p99 RTT (µs)"; set logscale y
plot "$out/plot-$t-turnpike.dat" u 1:4 w p pt 7 ps 0.8 title "turnpike", \
  "$out/plot-$t-coturn.dat" u 1:4 w p pt 5 ps 0.8 title "coturn", \
  "$out/plot-$t-bare.dat" u 1:4 w p pt 9 ps 0.9 title "bare forwarder"
G
    done
    for f in "$out"/plot-fixed-*-latency.dat; do
      [ -e "$f" ] || continue
      t=$(basename "$f" .dat); t=${t#plot-}
      gnuplot <<G
$term
set output "$out/$t.png"
set title "Round-trip percentiles at a fixed offered rate ($t)"
set style data histogram; set style histogram cluster gap 1; set style fill solid 0.8 border -1
set ylabel "RTT (µs)"; set logscale y; set grid y; set key left top
plot "$f" u 2:xtic(1) title "p50", "" u 3 title "p90", "" u 4 title "p99", "" u 5 title "p99.9"
G
    done
    ;;
  scaling)
    if [ -e "$out/plot-workers.dat" ]; then
      gnuplot <<G
$term
set output "$out/scaling-workers.png"
set title "Delivered packets/s at <0.1% loss vs worker threads"
set xlabel "workers"; set ylabel "packets/s"; set xtics 1; set grid; set yrange [0:*]
plot "$out/plot-workers.dat" u 1:2 w lp title "turnpike"
G
    fi
    if [ -e "$out/plot-allocs.dat" ]; then
      gnuplot <<G
$term
set output "$out/scaling-allocations.png"
set title "Live allocations: throughput and memory"
set xlabel "live allocations"; set logscale x; set grid
set ylabel "delivered packets/s at <0.1% loss"; set y2label "RSS bytes per allocation"; set y2tics; set ytics nomirror
set yrange [0:*]; set y2range [0:*]
plot "$out/plot-allocs.dat" u 1:2 w lp title "packets/s", "" u 1:3 axes x1y2 w lp title "bytes/allocation"
G
    fi
    ;;
esac
ls "$out"/*.png 2>/dev/null | sed 's/^/   plot: /'
