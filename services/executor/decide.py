"""decide(state, flow, input) -> events: every run decision, pure and deterministic (invariant 4).

Inputs are the trigger, a step's result, a due timer (retry, schedule, pause expiry, flow deadline), a
command (cancel, resume, a child run's end), a freed concurrency slot and an internal failure. Each
carries an id that becomes the `causation_id` of what it causes; an input already folded into the state
(a redelivery after a crash) decides nothing. What the engine counted (active runs of the flow and the
tenant) is part of the input, so the decision stays a function of its arguments.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from schemas import events as ev
from schemas.events import (
    ArchiveRun,
    CancelRun,
    ChildRunFinished,
    ErrorCategory,
    ErrorInfo,
    EventBase,
    ResumeRun,
    TriggerReceived,
)
from schemas.flows import FlowDefinition, RetryPolicy, StepAction, StepDefinition, mask_secrets
from schemas.status import RunStatus, StepStatus
from services.common.templating import (
    TemplateError,
    check,
    evaluate,
    extract,
    masked_secrets,
    render,
    truthy,
    with_secrets,
)
from services.executor.fold import RunState, StepState, fold
from services.executor.inputs import input_errors

_EVENT_NS = uuid.UUID("6f1d7c1e-9f57-4d55-9a54-2f3a4c1b0e77")


@dataclass(frozen=True, slots=True)
class Admission:
    """What the engine counted when a run asks to start (decide stays a pure function of its input)."""

    flow_active: int = 0  # runs of the flow RUNNING or PAUSED
    tenant_active: int = 0  # runs of the tenant RUNNING or PAUSED
    tenant_limit: int | None = None  # the tenant's quota of active runs
    queued_ahead: int = 0  # BLOCKED runs of the flow that arrived earlier (a new run waits behind them)


@dataclass(frozen=True, slots=True)
class StartRun:
    trigger: TriggerReceived
    flow_version: int
    admission: Admission = Admission()

    @property
    def id(self) -> str:
        return self.trigger.trigger_id


@dataclass(frozen=True, slots=True)
class StepCompleted:
    run_id: str
    step: str
    attempt: int
    ok: bool
    output: Any = None
    error: ErrorInfo | None = None
    duration_ms: float = 0

    @property
    def id(self) -> str:
        return f"{self.run_id}:{self.step}:{self.attempt}:result"


@dataclass(frozen=True, slots=True)
class TimerFired:
    run_id: str
    step: str
    attempt: int

    @property
    def id(self) -> str:
        return f"{self.run_id}:{self.step}:{self.attempt}:timer"


@dataclass(frozen=True, slots=True)
class InternalFailure:
    run_id: str
    message: str
    trace: str = ""
    at_seq: int = 0

    @property
    def id(self) -> str:
        return f"{self.run_id}:internal:{self.at_seq}"


@dataclass(frozen=True, slots=True)
class ScheduledDue:
    """A SCHEDULED run's time has come."""

    run_id: str
    admission: Admission = Admission()

    @property
    def id(self) -> str:
        return f"{self.run_id}:due"


@dataclass(frozen=True, slots=True)
class SlotFreed:
    """A run of a BLOCKED run's flow ended: the first blocked run (arrival order) asks again."""

    run_id: str
    admission: Admission = Admission()

    @property
    def id(self) -> str:
        return f"{self.run_id}:unblocked"


@dataclass(frozen=True, slots=True)
class PauseExpired:
    run_id: str
    request_id: str

    @property
    def id(self) -> str:
        return f"{self.run_id}:{self.request_id}:expired"


@dataclass(frozen=True, slots=True)
class DeadlinePassed:
    """The flow-level timeout: the run has been RUNNING/PAUSED for longer than the flow allows."""

    run_id: str

    @property
    def id(self) -> str:
        return f"{self.run_id}:deadline"


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


@dataclass
class _Emitter:
    state: RunState | None
    causation_id: str
    clock: Clock
    events: list[EventBase] = field(default_factory=list)

    @property
    def run(self) -> RunState:
        assert self.state is not None
        return self.state

    def emit(self, cls: type[EventBase], payload: dict[str, Any], **envelope: Any) -> None:
        st = self.state
        seq = st.next_seq if st else 0
        base = {
            "tenant_id": st.tenant_id if st else None,
            "run_id": st.run_id if st else None,
            "flow_id": st.flow_id if st else None,
            "flow_version": st.flow_version if st else None,
            "correlation_id": st.correlation_id if st else None,
            **envelope,
        }
        event = cls(
            # The same decision always yields the same event id: a duplicate is visibly one.
            event_id=uuid.uuid5(_EVENT_NS, f"{base['run_id']}:{seq}").hex,
            seq=seq,
            occurred_at=self.clock.now,
            causation_id=self.causation_id,
            payload=payload,
            **base,
        )
        self.events.append(event)
        self.state = fold(st, event)


def decide(state: RunState | None, flow: FlowDefinition | None, inp: Input, clock: Clock) -> list[EventBase]:
    """`flow` is the run's flow version; None when the trigger names a flow that does not exist."""
    return decide_and_fold(state, flow, inp, clock)[0]


_FINISHED_OK = frozenset({RunStatus.SUCCEEDED.value, RunStatus.PARTIAL.value})


def decide_and_fold(
    state: RunState | None, flow: FlowDefinition | None, inp: Input, clock: Clock
) -> tuple[list[EventBase], RunState | None]:
    """decide(), and the state after its events (folded as they were decided: no second fold)."""
    if state is not None and (inp.id in state.causations or state.terminal):
        return [], state
    out = _Emitter(state, inp.id, clock)
    match inp:
        case StartRun():
            if state is not None:
                return [], state
            _start(out, flow, inp)
            return out.events, out.state
        case InternalFailure():
            if state is None:
                return [], state
            _finish(out, ev.RunInternalError, error=ErrorInfo(
                category=ErrorCategory.INTERNAL, message=inp.message, details={"trace": inp.trace}
            ))  # fmt: skip
            return out.events, out.state
    if state is None:
        return [], state
    if isinstance(inp, CommandInput) and inp.command.tenant_id != state.tenant_id:
        return [], state  # another tenant's command never touches this run (invariant 7)
    if flow is None:  # an existing run always has its flow version
        raise LookupError(f"flow version of run {out.run.run_id} is unknown")
    status = out.run.status
    match inp:
        case StepCompleted():
            step = out.run.steps.get(inp.step)
            if status != RunStatus.RUNNING or step is None or step.status != StepStatus.RUNNING:
                return [], state
            if step.attempt != inp.attempt:
                return [], state
            _complete_step(out, flow, flow.step(inp.step), inp)
        case TimerFired():
            step = out.run.steps.get(inp.step)
            if step is None or step.status != StepStatus.RETRYING or step.attempt != inp.attempt:
                return [], state
            _start_step(out, flow, flow.step(inp.step), attempt=inp.attempt + 1)
        case ScheduledDue():
            if status != RunStatus.SCHEDULED:
                return [], state
            out.emit(ev.RunQueued, {})
            _admit(out, flow, inp.admission)
        case SlotFreed():
            if status != RunStatus.BLOCKED or _over_flow_limit(flow, inp.admission):
                return [], state  # still no room: stays BLOCKED, nothing recorded
            out.emit(ev.RunQueued, {})
            _admit(out, flow, inp.admission)
        case PauseExpired():
            pause = out.run.pause
            if status != RunStatus.PAUSED or pause is None or pause.request_id != inp.request_id:
                return [], state
            error = ErrorInfo(category=ErrorCategory.TRANSIENT, code="human_input_timeout",
                              message=f"no answer to request {inp.request_id} before {pause.expires_at}")  # fmt: skip
            if pause.step is not None:
                attempt = out.run.steps[pause.step].attempt
                out.emit(ev.StepFailed, {"step": pause.step, "attempt": attempt, "error": error})
            _finish(out, ev.RunTimedOut, failed_step=pause.step, error=error, reason=error.message)
        case DeadlinePassed():
            if status not in (RunStatus.RUNNING, RunStatus.PAUSED) or flow.timeout_s is None:
                return [], state
            # The step that was running is the one the timeout names (a diagnosis points at it); it fails with the
            # run's error rather than being canceled like a bystander.
            running = next((name for name, s in out.run.steps.items()
                            if s.status in (StepStatus.RUNNING, StepStatus.RETRYING)), None)  # fmt: skip
            where = f" while step {running!r} was running" if running is not None else ""
            error = ErrorInfo(category=ErrorCategory.TRANSIENT, code="flow_timeout",
                              message=f"the flow timeout of {flow.timeout_s:g}s passed{where}",
                              details={"step": running} if running is not None else {})  # fmt: skip
            if running is not None:
                out.emit(ev.StepFailed, {"step": running, "attempt": out.run.steps[running].attempt, "error": error})
            _finish(out, ev.RunTimedOut, failed_step=running, error=error, reason=error.message)
        case CommandInput(command=CancelRun() as c):
            out.emit(ev.RunCancelRequested, {"reason": c.reason, "requested_by": c.issued_by,
                                              "bulk_operation_id": c.bulk_operation_id})  # fmt: skip
            _finish(out, ev.RunCanceled, reason=c.reason or "canceled")
        case CommandInput(command=ResumeRun() as c):
            pause = out.run.pause
            if status != RunStatus.PAUSED or pause is None or pause.request_id != c.request_id:
                return [], state
            out.emit(ev.RunResumed, {"request_id": c.request_id, "resumed_by": c.issued_by})
            if pause.step is not None:
                step = out.run.steps[pause.step]
                waited = (clock.now - step.started_at).total_seconds() * 1000 if step.started_at else 0
                answer = StepCompleted(out.run.run_id, pause.step, step.attempt, True, c.payload, None, waited)
                _complete_step(out, flow, flow.step(pause.step), answer)
            else:
                _advance(out, flow)
        case CommandInput(command=ChildRunFinished() as c):
            step = out.run.steps.get(c.step)
            if status != RunStatus.RUNNING or step is None or step.status != StepStatus.RUNNING:
                return [], state
            if step.attempt != c.attempt:
                return [], state
            _complete_step(out, flow, flow.step(c.step), _child_result(out.run, flow.step(c.step), c, clock))
    return out.events, out.state


def archive(command: ArchiveRun, next_seq: int, clock: Clock) -> EventBase:
    """RunArchived for a finished run (decided outside `decide`: the engine keeps no state of finished runs)."""
    return ev.RunArchived(
        event_id=uuid.uuid5(_EVENT_NS, f"{command.run_id}:{next_seq}").hex,
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


def _start(out: _Emitter, flow: FlowDefinition | None, inp: StartRun) -> None:
    t = inp.trigger
    out.emit(
        ev.RunRequested,
        {
            "trigger": t.trigger,
            "environment": t.environment,
            "execution_mode": t.execution_mode,
            "flow_name": flow.name if flow else "",
            "tags": flow.tags if flow else (),
            "received_at": t.received_at,
            "parent_run_id": t.parent_run_id,
            "parent_step": t.parent_step,
            "parent_attempt": t.parent_attempt,
            "retry_of": t.retry_of,
            "retry_strategy": t.retry_strategy,
            "bulk_operation_id": t.bulk_operation_id,
            "only_keys": t.only_keys,
            "run_at": t.run_at,
            "cursor_window": t.cursor_window,
            "reuse": t.reuse,
            "reused": t.reused,
        },
        tenant_id=t.tenant_id,
        run_id=t.run_id,
        flow_id=t.flow_id,
        flow_version=inp.flow_version,
        correlation_id=t.parent_run_id or t.run_id,
    )
    if flow is None:
        version = f" version {t.flow_version}" if t.flow_version else ""
        out.emit(ev.RunInvalid, {"reason": f"flow {t.flow_id!r}{version} does not exist"})
        return
    if errors := input_errors(flow, t.trigger.payload):
        reason = f"the input does not match the flow's input schema: {errors[0].message}"
        out.emit(ev.RunInvalid, {"reason": reason, "errors": errors})
        return
    if t.run_at is not None and t.run_at > out.clock.now:
        out.emit(ev.RunScheduled, {"run_at": t.run_at})
        return
    out.emit(ev.RunQueued, {})
    _admit(out, flow, inp.admission)


def _over_flow_limit(flow: FlowDefinition, admission: Admission) -> bool:
    limit = flow.concurrency_limit
    return limit is not None and (admission.flow_active >= limit or admission.queued_ahead > 0)


def _admit(out: _Emitter, flow: FlowDefinition, admission: Admission) -> None:
    """A QUEUED run starts, or is refused by the tenant's quota, or waits BLOCKED for a slot of its flow."""
    if admission.tenant_limit is not None and admission.tenant_active >= admission.tenant_limit:
        out.emit(ev.RunQuotaExceeded, {"reason": f"the tenant already has {admission.tenant_active} active runs, "
                                                 f"its quota is {admission.tenant_limit}"})  # fmt: skip
        return
    if _over_flow_limit(flow, admission):
        out.emit(ev.RunBlocked, {"reason": f"{admission.flow_active} runs of the flow are active, its concurrency "
                                           f"limit is {flow.concurrency_limit}; waiting for one to end"})  # fmt: skip
        return
    run = out.run
    out.emit(ev.RunStarted, {"cursor_window": run.cursor_window})
    for step in flow.steps:  # FROM_FAILED_STEP: the steps that succeeded in the retried run are not run again
        if step.name in run.reuse:
            out.emit(ev.StepSucceeded, _reused(run, flow, step))
    _advance(out, flow)


def _reused(run: RunState, flow: FlowDefinition, step: StepDefinition) -> dict[str, Any]:
    """A reused step's StepSucceeded: the output, extractions and input it had in the run where it ran, at its
    place in the flow, so the next retry of this run reuses it again and later steps see its variables."""
    output = run.reuse[step.name]
    was = run.reused.get(step.name)
    extractions = dict(was.extractions) if was else {}
    if step.extract and not extractions:
        # A retry requested before extractions were carried: they are a pure function of the output.
        try:
            extractions = {var: extract(expr, output) for var, expr in step.extract.items()}
        except TemplateError:
            extractions = {}
    return {"step": step.name, "output": output, "extractions": extractions,
            "reused_from": was.run_id if was else run.retry_of, "position": flow.position(step.name),
            "action": step.action.value, "input": was.input if was else None}  # fmt: skip


def _advance(out: _Emitter, flow: FlowDefinition) -> None:
    """Skip steps whose condition is false, start the next one, or finish the run."""
    for step in flow.steps:
        if step.name in out.run.steps:
            continue
        if step.run_condition is not None:
            try:
                value = evaluate(step.run_condition, out.run.context())
            except TemplateError as exc:
                _fail_before_start(out, flow, step, str(exc))
                return
            if not truthy(value):
                out.emit(ev.StepSkipped, _skipped(out.run, flow, step, value))
                continue
        _start_step(out, flow, step, attempt=1)
        return
    if out.run.failed_records:
        _finish(out, ev.RunPartiallySucceeded, reason=f"{out.run.failed_records} record(s) failed")
    else:
        _finish(out, ev.RunSucceeded)


def _skipped(run: RunState, flow: FlowDefinition, step: StepDefinition, value: Any) -> dict[str, Any]:
    """A skipped step's StepSkipped: what it would have done (action, input rendered and masked as a started
    step's) and why not (its run_condition and what that evaluated to)."""
    try:
        rendered = mask_secrets(render(dict(step.input), with_secrets(run.context(), masked_secrets(step.input))))
    except TemplateError:
        rendered = None  # e.g. it names a step that was skipped too: nothing to render, and nothing ran
    if value is False:
        was = "was false"
    elif value is None:
        was = "was null"
    else:  # a falsy value other than false and null: 0 is truthy, so only an empty string, list or object
        was = f"evaluated to {orjson.dumps(value).decode()}, which is false"
    return {"step": step.name, "position": flow.position(step.name), "action": step.action.value,
            "input": rendered, "run_condition": step.run_condition, "condition_value": value,
            "reason": f"run_condition {orjson.dumps(step.run_condition).decode()} {was}"}  # fmt: skip


def _start_step(out: _Emitter, flow: FlowDefinition, step: StepDefinition, attempt: int) -> None:
    try:
        # `{{ secrets.NAME }}` renders as `***` here: the value is read only by the step runner (runner_input).
        rendered = render(dict(step.input), with_secrets(out.run.context(), masked_secrets(step.input)))
    except TemplateError as exc:
        _fail_before_start(out, flow, step, str(exc))
        return
    run = out.run
    if step.action == StepAction.SYNC_RECORDS:
        # The window is the run's (a retry reads the same one) and a retry of a PARTIAL run names its failed keys.
        window = run.cursor_window.model_dump(mode="json") if run.cursor_window else None
        rendered = {**rendered, "window": window, "only_keys": run.only_keys.get(step.name)}
    out.emit(ev.StepStarted, _started(flow, step, attempt, rendered))
    if step.action == StepAction.HUMAN_INPUT:
        # The request id is the attempt's identity: the same after a crash, different for a retried attempt.
        request_id = "req_" + uuid.uuid5(_EVENT_NS, f"{run.run_id}:{step.name}:{attempt}").hex[:20]
        expires_at = None
        if step.timeout_s is not None:
            expires_at = out.clock.now + timedelta(seconds=step.timeout_s * out.clock.time_scale)
        out.emit(ev.RunPaused, {"request_id": request_id, "step": step.name, "prompt": rendered,
                                "expires_at": expires_at})  # fmt: skip
        until = f" until {expires_at.isoformat()}" if expires_at else ""
        _log(out, "INFO", f"waiting for input on request {request_id}{until}", step.name, request_id=request_id)


def _log(out: _Emitter, level: str, message: str, step: str | None = None, **fields: Any) -> None:
    """A structured log line of the run (GET /v1/runs/{id}/logs). Written on the paths a reader of a run
    needs explained — retries, failures, pauses — not per successful step, which the step events say."""
    out.emit(ev.LogEmitted, {"level": level, "message": message, "step": step, "fields": fields})


def _started(flow: FlowDefinition, step: StepDefinition, attempt: int, rendered: Any) -> dict[str, Any]:
    position = flow.position(step.name)
    # Recorded with secrets masked (DSN passwords, `password`/`token`… keys): the ledger is shown to users.
    # The engine renders the secrets again for the step runner (adapters.steps.runner_input).
    return {"step": step.name, "position": position, "action": step.action.value, "attempt": attempt,
            "input": mask_secrets(rendered)}  # fmt: skip


def _fail_before_start(out: _Emitter, flow: FlowDefinition, step: StepDefinition, message: str) -> None:
    error = ErrorInfo(category=ErrorCategory.VALIDATION, message=message, code="template_error")
    out.emit(ev.StepStarted, _started(flow, step, 1, None))
    out.emit(ev.StepFailed, {"step": step.name, "attempt": 1, "error": error})
    _finish(out, ev.RunFailed, failed_step=step.name, error=error)


def _assert(
    step: StepDefinition, output: Any, context: dict[str, Any]
) -> tuple[list[dict[str, Any]], ErrorInfo | None]:
    results: list[dict[str, Any]] = []
    first_failure: ErrorInfo | None = None
    for a in step.assertions:
        expected = a.expected
        try:
            # `{{ vars.user_id }}` in `expected`: rendered from the run's context now, as a step input is.
            expected = render(a.expected, context)
            actual = evaluate(a.expression, output)
            passed = check(a.operator, actual, expected)
        except TemplateError as exc:
            actual, passed = str(exc), False
        results.append(
            {"expression": a.expression, "operator": a.operator, "expected": expected, "actual": actual,
             "passed": passed}
        )  # fmt: skip
        if not passed and first_failure is None:
            first_failure = ErrorInfo(
                category=ErrorCategory.VALIDATION,
                code="assertion_failed",
                message=f"assertion failed: {a.expression} {a.operator} {expected!r}, actual {actual!r}",
            )
    return results, first_failure


def _complete_step(out: _Emitter, flow: FlowDefinition, step: StepDefinition, inp: StepCompleted) -> None:
    error = inp.error
    assertions: list[dict[str, Any]] = []
    if inp.ok:
        assertions, error = _assert(step, inp.output, out.run.context())
    if inp.ok and error is None:
        try:
            extractions = {var: extract(expr, inp.output) for var, expr in step.extract.items()}
        except TemplateError as exc:
            error = ErrorInfo(category=ErrorCategory.VALIDATION, code="extraction_failed", message=str(exc))
        else:
            output = _record_sync(out, step, inp.output) if step.action == StepAction.SYNC_RECORDS else inp.output
            out.emit(ev.StepSucceeded, {
                "step": step.name, "attempt": inp.attempt, "output": output,
                "duration_ms": inp.duration_ms, "assertions": assertions, "extractions": extractions,
            })  # fmt: skip
            _advance(out, flow)
            return
    assert error is not None
    # Seed 003: "auth or quota errors" degrade the connector (a 429 is TRANSIENT, so it is still retried).
    if error.category == ErrorCategory.AUTH or error.status_code == 429:
        for connector in _connectors(step):
            out.emit(ev.ConnectorDegraded, {"connector": connector, "step": step.name, "error": error})
    retry_at = _retry_at(step.retry or flow.retry, error, inp.attempt, out.run.steps[step.name], out.clock)
    if retry_at is not None:
        # The attempt's output (capped and masked by the runner, as a StepFailed's): what the upstream answered.
        out.emit(ev.StepAttemptFailed, {
            "step": step.name, "attempt": inp.attempt, "error": error, "retry_at": retry_at,
            "duration_ms": inp.duration_ms, "output": inp.output,
        })  # fmt: skip
        _log(out, "WARNING", f"attempt {inp.attempt} failed ({error.category}): {error.message}; next attempt at "
             f"{retry_at.isoformat()}", step.name, attempt=inp.attempt, category=error.category.value)  # fmt: skip
        return
    out.emit(ev.StepFailed, {
        "step": step.name, "attempt": inp.attempt, "error": error, "output": inp.output,
        "duration_ms": inp.duration_ms, "assertions": assertions,
    })  # fmt: skip
    attempts = f" after {inp.attempt} attempts" if inp.attempt > 1 else ""
    _log(out, "ERROR", f"failed{attempts} ({error.category}): {error.message}", step.name, attempt=inp.attempt,
         category=error.category.value)  # fmt: skip
    # A step that ran out of time ends the run TIMED_OUT (architecture.md: vocabulary), any other final failure FAILED.
    _finish(out, ev.RunTimedOut if error.code == "timeout" else ev.RunFailed, failed_step=step.name, error=error)


def _connectors(step: StepDefinition) -> list[str]:
    """The connectors a step names: `connector` in its input, or in its `source` / `destination`."""
    found = [step.input.get("connector")]
    found += [part.get("connector") for part in (step.input.get("source"), step.input.get("destination"))
              if isinstance(part, dict)]  # fmt: skip
    return [c for c in dict.fromkeys(found) if isinstance(c, str) and c and "{{" not in c]


def _record_sync(out: _Emitter, step: StepDefinition, output: Any) -> Any:
    """A sync_records result as ledger events: counters, each rejected record, the canonical upserts.

    The step's output keeps the counters and a sample; the records themselves live in their own events.
    """
    if not isinstance(output, dict) or not isinstance(output.get("counters"), dict):
        return output
    counters = output["counters"]
    out.emit(ev.RecordsProcessed, {"step": step.name, **{k: int(counters.get(k, 0)) for k in _COUNTERS}})
    for failure in output.get("failures") or ():
        out.emit(ev.RecordFailed, {
            "step": step.name, "record_key": str(failure.get("record_key")), "field_path": failure.get("field_path"),
            "error": str(failure.get("error") or "rejected"), "raw_error": failure.get("raw_error"),
        })  # fmt: skip
    upserts = output.get("upserts") or ()
    if upserts and output.get("entity"):
        for i in range(0, len(upserts), _UPSERT_BATCH):
            out.emit(ev.RecordsUpserted, {"step": step.name, "entity": output["entity"],
                                          "records": upserts[i : i + _UPSERT_BATCH]})  # fmt: skip
    return {k: v for k, v in output.items() if k not in ("failures", "upserts")}


_COUNTERS = ("read", "transformed", "written", "deduped", "skipped", "failed")
_UPSERT_BATCH = 500


def _retry_at(policy: RetryPolicy, error: ErrorInfo, attempt: int, step: StepState, clock: Clock) -> datetime | None:
    """When the next attempt runs, or None when this failure is final (seed 000 categories).

    `max_elapsed_s` bounds the whole step: it counts from the first attempt's start, not this one's.
    """
    if error.category == ErrorCategory.TRANSIENT:
        if attempt > len(policy.delays_s):
            return None
        delay = policy.delays_s[attempt - 1]
    elif error.category == ErrorCategory.CONFLICT and policy.retry_conflict_once and attempt == 1:
        delay = policy.delays_s[0] if policy.delays_s else 1.0
    else:
        return None
    retry_at = clock.now + timedelta(seconds=delay * clock.time_scale)
    first_started = step.first_started_at or step.started_at or clock.now
    if (retry_at - first_started).total_seconds() > policy.max_elapsed_s * clock.time_scale:
        return None
    return retry_at


def _finish(
    out: _Emitter,
    cls: type[EventBase],
    *,
    failed_step: str | None = None,
    error: ErrorInfo | None = None,
    reason: str = "",
) -> None:
    st = out.run
    began = st.started_at or st.created_at
    duration_ms = (out.clock.now - began).total_seconds() * 1000
    if st.status in (RunStatus.RUNNING, RunStatus.PAUSED):
        # In-flight steps are abandoned: recorded CANCELED, and a result arriving later is ignored.
        for name, step in st.steps.items():
            if step.status in (StepStatus.RUNNING, StepStatus.RETRYING) and name != failed_step:
                out.emit(ev.StepCanceled, {"step": name, "attempt": step.attempt})
    out.emit(cls, {"duration_ms": duration_ms, "failed_step": failed_step, "error": error, "reason": reason})
