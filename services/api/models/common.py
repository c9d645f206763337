"""Parts that several resources' answers share because they mean the same thing in each."""

from __future__ import annotations

from datetime import datetime

from services.api.models import JSON, Out


class Timing(Out):
    """When something that runs (a run, a step, a step's attempt) started and finished, and how long it took."""

    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None


class LastSuccess(Out):
    """The last run that succeeded (a connector's health, an alert rule's state)."""

    last_success_at: datetime | None = None
    last_success_run_id: str | None = None


class Delivery(Out):
    """A message the projector's dispatchers deliver with retries (a webhook's, an alert channel's): its state."""

    id: str
    status: str
    attempts: int
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    body: JSON = None
