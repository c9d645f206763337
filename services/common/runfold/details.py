"""Ledger events → the detail read models (attempts, logs, record errors, failure groups, rollups). Pure.

Like rows.plan, it sees only new events (already deduplicated by (run_id, seq)), so each counter
below is incremented exactly once per event however often Kafka redelivers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas import events as ev
from schemas.events import ATTEMPT_STATUS_OF, RECORD_COUNTERS, STEP_STATUS_OF, TERMINAL_EVENTS, EventBase
from schemas.status import StepStatus
from services.common.runfold.fingerprint import endpoint, fingerprint


@dataclass
class AttemptChange:
    run_id: str
    step: str
    attempt: int
    status: str
    input: Any = None
    error: dict[str, Any] | None = None
    retry_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    output: Any = None  # what the attempt answered (capped and masked by the executor, as a step's output)


@dataclass
class RunFailure:
    """A run's final error, fingerprinted; the failure group's row is aggregated from these in SQL."""

    category: str
    fingerprint: str
    pattern: str


@dataclass
class StepOutcome:
    """One StepSucceeded / StepFailed / StepAttemptFailed, counted into step_outcomes per flow version."""

    run_id: str
    flow_version: int
    step: str
    kind: str  # the step_outcomes column it counts in (_OUTCOME_COLUMN): succeeded | failed | retried
    occurred_at: datetime


@dataclass
class EndpointCall:
    run_id: str
    method: str
    host: str
    route: str
    occurred_at: datetime


@dataclass
class DetailPlan:
    attempts: dict[tuple[str, str, int], AttemptChange] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    record_errors: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, dict[str, int]] = field(default_factory=dict)  # run_id → counter deltas
    failures: dict[str, RunFailure] = field(default_factory=dict)  # run_id → its failure group
    finished: list[str] = field(default_factory=list)  # runs that reached a final status in this batch
    outcomes: list[StepOutcome] = field(default_factory=list)
    endpoints: list[EndpointCall] = field(default_factory=list)
    # RecordsUpserted events in log order; their environment comes from the run row, in the store.
    canonical: list[EventBase] = field(default_factory=list)


# The step status an event puts its step in (schemas/status.py) → the step_outcomes column that counts it: a
# StepAttemptFailed leaves its step RETRYING, counted as a retry.
_OUTCOME_COLUMN: dict[StepStatus | None, str] = {
    StepStatus.SUCCEEDED: "succeeded",
    StepStatus.FAILED: "failed",
    StepStatus.RETRYING: "retried",
}


def plan_details(events: list[EventBase]) -> DetailPlan:
    out = DetailPlan()
    for event in events:
        kind = type(event)
        if (attempt := _ATTEMPTS.get(kind)) is not None:
            attempt(out, event)
        if (column := _OUTCOME_OF.get(kind)) is not None:
            out.outcomes.append(
                StepOutcome(event.run_id, event.flow_version, event.payload.step, column, event.occurred_at)
            )
        if (record := _RECORDS.get(kind)) is not None:
            record(out, event)
        if (log := _STEP_LOGS.get(kind)) is not None:
            out.logs.append(log(event))
        elif kind in TERMINAL_EVENTS:
            out.finished.append(event.run_id)
            _failure(out, event)
    return out


# Ledger event classes have no subclasses: each event's part of the fold is found by its exact class, one dict
# look-up instead of a match statement's isinstance checks (class patterns on pydantic models are slow).
_OUTCOME_OF: dict[type[EventBase], str] = {
    t: column for t, status in STEP_STATUS_OF.items() if (column := _OUTCOME_COLUMN.get(status)) is not None
}


def _records_processed(out: DetailPlan, event: ev.RecordsProcessed) -> None:
    deltas = out.records.setdefault(event.run_id, dict.fromkeys(RECORD_COUNTERS, 0))
    for name, count in event.payload.model_dump(include=set(RECORD_COUNTERS)).items():
        deltas[name] += count


def _record_failed(out: DetailPlan, event: ev.RecordFailed) -> None:
    p = event.payload
    out.record_errors.append({
        "run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "step": p.step,
        "record_key": p.record_key, "field_path": p.field_path, "error": p.error,
        "raw_error": p.raw_error, "occurred_at": event.occurred_at,
    })  # fmt: skip


def _records_upserted(out: DetailPlan, event: ev.RecordsUpserted) -> None:
    out.canonical.append(event)


def _log_emitted(out: DetailPlan, event: ev.LogEmitted) -> None:
    p = event.payload
    out.logs.append({
        "run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "level": p.level,
        "step": p.step, "message": p.message, "fields": dict(p.fields), "occurred_at": event.occurred_at,
    })  # fmt: skip


_RECORDS: dict[type[EventBase], Callable[[DetailPlan, Any], None]] = {
    ev.RecordsProcessed: _records_processed,
    ev.RecordFailed: _record_failed,
    ev.RecordsUpserted: _records_upserted,
    ev.LogEmitted: _log_emitted,
}


def step_log(event: ev.StepStarted | ev.StepSucceeded | ev.StepSkipped) -> dict[str, Any]:
    """The INFO line a step's start, success or skip reads as in GET /v1/runs/{id}/logs: derived from that event
    alone, at its seq, so every run has a readable log with no LogEmitted per step in the ledger (issue 18 counts
    events per run) and a rebuild writes the same line. Migration 0023 writes the same lines, in SQL, for events
    projected before it: change a message here and there together (tests/integration/test_step_logs.py)."""
    return _STEP_LOGS[type(event)](event)


def _log_line(event: EventBase, message: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "level": "INFO",
            "step": event.payload.step, "message": message, "fields": fields,
            "occurred_at": event.occurred_at}  # fmt: skip


def _started_log(event: ev.StepStarted) -> dict[str, Any]:
    p = event.payload
    return _log_line(event, f"step {p.step} started ({p.action}, attempt {p.attempt})",
                     {"attempt": p.attempt, "action": p.action})  # fmt: skip


def _succeeded_log(event: ev.StepSucceeded) -> dict[str, Any]:
    p = event.payload
    if p.reused_from is not None:
        return _log_line(event, f"step {p.step} reused from run {p.reused_from}, not run again",
                         {"attempt": p.attempt, "reused_from": p.reused_from})  # fmt: skip
    return _log_line(event, f"step {p.step} succeeded in {int(p.duration_ms)} ms (attempt {p.attempt})",
                     {"attempt": p.attempt, "duration_ms": p.duration_ms})  # fmt: skip


def _skipped_log(event: ev.StepSkipped) -> dict[str, Any]:
    p = event.payload
    return _log_line(event, f"step {p.step} skipped: {p.reason or 'its run_condition was false'}",
                     {"reason": p.reason})  # fmt: skip


_STEP_LOGS: dict[type[EventBase], Callable[[Any], dict[str, Any]]] = {
    ev.StepStarted: _started_log,
    ev.StepSucceeded: _succeeded_log,
    ev.StepSkipped: _skipped_log,
}


def _attempt_started(out: DetailPlan, event: ev.StepStarted) -> None:
    p = event.payload
    change = _attempt_change(out, event, p.step, p.attempt)
    change.input = p.input
    change.started_at = event.occurred_at
    if p.action == "http_request" and isinstance(p.input, dict) and isinstance(p.input.get("url"), str):
        found = endpoint(str(p.input.get("method") or "GET"), p.input["url"])
        if found is not None:
            out.endpoints.append(EndpointCall(event.run_id, *found, event.occurred_at))


# Only what each event carries: the store merges a later batch's change with COALESCE, so a field an event does not
# have (StepCanceled has no duration) must leave the earlier value here too, or the row would depend on where the
# batches were cut (an attempt canceled while it waits to retry).
def _attempt_failed(out: DetailPlan, event: ev.StepAttemptFailed) -> None:
    p = event.payload
    _ended(_attempt_change(out, event, p.step, p.attempt), event, p.duration_ms, p.error, p.output)
    if p.retry_at is not None:
        out.attempts[(event.run_id, p.step, p.attempt)].retry_at = p.retry_at


def _attempt_succeeded(out: DetailPlan, event: ev.StepSucceeded) -> None:
    p = event.payload
    _ended(_attempt_change(out, event, p.step, p.attempt), event, p.duration_ms, None, p.output)


def _attempt_step_failed(out: DetailPlan, event: ev.StepFailed) -> None:
    p = event.payload
    _ended(_attempt_change(out, event, p.step, p.attempt), event, p.duration_ms, p.error, p.output)


def _attempt_canceled(out: DetailPlan, event: ev.StepCanceled) -> None:
    _ended(_attempt_change(out, event, event.payload.step, event.payload.attempt), event, None, None, None)


# What each event with an attempt status (schemas/status.py) folds into its attempt.
_ATTEMPTS: dict[type[EventBase], Callable[[DetailPlan, Any], None]] = {
    ev.StepStarted: _attempt_started,
    ev.StepAttemptFailed: _attempt_failed,
    ev.StepSucceeded: _attempt_succeeded,
    ev.StepFailed: _attempt_step_failed,
    ev.StepCanceled: _attempt_canceled,
}
_ATTEMPT_STATUS_VALUE: dict[type[EventBase], str] = {t: s.value for t, s in ATTEMPT_STATUS_OF.items()}


def _attempt_change(out: DetailPlan, event: EventBase, step: str, attempt: int) -> AttemptChange:
    """The attempt's change in this batch, its status set from the one table (schemas/status.py)."""
    status = _ATTEMPT_STATUS_VALUE[type(event)]
    key = (event.run_id, step, attempt)
    change = out.attempts.get(key)
    if change is None:
        change = out.attempts[key] = AttemptChange(event.run_id, step, attempt, status)
    change.status = status
    return change


def _ended(
    change: AttemptChange, event: EventBase, duration_ms: float | None, error: ev.ErrorInfo | None, output: Any
) -> None:
    change.finished_at = event.occurred_at
    if duration_ms is not None:
        change.duration_ms = duration_ms
    if error is not None:
        change.error = error.model_dump(mode="json")
    if output is not None:
        change.output = output


def _failure(out: DetailPlan, event: EventBase) -> None:
    """A run that ended with an error joins its failure group (RunInvalid and RunQuotaExceeded carry a reason only)."""
    if not isinstance(event.payload, ev.RunFinishedPayload) or (error := event.payload.error) is None:
        return
    fp, pattern = fingerprint(event.flow_id, event.payload.failed_step, error.category.value, error.message)
    out.failures[event.run_id] = RunFailure(error.category.value, fp, pattern)
