"""Webhook subscriptions, their delivery log and redelivery (docs/api-contract.md). Deliveries are sent by the
projector (services/common/outbox.py)."""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.api.choices import known
from services.api.models import webhooks as models
from services.api.routes import Admin, found
from services.common.auth import Principal
from services.common.contract import AnyCase
from services.common.http import ApiError
from services.common.netguard import BlockedAddress, check_url
from services.common.webhooks import EVENT_NAMES

router = APIRouter()


class NewSubscription(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000)
    events: list[str] = Field(min_length=1)
    secret: str | None = Field(default=None, min_length=16, max_length=200)

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        return known(events, EVENT_NAMES, "event")


_PUBLIC = "id, url, events, active, created_at"


@router.post("/v1/webhooks", status_code=201, response_model_exclude_unset=True)
async def create_subscription(
    body: NewSubscription, request: Request, principal: Admin
) -> models.NewWebhookSubscription:
    """The secret is returned once; deliveries are signed with it (see the README for verifying them)."""
    settings = request.app.state.settings
    try:
        await check_url(body.url, allow_private=settings.webhook_allow_private_networks)
    except BlockedAddress as exc:
        raise ApiError(422, "validation_error", f"url: {exc}") from None
    except (ValueError, OSError) as exc:
        raise ApiError(422, "validation_error", f"url: {exc}") from None
    secret = body.secret or "whsec_" + secrets.token_urlsafe(32)
    row = await request.app.state.pool.fetchrow(
        f"INSERT INTO webhook_subscriptions (id, tenant_id, environment, url, events, secret) "
        f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_PUBLIC}",
        "whk_" + secrets.token_hex(8), principal.tenant_id, principal.environment, body.url, body.events, secret,
    )  # fmt: skip
    return models.NewWebhookSubscription(**row, secret=secret)


@router.get("/v1/webhooks", response_model_exclude_unset=True)
async def list_subscriptions(request: Request, principal: Admin) -> models.WebhookSubscriptions:
    rows = await request.app.state.pool.fetch(
        f"SELECT {_PUBLIC} FROM webhook_subscriptions WHERE tenant_id = $1 AND environment = $2 ORDER BY created_at",
        principal.tenant_id, principal.environment,
    )  # fmt: skip
    return models.WebhookSubscriptions(data=[models.WebhookSubscription(**r) for r in rows])


async def _subscription_or_404(request: Request, principal: Principal, subscription_id: str) -> None:
    found = await request.app.state.pool.fetchval(
        "SELECT 1 FROM webhook_subscriptions WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        subscription_id, principal.tenant_id, principal.environment,
    )  # fmt: skip
    if not found:
        raise ApiError(404, "not_found", f"no webhook subscription with id {subscription_id!r}")


@router.delete("/v1/webhooks/{subscription_id}", status_code=204, response_class=Response)
async def delete_subscription(subscription_id: str, request: Request, principal: Admin) -> None:
    """Stops new deliveries and the retries of pending ones (marked failed, "subscription deleted"); the delivery
    log stays readable."""
    await _subscription_or_404(request, principal, subscription_id)
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE webhook_subscriptions SET active = false WHERE id = $1", subscription_id)
        await conn.execute(
            "UPDATE webhook_deliveries SET status = 'failed', last_error = 'subscription deleted' "
            "WHERE subscription_id = $1 AND status = 'pending'",
            subscription_id,
        )


@router.get("/v1/webhooks/{subscription_id}/deliveries", response_model_exclude_unset=True)
async def list_deliveries(
    subscription_id: str,
    request: Request,
    principal: Admin,
    status: Annotated[Literal["pending", "delivered", "failed"] | None, Query(), AnyCase] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> models.WebhookDeliveries:
    """Newest first, each with every attempt (time, HTTP status or error, duration)."""
    await _subscription_or_404(request, principal, subscription_id)
    pool = request.app.state.pool
    rows = await pool.fetch(
        "SELECT id, event, status, attempts, next_attempt_at, last_status_code, last_error, created_at, "
        "delivered_at, body FROM webhook_deliveries WHERE subscription_id = $1 AND ($2::text IS NULL OR status = $2) "
        "ORDER BY created_at DESC, id LIMIT $3",
        subscription_id, status, limit,
    )  # fmt: skip
    attempts: dict[str, list[models.WebhookAttempt]] = {}
    for a in await pool.fetch(
        "SELECT delivery_id, attempt, at, status_code, error, duration_ms FROM webhook_attempts "
        "WHERE delivery_id = ANY($1::text[]) ORDER BY delivery_id, attempt",
        [r["id"] for r in rows],
    ):
        attempts.setdefault(a["delivery_id"], []).append(
            models.WebhookAttempt(attempt=a["attempt"], at=a["at"], status_code=a["status_code"], error=a["error"],
                           duration_ms=a["duration_ms"])
        )  # fmt: skip
    return models.WebhookDeliveries(
        data=[models.WebhookDelivery(**r, attempt_log=attempts.get(r["id"], [])) for r in rows]
    )


@router.post("/v1/webhooks/deliveries/{delivery_id}/redeliver", status_code=202, response_model_exclude_unset=True)
async def redeliver(delivery_id: str, request: Request, principal: Admin) -> models.Redelivery:
    """Sends the delivery again now (same id, fresh 24-hour retry window), whatever its status."""
    row = await request.app.state.pool.fetchrow(
        """
        UPDATE webhook_deliveries d SET status = 'pending', next_attempt_at = now(), first_attempt_at = NULL
        FROM webhook_subscriptions s
        WHERE d.id = $1 AND s.id = d.subscription_id AND s.tenant_id = $2 AND s.environment = $3
        RETURNING d.id, d.status
        """,
        delivery_id, principal.tenant_id, principal.environment,
    )  # fmt: skip
    return models.Redelivery(**found(row, "webhook delivery", delivery_id))
