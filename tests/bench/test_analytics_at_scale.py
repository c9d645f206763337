"""Analytics at scale (issue 17): the example analytics job (examples/analytics/flow_stats.py) over a `flowtrail
export` of a ledger of N runs gives, per flow, the pass rate, duration percentiles and flaky steps that
`GET /v1/analytics/flows/{id}` and `GET /v1/analytics/flakiness` answer from the projector's read models.

The history is written straight to the ledger in the events the executor writes: four flows of three steps, each
run passing, passing after a retried attempt, or failing at its first or last step (in shares that differ by
flow), each with its own duration drawn from a log-normal spread, so the percentiles interpolate between distinct
values. N follows the bench scale (`analytics_runs`: 100,000 by default).
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
from schemas.events import EventBase, FlowVersionPublished, TriggerInfo, TriggerType, new_run_id
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.common.settings import REPO_ROOT
from tests.bench.load import TENANT, noop_flow
from tests.bench.loaders import bench_sandbox
from tests.bench.measure import wait_until
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra
from tests.e2e.stack import Stack
from tests.factories import produce

FLOWS = [noop_flow(f"analytics-{i}", 3) for i in range(4)]
STEPS = [s.name for s in FLOWS[0].steps]
EXAMPLE = REPO_ROOT / "examples" / "analytics" / "flow_stats.py"
FLOWTRAIL = Path(sys.executable).parent / "flowtrail"
# Shares of each outcome by flow: from a healthy flow to one whose last step fails a fifth of the time.
OUTCOMES = ("passed", "retried", "failed_last", "failed_first")
SHARES = [(0.97, 0.02, 0.01, 0.0), (0.85, 0.1, 0.04, 0.01), (0.7, 0.15, 0.1, 0.05), (0.5, 0.2, 0.2, 0.1)]
# Runs produced to the ledger per producer.
CHUNK = 2_000


def one_run(run_id: str, flow_id: str, outcome: str, duration_ms: float, t0: datetime) -> list[EventBase]:
    """A run's events as the executor writes them, seq 0.., ending `duration_ms` after it started."""
    events: list[EventBase] = []
    step_ms = duration_ms / (len(STEPS) + 1)

    def emit(cls: Any, at_ms: float, payload: dict[str, Any]) -> None:
        seq = len(events)
        events.append(cls(
            tenant_id=TENANT, run_id=run_id, flow_id=flow_id, flow_version=1, seq=seq,
            occurred_at=t0 + timedelta(milliseconds=at_ms), causation_id=f"{run_id}:c{seq}",
            correlation_id=run_id, payload=payload,
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
class Planned:
    flow_id: str
    outcome: str
    duration_ms: float


def plan(total: int, seed: int = 17) -> list[Planned]:
    """`total` runs, the flows in turn, each run's outcome drawn with its flow's shares and its own duration."""
    rng = random.Random(seed)
    out = []
    for i in range(total):
        flow = i % len(FLOWS)
        outcome = rng.choices(OUTCOMES, SHARES[flow])[0]
        out.append(Planned(FLOWS[flow].id, outcome, round(rng.lognormvariate(7, 0.8), 3)))
    return out


async def write_history(bootstrap: str, topic: str, partitions: int, runs: list[Planned], end: datetime) -> int:
    """Every planned run's events, the runs 1 ms apart and ending by `end`; returns the events written."""
    first = end - timedelta(milliseconds=len(runs)) - timedelta(minutes=1)
    written = 0
    for at in range(0, len(runs), CHUNK):
        events = [e for i, r in enumerate(runs[at : at + CHUNK], start=at)
                  for e in one_run(new_run_id(), r.flow_id, r.outcome, r.duration_ms,
                                   first + timedelta(milliseconds=i))]  # fmt: skip
        await produce(bootstrap, topic, events, partitions)
        written += len(events)
    return written


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
    runs = plan(scale.analytics_runs)
    total = len(runs)
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
            events = await write_history(infra.kafka_bootstrap, box.topics.ledger, box.partitions, runs, end)
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

                # Slow is not broken here: a million events at the projector's speed on a loaded machine.
                await wait_until(projected, within=max(scale.timeout_s, events / 1000), interval=0.5,
                                 what="history projected", on_timeout=tails)  # fmt: skip
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
    planned = {f.id: sum(r.flow_id == f.id for r in runs) for f in FLOWS}
    passed = {f.id: sum(r.flow_id == f.id and r.outcome in ("passed", "retried") for r in runs) for f in FLOWS}
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
    # The steps that both passed and failed in the plan: the last (failed_last against the runs that passed it) and
    # the first (failed_first against every other run).
    flaky = {(f.id, step) for f in FLOWS for step, fails in ((STEPS[-1], "failed_last"), (STEPS[0], "failed_first"))
             if any(r.flow_id == f.id and r.outcome == fails for r in runs)
             and any(r.flow_id == f.id and r.outcome in ("passed", "retried") for r in runs)}  # fmt: skip
    assert flaky and {(s["flow_id"], s["step"]) for s in job["flaky_steps"]} == flaky

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
        "runs": total, "events": events, "seconds": seconds, "job": job,
        "api": {f: {k: v for k, v in a.items() if k in ("runs", "pass_rate", "series")} for f, a in api_flows.items()},
    }  # fmt: skip
