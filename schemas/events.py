"""Ledger, flow and trigger events: frozen pydantic models in one discriminated union each (DESIGN 4)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.flows import Environment, FlowDefinition


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    # Readers ignore fields they do not know, so an optional field can be added without a
    # schema_version bump (DESIGN 4).
    model_config = ConfigDict(frozen=True, extra="ignore")


class TriggerType(StrEnum):
    SCHEDULE = "schedule"
    WEBHOOK = "webhook"
    MANUAL = "manual"
    API = "api"
    KAFKA = "kafka"
    RETRY = "retry"
    SUBFLOW = "subflow"


class ExecutionMode(StrEnum):
    LIVE = "live"
    ASYNC = "async"
    SCHEDULE = "schedule"


class ErrorCategory(StrEnum):
    TRANSIENT = "TRANSIENT"
    AUTH = "AUTH"
    VALIDATION = "VALIDATION"
    CONFLICT = "CONFLICT"
    INTERNAL = "INTERNAL"


class ErrorInfo(Frozen):
    category: ErrorCategory
    message: str
    code: str | None = None
    status_code: int | None = None
    field_path: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class TriggerInfo(Frozen):
    type: TriggerType
    caller: str | None = None  # API key id or user that fired it
    payload: Any = None


# ---------------------------------------------------------------- triggers topic (written by ingest)


class TriggerReceived(Frozen):
    """A request for a run, appended by ingest to the triggers topic, keyed by run_id."""

    type: Literal["TriggerReceived"] = "TriggerReceived"
    schema_version: int = 1
    trigger_id: str = Field(default_factory=new_id)
    tenant_id: str
    run_id: str
    flow_id: str
    flow_version: int | None = None  # None: the latest published version
    trigger: TriggerInfo
    environment: Environment = Environment.PRODUCTION
    execution_mode: ExecutionMode = ExecutionMode.ASYNC
    idempotency_key: str | None = None
    received_at: datetime = Field(default_factory=utcnow)


# ---------------------------------------------------------------- ledger (written by the executor)


class EventBase(Frozen):
    # Narrowed by every event class: `type` to its name, `payload` to its payload model.
    type: str
    payload: Any
    event_id: str = Field(default_factory=new_id)
    schema_version: int = 1
    tenant_id: str
    run_id: str
    flow_id: str
    flow_version: int
    seq: int = Field(ge=0)
    occurred_at: datetime = Field(default_factory=utcnow)
    causation_id: str
    correlation_id: str


class RunRequestedPayload(Frozen):
    trigger: TriggerInfo
    environment: Environment = Environment.PRODUCTION
    execution_mode: ExecutionMode = ExecutionMode.ASYNC
    flow_name: str = ""
    tags: tuple[str, ...] = ()
    parent_run_id: str | None = None
    retry_of: str | None = None
    bulk_operation_id: str | None = None
    received_at: datetime | None = None


class Empty(Frozen):
    pass


class ReasonPayload(Frozen):
    reason: str = ""
    errors: tuple[ErrorInfo, ...] = ()


class RunScheduledPayload(Frozen):
    run_at: datetime


class RunPausedPayload(Frozen):
    request_id: str
    step: str | None = None


class StepStartedPayload(Frozen):
    step: str
    # The step's index in the flow version; absent on events written before it was recorded.
    position: int | None = None
    action: str
    attempt: int = 1
    input: Any = None


class StepAttemptFailedPayload(Frozen):
    step: str
    attempt: int
    error: ErrorInfo
    retry_at: datetime | None = None
    duration_ms: float = 0


class AssertionResult(Frozen):
    expression: str
    operator: str
    expected: Any = None
    actual: Any = None
    passed: bool


class StepSucceededPayload(Frozen):
    step: str
    attempt: int = 1
    output: Any = None
    duration_ms: float = 0
    assertions: tuple[AssertionResult, ...] = ()
    extractions: dict[str, Any] = Field(default_factory=dict)


class StepFailedPayload(Frozen):
    step: str
    attempt: int = 1
    error: ErrorInfo
    output: Any = None
    duration_ms: float = 0
    assertions: tuple[AssertionResult, ...] = ()


class StepSkippedPayload(Frozen):
    step: str
    position: int | None = None
    reason: str = ""


class StepCanceledPayload(Frozen):
    step: str
    attempt: int = 1


class RecordsProcessedPayload(Frozen):
    step: str
    read: int = 0
    transformed: int = 0
    written: int = 0
    deduped: int = 0
    skipped: int = 0
    failed: int = 0


class RecordFailedPayload(Frozen):
    step: str
    record_key: str
    field_path: str | None = None
    error: str
    raw_error: Any = None


class LogEmittedPayload(Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    message: str
    step: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)


class RunCancelRequestedPayload(Frozen):
    reason: str = ""
    requested_by: str | None = None
    bulk_operation_id: str | None = None


class RunFinishedPayload(Frozen):
    duration_ms: float = 0
    failed_step: str | None = None
    error: ErrorInfo | None = None
    reason: str = ""


class RunArchivedPayload(Frozen):
    bulk_operation_id: str | None = None


def _event(name: str, payload: type[BaseModel]) -> type[EventBase]:
    # One small class per event type; the `type` literal is the discriminator.
    cls = type(
        name,
        (EventBase,),
        {
            "__annotations__": {"type": Literal[name], "payload": payload},  # type: ignore[valid-type]
            "type": name,
            "__module__": __name__,
            "__doc__": f"Ledger event {name}.",
        },
    )
    return cls


RunRequested = _event("RunRequested", RunRequestedPayload)
RunQueued = _event("RunQueued", Empty)
RunScheduled = _event("RunScheduled", RunScheduledPayload)
RunBlocked = _event("RunBlocked", ReasonPayload)
RunQuotaExceeded = _event("RunQuotaExceeded", ReasonPayload)
RunInvalid = _event("RunInvalid", ReasonPayload)
RunStarted = _event("RunStarted", Empty)
StepStarted = _event("StepStarted", StepStartedPayload)
StepAttemptFailed = _event("StepAttemptFailed", StepAttemptFailedPayload)
StepSucceeded = _event("StepSucceeded", StepSucceededPayload)
StepFailed = _event("StepFailed", StepFailedPayload)
StepSkipped = _event("StepSkipped", StepSkippedPayload)
StepCanceled = _event("StepCanceled", StepCanceledPayload)
RecordsProcessed = _event("RecordsProcessed", RecordsProcessedPayload)
RecordFailed = _event("RecordFailed", RecordFailedPayload)
LogEmitted = _event("LogEmitted", LogEmittedPayload)
RunPaused = _event("RunPaused", RunPausedPayload)
RunResumed = _event("RunResumed", Empty)
RunCancelRequested = _event("RunCancelRequested", RunCancelRequestedPayload)
RunCanceled = _event("RunCanceled", RunFinishedPayload)
RunSucceeded = _event("RunSucceeded", RunFinishedPayload)
RunPartiallySucceeded = _event("RunPartiallySucceeded", RunFinishedPayload)
RunFailed = _event("RunFailed", RunFinishedPayload)
RunTimedOut = _event("RunTimedOut", RunFinishedPayload)
RunInternalError = _event("RunInternalError", RunFinishedPayload)
RunArchived = _event("RunArchived", RunArchivedPayload)

LEDGER_EVENT_TYPES: tuple[type[EventBase], ...] = (
    RunRequested, RunQueued, RunScheduled, RunBlocked, RunQuotaExceeded, RunInvalid, RunStarted,
    StepStarted, StepAttemptFailed, StepSucceeded, StepFailed, StepSkipped, StepCanceled,
    RecordsProcessed, RecordFailed, LogEmitted, RunPaused, RunResumed, RunCancelRequested,
    RunCanceled, RunSucceeded, RunPartiallySucceeded, RunFailed, RunTimedOut, RunInternalError,
    RunArchived,
)  # fmt: skip
LEDGER_EVENTS_BY_TYPE: dict[str, type[EventBase]] = {cls.__name__: cls for cls in LEDGER_EVENT_TYPES}

LedgerEvent = Annotated[
    RunRequested
    | RunQueued
    | RunScheduled
    | RunBlocked
    | RunQuotaExceeded
    | RunInvalid
    | RunStarted  # type: ignore[valid-type]
    | StepStarted
    | StepAttemptFailed
    | StepSucceeded
    | StepFailed
    | StepSkipped
    | StepCanceled  # type: ignore[valid-type]
    | RecordsProcessed
    | RecordFailed
    | LogEmitted
    | RunPaused
    | RunResumed
    | RunCancelRequested  # type: ignore[valid-type]
    | RunCanceled
    | RunSucceeded
    | RunPartiallySucceeded
    | RunFailed
    | RunTimedOut  # type: ignore[valid-type]
    | RunInternalError
    | RunArchived,  # type: ignore[valid-type]
    Field(discriminator="type"),
]
LEDGER_ADAPTER: TypeAdapter[EventBase] = TypeAdapter(LedgerEvent)


# ---------------------------------------------------------------- flows topic


class FlowEventBase(Frozen):
    event_id: str = Field(default_factory=new_id)
    schema_version: int = 1
    tenant_id: str
    flow_id: str
    flow_version: int
    occurred_at: datetime = Field(default_factory=utcnow)


class FlowVersionPublished(FlowEventBase):
    type: Literal["FlowVersionPublished"] = "FlowVersionPublished"
    flow: FlowDefinition


class FlowPaused(FlowEventBase):
    type: Literal["FlowPaused"] = "FlowPaused"
    reason: str = ""


class FlowResumed(FlowEventBase):
    type: Literal["FlowResumed"] = "FlowResumed"


FlowEvent = Annotated[FlowVersionPublished | FlowPaused | FlowResumed, Field(discriminator="type")]
FLOW_EVENT_ADAPTER: TypeAdapter[FlowEventBase] = TypeAdapter(FlowEvent)

# Terminal ledger event type → the run status it sets.
TERMINAL_EVENT_STATUS = {
    "RunSucceeded": "SUCCEEDED",
    "RunPartiallySucceeded": "PARTIAL",
    "RunFailed": "FAILED",
    "RunTimedOut": "TIMED_OUT",
    "RunCanceled": "CANCELED",
    "RunInvalid": "INVALID",
    "RunQuotaExceeded": "QUOTA_EXCEEDED",
    "RunInternalError": "INTERNAL_ERROR",
}
