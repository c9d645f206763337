"""The ledger writer (one batching idempotent producer) and the ledger reader that rebuilds run state."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from schemas import codec
from schemas.events import EventBase
from services.common import kafka

log = logging.getLogger(__name__)


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

    async def stop(self) -> None:
        await self.producer.stop()

    async def append(self, partition: int, events: Iterable[EventBase]) -> list[asyncio.Future[object]]:
        """Queue events in order on the run's partition; the futures resolve when they are durable.

        Per-record sends on purpose: the accumulator packs the events of many runs into one batch per
        partition during the linger. A producer batch per decision (tried) sends one request each and
        cut runs/s by five.
        """
        futures = []
        for event in events:
            future = await self.producer.send(
                self.topic, codec.dumps(event), key=event.run_id.encode(), partition=partition
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


async def iter_partition_raw(bootstrap: str, topic: str, partition: int) -> AsyncIterator[list[dict[str, Any]]]:
    """The records of one ledger partition as parsed JSON objects, from offset 0 to the end as of now, a fetched
    batch at a time: the replay folds as it reads, so memory follows the runs still open, not the history."""
    async for batch in kafka.read_to_end(bootstrap, topic, partition):
        objects: list[dict[str, Any]] = []
        for record in batch:
            try:
                obj = orjson.loads(record.value)
            except orjson.JSONDecodeError as exc:
                log.error("undecodable ledger record %s@%s: %s", f"{topic}-{partition}", record.offset, exc)
                continue
            if isinstance(obj, dict):
                objects.append(obj)
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
