"""Drives a run through the executor's pure decide/fold with a fake clock, as the engine would, without Kafka."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas import events as ev
from schemas.events import (
    RUN_STATUS_OF,
    STEP_STATUS_OF,
    ErrorCategory,
    ErrorInfo,
    EventBase,
    TriggerInfo,
    TriggerReceived,
    TriggerType,
)
from schemas.flows import STORED_FLOW, FlowDefinition
from schemas.status import RunStatus, StepStatus, can_step_transition, can_transition
from services.executor.decide import Clock, Input, StartRun, StepCompleted, TimerFired, decide
from services.executor.fold import RunState, StepState, fold

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_flow(*steps: dict[str, Any], **fields: Any) -> FlowDefinition:
    """A flow of the given step dicts; a step given only a name is a `transform`."""
    return FlowDefinition.model_validate(_flow_fields(steps, fields))


def make_stored_flow(*steps: dict[str, Any], **fields: Any) -> FlowDefinition:
    """`make_flow` as the executor reads a version from the flows topic: published before a check that would
    refuse it now (an expression that does not compile), so it still loads and fails only the run."""
    return FlowDefinition.model_validate(_flow_fields(steps, fields), context=STORED_FLOW)


def _flow_fields(steps: tuple[dict[str, Any], ...], fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "orders",
        "tenant_id": "t1",
        "name": "Orders",
        "version": 3,
        "tags": ["sales"],
        "steps": [{"action": "transform", **s} for s in steps],
        **fields,
    }


def make_trigger(run_id: str = "run-1", payload: Any = None, **fields: Any) -> TriggerReceived:
    return TriggerReceived(
        trigger_id=f"trg-{run_id}",
        tenant_id="t1",
        run_id=run_id,
        flow_id="orders",
        trigger=TriggerInfo(type=TriggerType.API, caller="key_1", payload=payload),
        received_at=T0,
        **fields,
    )


def error(category: str, message: str = "boom") -> ErrorInfo:
    return ErrorInfo(category=ErrorCategory(category), message=message)


def _check_transition(state: RunState | None, event: EventBase) -> None:
    """Every status change decide emits is one the transition table allows (schemas/status.py): every test that
    drives a run through this harness checks it, on every event."""
    run_status = RUN_STATUS_OF.get(type(event))
    before = RunStatus.CREATED if state is None else state.status
    if run_status is not None and not isinstance(event, ev.RunRequested) and run_status != before:
        assert can_transition(before, run_status), f"{event.type}: run {before} -> {run_status} is not in the table"
    step_status = STEP_STATUS_OF.get(type(event))
    if step_status is not None and state is not None:
        name = event.payload.step
        current = state.steps.get(name)
        was = current.status if current is not None else StepStatus.PENDING
        # A step reused by a FROM_FAILED_STEP retry ran in an earlier run: it is recorded SUCCEEDED at once.
        reused = isinstance(event, ev.StepSucceeded) and event.payload.reused_from is not None
        if step_status != was and not reused:
            assert can_step_transition(was, step_status), f"{event.type}: step {name} {was} -> {step_status}"


@dataclass
class Run:
    """One run: its flow, the events decided so far, the folded state and the fake clock."""

    flow: FlowDefinition | None
    trigger: TriggerReceived = field(default_factory=make_trigger)
    now: datetime = T0
    time_scale: float = 1.0
    state: RunState | None = None
    events: list[EventBase] = field(default_factory=list)
    logs: list[EventBase] = field(default_factory=list)
    ledger: list[EventBase] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)

    def feed(self, inp: Input) -> list[EventBase]:
        out = decide(self.state, self.flow, inp, Clock(now=self.now, time_scale=self.time_scale))
        for event in out:
            _check_transition(self.state, event)
            self.state = fold(self.state, event)
        # Log lines are their own channel (GET /v1/runs/{id}/logs): kept apart, so `events` reads as the run's
        # state changes; `ledger` is everything in seq order.
        self.ledger += out
        self.logs += [e for e in out if isinstance(e, ev.LogEmitted)]
        out = [e for e in out if not isinstance(e, ev.LogEmitted)]
        self.events += out
        self.inputs.append(inp)
        return out

    def start(self) -> list[EventBase]:
        version = self.flow.version if self.flow else (self.trigger.flow_version or 0)
        return self.feed(StartRun(self.trigger, version))

    def active(self) -> tuple[str, StepState] | None:
        assert self.state is not None
        for name, step in self.state.steps.items():
            if step.status in (StepStatus.RUNNING, StepStatus.RETRYING):
                return name, step
        return None

    def complete(
        self, *, ok: bool = True, output: Any = None, err: ErrorInfo | None = None, took_s: float = 1.0
    ) -> list[EventBase]:
        """The running step's runner returns after `took_s` seconds."""
        active = self.active()
        assert active is not None and active[1].status == StepStatus.RUNNING, active
        name, step = active
        self.now += timedelta(seconds=took_s)
        assert self.state is not None
        return self.feed(
            StepCompleted(self.state.run_id, name, step.attempt, ok, output, err, duration_ms=took_s * 1000)
        )

    def fire_timer(self) -> list[EventBase]:
        """Time passes until the retrying step's retry_at; its timer fires."""
        active = self.active()
        assert active is not None and active[1].status == StepStatus.RETRYING, active
        name, step = active
        assert step.retry_at is not None
        self.now = max(self.now, step.retry_at)
        assert self.state is not None
        return self.feed(TimerFired(self.state.run_id, name, step.attempt))

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def of_type(self, name: str) -> list[EventBase]:
        return [e for e in self.events if e.type == name]


def retried_step_log(step: str, action: str, took_ms: int, warning: str) -> list[tuple[str, str]]:
    """The (level, message) log lines of a step that failed once and passed on its second attempt: the INFO line
    the projector derives for each start and the success, around the executor's WARNING for the failed attempt."""
    return [
        ("INFO", f"step {step} started ({action}, attempt 1)"),
        ("WARNING", warning),
        ("INFO", f"step {step} started ({action}, attempt 2)"),
        ("INFO", f"step {step} succeeded in {took_ms} ms (attempt 2)"),
    ]
