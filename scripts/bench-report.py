#!/usr/bin/env python3
"""Aggregates turnpike-bench JSON files into results.json, results.md and gnuplot data.

Usage: bench-report.py compare|loadtest|scaling OUTDIR

Reads OUTDIR/raw/*.json, named <server>-<test>-r<round>.json (compare, loadtest) or
scaling-<kind>-<x>.json (scaling). Averages rounds (mean), writes OUTDIR/results.json and
OUTDIR/results.md, and .dat files for the plots.
"""
import glob
import json
import os
import re
import statistics
import sys


def load(outdir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(outdir, "raw", "*.json"))):
        name = os.path.basename(path)[:-5]
        try:
            with open(path) as f:
                runs[name] = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
    return runs


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def metric(runs, server, test, fn):
    vals = []
    for name, v in runs.items():
        m = re.fullmatch(rf"{re.escape(server)}-{re.escape(test)}-r(\d+)", name)
        if m:
            try:
                vals.append(fn(v))
            except (KeyError, TypeError, IndexError):
                pass
    return mean(vals)


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    if isinstance(x, float) and digits:
        return f"{x:.{digits}f}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def compare(outdir, runs):
    servers = ["turnpike", "coturn", "bare"]
    tests = sorted({re.sub(r"^[a-z]+-(.*)-r\d+$", r"\1", n) for n in runs})
    sweeps = [t for t in tests if t.startswith("sweep")]
    rows = []  # (metric, unit, {server: value}, better: "high"|"low")
    lower_bounds = set()  # (metric, server): a round was generator-limited without loss
    for t in sweeps:
        rows.append((f"delivered pkt/s at <0.1% loss ({t[6:]})", "pkt/s",
                     {s: metric(runs, s, t, lambda v: v["best_pps"]) for s in servers}, "high"))
        for s in servers:
            if metric(runs, s, t, lambda v: 1 if v.get("best_is_lower_bound") else 0):
                lower_bounds.add((rows[-1][0], s))
        rows.append((f"server CPU µs per relayed packet at that rate ({t[6:]})", "µs",
                     {s: metric(runs, s, t, lambda v: v["best"]["cpu_us_per_packet"]) for s in servers}, "low"))
    for t in [t for t in tests if t.startswith("fixed")]:
        rows.append((f"server CPU µs per relayed packet at {t[6:]}", "µs",
                     {s: metric(runs, s, t, lambda v: v["steps"][0]["cpu_us_per_packet"]) for s in servers}, "low"))
        for q in ["p50", "p99", "p999"]:
            rows.append((f"RTT {q} at {t[6:]}", "µs",
                         {s: metric(runs, s, t, lambda v, q=q: v["steps"][0]["rtt_us"][q]) for s in servers}, "low"))
        rows.append((f"loss at {t[6:]}", "%",
                     {s: metric(runs, s, t, lambda v: 100 * v["steps"][0]["loss"]) for s in servers}, "low"))
    if "binding" in tests:
        rows.append(("STUN Binding responses/s", "/s",
                     {s: metric(runs, s, "binding", lambda v: v["bindings_per_s"]) for s in servers}, "high"))
        rows.append(("server CPU µs per Binding request", "µs",
                     {s: metric(runs, s, "binding", lambda v: v["cpu_us_per_request"]) for s in servers}, "low"))
    if "alloc" in tests:
        rows.append(("allocations/s (401 + Allocate + delete)", "/s",
                     {s: metric(runs, s, "alloc", lambda v: v["allocations_per_s"]) for s in servers}, "high"))
        # A server busy for less than 90% of the churn was not what limited it: the generator was (it
        # spins on one core), and that figure is a lower bound.
        for s in servers:
            if metric(runs, s, "alloc", lambda v: 1 if v["server_cpu_s"] < 0.9 * v["seconds"] else 0):
                lower_bounds.add((rows[-1][0], s))
        rows.append(("server CPU µs per allocation", "µs",
                     {s: metric(runs, s, "alloc", lambda v: 1e6 * v["server_cpu_s"] / v["allocations"])
                      for s in servers}, "low"))
        rows.append(("server CPU busy during the churn", "%",
                     {s: metric(runs, s, "alloc", lambda v: 100 * v["server_cpu_s"] / v["seconds"])
                      for s in servers}, "high"))
    md = ["| metric | turnpike | coturn | bare forwarder | turnpike / coturn | turnpike / bare |",
          "|---|---:|---:|---:|---:|---:|"]
    out_rows = []
    for (name, unit, vals, better) in rows:
        tp, ct, bare = vals["turnpike"], vals["coturn"], vals["bare"]
        r_ct, r_bare = ratio(tp, ct), ratio(tp, bare)
        lb = {s: ("≥ " if (name, s) in lower_bounds else "") for s in servers}
        md.append(f"| {name} | {lb['turnpike']}{fmt(tp)} | {lb['coturn']}{fmt(ct)} | {lb['bare']}{fmt(bare)} | "
                  f"{fmt(r_ct, 2)}× | {fmt(r_bare, 2)}× |")
        out_rows.append({"metric": name, "unit": unit, "better": better, "turnpike": tp, "coturn": ct,
                         "bare": bare, "turnpike_over_coturn": r_ct, "turnpike_over_bare": r_bare})
    # Plot data: delivered vs offered for each server's sweeps (all rounds), and latency percentiles.
    for t in sweeps:
        for s in servers:
            with open(os.path.join(outdir, f"plot-{t}-{s}.dat"), "w") as f:
                for name, v in sorted(runs.items()):
                    if re.fullmatch(rf"{s}-{re.escape(t)}-r\d+", name):
                        for st in sorted(v.get("steps", []), key=lambda x: x["offered_pps"]):
                            f.write(f'{st["offered_pps"]:.0f} {st["delivered_pps"]:.0f} {100 * st["loss"]:.4f} '
                                    f'{st["rtt_us"]["p99"]:.1f}\n')
                        f.write("\n\n")
    for t in [t for t in tests if t.startswith("fixed")]:
        with open(os.path.join(outdir, f"plot-{t}-latency.dat"), "w") as f:
            f.write("server p50 p90 p99 p99.9\n")
            for s in servers:
                qs = [metric(runs, s, t, lambda v, q=q: v["steps"][0]["rtt_us"][q]) for q in ["p50", "p90", "p99", "p999"]]
                f.write(s + " " + " ".join(f"{q:.1f}" if q is not None else "0" for q in qs) + "\n")
    if lower_bounds:
        md.append("")
        md.append("≥: in at least one round the generator could not offer more and the server lost nothing there "
                  "(a sweep), or the server was busy for less than 90% of the churn (alloc), so that round's figure "
                  "is a lower bound (averaged with the others).")
    return out_rows, md


def loadtest(outdir, runs):
    md = ["| test | result | CPU µs/pkt | p50 µs | p99 µs | p99.9 µs |", "|---|---:|---:|---:|---:|---:|"]
    rows = []
    for name, v in sorted(runs.items()):
        if v["scenario"] == "relay":
            b = v.get("best") or v["steps"][0]
            md.append(f'| {name} | {fmt(v.get("best_pps") or b["delivered_pps"])} pkt/s at <0.1% loss | '
                      f'{fmt(b["cpu_us_per_packet"])} | {fmt(b["rtt_us"]["p50"])} | {fmt(b["rtt_us"]["p99"])} | '
                      f'{fmt(b["rtt_us"]["p999"])} |')
            rows.append({"test": name, "pps": v.get("best_pps"), "best": b})
        elif v["scenario"] == "alloc":
            md.append(f'| {name} | {fmt(v["allocations_per_s"])} allocations/s | | | | |')
            rows.append({"test": name, "allocations_per_s": v["allocations_per_s"]})
        else:
            md.append(f'| {name} | {fmt(v["bindings_per_s"])} Bindings/s | {fmt(v.get("cpu_us_per_request"))} | '
                      f'{fmt(v["rtt_us"]["p50"])} | {fmt(v["rtt_us"]["p99"])} | {fmt(v["rtt_us"]["p999"])} |')
            rows.append({"test": name, "bindings_per_s": v["bindings_per_s"]})
    return rows, md


def scaling(outdir, runs):
    md = []
    rows = []
    workers = sorted((int(n.split("-")[-1]), v) for n, v in runs.items() if n.startswith("scaling-workers-"))
    if workers:
        md += ["| workers | delivered pkt/s at <0.1% loss | CPU µs/pkt |", "|---:|---:|---:|"]
        with open(os.path.join(outdir, "plot-workers.dat"), "w") as f:
            for w, v in workers:
                b = v.get("best") or {}
                md.append(f'| {w} | {fmt(v.get("best_pps"))} | {fmt(b.get("cpu_us_per_packet"))} |')
                f.write(f'{w} {v.get("best_pps") or 0:.0f}\n')
                rows.append({"workers": w, "pps": v.get("best_pps")})
        md.append("")
    allocs = sorted((int(n.split("-")[-1]), v) for n, v in runs.items() if n.startswith("scaling-allocs-"))
    if allocs:
        md += ["| live allocations | set-up/s | RSS delta | bytes per allocation | delivered pkt/s at <0.1% loss |",
               "|---:|---:|---:|---:|---:|"]
        with open(os.path.join(outdir, "plot-allocs.dat"), "w") as f:
            for k, v in allocs:
                idle = v.get("idle") or {}
                d = None
                if idle.get("rss_after_kib") is not None and idle.get("rss_before_kib") is not None:
                    d = idle["rss_after_kib"] - idle["rss_before_kib"]
                rate = idle["allocated"] / idle["seconds"] if idle.get("seconds") else None
                md.append(f'| {idle.get("allocated", k)} | {fmt(rate)} | {fmt(d)} KiB | '
                          f'{fmt(idle.get("bytes_per_allocation"))} | {fmt(v.get("best_pps"))} |')
                f.write(f'{idle.get("allocated", k)} {v.get("best_pps") or 0:.0f} '
                        f'{idle.get("bytes_per_allocation") or 0:.0f}\n')
                rows.append({"allocations": idle.get("allocated", k), "pps": v.get("best_pps"),
                             "bytes_per_allocation": idle.get("bytes_per_allocation")})
    return rows, md


def main():
    kind, outdir = sys.argv[1], sys.argv[2]
    runs = load(outdir)
    rows, md = {"compare": compare, "loadtest": loadtest, "scaling": scaling}[kind](outdir, runs)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"kind": kind, "rows": rows, "runs": runs}, f, indent=1)
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
