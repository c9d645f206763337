"""Webhook subscriptions and their delivery log."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from services.api.models import Out
from services.api.models.common import Delivery


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


class WebhookDelivery(Delivery):
    event: str
    attempt_log: list[WebhookAttempt]


class WebhookDeliveries(Out):
    data: list[WebhookDelivery]


class Redelivery(Out):
    id: str
    status: str
