"""Read the ledger (and the flows topic) as an analytics job does: typed events, upcast to the current schema
version by the one codec (schemas/codec.py), from the beginning, an offset or a time, filtered by tenant, flow or
event type; once to the end, or following the log live in a consumer group with at-least-once commits and dedupe
by `(run_id, seq)`. The contract it reads by is docs/ledger.md.

    async with LedgerReader("127.0.0.1:19092", tenant="acme", start=datetime(2026, 1, 1, tzinfo=UTC)) as reader:
        async for batch in reader.batches():
            for item in batch:
                handle(item.event)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas import codec
from schemas.events import EventBase, FlowEventBase
from schemas.topics import Topics
from services.common.kafka import topic_partitions

log = logging.getLogger(__name__)

# Where reading starts on a partition with no committed offset: its first record, an offset (the same on every
# partition, or per partition), or the first record written at or after a time (the record's Kafka timestamp).
Start = Literal["beginning", "end"] | int | Mapping[int, int] | datetime


@dataclass(frozen=True, slots=True)
class LedgerItem:
    """One decoded record: its event (a ledger event, or a flows-topic event) and where it was read."""

    event: EventBase | FlowEventBase
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass
class ReaderStats:
    read: int = 0  # records fetched
    yielded: int = 0
    filtered: int = 0  # records another tenant's, flow's or type's
    duplicates: int = 0  # (run_id, seq) already seen or already applied
    undecodable: int = 0  # records the codec refused (logged with their reason)


class LedgerReader:
    """A reader of `<prefix>.ledger` (and `<prefix>.flows` with `flows=True`).

    - `start`: "beginning" (default), "end", an offset, `{partition: offset}` or a datetime; used on partitions
      with no offset committed for `group_id`.
    - `tenant`, `flow`, `types`: keep only those events (flows-topic events are kept by tenant and flow).
    - `follow`: False reads to the end offsets as of `start()` and stops; True keeps waiting for new records.
    - `group_id`: consume in that consumer group; the offsets of a batch are committed when the caller asks for
      the next one (it has processed this one) or calls `commit()`: at least once. Without a group nothing is
      committed.
    - `applied`: the last seq per run the caller's read model already holds (a mapping, read once): events at or
      below it are skipped, as are events repeated within this reader — dedupe by `(run_id, seq)`.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topics: Topics | None = None,
        flows: bool = False,
        start: Start = "beginning",
        tenant: str | None = None,
        flow: str | None = None,
        types: Collection[str] | None = None,
        follow: bool = False,
        group_id: str | None = None,
        applied: Mapping[str, int] | None = None,
        max_records: int = 2000,
        **consumer_options: Any,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics or Topics()
        self.names = [self.topics.ledger] + ([self.topics.flows] if flows else [])
        self.start_at = start
        self.tenant, self.flow = tenant, flow
        self.types = frozenset(types) if types is not None else None
        self.follow = follow
        self.group_id = group_id
        self.last_seq: dict[str, int] = dict(applied or {})
        self.max_records = max_records
        self.stats = ReaderStats()
        self._options = consumer_options
        self._consumer: AIOKafkaConsumer | None = None
        self._ends: dict[TopicPartition, int] = {}
        self._pending: dict[TopicPartition, OffsetAndMetadata] = {}

    async def __aenter__(self) -> LedgerReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest" if self.start_at == "end" else "earliest",
            **self._options,
        )
        await consumer.start()
        self._consumer = consumer
        if self.group_id is None:
            known = await topic_partitions(self.bootstrap, self.names)
            parts = [TopicPartition(t, p) for t in self.names for p in known.get(t, [])]
            consumer.assign(parts)
            await self._seek(parts)
        else:
            consumer.subscribe(self.names, listener=_SeekUncommitted(self))
        if not self.follow:
            parts = [TopicPartition(t, p) for t, ps in (await topic_partitions(self.bootstrap, self.names)).items()
                     for p in ps]  # fmt: skip
            self._ends = dict(await consumer.end_offsets(parts))

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _seek(self, parts: list[TopicPartition]) -> None:
        """Position `parts` at `start` (a partition with a committed offset is not passed here)."""
        consumer = self._consumer
        assert consumer is not None
        if not parts:
            return
        begins = await consumer.beginning_offsets(parts)
        ends = await consumer.end_offsets(parts)
        start = self.start_at
        if isinstance(start, datetime):
            found = await consumer.offsets_for_times({tp: int(start.timestamp() * 1000) for tp in parts})
            for tp in parts:
                at = found.get(tp)
                consumer.seek(tp, at.offset if at is not None else ends[tp])
            return
        for tp in parts:
            if start == "beginning":
                offset = begins[tp]
            elif start == "end":
                offset = ends[tp]
            elif isinstance(start, int):
                offset = start
            else:
                offset = start.get(tp.partition, begins[tp]) if isinstance(start, Mapping) else begins[tp]
            # seek() is immediate; seek_to_beginning() can lose a race with the reset that assign() starts.
            consumer.seek(tp, min(max(offset, begins[tp]), ends[tp]))

    async def commit(self) -> None:
        """Commit the offsets after the batches yielded so far (with a `group_id`; otherwise nothing)."""
        if self.group_id is not None and self._pending and self._consumer is not None:
            await self._consumer.commit(dict(self._pending))
        self._pending = {}

    async def remaining(self) -> int:
        """Records between the current positions and the end offsets a reader without `follow` stops at."""
        consumer = self._consumer
        assert consumer is not None
        left = 0
        for tp, end in self._ends.items():
            if tp in consumer.assignment():
                left += max(0, end - await consumer.position(tp))
        return left

    async def _done(self) -> bool:
        if self.follow:
            return False
        consumer = self._consumer
        assert consumer is not None
        if not consumer.assignment():
            return False  # a group member before its first assignment
        for tp in consumer.assignment():
            if await consumer.position(tp) < self._ends.get(tp, 0):
                return False
        return True

    async def batches(self) -> AsyncIterator[list[LedgerItem]]:
        """Batches of decoded, filtered, deduplicated events in log order per partition. Asking for the next batch
        commits the previous one's offsets (with a group): process a batch before asking for the next."""
        consumer = self._consumer
        assert consumer is not None, "start() the reader first"
        while True:
            await self.commit()
            if await self._done():
                return
            fetched = await consumer.getmany(timeout_ms=500, max_records=self.max_records)
            out: list[LedgerItem] = []
            for tp, records in fetched.items():
                end = self._ends.get(tp)
                for record in records:
                    if end is not None and not self.follow and record.offset >= end:
                        break
                    self.stats.read += 1
                    item = self._item(record)
                    if item is not None:
                        out.append(item)
                if records:
                    self._pending[tp] = OffsetAndMetadata(records[-1].offset + 1, "")
            if out:
                self.stats.yielded += len(out)
                yield out

    async def events(self) -> AsyncIterator[EventBase | FlowEventBase]:
        """The events of `batches()` one by one."""
        async for batch in self.batches():
            for item in batch:
                yield item.event

    def _item(self, record: Any) -> LedgerItem | None:
        if record.value is None:
            return None
        try:
            obj = codec.loads(record.value)
        except ValueError as exc:
            self.stats.undecodable += 1
            log.warning("%s[%d]@%d: not JSON: %s", record.topic, record.partition, record.offset, exc)
            return None
        # Tenant and flow are envelope fields no upcaster renames: filter before validating.
        if (
            not isinstance(obj, dict)
            or (self.tenant is not None and obj.get("tenant_id") != self.tenant)
            or (self.flow is not None and obj.get("flow_id") != self.flow)
        ):
            self.stats.filtered += isinstance(obj, dict)
            if not isinstance(obj, dict):
                self.stats.undecodable += 1
            return None
        try:
            event: EventBase | FlowEventBase = (
                codec.ledger_event_from_dict(obj)
                if record.topic == self.topics.ledger
                else codec.decode_flow_event(record.value)
            )
        except codec.DecodeError as exc:
            self.stats.undecodable += 1
            log.warning("%s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            return None
        # After upcasting: the current type names.
        if self.types is not None and getattr(event, "type", None) not in self.types:
            self.stats.filtered += 1
            return None
        if isinstance(event, EventBase):
            if event.seq <= self.last_seq.get(event.run_id, -1):
                self.stats.duplicates += 1
                return None
            self.last_seq[event.run_id] = event.seq
        return LedgerItem(event, record.topic, record.partition, record.offset, record.timestamp)


class _SeekUncommitted(ConsumerRebalanceListener):  # type: ignore[misc]
    """In a group, a partition assigned with no committed offset starts at the reader's `start`."""

    def __init__(self, reader: LedgerReader) -> None:
        self.reader = reader

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.reader._pending = {tp: o for tp, o in self.reader._pending.items() if tp not in revoked}

    async def on_partitions_assigned(self, assigned: Any) -> None:
        consumer = self.reader._consumer
        assert consumer is not None
        fresh = [tp for tp in assigned if await consumer.committed(tp) is None]
        await self.reader._seek(fresh)
