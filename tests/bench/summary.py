#!/usr/bin/env python3
"""Summarises a tests/bench/run.sh results file (JSON lines) into one line.

For each path (standalone, remote, and nginx when the run had it) and each
round: throughput as a fraction
of the direct run of the same round (loadgen at each concurrency, loadgen
best over the concurrencies against the direct path's best, and wrk),
added latency at the fixed rate (p50/p99, scheduled and service time, minus
the direct run of the same round), CPU microseconds per request of each
process at each concurrency, wake-ups per request of each process at the
fixed rate, and the hypervisor steal during the runs. Prints
the median over rounds, plus the min and max of each ratio, as one JSON
object labelled "summary".

Usage: summary.py RESULTS.jsonl
"""

import json
import re
import statistics
import sys
from collections import defaultdict

# "<path>-<kind>", e.g. "remote-throughput-c64", "direct-latency-r500".
LABEL = re.compile(
    r"^(?P<path>direct|standalone|remote|nginx)-"
    r"(?P<kind>throughput-c\d+|throughput-wrk-c\d+|cpu-us-per-request-c\d+"
    r"|latency-r\d+|wakeups-per-request-r\d+)$"
)


def main(path):
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    by = defaultdict(dict)  # (kind, path) -> round -> row
    for r in rows:
        label, rnd = r.get("label", ""), r.get("round")
        m = LABEL.match(label)
        if rnd is None or not m:
            continue
        kind = m["kind"]
        for fixed_rate in ("latency", "wakeups-per-request"):
            if kind.startswith(fixed_rate + "-r"):
                kind = fixed_rate
        by[(kind, m["path"])][rnd] = r
    levels = sorted(
        {int(k[len("throughput-c") :]) for k, _ in by if k.startswith("throughput-c")}
    )

    def series(kind, path, f):
        direct = by.get((kind, "direct"), {})
        mine = by.get((kind, path), {})
        return [f(mine[k], direct[k]) for k in sorted(mine) if k in direct]

    def stats(xs, digits):
        if not xs:
            return None
        return {
            "median": round(statistics.median(xs), digits),
            "min": round(min(xs), digits),
            "max": round(max(xs), digits),
            "rounds": len(xs),
        }

    def best_ratios(path):
        best = {}
        for p in (path, "direct"):
            for c in levels:
                for rnd, r in by.get((f"throughput-c{c}", p), {}).items():
                    best[(p, rnd)] = max(best.get((p, rnd), 0), r["rps"])
        rounds = sorted(rnd for p, rnd in best if p == path and (("direct", rnd) in best))
        return [best[(path, rnd)] / best[("direct", rnd)] for rnd in rounds]

    out = {"label": "summary"}
    paths = [p for p in ("standalone", "remote", "nginx") if any(q == p for _, q in by)]
    for path in paths:
        s = {}
        for c in levels:
            s[f"throughput_ratio_loadgen_c{c}"] = stats(
                series(f"throughput-c{c}", path, lambda m, d: m["rps"] / d["rps"]), 3
            )
        # Each path's best closed-loop rate over the concurrency levels
        # against the direct path's best, round by round: the saturated
        # throughput, not flattered when the direct path does worse at one
        # level than at another.
        s["throughput_ratio_loadgen_best"] = stats(best_ratios(path), 3)
        s["throughput_ratio_wrk"] = stats(
            series("throughput-wrk-c10", path, lambda m, d: m["rps"] / d["rps"]), 3
        )
        for key in ("p50_us", "p99_us", "service_p50_us", "service_p99_us"):
            s["added_" + key.replace("_us", "_ms")] = stats(
                series("latency", path, lambda m, d, k=key: (m[k] - d[k]) / 1000), 3
            )
        for c in levels:
            cpu = by.get((f"cpu-us-per-request-c{c}", path), {})
            for proc in ("sidecar", "control_plane", "fake_backend"):
                xs = [r[proc] for r in cpu.values() if r.get(proc)]
                if xs:
                    s[f"cpu_us_per_request_c{c}_{proc}"] = statistics.median(xs)
        wakes = by.get(("wakeups-per-request", path), {})
        for proc in ("sidecar", "control_plane"):
            xs = [r[proc] for r in wakes.values() if proc in r]
            if xs and (proc == "sidecar" or path == "remote"):
                s[f"wakeups_per_request_{proc}"] = statistics.median(xs)
        out[path] = s
    # Hypervisor steal per run (ms, all vCPUs), median over rounds.
    for path in ["direct"] + paths:
        for kind in ["latency"] + [f"throughput-c{c}" for c in levels]:
            xs = [r["steal_ms"] for r in by.get((kind, path), {}).values() if "steal_ms" in r]
            if xs:
                out.setdefault("steal_ms_median", {})[f"{path}-{kind}"] = statistics.median(xs)
    for c in levels:
        direct = [r["rps"] for r in by.get((f"throughput-c{c}", "direct"), {}).values()]
        if direct:
            out[f"direct_rps_loadgen_c{c}_median"] = statistics.median(direct)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
