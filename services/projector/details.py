"""Ledger events → the detail read models (attempts, logs, record errors, failure groups, rollups). Pure.

Like fold.plan, it sees only new events (already deduplicated by (run_id, seq)), so each counter
below is incremented exactly once per event however often Kafka redelivers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.events import TERMINAL_EVENT_STATUS, EventBase
from schemas.status import ATTEMPT_STATUS_BY_EVENT
from services.projector.fingerprint import endpoint, fingerprint

RECORD_COUNTERS = ("read", "transformed", "written", "deduped", "skipped", "failed")


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
    kind: str  # succeeded | failed | retried
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


_ATTEMPT_STATUS = {t: s.value for t, s in ATTEMPT_STATUS_BY_EVENT.items()}  # the one table, schemas/status.py


def plan_details(events: list[EventBase]) -> DetailPlan:
    out = DetailPlan()
    for event in events:
        t = event.type
        if t in _ATTEMPT_STATUS:
            _attempt(out, event)
        if t in ("StepSucceeded", "StepFailed", "StepAttemptFailed"):
            _outcome(out, event)
        elif t == "RecordsProcessed":
            deltas = out.records.setdefault(event.run_id, dict.fromkeys(RECORD_COUNTERS, 0))
            for name in RECORD_COUNTERS:
                deltas[name] += getattr(event.payload, name)
        elif t == "RecordFailed":
            p = event.payload
            out.record_errors.append({
                "run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "step": p.step,
                "record_key": p.record_key, "field_path": p.field_path, "error": p.error, "raw_error": p.raw_error,
                "occurred_at": event.occurred_at,
            })  # fmt: skip
        elif t == "RecordsUpserted":
            out.canonical.append(event)
        elif t == "LogEmitted":
            p = event.payload
            out.logs.append({
                "run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "level": p.level,
                "step": p.step, "message": p.message, "fields": dict(p.fields), "occurred_at": event.occurred_at,
            })  # fmt: skip
        if t in ("StepStarted", "StepSucceeded", "StepSkipped"):
            out.logs.append(step_log(event))
        elif t in TERMINAL_EVENT_STATUS:
            out.finished.append(event.run_id)
            _failure(out, event)
    return out


def step_log(event: EventBase) -> dict[str, Any]:
    """The INFO line a step's start, success or skip reads as in GET /v1/runs/{id}/logs: derived from that event
    alone, at its seq, so every run has a readable log with no LogEmitted per step in the ledger (issue 18 counts
    events per run) and a rebuild writes the same line. Migration 0023 writes the same lines, in SQL, for events
    projected before it: change a message here and there together (tests/integration/test_step_logs.py)."""
    p = event.payload
    fields: dict[str, Any]
    match event.type:
        case "StepStarted":
            message = f"step {p.step} started ({p.action}, attempt {p.attempt})"
            fields = {"attempt": p.attempt, "action": p.action}
        case "StepSucceeded" if p.reused_from is not None:
            message = f"step {p.step} reused from run {p.reused_from}, not run again"
            fields = {"attempt": p.attempt, "reused_from": p.reused_from}
        case "StepSucceeded":
            message = f"step {p.step} succeeded in {int(p.duration_ms)} ms (attempt {p.attempt})"
            fields = {"attempt": p.attempt, "duration_ms": p.duration_ms}
        case _:  # StepSkipped
            message = f"step {p.step} skipped: {p.reason or 'its run_condition was false'}"
            fields = {"reason": p.reason}
    return {"run_id": event.run_id, "seq": event.seq, "tenant_id": event.tenant_id, "level": "INFO", "step": p.step,
            "message": message, "fields": fields, "occurred_at": event.occurred_at}  # fmt: skip


def _attempt(out: DetailPlan, event: EventBase) -> None:
    p = event.payload
    key = (event.run_id, p.step, getattr(p, "attempt", 1))
    change = out.attempts.get(key)
    if change is None:
        change = out.attempts[key] = AttemptChange(event.run_id, p.step, key[2], _ATTEMPT_STATUS[event.type])
    change.status = _ATTEMPT_STATUS[event.type]
    if event.type == "StepStarted":
        change.input = p.input
        change.started_at = event.occurred_at
        if p.action == "http_request" and isinstance(p.input, dict) and isinstance(p.input.get("url"), str):
            found = endpoint(str(p.input.get("method") or "GET"), p.input["url"])
            if found is not None:
                out.endpoints.append(EndpointCall(event.run_id, *found, event.occurred_at))
        return
    # Only what this event carries: the store merges a later batch's change with COALESCE, so a field an
    # event does not have (StepCanceled has no duration) must leave the earlier value here too, or the row
    # would depend on where the batches were cut (an attempt canceled while it waits to retry).
    change.finished_at = event.occurred_at
    duration_ms = getattr(p, "duration_ms", None)
    if duration_ms is not None:
        change.duration_ms = duration_ms
    error = getattr(p, "error", None)
    if error is not None:
        change.error = error.model_dump(mode="json")
    output = getattr(p, "output", None)
    if output is not None:
        change.output = output
    if event.type == "StepAttemptFailed" and p.retry_at is not None:
        change.retry_at = p.retry_at


_OUTCOME = {"StepSucceeded": "succeeded", "StepFailed": "failed", "StepAttemptFailed": "retried"}


def _outcome(out: DetailPlan, event: EventBase) -> None:
    out.outcomes.append(
        StepOutcome(event.run_id, event.flow_version, event.payload.step, _OUTCOME[event.type], event.occurred_at)
    )


def _failure(out: DetailPlan, event: EventBase) -> None:
    error = getattr(event.payload, "error", None)
    if error is None:
        return
    step = getattr(event.payload, "failed_step", None)
    fp, pattern = fingerprint(event.flow_id, step, error.category.value, error.message)
    out.failures[event.run_id] = RunFailure(error.category.value, fp, pattern)
