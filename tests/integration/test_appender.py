"""The appender on the real broker: one request's failure never fails another's, and an answer says exactly what is
durable (invariant 8).

A soak found both: while a 100,000-record append was being handed over, another request's failure dropped the shared
producer and stopped it under the big one (ProducerClosed), whose answer then claimed "nothing was appended" though
part of it had been.
"""

from __future__ import annotations

import asyncio
import uuid

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.topics import Topics
from services.common.appender import Appender, AppendFailed
from services.common.kafka import ensure_topics
from tests.conftest import Infra
from tests.harness import records_in


async def test_a_failing_request_never_fails_a_big_one_in_flight(infra: Infra) -> None:
    bootstrap = infra.kafka_bootstrap
    big_topics, small_topics = Topics(f"test.a{uuid.uuid4().hex[:8]}"), Topics(f"test.b{uuid.uuid4().hex[:8]}")
    await ensure_topics(bootstrap, big_topics, 2)
    await ensure_topics(bootstrap, small_topics, 2)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:  # the broker refuses any record over 1,000 bytes on the small requests' topic
        small = ConfigResource(ConfigResourceType.TOPIC, small_topics.triggers, configs={"max.message.bytes": "1000"})
        await admin.alter_configs([small])
    finally:
        await admin.close()
    appender = Appender(bootstrap, timeout_s=60)
    await appender.start()
    try:
        big = [(f"run-{i}".encode(), b"x" * 300, None) for i in range(100_000)]

        async def refused_soon(i: int) -> BaseException | None:
            await asyncio.sleep(0.01 * i)
            try:
                await appender.append(small_topics.triggers, [(b"run-x", b"y" * 5000, None)])
            except AppendFailed as exc:
                return exc
            return None

        outcomes = await asyncio.gather(appender.append(big_topics.triggers, big),
                                        *(refused_soon(i) for i in range(20)), return_exceptions=True)  # fmt: skip
    finally:
        await appender.stop()
    assert outcomes[0] is None, outcomes[0]  # the big request went through whole
    failures = outcomes[1:]
    assert all(isinstance(f, AppendFailed) for f in failures), failures
    for failure in failures:
        assert isinstance(failure, AppendFailed)
        assert failure.refused == [0] and failure.appended == [] and failure.unknown == [], failure
    assert await records_in(bootstrap, big_topics.triggers) == 100_000
    assert await records_in(bootstrap, small_topics.triggers) == 0
