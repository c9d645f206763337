"""Raw ceilings: what Kafka and PostgreSQL do with no Flowtrail code in the way, on this machine, now."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.executor.adapters.ledger import LedgerWriter
from services.executor.settings import ExecutorSettings
from tests.bench.loaders import (
    EVENT_COLUMNS,
    RUN_COLUMNS,
    STEP_COLUMNS,
    copy_rows,
    create_topic,
    delete_topics,
    read_model_rows,
)
from tests.bench.measure import percentile


@dataclass(frozen=True)
class KafkaCeiling:
    messages: int
    record_bytes: int
    produce_s: float
    consume_s: float
    settings: dict[str, Any]

    @property
    def produce_rate(self) -> float:
        return self.messages / self.produce_s

    @property
    def consume_rate(self) -> float:
        return self.messages / self.consume_s

    @property
    def round_trip_rate(self) -> float:
        """Produced then consumed: messages over the sum of both phases."""
        return self.messages / (self.produce_s + self.consume_s)


def _records(n: int, size: int) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of exactly `size`-byte JSON values shaped like a ledger event."""
    out = []
    for i in range(n):
        run_id = f"run_{i:016x}"
        head = (
            f'{{"type":"StepSucceeded","schema_version":1,"event_id":"{uuid.uuid4().hex}","tenant_id":"t1",'
            f'"run_id":"{run_id}","flow_id":"f1","flow_version":1,"seq":{i % 24},'
            f'"occurred_at":"2025-01-01T00:00:00.000000Z","causation_id":"{run_id}:c","payload":{{"pad":"'
        )
        value = head + "x" * max(0, size - len(head) - 3) + '"}}'
        out.append((run_id.encode(), value.encode()))
    return out


async def kafka_produce_then_consume(bootstrap: str, messages: int, record_bytes: int,
                                     partitions: int) -> KafkaCeiling:  # fmt: skip
    """Produce with the executor's own ledger producer settings to a fresh topic, then read it all back."""
    topic = f"bench.raw.{uuid.uuid4().hex[:10]}"
    await create_topic(bootstrap, topic, partitions)
    records = _records(messages, record_bytes)
    # The LedgerWriter builds the producer exactly as the executor does (acks=all, idempotence, linger).
    writer = LedgerWriter(bootstrap, topic, linger_ms=ExecutorSettings().producer_linger_ms)
    try:
        await writer.start()
        producer = writer.producer
        started = time.perf_counter()
        futures = [
            await producer.send(topic, value, key=key, partition=i % partitions)
            for i, (key, value) in enumerate(records)
        ]
        await asyncio.gather(*futures)
        produce_s = time.perf_counter() - started
        await writer.stop()

        # Read like the projector: its fetch size, no group (no rebalance in the timing).
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )  # fmt: skip
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)
            seen = nbytes = 0
            started = time.perf_counter()
            while seen < messages:
                batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for recs in batch.values():
                    seen += len(recs)
                    nbytes += sum(len(r.value) for r in recs)  # touch each value, as a reader would
                if time.perf_counter() - started > 300:
                    raise AssertionError(f"benchmark harness: raw consume stuck at {seen}/{messages}")
            consume_s = time.perf_counter() - started
        finally:
            await consumer.stop()
    finally:
        await delete_topics(bootstrap, [topic])
    settings = {"acks": "all", "enable_idempotence": True, "linger_ms": writer.linger_ms,
                "max_batch_size": 256 * 1024, "compression": None, "partitions": partitions}  # fmt: skip
    return KafkaCeiling(messages, len(records[0][1]), produce_s, consume_s, settings)


@dataclass(frozen=True)
class CopyCeiling:
    rows: dict[str, int]
    seconds: dict[str, float]

    def rate(self, table: str) -> float:
        return self.rows[table] / self.seconds[table]

    @property
    def mixed_rate(self) -> float:
        """All three tables in the proportions a projector writes them."""
        return sum(self.rows.values()) / sum(self.seconds.values())


async def copy_read_models(conn: asyncpg.Connection, schema: str, runs: int, steps: int) -> CopyCeiling:
    """COPY `runs` runs' rows into empty read-model tables carrying every index the migrations create."""
    run_rows, step_rows, event_rows = read_model_rows(runs, steps)
    rows, seconds = {}, {}
    for table, columns, data in (
        ("run_events", EVENT_COLUMNS, event_rows),
        ("runs", RUN_COLUMNS, run_rows),
        ("run_steps", STEP_COLUMNS, step_rows),
    ):
        started = time.perf_counter()
        await copy_rows(conn, table, columns, data, schema)
        seconds[table] = time.perf_counter() - started
        rows[table] = len(data)
    return CopyCeiling(rows, seconds)


class _Recorder:
    """Stands in for the API's pool: runs the query and remembers its SQL and arguments."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.calls.append((sql, args))
        return await self.conn.fetch(sql, *args)


async def list_query(conn: asyncpg.Connection,
                     call: Callable[[Any], Awaitable[object]]) -> tuple[str, tuple[Any, ...]]:  # fmt: skip
    """The exact SQL and arguments an API read sends: `call(pool)` runs the API's own query function once."""
    recorder = _Recorder(conn)
    await call(recorder)
    assert len(recorder.calls) == 1, recorder.calls
    return recorder.calls[0]


async def sql_latency(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...], samples: int) -> dict[str, float]:
    """p50/p99 in ms of one prepared statement, executed back to back on one connection."""
    for _ in range(min(20, samples)):  # warm the statement cache and the buffers
        await conn.fetch(sql, *args)
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        await conn.fetch(sql, *args)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "samples": samples}
