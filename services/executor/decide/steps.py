"""A run's steps: which runs next (or is skipped), an attempt's start, its result checked, retried or final."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import orjson

from schemas import events as ev
from schemas.events import ErrorCategory, ErrorInfo
from schemas.flows import FlowDefinition, RetryPolicy, StepAction, StepDefinition, mask_secrets
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
from services.executor.decide.emitter import EVENT_NS, Emitter
from services.executor.decide.finish import finish, log
from services.executor.decide.inputs import Clock, StepCompleted
from services.executor.fold import RunState, StepState


def advance(out: Emitter, flow: FlowDefinition) -> None:
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
        start_step(out, flow, step, attempt=1)
        return
    if out.run.failed_records:
        finish(out, ev.RunPartiallySucceeded, reason=f"{out.run.failed_records} record(s) failed")
    else:
        finish(out, ev.RunSucceeded)


def _skipped(run: RunState, flow: FlowDefinition, step: StepDefinition, value: Any) -> ev.StepSkippedPayload:
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
    return ev.StepSkippedPayload(
        step=step.name, position=flow.position(step.name), action=step.action.value, input=rendered,
        run_condition=step.run_condition, condition_value=value,
        reason=f"run_condition {orjson.dumps(step.run_condition).decode()} {was}",
    )  # fmt: skip


def start_step(out: Emitter, flow: FlowDefinition, step: StepDefinition, attempt: int) -> None:
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
        request_id = "req_" + uuid.uuid5(EVENT_NS, f"{run.run_id}:{step.name}:{attempt}").hex[:20]
        expires_at = None
        if step.timeout_s is not None:
            expires_at = out.clock.now + timedelta(seconds=step.timeout_s * out.clock.time_scale)
        paused = ev.RunPausedPayload(request_id=request_id, step=step.name, prompt=rendered, expires_at=expires_at)
        out.emit(ev.RunPaused, paused)
        until = f" until {expires_at.isoformat()}" if expires_at else ""
        log(out, "INFO", f"waiting for input on request {request_id}{until}", step.name, request_id=request_id)


def _started(flow: FlowDefinition, step: StepDefinition, attempt: int, rendered: Any) -> ev.StepStartedPayload:
    # Recorded with secrets masked (DSN passwords, `password`/`token`… keys): the ledger is shown to users.
    # The engine renders the secrets again for the step runner (adapters.steps.runner_input).
    return ev.StepStartedPayload(step=step.name, position=flow.position(step.name), action=step.action.value,
                                 attempt=attempt, input=mask_secrets(rendered))  # fmt: skip


def _fail_before_start(out: Emitter, flow: FlowDefinition, step: StepDefinition, message: str) -> None:
    error = ErrorInfo(category=ErrorCategory.VALIDATION, message=message, code="template_error")
    out.emit(ev.StepStarted, _started(flow, step, 1, None))
    out.emit(ev.StepFailed, ev.StepFailedPayload(step=step.name, attempt=1, error=error))
    finish(out, ev.RunFailed, failed_step=step.name, error=error)


def _assert(
    step: StepDefinition, output: Any, context: dict[str, Any]
) -> tuple[tuple[ev.AssertionResult, ...], ErrorInfo | None]:
    results: list[ev.AssertionResult] = []
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
        results.append(ev.AssertionResult(expression=a.expression, operator=a.operator, expected=expected,
                                          actual=actual, passed=passed))  # fmt: skip
        if not passed and first_failure is None:
            first_failure = ErrorInfo(
                category=ErrorCategory.VALIDATION,
                code="assertion_failed",
                message=f"assertion failed: {a.expression} {a.operator} {expected!r}, actual {actual!r}",
            )
    return tuple(results), first_failure


def complete_step(out: Emitter, flow: FlowDefinition, step: StepDefinition, inp: StepCompleted) -> None:
    """A step's result: it succeeded (and the run advances), or its attempt failed and is retried, or it failed."""
    error = inp.error
    assertions: tuple[ev.AssertionResult, ...] = ()
    if inp.ok and step.assertions:  # the run's context is built only for a step that asserts
        assertions, error = _assert(step, inp.output, out.run.context())
    if inp.ok and error is None:
        try:
            extractions = {var: extract(expr, inp.output) for var, expr in step.extract.items()}
        except TemplateError as exc:
            error = ErrorInfo(category=ErrorCategory.VALIDATION, code="extraction_failed", message=str(exc))
        else:
            output = _record_sync(out, step, inp.output) if step.action == StepAction.SYNC_RECORDS else inp.output
            out.emit(ev.StepSucceeded, ev.StepSucceededPayload(
                step=step.name, attempt=inp.attempt, output=output, duration_ms=inp.duration_ms,
                assertions=assertions, extractions=extractions,
            ))  # fmt: skip
            advance(out, flow)
            return
    assert error is not None
    # Auth or quota errors degrade the connector (a 429 is TRANSIENT, so it is still retried).
    if error.category == ErrorCategory.AUTH or error.status_code == 429:
        for connector in _connectors(step):
            out.emit(
                ev.ConnectorDegraded, ev.ConnectorDegradedPayload(connector=connector, step=step.name, error=error)
            )
    retry_at = _retry_at(step.retry or flow.retry, error, inp.attempt, out.run.steps[step.name], out.clock)
    if retry_at is not None:
        # The attempt's output (capped and masked by the runner, as a StepFailed's): what the upstream answered.
        out.emit(ev.StepAttemptFailed, ev.StepAttemptFailedPayload(
            step=step.name, attempt=inp.attempt, error=error, retry_at=retry_at, duration_ms=inp.duration_ms,
            output=inp.output,
        ))  # fmt: skip
        log(out, "WARNING", f"attempt {inp.attempt} failed ({error.category}): {error.message}; next attempt at "
            f"{retry_at.isoformat()}", step.name, attempt=inp.attempt, category=error.category.value)  # fmt: skip
        return
    out.emit(ev.StepFailed, ev.StepFailedPayload(
        step=step.name, attempt=inp.attempt, error=error, output=inp.output, duration_ms=inp.duration_ms,
        assertions=assertions,
    ))  # fmt: skip
    attempts = f" after {inp.attempt} attempts" if inp.attempt > 1 else ""
    log(out, "ERROR", f"failed{attempts} ({error.category}): {error.message}", step.name, attempt=inp.attempt,
        category=error.category.value)  # fmt: skip
    # A step that ran out of time ends the run TIMED_OUT (architecture.md: vocabulary), any other final failure FAILED.
    finish(out, ev.RunTimedOut if error.code == "timeout" else ev.RunFailed, failed_step=step.name, error=error)


def _connectors(step: StepDefinition) -> list[str]:
    """The connectors a step names: `connector` in its input, or in its `source` / `destination`."""
    found = [step.input.get("connector")]
    found += [part.get("connector") for part in (step.input.get("source"), step.input.get("destination"))
              if isinstance(part, dict)]  # fmt: skip
    return [c for c in dict.fromkeys(found) if isinstance(c, str) and c and "{{" not in c]


def _record_sync(out: Emitter, step: StepDefinition, output: Any) -> Any:
    """A sync_records result as ledger events: counters, each rejected record, the canonical upserts.

    The step's output keeps the counters and a sample; the records themselves live in their own events.
    """
    if not isinstance(output, dict) or not isinstance(output.get("counters"), dict):
        return output
    counters = output["counters"]
    out.emit(ev.RecordsProcessed, ev.RecordsProcessedPayload(
        step=step.name, **{k: int(counters.get(k, 0)) for k in _COUNTERS}
    ))  # fmt: skip
    for failure in output.get("failures") or ():
        out.emit(ev.RecordFailed, ev.RecordFailedPayload(
            step=step.name, record_key=str(failure.get("record_key")), field_path=failure.get("field_path"),
            error=str(failure.get("error") or "rejected"), raw_error=failure.get("raw_error"),
        ))  # fmt: skip
    upserts = output.get("upserts") or ()
    if upserts and output.get("entity"):
        for i in range(0, len(upserts), _UPSERT_BATCH):
            # The runner's records, read as canonical records (a record the model refuses fails the decision).
            records = tuple(ev.CanonicalRecord.model_validate(r) for r in upserts[i : i + _UPSERT_BATCH])
            out.emit(ev.RecordsUpserted, ev.RecordsUpsertedPayload(step=step.name, entity=output["entity"],
                                                                   records=records))  # fmt: skip
    return {k: v for k, v in output.items() if k not in ("failures", "upserts")}


_COUNTERS = ("read", "transformed", "written", "deduped", "skipped", "failed")
_UPSERT_BATCH = 500


def _retry_at(policy: RetryPolicy, error: ErrorInfo, attempt: int, step: StepState, clock: Clock) -> datetime | None:
    """When the next attempt runs, or None when this failure is final (docs/architecture.md#vocabulary: categories).

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
