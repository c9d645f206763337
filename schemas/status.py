"""The run and step status transition table (DESIGN 3): the executor decides with it, the projector checks with it."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    CREATED = "CREATED"
    QUEUED = "QUEUED"
    SCHEDULED = "SCHEDULED"
    INVALID = "INVALID"
    BLOCKED = "BLOCKED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    PARTIAL = "PARTIAL"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class StepStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELED = "CANCELED"


R = RunStatus
RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    R.CREATED: frozenset({R.QUEUED, R.SCHEDULED, R.INVALID}),
    # A scheduled run becomes due and joins the queue like any other.
    R.SCHEDULED: frozenset({R.QUEUED, R.CANCELED}),
    R.QUEUED: frozenset({R.RUNNING, R.BLOCKED, R.QUOTA_EXCEEDED, R.CANCELED}),
    R.BLOCKED: frozenset({R.QUEUED, R.CANCELED}),
    R.RUNNING: frozenset({R.PAUSED, R.SUCCEEDED, R.PARTIAL, R.FAILED, R.TIMED_OUT, R.CANCELED, R.INTERNAL_ERROR}),
    R.PAUSED: frozenset({R.RUNNING, R.CANCELED, R.TIMED_OUT}),
}
TERMINAL_RUN_STATUSES: frozenset[RunStatus] = frozenset(
    {R.SUCCEEDED, R.PARTIAL, R.FAILED, R.TIMED_OUT, R.CANCELED, R.INVALID, R.QUOTA_EXCEEDED, R.INTERNAL_ERROR}
)

S = StepStatus
STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    S.PENDING: frozenset({S.RUNNING, S.SKIPPED, S.CANCELED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.RETRYING, S.CANCELED}),
    S.RETRYING: frozenset({S.RUNNING, S.FAILED, S.CANCELED}),
}
TERMINAL_STEP_STATUSES: frozenset[StepStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.SKIPPED, S.CANCELED})

# Names the seeds use, mapped onto ours; the API accepts them in filters and documents them.
RUN_STATUS_ALIASES: dict[str, RunStatus] = {
    "PENDING": R.QUEUED,
    "INPROGRESS": R.RUNNING,
    "IN_PROGRESS": R.RUNNING,
    "SUCCESSFUL": R.SUCCEEDED,
    "PASSED": R.SUCCEEDED,
    "PARTIAL_SUCCEEDED": R.PARTIAL,
    "ERROR": R.FAILED,
    "STOPPED": R.CANCELED,
    "CANCELLED": R.CANCELED,
    "TIMEOUT": R.TIMED_OUT,
}


def can_transition(current: RunStatus, target: RunStatus) -> bool:
    return target in RUN_TRANSITIONS.get(current, frozenset())


def can_step_transition(current: StepStatus, target: StepStatus) -> bool:
    return target in STEP_TRANSITIONS.get(current, frozenset())


def is_terminal(status: RunStatus) -> bool:
    return status in TERMINAL_RUN_STATUSES


def parse_run_status(name: str) -> RunStatus:
    """Our name or a seed's alias (any case) → RunStatus; ValueError names the accepted values."""
    key = name.strip().upper()
    if key in RunStatus.__members__:
        return RunStatus(key)
    if key in RUN_STATUS_ALIASES:
        return RUN_STATUS_ALIASES[key]
    accepted = ", ".join([*RunStatus.__members__, *RUN_STATUS_ALIASES])
    raise ValueError(f"unknown run status {name!r}; accepted: {accepted}")
