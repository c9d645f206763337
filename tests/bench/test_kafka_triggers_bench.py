"""Kafka triggers: messages → runs per second, against raw consume of the same messages in the same run.

The messages are produced to a topic before the flow that reads them is published (`start_from: earliest`), so the
figures are ingest's own pace through a backlog: messages made into durable triggers per second, and runs ended
per second through all four services. The raw baseline reads the same topic with a plain consumer.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import codec
from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.kafka import publish_flow_events
from tests.bench.load import TENANT, Flowtrail, running_flowtrail
from tests.bench.loaders import delete_topics
from tests.bench.measure import wait_until
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra

# Messages per scale (the scale presets are shared; this benchmark sizes itself by their name).
MESSAGES = {"smoke": 2_000, "default": 20_000, "full": 100_000}
FLOW = "bench-kafka"


async def test_messages_to_runs_per_second_against_raw_consume(ft: Flowtrail, topic: str, scale: Scale,
                                                               report: Report) -> None:  # fmt: skip
    n = MESSAGES.get(scale.name, MESSAGES["default"])
    raw_rate = await _raw_consume(ft.sandbox.infra.kafka_bootstrap, topic, n, scale.partitions)
    ceiling = "kafka_trigger.raw_consume"
    report.add_ceiling(ceiling, f"raw Kafka consume of the trigger topic, {scale.record_bytes} B", raw_rate, "msg/s")

    published = time.monotonic()
    await publish_flow_events(ft.sandbox.infra.kafka_bootstrap, ft.sandbox.topics, [
        FlowVersionPublished(tenant_id=TENANT, flow_id=FLOW, flow_version=1, flow=_flow(topic))
    ])  # fmt: skip
    async with aiohttp.ClientSession() as http:

        async def made(at_least: int) -> bool:
            return await _runs_made(http, ft.ingest) >= at_least

        await wait_until(lambda: made(1), within=scale.timeout_s, interval=0.01, what="the first message read",
                         on_timeout=ft.log_tails)  # fmt: skip
        first = time.monotonic()
        await wait_until(lambda: made(n), within=scale.timeout_s, interval=0.02, what=f"{n} triggers appended",
                         on_timeout=ft.log_tails)  # fmt: skip
        appended = time.monotonic()

    async def ended() -> bool:
        return await ft.terminal_count(FLOW) >= n

    await wait_until(ended, within=scale.timeout_s, interval=0.05, what=f"{n} runs ended", on_timeout=ft.log_tails)
    done = time.monotonic()
    statuses = dict(await ft.db.fetch("SELECT status, count(*) FROM runs WHERE flow_id = $1 GROUP BY 1", FLOW))
    assert statuses == {"SUCCEEDED": n}, f"benchmark harness: every message must be one succeeded run: {statuses}"
    triggers_rate = n / max(appended - first, 1e-6)
    runs_rate = n / max(done - first, 1e-6)
    report.add("throughput", f"kafka trigger: messages → durable triggers/s ({n:,} messages)", triggers_rate,
               "msg/s", ceiling=ceiling)  # fmt: skip
    report.add("throughput", f"kafka trigger: messages → ended runs/s, 1 no-op step ({n:,})", runs_rate, "runs/s",
               ceiling=ceiling)  # fmt: skip
    report.add("latency", "kafka trigger: publish → first message read (group join)", first - published, "s")
    report.details["kafka_triggers"] = {"messages": n, "raw_consume_per_s": raw_rate, "first_read_s": first - published,
                                        "appended_s": appended - first, "ended_s": done - first}  # fmt: skip


@pytest.fixture(scope="module")
async def ft(infra: Infra, scale: Scale, log_dir: Path) -> AsyncIterator[Flowtrail]:
    async with running_flowtrail(infra, scale.partitions, log_dir, []) as ft:
        yield ft


@pytest.fixture(scope="module")
async def topic(ft: Flowtrail, scale: Scale) -> AsyncIterator[str]:
    """The upstream topic, filled before the flow reading it is published."""
    bootstrap = ft.sandbox.infra.kafka_bootstrap
    name = f"{ft.sandbox.topics.prefix}-src-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, scale.partitions, 1)])
    finally:
        await admin.close()
    n = MESSAGES.get(scale.name, MESSAGES["default"])
    value = codec.dumps({"n": 0, "pad": "x" * max(0, scale.record_bytes - 20)})
    async with AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5) as producer:
        sent = [await producer.send(name, value, key=str(i).encode()) for i in range(n)]
        await asyncio.gather(*sent)
    try:
        yield name
    finally:
        await delete_topics(bootstrap, [name])


def _flow(topic: str) -> FlowDefinition:
    return FlowDefinition.model_validate({
        "id": FLOW, "tenant_id": TENANT, "name": FLOW, "version": 1,
        "trigger": {"type": "kafka", "topic": topic, "start_from": "earliest"},
        "steps": [{"name": "s0", "action": "transform", "input": {"output": {"i": 0}}}],
    })  # fmt: skip


async def _raw_consume(bootstrap: str, topic: str, n: int, partitions: int) -> float:
    """Messages per second a plain consumer reads the topic at (no group, no processing)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        started = time.perf_counter()
        while seen < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            seen += sum(len(records) for records in batch.values())
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def _runs_made(http: aiohttp.ClientSession, ingest: str) -> float:
    async with http.get(f"{ingest}/metrics") as r:
        text = await r.text()
    pattern = rf'flowtrail_ingest_kafka_trigger_messages_total\{{[^}}]*flow="{FLOW}"[^}}]*outcome="run"[^}}]*\}} (\S+)'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text))
