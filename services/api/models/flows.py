"""Flows, their versions and schedules, and the connectors their steps name."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from services.api.models import JSON, Out


class Schedule(Out):
    cron: str | None = None
    interval_s: float | None = None
    timezone: str
    next_run_at: datetime | None = None


class ConnectorUse(Out):
    step: str
    action: str
    role: str


class NamedConnector(Out):
    name: str
    used_by: list[ConnectorUse]


class FlowSummary(Out):
    id: str
    name: str
    description: str | None = None
    status: str
    environment: str
    trigger_type: str | None = None
    tags: list[str] = []
    latest_version: int
    schedule: Schedule | None = None
    connectors: list[str]
    last_run_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class FlowsMeta(Out):
    total: int
    has_more: bool


class FlowsPage(Out):
    data: list[FlowSummary]
    next_cursor: str | None
    meta: FlowsMeta


class FlowVersionRef(Out):
    version: int
    published_at: datetime


class FlowDetail(FlowSummary):
    connectors: list[NamedConnector]  # type: ignore[assignment]
    definition: JSON = Field(description="the latest definition, credentials in step inputs shown as ***")
    versions: list[FlowVersionRef]


class FlowWritten(FlowDetail):
    version: int
    projected: bool


class FlowPending(Out):
    """The write is durable; the read model has not caught up yet (GET shows it once projected)."""

    id: str
    version: int
    status: str
    projected: bool


class FlowVersion(Out):
    flow_id: str
    version: int
    published_at: datetime
    schedule: Schedule | None = None
    connectors: list[NamedConnector]
    definition: JSON = None
