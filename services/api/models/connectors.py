"""Connectors with their health and the flows using them, and a verify's result."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from services.api.models import JSON, Out
from services.api.models.common import LastSuccess
from services.api.models.flows import ConnectorUse, FlowsMeta


class ConnectorFailure(Out):
    run_id: str | None = None
    step: str | None = None


class ConnectorHealth(LastSuccess):
    degraded_since: datetime | None = None
    last_error: JSON = None
    last_auth_failure_at: datetime | None = None
    last_failure: ConnectorFailure | None = None


class ConnectorFlow(Out):
    id: str
    name: str
    steps: list[ConnectorUse]


class Connector(Out):
    id: str
    name: str
    kind: str
    config: JSON = Field(description="credentials shown as ***")
    status: str
    health: ConnectorHealth
    flows: list[ConnectorFlow]
    last_verified_at: datetime | None = None
    last_verify: JSON = None
    created_at: datetime
    updated_at: datetime


class Connectors(Out):
    data: list[Connector]
    next_cursor: str | None
    meta: FlowsMeta


class ConnectorCheck(Out):
    connector_id: str
    ok: bool
    detail: JSON = None
    error: JSON = None
    latency_ms: float
    checked_at: datetime
