"""Accepting triggers (docs/intake.md): one input or many become run requests on the triggers topic, the same way at
ingest's port and at the API's (docs/decisions.md, "One trigger intake at both base URLs").

`accept` is the whole behaviour — the flow looked up in the key's tenant and environment, limits, run ids (derived
from an Idempotency-Key when there is one), the append, the placeholder rows, the 202 or the live result — and
`TriggerIntake` is what a service hands it: how to append, its limits and its metrics. The routes over it are in
services/common/trigger_routes.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from schemas import codec
from schemas.events import CursorWindow, ExecutionMode, TriggerInfo, TriggerReceived, TriggerType, new_run_id
from schemas.flows import Environment
from schemas.status import TERMINAL_RUN_STATUSES
from services.common.accepted import record_accepted
from services.common.appender import AppendFailed
from services.common.auth import Principal
from services.common.contract import INT32_MAX, AnyCase, Timestamp
from services.common.http import ApiError
from services.common.idempotency import derived_run_ids, idempotency_key
from services.common.trigger_origin import trigger_origin
from services.common.windows import SINCE, SYNCS

Mode = Literal["live", "async", "schedule"]


class TriggerRequest(BaseModel):
    """`input` for one run (any mode), `inputs` for up to 100,000 runs (async and schedule)."""

    model_config = ConfigDict(extra="forbid")

    # Any case: the launch document (docs/origins.md) writes LIVE and ASYNC.
    mode: Annotated[Mode, AnyCase] = "async"
    input: Any = None
    inputs: list[Any] | None = None
    flow_version: int | None = Field(default=None, ge=1, le=INT32_MAX)
    # Run later: the run waits as SCHEDULED until this time (RFC 3339 with an offset), then queues like any other.
    run_at: Timestamp | None = None

    @model_validator(mode="after")
    def _one_of(self) -> TriggerRequest:
        check_inputs(self.input, self.inputs)
        if self.inputs is not None and self.mode == "live":
            raise ValueError("`inputs` is for async and schedule modes; live mode takes one `input`")
        if self.run_at is not None and self.mode == "live":
            raise ValueError("`run_at` is for async and schedule modes; a live request waits for the result now")
        return self


def check_inputs(input: Any, inputs: list[Any] | None) -> None:
    """A body's `input` or `inputs`: not both, and `inputs` not empty (ValueError, a 422 naming it, otherwise)."""
    if inputs is not None and input is not None:
        raise ValueError("send either `input` or `inputs`, not both")
    if inputs is not None and not inputs:
        raise ValueError("`inputs` must hold at least one input")


class TriggerAccepted(BaseModel):
    """202: one run accepted (QUEUED, or SCHEDULED for `run_at`), visible at `GET /v1/runs/{run_id}` from now on."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    status: Literal["QUEUED", "SCHEDULED"]


class BatchAccepted(BaseModel):
    """202: every input accepted, one run each, in input order."""

    model_config = ConfigDict(extra="forbid")

    run_ids: list[str]
    count: int


class LiveResult(BaseModel):
    """Live mode: 200 with the final status (output only on success; the failing step's own output labelled), or 202
    with the current status (`waiting_for` while PAUSED) when the live timeout passed first."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    status: str
    output: Any = None
    error: Any = None
    failed_step: str | None = None
    failed_step_output: Any = None
    waiting_for: Any = None
    duration_ms: float | None = None


class TriggerAnswer(RootModel[TriggerAccepted | BatchAccepted | LiveResult]):
    """What the trigger route answers: one run accepted, a batch accepted, or (live mode) the run's result."""


class LaunchAccepted(RootModel[TriggerAccepted | BatchAccepted]):
    """What an async launch answers: one run accepted, or a batch accepted."""


Append = Callable[[list[tuple[str, bytes]]], Awaitable[None]]


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class TriggerIntake:
    """What a service gives `accept`: `append` (run id, encoded TriggerReceived) pairs durably to the triggers topic
    (AppendFailed otherwise), the limits
    (`max_record_bytes`: the largest Kafka record the appender builds) and the metrics hooks."""

    append: Append
    max_batch_inputs: int
    max_input_bytes: int
    max_record_bytes: int
    live_timeout_s: float
    on_appended: Callable[[str, int, float], None] = field(default=_nothing)  # mode, runs, seconds
    on_append_failed: Callable[[], None] = field(default=_nothing)


@dataclass(frozen=True)
class Answer:
    """What `accept` answers: the body and its status (202 accepted; 200 a live run's final status)."""

    body: dict[str, Any]
    status: int


# The flow and, in the same round trip, what its cursor window needs (docs/runs.md): whether the version a trigger
# runs ($4, else the latest) syncs records and where the flow's last window ended (services/common/windows.py).
_FLOW = f"""
SELECT f.id, f.status, f.latest_version, w.syncs, w.since
FROM flows f
LEFT JOIN LATERAL (
    SELECT true AS syncs, {SINCE} AS since
    FROM flow_versions v
    WHERE v.tenant_id = $1 AND v.flow_id = $2 AND v.version = coalesce($4::int, f.latest_version) AND {SYNCS}
) AS w ON true
WHERE f.tenant_id = $1 AND f.id = $2 AND f.environment = $3
"""


async def find_flow(
    pool: asyncpg.Pool, principal: Principal, flow_id: str, version: int | None = None
) -> asyncpg.Record:
    """The flow a trigger names, in the key's tenant and environment (a TESTING key must not run a PRODUCTION flow's
    steps, nor the reverse): 404 when there is none, 409 while it is paused. With it, in the same statement, the
    cursor window's start for `version` (the latest when None), which `accept` reads."""
    return usable(await lookup_flow(pool, principal, flow_id, version), flow_id)


async def lookup_flow(
    pool: asyncpg.Pool, principal: Principal, flow_id: str, version: int | None = None
) -> asyncpg.Record | None:
    """`find_flow`'s row, None when the key's tenant and environment have no such flow."""
    return await pool.fetchrow(_FLOW, principal.tenant_id, flow_id, principal.environment, version)


def usable(flow: asyncpg.Record | None, flow_id: str) -> asyncpg.Record:
    """The flow found, unless there is none (404) or it is paused (409)."""
    if flow is None:
        raise ApiError(404, "not_found", f"no flow with id {flow_id!r}")
    if flow["status"] == "paused":
        raise ApiError(409, "conflict", f"flow {flow_id!r} is paused; resume it before triggering runs")
    return flow


async def accept(
    intake: TriggerIntake,
    pool: asyncpg.Pool,
    principal: Principal,
    flow: asyncpg.Record,
    body: TriggerRequest,
    headers: list[tuple[bytes, bytes]],
) -> Answer:
    """One run request per input appended to the triggers topic, their placeholder rows written, then the answer."""
    flow_id = flow["id"]
    if body.flow_version is not None and body.flow_version > flow["latest_version"]:
        raise ApiError(404, "not_found", f"flow {flow_id!r} has no version {body.flow_version}")
    inputs = body.inputs if body.inputs is not None else [body.input]
    if len(inputs) > intake.max_batch_inputs:
        raise ApiError(422, "validation_error", f"inputs: at most {intake.max_batch_inputs} per request")
    origin = await trigger_origin(pool, principal, headers)  # manual, and a parent run (docs/intake.md)
    trigger_type = TriggerType.SCHEDULE if body.mode == "schedule" else origin.type
    version = body.flow_version or flow["latest_version"]
    # The window's start was read with the flow (find_flow, for the version asked for); it ends now.
    window = CursorWindow(updated_since=flow["since"], updated_until=datetime.now(UTC)) if flow["syncs"] else None
    template = TriggerReceived(
        tenant_id=principal.tenant_id,
        run_id="",
        flow_id=flow_id,
        flow_version=body.flow_version,
        trigger=TriggerInfo(type=trigger_type, caller=principal.key_id, caller_name=origin.caller_name),
        environment=Environment(principal.environment),
        execution_mode=ExecutionMode(body.mode),
        run_at=body.run_at,
        cursor_window=window,
        parent_run_id=origin.parent_run_id,
        fail_parent_on_failure=origin.fail_parent_on_failure,
    )
    key = idempotency_key(headers)
    if key is None:
        run_ids = [new_run_id() for _ in inputs]
    else:  # a retry of this request names the same runs: the executor starts each once (invariant 9)
        run_ids = derived_run_ids(principal.tenant_id, principal.environment, key, len(inputs))
    records = list(zip(run_ids, codec.dumps_triggers(template, run_ids, inputs), strict=True))
    _refuse_oversize(records, template, body.inputs is not None, intake)
    started = time.perf_counter()
    try:
        await intake.append(records)
    except AppendFailed as exc:
        intake.on_append_failed()
        raise _incomplete(exc, len(records), keyed=key is not None) from exc
    elapsed = time.perf_counter() - started
    # Visible from the 202 on (invariant 9): QUEUED or SCHEDULED with the accepted time, until the projector's row.
    await record_accepted(pool, template, run_ids, inputs, flow_version=version)
    intake.on_appended(body.mode, len(records), elapsed)
    if body.inputs is not None:
        return Answer({"run_ids": run_ids, "count": len(run_ids)}, 202)
    run_id = run_ids[0]
    if body.mode != "live":
        return Answer({"run_id": run_id, "status": "SCHEDULED" if body.run_at is not None else "QUEUED"}, 202)
    result = await wait_final(pool, principal.tenant_id, run_id, intake.live_timeout_s)
    return Answer(result, 200 if result["status"] in _TERMINAL else 202)


_TERMINAL = {s.value for s in TERMINAL_RUN_STATUSES}
_SUCCEEDED = {"SUCCEEDED", "PARTIAL"}


def _refuse_oversize(
    records: list[tuple[str, bytes]], template: TriggerReceived, batch: bool, intake: TriggerIntake
) -> None:
    """413 before anything reaches Kafka: an input over the per-input limit, or whose run request would not fit one
    Kafka message. Named by its index, so the client knows which one to fix."""
    envelope = len(codec.dumps_triggers(template, [records[0][0]], [None])[0]) - len(b"null")
    limit = min(intake.max_input_bytes, intake.max_record_bytes - envelope - len(records[0][0]))
    for index, (_, value) in enumerate(records):
        size = len(value) - envelope
        if size > limit:
            where = f"inputs[{index}]" if batch else "input"
            raise ApiError(413, "payload_too_large",
                           f"{where} is {size:,} bytes as JSON; the limit is {limit:,} bytes per input. "
                           "Nothing was appended.", details={"index": index, "size": size, "limit": limit})  # fmt: skip


def _incomplete(exc: AppendFailed, total: int, *, keyed: bool) -> ApiError:
    """503 with Retry-After, saying exactly what reached the log, so the client knows what a retry does."""
    details = {"appended": len(exc.appended), "refused": len(exc.refused), "unknown": len(exc.unknown),
               "appended_indexes": exc.appended, "unknown_indexes": exc.unknown}  # fmt: skip
    if exc.nothing_appended:
        message = f"Kafka could not take the request ({exc.reason}); nothing was appended: it is safe to retry"
    else:
        message = (
            f"the request was appended only in part: {len(exc.appended):,} of {total:,} inputs are durable, "
            f"{len(exc.refused):,} were refused and {len(exc.unknown):,} are unknown ({exc.reason}). "
        )
        message += (
            "Retry with the same Idempotency-Key: the retry names the same run ids and each run is created once."
            if keyed
            else "This request had no Idempotency-Key, so retrying it whole would run the appended inputs again: "
            "resend only the inputs not listed in details.appended_indexes, with an Idempotency-Key."
        )
    return ApiError(503, "kafka_unavailable", message, headers={"Retry-After": "2"}, details=details)


async def wait_final(pool: asyncpg.Pool, tenant_id: str, run_id: str, timeout_s: float) -> dict[str, Any]:
    """Live mode: poll the read model until the run is final or paused, or the timeout passes.

    A run that succeeded (or partly) answers its output — that of its last step that succeeded. A run that ended
    otherwise answers no output: its error, the step that failed and that step's own output (`failed_step_output`,
    an upstream's error body, say), never an earlier step's result. A paused run answers at once with `waiting_for`
    (the human_input request to answer)."""
    deadline = time.monotonic() + timeout_s
    status = "QUEUED"
    delay = 0.01
    while time.monotonic() < deadline:
        row = await pool.fetchrow(
            "SELECT status, error, duration_ms, failed_step FROM runs WHERE tenant_id = $1 AND id = $2",
            tenant_id, run_id,
        )  # fmt: skip
        if row is not None:
            status = row["status"]
            if status in _SUCCEEDED:
                output = await pool.fetchval(
                    "SELECT output FROM run_steps WHERE run_id = $1 AND status = 'SUCCEEDED' "
                    "ORDER BY position DESC LIMIT 1",
                    run_id,
                )
                return {"run_id": run_id, "status": status, "output": output, "error": row["error"],
                        "duration_ms": row["duration_ms"]}  # fmt: skip
            if status in _TERMINAL:
                failed_output = None
                if row["failed_step"] is not None:
                    failed_output = await pool.fetchval(
                        "SELECT output FROM run_steps WHERE run_id = $1 AND step = $2", run_id, row["failed_step"]
                    )
                return {"run_id": run_id, "status": status, "output": None, "error": row["error"],
                        "failed_step": row["failed_step"], "failed_step_output": failed_output,
                        "duration_ms": row["duration_ms"]}  # fmt: skip
            if status == "PAUSED":
                waiting = await pool.fetchval(
                    "SELECT payload FROM run_events WHERE run_id = $1 AND type = 'RunPaused' ORDER BY seq DESC LIMIT 1",
                    run_id,
                )
                if waiting is not None:
                    return {"run_id": run_id, "status": status, "waiting_for": waiting}
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
    return {"run_id": run_id, "status": status}
