"""Step events and their payloads: an attempt started, failed and retried, a step's end, its log lines."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from schemas.events.common import ErrorInfo, EventBase
from schemas.flows import Frozen

# ---------------------------------------------------------------- payloads


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


class ConnectorDegradedPayload(Frozen):
    """A step using a connector hit an AUTH error (docs/architecture.md#vocabulary): revoked or expired
    credentials, not a bad record."""

    connector: str
    step: str
    error: ErrorInfo


class LogEmittedPayload(Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    message: str
    step: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------- events


class StepStarted(EventBase):
    type: Literal["StepStarted"] = "StepStarted"
    payload: StepStartedPayload


class StepAttemptFailed(EventBase):
    type: Literal["StepAttemptFailed"] = "StepAttemptFailed"
    payload: StepAttemptFailedPayload


class StepSucceeded(EventBase):
    type: Literal["StepSucceeded"] = "StepSucceeded"
    payload: StepSucceededPayload


class StepFailed(EventBase):
    type: Literal["StepFailed"] = "StepFailed"
    payload: StepFailedPayload


class StepSkipped(EventBase):
    type: Literal["StepSkipped"] = "StepSkipped"
    payload: StepSkippedPayload


class StepCanceled(EventBase):
    type: Literal["StepCanceled"] = "StepCanceled"
    payload: StepCanceledPayload


class ConnectorDegraded(EventBase):
    type: Literal["ConnectorDegraded"] = "ConnectorDegraded"
    payload: ConnectorDegradedPayload


class LogEmitted(EventBase):
    type: Literal["LogEmitted"] = "LogEmitted"
    payload: LogEmittedPayload
