"""Retention: drop runs past their tenant's retention, blank payload bodies past the payload retention.

Only read-model rows change; the ledger topic is never touched. Each purge records its marks per
tenant, and a rebuild applies the same marks to the replayed schema, so the two compare equal. The periods are each
tenant's own, set through the operator API (docs/tenants.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from schemas.status import TERMINAL_RUN_STATUSES
from services.projector.adapters import search

log = logging.getLogger(__name__)

# Redeliveries come within minutes of the original append (executor recovery), never weeks later.
TOMBSTONE_DAYS = timedelta(days=7)
_TERMINAL = sorted(s.value for s in TERMINAL_RUN_STATUSES)
# Rows that hang off a run; deleted with it.
_CHILD_TABLES = ("run_steps", "step_attempts", "run_events", "run_logs", "record_errors")
# Runs deleted, and runs blanked, per transaction: the projector's batches wait for one purge batch at most, however
# far a tenant's retention was shortened.
BATCH_RUNS = 1000


@dataclass(frozen=True)
class Marks:
    tenant_id: str
    runs_before: datetime
    payloads_before: datetime


@dataclass(frozen=True)
class PurgeResult:
    runs_deleted: int
    payloads_blanked: int


def plan(periods: Iterable[tuple[str, int, int]], now: datetime) -> list[Marks]:
    """The marks a purge at `now` applies, from each tenant's (id, metadata days, payload days)."""
    return [
        Marks(tenant, now - timedelta(days=runs), now - timedelta(days=payloads)) for tenant, runs, payloads in periods
    ]


async def marks_for(conn: asyncpg.Connection, now: datetime) -> list[Marks]:
    rows = await conn.fetch("SELECT id, retention_days, payload_retention_days FROM tenants ORDER BY id")
    return plan(((r["id"], r["retention_days"], r["payload_retention_days"]) for r in rows), now)


async def recorded_marks(conn: asyncpg.Connection) -> list[Marks]:
    rows = await conn.fetch("SELECT tenant_id, runs_before, payloads_before FROM retention_marks ORDER BY tenant_id")
    return [Marks(r["tenant_id"], r["runs_before"], r["payloads_before"]) for r in rows]


async def apply_marks(
    conn: asyncpg.Connection, marks: list[Marks], *, record: bool = True, batch: int = BATCH_RUNS
) -> PurgeResult:
    """Purge by the given marks, each tenant's in transactions of at most `batch` runs deleted and `batch` blanked.
    A tenant's mark is recorded with its last batch, the one that found fewer than `batch` runs left under it, so
    the recorded marks always describe a finished purge. Unfinished runs are never touched."""
    deleted = blanked = 0
    for m in marks:
        done = False
        while not done:
            async with conn.transaction():
                if record:
                    # Projector batches hold this lock shared: none can slip a run past the purge while it runs.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext('flowtrail-projector:' || current_schema()))"
                    )
                ids = await _ids(conn, "tenant_id = $1 AND created_at < $2", m.tenant_id, m.runs_before, limit=batch)
                deleted += await _delete(conn, ids)
                ids_blanked = await _ids(conn, "tenant_id = $1 AND created_at < $2 AND NOT payloads_purged",
                                         m.tenant_id, m.payloads_before, limit=batch)  # fmt: skip
                blanked += await _blank(conn, ids_blanked)
                done = len(ids) < batch and len(ids_blanked) < batch
                if not (done and record):
                    continue
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


async def enforce_marks(conn: asyncpg.Connection, run_ids: list[str]) -> None:
    """Inside a projector batch: runs it just finished that the recorded marks already cover are purged now,
    so a run finishing (or arriving) after a purge ends up as if it had been there for it."""
    if not run_ids:
        return
    marks = {m.tenant_id: m for m in await recorded_marks(conn)}
    if not marks:
        return
    rows = await conn.fetch(
        "SELECT id, tenant_id, created_at, status, payloads_purged FROM runs WHERE id = ANY($1::text[])", run_ids
    )
    expired, blank = [], []
    for r in rows:
        m = marks.get(r["tenant_id"])
        if m is None or r["status"] not in _TERMINAL:
            continue
        if r["created_at"] < m.runs_before:
            expired.append(r["id"])
        elif r["created_at"] < m.payloads_before and not r["payloads_purged"]:
            blank.append(r["id"])
    await _delete(conn, expired)
    await _blank(conn, blank)


async def _ids(conn: asyncpg.Connection, where: str, *args: object, limit: int) -> list[str]:
    n = len(args) + 1
    rows = await conn.fetch(
        f"SELECT id FROM runs WHERE {where} AND status = ANY(${n}::text[]) LIMIT ${n + 1}", *args, _TERMINAL, limit
    )
    return [r["id"] for r in rows]


async def _delete(conn: asyncpg.Connection, ids: list[str]) -> int:
    if not ids:
        return 0
    await conn.execute(
        "INSERT INTO purged_runs (run_id, last_seq) SELECT id, last_seq FROM runs WHERE id = ANY($1::text[]) "
        "ON CONFLICT (run_id) DO UPDATE SET last_seq = GREATEST(purged_runs.last_seq, EXCLUDED.last_seq)",
        ids,
    )
    for table in _CHILD_TABLES:
        await conn.execute(f"DELETE FROM {table} WHERE run_id = ANY($1::text[])", ids)
    await conn.execute("DELETE FROM runs WHERE id = ANY($1::text[])", ids)
    return len(ids)


async def _blank(conn: asyncpg.Connection, ids: list[str]) -> int:
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
    # The search text held previews of those outputs (upstream bodies): derived again from what is left.
    await search.recompute(conn, ids)
    return len(ids)


async def purge(conn: asyncpg.Connection, now: datetime) -> PurgeResult:
    """Apply every tenant's retention as of `now` and record the marks."""
    # One purger at a time per schema, however many projector processes run.
    locked = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('flowtrail-retention:' || current_schema()))")
    if not locked:
        return PurgeResult(0, 0)
    try:
        result = await apply_marks(conn, await marks_for(conn, now))
        await conn.execute("DELETE FROM purged_runs WHERE purged_at < $1", now - TOMBSTONE_DAYS)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('flowtrail-retention:' || current_schema()))")
    if result.runs_deleted or result.payloads_blanked:
        log.info("retention: deleted %d runs, blanked payloads of %d", result.runs_deleted, result.payloads_blanked)
    return result
