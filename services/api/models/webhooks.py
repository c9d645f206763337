"""Webhook subscriptions and their delivery log."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from services.api.models import JSON, Out


class WebhookSubscription(Out):
    id: str
    url: str
    events: list[str]
    active: bool
    created_at: datetime


class NewWebhookSubscription(WebhookSubscription):
    secret: str = Field(description="signs deliveries; shown this once")


class WebhookSubscriptions(Out):
    data: list[WebhookSubscription]


class WebhookAttempt(Out):
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None


class WebhookDelivery(Out):
    id: str
    event: str
    status: str
    attempts: int
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    body: JSON = None
    attempt_log: list[WebhookAttempt]


class WebhookDeliveries(Out):
    data: list[WebhookDelivery]


class Redelivery(Out):
    id: str
    status: str
