"""GET /v1/runs, GET /v1/runs/{id}, GET /v1/runs/{id}/events (seeds 000-002)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Query, Request

from schemas.events import TriggerType
from schemas.status import parse_run_status
from services.api.adapters import runs as store
from services.common.auth import Principal, require_scope
from services.common.http import ApiError

router = APIRouter()

Reader = Annotated[Principal, Depends(require_scope("runs:read"))]
Many = Annotated[list[str] | None, Query()]


def _many(values: list[str] | None) -> list[str]:
    """Repeated or comma-separated: `?status=FAILED&status=PARTIAL` or `?status=FAILED,PARTIAL`."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _statuses(values: list[str]) -> list[str]:
    try:
        return sorted({parse_run_status(v).value for v in values})
    except ValueError as exc:
        raise ApiError(422, "validation_error", f"status: {exc}") from None


def _trigger_types(values: list[str]) -> list[str]:
    accepted = {t.value for t in TriggerType}
    unknown = [v for v in values if v.upper() not in accepted]
    if unknown:
        raise ApiError(
            422, "validation_error", f"trigger_type: unknown {unknown[0]!r}; accepted: {', '.join(sorted(accepted))}"
        )
    return [v.upper() for v in values]


def summary(row: asyncpg.Record) -> dict[str, Any]:
    return {name: row[name] for name in store.SUMMARY_COLUMNS}


@router.get("/v1/runs")
async def list_runs(
    request: Request,
    principal: Reader,
    flow_id: Many = None,
    status: Many = None,
    trigger_type: Many = None,
    ids: Many = None,
    tags: Many = None,
    failed_step: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: datetime | None = None,
    include_archived: bool = False,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Runs newest first. `next_cursor` pages to older runs, `prev_cursor` back to newer ones."""
    if from_ is not None and created_after is not None:
        raise ApiError(422, "validation_error", "from: give `from` or `created_after`, not both")
    if to is not None and created_before is not None:
        raise ApiError(422, "validation_error", "to: give `to` or `created_before`, not both")
    flt = store.RunFilter(
        tenant_id=principal.tenant_id,
        environment=principal.environment,
        flow_ids=_many(flow_id),
        statuses=_statuses(_many(status)),
        trigger_types=_trigger_types(_many(trigger_type)),
        ids=_many(ids),
        tags=_many(tags),
        failed_step=failed_step,
        created_after=_utc(from_ or created_after),
        created_before=_utc(to or created_before),
        include_archived=include_archived,
    )
    try:
        position = store.Cursor.decode(cursor) if cursor else None
    except store.CursorError as exc:
        raise ApiError(400, "invalid_request", f"cursor: {exc}") from None
    page = await store.list_runs(request.app.state.pool, flt, limit, position)
    return {"data": [summary(r) for r in page.rows], "next_cursor": page.next_cursor, "prev_cursor": page.prev_cursor}


def _step(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "name": row["step"],
        "position": row["position"],
        "action": row["action"],
        "status": row["status"],
        "attempt": row["attempt"],
        "input": row["input"],
        "output": row["output"],
        "error": row["error"],
        "assertions": row["assertions"] or [],
        "extractions": row["extractions"] or {},
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "duration_ms": row["duration_ms"],
    }


async def _run_or_404(request: Request, principal: Principal, run_id: str) -> asyncpg.Record:
    row = await store.get_run(request.app.state.pool, principal.tenant_id, principal.environment, run_id)
    if row is None:
        raise ApiError(404, "not_found", f"no run with id {run_id!r}")
    return row


@router.get("/v1/runs/{run_id}")
async def get_run(run_id: str, request: Request, principal: Reader) -> dict[str, Any]:
    """One run: its summary, what triggered it, its error and every step with input, output and duration."""
    row = await _run_or_404(request, principal, run_id)
    steps = await store.get_steps(request.app.state.pool, run_id)
    return {
        **summary(row),
        "trigger": {"type": row["trigger_type"], "caller": row["caller"], "payload": row["trigger_payload"]},
        "error": row["error"],
        "steps": [_step(s) for s in steps],
    }


@router.get("/v1/runs/{run_id}/events")
async def get_run_events(
    run_id: str,
    request: Request,
    principal: Reader,
    after_seq: Annotated[int, Query(ge=-1)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> dict[str, Any]:
    """The run's own ledger in `seq` order; page with `after_seq` = the last `seq` seen."""
    await _run_or_404(request, principal, run_id)
    rows = await store.get_events(request.app.state.pool, run_id, after_seq, limit)
    data = [
        {
            "seq": r["seq"],
            "event_id": r["event_id"],
            "type": r["type"],
            "occurred_at": r["occurred_at"],
            "causation_id": r["causation_id"],
            "payload": r["payload"],
        }
        for r in rows
    ]
    return {"data": data, "has_more": len(rows) == limit}
