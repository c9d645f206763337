"""Fast loaders: read-model rows written straight with COPY, ledger histories produced in whole record batches,
and sandboxes that clean up their topics.

The rows have the shapes of `runs`, `run_steps` and `run_events` (migrations 0001/0002). Later query
benchmarks (a million and ten million runs) reuse `synthetic_runs` and `copy_rows`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import codec
from schemas.events import EventBase, new_id
from schemas.topics import partition_for
from services.common.auth import create_api_key, ensure_tenant
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.factories import run_events

RUN_COLUMNS = (
    "id", "tenant_id", "flow_id", "flow_version", "flow_name", "status", "environment", "execution_mode",
    "trigger_type", "caller", "trigger_payload", "tags", "failed_step", "error", "error_message",
    "error_category", "steps_count", "created_at", "started_at", "finished_at", "updated_at", "duration_ms",
    "last_seq", "archived",
)  # fmt: skip
STEP_COLUMNS = (
    "run_id", "step", "position", "action", "status", "attempt", "input", "output", "error",
    "started_at", "finished_at", "duration_ms",
)  # fmt: skip
EVENT_COLUMNS = (
    "run_id", "seq", "event_id", "type", "tenant_id", "occurred_at", "causation_id", "payload",
    "kafka_partition", "kafka_offset",
)  # fmt: skip


@asynccontextmanager
async def bench_sandbox(infra: Infra, partitions: int) -> AsyncIterator[Sandbox]:
    """A test sandbox whose topics are deleted afterwards: benchmark topics are large."""
    async with make_sandbox(infra, partitions=partitions) as box:
        try:
            yield box
        finally:
            await delete_topics(infra.kafka_bootstrap, box.topics.all())


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def copy_rows(conn: asyncpg.Connection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]],
                    schema: str) -> None:  # fmt: skip
    """COPY in binary through asyncpg; `conn` must carry the services' JSONB codec (services.common.db)."""
    await conn.copy_records_to_table(table, records=rows, columns=list(columns), schema_name=schema)


def _json(model: Any) -> Any:
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


def event_row(e: EventBase, partition: int, offset: int) -> tuple[Any, ...]:
    return (e.run_id, e.seq, e.event_id, e.type, e.tenant_id, e.occurred_at, e.causation_id, _json(e.payload),
            partition, offset)  # fmt: skip


def read_model_rows(runs: int, steps: int, *, tenant_id: str = "t1", partitions: int = 4,
                    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:  # fmt: skip
    """The rows a projector ends with after `runs` successful runs of `steps` steps (tests.factories)."""
    run_rows: list[tuple[Any, ...]] = []
    step_rows: list[tuple[Any, ...]] = []
    event_rows: list[tuple[Any, ...]] = []
    offsets = [0] * partitions
    t0 = datetime.now(UTC) - timedelta(days=1)
    for i in range(runs):
        run_id = f"run{i:08d}"
        events = run_events(run_id, tenant_id=tenant_id, steps=steps, start=t0 + timedelta(milliseconds=i))
        partition = i % partitions
        for e in events:
            event_rows.append(event_row(e, partition, offsets[partition]))
            offsets[partition] += 1
        first, last = events[0], events[-1]
        trigger = _json(first.payload)["trigger"]
        run_rows.append((
            run_id, tenant_id, first.flow_id, 1, "F", "SUCCEEDED", "PRODUCTION", "async", trigger["type"],
            trigger["caller"], trigger["payload"], [], None, None, None, None, steps, first.occurred_at,
            events[2].occurred_at, last.occurred_at, last.occurred_at, 42.0, last.seq, False,
        ))  # fmt: skip
        for s in range(steps):
            started, done = events[3 + 2 * s], events[4 + 2 * s]
            step_rows.append((
                run_id, f"step{s}", s, "transform", "SUCCEEDED", 1, _json(started.payload)["input"],
                _json(done.payload)["output"], None, started.occurred_at, done.occurred_at, 1.5,
            ))  # fmt: skip
    return run_rows, step_rows, event_rows


_STATUSES = (("SUCCEEDED", 0.85), ("FAILED", 0.09), ("PARTIAL", 0.03), ("RUNNING", 0.02), ("CANCELED", 0.01))
_ERRORS = (
    "HTTP 503 from {host}: upstream unavailable",
    "timeout after 30s calling {host}",
    "validation failed: field 'email' is not an email address (record {n})",
    "unknown sku 'X-{n}' rejected by destination",
    "401 Unauthorized: token revoked for connector {host}",
)


def synthetic_runs(n: int, *, tenant_ids: tuple[str, ...] = ("t1",), flows: int = 20, days: int = 30,
                   seed: int = 6, chunk: int = 50_000) -> Iterator[list[tuple[Any, ...]]]:  # fmt: skip
    """Realistic `runs` rows (RUN_COLUMNS order), newest last, in chunks: statuses, errors, tags, spread in time."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    span = timedelta(days=days).total_seconds()
    statuses = [s for s, _ in _STATUSES]
    weights = [w for _, w in _STATUSES]
    rows: list[tuple[Any, ...]] = []
    for i in range(n):
        created = now - timedelta(seconds=span * (1 - i / max(n, 1)))
        status = rng.choices(statuses, weights)[0]
        flow = f"flow-{rng.randrange(flows):02d}"
        failed = status in ("FAILED", "PARTIAL")
        message = rng.choice(_ERRORS).format(host=f"api{rng.randrange(50)}.example.com", n=rng.randrange(10**6))
        duration = rng.lognormvariate(5, 1)
        finished = None if status == "RUNNING" else created + timedelta(milliseconds=duration)
        rows.append((
            f"run_{int(created.timestamp() * 1000):012x}{rng.getrandbits(64):016x}",
            tenant_ids[i % len(tenant_ids)], flow, 1 + rng.randrange(3), flow.replace("-", " ").title(), status,
            "PRODUCTION" if rng.random() < 0.9 else "TESTING", "async", rng.choice(("api", "schedule", "webhook")),
            "key_bench", {"order_id": f"SO-{i}", "total_cents": rng.randrange(100, 100_000)},
            ["nightly"] if rng.random() < 0.2 else [], f"step{rng.randrange(10)}" if failed else None,
            {"category": "TRANSIENT", "message": message} if failed else None, message if failed else None,
            "TRANSIENT" if failed else None, 10, created, created, finished, finished or created,
            duration if finished else None, 23, False,
        ))  # fmt: skip
        if len(rows) >= chunk:
            yield rows
            rows = []
    if rows:
        yield rows


async def seed_runs(conn: asyncpg.Connection, schema: str, n: int, tenant_ids: tuple[str, ...] = ("t1",)) -> str:
    """Tenant t1 with a new API key (returned), and `n` synthetic runs over `tenant_ids`, copied into `schema`."""
    await ensure_tenant(conn, "t1", "T1")
    _, key = await create_api_key(conn, "t1")
    for chunk in synthetic_runs(n, tenant_ids=tenant_ids):
        await copy_rows(conn, "runs", RUN_COLUMNS, chunk, schema)
    return key


async def produce_history(bootstrap: str, topic: str, partitions: int, template: Sequence[EventBase], runs: int, *,
                          end: datetime | None = None, spacing: timedelta = timedelta(milliseconds=1),
                          ) -> list[int]:  # fmt: skip
    """`runs` copies of one run's events (seq 0.., as the executor wrote them) straight into the ledger, each
    with its own run id, event ids, causations and times, on the run's partition (`partition_for`), encoded by
    the one codec. Whole record batches per partition: ~10x aiokafka's per-record send. Returns the events
    written per partition. The runs end at `end` (now), `spacing` apart, so retention leaves them alone."""
    rows = [e.model_dump(mode="json") for e in template]
    offsets = [e.occurred_at - template[0].occurred_at for e in template]
    old_run = template[0].run_id
    end = end or datetime.now(UTC)
    first = end - spacing * runs - offsets[-1]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1024 * 1024)
    await producer.start()
    counts = [0] * partitions
    batches = [producer.create_batch() for _ in range(partitions)]
    inflight: list[asyncio.Future[Any]] = []

    async def flush(p: int) -> None:
        inflight.append(await producer.send_batch(batches[p], topic, partition=p))
        batches[p] = producer.create_batch()
        if len(inflight) >= 64:
            await asyncio.gather(*inflight)
            inflight.clear()

    try:
        for i in range(runs):
            created = first + spacing * i
            run_id = f"run_{int(created.timestamp() * 1000):012x}{random.getrandbits(64):016x}"
            p = partition_for(run_id, partitions)
            # A causation that names the run (a step's result) names the new run; any other (the trigger) is new.
            causes: dict[str, str] = {}
            key = run_id.encode()
            for row, offset in zip(rows, offsets, strict=True):
                cause = row["causation_id"]
                if cause not in causes:
                    causes[cause] = cause.replace(old_run, run_id) if old_run in cause else new_id()
                event = {
                    **row, "event_id": new_id(), "run_id": run_id, "correlation_id": run_id,
                    "causation_id": causes[cause], "occurred_at": created + offset,
                }  # fmt: skip
                if isinstance(row["payload"], dict) and row["payload"].get("received_at") is not None:
                    event["payload"] = {**row["payload"], "received_at": created}
                value = codec.dumps(event)
                if batches[p].append(key=key, value=value, timestamp=None) is None:
                    await flush(p)
                    batches[p].append(key=key, value=value, timestamp=None)
                counts[p] += 1
        for p in range(partitions):
            if batches[p].size():
                await flush(p)
        await asyncio.gather(*inflight)
    finally:
        await producer.stop()
    return counts
