"""What reaches a run from outside its steps: cancel and resume commands, a subflow child's end, a pause's expiry and
the flow's deadline."""

from __future__ import annotations

from schemas import events as ev
from schemas.events import CancelRun, ChildRunFinished, ErrorCategory, ErrorInfo, ResumeRun
from schemas.flows import FlowDefinition, StepDefinition
from schemas.status import RunStatus, StepStatus
from services.executor.decide.emitter import Emitter
from services.executor.decide.finish import finish
from services.executor.decide.inputs import Clock, DeadlinePassed, PauseExpired, StepCompleted
from services.executor.decide.steps import advance, complete_step
from services.executor.fold import RunState

_FINISHED_OK = frozenset({RunStatus.SUCCEEDED.value, RunStatus.PARTIAL.value})


def cancel(out: Emitter, c: CancelRun) -> None:
    out.emit(ev.RunCancelRequested, ev.RunCancelRequestedPayload(
        reason=c.reason, requested_by=c.issued_by, bulk_operation_id=c.bulk_operation_id
    ))  # fmt: skip
    finish(out, ev.RunCanceled, reason=c.reason or "canceled")


def resume(out: Emitter, flow: FlowDefinition, c: ResumeRun) -> None:
    """The answer to a paused human_input step becomes its output (nothing happens when no pause waits for it)."""
    pause = out.run.pause
    if out.run.status != RunStatus.PAUSED or pause is None or pause.request_id != c.request_id:
        return
    out.emit(ev.RunResumed, ev.RunResumedPayload(request_id=c.request_id, resumed_by=c.issued_by))
    if pause.step is None:
        advance(out, flow)
        return
    step = out.run.steps[pause.step]
    waited = (out.clock.now - step.started_at).total_seconds() * 1000 if step.started_at else 0
    answer = StepCompleted(out.run.run_id, pause.step, step.attempt, True, c.payload, None, waited)
    complete_step(out, flow, flow.step(pause.step), answer)


def child_finished(out: Emitter, flow: FlowDefinition, c: ChildRunFinished) -> None:
    """A subflow step's child run ended: the step completes with its result (when a step still waits for it).
    A child linked by a trigger header (no step, docs/intake.md#nested-runs) tells only of its failure, and a
    parent still RUNNING fails with it."""
    if not c.step:
        if out.run.status == RunStatus.RUNNING and c.status not in _FINISHED_OK:
            cause = f": {c.error.message}" if c.error else ""
            error = ErrorInfo(category=ErrorCategory.VALIDATION, code="child_run_failed",
                              message=f"child run {c.child_run_id} ended {c.status}{cause}",
                              details={"child_run_id": c.child_run_id})  # fmt: skip
            finish(out, ev.RunFailed, error=error, reason=error.message)
        return
    step = out.run.steps.get(c.step)
    if out.run.status != RunStatus.RUNNING or step is None or step.status != StepStatus.RUNNING:
        return
    if step.attempt != c.attempt:
        return
    complete_step(out, flow, flow.step(c.step), _child_result(out.run, flow.step(c.step), c, out.clock))


def _child_result(run: RunState, step: StepDefinition, c: ChildRunFinished, clock: Clock) -> StepCompleted:
    started = run.steps[c.step].started_at
    waited = (clock.now - started).total_seconds() * 1000 if started else 0
    output = {"child_run_id": c.child_run_id, "status": c.status, "output": c.output}
    if c.status in _FINISHED_OK or not step.input.get("fail_parent_on_failure", True):
        return StepCompleted(run.run_id, c.step, c.attempt, True, output, None, waited)
    cause = f": {c.error.message}" if c.error else ""
    error = ErrorInfo(category=ErrorCategory.VALIDATION, code="subflow_failed",
                      message=f"child run {c.child_run_id} ended {c.status}{cause}",
                      details={"child_run_id": c.child_run_id})  # fmt: skip
    return StepCompleted(run.run_id, c.step, c.attempt, False, output, error, waited)


def pause_expired(out: Emitter, inp: PauseExpired) -> None:
    """No answer before the human_input step's timeout: the step fails and the run times out."""
    pause = out.run.pause
    if out.run.status != RunStatus.PAUSED or pause is None or pause.request_id != inp.request_id:
        return
    error = ErrorInfo(category=ErrorCategory.TRANSIENT, code="human_input_timeout",
                      message=f"no answer to request {inp.request_id} before {pause.expires_at}")  # fmt: skip
    if pause.step is not None:
        attempt = out.run.steps[pause.step].attempt
        out.emit(ev.StepFailed, ev.StepFailedPayload(step=pause.step, attempt=attempt, error=error))
    finish(out, ev.RunTimedOut, failed_step=pause.step, error=error, reason=error.message)


def deadline_passed(out: Emitter, flow: FlowDefinition, _: DeadlinePassed) -> None:
    """The flow's timeout: the run times out, and the step that was running is the one it names."""
    if out.run.status not in (RunStatus.RUNNING, RunStatus.PAUSED) or flow.timeout_s is None:
        return
    # The step that was running is the one the timeout names (a diagnosis points at it); it fails with the
    # run's error rather than being canceled like a bystander.
    running = next((name for name, s in out.run.steps.items()
                    if s.status in (StepStatus.RUNNING, StepStatus.RETRYING)), None)  # fmt: skip
    where = f" while step {running!r} was running" if running is not None else ""
    error = ErrorInfo(category=ErrorCategory.TRANSIENT, code="flow_timeout",
                      message=f"the flow timeout of {flow.timeout_s:g}s passed{where}",
                      details={"step": running} if running is not None else {})  # fmt: skip
    if running is not None:
        attempt = out.run.steps[running].attempt
        out.emit(ev.StepFailed, ev.StepFailedPayload(step=running, attempt=attempt, error=error))
    finish(out, ev.RunTimedOut, failed_step=running, error=error, reason=error.message)
