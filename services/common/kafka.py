"""Kafka helpers every process shares: the producer with the project's settings, reading a partition to its end,
creating Flowtrail's topics, publishing flow versions. The flows topic's follower is `flowfollow.py`; the appender
that survives a failed producer is `appender.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas import codec
from schemas.events import FlowEventBase
from schemas.topics import KEEP_FOREVER, SNAPSHOT_TOPIC_CONFIG, Topics


def producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    """An idempotent producer acknowledged by every in-sync replica — what every Flowtrail write needs: a record
    the broker confirmed is durable and never written twice by a retry (docs/decisions.md). `options` are the
    caller's own (linger, batch and request sizes, client id)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **options)


def follower(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer outside any group, committing nothing: it reads what it is assigned, from where it seeks."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest", **options
    )


async def read_to_end(
    bootstrap: str, topic: str, partition: int, *, start: int = 0, max_records: int = 5000, **options: Any
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """The records of one partition from offset `start` (or its first offset, if later) to its end as of the call,
    a fetched batch at a time. `options` go to the consumer (fetch sizes for large records)."""
    tp = TopicPartition(topic, partition)
    consumer = follower(bootstrap, **options)
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        # seek() is immediate; seek_to_beginning() can lose a race with the reset that assign() starts.
        consumer.seek(tp, max(start, (await consumer.beginning_offsets([tp]))[tp]))
        position = await consumer.position(tp)
        while position < end:
            batch = (await consumer.getmany(tp, timeout_ms=1000, max_records=max_records)).get(tp, [])
            if batch:
                position = batch[-1].offset + 1
                yield batch
            else:
                position = await consumer.position(tp)
    finally:
        await consumer.stop()


def replication_factor(brokers: int) -> int:
    """Replicas of each topic on a cluster of `brokers` (docs/cluster.md): one per broker, at most three."""
    return max(1, min(brokers, 3))


def min_insync_replicas(factor: int) -> int:
    """Replicas an acks=all write waits for: all but one, so one broker may be down without stopping writes."""
    return factor - 1 if factor > 1 else 1


def replicated(topic: NewTopic, brokers: int) -> NewTopic:
    """`topic` replicated as a cluster of `brokers` allows, with its `min.insync.replicas`."""
    factor = replication_factor(brokers)
    configs = {"min.insync.replicas": str(min_insync_replicas(factor)), **(topic.topic_configs or {})}
    return NewTopic(topic.name, topic.num_partitions, factor, topic_configs=configs)


async def create_missing(bootstrap: str, wanted: Sequence[NewTopic]) -> list[str]:
    """Create the topics that do not exist yet, each `replicated` over the brokers the cluster has now (the
    replication factor in `wanted` is not used); returns the names created now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        brokers = len((await admin.describe_cluster())["brokers"])
        missing = [replicated(t, brokers) for t in wanted if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them meanwhile
        return [t.name for t in missing]
    finally:
        await admin.close()


async def ensure_topics(bootstrap: str, topics: Topics, partitions: int) -> list[str]:
    """Create Flowtrail's topics that do not exist yet; returns the names created now."""
    return await create_missing(
        bootstrap,
        [
            # Triggers and commands are keyed by run_id and partitioned like the ledger.
            NewTopic(topics.triggers, partitions, 1),
            NewTopic(topics.commands, partitions, 1),
            NewTopic(topics.ledger, partitions, 1, topic_configs=KEEP_FOREVER),
            NewTopic(topics.flows, 1, 1, topic_configs=KEEP_FOREVER),
            NewTopic(topics.dlq, 1, 1, topic_configs=KEEP_FOREVER),
            # Executor snapshots: partition p holds the latest snapshot of ledger partition p (docs/decisions.md).
            NewTopic(topics.snapshots, partitions, 1, topic_configs=SNAPSHOT_TOPIC_CONFIG),
        ],
    )


async def publish_flow_events(bootstrap: str, topics: Topics, events: Sequence[FlowEventBase]) -> None:
    flows = producer(bootstrap)
    await flows.start()
    try:
        for event in events:
            await flows.send_and_wait(topics.flows, codec.dumps(event), key=event.flow_id.encode())
    finally:
        await flows.stop()


async def topic_partitions(bootstrap: str, topics: list[str]) -> dict[str, list[int]]:
    """Partition numbers of each topic that exists (missing topics are left out)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described if d["error_code"] == 0}
