"""Follows the flows topic from offset 0 for any service: each flow's latest version and whether it is paused.

The one follower of the flows topic: ingest's scheduler uses it as it is, the executor's flow registry
(`services/executor/adapters/flows.py`) keeps every version besides."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from schemas import codec
from schemas.events import FlowEventBase, FlowPaused, FlowResumed, FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common import kafka

log = logging.getLogger(__name__)

FlowKey = tuple[str, str]  # (tenant_id, flow_id)
FlowListener = Callable[[FlowEventBase], None]


class FlowFollower:
    """A partition-less reader (no consumer group): every process sees every flow, replayed from the start.

    `on_event` is called for each event in log order, after the follower's own state took it in, so a
    listener can read `latest` and `paused` as they are right after that event.
    """

    def __init__(self, bootstrap: str, topic: str, *, on_event: FlowListener | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.on_event = on_event
        self.latest: dict[FlowKey, FlowDefinition] = {}
        self.published_at: dict[FlowKey, datetime] = {}  # when the latest version was published
        self.paused: set[FlowKey] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None
        # catch_up() may run while the follow loop polls: one getmany at a time.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Reads the topic up to its current end, then keeps following it in a background task."""
        self._consumer = kafka.follower(self.bootstrap)
        await self._consumer.start()
        await self._consumer.topics()  # fresh cluster metadata, so a topic created just now is seen
        partitions = self._consumer.partitions_for_topic(self.topic) or {0}
        self._tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._tps)
        for tp, offset in (await self._consumer.beginning_offsets(self._tps)).items():
            self._consumer.seek(tp, offset)
        await self.catch_up()
        self._task = asyncio.create_task(self._follow(), name="flow-follower")

    async def stop(self) -> None:
        await cancelled(self._task)
        if self._consumer is not None:
            await self._consumer.stop()

    async def catch_up(self) -> None:
        """Returns once every event published before the call has been taken in."""
        consumer = self._consumer
        assert consumer is not None
        async with self._lock:
            end = await consumer.end_offsets(self._tps)
            while [tp for tp in self._tps if await consumer.position(tp) < end[tp]]:
                await self._poll(consumer, timeout_ms=500)

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                async with self._lock:
                    await self._poll(consumer, timeout_ms=200)
            except KafkaError as exc:  # the broker away for a while: keep following once it is back
                log.warning("flows topic unreadable (%s); retrying", exc)
                await asyncio.sleep(1)
            await asyncio.sleep(0)

    async def _poll(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> None:
        batches = await consumer.getmany(*self._tps, timeout_ms=timeout_ms)
        for records in batches.values():
            for record in records:
                try:
                    event = codec.decode_flow_event(record.value)
                except codec.DecodeError as exc:
                    log.error("undecodable flow event at offset %s: %s", record.offset, exc)
                    continue
                self.take(event)
                if self.on_event is not None:
                    try:
                        self.on_event(event)
                    except Exception:  # a listener's bug must not stop every other flow from being followed
                        log.exception("flow listener failed on %s/%s", event.tenant_id, event.flow_id)

    def take(self, event: FlowEventBase) -> None:
        """Take one event in (a subclass keeping more calls this first)."""
        key = (event.tenant_id, event.flow_id)
        if isinstance(event, FlowVersionPublished):
            current = self.latest.get(key)
            if current is None or event.flow_version >= current.version:
                self.latest[key] = event.flow
                self.published_at[key] = event.occurred_at
        elif isinstance(event, FlowPaused):
            self.paused.add(key)
        elif isinstance(event, FlowResumed):
            self.paused.discard(key)


async def cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has stopped."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
