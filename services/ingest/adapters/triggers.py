"""Appends run requests to the triggers topic, keyed by run_id, and waits until Kafka has them."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from schemas.topics import partition_for


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

    async def append(self, records: list[tuple[str, bytes]]) -> None:
        """(run id, encoded TriggerReceived) pairs; returns once every one is durable (acks=all), else raises.

        Records go out as per-partition batches built here: for a 100,000-input request, one future
        per batch instead of one per record.
        """
        producer = self._producer
        assert producer is not None
        partitions = len(await producer.partitions_for(self.topic))
        builders: dict[int, BatchBuilder] = {}
        futures: list[asyncio.Future[object]] = []
        for run_id, value in records:
            partition = partition_for(run_id, partitions)
            key = run_id.encode()
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(builder, self.topic, partition=partition))
                builder = builders[partition] = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"trigger {run_id} is larger than one producer batch")
        for partition, builder in builders.items():
            if builder.record_count():
                futures.append(await producer.send_batch(builder, self.topic, partition=partition))
        await asyncio.gather(*futures)
