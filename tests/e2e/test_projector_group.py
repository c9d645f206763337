"""Two projector processes in one consumer group share the ledger partitions; when one dies the other
takes its partitions over from the offsets stored in PostgreSQL, and every event is projected once."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx

from services.common.kafka import topic_partitions
from tests.conftest import Infra, make_sandbox
from tests.e2e.stack import Service, Stack, free_port
from tests.factories import produce, run_events

EVENTS_PER_RUN = 3 + 2 * 3 + 1


async def _assigned(service: Service) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{service.url}/metrics")).text
    match = re.search(r"^flowtrail_projector_assigned_partitions (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


async def _wait(db: asyncpg.Connection, sql: str, expected: int, services: list[Service]) -> None:
    deadline = time.monotonic() + 60
    while await db.fetchval(sql) != expected:
        assert time.monotonic() < deadline, "\n".join(s.log_tail() for s in services)
        await asyncio.sleep(0.05)


async def test_two_projectors_share_partitions_and_survive_one_dying(infra: Infra, tmp_path: Path) -> None:
    async with make_sandbox(infra, partitions=4) as sandbox:
        db = await asyncpg.connect(infra.database_url, server_settings={"search_path": sandbox.schema})
        stack = Stack.build(sandbox, ("projector",), tmp_path)
        first = stack["projector"]
        port = free_port()
        second = replace(first, port=port, env={**first.env, "FLOWTRAIL_PROJECTOR_HTTP_PORT": str(port)},
                         log_path=tmp_path / "projector-2.log", process=None)  # fmt: skip
        try:
            first.start()
            second.start()
            await asyncio.gather(first.wait_healthy(), second.wait_healthy())
            known = await topic_partitions(infra.kafka_bootstrap, [sandbox.topics.ledger, sandbox.topics.flows])
            total = sum(len(p) for p in known.values())
            deadline = time.monotonic() + 30
            while True:
                shares = (await _assigned(first), await _assigned(second))
                if min(shares) > 0 and sum(shares) == total:
                    break
                assert time.monotonic() < deadline, f"the group never split the partitions: {shares}"
                await asyncio.sleep(0.1)

            batch1 = [e for i in range(800) for e in run_events(f"run_x{i:04d}")]
            await produce(infra.kafka_bootstrap, sandbox.topics.ledger, batch1, sandbox.partitions)
            await _wait(db, "SELECT count(*) FROM run_events", len(batch1), [first, second])
            # Both processes wrote: the partitions of each are in projector_offsets.
            assert await db.fetchval("SELECT count(DISTINCT partition) FROM projector_offsets") == 4

            first.kill()
            batch2 = [e for i in range(800) for e in run_events(f"run_y{i:04d}")]
            await produce(infra.kafka_bootstrap, sandbox.topics.ledger, batch2, sandbox.partitions)
            await _wait(db, "SELECT count(*) FROM run_events", len(batch1) + len(batch2), [second])
            deadline = time.monotonic() + 30
            while await _assigned(second) != total:
                assert time.monotonic() < deadline, second.log_tail()
                await asyncio.sleep(0.1)
            assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'SUCCEEDED'") == 1600
            # steps_count is an increment: an event applied twice would show here.
            assert await db.fetchval("SELECT count(*) FROM runs WHERE steps_count <> 3") == 0
        finally:
            first.stop()
            second.stop()
            await db.close()
