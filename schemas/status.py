"""The run and step status table (docs/architecture.md, vocabulary): transitions, terminal sets, event → status."""

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
    R.SCHEDULED: frozenset({R.QUEUED, R.CANCELED, R.INTERNAL_ERROR}),
    R.QUEUED: frozenset({R.RUNNING, R.BLOCKED, R.QUOTA_EXCEEDED, R.CANCELED, R.INTERNAL_ERROR}),
    R.BLOCKED: frozenset({R.QUEUED, R.CANCELED, R.INTERNAL_ERROR}),
    R.RUNNING: frozenset({R.PAUSED, R.SUCCEEDED, R.PARTIAL, R.FAILED, R.TIMED_OUT, R.CANCELED, R.INTERNAL_ERROR}),
    # An executor bug can end a run in any status it waits in, not only RUNNING: the run still ends (invariant 5).
    R.PAUSED: frozenset({R.RUNNING, R.CANCELED, R.TIMED_OUT, R.INTERNAL_ERROR}),
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

# The one event → status table: the run status a run event puts the run in, the status a step event puts its step
# in, and the outcome it records for that attempt. The executor's and the projector's folds, the webhooks, alerts and
# streams all read these; a new event or status is added here once.
RUN_STATUS_BY_EVENT: dict[str, RunStatus] = {
    "RunRequested": R.CREATED,
    "RunQueued": R.QUEUED,
    "RunScheduled": R.SCHEDULED,
    "RunBlocked": R.BLOCKED,
    "RunStarted": R.RUNNING,
    "RunPaused": R.PAUSED,
    "RunResumed": R.RUNNING,
    "RunSucceeded": R.SUCCEEDED,
    "RunPartiallySucceeded": R.PARTIAL,
    "RunFailed": R.FAILED,
    "RunTimedOut": R.TIMED_OUT,
    "RunCanceled": R.CANCELED,
    "RunInvalid": R.INVALID,
    "RunQuotaExceeded": R.QUOTA_EXCEEDED,
    "RunInternalError": R.INTERNAL_ERROR,
}
# The events that end a run, and the status each ends it in.
TERMINAL_RUN_EVENTS: dict[str, RunStatus] = {t: s for t, s in RUN_STATUS_BY_EVENT.items() if s in TERMINAL_RUN_STATUSES}
# A failed attempt that will be retried leaves its step RETRYING; the attempt itself FAILED.
STEP_STATUS_BY_EVENT: dict[str, StepStatus] = {
    "StepStarted": S.RUNNING,
    "StepAttemptFailed": S.RETRYING,
    "StepSucceeded": S.SUCCEEDED,
    "StepFailed": S.FAILED,
    "StepSkipped": S.SKIPPED,
    "StepCanceled": S.CANCELED,
}
ATTEMPT_STATUS_BY_EVENT: dict[str, StepStatus] = {
    "StepStarted": S.RUNNING,
    "StepAttemptFailed": S.FAILED,
    "StepSucceeded": S.SUCCEEDED,
    "StepFailed": S.FAILED,
    "StepCanceled": S.CANCELED,
}

# The product documents' words (docs/origins.md), each meaning a set of our statuses (one table; the API accepts
# them in filters and bulk bodies, in any case, and docs/runs.md lists them). Runs page: Pending, InProgress,
# Successful, Partial, Error, Canceled; run API: TIMEOUT, STOPPED; launch API: PARTIAL_SUCCEEDED, STOPPED;
# executions page: passed, failed, error, cancelled,
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
