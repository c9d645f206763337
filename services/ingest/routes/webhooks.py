"""Webhook triggers (docs/intake.md#webhook-triggers): `POST /v1/hooks/{flow_id}/{token}` takes an upstream's own
delivery — a raw JSON, form or text body, no Flowtrail key — and makes it one run of the flow, trigger type
`webhook`; `GET /v1/flows/{flow_id}/hook` gives a key holder the URL to hand the upstream.

The token in the URL is the flow's address sealed with the secrets key (services/ingest/webhooks.py), so an upstream
that cannot send a bearer key can still call it, nobody can guess it, and ingest needs no table to resolve it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, NamedTuple

import asyncpg
import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from schemas import codec
from schemas.events import ExecutionMode, TriggerInfo, TriggerReceived, TriggerType, new_run_id
from schemas.flows import STORED_FLOW, Environment, TriggerConfig
from services.common.accepted import record_accepted
from services.common.appender import AppendFailed
from services.common.auth import Principal, require_scope
from services.common.crypto import SecretsKeyError
from services.common.http import ApiError, OrjsonResponse, raise_bad_input
from services.common.secretstore import keyring_of, read_secrets
from services.common.triggering import TriggerIntake
from services.common.windows import cursor_window
from services.ingest.webhooks import (
    HookAddress,
    Refused,
    decode_body,
    delivery_id,
    delivery_run_id,
    hook_token,
    open_hook_token,
    recorded_headers,
    verify_signature,
)

router = APIRouter()

_FLOW = """
SELECT f.status, f.latest_version, v.definition->'trigger' AS trigger
FROM flows f JOIN flow_versions v ON v.tenant_id = f.tenant_id AND v.flow_id = f.id AND v.version = f.latest_version
WHERE f.tenant_id = $1 AND f.id = $2 AND f.environment = $3
"""


class HookAccepted(BaseModel):
    """202: the delivery is a run, visible at `GET /v1/runs/{run_id}` from now on. `redelivery`: this delivery id
    was taken before, and `run_id` is the run it made then (nothing new was started)."""

    run_id: str
    status: Literal["QUEUED"]
    redelivery: bool


class HookUrl(BaseModel):
    """Where the upstream posts: `url` (this ingest's address as the request reached it) and its `path`; both null
    when the flow's trigger (`trigger_type`) is not `webhook`."""

    flow_id: str
    trigger_type: str
    url: str | None
    path: str | None
    signed: bool
    signature_header: str | None
    delivery_id_header: str | None


@router.get("/v1/flows/{flow_id}/hook", response_model=HookUrl)
async def get_hook_url(
    flow_id: str, request: Request, principal: Annotated[Principal, Depends(require_scope("runs:write"))]
) -> HookUrl:
    """The URL an upstream posts its deliveries to, for a flow whose trigger is `webhook` (null for another). Each
    call seals a new token; every URL issued stays valid until the flow's `url_generation` is raised."""
    flow = await _flow(request.app.state.pool, principal.tenant_id, principal.environment, flow_id)
    if flow is None:
        raise ApiError(404, "not_found", f"no flow with id {flow_id!r}")
    config = flow.trigger
    if config.type != "webhook":
        return HookUrl(flow_id=flow_id, trigger_type=config.type, url=None, path=None, signed=False,
                       signature_header=None, delivery_id_header=None)  # fmt: skip
    address = HookAddress(principal.tenant_id, principal.environment, flow_id, config.url_generation)
    path = f"/v1/hooks/{flow_id}/{hook_token(_keyring(request), address)}"
    return HookUrl(flow_id=flow_id, trigger_type="webhook", url=str(request.base_url).rstrip("/") + path, path=path,
                   signed=config.signature_header is not None, signature_header=config.signature_header,
                   delivery_id_header=config.delivery_id_header)  # fmt: skip


# Not in the OpenAPI: every operation there is a bearer-key one (docs/api-contract.md); this one takes no key. Its
# answers are listed in docs/intake.md#webhook-triggers.
@router.post("/v1/hooks/{flow_id}/{token}", status_code=202, response_model=HookAccepted, include_in_schema=False)
async def deliver(flow_id: str, token: str, request: Request) -> OrjsonResponse:
    """One run per delivery: the body is the run's input, the headers (credentials masked) its trigger's."""
    raise_bad_input(request)  # the path and headers; the body is judged by its media type below
    address = open_hook_token(_keyring(request), token)
    if address is None or address.flow_id != flow_id:
        raise ApiError(404, "not_found", "no webhook at this URL")
    pool = request.app.state.pool
    flow = await _flow(pool, address.tenant_id, address.environment, flow_id)
    if flow is None or flow.trigger.type != "webhook" or flow.trigger.url_generation != address.generation:
        raise ApiError(404, "not_found", "no webhook at this URL")
    config, version = flow.trigger, flow.version
    if flow.paused:
        raise ApiError(409, "conflict", f"flow {flow_id!r} is paused; deliveries are refused until it is resumed")
    await _rate_limit(request, address)
    intake: TriggerIntake = request.app.state.intake
    body = await request.body()
    if len(body) > intake.max_input_bytes:
        raise ApiError(413, "payload_too_large",
                       f"the body is {len(body):,} bytes; a run input may be {intake.max_input_bytes:,}")  # fmt: skip
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
    try:
        if config.signature_header is not None:
            secret = await _signing_secret(request, address, config)
            verify_signature(config, request.headers.get(config.signature_header), body, secret, time.time())
        run_input = decode_body(request.headers.get("content-type"), body)
        delivery = delivery_id(headers, config, run_input)
    except Refused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    if (size := len(orjson.dumps(run_input))) > intake.max_input_bytes:
        raise ApiError(413, "payload_too_large",
                       f"the delivery's input is {size:,} bytes as JSON; a run input may be "
                       f"{intake.max_input_bytes:,}")  # fmt: skip
    run_id = new_run_id() if delivery is None else delivery_run_id(address, delivery)
    if delivery is not None and await pool.fetchval(
        "SELECT 1 FROM runs WHERE tenant_id = $1 AND id = $2", address.tenant_id, run_id
    ):  # fmt: skip
        return OrjsonResponse({"run_id": run_id, "status": "QUEUED", "redelivery": True}, status_code=202)
    template = TriggerReceived(
        tenant_id=address.tenant_id,
        run_id=run_id,
        flow_id=flow_id,
        trigger=TriggerInfo(type=TriggerType.WEBHOOK, headers=recorded_headers(headers, config)),
        environment=Environment(address.environment),
        execution_mode=ExecutionMode.ASYNC,
        idempotency_key=delivery,
        cursor_window=await cursor_window(pool, address.tenant_id, flow_id, version),
    )
    (record,) = codec.dumps_triggers(template, [run_id], [run_input])
    if len(record) > intake.max_record_bytes:
        raise ApiError(413, "payload_too_large",
                       f"the delivery's run request is {len(record):,} bytes with its headers; one Kafka record "
                       f"may be {intake.max_record_bytes:,}")  # fmt: skip
    started = time.perf_counter()
    try:
        await intake.append([(run_id, record)])
    except AppendFailed as exc:
        intake.on_append_failed()
        again = "redeliver it (with the same delivery id it becomes one run)" if delivery else "redeliver it"
        state = "nothing was appended" if exc.nothing_appended else "it is unknown whether the delivery was taken"
        raise ApiError(503, "kafka_unavailable", f"Kafka could not take the delivery ({exc.reason}); {state}: {again}",
                       headers={"Retry-After": "2"}) from exc  # fmt: skip
    intake.on_appended("async", 1, time.perf_counter() - started)
    await record_accepted(pool, template, [run_id], [run_input], flow_version=version)
    return OrjsonResponse({"run_id": run_id, "status": "QUEUED", "redelivery": False}, status_code=202)


class _Flow(NamedTuple):
    trigger: TriggerConfig
    version: int
    paused: bool


async def _flow(pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str) -> _Flow | None:
    """The trigger of the flow's latest version, that version, and whether the flow is paused."""
    row = await pool.fetchrow(_FLOW, tenant_id, flow_id, environment)
    if row is None:
        return None
    trigger = TriggerConfig.model_validate(row["trigger"] or {}, context=STORED_FLOW, extra="ignore")
    return _Flow(trigger, row["latest_version"], row["status"] == "paused")


def _keyring(request: Request) -> Any:
    return keyring_of(request.app.state, request.app.state.settings)


async def _signing_secret(request: Request, address: HookAddress, config: TriggerConfig) -> str:
    """The flow's signing secret from the secrets store; 503 while it is missing (the upstream's retry then goes
    through once a tenant admin stores it)."""
    name = str(config.secret_name)
    try:
        values = await read_secrets(request.app.state.pool, _keyring(request), address.tenant_id,
                                    address.environment, [name])  # fmt: skip
    except SecretsKeyError as exc:
        raise ApiError(503, "secret_undecryptable", f"the signing secret {name!r} does not open: {exc}") from None
    if name not in values:
        raise ApiError(503, "secret_not_found",
                       f"the flow's signing secret {name!r} is not in the secrets store; deliveries cannot be "
                       "verified until a tenant admin stores it (PUT /v1/secrets/{name})",
                       headers={"Retry-After": "60"})  # fmt: skip
    return values[name]


async def _rate_limit(request: Request, address: HookAddress) -> None:
    """A hook spends the trigger budget of its own (per flow), as a key does (FLOWTRAIL_INGEST_RATE_LIMIT_TRIGGERS)."""
    limiter = request.app.state.authenticator.limiter
    if limiter is None:
        return
    decision = await limiter.hit(f"hook:{address.tenant_id}:{address.environment}:{address.flow_id}", "triggers")
    if not decision.admitted:
        raise ApiError(429, "rate_limited",
                       f"this webhook's rate limit of {decision.limit} deliveries per {limiter.limits.window_s} s "
                       f"is exceeded; retry after {decision.retry_after_s} s", headers=decision.headers())  # fmt: skip
