"""A projector killed with SIGKILL in the middle of a backlog loses and duplicates nothing after restart."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from tests.conftest import Sandbox
from tests.e2e.stack import Stack
from tests.factories import produce, run_events
from tests.harness import wait_sql

RUNS = 1500
STEPS = 3
EVENTS_PER_RUN = 3 + 2 * STEPS + 1


async def _count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM run_events"))


async def test_sigkill_mid_batch_then_restart_projects_every_event_once(
    sandbox: Sandbox, db: asyncpg.Connection, tmp_path: Path
) -> None:
    events = [e for i in range(RUNS) for e in run_events(f"run{i:05d}", steps=STEPS)]
    # The executor may append an event twice (at-least-once): the first in log order wins.
    redelivered = events[: 3 * EVENTS_PER_RUN]
    await produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, events + redelivered, sandbox.partitions)
    total = len(events)

    stack = Stack.build(sandbox, ("projector",), tmp_path, FLOWTRAIL_PROJECTOR_BATCH_MAX_RECORDS="200")
    await stack.start()
    projector = stack["projector"]
    try:
        # Polled often: the kill must land inside the backlog.
        projected = await wait_sql(
            db, "SELECT count(*) FROM run_events", within=60, logs=projector.log_tail, every=0.005
        )
        projector.kill()
        at_kill = await _count(db)
        assert 0 < at_kill < total, f"kill landed outside the backlog ({projected=}, {at_kill=}, {total=})"

        projector.start()
        await projector.wait_healthy()
        succeeded = "SELECT count(*) >= $1 FROM runs WHERE status = 'SUCCEEDED'"
        await wait_sql(db, succeeded, RUNS, within=90, logs=projector.log_tail)
        # Let it drain the redelivered tail too before counting.
        drained = "SELECT coalesce(sum(next_offset), 0) >= $1 FROM projector_offsets"
        await wait_sql(db, drained, total + len(redelivered), within=90, logs=projector.log_tail)
    finally:
        stack.stop()

    assert await _count(db) == total
    assert await db.fetchval("SELECT count(*) FROM runs") == RUNS
    # steps_count is incremented per StepStarted: applying any event twice would show here.
    bad = await db.fetch("SELECT id, steps_count, last_seq FROM runs WHERE steps_count <> $1 OR last_seq <> $2",
                         STEPS, EVENTS_PER_RUN - 1)  # fmt: skip
    assert not bad, f"runs with wrong counters: {[dict(r) for r in bad[:5]]}"
    assert await db.fetchval("SELECT count(*) FROM run_steps WHERE status = 'SUCCEEDED'") == RUNS * STEPS
    gaps = await db.fetchval(
        "SELECT count(*) FROM (SELECT run_id FROM run_events GROUP BY run_id HAVING max(seq) + 1 <> count(*)) g"
    )
    assert gaps == 0
