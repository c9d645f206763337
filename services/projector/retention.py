"""Retention: drop runs past their tenant's retention, blank payload bodies past the payload retention.

Only read-model rows change; the ledger topic is never touched. Each purge records its marks per
tenant, and a rebuild applies the same marks to the replayed schema, so the two compare equal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from schemas.status import TERMINAL_RUN_STATUSES

log = logging.getLogger(__name__)

_TERMINAL = sorted(s.value for s in TERMINAL_RUN_STATUSES)
# Rows that hang off a run; deleted with it.
_CHILD_TABLES = ("run_steps", "step_attempts", "run_events", "run_logs", "record_errors")


@dataclass(frozen=True)
class Marks:
    tenant_id: str
    runs_before: datetime
    payloads_before: datetime


@dataclass(frozen=True)
class PurgeResult:
    runs_deleted: int
    payloads_blanked: int


async def marks_for(conn: asyncpg.Connection, now: datetime) -> list[Marks]:
    rows = await conn.fetch("SELECT id, retention_days, payload_retention_days FROM tenants ORDER BY id")
    return [
        Marks(r["id"], now - timedelta(days=r["retention_days"]), now - timedelta(days=r["payload_retention_days"]))
        for r in rows
    ]


async def recorded_marks(conn: asyncpg.Connection) -> list[Marks]:
    rows = await conn.fetch("SELECT tenant_id, runs_before, payloads_before FROM retention_marks ORDER BY tenant_id")
    return [Marks(r["tenant_id"], r["runs_before"], r["payloads_before"]) for r in rows]


async def apply_marks(conn: asyncpg.Connection, marks: list[Marks], *, record: bool = True) -> PurgeResult:
    """Purge by the given marks in one transaction. Unfinished runs are never touched."""
    deleted = blanked = 0
    async with conn.transaction():
        for m in marks:
            ids = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM runs WHERE tenant_id = $1 AND created_at < $2 AND status = ANY($3::text[])",
                    m.tenant_id,
                    m.runs_before,
                    _TERMINAL,
                )
            ]
            if ids:
                for table in _CHILD_TABLES:
                    await conn.execute(f"DELETE FROM {table} WHERE run_id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM runs WHERE id = ANY($1::text[])", ids)
                deleted += len(ids)
            blanked += await _blank_payloads(conn, m)
            if record:
                await conn.execute(
                    """
                    INSERT INTO retention_marks (tenant_id, runs_before, payloads_before, purged_at)
                    VALUES ($1, $2, $3, now())
                    ON CONFLICT (tenant_id) DO UPDATE SET
                        runs_before = GREATEST(retention_marks.runs_before, EXCLUDED.runs_before),
                        payloads_before = GREATEST(retention_marks.payloads_before, EXCLUDED.payloads_before),
                        purged_at = now()
                    """,
                    m.tenant_id, m.runs_before, m.payloads_before,
                )  # fmt: skip
    return PurgeResult(deleted, blanked)


async def _blank_payloads(conn: asyncpg.Connection, m: Marks) -> int:
    ids = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM runs WHERE tenant_id = $1 AND created_at < $2 AND status = ANY($3::text[]) "
            "AND NOT payloads_purged",
            m.tenant_id,
            m.payloads_before,
            _TERMINAL,
        )
    ]
    if not ids:
        return 0
    await conn.execute("UPDATE runs SET trigger_payload = NULL, payloads_purged = true WHERE id = ANY($1::text[])", ids)
    await conn.execute("UPDATE run_steps SET input = NULL, output = NULL WHERE run_id = ANY($1::text[])", ids)
    await conn.execute("UPDATE step_attempts SET input = NULL WHERE run_id = ANY($1::text[])", ids)
    # The per-run copy of the ledger keeps its events, minus the bodies.
    await conn.execute(
        """
        UPDATE run_events SET payload = CASE type
            WHEN 'RunRequested' THEN payload #- '{trigger,payload}'
            ELSE payload - 'input' - 'output' END
        WHERE run_id = ANY($1::text[]) AND type IN ('RunRequested', 'StepStarted', 'StepSucceeded', 'StepFailed')
        """,
        ids,
    )
    return len(ids)


async def purge(conn: asyncpg.Connection, now: datetime) -> PurgeResult:
    """Apply every tenant's retention as of `now` and record the marks."""
    # One purger at a time per schema, however many projector processes run.
    locked = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('flowtrail-retention:' || current_schema()))")
    if not locked:
        return PurgeResult(0, 0)
    try:
        result = await apply_marks(conn, await marks_for(conn, now))
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('flowtrail-retention:' || current_schema()))")
    if result.runs_deleted or result.payloads_blanked:
        log.info("retention: deleted %d runs, blanked payloads of %d", result.runs_deleted, result.payloads_blanked)
    return result
