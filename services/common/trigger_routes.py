"""The routes that start runs, served by ingest and the API alike (docs/decisions.md, "One trigger intake at both
base URLs"): `POST /v1/flows/{flow_id}/trigger` and the launch API's `POST /v1/actions/{action_name}/async|live`
(docs/runs.md). Each app puts its `TriggerIntake` (services/common/triggering.py) on `app.state.intake`.
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.auth import Principal, require_scope
from services.common.contract import INT32_MAX, Timestamp
from services.common.http import ApiError, OrjsonResponse
from services.common.triggering import (
    LaunchAccepted,
    LiveResult,
    TriggerAnswer,
    TriggerIntake,
    TriggerRequest,
    accept,
    check_inputs,
    find_flow,
    lookup_flow,
    usable,
)

router = APIRouter()

Writer = Annotated[Principal, Depends(require_scope("runs:write"))]
_LIVE: dict[int | str, dict[str, Any]] = {
    200: {"model": LiveResult, "description": "live mode: the run's final status"}
}


async def _accept(request: Request, principal: Principal, flow: asyncpg.Record, body: TriggerRequest) -> OrjsonResponse:
    intake: TriggerIntake = request.app.state.intake
    answer = await accept(intake, request.app.state.pool, principal, flow, body, request.scope["headers"])
    return OrjsonResponse(answer.body, status_code=answer.status)


@router.post(
    "/v1/flows/{flow_id}/trigger", status_code=202, response_model=TriggerAnswer,
    responses=_LIVE,
)  # fmt: skip
async def trigger_flow(flow_id: str, body: TriggerRequest, request: Request, principal: Writer) -> OrjsonResponse:
    """One run per input: `input` (any mode) or `inputs` (up to 100,000; async and schedule modes)."""
    flow = await find_flow(request.app.state.pool, principal, flow_id, body.flow_version)
    return await _accept(request, principal, flow, body)


# ---------------------------------------------------------------- the launch API: actions by name


class AsyncAction(BaseModel):
    """`input` for one run, or `inputs` for up to 100,000; `run_at` runs them later (SCHEDULED until then)."""

    model_config = ConfigDict(extra="forbid")

    input: Any = None
    inputs: list[Any] | None = None
    flow_version: int | None = Field(default=None, ge=1, le=INT32_MAX)
    run_at: Timestamp | None = None

    @model_validator(mode="after")
    def _one_of(self) -> AsyncAction:
        check_inputs(self.input, self.inputs)
        return self


class LiveAction(BaseModel):
    """One `input`; the answer waits for the run's result."""

    model_config = ConfigDict(extra="forbid")

    input: Any = None
    flow_version: int | None = Field(default=None, ge=1, le=INT32_MAX)


ActionName = Annotated[str, Path(description="a flow's id, or the `action_name` its latest version declares")]


async def find_action(
    pool: asyncpg.Pool, principal: Principal, name: str, version: int | None = None
) -> asyncpg.Record:
    """The flow launched as `name`: the flow with that id, else the one whose latest version declares it as its
    `action_name` (docs/flows.md); 404 when none, 409 when several declare it or the flow is paused. As `find_flow`,
    with what the cursor window of `version` (the latest when None) needs."""
    by_id = await lookup_flow(pool, principal, name, version)
    if by_id is not None:
        return usable(by_id, name)
    named = await pool.fetch(
        "SELECT f.id FROM flows f JOIN flow_versions v ON v.tenant_id = f.tenant_id AND v.flow_id = f.id "
        "AND v.version = f.latest_version WHERE f.tenant_id = $1 AND f.environment = $2 "
        "AND v.definition->>'action_name' = $3 ORDER BY f.id LIMIT 5",
        principal.tenant_id, principal.environment, name,
    )  # fmt: skip
    if not named:
        raise ApiError(404, "not_found", f"no flow with id or action_name {name!r}")
    if len(named) > 1:
        ids = ", ".join(repr(r["id"]) for r in named)
        raise ApiError(409, "conflict", f"action_name {name!r} is declared by several flows ({ids}); launch one "
                       "by its id")  # fmt: skip
    return await find_flow(pool, principal, named[0]["id"], version)


@router.post(
    "/v1/actions/{action_name}/async", status_code=202, response_model=LaunchAccepted,
)  # fmt: skip
async def launch_async(
    action_name: ActionName, body: AsyncAction, request: Request, principal: Writer
) -> OrjsonResponse:
    """Start one run per input and answer at once (202), as `POST /v1/flows/{id}/trigger` in async mode."""
    flow = await find_action(request.app.state.pool, principal, action_name, body.flow_version)
    trigger = TriggerRequest.model_construct(mode="async", **body.model_dump(exclude_unset=True))
    return await _accept(request, principal, flow, trigger)


_TIMED_OUT: dict[int | str, dict[str, Any]] = {
    202: {"model": LiveResult, "description": "the live timeout passed first: the current status"}
}


@router.post("/v1/actions/{action_name}/live", status_code=200, response_model=LiveResult, responses=_TIMED_OUT)
async def launch_live(action_name: ActionName, body: LiveAction, request: Request, principal: Writer) -> OrjsonResponse:
    """Start one run and wait for its result: 200 with the final status (the output on success, the error and the
    failing step's own output otherwise), or 202 with the current one — `waiting_for` while PAUSED — when the live
    timeout passes first."""
    flow = await find_action(request.app.state.pool, principal, action_name, body.flow_version)
    trigger = TriggerRequest.model_construct(mode="live", **body.model_dump(exclude_unset=True))
    return await _accept(request, principal, flow, trigger)
