"""`GET /v1/schedules` (docs/runs.md): the tenant's cron and interval flows with their next fire times (the
scheduler's own tick arithmetic, services/common/schedule.py), and the runs waiting for their `run_at`; pausing and
resuming a schedule, which pauses and resumes its flow (the scheduler fires nothing for a paused flow)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request

from services.api.models.launch import PendingRun, ScheduleEntry, SchedulesPage
from services.api.routes import FlowsWriter, Reader
from services.api.routes.flows import PauseRequest, pause_flow, resume_flow, schedule
from services.common.auth import Principal
from services.common.http import ApiError

router = APIRouter()

_SCHEDULES = """
SELECT f.id, f.name, f.status, f.latest_version, v.definition->'trigger' AS trigger,
       (SELECT max(r.created_at) FROM runs r WHERE r.tenant_id = f.tenant_id AND r.flow_id = f.id) AS last_run_at
FROM flows f
JOIN flow_versions v ON v.tenant_id = f.tenant_id AND v.flow_id = f.id AND v.version = f.latest_version
WHERE f.tenant_id = $1 AND f.environment = $2 AND v.definition->'trigger'->>'type' = 'schedule'
  AND ($3::text IS NULL OR f.id = $3)
ORDER BY f.id
"""
# A SCHEDULED run's time is in its RunScheduled event; a placeholder row (accepted, not yet requested) has none.
_PENDING = """
SELECT r.id, r.flow_id, r.created_at,
       (SELECT (e.payload->>'run_at')::timestamptz FROM run_events e
        WHERE e.run_id = r.id AND e.type = 'RunScheduled' ORDER BY e.seq DESC LIMIT 1) AS run_at
FROM runs r
WHERE r.tenant_id = $1 AND r.environment = $2 AND r.status = 'SCHEDULED' AND ($3::text IS NULL OR r.flow_id = $3)
ORDER BY run_at NULLS LAST, r.id
LIMIT $4
"""


def _entry(row: asyncpg.Record, now: datetime) -> ScheduleEntry:
    shown: dict[str, Any] = schedule(row["trigger"] or {}, now, active=row["status"] == "active") or {}
    return ScheduleEntry(flow_id=row["id"], flow_name=row["name"], status=row["status"],
                         latest_version=row["latest_version"], last_run_at=row["last_run_at"],
                         timezone=shown.get("timezone", "UTC"), cron=shown.get("cron"),
                         interval_s=shown.get("interval_s"), next_run_at=shown.get("next_run_at"))  # fmt: skip


@router.get("/v1/schedules")
async def list_schedules(
    request: Request,
    principal: Reader,
    flow_id: Annotated[str | None, Query(max_length=64, description="one flow's schedule and pending runs")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="most pending run_at runs answered, soonest first")] = 100,
) -> SchedulesPage:
    """Every cron and interval flow of the key's tenant and environment, with its next fire time (UTC; none while
    paused), and the runs triggered with `run_at` that are still SCHEDULED, soonest first."""
    pool = request.app.state.pool
    now = datetime.now(UTC)
    rows = await pool.fetch(_SCHEDULES, principal.tenant_id, principal.environment, flow_id)
    pending = await pool.fetch(_PENDING, principal.tenant_id, principal.environment, flow_id, limit)
    waiting = [PendingRun(run_id=p["id"], flow_id=p["flow_id"], run_at=p["run_at"], created_at=p["created_at"])
               for p in pending]  # fmt: skip
    return SchedulesPage(schedules=[_entry(r, now) for r in rows], pending_runs=waiting)


async def _scheduled(request: Request, principal: Principal, flow_id: str) -> ScheduleEntry:
    row = await request.app.state.pool.fetchrow(
        _SCHEDULES.replace("ORDER BY f.id", ""), principal.tenant_id, principal.environment, flow_id
    )
    if row is None:
        raise ApiError(404, "not_found", f"no flow with id {flow_id!r} and a cron or interval schedule")
    return _entry(row, datetime.now(UTC))


@router.post("/v1/schedules/{flow_id}/pause")
async def pause_schedule(
    flow_id: str, request: Request, principal: FlowsWriter, body: PauseRequest | None = None
) -> ScheduleEntry:
    """Stops the schedule's ticks by pausing its flow (`POST /v1/flows/{id}/pause`: its triggers are refused too
    while paused); idempotent. Answers the schedule as it now stands."""
    await _scheduled(request, principal, flow_id)
    await pause_flow(flow_id, request, principal, body)
    return await _scheduled(request, principal, flow_id)


@router.post("/v1/schedules/{flow_id}/resume")
async def resume_schedule(flow_id: str, request: Request, principal: FlowsWriter) -> ScheduleEntry:
    """Resumes the flow: the schedule fires from its next tick (ticks while paused are not caught up)."""
    await _scheduled(request, principal, flow_id)
    await resume_flow(flow_id, request, principal)
    return await _scheduled(request, principal, flow_id)
