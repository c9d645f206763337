"""How big a benchmark run is: `FLOWTRAIL_BENCH_SCALE=smoke|default|full` picks one preset;
`FLOWTRAIL_BENCH_HISTORY_RUNS=N` overrides its `history_runs` alone (e.g. the 1,000,000-run restart without the
rest of the full scale)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

ENV = "FLOWTRAIL_BENCH_SCALE"
HISTORY_RUNS_ENV = "FLOWTRAIL_BENCH_HISTORY_RUNS"


@dataclass(frozen=True)
class Scale:
    name: str
    # Partitions of every run-keyed topic the benchmarks create (the services' default is 4).
    partitions: int
    # Raw Kafka ceiling: messages produced then consumed, and their size.
    kafka_messages: int
    # Raw COPY ceiling: this many runs' worth of runs, run_steps and run_events rows.
    copy_runs: int
    # Runs seeded for the raw SQL of the runs list, and timed executions per query shape.
    list_seed_runs: int
    query_samples: int
    # Projection: runs of `steps` steps produced to the ledger before the projector starts.
    projection_runs: int
    # End to end: runs per flow triggered through ingest, `concurrency` requests at a time.
    e2e_runs: int
    latency_runs: int
    sequential_runs: int
    batch_inputs: int
    # Queries through the API: runs seeded straight into the read models (the issue asks for 1M and 10M).
    query_runs: int = 5_000
    # Memory after history: finished 1-step runs written to the ledger before the services start (issue: 1M).
    history_runs: int = 2_000
    # Export: ledger events `flowtrail export` writes to Parquet, run in its own process (issue: 1M under 300 MB).
    export_events: int = 1_000_000
    # Analytics at scale: runs of varied outcomes and durations the example job and the API both count (issue: 100k).
    analytics_runs: int = 100_000
    concurrency: int = 32
    steps: int = 10
    record_bytes: int = 500
    # Generous bound on any one wait: beyond it the harness is broken, not slow.
    timeout_s: float = 600.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SCALES = {
    # CI: keeps the harness working in well under a minute; the figures mean little.
    "smoke": Scale(
        name="smoke", partitions=4, kafka_messages=5_000, copy_runs=100, list_seed_runs=5_000, query_samples=50,
        projection_runs=100, e2e_runs=64, latency_runs=30, sequential_runs=3, batch_inputs=2_000, timeout_s=120,
        export_events=2_400, analytics_runs=500,
    ),
    # A few minutes on a 2-core machine.
    "default": Scale(
        name="default", partitions=4, kafka_messages=200_000, copy_runs=4_000, list_seed_runs=200_000,
        query_samples=500, projection_runs=5_000, e2e_runs=2_000, latency_runs=400, sequential_runs=20,
        batch_inputs=100_000, query_runs=1_000_000, history_runs=100_000, export_events=200_000,
        analytics_runs=10_000,
    ),
    # The sizes: a million ledger events to project and to export, 100,000 runs for the analytics job.
    "full": Scale(
        name="full", partitions=4, kafka_messages=1_000_000, copy_runs=20_000, list_seed_runs=1_000_000,
        query_samples=2_000, projection_runs=41_667, e2e_runs=10_000, latency_runs=1_000, sequential_runs=50,
        batch_inputs=100_000, timeout_s=1800, query_runs=10_000_000, history_runs=1_000_000,
    ),
}  # fmt: skip


def current() -> Scale:
    name = os.environ.get(ENV, "default").strip().lower() or "default"
    if name not in SCALES:
        raise ValueError(f"{ENV}={name!r}: choose one of {', '.join(SCALES)}")
    chosen = SCALES[name]
    if history := os.environ.get(HISTORY_RUNS_ENV, "").strip().replace("_", ""):
        if not history.isdigit() or int(history) < 1:
            raise ValueError(f"{HISTORY_RUNS_ENV}={history!r}: a positive number of runs")
        chosen = replace(chosen, history_runs=int(history))
    return chosen
