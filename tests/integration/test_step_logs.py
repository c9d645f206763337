"""Migration 0023 fills, for rows projected before it, what the projector now derives from the same events: the
INFO line of every step start, success and skip (run_logs), each attempt's output (step_attempts) and a skipped
step's reason (run_steps). Its SQL repeats services/projector/details.py step_log's messages; this test holds them
equal, so `flowtrail projector verify` finds a migrated database equal to a rebuild."""

from __future__ import annotations

import itertools

import asyncpg

from services.common.migrate import MIGRATIONS_DIR
from services.projector import rebuild
from tests.integration.test_projector_batch_splits import _ledger, _project

MIGRATION = MIGRATIONS_DIR / "0023_step_anatomy.sql"
TABLES = ("run_logs", "step_attempts", "run_steps")


async def test_the_backfill_writes_what_the_projector_derives(db: asyncpg.Connection) -> None:
    ledger = _ledger()
    offset = itertools.count()
    await _project(db, [[(next(offset), e) for e in ledger]])
    schema = await db.fetchval("SELECT current_schema()")
    projected = await rebuild.checksums(db, schema)
    derived = await db.fetchval("SELECT count(*) FROM run_logs WHERE level = 'INFO' AND message LIKE 'step %'")
    assert derived > 40

    # The tables as a projector before this change left them: no derived lines, no attempt outputs, no reasons.
    await db.execute("""
        DELETE FROM run_logs l USING run_events e
        WHERE e.run_id = l.run_id AND e.seq = l.seq AND e.type IN ('StepStarted', 'StepSucceeded', 'StepSkipped')
    """)
    await db.execute("UPDATE step_attempts SET output = NULL")
    await db.execute("UPDATE run_steps SET reason = NULL")
    emptied = await rebuild.checksums(db, schema)
    assert all(emptied[t] != projected[t] for t in TABLES)

    await db.execute(MIGRATION.read_text())
    migrated = await rebuild.checksums(db, schema)
    assert {t: migrated[t] for t in TABLES} == {t: projected[t] for t in TABLES}
    assert migrated == projected
