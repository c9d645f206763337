"""runs.search_details: the text `q` finds besides a run's id and error message (record errors, upstream bodies).

Derived in SQL from the payloads in `run_events` (migration 0024: search_fold over search_pieces), never from the Python
objects: the live projector, the migration's backfill and a payload purge all read the same jsonb, so they give the
same text. A batch appends the pieces of its new events in seq order; search_fold is a left fold, so the same events
cut into other batches give the same text.
"""

from __future__ import annotations

import asyncpg

from schemas.events import EventBase

# The ledger events that add to a run's search text; search_pieces (migration 0024) reads the same two.
SEARCHED_TYPES = frozenset({"RecordFailed", "StepFailed"})

_APPEND = """
WITH folded AS MATERIALIZED (
    SELECT r.id, r.search_details AS before, search_fold(r.search_details, x.events) AS after
    FROM (
        SELECT e.run_id, array_agg(jsonb_build_object('type', e.type, 'payload', e.payload) ORDER BY e.seq) AS events
        FROM unnest($1::text[], $2::int[]) AS k(run_id, seq)
        JOIN run_events e ON e.run_id = k.run_id AND e.seq = k.seq
        GROUP BY e.run_id
    ) x
    JOIN runs r ON r.id = x.run_id
)
UPDATE runs r SET search_details = f.after
FROM folded f
WHERE r.id = f.id AND f.after IS DISTINCT FROM f.before  -- nothing new (a repeated error, a full text): no row version
"""

# The whole text again from the run's stored events: after a payload purge removed step outputs from them.
_RECOMPUTE = """
UPDATE runs r SET search_details = x.text
FROM (
    SELECT u.id, (
        SELECT search_fold(NULL, array_agg(jsonb_build_object('type', e.type, 'payload', e.payload) ORDER BY e.seq))
        FROM run_events e
        WHERE e.run_id = u.id AND e.type IN ('RecordFailed', 'StepFailed')
    ) AS text
    FROM unnest($1::text[]) AS u(id)
) x
WHERE r.id = x.id AND r.search_details IS DISTINCT FROM x.text
"""


async def append(conn: asyncpg.Connection, new_events: list[EventBase]) -> None:
    """In the batch's transaction, after its events are in run_events and its new runs in runs."""
    keys = [(e.run_id, e.seq) for e in new_events if e.type in SEARCHED_TYPES]
    if keys:
        await conn.execute(_APPEND, [k[0] for k in keys], [k[1] for k in keys])


async def recompute(conn: asyncpg.Connection, run_ids: list[str]) -> None:
    if run_ids:
        await conn.execute(_RECOMPUTE, run_ids)
