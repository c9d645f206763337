"""Appends records to Kafka through one idempotent producer that a failure never leaves broken.

After any produce error — a record the broker refuses, a broker restart, a timeout, an out-of-order sequence —
the producer is dropped and the next append builds a new one, so one client's failed request never fails the
requests after it (invariant 8). The idempotent producer's sequence numbers are per producer id: a fresh producer
gets a fresh id, so nothing of the broken one's state carries over.

Every append is bounded in time and reports exactly which records are durable, which were refused and which
are unknown (sent but not acknowledged before the deadline), so an edge can answer the client truthfully.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas.topics import partition_for
from services.common import kafka

log = logging.getLogger(__name__)

# What a record costs in a batch besides its key and value (varints, headers count, attributes), generously.
RECORD_OVERHEAD = 64
# A record batch's own header.
BATCH_OVERHEAD = 61
# Appends of at most this many records are sent record by record (see Appender._send).
PER_RECORD_SENDS = 64


@dataclass
class AppendFailed(Exception):
    """Not every record is known to be durable. Indexes refer to the records passed to `append`."""

    reason: str
    appended: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.reason)

    @property
    def nothing_appended(self) -> bool:
        """True when a retry cannot duplicate anything: no record reached or may have reached the log."""
        return not self.appended and not self.unknown


class Appender:
    """One producer per process for one or more topics; rebuilt lazily after a failure."""

    def __init__(
        self,
        bootstrap: str,
        *,
        linger_ms: int = 5,
        max_message_bytes: int = 1_000_000,
        timeout_s: float = 10.0,
        client_id: str = "flowtrail",
    ) -> None:
        self.bootstrap = bootstrap
        self.linger_ms = linger_ms
        self.max_message_bytes = max_message_bytes
        # A batch never exceeds what the broker accepts as one message (message.max.bytes).
        self.max_batch_bytes = min(512 * 1024, max_message_bytes)
        self.timeout_s = timeout_s
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        # Appends still using each producer: a dropped one is stopped only when none is (stopping it under another
        # request would fail that request's batches with ProducerClosed).
        self._users: dict[int, int] = {}
        self._retired: set[int] = set()
        self._lock = asyncio.Lock()
        self._partitions: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None
        self.last_error_at: float = 0.0
        self.last_ok_at: float = 0.0

    @property
    def max_record_bytes(self) -> int:
        """The largest key + value one record may have to fit a batch the broker accepts."""
        return self.max_batch_bytes - BATCH_OVERHEAD - RECORD_OVERHEAD

    async def start(self) -> None:
        """Connects now if Kafka answers; when it does not, the process starts anyway and reports not ready."""
        try:
            await self._started()
        except (KafkaError, OSError, TimeoutError) as exc:
            self._failed(f"Kafka unreachable at start: {exc!r}")
            log.warning("Kafka not reachable at %s yet (%r); appends will connect when it is", self.bootstrap, exc)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = kafka.producer(
                    self.bootstrap,
                    client_id=self.client_id,
                    linger_ms=self.linger_ms,
                    max_batch_size=self.max_batch_bytes,
                    max_request_size=self.max_message_bytes,
                    request_timeout_ms=int(self.timeout_s * 1000),
                )
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await producer.start()
                except BaseException:
                    await _stop_quietly(producer)
                    raise
                self._producer = producer
            return self._producer

    def _discard(self, producer: AIOKafkaProducer) -> None:
        """Drop a producer after a failure: the next append builds a new one; this one is stopped (aside: its stop
        may wait for in-flight batches) once no append uses it any more."""
        if self._producer is producer:
            self._producer = None
            self._partitions.clear()
        self._retired.add(id(producer))
        if not self._users.get(id(producer)):
            self._stop_aside(producer)

    def _stop_aside(self, producer: AIOKafkaProducer) -> None:
        self._retired.discard(id(producer))
        task = asyncio.get_running_loop().create_task(_stop_quietly(producer))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _use(self, producer: AIOKafkaProducer) -> None:
        self._users[id(producer)] = self._users.get(id(producer), 0) + 1

    def _done_with(self, producer: AIOKafkaProducer) -> None:
        left = self._users[id(producer)] - 1
        if left:
            self._users[id(producer)] = left
            return
        del self._users[id(producer)]
        if id(producer) in self._retired:
            self._stop_aside(producer)

    def _failed(self, reason: str) -> None:
        self.last_error = reason
        self.last_error_at = time.time()

    async def partitions(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            producer = await self._started()
            async with asyncio.timeout(self.timeout_s):
                count = len(await producer.partitions_for(topic))
            self._partitions[topic] = count
        return count

    async def append(self, topic: str, records: Sequence[tuple[bytes, bytes, int | None]]) -> None:
        """(key, value, partition or None for the key's partition by `partitioner`) records; returns once every one
        is durable (acks=all), else raises AppendFailed saying which are, which are not and which are unknown."""
        if not records:
            return
        for index, (key, value, _) in enumerate(records):
            if len(key) + len(value) > self.max_record_bytes:
                raise ValueError(f"record {index} is larger than one batch ({self.max_record_bytes} bytes)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s  # one bound for the whole append: handing over and acknowledgement
        try:
            async with asyncio.timeout_at(deadline):
                producer = await self._started()
        except (KafkaError, OSError, TimeoutError) as exc:
            self._failed(repr(exc))
            raise AppendFailed(f"Kafka is unreachable: {exc!r}", refused=list(range(len(records)))) from exc
        self._use(producer)
        try:
            await self._append(producer, topic, records, deadline)
        finally:
            self._done_with(producer)

    async def _append(
        self, producer: AIOKafkaProducer, topic: str, records: Sequence[tuple[bytes, bytes, int | None]],
        deadline: float,
    ) -> None:  # fmt: skip
        batches: list[tuple[asyncio.Future[object], list[int]]] = []
        send_error: BaseException | None = None
        try:
            async with asyncio.timeout_at(deadline):
                await self._send(producer, topic, records, batches)
        except (KafkaError, OSError, TimeoutError) as exc:
            # The batches handed over before the error may still reach the log: they are waited for below. Only the
            # records never handed over are known not to be appended.
            send_error = exc
        handed = {i for _, indexes in batches for i in indexes}
        refused = [i for i in range(len(records)) if i not in handed]
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        done, pending = await asyncio.wait([f for f, _ in batches], timeout=timeout) if batches else (set(), set())
        appended: list[int] = []
        unknown: list[int] = []
        first_error: BaseException | None = send_error
        for future, indexes in batches:
            if future not in done:
                unknown += indexes
            elif future.exception() is not None:
                refused += indexes
                first_error = first_error or future.exception()
            else:
                appended += indexes
        if not refused and not unknown:
            self.last_ok_at = time.time()
            return
        self._discard(producer)
        reason = repr(first_error) if first_error is not None else f"no acknowledgement within {self.timeout_s:g} s"
        self._failed(reason)
        for future in pending:
            future.add_done_callback(_consume_exception)
        raise AppendFailed(reason, appended=sorted(appended), refused=sorted(refused), unknown=sorted(unknown))

    async def _send(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        records: Sequence[tuple[bytes, bytes, int | None]],
        batches: list[tuple[asyncio.Future[object], list[int]]],
    ) -> None:
        """Each record or batch handed over is added to `batches` at once, so a failure part way leaves the list
        saying what may reach the log.

        Small appends (a trigger request's one input) go record by record into the producer's shared batches, so the
        records of concurrent requests travel in one produce request per partition. Larger ones are cut into
        per-partition batches built here, each within the broker's message size: for a 100,000-record request, one
        future per batch instead of one per record. (A batch handed over whole waits until the partition has no
        other batch queued — one per request would queue every concurrent request behind the one before it, and
        aiokafka's wait there gives up early, docs/decisions.md "No waiting on the hot path".)"""
        partitions = await self.partitions(topic)
        if len(records) <= PER_RECORD_SENDS:
            for index, (key, value, partition) in enumerate(records):
                p = partition if partition is not None else partition_for(key.decode(), partitions)
                batches.append((await producer.send(topic, value, key=key, partition=p), [index]))
            return
        builders: dict[int, tuple[object, list[int]]] = {}
        for index, (key, value, partition) in enumerate(records):
            p = partition if partition is not None else partition_for(key.decode(), partitions)
            entry = builders.get(p)
            if entry is None:
                entry = builders[p] = (producer.create_batch(), [])
            builder, indexes = entry
            if builder.append(key=key, value=value, timestamp=None) is None:  # type: ignore[attr-defined]
                batches.append((await producer.send_batch(builder, topic, partition=p), indexes))  # type: ignore[arg-type]
                entry = builders[p] = (producer.create_batch(), [])
                builder, indexes = entry
                builder.append(key=key, value=value, timestamp=None)  # type: ignore[attr-defined]
            indexes.append(index)
        for p, (builder, indexes) in builders.items():
            if indexes:
                batches.append((await producer.send_batch(builder, topic, partition=p), indexes))  # type: ignore[arg-type]

    async def check(self) -> str | None:
        """For /readyz: None when an append could go out now, else why not. A metadata round trip at most."""
        try:
            producer = await self._started()
            async with asyncio.timeout(min(self.timeout_s, 3.0)):
                await producer.client.fetch_all_metadata()
        except (KafkaError, OSError, TimeoutError) as exc:
            return f"Kafka unreachable: {exc!r}"
        return None


def _consume_exception(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        async with asyncio.timeout(30):
            await producer.stop()
    except Exception as exc:  # a broken producer's stop may fail in many ways; it is being dropped anyway
        log.info("stopping a dropped Kafka producer: %r", exc)
