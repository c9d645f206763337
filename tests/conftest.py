"""Session fixtures: one real Kafka broker and one real PostgreSQL per test session, a schema and topic set per test.

Both are started (or reused when already running) by the same launcher `flowtrail up` uses. A test
that needs them fails when they cannot be started; nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from schemas.topics import Topics
from services.common.db import connect
from services.common.kafka import ensure_topics
from services.common.migrate import migrate
from services.common.settings import REPO_ROOT
from tests.redis_server import RedisServer, redis_server

STATE_DIR = Path(os.environ.get("FLOWTRAIL_STATE_DIR", REPO_ROOT / ".state"))


@dataclass(frozen=True)
class Infra:
    kafka_bootstrap: str
    database_url: str
    state_dir: Path


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    from deploy.launcher.kafka import ensure_kafka, ensure_kafka_jars
    from deploy.launcher.postgres import ensure_postgres

    external_kafka = os.environ.get("FLOWTRAIL_KAFKA_BOOTSTRAP")
    external_db = os.environ.get("FLOWTRAIL_DATABASE_URL")
    kafka = pg = None
    if not external_kafka:
        ensure_kafka_jars(STATE_DIR)
        kafka = ensure_kafka(STATE_DIR)
    if not external_db:
        pg = ensure_postgres(STATE_DIR)
    try:
        yield Infra(
            kafka_bootstrap=external_kafka or kafka.bootstrap,  # type: ignore[union-attr]
            database_url=external_db or pg.dsn,  # type: ignore[union-attr]
            state_dir=STATE_DIR,
        )
    finally:
        if kafka is not None:
            kafka.stop()
        if pg is not None:
            pg.stop()


@dataclass(frozen=True)
class Sandbox:
    """One test's own PostgreSQL schema and Kafka topic set on the shared broker and database."""

    infra: Infra
    schema: str
    topics: Topics
    partitions: int

    def env(self) -> dict[str, str]:
        """Environment for a Flowtrail service process pointed at this sandbox."""
        return {
            "FLOWTRAIL_STATE_DIR": str(self.infra.state_dir),
            "FLOWTRAIL_KAFKA_BOOTSTRAP": self.infra.kafka_bootstrap,
            "FLOWTRAIL_DATABASE_URL": self.infra.database_url,
            "FLOWTRAIL_DATABASE_SCHEMA": self.schema,
            "FLOWTRAIL_TOPIC_PREFIX": self.topics.prefix,
            "FLOWTRAIL_PARTITIONS": str(self.partitions),
        }


@asynccontextmanager
async def make_sandbox(infra: Infra, partitions: int = 2) -> AsyncIterator[Sandbox]:
    name = "t" + uuid.uuid4().hex[:10]
    topics = Topics(prefix=f"test.{name}")
    conn = await asyncpg.connect(infra.database_url)
    try:
        await migrate(conn, name)
    finally:
        await conn.close()
    await ensure_topics(infra.kafka_bootstrap, topics, partitions)
    try:
        yield Sandbox(infra=infra, schema=name, topics=topics, partitions=partitions)
    finally:
        conn = await asyncpg.connect(infra.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def sandbox(infra: Infra) -> AsyncIterator[Sandbox]:
    async with make_sandbox(infra) as box:
        yield box


@pytest.fixture
async def db(sandbox: Sandbox) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(sandbox.infra.database_url, sandbox.schema)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    """A real redis-server on a loopback port for the session (tests/redis_server.py)."""
    with redis_server() as server:
        yield server
