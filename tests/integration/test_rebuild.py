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
        # Key by key, with the columns that differ and both values, or the side a row is missing from.
        (status,) = tampered.comparison.rows["runs"].first
        assert (status.key, status.columns) == ({"run_id": "run_a0007"}, ("status",))
        assert (status.live, status.rebuilt) == ({"status": "SUCCEEDED"}, {"status": "FAILED"})
        (step,) = tampered.comparison.rows["run_steps"].first
        assert (step.key, step.only_in, tampered.comparison.rows["run_steps"].rows) == (
            {"run_id": "run_a0010", "step": "step1"}, "rebuilt", 1,
        )  # fmt: skip
        report = rebuild.describe(tampered.comparison)
        assert 'run_id=run_a0007: status live="SUCCEEDED" rebuilt="FAILED"' in report
        assert "run_id=run_a0010 step=step1: missing from the live tables" in report
        # The keys listed are capped; the count is not.
        await db.execute("UPDATE step_attempts SET duration_ms = 7 WHERE run_id BETWEEN 'run_a0001' AND 'run_a0004'")
        capped = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append, show=3)
        attempts = capped.comparison.rows["step_attempts"]
        assert attempts.rows == 4 * 3 and len(attempts.first) == 3
        assert [d.key for d in attempts.first] == [
            {"run_id": "run_a0001", "step": f"step{i}", "attempt": "1"} for i in range(3)
        ]
        assert {d.columns for d in attempts.first} == {("duration_ms",)}
        assert "step_attempts: 12 row(s) differ (first 3 in key order)" in rebuild.describe(capped.comparison)

        # Rebuild while new runs keep arriving; the running projector must follow the swap.
        second = [e for i in range(300) for e in run_events(f"run_b{i:04d}")]
        producing = asyncio.create_task(
            produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, second, sandbox.partitions)
        )
        swapped = await rebuild.run(_settings(sandbox), swap=True, progress=lines.append)
        await producing
        assert swapped.swapped_to is not None
        assert set(swapped.comparison.differing_tables) == {"runs", "run_steps", "step_attempts"}  # what it repaired

        await _wait_projected(db, len(first) + len(second), stack)
        # db's search_path names the schema, so it now reads the rebuilt one.
        assert await db.fetchval("SELECT status FROM runs WHERE id = 'run_a0007'") == "FAILED"
        assert await db.fetchval("SELECT count(*) FROM run_steps WHERE run_id = 'run_a0010'") == 3
        assert await db.fetchval("SELECT count(*) FROM run_events") == len(first) + len(second)
        assert await db.fetchval("SELECT count(*) FROM runs") == 600
        # The old schema is kept for inspection.
        assert await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", swapped.swapped_to) == 1

        # verify while the projector keeps projecting: the live rows are read as of the snapshot its offsets
        # came from, so runs that change during the replay do not show as differences.
        third = [e for i in range(300) for e in run_events(f"run_c{i:04d}", fail_at=0 if i % 5 == 0 else None)]
        producing = asyncio.create_task(
            produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, third, sandbox.partitions)
        )
        after = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append)
        await producing
        assert after.comparison.equal, rebuild.describe(after.comparison)
    finally:
        stack.stop()
        if "swapped" in locals() and swapped.swapped_to:
            await db.execute(f'DROP SCHEMA IF EXISTS "{swapped.swapped_to}" CASCADE')
