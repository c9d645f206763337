"""Kafka helpers every process shares: creating Flowtrail's topics, publishing flow versions."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas import codec
from schemas.events import FlowEventBase
from schemas.topics import KEEP_FOREVER, Topics


async def ensure_topics(bootstrap: str, topics: Topics, partitions: int) -> list[str]:
    """Create the topics that do not exist yet; returns the names created now."""
    wanted = [
        # Triggers and commands are keyed by run_id and partitioned like the ledger.
        NewTopic(topics.triggers, partitions, 1),
        NewTopic(topics.commands, partitions, 1),
        NewTopic(topics.ledger, partitions, 1, topic_configs=KEEP_FOREVER),
        NewTopic(topics.flows, 1, 1, topic_configs=KEEP_FOREVER),
        NewTopic(topics.dlq, 1, 1, topic_configs=KEEP_FOREVER),
    ]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them meanwhile
        return [t.name for t in missing]
    finally:
        await admin.close()


async def publish_flow_events(bootstrap: str, topics: Topics, events: Sequence[FlowEventBase]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(topics.flows, codec.dumps(event), key=event.flow_id.encode())
    finally:
        await producer.stop()


async def topic_partitions(bootstrap: str, topics: list[str]) -> dict[str, list[int]]:
    """Partition numbers of each topic that exists (missing topics are left out)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described if d["error_code"] == 0}
