"""GET /v1/runs, GET /v1/runs/{id}, GET /v1/runs/{id}/events (docs/runs.md)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.events import RECORD_COUNTERS, ExecutionMode, TriggerType
from schemas.flows import mask_secrets
from schemas.status import parse_run_statuses
from services.api import timeline
from services.api.adapters import runs as store
from services.api.choices import many, one_of
from services.api.models import runs as models
from services.api.querystring import QueryString
from services.api.routes import Reader, found
from services.common.auth import Principal
from services.common.contract import INT32_MAX, Timestamp
from services.common.http import ApiError

router = APIRouter()

Many = Annotated[list[str] | None, Query()]


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _statuses(values: list[str]) -> list[str]:
    try:
        return sorted({s.value for v in values for s in parse_run_statuses(v)})
    except ValueError as exc:
        raise ApiError(422, "validation_error", f"status: {exc}") from None


_TRIGGER_TYPES = sorted(t.value for t in TriggerType)
_EXECUTION_MODES = sorted(m.value for m in ExecutionMode)


def summary(row: Mapping[str, Any]) -> models.RunSummary:
    return models.RunSummary(**{name: row[name] for name in store.SUMMARY_COLUMNS})


class RunsQuery(BaseModel):
    """The query string of GET /v1/runs, validated as one model (much cheaper than one parameter each)."""

    model_config = ConfigDict(populate_by_name=True)

    flow_id: list[str] = Field(default_factory=list)
    status: list[str] = Field(default_factory=list)
    trigger_type: list[str] = Field(default_factory=list)
    execution_mode: list[str] = Field(default_factory=list)
    caller: list[str] = Field(default_factory=list)
    environment: str | None = None
    ids: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    failed_step: str | None = None
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None
    from_: Timestamp | None = Field(default=None, alias="from")
    to: Timestamp | None = None
    include_archived: bool = False
    # `workspace_uid`, `projectId` (docs/api-contract.md): must name the key's own tenant (403 otherwise).
    tenant_id: str | None = Field(default=None, max_length=200)
    # The bulk retry that created a run, or the bulk cancel / archive that last touched it.
    bulk_operation_id: str | None = None
    # The retries of a run (FROM_FAILED_STEP or ON_LATEST_VERSION): the runs whose `retry_of` it is.
    retry_of: str | None = Field(default=None, max_length=200)
    q: str | None = Field(
        default=None,
        max_length=200,
        description="case-insensitive substring of the run id, error message, record errors or a failed step's "
        "upstream answer",
    )
    error_fingerprint: str | None = None
    sort: str = "-created_at"
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = None
    offset: int = Field(default=0, ge=0, le=100_000)


# The product documents' names for Flowtrail's parameters (docs/api-contract.md, docs/origins.md).
SEED_ALIASES = {
    "flowId": "flow_id",
    "action_name": "flow_id",
    "failedStepName": "failed_step",
    "createdAfter": "created_after",
    "createdBefore": "created_before",
    "includeArchived": "include_archived",
    "uid": "ids",
    "user_uid": "caller",
    "workspace_uid": "tenant_id",
    "projectId": "tenant_id",
}
_RUNS_QUERY = QueryString(RunsQuery, SEED_ALIASES)


@router.get("/v1/runs", response_model_exclude_unset=True, openapi_extra=_RUNS_QUERY.openapi())
async def list_runs(request: Request, principal: Reader) -> models.RunsPage:
    """Runs, newest first unless `sort` says otherwise. `next_cursor` pages on, `prev_cursor` back.

    `q` matches a case-insensitive substring of the run id, its error message, its record errors (message and
    the destination's raw error) or the upstream's answer to a failed step (a preview of the body). `offset` is for
    clients that page by count (the launch API's form, docs/api-contract.md); cursors stay stable while new runs
    arrive, offsets do not.
    """
    params = _RUNS_QUERY.parse(request)
    if params.tenant_id is not None and params.tenant_id != principal.tenant_id:
        raise ApiError(403, "forbidden", "tenant_id (workspace_uid, projectId): this API key sees its own tenant only")
    if params.environment is not None and params.environment.upper() != principal.environment:
        raise ApiError(
            403, "forbidden", f"this API key sees {principal.environment} runs only; use a key of that environment"
        )
    if params.cursor and params.offset:
        raise ApiError(422, "validation_error", "offset: give `cursor` or `offset`, not both")
    try:
        order = store.Sort.parse(params.sort)
    except ValueError as exc:
        raise ApiError(422, "validation_error", f"sort: {exc}") from None
    if params.from_ is not None and params.created_after is not None:
        raise ApiError(422, "validation_error", "from: give `from` or `created_after`, not both")
    if params.to is not None and params.created_before is not None:
        raise ApiError(422, "validation_error", "to: give `to` or `created_before`, not both")
    flt = store.RunFilter(
        tenant_id=principal.tenant_id,
        environment=principal.environment,
        flow_ids=many(params.flow_id),
        statuses=_statuses(many(params.status)),
        trigger_types=one_of("trigger_type", many(params.trigger_type), _TRIGGER_TYPES),
        execution_modes=one_of("execution_mode", many(params.execution_mode), _EXECUTION_MODES),
        callers=many(params.caller),
        fingerprint=params.error_fingerprint,
        q=params.q.strip() if params.q and params.q.strip() else None,
        ids=many(params.ids),
        tags=many(params.tags),
        failed_step=params.failed_step,
        created_after=_utc(params.from_ or params.created_after),
        created_before=_utc(params.to or params.created_before),
        include_archived=params.include_archived,
        bulk_operation_id=params.bulk_operation_id,
        retry_of=params.retry_of,
    )
    position = store.Cursor.decode(params.cursor, order) if params.cursor else None
    page = await store.list_runs(request.app.state.pool, flt, params.limit, order, position, params.offset)
    return models.RunsPage(
        data=[summary(r) for r in page.rows], next_cursor=page.next_cursor, prev_cursor=page.prev_cursor
    )


async def _run_or_404(request: Request, principal: Principal, run_id: str) -> asyncpg.Record:
    row = await store.get_run(request.app.state.pool, principal.tenant_id, principal.environment, run_id)
    return found(row, "run", run_id)


class _MaskedFlows:
    """Masked flow definitions by (tenant, flow, version): masking walks every string of the definition with
    regexes (~90 µs for a 1 KB flow), a tenth of a whole run detail. A version never changes once published;
    the definition read with the run is still compared with the one masked, so a replaced row is masked anew."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._masked: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def get(self, key: tuple[str, str, int], definition: Any) -> Any:
        hit = self._masked.get(key)
        if hit is not None and hit[0] == definition:
            return hit[1]
        masked = mask_secrets(definition)
        if len(self._masked) >= self.size:
            del self._masked[next(iter(self._masked))]
        self._masked[key] = (definition, masked)
        return masked


_MASKED_FLOWS = _MaskedFlows()


def _detail(view: Mapping[str, Any], steps: list[models.RunStep], **lineage: Any) -> models.RunDetail:
    """The answer from a run's named columns (`view`: its row, or its fold as of a point) and its steps."""
    columns: dict[str, Any] = {name: view.get(name) for name in store.SUMMARY_COLUMNS}
    return models.RunDetail(
        **columns,
        trigger=models.Trigger(type=view["trigger_type"], caller=view["caller"], payload=view.get("trigger_payload")),
        error=view.get("error"),
        cursor_window=view.get("cursor_window"),
        records=models.Records(**{n: view.get(f"records_{n}", 0) for n in RECORD_COUNTERS}),
        duration_breakdown=models.DurationBreakdown(**timeline.breakdown(view, [_fields(s) for s in steps])),
        steps=steps,
        **lineage,
    )


def _fields(step: models.RunStep) -> dict[str, Any]:
    """A step as the mapping timeline.breakdown reads, its attempts too: the models' own field values, not copies."""
    return {**vars(step), "attempts": [vars(a) for a in step.attempts]}


_STEPS = TypeAdapter(list[models.RunStep])
_RETRIES = TypeAdapter(list[models.RetryLink])


class RunQuery(BaseModel):
    as_of: str | None = Field(default=None, description="a seq, or an ISO 8601 timestamp with offset")


_RUN_QUERY = QueryString(RunQuery)


@router.get("/v1/runs/{run_id}", response_model_exclude_unset=True, openapi_extra=_RUN_QUERY.openapi())
async def get_run(run_id: str, request: Request, principal: Reader) -> models.RunDetail:
    """One run: what triggered it, its records counters, duration breakdown, error and every step with its
    input, output, duration and attempts. `?as_of=` returns the run as it stood at that seq or time."""
    as_of = _RUN_QUERY.parse(request).as_of
    pool = request.app.state.pool
    if as_of is not None:
        return await _get_run_as_of(pool, await _run_or_404(request, principal, run_id), as_of)
    row = await store.get_run_detail(pool, principal.tenant_id, principal.environment, run_id)
    row = found(row, "run", run_id)
    # The flow as this run ran it: its immutable version, whatever was published since.
    flow, version = row["flow"], (row["tenant_id"], row["flow_id"], row["flow_version"])
    lineage: dict[str, Any] = {
        # How this run retried its `retry_of`, and the runs that retried this one (oldest first).
        "retry_strategy": row["retry_strategy"],
        "retries": _RETRIES.validate_python(row["retries"]),
        "flow": None if flow is None else _MASKED_FLOWS.get(version, flow),
    }
    if row["status"] == "PAUSED":
        # What a human must answer: POST /v1/runs/{id}/resume/{request_id} with the answer as the body.
        lineage["waiting_for"] = row["waiting_for"]
    return _detail(row, _STEPS.validate_python(row["steps"]), **lineage)


async def _get_run_as_of(pool: asyncpg.Pool, row: asyncpg.Record, as_of: str) -> models.RunDetail:
    try:
        until = timeline.parse_as_of(as_of)
    except ValueError as exc:
        raise ApiError(422, "validation_error", f"as_of: {exc}") from None
    events = await store.get_events_until(pool, row["id"], until)
    try:
        view = timeline.as_of(row, events)
    except ValueError as exc:
        raise ApiError(404, "not_found", f"run {row['id']!r} as of {as_of}: {exc}") from None
    as_of_point = models.AsOf(seq=view["last_seq"], occurred_at=events[-1]["occurred_at"])
    steps = _STEPS.validate_python(view["steps"])
    return _detail(view, steps, as_of=as_of_point, retry_strategy=view.get("retry_strategy"))


@router.get("/v1/runs/{run_id}/events", response_model_exclude_unset=True)
async def get_run_events(
    run_id: str,
    request: Request,
    principal: Reader,
    after_seq: Annotated[int, Query(ge=-1, le=INT32_MAX)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> models.RunEvents:
    """The run's own ledger in `seq` order; page with `after_seq` = the last `seq` seen."""
    await _run_or_404(request, principal, run_id)
    rows = await store.get_events(request.app.state.pool, run_id, after_seq, limit)
    return models.RunEvents(data=[models.RunEvent(**r) for r in rows], has_more=len(rows) == limit)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@router.get("/v1/runs/{run_id}/logs", response_model_exclude_unset=True)
async def get_run_logs(
    run_id: str,
    request: Request,
    principal: Reader,
    level: Many = None,
    step: str | None = None,
    after_seq: Annotated[int, Query(ge=-1, le=INT32_MAX)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> models.RunLogs:
    """The run's structured log lines, by step and by level: `level` is a minimum, as in every log viewer
    (`WARNING` shows warnings and errors; with several, the lowest counts)."""
    levels = [v.upper() for v in many(level)]
    unknown = [v for v in levels if v not in _LEVELS]
    if unknown:
        raise ApiError(422, "validation_error", f"level: unknown {unknown[0]!r}; accepted: {', '.join(_LEVELS)}")
    if levels:
        levels = list(_LEVELS[min(_LEVELS.index(v) for v in levels) :])
    await _run_or_404(request, principal, run_id)
    rows = await store.get_logs(request.app.state.pool, run_id, levels, step, after_seq, limit)
    return models.RunLogs(data=[models.LogLine(**r) for r in rows], has_more=len(rows) == limit)


@router.get("/v1/runs/{run_id}/record-errors", response_model_exclude_unset=True)
async def get_run_record_errors(
    run_id: str,
    request: Request,
    principal: Reader,
    step: str | None = None,
    after_seq: Annotated[int, Query(ge=-1, le=INT32_MAX)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> models.RunRecordErrors:
    """Each rejected record: its key, the offending field path and the destination's raw error."""
    await _run_or_404(request, principal, run_id)
    rows = await store.get_record_errors(request.app.state.pool, run_id, step, after_seq, limit)
    return models.RunRecordErrors(data=[models.RecordError(**r) for r in rows], has_more=len(rows) == limit)
