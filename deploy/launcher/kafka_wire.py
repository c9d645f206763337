"""Is a Kafka broker answering? One Metadata round trip through aiokafka's own client, callable from plain code.

The launcher asks it while it waits for a broker it started, and `flowtrail status` asks it; both are synchronous,
so the probe runs on an event loop of its own (in a thread when the caller already runs one). aiokafka negotiates the
API version with the broker, so the probe keeps working across Kafka releases.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

T = TypeVar("T")
_CLIENT_ID = "flowtrail-launcher"


async def _broker_ids(bootstrap: str, limit_s: float) -> set[int] | None:
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id=_CLIENT_ID, request_timeout_ms=int(limit_s * 1000))
    try:
        async with asyncio.timeout(limit_s):
            await client.bootstrap()
        return {broker.nodeId for broker in client.cluster.brokers()}
    except (KafkaError, OSError, TimeoutError):
        return None
    finally:
        await client.close()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # the caller's loop is busy: another thread
        return pool.submit(asyncio.run, coro).result()


def broker_ids(bootstrap: str, timeout: float = 2.0) -> set[int] | None:
    """The node ids a Metadata request to `bootstrap` lists (live, unfenced brokers); None when no Kafka answers."""
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # "unable to bootstrap" is the expected answer while a broker starts
    try:
        return run_sync(_broker_ids(bootstrap, timeout))
    finally:
        quiet.setLevel(level)


def kafka_broker_count(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> int | None:
    """How many brokers a Metadata request to ``host:port`` lists; None when no Kafka answers there."""
    ids = broker_ids(f"{host}:{port}", timeout)
    return None if ids is None else len(ids)


def kafka_answers(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True when a Kafka broker on ``host:port`` answers Metadata and lists at least one (ready) broker."""
    count = kafka_broker_count(port, host, timeout)
    return count is not None and count > 0
