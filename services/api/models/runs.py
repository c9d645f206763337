"""Runs, their steps, events, logs and record errors, and the answers of the run actions."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import Field

from schemas.events import RecordCounts, RecordFailedPayload
from services.api.models import JSON, Out
from services.api.models.common import Timing

Line = TypeVar("Line", bound=Out)


class RunSummary(Timing):
    id: str
    flow_id: str
    flow_version: int | None = None
    flow_name: str | None = None
    status: str = Field(description="QUEUED, SCHEDULED, BLOCKED, QUOTA_EXCEEDED, INVALID, RUNNING, PAUSED, ...")
    environment: str
    execution_mode: str
    trigger_type: str
    caller: str | None = None
    tags: list[str] = []
    parent_run_id: str | None = None
    retry_of: str | None = None
    bulk_operation_id: str | None = None
    failed_step: str | None = None
    error_message: str | None = None
    steps_count: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    archived: bool | None = None
    error_category: str | None = None
    error_fingerprint: str | None = None


class RunsPage(Out):
    data: list[RunSummary]
    next_cursor: str | None
    prev_cursor: str | None


class Trigger(Out):
    type: str | None
    caller: str | None
    payload: JSON = None


class Records(RecordCounts, Out):
    pass


class DurationBreakdown(Out):
    total_ms: float | None = None
    queued_ms: float | None = None
    read_ms: float | None = None
    transform_ms: float | None = None
    write_ms: float | None = None
    wait_ms: float | None = None
    other_ms: float | None = None


class StepAttempt(Timing):
    attempt: int
    status: str
    error: JSON = None
    retry_at: datetime | None = None
    output: JSON = Field(
        default=None,
        description="what this attempt answered (an http_request's status, headers and body preview), capped and "
        "masked like the step's output",
    )


class RunStep(Timing):
    name: str
    position: int | None = None
    action: str | None = None
    status: str
    attempt: int | None = None
    input: JSON = None
    output: JSON = None
    error: JSON = None
    assertions: list[JSON] = []
    extractions: dict[str, JSON] = {}
    attempts: list[StepAttempt] = []
    reused_from: str | None = Field(
        default=None, description="FROM_FAILED_STEP: not run again in this run; the run in which the step ran"
    )
    reason: str | None = Field(
        default=None, description="a SKIPPED step: why it did not run (its run_condition and what it evaluated to)"
    )


class AsOf(Out):
    seq: int
    occurred_at: datetime


class RetryLink(Out):
    id: str
    strategy: str | None = Field(default=None, description="FROM_FAILED_STEP or ON_LATEST_VERSION")
    status: str
    created_at: datetime | None = None


class RunDetail(RunSummary):
    trigger: Trigger
    error: JSON = None
    cursor_window: JSON = None
    records: Records
    duration_breakdown: DurationBreakdown
    steps: list[RunStep]
    flow: JSON = Field(default=None, description="the flow definition of the version the run ran (secrets masked)")
    waiting_for: JSON = Field(default=None, description="while PAUSED: the human_input request to answer")
    as_of: AsOf | None = Field(default=None, description="with ?as_of=: the last event folded in")
    retry_strategy: str | None = Field(default=None, description="a retry: how it retried its `retry_of`")
    retries: list[RetryLink] = Field(default=[], description="the runs that retried this one, oldest first")


class RunEvent(Out):
    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    causation_id: str | None = None
    payload: JSON = None


class BySeq(Out, Generic[Line]):
    """A page of a run's lines in `seq` order: `has_more` when the page is full (ask again with `after_seq` = the
    last `seq` seen)."""

    data: list[Line]
    has_more: bool


class RunEvents(BySeq[RunEvent]):
    pass


class LogLine(Out):
    seq: int
    level: str
    step: str | None = None
    message: str
    fields: JSON = None
    occurred_at: datetime


class RunLogs(BySeq[LogLine]):
    pass


class RecordError(RecordFailedPayload, Out):  # a RecordFailed event's payload, with its place in the run
    seq: int
    occurred_at: datetime


class RunRecordErrors(BySeq[RecordError]):
    pass


# ---------------------------------------------------------------- run actions


class RetryAccepted(Out):
    id: str
    run_id: str
    retry_of: str
    strategy: str
    status: str


class ActionAccepted(Out):
    run_id: str
    status: str = Field(description="CANCEL_REQUESTED, RESUME_REQUESTED or ARCHIVE_REQUESTED")
    request_id: str | None = None


class AlreadyArchived(Out):
    run_id: str
    archived: bool


class BulkResult(Out):
    bulk_operation_id: str | None = Field(description="null for a dry run")
    action: Literal["retry", "cancel", "archive"]
    dry_run: bool
    matched: int
    count: int
    skipped: dict[str, int] = Field(description="runs left alone, by reason")
    sample: list[RunSummary]
    requested_at: datetime
    new_run_ids: list[str] | None = None
