"""Ingest alone: single-input triggers per second, ingest's CPU per request and the 202's latency, next to the raw
ceilings of the same run (a raw produce with the appender's producer settings, raw asyncpg round trips).

Only ingest runs: the flow is written straight into the `flows` read model, so what is measured is the trigger
route's own work — authentication, the rate-limit check (on, but never binding: tests/e2e/stack.py), the flow
lookup, the append to Kafka (acks=all) and the placeholder row — with `concurrency` requests in flight.
`FLOWTRAIL_BENCH_PROFILE=ingest` runs it under cProfile (tests/bench/load.py), the stats beside its log.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common import kafka
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect, create_pool
from services.ingest.settings import IngestSettings
from tests.bench.load import TENANT, profiled
from tests.bench.loaders import bench_sandbox, delete_topics
from tests.bench.measure import percentile
from tests.bench.procstat import CpuMeter
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra, Sandbox
from tests.e2e.stack import Stack

# Triggers per scale (the presets are shared; this benchmark sizes itself by their name).
TRIGGERS = {"smoke": 1_500, "default": 10_000, "full": 40_000}
FLOW = "bench-ingest"
WARMUP = 100


async def test_single_input_triggers_against_raw_produce_and_round_trips(
    ingest: tuple[Sandbox, Stack, str], scale: Scale, report: Report
) -> None:
    box, stack, key = ingest
    url, process = stack["ingest"].url, stack["ingest"].process
    assert process is not None
    n, k = TRIGGERS.get(scale.name, TRIGGERS["default"]), scale.concurrency
    produce = await _raw_produce(box.infra.kafka_bootstrap, n, k, scale.partitions)
    round_trips = await _raw_round_trips(box, n, k)
    report.add_ceiling("ingest.raw_produce", f"raw Kafka produce, one record awaited each, {k} in flight", produce,
                       "msg/s")  # fmt: skip
    report.add_ceiling("ingest.raw_round_trip", f"raw asyncpg SELECT 1 round trips, {k} in flight", round_trips,
                       "q/s")  # fmt: skip

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=k),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    latencies: list[float] = []

    async def send(count: int) -> None:
        counter = iter(range(count))

        async def worker() -> None:
            for i in counter:
                started = time.perf_counter()
                async with session.post(f"{url}/v1/flows/{FLOW}/trigger", data=orjson.dumps({"input": {"n": i}})) as r:
                    body = await r.read()
                    assert r.status == 202, f"benchmark harness: trigger answered {r.status}: {body[:300]!r}"
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(k)))

    pid = process.pid
    try:
        await send(WARMUP)  # connections, the key cache, the producer's metadata
        latencies.clear()
        meter = CpuMeter({"ingest": [pid]})
        meter.start()
        started = time.perf_counter()
        await send(n)
        elapsed = time.perf_counter() - started
        shares = meter.stop()
    finally:
        await session.close()
    rate = n / elapsed
    cpu_ms = shares["ingest"] / 100 * elapsed / n * 1000
    report.add("throughput", f"ingest alone: single-input triggers accepted/s ({n:,}, {k} in flight)", rate,
               "triggers/s", ceiling="ingest.raw_produce")  # fmt: skip
    report.add("cpu", "ingest alone: ingest CPU per trigger request", cpu_ms, "ms")
    report.add("latency", "ingest alone: trigger → 202 p50", percentile(latencies, 50) * 1000, "ms")
    report.add("latency", "ingest alone: trigger → 202 p99", percentile(latencies, 99) * 1000, "ms")
    report.details["ingest_alone"] = {
        "triggers": n, "in_flight": k, "triggers_per_s": rate, "ingest_cpu_share": shares["ingest"],
        "ingest_cpu_ms_per_request": cpu_ms, "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000, "raw_produce_per_s": produce, "raw_round_trips_per_s": round_trips,
        "machine_busy": shares["machine (all cores)"],
    }  # fmt: skip
    print(f"\ningest alone: {rate:.0f} triggers/s, {cpu_ms:.3f} ms ingest CPU/request, "
          f"p50 {percentile(latencies, 50) * 1000:.1f} ms, p99 {percentile(latencies, 99) * 1000:.1f} ms; "
          f"raw produce {produce:.0f} msg/s, raw round trips {round_trips:.0f}/s")  # fmt: skip
    placeholders = await _count_runs(box)
    assert placeholders == n + WARMUP, f"benchmark harness: every 202 has its placeholder row: {placeholders}"


@pytest.fixture(scope="module")
async def ingest(infra: Infra, scale: Scale, log_dir: Path) -> AsyncIterator[tuple[Sandbox, Stack, str]]:
    """Ingest alone over a fresh sandbox holding one active flow: (sandbox, its stack, an API key)."""
    async with bench_sandbox(infra, scale.partitions) as box:
        db = await connect(infra.database_url, box.schema)
        try:
            await ensure_tenant(db, TENANT, "Benchmarks")
            _, key = await create_api_key(db, TENANT)
            now = datetime.now(UTC)
            definition = {"id": FLOW, "tenant_id": TENANT, "name": FLOW, "version": 1, "trigger": {"type": "api"},
                          "steps": [{"name": "s0", "action": "transform", "input": {"output": {"i": 0}}}]}  # fmt: skip
            await db.execute(
                "INSERT INTO flows (tenant_id, id, name, latest_version, environment, trigger_type, created_at, "
                "updated_at) VALUES ($1, $2, $2, 1, 'PRODUCTION', 'api', $3, $3)", TENANT, FLOW, now,
            )  # fmt: skip
            await db.execute(
                "INSERT INTO flow_versions (tenant_id, flow_id, version, definition, published_at) "
                "VALUES ($1, $2, 1, $3, $4)", TENANT, FLOW, definition, now,
            )  # fmt: skip
        finally:
            await db.close()
        stack = profiled(Stack.build(box, ("ingest",), log_dir))
        await stack.start()
        try:
            yield box, stack, key
        finally:
            stack.stop()


async def _count_runs(box: Sandbox) -> int:
    db = await connect(box.infra.database_url, box.schema)
    try:
        return int(await db.fetchval("SELECT count(*) FROM runs WHERE flow_id = $1", FLOW))
    finally:
        await db.close()


async def _raw_produce(bootstrap: str, n: int, k: int, partitions: int) -> float:
    """Records per second through a producer built as ingest's appender builds it (acks=all, idempotent, its
    linger), each send awaited on its own with `k` in flight, as the trigger route awaits its append."""
    topic = f"bench.raw-ingest.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    value = orjson.dumps({"type": "TriggerReceived", "tenant_id": TENANT, "flow_id": FLOW, "pad": "x" * 400})
    producer = kafka.producer(bootstrap, linger_ms=IngestSettings().producer_linger_ms, max_batch_size=512 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"warm")
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                await producer.send_and_wait(topic, value, key=f"run_{i:028x}".encode())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(k)))
        return n / (time.perf_counter() - started)
    finally:
        await producer.stop()
        await delete_topics(bootstrap, [topic])


async def _raw_round_trips(box: Sandbox, n: int, k: int) -> float:
    """`SELECT 1` round trips per second over a pool of ingest's size, `k` in flight."""
    pool = await create_pool(box.infra.database_url, box.schema, min_size=10, max_size=10)
    try:
        counter = iter(range(n))

        async def worker() -> None:
            for _ in counter:
                await pool.fetchval("SELECT 1")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(k)))
        return n / (time.perf_counter() - started)
    finally:
        await pool.close()
