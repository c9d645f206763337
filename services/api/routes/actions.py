"""Run actions (docs/runs.md): retry, cancel, resume a paused run, archive — one run or many with a bulk filter.

Each action is checked against the read model (the run exists for this tenant and environment, and is in a
status the action applies to) and sent as a record the executor acts on (adapters.commands). The answer is
202: the executor records the effect in the ledger moments later, and a run may have moved on meanwhile, in
which case the executor ignores the action (a cancel that arrives after the run ended changes nothing).
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Body, Request, Response
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field

from schemas.events import (
    ArchiveRun,
    CancelRun,
    CommandBase,
    CursorWindow,
    ExecutionMode,
    ResumeRun,
    RetryStrategy,
    TriggerInfo,
    TriggerReceived,
    TriggerType,
    new_run_id,
)
from schemas.flows import Environment
from schemas.status import TERMINAL_RUN_STATUSES, RunStatus, parse_run_statuses
from services.api.adapters import runs as store
from services.api.adapters.commands import CommandLog
from services.api.models.runs import ActionAccepted, AlreadyArchived, BulkResult, RetryAccepted
from services.api.retry import Reuse, plan_reuse
from services.api.routes import RunsWriter as Writer
from services.api.routes import found
from services.api.routes.runs import summary
from services.common.auth import Principal
from services.common.contract import Timestamp
from services.common.http import ApiError, answer
from services.common.idempotency import derived_run_ids, idempotency_key

router = APIRouter()

_TERMINAL = {s.value for s in TERMINAL_RUN_STATUSES}
# Cancel applies to runs that have not ended; retry to runs that ended without succeeding (a rerun of a
# successful run is ON_LATEST_VERSION); archive to runs that ended.
_CANCELABLE = {s.value for s in RunStatus} - _TERMINAL - {RunStatus.CREATED.value}
_RETRYABLE = {s.value for s in (RunStatus.FAILED, RunStatus.PARTIAL, RunStatus.TIMED_OUT, RunStatus.CANCELED,
                                RunStatus.INTERNAL_ERROR, RunStatus.QUOTA_EXCEEDED)}  # fmt: skip
BULK_MAX = 10_000
SAMPLE = 10


def _log(request: Request) -> CommandLog:
    return request.app.state.command_log  # type: ignore[no-any-return]


async def _run(request: Request, principal: Principal, run_id: str) -> asyncpg.Record:
    # Every column: a retry needs the payload, the cursor window and whether retention purged the payload.
    row = await request.app.state.pool.fetchrow(
        "SELECT * FROM runs WHERE tenant_id = $1 AND environment = $2 AND id = $3",
        principal.tenant_id, principal.environment, run_id,
    )  # fmt: skip
    return found(row, "run", run_id)


# ---------------------------------------------------------------- bodies


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CancelBody(Strict):
    reason: str = Field(default="", max_length=500)


class RetryBody(Strict):
    strategy: RetryStrategy = RetryStrategy.FROM_FAILED_STEP


def _listed(value: Any) -> Any:
    """One value where a list is expected (`"uid": "run_1"`, `"statuses": "FAILED"`) is a list of one."""
    return [value] if isinstance(value, str) else value


def _names(*names: str) -> AliasChoices:
    """A field's own name, then the product documents' names for it (docs/api-contract.md); the OpenAPI shows the
    first."""
    return AliasChoices(*names)


Listed = BeforeValidator(_listed)


class BulkBody(Strict):
    """The bulk filter (docs/api-contract.md). `ids`, when given, selects exactly those runs and the other filters
    are ignored. The GET /v1/runs aliases are accepted too (`flowId`, `action_name`, `status`, `failedStepName`,
    ...)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    ids: Annotated[list[Annotated[str, Field(max_length=200)]] | None, Listed] = Field(
        default=None, max_length=BULK_MAX, validation_alias=_names("ids", "ids[]", "uid")
    )
    exclude_ids: Annotated[list[Annotated[str, Field(max_length=200)]], Listed] = Field(
        default_factory=list, max_length=BULK_MAX, validation_alias=_names("exclude_ids", "excludeIds")
    )
    flow_id: str | list[str] | None = Field(default=None, validation_alias=_names("flow_id", "flowId", "action_name"))
    statuses: Annotated[list[str], Listed] = Field(
        default_factory=list, max_length=100, validation_alias=_names("statuses", "status", "status[]")
    )
    failed_step: str | None = Field(default=None, validation_alias=_names("failed_step", "failedStepName"))
    caller: str | None = Field(default=None, validation_alias=_names("caller", "user_uid"))
    created_after: Timestamp | None = Field(default=None, validation_alias=_names("created_after", "createdAfter"))
    created_before: Timestamp | None = Field(default=None, validation_alias=_names("created_before", "createdBefore"))
    # Bulk actions reach archived runs unless told not to.
    include_archived: bool = Field(default=True, validation_alias=_names("include_archived", "includeArchived"))
    # `workspace_uid`, `projectId` (docs/api-contract.md): must name the key's own tenant (403 otherwise).
    tenant_id: str | None = Field(default=None, validation_alias=_names("tenant_id", "workspace_uid", "projectId"))
    dry_run: bool = Field(default=False, validation_alias=_names("dry_run", "dryRun"))


_DRY_RUN: dict[int | str, dict[str, Any]] = {200: {"model": BulkResult, "description": "a dry run: nothing changed"}}


class BulkCancelBody(BulkBody):
    reason: str = Field(default="", max_length=500)


class BulkRetryBody(BulkBody):
    strategy: RetryStrategy = RetryStrategy.FROM_FAILED_STEP


# ---------------------------------------------------------------- retry: a new run linked by retry_of


@dataclass
class _Retry:
    trigger: TriggerReceived | None
    skipped: str | None = None


def _retry_run_id(request: Request, principal: Principal, retried: str) -> str:
    """A fresh id, or with an Idempotency-Key one derived from it and the retried run: a request retried after a
    partial failure names the same new runs, and the executor starts each once (docs/intake.md)."""
    key = idempotency_key(request.scope["headers"])
    if key is None:
        return new_run_id()
    return derived_run_ids(principal.tenant_id, principal.environment, f"{key}\x1fretry\x1f{retried}", 1)[0]


async def _plan_retry(
    conn: asyncpg.Connection,
    principal: Principal,
    run: asyncpg.Record,
    strategy: RetryStrategy,
    bulk_id: str | None,
    run_id: str,
) -> _Retry:
    """The run request of a retry, or why this run cannot be retried."""
    if run["status"] not in _TERMINAL:
        return _Retry(None, f"the run is {run['status']}; retry it once it has ended")
    if strategy == RetryStrategy.FROM_FAILED_STEP and run["status"] not in _RETRYABLE:
        # ON_LATEST_VERSION reruns any ended run (a fixed flow, or a corrected input schema for an INVALID one).
        return _Retry(None, f"a {run['status']} run has nothing to retry from; use ON_LATEST_VERSION to rerun it")
    if run["payloads_purged"]:
        return _Retry(None, "the run's trigger payload has been purged by retention; it cannot be replayed")
    reuse = Reuse()
    only_keys: dict[str, list[str]] = {}
    version: int | None = None
    if strategy == RetryStrategy.FROM_FAILED_STEP:
        version = run["flow_version"]
        failed_keys = await conn.fetch(
            "SELECT step, array_agg(DISTINCT record_key) AS keys FROM record_errors WHERE run_id = $1 GROUP BY step",
            run["id"],
        )
        only_keys = {r["step"]: list(r["keys"]) for r in failed_keys}
        steps = await conn.fetch(
            "SELECT step, status, input, output, extractions, reused_from FROM run_steps WHERE run_id = $1", run["id"]
        )
        # Every step that succeeded, here or earlier in the retry chain; a step with failed records runs again.
        reuse = plan_reuse(run["id"], steps, rerun=only_keys)
    window = CursorWindow.model_validate(run["cursor_window"]) if run["cursor_window"] else None
    trigger = TriggerReceived(
        tenant_id=principal.tenant_id,
        run_id=run_id,
        flow_id=run["flow_id"],
        flow_version=version,
        trigger=TriggerInfo(type=TriggerType.RETRY, caller=principal.key_id, payload=run["trigger_payload"]),
        environment=Environment(run["environment"]),
        execution_mode=ExecutionMode.ASYNC,
        retry_of=run["id"],
        retry_strategy=strategy,
        reuse=reuse.outputs,
        reused=reuse.steps,
        only_keys=only_keys,
        cursor_window=window,
        bulk_operation_id=bulk_id,
    )
    return _Retry(trigger)


# A dry run answers 200: nothing was requested.
_BULK: dict[str, Any] = {"status_code": 202, "response_model_exclude_unset": True, "responses": _DRY_RUN}


@router.post("/v1/runs/bulk/retry", **_BULK)
async def bulk_retry(request: Request, response: Response, principal: Writer, body: BulkRetryBody) -> BulkResult:
    """Retry every matching run; each new run records the bulk operation id (`GET /v1/runs?bulk_operation_id=`)."""
    return await _bulk(request, response, principal, body, "retry")


@router.post("/v1/runs/bulk/cancel", **_BULK)
async def bulk_cancel(request: Request, response: Response, principal: Writer, body: BulkCancelBody) -> BulkResult:
    """Cancel every matching run that has not ended (queued, scheduled, blocked, running or paused)."""
    return await _bulk(request, response, principal, body, "cancel")


@router.post("/v1/runs/bulk/archive", **_BULK)
async def bulk_archive(request: Request, response: Response, principal: Writer, body: BulkBody) -> BulkResult:
    """Archive every matching run that has ended; archived runs leave default listings (`include_archived`)."""
    return await _bulk(request, response, principal, body, "archive")


@router.post("/v1/runs/{run_id}/retry", status_code=202, response_model_exclude_unset=True)
async def retry(request: Request, principal: Writer, run_id: str, body: RetryBody | None = None) -> RetryAccepted:
    """A new run linked by `retry_of`. FROM_FAILED_STEP reuses the outputs of the steps that succeeded and, for a
    PARTIAL run, processes only the records that failed; ON_LATEST_VERSION starts fresh on the newest version."""
    strategy = (body or RetryBody()).strategy
    run = await _run(request, principal, run_id)
    async with request.app.state.pool.acquire() as conn:
        plan = await _plan_retry(conn, principal, run, strategy, None, _retry_run_id(request, principal, run_id))
    if plan.trigger is None:
        raise ApiError(409, "conflict", plan.skipped or "the run cannot be retried")
    await _log(request).send_triggers([plan.trigger])
    new = plan.trigger.run_id
    return RetryAccepted(id=new, run_id=new, retry_of=run_id, strategy=strategy.value, status="QUEUED")


@router.post("/v1/runs/{run_id}/cancel", status_code=202, response_model_exclude_unset=True)
async def cancel(request: Request, principal: Writer, run_id: str, body: CancelBody | None = None) -> ActionAccepted:
    """Stop a run that has not ended; in-flight steps are abandoned and recorded CANCELED."""
    run = await _run(request, principal, run_id)
    if run["status"] in _TERMINAL:
        raise ApiError(409, "conflict", f"the run already ended {run['status']}")
    reason = (body or CancelBody()).reason
    await _log(request).send_commands([CancelRun(tenant_id=principal.tenant_id, run_id=run_id,
                                                 issued_by=principal.key_id, reason=reason)])  # fmt: skip
    return ActionAccepted(run_id=run_id, status="CANCEL_REQUESTED")


@router.post("/v1/runs/{run_id}/resume/{request_id}", status_code=202, response_model_exclude_unset=True)
async def resume(
    request: Request, principal: Writer, run_id: str, request_id: str, payload: Annotated[Any, Body()] = None
) -> ActionAccepted:
    """Answer the human_input step a run is paused on; the body becomes that step's output."""
    run = await _run(request, principal, run_id)
    if run["status"] != RunStatus.PAUSED.value:
        raise ApiError(409, "conflict", f"the run is {run['status']}, not PAUSED waiting for input")
    waiting = await request.app.state.pool.fetchval(
        "SELECT payload->>'request_id' FROM run_events WHERE run_id = $1 AND type = 'RunPaused' "
        "ORDER BY seq DESC LIMIT 1",
        run_id,
    )
    if waiting != request_id:
        raise ApiError(409, "conflict", f"the run waits for request {waiting!r}, not {request_id!r}")
    await _log(request).send_commands([ResumeRun(tenant_id=principal.tenant_id, run_id=run_id,
                                                 issued_by=principal.key_id, request_id=request_id,
                                                 payload=payload)])  # fmt: skip
    return ActionAccepted(run_id=run_id, request_id=request_id, status="RESUME_REQUESTED")


@router.post(
    "/v1/runs/{run_id}/archive",
    status_code=202,
    response_model_exclude_unset=True,
    response_model=ActionAccepted,
    responses={200: {"model": AlreadyArchived, "description": "archived already"}},
)
async def archive(request: Request, principal: Writer, run_id: str) -> ActionAccepted | Response:
    run = await _run(request, principal, run_id)
    if run["status"] not in _TERMINAL:
        raise ApiError(409, "conflict", f"the run is {run['status']}; only runs that ended can be archived")
    if run["archived"]:
        return answer(AlreadyArchived(run_id=run_id, archived=True), 200)
    await _log(request).send_commands([_archive_command(principal, run, None)])
    return ActionAccepted(run_id=run_id, status="ARCHIVE_REQUESTED")


def _archive_command(principal: Principal, run: asyncpg.Record, bulk_id: str | None) -> ArchiveRun:
    return ArchiveRun(tenant_id=principal.tenant_id, run_id=run["id"], issued_by=principal.key_id,
                      bulk_operation_id=bulk_id, flow_id=run["flow_id"], flow_version=run["flow_version"],
                      correlation_id=run["parent_run_id"] or run["id"])  # fmt: skip


# ---------------------------------------------------------------- bulk


def _filter(principal: Principal, body: BulkBody) -> store.RunFilter:
    if body.tenant_id is not None and body.tenant_id != principal.tenant_id:
        raise ApiError(403, "forbidden", "tenant_id (workspace_uid, projectId): this key acts on its own tenant only")
    if body.ids is not None:
        return store.RunFilter(tenant_id=principal.tenant_id, environment=principal.environment, ids=body.ids,
                               exclude_ids=body.exclude_ids, include_archived=body.include_archived)  # fmt: skip
    if not (body.flow_id or body.statuses or body.failed_step or body.caller or body.created_after
            or body.created_before):  # fmt: skip
        message = ("give `ids` or at least one filter (flow_id, statuses, failed_step, caller, created_after, "
                   "created_before); a bulk action never applies to every run by default")  # fmt: skip
        raise ApiError(422, "validation_error", message)
    try:
        statuses = sorted({s.value for name in body.statuses for s in parse_run_statuses(name)})
    except ValueError as exc:
        raise ApiError(422, "validation_error", f"statuses: {exc}") from None
    flows = [body.flow_id] if isinstance(body.flow_id, str) else list(body.flow_id or [])
    return store.RunFilter(
        tenant_id=principal.tenant_id,
        environment=principal.environment,
        flow_ids=flows,
        statuses=statuses,
        failed_step=body.failed_step,
        callers=[body.caller] if body.caller else [],
        created_after=body.created_after,
        created_before=body.created_before,
        exclude_ids=body.exclude_ids,
        include_archived=body.include_archived,
    )


def _skip_reason(action: Literal["retry", "cancel", "archive"], row: asyncpg.Record) -> str | None:
    status = row["status"]
    if action == "cancel" and status not in _CANCELABLE:
        return f"already {status}"
    if action == "archive":
        if status not in _TERMINAL:
            return f"still {status}"
        if row["archived"]:
            return "already archived"
    return None


async def _bulk(
    request: Request,
    response: Response,
    principal: Principal,
    body: BulkBody,
    action: Literal["retry", "cancel", "archive"],
) -> BulkResult:
    flt = _filter(principal, body)
    clauses, args = flt.where()
    pool = request.app.state.pool
    rows = await pool.fetch(
        f"SELECT * FROM runs WHERE {' AND '.join(clauses)} ORDER BY created_at, id LIMIT {BULK_MAX + 1}", *args
    )
    if len(rows) > BULK_MAX:
        raise ApiError(422, "validation_error", f"the filter matches more than {BULK_MAX} runs; narrow it "
                       "(created_after/created_before) and repeat")  # fmt: skip
    key = idempotency_key(request.scope["headers"])
    # With an Idempotency-Key, a retry of this request after a partial failure is the same bulk operation.
    bulk_id = None if body.dry_run else "bulk_" + (
        secrets.token_hex(10) if key is None
        else derived_run_ids(principal.tenant_id, principal.environment, f"{key}\x1fbulk", 1)[0][4:24]
    )  # fmt: skip
    skipped: Counter[str] = Counter()
    commands: list[CommandBase] = []
    triggers: list[TriggerReceived] = []
    selected: list[asyncpg.Record] = []
    async with pool.acquire() as conn:
        for row in rows:
            reason = _skip_reason(action, row)
            if reason is None and action == "retry":
                assert isinstance(body, BulkRetryBody)
                plan = await _plan_retry(conn, principal, row, body.strategy, bulk_id,
                                         _retry_run_id(request, principal, row["id"]))  # fmt: skip
                reason = plan.skipped
                if plan.trigger is not None:
                    triggers.append(plan.trigger)
            if reason is not None:
                skipped[reason] += 1
                continue
            selected.append(row)
            if action == "cancel":
                assert isinstance(body, BulkCancelBody)
                commands.append(CancelRun(tenant_id=principal.tenant_id, run_id=row["id"], issued_by=principal.key_id,
                                          reason=body.reason, bulk_operation_id=bulk_id))  # fmt: skip
            elif action == "archive":
                commands.append(_archive_command(principal, row, bulk_id))
    if not body.dry_run:
        log = _log(request)
        if commands:
            await log.send_commands(commands)
        if triggers:
            await log.send_triggers(triggers)
    result = BulkResult(
        bulk_operation_id=bulk_id,
        action=action,
        dry_run=body.dry_run,
        matched=len(rows),
        count=len(selected),
        skipped=dict(skipped),
        sample=[summary(r) for r in selected[:SAMPLE]],
        requested_at=datetime.now(UTC),
    )
    if action == "retry" and not body.dry_run:
        result.new_run_ids = [t.run_id for t in triggers]
    if body.dry_run:
        response.status_code = 200
    return result
