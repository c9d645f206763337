"""What `decide` is given: one input (a trigger, a step's result, a due timer, a command …), what the engine counted,
and the clock. Each input has an id that becomes the `causation_id` of what it causes (invariant 3)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from schemas.events import CancelRun, ChildRunFinished, ErrorInfo, ResumeRun, TriggerReceived


@dataclass(frozen=True, slots=True)
class Admission:
    """What the engine counted when a run asks to start (decide stays a pure function of its input)."""

    flow_active: int = 0  # runs of the flow RUNNING or PAUSED
    tenant_active: int = 0  # runs of the tenant RUNNING or PAUSED
    tenant_limit: int | None = None  # the tenant's quota of active runs
    queued_ahead: int = 0  # BLOCKED runs of the flow that arrived earlier (a new run waits behind them)


class _Keyed:
    """An input whose id is `ID` formatted with the input itself: the same input always has the same id."""

    __slots__ = ()
    ID: ClassVar[str]

    @property
    def id(self) -> str:
        return self.ID.format(self)


@dataclass(frozen=True, slots=True)
class StartRun(_Keyed):
    ID = "{0.trigger.trigger_id}"
    trigger: TriggerReceived
    flow_version: int
    admission: Admission = Admission()


@dataclass(frozen=True, slots=True)
class _OfRun(_Keyed):
    """An input about one run (the engine hands it to that run's state)."""

    run_id: str


@dataclass(frozen=True, slots=True)
class _OfAttempt(_OfRun):
    """An input about one attempt of a step."""

    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StepCompleted(_OfAttempt):
    ID = "{0.run_id}:{0.step}:{0.attempt}:result"
    ok: bool
    output: Any = None
    error: ErrorInfo | None = None
    duration_ms: float = 0


@dataclass(frozen=True, slots=True)
class TimerFired(_OfAttempt):
    """A failed attempt's backoff has passed: the next attempt starts."""

    ID = "{0.run_id}:{0.step}:{0.attempt}:timer"


@dataclass(frozen=True, slots=True)
class InternalFailure(_OfRun):
    ID = "{0.run_id}:internal:{0.at_seq}"
    message: str
    trace: str = ""
    at_seq: int = 0


@dataclass(frozen=True, slots=True)
class _AsksToStart(_OfRun):
    """A waiting run asks again to start, with what the engine counted now."""

    admission: Admission = Admission()


@dataclass(frozen=True, slots=True)
class ScheduledDue(_AsksToStart):
    """A SCHEDULED run's time has come."""

    ID = "{0.run_id}:due"


@dataclass(frozen=True, slots=True)
class SlotFreed(_AsksToStart):
    """A BLOCKED run asks again for a slot of its flow (one was freed, or it was woken), or a QUEUED run left without
    its start by a crash asks for the first time. `at_seq` is the run's next seq when it asked: each ask is a new
    input, so a run blocked again after one can ask again."""

    ID = "{0.run_id}:unblocked:{0.at_seq}"
    at_seq: int = 0


@dataclass(frozen=True, slots=True)
class PauseExpired(_OfRun):
    ID = "{0.run_id}:{0.request_id}:expired"
    request_id: str


@dataclass(frozen=True, slots=True)
class DeadlinePassed(_OfRun):
    """The flow-level timeout: the run has been RUNNING/PAUSED for longer than the flow allows."""

    ID = "{0.run_id}:deadline"


@dataclass(frozen=True, slots=True)
class CommandInput:
    """A command from the commands topic: cancel, resume, or a subflow child's end."""

    command: CancelRun | ResumeRun | ChildRunFinished

    @property
    def id(self) -> str:
        c = self.command
        # A child's end is sent again after a crash with a new command id; its identity is the child.
        return f"child:{c.child_run_id}:finished" if isinstance(c, ChildRunFinished) else c.command_id


Input = (
    StartRun | StepCompleted | TimerFired | InternalFailure | ScheduledDue | SlotFreed | PauseExpired
    | DeadlinePassed | CommandInput
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Clock:
    """The decision's notion of time: `now`, and how much faster than real time timers run."""

    now: datetime
    time_scale: float = 1.0
