"""Backpressure for kafka-triggered flows: a gate that closes while the executor lags too far behind the triggers
topic (docs/kafka-triggers.md: scaling and backpressure)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.common import kafka
from services.common.flowfollow import cancelled
from services.ingest import metrics

log = logging.getLogger(__name__)


class Backlog:
    """Backpressure: open while the executor's consumer group lags less than `limit` triggers behind the triggers
    topic; subscriptions wait here before each fetch. A lag that cannot be read leaves the gate as it was."""

    def __init__(self, bootstrap: str, topic: str, group: str, limit: int, interval_s: float = 1.0) -> None:
        self.bootstrap, self.topic, self.group, self.limit, self.interval_s = bootstrap, topic, group, limit, interval_s
        self.open = asyncio.Event()
        self.open.set()
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.limit <= 0:
            return
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        self._consumer = kafka.follower(self.bootstrap)
        await self._admin.start()
        await self._consumer.start()
        self._task = asyncio.create_task(self._watch(), name="kafka-trigger-backlog")

    async def stop(self) -> None:
        await cancelled(self._task)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def _watch(self) -> None:
        unreadable = False
        while True:
            try:
                lag = await self.lag()
            except (KafkaError, OSError, TimeoutError) as exc:
                if not unreadable:  # once per outage, not once a second
                    log.info("executor lag unreadable (%r); the backpressure gate stays as it is", exc)
                unreadable = True
            else:
                unreadable = False
                metrics.KAFKA_TRIGGER_EXECUTOR_BACKLOG.set(lag)
                if lag < self.limit:
                    self.open.set()
                elif self.open.is_set():
                    log.info("executor %d triggers behind (limit %d): kafka triggers wait", lag, self.limit)
                    self.open.clear()
            await asyncio.sleep(self.interval_s)

    async def lag(self) -> int:
        assert self._consumer is not None and self._admin is not None
        tps = [TopicPartition(self.topic, p) for p in sorted(self._consumer.partitions_for_topic(self.topic) or ())]
        if not tps:
            await self._consumer.topics()  # metadata of a topic created after the start
            return 0
        ends = await self._consumer.end_offsets(tps)
        done = await self._admin.list_consumer_group_offsets(self.group, partitions=tps)
        return sum(max(0, ends[tp] - max(0, done[tp].offset if tp in done else 0)) for tp in tps)
