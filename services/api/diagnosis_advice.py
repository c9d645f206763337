"""The next action of a diagnosis, written from the values its evidence saw (docs/runs.md, Diagnosis): the pattern
across runs, then what follows for the root cause decided. Pure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.api.models import diagnosis as m

if TYPE_CHECKING:
    from services.api.diagnosis import Facts


def _pattern_sentence(h: m.History | None) -> str:
    if h is None:
        return ""
    if h.runs <= 1:
        return "This is the flow's only run so far: there is no pattern to compare with. "
    if h.occurrences <= 1:
        return f"No other of the last {h.runs} runs of the flow failed this way: this run is the first. "
    since = f" since version {h.since_version}" if h.since_version is not None else ""
    others, passed = h.occurrences - 1, h.passed_on_retry
    retried = ""
    if passed:
        retried = (", and every other one passed on retry" if passed >= others
                   else f", {passed} of the {others} others passed on retry")  # fmt: skip
    appeared = ""
    if h.appeared_with_version and h.since_version is not None:
        clean = sum(v.runs for v in h.by_version if v.version < h.since_version)
        appeared = f" (none of the {clean} runs of earlier versions had it)"
    older = ""
    if h.first_seen is not None and h.first_seen_run_id is None:  # the failure group saw it before these runs
        older = f"; it was first seen on {h.first_seen:%Y-%m-%d}, before these runs"
    return f"{h.occurrences} of the last {h.runs} runs failed with this fingerprint{since}{appeared}{retried}{older}. "


def _what(err: m.DiagnosedError) -> str:
    """`422: POST … answered 422 …`, or the message alone when the error has neither a status nor a code."""
    label = err.status_code or err.code
    return f"{label}: {err.message}" if label else err.message


def _seconds(value: float | None) -> str:
    return "no timeout" if value is None else f"{value:g} s"


def _retry_advice(step: m.FailedStep | None) -> str:
    if step is None:
        return "add a retry policy"
    if not step.retry_delays_s:
        return f"add a retry policy to step {step.name} (`retry.delays_s`, e.g. [1, 5, 30])"
    return (f"this run used all {step.attempts} attempts of step {step.name}: add attempts or lengthen its "
            f"`retry.delays_s` (now {step.retry_delays_s})")  # fmt: skip


def _dependency_sentence(d: m.DependencyHealth) -> str:
    since = f"; its last success was at {d.last_success_at:%Y-%m-%d %H:%M:%S}Z" if d.last_success_at else ""
    state = f" (recorded {d.status}" + (f" since {d.degraded_since:%H:%M:%S}Z)" if d.degraded_since else ")")
    return (f"{d.kind.capitalize()} {d.name} failed {d.failures} of {d.failures + d.successes} calls from "
            f"{d.failed_runs} other run(s) between {d.window_from:%H:%M}Z and {d.window_to:%H:%M}Z"
            f"{state if d.status else ''}{since}. ")  # fmt: skip


def next_action(cause: m.RootCause, f: Facts, fired: set[str]) -> str:
    h, step, err, d, s = f.history, f.step, f.error, f.s.dependency, f.s
    where = f"step {step.name}" if step else "the run"
    text = _pattern_sentence(h)
    retry_run = f"then retry run {s.run_id} from the failed step (POST /v1/runs/{s.run_id}/retry)"
    if cause == "flowtrail_bug":
        first = f", first seen {h.first_seen:%Y-%m-%d %H:%M}Z" if h and h.first_seen else ""
        group = f" with fingerprint {err.fingerprint}{first}" if err.fingerprint else ""
        return text + (f"Flowtrail failed, not the flow: report run {s.run_id}{group} and the message "
                       f"{err.message!r}; {retry_run} once it is fixed.")  # fmt: skip
    if cause == "auth_or_config":
        if d is not None and d.kind == "connector" and "connector_degraded" in fired:
            return text + (f"Connector {d.name} is degraded since {d.degraded_since:%Y-%m-%d %H:%M}Z: rotate its "
                           f"credentials (the tenant's secrets) and check it with POST /v1/connectors/{{id}}/verify; "
                           f"{retry_run}.")  # fmt: skip
        if err.category == "AUTH":
            return text + (f"{where.capitalize()} was refused ({err.status_code or 'AUTH'}): renew or rotate the "
                           f"credentials it sends, {retry_run}.")  # fmt: skip
        if f.change is not None and "changed_with_version" in fired:
            fields = ", ".join(c.field for c in f.change.changes)
            return text + (f"Version {f.change.to_version} changed {fields}: compare it with version "
                           f"{f.change.from_version} and correct the flow, then publish it and retry.")  # fmt: skip
        return text + f"Fix the flow's setup ({err.code or s.status}: {err.message}), publish it, {retry_run}."
    if cause == "timing_timeout":
        median = h.step_median_success_ms if h else None
        timeout_changes = [c for c in (f.change.changes if f.change else []) if c.field.endswith("timeout_s")]
        if timeout_changes:
            c = timeout_changes[0]
            usual = f"; its successful attempts took a median of {median:g} ms" if median is not None else ""
            return text + (f"Version {f.change.to_version if f.change else '?'} changed {c.field} from "
                           f"{_seconds(c.before)} to {_seconds(c.after)}{usual}: raise it back above that, "
                           f"publish the flow and {retry_run.removeprefix('then ')}.")  # fmt: skip
        if median is not None and "timeout_below_usual_duration" in fired:
            return text + (f"{where.capitalize()} usually takes {median:g} ms and its timeout is "
                           f"{_seconds(f.timeout_s)}: raise the timeout above that, {retry_run}.")  # fmt: skip
        if h is not None and h.passed_on_retry:
            return text + f"The slowness is intermittent: {_retry_advice(step)}, or raise the timeout."
        return text + (f"{where.capitalize()} did not finish within {_seconds(f.timeout_s)}: check what the upstream "
                       f"was doing then, or raise the timeout, {retry_run}.")  # fmt: skip
    if cause == "data_validation":
        a, r = f.assertion, s.rejected
        if a is not None:
            return text + (f"The assertion `{a.expression} {a.operator} {a.expected!r}` saw {a.actual!r}: if "
                           f"{a.actual!r} is right now, update the assertion; if not, fix the data upstream; "
                           f"{retry_run}.")  # fmt: skip
        if r is not None and r.count:
            field_path = f" field {r.first_field_path}" if r.first_field_path else ""
            return text + (f"{r.count} record(s) were rejected (first: {r.first_key}{field_path}: {r.first_error}): "
                           f"fix them at the source or in the mapping, {retry_run} (only the rejected records "
                           f"run again).")  # fmt: skip
        suspect = ("this run's input is the suspect (GET /v1/runs/{id} shows it)" if h is None or h.occurrences <= 1
                   else "the flow's data or mapping is wrong for every such run")  # fmt: skip
        return text + (f"{where.capitalize()} was refused as invalid ({_what(err)}); "
                       f"{suspect}: correct it, {retry_run}.")  # fmt: skip
    # upstream_service_error
    if h is not None and h.passed_on_retry:
        return text + f"The step is flaky: {_retry_advice(step)}."
    if d is not None and "dependency_failing_for_others" in fired:
        return text + (_dependency_sentence(d) + "The upstream is down, not this run: check its status and logs, "
                       "then retry the failed runs from the failed step (POST /v1/runs/bulk/retry) once it "
                       "answers.")  # fmt: skip
    return text + (f"The upstream failed ({_what(err)}): check its logs around this run's time; "
                   f"{retry_run}.")  # fmt: skip
