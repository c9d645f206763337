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

# The seeds' words, each meaning a set of our statuses (one table; the API accepts them in filters and bulk bodies,
# in any case, and docs/runs.md lists them). Seed 000: Pending, InProgress, Successful, Partial, Error, Canceled;
# seed 001: TIMEOUT, STOPPED; seed 002: PARTIAL_SUCCEEDED, STOPPED; seed 004: passed, failed, error, cancelled,
# timed_out/timeout. "Error" and "failure" mean any run that ended in error, whichever way it did.
ENDED_IN_ERROR: frozenset[RunStatus] = frozenset({R.FAILED, R.TIMED_OUT, R.INTERNAL_ERROR, R.QUOTA_EXCEEDED, R.INVALID})
RUN_STATUS_ALIASES: dict[str, frozenset[RunStatus]] = {
    "PENDING": frozenset({R.CREATED, R.QUEUED, R.SCHEDULED, R.BLOCKED}),
    "INPROGRESS": frozenset({R.RUNNING, R.PAUSED}),
    "IN_PROGRESS": frozenset({R.RUNNING, R.PAUSED}),
    "SUCCESSFUL": frozenset({R.SUCCEEDED}),
    "SUCCESS": frozenset({R.SUCCEEDED}),
    "PASSED": frozenset({R.SUCCEEDED}),
    "PARTIAL_SUCCEEDED": frozenset({R.PARTIAL}),
    "ERROR": ENDED_IN_ERROR,
    "FAILURE": ENDED_IN_ERROR,
    "STOPPED": frozenset({R.CANCELED}),
    "CANCELLED": frozenset({R.CANCELED}),
    "TIMEOUT": frozenset({R.TIMED_OUT}),
}


def can_transition(current: RunStatus, target: RunStatus) -> bool:
    return target in RUN_TRANSITIONS.get(current, frozenset())


def can_step_transition(current: StepStatus, target: StepStatus) -> bool:
    return target in STEP_TRANSITIONS.get(current, frozenset())


def is_terminal(status: RunStatus) -> bool:
    return status in TERMINAL_RUN_STATUSES


def parse_run_statuses(name: str) -> frozenset[RunStatus]:
    """Our name or a seed's word (any case) → the statuses it means; ValueError names the accepted values."""
    key = name.strip().upper()
    if key in RunStatus.__members__:
        return frozenset({RunStatus(key)})
    if key in RUN_STATUS_ALIASES:
        return RUN_STATUS_ALIASES[key]
    accepted = ", ".join([*RunStatus.__members__, *RUN_STATUS_ALIASES])
    raise ValueError(f"unknown run status {name!r}; accepted: {accepted}")
