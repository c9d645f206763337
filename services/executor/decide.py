"""decide(state, flow, input) -> events: every run decision, pure and deterministic (DESIGN 2.4).

Inputs are the trigger, a step's result, a due timer and an internal failure. Each carries an id
that becomes the `causation_id` of what it causes; an input already folded into the state (a
redelivery after a crash) decides nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas import events as ev
from schemas.events import ErrorCategory, ErrorInfo, EventBase, TriggerReceived
from schemas.flows import FlowDefinition, RetryPolicy, StepDefinition, mask_secrets
from schemas.status import RunStatus, StepStatus
from services.executor.fold import RunState, StepState, fold
from services.executor.templating import TemplateError, check, evaluate, render, truthy

_EVENT_NS = uuid.UUID("6f1d7c1e-9f57-4d55-9a54-2f3a4c1b0e77")


@dataclass(frozen=True, slots=True)
class StartRun:
    trigger: TriggerReceived
    flow_version: int

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


Input = StartRun | StepCompleted | TimerFired | InternalFailure


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
    if flow is None:  # an existing run always has its flow version
        raise LookupError(f"flow version of run {out.run.run_id} is unknown")
    match inp:
        case StepCompleted():
            step = out.run.steps.get(inp.step)
            if step is None or step.status != StepStatus.RUNNING or step.attempt != inp.attempt:
                return [], state
            _complete_step(out, flow, flow.step(inp.step), inp)
        case TimerFired():
            step = out.run.steps.get(inp.step)
            if step is None or step.status != StepStatus.RETRYING or step.attempt != inp.attempt:
                return [], state
            _start_step(out, flow, flow.step(inp.step), attempt=inp.attempt + 1)
    return out.events, out.state


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
        },
        tenant_id=t.tenant_id,
        run_id=t.run_id,
        flow_id=t.flow_id,
        flow_version=inp.flow_version,
        correlation_id=t.run_id,
    )
    if flow is None:
        version = f" version {t.flow_version}" if t.flow_version else ""
        out.emit(ev.RunInvalid, {"reason": f"flow {t.flow_id!r}{version} does not exist"})
        return
    out.emit(ev.RunQueued, {})
    out.emit(ev.RunStarted, {})
    _advance(out, flow)


def _advance(out: _Emitter, flow: FlowDefinition) -> None:
    """Skip steps whose condition is false, start the next one, or finish the run."""
    for step in flow.steps:
        if step.name in out.run.steps:
            continue
        if step.run_condition is not None:
            try:
                run_it = truthy(evaluate(step.run_condition, out.run.context()))
            except TemplateError as exc:
                _fail_before_start(out, flow, step, str(exc))
                return
            if not run_it:
                out.emit(
                    ev.StepSkipped,
                    {
                        "step": step.name,
                        "position": flow.position(step.name),
                        "reason": f"run_condition false: {step.run_condition}",
                    },
                )
                continue
        _start_step(out, flow, step, attempt=1)
        return
    _finish(out, ev.RunSucceeded)


def _start_step(out: _Emitter, flow: FlowDefinition, step: StepDefinition, attempt: int) -> None:
    try:
        rendered = render(dict(step.input), out.run.context())
    except TemplateError as exc:
        _fail_before_start(out, flow, step, str(exc))
        return
    out.emit(ev.StepStarted, _started(flow, step, attempt, rendered))


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


def _assert(step: StepDefinition, output: Any) -> tuple[list[dict[str, Any]], ErrorInfo | None]:
    results: list[dict[str, Any]] = []
    first_failure: ErrorInfo | None = None
    for a in step.assertions:
        try:
            actual = evaluate(a.expression, output)
            passed = check(a.operator, actual, a.expected)
        except TemplateError as exc:
            actual, passed = str(exc), False
        results.append(
            {"expression": a.expression, "operator": a.operator, "expected": a.expected, "actual": actual,
             "passed": passed}
        )  # fmt: skip
        if not passed and first_failure is None:
            first_failure = ErrorInfo(
                category=ErrorCategory.VALIDATION,
                code="assertion_failed",
                message=f"assertion failed: {a.expression} {a.operator} {a.expected!r}, actual {actual!r}",
            )
    return results, first_failure


def _complete_step(out: _Emitter, flow: FlowDefinition, step: StepDefinition, inp: StepCompleted) -> None:
    error = inp.error
    assertions: list[dict[str, Any]] = []
    if inp.ok:
        assertions, error = _assert(step, inp.output)
    if inp.ok and error is None:
        try:
            extractions = {var: evaluate(expr, inp.output) for var, expr in step.extract.items()}
        except TemplateError as exc:
            error = ErrorInfo(category=ErrorCategory.VALIDATION, code="extraction_failed", message=str(exc))
        else:
            out.emit(ev.StepSucceeded, {
                "step": step.name, "attempt": inp.attempt, "output": inp.output,
                "duration_ms": inp.duration_ms, "assertions": assertions, "extractions": extractions,
            })  # fmt: skip
            _advance(out, flow)
            return
    assert error is not None
    retry_at = _retry_at(step.retry or flow.retry, error, inp.attempt, out.run.steps[step.name], out.clock)
    if retry_at is not None:
        out.emit(ev.StepAttemptFailed, {
            "step": step.name, "attempt": inp.attempt, "error": error, "retry_at": retry_at,
            "duration_ms": inp.duration_ms,
        })  # fmt: skip
        return
    out.emit(ev.StepFailed, {
        "step": step.name, "attempt": inp.attempt, "error": error, "output": inp.output,
        "duration_ms": inp.duration_ms, "assertions": assertions,
    })  # fmt: skip
    _finish(out, ev.RunFailed, failed_step=step.name, error=error)


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
    out: _Emitter, cls: type[EventBase], *, failed_step: str | None = None, error: ErrorInfo | None = None
) -> None:
    st = out.run
    began = st.started_at or st.created_at
    duration_ms = (out.clock.now - began).total_seconds() * 1000
    if st.status == RunStatus.RUNNING:
        for name, step in st.steps.items():
            if step.status in (StepStatus.RUNNING, StepStatus.RETRYING) and name != failed_step:
                out.emit(ev.StepCanceled, {"step": name, "attempt": step.attempt})
    out.emit(cls, {"duration_ms": duration_ms, "failed_step": failed_step, "error": error})
