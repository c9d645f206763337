"""The types the client returns. The API's own answer models (services/api/models/, the schemas /openapi.json
declares) are reused as they are; the few answers without one are defined here (docs/client.md, Types)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from services.api.models import JSON, Out
from services.api.models.admin import AdminTenant, NewTenant, Tenant, Tenants
from services.api.models.alerts import Alert, AlertDetail, Alerts
from services.api.models.analytics import Endpoints, FailureGroups, FlakySteps, FlowAnalytics
from services.api.models.connectors import Connector, Connectors
from services.api.models.data import CanonicalRecord, CanonicalRecords
from services.api.models.diagnosis import RunDiagnosis
from services.api.models.flows import FlowDetail, FlowPending, FlowsPage, FlowSummary, FlowVersion, FlowWritten
from services.api.models.launch import ResumeAccepted
from services.api.models.runs import (
    ActionAccepted,
    AlreadyArchived,
    BulkResult,
    LogLine,
    RecordError,
    RetryAccepted,
    RunDetail,
    RunEvent,
    RunEvents,
    RunLogs,
    RunRecordErrors,
    RunsPage,
    RunStep,
    RunSummary,
)
from services.api.models.session import Session


class StreamEvent(Out):
    """One event of `GET /v1/runs/{id}/stream` (its `data`); the stream declares no model of its own. The same
    fields as a RunEvent but `event_id` and `causation_id`."""

    seq: int
    type: str
    occurred_at: datetime
    payload: JSON = None


__all__ = [
    "ActionAccepted",
    "AdminTenant",
    "Alert",
    "AlertDetail",
    "Alerts",
    "AlreadyArchived",
    "BatchAccepted",
    "BulkResult",
    "CanonicalRecord",
    "CanonicalRecords",
    "Connector",
    "Connectors",
    "Endpoints",
    "FailureGroups",
    "FlakySteps",
    "FlowAnalytics",
    "FlowDetail",
    "FlowPending",
    "FlowSummary",
    "FlowVersion",
    "FlowWritten",
    "FlowsPage",
    "LiveResult",
    "LogLine",
    "NewTenant",
    "RecordError",
    "ResumeAccepted",
    "RetryAccepted",
    "RunDetail",
    "RunDiagnosis",
    "RunEvent",
    "RunEvents",
    "RunLogs",
    "RunRecordErrors",
    "RunStep",
    "RunSummary",
    "RunsPage",
    "Session",
    "StreamEvent",
    "Tenant",
    "Tenants",
    "TriggerAccepted",
]


# The trigger answers are the intake's own models (services/common/triggering.py); that module imports FastAPI,
# so they are imported when first used rather than with the client.
_TRIGGER_ANSWERS = ("BatchAccepted", "LiveResult", "TriggerAccepted")

if TYPE_CHECKING:
    from services.common.triggering import BatchAccepted, LiveResult, TriggerAccepted


def __getattr__(name: str) -> Any:
    if name in _TRIGGER_ANSWERS:
        from services.common import triggering

        return getattr(triggering, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
