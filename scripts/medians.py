#!/usr/bin/env python3
"""Medians of the benchmark runs in a JSON-lines file written by scripts/benchmarks.sh.

    python3 scripts/medians.py target/benchmarks/runs.jsonl

Prints, per target, each run's figure and the median, as docs/BENCHMARKS.md reports them.
"""
import json
import statistics
import sys


def key(run):
    p, s = run["params"], run["scenario"]
    if s == "roundtrip":
        return f"roundtrip{p['clients']}" + ("_sse" if p.get("via") == "sse" else "")
    if s == "large":
        return f"large{p['body_bytes'] >> 20}MiB"
    if s == "sse" and p["count"] == 1:
        return "streams"
    return s


def figures(run):
    s, f, lat = run["scenario"], run["figures"], run["latency_ms"] or {}
    mem = {k: v["peak_kib"] for k, v in run["memory"].items()}
    errors = sum(run["errors"].values())
    out = {"errors": errors, "peak_kib": mem}
    if s in ("create", "roundtrip", "fanout", "soak"):
        out.update(per_s=round(run["per_s"]), p50=lat.get("p50"), p99=lat.get("p99"))
    if s == "large":
        out.update(p50=lat.get("p50"), p99=lat.get("p99"))
    if s == "sse":
        out.update(
            events_per_s=round(run["per_s"]),
            lost=f.get("events_lost"),
            streams=f.get("streams"),
            proxy_kib_per_stream=f.get("stream_kib.proxy1.broker"),
            broker_kib_per_stream=f.get("stream_kib.broker"),
            p50=lat.get("p50"),
        )
    if s == "waiters":
        rounds = f["woken_all_ms"]
        out.update(woken_all_ms=max(rounds), median_round_ms=statistics.median(rounds), rounds=rounds,
                   warmup_ms=f.get("warmup_woken_all_ms"), p50=lat.get("p50"))
    if s == "expiry":
        out.update(
            baseline=f["baseline_kib"], loaded=f["loaded_kib"], after_2s=f["after_2s_kib"],
            returned_pct=f.get("returned_pct"), back_after_s=f["back_after_s"],
        )
    return out


def main():
    runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    by = {}
    for r in runs:
        by.setdefault(key(r), []).append(figures(r))
    for k, rs in by.items():
        print(f"== {k} ({len(rs)} runs)")
        for r in rs:
            print("  ", json.dumps(r))
        for metric in ("per_s", "p50", "p99", "events_per_s", "woken_all_ms", "median_round_ms", "proxy_kib_per_stream",
                       "broker_kib_per_stream", "streams", "after_2s", "baseline", "loaded", "returned_pct"):
            vals = [r[metric] for r in rs if r.get(metric) is not None]
            if vals:
                print(f"   median {metric}: {statistics.median(vals)}")


if __name__ == "__main__":
    main()
