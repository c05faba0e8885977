#!/usr/bin/env python3
"""Summarises a tests/bench/run.sh results file (JSON lines) into one line.

For each path (standalone, remote) and each round: throughput as a fraction
of the direct run of the same round (loadgen and wrk), added latency at the
fixed rate (p50/p99, scheduled and service time, minus the direct run of
the same round), and CPU microseconds per request of each process. Prints
the median over rounds, plus the min and max of each ratio, as one JSON
object labelled "summary".

Usage: summary.py RESULTS.jsonl
"""

import json
import statistics
import sys
from collections import defaultdict


def main(path):
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    by = defaultdict(dict)  # (kind, path) -> round -> row
    for r in rows:
        label, rnd = r.get("label", ""), r.get("round")
        if rnd is None:
            continue
        for kind in ("throughput-c10", "throughput-wrk-c10", "cpu-us-per-request"):
            if label.endswith("-" + kind):
                by[(kind, label[: -len(kind) - 1])][rnd] = r
        if "-latency-r" in label:
            by[("latency", label.split("-latency-r")[0])][rnd] = r

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

    out = {"label": "summary"}
    for path in ("standalone", "remote"):
        s = {}
        s["throughput_ratio_loadgen"] = stats(
            series("throughput-c10", path, lambda m, d: m["rps"] / d["rps"]), 3
        )
        s["throughput_ratio_wrk"] = stats(
            series("throughput-wrk-c10", path, lambda m, d: m["rps"] / d["rps"]), 3
        )
        for key in ("p50_us", "p99_us", "service_p50_us", "service_p99_us"):
            s["added_" + key.replace("_us", "_ms")] = stats(
                series("latency", path, lambda m, d, k=key: (m[k] - d[k]) / 1000), 3
            )
        cpu = by.get(("cpu-us-per-request", path), {})
        for proc in ("sidecar", "control_plane", "fake_backend"):
            xs = [r[proc] for r in cpu.values() if r.get(proc)]
            if xs:
                s["cpu_us_per_request_" + proc] = statistics.median(xs)
        out[path] = s
    direct = [r["rps"] for r in by.get(("throughput-c10", "direct"), {}).values()]
    if direct:
        out["direct_rps_loadgen_median"] = statistics.median(direct)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
