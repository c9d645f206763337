"""Pass rate, duration percentiles and flaky steps per flow, from the files `flowtrail export` writes
(docs/ledger.md#export).

    flowtrail export out/ --tenant acme
    python examples/analytics/flow_stats.py out/ [--json]

Only pyarrow: `runs.parquet` is read a record batch at a time (four columns), so memory holds one number per run's
duration, not the runs. The figures are the ones `GET /v1/analytics/flows/{flow_id}` answers for the same runs:
runs that ended, the share of them that SUCCEEDED (rounded to 4 places), and p50/p95/p99 of `duration_ms`
interpolated as PostgreSQL's `percentile_cont` does; and the steps `GET /v1/analytics/flakiness` lists, from the
step events in `events.parquet`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def percentile_cont(ordered: list[float], q: float) -> float | None:
    """The q-th percentile of sorted values, linearly interpolated between the two nearest (percentile_cont)."""
    if not ordered:
        return None
    at = q * (len(ordered) - 1)
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def flow_stats(folder: Path) -> dict[str, dict[str, Any]]:
    """flow id → {runs, succeeded, pass_rate, duration_ms: {p50, p95, p99}} over the runs that ended."""
    runs: dict[str, int] = defaultdict(int)
    passed: dict[str, int] = defaultdict(int)
    durations: dict[str, list[float]] = defaultdict(list)
    table = pq.ParquetFile(folder / "runs.parquet")
    for batch in table.iter_batches(columns=["flow_id", "status", "finished_at", "duration_ms"]):
        columns = batch.to_pydict()
        for flow, status, finished, duration in zip(
            columns["flow_id"], columns["status"], columns["finished_at"], columns["duration_ms"], strict=True
        ):
            if finished is None:
                continue  # still running: not counted until it ends
            runs[flow] += 1
            passed[flow] += status == "SUCCEEDED"
            if duration is not None:
                durations[flow].append(duration)
    out = {}
    for flow in sorted(runs):
        ordered = sorted(durations[flow])
        out[flow] = {
            "runs": runs[flow],
            "succeeded": passed[flow],
            "pass_rate": round(passed[flow] / runs[flow], 4),
            "duration_ms": {f"p{int(q * 100)}": percentile_cont(ordered, q) for q in (0.5, 0.95, 0.99)},
        }
    return out


# The step events step_outcomes counts (docs/ledger.md): a step that passed, failed, or failed an attempt and retried.
OUTCOMES = {"StepSucceeded": "succeeded", "StepFailed": "failed", "StepAttemptFailed": "retried"}


def flaky_steps(folder: Path, min_runs: int = 2) -> list[dict[str, Any]]:
    """Steps that both passed and failed on one flow version, most flaky first: score = 2·min(passed, failed) /
    (passed + failed), 1.0 when a step fails half the time (`GET /v1/analytics/flakiness`)."""
    counts: dict[tuple[str, int, str], dict[str, int]] = {}
    table = pq.ParquetFile(folder / "events.parquet")
    for batch in table.iter_batches(columns=["type", "flow_id", "flow_version", "payload"]):
        columns = batch.to_pydict()
        for kind, flow, version, payload in zip(
            columns["type"], columns["flow_id"], columns["flow_version"], columns["payload"], strict=True
        ):
            if (column := OUTCOMES.get(kind)) is not None:
                key = (flow, version, json.loads(payload)["step"])
                counts.setdefault(key, dict.fromkeys(OUTCOMES.values(), 0))[column] += 1
    out: list[dict[str, Any]] = [
        {"flow_id": f, "flow_version": v, "step": s, **c,
         "score": round(2 * min(c["succeeded"], c["failed"]) / (c["succeeded"] + c["failed"]), 4)}
        for (f, v, s), c in counts.items()
        if c["succeeded"] > 0 and c["failed"] > 0 and c["succeeded"] + c["failed"] >= min_runs
    ]  # fmt: skip
    out.sort(key=lambda r: (-r["score"], -r["failed"], r["flow_id"], r["flow_version"], r["step"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a folder `flowtrail export` wrote (Parquet)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    stats, flaky = flow_stats(args.folder), flaky_steps(args.folder)
    if args.json:
        json.dump({"flows": stats, "flaky_steps": flaky}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'flow':<30} {'runs':>8} {'pass rate':>9} {'p50 ms':>10} {'p95 ms':>10} {'p99 ms':>10}")
    for flow, s in stats.items():
        d = s["duration_ms"]
        cells = [f"{d[k]:10.1f}" if d[k] is not None else f"{'-':>10}" for k in ("p50", "p95", "p99")]
        print(f"{flow:<30} {s['runs']:>8} {s['pass_rate']:>9.2%} {' '.join(cells)}")
    if flaky:
        print(f"\n{'flaky step (flow v version: step)':<50} {'passed':>7} {'failed':>7} {'retried':>8} {'score':>6}")
        for f in flaky:
            name = f"{f['flow_id']} v{f['flow_version']}: {f['step']}"
            print(f"{name:<50} {f['succeeded']:>7} {f['failed']:>7} {f['retried']:>8} {f['score']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
