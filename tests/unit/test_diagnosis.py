"""A run's diagnosis from constructed signals (services/api/diagnosis.py): every rule, every root cause, the history
of a fingerprint, the step change that came with a version, and a next action built from the values seen."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest

from services.api import diagnosis as d
from services.api.models import diagnosis as m
from services.common.runfold.fingerprint import fingerprint

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FLOW = "orders"
OUTAGE = {"category": "TRANSIENT", "code": "http_status", "status_code": 503,
          "message": "GET http://127.0.0.1:9000/orders/41 answered 503 Service Unavailable"}  # fmt: skip


def err(category: str | None, message: str = "it broke", **more: Any) -> dict[str, Any]:
    return {"category": category, "message": message, **more}


def fp(error: dict[str, Any], step: str = "call") -> str:
    return fingerprint(FLOW, step, error["category"], error["message"])[0]


def run(i: int, *attempts: d.Attempt, version: int = 1, final: dict[str, Any] | None = None) -> d.PastRun:
    """A past run `i` minutes before T0 (0: the diagnosed run), with the step's attempts."""
    return d.PastRun(id=f"run_{i:03d}", flow_version=version, status="FAILED" if final else "SUCCEEDED",
                     created_at=T0 - timedelta(minutes=i), fingerprint=fp(final) if final else None,
                     attempts=attempts)  # fmt: skip


def ok(n: int = 1, ms: float = 120.0) -> d.Attempt:
    return d.Attempt(n, "SUCCEEDED", duration_ms=ms)


def failed(n: int, error: dict[str, Any]) -> d.Attempt:
    return d.Attempt(n, "FAILED", error=error, duration_ms=5.0)


def version(step: dict[str, Any] | None = None, timeout_s: float | None = None) -> d.Version:
    return d.Version(step={"name": "call", "action": "http_request", "retry": None, "timeout_s": None, **(step or {})},
                     flow_timeout_s=timeout_s, flow_retry={"delays_s": [1, 5, 30]})  # fmt: skip


def signals(error: dict[str, Any] | None, *past: d.PastRun, status: str = "FAILED", **more: Any) -> d.Signals:
    this = run(0, *more.pop("attempts", (failed(1, error),) if error else ()), final=error,
               version=more.get("flow_version", 1))  # fmt: skip
    fields: dict[str, Any] = {
        "run_id": this.id, "flow_id": FLOW, "flow_version": 1, "status": status, "error": error,
        "error_message": error["message"] if error else None, "failed_step": "call",
        "fingerprint": fp(error) if error and error.get("category") else None, "step_action": "http_request",
        "attempts": this.attempts,
        "last_n": 50, "past": (this, *past), "versions": {1: version()},
    }  # fmt: skip
    fields.update(more)
    return d.Signals(**fields)


def rules(diagnosis: m.Diagnosis) -> dict[str, m.Evidence]:
    return {e.rule: e for e in diagnosis.evidence}


# ---------------------------------------------------------------- the four histories of the e2e test, in miniature


def test_a_flaky_step_that_passed_on_retry_elsewhere_is_an_upstream_error_and_the_advice_is_a_retry_policy() -> None:
    flaky = [run(i, failed(1, OUTAGE), ok(2)) for i in (1, 2, 3)] + [run(i, ok()) for i in range(4, 10)]
    s = signals(OUTAGE, *flaky, versions={1: version({"retry": {"delays_s": []}})})
    out = d.diagnose(s)
    assert out.root_cause == "upstream_service_error"
    assert out.history is not None
    assert (out.history.runs, out.history.occurrences, out.history.passed_on_retry) == (10, 4, 3)
    assert out.history.since_version == 1 and not out.history.appeared_with_version
    assert out.history.first_seen == T0 - timedelta(minutes=3) and out.history.first_seen_run_id == "run_003"
    fired = rules(out)
    assert fired["passed_on_retry_elsewhere"].observed == {"occurrences": 4, "passed_on_retry": 3, "runs": 10}
    assert fired["upstream_unavailable"].observed["status_code"] == 503
    assert out.step is not None and out.step.retry_delays_s == [] and out.step.attempts == 1
    assert out.next_action.startswith(
        "4 of the last 10 runs failed with this fingerprint since version 1, and every other one passed on retry. "
        "The step is flaky: add a retry policy to step call (`retry.delays_s`"
    ), out.next_action


def test_a_flaky_step_that_already_retries_is_told_to_retry_more() -> None:
    flaky = [run(1, failed(1, OUTAGE), failed(2, OUTAGE), ok(3)), run(2, ok()), run(3, ok())]
    s = signals(OUTAGE, *flaky, attempts=(failed(1, OUTAGE), failed(2, OUTAGE), failed(3, OUTAGE)))
    out = d.diagnose(s)
    assert out.step is not None and out.step.retry_delays_s == [1, 5, 30]  # the flow's policy: the step has none
    assert "2 of the last 4 runs failed with this fingerprint since version 1, and every other one passed" in (
        out.next_action)  # fmt: skip
    assert "this run used all 3 attempts of step call: add attempts or lengthen its `retry.delays_s` (now [1.0, " \
           "5.0, 30.0])" in out.next_action  # fmt: skip


def test_an_outage_seen_by_other_runs_of_the_same_host_says_the_upstream_is_down() -> None:
    down = [run(i, failed(1, OUTAGE), final=OUTAGE) for i in (1, 2, 3)]
    host = m.DependencyHealth(kind="host", name="127.0.0.1:9000", window_from=T0 - timedelta(hours=1),
                              window_to=T0 + timedelta(minutes=15), failures=6, successes=0, failed_runs=5,
                              succeeded_runs=0, failure_categories={"TRANSIENT": 6},
                              last_success_at=None)  # fmt: skip
    out = d.diagnose(signals(OUTAGE, *down, run(4, ok()), dependency=host))
    assert out.root_cause == "upstream_service_error"
    assert out.scores == {"upstream_service_error": 8}
    assert rules(out)["dependency_failing_for_others"].observed == {
        "kind": "host", "name": "127.0.0.1:9000", "failures": 6, "successes": 0, "failed_runs": 5,
        "categories": {"TRANSIENT": 6},
    }  # fmt: skip
    assert out.history is not None and out.history.passed_on_retry == 0
    assert out.next_action == (
        "4 of the last 5 runs failed with this fingerprint since version 1. Host 127.0.0.1:9000 failed 6 of 6 calls "
        "from 5 other run(s) between 11:00Z and 12:15Z. The upstream is down, not this run: check its status and "
        "logs, then retry the failed runs from the failed step (POST /v1/runs/bulk/retry) once it answers."
    )


def test_a_bad_record_refused_once_is_a_data_problem_and_this_run_s_input_is_the_suspect() -> None:
    refused = err("VALIDATION", "POST http://127.0.0.1:9000/orders answered 422 Unprocessable Entity",
                  code="http_status", status_code=422)  # fmt: skip
    out = d.diagnose(signals(refused, *(run(i, ok()) for i in range(1, 8))))
    assert out.root_cause == "data_validation"
    assert rules(out)["invalid_data"].observed == {"category": "VALIDATION", "code": "http_status", "status_code": 422}
    assert out.next_action.startswith(
        "No other of the last 8 runs of the flow failed this way: this run is the first. Step call was refused as "
        "invalid (422: POST http://127.0.0.1:9000/orders answered 422 Unprocessable Entity); this run's input is the "
        "suspect"
    ), out.next_action


def test_a_timeout_that_came_with_a_version_names_the_changed_timeout_and_the_step_s_usual_duration() -> None:
    timeout = err("TRANSIENT", "step timed out after 0.2s", code="timeout")
    old = [run(i, ok(ms=400.0 + i), version=1) for i in range(4, 10)]
    new = [run(i, failed(1, timeout), version=2, final=timeout) for i in (1, 2, 3)]
    versions = {1: version({"timeout_s": 5.0}), 2: version({"timeout_s": 0.2})}
    s = signals(timeout, *new, *old, status="TIMED_OUT", flow_version=2, versions=versions)
    out = d.diagnose(s)
    assert out.root_cause == "timing_timeout"
    assert out.history is not None and out.history.since_version == 2 and out.history.appeared_with_version
    assert [(v.version, v.runs, v.occurrences) for v in out.history.by_version] == [(1, 6, 0), (2, 4, 4)]
    assert out.history.step_median_success_ms == 406.5
    assert out.step_change == m.StepChange(from_version=1, to_version=2, changes=[
        m.FieldChange(field="steps.call.timeout_s", before=5.0, after=0.2)])  # fmt: skip
    fired = rules(out)
    assert fired["changed_with_version"].supports == "timing_timeout"
    assert fired["timeout_below_usual_duration"].observed == {"median_success_ms": 406.5, "timeout_s": 0.2}
    assert out.next_action.startswith(
        "4 of the last 10 runs failed with this fingerprint since version 2 (none of the 6 runs of earlier versions "
        "had it). Version 2 changed steps.call.timeout_s from 5 s to 0.2 s; its successful attempts took a median "
        "of 406.5 ms: raise it back above that"
    ), out.next_action


# ---------------------------------------------------------------- each rule and root cause


def test_an_assertion_failure_shows_actual_against_expected_and_says_which_to_fix() -> None:
    failure = err("VALIDATION", "assertion failed: body.total eq 100, actual 99", code="assertion_failed")
    checks = (
        {"expression": "status", "operator": "eq", "expected": 200, "actual": 200, "passed": True},
        {"expression": "body.total", "operator": "eq", "expected": 100, "actual": 99, "passed": False},
    )
    out = d.diagnose(signals(failure, assertions=checks))
    assert out.assertion == m.AssertionMismatch(expression="body.total", operator="eq", expected=100, actual=99)
    assert out.root_cause == "data_validation" and "invalid_data" not in rules(out)
    assert rules(out)["assertion_failed"].observed == {"expression": "body.total", "operator": "eq",
                                                       "expected": 100, "actual": 99}  # fmt: skip
    assert "The assertion `body.total eq 100` saw 99: if 99 is right now, update the assertion" in out.next_action


def test_an_internal_error_is_flowtrail_s_bug_whatever_else_fired() -> None:
    internal = err("INTERNAL", "KeyError: 'cursor'")
    host = m.DependencyHealth(kind="host", name="h", window_from=T0, window_to=T0, failures=9, successes=0,
                              failed_runs=9, succeeded_runs=0, failure_categories={"TRANSIENT": 9})  # fmt: skip
    out = d.diagnose(signals(internal, status="INTERNAL_ERROR", dependency=host))
    assert out.root_cause == "flowtrail_bug" and out.scores == {"flowtrail_bug": 10, "upstream_service_error": 3}
    assert f"report run run_000 with fingerprint {fp(internal)}" in out.next_action


def test_credentials_refused_through_a_degraded_connector_say_rotate_its_credentials() -> None:
    refused = err("AUTH", "GET https://crm.example/contacts answered 401 Unauthorized", status_code=401)
    connector = m.DependencyHealth(kind="connector", name="crm", window_from=T0, window_to=T0, failures=1,
                                   successes=3, failed_runs=1, succeeded_runs=3, failure_categories={"AUTH": 1},
                                   status="degraded", degraded_since=T0 - timedelta(minutes=5))  # fmt: skip
    out = d.diagnose(signals(refused, dependency=connector))
    assert out.root_cause == "auth_or_config"
    assert set(rules(out)) == {"credentials_rejected", "connector_degraded"}  # 1 failure to 3 successes: not failing
    assert "Connector crm is degraded since 2026-03-01 11:55Z: rotate its credentials" in out.next_action
    plain = d.diagnose(signals(refused))
    assert "Step call was refused (401): renew or rotate the credentials it sends" in plain.next_action


def test_other_runs_failing_mostly_on_auth_point_at_credentials_not_an_outage() -> None:
    host = m.DependencyHealth(
        kind="host",
        name="h",
        window_from=T0,
        window_to=T0,
        failures=4,
        successes=1,
        failed_runs=4,
        succeeded_runs=1,
        failure_categories={"AUTH": 3, "TRANSIENT": 1},
    )
    assert rules(d.diagnose(signals(OUTAGE, dependency=host)))["dependency_failing_for_others"].supports == (
        "auth_or_config")  # fmt: skip


@pytest.mark.parametrize("code", sorted(d.CONFIG_CODES))
def test_a_step_set_up_wrong_is_auth_or_config_and_the_advice_quotes_the_problem(code: str) -> None:
    out = d.diagnose(signals(err("VALIDATION", f"the step's {code}", code=code)))
    assert out.root_cause == "auth_or_config", out.scores
    assert f"Fix the flow's setup ({code}: the step's {code})" in out.next_action


def test_a_partial_run_is_diagnosed_by_its_rejected_records() -> None:
    rejected = m.RejectedRecords(count=3, first_key="SO-7", first_field_path="email", first_error="email is required")
    out = d.diagnose(signals(None, status="PARTIAL", rejected=rejected, fingerprint=None))
    assert out.root_cause == "data_validation"
    assert out.error.message == "3 record(s) rejected, the first: email is required"
    assert rules(out)["records_rejected"].observed == {"count": 3, "first_key": "SO-7", "first_field_path": "email"}
    assert "3 record(s) were rejected (first: SO-7 field email: email is required)" in out.next_action


def test_runs_refused_before_they_ran_are_diagnosed_by_their_status() -> None:
    invalid = d.diagnose(signals(None, status="INVALID", failed_step=None, error_message="input: 'id' is required"))
    assert invalid.root_cause == "data_validation" and invalid.step is None
    assert invalid.error.message == "input: 'id' is required"
    quota = d.diagnose(signals(None, status="QUOTA_EXCEEDED", failed_step=None, error_message="quota of 10 runs"))
    assert quota.root_cause == "auth_or_config" and "quota_exceeded" in rules(quota)


def test_a_flow_timeout_reads_the_flow_s_timeout_and_an_intermittent_one_is_told_to_retry() -> None:
    late = err("TRANSIENT", "the flow timeout of 30s passed while call was running", code="flow_timeout")
    out = d.diagnose(signals(late, status="TIMED_OUT", versions={1: version(timeout_s=30.0)}))
    assert rules(out)["timed_out"].observed == {"code": "flow_timeout", "run_status": "TIMED_OUT", "timeout_s": 30.0}
    assert "did not finish within 30 s" in out.next_action
    slow = err("TRANSIENT", "step timed out after 2s", code="timeout")
    again = d.diagnose(signals(slow, run(1, failed(1, slow), ok(2)), status="TIMED_OUT"))
    assert rules(again)["passed_on_retry_elsewhere"].supports == "timing_timeout"
    assert again.root_cause == "timing_timeout" and "The slowness is intermittent" in again.next_action


def test_a_change_of_input_or_assertions_with_the_version_points_at_config_or_data() -> None:
    refused = err("VALIDATION", "POST http://h/x answered 400 Bad Request", code="http_status", status_code=400)
    before = version({"input": {"url": "http://h/x", "headers": {"Authorization": "Bearer abc"}}})
    after = version({"input": {"url": "http://h/x", "headers": {"Authorization": "Bearer xyz"}},
                     "assertions": [{"expression": "status", "expected": 201}]})  # fmt: skip
    past = (run(1, failed(1, refused), version=2, final=refused), run(2, ok(), version=1))
    out = d.diagnose(signals(refused, *past, flow_version=2, versions={1: before, 2: after}))
    assert out.step_change is not None
    changes = {c.field: (c.before, c.after) for c in out.step_change.changes}
    assert set(changes) == {"steps.call.input", "steps.call.assertions"}
    assert changes["steps.call.input"][1]["headers"]["Authorization"] == "***"  # secrets never shown
    supports = {e.supports for e in out.evidence if e.rule == "changed_with_version"}
    assert supports == {"data_validation", "auth_or_config"}
    # invalid_data (5) + the assertions' change (3) outweigh the input's change (3).
    assert out.root_cause == "data_validation" and out.scores == {"data_validation": 8, "auth_or_config": 3}


def test_a_step_the_version_added_is_one_change_that_points_at_no_class() -> None:
    refused = err("VALIDATION", "POST http://h/x answered 400 Bad Request", code="http_status", status_code=400)
    past = (run(1, failed(1, refused), version=2, final=refused), run(2, version=1))
    out = d.diagnose(signals(refused, *past, flow_version=2, versions={1: d.Version(step=None), 2: version()}))
    assert out.step_change is not None
    assert [(c.field, c.before) for c in out.step_change.changes] == [("steps.call", None)]
    assert out.step_change.changes[0].after["action"] == "http_request"
    assert "changed_with_version" not in rules(out) and out.root_cause == "data_validation"


# ---------------------------------------------------------------- the history of a fingerprint


def test_only_a_later_successful_attempt_counts_as_passed_on_retry() -> None:
    other = err("TRANSIENT", "GET http://h/x answered 502 Bad Gateway", code="http_status", status_code=502)
    past = (
        run(1, ok(1), failed(2, OUTAGE)),  # the success came before the failure: not passed on retry
        run(2, failed(1, other), failed(2, OUTAGE), ok(3)),  # passed on retry after the fingerprint
        run(3, failed(1, other), ok(2)),  # another fingerprint: not an occurrence
    )
    h = d.history(signals(OUTAGE, *past), fp(OUTAGE))
    assert h is not None and (h.occurrences, h.passed_on_retry) == (3, 1)


def test_first_seen_comes_from_the_failure_group_when_it_is_older_than_the_runs_looked_at() -> None:
    older = T0 - timedelta(days=30)
    h = d.history(signals(OUTAGE, group_first_seen=older), fp(OUTAGE))
    assert h is not None and (h.first_seen, h.first_seen_run_id) == (older, None)
    out = d.diagnose(signals(OUTAGE, run(1, failed(1, OUTAGE), ok(2)), group_first_seen=older))
    assert out.next_action.startswith(
        "2 of the last 2 runs failed with this fingerprint since version 1, and every "
        "other one passed on retry; it was first seen on 2026-01-30, before these runs. "
    )
    h = d.history(signals(OUTAGE, group_first_seen=T0 + timedelta(days=1)), fp(OUTAGE))
    assert h is not None and (h.first_seen, h.first_seen_run_id) == (T0, "run_000")


def test_a_run_whose_final_error_differs_from_its_attempts_is_matched_by_its_run_fingerprint() -> None:
    late = err("TRANSIENT", "the flow timeout of 30s passed while call was running", code="flow_timeout")
    h = d.history(signals(late, run(1, ok(1), final=late), attempts=(ok(1),)), fp(late))
    assert h is not None and (h.occurrences, h.passed_on_retry) == (2, 0)


def test_the_diagnosis_does_not_depend_on_the_order_the_runs_were_read_in() -> None:
    past = [run(i, failed(1, OUTAGE), ok(2), version=1 + i % 3) for i in range(1, 12)]
    past += [run(i, ok(ms=float(i)), version=1 + i % 3) for i in range(12, 30)]
    versions = {v: version({"timeout_s": float(v)}) for v in (1, 2, 3)}
    expected = d.diagnose(signals(OUTAGE, *past, versions=versions))
    for seed in range(5):
        random.Random(seed).shuffle(past)
        assert d.diagnose(signals(OUTAGE, *past, versions=versions)) == expected


# ---------------------------------------------------------------- decide, over every combination


CLASSES: tuple[m.RootCause, ...] = get_args(m.RootCause)


def evidence(supports: m.RootCause, weight: int) -> m.Evidence:
    return m.Evidence(rule="r", supports=supports, weight=weight, observed={}, says="")


def test_the_order_names_every_root_cause_once() -> None:
    assert sorted(d.ORDER) == sorted(CLASSES)


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(CLASSES, 2)))
def test_the_heavier_class_wins_and_a_tie_goes_to_the_more_specific_one(a: m.RootCause, b: m.RootCause) -> None:
    assert d.decide([evidence(a, 2), evidence(b, 3)]) == (b, {a: 2, b: 3})
    assert d.decide([evidence(a, 3), evidence(b, 1), evidence(b, 1)]) == (a, {a: 3, b: 2})
    tie = d.decide([evidence(a, 4), evidence(b, 4)])[0]
    assert tie == min(a, b, key=d.ORDER.index)


CATEGORIES = (None, "TRANSIENT", "AUTH", "VALIDATION", "CONFLICT", "INTERNAL")
CODES = (None, "http_status", "network", "timeout", "flow_timeout", "assertion_failed", "unknown_connector",
         "invalid_input_schema", "extraction_failed")  # fmt: skip
STATUSES = sorted(d.DIAGNOSED)


def diagnosed(category: str | None, code: str | None, status: str) -> m.Diagnosis:
    error = {"category": category, "message": f"{category} {code or 'uncoded'}", "code": code} if category else None
    return d.diagnose(signals(error, status=status, error_message=None if error else "refused"))


@pytest.mark.parametrize(("category", "code", "status"), list(itertools.product(CATEGORIES, CODES, STATUSES)))
def test_every_combination_gets_one_root_cause_its_evidence_adds_up_to_and_an_action(
    category: str | None, code: str | None, status: str
) -> None:
    out = diagnosed(category, code, status)
    totals: dict[str, int] = {}
    for e in out.evidence:
        totals[e.supports] = totals.get(e.supports, 0) + e.weight
    assert out.scores == totals
    assert out.root_cause in CLASSES
    assert not totals or totals[out.root_cause] == max(totals.values())
    assert out.next_action and "None" not in out.next_action


# The codes the executor gives each category, and the statuses a run ends in with such an error.
POSSIBLE_CODES = {
    None: (None,), "TRANSIENT": (None, "http_status", "network", "timeout", "flow_timeout"), "AUTH": ("http_status",),
    "VALIDATION": ("http_status", "assertion_failed", "unknown_connector", "invalid_input_schema", "extraction_failed"),
    "CONFLICT": ("http_status",), "INTERNAL": (None,),
}  # fmt: skip


def _status_for(category: str | None, code: str | None) -> tuple[str, ...]:
    if category is None:
        return ("INVALID", "QUOTA_EXCEEDED")
    if category == "INTERNAL":
        return ("INTERNAL_ERROR", "FAILED")
    return ("TIMED_OUT",) if code in ("timeout", "flow_timeout") else ("FAILED",)


POSSIBLE = [(c, code, st) for c, codes in POSSIBLE_CODES.items() for code in codes for st in _status_for(c, code)]


@pytest.mark.parametrize(("category", "code", "status"), POSSIBLE)
def test_each_kind_of_error_the_executor_records_gets_its_root_cause(
    category: str | None, code: str | None, status: str
) -> None:
    out = diagnosed(category, code, status)
    if category == "INTERNAL":
        expected = "flowtrail_bug"
    elif category == "AUTH" or code == "unknown_connector" or status == "QUOTA_EXCEEDED":
        expected = "auth_or_config"
    elif status == "TIMED_OUT":
        expected = "timing_timeout"
    elif category in ("VALIDATION", "CONFLICT") or status == "INVALID":
        expected = "data_validation"
    else:
        expected = "upstream_service_error"
    assert out.root_cause == expected, (out.scores, out.evidence)


# ---------------------------------------------------------------- what a step called, and runs with nothing to diagnose


def test_a_step_s_connector_and_host_are_read_as_the_executor_reads_them() -> None:
    assert d.step_connector({"connector": "crm", "source": {"connector": "other"}}) == "crm"
    assert d.step_connector({"source": {"kind": "http", "connector": "shop"}}) == "shop"
    assert d.step_connector({"destination": {"connector": "{{ vars.c }}"}}) is None
    assert d.step_connector("not an object") is None
    assert d.url_host("https://user:pw@API.Example.com:8443/x?y=1") == "api.example.com:8443"
    assert d.url_host("http://127.0.0.1:9000") == "127.0.0.1:9000"
    assert d.url_host("/relative/path") is None and d.url_host(None) is None


def test_a_run_that_did_not_fail_says_why_it_has_no_diagnosis() -> None:
    assert d.not_failed("SUCCEEDED") == "the run succeeded: nothing to diagnose"
    assert "canceled" in d.not_failed("CANCELED")
    assert d.not_failed("RUNNING") == "the run is RUNNING and has not failed (yet): nothing to diagnose"
    assert {"SUCCEEDED", "CANCELED", "RUNNING", "QUEUED", "PAUSED"}.isdisjoint(d.DIAGNOSED)
    assert {"FAILED", "TIMED_OUT", "INTERNAL_ERROR", "PARTIAL", "INVALID", "QUOTA_EXCEEDED"} == d.DIAGNOSED
