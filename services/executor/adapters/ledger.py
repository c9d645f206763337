"""The ledger writer (one batching idempotent producer) and the ledger reader that rebuilds run state."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from schemas import codec
from schemas.events import EventBase
from services.common import kafka
from services.executor.replay import LogPosition

log = logging.getLogger(__name__)


# A ledger record's bytes: pydantic's serialiser writes the event's JSON at once, the bytes `codec.dumps` gives
# through a JSON-mode dump and orjson (tests/unit/test_executor_event_build.py holds them equal for every event type).
encode_event = codec.dumps_model


@dataclass
class _Batch:
    """Records of one partition gathered while its previous batch is on its way; `durable` resolves once the broker
    acknowledged them all."""

    builder: BatchBuilder
    durable: asyncio.Future[object]


class LedgerWriter:
    def __init__(self, bootstrap: str, topic: str, *, linger_ms: int) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        # Per partition: the batches not yet handed to the producer, in order, and the task handing them over.
        self._waiting: dict[int, deque[_Batch]] = {}
        self._senders: dict[int, asyncio.Task[None]] = {}
        self._sending: dict[int, _Batch] = {}  # the batch each sender handed over and waits on

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "LedgerWriter.start() first"
        return self._producer

    async def start(self) -> None:
        self._producer = kafka.producer(self.bootstrap, linger_ms=self.linger_ms, max_batch_size=256 * 1024)
        await self._producer.start()

    async def flush(self) -> None:
        """Until every event appended so far is durable (not those appended meanwhile: a busy partition's sender
        never ends, so waiting for it would never end either)."""
        batches = [*self._sending.values(), *(b for waiting in self._waiting.values() for b in waiting)]
        if batches:
            # asyncio.wait, not gather: a flush that is cancelled (a revoke cut short) must not cancel the futures
            # the engine's acks and the senders wait on.
            await asyncio.wait([b.durable for b in batches])
        await self.producer.flush()

    async def stop(self) -> None:
        """Once everything appended is durable (the engine, closed first, appends nothing more)."""
        while self._senders:
            await self.flush()
        await self.producer.stop()

    async def append(self, partition: int, events: Iterable[EventBase]) -> list[asyncio.Future[object]]:
        """Queue events in order on the run's partition; the futures resolve when they are durable.

        A partition's records gather in one batch while its previous batch is on its way, and that batch goes to the
        producer once the previous one is acknowledged: an idle partition sends at once, a busy one what gathered
        during the last round trip, as aiokafka's own accumulator does with records sent one by one, at less than half
        the CPU a record (a batch builder's append instead of `send`, and one future per batch instead of one per
        record). Not a batch per decision: that was tried, sent one request per decision and cut runs/s by five.
        """
        waiting = self._waiting.setdefault(partition, deque())
        futures: list[asyncio.Future[object]] = []
        for event in events:
            key, value = event.run_id.encode(), encode_event(event)
            if not waiting or waiting[-1].builder.append(timestamp=None, key=key, value=value) is None:
                batch = _Batch(self.producer.create_batch(), asyncio.get_running_loop().create_future())
                batch.durable.add_done_callback(_crash_on_failure)
                if batch.builder.append(timestamp=None, key=key, value=value) is None:
                    raise ValueError(f"ledger event {event.run_id}:{event.seq} is larger than a producer batch")
                waiting.append(batch)
            if not futures or futures[-1] is not waiting[-1].durable:
                futures.append(waiting[-1].durable)
        if futures and partition not in self._senders:
            self._senders[partition] = asyncio.create_task(self._send(partition), name=f"ledger-send:{partition}")
        return futures

    async def _send(self, partition: int) -> None:
        """Hand the partition's batches to the producer one at a time, each once the one before is durable."""
        waiting = self._waiting[partition]
        try:
            while waiting:
                batch = self._sending[partition] = waiting.popleft()
                try:
                    sent = await self.producer.send_batch(batch.builder, self.topic, partition=partition)
                    acknowledged = await sent
                except Exception as exc:  # the ledger did not take them: _crash_on_failure ends the process
                    if not batch.durable.done():
                        batch.durable.set_exception(exc)
                    raise
                if not batch.durable.done():  # a future someone cancelled stays cancelled; the records are durable
                    batch.durable.set_result(acknowledged)
        finally:
            del self._senders[partition]
            self._sending.pop(partition, None)


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
