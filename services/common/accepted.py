"""A run exists from the moment it is accepted (invariant 9): the `runs` row an edge writes right after its triggers
are durable in Kafka, before it answers 202.

The row says what is known at acceptance — QUEUED (SCHEDULED for `run_at`), the accepted time as `created_at`, the
trigger — and carries `last_seq = -1`: it is a placeholder for the row the projector derives from the run's
`RunRequested` (seq 0), which replaces it whole. Placeholders are not derived from the ledger, so `verify` leaves
them out of its comparison and a rebuild carries over those still waiting for their first event.

Writing one is best effort: the run is durable in Kafka already, so a failure here (PostgreSQL away) is logged and
the request still answers 202; the run appears when the projector reaches it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from schemas.events import TriggerReceived

log = logging.getLogger(__name__)

PLACEHOLDER_SEQ = -1

_INSERT = """
INSERT INTO runs (id, tenant_id, flow_id, flow_version, flow_name, status, environment, execution_mode, trigger_type,
                  caller, trigger_payload, tags, parent_run_id, retry_of, retry_strategy, created_at, updated_at,
                  last_seq)
SELECT u.id, $2, $3, $4, COALESCE(f.name, ''), $5, $6, $7, $8, $9, u.payload::jsonb, COALESCE(f.tags, '{}'), $10,
       u.retry_of, $11, $12, $12, -1
FROM unnest($1::text[], $13::text[], $14::text[]) AS u(id, payload, retry_of)
LEFT JOIN flows f ON f.tenant_id = $2 AND f.id = $3
ON CONFLICT (id) DO NOTHING
"""


async def record_accepted(
    pool: asyncpg.Pool, template: TriggerReceived, run_ids: Sequence[str], payloads: Sequence[Any],
    *, flow_version: int, retry_of: Sequence[str | None] | None = None,
) -> None:  # fmt: skip
    """Placeholder rows for runs accepted with `template` (one per run id and trigger payload)."""
    status = "SCHEDULED" if template.run_at is not None else "QUEUED"
    texts = [orjson.dumps(p).decode() for p in payloads]
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                _INSERT, list(run_ids), template.tenant_id, template.flow_id, flow_version, status,
                template.environment.value, template.execution_mode.value, template.trigger.type.value,
                template.trigger.caller, template.parent_run_id,
                template.retry_strategy.value if template.retry_strategy else None, template.received_at, texts,
                list(retry_of) if retry_of is not None else [None] * len(run_ids),
            )  # fmt: skip
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.warning("runs accepted but not yet visible (%d): %r; the projector will show them", len(run_ids), exc)


async def record_accepted_triggers(pool: asyncpg.Pool, triggers: Sequence[TriggerReceived]) -> None:
    """The same for triggers built one by one (retries, scheduled ticks), grouped by what they share."""
    groups: dict[tuple[Any, ...], list[TriggerReceived]] = {}
    for t in triggers:
        key = (t.tenant_id, t.flow_id, t.flow_version, t.environment, t.execution_mode, t.trigger.type,
               t.trigger.caller, t.parent_run_id, t.retry_strategy, t.run_at is not None)  # fmt: skip
        groups.setdefault(key, []).append(t)
    for group in groups.values():
        first = group[0]
        await record_accepted(
            pool, first, [t.run_id for t in group], [t.trigger.payload for t in group],
            flow_version=first.flow_version or 0, retry_of=[t.retry_of for t in group],
        )  # fmt: skip
