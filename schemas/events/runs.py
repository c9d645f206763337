"""Run events and their payloads: a run requested, queued, started, paused, canceled, ended, archived."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from schemas.events.common import (
    CursorWindow,
    ErrorInfo,
    EventBase,
    ExecutionMode,
    RetryStrategy,
    ReusedStep,
    TriggerInfo,
)
from schemas.flows import Environment, Frozen

# ---------------------------------------------------------------- payloads


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
    # A child linked by a trigger header whose failure fails its parent (docs/intake.md#nested-runs).
    fail_parent_on_failure: bool = False
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


# ---------------------------------------------------------------- events


class RunRequested(EventBase):
    type: Literal["RunRequested"] = "RunRequested"
    payload: RunRequestedPayload


class RunQueued(EventBase):
    type: Literal["RunQueued"] = "RunQueued"
    payload: Empty


class RunScheduled(EventBase):
    type: Literal["RunScheduled"] = "RunScheduled"
    payload: RunScheduledPayload


class RunBlocked(EventBase):
    type: Literal["RunBlocked"] = "RunBlocked"
    payload: ReasonPayload


class RunQuotaExceeded(EventBase):
    type: Literal["RunQuotaExceeded"] = "RunQuotaExceeded"
    payload: ReasonPayload


class RunInvalid(EventBase):
    type: Literal["RunInvalid"] = "RunInvalid"
    payload: ReasonPayload


class RunStarted(EventBase):
    type: Literal["RunStarted"] = "RunStarted"
    payload: RunStartedPayload


class RunPaused(EventBase):
    type: Literal["RunPaused"] = "RunPaused"
    payload: RunPausedPayload


class RunResumed(EventBase):
    type: Literal["RunResumed"] = "RunResumed"
    payload: RunResumedPayload


class RunCancelRequested(EventBase):
    type: Literal["RunCancelRequested"] = "RunCancelRequested"
    payload: RunCancelRequestedPayload


class RunCanceled(EventBase):
    type: Literal["RunCanceled"] = "RunCanceled"
    payload: RunFinishedPayload


class RunSucceeded(EventBase):
    type: Literal["RunSucceeded"] = "RunSucceeded"
    payload: RunFinishedPayload


class RunPartiallySucceeded(EventBase):
    type: Literal["RunPartiallySucceeded"] = "RunPartiallySucceeded"
    payload: RunFinishedPayload


class RunFailed(EventBase):
    type: Literal["RunFailed"] = "RunFailed"
    payload: RunFinishedPayload


class RunTimedOut(EventBase):
    type: Literal["RunTimedOut"] = "RunTimedOut"
    payload: RunFinishedPayload


class RunInternalError(EventBase):
    type: Literal["RunInternalError"] = "RunInternalError"
    payload: RunFinishedPayload


class RunArchived(EventBase):
    type: Literal["RunArchived"] = "RunArchived"
    payload: RunArchivedPayload
