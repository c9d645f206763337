"""The flows API's I/O: the flows topic (the truth every write is checked against) and the flows read models.

Writes are decided against the flows topic, not the read model: the projector fills `flows` and
`flow_versions` asynchronously, so the read model may not yet show the version published a moment ago.
`FlowLog` follows the topic (from offset 0, on demand) and knows each flow's latest version, environment
and paused state; a PostgreSQL advisory lock per flow serialises writers across API replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from schemas import codec
from schemas.events import FlowEventBase, FlowPaused, FlowResumed, FlowVersionPublished
from services.api.adapters.sql import Where, contains
from services.common.cursor import TIME_AND_ID
from services.common.http import ApiError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the flows topic


@dataclass(frozen=True)
class Appended:
    """Where an event sits in the flows topic."""

    partition: int
    offset: int


@dataclass
class FlowState:
    """What the flows topic says about one flow, as far as this process has read it."""

    latest_version: int
    environment: str
    last: Appended  # the flow's newest event: a reader waits for the projector to pass it
    paused: bool = False


class FlowLog:
    """Appends flow events and reads the flows topic up to its end before each decision.

    Reading is on demand (no background loop): `catch_up` fetches the end offsets as of now and reads
    to them, so a writer that holds the flow's lock sees every event appended before it took the lock.
    """

    def __init__(
        self, bootstrap: str, topic: str, *, timeout_s: float = 10.0, max_message_bytes: int = 1_000_000
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.flows: dict[tuple[str, str], FlowState] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Idempotent; writes call it too, so the API serves reads even while Kafka is unreachable."""
        async with self._lock:
            if self._producer is not None:
                return
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                        max_request_size=self.max_message_bytes)  # fmt: skip
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
            try:
                await producer.start()
                await consumer.start()
                partitions = await producer.partitions_for(self.topic)  # waits for the topic's metadata
                self._tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
                consumer.assign(self._tps)
                await consumer.seek_to_beginning(*self._tps)
            except BaseException:
                await consumer.stop()
                await producer.stop()
                raise
            self._producer, self._consumer = producer, consumer

    async def stop(self) -> None:
        async with self._lock:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()
            self._producer = self._consumer = None

    def get(self, tenant_id: str, flow_id: str) -> FlowState | None:
        return self.flows.get((tenant_id, flow_id))

    async def catch_up(self) -> None:
        """Read every event appended before this call."""
        await self.start()
        async with self._lock:
            consumer = self._consumer
            assert consumer is not None
            end = await consumer.end_offsets(self._tps)
            while behind := [tp for tp in self._tps if await consumer.position(tp) < end[tp]]:
                for records in (await consumer.getmany(*behind, timeout_ms=500)).values():
                    for record in records:
                        self._apply(record.value, Appended(record.partition, record.offset))

    def _apply(self, value: bytes | None, at: Appended) -> None:
        try:
            event = codec.decode_flow_event(value or b"")
        except codec.DecodeError as exc:
            log.error("undecodable flow event at offset %s: %s", at.offset, exc)
            return
        key = (event.tenant_id, event.flow_id)
        state = self.flows.get(key)
        if isinstance(event, FlowVersionPublished):
            if state is None:
                state = self.flows[key] = FlowState(event.flow_version, event.flow.environment.value, at)
            elif event.flow_version >= state.latest_version:
                state.latest_version, state.environment = event.flow_version, event.flow.environment.value
        elif state is not None and isinstance(event, FlowPaused | FlowResumed):
            state.paused = isinstance(event, FlowPaused)
        if state is not None:
            state.last = at

    async def append(self, event: FlowEventBase) -> Appended:
        """Durable (acks=all) when this returns; keyed and encoded as `services.common.kafka.publish_flow_events`
        does, on a producer kept open for the process."""
        value = codec.dumps(event)
        if len(value) > self.max_message_bytes - 1024:
            # Before Kafka: a record the broker would refuse gets a 413, not a producer error.
            limit = self.max_message_bytes - 1024
            message = f"the flow definition is {len(value):,} bytes as stored; the limit is {limit:,} bytes"
            raise ApiError(413, "payload_too_large", message)
        await self.start()
        assert self._producer is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                meta = await self._producer.send_and_wait(self.topic, value, key=event.flow_id.encode())
        except TimeoutError as exc:
            await self._reset()
            raise KafkaTimeoutError(f"the flows topic did not acknowledge within {self.timeout_s:g} s") from exc
        except BaseException:
            # A producer that failed once may stay broken (sequence numbers): the next write starts fresh ones.
            await self._reset()
            raise
        return Appended(meta.partition, meta.offset)

    async def _reset(self) -> None:
        async with self._lock:
            producer, consumer = self._producer, self._consumer
            self._producer = self._consumer = None
            self.flows.clear()  # read again from the beginning by the next catch_up
        for client in (consumer, producer):
            if client is not None:
                try:
                    async with asyncio.timeout(10):
                        await client.stop()
                except Exception as exc:
                    log.info("stopping a dropped flows-topic client: %r", exc)


class FlowBusy(Exception):
    """Another writer held the flow's lock for longer than the lock timeout."""


@asynccontextmanager
async def flow_lock(pool: asyncpg.Pool, namespace: str, tenant_id: str, flow_id: str) -> AsyncIterator[None]:
    """Serialise writes to one flow across API processes: a transaction-scoped advisory lock, released on
    commit, rollback or a dropped connection. `namespace` (the schema) keeps test sandboxes apart."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '10s'")
        try:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"flowtrail.flow:{namespace}:{tenant_id}:{flow_id}",
            )
        except asyncpg.LockNotAvailableError:
            raise FlowBusy(flow_id) from None
        yield


async def wait_projected(pool: asyncpg.Pool, topic: str, at: Appended, within_s: float) -> bool:
    """Whether a projector has committed past `at` (its rows and offsets share a transaction) in time."""
    deadline = time.monotonic() + within_s
    delay = 0.01
    while True:
        done = await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM projector_offsets WHERE topic = $1 AND partition = $2 AND next_offset > $3)",
            topic, at.partition, at.offset,
        )  # fmt: skip
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.1)


# ---------------------------------------------------------------- the read models

_LIST_COLUMNS = """
    f.id, f.name, f.description, f.status, f.environment, f.trigger_type, f.tags, f.latest_version,
    f.created_at, f.updated_at, v.definition, last_run.created_at AS last_run_at
"""
_FROM = """
    FROM flows f
    LEFT JOIN flow_versions v ON v.tenant_id = f.tenant_id AND v.flow_id = f.id AND v.version = f.latest_version
    LEFT JOIN LATERAL (
        SELECT r.created_at FROM runs r WHERE r.tenant_id = f.tenant_id AND r.flow_id = f.id
        ORDER BY r.created_at DESC, r.id DESC LIMIT 1
    ) last_run ON true
"""


@dataclass(frozen=True)
class Cursor:
    """The (created_at, id) of the last flow on a page; the list is newest first."""

    created_at: datetime
    flow_id: str

    def encode(self) -> str:
        return TIME_AND_ID.encode((self.created_at, self.flow_id))

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The position, or InvalidCursor (400)."""
        return cls(*TIME_AND_ID.decode(text))


@dataclass
class FlowFilter:
    tenant_id: str
    environment: str
    statuses: list[str] = field(default_factory=list)
    trigger_types: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    q: str | None = None

    def where(self) -> tuple[list[str], list[Any]]:
        """SQL conditions over `flows f` and their parameters ($1, $2, … in order)."""
        where = Where()
        where.add("f.tenant_id = ?", self.tenant_id)
        where.add("f.environment = ?", self.environment)
        where.any_of("f.status", self.statuses)
        where.any_of("f.trigger_type", self.trigger_types)
        if self.tags:
            where.add("f.tags @> ?::text[]", self.tags)
        if self.q:
            where.add("f.name ILIKE ?", contains(self.q))
        return where.clauses, where.args


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    total: int
    next_cursor: str | None


async def list_flows(pool: asyncpg.Pool, flt: FlowFilter, limit: int, cursor: Cursor | None) -> Page:
    """Newest first, keyset-paginated on (created_at, id): a flow's created_at never changes."""
    clauses, args = flt.where()
    total = await pool.fetchval(f"SELECT count(*) FROM flows f WHERE {' AND '.join(clauses)}", *args)
    if cursor is not None:
        args += [cursor.created_at, cursor.flow_id]
        clauses.append(f"(f.created_at, f.id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit + 1)
    rows = await pool.fetch(
        f"SELECT {_LIST_COLUMNS} {_FROM} WHERE {' AND '.join(clauses)} "
        f"ORDER BY f.created_at DESC, f.id DESC LIMIT ${len(args)}",
        *args,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = Cursor(rows[-1]["created_at"], rows[-1]["id"]).encode() if more and rows else None
    return Page(rows, total, next_cursor)


async def get_flow(pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {_LIST_COLUMNS} {_FROM} WHERE f.tenant_id = $1 AND f.environment = $2 AND f.id = $3",
        tenant_id, environment, flow_id,
    )  # fmt: skip


async def get_versions(pool: asyncpg.Pool, tenant_id: str, flow_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT version, published_at FROM flow_versions WHERE tenant_id = $1 AND flow_id = $2 ORDER BY version DESC",
        tenant_id, flow_id,
    )  # fmt: skip


async def get_version(
    pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str, version: int
) -> asyncpg.Record | None:
    return await pool.fetchrow(
        """
        SELECT v.version, v.published_at, v.definition FROM flow_versions v
        JOIN flows f ON f.tenant_id = v.tenant_id AND f.id = v.flow_id
        WHERE v.tenant_id = $1 AND f.environment = $2 AND v.flow_id = $3 AND v.version = $4
        """,
        tenant_id, environment, flow_id, version,
    )  # fmt: skip
