"""Appends run requests to the triggers topic, keyed by run_id, and waits until Kafka has them."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from schemas import codec
from schemas.events import TriggerReceived


class TriggerLog:
    def __init__(self, bootstrap: str, topic: str, *, linger_ms: int) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=self.linger_ms,
            max_batch_size=512 * 1024,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def append(self, triggers: list[TriggerReceived]) -> None:
        """Returns once every trigger is durable (acks=all); raises if any is not."""
        assert self._producer is not None
        futures = [await self._producer.send(self.topic, codec.dumps(t), key=t.run_id.encode()) for t in triggers]
        await asyncio.gather(*futures)
