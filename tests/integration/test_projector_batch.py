"""One batch with redelivered events and a forged event reusing a seq, applied to the real database."""

from __future__ import annotations

import asyncpg

from services.projector.adapters.store import Positioned, apply_batch
from tests.factories import run_events


async def test_duplicates_in_a_batch_count_once_and_the_first_in_log_order_wins(db: asyncpg.Connection) -> None:
    events = run_events("run-1", steps=3)
    # seq 4 is step0's StepSucceeded; an impostor with the same seq must not replace it.
    impostor = events[4].model_copy(update={"event_id": "other", "payload": events[4].payload.model_copy(
        update={"output": {"forged": True}})})  # fmt: skip
    batch = [*events[:6], *events[2:6], impostor, *events[6:], events[-1]]
    result = await apply_batch(db, "g", [Positioned("ledger", 0, offset, e) for offset, e in enumerate(batch)])
    assert (result.events, result.duplicates) == (len(batch), len(batch) - len(events))

    assert await db.fetchval("SELECT count(*) FROM run_events") == len(events)
    assert await db.fetchval("SELECT event_id FROM run_events WHERE seq = 4") == events[4].event_id
    run = await db.fetchrow("SELECT status, steps_count, last_seq FROM runs WHERE id = 'run-1'")
    assert (run["status"], run["steps_count"], run["last_seq"]) == ("SUCCEEDED", 3, len(events) - 1)
    assert await db.fetchval("SELECT output FROM run_steps WHERE step = 'step0'") == {"i": 0, "ok": True}
    assert await db.fetchval("SELECT count(*) FROM step_attempts") == 3
    # Applying the same batch again changes nothing, and the offset only moves forward.
    again = await apply_batch(db, "g", [Positioned("ledger", 0, offset, e) for offset, e in enumerate(batch)])
    assert again.duplicates == len(batch)
    assert await db.fetchval("SELECT steps_count FROM runs") == 3
    assert await db.fetchval("SELECT next_offset FROM projector_offsets") == len(batch)
