"""decide(state, flow, input) -> events: every run decision, pure and deterministic (invariant 4).

Inputs are the trigger, a step's result, a due timer (retry, schedule, pause expiry, flow deadline), a
command (cancel, resume, a child run's end), a freed concurrency slot and an internal failure (`inputs`). Each
carries an id that becomes the `causation_id` of what it causes; an input already folded into the state
(a redelivery after a crash) decides nothing. What the engine counted (active runs of the flow and the
tenant) is part of the input, so the decision stays a function of its arguments.

Here each input is routed; `admission` starts runs, `steps` runs their steps, `commands` handles what reaches a
run from outside, `finish` ends it, `emitter` numbers and folds what they emit.
"""

from __future__ import annotations

from schemas import events as ev
from schemas.events import ArchiveRun, CancelRun, ChildRunFinished, ErrorCategory, ErrorInfo, EventBase, ResumeRun
from schemas.flows import FlowDefinition
from schemas.status import RunStatus, StepStatus
from services.executor.decide import commands
from services.executor.decide.admission import admit, over_flow_limit, queue, reaches_admission, start
from services.executor.decide.emitter import Emitter, event_id
from services.executor.decide.finish import finish
from services.executor.decide.inputs import (
    Admission,
    Clock,
    CommandInput,
    DeadlinePassed,
    Input,
    InternalFailure,
    PauseExpired,
    ScheduledDue,
    SlotFreed,
    StartRun,
    StepCompleted,
    TimerFired,
)
from services.executor.decide.steps import complete_step, start_step
from services.executor.fold import RunState

__all__ = [
    "Admission",
    "Clock",
    "CommandInput",
    "DeadlinePassed",
    "Input",
    "InternalFailure",
    "PauseExpired",
    "ScheduledDue",
    "SlotFreed",
    "StartRun",
    "StepCompleted",
    "TimerFired",
    "archive",
    "decide",
    "decide_and_fold",
    "reaches_admission",
]


def decide(state: RunState | None, flow: FlowDefinition | None, inp: Input, clock: Clock) -> list[EventBase]:
    """`flow` is the run's flow version; None when the trigger names a flow that does not exist."""
    return decide_and_fold(state, flow, inp, clock)[0]


def decide_and_fold(
    state: RunState | None, flow: FlowDefinition | None, inp: Input, clock: Clock
) -> tuple[list[EventBase], RunState | None]:
    """decide(), and the state after its events (folded as they were decided: no second fold). An input that does
    not apply to the run as it stands (a late result, a stale timer, a resume nobody waits for) decides nothing."""
    if state is not None and (inp.id in state.causations or state.terminal):
        return [], state
    out = Emitter(state, inp.id, clock)
    match inp:
        case StartRun():
            if state is None:
                start(out, flow, inp)
            return out.events, out.state
        case InternalFailure():
            if state is not None:
                error = ErrorInfo(category=ErrorCategory.INTERNAL, message=inp.message, details={"trace": inp.trace})
                finish(out, ev.RunInternalError, error=error)
            return out.events, out.state
    if state is None:
        return [], state
    if isinstance(inp, CommandInput) and inp.command.tenant_id != state.tenant_id:
        return [], state  # another tenant's command never touches this run (invariant 7)
    if flow is None:  # an existing run always has its flow version
        raise LookupError(f"flow version of run {state.run_id} is unknown")
    _route(out, flow, inp)
    return out.events, out.state


def _route(out: Emitter, flow: FlowDefinition, inp: Input) -> None:
    run = out.run
    match inp:
        case StepCompleted():
            step = run.steps.get(inp.step)
            if run.status == RunStatus.RUNNING and step is not None and step.status == StepStatus.RUNNING:
                if step.attempt == inp.attempt:
                    complete_step(out, flow, flow.step(inp.step), inp)
        case TimerFired():
            step = run.steps.get(inp.step)
            if step is not None and step.status == StepStatus.RETRYING and step.attempt == inp.attempt:
                start_step(out, flow, flow.step(inp.step), attempt=inp.attempt + 1)
        case ScheduledDue():
            if run.status == RunStatus.SCHEDULED:
                queue(out, flow, inp.admission)
        case SlotFreed():
            # Still no room: the run stays BLOCKED, nothing recorded.
            if run.status == RunStatus.BLOCKED and not over_flow_limit(flow, inp.admission):
                queue(out, flow, inp.admission)
            elif run.status == RunStatus.QUEUED:  # its start was lost to a crash after RunQueued was recorded
                admit(out, flow, inp.admission)
        case PauseExpired():
            commands.pause_expired(out, inp)
        case DeadlinePassed():
            commands.deadline_passed(out, flow, inp)
        case CommandInput(command=CancelRun() as c):
            commands.cancel(out, c)
        case CommandInput(command=ResumeRun() as c):
            commands.resume(out, flow, c)
        case CommandInput(command=ChildRunFinished() as c):
            commands.child_finished(out, flow, c)


def archive(command: ArchiveRun, next_seq: int, clock: Clock) -> EventBase:
    """RunArchived for a finished run (decided outside `decide`: the engine keeps no state of finished runs)."""
    return ev.RunArchived(
        event_id=event_id(command.run_id, next_seq),
        tenant_id=command.tenant_id,
        run_id=command.run_id,
        flow_id=command.flow_id,
        flow_version=command.flow_version,
        correlation_id=command.correlation_id,
        seq=next_seq,
        occurred_at=clock.now,
        causation_id=command.command_id,
        payload=ev.RunArchivedPayload(bulk_operation_id=command.bulk_operation_id),
    )
