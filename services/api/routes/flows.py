"""Flows (docs/flows.md): list, detail, immutable versions; create, publish, pause and resume as flow events.

Writes append to the flows topic (the truth) and answer once the event is durable there. They then wait
briefly for the projector: 201/200 with the flow as GET shows it when the read model caught up in time,
202 with `projected: false` when not (the write stands; GET shows it once projected).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import jsonschema
from fastapi import APIRouter, Body, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.events import FlowPaused, FlowResumed, FlowVersionPublished
from schemas.flows import FlowDefinition, TriggerConfig, contains_mask, mask_secrets
from schemas.topics import Topics
from services.api.adapters import flows as store
from services.api.choices import many, one_of
from services.api.models import flows as models
from services.api.routes import FlowsWriter as Writer
from services.api.routes import Reader, found
from services.common.auth import Principal
from services.common.contract import INT32_MAX
from services.common.crypto import seal_flow
from services.common.http import ApiError, answer
from services.common.schedule import Schedule, ScheduleError
from services.common.secretstore import keyring_of

router = APIRouter()

Many = Annotated[list[str] | None, Query()]

_PENDING: dict[int | str, dict[str, Any]] = {
    202: {"model": models.FlowPending, "description": "durable, not projected yet"}
}
# A write answers the flow as projected (201, or 200 for pause and resume), or 202 while the projector lags.
_WRITE: dict[str, Any] = {
    "response_model_exclude_unset": True, "response_model": models.FlowWritten, "responses": _PENDING,
}  # fmt: skip
# How long a write waits for the projector before answering 202 instead of the projected flow.
PROJECTION_WAIT_S = 3.0
STATUSES = ("active", "paused")
TRIGGER_TYPES = ("manual", "api", "webhook", "schedule", "kafka")
# Set by the server, never by the caller: the tenant comes from the API key, versions are counted per flow.
SERVER_FIELDS = ("tenant_id", "version")

FlowBody = Annotated[
    dict[str, Any],
    Body(
        description="A flow definition (schemas/jsonschema/FlowDefinition.json) without `tenant_id` and `version`; "
        "`environment` defaults to the API key's.",
        examples=[
            {
                "id": "orders-sync",
                "name": "Orders sync",
                "trigger": {"type": "schedule", "cron": "*/15 * * * *"},
                "steps": [{"name": "fetch", "action": "http_request", "input": {"url": "https://example.com/orders"}}],
                "tags": ["orders"],
            }
        ],
    ),
]


# ---------------------------------------------------------------- what a flow looks like to a caller


def schedule(trigger: dict[str, Any], now: datetime, active: bool = True) -> dict[str, Any] | None:
    """A schedule trigger's cron or interval, and when the scheduler fires it next (UTC; none while paused).
    The tick arithmetic is the scheduler's own, so the answer is the time it will fire."""
    if trigger.get("type") != "schedule":
        return None
    try:
        ticks = Schedule.of(TriggerConfig.model_validate(trigger))
    except (ValueError, ScheduleError):
        ticks = None  # a definition published before schedules were checked: the scheduler skips it too
    next_run_at = ticks.next_after(now) if ticks is not None and active else None
    return {
        "cron": trigger.get("cron"),
        "interval_s": trigger.get("interval_s"),
        "timezone": "UTC",
        "next_run_at": next_run_at,
    }


def connectors(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """The connectors a definition's steps name: an input's `connector`, or a `connector` one level down
    (`source`, `destination`), with the steps that use each."""
    found: dict[str, list[dict[str, Any]]] = {}
    for step in definition.get("steps", []):
        inputs = step.get("input") or {}
        named = [("connector", inputs.get("connector"))]
        named += [(key, value.get("connector")) for key, value in inputs.items() if isinstance(value, dict)]
        for role, name in named:
            if isinstance(name, str) and name:
                found.setdefault(name, []).append({"step": step["name"], "action": step["action"], "role": role})
    return [{"name": name, "used_by": uses} for name, uses in sorted(found.items())]


def shown(definition: dict[str, Any]) -> dict[str, Any]:
    """A definition as the API shows it: credentials in step inputs masked, server-owned fields dropped."""
    steps = [{**s, "input": mask_secrets(s.get("input") or {})} for s in definition.get("steps", [])]
    return {k: v for k, v in definition.items() if k not in SERVER_FIELDS} | {"steps": steps}


def summary(row: asyncpg.Record, now: datetime) -> dict[str, Any]:
    definition = row["definition"] or {}
    return {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "status": row["status"],
        "environment": row["environment"],
        "trigger_type": row["trigger_type"],
        "tags": row["tags"],
        "latest_version": row["latest_version"],
        "schedule": schedule(definition.get("trigger") or {}, now, active=row["status"] == "active"),
        "connectors": [c["name"] for c in connectors(definition)],
        "last_run_at": row["last_run_at"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


async def _detail(request: Request, principal: Principal, flow_id: str) -> dict[str, Any] | None:
    pool = request.app.state.pool
    row = await store.get_flow(pool, principal.tenant_id, principal.environment, flow_id)
    if row is None:
        return None
    definition = row["definition"] or {}
    versions = await store.get_versions(pool, principal.tenant_id, flow_id)
    return {
        **summary(row, datetime.now(UTC)),
        "connectors": connectors(definition),
        "definition": shown(definition),
        "versions": [{"version": v["version"], "published_at": v["published_at"]} for v in versions],
    }


# ---------------------------------------------------------------- reads


class FlowsQuery(BaseModel):
    """The query string of GET /v1/flows."""

    status: list[str] = []
    environment: str | None = None
    tag: list[str] = []
    trigger_type: list[str] = []
    q: str | None = Field(default=None, max_length=200)
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = None


@router.get("/v1/flows", response_model_exclude_unset=True)
async def list_flows(request: Request, principal: Reader, params: Annotated[FlowsQuery, Query()]) -> models.FlowsPage:
    """The key's tenant's flows in the key's environment, newest first; `meta.total` counts every match."""
    if params.environment is not None and params.environment.upper() != principal.environment:
        raise ApiError(
            403, "forbidden", f"this API key sees {principal.environment} flows only; use a key of that environment"
        )
    flt = store.FlowFilter(
        tenant_id=principal.tenant_id,
        environment=principal.environment,
        statuses=one_of("status", many(params.status), STATUSES),
        trigger_types=one_of("trigger_type", many(params.trigger_type), TRIGGER_TYPES),
        tags=many(params.tag),
        q=params.q.strip() if params.q and params.q.strip() else None,
    )
    position = store.Cursor.decode(params.cursor) if params.cursor else None
    page = await store.list_flows(request.app.state.pool, flt, params.limit, position)
    now = datetime.now(UTC)
    return models.FlowsPage(
        data=[models.FlowSummary(**summary(r, now)) for r in page.rows],
        next_cursor=page.next_cursor,
        meta=models.FlowsMeta(total=page.total, has_more=page.next_cursor is not None),
    )


@router.get("/v1/flows/{flow_id}", response_model_exclude_unset=True)
async def get_flow(flow_id: str, request: Request, principal: Reader) -> models.FlowDetail:
    """The flow with its latest definition, every version, its schedule and the connectors its steps use."""
    detail = await _detail(request, principal, flow_id)
    return models.FlowDetail(**found(detail, "flow", flow_id))


@router.get("/v1/flows/{flow_id}/versions/{version}", response_model_exclude_unset=True)
async def get_flow_version(
    flow_id: str, version: Annotated[int, Path(ge=1, le=INT32_MAX)], request: Request, principal: Reader
) -> models.FlowVersion:
    """One immutable version: what a run of that version ran."""
    row = await store.get_version(request.app.state.pool, principal.tenant_id, principal.environment, flow_id, version)
    if row is None:
        raise ApiError(404, "not_found", f"flow {flow_id!r} has no version {version}")
    return models.FlowVersion.model_validate(
        {
            "flow_id": flow_id,
            "version": row["version"],
            "published_at": row["published_at"],
            # The version's schedule as configured; when it fires next is the flow's (GET /v1/flows/{id}).
            "schedule": schedule(row["definition"].get("trigger") or {}, datetime.now(UTC), active=False),
            "connectors": connectors(row["definition"]),
            "definition": shown(row["definition"]),
        }
    )


# ---------------------------------------------------------------- writes


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _check_trigger(definition: FlowDefinition) -> None:
    """What the scheduler (and the kafka trigger) will need, refused now rather than skipped later."""
    t = definition.trigger
    if t.type != "schedule" and (t.cron is not None or t.interval_s is not None):
        raise ApiError(
            422, "validation_error", f"trigger: only a schedule trigger takes cron or interval_s, not {t.type}"
        )
    try:
        Schedule.of(t)
    except ScheduleError as exc:
        where = "trigger"
        if (t.cron is None) != (t.interval_s is None):
            where = "trigger.cron" if t.cron is not None else "trigger.interval_s"
        raise ApiError(422, "validation_error", f"{where}: {exc}") from None
    if t.type == "kafka" and not t.topic:
        raise ApiError(422, "validation_error", "trigger.topic: a kafka trigger names the topic it reads")


def _definition(body: dict[str, Any], principal: Principal, flow_id: str | None = None) -> FlowDefinition:
    """The body as a flow definition (version 1 until the lock says otherwise), or a 422 naming the field."""
    for name in SERVER_FIELDS:
        if name in body:
            raise ApiError(422, "validation_error", f"{name}: set by the server; leave it out")
    if flow_id is not None:
        if body.get("id", flow_id) != flow_id:
            raise ApiError(422, "validation_error", f"id: the body says {body['id']!r}, the path {flow_id!r}")
        body = {**body, "id": flow_id}
    fields = {"environment": principal.environment, **body, "tenant_id": principal.tenant_id, "version": 1}
    try:
        definition = FlowDefinition.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(422, "validation_error", _first_error(exc)) from None
    if definition.environment.value != principal.environment:
        raise ApiError(
            403, "forbidden", f"this API key writes {principal.environment} flows only; use a key of that environment"
        )
    _check_trigger(definition)
    if definition.input_schema is not None:
        try:
            jsonschema.validators.validator_for(definition.input_schema).check_schema(definition.input_schema)
        except jsonschema.SchemaError as exc:
            raise ApiError(422, "validation_error", f"input_schema: not a valid JSON Schema: {exc.message}") from None
    for i, step in enumerate(definition.steps):
        if contains_mask(step.input):
            raise ApiError(
                422,
                "validation_error",
                f"steps.{i}.input: holds '***', a masked secret as GET shows it; send the value",
            )
    return definition


def _flows_topic(request: Request) -> str:
    return Topics(request.app.state.settings.topic_prefix).flows


async def _answer(
    request: Request,
    principal: Principal,
    flow_id: str,
    version: int,
    at: store.Appended,
    published: FlowDefinition | None = None,
) -> models.FlowWritten | Response:
    """The flow as GET shows it once projected (with `published`'s definition when this request published
    one: a concurrent publish may already be the latest), under the route's status; 202 with the bare facts when
    the projector lags."""
    if await store.wait_projected(request.app.state.pool, _flows_topic(request), at, PROJECTION_WAIT_S):
        detail = await _detail(request, principal, flow_id)
        if detail is not None:
            if published is not None:
                definition = published.model_dump(mode="json")
                detail["definition"] = shown(definition)
                detail["connectors"] = connectors(definition)
                detail["schedule"] = schedule(definition["trigger"], datetime.now(UTC), detail["status"] == "active")
            return models.FlowWritten(**detail, version=version, projected=True)
    state = request.app.state.flow_log.get(principal.tenant_id, flow_id)
    status = "paused" if state is not None and state.paused else "active"
    return answer(models.FlowPending(id=flow_id, version=version, status=status, projected=False), 202)


def _encrypted(request: Request, definition: FlowDefinition) -> FlowDefinition:
    """Credentials in step inputs (what GET shows as `***`) encrypted before the definition reaches the flows
    topic, and so PostgreSQL; the executor decrypts them when the step runs (docs/secrets.md)."""
    return seal_flow(definition, keyring_of(request.app.state, request.app.state.settings))


async def _publish(
    request: Request, principal: Principal, definition: FlowDefinition, new: bool
) -> models.FlowWritten | Response:
    """Append the definition as the flow's next version, deciding the number under the flow's lock."""
    definition = _encrypted(request, definition)
    app = request.app
    flow_log: store.FlowLog = app.state.flow_log
    try:
        async with store.flow_lock(app.state.pool, app.state.settings.database_schema, principal.tenant_id,
                                   definition.id):  # fmt: skip
            await flow_log.catch_up()
            state = flow_log.get(principal.tenant_id, definition.id)
            if new and state is not None:
                raise ApiError(409, "conflict", f"a flow with id {definition.id!r} already exists; publish a version")
            if not new and (state is None or state.environment != principal.environment):
                raise ApiError(404, "not_found", f"no flow with id {definition.id!r}")
            version = 1 if state is None else state.latest_version + 1
            definition = definition.model_copy(update={"version": version})
            event = FlowVersionPublished(
                tenant_id=principal.tenant_id, flow_id=definition.id, flow_version=version, flow=definition
            )
            at = await flow_log.append(event)
    except store.FlowBusy:
        raise ApiError(409, "conflict", f"another write to flow {definition.id!r} is in progress; retry") from None
    return await _answer(request, principal, definition.id, version, at, definition)


@router.post("/v1/flows", status_code=201, **_WRITE)
async def create_flow(body: FlowBody, request: Request, principal: Writer) -> models.FlowWritten | Response:
    """Version 1 of a new flow, in the key's tenant and environment."""
    return await _publish(request, principal, _definition(body, principal), new=True)


@router.post("/v1/flows/{flow_id}/versions", status_code=201, **_WRITE)
async def publish_version(
    flow_id: str, body: FlowBody, request: Request, principal: Writer
) -> models.FlowWritten | Response:
    """The next immutable version (latest + 1); runs already started keep the version they started on."""
    return await _publish(request, principal, _definition(body, principal, flow_id), new=False)


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500)


async def _set_paused(
    request: Request, principal: Principal, flow_id: str, paused: bool, reason: str
) -> models.FlowWritten | Response:
    """Idempotent: pausing a paused flow (or resuming an active one) appends nothing and answers the same."""
    app = request.app
    flow_log: store.FlowLog = app.state.flow_log
    try:
        async with store.flow_lock(app.state.pool, app.state.settings.database_schema, principal.tenant_id, flow_id):
            await flow_log.catch_up()
            state = flow_log.get(principal.tenant_id, flow_id)
            if state is None or state.environment != principal.environment:
                raise ApiError(404, "not_found", f"no flow with id {flow_id!r}")
            at = state.last
            if state.paused != paused:
                tenant, version = principal.tenant_id, state.latest_version
                event = (
                    FlowPaused(tenant_id=tenant, flow_id=flow_id, flow_version=version, reason=reason)
                    if paused
                    else FlowResumed(tenant_id=tenant, flow_id=flow_id, flow_version=version)
                )
                at = await flow_log.append(event)
    except store.FlowBusy:
        raise ApiError(409, "conflict", f"another write to flow {flow_id!r} is in progress; retry") from None
    return await _answer(request, principal, flow_id, state.latest_version, at)


@router.post("/v1/flows/{flow_id}/pause", **_WRITE)
async def pause_flow(
    flow_id: str, request: Request, principal: Writer, body: PauseRequest | None = None
) -> models.FlowWritten | Response:
    """Triggers are refused (409) while paused; runs already started go on. `reason` goes into the event."""
    return await _set_paused(request, principal, flow_id, True, body.reason if body else "")


@router.post("/v1/flows/{flow_id}/resume", **_WRITE)
async def resume_flow(flow_id: str, request: Request, principal: Writer) -> models.FlowWritten | Response:
    return await _set_paused(request, principal, flow_id, False, "")
