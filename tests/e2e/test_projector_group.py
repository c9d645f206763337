"""Two projector processes in one consumer group share the ledger partitions; when one dies the other
takes its partitions over from the offsets stored in PostgreSQL, and every event is projected once."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import httpx

from services.common.kafka import topic_partitions
from tests.conftest import Infra, make_sandbox
from tests.e2e.stack import Service, Stack
from tests.factories import produce, run_events
from tests.harness import wait_sql, wait_until

EVENTS_PER_RUN = 3 + 2 * 3 + 1


async def _assigned(service: Service) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{service.url}/metrics")).text
    match = re.search(r"^flowtrail_projector_assigned_partitions (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


async def _wait(db: asyncpg.Connection, sql: str, expected: int, services: list[Service]) -> None:
    await wait_sql(
        db, f"SELECT ({sql}) = $1", expected, within=60, logs=lambda: "\n".join(s.log_tail() for s in services)
    )


async def test_two_projectors_share_partitions_and_survive_one_dying(infra: Infra, tmp_path: Path) -> None:
    async with make_sandbox(infra, partitions=4) as sandbox:
        db = await asyncpg.connect(infra.database_url, server_settings={"search_path": sandbox.schema})
        stack = Stack.build(sandbox, ("projector",), tmp_path)
        first, second = stack["projector"], stack.add("projector", "projector-2")
        try:
            await stack.start()
            known = await topic_partitions(infra.kafka_bootstrap, [sandbox.topics.ledger, sandbox.topics.flows])
            total = sum(len(p) for p in known.values())

            async def split() -> bool:
                shares = (await _assigned(first), await _assigned(second))
                return min(shares) > 0 and sum(shares) == total

            await wait_until(split, 30, "the group splitting the partitions", every=0.1)

            batch1 = [e for i in range(800) for e in run_events(f"run_x{i:04d}")]
            await produce(infra.kafka_bootstrap, sandbox.topics.ledger, batch1, sandbox.partitions)
            await _wait(db, "SELECT count(*) FROM run_events", len(batch1), [first, second])
            # Both processes wrote: the partitions of each are in projector_offsets.
            assert await db.fetchval("SELECT count(DISTINCT partition) FROM projector_offsets") == 4

            first.kill()
            batch2 = [e for i in range(800) for e in run_events(f"run_y{i:04d}")]
            await produce(infra.kafka_bootstrap, sandbox.topics.ledger, batch2, sandbox.partitions)
            await _wait(db, "SELECT count(*) FROM run_events", len(batch1) + len(batch2), [second])

            async def took_over() -> bool:
                return await _assigned(second) == total

            await wait_until(took_over, 30, "the survivor taking every partition", every=0.1, logs=second.log_tail)
            assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'SUCCEEDED'") == 1600
            # steps_count is an increment: an event applied twice would show here.
            assert await db.fetchval("SELECT count(*) FROM runs WHERE steps_count <> 3") == 0
        finally:
            stack.stop()
            await db.close()
