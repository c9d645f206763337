"""Alert rules with their state, fired alerts and their deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from services.api.models import JSON, Out


class AlertRuleState(Out):
    open: bool
    consecutive_partial: int
    last_success_at: datetime | None = None
    last_success_run_id: str | None = None
    evaluated_at: datetime | None = None


class AlertRule(Out):
    id: str
    name: str
    flow_id: str
    kind: str
    n: int | None = None
    minutes: float | None = None
    threshold: float | None = None
    window_minutes: float | None = None
    min_runs: int | None = None
    channels: list[JSON]
    enabled: bool
    created_at: datetime
    updated_at: datetime
    state: AlertRuleState


class NewAlertRule(AlertRule):
    secret: str = Field(description="signs generic webhook alert deliveries; shown this once")


class AlertRules(Out):
    data: list[AlertRule]


class Alert(Out):
    id: str
    rule_id: str
    flow_id: str
    kind: str
    run_id: str | None = None
    fired_at: datetime
    reason: str
    payload: JSON = None
    resolved_at: datetime | None = None
    resolved_by_run_id: str | None = None
    status: Literal["open", "resolved"]


class Alerts(Out):
    data: list[Alert]
    next_cursor: str | None


class AlertDelivery(Out):
    id: str
    action: str
    channel_index: int
    channel_type: str
    target: str
    status: str
    attempts: int
    attempt_log: JSON = None
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    body: JSON = None


class AlertDetail(Alert):
    deliveries: list[AlertDelivery]
