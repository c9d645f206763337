"""The flow registry: every published flow version, followed from the flows topic."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import codec
from schemas.events import FlowPaused, FlowResumed, FlowVersionPublished
from schemas.flows import FlowDefinition

log = logging.getLogger(__name__)


class FlowRegistry:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.versions: dict[tuple[str, str, int], FlowDefinition] = {}
        self.latest: dict[tuple[str, str], int] = {}
        self.paused: set[tuple[str, str]] = set()
        self.bootstrap = bootstrap
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest"
        )
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.topic) or {0}
        self._tps = [TopicPartition(self.topic, p) for p in partitions]
        self._consumer.assign(self._tps)
        for tp, offset in (await self._consumer.beginning_offsets(self._tps)).items():
            self._consumer.seek(tp, offset)
        await self.catch_up()
        self._task = asyncio.create_task(self._follow(), name="flow-registry")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()

    def get(self, tenant_id: str, flow_id: str, version: int | None) -> FlowDefinition | None:
        if version is None:
            version = self.latest.get((tenant_id, flow_id))
            if version is None:
                return None
        return self.versions.get((tenant_id, flow_id, version))

    async def catch_up(self) -> None:
        """Read until the end offsets as of now, so a flow published before a trigger is known."""
        async with self._lock:
            end = await self._consumer.end_offsets(self._tps)
            while [tp for tp in self._tps if await self._consumer.position(tp) < end[tp]]:
                await self._poll(timeout_ms=500)

    async def _follow(self) -> None:
        while True:
            async with self._lock:
                await self._poll(timeout_ms=200)
            await asyncio.sleep(0)

    async def _poll(self, timeout_ms: int) -> None:
        batches = await self._consumer.getmany(*self._tps, timeout_ms=timeout_ms)
        for records in batches.values():
            for record in records:
                try:
                    event = codec.decode_flow_event(record.value)
                except codec.DecodeError as exc:
                    log.error("undecodable flow event at offset %s: %s", record.offset, exc)
                    continue
                key = (event.tenant_id, event.flow_id)
                if isinstance(event, FlowVersionPublished):
                    self.versions[(*key, event.flow_version)] = event.flow
                    self.latest[key] = max(self.latest.get(key, 0), event.flow_version)
                elif isinstance(event, FlowPaused):
                    self.paused.add(key)
                elif isinstance(event, FlowResumed):
                    self.paused.discard(key)
