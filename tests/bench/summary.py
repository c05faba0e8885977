#!/usr/bin/env python3
"""Summarises a tests/bench/run.sh results file (JSON lines) into one line.

For each path (standalone, remote) and each round: throughput as a fraction
of the direct run of the same round (loadgen at each concurrency, and wrk),
added latency at the fixed rate (p50/p99, scheduled and service time, minus
the direct run of the same round), and CPU microseconds per request of each
process at each concurrency. Prints
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
    r"^(?P<path>direct|standalone|remote)-"
    r"(?P<kind>throughput-c\d+|throughput-wrk-c\d+|cpu-us-per-request-c\d+|latency-r\d+)$"
)


def main(path):
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    by = defaultdict(dict)  # (kind, path) -> round -> row
    for r in rows:
        label, rnd = r.get("label", ""), r.get("round")
        m = LABEL.match(label)
        if rnd is None or not m:
            continue
        kind = "latency" if m["kind"].startswith("latency-") else m["kind"]
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

    out = {"label": "summary"}
    for path in ("standalone", "remote"):
        s = {}
        for c in levels:
            s[f"throughput_ratio_loadgen_c{c}"] = stats(
                series(f"throughput-c{c}", path, lambda m, d: m["rps"] / d["rps"]), 3
            )
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
        out[path] = s
    for c in levels:
        direct = [r["rps"] for r in by.get((f"throughput-c{c}", "direct"), {}).values()]
        if direct:
            out[f"direct_rps_loadgen_c{c}_median"] = statistics.median(direct)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
