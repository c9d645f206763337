"""Run actions leave the API as records: commands (cancel, resume, archive) on the commands topic and retries
as new run requests on the triggers topic, each keyed by run id so it reaches the executor owning that run.

The API never writes the ledger (invariant 2): the executor turns these into ledger events, or ignores one
that no longer applies (a cancel for a run that ended meanwhile).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from schemas import codec
from schemas.events import CommandBase, TriggerReceived
from schemas.topics import Topics, partition_for
from services.common.accepted import record_accepted_triggers
from services.common.appender import Appender


class CommandLog:
    """On the shared Appender: started on first use (the API serves reads while Kafka is unreachable), rebuilt
    after any failed append, and bounded in time (FLOWTRAIL_KAFKA_APPEND_TIMEOUT_S)."""

    def __init__(self, bootstrap: str, topics: Topics, partitions: int, *, max_message_bytes: int = 1_000_000,
                 timeout_s: float = 10.0, pool: asyncpg.Pool | None = None) -> None:  # fmt: skip
        self.pool = pool
        self.topics = topics
        self.partitions = partitions
        self.appender = Appender(bootstrap, linger_ms=0, max_message_bytes=max_message_bytes, timeout_s=timeout_s,
                                 client_id="flowtrail-api")  # fmt: skip

    async def stop(self) -> None:
        await self.appender.stop()

    async def send_commands(self, commands: Sequence[CommandBase]) -> None:
        """Returns once every command is durable in Kafka; raises AppendFailed otherwise."""
        await self._send(self.topics.commands, [(c.run_id, codec.dumps(c)) for c in commands])

    async def send_triggers(self, triggers: Sequence[TriggerReceived]) -> None:
        """Returns once every run request is durable in Kafka, and visible as QUEUED (a retry answers 202 with its run
        id: invariant 9); raises AppendFailed otherwise."""
        await self._send(self.topics.triggers, [(t.run_id, codec.dumps(t)) for t in triggers])
        if self.pool is not None:
            await record_accepted_triggers(self.pool, triggers)

    async def _send(self, topic: str, records: list[tuple[str, bytes]]) -> None:
        await self.appender.append(
            topic, [(run_id.encode(), value, partition_for(run_id, self.partitions)) for run_id, value in records]
        )
