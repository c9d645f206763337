"""Alert rules per flow and the alert history (docs/projector.md). Admin scope, the caller's tenant and
environment only.

Rules are evaluated by the projector from the ledger: a rule judges runs that finish after it was created,
each by the settings in force when the run finished (every change of settings is kept as a revision), so a
rebuild replays the same history. Another tenant's rules and alerts answer 404 like missing ones.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.api.models.alerts import Alert, AlertDelivery, AlertDetail, AlertRule, AlertRules, Alerts, NewAlertRule
from services.api.routes import Admin, found
from services.common import slo_burn
from services.common.auth import Principal
from services.common.channels import PAGERDUTY_URL
from services.common.contract import AnyCase
from services.common.cursor import TIME_AND_ID
from services.common.http import ApiError
from services.common.netguard import BlockedAddress, check_url
from services.common.slo_burn import TENANT_WIDE

router = APIRouter()

Kind = Literal["failed_run", "consecutive_partial", "no_success", "failure_rate", "slo_burn"]
PARAMS: dict[str, tuple[str, ...]] = {
    "failed_run": (),
    "consecutive_partial": ("n",),
    "no_success": ("minutes",),
    "failure_rate": ("threshold", "window_minutes", "min_runs"),
    "slo_burn": slo_burn.PARAMS,
}
_ALL_PARAMS = ("n", "minutes", "threshold", "window_minutes", "min_runs", *slo_burn.PARAMS)
_DEFAULTS: dict[str, Any] = {"min_runs": 1, **slo_burn.DEFAULTS}
_EMAIL = r"^[^@\s,<>]+@[^@\s,<>]+\.[^@\s,<>]+$"


class _Channel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookChannel(_Channel):
    type: Literal["webhook"]
    url: str = Field(max_length=2000)


class SlackChannel(_Channel):
    type: Literal["slack"]
    url: str = Field(max_length=2000)


class PagerDutyChannel(_Channel):
    type: Literal["pagerduty"]
    routing_key: str = Field(min_length=1, max_length=200)
    url: str = Field(default=PAGERDUTY_URL, max_length=2000)
    severity: Literal["critical", "error", "warning", "info"] = "error"


class EmailChannel(_Channel):
    type: Literal["email"]
    to: list[Annotated[str, Field(pattern=_EMAIL, max_length=320)]] = Field(min_length=1, max_length=20)


Channel = Annotated[WebhookChannel | SlackChannel | PagerDutyChannel | EmailChannel, Field(discriminator="type")]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int | None = Field(default=None, ge=1, le=10_000)
    minutes: float | None = Field(default=None, gt=0, le=527_040)
    threshold: float | None = Field(default=None, gt=0, le=1)
    window_minutes: float | None = Field(default=None, gt=0, le=527_040)
    min_runs: int | None = Field(default=None, ge=1, le=100_000)
    # slo_burn (docs/alerts.md): the share of runs that must succeed, and the window pairs that page.
    objective: float | None = Field(default=None, gt=0, lt=1)
    period_days: float | None = Field(default=None, gt=0, le=366)
    fast_long_minutes: float | None = Field(default=None, gt=0, le=527_040)
    fast_short_minutes: float | None = Field(default=None, gt=0, le=527_040)
    fast_factor: float | None = Field(default=None, gt=0, le=100_000)
    slow_long_minutes: float | None = Field(default=None, gt=0, le=527_040)
    slow_short_minutes: float | None = Field(default=None, gt=0, le=527_040)
    slow_factor: float | None = Field(default=None, gt=0, le=100_000)


class NewRule(_Settings):
    name: str = Field(default="", max_length=200)
    flow_id: str = Field(min_length=1, max_length=200)
    kind: Kind
    channels: list[Channel] = Field(default_factory=list, max_length=10)
    enabled: bool = True
    secret: str | None = Field(default=None, min_length=16, max_length=200)

    @model_validator(mode="after")
    def _params_fit_kind(self) -> NewRule:
        params_for(self.kind, self.model_dump(include=set(_ALL_PARAMS), exclude_none=True))
        if self.flow_id == TENANT_WIDE and self.kind != "slo_burn":
            raise ValueError(f"flow_id {TENANT_WIDE!r} (every flow of the tenant) is for kind 'slo_burn' only")
        return self


class RuleChange(_Settings):
    name: str | None = Field(default=None, max_length=200)
    channels: list[Channel] | None = Field(default=None, max_length=10)
    enabled: bool | None = None


def params_for(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The kind's settings, all present and nothing else (ValueError names what is wrong)."""
    wanted = PARAMS[kind]
    extra = sorted(set(given) - set(wanted))
    if extra:
        raise ValueError(f"{', '.join(extra)} do(es) not apply to kind {kind!r} (it takes: {', '.join(wanted) or '-'})")
    params: dict[str, Any] = {k: given.get(k, _DEFAULTS.get(k)) for k in wanted}
    missing = [k for k, v in params.items() if v is None]
    if missing:
        raise ValueError(f"kind {kind!r} needs {', '.join(missing)}")
    if kind == "slo_burn":
        for name in ("fast", "slow"):
            if params[f"{name}_short_minutes"] >= params[f"{name}_long_minutes"]:
                raise ValueError(f"{name}_short_minutes must be shorter than {name}_long_minutes")
    return params


# What each channel kind needs from the deployment to deliver at all: (setting, variable it is read from).
_PREREQUISITES: dict[str, tuple[str, str]] = {"email": ("projector_smtp_host", "FLOWTRAIL_PROJECTOR_SMTP_HOST")}


async def _check_channels(request: Request, channels: list[Any]) -> None:
    """A channel that cannot deliver is refused now (422 naming the missing setting), not failed for 24 hours."""
    settings = request.app.state.settings
    allow_private = settings.webhook_allow_private_networks
    for i, channel in enumerate(channels):
        if channel.type in _PREREQUISITES:
            field, variable = _PREREQUISITES[channel.type]
            if not getattr(settings, field):
                message = f"channels.{i}: {channel.type} alerts cannot be delivered: {variable} is not set"
                raise ApiError(422, "validation_error", message)
        if channel.type == "email":
            continue
        try:
            await check_url(channel.url, allow_private=allow_private)
        except (BlockedAddress, ValueError, OSError) as exc:
            raise ApiError(422, "validation_error", f"channels.{i}.url: {exc}") from None


_RULE = """
    r.id, r.name, r.flow_id, r.kind, r.params, r.channels, r.enabled, r.created_at, r.updated_at,
    s.open, s.consecutive, s.last_success_at, s.last_success_run_id, s.updated_at AS evaluated_at
"""


def _rule(row: asyncpg.Record) -> dict[str, Any]:
    """A rule's columns as the API shows them (AlertRule's fields): its settings flattened, its state nested."""
    out = {k: row[k] for k in ("id", "name", "flow_id", "kind")}
    out |= {**row["params"], "channels": row["channels"]}
    out |= {k: row[k] for k in ("enabled", "created_at", "updated_at")}
    out["state"] = {
        "open": bool(row["open"]),
        "consecutive_partial": row["consecutive"] or 0,
        "last_success_at": row["last_success_at"],
        "last_success_run_id": row["last_success_run_id"],
        "evaluated_at": row["evaluated_at"],
    }
    return out


async def _rule_or_404(conn: Any, principal: Principal, rule_id: str, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {_RULE}, r.revisions FROM alert_rules r LEFT JOIN alert_state s ON s.rule_id = r.id "
        f"WHERE r.id = $1 AND r.tenant_id = $2 AND r.environment = $3 {'FOR UPDATE OF r' if lock else ''}",
        rule_id, principal.tenant_id, principal.environment,
    )  # fmt: skip
    return found(row, "alert rule", rule_id)


@router.post("/v1/alert-rules", status_code=201, response_model_exclude_unset=True)
async def create_rule(body: NewRule, request: Request, principal: Admin) -> NewAlertRule:
    """The secret (which signs generic webhook deliveries) is returned once. The rule judges runs that
    finish from now on."""
    await _check_channels(request, body.channels)
    params = params_for(body.kind, body.model_dump(include=set(_ALL_PARAMS), exclude_none=True))
    now = datetime.now(UTC)
    revision = {"since": now.isoformat(), "enabled": body.enabled, "params": params}
    secret = body.secret or "whsec_" + secrets.token_urlsafe(32)
    rule_id = "alr_rule_" + secrets.token_hex(8)
    pool = request.app.state.pool
    await pool.execute(
        "INSERT INTO alert_rules (id, tenant_id, environment, name, flow_id, kind, params, channels, enabled, "
        "revisions, secret, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)",
        rule_id, principal.tenant_id, principal.environment, body.name or f"{body.kind} on {body.flow_id}",
        body.flow_id, body.kind, params, [c.model_dump() for c in body.channels], body.enabled, [revision], secret,
        now,
    )  # fmt: skip
    return NewAlertRule(**_rule(await _rule_or_404(pool, principal, rule_id)), secret=secret)


@router.get("/v1/alert-rules", response_model_exclude_unset=True)
async def list_rules(
    request: Request, principal: Admin, flow_id: Annotated[str | None, Query(max_length=200)] = None
) -> AlertRules:
    rows = await request.app.state.pool.fetch(
        f"SELECT {_RULE} FROM alert_rules r LEFT JOIN alert_state s ON s.rule_id = r.id "
        "WHERE r.tenant_id = $1 AND r.environment = $2 AND ($3::text IS NULL OR r.flow_id = $3) "
        "ORDER BY r.created_at, r.id",
        principal.tenant_id, principal.environment, flow_id,
    )  # fmt: skip
    return AlertRules(data=[AlertRule(**_rule(r)) for r in rows])


@router.get("/v1/alert-rules/{rule_id}", response_model_exclude_unset=True)
async def get_rule(rule_id: str, request: Request, principal: Admin) -> AlertRule:
    return AlertRule(**_rule(await _rule_or_404(request.app.state.pool, principal, rule_id)))


@router.patch("/v1/alert-rules/{rule_id}", response_model_exclude_unset=True)
async def update_rule(rule_id: str, body: RuleChange, request: Request, principal: Admin) -> AlertRule:
    """Name and channels change what is sent from now on; settings and `enabled` take effect now, as a new
    revision, so runs that finished earlier keep the verdicts they had. kind and flow_id do not change."""
    if body.channels is not None:
        await _check_channels(request, body.channels)
    pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        row = await _rule_or_404(conn, principal, rule_id, lock=True)
        given = body.model_dump(include=set(_ALL_PARAMS), exclude_none=True)
        try:
            params = params_for(row["kind"], {**row["params"], **given})
        except ValueError as exc:
            raise ApiError(422, "validation_error", str(exc)) from None
        enabled = row["enabled"] if body.enabled is None else body.enabled
        revisions = list(row["revisions"])
        now = datetime.now(UTC)
        if params != row["params"] or enabled != row["enabled"]:
            revisions.append({"since": now.isoformat(), "enabled": enabled, "params": params})
        channels = row["channels"] if body.channels is None else [c.model_dump() for c in body.channels]
        await conn.execute(
            "UPDATE alert_rules SET name = $2, params = $3, channels = $4, enabled = $5, revisions = $6, "
            "updated_at = $7 WHERE id = $1",
            rule_id, row["name"] if body.name is None else body.name, params, channels, enabled, revisions, now,
        )  # fmt: skip
        return AlertRule(**_rule(await _rule_or_404(conn, principal, rule_id)))


@router.delete("/v1/alert-rules/{rule_id}", status_code=204, response_class=Response)
async def delete_rule(rule_id: str, request: Request, principal: Admin) -> None:
    """Deletes the rule with its state, history and deliveries: a rebuild, which no longer knows the rule,
    would derive no history for it either."""
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await _rule_or_404(conn, principal, rule_id, lock=True)
        await conn.execute("DELETE FROM alert_state WHERE rule_id = $1", rule_id)
        await conn.execute("DELETE FROM alert_events WHERE rule_id = $1", rule_id)
        await conn.execute("DELETE FROM alert_rules WHERE id = $1", rule_id)


_ALERT = """
    id, rule_id, flow_id, kind, run_id, fired_at, reason, payload, resolved_at, resolved_by_run_id,
    CASE WHEN resolved_at IS NULL THEN 'open' ELSE 'resolved' END AS status
"""


@router.get("/v1/alerts", response_model_exclude_unset=True)
async def list_alerts(
    request: Request,
    principal: Admin,
    rule_id: Annotated[str | None, Query(max_length=200)] = None,
    flow_id: Annotated[str | None, Query(max_length=200)] = None,
    status: Annotated[Literal["open", "resolved"] | None, Query(), AnyCase] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Alerts:
    """Alert history, newest first; `next_cursor` pages on."""
    at, last = TIME_AND_ID.decode(cursor) if cursor else (None, None)
    rows = await request.app.state.pool.fetch(
        f"""
        SELECT {_ALERT} FROM alert_events
        WHERE tenant_id = $1 AND environment = $2 AND ($3::text IS NULL OR rule_id = $3)
          AND ($4::text IS NULL OR flow_id = $4)
          AND ($5::text IS NULL OR (resolved_at IS NULL) = ($5 = 'open'))
          AND ($6::timestamptz IS NULL OR (fired_at, id) < ($6, $7))
        ORDER BY fired_at DESC, id DESC LIMIT $8
        """,
        principal.tenant_id, principal.environment, rule_id, flow_id, status, at, last, limit + 1,
    )  # fmt: skip
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = TIME_AND_ID.encode((rows[-1]["fired_at"], rows[-1]["id"])) if more else None
    return Alerts(data=[Alert(**r) for r in rows], next_cursor=next_cursor)


@router.get("/v1/alerts/{alert_id}", response_model_exclude_unset=True)
async def get_alert(alert_id: str, request: Request, principal: Admin) -> AlertDetail:
    """One alert with every delivery to its channels, each with its attempt log."""
    pool = request.app.state.pool
    row = await pool.fetchrow(
        f"SELECT {_ALERT} FROM alert_events WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        alert_id, principal.tenant_id, principal.environment,
    )  # fmt: skip
    row = found(row, "alert", alert_id)
    deliveries = await pool.fetch(
        "SELECT id, action, channel_index, channel_type, target, status, attempts, attempt_log, last_status_code, "
        "last_error, next_attempt_at, created_at, delivered_at, body FROM alert_deliveries WHERE alert_id = $1 "
        "ORDER BY action DESC, channel_index",
        alert_id,
    )
    return AlertDetail(**row, deliveries=[AlertDelivery(**d) for d in deliveries])
