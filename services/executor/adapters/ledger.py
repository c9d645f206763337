"""The ledger writer (one batching idempotent producer) and the ledger reader that rebuilds run state."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from schemas import codec
from schemas.events import EventBase
from services.common import kafka
from services.executor.replay import LogPosition

log = logging.getLogger(__name__)


# A ledger record's bytes: pydantic's serialiser writes the event's JSON at once, the bytes `codec.dumps` gives
# through a JSON-mode dump and orjson (tests/unit/test_executor_event_build.py holds them equal for every event type).
encode_event = codec.dumps_model


class LedgerWriter:
    def __init__(self, bootstrap: str, topic: str, *, linger_ms: int) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "LedgerWriter.start() first"
        return self._producer

    async def start(self) -> None:
        self._producer = kafka.producer(self.bootstrap, linger_ms=self.linger_ms, max_batch_size=256 * 1024)
        await self._producer.start()

    async def flush(self) -> None:
        """Until every event appended so far is durable (the producer's batches as of now, not those added later)."""
        await self.producer.flush()

    async def stop(self) -> None:
        await self.producer.stop()

    async def append(self, partition: int, events: Iterable[EventBase]) -> list[asyncio.Future[object]]:
        """Queue events in order on the run's partition; the futures resolve when they are durable.

        Per-record sends on purpose: the accumulator packs the events of many runs into one batch per
        partition while the request before is on its way. A producer batch per decision (tried) sends one request
        each and cut runs/s by five; batches the writer gathers itself per partition, handed over once the one
        before is acknowledged (tried), cost half the CPU a record but doubled trigger → visible at half load
        (docs/decisions.md, "No waiting on the hot path").
        """
        futures = []
        for event in events:
            future = await self.producer.send(
                self.topic, encode_event(event), key=event.run_id.encode(), partition=partition
            )
            future.add_done_callback(_crash_on_failure)
            futures.append(future)
        return futures


def _crash_on_failure(future: asyncio.Future[object]) -> None:
    # The engine already folded these events; if the ledger did not take them, the in-memory
    # state is ahead of the truth. Exit so the restarted executor rebuilds from the ledger.
    if not future.cancelled() and future.exception() is not None:
        log.critical("ledger append failed, exiting to rebuild from the ledger: %r", future.exception())
        os._exit(70)


class LedgerChanged(Exception):
    """The ledger no longer holds the record a snapshot ends at (truncated, recreated): replay it all."""


def record_digest(value: bytes | None) -> str:
    """A ledger record's identity: a hash of its bytes (two different events never share one, in practice)."""
    return hashlib.blake2b(value or b"", digest_size=8).hexdigest()


async def iter_partition_tail(
    bootstrap: str, topic: str, partition: int, after: LogPosition | None = None
) -> AsyncIterator[tuple[list[dict[str, Any]], LogPosition]]:
    """The records of one ledger partition as parsed JSON objects, to the end as of now, a fetched batch at a time,
    each with the position of its last record: from offset 0, or from the record after `after` — which must still
    be at its offset with the same bytes, else LedgerChanged. The replay folds as it reads, so memory follows the
    runs still open, not the history."""
    checked = after is None
    async for batch in kafka.read_to_end(bootstrap, topic, partition, start=after.offset if after else 0):
        if not checked:
            assert after is not None
            first = batch[0]
            if first.offset != after.offset or record_digest(first.value) != after.digest:
                raise LedgerChanged(f"{topic}-{partition}: the record at offset {after.offset} is not the one seen")
            checked, batch = True, batch[1:]
            if not batch:
                continue
        objects: list[dict[str, Any]] = []
        for record in batch:
            try:
                obj = orjson.loads(record.value)
            except orjson.JSONDecodeError as exc:
                log.error("undecodable ledger record %s@%s: %s", f"{topic}-{partition}", record.offset, exc)
                continue
            if isinstance(obj, dict):
                objects.append(obj)
        yield objects, LogPosition(batch[-1].offset, record_digest(batch[-1].value))
    if not checked:
        raise LedgerChanged(f"{topic}-{partition} ends before offset {after.offset if after else 0}")


async def iter_partition_raw(bootstrap: str, topic: str, partition: int) -> AsyncIterator[list[dict[str, Any]]]:
    """The records of one ledger partition as parsed JSON objects, from offset 0 to the end as of now."""
    async for objects, _ in iter_partition_tail(bootstrap, topic, partition):
        if objects:
            yield objects


async def read_partition(bootstrap: str, topic: str, partition: int) -> list[EventBase]:
    """Every decodable event of one ledger partition (tests and tools; the engine streams iter_partition_raw)."""
    events: list[EventBase] = []
    async for batch in iter_partition_raw(bootstrap, topic, partition):
        for obj in batch:
            try:
                events.append(codec.ledger_event_from_dict(obj))
            except codec.DecodeError as exc:
                log.error("undecodable ledger event %s seq %s: %s", obj.get("run_id"), obj.get("seq"), exc)
    return events
