"""`POST /v1/runs/{run_id}/resume` (docs/runs.md): a PAUSED run's pending human-input request answered, or a
STOPPED (CANCELED) run continued from where it stopped — by the two actions that already do each: the answer to
`/resume/{request_id}` and a FROM_FAILED_STEP retry, which reuses every step that succeeded."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Request
from fastapi.routing import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from schemas.events import RetryStrategy
from schemas.status import RunStatus
from services.api.models.launch import ResumeAccepted
from services.api.routes import RunsWriter as Writer
from services.api.routes import found
from services.api.routes.actions import RetryBody, resume, retry
from services.common.http import ApiError

router = APIRouter()


class ResumeBody(BaseModel):
    """Optional. `input`: a PAUSED run's answer to its human_input step (that step's output)."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["resume"] = "resume"
    input: Any = Field(default=None, description="a PAUSED run's answer to its pending request")


@router.post("/v1/runs/{run_id}/resume", status_code=202)
async def resume_run(
    request: Request, principal: Writer, run_id: str, body: ResumeBody | None = None
) -> ResumeAccepted:
    """PAUSED: answers the pending human_input request (the run's `waiting_for`) with `input`. STOPPED (CANCELED):
    a new run of the same version and input, linked by `retry_of`, that reuses every step that succeeded and runs
    the rest (`POST /v1/runs/{id}/retry` with FROM_FAILED_STEP). Any other status: 409."""
    pool = request.app.state.pool
    row = await pool.fetchrow(
        "SELECT status, (SELECT e.payload->>'request_id' FROM run_events e WHERE e.run_id = r.id "
        "AND e.type = 'RunPaused' ORDER BY e.seq DESC LIMIT 1) AS waiting "
        "FROM runs r WHERE r.tenant_id = $1 AND r.environment = $2 AND r.id = $3",
        principal.tenant_id, principal.environment, run_id,
    )  # fmt: skip
    status = found(row, "run", run_id)["status"]
    if status == RunStatus.PAUSED.value and row["waiting"] is not None:
        answered = await resume(request, principal, run_id, row["waiting"], (body or ResumeBody()).input)
        return ResumeAccepted(run_id=run_id, status="RESUME_REQUESTED", resumed="human_input",
                              request_id=answered.request_id)  # fmt: skip
    if status == RunStatus.PAUSED.value:
        raise ApiError(409, "conflict", "the run is pausing and its request is not recorded yet; retry in a moment")
    if body is not None and body.input is not None:
        raise ApiError(422, "validation_error", f"input: only a PAUSED run takes an answer; the run is {status}")
    if status == RunStatus.CANCELED.value:
        continued = await retry(request, principal, run_id, RetryBody(strategy=RetryStrategy.FROM_FAILED_STEP))
        return ResumeAccepted(run_id=continued.run_id, status="QUEUED", resumed="continued", resumed_from=run_id)
    hint = "retry it (POST /v1/runs/{id}/retry)" if status in _RETRY_INSTEAD else "only PAUSED and STOPPED runs resume"
    raise ApiError(409, "conflict", f"the run is {status}, not paused or stopped: {hint}")


_RETRY_INSTEAD = {s.value for s in (RunStatus.FAILED, RunStatus.PARTIAL, RunStatus.TIMED_OUT,
                                    RunStatus.INTERNAL_ERROR, RunStatus.QUOTA_EXCEEDED)}  # fmt: skip
