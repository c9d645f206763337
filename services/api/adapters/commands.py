"""Run actions leave the API as records: commands (cancel, resume, archive) on the commands topic and retries
as new run requests on the triggers topic, each keyed by run id so it reaches the executor owning that run.

The API never writes the ledger (DESIGN 2.2): the executor turns these into ledger events, or ignores one
that no longer applies (a cancel for a run that ended meanwhile).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from schemas import codec
from schemas.events import CommandBase, TriggerReceived
from schemas.topics import Topics, partition_for


class CommandLog:
    def __init__(self, bootstrap: str, topics: Topics, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.partitions = partitions
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        """Started on first use, so the API serves reads while Kafka is unreachable."""
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                            linger_ms=2)  # fmt: skip
                await producer.start()
                self._producer = producer
            return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def send_commands(self, commands: Sequence[CommandBase]) -> None:
        """Returns once every command is durable in Kafka."""
        await self._send(self.topics.commands, [(c.run_id, codec.dumps(c)) for c in commands])

    async def send_triggers(self, triggers: Sequence[TriggerReceived]) -> None:
        """Returns once every run request is durable in Kafka."""
        await self._send(self.topics.triggers, [(t.run_id, codec.dumps(t)) for t in triggers])

    async def _send(self, topic: str, records: list[tuple[str, bytes]]) -> None:
        producer = await self._started()
        futures = []
        for run_id, value in records:
            partition = partition_for(run_id, self.partitions)
            futures.append(await producer.send(topic, value, key=run_id.encode(), partition=partition))
        await asyncio.gather(*futures)
