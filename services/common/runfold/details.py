"""Ledger events → the detail read models (attempts, logs, record errors, failure groups, rollups). Pure.

Like rows.plan, it sees only new events (already deduplicated by (run_id, seq)), so each counter
below is incremented exactly once per event however often Kafka redelivers it.
"""

from __future__ import annotations

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
        if type(event) in ATTEMPT_STATUS_OF:
            _attempt(out, event)
        if (column := _OUTCOME_COLUMN.get(STEP_STATUS_OF.get(type(event)))) is not None:
            out.outcomes.append(
                StepOutcome(event.run_id, event.flow_version, event.payload.step, column, event.occurred_at)
            )
        match event:
            case ev.RecordsProcessed(payload=p):
                deltas = out.records.setdefault(event.run_id, dict.fromkeys(RECORD_COUNTERS, 0))
                for name, count in p.model_dump(include=set(RECORD_COUNTERS)).items():
                    deltas[name] += count
            case ev.RecordFailed(payload=p):
                out.record_errors.append({
                    "run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "step": p.step,
                    "record_key": p.record_key, "field_path": p.field_path, "error": p.error,
                    "raw_error": p.raw_error, "occurred_at": event.occurred_at,
                })  # fmt: skip
            case ev.RecordsUpserted():
                out.canonical.append(event)
            case ev.LogEmitted(payload=p):
                out.logs.append({
                    "run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "level": p.level,
                    "step": p.step, "message": p.message, "fields": dict(p.fields), "occurred_at": event.occurred_at,
                })  # fmt: skip
        if isinstance(event, ev.StepStarted | ev.StepSucceeded | ev.StepSkipped):
            out.logs.append(step_log(event))
        elif type(event) in TERMINAL_EVENTS:
            out.finished.append(event.run_id)
            _failure(out, event)
    return out


def step_log(event: ev.StepStarted | ev.StepSucceeded | ev.StepSkipped) -> dict[str, Any]:
    """The INFO line a step's start, success or skip reads as in GET /v1/runs/{id}/logs: derived from that event
    alone, at its seq, so every run has a readable log with no LogEmitted per step in the ledger (issue 18 counts
    events per run) and a rebuild writes the same line. Migration 0023 writes the same lines, in SQL, for events
    projected before it: change a message here and there together (tests/integration/test_step_logs.py)."""
    fields: dict[str, Any]
    match event:
        case ev.StepStarted(payload=p):
            message = f"step {p.step} started ({p.action}, attempt {p.attempt})"
            fields = {"attempt": p.attempt, "action": p.action}
        case ev.StepSucceeded(payload=p) if p.reused_from is not None:
            message = f"step {p.step} reused from run {p.reused_from}, not run again"
            fields = {"attempt": p.attempt, "reused_from": p.reused_from}
        case ev.StepSucceeded(payload=p):
            message = f"step {p.step} succeeded in {int(p.duration_ms)} ms (attempt {p.attempt})"
            fields = {"attempt": p.attempt, "duration_ms": p.duration_ms}
        case ev.StepSkipped(payload=p):
            message = f"step {p.step} skipped: {p.reason or 'its run_condition was false'}"
            fields = {"reason": p.reason}
    return {"run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "level": "INFO",
            "step": event.payload.step, "message": message, "fields": fields,
            "occurred_at": event.occurred_at}  # fmt: skip


def _attempt(out: DetailPlan, event: EventBase) -> None:
    match event:
        case ev.StepStarted(payload=p):
            change = _attempt_change(out, event, p.step, p.attempt)
            change.input = p.input
            change.started_at = event.occurred_at
            if p.action == "http_request" and isinstance(p.input, dict) and isinstance(p.input.get("url"), str):
                found = endpoint(str(p.input.get("method") or "GET"), p.input["url"])
                if found is not None:
                    out.endpoints.append(EndpointCall(event.run_id, *found, event.occurred_at))
        # Only what each event carries: the store merges a later batch's change with COALESCE, so a field an event
        # does not have (StepCanceled has no duration) must leave the earlier value here too, or the row would
        # depend on where the batches were cut (an attempt canceled while it waits to retry).
        case ev.StepAttemptFailed(payload=p):
            _ended(_attempt_change(out, event, p.step, p.attempt), event, p.duration_ms, p.error, p.output)
            if p.retry_at is not None:
                out.attempts[(event.run_id, p.step, p.attempt)].retry_at = p.retry_at
        case ev.StepSucceeded(payload=p):
            _ended(_attempt_change(out, event, p.step, p.attempt), event, p.duration_ms, None, p.output)
        case ev.StepFailed(payload=p):
            _ended(_attempt_change(out, event, p.step, p.attempt), event, p.duration_ms, p.error, p.output)
        case ev.StepCanceled(payload=p):
            _ended(_attempt_change(out, event, p.step, p.attempt), event, None, None, None)


def _attempt_change(out: DetailPlan, event: EventBase, step: str, attempt: int) -> AttemptChange:
    """The attempt's change in this batch, its status set from the one table (schemas/status.py)."""
    status = ATTEMPT_STATUS_OF[type(event)].value
    change = out.attempts.get((event.run_id, step, attempt))
    if change is None:
        change = out.attempts[(event.run_id, step, attempt)] = AttemptChange(event.run_id, step, attempt, status)
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
