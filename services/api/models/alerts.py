"""Alert rules with their state, fired alerts and their deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from services.api.models import JSON, Out
from services.api.models.common import Delivery, LastSuccess


class AlertRuleState(LastSuccess):
    open: bool
    consecutive_partial: int
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
    objective: float | None = None
    period_days: float | None = None
    fast_long_minutes: float | None = None
    fast_short_minutes: float | None = None
    fast_factor: float | None = None
    slow_long_minutes: float | None = None
    slow_short_minutes: float | None = None
    slow_factor: float | None = None
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


class AlertDelivery(Delivery):
    action: str
    channel_index: int
    channel_type: str
    target: str
    attempt_log: JSON = None


class AlertDetail(Alert):
    deliveries: list[AlertDelivery]
