"""Ledger, flow and trigger events: frozen pydantic models in one discriminated union each (architecture.md: events)."""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.flows import Environment, FlowDefinition
from schemas.status import TERMINAL_RUN_EVENTS


def new_id() -> str:
    return uuid.uuid4().hex


def new_run_id() -> str:
    """`run_<ms since epoch, hex><64 random bits>`: time-ordered, so ids sort roughly by creation and index
    inserts stay local."""
    return f"run_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    # Readers ignore fields they do not know, so an optional field can be added without a
    # schema_version bump (architecture.md: events).
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


class RetryStrategy(StrEnum):
    FROM_FAILED_STEP = "FROM_FAILED_STEP"
    ON_LATEST_VERSION = "ON_LATEST_VERSION"


class CursorWindow(Frozen):
    """The `updated_since` / `updated_until` bounds a syncing run reads (seed 000); a retry reads the same."""

    updated_since: datetime | None = None
    updated_until: datetime


class ReusedStep(Frozen):
    """What a step a FROM_FAILED_STEP retry does not run again recorded where it ran; its output is in `reuse`."""

    # The run in which the step ran: the first run of a retry chain that executed it, not a retry that reused it.
    run_id: str
    input: Any = None
    extractions: dict[str, Any] = Field(default_factory=dict)


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
    # A run that starts later: it waits as SCHEDULED until then.
    run_at: datetime | None = None
    # A subflow's child run: the parent run, and the step (and its attempt) that waits for it.
    parent_run_id: str | None = None
    parent_step: str | None = None
    parent_attempt: int | None = None
    # A retry (seed 001): the run retried, how, and for FROM_FAILED_STEP the outputs of the steps that succeeded.
    retry_of: str | None = None
    retry_strategy: RetryStrategy | None = None
    reuse: dict[str, Any] = Field(default_factory=dict)
    # The same steps: where each ran, its (masked) input and its extractions (absent from older triggers).
    reused: dict[str, ReusedStep] = Field(default_factory=dict)
    # The records to process again, by step (a retry of a PARTIAL run processes only the failed ones).
    only_keys: dict[str, list[str]] = Field(default_factory=dict)
    # The window a syncing run reads; a retry carries the original run's window.
    cursor_window: CursorWindow | None = None
    bulk_operation_id: str | None = None


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
    parent_step: str | None = None
    parent_attempt: int | None = None
    retry_strategy: RetryStrategy | None = None
    only_keys: dict[str, list[str]] = Field(default_factory=dict)
    run_at: datetime | None = None
    cursor_window: CursorWindow | None = None
    # FROM_FAILED_STEP: step name → its output in the retried run; recorded as that step's StepSucceeded.
    reuse: dict[str, Any] = Field(default_factory=dict)
    # The same steps: where each ran, its input and extractions (absent from events written before it was recorded).
    reused: dict[str, ReusedStep] = Field(default_factory=dict)


class Empty(Frozen):
    pass


class RunStartedPayload(Frozen):
    cursor_window: CursorWindow | None = None


class ReasonPayload(Frozen):
    reason: str = ""
    errors: tuple[ErrorInfo, ...] = ()


class RunScheduledPayload(Frozen):
    run_at: datetime


class RunPausedPayload(Frozen):
    request_id: str
    step: str | None = None
    # A human_input step's request: what to ask, and when the wait ends (the run then times out).
    prompt: Any = None
    expires_at: datetime | None = None


class RunResumedPayload(Frozen):
    request_id: str | None = None
    resumed_by: str | None = None


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
    # What the attempt answered (an http_request's status and body preview), capped and masked like a step's
    # output; absent on events written before it was recorded.
    output: Any = None


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
    # Not executed again (FROM_FAILED_STEP): the run in which this step ran and produced this output and these
    # extractions. Older events name the run retried, which may itself have reused the step.
    reused_from: str | None = None
    # Set on a reused step only (it has no StepStarted): its index in the flow version, action and input.
    position: int | None = None
    action: str | None = None
    input: Any = None


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
    # What the step would have done, and why it did not: its action, its input as rendered (secrets masked; null
    # when it cannot be rendered, e.g. it names a step that was skipped too), its run_condition and the value
    # that condition evaluated to. Absent on events written before they were recorded.
    action: str | None = None
    input: Any = None
    run_condition: str | None = None
    condition_value: Any = None


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


CANONICAL_ENTITIES = (
    "customer", "contact", "account", "lead", "opportunity", "product", "product_variant", "order",
    "order_line_item", "invoice", "payment", "subscription", "refund", "shipment", "inventory",
)  # fmt: skip


class CanonicalRecord(Frozen):
    """One normalised record as a sync step wrote it; its external ids (source to id) deduplicate it."""

    external_ids: dict[str, str] = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)
    source_updated_at: datetime | None = None


class RecordsUpsertedPayload(Frozen):
    step: str
    entity: Literal[
        "customer", "contact", "account", "lead", "opportunity", "product", "product_variant", "order",
        "order_line_item", "invoice", "payment", "subscription", "refund", "shipment", "inventory",
    ]  # fmt: skip
    records: tuple[CanonicalRecord, ...]


class ConnectorDegradedPayload(Frozen):
    """A step using a connector hit an AUTH error (seed 000): revoked or expired credentials, not a bad record."""

    connector: str
    step: str
    error: ErrorInfo


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


class RunRequested(EventBase):
    """Ledger event RunRequested."""

    type: Literal["RunRequested"] = "RunRequested"
    payload: RunRequestedPayload


class RunQueued(EventBase):
    """Ledger event RunQueued."""

    type: Literal["RunQueued"] = "RunQueued"
    payload: Empty


class RunScheduled(EventBase):
    """Ledger event RunScheduled."""

    type: Literal["RunScheduled"] = "RunScheduled"
    payload: RunScheduledPayload


class RunBlocked(EventBase):
    """Ledger event RunBlocked."""

    type: Literal["RunBlocked"] = "RunBlocked"
    payload: ReasonPayload


class RunQuotaExceeded(EventBase):
    """Ledger event RunQuotaExceeded."""

    type: Literal["RunQuotaExceeded"] = "RunQuotaExceeded"
    payload: ReasonPayload


class RunInvalid(EventBase):
    """Ledger event RunInvalid."""

    type: Literal["RunInvalid"] = "RunInvalid"
    payload: ReasonPayload


class RunStarted(EventBase):
    """Ledger event RunStarted."""

    type: Literal["RunStarted"] = "RunStarted"
    payload: RunStartedPayload


class StepStarted(EventBase):
    """Ledger event StepStarted."""

    type: Literal["StepStarted"] = "StepStarted"
    payload: StepStartedPayload


class StepAttemptFailed(EventBase):
    """Ledger event StepAttemptFailed."""

    type: Literal["StepAttemptFailed"] = "StepAttemptFailed"
    payload: StepAttemptFailedPayload


class StepSucceeded(EventBase):
    """Ledger event StepSucceeded."""

    type: Literal["StepSucceeded"] = "StepSucceeded"
    payload: StepSucceededPayload


class StepFailed(EventBase):
    """Ledger event StepFailed."""

    type: Literal["StepFailed"] = "StepFailed"
    payload: StepFailedPayload


class StepSkipped(EventBase):
    """Ledger event StepSkipped."""

    type: Literal["StepSkipped"] = "StepSkipped"
    payload: StepSkippedPayload


class StepCanceled(EventBase):
    """Ledger event StepCanceled."""

    type: Literal["StepCanceled"] = "StepCanceled"
    payload: StepCanceledPayload


class RecordsProcessed(EventBase):
    """Ledger event RecordsProcessed."""

    type: Literal["RecordsProcessed"] = "RecordsProcessed"
    payload: RecordsProcessedPayload


class RecordFailed(EventBase):
    """Ledger event RecordFailed."""

    type: Literal["RecordFailed"] = "RecordFailed"
    payload: RecordFailedPayload


class RecordsUpserted(EventBase):
    """Ledger event RecordsUpserted: canonical records a sync step wrote, for the data API (seed 003)."""

    type: Literal["RecordsUpserted"] = "RecordsUpserted"
    payload: RecordsUpsertedPayload


class ConnectorDegraded(EventBase):
    """Ledger event ConnectorDegraded."""

    type: Literal["ConnectorDegraded"] = "ConnectorDegraded"
    payload: ConnectorDegradedPayload


class LogEmitted(EventBase):
    """Ledger event LogEmitted."""

    type: Literal["LogEmitted"] = "LogEmitted"
    payload: LogEmittedPayload


class RunPaused(EventBase):
    """Ledger event RunPaused."""

    type: Literal["RunPaused"] = "RunPaused"
    payload: RunPausedPayload


class RunResumed(EventBase):
    """Ledger event RunResumed."""

    type: Literal["RunResumed"] = "RunResumed"
    payload: RunResumedPayload


class RunCancelRequested(EventBase):
    """Ledger event RunCancelRequested."""

    type: Literal["RunCancelRequested"] = "RunCancelRequested"
    payload: RunCancelRequestedPayload


class RunCanceled(EventBase):
    """Ledger event RunCanceled."""

    type: Literal["RunCanceled"] = "RunCanceled"
    payload: RunFinishedPayload


class RunSucceeded(EventBase):
    """Ledger event RunSucceeded."""

    type: Literal["RunSucceeded"] = "RunSucceeded"
    payload: RunFinishedPayload


class RunPartiallySucceeded(EventBase):
    """Ledger event RunPartiallySucceeded."""

    type: Literal["RunPartiallySucceeded"] = "RunPartiallySucceeded"
    payload: RunFinishedPayload


class RunFailed(EventBase):
    """Ledger event RunFailed."""

    type: Literal["RunFailed"] = "RunFailed"
    payload: RunFinishedPayload


class RunTimedOut(EventBase):
    """Ledger event RunTimedOut."""

    type: Literal["RunTimedOut"] = "RunTimedOut"
    payload: RunFinishedPayload


class RunInternalError(EventBase):
    """Ledger event RunInternalError."""

    type: Literal["RunInternalError"] = "RunInternalError"
    payload: RunFinishedPayload


class RunArchived(EventBase):
    """Ledger event RunArchived."""

    type: Literal["RunArchived"] = "RunArchived"
    payload: RunArchivedPayload


LEDGER_EVENT_TYPES: tuple[type[EventBase], ...] = (
    RunRequested, RunQueued, RunScheduled, RunBlocked, RunQuotaExceeded, RunInvalid, RunStarted,
    StepStarted, StepAttemptFailed, StepSucceeded, StepFailed, StepSkipped, StepCanceled,
    RecordsProcessed, RecordFailed, RecordsUpserted, ConnectorDegraded, LogEmitted, RunPaused, RunResumed,
    RunCancelRequested, RunCanceled, RunSucceeded, RunPartiallySucceeded, RunFailed, RunTimedOut, RunInternalError,
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
    | RunStarted
    | StepStarted
    | StepAttemptFailed
    | StepSucceeded
    | StepFailed
    | StepSkipped
    | StepCanceled
    | RecordsProcessed
    | RecordFailed
    | RecordsUpserted
    | ConnectorDegraded
    | LogEmitted
    | RunPaused
    | RunResumed
    | RunCancelRequested
    | RunCanceled
    | RunSucceeded
    | RunPartiallySucceeded
    | RunFailed
    | RunTimedOut
    | RunInternalError
    | RunArchived,
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

# ---------------------------------------------------------------- commands topic (written by the API, keyed by run_id)


class CommandBase(Frozen):
    """An action on one run; the executor owning the run's partition turns it into ledger events (or ignores it)."""

    type: str  # narrowed by every command class to its name
    command_id: str = Field(default_factory=new_id)
    schema_version: int = 1
    tenant_id: str
    run_id: str
    issued_at: datetime = Field(default_factory=utcnow)
    issued_by: str | None = None  # the API key id, or `executor` for commands runs send each other
    bulk_operation_id: str | None = None


class CancelRun(CommandBase):
    type: Literal["CancelRun"] = "CancelRun"
    reason: str = ""


class ResumeRun(CommandBase):
    """Answers a paused human_input step: `payload` becomes the step's output."""

    type: Literal["ResumeRun"] = "ResumeRun"
    request_id: str
    payload: Any = None


class ChildRunFinished(CommandBase):
    """Sent by the executor of a subflow's child run to the parent run (`run_id`) when the child ends."""

    type: Literal["ChildRunFinished"] = "ChildRunFinished"
    child_run_id: str
    step: str
    attempt: int
    status: str
    output: Any = None
    error: ErrorInfo | None = None


class ArchiveRun(CommandBase):
    """Hide a finished run from default listings (seed 001). The envelope of its RunArchived comes with it: the
    executor keeps only the ids and next seq of finished runs, not their state."""

    type: Literal["ArchiveRun"] = "ArchiveRun"
    flow_id: str
    flow_version: int
    correlation_id: str


Command = Annotated[CancelRun | ResumeRun | ChildRunFinished | ArchiveRun, Field(discriminator="type")]
COMMAND_ADAPTER: TypeAdapter[CommandBase] = TypeAdapter(Command)

# Terminal ledger event type → the run status it sets.
# Event type → the terminal status it ends a run in (values as text), from the one table in schemas/status.py.
TERMINAL_EVENT_STATUS: dict[str, str] = {t: s.value for t, s in TERMINAL_RUN_EVENTS.items()}
