"""Analytics at scale (issue 17): the example analytics job (examples/analytics/flow_stats.py) over a `flowtrail
export` of a ledger of N runs gives, per flow, the pass rate, duration percentiles and flaky steps that
`GET /v1/analytics/flows/{id}` and `GET /v1/analytics/flakiness` answer from the projector's read models.

The history is written straight to the ledger as the executor writes runs: four flows of three steps, each run
passing, passing after a retried attempt, or failing at its first or last step (in shares that differ by flow),
with durations drawn from a log-normal spread. N follows the bench scale (`analytics_runs`: 100,000 by default).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from schemas import events as ev
from schemas.events import EventBase, FlowVersionPublished, TriggerInfo, TriggerType
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.common.settings import REPO_ROOT
from tests.bench.load import TENANT, noop_flow
from tests.bench.loaders import bench_sandbox, produce_history
from tests.bench.measure import wait_until
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra
from tests.e2e.stack import Stack

FLOWS = [noop_flow(f"analytics-{i}", 3) for i in range(4)]
STEPS = [s.name for s in FLOWS[0].steps]
EXAMPLE = REPO_ROOT / "examples" / "analytics" / "flow_stats.py"
FLOWTRAIL = Path(sys.executable).parent / "flowtrail"
# Shares of each outcome by flow: from a healthy flow to one whose last step fails a fifth of the time.
OUTCOMES = ("passed", "retried", "failed_last", "failed_first")
SHARES = [(0.97, 0.02, 0.01, 0.0), (0.85, 0.1, 0.04, 0.01), (0.7, 0.15, 0.1, 0.05), (0.5, 0.2, 0.2, 0.1)]
# Durations per (flow, outcome): distinct values, so percentiles interpolate between different runs' durations.
DURATIONS = 12


def one_run(flow_id: str, outcome: str, duration_ms: float, t0: datetime) -> list[EventBase]:
    """A run's events as the executor writes them, seq 0.., ending `duration_ms` after it started."""
    events: list[EventBase] = []
    step_ms = duration_ms / (len(STEPS) + 1)

    def emit(cls: Any, at_ms: float, payload: dict[str, Any]) -> None:
        seq = len(events)
        events.append(cls(
            tenant_id=TENANT, run_id="run_template", flow_id=flow_id, flow_version=1, seq=seq,
            occurred_at=t0 + timedelta(milliseconds=at_ms), causation_id=f"run_template:c{seq}",
            correlation_id="run_template", payload=payload,
        ))  # fmt: skip

    trigger = TriggerInfo(type=TriggerType.API, caller="key_bench", payload={"order": 1})
    emit(ev.RunRequested, 0, {"trigger": trigger, "flow_name": flow_id})
    emit(ev.RunQueued, 0, {})
    emit(ev.RunStarted, 0, {})
    for i, step in enumerate(STEPS):
        start, end = step_ms * i, step_ms * (i + 1)
        emit(ev.StepStarted, start, {"step": step, "position": i, "action": "transform", "input": {"i": i}})
        last = i == len(STEPS) - 1
        if (outcome == "failed_first" and i == 0) or (outcome == "failed_last" and last):
            error = {"category": "VALIDATION", "message": f"{step} rejected the record"}
            emit(ev.StepFailed, end, {"step": step, "error": error, "duration_ms": step_ms})
            emit(ev.RunFailed, duration_ms, {"duration_ms": duration_ms, "failed_step": step, "error": error})
            return events
        attempt = 1
        if outcome == "retried" and last:
            error = {"category": "TRANSIENT", "message": "HTTP 503 from upstream"}
            emit(ev.StepAttemptFailed, end - step_ms / 2, {"step": step, "attempt": 1, "error": error})
            attempt = 2
            emit(ev.StepStarted, end - step_ms / 2, {"step": step, "position": i, "action": "transform",
                                                      "attempt": 2, "input": {"i": i}})  # fmt: skip
        emit(ev.StepSucceeded, end, {"step": step, "attempt": attempt, "output": {"i": i}, "duration_ms": step_ms})
    emit(ev.RunSucceeded, duration_ms, {"duration_ms": duration_ms})
    return events


@dataclass(frozen=True)
class Shape:
    flow_id: str
    outcome: str
    duration_ms: float
    runs: int


def plan(total: int, seed: int = 17) -> list[Shape]:
    """`total` runs split over flows, outcomes and durations: every share's count rounded, the rest to passing."""
    rng = random.Random(seed)
    per_flow = [total // len(FLOWS) + (i < total % len(FLOWS)) for i in range(len(FLOWS))]
    shapes = []
    for flow, n, shares in zip(FLOWS, per_flow, SHARES, strict=True):
        counts = [round(n * s) for s in shares[1:]]
        for outcome, count in zip(OUTCOMES, [n - sum(counts), *counts], strict=True):
            for d in range(DURATIONS):
                runs = count // DURATIONS + (d < count % DURATIONS)
                if runs:
                    shapes.append(Shape(flow.id, outcome, round(rng.lognormvariate(7, 0.8), 3), runs))
    return shapes


def history_end() -> datetime:
    """Now, or the end of yesterday when today is under an hour old: every run's bucket is one UTC day."""
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now if now - midnight > timedelta(hours=1) else midnight - timedelta(minutes=5)


async def _run(argv: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, float]:
    started = time.perf_counter()
    done = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{argv[:3]} exited {done.returncode}:\n{done.stderr[-2000:]}"
    return done.stdout, time.perf_counter() - started


async def test_example_job_equals_the_api_at_scale(
    infra: Infra, scale: Scale, report: Report, tmp_path: Path, log_dir: Path
) -> None:
    shapes = plan(scale.analytics_runs)
    total = sum(s.runs for s in shapes)
    end = history_end()
    seconds: dict[str, float] = {}
    async with bench_sandbox(infra, scale.partitions) as box:
        db = await connect(infra.database_url, box.schema)
        try:
            await ensure_tenant(db, TENANT, "Benchmarks")
            _, key = await create_api_key(db, TENANT)
            await publish_flow_events(infra.kafka_bootstrap, box.topics, [
                FlowVersionPublished(tenant_id=TENANT, flow_id=f.id, flow_version=f.version, flow=f) for f in FLOWS
            ])  # fmt: skip
            started = time.perf_counter()
            events = 0
            for s in shapes:  # each shape's runs 1 ms apart, ending at `end`: the shapes interleave in time
                template = one_run(s.flow_id, s.outcome, s.duration_ms, end - timedelta(days=1))
                events += sum(await produce_history(infra.kafka_bootstrap, box.topics.ledger, box.partitions,
                                                    template, s.runs, end=end))  # fmt: skip
            seconds["write history"] = time.perf_counter() - started

            stack = Stack.build(box, ("projector", "api"), log_dir)
            started = time.perf_counter()
            await stack.start()
            try:

                async def projected() -> bool:
                    done = await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM projector_offsets "
                                             "WHERE topic = $1", box.topics.ledger)  # fmt: skip
                    return int(done) >= events and int(await db.fetchval("SELECT count(*) FROM flows")) == len(FLOWS)

                def tails() -> str:
                    return "\n".join(f"--- {n}\n{s.log_tail(15)}" for n, s in stack.services.items())

                await wait_until(projected, within=scale.timeout_s, interval=0.5, what="history projected",
                                 on_timeout=tails)  # fmt: skip
                seconds["projector start → history projected"] = time.perf_counter() - started
                assert await db.fetchval("SELECT count(*) FROM runs WHERE finished_at IS NOT NULL") == total

                out = tmp_path / "export"
                env = {**os.environ, **box.env()}
                _, seconds["flowtrail export"] = await _run([str(FLOWTRAIL), "export", str(out), "--tenant", TENANT],
                                                            env, scale.timeout_s)  # fmt: skip
                stdout, seconds["example job (flow_stats.py)"] = await _run(
                    [sys.executable, str(EXAMPLE), str(out), "--json"], env, scale.timeout_s
                )
                job = json.loads(stdout)

                started = time.perf_counter()
                window = {"from": (end - timedelta(days=2)).isoformat(), "to": (end + timedelta(minutes=1)).isoformat(),
                          "bucket": "day"}  # fmt: skip
                headers = {"Authorization": f"Bearer {key}"}
                async with aiohttp.ClientSession(base_url=stack["api"].url, headers=headers,
                                                 timeout=aiohttp.ClientTimeout(total=120)) as http:  # fmt: skip
                    api_flows = {}
                    for f in FLOWS:
                        async with http.get(f"/v1/analytics/flows/{f.id}", params=window) as r:
                            assert r.status == 200, await r.text()
                            api_flows[f.id] = await r.json()
                    async with http.get("/v1/analytics/flakiness") as r:
                        assert r.status == 200, await r.text()
                        api_flaky = (await r.json())["data"]
                seconds["API analytics (4 flows + flakiness)"] = time.perf_counter() - started
            finally:
                stack.stop()
        finally:
            await db.close()

    # What was written, counted independently of both readers.
    planned = {f.id: sum(s.runs for s in shapes if s.flow_id == f.id) for f in FLOWS}
    passed = {f.id: sum(s.runs for s in shapes if s.flow_id == f.id and s.outcome in ("passed", "retried"))
              for f in FLOWS}  # fmt: skip
    assert {f: (s["runs"], s["succeeded"]) for f, s in job["flows"].items()} == {
        f: (planned[f], passed[f]) for f in planned}  # fmt: skip

    for f in FLOWS:
        mine, api = job["flows"][f.id], api_flows[f.id]
        assert (mine["runs"], mine["pass_rate"]) == (api["runs"], api["pass_rate"]), f.id
        days = [b for b in api["series"] if b["runs"]]
        assert len(days) == 1, f"{f.id}: the history spans one UTC day: {[b['bucket'] for b in days]}"
        for q in ("p50", "p95", "p99"):
            assert mine["duration_ms"][q] == pytest.approx(days[0]["duration_ms"][q], rel=1e-9), (f.id, q)
    keys = ("flow_id", "flow_version", "step", "succeeded", "failed", "retried", "score")
    assert [{k: s[k] for k in keys} for s in job["flaky_steps"]] == [{k: s[k] for k in keys} for s in api_flaky]
    # Every flow's last step both passed and failed; the first step of the three flows that fail there too.
    assert sorted((s["flow_id"], s["step"]) for s in job["flaky_steps"]) == sorted(
        [(f.id, STEPS[-1]) for f in FLOWS] + [(f.id, STEPS[0]) for f in FLOWS[1:]]
    )

    rate = events / seconds["flowtrail export"]
    print(
        f"\nanalytics at scale: {total:,} runs, {events:,} events; example job = API for {len(FLOWS)} flows and "
        f"{len(api_flaky)} flaky steps; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
    )
    report.add("throughput", f"flowtrail export of a {total:,}-run analytics history", rate, "events/s",
               note=f"{events:,} events, {seconds['flowtrail export']:.1f} s")  # fmt: skip
    report.add(
        "query",
        f"example analytics job over the export of {total:,} runs (= the API's analytics)",
        seconds["example job (flow_stats.py)"],
        "s",
        note="pass rate, p50/p95/p99, flaky steps per flow",
    )
    report.add("projection", f"projector catch-up on the {total:,}-run analytics history",
               events / seconds["projector start → history projected"], "events/s",
               note="startup included")  # fmt: skip
    report.details["analytics_at_scale"] = {
        "runs": total, "events": events, "shapes": len(shapes), "seconds": seconds, "job": job,
        "api": {f: {k: v for k, v in a.items() if k in ("runs", "pass_rate", "series")} for f, a in api_flows.items()},
    }  # fmt: skip
