"""A run's start: requested, checked (flow, input schema), scheduled or queued, then started, refused by the tenant's
quota, or BLOCKED behind its flow's concurrency limit."""

from __future__ import annotations

from datetime import datetime

from schemas import events as ev
from schemas.events import TriggerReceived
from schemas.flows import FlowDefinition, StepDefinition
from services.common.templating import TemplateError, extract
from services.executor.decide.emitter import Emitter
from services.executor.decide.inputs import Admission, StartRun
from services.executor.decide.steps import advance
from services.executor.fold import RunState
from services.executor.inputs import input_errors


def start(out: Emitter, flow: FlowDefinition | None, inp: StartRun) -> None:
    t = inp.trigger
    out.emit(
        ev.RunRequested,
        _requested(t, flow),
        tenant_id=t.tenant_id,
        run_id=t.run_id,
        flow_id=t.flow_id,
        flow_version=inp.flow_version,
        correlation_id=t.parent_run_id or t.run_id,
    )
    if flow is None:
        version = f" version {t.flow_version}" if t.flow_version else ""
        out.emit(ev.RunInvalid, ev.ReasonPayload(reason=f"flow {t.flow_id!r}{version} does not exist"))
        return
    if errors := input_errors(flow, t.trigger.payload):
        reason = f"the input does not match the flow's input schema: {errors[0].message}"
        out.emit(ev.RunInvalid, ev.ReasonPayload(reason=reason, errors=tuple(errors)))
        return
    if t.run_at is not None and t.run_at > out.clock.now:
        out.emit(ev.RunScheduled, ev.RunScheduledPayload(run_at=t.run_at))
        return
    queue(out, flow, inp.admission)


def reaches_admission(flow: FlowDefinition | None, trigger: TriggerReceived, now: datetime) -> bool:
    """The trigger's run will ask for a slot as it starts (`start` does not end it INVALID or schedule it): only
    then does the engine count it against the flow's limit and the tenant's quota."""
    if flow is None or input_errors(flow, trigger.trigger.payload):
        return False
    return trigger.run_at is None or trigger.run_at <= now


def _requested(t: TriggerReceived, flow: FlowDefinition | None) -> ev.RunRequestedPayload:
    return ev.RunRequestedPayload(
        trigger=t.trigger,
        environment=t.environment,
        execution_mode=t.execution_mode,
        flow_name=flow.name if flow else "",
        tags=flow.tags if flow else (),
        received_at=t.received_at,
        parent_run_id=t.parent_run_id,
        parent_step=t.parent_step,
        parent_attempt=t.parent_attempt,
        fail_parent_on_failure=t.fail_parent_on_failure,
        retry_of=t.retry_of,
        retry_strategy=t.retry_strategy,
        bulk_operation_id=t.bulk_operation_id,
        only_keys=t.only_keys,
        run_at=t.run_at,
        cursor_window=t.cursor_window,
        reuse=t.reuse,
        reused=t.reused,
    )


def over_flow_limit(flow: FlowDefinition, admission: Admission) -> bool:
    limit = flow.concurrency_limit
    return limit is not None and (admission.flow_active >= limit or admission.queued_ahead > 0)


def queue(out: Emitter, flow: FlowDefinition, admission: Admission) -> None:
    """The run joins the queue (a new, due or unblocked run) and asks to start at once."""
    out.emit(ev.RunQueued, ev.Empty())
    admit(out, flow, admission)


def admit(out: Emitter, flow: FlowDefinition, admission: Admission) -> None:
    """A QUEUED run starts, or is refused by the tenant's quota, or waits BLOCKED for a slot of its flow."""
    if admission.tenant_limit is not None and admission.tenant_active >= admission.tenant_limit:
        reason = f"the tenant already has {admission.tenant_active} active runs, its quota is {admission.tenant_limit}"
        out.emit(ev.RunQuotaExceeded, ev.ReasonPayload(reason=reason))
        return
    if over_flow_limit(flow, admission):
        out.emit(ev.RunBlocked, ev.ReasonPayload(
            reason=f"{admission.flow_active} runs of the flow are active, its concurrency limit is "
                   f"{flow.concurrency_limit}; waiting for one to end"
        ))  # fmt: skip
        return
    run = out.run
    out.emit(ev.RunStarted, ev.RunStartedPayload(cursor_window=run.cursor_window))
    for step in flow.steps:  # FROM_FAILED_STEP: the steps that succeeded in the retried run are not run again
        if step.name in run.reuse:
            out.emit(ev.StepSucceeded, _reused(run, flow, step))
    advance(out, flow)


def _reused(run: RunState, flow: FlowDefinition, step: StepDefinition) -> ev.StepSucceededPayload:
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
    return ev.StepSucceededPayload(
        step=step.name, output=output, extractions=extractions, reused_from=was.run_id if was else run.retry_of,
        position=flow.position(step.name), action=step.action.value, input=was.input if was else None,
    )  # fmt: skip
