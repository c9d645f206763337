"""`flowtrail projector verify | rebuild` on the real broker and database, with a projector running."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg

from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Sandbox
from tests.e2e.stack import Stack
from tests.factories import produce, run_events

EVENTS_PER_RUN = 3 + 2 * 3 + 1  # run_events() with 3 steps


def _settings(sandbox: Sandbox) -> ProjectorSettings:
    return ProjectorSettings(
        kafka_bootstrap=sandbox.infra.kafka_bootstrap,
        database_url=sandbox.infra.database_url,
        database_schema=sandbox.schema,
        topic_prefix=sandbox.topics.prefix,
        batch_max_records=300,
    )


async def _wait_projected(db: asyncpg.Connection, records: int, stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM projector_offsets") < records:
        assert time.monotonic() < deadline, stack["projector"].log_tail()
        await asyncio.sleep(0.05)


async def test_verify_finds_tampered_runs_and_rebuild_repairs_them_while_projecting(
    sandbox: Sandbox, db: asyncpg.Connection, tmp_path: Path
) -> None:
    first = [e for i in range(300) for e in run_events(f"run_a{i:04d}", fail_at=1 if i % 7 == 0 else None)]
    await produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, first, sandbox.partitions)
    stack = Stack.build(sandbox, ("projector",), tmp_path)
    await stack.start()
    lines: list[str] = []
    try:
        await _wait_projected(db, len(first), stack)

        clean = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append)
        assert clean.comparison.equal, clean.comparison.tables
        assert clean.events == len(first)
        assert any("events/s" in line and "ETA" in line for line in lines)
        # verify leaves no shadow schema behind.
        assert (
            await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", f"{sandbox.schema}__rebuild") == 0
        )

        # Tamper with the read models the way a buggy projector would.
        await db.execute("UPDATE runs SET status = 'SUCCEEDED' WHERE id = 'run_a0007'")
        await db.execute("DELETE FROM run_steps WHERE run_id = 'run_a0010' AND step = 'step1'")
        tampered = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append)
        assert set(tampered.comparison.differing_tables) == {"runs", "run_steps"}
        assert tampered.comparison.differing_runs == ["run_a0007", "run_a0010"]

        # Rebuild while new runs keep arriving; the running projector must follow the swap.
        second = [e for i in range(300) for e in run_events(f"run_b{i:04d}")]
        producing = asyncio.create_task(
            produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, second, sandbox.partitions)
        )
        swapped = await rebuild.run(_settings(sandbox), swap=True, progress=lines.append)
        await producing
        assert swapped.swapped_to is not None
        assert set(swapped.comparison.differing_tables) == {"runs", "run_steps"}  # what it repaired

        await _wait_projected(db, len(first) + len(second), stack)
        # db's search_path names the schema, so it now reads the rebuilt one.
        assert await db.fetchval("SELECT status FROM runs WHERE id = 'run_a0007'") == "FAILED"
        assert await db.fetchval("SELECT count(*) FROM run_steps WHERE run_id = 'run_a0010'") == 3
        assert await db.fetchval("SELECT count(*) FROM run_events") == len(first) + len(second)
        assert await db.fetchval("SELECT count(*) FROM runs") == 600
        # The old schema is kept for inspection.
        assert await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", swapped.swapped_to) == 1

        after = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append)
        assert after.comparison.equal, after.comparison.differing_tables
    finally:
        stack.stop()
        if "swapped" in locals() and swapped.swapped_to:
            await db.execute(f'DROP SCHEMA IF EXISTS "{swapped.swapped_to}" CASCADE')
