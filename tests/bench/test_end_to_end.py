"""End to end through all four services: runs/s, trigger → visible latency, a 100,000-input batch, memory.

The tests share one running Flowtrail and run in file order: the latency test loads at half the rate the
1-step throughput test reached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.launcher.kafka import kafka_pid
from services.common.db import connect
from tests.bench.ceilings import KafkaCeiling
from tests.bench.load import (
    STAGES,
    TERMINAL,
    Flowtrail,
    Timeline,
    TriggerClient,
    Visibility,
    noop_flow,
    running_flowtrail,
)
from tests.bench.measure import percentile, wait_until
from tests.bench.procstat import CpuMeter, postgres_pids, rss_mb
from tests.bench.report import Report, Target
from tests.bench.scale import Scale
from tests.conftest import STATE_DIR, Infra

TEN, ONE = "bench-10", "bench-1"
# What each test measured that a later one needs (e.g. the rate the latency test loads at).
measured: dict[str, float] = {}


@pytest.fixture(scope="module")
async def ft(infra: Infra, scale: Scale, log_dir: Path) -> AsyncIterator[Flowtrail]:
    flows = [noop_flow(TEN, scale.steps), noop_flow(ONE, 1)]
    async with running_flowtrail(infra, scale.partitions, log_dir, flows) as ft:
        # Warm-up: connections, statement caches, the executor's flow registry.
        client = TriggerClient(ft, 8)
        try:
            await asyncio.gather(*(client.one(flow, {"warm": i}) for i in range(4) for flow in (TEN, ONE)))
        finally:
            await client.close()

        async def warm() -> bool:
            return await ft.terminal_count(TEN) + await ft.terminal_count(ONE) >= 8

        await wait_until(warm, within=scale.timeout_s, interval=0.05, what="warm-up runs", on_timeout=ft.log_tails)
        yield ft


async def _throughput(ft: Flowtrail, flow_id: str, scale: Scale) -> dict[str, Any]:
    n = scale.e2e_runs
    before = await ft.terminal_count(flow_id)
    side = await connect(ft.sandbox.infra.database_url, ft.sandbox.schema)
    timeline = Timeline(ft, side, flow_id)
    pids = {name: [pid] for name, pid in ft.pids().items()}
    broker = kafka_pid(STATE_DIR)
    meter = CpuMeter({**pids, **({"kafka broker": [broker]} if broker else {}), "postgres (all)": postgres_pids()})
    client = TriggerClient(ft, scale.concurrency)
    try:
        await timeline.start()
        meter.start()
        t0 = time.monotonic()
        ids = await client.many(flow_id, n, scale.concurrency)
        accepted = time.monotonic()

        async def all_final() -> bool:
            return await ft.terminal_count(flow_id) >= before + n

        t1 = await wait_until(all_final, within=scale.timeout_s, interval=0.02, what=f"{n} runs of {flow_id}",
                              on_timeout=ft.log_tails)  # fmt: skip
        cpu = meter.stop()
        await timeline.stop()
    finally:
        await client.close()
        await side.close()
    statuses = dict(await ft.db.fetch("SELECT status, count(*) FROM runs WHERE id = ANY($1) GROUP BY 1", ids))
    assert statuses == {"SUCCEEDED": n}, f"benchmark harness: no-op runs did not all succeed: {statuses}"
    events = int(await ft.db.fetchval("SELECT sum(last_seq + 1) FROM runs WHERE id = ANY($1)", ids))
    # Visible through the API, not only in the table.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ft.key}"}) as s:
        async with s.get(f"{ft.api}/v1/runs/{ids[-1]}") as r:
            assert r.status == 200 and (await r.json())["status"] in TERMINAL, await r.text()
    elapsed = t1 - t0
    return {
        "runs": n, "seconds": elapsed, "runs_per_s": n / elapsed, "events": events, "events_per_s": events / elapsed,
        "ingest_seconds": accepted - t0, "stages": timeline.stages(t0), "cpu_percent_of_core": cpu,
    }  # fmt: skip


async def test_runs_per_second_10_steps(ft: Flowtrail, scale: Scale, report: Report,
                                        kafka_ceiling: KafkaCeiling) -> None:  # fmt: skip
    r = await _throughput(ft, TEN, scale)
    measured["runs_per_s_10"] = r["runs_per_s"]
    c = scale.concurrency
    report.add("throughput", f"runs/s, {scale.steps} no-op steps, {c} triggers in flight", r["runs_per_s"], "runs/s",
               target=Target(">=", 600, unit="runs/s"))  # fmt: skip
    report.add("throughput", f"steps/s, {scale.steps}-step runs", r["runs_per_s"] * scale.steps, "steps/s")
    report.add("throughput", f"ledger events/s, {scale.steps}-step runs", r["events_per_s"], "events/s",
               ceiling="kafka.round_trip", target=Target(">=", 0.25, on="ratio"))  # fmt: skip
    st = r["stages"]
    report.add("stage", "ingest: triggers accepted/s (single-input requests)", scale.e2e_runs / r["ingest_seconds"],
               "triggers/s", ceiling="kafka.produce")  # fmt: skip
    report.add("stage", "executor: ledger appends/s while busy", st["ledger"]["rate_per_s"], "events/s",
               ceiling="kafka.produce")  # fmt: skip
    for stage, label in (("triggers", "ingest"), ("ledger", "executor"), ("projected", "projector")):
        report.add("stage", f"{label} done after", st[stage]["done_s"], "s", note=f"of {r['seconds']:.2f} s")
    for name, share in r["cpu_percent_of_core"].items():
        report.add("cpu", f"{name} CPU, {scale.steps}-step load", share, "% core" if "machine" not in name else "%")
    report.details["throughput_10_steps"] = r


async def test_runs_per_second_1_step(ft: Flowtrail, scale: Scale, report: Report,
                                      kafka_ceiling: KafkaCeiling) -> None:  # fmt: skip
    r = await _throughput(ft, ONE, scale)
    measured["runs_per_s_1"] = r["runs_per_s"]
    report.add("throughput", f"runs/s, 1 no-op step, {scale.concurrency} triggers in flight", r["runs_per_s"],
               "runs/s")  # fmt: skip
    report.add("throughput", "ledger events/s, 1-step runs", r["events_per_s"], "events/s", ceiling="kafka.round_trip")
    report.details["throughput_1_step"] = r


async def test_latency_1_step_at_half_load(ft: Flowtrail, scale: Scale, report: Report) -> None:
    rate = max(1.0, measured.get("runs_per_s_1", 40.0) / 2)
    count = max(20, min(scale.latency_runs, int(rate * 20)))  # at most ~20 s of load
    r = await _open_loop(ft, ONE, count, rate, scale)
    p50, p99 = percentile(r.latencies, 50), percentile(r.latencies, 99)
    note = f"{r.sent_rate:.0f} runs/s, {count} runs"
    report.add("latency", "trigger → final visible p50, 1 step, half load", p50, "ms",
               target=Target("<=", 20, unit="ms"), note=note)  # fmt: skip
    report.add("latency", "trigger → final visible p99, 1 step, half load", p99, "ms",
               target=Target("<=", 60, unit="ms"), note=note)  # fmt: skip
    for key, label in STAGES.items():
        report.add("stage", f"latency p50: {label}", percentile(r.stages[key], 50), "ms", note="1 step, half load")
    report.details["latency_1_step"] = {
        "target_rate": rate, "sent_rate": r.sent_rate, "runs": count, "p50_ms": p50,
        "p90_ms": percentile(r.latencies, 90), "p99_ms": p99, "max_ms": max(r.latencies),
        "seen": "on the projector's commit notice, else every 5 ms",
        "stages_ms": {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in r.stages.items()},
        # A flat line is a wait somewhere; a rising one is a queue building up behind a stage.
        "p50_ms_by_send_decile": r.by_decile,
        # [seconds, ledger end offset, projected offset] every 20 ms: does the projector keep up or stall?
        "ledger_vs_projected": r.timeline,
    }  # fmt: skip


async def test_latency_10_steps_one_at_a_time(ft: Flowtrail, scale: Scale, report: Report) -> None:
    side = await connect(ft.sandbox.infra.database_url, ft.sandbox.schema)
    watcher = Visibility(side)
    task = asyncio.create_task(watcher.run())
    client = TriggerClient(ft, 1)
    try:
        for i in range(scale.sequential_runs):
            sent = time.monotonic()
            watcher.expect(await client.one(TEN, {"seq": i}), sent)

            async def seen() -> bool:
                return not watcher.pending

            await wait_until(seen, within=60, interval=0.001, what="sequential run", on_timeout=ft.log_tails)
        stages = await watcher.breakdown()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await side.close()
    latencies = list(watcher.latency_ms.values())
    for q in (50, 99):
        report.add("latency", f"trigger → final visible p{q}, {scale.steps} steps, one at a time",
                   percentile(latencies, q), "ms", note=f"{len(latencies)} runs",
                   target=Target("<=", 12, unit="ms") if q == 50 else None)  # fmt: skip
    for key, label in STAGES.items():
        report.add("stage", f"latency p50: {label}", percentile(stages[key], 50), "ms",
                   note=f"{scale.steps} steps, one at a time")  # fmt: skip
    report.details["latency_10_steps_sequential"] = {
        "latencies_ms": latencies, "stages_ms": {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)}
                                                 for k, v in stages.items()},
    }  # fmt: skip


@dataclass
class OpenLoop:
    latencies: list[float]
    sent_rate: float
    stages: dict[str, list[float]]
    by_decile: list[float]
    timeline: list[list[float]]


async def _open_loop(ft: Flowtrail, flow_id: str, count: int, rate: float, scale: Scale) -> OpenLoop:
    """`count` triggers sent at a fixed rate whatever the answers' speed; latency to first seen final."""
    side = await connect(ft.sandbox.infra.database_url, ft.sandbox.schema)
    timeline_db = await connect(ft.sandbox.infra.database_url, ft.sandbox.schema)
    watcher = Visibility(side)
    timeline = Timeline(ft, timeline_db, flow_id, interval=0.02)
    task = asyncio.create_task(watcher.run())
    client = TriggerClient(ft, scale.concurrency * 4)
    sent_at: list[float] = []
    try:
        await timeline.start()
        start = time.monotonic() + 0.05

        async def fire(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            sent = time.monotonic()
            sent_at.append(sent)
            watcher.expect(await client.one(flow_id, {"n": i}), sent)

        await asyncio.gather(*(fire(i) for i in range(count)))

        async def all_seen() -> bool:
            return not watcher.pending

        await wait_until(all_seen, within=scale.timeout_s, interval=0.01, what="latency runs", on_timeout=ft.log_tails)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await timeline.stop()
        stages = await watcher.breakdown()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await side.close()
        await timeline_db.close()
    span = max(sent_at) - min(sent_at)
    in_order = [watcher.latency_ms[r] for r in sorted(watcher.sent_wall, key=watcher.sent_wall.__getitem__)]
    tenth = max(1, len(in_order) // 10)
    t0 = timeline.samples[0]["t"]
    return OpenLoop(
        latencies=list(watcher.latency_ms.values()),
        sent_rate=(count - 1) / span if span > 0 else float("nan"),
        stages=stages,
        by_decile=[percentile(in_order[i : i + tenth], 50) for i in range(0, len(in_order), tenth)],
        timeline=[[round(x["t"] - t0, 3), x["ledger"], x["projected"]] for x in timeline.samples],
    )


async def test_memory_after_load(ft: Flowtrail, report: Report) -> None:
    rss = {name: rss_mb(pid) for name, pid in ft.pids().items()}
    assert all(v is not None for v in rss.values()), f"benchmark harness: a service is gone: {rss}"
    for name, mb in rss.items():
        report.add("memory", f"RSS {name} after the load", mb or 0.0, "MB", target=Target("<=", 300, unit="MB"))
    report.details["rss_mb_after_load"] = rss


async def test_batch_trigger(ft: Flowtrail, scale: Scale, report: Report) -> None:
    """One request with `inputs`: ingest answers 202 once every run request is durable in Kafka."""
    n = scale.batch_inputs
    inputs = [{"order_id": f"SO-{i}", "total_cents": 990 + i} for i in range(n)]
    before = await _end_offsets(ft)
    client = TriggerClient(ft, 1)
    try:
        started = time.perf_counter()
        run_ids = await client.batch(ONE, inputs)
        seconds = time.perf_counter() - started
    finally:
        await client.close()
    durable = await _end_offsets(ft) - before
    assert len(set(run_ids)) == n and durable >= n, f"benchmark harness: {len(run_ids)} ids, {durable} in Kafka"
    report.add("batch", f"one request of {n:,} inputs → 202 (durable in Kafka)", seconds, "s",
               target=Target("<=", 2, unit="s"))  # fmt: skip
    ingest_rss = rss_mb(ft.pids()["ingest"])
    report.add("memory", "RSS ingest after the batch", ingest_rss or 0.0, "MB", target=Target("<=", 300, unit="MB"))
    report.details["batch"] = {"inputs": n, "seconds": seconds, "durable_new_records": durable, "rss_mb": ingest_rss}


async def _end_offsets(ft: Flowtrail) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=ft.sandbox.infra.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(ft.sandbox.topics.triggers, p) for p in range(ft.sandbox.partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()
