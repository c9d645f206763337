"""One batch with redelivered events and a forged event reusing a seq, applied to the real database."""

from __future__ import annotations

import asyncpg
import pytest

from services.projector.adapters.store import Positioned, SchemaGuard, SchemaSwapped, apply_batch, schema_oid
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


async def test_a_batch_on_a_schema_a_rebuild_replaced_writes_nothing_and_leaves_no_transaction(
    db: asyncpg.Connection,
) -> None:
    schema = await db.fetchval("SELECT current_schema()")
    batch = [Positioned("ledger", 0, offset, e) for offset, e in enumerate(run_events("run-1", steps=2))]
    stale = SchemaGuard(schema, await schema_oid(db, schema) + 1)  # the oid the schema had before a swap
    with pytest.raises(SchemaSwapped):
        await apply_batch(db, "g", batch, stale)
    assert not db.is_in_transaction()
    assert await db.fetchval("SELECT count(*) FROM run_events") == 0
    assert await db.fetchval("SELECT count(*) FROM projector_offsets") == 0
    # The same batch under the schema's own guard is applied whole.
    current = SchemaGuard(schema, await schema_oid(db, schema))
    assert (await apply_batch(db, "g", batch, current)).events == len(batch)
    assert await db.fetchval("SELECT status FROM runs WHERE id = 'run-1'") == "SUCCEEDED"


@pytest.mark.parametrize("group", ["g'; DROP TABLE runs; --", "back\\slash", "quote''s", "naïve-ü"])
async def test_offsets_are_stored_under_the_consumer_group_exactly_as_named(db: asyncpg.Connection, group: str) -> None:
    """The offsets travel with the COMMIT as literals: any group name is stored as given, and runs nothing."""
    events = run_events("run-1", steps=1)
    await apply_batch(db, group, [Positioned("ledger-topic", 2, 40 + i, e) for i, e in enumerate(events)])
    stored = await db.fetch("SELECT consumer_group, topic, partition, next_offset FROM projector_offsets")
    assert [tuple(r) for r in stored] == [(group, "ledger-topic", 2, 40 + len(events))]
    assert await db.fetchval("SELECT count(*) FROM runs") == 1


async def test_a_batch_overlapping_what_is_stored_adds_only_its_new_events(db: asyncpg.Connection) -> None:
    """A batch is first written as if every event were new; when some were stored before (a redelivery after a
    crash), it is undone and written again from the new ones: the rows are as if each event came once."""
    events = run_events("run-1", steps=3)
    first = await apply_batch(db, "g", [Positioned("ledger", 0, i, e) for i, e in enumerate(events[:5])])
    assert (first.events, first.duplicates) == (5, 0)
    again = await apply_batch(db, "g", [Positioned("ledger", 0, i, e) for i, e in enumerate(events) if i >= 3])
    assert (again.events, again.duplicates) == (len(events) - 3, 2)
    run = await db.fetchrow("SELECT status, steps_count, last_seq FROM runs WHERE id = 'run-1'")
    assert (run["status"], run["steps_count"], run["last_seq"]) == ("SUCCEEDED", 3, len(events) - 1)
    assert await db.fetchval("SELECT count(*) FROM run_events") == len(events)
    assert await db.fetchval("SELECT count(*) FROM step_attempts") == 3
    assert await db.fetchval("SELECT sum(runs) FROM flow_hourly") == 1  # the finished run is counted once
    assert not db.is_in_transaction()
