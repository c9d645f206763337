"""Ledger events → runs and run_steps row changes, coalesced per run and per step: pure, no I/O.

A batch's new events (already deduplicated by (run_id, seq)) become at most one INSERT or UPDATE
per run and one upsert per step, however many events each run had in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
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


# The status value each event type sets, looked up once per event (an enum's .value is a descriptor call).
_RUN_STATUS_VALUE: dict[type[EventBase], str] = {t: s.value for t, s in RUN_STATUS_OF.items()}
_STEP_STATUS_VALUE: dict[type[EventBase], str] = {t: s.value for t, s in STEP_STATUS_OF.items()}


def plan(events: list[EventBase]) -> BatchPlan:
    """Fold new events (in log order) into one change per run and per step."""
    out = BatchPlan()
    last_status: dict[str, RunStatus] = {}
    for event in events:
        kind = type(event)
        status = RUN_STATUS_OF.get(kind)
        if status is not None:
            before = last_status.get(event.run_id)
            if before is not None and before != status and not can_transition(before, status):
                out.out_of_order.append((event.run_id, event.seq, before.value, status.value))
            last_status[event.run_id] = status
        if kind is ev.RunRequested:
            out.new_runs[event.run_id] = new_run_row(event)  # type: ignore[arg-type]
        else:
            _run_event(out, event)
        if kind in _STEP_STATUS_VALUE:
            _step_event(out, event)
    return out


def _run_event(out: BatchPlan, event: EventBase) -> None:
    delta = _run_delta(event)
    row = out.new_runs.get(event.run_id)
    if row is not None:
        # The run was created in this batch: fold into the row to insert what this event sets.
        row["steps_count"] = row.get("steps_count", 0) + delta.pop("steps_delta", 0)
        for key, value in delta.items():
            if value is not None and value != -1:
                row[key] = value
        return
    change = out.run_changes.get(event.run_id)
    if change is None:
        change = out.run_changes[event.run_id] = RunChange(id=event.run_id)
    change.steps_delta += delta.pop("steps_delta", 0)
    change.last_seq = max(change.last_seq, delta.pop("last_seq"))
    for key, value in delta.items():
        setattr(change, key, value)


def _run_delta(event: EventBase) -> dict[str, Any]:
    """The run columns one event sets (a None among them clears the column in a RunChange, and is left out of a row
    being inserted), `steps_delta` the steps it adds to the run's count."""
    delta: dict[str, Any] = {"updated_at": event.occurred_at, "last_seq": max(-1, event.seq)}
    if (status := _RUN_STATUS_VALUE.get(type(event))) is not None:
        delta["status"] = status
    fold = _RUN_FOLDS.get(type(event))
    if fold is not None:
        fold(delta, event)
    elif isinstance(p := event.payload, ev.RunFinishedPayload):  # RunSucceeded, RunFailed, RunCanceled …
        delta["finished_at"] = event.occurred_at
        delta["duration_ms"] = p.duration_ms
        delta["failed_step"] = p.failed_step
        if p.error is not None:
            delta["error"] = p.error.model_dump(mode="json")
            delta["error_message"] = p.error.message
        elif p.reason:
            delta["error_message"] = p.reason
    elif type(event) in _ENDED_BEFORE_STARTING:  # a reason only
        delta["finished_at"] = event.occurred_at
        if p.reason:
            delta["error_message"] = p.reason
    return delta


def _started(delta: dict[str, Any], event: ev.RunStarted) -> None:
    delta["started_at"] = event.occurred_at
    if event.payload.cursor_window is not None:
        delta["cursor_window"] = event.payload.cursor_window.model_dump(mode="json")


def _step_started(delta: dict[str, Any], event: ev.StepStarted) -> None:
    if event.payload.attempt == 1:
        delta["steps_delta"] = 1


def _step_skipped(delta: dict[str, Any], event: ev.StepSkipped) -> None:
    delta["steps_delta"] = 1


def _archived(delta: dict[str, Any], event: ev.RunArchived) -> None:
    delta["archived"] = True
    if event.payload.bulk_operation_id:  # else the bulk operation named before stays
        delta["bulk_operation_id"] = event.payload.bulk_operation_id


def _cancel_requested(delta: dict[str, Any], event: ev.RunCancelRequested) -> None:
    if event.payload.bulk_operation_id:
        delta["bulk_operation_id"] = event.payload.bulk_operation_id


# By the event's exact class (ledger event classes have no subclasses): what a run-level event sets beyond its status.
_RUN_FOLDS: dict[type[EventBase], Callable[[dict[str, Any], Any], None]] = {
    ev.RunStarted: _started,
    ev.StepStarted: _step_started,
    ev.StepSkipped: _step_skipped,
    ev.RunArchived: _archived,
    ev.RunCancelRequested: _cancel_requested,
}
_ENDED_BEFORE_STARTING = (ev.RunInvalid, ev.RunQuotaExceeded)
_POSITIONED = (ev.StepStarted, ev.StepSucceeded, ev.StepSkipped)


def _position(event: EventBase) -> int:
    if type(event) in _POSITIONED and (position := event.payload.position) is not None:
        return position  # type: ignore[no-any-return]
    # Steps first seen through an event without a position (older events, or a StepFailed whose
    # StepStarted came in an earlier batch and so is already stored) sort by their first seq.
    return 1_000_000 + event.seq


def _step_event(out: BatchPlan, event: EventBase) -> None:
    key = (event.run_id, event.payload.step)
    status = _STEP_STATUS_VALUE[type(event)]
    position = _position(event)
    change = out.step_changes.get(key)
    if change is None:
        change = out.step_changes[key] = StepChange(event.run_id, key[1], position, status)
    elif position < change.position:
        change.position = position
    change.status = status
    fold = _STEP_FOLDS.get(type(event))
    if fold is not None:
        fold(change, event)


def _step_started_change(change: StepChange, event: ev.StepStarted) -> None:
    p = event.payload
    change.action = p.action
    change.attempt = p.attempt
    change.input = p.input
    change.started_at = event.occurred_at
    change.finished_at = None


def _attempt_failed_change(change: StepChange, event: ev.StepAttemptFailed) -> None:
    change.attempt = event.payload.attempt
    change.error = event.payload.error.model_dump(mode="json")


def _finished_change(change: StepChange, event: ev.StepSucceeded | ev.StepFailed) -> None:
    """What a step's last attempt ended with, succeeded or failed."""
    p = event.payload
    change.attempt = p.attempt
    change.output = p.output
    change.duration_ms = p.duration_ms
    change.assertions = [a.model_dump(mode="json") for a in p.assertions]
    change.finished_at = event.occurred_at


def _succeeded_change(change: StepChange, event: ev.StepSucceeded) -> None:
    _finished_change(change, event)
    p = event.payload
    change.extractions = p.extractions
    change.error = None
    if p.reused_from is not None:
        # A reused step has no StepStarted: its StepSucceeded carries its action and input (older events
        # do not, nor a position: those sort last).
        change.action = p.action or change.action
        change.input = p.input if p.input is not None else change.input
        change.reused_from = p.reused_from


def _failed_change(change: StepChange, event: ev.StepFailed) -> None:
    _finished_change(change, event)
    change.error = event.payload.error.model_dump(mode="json")


def _skipped_change(change: StepChange, event: ev.StepSkipped) -> None:
    # What the step would have done and why it did not (older events carry the reason only).
    p = event.payload
    change.action = p.action or change.action
    change.input = p.input if p.input is not None else change.input
    change.reason = p.reason or None
    change.finished_at = event.occurred_at


def _canceled_change(change: StepChange, event: ev.StepCanceled) -> None:
    change.finished_at = event.occurred_at


_STEP_FOLDS: dict[type[EventBase], Callable[[StepChange, Any], None]] = {
    ev.StepStarted: _step_started_change,
    ev.StepAttemptFailed: _attempt_failed_change,
    ev.StepSucceeded: _succeeded_change,
    ev.StepFailed: _failed_change,
    ev.StepSkipped: _skipped_change,
    ev.StepCanceled: _canceled_change,
}
