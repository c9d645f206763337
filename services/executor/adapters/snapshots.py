"""Executor snapshots on Kafka: a partition's scan restored from its latest snapshot plus the ledger's tail, and
the writer that keeps the snapshots near the ledger's end (docs/architecture.md, Recovery; the bytes are
`snapshots.py`).

Partition p of the snapshots topic holds only the snapshots of ledger partition p (key p), so the latest is its
last record. Any executor may write one: a snapshot is a function of a durable prefix of the ledger (reads stop
at the high watermark), whoever computed it. A snapshot that cannot be read, decoded or matched to the ledger is
ignored and the partition replayed whole; a failure to write one is logged and counted, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.topics import SNAPSHOT_MAX_BYTES, Topics
from services.common import kafka
from services.executor import metrics, snapshots
from services.executor.adapters.ledger import LedgerChanged, iter_partition_tail
from services.executor.finished import FinishedRuns
from services.executor.replay import PartitionScan

log = logging.getLogger(__name__)

# Room for the record's own overhead in a request and a fetch.
_WIRE_BYTES = SNAPSHOT_MAX_BYTES + 1024 * 1024
_READ_TIMEOUT_S = 60.0


class SnapshotStore:
    """Reads and writes the snapshots topic. `start()` (at the engine's start) makes sure the topic exists and
    starts the one consumer every read uses, in the background, so a replay does not wait for either."""

    def __init__(self, bootstrap: str, topics: Topics, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.topic = topics.snapshots
        self.partitions = partitions
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._ready: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one read at a time on the one consumer
        self._producer_lock = asyncio.Lock()

    def start(self) -> None:
        failed = self._ready is not None and self._ready.done() and (self._ready.cancelled() or self._ready.exception())
        if self._ready is None or failed:
            self._ready = asyncio.create_task(self._prepare(), name="snapshots:prepare")

    async def _prepare(self) -> None:
        # A deployment older than snapshots lacks the topic: create it (with the others' settings) before a client's
        # metadata request lets the broker auto-create it uncompacted.
        # A consumer started with no partition asks for no topic's metadata: both can go on at once.
        consumer = kafka.follower(self.bootstrap, max_partition_fetch_bytes=_WIRE_BYTES, fetch_max_bytes=_WIRE_BYTES)
        try:
            await asyncio.gather(kafka.ensure_topics(self.bootstrap, self.topics, self.partitions), consumer.start())
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def _ensure_ready(self) -> AIOKafkaConsumer:
        self.start()
        assert self._ready is not None
        await asyncio.shield(self._ready)
        assert self._consumer is not None
        return self._consumer

    async def latest(self, partition: int) -> bytes | None:
        """The last snapshot written for ledger partition `partition`, or None if there is none."""
        consumer = await self._ensure_ready()
        tp = TopicPartition(self.topic, partition)
        async with self._lock:
            consumer.assign([tp])
            try:
                end = (await consumer.end_offsets([tp]))[tp]
                if end == 0:
                    return None
                consumer.seek(tp, end - 1)
                deadline = time.monotonic() + _READ_TIMEOUT_S
                while time.monotonic() < deadline:
                    for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                        if record.offset == end - 1:
                            return record.value
                    if await consumer.position(tp) >= end:
                        return None  # the last offset held no record (compacted away, a control record)
                raise TimeoutError(f"{self.topic}-{partition}: offset {end - 1} not read in {_READ_TIMEOUT_S:.0f} s")
            finally:
                # No fetching between reads. (Not unsubscribe(): a consumer stopped after it can wait forever
                # for its fetch task.)
                consumer.pause(tp)

    async def write(self, partition: int, data: bytes) -> None:
        await self._ensure_ready()
        async with self._producer_lock:
            if self._producer is None:
                producer = kafka.producer(self.bootstrap, max_request_size=_WIRE_BYTES)
                await producer.start()
                self._producer = producer
        try:
            await self._producer.send_and_wait(self.topic, data, key=str(partition).encode(), partition=partition)
        except Exception:
            # A producer that failed may stay broken (docs/decisions.md): the next write builds a new one.
            producer, self._producer = self._producer, None
            if producer is not None:
                await producer.stop()
            raise

    async def close(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
            await asyncio.gather(self._ready, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


async def restore(store: SnapshotStore, partition: int, now: datetime) -> PartitionScan | None:
    """The partition's latest snapshot as a scan, or None (none, unreadable or undecodable: logged)."""
    try:
        data = await store.latest(partition)
    except Exception as exc:
        log.warning("partition %s: snapshot not read (%r); replaying the whole partition", partition, exc)
        metrics.SNAPSHOT_LOADS.labels("unreadable").inc()
        return None
    if data is None:
        metrics.SNAPSHOT_LOADS.labels("none").inc()
        return None
    try:
        return snapshots.decode(data, partition=partition, now=now)
    except snapshots.SnapshotError as exc:
        log.warning("partition %s: snapshot ignored (%s); replaying the whole partition", partition, exc)
        metrics.SNAPSHOT_LOADS.labels("undecodable").inc()
        return None


async def scan_partition(bootstrap: str, ledger_topic: str, store: SnapshotStore, partition: int) -> PartitionScan:
    """The partition's scan at the ledger's end as of now: its latest snapshot and the records after it, or the
    whole partition when no snapshot can be used."""
    now = datetime.now(UTC)
    scan = await restore(store, partition, now)
    if scan is not None:
        try:
            await _read(bootstrap, ledger_topic, scan)
            metrics.SNAPSHOT_LOADS.labels("restored").inc()
            return scan
        except LedgerChanged as exc:
            log.warning("partition %s: snapshot ignored (%s); replaying the whole partition", partition, exc)
            metrics.SNAPSHOT_LOADS.labels("mismatch").inc()
    scan = PartitionScan(partition, FinishedRuns(), set(), now)
    await _read(bootstrap, ledger_topic, scan)
    return scan


async def _read(bootstrap: str, ledger_topic: str, scan: PartitionScan) -> None:
    async for batch, position in iter_partition_tail(bootstrap, ledger_topic, scan.partition, scan.position):
        scan.take(batch, position)


class Snapshotter:
    """Writes each owned partition's snapshot after its replay and then every `interval_s` once `min_events` new
    records are in its ledger. A periodic snapshot is built apart from the engine's live state — the latest
    snapshot re-read and the ledger's tail taken — so it cannot race with it, and no second copy of a partition's
    state stays in memory between snapshots."""

    def __init__(
        self, bootstrap: str, ledger_topic: str, store: SnapshotStore, owned: Callable[[], Iterable[int]], *,
        interval_s: float, min_events: int,
    ) -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.ledger_topic = ledger_topic
        self.store = store
        self.owned = owned
        self.interval_s = interval_s
        self.min_events = min_events
        self.covered: dict[int, int] = {}  # the offset the latest snapshot of each partition covers, as known here
        self._tasks: set[asyncio.Task[Any]] = set()  # writes queued by replays
        self._periodic: asyncio.Task[None] | None = None

    def replayed(self, scan: PartitionScan) -> None:
        """A partition's replay just ended at `scan`: store it (in the background) unless its snapshot is recent.
        The bytes are taken now, before the engine uses the scan."""
        if scan.position is None:
            return
        self.covered[scan.partition] = scan.restored_from.offset if scan.restored_from else -1
        if scan.restored_from is not None and scan.replayed < self.min_events:
            return
        data = snapshots.encode(scan)
        self._background(self._write(scan.partition, scan.position.offset, data))

    def start(self) -> None:
        self.store.start()
        if self._periodic is None:
            self._periodic = asyncio.create_task(self._every_interval(), name="snapshots")

    async def written(self) -> None:
        """Until the snapshots queued by replays are written (or have failed)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._periodic] if self._periodic else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._periodic = None
        await self.store.close()

    def _background(self, work: Coroutine[Any, Any, bool]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for partition in sorted(self.owned()):
                try:
                    await self.refresh(partition)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning("partition %s: snapshot not written", partition, exc_info=True)
                    metrics.SNAPSHOTS.labels("failed").inc()

    async def refresh(self, partition: int) -> bool:
        """Write a new snapshot of `partition` if its ledger has `min_events` records past the latest one."""
        end = await _end_offset(self.bootstrap, self.ledger_topic, partition)
        if end - 1 - self.covered.get(partition, -1) < self.min_events:
            return False
        scan = await scan_partition(self.bootstrap, self.ledger_topic, self.store, partition)
        if scan.position is None:
            return False
        return await self._write(partition, scan.position.offset, snapshots.encode(scan))

    async def _write(self, partition: int, offset: int, data: bytes) -> bool:
        if len(data) > SNAPSHOT_MAX_BYTES:
            log.warning("partition %s: a snapshot of %d bytes is over the %d allowed; not written", partition,
                        len(data), SNAPSHOT_MAX_BYTES)  # fmt: skip
            metrics.SNAPSHOTS.labels("too_large").inc()
            return False
        try:
            await self.store.write(partition, data)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("partition %s: snapshot at offset %s not written", partition, offset, exc_info=True)
            metrics.SNAPSHOTS.labels("failed").inc()
            return False
        self.covered[partition] = max(offset, self.covered.get(partition, -1))
        metrics.SNAPSHOTS.labels("written").inc()
        metrics.SNAPSHOT_BYTES.set(len(data))
        log.info("partition %s: snapshot at offset %s written (%d bytes)", partition, offset, len(data))
        return True


async def _end_offset(bootstrap: str, topic: str, partition: int) -> int:
    tp = TopicPartition(topic, partition)
    consumer = kafka.follower(bootstrap)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()
