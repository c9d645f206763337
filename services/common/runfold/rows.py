"""Ledger events → runs and run_steps row changes, coalesced per run and per step: pure, no I/O.

A batch's new events (already deduplicated by (run_id, seq)) become at most one INSERT or UPDATE
per run and one upsert per step, however many events each run had in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas import events as ev
from schemas.events import RUN_STATUS_OF, STEP_STATUS_OF, EventBase
from schemas.status import RunStatus, can_transition


@dataclass
class RunChange:
    """Columns to set on an existing run; None leaves a column as it is."""

    id: str
    status: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    failed_step: str | None = None
    error: dict[str, Any] | None = None
    error_message: str | None = None
    steps_delta: int = 0
    updated_at: datetime | None = None
    last_seq: int = -1
    archived: bool | None = None
    cursor_window: dict[str, Any] | None = None
    bulk_operation_id: str | None = None  # the last bulk operation that canceled or archived the run


@dataclass
class StepChange:
    run_id: str
    step: str
    position: int
    status: str
    action: str | None = None
    attempt: int | None = None
    input: Any = None
    output: Any = None
    error: dict[str, Any] | None = None
    assertions: Any = None
    extractions: Any = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    reused_from: str | None = None  # FROM_FAILED_STEP: the run in which the step ran; not run again here
    reason: str | None = None  # why a skipped step did not run: its run_condition and what it evaluated to


@dataclass
class BatchPlan:
    new_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_changes: dict[str, RunChange] = field(default_factory=dict)
    step_changes: dict[tuple[str, str], StepChange] = field(default_factory=dict)
    # (run_id, seq, from, to) for status changes the transition table does not allow, seen within the
    # batch: the executor never decides them, so one here means input out of order or a bug upstream.
    out_of_order: list[tuple[str, int, str, str]] = field(default_factory=list)


def new_run_row(event: ev.RunRequested) -> dict[str, Any]:
    p = event.payload
    return {
        "id": event.run_id,
        "tenant_id": event.tenant_id,
        "flow_id": event.flow_id,
        "flow_version": event.flow_version,
        "flow_name": p.flow_name,
        "status": RunStatus.CREATED.value,
        "environment": p.environment.value,
        "execution_mode": p.execution_mode.value,
        "trigger_type": p.trigger.type.value,
        "caller": p.trigger.caller,
        "trigger_payload": p.trigger.payload,
        "tags": list(p.tags),
        "parent_run_id": p.parent_run_id,
        "retry_of": p.retry_of,
        "retry_strategy": p.retry_strategy.value if p.retry_strategy else None,
        "bulk_operation_id": p.bulk_operation_id,
        # Accepted, not picked up: the time ingest (or the API) answered 202, so queued time shows a backlog.
        "created_at": p.received_at or event.occurred_at,
        "updated_at": event.occurred_at,
        "last_seq": event.seq,
    }


def plan(events: list[EventBase]) -> BatchPlan:
    """Fold new events (in log order) into one change per run and per step."""
    out = BatchPlan()
    last_status: dict[str, RunStatus] = {}
    for event in events:
        status = RUN_STATUS_OF.get(type(event))
        if status is not None:
            before = last_status.get(event.run_id)
            if before is not None and before != status and not can_transition(before, status):
                out.out_of_order.append((event.run_id, event.seq, before.value, status.value))
            last_status[event.run_id] = status
        if isinstance(event, ev.RunRequested):
            out.new_runs[event.run_id] = new_run_row(event)
        else:
            _run_event(out, event)
        if type(event) in STEP_STATUS_OF:
            _step_event(out, event)
    return out


def _run_event(out: BatchPlan, event: EventBase) -> None:
    row = out.new_runs.get(event.run_id)
    if row is not None:
        # The run was created in this batch: fold into the row to insert.
        change = RunChange(id=event.run_id)
        _apply_run(change, event)
        for key, value in vars(change).items():
            if key == "steps_delta":
                row["steps_count"] = row.get("steps_count", 0) + value
            elif key not in ("id",) and value is not None and value != -1:
                row[key] = value
        return
    change = out.run_changes.setdefault(event.run_id, RunChange(id=event.run_id))
    _apply_run(change, event)


def _apply_run(change: RunChange, event: EventBase) -> None:
    change.updated_at = event.occurred_at
    change.last_seq = max(change.last_seq, event.seq)
    if (status := RUN_STATUS_OF.get(type(event))) is not None:
        change.status = status.value
    match event:
        case ev.RunStarted(payload=p):
            change.started_at = event.occurred_at
            if p.cursor_window is not None:
                change.cursor_window = p.cursor_window.model_dump(mode="json")
        case ev.StepStarted(payload=p) if p.attempt == 1:
            change.steps_delta += 1
        case ev.StepSkipped():
            change.steps_delta += 1
        case ev.RunArchived(payload=p):
            change.archived = True
            change.bulk_operation_id = p.bulk_operation_id or change.bulk_operation_id
        case ev.RunCancelRequested(payload=p):
            change.bulk_operation_id = p.bulk_operation_id or change.bulk_operation_id
        case EventBase(payload=ev.RunFinishedPayload() as p):  # RunSucceeded, RunFailed, RunCanceled …
            change.finished_at = event.occurred_at
            change.duration_ms = p.duration_ms
            change.failed_step = p.failed_step
            if p.error is not None:
                change.error = p.error.model_dump(mode="json")
                change.error_message = p.error.message
            elif p.reason:
                change.error_message = p.reason
        case ev.RunInvalid(payload=p) | ev.RunQuotaExceeded(payload=p):  # ended before starting: a reason only
            change.finished_at = event.occurred_at
            if p.reason:
                change.error_message = p.reason


def _position(event: EventBase) -> int:
    match event:
        case ev.StepStarted(payload=p) | ev.StepSucceeded(payload=p) | ev.StepSkipped(payload=p):
            if p.position is not None:
                return p.position
    # Steps first seen through an event without a position (older events, or a StepFailed whose
    # StepStarted came in an earlier batch and so is already stored) sort by their first seq.
    return 1_000_000 + event.seq


def _step_event(out: BatchPlan, event: EventBase) -> None:
    key = (event.run_id, event.payload.step)
    status = STEP_STATUS_OF[type(event)].value
    change = out.step_changes.get(key)
    if change is None:
        change = out.step_changes[key] = StepChange(event.run_id, key[1], _position(event), status)
    change.position = min(change.position, _position(event))
    change.status = status
    match event:
        case ev.StepStarted(payload=p):
            change.action = p.action
            change.attempt = p.attempt
            change.input = p.input
            change.started_at = event.occurred_at
            change.finished_at = None
        case ev.StepAttemptFailed(payload=p):
            change.attempt = p.attempt
            change.error = p.error.model_dump(mode="json")
        case ev.StepSucceeded(payload=p):
            change.attempt = p.attempt
            change.output = p.output
            change.duration_ms = p.duration_ms
            change.assertions = [a.model_dump(mode="json") for a in p.assertions]
            change.extractions = p.extractions
            change.finished_at = event.occurred_at
            change.error = None
            if p.reused_from is not None:
                # A reused step has no StepStarted: its StepSucceeded carries its action and input (older events
                # do not, nor a position: those sort last).
                change.action = p.action or change.action
                change.input = p.input if p.input is not None else change.input
                change.reused_from = p.reused_from
        case ev.StepFailed(payload=p):
            change.attempt = p.attempt
            change.output = p.output
            change.duration_ms = p.duration_ms
            change.assertions = [a.model_dump(mode="json") for a in p.assertions]
            change.error = p.error.model_dump(mode="json")
            change.finished_at = event.occurred_at
        case ev.StepSkipped(payload=p):
            # What the step would have done and why it did not (older events carry the reason only).
            change.action = p.action or change.action
            change.input = p.input if p.input is not None else change.input
            change.reason = p.reason or None
            change.finished_at = event.occurred_at
        case ev.StepCanceled():
            change.finished_at = event.occurred_at
