"""What a live run waits for next, chosen purely from its state, its flow and the time: the run loop's decision.

`decide` says what an input does to a run; this says which input the run is waiting for — its flow deadline, its
scheduled time, a free slot, a human's answer or its expiry, a retry's timer, a step to run, a child to start — or that
it waits for a command only. The run loop (`runloop.py`) carries the choice out and decides nothing itself: it feeds
inputs to `decide`, sleeps, or runs a step. Unit-tested like `decide` (tests/unit/test_next_action.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.flows import FlowDefinition, StepAction
from schemas.status import RunStatus, StepStatus
from services.executor.fold import RunState

_ACTIVE = (RunStatus.RUNNING, RunStatus.PAUSED)


@dataclass(frozen=True, slots=True)
class Deadline:
    """The flow's timeout has passed: feed DeadlinePassed."""


@dataclass(frozen=True, slots=True)
class ScheduledDue:
    """A SCHEDULED run's time has come: feed ScheduledDue (with the engine's admission counts)."""


@dataclass(frozen=True, slots=True)
class TryUnblock:
    """A BLOCKED run asks the shared admission for a slot (feed SlotFreed), then waits until it is woken if there is
    still no room; a QUEUED run — its start lost to a crash — asks for the first time."""


@dataclass(frozen=True, slots=True)
class ExpirePause:
    request_id: str


@dataclass(frozen=True, slots=True)
class FireTimer:
    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class RunStep:
    """Run the step's runner, abandoning it at `until` (the flow deadline; None: no deadline)."""

    step: str
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class StartChild:
    """A subflow step: start (or find) its child run, then wait for the child's end or the deadline."""

    step: str
    until: datetime | None


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep until this time, or until an input for the run arrives (None: until an input)."""

    until: datetime | None


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing to do until a command (a resume, a child's end) drives the run again."""


Action = Deadline | ScheduledDue | TryUnblock | ExpirePause | FireTimer | RunStep | StartChild | Wait | Idle


def deadline(state: RunState, flow: FlowDefinition, time_scale: float) -> datetime | None:
    """When the run's flow timeout passes (None: no timeout, or the run is not running)."""
    if flow.timeout_s is None or state.started_at is None or state.status not in _ACTIVE:
        return None
    return state.started_at + timedelta(seconds=flow.timeout_s * time_scale)


def choose(state: RunState, flow: FlowDefinition, now: datetime, *, time_scale: float) -> Action:
    """The run's next action."""
    due = deadline(state, flow, time_scale)
    if due is not None and now >= due:
        return Deadline()
    if state.status == RunStatus.SCHEDULED:
        assert state.run_at is not None
        return Wait(state.run_at) if now < state.run_at else ScheduledDue()
    if state.status in (RunStatus.BLOCKED, RunStatus.QUEUED):
        return TryUnblock()  # the shared admission keeps the arrival order across executors
    if state.status == RunStatus.PAUSED:
        pause = state.pause
        expires = pause.expires_at if pause else None
        if pause is not None and expires is not None and now >= expires:
            return ExpirePause(pause.request_id)
        until = min((t for t in (expires, due) if t is not None), default=None)
        return Idle() if until is None else Wait(until)
    active = [(n, s) for n, s in state.steps.items() if s.status in (StepStatus.RUNNING, StepStatus.RETRYING)]
    if not active:
        return Idle()
    name, step = active[0]
    if step.status == StepStatus.RETRYING:
        retry_at = step.retry_at or now
        if now < retry_at:
            return Wait(min(retry_at, due) if due else retry_at)
        return FireTimer(name, step.attempt)
    if flow.step(name).action == StepAction.SUBFLOW:
        return StartChild(name, due)
    return RunStep(name, due)
